package lease_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// Eight clients, several goroutines each, on a few keys. Every critical
// section does a fenced read-increment-write of a counter without any row lock
// of its own: only mutual exclusion keeps the increments from being lost.
func TestMutualExclusion(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec("CREATE TABLE " + e.table("counters") + " (k text PRIMARY KEY, n bigint NOT NULL, last_token bigint NOT NULL)")
	mutualExclusion(t, e, e.client)
}

// mutualExclusion runs 8 clients (made by newClient) × 3 goroutines over 3
// keys, each critical section fenced and counted in e's table counters, and
// checks that no two sections of a key overlapped, that tokens grew per key,
// that no update was lost and that no lock row is left behind.
func mutualExclusion(t *testing.T, e *env, newClient func(lease.Config) (*lease.Client, *pgxpool.Pool, string)) {
	keys := []lease.Key{{Name: "acct", ID: "1"}, {Name: "acct", ID: "2"}, {Name: "acct", ID: "3"}}
	for _, k := range keys {
		e.exec("INSERT INTO "+e.table("counters")+" VALUES ($1, 0, 0)", k.ID)
	}
	const clients, goroutines, sections = 8, 3, 12
	inside := make(map[string]*atomic.Int32)
	for _, k := range keys {
		inside[k.ID] = new(atomic.Int32)
	}
	var completed [3]atomic.Int64
	var violations atomic.Int64
	var wg sync.WaitGroup
	for ci := range clients {
		c, pool, _ := newClient(lease.Config{})
		for g := range goroutines {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for s := range sections {
					ki := (ci + g + s) % len(keys)
					k := keys[ki]
					l, err := c.Acquire(e.ctx, k)
					if err != nil {
						t.Errorf("acquire: %v", err)
						return
					}
					if !inside[k.ID].CompareAndSwap(0, 1) {
						violations.Add(1)
					}
					err = pgx.BeginFunc(e.ctx, pool, func(tx pgx.Tx) error {
						if err := l.Fence(e.ctx, tx); err != nil {
							return err
						}
						var n, last int64
						if err := tx.QueryRow(e.ctx, "SELECT n, last_token FROM "+e.table("counters")+" WHERE k = $1", k.ID).Scan(&n, &last); err != nil {
							return err
						}
						if last >= l.Token() {
							violations.Add(1)
							t.Errorf("token %d not above previous %d on %s", l.Token(), last, k)
						}
						_, err := tx.Exec(e.ctx, "UPDATE "+e.table("counters")+" SET n = $2, last_token = $3 WHERE k = $1", k.ID, n+1, l.Token())
						return err
					})
					inside[k.ID].Store(0)
					if err != nil {
						t.Errorf("critical section: %v", err)
					} else {
						completed[ki].Add(1)
					}
					if err := l.Release(e.ctx); err != nil {
						t.Errorf("release: %v", err)
					}
				}
			}()
		}
	}
	wg.Wait()
	if v := violations.Load(); v != 0 {
		t.Fatalf("%d mutual exclusion violations", v)
	}
	total := int64(0)
	for i, k := range keys {
		n := int64(e.count("SELECT n FROM "+e.table("counters")+" WHERE k = $1", k.ID))
		if n != completed[i].Load() {
			t.Errorf("key %s: counter %d, completed sections %d (lost updates: two holders at once)", k, n, completed[i].Load())
		}
		total += n
	}
	if total != clients*goroutines*sections {
		t.Errorf("completed %d sections, want %d", total, clients*goroutines*sections)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks")); n != 0 {
		t.Errorf("%d lock rows left after every release", n)
	}
}

// A client that stops heartbeating loses its key to a waiter after the TTL, and
// its own Done fires before the waiter can take the key over.
func TestTakeoverAfterAbandon(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := lease.Config{TTL: 1500 * time.Millisecond, HeartbeatInterval: 200 * time.Millisecond, SafetyMargin: 300 * time.Millisecond}
	a, poolA, _ := e.client(cfg)
	b, _, _ := e.client(cfg)
	k := lease.Key{Name: "job", ID: "nightly"}
	la, err := a.Acquire(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *lease.Lock, 1)
	var aDoneAtTakeover atomic.Bool
	go func() {
		lb, err := b.Acquire(e.ctx, k)
		if err != nil {
			t.Errorf("b.Acquire: %v", err)
			close(got)
			return
		}
		aDoneAtTakeover.Store(closed(la.Done()))
		got <- lb
	}()
	// Abandon a: its pool goes away, so no heartbeat gets through any more.
	abandoned := time.Now()
	poolA.Close()
	lb := <-got
	if lb == nil {
		t.FailNow()
	}
	if !aDoneAtTakeover.Load() {
		t.Fatal("the waiter took the key over before the abandoned lock reported its loss")
	}
	if !errors.Is(la.Err(), lease.ErrLost) || !errors.Is(context.Cause(la.Context()), lease.ErrLost) {
		t.Fatalf("abandoned lock: Err=%v cause=%v, want ErrLost", la.Err(), context.Cause(la.Context()))
	}
	if lb.Token() <= la.Token() {
		t.Fatalf("token after takeover %d not above %d", lb.Token(), la.Token())
	}
	if waited := time.Since(abandoned); waited > 10*time.Second {
		t.Fatalf("takeover took %s with a 1.5s TTL", waited)
	}
}

// Locks survive the termination of every pool connection and a fast server
// restart within the TTL, with no loss reported.
func TestSurvivesBackendKillAndRestart(t *testing.T) {
	t.Parallel()
	cl := pgtest.Owned(t, pgtest.Options{NoFsync: true})
	e := newEnvOn(t, cl)
	c, _, app := e.client(lease.Config{TTL: 15 * time.Second, HeartbeatInterval: 300 * time.Millisecond, SafetyMargin: 2 * time.Second})
	var locks []*lease.Lock
	for i := range 5 {
		l, err := c.Acquire(e.ctx, lease.Key{Name: "k", ID: fmt.Sprint(i)})
		if err != nil {
			t.Fatal(err)
		}
		locks = append(locks, l)
	}
	hid, _ := c.HolderID()
	renewedPast := func(after time.Time) func() bool {
		return func() bool {
			conn, err := pgx.Connect(e.ctx, cl.URL())
			if err != nil {
				return false
			}
			defer conn.Close(context.Background())
			var exp time.Time
			if err := conn.QueryRow(e.ctx, "SELECT expires_at FROM "+e.table("holders")+" WHERE id = $1", hid).Scan(&exp); err != nil {
				return false
			}
			return exp.After(after)
		}
	}
	dbNow := func() time.Time {
		// A fresh connection: a restart leaves the pool's idle ones dead.
		conn, err := pgx.Connect(e.ctx, cl.URL())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		var now time.Time
		if err := conn.QueryRow(e.ctx, "SELECT clock_timestamp()").Scan(&now); err != nil {
			t.Fatal(err)
		}
		return now
	}

	n, err := cl.TerminateBackends(e.ctx, "application_name = $1", app)
	if err != nil || n == 0 {
		t.Fatalf("terminated %d backends: %v", n, err)
	}
	mark := dbNow().Add(15 * time.Second)
	eventually(t, 10*time.Second, "a heartbeat after the backends were killed", renewedPast(mark))

	if err := cl.Restart(pgtest.Fast); err != nil {
		t.Fatal(err)
	}
	mark = dbNow().Add(15 * time.Second)
	eventually(t, 10*time.Second, "a heartbeat after the restart", renewedPast(mark))

	for _, l := range locks {
		if err := l.Err(); err != nil {
			t.Fatalf("lock %s reported %v", l.Key(), err)
		}
	}
	e.db.Pool.Reset() // drop connections the restart killed
	if n := e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE holder_id = $1", hid); n != len(locks) {
		t.Fatalf("%d lock rows, want %d", n, len(locks))
	}
	for _, l := range locks {
		if err := l.Release(e.ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// A late Release of a lock that was taken over does not delete the new
// holder's row.
func TestLateReleaseKeepsNewHolder(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.client(lease.Config{})
	b, _, _ := e.client(lease.Config{})
	k := lease.Key{Name: "doc", ID: "7"}
	la, err := a.Acquire(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	e.expireHolder(la.HolderID())
	lb, err := b.TryAcquire(e.ctx, k)
	if err != nil {
		t.Fatalf("takeover of an expired holder's key: %v", err)
	}
	if err := la.Release(e.ctx); !errors.Is(err, lease.ErrLost) {
		t.Fatalf("late release = %v, want ErrLost", err)
	}
	if n := e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2 AND token = $3", k.Name, k.ID, lb.Token()); n != 1 {
		t.Fatal("the late release deleted the new holder's row")
	}
	if err := lb.Err(); err != nil {
		t.Fatalf("new holder's lock: %v", err)
	}
	if _, err := a.TryAcquire(e.ctx, k); !errors.Is(err, lease.ErrLocked) {
		t.Fatalf("a.TryAcquire while b holds = %v, want ErrLocked", err)
	}
}

// Eight connections race to take over one key whose holder keeps dying,
// straight through the SQL function acquire (the trap is in the SQL, and this
// drives it far faster than clients waiting politely would). Winners log their
// token in a fenced transaction, so the log is in acquisition order; tokens
// must strictly increase along it. A sequence alone does not give this.
func TestTokenOrderUnderTakeoverRace(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec("CREATE TABLE " + e.table("wins") + " (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, token bigint NOT NULL)")
	wins := 5000
	if testing.Short() {
		wins = 1000
	}
	var logged atomic.Int64
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	register := "INSERT INTO " + e.table("holders") + " (host, pid, application, ttl, expires_at) VALUES ('race', 0, 'test', interval '1 hour', clock_timestamp() + interval '1 hour') RETURNING id"
	for range 8 {
		conn, err := pgx.Connect(e.ctx, e.db.Cluster.URL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close(context.Background()) })
		wg.Add(1)
		go func() {
			defer wg.Done()
			var holder int64
			if err := conn.QueryRow(ctx, register).Scan(&holder); err != nil {
				t.Errorf("register: %v", err)
				return
			}
			for ctx.Err() == nil {
				var acquired bool
				var token *int64
				err := conn.QueryRow(ctx, "SELECT acquired, token FROM "+e.table("acquire")+"('hot', '1', $1)", holder).Scan(&acquired, &token)
				if err != nil {
					if ctx.Err() == nil {
						t.Errorf("acquire: %v", err)
					}
					return
				}
				if !acquired {
					continue
				}
				err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, "SELECT "+e.table("fence")+"('hot', '1', $1)", *token); err != nil {
						return err
					}
					_, err := tx.Exec(ctx, "INSERT INTO "+e.table("wins")+" (token) VALUES ($1)", *token)
					return err
				})
				if err != nil {
					if ctx.Err() == nil {
						t.Errorf("fenced log of a fresh win: %v", err)
					}
					return
				}
				if logged.Add(1) >= int64(wins) {
					cancel()
					return
				}
				// Die without releasing, and come back as a new holder: the
				// next winner must take over.
				if _, err := conn.Exec(ctx, "UPDATE "+e.table("holders")+" SET expires_at = clock_timestamp() WHERE id = $1", holder); err != nil {
					return
				}
				if err := conn.QueryRow(ctx, register).Scan(&holder); err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	rows, err := e.db.Pool.Query(e.ctx, "SELECT token FROM "+e.table("wins")+" ORDER BY seq")
	if err != nil {
		t.Fatal(err)
	}
	tokens, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	if len(tokens) < wins {
		t.Fatalf("%d wins logged, want at least %d", len(tokens), wins)
	}
	regressions := 0
	for i := 1; i < len(tokens); i++ {
		if tokens[i] <= tokens[i-1] {
			regressions++
		}
	}
	if regressions != 0 {
		t.Fatalf("%d of %d winners had a token not above the previous winner's", regressions, len(tokens))
	}
	t.Logf("%d takeover wins, tokens strictly increasing", len(tokens))
}

// The revival trap, driven deterministically: a heartbeat passes its expiry
// check just before expiry and commits just after it, while a takeover runs.
// The takeover finds the key busy while the renewal is open; after it, it
// sees the renewed holder, or, if the renewal rolled back, wins, and the
// holder can never be renewed again. (The other order, a takeover that locked
// the holder row first, is what the no-op UPDATE in the takeover is for: the
// renewal then re-checks the expiry against the new row version.)
func TestRevivalRace(t *testing.T) {
	t.Parallel()
	for _, commit := range []bool{true, false} {
		t.Run(fmt.Sprintf("renewal_commits=%v", commit), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			ctx := e.ctx
			// a's lease is about to run out (a renewal gives it an hour); b's is long.
			var a, b int64
			for id, left := range map[*int64]string{&a: "1500 milliseconds", &b: "1 hour"} {
				if err := e.db.Pool.QueryRow(ctx, "INSERT INTO "+e.table("holders")+" (host, pid, application, ttl, expires_at) VALUES ('h', 1, 'test', interval '1 hour', clock_timestamp() + $1::interval) RETURNING id", left).Scan(id); err != nil {
					t.Fatal(err)
				}
			}
			var tokenA int64
			var ok bool
			if err := e.db.Pool.QueryRow(ctx, "SELECT acquired, token FROM "+e.table("acquire")+"('k', '1', $1)", a).Scan(&ok, &tokenA); err != nil || !ok {
				t.Fatalf("a acquires: %v %v", ok, err)
			}
			var oldExpiry time.Time
			if err := e.db.Pool.QueryRow(ctx, "SELECT expires_at FROM "+e.table("holders")+" WHERE id = $1", a).Scan(&oldExpiry); err != nil {
				t.Fatal(err)
			}

			hb, err := pgx.Connect(ctx, e.db.Cluster.URL())
			if err != nil {
				t.Fatal(err)
			}
			defer hb.Close(context.Background())
			tx, err := hb.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var alive bool
			var n, x int64
			if err := tx.QueryRow(ctx, "SELECT alive, locks, tokens_xor FROM "+e.table("renew")+"($1)", a).Scan(&alive, &n, &x); err != nil || !alive {
				t.Fatalf("renewal before expiry: alive=%v err=%v", alive, err)
			}
			// Wait (on the database clock) until the committed lease has run out.
			eventually(t, 5*time.Second, "the old expiry to pass", func() bool {
				var past bool
				_ = e.db.Pool.QueryRow(ctx, "SELECT clock_timestamp() > $1", oldExpiry).Scan(&past)
				return past
			})

			taker, err := pgx.Connect(ctx, e.db.Cluster.URL())
			if err != nil {
				t.Fatal(err)
			}
			defer taker.Close(context.Background())
			type result struct {
				acquired, busy bool
				token          *int64
				err            error
			}
			takeover := func() result {
				var r result
				r.err = taker.QueryRow(ctx, "SELECT acquired, token, busy FROM "+e.table("acquire")+"('k', '1', $1)", b).Scan(&r.acquired, &r.token, &r.busy)
				return r
			}
			// The takeover never waits while it holds the key's locks: it
			// finds the holder row locked by the renewal and reports the key
			// busy, so the one who asks again decides after the renewal did.
			if r := takeover(); r.err != nil || r.acquired || !r.busy {
				t.Fatalf("takeover during the renewal: acquired %v, busy %v, error %v; want busy", r.acquired, r.busy, r.err)
			}
			if commit {
				err = tx.Commit(ctx)
			} else {
				err = tx.Rollback(ctx)
			}
			if err != nil {
				t.Fatal(err)
			}
			r := takeover()
			if r.err != nil {
				t.Fatal(r.err)
			}
			holdsA := e.count("SELECT "+e.table("holds")+"('k', '1', $1)::int", tokenA) == 1
			if commit {
				if r.acquired {
					t.Fatal("takeover succeeded although the holder's renewal committed: two live holders")
				}
				if !holdsA {
					t.Fatal("renewed holder no longer holds its lock")
				}
			} else {
				if !r.acquired {
					t.Fatal("takeover of an expired holder failed")
				}
				if holdsA {
					t.Fatal("old holder still holds after the takeover")
				}
				var alive bool
				if err := e.db.Pool.QueryRow(ctx, "SELECT alive FROM "+e.table("renew")+"($1)", a).Scan(&alive); err != nil {
					t.Fatal(err)
				}
				if alive {
					t.Fatal("an expired holder was renewed back to life")
				}
			}
			if n := e.count("SELECT count(*) FROM " + e.table("held") + " WHERE alive"); n != 1 {
				t.Fatalf("%d live holders of the key, want exactly 1", n)
			}
		})
	}
}

// fence rejects a stale token, and a takeover cannot complete while a fenced
// transaction is open.
func TestFence(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec("CREATE TABLE " + e.table("doc") + " (id int PRIMARY KEY, body text)")
	e.exec("INSERT INTO " + e.table("doc") + " VALUES (1, 'v0')")
	a, poolA, _ := e.client(lease.Config{})
	b, _, _ := e.client(lease.Config{})
	k := lease.Key{Name: "doc", ID: "1"}
	la, err := a.Acquire(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	tx, err := poolA.Begin(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background())
	if err := la.Fence(e.ctx, tx); err != nil {
		t.Fatalf("fence by the holder: %v", err)
	}
	// The holder dies while its fenced write is in flight.
	e.expireHolder(la.HolderID())
	if _, err := b.TryAcquire(e.ctx, k); !errors.Is(err, lease.ErrLocked) {
		t.Fatalf("takeover during a fenced transaction = %v, want ErrLocked", err)
	}
	if _, err := tx.Exec(e.ctx, "UPDATE "+e.table("doc")+" SET body = 'by a' WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(e.ctx); err != nil {
		t.Fatal(err)
	}
	lb, err := b.TryAcquire(e.ctx, k)
	if err != nil {
		t.Fatalf("takeover after the fenced transaction ended: %v", err)
	}
	if lb.Token() <= la.Token() {
		t.Fatalf("token %d not above %d", lb.Token(), la.Token())
	}
	// a's late write is rejected by the database, whatever a believes.
	err = pgx.BeginFunc(e.ctx, poolA, func(tx pgx.Tx) error {
		if _, err := tx.Exec(e.ctx, "SELECT "+e.table("fence")+"($1, $2, $3)", k.Name, k.ID, la.Token()); err != nil {
			return err
		}
		_, err := tx.Exec(e.ctx, "UPDATE "+e.table("doc")+" SET body = 'late' WHERE id = 1")
		return err
	})
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != lease.SQLStateNotHeld {
		t.Fatalf("stale fence = %v, want SQLSTATE %s", err, lease.SQLStateNotHeld)
	}
	tx2, err := poolA.Begin(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := la.Fence(e.ctx, tx2); !errors.Is(err, lease.ErrLost) {
		t.Fatalf("Lock.Fence with a stale token = %v, want ErrLost", err)
	}
	_ = tx2.Rollback(e.ctx)
	var body string
	if err := e.db.Pool.QueryRow(e.ctx, "SELECT body FROM "+e.table("doc")+" WHERE id = 1").Scan(&body); err != nil || body != "by a" {
		t.Fatalf("body = %q (%v), want the fenced write 'by a' and not the late one", body, err)
	}
	if err := lb.Fence(e.ctx, mustBegin(t, e)); err != nil {
		t.Fatalf("new holder's fence: %v", err)
	}
}

func mustBegin(t *testing.T, e *env) pgx.Tx {
	tx, err := e.db.Pool.Begin(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tx.Rollback(context.Background()) })
	return tx
}
