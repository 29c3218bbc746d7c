package reaper

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/robfig/cron/v3"
)

// scheduleHelp is appended to every schedule error.
const scheduleHelp = `use a cron expression such as "*/5 * * * *" (minute hour day-of-month month day-of-week, ` +
	`optionally preceded by a seconds field and by CRON_TZ=Zone/Name) or a descriptor such as "@hourly" or "@every 30s"`

var scheduleParser = cron.NewParser(cron.SecondOptional | cron.Minute | cron.Hour |
	cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

// ValidateSchedule reports whether Start would accept spec, without
// starting anything. The error wraps ErrInvalidSchedule.
func ValidateSchedule(spec string) error {
	_, err := parseSchedule(spec)
	return err
}

func parseSchedule(spec string) (sched cron.Schedule, err error) {
	bad := func(why string) error {
		return fmt.Errorf("%w %q: %s; %s", ErrInvalidSchedule, spec, why, scheduleHelp)
	}
	s := strings.TrimSpace(spec)
	if s == "" {
		return nil, fmt.Errorf("%w: empty; %s", ErrInvalidSchedule, scheduleHelp)
	}
	// cron would silently run "@every 10ms" or "@every -5s" every second.
	if rest, ok := strings.CutPrefix(s, "@every"); ok {
		d, err := time.ParseDuration(strings.TrimSpace(rest))
		switch {
		case err != nil:
			return nil, bad("@every needs a Go duration such as 30s, 5m or 1h30m")
		case d < time.Second || d%time.Second != 0:
			return nil, bad("@every needs a whole number of seconds, at least 1s")
		}
	}
	// cron panics on a time zone prefix with nothing after it.
	if (strings.HasPrefix(s, "TZ=") || strings.HasPrefix(s, "CRON_TZ=")) && !strings.ContainsAny(s, " \t") {
		return nil, bad("a time zone prefix needs a schedule after it")
	}
	defer func() {
		if p := recover(); p != nil {
			sched, err = nil, bad(fmt.Sprint(p))
		}
	}()
	sched, err = scheduleParser.Parse(s)
	if err != nil {
		return nil, bad(err.Error())
	}
	if sched.Next(time.Now()).IsZero() {
		return nil, bad("it never fires")
	}
	return sched, nil
}

// Start runs a pass on schedule until Stop: a cron expression with five
// fields (minute hour day-of-month month day-of-week) or six (seconds
// first), interpreted in the local time zone unless prefixed with
// CRON_TZ=Zone/Name, or a descriptor such as "@hourly" or "@every 30s".
// One pass runs at a time: a run that comes due while the previous pass is
// still going is skipped (and logged). Start does not run a pass at once;
// call RunOnce for that.
func (r *Reaper) Start(schedule string) error {
	sched, err := parseSchedule(schedule)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cron != nil {
		return ErrAlreadyStarted
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := cron.New(cron.WithLogger(cron.DiscardLogger))
	c.Schedule(sched, cron.FuncJob(func() { r.scheduled(ctx) }))
	c.Start()
	r.cron, r.cancel = c, cancel
	return nil
}

func (r *Reaper) scheduled(ctx context.Context) {
	if !r.running.CompareAndSwap(false, true) {
		r.log.Warn(msgRunSkipped, "schema", r.cfg.Schema)
		return
	}
	defer r.running.Store(false)
	st, err := r.pass(ctx)
	r.report(st, err, true)
}

// NextRun returns when the next scheduled pass is due, or the zero time
// when the Reaper is not started.
func (r *Reaper) NextRun() time.Time {
	r.mu.Lock()
	c := r.cron
	r.mu.Unlock()
	if c == nil {
		return time.Time{}
	}
	for _, e := range c.Entries() {
		return e.Next
	}
	return time.Time{}
}

// Stop ends the schedule. A pass that is running stops after its current
// batch; Stop waits for it until ctx is done. Stop without Start, or a
// second Stop, does nothing. The Reaper can be started again afterwards.
func (r *Reaper) Stop(ctx context.Context) error {
	r.mu.Lock()
	c, cancel := r.cron, r.cancel
	r.cron, r.cancel = nil, nil
	r.mu.Unlock()
	if c == nil {
		return nil
	}
	done := c.Stop() // no new runs from here on
	cancel()         // the running pass stops after its batch
	select {
	case <-done.Done():
		return nil
	case <-ctx.Done():
		return fmt.Errorf("reaper: stop: gave up waiting for the running pass (it stops after its current batch, within the batch timeout of %s): %w",
			r.cfg.BatchTimeout, context.Cause(ctx))
	}
}
