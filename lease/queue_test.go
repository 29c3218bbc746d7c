package lease_test

// Tests of the wait queue in the database (the waiters table, the waiting
// view): arrival order across clients, waiters that give up (also right as
// the key is handed over), and waiters whose holder died. Clients poll once
// an hour and live for an hour unless a test says otherwise (see
// slowTimers): a waiter served within a test's bound was served by the
// queue, not by a timer.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/lease"
)

// fastHeartbeat is slowTimers with a heartbeat five times a second.
var fastHeartbeat = lease.Config{TTL: time.Hour, HeartbeatInterval: 200 * time.Millisecond, PollInterval: time.Hour}

// queueOf returns the holders waiting for k in queue order, as the waiting
// view shows them, and fails the test unless the view numbers them 1, 2, ...
// in that order.
func (e *env) queueOf(k lease.Key) []int64 {
	e.t.Helper()
	rows, err := e.db.Pool.Query(e.ctx, "SELECT holder_id, position FROM "+e.table("waiting")+
		" WHERE name = $1 AND entity_id = $2 ORDER BY waiter_id", k.Name, k.ID)
	if err != nil {
		e.t.Fatal(err)
	}
	defer rows.Close()
	var holders []int64
	for rows.Next() {
		var holder, position int64
		if err := rows.Scan(&holder, &position); err != nil {
			e.t.Fatal(err)
		}
		holders = append(holders, holder)
		if position != int64(len(holders)) {
			e.t.Fatalf("waiting view: holder %d at position %d, arrived as number %d", holder, position, len(holders))
		}
	}
	if err := rows.Err(); err != nil {
		e.t.Fatal(err)
	}
	return holders
}

// awaitQueue waits until the queue of k is exactly the holders want, in order.
func (e *env) awaitQueue(k lease.Key, want []int64, what string) {
	e.t.Helper()
	eventually(e.t, waitLimit, what, func() bool { return slices.Equal(e.queueOf(k), want) })
}

// logQueuesOnFailure logs every waiter row when the test has failed, to say
// who was left in which queue.
func (e *env) logQueuesOnFailure() {
	e.t.Cleanup(func() {
		if !e.t.Failed() {
			return
		}
		rows, err := e.db.Pool.Query(context.Background(), "SELECT name, entity_id, position, holder_id, kind, alive, since::text FROM "+e.table("waiting")+" ORDER BY waiter_id")
		if err != nil {
			e.t.Logf("waiting view: %v", err)
			return
		}
		defer rows.Close()
		for rows.Next() {
			var name, id, kind, since string
			var position, holder int64
			var alive bool
			if err := rows.Scan(&name, &id, &position, &holder, &kind, &alive, &since); err != nil {
				e.t.Logf("waiting view: %v", err)
				return
			}
			e.t.Logf("waiting: %s/%s #%d holder %d %s alive=%v since %s", name, id, position, holder, kind, alive, since)
		}
	})
}

// holderOf returns c's holder id (c must have one: warm it up first).
func holderOf(t *testing.T, c *lease.Client) int64 {
	t.Helper()
	id, ok := c.HolderID()
	if !ok {
		t.Fatal("the client has no holder")
	}
	return id
}

// trio is a key's holder h and two waiters' clients, b and c, b and c
// warmed up (registered and listening), with their holder ids.
type trio struct {
	h, b, c *lease.Client
	hb, hc  int64
}

func newTrio(t *testing.T, e *env, bCfg lease.Config) trio {
	t.Helper()
	var q trio
	q.h, _, _ = e.client(slowTimers)
	q.b, _, _ = e.client(bCfg)
	q.c, _, _ = e.client(slowTimers)
	warmUp(t, e, q.b)
	warmUp(t, e, q.c)
	q.hb, q.hc = holderOf(t, q.b), holderOf(t, q.c)
	return q
}

// queue has h take k, then b (with bctx) and c wait for it, b first: each
// asks once the one before it shows in the waiting view.
func (q trio) queue(t *testing.T, e *env, k lease.Key, bctx context.Context, what string) (lh *lease.Lock, gotB, gotC <-chan acquired) {
	t.Helper()
	lh = mustAcquire(t, e.ctx, q.h, k)
	gotB = goAcquire(bctx, q.b, k)
	e.awaitQueue(k, []int64{q.hb}, what+": b queued")
	gotC = goAcquire(e.ctx, q.c, k)
	e.awaitQueue(k, []int64{q.hb, q.hc}, what+": c queued behind b")
	return lh, gotB, gotC
}

// insertGate holds up inserts into a table in a trigger until it opens, as
// TestCancelledAcquireThatCommitsLateIsDeleted does with lock rows: a held
// insert waits for the advisory lock (7, 7) that the gate's transaction
// holds, and keeps waiting through the cancel requests pgx may send when it
// gives up on the connection (the handler takes (7, 8) to say one came).
// (TestCancelledAcquireThatCommitsLateIsDeleted, which may run beside it in
// the same database, uses (7, 17) and (7, 18): a wait of its own on the
// gate's key would count as one of these.)
// Each insert that went through is logged in a table of its own, which
// nobody else deletes from.
type insertGate struct {
	e   *env
	tx  pgx.Tx
	log string
}

// gateInserts holds up the inserts into table whose new row makes cond (an
// SQL expression on NEW) true.
func (e *env) gateInserts(table, cond string) *insertGate {
	e.t.Helper()
	g := &insertGate{e: e, log: e.table(table + "_gated")}
	fn := e.table(table + "_gate")
	e.exec(`CREATE TABLE ` + g.log + ` (at timestamptz NOT NULL DEFAULT clock_timestamp())`)
	e.exec(`CREATE FUNCTION ` + fn + `() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF ` + cond + ` THEN
				LOOP
					BEGIN
						PERFORM pg_advisory_xact_lock(7, 7);
						EXIT;
					EXCEPTION WHEN query_canceled THEN
						PERFORM pg_advisory_lock(7, 8);
					END;
				END LOOP;
				INSERT INTO ` + g.log + ` DEFAULT VALUES;
			END IF;
			RETURN NEW;
		END $$`)
	e.exec(`CREATE TRIGGER gate BEFORE INSERT ON ` + e.table(table) + ` FOR EACH ROW EXECUTE FUNCTION ` + fn + `()`)
	tx, err := e.db.Pool.Begin(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = tx.Rollback(context.Background()) })
	if _, err := tx.Exec(e.ctx, "SELECT pg_advisory_xact_lock(7, 7)"); err != nil {
		e.t.Fatal(err)
	}
	g.tx = tx
	return g
}

// held counts the inserts waiting at the gate.
func (g *insertGate) held() int {
	return g.e.count("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 7 AND objid = 7 AND NOT granted")
}

// cancelAbsorbed reports whether a held insert absorbed a cancel request.
func (g *insertGate) cancelAbsorbed() bool {
	return g.e.count("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 7 AND objid = 8 AND granted") > 0
}

// open lets the held inserts go on.
func (g *insertGate) open() {
	g.e.t.Helper()
	if err := g.tx.Commit(g.e.ctx); err != nil {
		g.e.t.Fatal(err)
	}
}

// passed counts the gated inserts that went through.
func (g *insertGate) passed() int { return g.e.count("SELECT count(*) FROM " + g.log) }

// Eight clients queue for a held key one after the other (each asks only
// once the one before it shows in the waiting view, at the next position).
// When the holder releases, they are served in exactly that order, each
// releasing at once, and nothing is left behind.
func TestQueueFIFOAcrossClients(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	h, _, _ := e.client(slowTimers)
	e.logQueuesOnFailure()
	k := lease.Key{Name: "fifo-clients", ID: "1"}
	lh := mustAcquire(t, e.ctx, h, k)

	const n = 8
	var (
		mu    sync.Mutex
		order []int
	)
	ids := make([]int64, 0, n)
	results := make([]chan error, n)
	for i := range n {
		c, _, _ := e.client(slowTimers)
		warmUp(t, e, c)
		ids = append(ids, holderOf(t, c))
		results[i] = make(chan error, 1)
		go func() {
			l, err := c.Acquire(e.ctx, k)
			if err != nil {
				results[i] <- err
				return
			}
			mu.Lock()
			order = append(order, i)
			mu.Unlock()
			results[i] <- l.Release(e.ctx)
		}()
		e.awaitQueue(k, ids, fmt.Sprintf("client %d at position %d", i, i+1))
	}
	mustRelease(t, e.ctx, lh)
	for i, ch := range results {
		select {
		case err := <-ch:
			if err != nil {
				t.Fatalf("client %d: %v", i, err)
			}
		case <-time.After(waitLimit):
			mu.Lock()
			defer mu.Unlock()
			t.Fatalf("client %d not served within %s; served so far: %v", i, waitLimit, order)
		}
	}
	for i, got := range order {
		if got != i {
			t.Fatalf("served in the order %v, want 0..%d (the order they queued in)", order, n-1)
		}
	}
	if n := e.waiterRows(); n != 0 {
		t.Fatalf("%d waiter rows after every waiter was served", n)
	}
	if got := e.lockTokens(k); len(got) != 0 {
		t.Fatalf("lock rows %v after every release", got)
	}
}

// Fifty rounds of: b waits first and c second for a key that h holds; then
// b's ctx is cancelled and h releases at the same moment, one of the two up
// to 9 ms after the other (which one and by how much changes every round,
// to land the cancel before, during and after the handover; the pause only
// spreads the timings, nothing waits on it). Either b got the key before its
// cancel took effect, or it gave up; either way c is served next, within
// the bound, while no lock row but c's exists; after c's release no lock
// row is left, and b's waiter row goes too.
func TestQueueCancelRacingRelease(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.logQueuesOnFailure()
	// b's heartbeat finds a grant of a cancelled acquire that committed after
	// the clean-up (as designed); once an hour would be past the bound.
	q := newTrio(t, e, fastHeartbeat)
	k := lease.Key{Name: "cancel-race", ID: "1"}

	const rounds = 50
	bWon, bInStatement := 0, 0
	for round := range rounds {
		bctx, bcancel := context.WithCancel(e.ctx)
		lh, gotB, gotC := q.queue(t, e, k, bctx, fmt.Sprintf("round %d", round))

		delay := time.Duration(round/2%10) * time.Millisecond
		start := make(chan struct{})
		var wg sync.WaitGroup
		var relErr error
		wg.Add(2)
		go func() {
			defer wg.Done()
			<-start
			if round%2 == 0 {
				time.Sleep(delay)
			}
			bcancel()
		}()
		go func() {
			defer wg.Done()
			<-start
			if round%2 == 1 {
				time.Sleep(delay)
			}
			relErr = lh.Release(e.ctx)
		}()
		close(start)
		wg.Wait()
		if relErr != nil {
			t.Fatalf("round %d: h's release: %v", round, relErr)
		}

		rb := await(t, gotB, fmt.Sprintf("round %d: b after its cancel", round))
		switch {
		case rb.err == nil:
			bWon++
			if got := e.lockTokens(k); !slices.Equal(got, []int64{rb.l.Token()}) {
				t.Fatalf("round %d: lock rows %v while b holds the key with token %d", round, got, rb.l.Token())
			}
			mustRelease(t, e.ctx, rb.l)
		case !errors.Is(rb.err, context.Canceled):
			t.Fatalf("round %d: b's Acquire = %v, want the lock or context.Canceled", round, rb.err)
		case rb.err != context.Canceled: // wrapped: the cancel came in an attempt
			bInStatement++
		}
		rc := await(t, gotC, fmt.Sprintf("round %d: c, second in the queue", round))
		if rc.err != nil {
			t.Fatalf("round %d: c's Acquire: %v", round, rc.err)
		}
		if got := e.lockTokens(k); !slices.Equal(got, []int64{rc.l.Token()}) {
			t.Fatalf("round %d: lock rows %v while c holds the key with token %d", round, got, rc.l.Token())
		}
		mustRelease(t, e.ctx, rc.l)
		if got := e.lockTokens(k); len(got) != 0 {
			t.Fatalf("round %d: lock rows %v that no Lock holds", round, got)
		}
		eventually(t, waitLimit, fmt.Sprintf("round %d: no waiter row left", round), func() bool { return e.waiterRows() == 0 })
		eventually(t, waitLimit, fmt.Sprintf("round %d: no key state of b or c", round), func() bool {
			return lease.KeyStates(q.b) == 0 && lease.KeyStates(q.c) == 0
		})
		bcancel()
	}
	t.Logf("of %d rounds, b got the key in %d, gave up in the middle of an attempt in %d, and while it waited in the others", rounds, bWon, bInStatement)
}

// A waiter cancelled while it waits (first in the queue) leaves: its row
// goes, the waiter behind it moves up to position 1, and is served at the
// holder's release.
func TestQueueCancelledWaiterLetsNextIn(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.logQueuesOnFailure()
	q := newTrio(t, e, slowTimers)
	k := lease.Key{Name: "cancel-queued", ID: "1"}
	bctx, bcancel := context.WithCancel(e.ctx)
	defer bcancel()
	lh, gotB, gotC := q.queue(t, e, k, bctx, "cancelled while queued")
	bcancel()
	if r := await(t, gotB, "b after its cancel"); !errors.Is(r.err, context.Canceled) {
		t.Fatalf("b's Acquire = %v, %v; want context.Canceled", r.l, r.err)
	}
	e.awaitQueue(k, []int64{q.hc}, "b's waiter row gone, c first")
	mustRelease(t, e.ctx, lh)
	rc := await(t, gotC, "c after h's release")
	if rc.err != nil {
		t.Fatal(rc.err)
	}
	mustRelease(t, e.ctx, rc.l)
	if n := e.waiterRows(); n != 0 {
		t.Fatalf("%d waiter rows at the end", n)
	}
}

// A waiter whose holder died (its process gone: its pool closed, so no
// heartbeat and no clean-up reaches the database; and its lease run out) is
// skipped: the key goes to the live waiter behind it. Its row is deleted by
// the acquirer that met it, or by the reaper.
func TestQueueSkipsDeadWaiter(t *testing.T) {
	t.Parallel()
	for _, by := range []string{"acquirer", "reaper"} {
		t.Run(by, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			h, _, _ := e.client(slowTimers)
			d, poolD, _ := e.client(slowTimers)
			l, _, _ := e.client(slowTimers)
			warmUp(t, e, d)
			warmUp(t, e, l)
			hd, hl := holderOf(t, d), holderOf(t, l)
			e.logQueuesOnFailure()
			k := lease.Key{Name: "dead-waiter", ID: by}
			lh := mustAcquire(t, e.ctx, h, k)

			dctx, dcancel := context.WithCancel(e.ctx)
			gotD := goAcquire(dctx, d, k)
			e.awaitQueue(k, []int64{hd}, "d queued")
			gotL := goAcquire(e.ctx, l, k)
			e.awaitQueue(k, []int64{hd, hl}, "l queued behind d")

			poolD.Close()
			e.expireHolder(hd)
			if n := e.count("SELECT count(*) FROM "+e.table("waiting")+" WHERE holder_id = $1 AND NOT alive", hd); n != 1 {
				t.Fatalf("the waiting view shows %d rows of dead d as not alive, want 1", n)
			}
			if by == "reaper" {
				e.exec("SELECT " + e.table("reap_holders") + "(1000)")
				if q := e.queueOf(k); !slices.Equal(q, []int64{hl}) {
					t.Fatalf("queue after the reaper: %v, want l alone (%d)", q, hl)
				}
				if n := e.count("SELECT count(*) FROM "+e.table("holders")+" WHERE id = $1", hd); n != 0 {
					t.Fatal("the reaper left d's holder row")
				}
			}
			mustRelease(t, e.ctx, lh)
			rl := await(t, gotL, "l, behind the dead waiter")
			if rl.err != nil {
				t.Fatal(rl.err)
			}
			if n := e.count("SELECT count(*) FROM "+e.table("waiters")+" WHERE holder_id = $1", hd); n != 0 {
				t.Fatalf("%d waiter rows of dead d after l was served", n)
			}
			mustRelease(t, e.ctx, rl.l)
			dcancel()
			if r := await(t, gotD, "d after its cancel"); r.err == nil {
				t.Fatal("d, whose pool is closed, got the lock")
			}
			if n := e.waiterRows(); n != 0 {
				t.Fatalf("%d waiter rows at the end", n)
			}
		})
	}
}

// An Acquire whose ctx ends while its statement is still running, held up
// in a trigger on the waiters table after it decided to queue (the cancel
// absorbed, as when pgx gives up on a connection and the server goes on),
// returns at once. Its clean-up waits behind that statement, which holds the
// key's queue lock, and fails after ReleaseTimeout; it is tried again one at
// a time, not once more at every renewal. When the statement commits its
// waiter row, the next try deletes it: a row of a live holder that no longer
// wants the key must not keep everyone behind it waiting for as long as that
// client lives.
func TestQueueLateWaiterRowOfCancelledAcquire(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.logQueuesOnFailure()
	// b's heartbeat runs often, and its clean-ups give up soon: several
	// renewals come while each clean-up waits.
	bCfg := fastHeartbeat
	bCfg.ReleaseTimeout = 300 * time.Millisecond
	q := newTrio(t, e, bCfg)
	k := lease.Key{Name: "late-waiter", ID: "1"}
	gate := e.gateInserts("waiters", "NEW.holder_id = "+strconv.FormatInt(q.hb, 10))

	lh := mustAcquire(t, e.ctx, q.h, k)
	bctx, bcancel := context.WithCancel(e.ctx)
	defer bcancel()
	gotB := goAcquire(bctx, q.b, k)
	eventually(t, waitLimit, "b's waiter insert to wait at the gate", func() bool { return gate.held() == 1 })
	bcancel()
	if r := await(t, gotB, "b after its cancel"); !errors.Is(r.err, context.Canceled) {
		t.Fatalf("b's Acquire = %v, %v; want context.Canceled", r.l, r.err)
	}
	eventually(t, waitLimit, "the cancel request to reach the insert", gate.cancelAbsorbed)
	const tries = 4
	eventually(t, waitLimit, "b's clean-up to fail 4 times behind the insert", func() bool { return lease.Cleanups(q.b) >= tries })
	if n := lease.QueueLen(q.b, k); n > 1 {
		t.Fatalf("after %d failed clean-ups, b has %d of them queued on the key; want at most the one running", tries, n)
	}
	gate.open() // the insert goes on and commits
	eventually(t, waitLimit, "the late waiter insert to commit", func() bool { return gate.passed() > 0 })

	gotC := goAcquire(e.ctx, q.c, k)
	eventually(t, waitLimit, "c queued", func() bool { return slices.Contains(e.queueOf(k), q.hc) })
	mustRelease(t, e.ctx, lh)
	select {
	case r := <-gotC:
		if r.err != nil {
			t.Fatal(r.err)
		}
		mustRelease(t, e.ctx, r.l)
	case <-time.After(10 * time.Second):
		t.Fatalf("c not served 10 s after the release: the queue is %v (b is %d, c %d)", e.queueOf(k), q.hb, q.hc)
	}
	eventually(t, waitLimit, "no waiter row left", func() bool { return e.waiterRows() == 0 })
	eventually(t, waitLimit, "b's clean-ups to end", func() bool { return lease.QueueLen(q.b, k) == 0 })
}
