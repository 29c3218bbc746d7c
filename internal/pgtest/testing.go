package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/pglease/pglease/migrations"
)

var shared struct {
	once sync.Once
	mu   sync.Mutex
	c    *Cluster
	err  error
}

// Shared returns the cluster shared by the tests of this test binary: the
// server at PGLEASE_TEST_DATABASE_URL when set, else a throwaway cluster
// started on first use and stopped by Main.
func Shared(tb testing.TB) *Cluster {
	tb.Helper()
	c, err := SharedCluster()
	if err != nil {
		tb.Fatal(err) // says "pgtest: ..." itself
	}
	return c
}

// SharedCluster is Shared for code without a testing.TB, such as Example
// functions.
func SharedCluster() (*Cluster, error) {
	shared.once.Do(func() {
		c, err := sharedCluster()
		shared.mu.Lock()
		shared.c, shared.err = c, err
		shared.mu.Unlock()
	})
	shared.mu.Lock()
	defer shared.mu.Unlock()
	return shared.c, shared.err
}

func sharedCluster() (*Cluster, error) {
	if u := os.Getenv(EnvURL); u != "" {
		return External(u), nil
	}
	// Tests check logic, not durability timings: fsync off keeps them quick.
	// Benchmarks and fault tests start durable clusters of their own.
	c, err := Start(Options{NoFsync: true})
	if errors.Is(err, ErrNoServerBinaries) {
		return nil, fmt.Errorf("%w; or set %s to the URL of a running server", err, EnvURL)
	}
	return c, err
}

// Main runs the tests of a package, stops the shared cluster, and fails the
// run if any goroutine was leaked. Call it from TestMain.
func Main(m *testing.M) { os.Exit(run(m, true)) }

// MainNoLeakCheck is Main without the goroutine leak check, for packages whose
// goroutines are not ours to judge (users of leasetest).
func MainNoLeakCheck(m *testing.M) { os.Exit(run(m, false)) }

func run(m *testing.M, leakCheck bool) int {
	code := m.Run()
	shared.mu.Lock()
	c := shared.c
	shared.mu.Unlock()
	if c != nil {
		c.Stop()
	}
	if code == 0 && leakCheck {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: goroutines leaked by the tests: %v\n", err)
			code = 1
		}
	}
	return code
}

// Owned starts a cluster for this test alone, stopped when the test ends.
// Fault tests use it to kill, pause or restart the server, which a server at
// PGLEASE_TEST_DATABASE_URL does not allow. Without server binaries the test
// is skipped with a one-line reason, or fails under CI=true.
func Owned(tb testing.TB, opts Options) *Cluster {
	tb.Helper()
	c, err := Start(opts)
	if errors.Is(err, ErrNoServerBinaries) {
		unavailable(tb, fmt.Sprintf("%v; this test needs a cluster of its own, to kill or restart it", err))
	}
	if err != nil {
		tb.Fatal(err) // says "pgtest: ..." itself
	}
	tb.Cleanup(c.Stop)
	return c
}

// EnvCI names the environment variable that marks a CI run. With CI=true (as
// .ci/run and CI services set it) a test never skips for want of a program or
// of server binaries: .ci/run installs them all, and a skip would hide that
// it did not.
const EnvCI = "CI"

// RequireProgram returns the path of an optional program a test runs
// (PgBouncer; later Patroni, etcd): the first of name and candidates found,
// each looked up on PATH unless it contains a slash. When none is found, the
// test is skipped with a one-line reason, or fails under CI=true.
func RequireProgram(tb testing.TB, name string, candidates ...string) string {
	tb.Helper()
	looked := append([]string{name}, candidates...)
	for _, p := range looked {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	unavailable(tb, fmt.Sprintf("pgtest: %s not found (looked for %s): install it to run this test",
		name, strings.Join(looked, ", ")))
	return ""
}

// unavailable ends a test that cannot run here because something it needs is
// missing: a skip outside CI, a failure under CI=true.
func unavailable(tb testing.TB, reason string) {
	tb.Helper()
	if ci, _ := strconv.ParseBool(os.Getenv(EnvCI)); ci {
		tb.Fatalf("%s (%s=%s: .ci/run installs what the tests need, so a missing one fails the run)", reason, EnvCI, os.Getenv(EnvCI))
	}
	tb.Skip(reason)
}

// NewSchemaName returns a fresh, unused schema name.
func NewSchemaName() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "t_" + hex.EncodeToString(b[:])
}

// NewPool returns a pool on c with the given application_name, closed when the
// test ends. modify, when given, adjusts the configuration first.
func NewPool(tb testing.TB, c *Cluster, app string, modify ...func(*pgxpool.Config)) *pgxpool.Pool {
	tb.Helper()
	cfg, err := pgxpool.ParseConfig(c.URL())
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	for _, f := range modify {
		f(cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	tb.Cleanup(pool.Close)
	return pool
}

// Migrate creates schema on c with the pglease migrations applied, and drops it
// when the test ends.
func Migrate(tb testing.TB, c *Cluster, schema string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	admin := NewPool(tb, c, "pgtest-admin", func(cfg *pgxpool.Config) { cfg.MaxConns = 2 })
	if _, err := migrations.Up(ctx, admin, schema); err != nil {
		tb.Fatalf("pgtest: migrate %s: %v", schema, err)
	}
	tb.Cleanup(func() { DropSchema(tb, c, schema) })
}

// DropSchema drops schema and everything in it.
func DropSchema(tb testing.TB, c *Cluster, schema string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.URL())
	if err != nil {
		tb.Logf("pgtest: drop schema %s: %v", schema, err)
		return
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
		tb.Logf("pgtest: drop schema %s: %v", schema, err)
	}
}

// DB is what most tests need: a migrated schema of its own on a cluster, and a
// pool.
type DB struct {
	Cluster *Cluster
	Schema  string
	Pool    *pgxpool.Pool
}

// NewDB returns a fresh migrated schema on the shared cluster.
func NewDB(tb testing.TB) *DB {
	tb.Helper()
	return NewDBOn(tb, Shared(tb))
}

// NewDBOn returns a fresh migrated schema on c.
func NewDBOn(tb testing.TB, c *Cluster) *DB {
	tb.Helper()
	schema := NewSchemaName()
	Migrate(tb, c, schema)
	return &DB{Cluster: c, Schema: schema, Pool: NewPool(tb, c, "pglease-test")}
}

// DownTo rolls schema back, one migration at a time, until version is the
// latest applied, whatever the newest migration is: for tests of what a
// client does with a schema an older release left.
func DownTo(tb testing.TB, pool *pgxpool.Pool, schema string, version int64) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		st, err := migrations.Status(ctx, pool, schema)
		if err != nil {
			tb.Fatalf("pgtest: status of %s: %v", schema, err)
		}
		latest := int64(0)
		for _, s := range st {
			if s.State == migrations.StateApplied && s.Version > latest {
				latest = s.Version
			}
		}
		if latest <= version {
			return
		}
		if res, err := migrations.Down(ctx, pool, schema); err != nil || res == nil || res.Version != latest {
			tb.Fatalf("pgtest: Down of %s = %+v, %v; want version %d rolled back", schema, res, err, latest)
		}
	}
}
