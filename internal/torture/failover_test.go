package torture

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"testing"

	"github.com/pglease/pglease/internal/pgtest"
)

// The failover scenario: holders contend for table and advisory locks
// through a multi-host connection string while the primary is killed
// (SIGKILL of every process of it) and a synchronous standby takes over,
// again and again: by the harness directly (pg_promote, the old primary
// rewound and rejoined) and by Patroni (its leader's Patroni and PostgreSQL
// killed together, Patroni promoting its synchronous standby, the old node
// restarted and rejoining; and switchovers through its REST API). The
// harness's failovers also run under each lock kind: shared locks (table and
// advisory), semaphore permits and key sets, their waiters queued across the
// failover. Both oracles must hold, and a table lock must never lose its row to a
// failover: with a synchronous standby every grant the holder was told of is
// on the new primary.

// failoverRec is one failover as the suite saw it.
type failoverRec struct {
	killT, killedT int64 // just before the kill; once every process of the old primary is gone
	writableT      int64 // the new primary accepting writes
	rejoinedT      int64 // the old primary streaming from the new one
	switchover     bool  // a graceful switchover through Patroni, not a kill
	heldTable      []*interval
	heldAdv        []*interval
}

// failover kills the primary and waits for a writable new one; it returns
// once the cluster is back to full strength (the old primary rejoined).
type failoverFunc func(ctx context.Context, r *run, rec *failoverRec) error

func TestTortureFailover(t *testing.T) {
	bin := buildHolder(t)
	base := params{
		procs: 4, keys: 2, dur: 6 * time.Second,
		ttl: 3 * time.Second, poll: 300 * time.Millisecond,
		work: 60 * time.Millisecond, rawFence: 0.5, check: 300 * time.Millisecond,
		mode: "mixed",
	}
	if long() {
		base.procs, base.keys, base.dur = 8, 4, 85*time.Second
	}
	// One replicated cluster for the harness's runs, each in a schema of
	// its own: exclusive locks on both paths, then the lock kinds (shared
	// locks on both paths, semaphore permits, key sets through one
	// acquire_keys), each with its queue of waiters across the failovers.
	// The short mode, kept well under two minutes, leaves the semaphore out
	// (its permits are table locks like the sets' members).
	rs := pgtest.Replicated(t, pgtest.ReplicaOptions{Standbys: 2, Sync: true, NoFsync: true})
	for _, sc := range []struct {
		name     string
		adjust   func(p *params)
		longOnly bool
	}{
		{"harness", nil, false},
		{"harness-shared", kinds("shared", mixed), false},
		{"harness-semaphore", kinds("semaphore", tableOnly), true},
		{"harness-sets", kinds("set", tableOnly), false},
	} {
		if sc.longOnly && !long() {
			continue
		}
		t.Run(sc.name, func(t *testing.T) {
			p := base
			if sc.adjust != nil {
				sc.adjust(&p)
			}
			name := strings.Replace(strings.Replace(sc.name, "harness", "failover", 1), "-", "_", 1)
			r := newRun(t, rs.Cluster(), bin, name, p)
			r.fail(r.exec(func(ctx context.Context, r *run) { faultFailover(ctx, r, harnessFailover(rs), 1) }))
		})
	}
	t.Run("patroni", func(t *testing.T) {
		pt := pgtest.StartPatroni(t, pgtest.PatroniOptions{TTL: 5 * time.Second})
		p := base
		// Patroni takes about its TTL to give up a dead leader: a lease
		// that outlives that keeps its table locks.
		p.ttl = 10 * time.Second
		if !long() {
			p.dur = 2 * time.Second // a failover and a switchover, at least, whatever the duration
		}
		r := newRun(t, pt.Cluster(), bin, "failover_patroni", p)
		r.fail(r.exec(func(ctx context.Context, r *run) { faultFailover(ctx, r, patroniFailover(pt), 2) }))
	})
}

// tableOnly: semaphores and key sets exist on the table path alone.
func tableOnly(p *params) { p.mode = "table" }

func harnessFailover(rs *pgtest.ReplicaSet) failoverFunc {
	return func(ctx context.Context, r *run, rec *failoverRec) error {
		old := rs.Primary()
		rec.killT = Now()
		if err := rs.KillPrimary(); err != nil {
			return err
		}
		rec.killedT = Now()
		if _, err := rs.Failover(ctx); err != nil {
			return err
		}
		rec.writableT = Now()
		err := rs.Rejoin(ctx, old, pgtest.Rewind)
		rec.rejoinedT = Now()
		return err
	}
}

// patroniFailover alternates a failover (the leader's Patroni and
// PostgreSQL killed, Patroni promoting its synchronous standby, the old node
// restarted) and a switchover through Patroni's REST API (the leader shut
// down cleanly, its synchronous standby promoted, the old leader following).
func patroniFailover(pt *pgtest.Patroni) failoverFunc {
	round := 0
	return func(ctx context.Context, r *run, rec *failoverRec) error {
		round++
		old, err := pt.Leader(ctx)
		if err != nil {
			return err
		}
		if round%2 == 0 {
			var to string
			for _, n := range pt.Names() {
				if n != old {
					to = n
				}
			}
			rec.switchover = true
			rec.killT = Now()
			if err := pt.Switchover(ctx, to); err != nil {
				return err
			}
			rec.killedT = Now()
			rec.writableT = rec.killedT
			err := pt.WaitHealthy(ctx)
			rec.rejoinedT = Now()
			return err
		}
		rec.killT = Now()
		if err := pt.KillNode(old); err != nil {
			return err
		}
		rec.killedT = Now()
		if _, err := pt.WaitLeader(ctx, old); err != nil {
			return err
		}
		rec.writableT = Now()
		err = pt.Restart(ctx, old)
		rec.rejoinedT = Now()
		return err
	}
}

// faultFailover fails the primary over every TTL/4 to TTL/2 (after the last
// failover's rejoin) until ctx is done, at least minRounds times, and adds
// the scenario's figures to its line.
func faultFailover(ctx context.Context, r *run, fail failoverFunc, minRounds int) {
	var recs []*failoverRec
	for len(recs) < minRounds || sleep(ctx, between(r.p.ttl/4, r.p.ttl/2)) {
		r.waitHolding(false, r.p.ttl) // something held to carry across
		rec := &failoverRec{}
		var names []string
		r.mu.Lock()
		for _, hp := range r.procs {
			if !hp.killed && !hp.stopped {
				names = append(names, hp.name)
			}
		}
		for _, open := range r.open {
			for _, iv := range open {
				if iv.adv {
					rec.heldAdv = append(rec.heldAdv, iv)
				} else {
					rec.heldTable = append(rec.heldTable, iv)
				}
			}
		}
		r.mu.Unlock()
		// Every session to the old primary goes with it, somewhere between
		// the ask and the end of its last process.
		asked := Now()
		fctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		err := fail(fctx, r, rec)
		cancel()
		if err != nil {
			r.violate("failover: %v", err)
			return
		}
		r.dropped(asked, rec.killedT, names...)
		r.mu.Lock()
		r.faults++
		r.mu.Unlock()
		recs = append(recs, rec)
	}
	r.afterBg = append(r.afterBg, func() { r.extra = append(r.extra, r.failoverFigures(recs)) })
}

// failoverFigures checks what failovers did to the locks held at the kill
// and returns the figures for the scenario's line: failovers, their
// duration (kill to a writable new primary), table locks kept and lost,
// advisory locks lost (all of them, to be right), and handover: from the
// kill to the next grant of each key held at the kill.
func (r *run) failoverFigures(recs []*failoverRec) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var durs, switches, rejoins, handovers []time.Duration
	kept, tableLost, advLost, advKept := 0, 0, 0, 0
	// Held at the kill: not ended before it began (what was released
	// between the look at r.open and the kill was not). An advisory lock
	// released without an error while the kill went on (a Patroni kill or
	// switchover takes a while) may have been released just in time: it
	// does not count; one that ended later, or was lost, does.
	atKill := func(ivs []*interval, t int64) []*interval {
		var held []*interval
		for _, iv := range ivs {
			if iv.end == 0 || iv.end > t {
				held = append(held, iv)
			}
		}
		return held
	}
	for _, rec := range recs {
		rec.heldTable = atKill(rec.heldTable, rec.killT)
		adv := rec.heldAdv[:0]
		for _, iv := range atKill(rec.heldAdv, rec.killT) {
			if iv.release != ReleaseOK || iv.end == 0 || iv.end > rec.killedT {
				adv = append(adv, iv)
			}
		}
		rec.heldAdv = adv
		if rec.switchover {
			switches = append(switches, time.Duration(rec.writableT-rec.killT))
		} else {
			durs = append(durs, time.Duration(rec.writableT-rec.killT))
		}
		rejoins = append(rejoins, time.Duration(rec.rejoinedT-rec.writableT))
		for _, iv := range rec.heldTable {
			switch {
			case iv.lostT == 0 && iv.release != ReleaseLost:
				kept++
			case iv.lostWhy == "row deleted" || iv.release == ReleaseLost && iv.lostT == 0:
				r.violateLocked("failover: %s's table lock %s token %d lost its row across a failover to a synchronous standby",
					iv.proc, iv.key, iv.token)
				tableLost++
			default:
				tableLost++ // not renewed in time: counted, as slow renewals are elsewhere
			}
		}
		for _, iv := range rec.heldAdv {
			if iv.release == ReleaseOK {
				advKept++
			} else {
				advLost++
			}
		}
		for _, iv := range append(slices.Clone(rec.heldTable), rec.heldAdv...) {
			var next int64
			for _, x := range r.intervals {
				if x.key == iv.key && x.start > rec.killT && (next == 0 || x.start < next) {
					next = x.start
				}
			}
			if next != 0 {
				handovers = append(handovers, time.Duration(next-rec.killT))
			}
		}
	}
	if advKept > 0 {
		r.violateLocked("failover: %d advisory locks held at a kill were released without an error: their sessions died first", advKept)
	}
	return fmt.Sprintf(" failovers=%d failover_time=%s switchovers=%d switchover_time=%s rejoin_time=%s"+
		" table_held_at_kill=%d kept=%d table_lost=%d advisory_lost=%d/%d next_grant_after_kill=%s",
		len(durs), spread(durs), len(switches), spread(switches), spread(rejoins), kept+tableLost, kept,
		tableLost, advLost, advLost+advKept, spread(handovers))
}

// spread is min/median/max of ds (min/median/max), or "-".
func spread(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	slices.Sort(ds)
	r := func(d time.Duration) string { return d.Round(time.Millisecond).String() }
	return r(ds[0]) + "/" + r(ds[len(ds)/2]) + "/" + r(ds[len(ds)-1])
}
