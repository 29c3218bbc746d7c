package pgtest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// outcome is how a helper ended a test: the text it skipped or failed with.
type outcome struct {
	testing.TB
	skipped, failed string
}

func (o *outcome) Helper()        {}
func (o *outcome) Cleanup(func()) {}
func (o *outcome) Skip(args ...any) {
	o.skipped = fmt.Sprint(args...)
	runtime.Goexit()
}
func (o *outcome) Fatal(args ...any) {
	o.failed = fmt.Sprint(args...)
	runtime.Goexit()
}
func (o *outcome) Fatalf(format string, args ...any) {
	o.failed = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// end runs f as a test body on a goroutine of its own, as the testing package
// does, so that Skip and Fatal end only f.
func end(t *testing.T, f func(tb testing.TB)) *outcome {
	o := &outcome{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(o)
	}()
	<-done
	return o
}

// oneLine fails unless s is a single line with the "pgtest: " prefix once.
func oneLine(t *testing.T, what, s string) {
	t.Helper()
	if strings.Contains(s, "\n") || !strings.HasPrefix(s, "pgtest: ") || strings.Count(s, "pgtest:") != 1 {
		t.Errorf("%s: %q; want one line starting with a single \"pgtest: \"", what, s)
	}
}

// Not t.Parallel: these tests set environment variables.

func TestRequireProgram(t *testing.T) {
	dir := t.TempDir()
	prog := filepath.Join(dir, "some-tool")
	if err := os.WriteFile(prog, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir)
	t.Setenv(EnvCI, "")
	if got := RequireProgram(t, "some-tool"); got != prog {
		t.Fatalf("on PATH: %q, want %q", got, prog)
	}
	if got := RequireProgram(t, "other-tool", "missing-tool", prog); got != prog {
		t.Fatalf("as a candidate path: %q, want %q", got, prog)
	}

	o := end(t, func(tb testing.TB) { RequireProgram(tb, "absent-tool", "/nonexistent/absent-tool") })
	if o.failed != "" || o.skipped == "" {
		t.Fatalf("missing outside CI: skipped %q, failed %q; want a skip", o.skipped, o.failed)
	}
	oneLine(t, "skip reason", o.skipped)
	if !strings.Contains(o.skipped, "absent-tool, /nonexistent/absent-tool") {
		t.Errorf("skip reason %q does not say where it looked", o.skipped)
	}

	t.Setenv(EnvCI, "true")
	o = end(t, func(tb testing.TB) { RequireProgram(tb, "absent-tool") })
	if o.skipped != "" || !strings.Contains(o.failed, "absent-tool") || !strings.Contains(o.failed, "CI=true") {
		t.Fatalf("missing under CI=true: skipped %q, failed %q; want a failure", o.skipped, o.failed)
	}
	oneLine(t, "failure", o.failed)
}

func TestOwnedWithoutServerBinaries(t *testing.T) {
	t.Setenv(EnvBinDir, t.TempDir()) // a directory without initdb and postgres
	t.Setenv(EnvURL, "postgres://127.0.0.1:1/unused")
	t.Setenv(EnvCI, "")

	_, err := Start(Options{})
	if !errors.Is(err, ErrNoServerBinaries) {
		t.Fatalf("Start: %v; want ErrNoServerBinaries", err)
	}
	oneLine(t, "Start error", err.Error())

	o := end(t, func(tb testing.TB) { Owned(tb, Options{}) })
	if o.failed != "" || o.skipped == "" {
		t.Fatalf("outside CI: skipped %q, failed %q; want a skip", o.skipped, o.failed)
	}
	oneLine(t, "skip reason", o.skipped)
	if strings.Contains(o.skipped, "set "+EnvURL) {
		t.Errorf("skip reason %q suggests %s, which cannot stand in for an owned cluster", o.skipped, EnvURL)
	}

	t.Setenv(EnvCI, "true")
	o = end(t, func(tb testing.TB) { Owned(tb, Options{}) })
	if o.skipped != "" || !errors.Is(err, ErrNoServerBinaries) || !strings.Contains(o.failed, "no PostgreSQL server binaries") {
		t.Fatalf("under CI=true: skipped %q, failed %q; want a failure", o.skipped, o.failed)
	}
	oneLine(t, "failure", o.failed)
}

// Without a URL, the shared cluster's error suggests one, once.
func TestSharedErrorWithoutServerBinaries(t *testing.T) {
	t.Setenv(EnvBinDir, t.TempDir())
	t.Setenv(EnvURL, "")
	_, err := sharedCluster()
	if !errors.Is(err, ErrNoServerBinaries) || strings.Count(err.Error(), EnvURL) != 1 {
		t.Fatalf("sharedCluster: %v; want ErrNoServerBinaries naming %s once", err, EnvURL)
	}
	oneLine(t, "error", err.Error())
}
