package lease_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// advisory returns an Advisory of a new client of e.
func (e *env) advisory(cfg lease.Config, acfg lease.AdvisoryConfig) (*lease.Advisory, *lease.Client, *pgxpool.Pool) {
	e.t.Helper()
	cfg.Advisory = acfg
	c, pool, _ := e.client(cfg)
	return c.Advisory(), c, pool
}

// waitingOn counts backends waiting in the server for the advisory key k.
func (e *env) waitingOn(k int64) int {
	e.t.Helper()
	return e.count("SELECT count(*) FROM "+e.table("advisory_held")+" WHERE key = $1 AND NOT granted", k)
}

// holdersOf returns the backend pids that hold the advisory key k.
func (e *env) holdersOf(k int64) []int32 {
	e.t.Helper()
	rows, err := e.db.Pool.Query(e.ctx, "SELECT pid FROM "+e.table("advisory_held")+" WHERE key = $1 AND granted", k)
	if err != nil {
		e.t.Fatal(err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		e.t.Fatal(err)
	}
	return pids
}

func mustAdvisory(t *testing.T, ctx context.Context, a *lease.Advisory, k lease.Key) *lease.Lock {
	t.Helper()
	l, err := a.TryAcquire(ctx, k)
	if err != nil {
		t.Fatalf("advisory TryAcquire %s: %v", k, err)
	}
	return l
}

func wantLocked(t *testing.T, what string, l *lease.Lock, err error) {
	t.Helper()
	if !errors.Is(err, lease.ErrLocked) {
		t.Fatalf("%s: got lock %v, error %v; want ErrLocked", what, l != nil, err)
	}
}

// The Go and SQL computations of the advisory key agree, for odd keys and an
// odd schema name, and match the documented formula.
func TestAdvisoryKeyMatchesSQL(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	odd := pgtest.NewSchemaName() + ` "Ödd" sch.ema`
	pgtest.Migrate(t, e.db.Cluster, odd)
	keys := []lease.Key{{Name: "a", ID: "b"}, {Name: "invoice", ID: "2024-0042"}, {Name: "ключ", ID: "値 🙂"},
		{Name: "tab", ID: "with\ttab"}, {Name: "ab", ID: "c"}, {Name: "a", ID: "bc"}}
	seen := map[int64]bool{}
	for _, schema := range []string{e.db.Schema, odd} {
		for _, k := range keys {
			var sql int64
			if err := e.db.Pool.QueryRow(e.ctx, "SELECT "+pgx.Identifier{schema, "key_hash"}.Sanitize()+"($1, $2)", k.Name, k.ID).Scan(&sql); err != nil {
				t.Fatal(err)
			}
			if got := lease.AdvisoryKey(schema, k); got != sql {
				t.Errorf("AdvisoryKey(%q, %s) = %d, key_hash = %d", schema, k, got, sql)
			}
			if seen[sql] {
				t.Errorf("%s in %q: a key value seen before", k, schema)
			}
			seen[sql] = true
		}
	}
}

// The basics, and what a DBA sees in advisory_held.
func TestAdvisoryBasics(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, c, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	b, cb, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	k := lease.Key{Name: "job", ID: "7"}

	l := mustAdvisory(t, e.ctx, a, k)
	if !l.Advisory() || l.Err() != nil || l.Token() <= 0 || l.HolderID() != 0 {
		t.Fatalf("lock: advisory %v err %v token %d holder %d", l.Advisory(), l.Err(), l.Token(), l.HolderID())
	}
	// Held: by another client in either mode, and by this client's own
	// acquirers in either mode.
	l2, err := b.TryAcquire(e.ctx, k)
	wantLocked(t, "other client, advisory", l2, err)
	l2, err = cb.TryAcquire(e.ctx, k)
	wantLocked(t, "other client, table", l2, err)
	l2, err = a.TryAcquire(e.ctx, k)
	wantLocked(t, "same client, advisory", l2, err)
	l2, err = c.TryAcquire(e.ctx, k)
	wantLocked(t, "same client, table", l2, err)

	// The DBA's view: the key, the pinned connection's pid and application.
	var pid int32
	var app string
	var granted bool
	err = e.db.Pool.QueryRow(e.ctx, "SELECT pid, application, granted FROM "+e.table("advisory_held")+" WHERE key = "+e.table("key_hash")+"($1, $2)",
		k.Name, k.ID).Scan(&pid, &app, &granted)
	if err != nil {
		t.Fatalf("advisory_held: %v", err)
	}
	if pid != lease.AdvisoryBackend(l) || !granted || app == "" {
		t.Fatalf("advisory_held: pid %d (want %d) granted %v application %q", pid, lease.AdvisoryBackend(l), granted, app)
	}
	if a.Key(k) != lease.AdvisoryKey(e.db.Schema, k) {
		t.Fatal("Advisory.Key differs from AdvisoryKey")
	}

	if err := l.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Release(e.ctx); err != nil {
		t.Fatalf("second Release: %v", err)
	}
	if !errors.Is(context.Cause(l.Context()), lease.ErrReleased) {
		t.Fatalf("cause after Release: %v", context.Cause(l.Context()))
	}
	if n := len(e.holdersOf(a.Key(k))); n != 0 {
		t.Fatalf("%d holders after Release", n)
	}
	// Tokens of a key grow across modes.
	tl, err := cb.TryAcquire(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if tl.Token() <= l.Token() {
		t.Fatalf("table token %d after advisory token %d", tl.Token(), l.Token())
	}
	if err := tl.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	err = b.Do(e.ctx, k, func(context.Context, *lease.Lock) error { return nil })
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	l3 := mustAdvisory(t, e.ctx, b, k)
	if l3.Token() <= tl.Token() {
		t.Fatalf("advisory token %d after table token %d", l3.Token(), tl.Token())
	}
	if err := cb.Close(e.ctx); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(context.Cause(l3.Context()), lease.ErrClosed) {
		t.Fatalf("cause after Close: %v", context.Cause(l3.Context()))
	}
	if err := l3.Release(e.ctx); err != nil {
		t.Fatalf("Release after Close: %v", err)
	}
	if _, err := b.TryAcquire(e.ctx, k); !errors.Is(err, lease.ErrClosed) {
		t.Fatalf("TryAcquire after Close: %v", err)
	}
	eventually(t, 10*time.Second, "the closed client's connection to let go", func() bool { return len(e.holdersOf(a.Key(k))) == 0 })
	mustAdvisory(t, e.ctx, a, k) // free again
}

func TestAdvisoryConfig(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, cfg := range []lease.AdvisoryConfig{{MaxConns: -1}, {CheckInterval: time.Millisecond}, {CheckInterval: -time.Second}} {
		if _, err := lease.New(e.db.Pool, &lease.Config{Schema: e.db.Schema, Advisory: cfg}); !errors.Is(err, lease.ErrInvalidConfig) {
			t.Errorf("New with Advisory %+v = %v, want ErrInvalidConfig", cfg, err)
		}
	}
}

// Table and advisory acquirers race for one key, round after round: one
// TryAcquire of each mode released at the same moment. Exactly one may win;
// never both.
func TestAdvisoryCrossModeRace(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	_, ct, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	k := lease.Key{Name: "race", ID: "1"}
	const rounds = 300
	var both, none, advWins, tableWins int
	for range rounds {
		start := make(chan struct{})
		var wg sync.WaitGroup
		var la, lt *lease.Lock
		var ea, et error
		wg.Add(2)
		go func() { defer wg.Done(); <-start; la, ea = a.TryAcquire(e.ctx, k) }()
		go func() { defer wg.Done(); <-start; lt, et = ct.TryAcquire(e.ctx, k) }()
		close(start)
		wg.Wait()
		for _, err := range []error{ea, et} {
			if err != nil && !errors.Is(err, lease.ErrLocked) {
				t.Fatalf("TryAcquire: %v", err)
			}
		}
		switch {
		case la != nil && lt != nil:
			both++
		case la != nil:
			advWins++
		case lt != nil:
			tableWins++
		default:
			none++ // each saw the other in the middle of its attempt: allowed
		}
		for _, l := range []*lease.Lock{la, lt} {
			if l != nil {
				if err := l.Release(e.ctx); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	t.Logf("%d rounds: advisory won %d, table won %d, neither %d", rounds, advWins, tableWins, none)
	if both != 0 {
		t.Fatalf("both modes held the key at once in %d of %d rounds", both, rounds)
	}
	if advWins == 0 || tableWins == 0 {
		t.Fatalf("one mode never won (advisory %d, table %d): the race was not exercised", advWins, tableWins)
	}
}

// Many clients acquire one key in both modes, blocking, for many rounds. Each
// critical section checks an in-memory occupancy flag and does a fenced
// read-increment-write of a counter without a row lock of its own (the table
// mode through Fence on a pool connection, the advisory mode on the lock's own
// connection): only mutual exclusion keeps increments from being lost, and
// tokens must grow in the order the sections ran, across modes.
func TestAdvisoryCrossModeExclusion(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec("CREATE TABLE " + e.table("counters") + " (k text PRIMARY KEY, n bigint NOT NULL, last_token bigint NOT NULL)")
	e.exec("INSERT INTO " + e.table("counters") + " VALUES ('x', 0, 0)")
	k := lease.Key{Name: "acct", ID: "x"}
	const clients, sections = 4, 20
	var inside atomic.Int32
	var violations, done, advDone atomic.Int64
	var wg sync.WaitGroup
	section := func(l *lease.Lock) error {
		if !inside.CompareAndSwap(0, 1) {
			violations.Add(1)
			t.Errorf("%s entered while another section was inside", k)
		}
		defer inside.Store(0)
		return l.BeginTxFunc(e.ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
			var n, last int64
			if err := tx.QueryRow(e.ctx, "SELECT n, last_token FROM "+e.table("counters")+" WHERE k = 'x'").Scan(&n, &last); err != nil {
				return err
			}
			if last >= l.Token() {
				violations.Add(1)
				t.Errorf("token %d (advisory %v) not above the previous %d", l.Token(), l.Advisory(), last)
			}
			_, err := tx.Exec(e.ctx, "UPDATE "+e.table("counters")+" SET n = $1, last_token = $2 WHERE k = 'x'", n+1, l.Token())
			return err
		})
	}
	for range clients {
		a, c, _ := e.advisory(lease.Config{PollInterval: 50 * time.Millisecond}, lease.AdvisoryConfig{MaxConns: 2})
		for mode := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for s := range sections {
					var l *lease.Lock
					var err error
					if (mode+s)%2 == 0 {
						l, err = a.Acquire(e.ctx, k)
					} else {
						l, err = c.Acquire(e.ctx, k)
					}
					if err != nil {
						t.Errorf("acquire: %v", err)
						return
					}
					if err := section(l); err != nil {
						t.Errorf("critical section (advisory %v): %v", l.Advisory(), err)
					} else {
						done.Add(1)
						if l.Advisory() {
							advDone.Add(1)
						}
					}
					if err := l.Release(e.ctx); err != nil {
						t.Errorf("release: %v", err)
					}
				}
			}()
		}
	}
	wg.Wait()
	if n := e.count("SELECT n FROM " + e.table("counters") + " WHERE k = 'x'"); int64(n) != done.Load() {
		t.Fatalf("counter = %d after %d completed sections: increments were lost", n, done.Load())
	}
	if violations.Load() != 0 {
		t.Fatalf("%d violations", violations.Load())
	}
	if advDone.Load() == 0 || advDone.Load() == done.Load() {
		t.Fatalf("%d of %d sections were advisory: both modes must take part", advDone.Load(), done.Load())
	}
}

// Whichever mode holds the key first, the other's TryAcquire is refused and
// its Acquire gets the key once it is released.
func TestAdvisoryCrossModeHandoff(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, ca, _ := e.advisory(lease.Config{PollInterval: time.Hour}, lease.AdvisoryConfig{})
	_, cb, _ := e.advisory(lease.Config{PollInterval: time.Hour}, lease.AdvisoryConfig{})
	k := lease.Key{Name: "handoff", ID: "1"}

	// Advisory first: the table waiter wakes through the release's notification
	// (PollInterval is an hour).
	la := mustAdvisory(t, e.ctx, a, k)
	got := make(chan *lease.Lock, 1)
	go func() {
		l, err := cb.Acquire(e.ctx, k)
		if err != nil {
			t.Errorf("table Acquire: %v", err)
		}
		got <- l
	}()
	eventually(t, 10*time.Second, "the table waiter to ask", func() bool { return lease.Attempts(cb) > 0 })
	if err := la.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	lt := <-got
	if lt == nil {
		t.FailNow()
	}
	if lt.Token() <= la.Token() {
		t.Fatalf("token %d after %d", lt.Token(), la.Token())
	}

	// Table first: advisory TryAcquire says who holds it; Acquire waits for
	// the row's delete notification (PollInterval is an hour here too).
	l, err := a.TryAcquire(e.ctx, k)
	wantLocked(t, "advisory while table-held", l, err)
	var le *lease.LockedError
	if !errors.As(err, &le) || le.HolderID != lt.HolderID() {
		t.Fatalf("LockedError %+v, want holder %d", le, lt.HolderID())
	}
	go func() {
		l, err := a.Acquire(e.ctx, k)
		if err != nil {
			t.Errorf("advisory Acquire: %v", err)
		}
		got <- l
	}()
	eventually(t, 10*time.Second, "the advisory waiter to subscribe", func() bool { return lease.Subscriptions(ca) > 0 })
	if err := lt.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	l2 := <-got
	if l2 == nil {
		t.FailNow()
	}
	if !l2.Advisory() || l2.Token() <= lt.Token() {
		t.Fatalf("advisory %v token %d after %d", l2.Advisory(), l2.Token(), lt.Token())
	}
	if err := l2.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
}

// An advisory acquirer takes over a row whose holder is dead, as a table
// acquirer would; a row whose holder is alive is left alone.
func TestAdvisoryTakesOverDeadRow(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	_, ct, _ := e.advisory(lease.Config{TTL: time.Hour}, lease.AdvisoryConfig{})
	k := lease.Key{Name: "orphan", ID: "1"}
	lt, err := ct.TryAcquire(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	l, err := a.TryAcquire(e.ctx, k)
	wantLocked(t, "live row", l, err)
	e.expireHolder(lt.HolderID())
	l = mustAdvisory(t, e.ctx, a, k)
	if l.Token() <= lt.Token() {
		t.Fatalf("token %d after %d", l.Token(), lt.Token())
	}
	if n := e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE name = $1", k.Name); n != 0 {
		t.Fatalf("%d rows left after the takeover", n)
	}
	if err := l.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
}

// Two keys forced to one 64-bit value, in Go (the test hook) and in SQL
// (key_hash replaced in this test's schema): they exclude each other's
// advisory use, and a table-mode acquire of one is refused while the other is
// held on the advisory path, but neither key is ever granted wrongly: the row
// check is by (name, id), and a connection never holds one value twice.
func TestAdvisoryCollision(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	k1 := lease.Key{Name: "c", ID: "one"}
	k2 := lease.Key{Name: "c", ID: "two"}
	v := lease.AdvisoryKey(e.db.Schema, k1)
	e.exec(`CREATE OR REPLACE FUNCTION ` + e.table("key_hash") + `(p_name text, p_id text) RETURNS bigint
		LANGUAGE sql STABLE SET search_path = ` + pgx.Identifier{e.db.Schema}.Sanitize() + `, pg_catalog, pg_temp AS $$
		SELECT CASE WHEN p_name = 'c' AND p_id = 'two' THEN ` + strconv.FormatInt(v, 10) + ` ELSE
		    ('x' || encode(substring(sha256(convert_to(current_schema(), 'UTF8') || '\x00'::bytea ||
		    convert_to(p_name, 'UTF8') || '\x00'::bytea || convert_to(p_id, 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint END $$`)
	if n := e.count("SELECT count(DISTINCT "+e.table("key_hash")+"(name, id)) FROM (VALUES ($1, $2), ($3, $4)) AS x(name, id)",
		k1.Name, k1.ID, k2.Name, k2.ID); n != 1 {
		t.Fatal("the SQL collision is not in place")
	}
	collide := func(a *lease.Advisory) {
		lease.SetAdvisoryHash(a, func(k lease.Key) int64 {
			if k == k2 {
				return v
			}
			return lease.AdvisoryKey(e.db.Schema, k)
		})
	}
	a, ca, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{MaxConns: 2})
	b, cb, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{MaxConns: 2})
	collide(a)
	collide(b)
	if a.Key(k1) != a.Key(k2) {
		t.Fatal("the Go collision is not in place")
	}

	// k1 advisory-held by a: k2 is refused in both modes (the cost of a
	// collision), from b and from a itself (a second connection of a's cannot
	// take the value, and a's own connection does not take it twice).
	l1 := mustAdvisory(t, e.ctx, a, k1)
	l, err := b.TryAcquire(e.ctx, k2)
	wantLocked(t, "k2 advisory from b", l, err)
	l, err = a.TryAcquire(e.ctx, k2)
	wantLocked(t, "k2 advisory from a", l, err)
	l, err = cb.TryAcquire(e.ctx, k2)
	wantLocked(t, "k2 table from b", l, err)
	if n := len(e.holdersOf(v)); n != 1 {
		t.Fatalf("%d sessions hold the value", n)
	}
	if err := l1.Release(e.ctx); err != nil {
		t.Fatal(err)
	}

	// k1 table-held by b: k2 is free, on the advisory path too, and while a
	// holds k2 there, k1 is not granted to anyone on the advisory path (the
	// row check is by name and id, not by value).
	lt1, err := cb.TryAcquire(e.ctx, k1)
	if err != nil {
		t.Fatal(err)
	}
	l2 := mustAdvisory(t, e.ctx, a, k2)
	l, err = b.TryAcquire(e.ctx, k1)
	wantLocked(t, "k1 advisory from b while table-held", l, err)
	l, err = a.TryAcquire(e.ctx, k1)
	wantLocked(t, "k1 advisory from a while table-held", l, err)
	if err := l2.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	l, err = a.TryAcquire(e.ctx, k1)
	wantLocked(t, "k1 advisory while table-held, value free", l, err)
	if err := lt1.Release(e.ctx); err != nil {
		t.Fatal(err)
	}

	// Many rounds of both keys in both modes from both clients: each key is
	// never held twice, and the two are never both held on the advisory path.
	var inside [2]atomic.Int32
	var advInside atomic.Int32
	var wrong, granted atomic.Int64
	var wg sync.WaitGroup
	for ci, cl := range []struct {
		a *lease.Advisory
		c *lease.Client
	}{{a, ca}, {b, cb}} {
		for ki, k := range []lease.Key{k1, k2} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for r := range 60 {
					var l *lease.Lock
					var err error
					if (r+ci)%3 == 0 {
						l, err = cl.c.TryAcquire(e.ctx, k)
					} else {
						l, err = cl.a.TryAcquire(e.ctx, k)
					}
					if errors.Is(err, lease.ErrLocked) {
						continue
					}
					if err != nil {
						t.Errorf("TryAcquire: %v", err)
						return
					}
					granted.Add(1)
					if !inside[ki].CompareAndSwap(0, 1) {
						wrong.Add(1)
					}
					if l.Advisory() && advInside.Add(1) > 1 {
						wrong.Add(1)
					}
					var one int
					if err := e.db.Pool.QueryRow(e.ctx, "SELECT 1").Scan(&one); err != nil {
						t.Errorf("hold: %v", err)
					}
					if l.Advisory() {
						advInside.Add(-1)
					}
					inside[ki].Store(0)
					if err := l.Release(e.ctx); err != nil {
						t.Errorf("release: %v", err)
					}
				}
			}()
		}
	}
	wg.Wait()
	if wrong.Load() != 0 {
		t.Fatalf("%d wrong grants", wrong.Load())
	}
	if granted.Load() == 0 {
		t.Fatal("nothing was granted")
	}
}

// A thousand held advisory locks share MaxConns pinned connections; the
// client's pool (4 connections) stays free for other work.
func TestAdvisorySharesConnections(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, c, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{MaxConns: 2})
	const n = 1000
	locks := make([]*lease.Lock, 0, n)
	keys := make([]int64, 0, n)
	for i := range n {
		k := lease.Key{Name: "many", ID: strconv.Itoa(i)}
		locks = append(locks, mustAdvisory(t, e.ctx, a, k))
		keys = append(keys, a.Key(k))
	}
	var held, pids int
	err := e.db.Pool.QueryRow(e.ctx, "SELECT count(*), count(DISTINCT pid) FROM "+e.table("advisory_held")+" WHERE granted AND key = ANY($1)", keys).Scan(&held, &pids)
	if err != nil {
		t.Fatal(err)
	}
	if held != n || pids < 1 || pids > 2 {
		t.Fatalf("%d locks held by %d sessions; want %d on at most 2", held, pids, n)
	}
	if got := len(lease.AdvisoryBackends(a)); got > 2 {
		t.Fatalf("%d pinned connections, MaxConns is 2", got)
	}
	// The pool is not used up: table-mode work goes on.
	l, err := c.TryAcquire(e.ctx, lease.Key{Name: "table", ID: "1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	for _, l := range locks {
		if err := l.Release(e.ctx); err != nil {
			t.Fatal(err)
		}
	}
	if n := e.count("SELECT count(*) FROM "+e.table("advisory_held")+" WHERE key = ANY($1)", keys); n != 0 {
		t.Fatalf("%d still held after release", n)
	}
}

// A cancelled blocking Acquire leaves no backend waiting, and its connection
// stays usable.
func TestAdvisoryCancelledAcquire(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	b, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{MaxConns: 1})
	k := lease.Key{Name: "cancel", ID: "1"}
	v := a.Key(k)
	l := mustAdvisory(t, e.ctx, a, k)
	for round := range 3 {
		ctx, cancel := context.WithCancel(e.ctx)
		res := make(chan error, 1)
		go func() {
			l, err := b.Acquire(ctx, k)
			if l != nil {
				_ = l.Release(e.ctx)
			}
			res <- err
		}()
		eventually(t, 10*time.Second, "b to wait in the server", func() bool { return e.waitingOn(v) == 1 })
		cancel()
		if err := <-res; !errors.Is(err, context.Canceled) {
			t.Fatalf("round %d: Acquire = %v, want context.Canceled", round, err)
		}
		if n := e.waitingOn(v); n != 0 {
			t.Fatalf("round %d: %d backends still wait for the key after Acquire returned", round, n)
		}
		if got := lease.AdvisoryBackends(b); len(got) != 1 {
			t.Fatalf("round %d: b has %d pinned connections, want its one connection kept", round, len(got))
		}
	}
	if err := l.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	lb := mustAdvisory(t, e.ctx, b, k)
	if err := lb.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
}

// A blocking wait has a connection of its own: the releases of the locks held
// on the client's other connection go on while it waits, and the wait is
// granted in the server as soon as the key is released.
func TestAdvisoryWaitDoesNotStallReleases(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.advisory(lease.Config{PollInterval: time.Hour}, lease.AdvisoryConfig{MaxConns: 2})
	b, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	busy := lease.Key{Name: "w", ID: "busy"}
	lb := mustAdvisory(t, e.ctx, b, busy)
	var mine []*lease.Lock
	for i := range 5 {
		mine = append(mine, mustAdvisory(t, e.ctx, a, lease.Key{Name: "w", ID: strconv.Itoa(i)}))
	}
	got := make(chan *lease.Lock, 1)
	go func() {
		l, err := a.Acquire(e.ctx, busy)
		if err != nil {
			t.Errorf("Acquire: %v", err)
		}
		got <- l
	}()
	eventually(t, 10*time.Second, "a to wait in the server", func() bool { return e.waitingOn(a.Key(busy)) == 1 })
	for _, l := range mine {
		if err := l.Release(e.ctx); err != nil {
			t.Fatal(err)
		}
		mustAdvisory(t, e.ctx, a, l.Key()) // and acquire again, on the same connection
	}
	if e.waitingOn(a.Key(busy)) != 1 {
		t.Fatal("the waiter stopped waiting")
	}
	if err := lb.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	l := <-got
	if l == nil {
		t.FailNow()
	}
	if err := l.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
}

// Killing a pinned connection's backend: every lock on it is reported lost
// within CheckInterval, the keys become free, and the Advisory goes on with a
// new connection.
func TestAdvisoryConnectionKilled(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const interval = 600 * time.Millisecond
	a, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{MaxConns: 2, CheckInterval: interval})
	b, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	var locks []*lease.Lock
	for i := range 20 {
		locks = append(locks, mustAdvisory(t, e.ctx, a, lease.Key{Name: "kill", ID: strconv.Itoa(i)}))
	}
	victim := lease.AdvisoryBackend(locks[0])
	var onVictim []*lease.Lock
	for _, l := range locks {
		if lease.AdvisoryBackend(l) == victim {
			onVictim = append(onVictim, l)
		}
	}
	killed := time.Now()
	if n, err := e.db.Cluster.TerminateBackends(e.ctx, "pid = $1", victim); err != nil || n != 1 {
		t.Fatalf("terminate: %d, %v", n, err)
	}
	for _, l := range onVictim {
		select {
		case <-l.Done():
		case <-time.After(interval - time.Since(killed)):
			t.Fatalf("lock %s not reported lost within %s of the kill", l.Key(), interval)
		}
		if !errors.Is(l.Err(), lease.ErrLost) {
			t.Fatalf("cause %v, want ErrLost", l.Err())
		}
	}
	t.Logf("%d locks on the killed connection reported lost %s after the kill", len(onVictim), time.Since(killed).Round(time.Millisecond))
	for _, l := range locks {
		if lease.AdvisoryBackend(l) != victim && l.Err() != nil {
			t.Fatalf("lock %s on another connection: %v", l.Key(), l.Err())
		}
	}
	for _, l := range onVictim {
		if !errors.Is(l.Release(e.ctx), lease.ErrLost) {
			t.Fatal("Release of a lost lock does not say ErrLost")
		}
		lb := mustAdvisory(t, e.ctx, b, l.Key()) // freed by the server
		if err := lb.Release(e.ctx); err != nil {
			t.Fatal(err)
		}
		l2 := mustAdvisory(t, e.ctx, a, l.Key()) // and a goes on
		if err := l2.Release(e.ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// A server restart: every lock is reported lost within CheckInterval of the
// server going down, and the Advisory works again once it is back.
func TestAdvisoryServerRestart(t *testing.T) {
	t.Parallel()
	cl := pgtest.Owned(t, pgtest.Options{NoFsync: true})
	e := newEnvOn(t, cl)
	const interval = 600 * time.Millisecond
	a, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{MaxConns: 2, CheckInterval: interval})
	var locks []*lease.Lock
	for i := range 10 {
		locks = append(locks, mustAdvisory(t, e.ctx, a, lease.Key{Name: "restart", ID: strconv.Itoa(i)}))
	}
	lost := make(chan time.Duration, len(locks))
	down := time.Now()
	for _, l := range locks {
		go func() { <-l.Done(); lost <- time.Since(down) }()
	}
	if err := cl.Restart(pgtest.Immediate); err != nil {
		t.Fatal(err)
	}
	for range locks {
		select {
		case d := <-lost:
			if d > interval {
				t.Fatalf("a lock was reported lost %s after the server went down; the interval is %s", d, interval)
			}
		case <-time.After(time.Minute):
			t.Fatal("a lock was never reported lost")
		}
	}
	for _, l := range locks {
		if !errors.Is(l.Err(), lease.ErrLost) {
			t.Fatalf("cause %v", l.Err())
		}
	}
	l, err := a.Acquire(e.ctx, locks[0].Key())
	if err != nil {
		t.Fatalf("after the restart: %v", err)
	}
	if l.Token() <= locks[len(locks)-1].Token() {
		t.Fatalf("token %d after a restart, earlier %d", l.Token(), locks[len(locks)-1].Token())
	}
	if err := l.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
}

// doneAtLog is a slog.Handler that notes, when the client logs msg, whether
// the lock in l had its Done closed by then.
type doneAtLog struct {
	slog.Handler
	msg    string
	l      atomic.Pointer[lease.Lock]
	logged atomic.Int32 // 1: Done was closed; 2: it was not
}

func (h *doneAtLog) Handle(ctx context.Context, r slog.Record) error {
	if l := h.l.Load(); l != nil && r.Message == h.msg {
		if closed(l.Done()) {
			h.logged.CompareAndSwap(0, 1)
		} else {
			h.logged.CompareAndSwap(0, 2)
		}
	}
	return h.Handler.Handle(ctx, r)
}

// A connection check that runs out of time on a session that is alive (its
// backend stopped here, a slow server in a failover) gives the connection
// up: the lock's Done closes before the client closes the connection and
// says so, since the server frees the lock as soon as the session sees the
// socket close, and another holder may have it a moment later.
func TestAdvisoryCheckTimeoutTellsFirst(t *testing.T) {
	t.Parallel()
	cl := pgtest.Owned(t, pgtest.Options{NoFsync: true})
	e := newEnvOn(t, cl)
	h := &doneAtLog{Handler: slog.NewTextHandler(io.Discard, nil), msg: "pglease: advisory connection lost"}
	a, _, _ := e.advisory(lease.Config{Logger: slog.New(h)}, lease.AdvisoryConfig{CheckInterval: 300 * time.Millisecond})
	key := lease.Key{Name: "slow", ID: "1"}
	l := mustAdvisory(t, e.ctx, a, key)
	h.l.Store(l)
	pid := int(lease.AdvisoryBackend(l))
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
	select {
	case <-l.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the lock of a stopped backend is not reported lost 10s later")
	}
	var lost *lease.LostError
	if !errors.As(l.Err(), &lost) || lost.Reason != lease.LossConnectionLost {
		t.Fatalf("the lock ended with %v; want LossConnectionLost", l.Err())
	}
	eventually(t, 10*time.Second, "the client to log the connection lost", func() bool { return h.logged.Load() != 0 })
	if h.logged.Load() != 1 {
		t.Fatal("the client closed the connection and logged it before the lock's Done closed")
	}
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	b, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	l2 := mustAdvisory(t, e.ctx, b, key)
	if l2.Token() <= l.Token() {
		t.Fatalf("token %d after the loss, %d before", l2.Token(), l.Token())
	}
	mustRelease(t, e.ctx, l2)
}

// A network cut (a proxy that stops forwarding without closing anything):
// every lock is reported lost within CheckInterval.
func TestAdvisoryNetworkCut(t *testing.T) {
	t.Parallel()
	cl := pgtest.Owned(t, pgtest.Options{NoFsync: true})
	e := newEnvOn(t, cl)
	p := newCutProxy(t, fmt.Sprintf("127.0.0.1:%d", cl.Port()))
	const interval = 600 * time.Millisecond
	pool := pgtest.NewPool(t, cl, "advisory-cut", func(c *pgxpool.Config) {
		c.ConnConfig.Host, c.ConnConfig.Port = "127.0.0.1", uint16(p.port())
		c.ConnConfig.Fallbacks = nil
		c.MaxConns = 2
	})
	c, err := lease.New(pool, &lease.Config{Schema: e.db.Schema, Advisory: lease.AdvisoryConfig{CheckInterval: interval, MaxConns: 2}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	a := c.Advisory()
	var locks []*lease.Lock
	for i := range 6 {
		locks = append(locks, mustAdvisory(t, e.ctx, a, lease.Key{Name: "cut", ID: strconv.Itoa(i)}))
	}
	cut := time.Now()
	p.cut()
	for _, l := range locks {
		select {
		case <-l.Done():
		case <-time.After(interval - time.Since(cut)):
			t.Fatalf("lock %s not reported lost within %s of the cut", l.Key(), interval)
		}
		if !errors.Is(l.Err(), lease.ErrLost) {
			t.Fatalf("cause %v", l.Err())
		}
	}
	t.Logf("all reported lost %s after the cut", time.Since(cut).Round(time.Millisecond))
	p.close() // the server sees the connections end, and frees the locks
	for _, l := range locks {
		k := a.Key(l.Key())
		eventually(t, 30*time.Second, "the server to free the cut-off locks", func() bool { return len(e.holdersOf(k)) == 0 })
	}
}

// cutProxy forwards TCP connections to a server until cut, after which it
// forwards nothing and closes nothing, like a dead network.
type cutProxy struct {
	t      *testing.T
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	isCut  atomic.Bool
	wg     sync.WaitGroup
}

func newCutProxy(t *testing.T, target string) *cutProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{t: t, ln: ln, target: target}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *cutProxy) port() int { return p.ln.Addr().(*net.TCPAddr).Port }

func (p *cutProxy) accept() {
	defer p.wg.Done()
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, in, out)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(in, out)
		go p.pipe(out, in)
	}
}

func (p *cutProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.isCut.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *cutProxy) cut() { p.isCut.Store(true) }

func (p *cutProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
	p.mu.Unlock()
	p.wg.Wait()
}

// Work through Lock.BeginTxFunc runs on the advisory lock's own connection:
// Fence accepts only that transaction, and when the connection dies in the
// middle, the write is gone with it and the lock reports lost.
func TestAdvisoryTransactionFenced(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec("CREATE TABLE " + e.table("data") + " (v int)")
	a, _, pool := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	k := lease.Key{Name: "tx", ID: "1"}
	l := mustAdvisory(t, e.ctx, a, k)

	err := l.BeginTxFunc(e.ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
		var pid int32
		if err := tx.QueryRow(e.ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
			return err
		}
		if pid != lease.AdvisoryBackend(l) {
			return fmt.Errorf("transaction on backend %d, the lock is on %d", pid, lease.AdvisoryBackend(l))
		}
		if err := l.Fence(e.ctx, tx); err != nil {
			return err
		}
		_, err := tx.Exec(e.ctx, "INSERT INTO "+e.table("data")+" VALUES (1)")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := pgx.BeginFunc(e.ctx, pool, func(tx pgx.Tx) error { return l.Fence(e.ctx, tx) }); !errors.Is(err, lease.ErrNotFenceable) {
		t.Fatalf("Fence on a pool transaction: %v, want ErrNotFenceable", err)
	}

	// A cancelled statement inside the transaction leaves the connection (and
	// the lock) alone.
	ctx, cancel := context.WithCancel(e.ctx)
	err = l.BeginTxFunc(ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
		go func() {
			defer cancel()
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				var n int
				err := e.db.Pool.QueryRow(e.ctx, "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE 'SELECT pg_sleep%'",
					lease.AdvisoryBackend(l)).Scan(&n)
				if err != nil || n == 1 {
					return
				}
			}
		}()
		_, err := tx.Exec(ctx, "SELECT pg_sleep(60)")
		return err
	})
	if err == nil || l.Err() != nil {
		t.Fatalf("cancelled transaction: %v; lock: %v", err, l.Err())
	}

	// The connection dies while the transaction is open: the insert never
	// lands, BeginTxFunc says ErrLost, and so does the lock.
	err = l.BeginTxFunc(e.ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
		if _, err := tx.Exec(e.ctx, "INSERT INTO "+e.table("data")+" VALUES (2)"); err != nil {
			return err
		}
		if _, err := e.db.Cluster.TerminateBackends(e.ctx, "pid = $1", lease.AdvisoryBackend(l)); err != nil {
			return err
		}
		_, err := tx.Exec(e.ctx, "INSERT INTO "+e.table("data")+" VALUES (3)")
		return err
	})
	if !errors.Is(err, lease.ErrLost) {
		t.Fatalf("transaction on a killed connection: %v, want ErrLost", err)
	}
	select {
	case <-l.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the lock was not reported lost")
	}
	if n := e.count("SELECT count(*) FROM " + e.table("data") + " WHERE v > 1"); n != 0 {
		t.Fatalf("%d rows of the killed transaction landed", n)
	}
	if err := l.BeginTxFunc(e.ctx, pgx.TxOptions{}, func(pgx.Tx) error { return nil }); !errors.Is(err, lease.ErrLost) {
		t.Fatalf("BeginTxFunc on a lost lock: %v", err)
	}
}

// pgbouncerPath finds the PgBouncer binary (Debian package pgbouncer), or
// skips the test (fails it under CI=true, where .ci/run installs it).
func pgbouncerPath(t *testing.T) string {
	return pgtest.RequireProgram(t, "pgbouncer", "/usr/sbin/pgbouncer")
}

// startPgBouncer runs PgBouncer with pool_mode = transaction in front of cl, as
// the postgres user when running as root, and returns its port.
func startPgBouncer(t *testing.T, cl *pgtest.Cluster) int {
	bin := pgbouncerPath(t)
	// Not t.TempDir: its parent is private to root, and pgbouncer runs as postgres.
	dir, err := os.MkdirTemp("", "pglease-pgbouncer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port // (a small window for another process to take it)
	l.Close()
	ini := fmt.Sprintf(`[databases]
postgres = host=127.0.0.1 port=%d dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = transaction
default_pool_size = 6
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
logfile = %s
`, cl.Port(), port, filepath.Join(dir, "users.txt"), filepath.Join(dir, "pgbouncer.log"))
	if err := os.WriteFile(filepath.Join(dir, "pgbouncer.ini"), []byte(ini), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "users.txt"), []byte(`"postgres" ""`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, filepath.Join(dir, "pgbouncer.ini"))
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("running as root needs a postgres user to run pgbouncer as: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		for _, p := range []string{dir, filepath.Join(dir, "pgbouncer.ini"), filepath.Join(dir, "users.txt")} {
			if err := os.Chown(p, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pgbouncer: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGINT)
		<-exited
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		if err == nil {
			c.Close()
			return port
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "pgbouncer.log"))
			t.Fatalf("pgbouncer exited at start-up:\n%s", log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("pgbouncer did not listen within 30s: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // readiness poll of an external process
	}
}

// Behind PgBouncer in transaction mode the advisory mode refuses with
// ErrAdvisoryUnsupported, and the table mode keeps its mutual exclusion.
func TestAdvisoryBehindPgBouncer(t *testing.T) {
	t.Parallel()
	cl := pgtest.Owned(t, pgtest.Options{NoFsync: true})
	e := newEnvOn(t, cl)
	port := startPgBouncer(t, cl)
	bouncerPool := func(app string) *pgxpool.Pool {
		cfg, err := pgxpool.ParseConfig(fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable&default_query_exec_mode=simple_protocol&application_name=%s", port, app))
		if err != nil {
			t.Fatal(err)
		}
		cfg.MaxConns = 4
		pool, err := pgxpool.NewWithConfig(e.ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Close)
		return pool
	}
	newClient := func(i int) *lease.Client {
		c, err := lease.New(bouncerPool(fmt.Sprintf("bouncer-%d", i)), &lease.Config{Schema: e.db.Schema, PollInterval: 20 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close(context.Background()) })
		return c
	}

	c := newClient(0)
	a := c.Advisory()
	k := lease.Key{Name: "bouncer", ID: "1"}
	for range 2 { // refused at once the second time
		l, err := a.TryAcquire(e.ctx, k)
		if !errors.Is(err, lease.ErrAdvisoryUnsupported) {
			t.Fatalf("advisory TryAcquire through PgBouncer: lock %v, error %v; want ErrAdvisoryUnsupported", l != nil, err)
		}
		t.Logf("refused: %v", err)
	}
	if n := len(e.holdersOf(a.Key(k))); n != 0 {
		t.Fatalf("%d server sessions hold the key after the refusal", n)
	}

	// The table mode through the same proxy: fenced counter, occupancy check.
	e.exec("CREATE TABLE " + e.table("counters") + " (n bigint NOT NULL)")
	e.exec("INSERT INTO " + e.table("counters") + " VALUES (0)")
	var inside atomic.Int32
	var done, violations atomic.Int64
	var wg sync.WaitGroup
	for i := range 4 {
		c := newClient(i + 1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 12 {
				l, err := c.Acquire(e.ctx, k)
				if err != nil {
					t.Errorf("table Acquire through PgBouncer: %v", err)
					return
				}
				if !inside.CompareAndSwap(0, 1) {
					violations.Add(1)
				}
				err = l.BeginTxFunc(e.ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
					var n int64
					if err := tx.QueryRow(e.ctx, "SELECT n FROM "+e.table("counters")).Scan(&n); err != nil {
						return err
					}
					_, err := tx.Exec(e.ctx, "UPDATE "+e.table("counters")+" SET n = $1", n+1)
					return err
				})
				inside.Store(0)
				if err != nil {
					t.Errorf("critical section: %v", err)
				} else {
					done.Add(1)
				}
				if err := l.Release(e.ctx); err != nil {
					t.Errorf("release: %v", err)
				}
			}
		}()
	}
	wg.Wait()
	if violations.Load() != 0 {
		t.Fatalf("%d overlapping critical sections through PgBouncer", violations.Load())
	}
	if n := e.count("SELECT n FROM " + e.table("counters")); int64(n) != done.Load() || n == 0 {
		t.Fatalf("counter %d after %d sections", n, done.Load())
	}
}
