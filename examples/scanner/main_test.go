package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pglease/pglease/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// The demo, run as a reader runs it against a server of their own: a paused
// leader is succeeded and its late write rejected, a killed leader is
// succeeded by exactly one new leader, and the verdict is ok.
func TestScannerDemo(t *testing.T) {
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "scanner")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	c := pgtest.Shared(t)
	schema := pgtest.NewSchemaName()
	t.Cleanup(func() { pgtest.DropSchema(t, c, schema) })
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-schema", schema, "-ttl", "1s")
	cmd.Env = append(os.Environ(), "DATABASE_URL="+c.URL())
	// The demo starts scanner processes of its own, which share its output:
	// on a timeout the whole group goes, and the test fails with the output
	// so far rather than waiting for a scanner that holds the pipe.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	s := string(out)
	if err != nil || !strings.Contains(s, "\nverdict: ok — ") {
		t.Fatalf("scanner demo: %v; want exit 0 and an ok verdict:\n%s", err, s)
	}
	paused := regexp.MustCompile(`>>> paused the leader, pid (\d+) `).FindStringSubmatch(s)
	if paused == nil {
		t.Fatalf("no pause in the output:\n%s", s)
	}
	// The paused leader learns it lost, by its fenced write or its lease.
	if !regexp.MustCompile(`scanner \d+ \(pid ` + paused[1] + `\): (fenced write rejected|leadership ended): .*lost`).MatchString(s) {
		t.Errorf("the paused leader (pid %s) did not say it lost:\n%s", paused[1], s)
	}
	// After the kill, exactly one new leader until the verdict.
	_, afterKill, ok := strings.Cut(s, ">>> killed the leader")
	if !ok {
		t.Fatalf("no kill in the output:\n%s", s)
	}
	// Up to the verdict: at the end the scanners stop, and the leader's
	// release may let another lead for a moment.
	afterKill, _, _ = strings.Cut(afterKill, "\nverdict: ")
	if n := len(regexp.MustCompile(`(?m)^observer: scanner-\d+ \(pid \d+\) leads`).FindAllString(afterKill, -1)); n != 1 {
		t.Errorf("%d leaders observed after the kill, want exactly 1:\n%s", n, s)
	}
	if n := len(regexp.MustCompile(`(?m)^scanner \d+ \(pid \d+\): leading`).FindAllString(afterKill, -1)); n != 1 {
		t.Errorf("%d scanners started leading after the kill, want exactly 1:\n%s", n, s)
	}
	if !strings.Contains(s, `dropped schema "`+schema+`"`) {
		t.Errorf("the demo did not drop its schema:\n%s", s)
	}
}
