// Command holder is the torture suite's helper process: it contends for locks
// with lease.Client, runs fenced critical sections on a shared counter, and
// reports what it did and when, as JSON lines (torture.Event) on its standard
// output. It stops gracefully when its standard input is closed: it releases
// what it holds, closes its client and pool, checks that it leaked no
// goroutine and no connection, reports EvBye and exits 0.
//
// It is built and started by the tests of package torture; it is not a tool.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/pglease/pglease/internal/torture"
	"github.com/pglease/pglease/lease"
)

type config struct {
	url, schema, proc string
	keys              int
	ttl, poll         time.Duration
	work, workMin     time.Duration
	sections          int
	rawFence          float64
	seed              uint64
	mode              string // table, advisory or mixed
	check             time.Duration
	// Sabotage, for checking that the oracles catch what they should.
	unfenced, ignoreLoss bool
}

func main() {
	var cfg config
	flag.StringVar(&cfg.url, "url", "", "connection URL")
	flag.StringVar(&cfg.schema, "schema", "", "pglease schema; the counter tables are in the same schema")
	flag.StringVar(&cfg.proc, "proc", "", "this process's name in events and application_name")
	flag.IntVar(&cfg.keys, "keys", 2, "number of keys to contend for")
	flag.DurationVar(&cfg.ttl, "ttl", 1500*time.Millisecond, "lease TTL")
	flag.DurationVar(&cfg.poll, "poll", 300*time.Millisecond, "fallback poll interval of waiters")
	flag.DurationVar(&cfg.work, "work", 60*time.Millisecond, "most time a section waits between its read and its write")
	flag.DurationVar(&cfg.workMin, "workmin", 0, "least time a section waits between its read and its write")
	flag.IntVar(&cfg.sections, "sections", 2, "most sections per acquisition")
	flag.Float64Var(&cfg.rawFence, "rawfence", 0.5, "share of sections that fence with the SQL function directly instead of Lock.Fence")
	flag.Uint64Var(&cfg.seed, "seed", 1, "random seed")
	flag.StringVar(&cfg.mode, "mode", "table", "table, advisory, or mixed (each acquisition picks one)")
	flag.DurationVar(&cfg.check, "check", 300*time.Millisecond, "AdvisoryConfig.CheckInterval")
	flag.BoolVar(&cfg.unfenced, "sabotage-unfenced", false, "write without any fence (oracle A must catch it)")
	flag.BoolVar(&cfg.ignoreLoss, "sabotage-ignore-loss", false, "keep believing after Done closes (oracle B must catch it)")
	flag.Parse()
	cfg.workMin = min(cfg.workMin, cfg.work)
	os.Exit(run(cfg))
}

type proc struct {
	cfg    config
	out    *torture.Writer
	rng    *rand.Rand
	pool   *pgxpool.Pool
	client *lease.Client
	adv    *lease.Advisory // nil in table mode
	seq    int
	fence  string // the SQL function, for raw fences
	// avoid: keys this process leaves alone for a while after an acquire of
	// it failed, as an application that moves on to other work would. An
	// orphan row left by a failed acquire is then not replaced by the next
	// acquire of the same process: the client must clean it up.
	avoid map[string]time.Time
}

func run(cfg config) int {
	out := torture.NewWriter(os.Stdout)
	out.Emit(torture.Event{Ev: torture.EvHello, Proc: cfg.proc, PID: os.Getpid()})
	level := slog.LevelWarn
	if os.Getenv("PGLEASE_TORTURE_DEBUG") != "" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	// Stop when the suite closes our standard input.
	stop, cancelStop := context.WithCancel(context.Background())
	stdinDone := make(chan struct{})
	go func() {
		defer close(stdinDone)
		_, _ = io.Copy(io.Discard, bufio.NewReader(os.Stdin))
		cancelStop()
	}()

	pcfg, err := pgxpool.ParseConfig(cfg.url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "holder:", err)
		return 2
	}
	pcfg.MaxConns = 4
	pcfg.ConnConfig.ConnectTimeout = time.Second
	pcfg.ConnConfig.RuntimeParams["application_name"] = "torture-" + cfg.proc
	ctx, cancel := context.WithTimeout(stop, 30*time.Second)
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "holder:", err)
		return 2
	}
	client, err := lease.New(pool, &lease.Config{
		Schema:       cfg.schema,
		TTL:          cfg.ttl,
		SafetyMargin: cfg.ttl / 4,
		PollInterval: cfg.poll,
		// Releases and clean-ups that cannot reach the server give up
		// quickly (and are retried, or expire with the holder).
		ReleaseTimeout: cfg.ttl / 10,
		Owner:          lease.Owner{Application: "torture-" + cfg.proc},
		Advisory:       lease.AdvisoryConfig{CheckInterval: cfg.check},
		Logger:         log.With("proc", cfg.proc),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "holder:", err)
		return 2
	}
	p := &proc{
		cfg: cfg, out: out, pool: pool, client: client,
		rng:   rand.New(rand.NewPCG(cfg.seed, uint64(os.Getpid()))),
		fence: "SELECT " + pgx.Identifier{cfg.schema, "fence"}.Sanitize() + "($1, $2, $3)",
		avoid: map[string]time.Time{},
	}
	if cfg.mode != "table" {
		p.adv = client.Advisory()
	}
	for stop.Err() == nil {
		p.round(stop)
	}

	var leaks []string
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	if err := client.Close(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "holder: close:", err)
	}
	cancel()
	// A connection whose query was interrupted is closed asynchronously by
	// pgxpool and counts as acquired until then: give it a moment.
	for i := 0; pool.Stat().AcquiredConns() != 0; i++ {
		if i == 50 {
			leaks = append(leaks, fmt.Sprintf("%d pool connections still acquired 5s after Close", pool.Stat().AcquiredConns()))
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	pool.Close()
	<-stdinDone
	if err := goleak.Find(); err != nil {
		leaks = append(leaks, err.Error())
	}
	out.Emit(torture.Event{Ev: torture.EvBye, Proc: cfg.proc, Leak: strings.Join(leaks, "; ")})
	return 0
}

// round acquires one random key, runs one or more sections, and releases it.
func (p *proc) round(stop context.Context) {
	key := fmt.Sprintf("k%d", p.rng.IntN(p.cfg.keys))
	for i := 0; i < 10 && time.Now().Before(p.avoid[key]); i++ {
		key = fmt.Sprintf("k%d", p.rng.IntN(p.cfg.keys))
	}
	ctx, cancel := context.WithTimeout(stop, 10*p.cfg.ttl)
	adv := p.cfg.mode == "advisory" || (p.cfg.mode == "mixed" && p.rng.IntN(2) == 0)
	p.out.Emit(torture.Event{Ev: torture.EvAcquiring, Proc: p.cfg.proc, Key: key, T: torture.Now(), Adv: adv})
	var l *lease.Lock
	var err error
	if adv {
		l, err = p.adv.Acquire(ctx, lease.Key{Name: "torture", ID: key})
	} else {
		l, err = p.client.Acquire(ctx, lease.Key{Name: "torture", ID: key})
	}
	cancel()
	if err != nil {
		p.out.Emit(torture.Event{Ev: torture.EvAcquireError, Proc: p.cfg.proc, Key: key, T: torture.Now(), Err: err.Error()})
		p.avoid[key] = time.Now().Add(3 * p.cfg.ttl)
		if stop.Err() == nil {
			time.Sleep(time.Duration(5+p.rng.IntN(20)) * time.Millisecond)
		}
		return
	}
	start := torture.Now()
	ev := torture.Event{Ev: torture.EvAcquired, Proc: p.cfg.proc, Key: key, Token: l.Token(), T: start, Adv: adv}
	if !adv { // an advisory lock's AcquiredAt is the client's clock, not the database's
		ev.At = l.AcquiredAt().UnixMicro()
	}
	p.out.Emit(ev)

	// Watch for loss: the interval ends when this process sees Done close.
	var lostAt atomic.Int64
	releasing := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case <-l.Done():
		case <-releasing:
			return
		}
		if errors.Is(context.Cause(l.Context()), lease.ErrReleased) {
			return
		}
		t := torture.Now()
		lostAt.Store(t)
		p.out.Emit(torture.Event{Ev: torture.EvLost, Proc: p.cfg.proc, Key: key, Token: l.Token(), T: t,
			Err: context.Cause(l.Context()).Error(), Reason: lossReason(l)})
	}()

	n := 1 + p.rng.IntN(p.cfg.sections)
	for i := 0; i < n && (l.Err() == nil || p.cfg.ignoreLoss); i++ {
		p.section(l, key)
	}

	// The belief ends here, before Release: a process killed during Release
	// has already said so.
	end := torture.Now()
	if t := lostAt.Load(); t != 0 && t < end && !p.cfg.ignoreLoss {
		end = t
	}
	p.out.Emit(torture.Event{Ev: torture.EvEnd, Proc: p.cfg.proc, Key: key, Token: l.Token(), T: end})
	close(releasing)
	rel := torture.Event{Ev: torture.EvReleased, Proc: p.cfg.proc, Key: key, Token: l.Token(), Release: torture.ReleaseOK}
	if err := l.Release(context.Background()); err != nil {
		rel.Release, rel.Err = torture.ReleaseError, err.Error()
		if errors.Is(err, lease.ErrLost) {
			rel.Release = torture.ReleaseLost
		}
	}
	<-watched
	p.out.Emit(rel)
}

// section reads the key's counter, waits, and writes counter+1 in a fenced
// transaction that also logs the write. It goes on after the lock was lost on
// purpose: the fence, not the client's knowledge, must stop a stale write.
func (p *proc) section(l *lease.Lock, key string) {
	p.seq++
	id := fmt.Sprintf("%s-%d", p.cfg.proc, p.seq)
	raw := p.rng.Float64() < p.cfg.rawFence
	ev := torture.Event{Ev: torture.EvSection, Proc: p.cfg.proc, Key: key, Token: l.Token(), Section: id, Raw: raw}
	ctx, cancel := context.WithTimeout(context.Background(), 4*p.cfg.ttl)
	defer cancel()

	var n int64
	if err := p.pool.QueryRow(ctx, `SELECT n FROM `+p.table("counter")+` WHERE key = $1`, key).Scan(&n); err != nil {
		ev.Outcome, ev.Err, ev.T = torture.OutcomeFailed, err.Error(), torture.Now()
		p.out.Emit(ev)
		return
	}
	p.out.Emit(torture.Event{Ev: torture.EvRead, Proc: p.cfg.proc, Key: key, Token: l.Token(), Section: id, N: n,
		T: torture.Now()})
	time.Sleep(p.cfg.workMin + time.Duration(p.rng.Int64N(int64(p.cfg.work-p.cfg.workMin)+1)))

	ev.Outcome, ev.Err = p.write(ctx, l, key, id, n, raw)
	ev.T = torture.Now()
	p.out.Emit(ev)
}

func (p *proc) write(ctx context.Context, l *lease.Lock, key, id string, n int64, raw bool) (string, string) {
	if l.Advisory() {
		// Fenced by construction: on the lock's own pinned connection. Any
		// error may have come after COMMIT was sent; the log table tells.
		err := l.BeginTxFunc(ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
			_, err := p.update(ctx, tx, l, key, id, n)
			return err
		})
		if err != nil {
			return torture.OutcomeUnknown, err.Error()
		}
		return torture.OutcomeOK, ""
	}
	tx, err := p.pool.Begin(ctx)
	if err != nil {
		return torture.OutcomeFailed, err.Error()
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	switch {
	case p.cfg.unfenced:
	case raw:
		_, err = tx.Exec(ctx, p.fence, "torture", key, l.Token())
	default:
		err = l.Fence(ctx, tx)
	}
	if err != nil {
		var pgErr *pgconn.PgError
		switch {
		case errors.As(err, &pgErr) && pgErr.Code == lease.SQLStateNotHeld:
			return torture.OutcomeFenced, err.Error()
		case errors.Is(err, lease.ErrLost):
			return torture.OutcomeLost, err.Error()
		}
		return torture.OutcomeFailed, err.Error()
	}
	if out, err := p.update(ctx, tx, l, key, id, n); err != nil {
		return out, err.Error()
	}
	if err := tx.Commit(ctx); err != nil {
		return torture.OutcomeUnknown, err.Error()
	}
	return torture.OutcomeOK, ""
}

// update writes counter n+1 for key and logs the write, in tx.
func (p *proc) update(ctx context.Context, tx pgx.Tx, l *lease.Lock, key, id string, n int64) (string, error) {
	var prev int64
	if err := tx.QueryRow(ctx, `SELECT last_token FROM `+p.table("counter")+` WHERE key = $1`, key).Scan(&prev); err != nil {
		return torture.OutcomeFailed, err
	}
	if _, err := tx.Exec(ctx, `UPDATE `+p.table("counter")+` SET n = $2, last_token = $3 WHERE key = $1`,
		key, n+1, l.Token()); err != nil {
		return torture.OutcomeFailed, err
	}
	if _, err := tx.Exec(ctx, `INSERT INTO `+p.table("log")+` (section, key, token, n, prev_token, proc)
		VALUES ($1, $2, $3, $4, $5, $6)`, id, key, l.Token(), n+1, prev, p.cfg.proc); err != nil {
		return torture.OutcomeFailed, err
	}
	return "", nil
}

func (p *proc) table(name string) string {
	return pgx.Identifier{p.cfg.schema, "torture_" + name}.Sanitize()
}

// lossReason is why the client says l was lost: its *LostError's reason, or
// the cause itself when the lock ended otherwise (its client closed).
func lossReason(l *lease.Lock) string {
	cause := context.Cause(l.Context())
	if le, ok := errors.AsType[*lease.LostError](cause); ok {
		return le.Reason.String()
	}
	return cause.Error()
}
