package lease_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// env is one test's schema on a cluster, with helpers to make clients and run SQL.
type env struct {
	t   *testing.T
	db  *pgtest.DB
	ctx context.Context
	n   atomic.Int32
}

func newEnv(t *testing.T) *env {
	t.Helper()
	return newEnvOn(t, pgtest.Shared(t))
}

func newEnvOn(t *testing.T, c *pgtest.Cluster) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return &env{t: t, db: pgtest.NewDBOn(t, c), ctx: ctx}
}

// client returns a Client with a pool of its own, closed when the test ends.
// Its pool's application_name is returned too (for TerminateBackends).
func (e *env) client(cfg lease.Config) (*lease.Client, *pgxpool.Pool, string) {
	e.t.Helper()
	return e.clientAs(nil, cfg)
}

// clientAs is client logged in as role (nil: the test's own superuser).
func (e *env) clientAs(role *pgtest.Role, cfg lease.Config) (*lease.Client, *pgxpool.Pool, string) {
	e.t.Helper()
	app := fmt.Sprintf("%s-c%d", e.db.Schema, e.n.Add(1))
	pool := pgtest.NewPool(e.t, e.db.Cluster, app, func(c *pgxpool.Config) {
		c.MaxConns = 4
		if role != nil {
			role.Connect(c)
		}
	})
	cfg.Schema = e.db.Schema
	c, err := lease.New(pool, &cfg)
	if err != nil {
		e.t.Fatalf("lease.New: %v", err)
	}
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = c.Close(ctx)
	})
	return c, pool, app
}

// table returns the quoted, schema-qualified name of a table or function.
func (e *env) table(name string) string { return pgx.Identifier{e.db.Schema, name}.Sanitize() }

func (e *env) exec(sql string, args ...any) {
	e.t.Helper()
	if _, err := e.db.Pool.Exec(e.ctx, sql, args...); err != nil {
		e.t.Fatalf("exec %q: %v", sql, err)
	}
}

func (e *env) count(sql string, args ...any) int {
	e.t.Helper()
	var n int
	if err := e.db.Pool.QueryRow(e.ctx, sql, args...).Scan(&n); err != nil {
		e.t.Fatalf("query %q: %v", sql, err)
	}
	return n
}

// expireHolder makes a holder's lease run out now, as if its process had
// stopped renewing TTL ago.
func (e *env) expireHolder(id int64) {
	e.t.Helper()
	e.exec("UPDATE "+e.table("holders")+" SET expires_at = clock_timestamp() WHERE id = $1", id)
}

// eventually polls cond until it holds or the deadline passes. It waits on an
// observable condition, not for a guessed time.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// acquireInBackground starts c.Acquire(ctx, k) and delivers its lock (nil on
// an error, which fails the test).
func acquireInBackground(t *testing.T, ctx context.Context, c *lease.Client, k lease.Key) <-chan *lease.Lock {
	got := make(chan *lease.Lock, 1)
	go func() {
		l, err := c.Acquire(ctx, k)
		if err != nil {
			t.Errorf("waiting Acquire of %s: %v", k, err)
		}
		got <- l
	}()
	return got
}
