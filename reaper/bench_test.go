package reaper_test

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
	"github.com/pglease/pglease/reaper"
)

// BenchmarkAcquireReleaseWhileReaping measures what a reaper pass costs the
// application: the latency of Acquire+Release pairs of a lease.Client with no
// reaper running, then while a pass deletes a backlog of 200,000 dead lock
// rows next to it, in the same run, for two batch sizes. Each iteration
// builds its backlog (not timed) and takes several seconds; run it with
// -benchtime=1x:
//
//	go test -run '^$' -bench AcquireReleaseWhileReaping -benchtime=1x ./reaper/
func BenchmarkAcquireReleaseWhileReaping(b *testing.B) {
	for _, size := range []int{100, reaper.BatchSizeDefault} {
		b.Run("batch="+strconv.Itoa(size), func(b *testing.B) { acquireWhileReaping(b, size) })
	}
}

func acquireWhileReaping(b *testing.B, batchSize int) {
	const (
		deadHolders = 200
		perHolder   = 1000
		idlePairs   = 3000
		keys        = 64
	)
	f := newFx(b)
	ctx := ctxFor(b, 15*time.Minute)
	pool := pgtest.NewPool(b, f.Cluster, "bench-client", func(c *pgxpool.Config) { c.MaxConns = 4 })
	c, err := lease.New(pool, &lease.Config{Schema: f.Schema})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = c.Close(context.Background()) }()
	r := f.reaper(pgtest.NewPool(b, f.Cluster, "bench-reaper"), reaper.Config{BatchSize: batchSize})

	pair := func(i int) time.Duration {
		start := time.Now()
		l, err := c.Acquire(ctx, lease.Key{Name: "bench", ID: strconv.Itoa(i % keys)})
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Release(ctx); err != nil {
			b.Fatal(err)
		}
		return time.Since(start)
	}
	for i := range 2 * keys { // register the holder, warm the pools
		pair(i)
	}

	var idle, reaping []time.Duration
	var reaped int64
	var passTime time.Duration
	for range b.N {
		b.StopTimer()
		f.addLocks(ctx, f.addHolders(ctx, deadHolders, false), perHolder)
		if _, err := f.Pool.Exec(ctx, "VACUUM ANALYZE "+f.holders+", "+f.locks); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()

		for i := range idlePairs {
			idle = append(idle, pair(i))
		}

		done := make(chan struct{})
		var st reaper.Stats
		var perr error
		go func() {
			defer close(done)
			st, perr = r.RunOnce(ctx)
		}()
	loop:
		for i := 0; ; i++ {
			select {
			case <-done:
				break loop
			default:
			}
			reaping = append(reaping, pair(i))
		}
		if perr != nil {
			b.Fatal(perr)
		}
		if st.Locks != deadHolders*perHolder {
			b.Fatalf("pass reaped %+v, want %d lock rows", st, deadHolders*perHolder)
		}
		reaped += st.Locks
		passTime += st.Duration
	}
	b.StopTimer()
	b.ReportMetric(pct(idle, 50), "p50-idle-µs")
	b.ReportMetric(pct(idle, 99), "p99-idle-µs")
	b.ReportMetric(pct(reaping, 50), "p50-reaping-µs")
	b.ReportMetric(pct(reaping, 99), "p99-reaping-µs")
	b.ReportMetric(float64(len(reaping))/float64(b.N), "pairs-during-pass")
	b.ReportMetric(float64(reaped)/passTime.Seconds(), "reaped-rows/s")
}

// pct returns the p-th percentile of ds in microseconds.
func pct(ds []time.Duration, p int) float64 {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := min(len(s)-1, (len(s)*p+99)/100-1)
	return float64(s[max(i, 0)].Microseconds())
}
