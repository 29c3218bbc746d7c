package lease_test

// Tests of a grant of the caller's holder that the caller did not know of
// when its acquire found it (schema version 9): a handoff made while the
// acquire waited for the key's queue lock keeps its token; a token the
// client had before gets a new one.

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
	"github.com/pglease/pglease/migrations"
)

// queueLockSQL takes the queue lock of key ($1, $2) for the transaction, as
// grant_keys and serve take it.
func (e *env) queueLockSQL() string {
	return "SELECT pg_advisory_xact_lock(1885826161, hashint8(" + e.table("key_hash") + "($1, $2)))"
}

// awaitQueueLockWaiter waits until a backend of the pool named app waits
// for a queue lock (advisory lock class 1885826161).
func (e *env) awaitQueueLockWaiter(app, what string) {
	e.t.Helper()
	eventually(e.t, waitLimit, what, func() bool {
		return e.count(`SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
			WHERE l.locktype = 'advisory' AND NOT l.granted AND l.classid = 1885826161
			  AND l.objsubid = 2 AND a.application_name = $1`, app) > 0
	})
}

// deleteAndReadHandoff deletes the grants of k in tx, as a takeover or a
// DBA does, and returns the token and holder of the grant that the delete's
// trigger made for the head of the queue, read in the same transaction.
func (e *env) deleteAndReadHandoff(tx pgx.Tx, k lease.Key) (token, holder int64) {
	e.t.Helper()
	if _, err := tx.Exec(e.ctx, "DELETE FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2", k.Name, k.ID); err != nil {
		e.t.Fatal(err)
	}
	if err := tx.QueryRow(e.ctx, "SELECT token, holder_id FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2",
		k.Name, k.ID).Scan(&token, &holder); err != nil {
		e.t.Fatalf("the grant the delete made: %v", err)
	}
	return token, holder
}

// The race the scanner example met when its leader stopped: every waiter
// looks again when the holder's lease runs out, and the one that takes the
// dead grant over hands the key to the head of the queue while the head's
// own acquire waits for the queue lock. That acquire then finds the grant
// (its notification not read yet): it must return it with the token the
// handoff drew, not draw another (versions 7 and 8 did, so that the key was
// held for a moment under a token nobody used).
func TestHandoffWhileOwnAcquireWaitsKeepsItsToken(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.logQueuesOnFailure()
	a, _, _ := e.client(slowTimers)
	b, _, appB := e.client(lease.Config{TTL: time.Hour, PollInterval: 20 * time.Millisecond})
	warmUp(t, e, b)
	hb := holderOf(t, b)
	k := lease.Key{Name: "handoff-race", ID: "1"}
	la := mustAcquire(t, e.ctx, a, k)
	gotB := goAcquire(e.ctx, b, k)
	e.awaitQueue(k, []int64{hb}, "b queued")

	// The queue lock, as the taker-over holds it; then a's lease runs out,
	// and b's next poll goes for the key and waits for the lock.
	tx, err := e.db.Pool.Begin(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	if _, err := tx.Exec(e.ctx, e.queueLockSQL(), k.Name, k.ID); err != nil {
		t.Fatal(err)
	}
	e.expireHolder(la.HolderID())
	e.awaitQueueLockWaiter(appB, "b's acquire waiting for the queue lock")

	// The dead grant deleted under the queue lock: the delete serves b.
	handed, to := e.deleteAndReadHandoff(tx, k)
	if to != hb || handed <= la.Token() {
		t.Fatalf("the delete granted token %d to holder %d; want a token above %d for b (%d)", handed, to, la.Token(), hb)
	}
	if err := tx.Commit(e.ctx); err != nil {
		t.Fatal(err)
	}

	r := await(t, gotB, "b")
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.l.Token() != handed {
		t.Errorf("b holds token %d; want the token handed to it, %d", r.l.Token(), handed)
	}
	var rowToken, drawn int64
	if err := e.db.Pool.QueryRow(e.ctx, "SELECT (SELECT token FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2), last_value FROM "+
		e.table("token_seq"), k.Name, k.ID).Scan(&rowToken, &drawn); err != nil {
		t.Fatal(err)
	}
	if rowToken != r.l.Token() || drawn != handed {
		t.Errorf("the key's row has token %d and the sequence is at %d; want both %d (b's)", rowToken, drawn, r.l.Token())
	}
	mustRelease(t, e.ctx, r.l)
	if n := e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE name = $1", k.Name); n != 0 {
		t.Fatalf("%d rows left of the key after b's release", n)
	}
	if n := e.waiterRows(); n != 0 {
		t.Fatalf("%d waiter rows at the end", n)
	}
}

// A grant of the holder's with a token the client has had before (here put
// back by hand after its release, as a crash that undid the release, which
// commits asynchronously, would bring it back) is not handed out as it is:
// a late write of the first holding would pass a fence during the second.
func TestAdoptedGrantOfAKnownTokenGetsANewToken(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c, _, _ := e.client(slowTimers)
	k := lease.Key{Name: "undone-release", ID: "1"}
	first := mustAcquire(t, e.ctx, c, k)
	mustRelease(t, e.ctx, first)
	e.exec("INSERT INTO "+e.table("locks")+" (name, entity_id, token, holder_id, kind, slot, permits) VALUES ($1, $2, $3, $4, 'x', 0, 1)",
		k.Name, k.ID, first.Token(), first.HolderID())
	second := mustAcquire(t, e.ctx, c, k)
	if second.Token() <= first.Token() {
		t.Fatalf("the second holding has token %d; want one above the first's, %d", second.Token(), first.Token())
	}
	if n := e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2 AND token = $3",
		k.Name, k.ID, second.Token()); n != 1 {
		t.Fatalf("%d rows of the key with the second holding's token; want 1", n)
	}
	var ok bool
	if err := e.db.Pool.QueryRow(e.ctx, "SELECT "+e.table("holds")+"($1, $2, $3)", k.Name, k.ID, first.Token()).Scan(&ok); err != nil || ok {
		t.Fatalf("holds(first token) = %v, %v; want false", ok, err)
	}
	mustRelease(t, e.ctx, second)
}

// A schema migrated back below version 9 while a client runs: the client's
// acquire of version 9 finds no such function, and it goes on with the one
// version 8 has.
func TestAcquireAfterSchemaWentBackBelowVersion9(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c, _, _ := e.client(slowTimers)
	l := mustAcquire(t, e.ctx, c, lease.Key{Name: "before-down", ID: "1"})
	pgtest.DownTo(t, e.db.Pool, e.db.Schema, 8)
	l2 := mustAcquire(t, e.ctx, c, lease.Key{Name: "after-down", ID: "1"})
	if l2.Token() <= l.Token() {
		t.Fatalf("token %d after the down migration, want above %d", l2.Token(), l.Token())
	}
	mustRelease(t, e.ctx, l2)
	mustRelease(t, e.ctx, l)
}

// Takeovers racing handoffs, many rounds: clients that poll often wait for
// one key; the holder either releases it or dies (its lease made to run out
// at once, its lock abandoned), so that the waiters' own polls race the
// taker-over's handoff to the head of the queue. Never two holders at once,
// each holding's token above the last and accepted by fence, no token drawn
// that no holding used, and at the end nobody waits and the key is free.
func TestTakeoversRacingHandoffs(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.logQueuesOnFailure()
	const clients, rounds = 4, 15
	cfg := lease.Config{TTL: time.Hour, HeartbeatInterval: 50 * time.Millisecond, PollInterval: 5 * time.Millisecond}
	k := lease.Key{Name: "takeover-race", ID: "1"}
	e.exec("CREATE TABLE " + e.table("writes") + " (seq bigint GENERATED ALWAYS AS IDENTITY, token bigint NOT NULL)")

	var (
		holding  atomic.Int32
		mu       sync.Mutex
		last     int64
		holdings int64
		wg       sync.WaitGroup
	)
	for i := range clients {
		c, _, _ := e.client(cfg)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				l, err := c.Acquire(e.ctx, k)
				if err != nil {
					t.Errorf("client %d round %d: %v", i, r, err)
					return
				}
				if !holding.CompareAndSwap(0, 1) {
					t.Errorf("client %d got token %d while another holds the key", i, l.Token())
				}
				mu.Lock()
				if l.Token() <= last {
					t.Errorf("client %d got token %d after %d", i, l.Token(), last)
				}
				last = l.Token()
				holdings++
				mu.Unlock()
				err = pgx.BeginFunc(e.ctx, e.db.Pool, func(tx pgx.Tx) error {
					if err := l.Fence(e.ctx, tx); err != nil {
						return err
					}
					_, err := tx.Exec(e.ctx, "INSERT INTO "+e.table("writes")+" (token) VALUES ($1)", l.Token())
					return err
				})
				if err != nil {
					t.Errorf("client %d: fenced write with token %d: %v", i, l.Token(), err)
				}
				if (i+r)%3 == 0 {
					// Dies: nothing runs under the lock after this.
					holding.Store(0)
					e.exec("UPDATE "+e.table("holders")+" SET expires_at = clock_timestamp() WHERE id = $1", l.HolderID())
					<-l.Done() // its heartbeat gives it up; the client goes on with a new holder
					continue
				}
				holding.Store(0)
				if err := l.Release(e.ctx); err != nil {
					t.Errorf("client %d: release: %v", i, err)
				}
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	var writes, ordered, drawn int64
	if err := e.db.Pool.QueryRow(e.ctx, `SELECT count(*), count(*) FILTER (WHERE token > prev),
			(SELECT last_value FROM `+e.table("token_seq")+`)
		FROM (SELECT token, coalesce(lag(token) OVER (ORDER BY seq), 0) AS prev FROM `+e.table("writes")+`) w`).Scan(&writes, &ordered, &drawn); err != nil {
		t.Fatal(err)
	}
	if writes != clients*rounds || ordered != writes {
		t.Errorf("%d fenced writes, %d of them with a token above the one before; want %d of both", writes, ordered, clients*rounds)
	}
	if drawn != holdings {
		t.Errorf("%d tokens drawn for %d holdings; want one each", drawn, holdings)
	}
	if n := e.waiterRows(); n != 0 {
		t.Errorf("%d waiter rows at the end", n)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("held") + " WHERE alive"); n != 0 {
		t.Errorf("%d live grants at the end", n)
	}
	fresh, _, _ := e.client(slowTimers)
	l, err := fresh.TryAcquire(e.ctx, k)
	if err != nil {
		t.Fatalf("the key at the end: %v", err)
	}
	if l.Token() <= last {
		t.Errorf("token %d at the end, after %d", l.Token(), last)
	}
	mustRelease(t, e.ctx, l)
}

// A role given the application set at version 8 may call version 9's
// acquire_keys once the schema is migrated: the migration grants it to
// every role that had version 8's. A client of this version, logged in as
// that role, acquires and waits as before.
func TestApplicationRoleOfVersion8AfterMigratingTo9(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	pgtest.DownTo(t, e.db.Pool, e.db.Schema, 8)
	app := pgtest.NewRole(t, e.db.Cluster, "pglease_app")
	e.grant("application", app)
	if _, err := migrations.Up(e.ctx, e.db.Pool, e.db.Schema); err != nil {
		t.Fatal(err)
	}
	var may bool
	if err := e.db.Pool.QueryRow(e.ctx, "SELECT has_function_privilege($1, $2, 'EXECUTE')", app.Name,
		e.table("acquire_keys")+`(text[], text[], "char"[], integer, bigint, bytea, boolean, bigint[], boolean, bigint)`).Scan(&may); err != nil || !may {
		t.Fatalf("the version 8 role may execute version 9's acquire_keys: %v, %v; want true", may, err)
	}
	a, _, _ := e.clientAs(app, slowTimers)
	b, _, _ := e.clientAs(app, slowTimers)
	k := lease.Key{Name: "upgraded-role", ID: "1"}
	la := mustAcquire(t, e.ctx, a, k)
	gotB := goAcquire(e.ctx, b, k)
	eventually(t, waitLimit, "b queued", func() bool { return e.waiterRows() == 1 })
	mustRelease(t, e.ctx, la)
	r := await(t, gotB, "b")
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.l.Token() <= la.Token() {
		t.Fatalf("b's token %d, want above a's %d", r.l.Token(), la.Token())
	}
	mustRelease(t, e.ctx, r.l)
}
