package main

import (
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pglease/pglease/reaper"
)

// metrics counts what the passes of this process did, for /metrics (through
// a Prometheus registry of its own, with the Go and process collectors), and
// tells /healthz whether the passes are failing.
type metrics struct {
	unhealthyAfter int // failed passes in a row that make /healthz fail

	reg          *prometheus.Registry
	rowsReaped   *prometheus.CounterVec // by kind: holder, lock; real passes only
	rowsSkipped  prometheus.Counter
	passes       prometheus.Counter // finished passes, failed or not (not interrupted ones)
	failures     prometheus.Counter
	lastSuccess  prometheus.Gauge
	lastDuration prometheus.Gauge

	mu          sync.Mutex
	failedInRow int    // failed passes since the last good one
	lastError   string // of the last failed pass
}

func newMetrics(unhealthyAfter int) *metrics {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	gauge := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	}
	m := &metrics{
		unhealthyAfter: unhealthyAfter,
		reg:            prometheus.NewRegistry(),
		rowsReaped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pglease_reaper_rows_reaped_total",
			Help: "Rows of dead holders deleted by this process, by kind (holder or lock). Dry runs add nothing.",
		}, []string{"kind"}),
		rowsSkipped: counter("pglease_reaper_rows_skipped_total",
			"Lock rows of dead holders left for a later pass because another transaction had them locked."),
		passes:       counter("pglease_reaper_passes_total", "Passes finished, successful or failed."),
		failures:     counter("pglease_reaper_pass_failures_total", "Passes that failed."),
		lastSuccess:  gauge("pglease_reaper_last_success_timestamp_seconds", "Unix time of the last successful pass; 0 before the first."),
		lastDuration: gauge("pglease_reaper_last_pass_duration_seconds", "Duration of the last finished pass."),
	}
	// Both kinds from the start, at 0, as before the first pass.
	m.rowsReaped.WithLabelValues("holder")
	m.rowsReaped.WithLabelValues("lock")
	m.reg.MustRegister(m.rowsReaped, m.rowsSkipped, m.passes, m.failures, m.lastSuccess, m.lastDuration,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// observe is the reaper's OnPass hook.
func (m *metrics) observe(st reaper.Stats, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !st.DryRun {
		m.rowsReaped.WithLabelValues("holder").Add(float64(st.Holders))
		m.rowsReaped.WithLabelValues("lock").Add(float64(st.Locks))
		m.rowsSkipped.Add(float64(st.Skipped))
	}
	if errors.Is(err, reaper.ErrInterrupted) {
		return
	}
	m.passes.Inc()
	m.lastDuration.Set(st.Duration.Seconds())
	if err != nil {
		m.failures.Inc()
		m.failedInRow++
		m.lastError = err.Error()
		return
	}
	m.failedInRow = 0
	m.lastSuccess.Set(float64(time.Now().UnixMilli()) / 1000)
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

// handler serves /metrics in the format the scraper asks for (the
// Prometheus text format unless it asks for another).
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}
