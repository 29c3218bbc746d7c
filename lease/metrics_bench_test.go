package lease_test

import (
	"context"
	"testing"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/pglease/pglease/lease"
)

// BenchmarkMetricsOverhead: uncontended table Acquire+Release by a client
// without a MeterProvider and by one with the SDK's (a ManualReader), and by
// a second client without one as a control, interleaved on one durable
// cluster, each with a pool and a key of its own. x_without is the ratio of
// the first two; x_control that of the two clients without, which shows how
// far two identical arms drift apart on this machine in the same run.
//
//	go test -run '^$' -bench '^BenchmarkMetricsOverhead$' -benchtime 3000x ./lease/
func BenchmarkMetricsOverhead(b *testing.B) {
	e := newBench(b)
	r := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(r))
	b.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	pair := func(c *lease.Client, id string) func() {
		return e.acquireRelease(c.Acquire, lease.Key{Name: "bench", ID: id})
	}
	arms := []func(){
		pair(e.client(lease.Config{}, 4, nil), "without"),
		pair(e.client(lease.Config{MeterProvider: mp}, 4, nil), "with"),
		pair(e.client(lease.Config{}, 4, nil), "control"),
	}
	const warm = 50 // register the holders, warm pools and caches
	t := interleaved(b, warm, arms...)
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		b.Fatal(err)
	}
	var recorded uint64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == "pglease.lock.acquire.duration" {
				for _, p := range m.Data.(metricdata.Histogram[float64]).DataPoints {
					recorded += p.Count
				}
			}
		}
	}
	if recorded != uint64(b.N+warm) {
		b.Fatalf("%d acquires recorded, want %d", recorded, b.N+warm)
	}
	without, with, control := t[0], t[1], t[2]
	b.ReportMetric(float64(with)/float64(b.N), "ns/op")
	b.ReportMetric(us(without, b.N), "without_us")
	b.ReportMetric(us(with, b.N), "with_us")
	b.ReportMetric(us(control, b.N), "control_us")
	b.ReportMetric(float64(with)/float64(without), "x_without")
	b.ReportMetric(float64(control)/float64(without), "x_control")
}
