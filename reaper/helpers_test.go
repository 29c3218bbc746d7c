package reaper_test

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
)

// capture is a slog handler that keeps the text of every record and signals
// when a skipped run is logged.
type capture struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	skipped chan struct{}
}

func (c *capture) Enabled(context.Context, slog.Level) bool { return true }
func (c *capture) WithAttrs([]slog.Attr) slog.Handler       { return c }
func (c *capture) WithGroup(string) slog.Handler            { return c }

func (c *capture) Handle(ctx context.Context, r slog.Record) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := slog.NewTextHandler(&c.buf, &slog.HandlerOptions{Level: slog.LevelDebug}).Handle(ctx, r); err != nil {
		return err
	}
	if strings.Contains(r.Message, "skipped") && c.skipped != nil {
		select {
		case c.skipped <- struct{}{}:
		default:
		}
	}
	return nil
}

func (c *capture) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// readGrants returns examples/reaper/grants.sql for schema and role.
func readGrants(t *testing.T, schema, role string) string {
	t.Helper()
	b, err := os.ReadFile("../examples/reaper/grants.sql")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "--") {
			continue
		}
		line = strings.ReplaceAll(line, "SCHEMA lease ", "SCHEMA "+pgx.Identifier{schema}.Sanitize()+" ")
		line = strings.ReplaceAll(line, "lease.", pgx.Identifier{schema}.Sanitize()+".")
		line = strings.ReplaceAll(line, "pglease_reaper", pgx.Identifier{role}.Sanitize())
		out = append(out, line)
	}
	sql := strings.Join(out, "\n")
	if !strings.Contains(sql, "grant_reaper(") {
		t.Fatal("grants.sql does not call grant_reaper")
	}
	return sql
}
