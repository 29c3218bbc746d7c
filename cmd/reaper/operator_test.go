package main

import (
	"context"
	"net/url"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/migrations"
)

// What an operator meets, tried through the binary. TestBinary runs these.

// daemon is the binary running as a daemon, its stderr read line by line.
type daemon struct {
	cmd  *exec.Cmd
	out  <-chan string
	seen []string
}

func startDaemon(t *testing.T, env []string, args ...string) *daemon {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	t.Cleanup(cancel)
	d := &daemon{cmd: command(ctx, env, args...)}
	w, out := lines(t)
	d.cmd.Stderr, d.out = w, out
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Close() })
	return d
}

func (d *daemon) wait(t *testing.T, re string) []string {
	t.Helper()
	return waitLine(t, d.out, re, &d.seen)
}

// stop sends SIGTERM and returns the exit code and the whole output.
func (d *daemon) stop(t *testing.T) (int, string) {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	return d.end(t)
}

func (d *daemon) end(t *testing.T) (int, string) {
	t.Helper()
	err := d.cmd.Wait()
	_ = d.cmd.Stderr.(interface{ Close() error }).Close()
	for l := range d.out {
		d.seen = append(d.seen, l)
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, strings.Join(d.seen, "\n")
}

// urlAs is the cluster's URL with another user name.
func urlAs(t *testing.T, c *pgtest.Cluster, user string) string {
	t.Helper()
	u, err := url.Parse(c.URL())
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.User(user)
	return u.String()
}

// /healthz fails after --unhealthy-after failed passes in a row, says why,
// and is ok again after a good pass. The passes fail for real: the schema is
// dropped under the running daemon, then migrated again.
func testHealthzFailing(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	d := startDaemon(t, []string{"DATABASE_URL=" + f.Cluster.URL()},
		"--schedule", "* * * * * *", "--listen", "127.0.0.1:0", "--schema", f.Schema,
		"--unhealthy-after", "2", "--log-level", "debug")
	addr := d.wait(t, `msg="reaper listening" addr=(\S+)`)[1]
	d.wait(t, `msg="reaper pass done" .*holders=2 locks=6`)
	if code, body := get(t, "http://"+addr+"/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz after a good pass: %d %q", code, body)
	}

	pgtest.DropSchema(t, f.Cluster, f.Schema)
	d.wait(t, `level=ERROR msg="reaper pass failed" .*schema not migrated`)
	// One failure is not enough with --unhealthy-after 2: still ok, but the body says so.
	code, body := get(t, "http://"+addr+"/healthz")
	if code == 200 && !strings.HasPrefix(body, "ok: 1 pass in a row failed (unhealthy after 2") {
		t.Fatalf("/healthz after one failure: %d %q", code, body)
	}
	d.wait(t, `level=ERROR msg="reaper pass failed" .*schema not migrated`)
	code, body = get(t, "http://"+addr+"/healthz")
	if code != 503 || !regexp.MustCompile(`^failing: \d+ passes in a row failed \(unhealthy after 2, --unhealthy-after\); last error: reaper: .*schema not migrated`).MatchString(body) {
		t.Fatalf("/healthz after two failed passes: %d %q; want 503 with the count and the last error", code, body)
	}

	pool := pgtest.NewPool(t, f.Cluster, "cli-test")
	if _, err := migrations.Up(t.Context(), pool, f.Schema); err != nil {
		t.Fatal(err)
	}
	d.wait(t, `msg="reaper pass done" .*holders=0 locks=0`)
	if code, body := get(t, "http://"+addr+"/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz after a good pass again: %d %q", code, body)
	}
	if code, out := d.stop(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM:\n%s", code, out)
	}
}

// The daemon runs a pass at start, not only at the first tick of its
// schedule (here: next New Year); --skip-first-pass waits for the schedule.
func testFirstPass(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	env := []string{"DATABASE_URL=" + f.Cluster.URL()}

	d := startDaemon(t, env, "--schedule", "0 0 1 1 *", "--schema", f.Schema, "--skip-first-pass")
	d.wait(t, `msg="reaper started" .*first_pass=false`)
	code, out := d.stop(t)
	if code != 0 || strings.Contains(out, "pass done") {
		t.Fatalf("--skip-first-pass: exit %d; want 0 and no pass:\n%s", code, out)
	}
	if h, l := f.rows(t); h != 3 || l != 8 {
		t.Fatalf("--skip-first-pass deleted rows: %d holders, %d locks left", h, l)
	}

	d = startDaemon(t, env, "--schedule", "0 0 1 1 *", "--schema", f.Schema)
	d.wait(t, `msg="reaper pass done" .*holders=2 locks=6`)
	d.wait(t, `msg="reaper started" .*next_run=\d{4}-01-01T.* first_pass=true`)
	if code, out := d.stop(t); code != 0 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
}

// A daemon that cannot log in exits at once (1) and says whom it tried.
// The throwaway cluster trusts every role that exists, so the login is
// refused for a role that does not.
func testFailFast(t *testing.T) {
	t.Parallel()
	c := pgtest.Shared(t)
	d := startDaemon(t, []string{"DATABASE_URL=" + urlAs(t, c, "no_such_role")}, "--schedule", "@every 1s", "--listen", "127.0.0.1:0")
	code, out := d.end(t)
	if code != 1 || !strings.Contains(out, `msg="reaper could not connect at start"`) ||
		!strings.Contains(out, "the server refused the login") || !strings.Contains(out, " user=no_such_role ") ||
		!strings.Contains(out, " database=postgres ") || !strings.Contains(out, " host=127.0.0.1:") || strings.Contains(out, "reaper listening") {
		t.Fatalf("unknown role: exit %d; want 1 at once, naming the user, host and database:\n%s", code, out)
	}

	port := closedPort(t)
	d = startDaemon(t, []string{"DATABASE_URL=postgres://reaper:hunter2@127.0.0.1:" + port + "/app"}, "--schedule", "@every 1s")
	code, out = d.end(t)
	if code != 1 || !strings.Contains(out, "connection refused") || !strings.Contains(out, " host=127.0.0.1:"+port+" ") ||
		!strings.Contains(out, " user=reaper ") || strings.Contains(out, "hunter2") {
		t.Fatalf("closed port: exit %d; want 1, naming the host, without the password:\n%s", code, out)
	}
}

// A role without privileges on the schema: the pass fails with a hint, and
// the message names the user, host and database it reached.
func testPermissionNamesTarget(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	role := "r" + strings.TrimPrefix(pgtest.NewSchemaName(), "t")
	pool := pgtest.NewPool(t, f.Cluster, "cli-test")
	if _, err := pool.Exec(t.Context(), "CREATE ROLE "+pgx.Identifier{role}.Sanitize()+" LOGIN"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), "DROP ROLE IF EXISTS "+pgx.Identifier{role}.Sanitize())
	})
	res := runBinary(t, []string{"DATABASE_URL=" + urlAs(t, f.Cluster, role)}, "--once", "--schema", f.Schema)
	if res.code != 1 || !strings.Contains(res.stderr, "permission denied") || !strings.Contains(res.stderr, "grants.sql") ||
		!strings.Contains(res.stderr, " user="+role+" ") || !strings.Contains(res.stderr, " database=postgres ") ||
		!strings.Contains(res.stderr, " host=127.0.0.1:") {
		t.Fatalf("role without privileges: exit %d, stderr %q", res.code, res.stderr)
	}
	if h, l := f.rows(t); h != 3 || l != 8 {
		t.Fatalf("rows deleted without privileges: %d holders, %d locks", h, l)
	}
}

// Flags work before and after the subcommand; help is a command.
func testCommandLine(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	for _, args := range [][]string{
		{"--database-url", f.Cluster.URL(), "--schema", f.Schema, "migrate", "status"},
		{"migrate", "status", "--database-url", f.Cluster.URL(), "--schema", f.Schema},
		{"--schema", f.Schema, "migrate", "--database-url", f.Cluster.URL(), "status"},
	} {
		res := runBinary(t, nil, args...)
		if res.code != 0 || !strings.Contains(res.stdout, "VERSION") || !strings.Contains(res.stdout, "applied") {
			t.Errorf("%q: exit %d, stdout %q, stderr %q", args, res.code, res.stdout, res.stderr)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"help"}, "reaper deletes the rows"},
		{[]string{"help", "migrate"}, "reaper migrate applies"},
		{[]string{"migrate", "--help"}, "reaper migrate applies"},
	} {
		res := runBinary(t, nil, tc.args...)
		if res.code != 0 || !strings.HasPrefix(res.stdout, tc.want) || res.stderr != "" {
			t.Errorf("%q: exit %d, stdout %.60q, stderr %q", tc.args, res.code, res.stdout, res.stderr)
		}
	}
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"--once", "--batch-size", "abc"}, nil, `reaper: --batch-size "abc": want a whole number from 1 to 100000 (default 1000)`},
		{[]string{"--once", "--batch-timeout", "5"}, nil, `reaper: --batch-timeout "5": a number needs a unit: want a Go duration such as 5s or 1m`},
		{nil, []string{"REAPER_ONCE=yes"}, `reaper: REAPER_ONCE="yes": want true or false (also accepted: 1, t, T, TRUE, True, 0, f, F, FALSE, False)`},
		{[]string{"--schedule", "*/61 * * * *"}, nil, `the minute step "61" is out of range: use a step of 1 to 59 (minute values are 0 to 59)`},
	} {
		res := runBinary(t, tc.env, tc.args...)
		if res.code != 2 || !strings.Contains(res.stderr, tc.want) {
			t.Errorf("%q (env %q): exit %d, stderr %q; want 2 and %q", tc.args, tc.env, res.code, res.stderr, tc.want)
		}
	}
}

// A dry run says "would delete", in its log line and on stdout, and deletes
// nothing; a real pass does not say it.
func testDryRunWording(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	env := []string{"DATABASE_URL=" + f.Cluster.URL()}
	res := runBinary(t, env, "--once", "--dry-run", "--schema", f.Schema)
	if res.code != 0 || !strings.Contains(res.stderr, `msg="reaper dry run done, would delete" schema=`+f.Schema+` holders=2 locks=6`) ||
		strings.Contains(res.stderr, "pass done") ||
		!strings.HasPrefix(res.stdout, "dry run: would delete 2 dead holder rows and 6 lock rows of dead holders") {
		t.Fatalf("dry run: exit %d, stdout %q, stderr %q", res.code, res.stdout, res.stderr)
	}
	if h, l := f.rows(t); h != 3 || l != 8 {
		t.Fatalf("the dry run deleted rows: %d holders, %d locks left", h, l)
	}
	res = runBinary(t, env, "--once", "--schema", f.Schema)
	if res.code != 0 || !strings.Contains(res.stderr, `msg="reaper pass done"`) || strings.Contains(res.stderr, "would") || res.stdout != "" {
		t.Fatalf("real pass: exit %d, stdout %q, stderr %q", res.code, res.stdout, res.stderr)
	}
}
