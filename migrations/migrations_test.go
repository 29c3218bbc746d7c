package migrations_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/fs"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

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
	c := pgtest.Shared(t)
	pool := pgtest.NewPool(t, c, "migrate-test")
	ctx := context.Background()
	for _, s := range []string{"a\x00b", string(make([]byte, 64)), "pg_mine", "\xff",
		"it's", "a$$b", "q''q", "x@guard@", `back\slash`, "$user"} {
		t.Cleanup(func() { pgtest.DropSchema(t, c, s) })
		_, err := migrations.Up(ctx, pool, s)
		if !errors.Is(err, ident.ErrInvalidSchema) || !errors.Is(err, migrations.ErrInvalidConfig) {
			t.Errorf("Up(%q) = %v, want ErrInvalidSchema and ErrInvalidConfig", s, err)
		}
		if err != nil && (strings.Contains(err.Error(), "lease:") || !strings.HasPrefix(err.Error(), "migrations: ")) {
			t.Errorf("Up(%q) = %q, want a migrations: prefix and no lease: in it", s, err)
		}
		if !utf8.ValidString(s) || strings.ContainsRune(s, 0) {
			continue // not a name PostgreSQL could store
		}
		var n int
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM pg_namespace WHERE nspname = $1", s).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 0 {
			t.Errorf("Up(%q) failed but created the schema", s)
		}
	}
	// PostgreSQL reserves only lowercase pg_.
	const upper = "PG_upper"
	t.Cleanup(func() { pgtest.DropSchema(t, c, upper) })
	if _, err := migrations.Up(ctx, pool, upper); err != nil {
		t.Errorf("Up(%q): %v", upper, err)
	}
}

func TestNilPool(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, errUp := migrations.Up(ctx, nil, "")
	_, errDown := migrations.Down(ctx, nil, "")
	_, errStatus := migrations.Status(ctx, nil, "")
	for name, err := range map[string]error{"Up": errUp, "Down": errDown, "Status": errStatus} {
		if !errors.Is(err, migrations.ErrInvalidConfig) || !strings.Contains(err.Error(), "pool is nil") {
			t.Errorf("%s(nil pool) = %v, want ErrInvalidConfig saying the pool is nil", name, err)
		}
	}
}

// released pins the content of every migration file. A released migration
// has run on databases that will never run it again: editing it changes
// nothing there and makes new schemas differ from old ones.
var released = map[string]string{
	"00001_init.sql":     "4491d4b7f1c08d10de4bd4a19f73d650599324da90bf3d7a6ae07b7a4fbd714c",
	"00002_advisory.sql": "1a888f0f4ba4a4350d8bd1e29f37e0785af8f6644019020dac695038f47410fa",
	"00003_engine.sql":   "0216d06db2a63cc3292a2d0ad7b2aa33779eab85c7662c2bd8cad91f212ec4c2",
	"00004_reap.sql":     "6de0f98bd31efb01ee53428054e064d700bcf4124a6a8d8ea11bb6e9056837d4",
	"00005_roles.sql":    "9e179b5e05d7e0d6b9ec3f8f97c121e6dfc3c1675bd9893ab752f226c34ac8fe",
	"00006_kinds.sql":    "ac6cbe0c2a2445b10d3f2d9dc34601da13994c968419dd50d36250bdabefc75c",
	"00007_handoff.sql":  "906791de5b7a50db5618a000a57496f546bb2522956c8dd132831f3ada939731",
	"00008_hotpath.sql":  "bd327c0858497f22f6f08143e7c450ca1f878e7527719e742c586d6fd5e372c0",
	"00009_adopt.sql":    "7b773d76a660f23e4c919bb4b8a795eba479ab8edfaadc72f3df878fd5ccd885",
}

func TestReleasedMigrationsUnchanged(t *testing.T) {
	t.Parallel()
	files, err := fs.Glob(migrations.FS(), "*.sql")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, name := range files {
		b, err := fs.ReadFile(migrations.FS(), name)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		got := hex.EncodeToString(sum[:])
		want, ok := released[name]
		switch {
		case !ok:
			t.Errorf("%s is not pinned: add its SHA-256 %s to released once it is released", name, got)
		case got != want:
			t.Errorf("%s changed (SHA-256 %s, released as %s): released migrations never change: add a new file", name, got, want)
		}
		seen[name] = true
	}
	for name := range released {
		if !seen[name] {
			t.Errorf("%s is gone: released migrations never change: add a new file", name)
		}
	}
}

// catalog describes every object of schema, to compare the schema before and
// after a migration and its rollback.
func catalog(t *testing.T, pool *pgxpool.Pool, schema string) string {
	t.Helper()
	var out string
	err := pool.QueryRow(context.Background(), `
		WITH n AS (SELECT oid FROM pg_namespace WHERE nspname = $1)
		SELECT string_agg(d, E'\n' ORDER BY d) FROM (
		  SELECT format('function %s(%s) %s %s %s %s', p.proname, pg_get_function_identity_arguments(p.oid),
		                pg_get_function_result(p.oid), p.provolatile, p.proconfig, md5(p.prosrc)) AS d
		    FROM pg_proc p, n WHERE p.pronamespace = n.oid
		  UNION ALL
		  SELECT format('relation %s %s', c.relname, c.relkind) FROM pg_class c, n
		   WHERE c.relnamespace = n.oid AND c.relname NOT LIKE $2
		  UNION ALL
		  SELECT format('trigger %s %s', tg.tgname, tg.tgfoid::regproc) FROM pg_trigger tg
		    JOIN pg_class c ON c.oid = tg.tgrelid JOIN n ON c.relnamespace = n.oid
		) x`, schema, migrations.VersionTable+"%").Scan(&out)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Up from 2 to the latest, Down one migration at a time back to 2 (leaving
// the schema exactly as version 2 made it), and Up again. Every function but
// the two on the advisory hot path and the procedure reap (which must be able
// to commit) has its search_path pinned, and each keeps working whatever the
// caller's is.
func TestUpDownUp(t *testing.T) {
	t.Parallel()
	c := pgtest.Shared(t)
	schema := `Up "Down" $ é`
	t.Cleanup(func() { pgtest.DropSchema(t, c, schema) })
	pool := pgtest.NewPool(t, c, "migrate-test")
	ctx := context.Background()

	if err := migrations.UpTo(ctx, pool, schema, 2); err != nil {
		t.Fatal(err)
	}
	v2 := catalog(t, pool, schema)
	if !strings.Contains(v2, "function key_hash(p_name text, p_id text) bigint s {\"search_path=") || !strings.Contains(v2, "relation locks r") {
		t.Fatalf("catalog at version 2 misses key_hash or locks:\n%s", v2)
	}
	hashV2 := keyHash(t, pool, schema, "on")
	st, err := migrations.Status(ctx, pool, schema)
	if err != nil {
		t.Fatal(err)
	}
	latest := int(st[len(st)-1].Version)
	// upFrom2 applies every migration after 2, in order.
	upFrom2 := func(when string) {
		t.Helper()
		res, err := migrations.Up(ctx, pool, schema)
		if err != nil || len(res) != len(st)-2 || int(res[0].Version) != 3 || int(res[len(res)-1].Version) != latest {
			t.Fatalf("%s = %+v, %v; want versions 3 to %d applied", when, res, err, latest)
		}
	}

	check := func(when string) {
		t.Helper()
		st, err := migrations.Status(ctx, pool, schema)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range st {
			if wantState := s.Version <= int64(latest); (s.State == migrations.StateApplied) != wantState {
				t.Fatalf("%s: %+v", when, s)
			}
		}
		var version, from int
		if err := pool.QueryRow(ctx, "SELECT version, compatible_from FROM "+pgx.Identifier{schema, "schema_info"}.Sanitize()+"()").Scan(&version, &from); err != nil {
			t.Fatalf("%s: schema_info(): %v", when, err)
		}
		if version != latest || from != 3 {
			t.Fatalf("%s: schema_info() = (%d, %d), want (%d, 3)", when, version, from, latest)
		}
		rows, err := pool.Query(ctx, `SELECT p.proname, coalesce(p.proconfig, '{}') FROM pg_proc p
			JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1`, schema)
		if err != nil {
			t.Fatal(err)
		}
		pinned := "search_path=" + pgx.Identifier{schema}.Sanitize() + ", pg_catalog, pg_temp"
		fns, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (string, error) {
			var name string
			var cfg []string
			err := r.Scan(&name, &cfg)
			unpinned := slices.Contains([]string{"advisory_acquire", "advisory_release", "reap",
				"advisory_acquire_shared", "advisory_release_shared", "key_hash"}, name)
			if has := slices.Contains(cfg, pinned); err == nil && has == unpinned {
				t.Errorf("%s: %s has settings %q: want %q exactly when not on the hot path and not reap", when, name, cfg, pinned)
			}
			return name, err
		})
		if err != nil || len(fns) < 15 {
			t.Fatalf("%s: %d functions (%v)", when, len(fns), err)
		}
		if hasReap := slices.Contains(fns, "reap_holders") && slices.Contains(fns, "reap"); hasReap != (latest >= 4) {
			t.Fatalf("%s: functions %q: want the reaping functions exactly from version 4 on", when, fns)
		}
		var again int
		if err := pool.QueryRow(ctx, "SELECT "+pgx.Identifier{schema, "pin_search_path"}.Sanitize()+"()").Scan(&again); err != nil || again != 0 {
			t.Fatalf("%s: pin_search_path() again = %d, %v; want 0: all pinned", when, again, err)
		}
		// key_hash, fixed in 3: the same value, and it works with
		// standard_conforming_strings off.
		if on, off := keyHash(t, pool, schema, "on"), keyHash(t, pool, schema, "off"); on != hashV2 || off != hashV2 {
			t.Fatalf("%s: key_hash = %d (scs on), %d (scs off), want %d as at version 2", when, on, off, hashV2)
		}
		var ch string
		if err := pool.QueryRow(ctx, "SELECT "+pgx.Identifier{schema, "channel"}.Sanitize()+"(), set_config('search_path', 'pg_catalog', false)").Scan(&ch, nil); err != nil || ch == "" {
			t.Fatalf("%s: channel() = %q, %v", when, ch, err)
		}
	}

	upFrom2("Up from 2")
	check("after Up")
	// Every Down after 2, newest first, puts the schema back as it was.
	for i := len(st) - 1; i >= 2; i-- {
		res, err := migrations.Down(ctx, pool, schema)
		if err != nil || res == nil || res.Version != st[i].Version {
			t.Fatalf("Down = %+v, %v; want version %d rolled back", res, err, st[i].Version)
		}
		if prev := int(st[i-1].Version); prev > 2 {
			var version int
			if err := pool.QueryRow(ctx, "SELECT version FROM "+pgx.Identifier{schema, "schema_info"}.Sanitize()+"()").Scan(&version); err != nil || version != prev {
				t.Fatalf("after Down to %d: schema_info() says version %d, %v", prev, version, err)
			}
		}
	}
	if got := catalog(t, pool, schema); got != v2 {
		t.Fatalf("after Down the schema differs from version 2:\n%s\nwant:\n%s", got, v2)
	}
	upFrom2("Up again")
	check("after Up, Down, Up")
}

// keyHash calls schema's key_hash on a connection of its own with
// standard_conforming_strings set to scs, and a search_path without the
// schema in it.
func keyHash(t *testing.T, pool *pgxpool.Pool, schema, scs string) int64 {
	t.Helper()
	ctx := context.Background()
	var h int64
	err := pool.AcquireFunc(ctx, func(conn *pgxpool.Conn) error {
		defer func() { _, _ = conn.Exec(ctx, "RESET ALL") }()
		if _, err := conn.Exec(ctx, "SELECT set_config('standard_conforming_strings', $1, false), set_config('search_path', 'public', false)", scs); err != nil {
			return err
		}
		return conn.QueryRow(ctx, "SELECT "+pgx.Identifier{schema, "key_hash"}.Sanitize()+"('invoice', '42')").Scan(&h)
	})
	if err != nil {
		t.Fatalf("key_hash with standard_conforming_strings %s: %v", scs, err)
	}
	return h
}
