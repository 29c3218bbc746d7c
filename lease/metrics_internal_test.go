package lease

import (
	"context"
	"strings"
	"testing"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
)

// Every LossReason has an attribute value: a new reason without one would go
// uncounted.
func TestLossReasonNames(t *testing.T) {
	n := 0
	for r := LossReason(1); !strings.HasPrefix(r.String(), "LossReason("); r++ {
		if int(r) >= len(lossNames) || lossNames[r] == "" {
			t.Fatalf("%v (%d) has no metric attribute value in lossNames", r, int(r))
		}
		n++
	}
	if n != 4 {
		t.Fatalf("%d loss reasons, want 4", n)
	}
}

// metricHooks is what one uncontended Acquire and its Release ask of m.
func metricHooks(ctx context.Context, m *meters, l *Lock) {
	obs := m.startAcquire(tableMode{}, Exclusive)
	obs.attempt()
	m.heldChange(l, 1)
	obs.done(ctx, nil)
	m.heldChange(l, -1)
}

// Without a MeterProvider the hooks allocate nothing and read no clock.
func TestNoMetersAllocateNothing(t *testing.T) {
	m, err := newMeters(nil)
	if m != nil || err != nil {
		t.Fatalf("newMeters(nil) = %v, %v", m, err)
	}
	if !m.now().IsZero() {
		t.Fatal("now() without instruments reads the clock")
	}
	l := &Lock{mode: &tableLock{}}
	ctx := context.Background()
	if n := testing.AllocsPerRun(1000, func() { metricHooks(ctx, m, l) }); n != 0 {
		t.Fatalf("%v allocations per acquire and release without instruments", n)
	}
}

// BenchmarkMetricHooks: the CPU cost of the instrumentation of one
// Acquire+Release, without a MeterProvider and with the SDK's (a
// ManualReader), with no database in the way.
//
//	go test -run '^$' -bench MetricHooks ./lease/
func BenchmarkMetricHooks(b *testing.B) {
	l := &Lock{mode: &tableLock{}}
	ctx := context.Background()
	b.Run("none", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			metricHooks(ctx, nil, l)
		}
	})
	b.Run("sdk", func(b *testing.B) {
		mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
		defer func() { _ = mp.Shutdown(ctx) }()
		m, err := newMeters(mp)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			metricHooks(ctx, m, l)
		}
	})
}
