package reaper_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglease/pglease/internal/pgtest"
)

// The schema's reaping functions called directly, as a DBA would: each call
// deletes at most its batch, live rows are never touched, the cursor of
// reap_locks walks every gone holder once, and the dry run counts what the
// calls then delete.
func TestSQLBatchSizes(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, time.Minute)
	dead := f.addHolders(ctx, 5, false)
	f.addLocks(ctx, dead[:3], 1)
	f.addLocks(ctx, dead[3:], 4)
	f.addLocks(ctx, []int64{1 << 41}, 2) // a holder row that never existed
	live := f.addHolders(ctx, 2, true)
	f.addLocks(ctx, live, 3)
	liveSum := `SELECT count(*) * 1000000007 + coalesce(sum(token), 0) FROM ` + f.locks + ` WHERE holder_id = ANY ($1)`
	before := f.count(ctx, liveSum, live)

	var dryHolders, dryLocks int64
	if err := f.Pool.QueryRow(ctx, `SELECT holders, locks FROM `+f.fn("reap_dry_run")+`()`).Scan(&dryHolders, &dryLocks); err != nil {
		t.Fatal(err)
	}
	if dryHolders != 5 || dryLocks != 13 {
		t.Fatalf("reap_dry_run() = (%d, %d), want (5, 13)", dryHolders, dryLocks)
	}

	var got []int
	for range 10 {
		var n int
		if err := f.Pool.QueryRow(ctx, `SELECT `+f.fn("reap_holders")+`(2)`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		got = append(got, n)
		if n < 2 {
			break
		}
	}
	if len(got) != 3 || got[0] != 2 || got[1] != 2 || got[2] != 1 {
		t.Fatalf("reap_holders(2) deleted %v in turn, want [2 2 1]", got)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.holders); n != 2 {
		t.Fatalf("%d holder rows left, want the 2 live ones", n)
	}

	got = nil
	var from *int64
	for range 10 {
		var n int
		var skipped int64
		left := f.count(ctx, `SELECT count(*) FROM `+f.locks)
		if err := f.Pool.QueryRow(ctx, `SELECT deleted, skipped, next_from FROM `+f.fn("reap_locks")+`(3, $1)`, from).
			Scan(&n, &skipped, &from); err != nil {
			t.Fatal(err)
		}
		if now := f.count(ctx, `SELECT count(*) FROM `+f.locks); now != left-int64(n) || skipped != 0 {
			t.Fatalf("reap_locks(3) said %d deleted, %d skipped; the rows went from %d to %d", n, skipped, left, now)
		}
		got = append(got, n)
		if from == nil {
			break
		}
	}
	if len(got) != 5 || got[0] != 3 || got[1] != 3 || got[2] != 3 || got[3] != 3 || got[4] != 1 {
		t.Fatalf("reap_locks(3) deleted %v in turn, want [3 3 3 3 1] and then no next_from", got)
	}
	if after := f.count(ctx, liveSum, live); after != before || f.count(ctx, `SELECT count(*) FROM `+f.locks) != 6 {
		t.Fatalf("live lock rows changed: checksum %d before, %d after", before, after)
	}
	if err := f.Pool.QueryRow(ctx, `SELECT holders, locks FROM `+f.fn("reap_dry_run")+`()`).Scan(&dryHolders, &dryLocks); err != nil {
		t.Fatal(err)
	}
	if dryHolders != 0 || dryLocks != 0 {
		t.Fatalf("reap_dry_run() after the reap = (%d, %d), want (0, 0)", dryHolders, dryLocks)
	}
}

// A lock row that a fenced transaction holds (FOR SHARE) is skipped at once
// by reap_locks and by the procedure reap, counted as skipped, and deleted
// once that transaction has ended.
func TestSQLFencedRowIsSkipped(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, time.Minute)
	h := f.addHolders(ctx, 1, true)[0]
	f.addLocks(ctx, []int64{h}, 3)
	tx, name, id := f.fenceFirst(ctx, "fence")
	f.expire(ctx, h)

	// A call that waited for the fenced row would run into this lock_timeout.
	conn, err := pgx.Connect(ctx, f.Cluster.URL()+"&options=-c%20lock_timeout%3D2s")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var holders, deleted int
	var skipped int64
	var from *int64
	if err := conn.QueryRow(ctx, `SELECT `+f.fn("reap_holders")+`(10)`).Scan(&holders); err != nil || holders != 1 {
		t.Fatalf("reap_holders(10) = %d, %v; want 1", holders, err)
	}
	if err := conn.QueryRow(ctx, `SELECT deleted, skipped, next_from FROM `+f.fn("reap_locks")+`(10)`).Scan(&deleted, &skipped, &from); err != nil {
		t.Fatalf("reap_locks next to a fenced row: %v", err)
	}
	if deleted != 2 || skipped != 1 || from != nil {
		t.Fatalf("reap_locks(10) = (%d, %d, %v), want (2, 1, NULL)", deleted, skipped, from)
	}
	var st [3]int64
	if err := conn.QueryRow(ctx, `CALL `+f.fn("reap")+`()`).Scan(&st[0], &st[1], &st[2]); err != nil || st != [3]int64{0, 0, 1} {
		t.Fatalf("CALL reap() next to a fenced row = %v, %v; want 0 holders, 0 locks, 1 skipped", st, err)
	}
	var n int
	if err := tx.QueryRow(ctx, `SELECT count(*) FROM `+f.locks+` WHERE name = $1 AND entity_id = $2`, name, id).Scan(&n); err != nil || n != 1 {
		t.Fatalf("fenced row inside the open transaction: %d rows, %v", n, err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(ctx, `CALL `+f.fn("reap")+`()`).Scan(&st[0], &st[1], &st[2]); err != nil || st != [3]int64{0, 1, 0} {
		t.Fatalf("CALL reap() after the fence ended = %v, %v; want 1 lock, 0 skipped", st, err)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.locks); n != 0 {
		t.Fatalf("%d lock rows left", n)
	}
}

// A batch size out of range (0, negative, NULL, above 100000) and a lock
// timeout that is not positive are refused with SQLSTATE 22023 and a hint,
// before anything is deleted.
func TestSQLBadArguments(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, time.Minute)
	f.addLocks(ctx, f.addHolders(ctx, 2, false), 2)
	f.addLocks(ctx, []int64{1 << 42}, 2)
	for _, tc := range []struct{ sql, want string }{
		{`SELECT ` + f.fn("reap_holders") + `(0)`, "batch size 0 is out of range"},
		{`SELECT ` + f.fn("reap_holders") + `(-1)`, "batch size -1 is out of range"},
		{`SELECT ` + f.fn("reap_holders") + `(NULL)`, "batch size NULL is out of range"},
		{`SELECT ` + f.fn("reap_holders") + `(100001)`, "batch size 100001 is out of range"},
		{`SELECT * FROM ` + f.fn("reap_locks") + `(0)`, "batch size 0 is out of range"},
		{`SELECT * FROM ` + f.fn("reap_locks") + `(-5, 10)`, "batch size -5 is out of range"},
		{`CALL ` + f.fn("reap") + `(0)`, "batch size 0 is out of range"},
		{`CALL ` + f.fn("reap") + `(p_batch => -1)`, "batch size -1 is out of range"},
		{`CALL ` + f.fn("reap") + `(p_lock_timeout => '-1 second')`, "lock timeout -00:00:01 is not positive"},
		{`CALL ` + f.fn("reap") + `(p_lock_timeout => '0')`, "lock timeout 00:00:00 is not positive"},
	} {
		_, err := f.Pool.Exec(ctx, tc.sql)
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "22023" || !strings.Contains(pgErr.Message, tc.want) || pgErr.Hint == "" {
			t.Errorf("%s: %v; want SQLSTATE 22023 saying %q, with a hint", tc.sql, err, tc.want)
		}
	}
	if h, l := f.count(ctx, `SELECT count(*) FROM `+f.holders), f.count(ctx, `SELECT count(*) FROM `+f.locks); h != 2 || l != 6 {
		t.Fatalf("refused calls deleted rows: %d holders, %d locks left of 2 and 6", h, l)
	}
}

// The procedure reap commits after each batch: a batch that fails (here it
// waits longer than p_lock_timeout for a table lock) keeps the batches
// before it. Inside a transaction block it cannot commit, and fails before
// deleting anything. Its body names every object itself, so it works
// whatever the caller's search_path, on an odd schema name too.
func TestSQLReapProcedure(t *testing.T) {
	t.Parallel()
	c := pgtest.Shared(t)
	schema := `Odd "%s" $ ` + pgtest.NewSchemaName()
	pgtest.Migrate(t, c, schema)
	db := &pgtest.DB{Cluster: c, Schema: schema, Pool: pgtest.NewPool(t, c, "reaper-test")}
	f := &fx{DB: db, holders: db.Qualified("holders"), locks: db.Qualified("locks"), t: t}
	ctx := ctxFor(t, time.Minute)
	f.addLocks(ctx, f.addHolders(ctx, 2, false), 2)
	live := f.addHolders(ctx, 1, true)
	f.addLocks(ctx, live, 1)
	call := `CALL ` + f.fn("reap") + `(p_batch => 1, p_lock_timeout => '200 milliseconds')`

	tx, err := f.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	if _, err := tx.Exec(ctx, `LOCK TABLE `+f.locks+` IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, f.Cluster.URL()+"&search_path=pg_catalog")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, call)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "55P03" {
		t.Fatalf("reap behind an exclusive lock on locks: %v; want lock_timeout (55P03)", err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	// Both holder batches committed before the lock rows' batch failed.
	if h, l := f.count(ctx, `SELECT count(*) FROM `+f.holders), f.count(ctx, `SELECT count(*) FROM `+f.locks); h != 1 || l != 5 {
		t.Fatalf("after the failed reap: %d holders, %d locks; want 1 (the live one) and 5", h, l)
	}

	// In a transaction block: refused at the first COMMIT, nothing deleted.
	f.addHolders(ctx, 1, false)
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, call)
		return err
	})
	if !errors.As(err, &pgErr) || pgErr.Code != "2D000" {
		t.Fatalf("reap inside a transaction block: %v; want invalid transaction termination (2D000)", err)
	}
	// Several statements in one string (as pg_cron sends a job's command)
	// run as one implicit transaction block: refused the same way.
	_, err = conn.PgConn().Exec(ctx, "SET application_name = 'reaper-test'; "+call).ReadAll()
	if !errors.As(err, &pgErr) || pgErr.Code != "2D000" {
		t.Fatalf("reap after another statement in the same string: %v; want invalid transaction termination (2D000)", err)
	}
	if h := f.count(ctx, `SELECT count(*) FROM `+f.holders); h != 2 {
		t.Fatalf("reap inside a transaction block left %d holders, want both", h)
	}

	var st [3]int64
	if err := conn.QueryRow(ctx, call).Scan(&st[0], &st[1], &st[2]); err != nil || st != [3]int64{1, 4, 0} {
		t.Fatalf("reap = %v, %v; want 1 holder, 4 locks, 0 skipped", st, err)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.locks+` WHERE holder_id = $1`, live[0]); n != 1 || f.count(ctx, `SELECT count(*) FROM `+f.locks) != 1 {
		t.Fatalf("live lock rows left: %d, want 1 and nothing else", n)
	}
}

// Why reap has no pinned search_path and is not SECURITY DEFINER: PostgreSQL
// refuses COMMIT in a procedure that has either. A later migration that gave
// it one would break every CALL, and this test says so.
func TestSQLReapCannotCommitWithSetOrDefiner(t *testing.T) {
	t.Parallel()
	for _, alter := range []string{"SET search_path = pg_catalog", "SECURITY DEFINER"} {
		t.Run(alter, func(t *testing.T) {
			t.Parallel()
			f := newFx(t)
			ctx := ctxFor(t, time.Minute)
			f.addHolders(ctx, 1, false)
			var config []string
			var definer bool
			if err := f.Pool.QueryRow(ctx, `SELECT coalesce(proconfig, '{}'), prosecdef FROM pg_proc WHERE oid = $1::regprocedure`,
				f.fn("reap")+"(integer, interval, bigint, bigint, bigint)").Scan(&config, &definer); err != nil {
				t.Fatal(err)
			}
			if len(config) != 0 || definer {
				t.Fatalf("reap has settings %q, SECURITY DEFINER %v; want neither", config, definer)
			}
			if _, err := f.Pool.Exec(ctx, `ALTER PROCEDURE `+f.fn("reap")+`(integer, interval, bigint, bigint, bigint) `+alter); err != nil {
				t.Fatal(err)
			}
			_, err := f.Pool.Exec(ctx, `CALL `+f.fn("reap")+`()`)
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "2D000" {
				t.Fatalf("CALL reap() with %s: %v; want invalid transaction termination (2D000)", alter, err)
			}
			if n := f.count(ctx, `SELECT count(*) FROM `+f.holders); n != 1 {
				t.Fatalf("%d holder rows left, want the dead one: the failed CALL must delete nothing", n)
			}
		})
	}
}
