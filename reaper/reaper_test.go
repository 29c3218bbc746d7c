package reaper_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/ident"
	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/reaper"
)

// 100,000 lock rows across 1,000 holders, half of them dead, plus lock rows
// whose holder never existed: one pass deletes exactly the dead rows and
// leaves every live row as it was.
func TestPassDeletesExactlyTheDead(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, 3*time.Minute)

	var live, dead []int64
	for range 10 { // interleave ids: 100 live, 100 dead, ...
		live = append(live, f.addHolders(ctx, 50, true)...)
		dead = append(dead, f.addHolders(ctx, 50, false)...)
	}
	f.addLocks(ctx, live, 100)
	f.addLocks(ctx, dead, 100)
	orphans := []int64{-7, 1 << 40, 1<<40 + 1} // holder rows that never existed
	f.addLocks(ctx, orphans, 10)
	if _, err := f.Pool.Exec(ctx, "ANALYZE "+f.holders+", "+f.locks); err != nil {
		t.Fatal(err)
	}

	liveSum := `SELECT count(*) * 1000000007 + coalesce(sum(token), 0) FROM ` + f.locks + ` WHERE holder_id = ANY ($1)`
	before := f.count(ctx, liveSum, live)

	st, err := f.reaper(nil, reaper.Config{}).RunOnce(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Holders != 500 || st.Locks != 50_030 || st.Skipped != 0 {
		t.Fatalf("stats = %+v, want 500 holders, 50030 locks, 0 skipped", st)
	}
	if st.Batches < 52 {
		t.Fatalf("batches = %d: 50030 lock rows in batches of %d need at least 51, plus the holders' batch", st.Batches, reaper.BatchSizeDefault)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.holders); n != 500 {
		t.Fatalf("holders left = %d, want the 500 live ones", n)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.holders+` WHERE id = ANY ($1)`, live); n != 500 {
		t.Fatalf("live holders left = %d, want 500", n)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.locks); n != 50_000 {
		t.Fatalf("lock rows left = %d, want the 50000 live ones", n)
	}
	if after := f.count(ctx, liveSum, live); after != before {
		t.Fatalf("live lock rows changed: checksum %d before, %d after", before, after)
	}

	// A second pass finds nothing.
	st, err = f.reaper(nil, reaper.Config{}).RunOnce(ctx)
	if err != nil || st.Holders != 0 || st.Locks != 0 {
		t.Fatalf("second pass: %+v, %v; want nothing to do", st, err)
	}
}

// A dry run deletes nothing and counts what a real pass deletes.
func TestDryRunCountsAndDeletesNothing(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, time.Minute)
	live := f.addHolders(ctx, 7, true)
	dead := f.addHolders(ctx, 5, false)
	f.addLocks(ctx, live, 13)
	f.addLocks(ctx, dead, 11)
	f.addLocks(ctx, []int64{1 << 50}, 3)
	total := f.count(ctx, `SELECT count(*) FROM `+f.locks)

	dry := f.reaper(nil, reaper.Config{DryRun: true, BatchSize: 2}) // several pages of holder ids
	st, err := dry.RunOnce(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !st.DryRun || st.Holders != 5 || st.Locks != 5*11+3 || st.Batches != 0 {
		t.Fatalf("dry run stats = %+v, want 5 holders, 58 locks, 0 batches", st)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.locks); n != total {
		t.Fatalf("dry run deleted lock rows: %d left of %d", n, total)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.holders); n != 12 {
		t.Fatalf("dry run deleted holder rows: %d left of 12", n)
	}

	real, err := f.reaper(nil, reaper.Config{BatchSize: 2}).RunOnce(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if real.Holders != st.Holders || real.Locks != st.Locks {
		t.Fatalf("real pass %+v does not match the dry run %+v", real, st)
	}
}

// A holder renewing right at its expiry while reapers run in a loop: a
// renewal that returned a row keeps its holder row and every lock row, and a
// renewal is never refused before the holder's last expiry. The reapers are
// the reaper package's passes, or the schema's procedure reap called as a DBA
// or pg_cron calls it.
func TestRenewalAtExpiryNeverLosesALiveLease(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"reaper", "sql"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			renewalAtExpiry(t, how)
		})
	}
}

func renewalAtExpiry(t *testing.T, how string) {
	f := newFx(t)
	ctx := ctxFor(t, 2*time.Minute)
	const (
		workers  = 4
		perLease = 5
		ttl      = 40 * time.Millisecond
		minRun   = 3 * time.Second  // then on until enough races were seen,
		maxRun   = 20 * time.Second // but no longer than this
	)
	// The heartbeat is the schema's own renew(), as a lease.Client sends it.
	renew := `SELECT alive, locks FROM ` + f.fn("renew") + `($1)`
	expiry := `SELECT expires_at FROM ` + f.holders + ` WHERE id = $1`
	check := `SELECT clock_timestamp() < $2,
		(SELECT count(*) FROM ` + f.holders + ` WHERE id = $1),
		(SELECT count(*) FROM ` + f.locks + ` WHERE holder_id = $1)`
	// register makes a holder with a ttl lease and perLease locks, taken
	// with the schema's own acquire(). The holder row is made here, not by
	// a lease.Client, which would renew it by itself: this test aims every
	// renewal at the expiry. It does not expire while the locks are taken.
	register := func(ctx context.Context, pool *pgxpool.Pool, w int) (id int64, exp time.Time, err error) {
		err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if err := tx.QueryRow(ctx, `INSERT INTO `+f.holders+` (host, pid, application, ttl, expires_at)
				VALUES ('renewer', $1, 'reaper-test', $2::interval, 'infinity') RETURNING id`,
				w, ttl.String()).Scan(&id); err != nil {
				return err
			}
			var acquired int
			if err := tx.QueryRow(ctx, `SELECT count(*) FROM generate_series(1, $2) g,
				LATERAL `+f.fn("acquire")+`('renew', $1::bigint::text || ':' || g::text, $1::bigint) a WHERE a.acquired`,
				id, perLease).Scan(&acquired); err != nil {
				return err
			}
			if acquired != perLease {
				return fmt.Errorf("holder %d: acquired %d of %d fresh keys", id, acquired, perLease)
			}
			return tx.QueryRow(ctx, `UPDATE `+f.holders+` SET expires_at = clock_timestamp() + ttl
				WHERE id = $1 RETURNING expires_at`, id).Scan(&exp)
		})
		return id, exp, err
	}
	errRefused := errors.New("renewal refused")

	var stop, stopRenewing atomic.Bool
	var reaped, reaperPasses atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 2 {
		pass := f.pass(how, pgtest.NewPool(t, f.Cluster, fmt.Sprintf("reaper-%d", i)), 3)
		wg.Go(func() {
			for !stop.Load() {
				st, err := pass(ctx)
				if err != nil {
					errs <- err
					return
				}
				reaped.Add(st.Holders)
				reaperPasses.Add(1)
			}
		})
	}

	var ok, refused, violations atomic.Int64
	for w := range workers {
		pool := pgtest.NewPool(t, f.Cluster, fmt.Sprintf("renewer-%d", w))
		rng := rand.New(rand.NewPCG(uint64(w), 42))
		wg.Go(func() {
			// Renewals are aimed at expiry+offset, ±1.5ms. The offset adapts
			// so that about a third of them come too late, whatever the
			// machine's load does to sleeps and round trips: the renewals
			// stay right at the expiry boundary.
			offset := -3 * time.Millisecond
			for !stopRenewing.Load() {
				id, exp, err := register(ctx, pool, w)
				if err != nil {
					errs <- err
					return
				}
				last := time.Now()
				for !stopRenewing.Load() {
					jitter := time.Duration(rng.IntN(3000)-1500) * time.Microsecond
					time.Sleep(time.Until(last.Add(ttl + offset + jitter)))
					// The renewal commits up to 2ms after its expiry check,
					// as a slow WAL flush or network would make it: that gap
					// is where a reaper that trusted "expired" alone would
					// delete the locks of a holder that is about to be renewed.
					var next time.Time
					var returned time.Time
					pause := time.Duration(rng.IntN(2000)) * time.Microsecond
					err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
						var alive bool
						var locks int64
						if err := tx.QueryRow(ctx, renew, id).Scan(&alive, &locks); err != nil {
							return err
						}
						returned = time.Now()
						if !alive {
							return errRefused
						}
						if locks != perLease {
							violations.Add(1)
							t.Errorf("holder %d renewed, but renew() counts %d of its %d lock rows", id, locks, perLease)
						}
						if err := tx.QueryRow(ctx, expiry, id).Scan(&next); err != nil {
							return err
						}
						time.Sleep(pause)
						return nil
					})
					if errors.Is(err, errRefused) {
						// Refused: only allowed once the last expiry has passed.
						var early bool
						if err := pool.QueryRow(ctx, `SELECT clock_timestamp() < $1`, exp).Scan(&early); err != nil {
							errs <- err
							return
						}
						if early {
							violations.Add(1)
							t.Errorf("holder %d: renewal refused before its expiry %s", id, exp)
						}
						refused.Add(1)
						offset = max(offset-400*time.Microsecond, -ttl/2)
						break
					}
					if err != nil {
						errs <- err
						return
					}
					last, exp = returned, next
					ok.Add(1)
					offset = min(offset+200*time.Microsecond, 5*time.Millisecond)
					var alive bool
					var nh, nl int64
					if err := pool.QueryRow(ctx, check, id, exp).Scan(&alive, &nh, &nl); err != nil {
						errs <- err
						return
					}
					if alive && (nh != 1 || nl != perLease) {
						violations.Add(1)
						t.Errorf("holder %d renewed until %s and still alive, but has %d holder rows and %d of %d lock rows",
							id, exp, nh, nl, perLease)
					}
				}
			}
		})
	}
	// The renewers stop first, then the reapers.
	start := time.Now()
	for len(errs) == 0 && time.Since(start) < maxRun &&
		(time.Since(start) < minRun || ok.Load() < 100 || refused.Load() < 30 || reaperPasses.Load() < 30) {
		time.Sleep(50 * time.Millisecond) // waiting out the test's duration, not synchronising
	}
	stopRenewing.Store(true)
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("renewals: %d ok, %d refused; reaper passes: %d, holders reaped: %d; violations: %d",
		ok.Load(), refused.Load(), reaperPasses.Load(), reaped.Load(), violations.Load())
	if ok.Load() < 20 || refused.Load() < 5 || reaped.Load() < 5 {
		t.Fatalf("the race was not exercised: %d renewals, %d refused, %d holders reaped", ok.Load(), refused.Load(), reaped.Load())
	}
}

// A lock row locked by a fenced transaction is skipped at once, not waited
// on, and reaped by a pass after that transaction ends.
func TestFencedRowIsSkippedThenReaped(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"fence", "for share"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			f := newFx(t)
			ctx := ctxFor(t, time.Minute)
			h := f.addHolders(ctx, 1, true)[0]
			f.addLocks(ctx, []int64{h}, 3)
			tx, name, id := f.fenceFirst(ctx, how)
			f.expire(ctx, h)

			// A reaper that waited for the row would hit its lock_timeout
			// (2s) and fail; one that skips returns with the row counted.
			r := f.reaper(nil, reaper.Config{BatchTimeout: 2 * time.Second})
			st, err := r.RunOnce(ctx)
			if err != nil {
				t.Fatalf("pass with a fenced row: %v", err)
			}
			if st.Holders != 1 || st.Locks != 2 || st.Skipped != 1 {
				t.Fatalf("stats = %+v, want 1 holder, 2 locks, 1 skipped", st)
			}
			// The fencing transaction is still open and its row still there.
			var n int
			if err := tx.QueryRow(ctx, `SELECT count(*) FROM `+f.locks+` WHERE name = $1 AND entity_id = $2`, name, id).Scan(&n); err != nil || n != 1 {
				t.Fatalf("fenced row inside the open transaction: %d rows, %v", n, err)
			}
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}

			st, err = r.RunOnce(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.Locks != 1 || st.Skipped != 0 {
				t.Fatalf("pass after the fence ended: %+v, want 1 lock, 0 skipped", st)
			}
			if n := f.count(ctx, `SELECT count(*) FROM `+f.locks); n != 0 {
				t.Fatalf("%d lock rows left", n)
			}
		})
	}
}

// Four reapers on the same tables at once: no errors, no deadlocks, every
// dead row deleted by exactly one of them, every live row kept. Then the same
// with an acquirer taking dead keys over next to them.
func TestConcurrentReapers(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"reaper", "sql"} {
		for _, withAcquirer := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/acquirer=%v", how, withAcquirer), func(t *testing.T) {
				t.Parallel()
				concurrentReapers(t, how, withAcquirer)
			})
		}
	}
}

func concurrentReapers(t *testing.T, how string, withAcquirer bool) {
	f := newFx(t)
	ctx := ctxFor(t, 2*time.Minute)
	live := f.addHolders(ctx, 100, true)
	dead := f.addHolders(ctx, 100, false)
	f.addLocks(ctx, live, 50)
	f.addLocks(ctx, dead, 50)
	f.addLocks(ctx, []int64{1 << 45}, 17)
	const liveRows, deadRows = 100 * 50, 100*50 + 17

	start := make(chan struct{})
	var wg sync.WaitGroup
	stats := make([]reaper.Stats, 4)
	errs := make([]error, 4)
	for i := range 4 {
		pass := f.pass(how, pgtest.NewPool(t, f.Cluster, fmt.Sprintf("reaper-%d", i)), 37)
		wg.Go(func() {
			<-start
			stats[i], errs[i] = pass(ctx)
		})
	}
	// The acquirer, a live holder, acquires keys of dead holders meanwhile:
	// a takeover when the dead row is still there, a fresh lock otherwise.
	var acquired, busy int64
	var acqErr error
	if withAcquirer {
		acq := pgtest.NewPool(t, f.Cluster, "acquirer")
		wg.Go(func() {
			<-start
			for i := range 200 {
				h := dead[i%len(dead)]
				var ok, isBusy bool
				acqErr = acq.QueryRow(ctx, `SELECT acquired, busy FROM `+f.fn("acquire")+`('job', $1, $2)`,
					fmt.Sprintf("%d:%d", h, 1+i/len(dead)), live[0]).Scan(&ok, &isBusy)
				if acqErr != nil {
					return
				}
				if ok {
					acquired++
				} else if isBusy {
					busy++
				} else {
					acqErr = fmt.Errorf("acquire of a dead key neither acquired nor busy")
					return
				}
			}
		})
	}
	close(start)
	wg.Wait()
	if acqErr != nil {
		t.Fatalf("acquire next to the reapers: %v", acqErr)
	}
	var holders, locks int64
	for i := range 4 {
		if errs[i] != nil {
			t.Fatalf("reaper %d: %v", i, errs[i])
		}
		holders += stats[i].Holders
		locks += stats[i].Locks
		t.Logf("reaper %d: %+v", i, stats[i])
	}
	// Rows that one reaper skipped because another had them locked are
	// deleted by that other one; one more pass must find nothing left.
	last, err := f.reaper(nil, reaper.Config{}).RunOnce(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if last.Holders != 0 || last.Locks != 0 {
		t.Fatalf("a pass after the four found %+v left", last)
	}
	if holders != 100 {
		t.Fatalf("holders deleted = %d, want each of the 100 dead ones exactly once", holders)
	}
	if n := f.deadLocks(ctx); n != 0 {
		t.Fatalf("%d dead lock rows left", n)
	}
	if n := f.deadHolders(ctx); n != 0 {
		t.Fatalf("%d dead holders left", n)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.locks); n != liveRows+acquired {
		t.Fatalf("lock rows left = %d, want %d live + %d acquired", n, liveRows, acquired)
	}
	if !withAcquirer {
		if locks != deadRows {
			t.Fatalf("lock rows deleted = %d, want each of the %d dead ones exactly once", locks, deadRows)
		}
		return
	}
	// Each acquisition took over at most one dead row.
	t.Logf("acquirer: %d acquired, %d busy", acquired, busy)
	if locks > deadRows || locks+acquired < deadRows {
		t.Fatalf("lock rows deleted = %d with %d acquisitions, want between %d and %d", locks, acquired, deadRows-acquired, deadRows)
	}
}

// The reaper's deletes wake waiters: a LISTEN on the schema's channel (marked as a listener) gets
// the freed keys.
func TestDeletesNotifyWaiters(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, time.Minute)
	h := f.addHolders(ctx, 1, false)
	f.addLocks(ctx, h, 3)

	conn := f.listen(ctx)

	st, err := f.reaper(nil, reaper.Config{}).RunOnce(ctx)
	if err != nil || st.Locks != 3 {
		t.Fatalf("pass: %+v, %v; want 3 locks", st, err)
	}
	got := map[string]bool{}
	for len(got) < 3 {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		if err != nil {
			t.Fatalf("no notification after the reap (have %v): %v", got, err)
		}
		var triples [][]any
		if err := json.Unmarshal([]byte(n.Payload), &triples); err != nil {
			t.Fatalf("payload %q: %v", n.Payload, err)
		}
		for _, tr := range triples {
			got[fmt.Sprint(tr[0], "/", tr[1])] = true
		}
	}
	for i := 1; i <= 3; i++ {
		if k := fmt.Sprintf("job/%d:%d", h[0], i); !got[k] {
			t.Fatalf("no notification for %s; got %v", k, got)
		}
	}
}

// A cancelled pass finishes its batch, keeps the work done, and says it was
// interrupted.
func TestInterruptedPassKeepsItsWork(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, time.Minute)
	h := f.addHolders(ctx, 20, false)
	f.addLocks(ctx, h, 1000)

	// Cancelled before it starts: nothing done.
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	r := f.reaper(nil, reaper.Config{BatchSize: 10})
	st, err := r.RunOnce(cancelled)
	if !errors.Is(err, reaper.ErrInterrupted) || !errors.Is(err, context.Canceled) || errors.Is(err, reaper.ErrPass) {
		t.Fatalf("cancelled pass: %v; want ErrInterrupted wrapping context.Canceled", err)
	}
	if st.Holders != 0 || st.Locks != 0 {
		t.Fatalf("cancelled pass did work: %+v", st)
	}

	// Cancelled when the first batch of lock rows is announced.
	conn := f.listen(ctx)
	passCtx, cancelPass := context.WithCancel(ctx)
	defer cancelPass()
	heard := make(chan error, 1)
	go func() {
		_, err := conn.WaitForNotification(ctx)
		cancelPass()
		heard <- err
	}()
	st, err = r.RunOnce(passCtx)
	if werr := <-heard; werr != nil {
		t.Fatal(werr)
	}
	if !errors.Is(err, reaper.ErrInterrupted) {
		t.Fatalf("pass: %v; want ErrInterrupted", err)
	}
	if st.Locks == 0 || st.Locks >= 20_000 || st.Locks%10 != 0 {
		t.Fatalf("interrupted pass deleted %d lock rows: want whole batches of 10, some but not all", st.Locks)
	}
	if left := f.count(ctx, `SELECT count(*) FROM `+f.locks); left != 20_000-st.Locks {
		t.Fatalf("lock rows left = %d, but the pass reported %d of 20000 deleted", left, st.Locks)
	}
}

// A scheduled reaper runs passes, skips a run that comes due while the
// previous pass is still going, and Stop waits for the running pass.
func TestScheduleRunsSkipsAndStops(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, time.Minute)
	h := f.addHolders(ctx, 1, false)
	f.addLocks(ctx, h, 4)

	logs := &capture{skipped: make(chan struct{}, 1)}
	passes := make(chan reaper.Stats, 1)
	release := make(chan struct{})
	r := f.reaper(nil, reaper.Config{
		Logger: slog.New(logs),
		OnPass: func(st reaper.Stats, err error) {
			if err != nil {
				t.Errorf("scheduled pass: %v", err)
			}
			select {
			case passes <- st:
			default:
			}
			<-release // hold the pass open until the test lets it end
		},
	})
	if err := r.Start("@every 1s"); err != nil {
		t.Fatal(err)
	}
	if err := r.Start("@every 1s"); !errors.Is(err, reaper.ErrAlreadyStarted) {
		t.Fatalf("second Start: %v; want ErrAlreadyStarted", err)
	}
	if next := r.NextRun(); next.IsZero() || next.After(time.Now().Add(2*time.Second)) {
		t.Fatalf("NextRun = %v, want within a second", next)
	}
	st := <-passes
	if st.Holders != 1 || st.Locks != 4 {
		t.Fatalf("scheduled pass: %+v, want 1 holder and 4 locks", st)
	}
	select {
	case <-logs.skipped: // the next tick found the pass still running
	case <-ctx.Done():
		t.Fatal("no skipped run logged while a pass was running")
	}

	stopped := make(chan error, 1)
	go func() { stopped <- r.Stop(ctx) }()
	select {
	case err := <-stopped:
		t.Fatalf("Stop returned (%v) while a pass was still running", err)
	default:
	}
	close(release)
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	if err := r.Stop(ctx); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if !r.NextRun().IsZero() {
		t.Fatal("NextRun after Stop is not zero")
	}
	if !strings.Contains(logs.String(), `msg="reaper pass done"`) || !strings.Contains(logs.String(), "locks=4") {
		t.Fatalf("logs lack the pass: %s", logs.String())
	}
}

// Stop gives up when its context ends before the running pass does.
func TestStopTimesOut(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, time.Minute)
	entered := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	r := f.reaper(nil, reaper.Config{OnPass: func(reaper.Stats, error) {
		once.Do(func() { close(entered) })
		<-release
	}})
	if err := r.Start("* * * * * *"); err != nil { // every second
		t.Fatal(err)
	}
	<-entered
	short, cancel := context.WithCancel(ctx)
	cancel()
	if err := r.Stop(short); err == nil || !errors.Is(err, context.Canceled) {
		t.Fatalf("Stop with a done context while a pass runs: %v", err)
	}
	close(release)
}

func TestPassErrors(t *testing.T) {
	t.Parallel()
	// Each subtest takes its own context: parallel subtests wait for a free
	// slot after this function returns, and on a two-core machine that wait
	// can outlast a deadline started here.

	t.Run("not migrated", func(t *testing.T) {
		t.Parallel()
		ctx := ctxFor(t, time.Minute)
		pool := pgtest.NewPool(t, pgtest.Shared(t), "reaper-test")
		r, err := reaper.New(pool, &reaper.Config{Schema: pgtest.NewSchemaName()})
		if err != nil {
			t.Fatal(err)
		}
		_, err = r.RunOnce(ctx)
		var pe *reaper.PassError
		if !errors.Is(err, reaper.ErrNotMigrated) || !errors.Is(err, reaper.ErrPass) || !errors.As(err, &pe) {
			t.Fatalf("pass on a missing schema: %v; want ErrNotMigrated", err)
		}
		if !strings.Contains(err.Error(), "migrate up") {
			t.Fatalf("error does not say how to fix it: %v", err)
		}
	})

	t.Run("unreachable", func(t *testing.T) {
		t.Parallel()
		ctx := ctxFor(t, time.Minute)
		cfg, err := pgxpool.ParseConfig("postgres://nobody:secret@127.0.0.1:1/x?connect_timeout=5")
		if err != nil {
			t.Fatal(err)
		}
		pool, err := pgxpool.NewWithConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer pool.Close()
		r, err := reaper.New(pool, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, err = r.RunOnce(ctx)
		if !errors.Is(err, reaper.ErrUnreachable) {
			t.Fatalf("pass on a closed port: %v; want ErrUnreachable", err)
		}
		if strings.Contains(err.Error(), "secret") {
			t.Fatalf("error shows the password: %v", err)
		}
	})

	t.Run("lock timeout", func(t *testing.T) {
		t.Parallel()
		ctx := ctxFor(t, time.Minute)
		f := newFx(t)
		tx, err := f.Pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = tx.Rollback(context.Background()) }()
		if _, err := tx.Exec(ctx, "LOCK TABLE "+f.holders+" IN ACCESS EXCLUSIVE MODE"); err != nil {
			t.Fatal(err)
		}
		_, err = f.reaper(nil, reaper.Config{BatchTimeout: 200 * time.Millisecond}).RunOnce(ctx)
		if !errors.Is(err, reaper.ErrTimeout) || !strings.Contains(err.Error(), "DDL") {
			t.Fatalf("pass behind an exclusive table lock: %v; want ErrTimeout naming the cause", err)
		}
	})
}

func TestConfigValidation(t *testing.T) {
	t.Parallel()
	pool := pgtest.NewPool(t, pgtest.Shared(t), "reaper-test")
	if _, err := reaper.New(nil, nil); !errors.Is(err, reaper.ErrInvalidConfig) || reaper.ErrInvalidConfig.Error() != "reaper: invalid config" {
		t.Fatalf("nil pool: %v; want ErrInvalidConfig (reaper: invalid config)", err)
	}
	if reaper.SchemaDefault != ident.DefaultSchema {
		t.Fatalf("reaper.SchemaDefault = %q, but the library's default schema is %q", reaper.SchemaDefault, ident.DefaultSchema)
	}
	r, err := reaper.New(pool, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c := r.Config(); c.Schema != reaper.SchemaDefault || c.BatchSize != reaper.BatchSizeDefault || c.BatchTimeout != reaper.BatchTimeoutDefault {
		t.Fatalf("defaults: %+v", c)
	}
	for _, tc := range []struct {
		cfg  reaper.Config
		want string
	}{
		{reaper.Config{BatchSize: -1}, "leave it 0"},
		{reaper.Config{BatchSize: reaper.MaxBatchSize + 1}, "limit"},
		{reaper.Config{BatchTimeout: -time.Second}, "leave it 0"},
		{reaper.Config{BatchTimeout: time.Microsecond}, "milliseconds"},
		{reaper.Config{Schema: "pg_temp"}, "reserved"},
		{reaper.Config{Schema: strings.Repeat("s", 64)}, "at most 63"},
	} {
		_, err := reaper.New(pool, &tc.cfg)
		if !errors.Is(err, reaper.ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) ||
			!strings.HasPrefix(err.Error(), "reaper: ") || strings.Contains(err.Error(), "lease:") {
			t.Errorf("New(%+v) = %v; want ErrInvalidConfig mentioning %q", tc.cfg, err, tc.want)
		}
	}

	for _, good := range []string{"*/5 * * * *", "0 */5 * * * *", "@every 30s", "@every 1h30m", "@hourly", "CRON_TZ=UTC 0 3 * * *"} {
		if err := reaper.ValidateSchedule(good); err != nil {
			t.Errorf("ValidateSchedule(%q): %v", good, err)
		}
	}
	for _, bad := range []string{"", " ", "@every 10ms", "@every -5s", "@every 1.5s", "@every", "61 * * * *", "* * *",
		"CRON_TZ=UTC", "CRON_TZ=Nowhere/Land * * * * *", "0 0 30 2 *", "@sometimes"} {
		err := reaper.ValidateSchedule(bad)
		if !errors.Is(err, reaper.ErrInvalidSchedule) || !strings.Contains(err.Error(), "@every 30s") {
			t.Errorf("ValidateSchedule(%q) = %v; want ErrInvalidSchedule with an example", bad, err)
		}
		if err := r.Start(bad); !errors.Is(err, reaper.ErrInvalidSchedule) {
			t.Errorf("Start(%q) = %v", bad, err)
		}
	}
}

// The privileges in examples/reaper/grants.sql are enough for a pass, and a
// role without them gets ErrPermission.
func TestGrants(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, time.Minute)
	h := f.addHolders(ctx, 2, false)
	f.addLocks(ctx, h, 5)

	role := "reaper_" + strings.TrimPrefix(f.Schema, "t_")
	grants := readGrants(t, f.Schema, role)
	admin := f.Pool
	if _, err := admin.Exec(ctx, `CREATE ROLE `+pgx.Identifier{role}.Sanitize()+` LOGIN`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = admin.Exec(c, `DROP OWNED BY `+pgx.Identifier{role}.Sanitize())
		_, _ = admin.Exec(c, `DROP ROLE `+pgx.Identifier{role}.Sanitize())
	})
	pool := pgtest.NewPool(t, f.Cluster, "reaper-role", func(c *pgxpool.Config) { c.ConnConfig.User = role })

	_, err := f.reaper(pool, reaper.Config{}).RunOnce(ctx)
	if !errors.Is(err, reaper.ErrPermission) || !strings.Contains(err.Error(), "grants.sql") {
		t.Fatalf("pass without grants: %v; want ErrPermission", err)
	}
	if _, err := admin.Exec(ctx, grants); err != nil {
		t.Fatalf("grants.sql: %v", err)
	}
	st, err := f.reaper(pool, reaper.Config{}).RunOnce(ctx)
	if err != nil || st.Holders != 2 || st.Locks != 10 {
		t.Fatalf("pass with grants: %+v, %v; want 2 holders, 10 locks", st, err)
	}
	if _, err := f.reaper(pool, reaper.Config{DryRun: true}).RunOnce(ctx); err != nil {
		t.Fatalf("dry run with grants: %v", err)
	}
	// The procedure, as a DBA or pg_cron would CALL it with this role.
	f.addLocks(ctx, f.addHolders(ctx, 1, false), 3)
	live := f.addHolders(ctx, 1, true)
	f.addLocks(ctx, live, 2)
	var holders, locks, skipped int64
	if err := pool.QueryRow(ctx, "CALL "+f.Qualified("reap")+"()").Scan(&holders, &locks, &skipped); err != nil || holders != 1 || locks != 3 {
		t.Fatalf("CALL reap() as the reaper role = %d holders, %d locks, %v; want 1, 3", holders, locks, err)
	}
	// It reads the views, the wait queue's included.
	for _, view := range []string{"held", "holder_status", "waiting"} {
		var n int64
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM "+f.Qualified(view)).Scan(&n); err != nil {
			t.Errorf("%s as the reaper role: %v", view, err)
		}
	}
	// And that is all it may do: no table, no lock, no DBA tool.
	for _, sql := range []string{
		"SELECT count(*) FROM " + f.locks,
		"DELETE FROM " + f.locks,
		"UPDATE " + f.holders + " SET expires_at = clock_timestamp()",
		"SELECT " + f.Qualified("register") + "('h', 1, 'a', interval '1 minute', '\\x00112233445566778899aabbccddeeff'::bytea)",
		"SELECT * FROM " + f.Qualified("acquire") + "('k', '1', 1, '\\x00112233445566778899aabbccddeeff'::bytea)",
		"SELECT * FROM " + f.Qualified("acquire_keys") + "('{k}', '{1}', '{x}', 1, 1, '\\x00112233445566778899aabbccddeeff'::bytea, false, '{}')",
		"SELECT " + f.Qualified("leave") + "('k', '1', 1, '\\x00112233445566778899aabbccddeeff'::bytea, '{}')",
		"DELETE FROM " + f.Qualified("waiters"),
		"SELECT " + f.Qualified("force_release") + "('k', '1')",
		"SELECT " + f.Qualified("grant_reaper") + "('" + role + "')",
	} {
		_, err := pool.Exec(ctx, sql)
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
			t.Errorf("%s as the reaper role: %v; want permission denied (42501)", sql, err)
		}
	}
	if n := f.Count(ctx, t, "SELECT count(*) FROM "+f.locks+" WHERE holder_id = $1", live[0]); n != 2 {
		t.Errorf("the live holder has %d lock rows, want 2", n)
	}
}

// Schema names are quoted, never interpolated: quotes, spaces, capitals and
// format verbs in the name change nothing.
func TestOddSchemaName(t *testing.T) {
	t.Parallel()
	c := pgtest.Shared(t)
	schema := `Odd "%s" ` + pgtest.NewSchemaName()
	pgtest.Migrate(t, c, schema)
	db := &pgtest.DB{Cluster: c, Schema: schema, Pool: pgtest.NewPool(t, c, "reaper-test")}
	f := &fx{DB: db, holders: db.Qualified("holders"), locks: db.Qualified("locks"), t: t}
	ctx := ctxFor(t, time.Minute)
	f.addLocks(ctx, f.addHolders(ctx, 3, false), 4)
	f.addLocks(ctx, f.addHolders(ctx, 1, true), 2)

	dry, err := f.reaper(nil, reaper.Config{DryRun: true}).RunOnce(ctx)
	if err != nil || dry.Holders != 3 || dry.Locks != 12 {
		t.Fatalf("dry run: %+v, %v", dry, err)
	}
	st, err := f.reaper(nil, reaper.Config{}).RunOnce(ctx)
	if err != nil || st.Holders != 3 || st.Locks != 12 {
		t.Fatalf("pass: %+v, %v", st, err)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.locks); n != 2 {
		t.Fatalf("%d lock rows left, want 2", n)
	}
}
