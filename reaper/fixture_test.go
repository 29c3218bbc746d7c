package reaper_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/reaper"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// fx is a migrated schema with its table names quoted once.
type fx struct {
	*pgtest.DB
	holders, locks string
	t              testing.TB
}

func newFx(t testing.TB) *fx {
	t.Helper()
	db := pgtest.NewDB(t)
	return &fx{DB: db, holders: db.Qualified("holders"), locks: db.Qualified("locks"), t: t}
}

// fn returns the schema-qualified name of one of the schema's functions.
func (f *fx) fn(name string) string { return f.Qualified(name) }

func ctxFor(t testing.TB, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// addHolders inserts n holders, alive for an hour or dead for an hour, and
// returns their ids.
func (f *fx) addHolders(ctx context.Context, n int, alive bool) []int64 {
	f.t.Helper()
	return f.AddHolders(ctx, f.t, n, alive)
}

// addLocks inserts per lock rows for each holder id (which need not exist).
func (f *fx) addLocks(ctx context.Context, holderIDs []int64, per int) {
	f.t.Helper()
	f.AddLocks(ctx, f.t, holderIDs, per)
}

// expire makes a holder dead now.
func (f *fx) expire(ctx context.Context, id int64) {
	f.t.Helper()
	if _, err := f.Pool.Exec(ctx, `UPDATE `+f.holders+` SET expires_at = clock_timestamp() - interval '1 second' WHERE id = $1`, id); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fx) count(ctx context.Context, query string, args ...any) int64 {
	f.t.Helper()
	return f.Count(ctx, f.t, query, args...)
}

// listen returns a connection that listens on the schema's notification
// channel, closed when the test ends.
func (f *fx) listen(ctx context.Context) *pgx.Conn {
	f.t.Helper()
	conn, err := pgx.Connect(ctx, f.Cluster.URL())
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { _ = conn.Close(context.Background()) })
	var channel string
	if err := conn.QueryRow(ctx, `SELECT `+f.fn("channel")+`()`).Scan(&channel); err != nil {
		f.t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
		f.t.Fatal(err)
	}
	// As a hand-written listener must (schema version 7): deletes are
	// announced on channel() only while some session holds the listener lock.
	if _, err := conn.Exec(ctx, `SELECT `+f.fn("mark_listening")+`()`); err != nil {
		f.t.Fatal(err)
	}
	return conn
}

// deadLocks counts lock rows whose holder is gone or expired.
func (f *fx) deadLocks(ctx context.Context) int64 {
	return f.count(ctx, `SELECT count(*) FROM `+f.locks+` l WHERE NOT EXISTS
		(SELECT 1 FROM `+f.holders+` h WHERE h.id = l.holder_id AND h.expires_at > clock_timestamp())`)
}

func (f *fx) deadHolders(ctx context.Context) int64 {
	return f.count(ctx, `SELECT count(*) FROM `+f.holders+` WHERE expires_at <= clock_timestamp()`)
}

func (f *fx) reaper(pool *pgxpool.Pool, cfg reaper.Config) *reaper.Reaper {
	f.t.Helper()
	cfg.Schema = f.Schema
	if pool == nil {
		pool = f.Pool
	}
	r, err := reaper.New(pool, &cfg)
	if err != nil {
		f.t.Fatal(err)
	}
	return r
}

// pass returns one reaping pass on pool in batches of batch rows: the reaper
// package's RunOnce when how is "reaper"; when it is "sql", a CALL of the
// schema's procedure reap, as a DBA or pg_cron runs it, with what it returns
// as Stats.
func (f *fx) pass(how string, pool *pgxpool.Pool, batch int) func(context.Context) (reaper.Stats, error) {
	f.t.Helper()
	switch how {
	case "reaper":
		return f.reaper(pool, reaper.Config{BatchSize: batch}).RunOnce
	case "sql":
		call := `CALL ` + f.fn("reap") + `(p_batch => $1)`
		return func(ctx context.Context) (reaper.Stats, error) {
			start := time.Now()
			var st reaper.Stats
			err := pool.QueryRow(ctx, call, batch).Scan(&st.Holders, &st.Locks, &st.Skipped)
			st.Duration = time.Since(start)
			return st, err
		}
	}
	f.t.Fatalf("pass %q: want reaper or sql", how)
	return nil
}

// fenceFirst locks the lock row with the lowest token in a transaction of its
// own, as a fenced write does: through the schema's fence() when how is
// "fence", by a plain SELECT ... FOR SHARE otherwise. It returns that
// transaction, rolled back when the test ends unless committed, and the row's
// name and entity id.
func (f *fx) fenceFirst(ctx context.Context, how string) (tx pgx.Tx, name, id string) {
	f.t.Helper()
	var token int64
	if err := f.Pool.QueryRow(ctx, `SELECT name, entity_id, token FROM `+f.locks+` ORDER BY token LIMIT 1`).Scan(&name, &id, &token); err != nil {
		f.t.Fatal(err)
	}
	tx, err := f.Pool.Begin(ctx)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { _ = tx.Rollback(context.Background()) })
	if how == "fence" {
		_, err = tx.Exec(ctx, `SELECT `+f.fn("fence")+`($1, $2, $3)`, name, id, token)
	} else {
		_, err = tx.Exec(ctx, `SELECT 1 FROM `+f.locks+` WHERE name = $1 AND entity_id = $2 FOR SHARE`, name, id)
	}
	if err != nil {
		f.t.Fatal(err)
	}
	return tx, name, id
}
