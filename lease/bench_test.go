package lease_test

// Benchmarks of acquire, wait and release, each next to a raw baseline
// measured in the same run against the same durable (fsync on) server. Every
// top-level benchmark starts a cluster of its own. Figures are reported as
// custom metrics; internal/benchtable turns the output into one table (see
// BENCHMARKS.md for the commands and the results).
//
// Where a pglease figure and its baseline can be measured op by op, they are
// interleaved (one of each per iteration), so that a neighbour's load on a
// shared machine hits both alike. Where they cannot (many clients at once),
// the baseline runs half before and half after the pglease phase.

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// stmtCounter is a pgx tracer that counts the statements a pool sends (and
// those of the client's LISTEN connection, which copies the pool's
// configuration), and times the heartbeat's.
type stmtCounter struct {
	all, renew atomic.Int64
	renewTime  atomic.Int64 // ns spent in renew statements
}

type renewStartKey struct{}

func (s *stmtCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	s.all.Add(1)
	if strings.Contains(d.SQL, ".renew(") {
		s.renew.Add(1)
		return context.WithValue(ctx, renewStartKey{}, time.Now())
	}
	return ctx
}

func (s *stmtCounter) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryEndData) {
	if t, ok := ctx.Value(renewStartKey{}).(time.Time); ok {
		s.renewTime.Add(int64(time.Since(t)))
	}
}

// bench is one benchmark's durable cluster and migrated schema.
type bench struct {
	b   *testing.B
	cl  *pgtest.Cluster
	db  *pgtest.DB
	ctx context.Context
	n   int
}

func newBench(b *testing.B) *bench {
	b.Helper()
	cl := pgtest.Owned(b, pgtest.Options{})
	return newBenchOn(b, cl)
}

func newBenchOn(b *testing.B, cl *pgtest.Cluster) *bench {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	b.Cleanup(cancel)
	return &bench{b: b, cl: cl, db: pgtest.NewDBOn(b, cl), ctx: ctx}
}

func (e *bench) table(name string) string { return pgx.Identifier{e.db.Schema, name}.Sanitize() }

func (e *bench) exec(sql string, args ...any) {
	e.b.Helper()
	if _, err := e.db.Pool.Exec(e.ctx, sql, args...); err != nil {
		e.b.Fatalf("exec %q: %v", sql, err)
	}
}

// pool returns a pool of its own (maxConns connections at most), closed when
// the benchmark ends; tracer may be nil.
func (e *bench) pool(maxConns int32, tracer pgx.QueryTracer) *pgxpool.Pool {
	e.b.Helper()
	e.n++
	return pgtest.NewPool(e.b, e.cl, fmt.Sprintf("bench-%s-%d", e.db.Schema, e.n), func(c *pgxpool.Config) {
		c.MaxConns = maxConns
		c.ConnConfig.Tracer = tracer
	})
}

// client returns a Client with a pool of its own, closed when the benchmark
// ends.
func (e *bench) client(cfg lease.Config, maxConns int32, tracer pgx.QueryTracer) *lease.Client {
	e.b.Helper()
	cfg.Schema = e.db.Schema
	c, err := lease.New(e.pool(maxConns, tracer), &cfg)
	if err != nil {
		e.b.Fatal(err)
	}
	e.b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = c.Close(ctx)
	})
	return c
}

// rawTable creates a table shaped like locks, for the raw INSERT+DELETE pair.
func (e *bench) rawTable() string {
	t := e.table("raw_pair")
	e.exec(`CREATE TABLE ` + t + ` (name text NOT NULL, entity_id text NOT NULL, token bigint NOT NULL,
		holder_id bigint NOT NULL, acquired_at timestamptz NOT NULL DEFAULT clock_timestamp(),
		PRIMARY KEY (name, entity_id))`)
	return t
}

// rawPair runs a durable INSERT and a durable DELETE of one row, each its own
// autocommit statement: what a lock row costs without pglease.
func rawPair(ctx context.Context, q *pgxpool.Pool, table, id string, token int64) error {
	if _, err := q.Exec(ctx, "INSERT INTO "+table+" (name, entity_id, token, holder_id) VALUES ('raw', $1, $2, 1)", id, token); err != nil {
		return err
	}
	_, err := q.Exec(ctx, "DELETE FROM "+table+" WHERE name = 'raw' AND entity_id = $1", id)
	return err
}

// rawPairOp returns an op that runs rawPair on a table and a one-connection
// pool of its own, failing the benchmark on an error.
func (e *bench) rawPairOp() func() {
	e.b.Helper()
	table, pool := e.rawTable(), e.pool(1, nil)
	var token int64
	return func() {
		token++
		if err := rawPair(e.ctx, pool, table, "1", token); err != nil {
			e.b.Fatal(err)
		}
	}
}

func us(d time.Duration, n int) float64 { return float64(d) / float64(n) / 1e3 }

// interleaved runs every op warm times (registering holders, warming pools
// and caches), then once per iteration, b.N iterations, rotating their order
// so that none of them always follows another, and returns the time spent in
// each. The benchmark's timer covers the iterations only.
func interleaved(b *testing.B, warm int, ops ...func()) []time.Duration {
	for range warm {
		for _, op := range ops {
			op()
		}
	}
	spent := make([]time.Duration, len(ops))
	b.ResetTimer()
	for i := range b.N {
		for j := range ops {
			k := (i + j) % len(ops)
			start := time.Now()
			ops[k]()
			spent[k] += time.Since(start)
		}
	}
	b.StopTimer()
	return spent
}

// acquireRelease returns an op that takes key with acquire (c.Acquire,
// c.AcquireShared, ...) and releases it at once, failing the benchmark on
// an error.
func (e *bench) acquireRelease(acquire func(context.Context, lease.Key) (*lease.Lock, error), key lease.Key) func() {
	return func() {
		l, err := acquire(e.ctx, key)
		if err != nil {
			e.b.Fatal(err)
		}
		if err := l.Release(e.ctx); err != nil {
			e.b.Fatal(err)
		}
	}
}

// BenchmarkUncontended: Acquire+Release of a free key by one client, against
// a raw durable INSERT+DELETE pair and an advisory lock+unlock pair,
// interleaved.
//
//	go test -run '^$' -bench Uncontended -benchtime 3000x ./lease/
func BenchmarkUncontended(b *testing.B) {
	e := newBench(b)
	rawOnce := e.rawPairOp()
	advConn, err := e.pool(1, nil).Acquire(e.ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer advConn.Release()
	c := e.client(lease.Config{}, 4, nil)
	pair := e.acquireRelease(c.Acquire, lease.Key{Name: "bench", ID: "1"})
	adv := func() {
		if _, err := advConn.Exec(e.ctx, "SELECT pg_advisory_lock(42)"); err != nil {
			b.Fatal(err)
		}
		if _, err := advConn.Exec(e.ctx, "SELECT pg_advisory_unlock(42)"); err != nil {
			b.Fatal(err)
		}
	}
	sqlPair := e.sqlAcquireRelease()
	selConn, err := e.pool(1, nil).Acquire(e.ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer selConn.Release()
	sel2 := func() {
		for range 2 {
			if _, err := selConn.Exec(e.ctx, "SELECT 1"); err != nil {
				b.Fatal(err)
			}
		}
	}
	t := interleaved(b, 50, pair, rawOnce, adv, sqlPair, sel2)
	tLease, tRaw, tAdv, tSQL, tSel2 := t[0], t[1], t[2], t[3], t[4]
	b.ReportMetric(float64(tLease)/float64(b.N), "ns/op")
	b.ReportMetric(us(tLease, b.N), "lease_us")
	b.ReportMetric(us(tRaw, b.N), "raw_us")
	b.ReportMetric(us(tAdv, b.N), "adv_us")
	b.ReportMetric(us(tSQL, b.N), "sql_us")
	b.ReportMetric(us(tSel2, b.N), "select1x2_us")
	b.ReportMetric(float64(tLease)/float64(tRaw), "x_raw")
}

// sqlAcquireRelease returns an op that takes a free key and releases it with
// the two statements the client sends, acquire_keys and release, straight
// through pgx on a one-connection pool of its own, for a holder it registers
// itself: the server's and the round trips' share of Acquire+Release, without
// the client's.
func (e *bench) sqlAcquireRelease() func() {
	e.b.Helper()
	pool := e.pool(1, nil)
	s := pgx.Identifier{e.db.Schema}.Sanitize()
	secret := []byte("0123456789abcdef")
	var holder int64
	if err := pool.QueryRow(e.ctx, `SELECT `+s+`.register('bench', 1, 'bench', interval '1 hour', $1)`,
		secret).Scan(&holder); err != nil {
		e.b.Fatal(err)
	}
	acquire := `SELECT acquired, tokens FROM ` + s + `.acquire_keys('{sql}', '{1}', '{x}', 1, $1, $2, true, '{}', false, 0)`
	release := `SELECT ` + s + `.release('sql', '1', $1, $2, $3)`
	return func() {
		var ok bool
		var tokens []int64
		if err := pool.QueryRow(e.ctx, acquire, holder, secret).Scan(&ok, &tokens); err != nil || !ok {
			e.b.Fatalf("acquire_keys: %v (acquired %v)", err, ok)
		}
		if err := pool.QueryRow(e.ctx, release, tokens[0], holder, secret).Scan(&ok); err != nil || !ok {
			e.b.Fatalf("release: %v (released %v)", err, ok)
		}
	}
}

// BenchmarkTryAcquireHeld: TryAcquire of a key another client holds, against
// SELECT 1 on a pool of the same kind, interleaved.
//
//	go test -run '^$' -bench TryAcquireHeld -benchtime 5000x ./lease/
func BenchmarkTryAcquireHeld(b *testing.B) {
	e := newBench(b)
	holder := e.client(lease.Config{}, 2, nil)
	k := lease.Key{Name: "bench", ID: "held"}
	l, err := holder.Acquire(e.ctx, k)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = l.Release(e.ctx) }()
	c := e.client(lease.Config{}, 4, nil)
	selPool := e.pool(4, nil)
	try := func() {
		if _, err := c.TryAcquire(e.ctx, k); !errors.Is(err, lease.ErrLocked) {
			b.Fatalf("TryAcquire of a held key: %v", err)
		}
	}
	sel := func() {
		if _, err := selPool.Exec(e.ctx, "SELECT 1"); err != nil {
			b.Fatal(err)
		}
	}
	t := interleaved(b, 50, try, sel)
	tTry, tSel := t[0], t[1]
	b.ReportMetric(float64(tTry)/float64(b.N), "ns/op")
	b.ReportMetric(us(tTry, b.N), "try_us")
	b.ReportMetric(us(tSel, b.N), "select1_us")
	b.ReportMetric(float64(tTry)/float64(tSel), "x_select1")
}

// handoffs records a run of acquisitions of one key by several clients.
type handoffs struct {
	mu          sync.Mutex
	n           int       // acquisitions so far
	limit       int       // stop after this many
	lastRelease time.Time // start of the last Release
	lastHolder  int       // client of the last acquisition
	lat         []float64 // release start → next acquisition, ms
	self        int       // acquisitions by the client that released last
	perClient   []int     // acquisitions per client
	start, end  time.Time // first and last acquisition
}

// phaseCap ends a phase of a many-client benchmark that is still short of
// its count after this long, so that a slow engine cannot make one run take
// hours; its rates are then over the acquisitions it made (the count metric
// says how many).
const phaseCap = 20 * time.Second

func newHandoffs(clients, limit int) *handoffs {
	return &handoffs{limit: limit, lastHolder: -1, perClient: make([]int, clients)}
}

// acquired records an acquisition by client i and says whether the run goes
// on (false: release and stop).
func (h *handoffs) acquired(i int) bool {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n >= h.limit {
		return false
	}
	if h.n == 0 {
		h.start = now
	} else if now.Sub(h.start) > phaseCap {
		h.limit = h.n
		return false
	}
	h.n++
	h.end = now
	h.perClient[i]++
	if !h.lastRelease.IsZero() {
		h.lat = append(h.lat, float64(now.Sub(h.lastRelease))/1e6)
		if h.lastHolder == i {
			h.self++
		}
	}
	h.lastHolder = i
	return true
}

func (h *handoffs) releasing() {
	h.mu.Lock()
	h.lastRelease = time.Now()
	h.mu.Unlock()
}

func (h *handoffs) done() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n >= h.limit
}

type handoffStats struct {
	perSec, p50, p99, minShare, maxShare, self float64
	count                                      int // acquisitions measured
	elapsed                                    time.Duration
}

func (h *handoffs) stats() handoffStats {
	h.mu.Lock()
	defer h.mu.Unlock()
	var s handoffStats
	if h.n < 2 {
		return s
	}
	s.count = h.n
	s.elapsed = h.end.Sub(h.start)
	s.perSec = float64(h.n-1) / s.elapsed.Seconds()
	lat := slices.Clone(h.lat)
	slices.Sort(lat)
	s.p50 = percentile(lat, 0.50)
	s.p99 = percentile(lat, 0.99)
	s.self = float64(h.self) / float64(len(h.lat))
	mean := float64(h.n) / float64(len(h.perClient))
	s.minShare, s.maxShare = math.Inf(1), 0
	for _, c := range h.perClient {
		s.minShare = min(s.minShare, float64(c)/mean)
		s.maxShare = max(s.maxShare, float64(c)/mean)
	}
	return s
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[max(i, 0)]
}

// oneKeyPglease runs clients that each take the key exclusively, hold it,
// release it and start over, until limit acquisitions. It returns the stats
// and the acquire statements the waiters sent (every attempt that did not
// acquire).
func oneKeyPglease(e *bench, clients []*lease.Client, hold time.Duration, limit int) (handoffStats, int64) {
	k := lease.Key{Name: "bench", ID: "one"}
	return oneKeyRounds(e, clients, func(ctx context.Context, i int) (*lease.Lock, error) {
		return clients[i].Acquire(ctx, k)
	}, hold, limit)
}

// oneKeyRounds is oneKeyPglease with client i acquiring by acquire(ctx, i):
// of any kind, on one key.
func oneKeyRounds(e *bench, clients []*lease.Client, acquire func(ctx context.Context, i int) (*lease.Lock, error),
	hold time.Duration, limit int) (handoffStats, int64) {
	h := newHandoffs(len(clients), limit)
	var before int64
	for _, c := range clients {
		before += lease.Attempts(c)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	var got atomic.Int64 // successful acquisitions, within the limit or not
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				l, err := acquire(ctx, i)
				if err != nil {
					if ctx.Err() == nil {
						e.b.Errorf("acquire: %v", err)
					}
					return
				}
				got.Add(1)
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
					cancel() // the others are waiting: stop them
					return
				}
			}
		}()
	}
	wg.Wait()
	var after int64
	for _, c := range clients {
		after += lease.Attempts(c)
	}
	// Every acquire statement the clients sent (the last ones, cut short by
	// the end of the run, included). With direct handoff an acquisition
	// costs one (the statement that queued or got the key) and a handoff
	// costs that and the release.
	return h.stats(), after - before
}

// oneKeyAdvisory is the baseline: connections that block in
// pg_advisory_lock, hold, and unlock, until limit acquisitions.
func oneKeyAdvisory(e *bench, conns []*pgx.Conn, hold time.Duration, limit int) handoffStats {
	h := newHandoffs(len(conns), limit)
	var wg sync.WaitGroup
	for i, conn := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				if _, err := conn.Exec(e.ctx, "SELECT pg_advisory_lock(7)"); err != nil {
					e.b.Errorf("advisory lock: %v", err)
					return
				}
				more := h.acquired(i)
				if more && hold > 0 {
					time.Sleep(hold)
				}
				h.releasing()
				if _, err := conn.Exec(e.ctx, "SELECT pg_advisory_unlock(7)"); err != nil {
					e.b.Errorf("advisory unlock: %v", err)
					return
				}
				if !more {
					return
				}
			}
		}()
	}
	wg.Wait()
	return h.stats()
}

// notifyRing is the floor of a handoff chain: conns connections in a ring,
// each waiting for a notification on a channel of its own and then (after
// hold) sending one, in a durable transaction of its own, to the next, until
// limit notifications were received. It returns them per second. A handoff
// is such a step (a durable commit whose NOTIFY wakes the next holder) with
// the release's work and the client's added.
func notifyRing(e *bench, n int, hold time.Duration, limit int) float64 {
	e.b.Helper()
	conns := make([]*pgx.Conn, n)
	for i := range conns {
		conn, err := pgx.Connect(e.ctx, e.cl.URL())
		if err != nil {
			e.b.Fatal(err)
		}
		defer conn.Close(context.Background())
		if _, err := conn.Exec(e.ctx, fmt.Sprintf("LISTEN ring_%d", i)); err != nil {
			e.b.Fatal(err)
		}
		conns[i] = conn
	}
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	var got atomic.Int64
	var wg sync.WaitGroup
	for i, conn := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fail := func(err error) { // an error after the end is the end's
				if ctx.Err() == nil {
					e.b.Errorf("ring: %v", err)
					cancel()
				}
			}
			for {
				if _, err := conn.WaitForNotification(ctx); err != nil {
					fail(err)
					return
				}
				if got.Add(1) >= int64(limit) {
					cancel()
					return
				}
				if hold > 0 {
					time.Sleep(hold)
				}
				if _, err := conn.Exec(ctx, fmt.Sprintf("NOTIFY ring_%d", (i+1)%n)); err != nil {
					fail(err)
					return
				}
			}
		}()
	}
	start := time.Now()
	if _, err := e.db.Pool.Exec(e.ctx, "NOTIFY ring_0"); err != nil {
		e.b.Fatal(err)
	}
	wg.Wait()
	return float64(got.Load()) / time.Since(start).Seconds()
}

// BenchmarkOneKey8Clients: eight clients, each with its own pool, take turns
// on one key, holding it 0 or 2 ms. b.N is the number of pglease
// acquisitions (fewer if a phase reaches phaseCap: see count); a blocking
// advisory lock on eight connections runs b.N/2 acquisitions before and
// after as the baseline, and a ring of durable NOTIFYs (notifyRing) b.N/2
// passes before and after as the floor of a chain of handoffs.
//
//	go test -run '^$' -bench OneKey8Clients -benchtime 6000x ./lease/
func BenchmarkOneKey8Clients(b *testing.B) {
	cl := pgtest.Owned(b, pgtest.Options{})
	for _, hold := range []time.Duration{0, 2 * time.Millisecond} {
		b.Run("hold="+hold.String(), func(b *testing.B) {
			e := newBenchOn(b, cl)
			const n = 8
			clients := make([]*lease.Client, n)
			conns := make([]*pgx.Conn, n)
			for i := range clients {
				clients[i] = e.client(lease.Config{}, 2, nil)
				conn, err := pgx.Connect(e.ctx, cl.URL())
				if err != nil {
					b.Fatal(err)
				}
				defer conn.Close(context.Background())
				conns[i] = conn
			}
			// Warm up: register holders, start listeners, fill pools.
			oneKeyPglease(e, clients, hold, 200)
			oneKeyAdvisory(e, conns, hold, 200)

			b.ResetTimer()
			adv1 := oneKeyAdvisory(e, conns, hold, max(b.N/2, 2))
			ring1 := notifyRing(e, n, hold, max(b.N/2, 2))
			s, waiterQueries := oneKeyPglease(e, clients, hold, max(b.N, 2))
			ring2 := notifyRing(e, n, hold, max(b.N/2, 2))
			adv2 := oneKeyAdvisory(e, conns, hold, max(b.N/2, 2))
			b.StopTimer()
			adv := handoffStats{
				perSec:   (adv1.perSec + adv2.perSec) / 2,
				p50:      (adv1.p50 + adv2.p50) / 2,
				p99:      (adv1.p99 + adv2.p99) / 2,
				minShare: min(adv1.minShare, adv2.minShare),
			}
			if s.elapsed > 0 {
				b.ReportMetric(float64(s.elapsed)/float64(s.count), "ns/op")
			}
			b.ReportMetric(float64(s.count), "count")
			b.ReportMetric(s.perSec, "handoffs/s")
			b.ReportMetric(s.p50, "p50_ms")
			b.ReportMetric(s.p99, "p99_ms")
			b.ReportMetric(s.minShare, "min_share")
			b.ReportMetric(s.maxShare, "max_share")
			b.ReportMetric(s.self, "same_client")
			if s.elapsed > 0 {
				b.ReportMetric(float64(waiterQueries)/s.elapsed.Seconds(), "acquire_q/s")
				b.ReportMetric(float64(waiterQueries)/float64(s.count), "acquire_q/handoff")
				b.ReportMetric(float64(waiterQueries+int64(s.count))/float64(s.count), "q/handoff") // and the release
			}
			b.ReportMetric(adv.perSec, "adv_handoffs/s")
			b.ReportMetric(adv.p50, "adv_p50_ms")
			b.ReportMetric(adv.p99, "adv_p99_ms")
			b.ReportMetric(adv.minShare, "adv_min_share")
			b.ReportMetric((ring1+ring2)/2, "ring_passes/s")
		})
	}
}

// BenchmarkWaitingCost: one client holds a key for a second at a time while
// seven others wait (PollInterval 250ms). It counts the acquire statements
// the waiters send while the key is held, from 100 ms after each acquisition
// (past the wake-up that follows a release) to the next release, per waiter
// and per fallback interval. b.N is the number of holds.
//
//	go test -run '^$' -bench WaitingCost -benchtime 8x ./lease/
func BenchmarkWaitingCost(b *testing.B) {
	e := newBench(b)
	const (
		n    = 8
		poll = 250 * time.Millisecond
		hold = time.Second
		skip = 100 * time.Millisecond
	)
	clients := make([]*lease.Client, n)
	for i := range clients {
		clients[i] = e.client(lease.Config{PollInterval: poll}, 2, nil)
	}
	attempts := func() int64 {
		var s int64
		for _, c := range clients {
			s += lease.Attempts(c)
		}
		return s
	}
	k := lease.Key{Name: "bench", ID: "wait"}
	var (
		mu        sync.Mutex
		count     int
		inWindows int64
		windows   time.Duration
	)
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	b.ResetTimer()
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				l, err := c.Acquire(ctx, k)
				if err != nil {
					return
				}
				mu.Lock()
				stop := count >= b.N
				count++
				mu.Unlock()
				if !stop {
					time.Sleep(skip)
					a0, t0 := attempts(), time.Now()
					time.Sleep(hold - skip)
					a1, t1 := attempts(), time.Now()
					mu.Lock()
					inWindows += a1 - a0
					windows += t1.Sub(t0)
					mu.Unlock()
				}
				if err := l.Release(e.ctx); err != nil {
					b.Error(err)
				}
				if stop {
					cancel()
					return
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	perWaiterPerPoll := float64(inWindows) / (float64(n-1) * windows.Seconds() / poll.Seconds())
	b.ReportMetric(perWaiterPerPoll, "q/waiter/poll")
	b.ReportMetric(float64(inWindows)/windows.Seconds(), "waiter_q/s")
}

// BenchmarkDistinctKeys8Clients: eight clients, each on a key of its own,
// acquire and release as fast as they can: b.N acquisitions in all. The
// baseline is eight connections doing raw durable INSERT+DELETE pairs, b.N/2
// pairs before and after.
//
//	go test -run '^$' -bench DistinctKeys8Clients -benchtime 8000x ./lease/
func BenchmarkDistinctKeys8Clients(b *testing.B) {
	e := newBench(b)
	raw := e.rawTable()
	const n = 8
	clients := make([]*lease.Client, n)
	pools := make([]*pgxpool.Pool, n)
	for i := range clients {
		clients[i] = e.client(lease.Config{}, 2, nil)
		pools[i] = e.pool(1, nil)
	}
	run := func(total int, op func(i, j int) error) float64 {
		var next atomic.Int64
		var wg sync.WaitGroup
		start := time.Now()
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := 0; next.Add(1) <= int64(total); j++ {
					if err := op(i, j); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		return float64(total) / time.Since(start).Seconds()
	}
	leaseOp := func(i, _ int) error {
		l, err := clients[i].Acquire(e.ctx, lease.Key{Name: "bench", ID: strconv.Itoa(i)})
		if err != nil {
			return err
		}
		return l.Release(e.ctx)
	}
	rawOp := func(i, j int) error { return rawPair(e.ctx, pools[i], raw, strconv.Itoa(i), int64(j)) }
	run(400, leaseOp) // warm up
	run(400, rawOp)
	b.ResetTimer()
	raw1 := run(max(b.N/2, 1), rawOp)
	start := time.Now()
	acq := run(b.N, leaseOp)
	elapsed := time.Since(start)
	raw2 := run(max(b.N/2, 1), rawOp)
	b.StopTimer()
	rawRate := (raw1 + raw2) / 2
	b.ReportMetric(float64(elapsed)/float64(b.N), "ns/op")
	b.ReportMetric(acq, "acq/s")
	b.ReportMetric(rawRate, "raw_pairs/s")
	b.ReportMetric(acq/rawRate, "x_raw")
}

// BenchmarkMillionRows: uncontended Acquire+Release in a schema whose locks
// table holds 1,000,000 rows of a live holder, against the same in an empty
// schema on the same server, interleaved. Building the table takes a while
// and is not timed.
//
//	go test -run '^$' -bench MillionRows -benchtime 3000x ./lease/
func BenchmarkMillionRows(b *testing.B) {
	cl := pgtest.Owned(b, pgtest.Options{})
	full, empty := newBenchOn(b, cl), newBenchOn(b, cl)
	full.exec(`WITH h AS (
			INSERT INTO ` + full.table("holders") + ` (host, pid, application, ttl, expires_at)
			VALUES ('filler', 1, 'bench', interval '1 day', clock_timestamp() + interval '1 day') RETURNING id)
		INSERT INTO ` + full.table("locks") + ` (name, entity_id, token, holder_id)
		SELECT 'filler', g::text, nextval(` + quoteLiteral(full.db.Schema+".token_seq") + `), h.id
		FROM h, generate_series(1, 1000000) g`)
	full.exec("VACUUM ANALYZE " + full.table("locks") + ", " + full.table("holders"))
	empty.exec("VACUUM ANALYZE " + empty.table("locks") + ", " + empty.table("holders"))
	var rows int
	if err := full.db.Pool.QueryRow(full.ctx, "SELECT count(*) FROM "+full.table("locks")).Scan(&rows); err != nil || rows != 1000000 {
		b.Fatalf("%d filler rows: %v", rows, err)
	}
	cFull := full.client(lease.Config{}, 4, nil)
	cEmpty := empty.client(lease.Config{}, 4, nil)
	k := lease.Key{Name: "bench", ID: "1"}
	pairFull, pairEmpty := full.acquireRelease(cFull.Acquire, k), full.acquireRelease(cEmpty.Acquire, k)
	t := interleaved(b, 50, pairFull, pairEmpty)
	tFull, tEmpty := t[0], t[1]
	b.ReportMetric(float64(tFull)/float64(b.N), "ns/op")
	b.ReportMetric(us(tFull, b.N), "full_us")
	b.ReportMetric(us(tEmpty, b.N), "empty_us")
	b.ReportMetric(float64(tFull)/float64(tEmpty), "x_empty")
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// BenchmarkHold10000: one client acquires 10,000 locks and holds them. It
// reports the Go heap they take (live heap after a GC, before and after, per
// lock) and, over b.N heartbeat intervals of 250 ms, the statements the client
// sends per heartbeat and how long a renewal takes.
//
//	go test -run '^$' -bench Hold10000 -benchtime 20x ./lease/
func BenchmarkHold10000(b *testing.B) {
	e := newBench(b)
	const (
		locks    = 10000
		interval = 250 * time.Millisecond
	)
	tr := &stmtCounter{}
	c := e.client(lease.Config{TTL: 3 * time.Second, HeartbeatInterval: interval}, 8, tr)
	l, err := c.Acquire(e.ctx, lease.Key{Name: "warm", ID: "1"})
	if err != nil {
		b.Fatal(err)
	}
	if err := l.Release(e.ctx); err != nil {
		b.Fatal(err)
	}
	held := make([]*lease.Lock, locks)
	heapBefore := liveHeap()
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1) - 1; i < locks; i = next.Add(1) - 1 {
				l, err := c.Acquire(e.ctx, lease.Key{Name: "held", ID: strconv.FormatInt(i, 10)})
				if err != nil {
					b.Error(err)
					return
				}
				held[i] = l
			}
		}()
	}
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	heapAfter := liveHeap()
	perLock := float64(heapAfter-heapBefore) / locks

	tr.all.Store(0)
	tr.renew.Store(0)
	tr.renewTime.Store(0)
	b.ResetTimer()
	time.Sleep(time.Duration(b.N) * interval)
	b.StopTimer()
	all, renews := tr.all.Load(), tr.renew.Load()
	for _, l := range held {
		if err := l.Err(); err != nil {
			b.Fatalf("lock %s lost while held: %v", l.Key(), err)
		}
	}
	b.ReportMetric(perLock, "heap_B/lock")
	if renews > 0 {
		b.ReportMetric(float64(all)/float64(renews), "stmts/heartbeat")
		b.ReportMetric(float64(tr.renewTime.Load())/float64(renews)/1e6, "renew_ms")
	}
	b.ReportMetric(float64(renews)/float64(b.N), "heartbeats/interval")
	runtime.KeepAlive(held)
}

// liveHeap returns the bytes of live Go heap after a full collection.
func liveHeap() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkIdleListeners: uncontended Acquire+Release of a key nobody waits
// for, by one client, while other clients of the schema are connected and
// listening: 1 of them against 100, about b.N pairs each, in three rounds of
// 1 then 100, and 1 again at the end (alternating, as interleaving cannot).
// Each of the others waits for a key of its own, which one more client
// holds, so that its LISTEN connection is up; between the phases 99 of them
// stop waiting and their listeners end. Their pools stay connected
// throughout. A release that notified every listener of the schema would
// cost more with 100.
//
//	go test -run '^$' -bench IdleListeners -benchtime 2000x ./lease/
func BenchmarkIdleListeners(b *testing.B) {
	const idle = 100
	// 100 pools of 2 and 100 LISTEN connections, next to the rest.
	cl := pgtest.Owned(b, pgtest.Options{Settings: map[string]string{"max_connections": "400"}})
	e := newBenchOn(b, cl)
	cfg := lease.Config{PollInterval: time.Hour, TTL: time.Hour}
	holder := e.client(cfg, 2, nil)
	others := make([]*lease.Client, idle)
	keys := make([]lease.Key, idle)
	for i := range others {
		keys[i] = lease.Key{Name: "idle", ID: strconv.Itoa(i)}
		if _, err := holder.Acquire(e.ctx, keys[i]); err != nil {
			b.Fatal(err)
		}
		others[i] = e.client(cfg, 2, nil)
		// Connect its pool and register its holder, as a client in use has.
		if _, err := others[i].TryAcquire(e.ctx, keys[i]); !errors.Is(err, lease.ErrLocked) {
			b.Fatalf("TryAcquire of a held key: %v", err)
		}
	}
	c := e.client(lease.Config{}, 4, nil)
	pair := e.acquireRelease(c.Acquire, lease.Key{Name: "bench", ID: "unwatched"})

	var wg sync.WaitGroup
	defer wg.Wait() // after cancel
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	stops := make([]context.CancelFunc, idle)
	// listen makes others[from:to] wait, and waits until they listen.
	listen := func(from, to int) {
		for i := from; i < to; i++ {
			wctx, stop := context.WithCancel(ctx)
			stops[i] = stop
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := others[i].Acquire(wctx, keys[i]); wctx.Err() == nil {
					b.Errorf("idle waiter of %s: %v", keys[i], err)
				}
			}()
		}
		for i := from; i < to; i++ {
			for !lease.Listening(others[i]) {
				time.Sleep(time.Millisecond)
			}
		}
	}
	// quiet makes others[from:to] stop waiting, and waits until their
	// listeners have ended (after the dispatcher's linger).
	quiet := func(from, to int) {
		for i := from; i < to; i++ {
			stops[i]()
		}
		for i := from; i < to; i++ {
			for lease.Listening(others[i]) || lease.ListenerPID(others[i]) != 0 {
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
	phase := func(n int) time.Duration {
		start := time.Now()
		for range n {
			pair()
		}
		return time.Since(start)
	}

	listen(0, 1)
	phase(50) // warm up
	// Alternating, so that a neighbour's load on a shared machine hits both
	// alike: 1, 100, 1, 100, 1, 100, 1 listening.
	const rounds = 3
	perMany := max(b.N/rounds, 1)
	perOne := max(b.N/(2*rounds), 1)
	var oneT, manyT time.Duration
	b.ResetTimer()
	for r := range rounds + 1 {
		oneT += phase(perOne)
		if r == rounds {
			break
		}
		b.StopTimer()
		listen(1, idle)
		b.StartTimer()
		manyT += phase(perMany)
		b.StopTimer()
		quiet(1, idle)
		b.StartTimer()
	}
	b.StopTimer()
	cancel()

	one, many := us(oneT, perOne*(rounds+1)), us(manyT, perMany*rounds)
	b.ReportMetric(many*1e3, "ns/op")
	b.ReportMetric(many, "idle100_us")
	b.ReportMetric(one, "idle1_us")
	b.ReportMetric(many/one, "x_idle1")
}

// BenchmarkSchemaPrevious: the same clients on the latest schema and on the
// one before it (migrated up, then down once), in one run: what the latest
// migration changed. Uncontended Acquire+Release of each, interleaved; then
// one key taken in turns by 8 clients, hold 0, b.N acquisitions on the
// latest between two runs of b.N/2 on the previous.
//
//	go test -run '^$' -bench SchemaPrevious -benchtime 3000x ./lease/
func BenchmarkSchemaPrevious(b *testing.B) {
	cl := pgtest.Owned(b, pgtest.Options{})
	cur, prev := newBenchOn(b, cl), newBenchOn(b, cl)
	version := func(e *bench) int {
		var v int
		if err := e.db.Pool.QueryRow(e.ctx, `SELECT version FROM `+e.table("schema_info")+`()`).Scan(&v); err != nil {
			b.Fatal(err)
		}
		return v
	}
	latest := version(cur)
	pgtest.DownTo(b, prev.db.Pool, prev.db.Schema, int64(latest-1))
	if latest-1 < lease.SchemaVersion {
		b.Fatalf("the client needs schema version %d: it cannot run on %d", lease.SchemaVersion, latest-1)
	}
	k := lease.Key{Name: "bench", ID: "1"}
	curPair := cur.acquireRelease(cur.client(lease.Config{}, 4, nil).Acquire, k)
	prevPair := prev.acquireRelease(prev.client(lease.Config{}, 4, nil).Acquire, k)
	t := interleaved(b, 50, curPair, prevPair)
	b.ReportMetric(float64(t[0])/float64(b.N), "ns/op")
	b.ReportMetric(us(t[0], b.N), "latest_us")
	b.ReportMetric(us(t[1], b.N), "previous_us")
	b.ReportMetric(float64(t[0])/float64(t[1]), "x_previous")

	clients := func(e *bench) []*lease.Client {
		cs := make([]*lease.Client, 8)
		for i := range cs {
			cs[i] = e.client(lease.Config{}, 2, nil)
		}
		oneKeyPglease(e, cs, 0, 200) // register holders, start listeners, fill pools
		return cs
	}
	curClients, prevClients := clients(cur), clients(prev)
	p1, _ := oneKeyPglease(prev, prevClients, 0, max(b.N/2, 2))
	c, _ := oneKeyPglease(cur, curClients, 0, max(b.N, 2))
	p2, _ := oneKeyPglease(prev, prevClients, 0, max(b.N/2, 2))
	b.ReportMetric(c.perSec, "latest_handoffs/s")
	b.ReportMetric((p1.perSec+p2.perSec)/2, "previous_handoffs/s")
	b.ReportMetric(c.perSec/((p1.perSec+p2.perSec)/2), "x_previous_handoffs")
	b.ReportMetric(float64(latest), "latest_version")
}
