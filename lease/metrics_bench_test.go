package lease_test

import (
	"context"
	"testing"
	"time"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/pglease/pglease/lease"
)

// BenchmarkMetricsOverhead: uncontended table Acquire+Release by a client
// without a MeterProvider and by one with the SDK's (a ManualReader),
// interleaved on one durable cluster, each with a pool of its own and its
// own key. x_without is the ratio of the two.
//
//	go test -run '^$' -bench '^BenchmarkMetricsOverhead$' -benchtime 3000x ./lease/
func BenchmarkMetricsOverhead(b *testing.B) {
	e := newBench(b)
	r := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(r))
	b.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	without := e.client(lease.Config{}, 4, nil)
	with := e.client(lease.Config{MeterProvider: mp}, 4, nil)
	pair := func(c *lease.Client, k lease.Key) {
		l, err := c.Acquire(e.ctx, k)
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Release(e.ctx); err != nil {
			b.Fatal(err)
		}
	}
	kWithout, kWith := lease.Key{Name: "bench", ID: "without"}, lease.Key{Name: "bench", ID: "with"}
	const warm = 50 // register the holders, warm pools and caches
	for range warm {
		pair(without, kWithout)
		pair(with, kWith)
	}
	var tWithout, tWith time.Duration
	b.ResetTimer()
	for i := range b.N {
		for j := range 2 { // alternate which goes first
			start := time.Now()
			if (i+j)%2 == 0 {
				pair(without, kWithout)
				tWithout += time.Since(start)
			} else {
				pair(with, kWith)
				tWith += time.Since(start)
			}
		}
	}
	b.StopTimer()
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
	b.ReportMetric(float64(tWith)/float64(b.N), "ns/op")
	b.ReportMetric(us(tWithout, b.N), "without_us")
	b.ReportMetric(us(tWith, b.N), "with_us")
	b.ReportMetric(float64(tWith)/float64(tWithout), "x_without")
}
