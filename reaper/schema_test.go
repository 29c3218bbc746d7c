package reaper_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/reaper"
)

// A pass checks the schema's version first: a schema without the reaping
// functions (version 3), a missing one and one that no longer serves this
// reaper fail the pass with a *SchemaError that says what was found, and
// nothing is deleted.
func TestPassNeedsSchemaVersion(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t, time.Minute)
	c := pgtest.Shared(t)
	pool := pgtest.NewPool(t, c, "reaper-test")
	if reaper.SchemaVersion != 4 {
		t.Fatalf("reaper.SchemaVersion = %d: this test is written for 4", reaper.SchemaVersion)
	}

	v3 := pgtest.NewSchemaName()
	pgtest.Migrate(t, c, v3)
	pgtest.DownTo(t, pool, v3, 3)
	db := &pgtest.DB{Cluster: c, Schema: v3, Pool: pool}
	db.AddLocks(ctx, t, db.AddHolders(ctx, t, 2, false), 3)

	newer := pgtest.NewSchemaName()
	pgtest.Migrate(t, c, newer)
	if _, err := pool.Exec(ctx, `CREATE OR REPLACE FUNCTION `+pgx.Identifier{newer, "schema_info"}.Sanitize()+
		`() RETURNS TABLE (version integer, compatible_from integer) LANGUAGE sql STABLE AS $$ SELECT 9, 5 $$`); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		schema string
		kind   error
		want   reaper.SchemaError
		says   string
	}{
		{v3, reaper.ErrNotMigrated, reaper.SchemaError{Exists: true, Have: 3, CompatibleFrom: 3},
			fmt.Sprintf(`reaper: check schema failed: schema not migrated: schema "%s" is at version 3; the reaper needs version 4 (its reaping functions): run `+"`reaper migrate up`", v3)},
		{"gone_" + v3, reaper.ErrNotMigrated, reaper.SchemaError{},
			fmt.Sprintf(`schema "gone_%s" does not exist; the reaper needs version 4`, v3)},
		{newer, reaper.ErrSchemaIncompatible, reaper.SchemaError{Exists: true, Have: 9, CompatibleFrom: 5},
			"serves clients written for version 5 or later; this reaper needs version 4: upgrade the reaper"},
	} {
		for _, dry := range []bool{false, true} {
			r, err := reaper.New(pool, &reaper.Config{Schema: tc.schema, DryRun: dry})
			if err != nil {
				t.Fatal(err)
			}
			st, err := r.RunOnce(ctx)
			var se *reaper.SchemaError
			var pe *reaper.PassError
			if !errors.Is(err, tc.kind) || !errors.Is(err, reaper.ErrPass) || !errors.As(err, &se) || !errors.As(err, &pe) ||
				pe.Step != "check schema" || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("pass on %s (dry run %v): %v; want %v saying %q", tc.schema, dry, err, tc.kind, tc.says)
			}
			tc.want.Schema, tc.want.Need, tc.want.Err = tc.schema, 4, tc.kind
			if *se != tc.want || st.Holders != 0 || st.Locks != 0 {
				t.Fatalf("pass on %s: %+v, stats %+v; want %+v and nothing done", tc.schema, *se, st, tc.want)
			}
		}
	}
	if n := db.Count(ctx, t, `SELECT count(*) FROM `+db.Qualified("locks")); n != 6 {
		t.Fatalf("%d lock rows left in the version 3 schema, want all 6", n)
	}
}
