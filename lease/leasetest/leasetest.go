// Package leasetest gives your own tests a real, throwaway PostgreSQL with the
// pglease schema migrated: a cluster started from the PostgreSQL binaries on
// the machine (as the postgres user when run as root), or the server named by
// PGLEASE_TEST_DATABASE_URL. Each call gets a schema of its own, so tests may
// run in parallel.
//
//	func TestMain(m *testing.M) { leasetest.Main(m) }
//
//	func TestWorker(t *testing.T) {
//	    db := leasetest.New(t)
//	    client, err := lease.New(db.Pool, &lease.Config{Schema: db.Schema})
//	    ...
//	}
package leasetest

import (
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
)

// EnvURL names the environment variable that points tests at an existing server.
const EnvURL = pgtest.EnvURL

// DB is a migrated schema of its own on a test server.
type DB struct {
	// URL connects to the server's "postgres" database.
	URL string
	// Schema to pass as lease.Config.Schema.
	Schema string
	// Pool is closed when the test ends.
	Pool *pgxpool.Pool
}

// New returns a fresh migrated schema, dropped when the test ends.
func New(tb testing.TB) *DB {
	tb.Helper()
	db := pgtest.NewDB(tb)
	return &DB{URL: db.Cluster.URL(), Schema: db.Schema, Pool: db.Pool}
}

// Main runs the package's tests and then stops the throwaway cluster, if one
// was started. Call it from TestMain.
func Main(m *testing.M) { pgtest.MainNoLeakCheck(m) }
