package main

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/pglease/pglease/reaper"
)

// /metrics keeps every name and meaning of the hand-written exposition it
// replaced: rows count real passes only, interrupted passes are not passes,
// the last success and duration are those of the last finished pass. Each
// process's registry is its own: two metrics values never share a count.
func TestMetricsExposition(t *testing.T) {
	t.Parallel()
	m := newMetrics(3)
	other := newMetrics(3) // counts of its own, which must not show in m's
	other.observe(reaper.Stats{Holders: 100, Locks: 100}, nil)

	scrape := func() string {
		t.Helper()
		rec := httptest.NewRecorder()
		m.handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
		if rec.Code != http.StatusOK {
			t.Fatalf("/metrics: %d", rec.Code)
		}
		if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
			t.Fatalf("/metrics Content-Type %q", ct)
		}
		b, _ := io.ReadAll(rec.Body)
		return string(b)
	}
	want := func(body string, lines ...string) {
		t.Helper()
		for _, l := range lines {
			if !strings.Contains(body, "\n"+l+"\n") {
				t.Fatalf("/metrics lacks the line %q:\n%s", l, body)
			}
		}
	}

	want(scrape(),
		"# TYPE pglease_reaper_rows_reaped_total counter",
		`pglease_reaper_rows_reaped_total{kind="holder"} 0`,
		`pglease_reaper_rows_reaped_total{kind="lock"} 0`,
		"# TYPE pglease_reaper_rows_skipped_total counter",
		"pglease_reaper_rows_skipped_total 0",
		"# TYPE pglease_reaper_passes_total counter",
		"pglease_reaper_passes_total 0",
		"# TYPE pglease_reaper_pass_failures_total counter",
		"pglease_reaper_pass_failures_total 0",
		"# TYPE pglease_reaper_last_success_timestamp_seconds gauge",
		"pglease_reaper_last_success_timestamp_seconds 0",
		"# TYPE pglease_reaper_last_pass_duration_seconds gauge",
		"pglease_reaper_last_pass_duration_seconds 0",
	)

	before := time.Now()
	m.observe(reaper.Stats{Holders: 2, Locks: 6, Skipped: 1, Duration: 250 * time.Millisecond}, nil)
	m.observe(reaper.Stats{Holders: 5, Locks: 5, DryRun: true, Duration: time.Second}, nil)          // a dry run: no rows
	m.observe(reaper.Stats{Holders: 1, Duration: time.Hour}, reaper.ErrInterrupted)                  // not a pass, but its rows are gone
	m.observe(reaper.Stats{Locks: 3, Duration: 1500 * time.Millisecond}, errors.New("batch failed")) // failed after one batch
	body := scrape()
	want(body,
		`pglease_reaper_rows_reaped_total{kind="holder"} 3`,
		`pglease_reaper_rows_reaped_total{kind="lock"} 9`,
		"pglease_reaper_rows_skipped_total 1",
		"pglease_reaper_passes_total 3",
		"pglease_reaper_pass_failures_total 1",
		"pglease_reaper_last_pass_duration_seconds 1.5",
	)
	last := sample(t, body, "pglease_reaper_last_success_timestamp_seconds")
	if last < float64(before.UnixMilli())/1000 || last > float64(time.Now().UnixMilli())/1000 {
		t.Fatalf("last success %v, not between %v and now", last, before)
	}
	if healthy, why := m.health(); !healthy || !strings.Contains(why, "1 pass in a row failed") {
		t.Fatalf("health after one failure: %v %q", healthy, why)
	}
	// The Go and process collectors.
	for _, name := range []string{"go_goroutines", "process_start_time_seconds"} {
		if v := sample(t, body, name); v <= 0 {
			t.Fatalf("%s = %v", name, v)
		}
	}
	if v := sample(t, body, "process_cpu_seconds_total"); v < 0 {
		t.Fatalf("process_cpu_seconds_total = %v", v)
	}
}
