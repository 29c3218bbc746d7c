// Package fuzzseed loads the seed corpora of the fuzz tests from the
// repository's top-level testdata/fuzz folder, where the project keeps its
// fixtures.
//
// The files are in the format go test writes (a "go test fuzz v1" line, then
// one Go literal per argument), so an input that `go test -fuzz` finds and
// saves under <package>/testdata/fuzz/FuzzXxx can be promoted by copying the
// file into testdata/fuzz/FuzzXxx. Go runs its own folder's files as seeds
// too; this package adds the shared ones through testing.F.Add.
package fuzzseed

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// Add adds every corpus file in dir as a seed of f.
func Add(f *testing.F, dir string) {
	f.Helper()
	seeds, err := Load(dir)
	if err != nil {
		f.Fatalf("fuzzseed: %v", err)
	}
	if len(seeds) == 0 {
		f.Fatalf("fuzzseed: no seed files in %s", dir)
	}
	for _, s := range seeds {
		f.Add(s...)
	}
}

// Load reads every file in dir, in name order, and returns each file's
// values.
func Load(dir string) ([][]any, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		if !e.IsDir() {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	var out [][]any
	for _, name := range names {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, err
		}
		vals, err := Parse(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Join(dir, name), err)
		}
		out = append(out, vals)
	}
	return out, nil
}

// Parse decodes one corpus file. It knows the types the project's fuzz
// targets take: string, []byte, int64 and bool.
func Parse(b []byte) ([]any, error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	if !sc.Scan() || strings.TrimSpace(sc.Text()) != "go test fuzz v1" {
		return nil, fmt.Errorf(`the first line must be "go test fuzz v1"`)
	}
	var vals []any
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		typ, arg, ok := strings.Cut(line, "(")
		if !ok || !strings.HasSuffix(arg, ")") {
			return nil, fmt.Errorf("line %q: want type(literal)", line)
		}
		arg = strings.TrimSuffix(arg, ")")
		switch typ {
		case "string", "[]byte":
			s, err := strconv.Unquote(arg)
			if err != nil {
				return nil, fmt.Errorf("line %q: %w", line, err)
			}
			if typ == "string" {
				vals = append(vals, s)
			} else {
				vals = append(vals, []byte(s))
			}
		case "int64":
			n, err := strconv.ParseInt(arg, 0, 64)
			if err != nil {
				return nil, fmt.Errorf("line %q: %w", line, err)
			}
			vals = append(vals, n)
		case "bool":
			v, err := strconv.ParseBool(arg)
			if err != nil {
				return nil, fmt.Errorf("line %q: %w", line, err)
			}
			vals = append(vals, v)
		default:
			return nil, fmt.Errorf("line %q: type %s is not supported", line, typ)
		}
	}
	return vals, sc.Err()
}
