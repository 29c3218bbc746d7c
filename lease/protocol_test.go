package lease_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
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

// The SQL protocol of README.md, run by callers that are not this package:
// psql with testdata/protocol.sql, and plain SQL over a raw connection,
// while Go clients contend for the same keys. Both log in as a role with
// only the application grant set.

func TestSQLProtocolFromPsql(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	psql := pgtest.RequireProgram(t, "psql", psqlCandidates()...)
	app := pgtest.NewRole(t, e.db.Cluster, "pglease_app")
	e.grant("application", app)
	e.exec("CREATE TABLE " + e.table("writes") + " (k text PRIMARY KEY, n bigint NOT NULL, token bigint NOT NULL)")
	e.exec("INSERT INTO " + e.table("writes") + " VALUES ('42', 0, 0)")
	e.exec("GRANT SELECT, UPDATE ON " + e.table("writes") + " TO " + pgx.Identifier{app.Name}.Sanitize())

	other, _, _ := e.clientAs(app, lease.Config{})
	held, err := other.Acquire(e.ctx, lease.Key{Name: "invoice", ID: "41"})
	if err != nil {
		t.Fatal(err)
	}
	otherID, _ := other.HolderID()
	waiter, _, _ := e.clientAs(app, lease.Config{})

	// The gate: the script holds its key until this lock is let go.
	gate := time.Now().UnixNano()
	gateConn, err := e.db.Pool.Acquire(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer gateConn.Release()
	if _, err := gateConn.Exec(e.ctx, "SELECT pg_advisory_lock($1)", gate); err != nil {
		t.Fatal(err)
	}
	gateOpen := false
	openGate := func() {
		if !gateOpen {
			gateOpen = true
			if _, err := gateConn.Exec(e.ctx, "SELECT pg_advisory_unlock($1)", gate); err != nil {
				t.Error(err)
			}
		}
	}
	defer openGate()

	cfg, err := pgx.ParseConfig(e.db.Cluster.URL())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(e.ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, psql, "-X", "-v", "ON_ERROR_STOP=1",
		"-v", "schema="+e.db.Schema, "-v", "held_name=invoice", "-v", "held_id=41",
		"-v", "key_name=invoice", "-v", "key_id=42", "-v", "data=writes", "-v", "gate="+strconv.FormatInt(gate, 10),
		"-f", filepath.Join("..", "testdata", "protocol.sql"))
	cmd.Env = append(os.Environ(), "PGHOST="+cfg.Host, "PGPORT="+strconv.Itoa(int(cfg.Port)),
		"PGDATABASE="+cfg.Database, "PGUSER="+app.Name, "PGPASSWORD="+app.Password(), "PGCONNECT_TIMEOUT=10")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	// The script holds invoice/42 and waits at the gate.
	k := lease.Key{Name: "invoice", ID: "42"}
	var psqlToken int64
	deadline := time.Now().Add(time.Minute)
	for {
		err := e.db.Pool.QueryRow(e.ctx, "SELECT token FROM "+e.table("held")+
			" WHERE name = $1 AND entity_id = $2 AND application = 'protocol.sql' AND alive", k.Name, k.ID).Scan(&psqlToken)
		if err == nil {
			break
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			t.Fatal(err)
		}
		select {
		case err := <-exited:
			t.Fatalf("psql ended before it held the key (%v):\n%s", err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("psql did not take the key within a minute:\n%s", out.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	_, err = waiter.TryAcquire(e.ctx, k)
	var le *lease.LockedError
	if !errors.As(err, &le) || le.Application != "protocol.sql" {
		t.Fatalf("TryAcquire of the key psql holds = %v, want a LockedError naming protocol.sql", err)
	}
	got := acquireInBackground(t, e.ctx, waiter, k)
	openGate()
	if err := <-exited; err != nil {
		t.Fatalf("psql: %v\n%s", err, out.String())
	}
	l := <-got
	if l == nil {
		t.FailNow()
	}
	if l.Token() <= psqlToken {
		t.Errorf("the Go waiter's token %d is not above psql's %d", l.Token(), psqlToken)
	}
	text := out.String()
	for _, want := range []string{
		fmt.Sprintf("invoice/41 is held by holder %d (%s)", otherID, other.Config().Owner.Application),
		fmt.Sprintf("acquired invoice/42 with token %d", psqlToken),
		"fenced write done", "released",
		"acquired a shared lock and an exclusive one as a set", "permit 1 of 2", "queued at place 1, then left",
		"closed",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("psql's output does not say %q:\n%s", want, text)
		}
	}
	if n := e.count("SELECT n FROM "+e.table("writes")+" WHERE k = '42' AND token = $1", psqlToken); n != 1 {
		t.Errorf("the fenced write: n = %d with psql's token, want 1", n)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("holders") + " WHERE application = 'protocol.sql'"); n != 0 {
		t.Errorf("%d holder rows of psql left after its close", n)
	}
	if err := l.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	if err := held.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks")); n != 0 {
		t.Errorf("%d lock rows left", n)
	}
}

// psqlCandidates are where Debian and PGDG put psql besides PATH.
func psqlCandidates() []string {
	m, _ := filepath.Glob("/usr/lib/postgresql/*/bin/psql")
	return m
}

// sqlProtocolWorker is a holder written against the documented SQL alone:
// it registers, then for each round acquires a key (waiting on channel()'s
// notifications, at most until the holder's expiry), does a fenced
// read-increment-write, releases, renews; and closes at the end.
type sqlProtocolWorker struct {
	e      *env
	conn   *pgx.Conn
	holder int64
	secret []byte
}

func (w *sqlProtocolWorker) q(fn string) string { return w.e.table(fn) }

func (w *sqlProtocolWorker) acquire(ctx context.Context, k lease.Key) (int64, error) {
	for {
		var acquired, busy bool
		var token *int64
		var expiresMs *int64
		err := w.conn.QueryRow(ctx, "SELECT acquired, token, busy, (extract(epoch FROM expires_in) * 1000)::bigint FROM "+
			w.q("acquire")+"($1, $2, $3, $4)", k.Name, k.ID, w.holder, w.secret).Scan(&acquired, &token, &busy, &expiresMs)
		if err != nil {
			return 0, err
		}
		if acquired {
			return *token, nil
		}
		// Wait for a release (any notification: a hint, not a promise), at
		// most until the holder's lease ends, and at most 50 ms when the key
		// was busy or the payload was for another key.
		wait := 50 * time.Millisecond
		if expiresMs != nil && time.Duration(*expiresMs)*time.Millisecond < wait {
			wait = time.Duration(*expiresMs+1) * time.Millisecond
		}
		wctx, cancel := context.WithTimeout(ctx, wait)
		_, err = w.conn.WaitForNotification(wctx)
		cancel()
		if err != nil && ctx.Err() != nil {
			return 0, ctx.Err()
		}
	}
}

func TestSQLProtocolRawContention(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	app := e.appRoleWithCounters()
	keys := []lease.Key{{Name: "acct", ID: "1"}, {Name: "acct", ID: "2"}}
	inside := map[string]*atomic.Int32{}
	for _, k := range keys {
		e.exec("INSERT INTO "+e.table("counters")+" VALUES ($1, 0, 0)", k.ID)
		inside[k.ID] = new(atomic.Int32)
	}
	var violations, completed atomic.Int64

	// section is one critical section, for Go clients and the SQL worker
	// alike: fence, read, check the token, write.
	section := func(ctx context.Context, db interface {
		Begin(context.Context) (pgx.Tx, error)
	}, k lease.Key, token int64, fence func(pgx.Tx) error) error {
		if !inside[k.ID].CompareAndSwap(0, 1) {
			violations.Add(1)
		}
		defer inside[k.ID].Store(0)
		return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
			if err := fence(tx); err != nil {
				return err
			}
			var n, last int64
			if err := tx.QueryRow(ctx, "SELECT n, last_token FROM "+e.table("counters")+" WHERE k = $1", k.ID).Scan(&n, &last); err != nil {
				return err
			}
			if last >= token {
				violations.Add(1)
				t.Errorf("token %d not above previous %d on %s", token, last, k)
			}
			_, err := tx.Exec(ctx, "UPDATE "+e.table("counters")+" SET n = $2, last_token = $3 WHERE k = $1", k.ID, n+1, token)
			if err == nil {
				completed.Add(1)
			}
			return err
		})
	}

	const rounds = 20
	var wg sync.WaitGroup
	// Go clients.
	for ci := range 3 {
		c, pool, _ := e.clientAs(app, lease.Config{})
		for g := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for r := range rounds {
					k := keys[(ci+g+r)%len(keys)]
					l, err := c.Acquire(e.ctx, k)
					if err != nil {
						t.Errorf("acquire: %v", err)
						return
					}
					if err := section(e.ctx, pool, k, l.Token(), func(tx pgx.Tx) error { return l.Fence(e.ctx, tx) }); err != nil {
						t.Errorf("section: %v", err)
					}
					if err := l.Release(e.ctx); err != nil {
						t.Errorf("release: %v", err)
					}
				}
			}()
		}
	}
	// Two SQL workers, each with a connection of its own for the protocol
	// and a pool for its writes.
	for wi := range 2 {
		cfg, err := pgx.ParseConfig(e.db.Cluster.URL())
		if err != nil {
			t.Fatal(err)
		}
		cfg.User, cfg.Password = app.Name, app.Password()
		conn, err := pgx.ConnectConfig(e.ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close(context.Background()) })
		writes := pgtest.NewPool(t, e.db.Cluster, "sql-worker", app.Connect, func(c *pgxpool.Config) { c.MaxConns = 1 })
		w := &sqlProtocolWorker{e: e, conn: conn, secret: []byte(fmt.Sprintf("secret of SQL worker %d, 32 bytes", wi))}
		if _, err := conn.Exec(e.ctx, "LISTEN "+pgx.Identifier{channelOf(t, e)}.Sanitize()); err != nil {
			t.Fatal(err)
		}
		if err := conn.QueryRow(e.ctx, "SELECT "+w.q("register")+"('sql', $1, 'sql-worker', interval '30 seconds', $2)",
			wi, w.secret).Scan(&w.holder); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				k := keys[(wi+r)%len(keys)]
				token, err := w.acquire(e.ctx, k)
				if err != nil {
					t.Errorf("SQL worker acquire: %v", err)
					return
				}
				err = section(e.ctx, writes, k, token, func(tx pgx.Tx) error {
					_, err := tx.Exec(e.ctx, "SELECT "+w.q("fence")+"($1, $2, $3)", k.Name, k.ID, token)
					return err
				})
				if err != nil {
					t.Errorf("SQL worker section: %v", err)
				}
				var released bool
				if err := conn.QueryRow(e.ctx, "SELECT "+w.q("release")+"($1, $2, $3, $4, $5)", k.Name, k.ID, token, w.holder, w.secret).Scan(&released); err != nil || !released {
					t.Errorf("SQL worker release = %v, %v", released, err)
				}
				var alive bool
				if err := conn.QueryRow(e.ctx, "SELECT alive FROM "+w.q("renew")+"($1, $2)", w.holder, w.secret).Scan(&alive); err != nil || !alive {
					t.Errorf("SQL worker renew = %v, %v", alive, err)
				}
			}
			var closed bool
			if err := conn.QueryRow(e.ctx, "SELECT "+w.q("close_holder")+"($1, $2)", w.holder, w.secret).Scan(&closed); err != nil || !closed {
				t.Errorf("SQL worker close = %v, %v", closed, err)
			}
		}()
	}
	wg.Wait()
	if v := violations.Load(); v != 0 {
		t.Fatalf("%d mutual exclusion violations", v)
	}
	const want = 3*2*rounds + 2*rounds
	if n := completed.Load(); n != want {
		t.Errorf("%d sections completed, want %d", n, want)
	}
	if n := e.count("SELECT sum(n)::int FROM " + e.table("counters")); int64(n) != completed.Load() {
		t.Errorf("counters add up to %d, completed sections %d (lost updates: two holders at once)", n, completed.Load())
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks")); n != 0 {
		t.Errorf("%d lock rows left after every release", n)
	}
}

// channelOf is the schema's notification channel, as channel() says.
func channelOf(t *testing.T, e *env) string {
	t.Helper()
	var ch string
	if err := e.db.Pool.QueryRow(e.ctx, "SELECT "+e.table("channel")+"()").Scan(&ch); err != nil {
		t.Fatal(err)
	}
	return ch
}
