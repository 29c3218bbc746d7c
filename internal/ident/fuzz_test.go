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

// validByDoc is ValidateSchema's documented rule, written out again so that
// the fuzzer notices when the code drifts from it.
func validByDoc(s string) bool {
	return s != "" && len(s) <= ident.MaxIdentifierBytes && utf8.ValidString(s) &&
		!strings.ContainsRune(s, 0) && !strings.HasPrefix(s, "pg_") && s != "$user" &&
		!strings.ContainsAny(s, `'\`) && !strings.Contains(s, "$$") &&
		!strings.Contains(s, "@guard@") && !strings.Contains(s, "@listener@") && !strings.Contains(s, "@channel@")
}

// migration00002Like creates, in the schema that search_path names, the
// function probe_{suffix} ({suffix} replaced by the caller) the way the
// released migration 00002 creates advisory_acquire and advisory_release:
// the quoted schema name pasted into a string literal and a dollar-quoted
// body, then the placeholders @guard@, @listener@ and @channel@ replaced, in
// that order. The function returns what those pasted names resolve to, so a
// caller can compare it with what they should be (see want00002). Its
// search_path is pinned as 00003's pin_search_path does it.
const migration00002Like = `
DO $gen$
DECLARE
    s text := quote_ident(current_schema());
BEGIN
    EXECUTE replace(replace(replace(replace($f$
CREATE FUNCTION @schema@.probe_{suffix}() RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    RETURN pg_catalog.concat_ws('|', '@schema@.token_seq'::regclass::oid::text, '@guard@', @listener@,
                                '@channel@', pg_catalog.current_schema());
END
$$
$f$, '@schema@', s), '@guard@', 'pglease.guard_' || md5(current_schema())),
        '@listener@', quote_literal(current_schema())), '@channel@', 'pglease_' || md5(current_schema()));
    EXECUTE format('ALTER FUNCTION %I.probe_{suffix}() SET search_path = %I, pg_catalog, pg_temp',
                   current_schema(), current_schema());
END
$gen$`

// want00002 is what probe_* must return for the schema $1.
const want00002 = `
SELECT concat_ws('|', (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = $1 AND c.relname = 'token_seq')::text,
                 'pglease.guard_' || md5($1), $1, 'pglease_' || md5($1), $1)`

// FuzzValidateSchema checks that ValidateSchema accepts exactly the names its
// documentation allows, and that a name it accepts is usable as given:
// creating it quoted, a table in it, and dropping it work, PostgreSQL stores
// the very same bytes (no truncation, nothing dropped), search_path set to it
// names it, and SQL built from it the way the released migration 00002
// builds its advisory functions resolves to this schema's own objects, also
// in a session with standard_conforming_strings off. The DDL runs in a
// transaction that is rolled back, so the shared cluster is left as it was.
// Seeds: testdata/fuzz/FuzzValidateSchema at the repository root.
func FuzzValidateSchema(f *testing.F) {
	fuzzseed.Add(f, "../../testdata/fuzz/FuzzValidateSchema")
	pool := pgtest.NewPool(f, pgtest.Shared(f), "fuzz-ident", func(c *pgxpool.Config) { c.MaxConns = 2 })

	f.Fuzz(func(t *testing.T, s string) {
		err := ident.ValidateSchema(s)
		if want := validByDoc(s); (err == nil) != want {
			t.Fatalf("ValidateSchema(%q) = %v, want valid=%v", s, err, want)
		}
		if err != nil {
			if !errors.Is(err, ident.ErrInvalidSchema) {
				t.Fatalf("ValidateSchema(%q) = %v, not matching ErrInvalidSchema", s, err)
			}
			if strings.Contains(err.Error(), "lease:") {
				t.Fatalf("ValidateSchema(%q) = %v: the caller adds its own prefix", s, err)
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

		// The migrations run with search_path set to the quoted name.
		var cur *string
		if err := tx.QueryRow(ctx, "SELECT set_config('search_path', quote_ident($1), true), current_schema()", s).Scan(nil, &cur); err != nil {
			t.Fatal(err)
		}
		if cur == nil || *cur != s {
			t.Fatalf("search_path = quote_ident(%q): current_schema() = %v, want the schema itself", s, cur)
		}
		if _, err := tx.Exec(ctx, "CREATE SEQUENCE token_seq"); err != nil {
			t.Fatal(err)
		}
		var want string
		if err := tx.QueryRow(ctx, want00002, s).Scan(&want); err != nil {
			t.Fatal(err)
		}
		for _, suffix := range []string{"on", "off"} {
			if _, err := tx.Exec(ctx, strings.ReplaceAll(migration00002Like, "{suffix}", suffix)); err != nil {
				t.Fatalf("schema %q: creating a function the way migration 00002 does: %v", s, err)
			}
		}
		call := func(suffix string) {
			var got string
			if err := tx.QueryRow(ctx, "SELECT "+pgx.Identifier{s, "probe_" + suffix}.Sanitize()+"()").Scan(&got); err != nil {
				t.Fatalf("schema %q: probe_%s(): %v", s, suffix, err)
			}
			if got != want {
				t.Fatalf("schema %q: names built as migration 00002 builds them resolve to %q, want %q (standard_conforming_strings %s)",
					s, got, want, suffix)
			}
		}
		call("on")
		// A function body is parsed by the calling session, with its settings.
		if _, err := tx.Exec(ctx, "SET LOCAL standard_conforming_strings = off"); err == nil {
			call("off")
		}
		if _, err := tx.Exec(ctx, "DROP SCHEMA "+q+" CASCADE"); err != nil {
			t.Fatalf("DROP SCHEMA %s: %v", q, err)
		}
	})
}
