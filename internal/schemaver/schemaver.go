// Package schemaver reads what a pglease schema says of its version, for the
// lease client and the reaper alike: each wraps the verdict in errors of its
// own. It does not import goose or the migrations.
package schemaver

import (
	"context"
	"errors"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// VersionTable is goose's table in the schema (migrations.VersionTable).
const VersionTable = "pglease_migrations"

// Info is what a schema says of its version.
type Info struct {
	// Exists is false when the schema does not exist at all.
	Exists bool
	// Have is its version, 0 when it has none or it is not known.
	Have int
	// CompatibleFrom is the oldest client version it serves, 0 when it does
	// not say (before version 3, which added schema_info).
	CompatibleFrom int
}

// Query runs a one-row query and scans the row into dest.
type Query func(ctx context.Context, sql string, dest ...any) error

// Read asks schema: schema_info() from version 3 on, and before that goose's
// table, to name the version. One round trip for a schema at version 3 or
// later. A failure other than a missing schema, function or table is
// returned as q returned it.
func Read(ctx context.Context, q Query, schema string) (Info, error) {
	var in Info
	err := q(ctx, "SELECT version, compatible_from FROM "+pgx.Identifier{schema}.Sanitize()+".schema_info()",
		&in.Have, &in.CompatibleFrom)
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
		in.Exists = true
		return in, nil
	case errors.As(err, &pgErr) && pgErr.Code == "3F000": // invalid_schema_name
		return Info{}, nil
	case errors.As(err, &pgErr) && (pgErr.Code == "42883" || pgErr.Code == "42P01"): // undefined function, table
		in = Info{Exists: true}
		err = q(ctx, "SELECT coalesce(max(version_id), 0) FROM "+pgx.Identifier{schema, VersionTable}.Sanitize(), &in.Have)
		if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
			return Info{Exists: true}, nil
		}
		return in, err
	}
	return Info{}, err
}

// Verdict is whether a client written for a version may use a schema.
type Verdict int

const (
	// Usable: compatible_from <= need <= version.
	Usable Verdict = iota
	// NotMigrated: the schema is missing, or older than need.
	NotMigrated
	// Incompatible: the schema is newer and no longer serves need.
	Incompatible
)

// Check says whether a client written for version need may use the schema.
func (in Info) Check(need int) Verdict {
	switch {
	case !in.Exists || in.CompatibleFrom == 0 || in.Have < need:
		return NotMigrated
	case in.CompatibleFrom > need:
		return Incompatible
	}
	return Usable
}
