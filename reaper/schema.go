package reaper

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// SchemaVersion is the schema version the reaper needs: version 4 added the
// SQL functions it calls (reap_holders, reap_locks, reap_dry_run).
//
// A schema is accepted when its schema_info() says
// compatible_from <= SchemaVersion <= version, as lease.SchemaVersion is.
const SchemaVersion = 4

// versionTable is migrations.VersionTable, goose's table in the schema. Not
// imported, so that package reaper does not depend on goose.
const versionTable = "pglease_migrations"

// ErrSchemaIncompatible: the schema is newer than this reaper can use (its
// compatible_from is above SchemaVersion). Upgrade the reaper.
var ErrSchemaIncompatible = errors.New("reaper: schema incompatible")

// SchemaError says why a pass cannot use the schema. Every pass checks the
// schema first; a schema it cannot use fails the pass with a *PassError whose
// Kind is ErrNotMigrated or ErrSchemaIncompatible and whose Err is a
// *SchemaError (find it with errors.As).
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
	// Need is the version the reaper needs (SchemaVersion).
	Need int
	// Err is ErrNotMigrated or ErrSchemaIncompatible.
	Err error
}

// Error says what was found and what to do. It does not repeat Err's text,
// which the *PassError around it gives.
func (e *SchemaError) Error() string {
	q := pgx.Identifier{e.Schema}.Sanitize()
	switch {
	case e.Err == ErrSchemaIncompatible:
		return fmt.Sprintf("schema %s is at version %d and serves clients written for version %d or later; "+
			"this reaper needs version %d: upgrade the reaper (running `reaper migrate up` does not help)",
			q, e.Have, e.CompatibleFrom, e.Need)
	case !e.Exists:
		return fmt.Sprintf("schema %s does not exist; the reaper needs version %d: "+
			"run `reaper migrate up` or migrations.Up to create it, or point the reaper at the schema they were applied to", q, e.Need)
	case e.Have == 0:
		return fmt.Sprintf("schema %s has no pglease version (version unknown, older than %d); the reaper needs version %d "+
			"(its reaping functions): run `reaper migrate up` or migrations.Up", q, e.Need, e.Need)
	default:
		return fmt.Sprintf("schema %s is at version %d; the reaper needs version %d (its reaping functions): "+
			"run `reaper migrate up` or migrations.Up", q, e.Have, e.Need)
	}
}

// Unwrap makes errors.Is match ErrNotMigrated or ErrSchemaIncompatible.
func (e *SchemaError) Unwrap() error { return e.Err }

// checkSchema runs at the start of every pass, so that a schema dropped or
// rolled back under a daemon is reported as such: nil, a *PassError around a
// *SchemaError, or the *PassError of the query that failed.
func (r *Reaper) checkSchema(ctx context.Context) error {
	var have, from int
	err := r.batch(ctx, stepCheck, false, func(ctx context.Context, tx pgx.Tx) error {
		return tx.QueryRow(ctx, r.schemaInfo).Scan(&have, &from)
	})
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
	case errors.As(err, &pgErr) && pgErr.Code == "3F000": // invalid_schema_name
		return r.schemaError(&SchemaError{Schema: r.cfg.Schema, Need: SchemaVersion, Err: ErrNotMigrated})
	case errors.As(err, &pgErr) && (pgErr.Code == "42883" || pgErr.Code == "42P01"): // undefined function, table
		// Before version 3: no schema_info. Name the version if goose's table says.
		have, err = r.migratedVersion(ctx)
		if err != nil {
			return err
		}
		return r.schemaError(&SchemaError{Schema: r.cfg.Schema, Exists: true, Have: have, Need: SchemaVersion, Err: ErrNotMigrated})
	default:
		return err
	}
	e := &SchemaError{Schema: r.cfg.Schema, Exists: true, Have: have, CompatibleFrom: from, Need: SchemaVersion}
	switch {
	case have < SchemaVersion:
		e.Err = ErrNotMigrated
	case from > SchemaVersion:
		e.Err = ErrSchemaIncompatible
	default:
		return nil
	}
	return r.schemaError(e)
}

func (r *Reaper) schemaError(e *SchemaError) error {
	return &PassError{Step: stepCheck, Kind: e.Err, Err: e}
}

// migratedVersion returns the last version that goose's table in the schema
// records, 0 when the table is missing or empty.
func (r *Reaper) migratedVersion(ctx context.Context) (int, error) {
	var v int
	err := r.batch(ctx, stepCheck, false, func(ctx context.Context, tx pgx.Tx) error {
		return tx.QueryRow(ctx, r.lastVersion).Scan(&v)
	})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
		return 0, nil
	}
	return v, err
}
