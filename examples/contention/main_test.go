package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pglease/pglease/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// build builds the demo into a temporary directory.
func build(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "contention")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func schemaExists(t *testing.T, c *pgtest.Cluster, schema string) bool {
	t.Helper()
	pool := pgtest.NewPool(t, c, "contention-test")
	var n int
	if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM pg_namespace WHERE nspname = $1`, schema).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}

func exitCode(t *testing.T, err error) int {
	t.Helper()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return ee.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return 0
}

// The demo as a reader runs it, on a server of their own (DATABASE_URL),
// with short durations.
func TestDemo(t *testing.T) {
	t.Parallel()
	bin := build(t)
	c := pgtest.Shared(t)

	t.Run("verdict", func(t *testing.T) {
		t.Parallel()
		schema := pgtest.NewSchemaName()
		t.Cleanup(func() { pgtest.DropSchema(t, c, schema) })
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, "-schema", schema, "-ttl", "1s", "-work", "1s")
		cmd.WaitDelay = 10 * time.Second // its workers share the output: a timeout must not wait for them
		cmd.Env = append(os.Environ(), "DATABASE_URL="+c.URL())
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		code := exitCode(t, cmd.Run())
		s := out.String()
		if code != 0 || !regexp.MustCompile(`(?m)^verdict: ok — counters (\d+) = (\d+) completed sections; tokens increasing`).MatchString(s) {
			t.Fatalf("exit %d; want 0 and an ok verdict:\n%s", code, s)
		}
		for _, want := range []string{
			`dropping schema "` + schema + `" if it exists and creating it afresh; it is dropped again at the end`,
			"(alive = lease not yet run out; the reaper or a takeover removes it after)",
			`dropped schema "` + schema + `"`,
		} {
			if !strings.Contains(s, want) {
				t.Errorf("output lacks %q:\n%s", want, s)
			}
		}
		if m := regexp.MustCompile(`verdict: ok — counters (\d+) = (\d+)`).FindStringSubmatch(s); m == nil || m[1] != m[2] ||
			strings.Count(s, " done with token ") > mustAtoi(t, m[2]) {
			t.Errorf("verdict %v does not match the %d \"done\" lines", m, strings.Count(s, " done with token "))
		}
		if schemaExists(t, c, schema) {
			t.Errorf("schema %s left behind", schema)
		}
	})

	t.Run("interrupt", func(t *testing.T) {
		t.Parallel()
		schema := pgtest.NewSchemaName()
		t.Cleanup(func() { pgtest.DropSchema(t, c, schema) })
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, "-schema", schema, "-ttl", "1s", "-work", "30s")
		cmd.WaitDelay = 10 * time.Second // its workers share the output: a timeout must not wait for them
		cmd.Env = append(os.Environ(), "DATABASE_URL="+c.URL())
		pr, pw := io.Pipe()
		cmd.Stdout, cmd.Stderr = pw, pw
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string, 1000)
		go func() {
			defer close(lines)
			sc := bufio.NewScanner(pr)
			for sc.Scan() {
				lines <- sc.Text()
			}
		}()
		var seen []string
		for l := range lines { // the workers are at work
			seen = append(seen, l)
			if strings.Contains(l, " done with token ") {
				break
			}
		}
		if err := cmd.Process.Signal(syscall.SIGINT); err != nil { // Ctrl-C, to the demo alone
			t.Fatal(err)
		}
		code := exitCode(t, cmd.Wait())
		_ = pw.Close()
		for l := range lines {
			seen = append(seen, l)
		}
		s := strings.Join(seen, "\n")
		if code != 0 || !strings.Contains(s, "interrupted: workers stopped") || !strings.Contains(s, `dropped schema "`+schema+`"`) ||
			strings.Contains(s, "connection refused") {
			t.Fatalf("after SIGINT: exit %d; want 0 after cleaning up:\n%s", code, s)
		}
		if schemaExists(t, c, schema) {
			t.Errorf("schema %s left behind", schema)
		}
	})

	t.Run("no server binaries", func(t *testing.T) {
		t.Parallel()
		var env []string
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, "DATABASE_URL=") && !strings.HasPrefix(kv, pgtest.EnvBinDir+"=") {
				env = append(env, kv)
			}
		}
		cmd := exec.Command(bin)
		cmd.Env = append(env, pgtest.EnvBinDir+"="+t.TempDir())
		out, err := cmd.CombinedOutput()
		if code := exitCode(t, err); code != 1 || !strings.Contains(string(out), "or set DATABASE_URL to a PostgreSQL server") ||
			strings.Contains(string(out), "PGLEASE_TEST_DATABASE_URL") {
			t.Fatalf("exit %d, output %q; want 1 and a hint naming DATABASE_URL", code, out)
		}
	})
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
