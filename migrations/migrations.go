// Package migrations creates and upgrades the pglease schema.
//
// The migrations are plain goose v3 SQL files embedded in the module (see the
// sql folder). They use unqualified names; this package runs them with
// search_path set to the configured schema, and keeps goose's version table
// (pglease_migrations) inside that schema, never in the application's own goose
// table. Many processes calling Up at once migrate exactly once: they queue on
// goose's PostgreSQL session advisory lock, keyed by the schema name.
package migrations

import (
	"context"
	"crypto/sha256"
	"embed"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/pglease/pglease/internal/ident"
)

//go:embed sql/*.sql
var embedded embed.FS

// ErrInvalidConfig is wrapped by the errors of Up, Down and Status about
// their arguments: a nil pool, or a schema name that cannot be used (those
// match ident's invalid schema name error, lease.ErrInvalidSchema, too).
var ErrInvalidConfig = errors.New("migrations: invalid config")

// VersionTable is the name of goose's version table inside the schema.
const VersionTable = "pglease_migrations"

// FS returns the embedded SQL migrations, for tools that apply them another way.
func FS() fs.FS {
	sub, err := fs.Sub(embedded, "sql")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	return sub
}

// State of one migration, as goose reports it.
type State = goose.State

// Migration states.
const (
	StatePending = goose.StatePending
	StateApplied = goose.StateApplied
)

// MigrationStatus describes one migration.
type MigrationStatus struct {
	Version   int64
	Path      string
	State     State
	AppliedAt time.Time // zero when pending
}

// Result describes one migration that was applied or rolled back.
type Result struct {
	Version   int64
	Path      string
	Direction string // "up" or "down"
	Duration  time.Duration
}

// Up applies every pending migration to schema ("" means the default, "lease"),
// creating the schema if it does not exist. It is safe to call from many
// processes at once.
func Up(ctx context.Context, pool *pgxpool.Pool, schema string) ([]Result, error) {
	var out []Result
	err := withProvider(ctx, pool, schema, true, func(p *goose.Provider) error {
		res, err := p.Up(ctx)
		out = results(res)
		return err
	})
	return out, err
}

// Down rolls back the most recent migration of schema.
func Down(ctx context.Context, pool *pgxpool.Pool, schema string) (*Result, error) {
	var out *Result
	err := withProvider(ctx, pool, schema, false, func(p *goose.Provider) error {
		res, err := p.Down(ctx)
		if r := results([]*goose.MigrationResult{res}); len(r) == 1 {
			out = &r[0]
		}
		return err
	})
	return out, err
}

func results(rs []*goose.MigrationResult) []Result {
	var out []Result
	for _, r := range rs {
		if r == nil || r.Source == nil {
			continue
		}
		out = append(out, Result{Version: r.Source.Version, Path: r.Source.Path, Direction: r.Direction, Duration: r.Duration})
	}
	return out
}

// withProvider runs f with a goose provider whose connections have search_path
// set to the schema. The connections are our own (a database/sql pool opened
// from the caller's pool configuration), so the caller's pool is never changed.
func withProvider(ctx context.Context, pool *pgxpool.Pool, schema string, create bool, f func(*goose.Provider) error) error {
	schema, err := checkArgs(pool, schema)
	if err != nil {
		return err
	}
	quoted := pgx.Identifier{schema}.Sanitize()
	if create {
		if err := createSchema(ctx, pool, schema, quoted); err != nil {
			return err
		}
	}
	cc := pool.Config().ConnConfig.Copy()
	if cc.RuntimeParams == nil {
		cc.RuntimeParams = map[string]string{}
	}
	cc.RuntimeParams["search_path"] = quoted
	db := stdlib.OpenDB(*cc)
	defer db.Close()
	db.SetMaxOpenConns(2)

	locker, err := lock.NewPostgresSessionLocker(
		lock.WithLockID(lockID(schema)),
		lock.WithLockTimeout(1, 600),  // poll every second, for up to 10 minutes
		lock.WithUnlockTimeout(1, 60)) // a lost unlock is released with the session anyway
	if err != nil {
		return fmt.Errorf("migrations: %w", err)
	}
	p, err := goose.NewProvider(goose.DialectPostgres, db, FS(),
		goose.WithTableName(VersionTable),
		goose.WithSessionLocker(locker),
		goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return fmt.Errorf("migrations: %w", err)
	}
	if err := f(p); err != nil {
		return fmt.Errorf("migrations: schema %s: %w", quoted, err)
	}
	return nil
}

// checkArgs validates the arguments of Up, Down and Status and returns the
// schema name to use ("" means the default).
func checkArgs(pool *pgxpool.Pool, schema string) (string, error) {
	if pool == nil {
		return "", fmt.Errorf("%w: pool is nil: pass a *pgxpool.Pool from pgxpool.New", ErrInvalidConfig)
	}
	if schema == "" {
		schema = ident.DefaultSchema
	}
	if err := ident.ValidateSchema(schema); err != nil {
		return "", fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	return schema, nil
}

// createSchema creates the schema if needed. Concurrent CREATE SCHEMA IF NOT
// EXISTS can fail with a unique violation, so creators queue on a
// transaction-scoped advisory lock first.
func createSchema(ctx context.Context, pool *pgxpool.Pool, schema, quoted string) error {
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", lockID(schema)); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+quoted)
		return err
	})
	if err != nil {
		return fmt.Errorf("migrations: create schema %s: %w", quoted, err)
	}
	return nil
}

// lockID is the advisory lock that migrators of one schema share.
func lockID(schema string) int64 {
	sum := sha256.Sum256([]byte("pglease migrations\x00" + schema))
	return int64(binary.BigEndian.Uint64(sum[:8]))
}
