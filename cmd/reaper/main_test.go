package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/pglease/pglease/internal/pgtest"
)

// binary is the reaper built by TestMain for TestBinary's subprocess tests;
// TestBinary removes it when it ends.
var binary string

func TestMain(m *testing.M) {
	flag.Parse()
	if wantsTest("TestBinary") {
		dir, err := os.MkdirTemp("", "pglease-reaper-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		binary = filepath.Join(dir, "reaper")
		if err := buildBinary(); err != nil {
			_ = os.RemoveAll(dir)
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	pgtest.Main(m)
}

// buildBinary builds the reaper into the path binary names.
func buildBinary() error {
	cmd := exec.Command("go", "build", "-o", binary, "-ldflags", "-X main.version=v0.0.0-test", ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	return nil
}

// wantsTest reports whether -test.run and -test.skip let the top-level test
// name run, so that a filtered run does not build (and leave) a binary.
func wantsTest(name string) bool {
	matches := func(flagName string) (bool, bool) {
		f := flag.Lookup(flagName)
		if f == nil || f.Value.String() == "" {
			return false, false
		}
		top, _, _ := strings.Cut(f.Value.String(), "/")
		re, err := regexp.Compile(top)
		return err != nil || re.MatchString(name), true
	}
	if m, set := matches("test.run"); set && !m {
		return false
	}
	if m, set := matches("test.skip"); set && m && !strings.Contains(flag.Lookup("test.skip").Value.String(), "/") {
		return false
	}
	return true
}
