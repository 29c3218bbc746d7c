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

// metrics counts what the passes of this process did, for /metrics, and
// tells /healthz whether the passes are failing.
type metrics struct {
	unhealthyAfter int // failed passes in a row that make /healthz fail

	mu           sync.Mutex
	holders      int64 // rows deleted, real passes only
	locks        int64
	skipped      int64
	passes       int64 // finished passes, failed or not (not interrupted ones)
	failures     int64
	lastSuccess  time.Time
	lastDuration time.Duration
	failedInRow  int    // failed passes since the last good one
	lastError    string // of the last failed pass
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
		m.failedInRow++
		m.lastError = err.Error()
		return
	}
	m.failedInRow = 0
	m.lastSuccess = time.Now()
}

// health is what /healthz answers: healthy until unhealthyAfter passes in a
// row have failed, and again after a good pass. The body says why.
func (m *metrics) health() (healthy bool, body string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failedInRow == 0 {
		return true, "ok\n"
	}
	passes := "passes"
	if m.failedInRow == 1 {
		passes = "pass"
	}
	state := "ok"
	healthy = m.failedInRow < m.unhealthyAfter
	if !healthy {
		state = "failing"
	}
	return healthy, fmt.Sprintf("%s: %d %s in a row failed (unhealthy after %d, --unhealthy-after); last error: %s\n",
		state, m.failedInRow, passes, m.unhealthyAfter, m.lastError)
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
