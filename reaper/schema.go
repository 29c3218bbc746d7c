package reaper

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/schemaver"
)

// SchemaVersion is the schema version the reaper needs: version 4 added the
// SQL functions it calls (reap_holders, reap_locks, reap_dry_run).
//
// A schema is accepted when its schema_info() says
// compatible_from <= SchemaVersion <= version, as lease.SchemaVersion is.
const SchemaVersion = 4

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
	in, err := schemaver.Read(ctx, func(ctx context.Context, sql string, dest ...any) error {
		return r.batch(ctx, stepCheck, false, func(ctx context.Context, tx pgx.Tx) error {
			return tx.QueryRow(ctx, sql).Scan(dest...)
		})
	}, r.cfg.Schema)
	if err != nil {
		return err
	}
	e := &SchemaError{Schema: r.cfg.Schema, Exists: in.Exists, Have: in.Have, CompatibleFrom: in.CompatibleFrom, Need: SchemaVersion}
	switch in.Check(SchemaVersion) {
	case schemaver.NotMigrated:
		e.Err = ErrNotMigrated
	case schemaver.Incompatible:
		e.Err = ErrSchemaIncompatible
	default:
		return nil
	}
	return &PassError{Step: stepCheck, Kind: e.Err, Err: e}
}
