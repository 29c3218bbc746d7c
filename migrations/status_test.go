package migrations_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/migrations"
)

// objects counts the schemas named schema and the relations in them.
func objects(t *testing.T, pool *pgxpool.Pool, schema string) (schemas, relations int) {
	t.Helper()
	err := pool.QueryRow(context.Background(), `SELECT
		(SELECT count(*) FROM pg_namespace WHERE nspname = $1),
		(SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1)`,
		schema).Scan(&schemas, &relations)
	if err != nil {
		t.Fatal(err)
	}
	return schemas, relations
}

// Status only reads: on a schema that does not exist, and on one that exists
// but was never migrated, it creates nothing, says which it is, and lists
// every migration as pending. Its pool here refuses every write, and another
// session holds the migrators' advisory lock, which Up and Down would wait
// for.
func TestStatusReadOnly(t *testing.T) {
	t.Parallel()
	c := pgtest.Shared(t)
	admin := pgtest.NewPool(t, c, "migrate-test")
	readOnly := pgtest.NewPool(t, c, "migrate-status", func(cfg *pgxpool.Config) {
		cfg.ConnConfig.RuntimeParams["default_transaction_read_only"] = "on"
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	holdLock := func(schema string) {
		conn, err := pgx.Connect(ctx, c.URL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close(context.Background()) })
		if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", migrations.LockID(schema)); err != nil {
			t.Fatal(err)
		}
	}
	allPending := func(st []migrations.MigrationStatus) bool {
		for _, s := range st {
			if s.State != migrations.StatePending || !s.AppliedAt.IsZero() {
				return false
			}
		}
		return len(st) == countFiles(t)
	}

	missing := `no "such" ` + pgtest.NewSchemaName()
	holdLock(missing)
	st, err := migrations.Status(ctx, readOnly, missing)
	var nm *migrations.NotMigratedError
	if !errors.As(err, &nm) || !errors.Is(err, migrations.ErrNotMigrated) || nm.SchemaExists || nm.Schema != missing ||
		err.Error() != `migrations: schema "no ""such"" `+strings.TrimPrefix(missing, `no "such" `)+`" does not exist` {
		t.Fatalf("Status of a missing schema: %v; want a *NotMigratedError saying it does not exist", err)
	}
	if !allPending(st) {
		t.Fatalf("Status of a missing schema = %+v; want all %d migrations pending", st, countFiles(t))
	}
	if s, r := objects(t, admin, missing); s != 0 || r != 0 {
		t.Fatalf("Status created %d schemas and %d relations", s, r)
	}

	empty := pgtest.NewSchemaName()
	t.Cleanup(func() { pgtest.DropSchema(t, c, empty) })
	if _, err := admin.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{empty}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	holdLock(empty)
	st, err = migrations.Status(ctx, readOnly, empty)
	if !errors.As(err, &nm) || !nm.SchemaExists ||
		err.Error() != `migrations: schema "`+empty+`" is not migrated (no pglease_migrations table)` {
		t.Fatalf("Status of an empty schema: %v; want a *NotMigratedError saying it has no version table", err)
	}
	if !allPending(st) {
		t.Fatalf("Status of an empty schema = %+v; want all pending", st)
	}
	if s, r := objects(t, admin, empty); s != 1 || r != 0 {
		t.Fatalf("Status of an empty schema left %d schemas and %d relations; want it as it was (1, 0)", s, r)
	}

	// Half-way: versions 1 and 2 applied, the rest pending.
	half := pgtest.NewSchemaName()
	t.Cleanup(func() { pgtest.DropSchema(t, c, half) })
	if err := migrations.UpTo(ctx, admin, half, 2); err != nil {
		t.Fatal(err)
	}
	holdLock(half)
	st, err = migrations.Status(ctx, readOnly, half)
	if err != nil || len(st) != countFiles(t) {
		t.Fatalf("Status at version 2: %+v, %v", st, err)
	}
	for _, s := range st {
		if applied := s.Version <= 2; (s.State == migrations.StateApplied) != applied || s.AppliedAt.IsZero() == applied ||
			!strings.HasSuffix(s.Path, ".sql") {
			t.Fatalf("Status at version 2: %+v", s)
		}
	}
}
