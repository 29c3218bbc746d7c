package migrations_test

import (
	"context"
	"errors"
	"io/fs"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/ident"
	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/migrations"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// Eight processes starting at once must migrate exactly once and all succeed.
func TestUpConcurrent(t *testing.T) {
	t.Parallel()
	c := pgtest.Shared(t)
	schema := pgtest.NewSchemaName()
	t.Cleanup(func() { pgtest.DropSchema(t, c, schema) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	var wg sync.WaitGroup
	applied := make([]int, 8)
	errs := make([]error, 8)
	for i := range 8 {
		pool := pgtest.NewPool(t, c, "migrate-test")
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := migrations.Up(ctx, pool, schema)
			applied[i], errs[i] = len(res), err
		}()
	}
	wg.Wait()
	total := 0
	for i := range 8 {
		if errs[i] != nil {
			t.Fatalf("Up #%d: %v", i, errs[i])
		}
		total += applied[i]
	}
	if want := countFiles(t); total != want {
		t.Fatalf("migrations applied across 8 callers = %d, want %d (each exactly once)", total, want)
	}

	pool := pgtest.NewPool(t, c, "migrate-test")
	var rows int
	err := pool.QueryRow(ctx, "SELECT count(*) FROM "+pgx.Identifier{schema, migrations.VersionTable}.Sanitize()+" WHERE version_id > 0").Scan(&rows)
	if err != nil {
		t.Fatal(err)
	}
	if rows != countFiles(t) {
		t.Fatalf("version rows = %d, want %d", rows, countFiles(t))
	}
	// The application's own goose table is untouched.
	var exists bool
	if err := pool.QueryRow(ctx, "SELECT to_regclass('public.goose_db_version') IS NOT NULL").Scan(&exists); err != nil {
		t.Fatal(err)
	}
	if exists {
		t.Fatal("migrations created public.goose_db_version")
	}
}

func countFiles(t *testing.T) int {
	files, err := fs.Glob(migrations.FS(), "*.sql")
	if err != nil || len(files) == 0 {
		t.Fatalf("embedded migrations: %v, %d files", err, len(files))
	}
	return len(files)
}

func TestStatusAndDown(t *testing.T) {
	t.Parallel()
	c := pgtest.Shared(t)
	schema := `odd "schema" name`
	t.Cleanup(func() { pgtest.DropSchema(t, c, schema) })
	pool := pgtest.NewPool(t, c, "migrate-test")
	ctx := context.Background()

	if _, err := migrations.Up(ctx, pool, schema); err != nil {
		t.Fatal(err)
	}
	st, err := migrations.Status(ctx, pool, schema)
	if err != nil {
		t.Fatal(err)
	}
	if len(st) == 0 {
		t.Fatal("no migrations reported")
	}
	for _, s := range st {
		if s.State != migrations.StateApplied || s.AppliedAt.IsZero() {
			t.Fatalf("after Up: %+v", s)
		}
	}
	// The functions work whatever the caller's search_path.
	var h int64
	if err := pool.QueryRow(ctx, "SELECT "+pgx.Identifier{schema, "key_hash"}.Sanitize()+"('a','b')").Scan(&h); err != nil {
		t.Fatal(err)
	}
	for range st {
		if _, err := migrations.Down(ctx, pool, schema); err != nil {
			t.Fatal(err)
		}
	}
	var left int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname <> $2 AND c.relname NOT LIKE $3",
		schema, migrations.VersionTable, migrations.VersionTable+"%").Scan(&left); err != nil {
		t.Fatal(err)
	}
	if left != 0 {
		t.Fatalf("%d relations left after rolling every migration back", left)
	}
}

func TestBadSchema(t *testing.T) {
	t.Parallel()
	pool := pgtest.NewPool(t, pgtest.Shared(t), "migrate-test")
	for _, s := range []string{"a\x00b", string(make([]byte, 64)), "pg_mine", "\xff"} {
		_, err := migrations.Up(context.Background(), pool, s)
		if !errors.Is(err, ident.ErrInvalidSchema) {
			t.Errorf("Up(%q) = %v, want ErrInvalidSchema", s, err)
		}
	}
}
