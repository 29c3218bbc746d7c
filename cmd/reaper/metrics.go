package main

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pglease/pglease/reaper"
)

// metrics counts what the passes of this process did, for /metrics.
type metrics struct {
	mu           sync.Mutex
	holders      int64 // rows deleted, real passes only
	locks        int64
	skipped      int64
	passes       int64 // finished passes, failed or not (not interrupted ones)
	failures     int64
	lastSuccess  time.Time
	lastDuration time.Duration
}

// observe is the reaper's OnPass hook.
func (m *metrics) observe(st reaper.Stats, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !st.DryRun {
		m.holders += st.Holders
		m.locks += st.Locks
		m.skipped += st.Skipped
	}
	if errors.Is(err, reaper.ErrInterrupted) {
		return
	}
	m.passes++
	m.lastDuration = st.Duration
	if err != nil {
		m.failures++
		return
	}
	m.lastSuccess = time.Now()
}

// ServeHTTP writes the Prometheus text exposition format (version 0.0.4).
func (m *metrics) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	m.mu.Lock()
	holders, locks, skipped := m.holders, m.locks, m.skipped
	passes, failures := m.passes, m.failures
	var last float64
	if !m.lastSuccess.IsZero() {
		last = float64(m.lastSuccess.UnixMilli()) / 1000
	}
	dur := m.lastDuration.Seconds()
	m.mu.Unlock()

	var b strings.Builder
	metric := func(name, typ, help string, samples ...string) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
		for _, s := range samples {
			fmt.Fprintf(&b, "%s%s\n", name, s)
		}
	}
	metric("pglease_reaper_rows_reaped_total", "counter",
		"Rows of dead holders deleted by this process, by kind (holder or lock). Dry runs add nothing.",
		fmt.Sprintf(`{kind="holder"} %d`, holders),
		fmt.Sprintf(`{kind="lock"} %d`, locks))
	metric("pglease_reaper_rows_skipped_total", "counter",
		"Lock rows of dead holders left for a later pass because another transaction had them locked.",
		fmt.Sprintf(" %d", skipped))
	metric("pglease_reaper_passes_total", "counter",
		"Passes finished, successful or failed.",
		fmt.Sprintf(" %d", passes))
	metric("pglease_reaper_pass_failures_total", "counter",
		"Passes that failed.",
		fmt.Sprintf(" %d", failures))
	metric("pglease_reaper_last_success_timestamp_seconds", "gauge",
		"Unix time of the last successful pass; 0 before the first.",
		" "+strconv.FormatFloat(last, 'f', -1, 64))
	metric("pglease_reaper_last_pass_duration_seconds", "gauge",
		"Duration of the last finished pass.",
		" "+strconv.FormatFloat(dur, 'f', -1, 64))

	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	_, _ = w.Write([]byte(b.String()))
}
