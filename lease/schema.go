package lease

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/schemaver"
)

// SchemaVersion is the schema version this client is written for: the number
// of the last migration in package migrations that it relies on.
//
// The client accepts a schema at this version, and a newer one that says it
// still serves clients of this version: the schema's SQL function
// schema_info() returns (version, compatible_from), and any schema with
// compatible_from <= SchemaVersion <= version is accepted. A migration that
// only adds keeps compatible_from; one that breaks older clients raises it.
const SchemaVersion = 7

// Schema errors, checked once, before the client first registers as a
// holder. Both come as a *SchemaError, which says what was found.
var (
	// ErrSchemaNotMigrated: the schema does not exist, or it is older than
	// SchemaVersion. Run migrations.Up, or `reaper migrate up`.
	ErrSchemaNotMigrated = errors.New("lease: schema not migrated")
	// ErrSchemaIncompatible: the schema is newer than this client can use
	// (its compatible_from is above SchemaVersion). Upgrade the client.
	ErrSchemaIncompatible = errors.New("lease: schema incompatible")
)

// SchemaError reports a schema this client cannot use. It matches
// ErrSchemaNotMigrated or ErrSchemaIncompatible with errors.Is.
type SchemaError struct {
	// Schema is the configured schema name.
	Schema string
	// Exists is false when the schema does not exist at all.
	Exists bool
	// Have is the schema's version; 0 when it has none or it is not known.
	Have int
	// CompatibleFrom is the oldest client version the schema serves; 0 when
	// not known (a schema before version 3 does not say).
	CompatibleFrom int
	// Need is the version this client is written for (SchemaVersion).
	Need int
	// Err is ErrSchemaNotMigrated or ErrSchemaIncompatible.
	Err error
}

func (e *SchemaError) Error() string {
	q := pgx.Identifier{e.Schema}.Sanitize()
	switch {
	case e.Err == ErrSchemaIncompatible:
		return fmt.Sprintf("%v: schema %s is at version %d and serves clients written for version %d or later; "+
			"this client is written for version %d: upgrade the client (running migrations.Up or `reaper migrate up` does not help)",
			e.Err, q, e.Have, e.CompatibleFrom, e.Need)
	case !e.Exists:
		return fmt.Sprintf("%v: schema %s does not exist; this client needs version %d: "+
			"run migrations.Up or `reaper migrate up` to create it", e.Err, q, e.Need)
	case e.Have == 0:
		return fmt.Sprintf("%v: schema %s has no pglease version (version unknown, older than %d); this client needs version %d: "+
			"run migrations.Up or `reaper migrate up`", e.Err, q, e.Need, e.Need)
	default:
		return fmt.Sprintf("%v: schema %s is at version %d; this client needs version %d: "+
			"run migrations.Up or `reaper migrate up`", e.Err, q, e.Have, e.Need)
	}
}

// Unwrap makes errors.Is match ErrSchemaNotMigrated or ErrSchemaIncompatible.
func (e *SchemaError) Unwrap() error { return e.Err }

// checkSchema reports whether a client of SchemaVersion may use schema: nil,
// a *SchemaError, or the error that kept it from finding out. One round trip
// when the schema is at version 3 or later; one more to name the version of
// an older schema.
func checkSchema(ctx context.Context, pool *pgxpool.Pool, schema string) error {
	_, err := schemaVersion(ctx, pool, schema)
	return err
}

// schemaVersion is checkSchema, and returns the version the schema has.
func schemaVersion(ctx context.Context, pool *pgxpool.Pool, schema string) (int, error) {
	in, err := schemaver.Read(ctx, func(ctx context.Context, sql string, dest ...any) error {
		return pool.QueryRow(ctx, sql).Scan(dest...)
	}, schema)
	if err != nil {
		return 0, fmt.Errorf("lease: check schema %s: %w", pgx.Identifier{schema}.Sanitize(), err)
	}
	e := &SchemaError{Schema: schema, Exists: in.Exists, Have: in.Have, CompatibleFrom: in.CompatibleFrom, Need: SchemaVersion}
	switch in.Check(SchemaVersion) {
	case schemaver.NotMigrated:
		e.Err = ErrSchemaNotMigrated
	case schemaver.Incompatible:
		e.Err = ErrSchemaIncompatible
	default:
		return in.Have, nil
	}
	return 0, e
}
