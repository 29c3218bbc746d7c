package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglease/pglease/migrations"
)

const msgMigrateFailed = "reaper migrate failed"

// runMigrate is "reaper migrate up|status|down".
func runMigrate(ctx context.Context, opts *options, stdout, stderr io.Writer) int {
	if opts.action == "down" && !opts.yes {
		return usage(stderr, usagef("migrate down rolls back the latest migration of schema %q, which for the first one "+
			"drops the tables and every lock in them: add --yes to confirm", opts.schema))
	}
	pool, tgt, err := openPool(ctx, opts)
	if err != nil {
		return usage(stderr, err)
	}
	defer pool.Close()
	log, err := newLogger(stderr, opts, tgt)
	if err != nil {
		return usage(stderr, err)
	}

	switch opts.action {
	case "up":
		var res []migrations.Result
		res, err = migrations.Up(ctx, pool, opts.schema)
		for _, r := range res {
			fmt.Fprintf(stdout, "applied %s (version %d) in %s\n", r.Path, r.Version, r.Duration.Round(time.Millisecond))
		}
		if err == nil && len(res) == 0 {
			fmt.Fprintf(stdout, "schema %q is up to date\n", opts.schema)
		}
	case "status":
		var st []migrations.MigrationStatus
		st, err = migrations.Status(ctx, pool, opts.schema)
		var nm *migrations.NotMigratedError
		if errors.As(err, &nm) {
			// Not a failure: the answer is "nothing applied yet".
			fmt.Fprintln(stdout, notMigrated(nm, tgt))
			err = nil
		}
		if err == nil {
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "VERSION\tSTATE\tAPPLIED AT\tFILE")
			for _, s := range st {
				at := "-"
				if !s.AppliedAt.IsZero() {
					at = s.AppliedAt.UTC().Format(time.RFC3339)
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", s.Version, s.State, at, s.Path)
			}
			_ = tw.Flush()
		}
	case "down":
		var r *migrations.Result
		r, err = migrations.Down(ctx, pool, opts.schema)
		if r != nil {
			fmt.Fprintf(stdout, "rolled back %s (version %d) in %s\n", r.Path, r.Version, r.Duration.Round(time.Millisecond))
		}
	}
	if err != nil {
		log.Error(msgMigrateFailed, "action", opts.action, "schema", opts.schema,
			"error", err.Error(), "hint", migrateHint(err, opts))
		return exitFailed
	}
	return exitOK
}

// notMigrated is what "migrate status" says about a schema that has no
// migration applied, before it lists them all as pending. It says where it
// looked: with no connection settings at all, the libpq defaults reach a
// database the operator may not have meant.
func notMigrated(e *migrations.NotMigratedError, t target) string {
	where := fmt.Sprintf("; looked as user %s on %s in database %s", t.user, t.host, t.database)
	if !e.SchemaExists {
		return fmt.Sprintf("schema %q does not exist: not migrated, every migration is pending (reaper migrate up creates it and applies them)%s", e.Schema, where)
	}
	return fmt.Sprintf("schema %q is not migrated (no %s table): every migration is pending (reaper migrate up applies them)%s", e.Schema, migrations.VersionTable, where)
}

// migrateHint says how to fix a failed migration.
func migrateHint(err error, o *options) string {
	var pgErr *pgconn.PgError
	var connErr *pgconn.ConnectError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "42501":
		return "the role lacks a privilege: run migrate as the schema's owner (or a role that may CREATE in the database), not as the reaper's role"
	case errors.As(err, &pgErr) && (pgErr.Code == "28P01" || pgErr.Code == "28000"):
		return "the server refused the login: check the user name and password"
	case errors.As(err, &pgErr) && pgErr.Code == "3D000":
		return "the database named in the connection settings does not exist"
	case errors.As(err, &connErr), strings.Contains(err.Error(), "failed to connect"):
		return "could not connect: check the connection settings (" + o.urlSource + ") and that PostgreSQL is running and reachable"
	case errors.Is(err, context.Canceled):
		return "interrupted; run it again (migrations are transactional and taken under a lock)"
	}
	if o.action == "status" {
		return "see the error; status only reads, so running it again is safe"
	}
	return "see the error; migrations run under an advisory lock, so running again is safe"
}
