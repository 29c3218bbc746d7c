package lease_test

// Benchmarks of the lock kinds of schema version 6 (shared locks, semaphore
// permits, key sets), each next to a baseline measured in the same run on a
// durable cluster of its own (see bench_test.go for the helpers and
// internal/benchtable for the table).

import (
	"context"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// BenchmarkSharedUncontended: AcquireShared+Release of a free key by one
// client, against exclusive Acquire+Release of another key by the same
// client and a raw durable INSERT+DELETE pair, interleaved.
//
//	go test -run '^$' -bench '^BenchmarkSharedUncontended$' -benchtime 2000x ./lease/
func BenchmarkSharedUncontended(b *testing.B) {
	e := newBench(b)
	rawOnce := e.rawPairOp()
	c := e.client(lease.Config{}, 4, nil)
	shared := e.acquireRelease(c.AcquireShared, lease.Key{Name: "bench", ID: "shared"})
	exclusive := e.acquireRelease(c.Acquire, lease.Key{Name: "bench", ID: "exclusive"})
	t := interleaved(b, 50, shared, exclusive, rawOnce)
	tShared, tExcl, tRaw := t[0], t[1], t[2]
	b.ReportMetric(float64(tShared)/float64(b.N), "ns/op")
	b.ReportMetric(us(tShared, b.N), "shared_us")
	b.ReportMetric(us(tExcl, b.N), "exclusive_us")
	b.ReportMetric(us(tRaw, b.N), "raw_us")
	b.ReportMetric(float64(tShared)/float64(tExcl), "x_exclusive")
	b.ReportMetric(float64(tShared)/float64(tRaw), "x_raw")
	b.ReportMetric(float64(tExcl)/float64(tRaw), "exclusive_x_raw")
}

// holdFunc blocks until it holds a key, and returns what lets it go.
type holdFunc func() (release func() error, err error)

// leaseHold is a holdFunc taking key with acquire (c.Acquire,
// c.AcquireShared).
func leaseHold(e *bench, acquire func(context.Context, lease.Key) (*lease.Lock, error), key lease.Key) holdFunc {
	return func() (func() error, error) {
		l, err := acquire(e.ctx, key)
		if err != nil {
			return nil, err
		}
		return func() error { return l.Release(e.ctx) }, nil
	}
}

// advisoryHold is a holdFunc blocking in pg_advisory_lock(7) on conn, or in
// pg_advisory_lock_shared(7): the server's own reader/writer lock, whose
// queue also keeps a reader that arrives behind a waiting writer behind it.
func advisoryHold(e *bench, conn *pgx.Conn, shared bool) holdFunc {
	lock, unlock := "SELECT pg_advisory_lock(7)", "SELECT pg_advisory_unlock(7)"
	if shared {
		lock, unlock = "SELECT pg_advisory_lock_shared(7)", "SELECT pg_advisory_unlock_shared(7)"
	}
	return func() (func() error, error) {
		if _, err := conn.Exec(e.ctx, lock); err != nil {
			return nil, err
		}
		return func() error {
			_, err := conn.Exec(e.ctx, unlock)
			return err
		}, nil
	}
}

// rwStats are the figures of one run of readers and a writer on one key.
type rwStats struct {
	reads                     int // reads measured
	readsPerSec, writesPerSec float64
	writeP50, writeP99        float64 // ms from the writer's call to its acquisition
	minReadShare              float64 // the least-served reader's reads / the mean
}

// readersWriter runs readers and (unless nil) one writer that each take the
// key, hold it, release it and start over, until the readers have made
// limit acquisitions in all, or phaseCap has passed. Each stops at its first
// acquisition after that, so nobody waits for ever and nothing is cancelled.
func readersWriter(e *bench, readers []holdFunc, writer holdFunc, hold time.Duration, limit int) rwStats {
	var (
		mu         sync.Mutex
		reads      int
		perReader  = make([]int, len(readers))
		writeWaits []float64
		failed     bool
	)
	start := time.Now()
	var end time.Time
	loop := func(take holdFunc, reader int) { // reader -1: the writer
		// limit, reads, perReader, writeWaits, failed and end: under mu
		for {
			asked := time.Now()
			release, err := take()
			if err != nil {
				e.b.Errorf("acquire: %v", err)
				mu.Lock()
				failed = true
				mu.Unlock()
				return
			}
			mu.Lock()
			if reads > 0 && time.Since(start) > phaseCap {
				limit = reads
			}
			more := reads < limit && !failed
			if more && reader < 0 {
				writeWaits = append(writeWaits, float64(time.Since(asked))/1e6)
			} else if more {
				reads++
				perReader[reader]++
				end = time.Now()
			}
			mu.Unlock()
			if more && hold > 0 {
				time.Sleep(hold)
			}
			if err := release(); err != nil {
				e.b.Errorf("release: %v", err)
				mu.Lock()
				failed = true
				mu.Unlock()
				return
			}
			if !more {
				return
			}
		}
	}
	var wg sync.WaitGroup
	for i, r := range readers {
		wg.Go(func() { loop(r, i) })
	}
	if writer != nil {
		wg.Go(func() { loop(writer, -1) })
	}
	wg.Wait()
	if reads == 0 {
		return rwStats{}
	}
	elapsed := end.Sub(start).Seconds()
	slices.Sort(writeWaits)
	mean := float64(reads) / float64(len(readers))
	return rwStats{
		reads:        reads,
		readsPerSec:  float64(reads) / elapsed,
		writesPerSec: float64(len(writeWaits)) / elapsed,
		writeP50:     percentile(writeWaits, 0.50),
		writeP99:     percentile(writeWaits, 0.99),
		minReadShare: float64(slices.Min(perReader)) / mean,
	}
}

// meanRW is the mean of two runs, the least share of both.
func meanRW(a, b rwStats) rwStats {
	return rwStats{
		readsPerSec:  (a.readsPerSec + b.readsPerSec) / 2,
		writesPerSec: (a.writesPerSec + b.writesPerSec) / 2,
		writeP50:     (a.writeP50 + b.writeP50) / 2,
		writeP99:     (a.writeP99 + b.writeP99) / 2,
		minReadShare: min(a.minReadShare, b.minReadShare),
	}
}

// BenchmarkReadersWriter: eight readers (AcquireShared) and one writer
// (Acquire) on one key, each a client with its own pool, each holding the
// key 0 or 2 ms at a time and asking again at once. b.N is the number of
// reads (fewer if a phase reaches phaseCap: see count). Two baselines, b.N/2 reads before and b.N/2 after: the eight
// readers alone, and the same load on the server's own reader/writer lock
// (pg_advisory_lock_shared on eight connections, pg_advisory_lock on a
// ninth).
//
//	go test -run '^$' -bench '^BenchmarkReadersWriter$' -benchtime 3000x ./lease/
func BenchmarkReadersWriter(b *testing.B) {
	cl := pgtest.Owned(b, pgtest.Options{})
	for _, hold := range []time.Duration{0, 2 * time.Millisecond} {
		b.Run("hold="+hold.String(), func(b *testing.B) {
			e := newBenchOn(b, cl)
			const n = 8
			k := lease.Key{Name: "bench", ID: "rw"}
			readers := make([]holdFunc, n)
			advReaders := make([]holdFunc, n)
			for i := range n {
				readers[i] = leaseHold(e, e.client(lease.Config{}, 2, nil).AcquireShared, k)
				advReaders[i] = advisoryHold(e, e.conn(), true)
			}
			writer := leaseHold(e, e.client(lease.Config{}, 2, nil).Acquire, k)
			advWriter := advisoryHold(e, e.conn(), false)
			// Warm up: register holders, start listeners, fill pools.
			readersWriter(e, readers, writer, hold, 200)
			readersWriter(e, advReaders, advWriter, hold, 200)

			half := max(b.N/2, 2)
			b.ResetTimer()
			adv1 := readersWriter(e, advReaders, advWriter, hold, half)
			alone1 := readersWriter(e, readers, nil, hold, half)
			start := time.Now()
			s := readersWriter(e, readers, writer, hold, max(b.N, 2))
			elapsed := time.Since(start)
			alone2 := readersWriter(e, readers, nil, hold, half)
			adv2 := readersWriter(e, advReaders, advWriter, hold, half)
			b.StopTimer()
			adv, alone := meanRW(adv1, adv2), meanRW(alone1, alone2)
			b.ReportMetric(float64(elapsed)/float64(max(s.reads, 1)), "ns/op")
			b.ReportMetric(float64(s.reads), "count")
			b.ReportMetric(s.readsPerSec, "reads/s")
			b.ReportMetric(s.minReadShare, "min_read_share")
			b.ReportMetric(s.writesPerSec, "writes/s")
			b.ReportMetric(s.writeP50, "write_wait_p50_ms")
			b.ReportMetric(s.writeP99, "write_wait_p99_ms")
			b.ReportMetric(alone.readsPerSec, "alone_reads/s")
			b.ReportMetric(adv.readsPerSec, "adv_reads/s")
			b.ReportMetric(adv.writesPerSec, "adv_writes/s")
			b.ReportMetric(adv.writeP50, "adv_write_wait_p50_ms")
			b.ReportMetric(adv.writeP99, "adv_write_wait_p99_ms")
		})
	}
}

// conn opens a connection of its own, closed when the benchmark ends.
func (e *bench) conn() *pgx.Conn {
	e.b.Helper()
	conn, err := pgx.Connect(e.ctx, e.cl.URL())
	if err != nil {
		e.b.Fatal(err)
	}
	e.b.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// BenchmarkSemaphore8Clients: eight clients, each with its own pool, take
// permits of one semaphore of 4, holding one 0 or 2 ms at a time: b.N
// acquisitions (fewer if a phase reaches phaseCap: see count). Baselines, b.N/2 acquisitions before and after: the same
// clients taking turns on an exclusive key, and eight connections blocking
// in pg_advisory_lock.
//
//	go test -run '^$' -bench '^BenchmarkSemaphore8Clients$' -benchtime 2000x ./lease/
func BenchmarkSemaphore8Clients(b *testing.B) {
	cl := pgtest.Owned(b, pgtest.Options{})
	for _, hold := range []time.Duration{0, 2 * time.Millisecond} {
		b.Run("hold="+hold.String(), func(b *testing.B) {
			e := newBenchOn(b, cl)
			const n, permits = 8, 4
			clients := make([]*lease.Client, n)
			sems := make([]*lease.Semaphore, n)
			conns := make([]*pgx.Conn, n)
			for i := range n {
				clients[i] = e.client(lease.Config{}, 2, nil)
				s, err := clients[i].Semaphore(lease.Key{Name: "bench", ID: "sem"}, permits)
				if err != nil {
					b.Fatal(err)
				}
				sems[i] = s
				conns[i] = e.conn()
			}
			sem := func(ctx context.Context, i int) (*lease.Lock, error) { return sems[i].Acquire(ctx) }
			oneKeyRounds(e, clients, sem, hold, 200) // warm up
			oneKeyPglease(e, clients, hold, 200)
			oneKeyAdvisory(e, conns, hold, 200)

			half := max(b.N/2, 2)
			b.ResetTimer()
			adv1 := oneKeyAdvisory(e, conns, hold, half)
			excl1, _ := oneKeyPglease(e, clients, hold, half)
			s, waiterQueries := oneKeyRounds(e, clients, sem, hold, max(b.N, 2))
			excl2, _ := oneKeyPglease(e, clients, hold, half)
			adv2 := oneKeyAdvisory(e, conns, hold, half)
			b.StopTimer()
			if s.elapsed > 0 {
				b.ReportMetric(float64(s.elapsed)/float64(s.count), "ns/op")
			}
			b.ReportMetric(float64(s.count), "count")
			b.ReportMetric(s.perSec, "acq/s")
			b.ReportMetric(s.minShare, "min_share")
			b.ReportMetric(s.maxShare, "max_share")
			b.ReportMetric(float64(waiterQueries)/float64(max(s.count, 1)), "acquire_q/acq")
			b.ReportMetric((excl1.perSec+excl2.perSec)/2, "excl_acq/s")
			b.ReportMetric(min(excl1.minShare, excl2.minShare), "excl_min_share")
			b.ReportMetric((adv1.perSec+adv2.perSec)/2, "adv_acq/s")
			b.ReportMetric(min(adv1.minShare, adv2.minShare), "adv_min_share")
		})
	}
}

// BenchmarkSet10: one client acquires a set of 10 keys with AcquireSet and
// releases it, against the same client taking 10 other keys one Acquire at
// a time and then releasing them one by one (the same 10 keys held at once),
// and one raw durable INSERT+DELETE pair, interleaved.
//
//	go test -run '^$' -bench '^BenchmarkSet10$' -benchtime 300x ./lease/
func BenchmarkSet10(b *testing.B) {
	e := newBench(b)
	rawOnce := e.rawPairOp()
	c := e.client(lease.Config{}, 4, nil)
	const n = 10
	members := make([]lease.SetMember, n)
	singles := make([]lease.Key, n)
	for i := range n {
		members[i] = lease.SetMember{Key: lease.Key{Name: "set", ID: strconv.Itoa(i)}}
		singles[i] = lease.Key{Name: "single", ID: strconv.Itoa(i)}
	}
	set := func() {
		s, err := c.AcquireSet(e.ctx, members)
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Release(e.ctx); err != nil {
			b.Fatal(err)
		}
	}
	held := make([]*lease.Lock, n)
	one := func() {
		for i, k := range singles {
			l, err := c.Acquire(e.ctx, k)
			if err != nil {
				b.Fatal(err)
			}
			held[i] = l
		}
		for _, l := range held {
			if err := l.Release(e.ctx); err != nil {
				b.Fatal(err)
			}
		}
	}
	t := interleaved(b, 20, set, one, rawOnce)
	tSet, tSingles, tRaw := t[0], t[1], t[2]
	b.ReportMetric(float64(tSet)/float64(b.N), "ns/op")
	b.ReportMetric(us(tSet, b.N), "set_us")
	b.ReportMetric(us(tSingles, b.N), "singles_us")
	b.ReportMetric(us(tRaw, b.N), "raw_us")
	b.ReportMetric(float64(tSet)/float64(tSingles), "x_singles")
	b.ReportMetric(float64(tSet)/float64(tRaw)/n, "per_key_x_raw")
	b.ReportMetric(float64(tSingles)/float64(tRaw)/n, "singles_per_key_x_raw")
}
