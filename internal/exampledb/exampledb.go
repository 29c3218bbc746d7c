// Package exampledb gives the examples their database: the server at
// DATABASE_URL, in a schema of their own that they drop and re-create
// (saying so first) and drop again at the end unless asked to keep it, or a
// throwaway PostgreSQL started from the server binaries on the machine.
package exampledb

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/migrations"
)

// ErrCleanup is wrapped by the error of a failed clean-up.
var ErrCleanup = errors.New("clean-up failed")

// DB is an example's database, with the pglease schema migrated.
type DB struct {
	Pool   *pgxpool.Pool
	URL    string // for the example's child processes
	Schema string

	keep    bool
	cluster *pgtest.Cluster // a throwaway server, or nil
}

// Open returns schema on the server at DATABASE_URL, dropped if it existed
// and migrated afresh, or on a throwaway server when DATABASE_URL is not set.
// It says which on stdout. Close undoes it.
func Open(ctx context.Context, schema string, keep bool) (*DB, error) {
	d := &DB{URL: os.Getenv("DATABASE_URL"), Schema: schema, keep: keep}
	if d.URL == "" {
		fmt.Println("DATABASE_URL is not set: starting a throwaway PostgreSQL")
		cl, err := pgtest.Start(pgtest.Options{})
		if errors.Is(err, pgtest.ErrNoServerBinaries) {
			return nil, fmt.Errorf("%w; install them, or set DATABASE_URL to a PostgreSQL server to run on (the example creates schema %q there and drops it at the end)",
				err, schema)
		}
		if err != nil {
			return nil, err
		}
		d.cluster, d.URL = cl, cl.URL()
	}
	pool, err := pgxpool.New(ctx, d.URL)
	if err != nil {
		d.stopCluster()
		return nil, fmt.Errorf("connect: %w", err)
	}
	d.Pool = pool
	if d.cluster == nil {
		cfg := pool.Config().ConnConfig
		fmt.Printf("DATABASE_URL is set (user %s, host %s, database %s): dropping schema %q if it exists and creating it afresh; ",
			cfg.User, cfg.Host, cfg.Database, schema)
		if keep {
			fmt.Println("it is left in place at the end (-keep)")
		} else {
			fmt.Println("it is dropped again at the end (-keep leaves it)")
		}
	}
	if _, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
		d.Close()
		return nil, err
	}
	if _, err := migrations.Up(ctx, pool, schema); err != nil {
		return nil, errors.Join(err, d.Close())
	}
	return d, nil
}

// Close drops the schema on a server of the user's (unless kept), closes the
// pool and stops a throwaway server.
func (d *DB) Close() error {
	var err error
	if d.cluster == nil && !d.keep {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, derr := d.Pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{d.Schema}.Sanitize()+" CASCADE"); derr != nil {
			err = fmt.Errorf("%w: drop schema %q at the end: %w", ErrCleanup, d.Schema, derr)
		} else {
			fmt.Printf("dropped schema %q\n", d.Schema)
		}
	}
	d.Pool.Close()
	d.stopCluster()
	return err
}

func (d *DB) stopCluster() {
	if d.cluster != nil {
		d.cluster.Stop()
	}
}
