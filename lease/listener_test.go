package lease_test

// Tests of the listener lock (advisory releases are announced only while a
// session listens) and of the token guard (tokens drawn without waiting for a
// WAL flush are never handed out again after a crash).

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// listenerLockClass is the first half of the advisory lock pair that mark_listening takes in share
// mode ('pgls', hashtext(schema)).
const listenerLockClass = 1885826163

// rawListener opens a connection that LISTENs on e's channel.
func (e *env) rawListener() *pgx.Conn {
	e.t.Helper()
	conn, err := pgx.Connect(e.ctx, e.db.Cluster.URL())
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = conn.Close(context.Background()) })
	var ch string
	if err := conn.QueryRow(e.ctx, "SELECT "+e.table("channel")+"()").Scan(&ch); err != nil {
		e.t.Fatal(err)
	}
	if _, err := conn.Exec(e.ctx, "LISTEN "+pgx.Identifier{ch}.Sanitize()); err != nil {
		e.t.Fatal(err)
	}
	return conn
}

// acquireInBackground runs c.Acquire(k) in a goroutine and returns where its
// lock arrives (nil if it failed, which the test is told of).
func (e *env) acquireInBackground(c *lease.Client, k lease.Key) <-chan *lease.Lock {
	got := make(chan *lease.Lock, 1)
	go func() {
		l, err := c.Acquire(e.ctx, k)
		if err != nil {
			e.t.Errorf("table Acquire %s: %v", k, err)
		}
		got <- l
	}()
	return got
}

// handOver releases l, then takes the lock a waiter got (see
// acquireInBackground) and releases it too.
func (e *env) handOver(l *lease.Lock, got <-chan *lease.Lock) {
	e.t.Helper()
	if err := l.Release(e.ctx); err != nil {
		e.t.Fatal(err)
	}
	next := <-got
	if next == nil {
		e.t.FailNow()
	}
	if err := next.Release(e.ctx); err != nil {
		e.t.Fatal(err)
	}
}

// nextNotifications sends a probe notification from another session and
// returns the payloads that arrive on conn before it: notifications arrive in
// commit order, so everything committed before the probe is among them.
func (e *env) nextNotifications(conn *pgx.Conn, probe string) []string {
	e.t.Helper()
	e.exec("SELECT pg_notify("+e.table("channel")+"(), $1)", probe)
	var got []string
	for {
		ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
		n, err := conn.WaitForNotification(ctx)
		cancel()
		if err != nil {
			e.t.Fatalf("waiting for notifications (so far %q): %v", got, err)
		}
		if n.Payload == probe {
			return got
		}
		got = append(got, n.Payload)
	}
}

// An advisory release sends its notification only while some session holds
// the listener lock: a plain LISTEN hears nothing, one that called
// mark_listening hears the release, with the key and token.
func TestAdvisoryReleaseAnnouncedToListenersOnly(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	conn := e.rawListener()

	cycle := func(id string) int64 {
		l := mustAdvisory(t, e.ctx, a, lease.Key{Name: "announce", ID: id})
		if err := l.Release(e.ctx); err != nil {
			t.Fatal(err)
		}
		return l.Token()
	}
	cycle("1")
	if got := e.nextNotifications(conn, "probe 1"); len(got) != 0 {
		t.Fatalf("with nobody marked as listening, a release was announced: %q", got)
	}

	if _, err := conn.Exec(e.ctx, "SELECT "+e.table("mark_listening")+"()"); err != nil {
		t.Fatal(err)
	}
	var held int
	if err := conn.QueryRow(e.ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
		AND objsubid = 2 AND classid = $1 AND objid = hashtext($2)::oid AND mode = 'ShareLock'
		AND granted AND pid = pg_backend_pid()`, listenerLockClass, e.db.Schema).Scan(&held); err != nil {
		t.Fatal(err)
	}
	if held != 1 {
		t.Fatalf("mark_listening: %d listener locks held in share mode, want 1", held)
	}
	tok := cycle("2")
	got := e.nextNotifications(conn, "probe 2")
	var rows [][3]json.RawMessage
	var name, id string
	var token int64
	if len(got) != 1 || json.Unmarshal([]byte(got[0]), &rows) != nil || len(rows) != 1 ||
		json.Unmarshal(rows[0][0], &name) != nil || json.Unmarshal(rows[0][1], &id) != nil ||
		json.Unmarshal(rows[0][2], &token) != nil || name != "announce" || id != "2" || token != tok {
		t.Fatalf("a listener got %q, want one release of (announce, 2) with token %d", got, tok)
	}
}

// A client's LISTEN connection holds the listener lock, and takes it again
// after a reconnect, before the wake-up that follows: a table-mode waiter with
// an hour's PollInterval is woken by advisory releases both times.
func TestListenerMarksItself(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	cw, _, _ := e.client(lease.Config{PollInterval: time.Hour})
	k := lease.Key{Name: "marked", ID: "1"}

	marked := func(pid uint32) bool {
		return e.count(`SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2
			AND classid = $1 AND objid = hashtext($2)::oid AND mode = 'ShareLock' AND granted AND pid = $3`,
			listenerLockClass, e.db.Schema, int32(pid)) == 1
	}
	for round := range 2 {
		l := mustAdvisory(t, e.ctx, a, k)
		got := e.acquireInBackground(cw, k)
		// A table waiter of a key held on the advisory path listens on the
		// schema's channel, marked, from its first refusal on.
		eventually(t, 10*time.Second, fmt.Sprintf("round %d: the waiter's listener, marked", round), func() bool {
			return lease.Listening(cw) && marked(lease.ListenerPID(cw))
		})
		e.handOver(l, got)
		if round == 0 { // drop the LISTEN connection: the next round runs on its successor
			pid := lease.ListenerPID(cw)
			if _, err := e.db.Cluster.TerminateBackends(e.ctx, "pid = $1", int32(pid)); err != nil {
				t.Fatal(err)
			}
			eventually(t, 10*time.Second, "the listener to reconnect", func() bool {
				return lease.ListenerConnections(cw) == 2 && lease.Listening(cw)
			})
		}
	}
}

// When mark_listening fails, the LISTEN connection does not count as
// listening: the dispatcher tries again, and once the function works waiters
// are woken by notifications. A schema without mark_listening (older than this
// client) is listened to as before.
func TestListenerMarkFailureRetried(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	cw, _, _ := e.client(lease.Config{PollInterval: time.Hour})
	k := lease.Key{Name: "markfail", ID: "1"}
	mark := e.table("mark_listening")
	calls := e.table("mark_calls")
	e.exec("CREATE SEQUENCE " + calls)
	e.exec(`CREATE OR REPLACE FUNCTION ` + mark + `() RETURNS void LANGUAGE plpgsql AS $$
		BEGIN PERFORM nextval('` + calls + `'); RAISE EXCEPTION 'broken on purpose'; END $$`)

	l := mustAdvisory(t, e.ctx, a, k)
	got := e.acquireInBackground(cw, k)
	eventually(t, 30*time.Second, "two attempts to mark the listener", func() bool {
		return e.count("SELECT last_value FROM "+calls) >= 2
	})
	if lease.Listening(cw) {
		t.Fatal("the dispatcher reports listening although mark_listening failed")
	}
	e.exec(`CREATE OR REPLACE FUNCTION ` + mark + `() RETURNS void LANGUAGE sql AS $$
		SELECT pg_advisory_lock_shared(1885826163, hashtext(current_schema())) $$`)
	e.exec(`ALTER FUNCTION ` + mark + `() SET search_path = ` + pgx.Identifier{e.db.Schema}.Sanitize() + `, pg_catalog, pg_temp`)
	eventually(t, 30*time.Second, "the listener after the repair", func() bool { return lease.Listening(cw) })
	e.handOver(l, got)

	// No mark_listening at all (a schema older than the client): listening
	// regardless, and woken by a table release's notification.
	e.exec("DROP FUNCTION " + mark + "()")
	ch, _, _ := e.client(lease.Config{})
	c2, _, _ := e.client(lease.Config{PollInterval: time.Hour})
	k2 := lease.Key{Name: "markfail", ID: "2"}
	lh, err := ch.TryAcquire(e.ctx, k2)
	if err != nil {
		t.Fatal(err)
	}
	got = e.acquireInBackground(c2, k2)
	eventually(t, 30*time.Second, "a listener without mark_listening", func() bool { return lease.Listening(c2) })
	e.handOver(lh, got)
}

// After a crash the sequence may restart below tokens that advisory acquires
// handed out without waiting for a flush; the token guard moves it past them
// before anyone draws again, on both paths.
func TestTokenGuardAfterCrash(t *testing.T) {
	t.Parallel()
	// No autovacuum and a slow WAL writer: nothing flushes the WAL of the
	// advisory acquires before the crash, so the sequence really loses values.
	cl := pgtest.Owned(t, pgtest.Options{NoFsync: true, Settings: map[string]string{
		"autovacuum": "off", "wal_writer_delay": "10s",
	}})
	e := newEnvOn(t, cl)
	a, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
	ct, _, _ := e.client(lease.Config{})
	seq := e.table("token_seq")

	lastValue := func() int64 {
		conn, err := pgx.Connect(e.ctx, cl.URL())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		var v int64
		if err := conn.QueryRow(e.ctx, "SELECT last_value FROM "+seq).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	for attempt := 1; ; attempt++ {
		var top int64
		for i := range 200 {
			l := mustAdvisory(t, e.ctx, a, lease.Key{Name: "crash", ID: strconv.Itoa(i % 7)})
			top = max(top, l.Token())
			if err := l.Release(e.ctx); err != nil {
				t.Fatal(err)
			}
		}
		if err := cl.Restart(pgtest.Immediate); err != nil {
			t.Fatal(err)
		}
		if v := lastValue(); v >= top {
			// The WAL reached the kernel after all: nothing was lost to test.
			if attempt == 5 {
				t.Fatalf("in %d crashes the sequence never lost a value (last_value %d, top token %d)", attempt, v, top)
			}
			t.Logf("attempt %d: the sequence kept its values (last_value %d >= %d); again", attempt, v, top)
			continue
		} else {
			t.Logf("after the crash last_value is %d, below the top token %d", v, top)
		}
		k := lease.Key{Name: "crash", ID: "after"}
		var la *lease.Lock
		eventually(t, 30*time.Second, "an advisory acquire after the restart", func() bool {
			l, err := a.TryAcquire(e.ctx, k)
			la = l
			return err == nil
		})
		if la.Token() <= top {
			t.Fatalf("advisory token %d after the crash, but %d was handed out before it", la.Token(), top)
		}
		if err := la.Release(e.ctx); err != nil {
			t.Fatal(err)
		}
		var lt *lease.Lock
		eventually(t, 30*time.Second, "a table acquire after the restart", func() bool {
			l, err := ct.TryAcquire(e.ctx, lease.Key{Name: "crash", ID: "table"})
			lt = l
			return err == nil
		})
		if lt.Token() <= la.Token() {
			t.Fatalf("table token %d after advisory token %d", lt.Token(), la.Token())
		}
		if n := e.count("SELECT count(*) FROM " + e.table("token_guard")); n != 1 {
			t.Fatalf("%d guard rows after the bump, want 1", n)
		}
		return
	}
}

// Sessions that find the guard row missing at once bump the sequence once
// between them, and every token they draw is above the bump.
func TestTokenGuardBumpsOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	seq := e.table("token_seq")
	var before int64
	if err := e.db.Pool.QueryRow(e.ctx, "SELECT nextval('"+seq+"')").Scan(&before); err != nil {
		t.Fatal(err)
	}
	e.exec("TRUNCATE " + e.table("token_guard")) // as crash recovery would

	const n = 8
	tokens := make([]int64, n)
	var wg sync.WaitGroup
	for i := range n {
		// New clients: new sessions, which have not looked at the guard yet.
		a, _, _ := e.advisory(lease.Config{}, lease.AdvisoryConfig{})
		ct, _, _ := e.client(lease.Config{})
		wg.Add(1)
		go func() {
			defer wg.Done()
			k := lease.Key{Name: "bump", ID: strconv.Itoa(i)}
			var l *lease.Lock
			var err error
			if i%2 == 0 {
				l, err = a.Acquire(e.ctx, k)
			} else {
				l, err = ct.Acquire(e.ctx, k)
			}
			if err != nil {
				t.Errorf("acquire: %v", err)
				return
			}
			tokens[i] = l.Token()
			if err := l.Release(e.ctx); err != nil {
				t.Errorf("release: %v", err)
			}
		}()
	}
	wg.Wait()
	const bump = 1 << 40
	for i, tok := range tokens {
		if tok <= before+bump || tok >= before+2*bump {
			t.Fatalf("client %d drew %d; want one bump past %d: (%d, %d)", i, tok, before, before+bump, before+2*bump)
		}
	}
	if got := e.count("SELECT count(*) FROM " + e.table("token_guard")); got != 1 {
		t.Fatalf("%d guard rows, want 1", got)
	}
}
