package lease_test

// Benchmarks of the advisory fast path, each next to its raw baseline in the
// same run, on a durable cluster of its own (see bench_test.go for the
// helpers and internal/benchtable for the table).

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// BenchmarkAdvisoryUncontended: Advisory Acquire+Release of a free key, and
// TryAcquire+Release, against a raw pg_advisory_lock + pg_advisory_unlock pair
// on a connection of its own, interleaved (in shuffled order). A second
// baseline, raw_token, is the same pair doing what a naive advisory path
// would add: the lock statement draws a token from token_seq durably (every
// 32nd draw logs the sequence and so commits with a WAL flush) and the unlock
// statement always sends the release notification (which takes a transaction
// id). The advisory path does neither: see token_guard and mark_listening in
// the migrations.
//
//	go test -run '^$' -bench AdvisoryUncontended -benchtime 20000x ./lease/
func BenchmarkAdvisoryUncontended(b *testing.B) {
	e := newBench(b)
	c := e.client(lease.Config{}, 4, nil)
	a := c.Advisory()
	rawConn, err := pgx.Connect(e.ctx, e.cl.URL())
	if err != nil {
		b.Fatal(err)
	}
	defer rawConn.Close(context.Background())
	k := lease.Key{Name: "bench", ID: "1"}
	acquire := func(try bool) {
		var l *lease.Lock
		var err error
		if try {
			l, err = a.TryAcquire(e.ctx, k)
		} else {
			l, err = a.Acquire(e.ctx, k)
		}
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Release(e.ctx); err != nil {
			b.Fatal(err)
		}
	}
	raw := func() {
		if _, err := rawConn.Exec(e.ctx, "SELECT pg_advisory_lock(42)"); err != nil {
			b.Fatal(err)
		}
		if _, err := rawConn.Exec(e.ctx, "SELECT pg_advisory_unlock(42)"); err != nil {
			b.Fatal(err)
		}
	}
	seq := e.table("token_seq")
	channel := "pglease_bench"
	rawToken := func() {
		if _, err := rawConn.Exec(e.ctx, "SELECT pg_advisory_lock(43), nextval('"+seq+"')"); err != nil {
			b.Fatal(err)
		}
		if _, err := rawConn.Exec(e.ctx, "SELECT pg_advisory_unlock(43), pg_notify($1, $2)", channel, `[["bench","1",1]]`); err != nil {
			b.Fatal(err)
		}
	}
	for range 100 { // open the pinned connection, warm caches
		acquire(false)
		acquire(true)
		raw()
		rawToken()
	}
	var tAcq, tTry, tRaw, tRawToken time.Duration
	// Each round runs the four in a shuffled order (seeded: every run the
	// same), so that each follows each of the others equally often: a fixed
	// rotation made the blocking acquire always follow raw_token's durable
	// commit and pay for it.
	rng := rand.New(rand.NewPCG(1, 2))
	order := []int{0, 1, 2, 3}
	b.ResetTimer()
	for range b.N {
		rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
		for _, op := range order {
			start := time.Now()
			switch op {
			case 0:
				acquire(false)
				tAcq += time.Since(start)
			case 1:
				acquire(true)
				tTry += time.Since(start)
			case 2:
				raw()
				tRaw += time.Since(start)
			case 3:
				rawToken()
				tRawToken += time.Since(start)
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(tAcq)/float64(b.N), "ns/op")
	b.ReportMetric(us(tAcq, b.N), "acquire_us")
	b.ReportMetric(us(tTry, b.N), "try_us")
	b.ReportMetric(us(tRaw, b.N), "raw_us")
	b.ReportMetric(float64(tAcq)/float64(tRaw), "x_raw")
	b.ReportMetric(float64(tTry)/float64(tRaw), "try_x_raw")
	b.ReportMetric(us(tRawToken, b.N), "raw_token_us")
	b.ReportMetric(float64(tAcq)/float64(tRawToken), "x_raw_token")
}

// oneKeyAdvisoryMode runs Advisory handles of separate clients that each take
// the key, hold it, release it and start over, until limit acquisitions.
func oneKeyAdvisoryMode(e *bench, advs []*lease.Advisory, hold time.Duration, limit int) handoffStats {
	k := lease.Key{Name: "bench", ID: "one"}
	h := newHandoffs(len(advs), limit)
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	var wg sync.WaitGroup
	for i, a := range advs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				l, err := a.Acquire(ctx, k)
				if err != nil {
					if ctx.Err() == nil {
						e.b.Errorf("acquire: %v", err)
					}
					return
				}
				more := h.acquired(i)
				if more && hold > 0 {
					time.Sleep(hold)
				}
				h.releasing()
				if err := l.Release(e.ctx); err != nil {
					e.b.Errorf("release: %v", err)
					return
				}
				if !more || h.done() {
					cancel() // the others wait in the server: cancel their waits
					return
				}
			}
		}()
	}
	wg.Wait()
	return h.stats()
}

// BenchmarkAdvisoryOneKey8Clients: eight clients take turns on one key on the
// advisory path, holding it 0 ms, against eight connections blocking in a raw
// pg_advisory_lock (b.N/2 handoffs before and after).
//
//	go test -run '^$' -bench AdvisoryOneKey8Clients -benchtime 20000x ./lease/
func BenchmarkAdvisoryOneKey8Clients(b *testing.B) {
	cl := pgtest.Owned(b, pgtest.Options{})
	e := newBenchOn(b, cl)
	const n = 8
	advs := make([]*lease.Advisory, n)
	conns := make([]*pgx.Conn, n)
	for i := range advs {
		advs[i] = e.client(lease.Config{}, 2, nil).Advisory()
		conn, err := pgx.Connect(e.ctx, cl.URL())
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close(context.Background())
		conns[i] = conn
	}
	oneKeyAdvisoryMode(e, advs, 0, 400) // open the pinned connections
	oneKeyAdvisory(e, conns, 0, 400)

	b.ResetTimer()
	raw1 := oneKeyAdvisory(e, conns, 0, max(b.N/2, 2))
	s := oneKeyAdvisoryMode(e, advs, 0, max(b.N, 2))
	raw2 := oneKeyAdvisory(e, conns, 0, max(b.N/2, 2))
	b.StopTimer()
	raw := (raw1.perSec + raw2.perSec) / 2
	if s.elapsed > 0 {
		b.ReportMetric(float64(s.elapsed)/float64(s.count), "ns/op")
	}
	b.ReportMetric(s.perSec, "handoffs/s")
	b.ReportMetric(s.p50, "p50_ms")
	b.ReportMetric(s.p99, "p99_ms")
	b.ReportMetric(s.minShare, "min_share")
	b.ReportMetric(s.maxShare, "max_share")
	b.ReportMetric(raw, "raw_handoffs/s")
	b.ReportMetric((raw1.p50+raw2.p50)/2, "raw_p50_ms")
	b.ReportMetric((raw1.p99+raw2.p99)/2, "raw_p99_ms")
	b.ReportMetric(s.perSec/raw, "x_raw")
}
