package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/migrations"
)

// fixture is a migrated schema with dead rows in it: 2 dead holders with 3
// lock rows each, and 1 live holder with 2.
type fixture struct {
	*pgtest.DB
	holders, locks string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	db := pgtest.NewDB(t)
	f := &fixture{DB: db, holders: db.Qualified("holders"), locks: db.Qualified("locks")}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f.AddLocks(ctx, t, f.AddHolders(ctx, t, 2, false), 3)
	f.AddLocks(ctx, t, f.AddHolders(ctx, t, 1, true), 2)
	return f
}

func (f *fixture) rows(t *testing.T) (holders, locks int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return f.Count(ctx, t, `SELECT count(*) FROM `+f.holders), f.Count(ctx, t, `SELECT count(*) FROM `+f.locks)
}

type result struct {
	code           int
	stdout, stderr string
}

func runIn(t *testing.T, ctx context.Context, env []string, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(ctx, args, env, &out, &errb)
	return result{code, out.String(), errb.String()}
}

func TestUsageErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{nil, nil, "give --once"},
		{[]string{"--bogus"}, nil, "unknown flag --bogus"},
		{[]string{"--once", "extra"}, nil, `unexpected argument "extra"`},
		{[]string{"--once", "--schedule", "@hourly"}, nil, "both given"},
		{[]string{"--schedule", "61 * * * *"}, nil, `invalid schedule "61 * * * *"`},
		{[]string{"--schedule", "*/61 * * * *"}, nil, `the minute step "61" is out of range: use a step of 1 to 59`},
		{[]string{"--schedule", "0 0 0 * *"}, nil, "the day-of-month 0 is out of range: day-of-month values are 1 to 31"},
		{[]string{"--schedule", "*/90 0 0 * * *"}, nil, `the second step "90" is out of range`},
		{[]string{"--schedule", "CRON_TZ=UTC 0 12-3 * * *"}, nil, "runs backwards"},
		{[]string{"--schedule", "0 0 * * 7"}, nil, "day-of-week values are 0 to 6 (0 is Sunday), or SUN to SAT"},
		{[]string{"--schedule", "@every 100ms"}, nil, "at least 1s"},
		{nil, []string{"REAPER_SCHEDULE=every minute"}, "invalid schedule"},
		{[]string{"--once", "--database-url", "postgres://u:hunter2@db:x/app"}, nil, "from --database-url cannot be parsed: invalid port"},
		{[]string{"--once"}, []string{"DATABASE_URL=host=db sslmode=bogus password=hunter2"}, "from DATABASE_URL cannot be parsed: failed to configure TLS"},
		{[]string{"--once", "--database-url", "postgres://u:hunter2@[::1/app"}, nil, "not a valid URL"},
		{[]string{"--once", "--batch-size", "0"}, nil, `--batch-size "0": want a whole number from 1 to 100000 (default 1000)`},
		{[]string{"--once", "--batch-size", "abc"}, nil, `--batch-size "abc": want a whole number from 1 to 100000 (default 1000)`},
		{[]string{"--once"}, []string{"REAPER_BATCH_SIZE=lots"}, `REAPER_BATCH_SIZE="lots": want a whole number from 1 to 100000`},
		{[]string{"--once", "--batch-timeout", "0s"}, nil, `--batch-timeout "0s": want a Go duration of at least 1ms, such as 5s or 1m`},
		{[]string{"--once", "--batch-timeout", "5"}, nil, `--batch-timeout "5": a number needs a unit: want a Go duration such as 5s or 1m`},
		{[]string{"--once"}, []string{"REAPER_BATCH_TIMEOUT=soon"}, `REAPER_BATCH_TIMEOUT="soon": want a Go duration such as 5s or 1m`},
		{[]string{"--once"}, []string{"REAPER_DRY_RUN=maybe"}, `REAPER_DRY_RUN="maybe": want true or false (also accepted: 1, t, T, TRUE, True, 0, f, F, FALSE, False)`},
		{nil, []string{"REAPER_ONCE=yes"}, `REAPER_ONCE="yes": want true or false`},
		{[]string{"--once=yes"}, nil, `--once "yes": want true or false`},
		{[]string{"--schedule", "@hourly", "--unhealthy-after", "0"}, nil, `--unhealthy-after "0": want a whole number from 1 to 1000000 (default 3)`},
		{[]string{"--once", "--schema"}, nil, "--schema needs a value"},
		{[]string{"--once", "--yes"}, nil, `--yes is a flag of "reaper migrate" only`},
		{[]string{"help", "sideways"}, nil, `no help on "sideways"`},
		{[]string{"--once", "--log-format", "xml"}, nil, "use text or json"},
		{[]string{"--once", "--log-level", "loud"}, nil, "use debug, info, warn or error"},
		{[]string{"--once", "--listen", ":0"}, nil, "--listen needs --schedule"},
		{[]string{"--schedule", "@hourly", "--listen", "9187"}, nil, "want host:port"},
		{[]string{"--once", "--schema", "pg_catalog"}, nil, "reserved by PostgreSQL"},
		{[]string{"migrate"}, nil, "needs an action"},
		{[]string{"migrate", "sideways"}, nil, "actions are up, status and down"},
		{[]string{"migrate", "down"}, nil, "add --yes"},
		{[]string{"migrate", "up", "--once"}, nil, `--once is not a flag of "reaper migrate"`},
		{[]string{"--dry-run", "migrate", "up"}, nil, `--dry-run is not a flag of "reaper migrate"`},
		{[]string{"migrate", "up", "--", "--schema"}, nil, `unexpected argument "--schema"`},
		{[]string{"migrate", "up", "now"}, nil, `unexpected argument "now"`},
	} {
		res := runIn(t, t.Context(), tc.env, tc.args...)
		if res.code != exitUsage || !strings.Contains(res.stderr, tc.want) || !strings.Contains(res.stderr, `Run "reaper help" for usage.`) {
			t.Errorf("run %q (env %q) = %d, stderr %q; want exit 2 and %q", tc.args, tc.env, res.code, res.stderr, tc.want)
		}
		if strings.Contains(res.stderr, "hunter2") {
			t.Errorf("run %q: the password is in the message: %s", tc.args, res.stderr)
		}
	}
}

func TestHelpAndVersion(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}, {"--schema", "x", "help"}, {"--help", "migrate"}} {
		res := runIn(t, t.Context(), nil, args...)
		if res.code != exitOK || !strings.Contains(res.stdout, "Examples:") || !strings.Contains(res.stdout, "Exit codes:") ||
			!strings.Contains(res.stdout, "--unhealthy-after N") {
			t.Errorf("%q: exit %d, stdout %q", args, res.code, res.stdout)
		}
	}
	for _, args := range [][]string{{"help", "migrate"}, {"migrate", "--help"}, {"migrate", "up", "-h"}} {
		res := runIn(t, t.Context(), nil, args...)
		if res.code != exitOK || !strings.HasPrefix(res.stdout, "reaper migrate applies") || !strings.Contains(res.stdout, "--yes") {
			t.Errorf("%q: exit %d, stdout %q; want the help of migrate", args, res.code, res.stdout)
		}
	}
	res := runIn(t, t.Context(), nil, "--version")
	if res.code != exitOK || !strings.HasPrefix(res.stdout, "reaper ") {
		t.Fatalf("--version: exit %d, stdout %q", res.code, res.stdout)
	}
}

func TestOnce(t *testing.T) {
	t.Parallel()
	f := newFixture(t)

	// The environment configures it; a flag wins over its variable.
	env := []string{"DATABASE_URL=" + f.Cluster.URL(), "REAPER_SCHEMA=wrong", "REAPER_LOG_FORMAT=json", "REAPER_DRY_RUN=true"}
	res := runIn(t, t.Context(), env, "--once", "--schema", f.Schema)
	if res.code != exitOK {
		t.Fatalf("dry run: exit %d: %s", res.code, res.stderr)
	}
	var line struct {
		Msg     string `json:"msg"`
		Holders int    `json:"holders"`
		Locks   int    `json:"locks"`
		DryRun  bool   `json:"dry_run"`
	}
	if err := json.Unmarshal([]byte(res.stderr), &line); err != nil {
		t.Fatalf("JSON log %q: %v", res.stderr, err)
	}
	if line.Msg != "reaper dry run done, would delete" || line.Holders != 2 || line.Locks != 6 || !line.DryRun {
		t.Fatalf("dry run log: %+v", line)
	}
	if want := fmt.Sprintf("dry run: would delete 2 dead holder rows and 6 lock rows of dead holders in schema %q; nothing was deleted\n", f.Schema); res.stdout != want {
		t.Fatalf("dry run summary %q; want %q", res.stdout, want)
	}
	if h, l := f.rows(t); h != 3 || l != 8 {
		t.Fatalf("dry run deleted rows: %d holders, %d locks left", h, l)
	}

	res = runIn(t, t.Context(), []string{"DATABASE_URL=" + f.Cluster.URL()}, "--once", "--schema", f.Schema, "--batch-size", "2")
	if res.code != exitOK || !strings.Contains(res.stderr, `msg="reaper pass done"`) ||
		!strings.Contains(res.stderr, "holders=2 locks=6") {
		t.Fatalf("once: exit %d, stderr %q", res.code, res.stderr)
	}
	if h, l := f.rows(t); h != 1 || l != 2 {
		t.Fatalf("after the pass: %d holders, %d locks, want the live 1 and 2", h, l)
	}
	// Nothing left to do: nothing logged.
	res = runIn(t, t.Context(), []string{"DATABASE_URL=" + f.Cluster.URL()}, "--once", "--schema", f.Schema)
	if res.code != exitOK || res.stderr != "" {
		t.Fatalf("idle pass: exit %d, stderr %q; want silence", res.code, res.stderr)
	}

	// A cancelled context (a signal) is a clean exit.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	res = runIn(t, ctx, []string{"DATABASE_URL=" + f.Cluster.URL()}, "--once", "--schema", f.Schema)
	if res.code != exitOK || !strings.Contains(res.stderr, "interrupted") {
		t.Fatalf("interrupted: exit %d, stderr %q", res.code, res.stderr)
	}
}

func TestOnceFailures(t *testing.T) {
	t.Parallel()
	url := pgtest.Shared(t).URL()
	res := runIn(t, t.Context(), []string{"DATABASE_URL=" + url}, "--once", "--schema", pgtest.NewSchemaName())
	if res.code != exitFailed || !strings.Contains(res.stderr, "schema not migrated") || !strings.Contains(res.stderr, "migrate up") ||
		!strings.Contains(res.stderr, " user=postgres ") || !strings.Contains(res.stderr, " database=postgres ") ||
		!strings.Contains(res.stderr, " host=127.0.0.1:") {
		t.Fatalf("unmigrated schema: exit %d, stderr %q; want the user, host and database named", res.code, res.stderr)
	}
	// A schema from before the reaping functions (version 3).
	f := newFixture(t)
	pgtest.DownTo(t, f.Pool, f.Schema, 3)
	res = runIn(t, t.Context(), []string{"DATABASE_URL=" + url}, "--once", "--schema", f.Schema)
	if res.code != exitFailed || !strings.Contains(res.stderr, `schema not migrated: schema \"`+f.Schema+`\" is at version 3; the reaper needs version 4`) ||
		!strings.Contains(res.stderr, "migrate up") {
		t.Fatalf("schema at version 3: exit %d, stderr %q; want 1 naming the versions", res.code, res.stderr)
	}
	if h, l := f.rows(t); h != 3 || l != 8 {
		t.Fatalf("a pass on a version 3 schema deleted rows: %d holders, %d locks left", h, l)
	}
	res = runIn(t, t.Context(), nil, "--once", "--database-url", "postgres://u:hunter2@127.0.0.1:"+closedPort(t)+"/db")
	if res.code != exitFailed || !strings.Contains(res.stderr, "database unreachable") ||
		!strings.Contains(res.stderr, "connection_settings=--database-url") || !strings.Contains(res.stderr, " user=u ") ||
		!strings.Contains(res.stderr, " database=db ") || strings.Contains(res.stderr, "hunter2") {
		t.Fatalf("unreachable: exit %d, stderr %q", res.code, res.stderr)
	}
}

// lines feeds what run writes to stderr to a channel, line by line.
func lines(t *testing.T) (io.WriteCloser, <-chan string) {
	pr, pw := io.Pipe()
	ch := make(chan string, 100)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			ch <- sc.Text()
		}
	}()
	t.Cleanup(func() { _ = pw.Close() })
	return pw, ch
}

// waitLine returns the first line matching re, failing after a minute.
func waitLine(t *testing.T, ch <-chan string, re string, seen *[]string) []string {
	t.Helper()
	rx := regexp.MustCompile(re)
	timeout := time.After(time.Minute)
	for {
		select {
		case l, ok := <-ch:
			if !ok {
				t.Fatalf("output ended without %q; got:\n%s", re, strings.Join(*seen, "\n"))
			}
			*seen = append(*seen, l)
			if m := rx.FindStringSubmatch(l); m != nil {
				return m
			}
		case <-timeout:
			t.Fatalf("no line matching %q within a minute; got:\n%s", re, strings.Join(*seen, "\n"))
		}
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// sample returns the value of the unlabelled sample name in a text
// exposition body.
func sample(t *testing.T, body, name string) float64 {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("/metrics has no sample %s:\n%s", name, body)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatalf("/metrics: %s %q: %v", name, m[1], err)
	}
	return v
}

// The daemon serves /healthz and /metrics, runs a pass at start and then on its schedule, and
// stops cleanly when its context is cancelled (as by SIGTERM).
func TestDaemon(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	w, out := lines(t)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--schedule", "* * * * * *", "--listen", "127.0.0.1:0", "--schema", f.Schema},
			[]string{"DATABASE_URL=" + f.Cluster.URL()}, io.Discard, w)
	}()
	var seen []string
	addr := waitLine(t, out, `msg="reaper listening" addr=(\S+)`, &seen)[1]
	// The first pass runs at start, before the schedule does.
	waitLine(t, out, `msg="reaper pass done" .*holders=2 locks=6`, &seen)
	waitLine(t, out, `msg="reaper started" .*schedule="\* \* \* \* \* \*".* first_pass=true`, &seen)
	if code, body := get(t, "http://"+addr+"/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	code, body := get(t, "http://"+addr+"/metrics")
	for _, want := range []string{
		"# TYPE pglease_reaper_rows_reaped_total counter\n",
		`pglease_reaper_rows_reaped_total{kind="holder"} 2` + "\n",
		`pglease_reaper_rows_reaped_total{kind="lock"} 6` + "\n",
		"pglease_reaper_pass_failures_total 0\n",
		"pglease_reaper_last_pass_duration_seconds ",
	} {
		if code != 200 || !strings.Contains(body, want) {
			t.Fatalf("/metrics (%d) lacks %q:\n%s", code, want, body)
		}
	}
	if m := regexp.MustCompile(`(?m)^pglease_reaper_passes_total (\d+)$`).FindStringSubmatch(body); m == nil || m[1] == "0" {
		t.Fatalf("/metrics: no passes counted:\n%s", body)
	}
	if v := sample(t, body, "pglease_reaper_last_success_timestamp_seconds"); v < float64(time.Now().Add(-time.Hour).Unix()) || v > float64(time.Now().Unix()+1) {
		t.Fatalf("/metrics: last success at %v, not within the last hour:\n%s", v, body)
	}
	if v := sample(t, body, "pglease_reaper_last_pass_duration_seconds"); v <= 0 || v > 60 {
		t.Fatalf("/metrics: last pass took %v s:\n%s", v, body)
	}
	// The Go runtime's and the process's own metrics, from the collectors.
	if v := sample(t, body, "go_goroutines"); v < 1 {
		t.Fatalf("/metrics: go_goroutines %v:\n%s", v, body)
	}
	if v := sample(t, body, "process_start_time_seconds"); v < float64(time.Now().Add(-time.Hour).Unix()) || v > float64(time.Now().Unix()+1) {
		t.Fatalf("/metrics: process_start_time_seconds %v is not this test's process:\n%s", v, body)
	}
	for _, want := range []string{"# TYPE go_gc_duration_seconds summary\n", "# TYPE process_cpu_seconds_total counter\n", "\nprocess_resident_memory_bytes "} {
		if !strings.Contains(body, want) {
			t.Fatalf("/metrics lacks %q:\n%s", want, body)
		}
	}
	cancel()
	if code := <-done; code != exitOK {
		t.Fatalf("daemon exit %d; output:\n%s", code, strings.Join(seen, "\n"))
	}
	waitLine(t, out, `msg="reaper stopped"`, &seen)
}

// "migrate status" only reads: on a schema that does not exist and on one
// that was never migrated it says so plainly, lists every migration as
// pending, exits 0, and creates nothing.
func TestMigrateStatusReadOnly(t *testing.T) {
	t.Parallel()
	c := pgtest.Shared(t)
	pool := pgtest.NewPool(t, c, "cli-test")
	objects := func(schema string) (schemas, relations int) {
		t.Helper()
		if err := pool.QueryRow(t.Context(), `SELECT
			(SELECT count(*) FROM pg_namespace WHERE nspname = $1),
			(SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1)`,
			schema).Scan(&schemas, &relations); err != nil {
			t.Fatal(err)
		}
		return schemas, relations
	}
	files, err := fs.Glob(migrations.FS(), "*.sql")
	if err != nil || len(files) < 4 {
		t.Fatalf("embedded migrations: %v, %v", files, err)
	}
	env := []string{"DATABASE_URL=" + c.URL()}
	pendingRow := regexp.MustCompile(`(?m)^\d+ +pending +- +\S+\.sql$`)

	missing := pgtest.NewSchemaName()
	empty := pgtest.NewSchemaName()
	t.Cleanup(func() { pgtest.DropSchema(t, c, empty) })
	if _, err := pool.Exec(t.Context(), "CREATE SCHEMA "+pgx.Identifier{empty}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	// Where it looked, as DATABASE_URL names it.
	cfg, err := pgconn.ParseConfig(c.URL())
	if err != nil {
		t.Fatal(err)
	}
	where := fmt.Sprintf("; looked as user %s on %s in database %s\n", cfg.User, net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))), cfg.Database)
	for _, tc := range []struct {
		schema, want string
		objects      [2]int
	}{
		{missing, fmt.Sprintf("schema %q does not exist: not migrated, every migration is pending (reaper migrate up creates it and applies them)", missing) + where, [2]int{0, 0}},
		{empty, fmt.Sprintf("schema %q is not migrated (no pglease_migrations table): every migration is pending (reaper migrate up applies them)", empty) + where, [2]int{1, 0}},
	} {
		res := runIn(t, t.Context(), env, "migrate", "status", "--schema", tc.schema)
		if res.code != exitOK || !strings.HasPrefix(res.stdout, tc.want) || res.stderr != "" ||
			len(pendingRow.FindAllString(res.stdout, -1)) != len(files) || strings.Contains(res.stdout, " applied ") {
			t.Errorf("migrate status of %s: exit %d, stdout %q, stderr %q; want 0, %q and every migration pending",
				tc.schema, res.code, res.stdout, res.stderr, tc.want)
		}
		if s, r := objects(tc.schema); [2]int{s, r} != tc.objects {
			t.Errorf("migrate status of %s left %d schemas and %d relations, want %v", tc.schema, s, r, tc.objects)
		}
	}
}
