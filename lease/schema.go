package lease

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// versionTable is migrations.VersionTable, goose's table in the schema. Not
// imported, so that package lease does not depend on goose.
const versionTable = "pglease_migrations"

// SchemaVersion is the schema version this client is written for: the number
// of the last migration in package migrations that it relies on.
//
// The client accepts a schema at this version, and a newer one that says it
// still serves clients of this version: the schema's SQL function
// schema_info() returns (version, compatible_from), and any schema with
// compatible_from <= SchemaVersion <= version is accepted. A migration that
// only adds keeps compatible_from; one that breaks older clients raises it.
const SchemaVersion = 5

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
	quoted := pgx.Identifier{schema}.Sanitize()
	var have, from int
	err := pool.QueryRow(ctx, "SELECT version, compatible_from FROM "+quoted+".schema_info()").Scan(&have, &from)
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
	case errors.As(err, &pgErr) && pgErr.Code == "3F000": // invalid_schema_name
		return &SchemaError{Schema: schema, Need: SchemaVersion, Err: ErrSchemaNotMigrated}
	case errors.As(err, &pgErr) && (pgErr.Code == "42883" || pgErr.Code == "42P01"): // undefined function, table
		// Before version 3: no schema_info. Name the version if goose's table says.
		have, err = migratedVersion(ctx, pool, schema)
		if err != nil {
			return fmt.Errorf("lease: check schema %s: %w", quoted, err)
		}
		return &SchemaError{Schema: schema, Exists: true, Have: have, Need: SchemaVersion, Err: ErrSchemaNotMigrated}
	default:
		return fmt.Errorf("lease: check schema %s: %w", quoted, err)
	}
	e := &SchemaError{Schema: schema, Exists: true, Have: have, CompatibleFrom: from, Need: SchemaVersion}
	switch {
	case have < SchemaVersion:
		e.Err = ErrSchemaNotMigrated
	case from > SchemaVersion:
		e.Err = ErrSchemaIncompatible
	default:
		return nil
	}
	return e
}

// migratedVersion returns the last version that goose's table in schema
// records, 0 when the table is missing or empty.
func migratedVersion(ctx context.Context, pool *pgxpool.Pool, schema string) (int, error) {
	var v int
	err := pool.QueryRow(ctx, "SELECT coalesce(max(version_id), 0) FROM "+
		pgx.Identifier{schema, versionTable}.Sanitize()).Scan(&v)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
		return 0, nil
	}
	return v, err
}
