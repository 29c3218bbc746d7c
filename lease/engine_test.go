package lease_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// rowsOf counts the lock rows of key that belong to holder.
func (e *env) rowsOf(k lease.Key, holder int64) int {
	e.t.Helper()
	return e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2 AND holder_id = $3",
		k.Name, k.ID, holder)
}

// An Acquire whose ctx ends while its insert is still running (here: held up
// in a trigger, with no cancel request sent, as pgx does by default) gives up
// and cleans up at once; the insert then commits after that clean-up. The row
// belongs to a live holder that does not know it holds it: it must not keep
// the key locked for as long as the client lives.
func TestCancelledAcquireThatCommitsLateIsDeleted(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c, _, _ := e.client(lease.Config{TTL: 3 * time.Second, HeartbeatInterval: 100 * time.Millisecond})
	warm := mustAcquire(t, e.ctx, c, lease.Key{Name: "warm", ID: "1"}) // registers the holder
	holder := warm.HolderID()
	k := lease.Key{Name: "slow", ID: "1"}

	// The insert of k waits for the test's advisory lock (7, 17), and keeps
	// waiting through the cancel requests that pgx sends when it gives up on
	// the connection (one or two, seen here), like cancels that never
	// arrived. They come asynchronously, on connections of their own: the
	// handler takes the session lock (7, 18) to say one has come and gone, and
	// the test opens the gate only then (a cancel that landed after the gate
	// would abort the insert instead). The insert logs itself in slow_log, in its own
	// transaction: the log row stays when the client deletes the lock row,
	// which it may do before a poll of a loaded machine sees the row.
	e.exec(`CREATE TABLE ` + e.table("slow_log") + ` (token bigint NOT NULL)`)
	e.exec(`CREATE FUNCTION ` + e.table("slow_insert") + `() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF NEW.name = 'slow' THEN
				LOOP
					BEGIN
						PERFORM pg_advisory_xact_lock(7, 17);
						EXIT;
					EXCEPTION WHEN query_canceled THEN
						PERFORM pg_advisory_lock(7, 18);
					END;
				END LOOP;
				INSERT INTO ` + e.table("slow_log") + ` VALUES (NEW.token);
			END IF;
			RETURN NEW;
		END $$`)
	e.exec(`CREATE TRIGGER slow_insert BEFORE INSERT ON ` + e.table("locks") +
		` FOR EACH ROW EXECUTE FUNCTION ` + e.table("slow_insert") + `()`)
	gate, err := e.db.Pool.Begin(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = gate.Rollback(context.Background()) }()
	if _, err := gate.Exec(e.ctx, "SELECT pg_advisory_xact_lock(7, 17)"); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() {
		_, err := c.Acquire(ctx, k)
		done <- err
	}()
	eventually(t, 10*time.Second, "the insert to wait in the trigger", func() bool {
		return e.count("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 7 AND objid = 17 AND NOT granted") == 1
	})
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Acquire = %v, want context.Canceled", err)
	}
	// The clean-up queued on the key before Acquire returned. Its leave
	// waits for the key's queue lock, which the stuck acquire holds: it times
	// out (ReleaseTimeout) and is tried again after each renewal, until the
	// late insert has committed and there is a row to delete.
	eventually(t, 30*time.Second, "the cancel request to reach the insert", func() bool {
		return e.count("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 7 AND objid = 18 AND granted") == 1
	})
	if err := gate.Commit(e.ctx); err != nil { // the insert goes on and commits
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the late insert to commit", func() bool {
		return e.count("SELECT count(*) FROM "+e.table("slow_log")) > 0
	})
	eventually(t, 10*time.Second, "the client to delete the row it does not hold", func() bool { return e.rowsOf(k, holder) == 0 })
	eventually(t, 10*time.Second, "the clean-up of the cancelled acquire", func() bool { return lease.QueueLen(c, k) == 0 })

	other, _, _ := e.client(lease.Config{})
	l, err := other.TryAcquire(e.ctx, k)
	if err != nil {
		t.Fatalf("another client cannot take the key: %v", err)
	}
	mustRelease(t, e.ctx, l)
	if err := warm.Err(); err != nil {
		t.Fatalf("the client's own lock ended: %v", err)
	}
}

// A release commits asynchronously, so a crash right after it can undo it:
// the row comes back, for a holder that is alive and renewing. The client
// finds that row in its heartbeat's count and deletes it again.
func TestReleaseUndoneByCrashIsDeletedAgain(t *testing.T) {
	t.Parallel()
	// A slow WAL writer and no autovacuum: nothing flushes the release's
	// commit record before the crash unless a durable commit does.
	cl := pgtest.Owned(t, pgtest.Options{NoFsync: true, Settings: map[string]string{
		"autovacuum": "off", "wal_writer_delay": "10s",
	}})
	e := newEnvOn(t, cl)
	c, _, _ := e.client(lease.Config{TTL: 20 * time.Second, HeartbeatInterval: 300 * time.Millisecond})
	for attempt := 1; ; attempt++ {
		k := lease.Key{Name: "undone", ID: strconv.Itoa(attempt)}
		l := mustAcquire(t, e.ctx, c, k)
		holder := l.HolderID()
		mustRelease(t, e.ctx, l)
		if err := cl.Restart(pgtest.Immediate); err != nil {
			t.Fatal(err)
		}
		var back int
		eventually(t, 30*time.Second, "the server to come back", func() bool {
			err := e.db.Pool.QueryRow(e.ctx, "SELECT count(*) FROM "+e.table("locks")+
				" WHERE name = $1 AND entity_id = $2 AND holder_id = $3", k.Name, k.ID, holder).Scan(&back)
			return err == nil
		})
		if back == 0 {
			// A durable commit (a renewal) flushed the release first.
			if attempt == 8 {
				t.Fatalf("in %d crashes no release was undone", attempt)
			}
			t.Logf("attempt %d: the release survived the crash; again", attempt)
			continue
		}
		t.Logf("attempt %d: the crash undid the release; the row of holder %d is back", attempt, holder)
		eventually(t, 15*time.Second, "the client to delete the row again", func() bool { return e.rowsOf(k, holder) == 0 })
		other, _, _ := e.client(lease.Config{})
		l2, err := other.TryAcquire(e.ctx, k)
		if err != nil {
			t.Fatalf("another client cannot take the key: %v", err)
		}
		mustRelease(t, e.ctx, l2)
		return
	}
}

// modes runs f for the table path and the advisory path of new clients of e.
func (e *env) modes(f func(t *testing.T, name string, acquire func(*lease.Client) func(context.Context, lease.Key) (*lease.Lock, error))) {
	f(e.t, "table", func(c *lease.Client) func(context.Context, lease.Key) (*lease.Lock, error) { return c.Acquire })
	f(e.t, "advisory", func(c *lease.Client) func(context.Context, lease.Key) (*lease.Lock, error) {
		return c.Advisory().Acquire
	})
}

// doOf returns Do of the path that acquire belongs to.
func doOf(c *lease.Client, name string) func(context.Context, lease.Key, func(context.Context, *lease.Lock) error) error {
	if name == "advisory" {
		return c.Advisory().Do
	}
	return c.Do
}

// A panic in Do's callback releases the lock on its way up, in both modes:
// servers that recover panics go on running, and the key must not stay
// locked for as long as the process lives.
func TestDoReleasesOnPanic(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.modes(func(t *testing.T, name string, _ func(*lease.Client) func(context.Context, lease.Key) (*lease.Lock, error)) {
		c, _, _ := e.client(lease.Config{})
		k := lease.Key{Name: "panic", ID: name}
		var held *lease.Lock
		func() {
			defer func() {
				if r := recover(); r != "boom" {
					t.Fatalf("%s: recovered %v, want the callback's panic", name, r)
				}
			}()
			_ = doOf(c, name)(e.ctx, k, func(_ context.Context, l *lease.Lock) error {
				held = l
				panic("boom")
			})
		}()
		if !errors.Is(held.Err(), lease.ErrReleased) {
			t.Fatalf("%s: after the panic Err = %v, want ErrReleased", name, held.Err())
		}
		other, _, _ := e.client(lease.Config{})
		l, err := other.TryAcquire(e.ctx, k)
		if err != nil {
			t.Fatalf("%s: the key stayed locked after a panic in Do: %v", name, err)
		}
		mustRelease(t, e.ctx, l)
	})
}

// Do hands the callback its lock, so that the write it protects can be
// fenced, on either path; the callback's ctx also ends with Do's ctx.
func TestDoGivesTheLock(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.exec("CREATE TABLE " + e.table("ledger") + " (n int)")
	e.modes(func(t *testing.T, name string, _ func(*lease.Client) func(context.Context, lease.Key) (*lease.Lock, error)) {
		c, _, _ := e.client(lease.Config{})
		k := lease.Key{Name: "do-fence", ID: name}
		err := doOf(c, name)(e.ctx, k, func(ctx context.Context, l *lease.Lock) error {
			if l == nil || l.Key() != k || l.Token() <= 0 {
				return fmt.Errorf("callback got lock %+v", l)
			}
			return l.BeginTxFunc(ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
				_, err := tx.Exec(ctx, "INSERT INTO "+e.table("ledger")+" VALUES (1)")
				return err
			})
		})
		if err != nil {
			t.Fatalf("%s: Do = %v", name, err)
		}
		ctx, cancel := context.WithCancel(e.ctx)
		err = doOf(c, name)(ctx, k, func(fctx context.Context, _ *lease.Lock) error {
			cancel()
			<-fctx.Done()
			return context.Cause(fctx)
		})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("%s: Do whose ctx ended = %v, want context.Canceled", name, err)
		}
	})
	if n := e.count("SELECT count(*) FROM " + e.table("ledger")); n != 2 {
		t.Fatalf("%d fenced writes landed, want 2", n)
	}
}

// Locks are not reentrant. An acquire from inside the critical section of the
// same key (its ctx derived from the lock's) would wait for itself: refused
// at once with ErrAlreadyHeld, in both modes. Another goroutine of the same
// client, with a ctx of its own, waits for the release as another process
// would.
func TestReentryRefusedAtOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.modes(func(t *testing.T, name string, acquire func(*lease.Client) func(context.Context, lease.Key) (*lease.Lock, error)) {
		c, _, _ := e.client(lease.Config{})
		k := lease.Key{Name: "reentry", ID: name}
		err := doOf(c, name)(e.ctx, k, func(ctx context.Context, l *lease.Lock) error {
			for _, x := range []struct {
				what string
				ctx  context.Context
			}{{"Do's ctx", ctx}, {"Lock.Context", l.Context()}} {
				_, err := acquire(c)(x.ctx, k)
				var le *lease.LockedError
				if !errors.Is(err, lease.ErrAlreadyHeld) || !errors.Is(err, lease.ErrLocked) || !errors.As(err, &le) || !le.ByThisClient {
					return fmt.Errorf("acquire with %s = %v, want ErrAlreadyHeld", x.what, err)
				}
			}
			// Try of a held key says it is ours, whatever the ctx.
			if _, err := c.TryAcquire(e.ctx, k); !errors.Is(err, lease.ErrAlreadyHeld) {
				return fmt.Errorf("TryAcquire = %v, want ErrAlreadyHeld", err)
			}
			// Another key is fine inside the section.
			other, err := acquire(c)(ctx, lease.Key{Name: "reentry-other", ID: name})
			if err != nil {
				return err
			}
			return other.Release(ctx)
		})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}

		// A sibling goroutine waits for the holder's release.
		l, err := acquire(c)(e.ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan *lease.Lock, 1)
		go func() {
			l2, err := acquire(c)(e.ctx, k)
			if err != nil {
				t.Errorf("%s: sibling: %v", name, err)
			}
			got <- l2
		}()
		eventually(t, 10*time.Second, "the sibling to queue", func() bool { return lease.QueueLen(c, k) == 1 })
		mustRelease(t, e.ctx, l)
		if l2 := <-got; l2 != nil {
			if l2.Token() <= l.Token() {
				t.Fatalf("%s: sibling token %d after %d", name, l2.Token(), l.Token())
			}
			mustRelease(t, e.ctx, l2)
		}
	})
}

// A lock ends once, for one reason, and says the same everywhere: after a
// DBA's DELETE that the client had not noticed yet, Release reports the loss
// and Err and the context's cause agree with it.
func TestReleaseOfDeletedRowTellsOneStory(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c, _, _ := e.client(lease.Config{}) // a 10 s heartbeat: the loss is found by Release first
	k := lease.Key{Name: "story", ID: "1"}
	l := mustAcquire(t, e.ctx, c, k)
	// Quietly, as a takeover deletes: no notification tells the client.
	tx, err := e.db.Pool.Begin(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(e.ctx, "SELECT set_config('pglease.quiet', 'on', true)"); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(e.ctx, "DELETE FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2", k.Name, k.ID); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(e.ctx); err != nil {
		t.Fatal(err)
	}
	rerr := l.Release(e.ctx)
	var fromRelease, fromErr, fromCause *lease.LostError
	if !errors.As(rerr, &fromRelease) || !errors.As(l.Err(), &fromErr) || !errors.As(context.Cause(l.Context()), &fromCause) {
		t.Fatalf("Release = %v, Err = %v, cause = %v: want the same *LostError from all three", rerr, l.Err(), context.Cause(l.Context()))
	}
	if fromRelease != fromErr || fromErr != fromCause || fromErr.Reason != lease.LossRowDeleted || fromErr.Token != l.Token() {
		t.Fatalf("Release %+v, Err %+v, cause %+v: want one *LostError with LossRowDeleted", fromRelease, fromErr, fromCause)
	}
	if again := l.Release(e.ctx); again != rerr {
		t.Fatalf("second Release = %v, want the first's %v", again, rerr)
	}
}

// Release racing Client.Close, many rounds in both modes: whichever wins,
// Release returns nil (the lock was let go of, by it or by Close), never a raw
// connection error and never ErrLost, and Err says ErrReleased or ErrClosed.
func TestReleaseRacingCloseTellsOneStory(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.modes(func(t *testing.T, name string, acquire func(*lease.Client) func(context.Context, lease.Key) (*lease.Lock, error)) {
		causes := map[string]int{}
		for i := range 40 {
			c, _, _ := e.client(lease.Config{})
			l, err := acquire(c)(e.ctx, lease.Key{Name: "race-close", ID: name + strconv.Itoa(i)})
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			var rerr error
			wg.Go(func() { rerr = l.Release(e.ctx) })
			wg.Go(func() { _ = c.Close(e.ctx) })
			wg.Wait()
			cause := l.Err()
			if rerr != nil {
				t.Fatalf("%s round %d: Release = %v (Err %v), want nil", name, i, rerr, cause)
			}
			if !errors.Is(cause, lease.ErrReleased) && !errors.Is(cause, lease.ErrClosed) {
				t.Fatalf("%s round %d: Err = %v, want ErrReleased or ErrClosed", name, i, cause)
			}
			causes[cause.Error()]++
		}
		t.Logf("%s: %v", name, causes)
	})
}

// The reason of a loss is in the API: a *LostError with the reason, for each
// way a lock is lost.
func TestLossReasons(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg := lease.Config{TTL: time.Second, HeartbeatInterval: 100 * time.Millisecond}
	reasonOf := func(l *lease.Lock) lease.LossReason {
		t.Helper()
		select {
		case <-l.Done():
		case <-time.After(20 * time.Second):
			t.Fatalf("lock %v not lost", l.Key())
		}
		var le *lease.LostError
		if !errors.As(l.Err(), &le) || !errors.Is(l.Err(), lease.ErrLost) {
			t.Fatalf("Err = %v, want a *LostError", l.Err())
		}
		return le.Reason
	}

	c1, _, _ := e.client(cfg)
	l := mustAcquire(t, e.ctx, c1, lease.Key{Name: "why", ID: "expired"})
	e.expireHolder(l.HolderID())
	if r := reasonOf(l); r != lease.LossHolderExpired {
		t.Errorf("expired holder: reason %v", r)
	}

	c2, _, _ := e.client(cfg)
	l = mustAcquire(t, e.ctx, c2, lease.Key{Name: "why", ID: "deleted"})
	e.exec("DELETE FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2", "why", "deleted")
	if r := reasonOf(l); r != lease.LossRowDeleted {
		t.Errorf("deleted row: reason %v", r)
	}

	// A renewal held up past TTL - SafetyMargin by a row lock on the holder.
	c3, _, _ := e.client(cfg)
	l = mustAcquire(t, e.ctx, c3, lease.Key{Name: "why", ID: "slow"})
	tx, err := e.db.Pool.Begin(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(e.ctx, "SELECT 1 FROM "+e.table("holders")+" WHERE id = $1 FOR UPDATE", l.HolderID()); err != nil {
		t.Fatal(err)
	}
	r := reasonOf(l)
	_ = tx.Rollback(e.ctx)
	if r != lease.LossRenewalTimeout {
		t.Errorf("blocked renewal: reason %v", r)
	}

	c4, _, _ := e.client(lease.Config{Advisory: lease.AdvisoryConfig{CheckInterval: 100 * time.Millisecond}})
	l = mustAdvisory(t, e.ctx, c4.Advisory(), lease.Key{Name: "why", ID: "conn"})
	if _, err := e.db.Cluster.TerminateBackends(e.ctx, "pid = $1", lease.AdvisoryBackend(l)); err != nil {
		t.Fatal(err)
	}
	if r := reasonOf(l); r != lease.LossConnectionLost {
		t.Errorf("terminated advisory backend: reason %v", r)
	}
	if err := l.Release(e.ctx); !errors.Is(err, lease.ErrLost) {
		t.Errorf("Release of a lost advisory lock = %v, want ErrLost", err)
	}
}

// There is one advisory handle per Client: asking for it per request reuses
// its pinned connections instead of opening more that live until Close.
func TestOneAdvisoryHandlePerClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c, _, app := e.client(lease.Config{Advisory: lease.AdvisoryConfig{MaxConns: 2}})
	first := c.Advisory()
	for i := range 50 {
		a := c.Advisory()
		if a != first {
			t.Fatal("Advisory returned a second handle")
		}
		l := mustAdvisory(t, e.ctx, a, lease.Key{Name: "per-request", ID: strconv.Itoa(i)})
		mustRelease(t, e.ctx, l)
	}
	if n := len(lease.AdvisoryBackends(first)); n > 2 {
		t.Fatalf("%d pinned connections after 50 requests, want at most MaxConns 2", n)
	}
	if n := e.count("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app); n > 2+4 {
		t.Fatalf("%d connections of the client's application, want at most the pool's 4 and 2 pinned", n)
	}
}

// Every connection the client opens goes through the pool's hooks: here the
// server wants a password, and only BeforeConnect knows it (as with cloud
// IAM tokens or rotated secrets). The LISTEN connection (a waiter woken by a
// release, with polling made useless) and the pinned advisory connections
// must log in with it.
func TestConnectionsGoThroughPoolHooks(t *testing.T) {
	t.Parallel()
	dir, err := os.MkdirTemp("", "pglease-hba-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	hba := filepath.Join(dir, "pg_hba.conf")
	if err := os.WriteFile(hba, []byte(
		"local all postgres trust\n"+
			"host all postgres 127.0.0.1/32 trust\n"+
			"host all all 127.0.0.1/32 scram-sha-256\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil { // the server runs as another user
		t.Fatal(err)
	}
	cl := pgtest.Owned(t, pgtest.Options{NoFsync: true, Settings: map[string]string{"hba_file": hba}})
	e := newEnvOn(t, cl)
	e.exec("CREATE ROLE hooked LOGIN SUPERUSER PASSWORD 'secret'")

	var hooks atomic.Int32
	pool := pgtest.NewPool(t, cl, "hooked", func(c *pgxpool.Config) {
		c.ConnConfig.User = "hooked"
		c.ConnConfig.Password = ""
		c.BeforeConnect = func(_ context.Context, cc *pgx.ConnConfig) error {
			hooks.Add(1)
			cc.Password = "secret"
			return nil
		}
	})
	waiter, err := lease.New(pool, &lease.Config{Schema: e.db.Schema, PollInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = waiter.Close(context.Background()) })
	holder, _, _ := e.client(lease.Config{})
	k := lease.Key{Name: "hooked", ID: "1"}
	l := mustAcquire(t, e.ctx, holder, k)
	ch := goAcquire(e.ctx, waiter, k)
	eventually(t, 20*time.Second, "the waiter's LISTEN connection", func() bool { return lease.Listening(waiter) })
	mustRelease(t, e.ctx, l)
	got := await(t, ch, "the waiter, woken by the release")
	if got.err != nil {
		t.Fatalf("waiter: %v", got.err)
	}
	mustRelease(t, e.ctx, got.l)

	before := hooks.Load()
	la := mustAdvisory(t, e.ctx, waiter.Advisory(), lease.Key{Name: "hooked", ID: "2"})
	mustRelease(t, e.ctx, la)
	if hooks.Load() == before {
		t.Fatal("the pinned connection did not go through BeforeConnect")
	}
}

// The client checks the schema on first use: one never migrated gives a typed
// error that says what to run, instead of "relation does not exist".
func TestUnmigratedSchemaRefusedOnFirstUse(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	missing := pgtest.NewSchemaName()
	c, err := lease.New(e.db.Pool, &lease.Config{Schema: missing})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(e.ctx)
	for range 2 { // and again: a failed check is not remembered as passed
		_, err := c.TryAcquire(e.ctx, lease.Key{Name: "x", ID: "1"})
		if !errors.Is(err, lease.ErrSchemaNotMigrated) || !strings.Contains(err.Error(), "migrations.Up") ||
			!strings.Contains(err.Error(), "reaper migrate up") {
			t.Fatalf("TryAcquire on an unmigrated schema = %v, want ErrSchemaNotMigrated naming migrations.Up and reaper migrate up", err)
		}
	}
}

// A row of the client's own holder that it does not hold (here put back as a
// crash that undid a release would) must not make the client's advisory
// acquirer of that key wait for it: the heartbeat's clean-up of the row
// queues behind that very acquirer. The advisory path deletes it itself.
func TestAdvisoryAcquireDeletesOwnOrphanRow(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c, _, _ := e.client(lease.Config{PollInterval: time.Hour})
	warm := mustAcquire(t, e.ctx, c, lease.Key{Name: "warm", ID: "1"})
	for _, wait := range []bool{false, true} {
		k := lease.Key{Name: "own-orphan", ID: strconv.FormatBool(wait)}
		e.exec("INSERT INTO "+e.table("locks")+" (name, entity_id, token, holder_id) VALUES ($1, $2, nextval($3::regclass), $4)",
			k.Name, k.ID, e.table("token_seq"), warm.HolderID())
		acquire := c.Advisory().TryAcquire
		if wait {
			acquire = c.Advisory().Acquire
		}
		ctx, cancel := context.WithTimeout(e.ctx, 20*time.Second)
		l, err := acquire(ctx, k)
		cancel()
		if err != nil {
			t.Fatalf("wait=%v: advisory acquire of a key held only by our own orphan row: %v", wait, err)
		}
		if n := e.rowsOf(k, warm.HolderID()); n != 0 {
			t.Fatalf("wait=%v: %d orphan rows left", wait, n)
		}
		mustRelease(t, e.ctx, l)
	}
}
