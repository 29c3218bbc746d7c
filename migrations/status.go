package migrations

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ErrNotMigrated is matched by the error of Status for a schema that does
// not exist, or that exists but has no version table (pglease_migrations):
// no migration has been applied to it. That error is a *NotMigratedError.
var ErrNotMigrated = errors.New("migrations: schema not migrated")

// NotMigratedError says that no migration has been applied to Schema,
// because it does not exist or has no version table. Status returns it
// together with every migration, each pending.
type NotMigratedError struct {
	// Schema is the schema name that Status was asked about.
	Schema string
	// SchemaExists is false when the schema does not exist, true when it
	// exists but has no version table.
	SchemaExists bool
}

func (e *NotMigratedError) Error() string {
	q := pgx.Identifier{e.Schema}.Sanitize()
	if !e.SchemaExists {
		return fmt.Sprintf("migrations: schema %s does not exist", q)
	}
	return fmt.Sprintf("migrations: schema %s is not migrated (no %s table)", q, VersionTable)
}

// Unwrap makes errors.Is match ErrNotMigrated.
func (e *NotMigratedError) Unwrap() error { return ErrNotMigrated }

// Status reports every known migration of schema ("" means the default,
// "lease") and whether it is applied, as goose's version table in the schema
// records it.
//
// Status only reads, in one read-only transaction: it creates neither the
// schema nor the version table, takes no lock, and does not wait for a
// migration in progress (it reports what was committed before it started).
// For a schema that does not exist or has no version table, it returns every
// migration as pending together with a *NotMigratedError, which matches
// ErrNotMigrated.
func Status(ctx context.Context, pool *pgxpool.Pool, schema string) ([]MigrationStatus, error) {
	schema, err := checkArgs(pool, schema)
	if err != nil {
		return nil, err
	}
	out, err := sources()
	if err != nil {
		return nil, err
	}
	var exists, migrated bool
	applied := map[int64]time.Time{}
	err = pgx.BeginTxFunc(ctx, pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1),
			EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p'))`,
			schema, VersionTable).Scan(&exists, &migrated)
		if err != nil || !migrated {
			return err
		}
		// A version is applied while its row is there (goose deletes it on
		// Down); applied at the time of its latest row, as goose reports it.
		rows, err := tx.Query(ctx, `SELECT version_id, max(tstamp) FROM `+pgx.Identifier{schema, VersionTable}.Sanitize()+
			` WHERE version_id > 0 GROUP BY version_id`)
		if err != nil {
			return err
		}
		var v int64
		var at time.Time
		_, err = pgx.ForEachRow(rows, []any{&v, &at}, func() error {
			applied[v] = at
			return nil
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("migrations: schema %s: %w", pgx.Identifier{schema}.Sanitize(), err)
	}
	for i := range out {
		if at, ok := applied[out[i].Version]; ok {
			out[i].State, out[i].AppliedAt = StateApplied, at
		}
	}
	if !migrated {
		return out, &NotMigratedError{Schema: schema, SchemaExists: exists}
	}
	return out, nil
}

// sources lists the embedded migrations, each pending, in version order:
// the version is the number before the first "_" of the file name, as goose
// reads it.
func sources() ([]MigrationStatus, error) {
	files, err := fs.Glob(FS(), "*.sql")
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	out := make([]MigrationStatus, 0, len(files))
	for _, name := range files {
		prefix, _, _ := strings.Cut(name, "_")
		v, err := strconv.ParseInt(prefix, 10, 64)
		if err != nil || v < 1 {
			return nil, fmt.Errorf("migrations: embedded file %s has no version number", name) // fixed at build time
		}
		out = append(out, MigrationStatus{Version: v, Path: name, State: StatePending})
	}
	slices.SortFunc(out, func(a, b MigrationStatus) int { return cmp.Compare(a.Version, b.Version) })
	return out, nil
}
