package main

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pglease/pglease/internal/pgtest"
)

// closedPort returns a local TCP port that nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	_ = l.Close()
	return port
}

// command runs the built binary with only the given environment (and PATH).
func command(ctx context.Context, env []string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	return cmd
}

func runBinary(t *testing.T, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := command(ctx, env, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var exitErr *exec.ExitError
	code := 0
	switch {
	case errors.As(err, &exitErr):
		code = exitErr.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return result{code, out.String(), errb.String()}
}

// The binary as a subprocess: what cron, systemd and Kubernetes see.
func TestBinary(t *testing.T) {
	if binary == "" {
		t.Fatal("TestMain did not build the binary")
	}
	if _, err := os.Stat(binary); err != nil { // removed by an earlier run of -count=N
		if err := os.MkdirAll(filepath.Dir(binary), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := buildBinary(); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { _ = os.RemoveAll(filepath.Dir(binary)) })

	t.Run("once", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t)
		res := runBinary(t, []string{"DATABASE_URL=" + f.Cluster.URL()}, "--once", "--schema", f.Schema)
		if res.code != 0 || !strings.Contains(res.stderr, `msg="reaper pass done"`) || !strings.Contains(res.stderr, "holders=2 locks=6") {
			t.Fatalf("exit %d, stderr %q; want 0 and a line with the counts", res.code, res.stderr)
		}
		if h, l := f.rows(t); h != 1 || l != 2 {
			t.Fatalf("after --once: %d holders, %d locks; want 1 and 2", h, l)
		}
	})

	t.Run("libpq environment", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t)
		u, err := url.Parse(f.Cluster.URL())
		if err != nil {
			t.Fatal(err)
		}
		env := []string{"PGHOST=" + u.Hostname(), "PGPORT=" + u.Port(), "PGUSER=" + u.User.Username(),
			"PGDATABASE=" + strings.TrimPrefix(u.Path, "/"), "PGSSLMODE=disable", "REAPER_SCHEMA=" + f.Schema, "REAPER_ONCE=1"}
		res := runBinary(t, env)
		if res.code != 0 || !strings.Contains(res.stderr, "holders=2 locks=6") {
			t.Fatalf("exit %d, stderr %q", res.code, res.stderr)
		}
	})

	t.Run("unreachable", func(t *testing.T) {
		t.Parallel()
		res := runBinary(t, []string{"DATABASE_URL=postgres://reaper:hunter2@127.0.0.1:" + closedPort(t) + "/app"}, "--once")
		if res.code != 1 || !strings.Contains(res.stderr, "database unreachable") || !strings.Contains(res.stderr, "connection refused") ||
			!strings.Contains(res.stderr, "check the connection settings") || strings.Contains(res.stderr, "hunter2") {
			t.Fatalf("exit %d, stderr %q; want 1 and a clear message without the password", res.code, res.stderr)
		}
	})

	t.Run("usage", func(t *testing.T) {
		t.Parallel()
		for _, args := range [][]string{
			{"--once", "--no-such-flag"},
			{"--schedule", "*/5 * * *"},
			{"--once", "--database-url", "postgres://reaper:hunter2@db:port/app"},
		} {
			res := runBinary(t, nil, args...)
			if res.code != 2 || !strings.HasPrefix(res.stderr, "reaper: ") || strings.Contains(res.stderr, "hunter2") {
				t.Errorf("%q: exit %d, stderr %q; want 2", args, res.code, res.stderr)
			}
		}
	})

	t.Run("migrate up", func(t *testing.T) {
		t.Parallel()
		c := pgtest.Shared(t)
		schema := pgtest.NewSchemaName()
		t.Cleanup(func() { pgtest.DropSchema(t, c, schema) })
		env := []string{"DATABASE_URL=" + c.URL()}
		res := runBinary(t, env, "migrate", "up", "--schema", schema)
		if res.code != 0 || !strings.Contains(res.stdout, "applied 00001_init.sql") {
			t.Fatalf("migrate up: exit %d, stdout %q, stderr %q", res.code, res.stdout, res.stderr)
		}
		pool := pgtest.NewPool(t, c, "cli-test")
		var tables int
		if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename IN ('holders', 'locks')`, schema).Scan(&tables); err != nil || tables != 2 {
			t.Fatalf("tables after migrate up: %d, %v", tables, err)
		}
		res = runBinary(t, env, "migrate", "--schema", schema, "status")
		if res.code != 0 || !strings.Contains(res.stdout, "applied") {
			t.Fatalf("migrate status: exit %d, stdout %q", res.code, res.stdout)
		}
		res = runBinary(t, env, "migrate", "up", "--schema", schema)
		if res.code != 0 || !strings.Contains(res.stdout, "up to date") {
			t.Fatalf("second migrate up: exit %d, stdout %q", res.code, res.stdout)
		}
		// And a pass works on it.
		res = runBinary(t, env, "--once", "--schema", schema)
		if res.code != 0 {
			t.Fatalf("--once on the new schema: exit %d, %s", res.code, res.stderr)
		}
		res = runBinary(t, env, "migrate", "down", "--yes", "--schema", schema)
		if res.code != 0 || !strings.Contains(res.stdout, "rolled back") {
			t.Fatalf("migrate down: exit %d, stdout %q, stderr %q", res.code, res.stdout, res.stderr)
		}
		// down rolls back the latest migration only: it is pending again.
		res = runBinary(t, env, "migrate", "status", "--schema", schema)
		if res.code != 0 || strings.Count(res.stdout, "pending") != 1 {
			t.Fatalf("migrate status after down: exit %d, stdout %q; want exactly one pending migration", res.code, res.stdout)
		}
	})

	t.Run("healthz failing", testHealthzFailing)
	t.Run("first pass", testFirstPass)
	t.Run("fail fast", testFailFast)
	t.Run("permission names target", testPermissionNamesTarget)
	t.Run("command line", testCommandLine)
	t.Run("dry run wording", testDryRunWording)

	t.Run("daemon SIGTERM", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t)
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
		defer cancel()
		cmd := command(ctx, []string{"DATABASE_URL=" + f.Cluster.URL(), "REAPER_SCHEDULE=* * * * * *"},
			"--listen", "127.0.0.1:0", "--schema", f.Schema, "--batch-size", "1")
		w, out := lines(t)
		cmd.Stderr = w
		started := time.Now()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var seen []string
		addr := waitLine(t, out, `msg="reaper listening" addr=(\S+)`, &seen)[1]
		if code, body := get(t, "http://"+addr+"/healthz"); code != 200 || body != "ok\n" {
			t.Fatalf("/healthz: %d %q", code, body)
		}
		waitLine(t, out, `msg="reaper pass done" .*holders=2 locks=6`, &seen)
		code, body := get(t, "http://"+addr+"/metrics")
		if code != 200 || !strings.Contains(body, `pglease_reaper_rows_reaped_total{kind="lock"} 6`) {
			t.Fatalf("/metrics: %d\n%s", code, body)
		}
		// The binary's own process: started within the test, not before it.
		if v := sample(t, body, "process_start_time_seconds"); v < float64(started.Unix()-1) {
			t.Fatalf("/metrics: process_start_time_seconds %v, before the binary was started at %v", v, started)
		}
		if v := sample(t, body, "go_goroutines"); v < 1 {
			t.Fatalf("/metrics: go_goroutines %v", v)
		}
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		err := cmd.Wait()
		_ = w.Close()
		for l := range out {
			seen = append(seen, l)
		}
		if err != nil {
			t.Fatalf("after SIGTERM: %v; want exit 0; output:\n%s", err, strings.Join(seen, "\n"))
		}
		if !strings.Contains(strings.Join(seen, "\n"), `msg="reaper stopped"`) {
			t.Fatalf("no stop logged:\n%s", strings.Join(seen, "\n"))
		}
	})
}
