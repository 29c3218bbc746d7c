package ident_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/fuzzseed"
	"github.com/pglease/pglease/internal/ident"
	"github.com/pglease/pglease/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// FuzzValidateSchema checks that ValidateSchema accepts exactly the names its
// documentation allows, and that a name it accepts is usable as given:
// creating it quoted, a table in it, and dropping it work, and PostgreSQL
// stores the very same bytes (no truncation, nothing dropped). The DDL runs
// in a transaction that is rolled back, so the shared cluster is left as it
// was. Seeds: testdata/fuzz/FuzzValidateSchema at the repository root.
func FuzzValidateSchema(f *testing.F) {
	fuzzseed.Add(f, "../../testdata/fuzz/FuzzValidateSchema")
	pool := pgtest.NewPool(f, pgtest.Shared(f), "fuzz-ident", func(c *pgxpool.Config) { c.MaxConns = 2 })

	f.Fuzz(func(t *testing.T, s string) {
		err := ident.ValidateSchema(s)
		want := s != "" && len(s) <= ident.MaxIdentifierBytes && utf8.ValidString(s) &&
			!strings.ContainsRune(s, 0) && !strings.HasPrefix(strings.ToLower(s), "pg_")
		if (err == nil) != want {
			t.Fatalf("ValidateSchema(%q) = %v, want valid=%v", s, err, want)
		}
		if err != nil {
			if !errors.Is(err, ident.ErrInvalidSchema) {
				t.Fatalf("ValidateSchema(%q) = %v, not matching ErrInvalidSchema", s, err)
			}
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = tx.Rollback(context.Background()) }()
		q := pgx.Identifier{s}.Sanitize()
		if _, err := tx.Exec(ctx, "CREATE SCHEMA "+q); err != nil {
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && pgErr.Code == "42P06" {
				return // it exists already (public, information_schema): usable
			}
			t.Fatalf("CREATE SCHEMA %s: %v", q, err)
		}
		var n int
		if err := tx.QueryRow(ctx, "SELECT count(*) FROM pg_namespace WHERE nspname = $1", s).Scan(&n); err != nil || n != 1 {
			t.Fatalf("schema %q not found by its exact name after CREATE SCHEMA %s (%d found, %v)", s, q, n, err)
		}
		if _, err := tx.Exec(ctx, "CREATE TABLE "+pgx.Identifier{s, "t"}.Sanitize()+" (x int)"); err != nil {
			t.Fatalf("CREATE TABLE in %s: %v", q, err)
		}
		if _, err := tx.Exec(ctx, "DROP SCHEMA "+q+" CASCADE"); err != nil {
			t.Fatalf("DROP SCHEMA %s: %v", q, err)
		}
	})
}
