package lease

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/internal/schemaver"
	"github.com/pglease/pglease/migrations"
)

func TestSchemaVersionTable(t *testing.T) {
	if schemaver.VersionTable != migrations.VersionTable {
		t.Fatalf("schemaver.VersionTable = %q, migrations.VersionTable = %q", schemaver.VersionTable, migrations.VersionTable)
	}
}

func TestCheckSchema(t *testing.T) {
	t.Parallel()
	c := pgtest.Shared(t)
	pool := pgtest.NewPool(t, c, "schema-check")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// setInfo makes schema_info of schema return (version, from), as a later
	// migration would.
	setInfo := func(t *testing.T, schema string, version, from int) {
		t.Helper()
		sql := fmt.Sprintf(`CREATE OR REPLACE FUNCTION %s() RETURNS TABLE (version integer, compatible_from integer)
			LANGUAGE sql STABLE AS $$ SELECT %d, %d $$`, pgx.Identifier{schema, "schema_info"}.Sanitize(), version, from)
		if _, err := pool.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	const upHint = "run migrations.Up or `reaper migrate up`"
	v := SchemaVersion
	needs := fmt.Sprintf("needs version %d", v)
	cases := []struct {
		name    string
		schema  string
		prepare func(t *testing.T, schema string)
		want    error // nil: accepted
		exists  bool
		have    int
		from    int
		says    []string
	}{
		{
			name:   "missing",
			schema: `missing "schema" ` + pgtest.NewSchemaName(),
			want:   ErrSchemaNotMigrated,
			says:   []string{"does not exist", needs, upHint},
		},
		{
			name:    "empty",
			prepare: func(t *testing.T, schema string) { createSchema(t, c, schema) },
			want:    ErrSchemaNotMigrated, exists: true,
			says: []string{"version unknown", needs, upHint},
		},
		{
			name: "one version older",
			prepare: func(t *testing.T, schema string) {
				// Down to the version before this client's (the latest
				// migration may be newer than the client needs).
				pgtest.Migrate(t, c, schema)
				pgtest.DownTo(t, pool, schema, int64(v-1))
			},
			want: ErrSchemaNotMigrated, exists: true, have: v - 1, from: 3,
			says: []string{fmt.Sprintf("at version %d", v-1), needs, upHint},
		},
		{
			name:    "current",
			prepare: func(t *testing.T, schema string) { pgtest.Migrate(t, c, schema) },
		},
		{
			name: "newer, compatible",
			prepare: func(t *testing.T, schema string) {
				pgtest.Migrate(t, c, schema)
				setInfo(t, schema, v+1, v)
			},
		},
		{
			name: "newer, incompatible",
			prepare: func(t *testing.T, schema string) {
				pgtest.Migrate(t, c, schema)
				setInfo(t, schema, v+2, v+1)
			},
			want: ErrSchemaIncompatible, exists: true, have: v + 2, from: v + 1,
			says: []string{fmt.Sprintf("at version %d", v+2), fmt.Sprintf("version %d or later", v+1),
				fmt.Sprintf("written for version %d", v), "upgrade the client",
				"migrations.Up", "`reaper migrate up`"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			schema := tc.schema
			if schema == "" {
				schema = pgtest.NewSchemaName()
			}
			if tc.prepare != nil {
				tc.prepare(t, schema)
			}
			err := checkSchema(ctx, pool, schema)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("checkSchema = %v, want nil", err)
				}
				return
			}
			var se *SchemaError
			if !errors.Is(err, tc.want) || !errors.As(err, &se) {
				t.Fatalf("checkSchema = %v, want a *SchemaError matching %v", err, tc.want)
			}
			other := ErrSchemaIncompatible
			if tc.want == ErrSchemaIncompatible {
				other = ErrSchemaNotMigrated
			}
			if errors.Is(err, other) {
				t.Errorf("checkSchema = %v also matches %v", err, other)
			}
			want := SchemaError{Schema: schema, Exists: tc.exists, Have: tc.have, CompatibleFrom: tc.from, Need: SchemaVersion, Err: tc.want}
			if *se != want {
				t.Errorf("checkSchema = %+v, want %+v", *se, want)
			}
			msg := err.Error()
			for _, s := range append(tc.says, pgx.Identifier{schema}.Sanitize(), tc.want.Error()) {
				if !strings.Contains(msg, s) {
					t.Errorf("checkSchema: %q does not say %q", msg, s)
				}
			}
		})
	}
}

func createSchema(t *testing.T, c *pgtest.Cluster, schema string) {
	t.Helper()
	pool := pgtest.NewPool(t, c, "schema-check")
	if _, err := pool.Exec(context.Background(), "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pgtest.DropSchema(t, c, schema) })
}
