package lease_test

import (
	"context"
	"errors"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric/noop"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/pglease/pglease/lease"
)

// meterReader is an SDK MeterProvider whose instruments a test reads back
// through a ManualReader.
type meterReader struct {
	t  *testing.T
	r  *sdkmetric.ManualReader
	mp *sdkmetric.MeterProvider
}

func newMeterReader(t *testing.T) *meterReader {
	t.Helper()
	r := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(r))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	return &meterReader{t: t, r: r, mp: mp}
}

// find returns the instrument called name in a fresh collection, and whether
// it has been recorded at all.
func (m *meterReader) find(name string) (metricdata.Metrics, bool) {
	m.t.Helper()
	var rm metricdata.ResourceMetrics
	if err := m.r.Collect(context.Background(), &rm); err != nil {
		m.t.Fatalf("collect: %v", err)
	}
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != lease.MeterName {
			m.t.Fatalf("instrument scope %q, want %q", sm.Scope.Name, lease.MeterName)
		}
		for _, x := range sm.Metrics {
			if x.Name == name {
				return x, true
			}
		}
	}
	return metricdata.Metrics{}, false
}

// matches reports whether set has every attribute of want.
func matches(set attribute.Set, want []attribute.KeyValue) bool {
	for _, kv := range want {
		if v, ok := set.Value(kv.Key); !ok || v != kv.Value {
			return false
		}
	}
	return true
}

// sum is the value of a counter or up-down counter, summed over the points
// that carry every attribute of want.
func (m *meterReader) sum(name string, want ...attribute.KeyValue) int64 {
	m.t.Helper()
	x, ok := m.find(name)
	if !ok {
		return 0
	}
	s, ok := x.Data.(metricdata.Sum[int64])
	if !ok {
		m.t.Fatalf("%s is a %T, want an int64 sum", name, x.Data)
	}
	var n int64
	for _, p := range s.DataPoints {
		if matches(p.Attributes, want) {
			n += p.Value
		}
	}
	return n
}

// hist is the count and sum of a histogram's records that carry every
// attribute of want.
func (m *meterReader) hist(name string, want ...attribute.KeyValue) (count uint64, sum float64) {
	m.t.Helper()
	x, ok := m.find(name)
	if !ok {
		return 0, 0
	}
	h, ok := x.Data.(metricdata.Histogram[float64])
	if !ok {
		m.t.Fatalf("%s is a %T, want a float64 histogram", name, x.Data)
	}
	for _, p := range h.DataPoints {
		if matches(p.Attributes, want) {
			count += p.Count
			sum += p.Sum
		}
	}
	return count, sum
}

// unit returns the unit and description of an instrument that has been
// recorded.
func (m *meterReader) unit(name string) (string, string) {
	m.t.Helper()
	x, ok := m.find(name)
	if !ok {
		m.t.Fatalf("%s not recorded", name)
	}
	return x.Unit, x.Description
}

func (m *meterReader) wantSum(name string, want int64, attrs ...attribute.KeyValue) {
	m.t.Helper()
	if got := m.sum(name, attrs...); got != want {
		m.t.Fatalf("%s%v = %d, want %d", name, attrs, got, want)
	}
}

func (m *meterReader) wantCount(name string, want uint64, attrs ...attribute.KeyValue) {
	m.t.Helper()
	if got, _ := m.hist(name, attrs...); got != want {
		m.t.Fatalf("%s%v: %d records, want %d", name, attrs, got, want)
	}
}

var (
	table     = attribute.String("pglease.lock.mode", "table")
	advisory  = attribute.String("pglease.lock.mode", "advisory")
	exclusive = attribute.String("pglease.lock.kind", "exclusive")
)

// waitLost waits until l is reported lost; what says when.
func waitLost(t *testing.T, l *lease.Lock, what string) {
	t.Helper()
	select {
	case <-l.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: the lock is not reported lost", what)
	}
	if !errors.Is(l.Err(), lease.ErrLost) {
		t.Fatalf("%s: the lock ended with %v, want ErrLost", what, l.Err())
	}
}

func outcome(s string) attribute.KeyValue { return attribute.String("pglease.lock.acquire.outcome", s) }
func reason(s string) attribute.KeyValue  { return attribute.String("pglease.lock.loss.reason", s) }
func renewal(s string) attribute.KeyValue { return attribute.String("pglease.heartbeat.outcome", s) }
func notified(s string) attribute.KeyValue {
	return attribute.String("pglease.notification.type", s)
}

// Acquires, refusals, waits, held locks and the attempts behind them, on the
// table path, read back through the SDK.
func TestMetricsAcquire(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := newMeterReader(t)
	c, _, _ := e.client(lease.Config{MeterProvider: m.mp})
	other, _, _ := e.client(lease.Config{})

	// N uncontended acquires: N records, each one attempt; held counts up and
	// back down.
	const n = 5
	var locks []*lease.Lock
	for i := range n {
		locks = append(locks, mustAcquire(t, e.ctx, c, lease.Key{Name: "m", ID: strconv.Itoa(i)}))
		m.wantSum("pglease.lock.held", int64(i+1), table, exclusive)
	}
	m.wantCount("pglease.lock.acquire.duration", n, table, exclusive, outcome("acquired"))
	m.wantCount("pglease.lock.acquire.duration", n) // nothing else recorded
	m.wantSum("pglease.lock.acquire.attempts", n, table, exclusive)
	m.wantSum("pglease.lock.held", 0, advisory)
	if u, d := m.unit("pglease.lock.acquire.duration"); u != "s" || d == "" {
		t.Fatalf("acquire duration: unit %q, description %q", u, d)
	}
	if u, _ := m.unit("pglease.lock.held"); u != "{lock}" {
		t.Fatalf("held: unit %q", u)
	}
	// In seconds: n round trips on loopback take well under a second each and
	// more than a microsecond.
	if _, s := m.hist("pglease.lock.acquire.duration"); s <= n*1e-6 || s >= n {
		t.Fatalf("acquire durations sum to %v s for %d acquires", s, n)
	}
	for i, l := range locks {
		mustRelease(t, e.ctx, l)
		m.wantSum("pglease.lock.held", int64(n-1-i), table, exclusive)
	}

	// A try of a key held elsewhere: outcome locked, and no wait.
	busy := lease.Key{Name: "m", ID: "busy"}
	ol := mustAcquire(t, e.ctx, other, busy)
	if _, err := c.TryAcquire(e.ctx, busy); !errors.Is(err, lease.ErrLocked) {
		t.Fatalf("TryAcquire of a held key: %v", err)
	}
	m.wantCount("pglease.lock.acquire.duration", 1, outcome("locked"))
	m.wantCount("pglease.lock.wait.duration", 0)
	m.wantSum("pglease.lock.waiting", 0)

	// A wait that ends in the caller's timeout: outcome canceled, waited.
	tctx, cancel := context.WithTimeout(e.ctx, 100*time.Millisecond)
	if _, err := c.Acquire(tctx, busy); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire with a timeout: %v", err)
	}
	cancel()
	m.wantCount("pglease.lock.acquire.duration", 1, outcome("canceled"))
	m.wantCount("pglease.lock.wait.duration", 1, table, exclusive, outcome("canceled"))
	m.wantSum("pglease.lock.waiting", 0)

	// A wait that ends in the release: waiting shows it meanwhile, and its
	// wait lasted at least from when it was seen waiting to the release.
	got := make(chan *lease.Lock, 1)
	go func() {
		l, err := c.Acquire(e.ctx, busy)
		if err != nil {
			t.Errorf("waiting Acquire: %v", err)
		}
		got <- l
	}()
	eventually(t, 10*time.Second, "the acquirer to be counted as waiting", func() bool {
		return m.sum("pglease.lock.waiting", table, exclusive) == 1
	})
	seen := time.Now()
	time.Sleep(50 * time.Millisecond) // not synchronisation: a wait worth measuring
	releaseAt := time.Now()
	mustRelease(t, e.ctx, ol)
	l := <-got
	if l == nil {
		t.FailNow()
	}
	m.wantSum("pglease.lock.waiting", 0)
	m.wantCount("pglease.lock.wait.duration", 1, table, exclusive, outcome("acquired"))
	if _, s := m.hist("pglease.lock.wait.duration", outcome("acquired")); s < releaseAt.Sub(seen).Seconds() || s > time.Since(seen).Seconds()+10 {
		t.Fatalf("wait of %v s; it was seen waiting %v s before the release", s, releaseAt.Sub(seen).Seconds())
	}
	m.wantSum("pglease.lock.held", 1, table, exclusive)

	// Close drops what is held, and later acquires end closed.
	mustAcquire(t, e.ctx, c, lease.Key{Name: "m", ID: "at-close"})
	m.wantSum("pglease.lock.held", 2, table, exclusive)
	if err := c.Close(e.ctx); err != nil {
		t.Fatal(err)
	}
	m.wantSum("pglease.lock.held", 0)
	if _, err := c.Acquire(e.ctx, busy); !errors.Is(err, lease.ErrClosed) {
		t.Fatalf("Acquire after Close: %v", err)
	}
	m.wantCount("pglease.lock.acquire.duration", 1, outcome("closed"))
	m.wantCount("pglease.lock.acquire.duration", n+1+1+1+1+1)
	m.wantCount("pglease.lock.acquire.duration", 0, outcome("error"))
}

// A lock whose row a DBA deletes is counted lost once, for row_deleted, and
// no longer held; its Release does not count it again.
func TestMetricsLossRowDeleted(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := newMeterReader(t)
	c, _, _ := e.client(lease.Config{MeterProvider: m.mp, TTL: time.Second})
	l := mustAcquire(t, e.ctx, c, lease.Key{Name: "m", ID: "deleted"})
	keep := mustAcquire(t, e.ctx, c, lease.Key{Name: "m", ID: "kept"})
	e.exec("DELETE FROM "+e.table("locks")+" WHERE token = $1", l.Token())
	waitLost(t, l, "row was deleted")
	m.wantSum("pglease.lock.losses", 1, table, exclusive, reason("row_deleted"))
	m.wantSum("pglease.lock.losses", 1)
	m.wantSum("pglease.lock.held", 1, table, exclusive)
	if u, _ := m.unit("pglease.lock.losses"); u != "{lock}" {
		t.Fatalf("losses: unit %q", u)
	}
	if err := l.Release(e.ctx); !errors.Is(err, lease.ErrLost) {
		t.Fatalf("Release of a lost lock: %v", err)
	}
	mustRelease(t, e.ctx, keep)
	m.wantSum("pglease.lock.losses", 1)
	m.wantSum("pglease.lock.held", 0)
}

// Heartbeats are timed by outcome: renewed while all is well, expired when
// the database found the holder expired, failed when the renewal could not
// finish in time (its locks then lost for renewal_timeout).
func TestMetricsHeartbeat(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := newMeterReader(t)
	const ttl = 600 * time.Millisecond // a renewal every 200 ms
	c, _, _ := e.client(lease.Config{MeterProvider: m.mp, TTL: ttl})
	l := mustAcquire(t, e.ctx, c, lease.Key{Name: "m", ID: "hb"})
	eventually(t, 10*time.Second, "two renewals", func() bool {
		n, _ := m.hist("pglease.heartbeat.duration", renewal("renewed"))
		return n >= 2
	})
	n, s := m.hist("pglease.heartbeat.duration", renewal("renewed"))
	if s <= 0 || s/float64(n) > ttl.Seconds() {
		t.Fatalf("%d renewals took %v s in all", n, s)
	}
	if u, _ := m.unit("pglease.heartbeat.duration"); u != "s" {
		t.Fatalf("heartbeat duration: unit %q", u)
	}

	// Expired in the database: one expired renewal, the lock lost for it.
	id, _ := c.HolderID()
	e.expireHolder(id)
	waitLost(t, l, "holder expired")
	m.wantCount("pglease.heartbeat.duration", 1, renewal("expired"))
	m.wantSum("pglease.lock.losses", 1, reason("holder_expired"))

	// A renewal that cannot finish: the holder row is locked by another
	// transaction until the lease would have run out.
	l = mustAcquire(t, e.ctx, c, lease.Key{Name: "m", ID: "hb2"})
	id, _ = c.HolderID()
	tx := mustBegin(t, e)
	defer func() { _ = tx.Rollback(e.ctx) }()
	if _, err := tx.Exec(e.ctx, "SELECT 1 FROM "+e.table("holders")+" WHERE id = $1 FOR UPDATE", id); err != nil {
		t.Fatal(err)
	}
	waitLost(t, l, "renewal blocks")
	if err := tx.Rollback(e.ctx); err != nil {
		t.Fatal(err)
	}
	var le *lease.LostError
	if !errors.As(l.Err(), &le) || le.Reason != lease.LossRenewalTimeout {
		t.Fatalf("lost with %v, want LossRenewalTimeout", l.Err())
	}
	m.wantCount("pglease.heartbeat.duration", 1, renewal("failed"))
	m.wantSum("pglease.lock.losses", 1, reason("renewal_timeout"))
	m.wantSum("pglease.lock.losses", 2)
	m.wantSum("pglease.lock.held", 0)
}

// Notifications on the LISTEN connection are counted once each, by type.
func TestMetricsNotifications(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := newMeterReader(t)
	c, _, _ := e.client(lease.Config{MeterProvider: m.mp})
	other, _, _ := e.client(lease.Config{})
	keys := []lease.Key{{Name: "n", ID: "0"}, {Name: "n", ID: "1"}, {Name: "n", ID: "2"}}
	var held []*lease.Lock
	for _, k := range keys {
		held = append(held, mustAcquire(t, e.ctx, other, k))
	}
	got := make(chan *lease.Lock, 1)
	go func() { // a waiter: the client starts its listener
		l, err := c.Acquire(e.ctx, keys[0])
		if err != nil {
			t.Errorf("waiting Acquire: %v", err)
		}
		got <- l
	}()
	eventually(t, 10*time.Second, "the listener", func() bool { return lease.Listening(c) })
	if m.sum("pglease.listener.notifications", notified("probe")) < 1 {
		t.Fatal("the listener's own self-test notification is not counted")
	}
	if u, _ := m.unit("pglease.listener.notifications"); u != "{notification}" {
		t.Fatalf("notifications: unit %q", u)
	}
	// Releases nobody waits for send nothing; the one c waits for hands it
	// the key, with one notification to c alone. Notifications arrive in
	// commit order, so once the handoff is counted, nothing of the first
	// two releases is still on its way.
	eventually(t, 10*time.Second, "the waiter in the queue", func() bool {
		return e.count("SELECT count(*) FROM "+e.table("waiters")) == 1
	})
	for _, l := range held[1:] {
		mustRelease(t, e.ctx, l)
	}
	mustRelease(t, e.ctx, held[0])
	l := <-got
	if l == nil {
		t.FailNow()
	}
	eventually(t, 10*time.Second, "the handoff notification", func() bool {
		return m.sum("pglease.listener.notifications", notified("handoff")) == 1
	})
	m.wantSum("pglease.listener.notifications", 0, notified("delete"))
	m.wantSum("pglease.listener.notifications", 0, notified("other"))
	mustRelease(t, e.ctx, l)

	// A client that listens on the schema's channel (it observes an
	// election) hears every release there, and a TRUNCATE.
	el, err := c.Election(lease.Key{Name: "n", ID: "observed"})
	if err != nil {
		t.Fatal(err)
	}
	octx, stop := context.WithCancel(e.ctx)
	defer stop()
	<-el.Observe(octx)
	eventually(t, 10*time.Second, "listening on the schema's channel", func() bool { return lease.Listening(c) })
	mustRelease(t, e.ctx, mustAcquire(t, e.ctx, other, keys[1]))
	eventually(t, 10*time.Second, "a delete notification", func() bool {
		return m.sum("pglease.listener.notifications", notified("delete")) == 1
	})
	e.exec("TRUNCATE " + e.table("locks"))
	eventually(t, 10*time.Second, "a truncate notification", func() bool {
		return m.sum("pglease.listener.notifications", notified("truncate")) == 1
	})
}

// The advisory path records under its own mode, and a lock lost with its
// connection is counted for connection_lost.
func TestMetricsAdvisory(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := newMeterReader(t)
	a, _, _ := e.advisory(lease.Config{MeterProvider: m.mp}, lease.AdvisoryConfig{CheckInterval: 300 * time.Millisecond})
	l, err := a.Acquire(e.ctx, lease.Key{Name: "a", ID: "1"})
	if err != nil {
		t.Fatal(err)
	}
	m.wantSum("pglease.lock.held", 1, advisory, exclusive)
	m.wantSum("pglease.lock.held", 0, table)
	m.wantCount("pglease.lock.acquire.duration", 1, advisory, exclusive, outcome("acquired"))
	mustRelease(t, e.ctx, l)
	m.wantSum("pglease.lock.held", 0)

	l = mustAdvisory(t, e.ctx, a, lease.Key{Name: "a", ID: "2"})
	if n, err := e.db.Cluster.TerminateBackends(e.ctx, "pid = $1", lease.AdvisoryBackend(l)); err != nil || n != 1 {
		t.Fatalf("terminate: %d, %v", n, err)
	}
	waitLost(t, l, "advisory: connection was killed")
	m.wantSum("pglease.lock.losses", 1, advisory, exclusive, reason("connection_lost"))
	m.wantSum("pglease.lock.losses", 1)
	m.wantSum("pglease.lock.held", 0)
	m.wantCount("pglease.lock.acquire.duration", 2, advisory, outcome("acquired"))
}

// Without a MeterProvider (and with the API's no-op one) the client works
// as ever: acquires, refusals, waits, losses and releases.
func TestMetricsWithoutMeterProvider(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  lease.Config
	}{
		{"nil", lease.Config{TTL: time.Second}},
		{"noop", lease.Config{TTL: time.Second, MeterProvider: noop.NewMeterProvider()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			c, _, _ := e.client(tc.cfg)
			other, _, _ := e.client(lease.Config{})
			k := lease.Key{Name: "none", ID: tc.name}
			ol := mustAcquire(t, e.ctx, other, k)
			if _, err := c.TryAcquire(e.ctx, k); !errors.Is(err, lease.ErrLocked) {
				t.Fatalf("TryAcquire of a held key: %v", err)
			}
			got := make(chan error, 1)
			go func() {
				l, err := c.Acquire(e.ctx, k)
				if err == nil {
					err = l.Release(e.ctx)
				}
				got <- err
			}()
			eventually(t, 10*time.Second, "the waiter to queue", func() bool { return lease.Subscriptions(c) == 1 })
			mustRelease(t, e.ctx, ol)
			if err := <-got; err != nil {
				t.Fatalf("waiting Acquire and Release: %v", err)
			}
			l := mustAcquire(t, e.ctx, c, lease.Key{Name: "none", ID: "deleted"})
			e.exec("DELETE FROM "+e.table("locks")+" WHERE token = $1", l.Token())
			waitLost(t, l, "row deleted")
			if isNil := c.Config().MeterProvider == nil; isNil != (tc.name == "nil") {
				t.Fatalf("Config().MeterProvider nil: %v", isNil)
			}
		})
	}
}

// Contention with metrics on, both paths on the same keys: never two holders
// at once, no key left locked by nobody, and the instruments add up (every
// section one acquired record, nothing held or waiting at the end, no loss).
func TestMetricsUnderContention(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := newMeterReader(t)
	keys := []lease.Key{{Name: "hot", ID: "1"}, {Name: "hot", ID: "2"}}
	const clients, goroutines, sections = 4, 3, 8
	var inside [2]atomic.Int32
	var violations, done atomic.Int64
	var wg sync.WaitGroup
	for ci := range clients {
		c, _, _ := e.client(lease.Config{MeterProvider: m.mp})
		for g := range goroutines {
			acquire := c.Acquire
			if g%2 == 1 {
				acquire = c.Advisory().Acquire
			}
			wg.Go(func() {
				for s := range sections {
					ki := (ci + g + s) % len(keys)
					l, err := acquire(e.ctx, keys[ki])
					if err != nil {
						t.Errorf("acquire: %v", err)
						return
					}
					if !inside[ki].CompareAndSwap(0, 1) {
						violations.Add(1)
					}
					runtime.Gosched()
					inside[ki].Store(0)
					if err := l.Release(e.ctx); err != nil {
						t.Errorf("release: %v", err)
					}
					done.Add(1)
				}
			})
		}
	}
	wg.Wait()
	if v := violations.Load(); v != 0 {
		t.Fatalf("%d mutual exclusion violations", v)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks")); n != 0 {
		t.Errorf("%d lock rows left after every release", n)
	}
	fresh, _, _ := e.client(lease.Config{})
	for _, k := range keys { // locked by nobody: free at once, on either path
		for _, try := range []func(context.Context, lease.Key) (*lease.Lock, error){fresh.TryAcquire, fresh.Advisory().TryAcquire} {
			l, err := try(e.ctx, k)
			if err != nil {
				t.Fatalf("%s after the run: %v", k, err)
			}
			mustRelease(t, e.ctx, l)
		}
	}
	total := uint64(done.Load())
	if total != clients*goroutines*sections {
		t.Fatalf("%d sections done, want %d", total, clients*goroutines*sections)
	}
	m.wantCount("pglease.lock.acquire.duration", total, outcome("acquired"))
	m.wantCount("pglease.lock.acquire.duration", total)
	m.wantSum("pglease.lock.held", 0)
	m.wantSum("pglease.lock.waiting", 0)
	m.wantSum("pglease.lock.losses", 0)
	if n, _ := m.hist("pglease.lock.wait.duration"); n == 0 || n > total {
		t.Fatalf("%d waits recorded for %d contended acquires", n, total)
	}
}

// The lock kinds are told apart: shared locks on both paths and a
// semaphore's permits are recorded with their kind, in acquire.duration,
// held, waiting, wait.duration and losses alike. A key set is one call,
// recorded as kind exclusive; its members count in held by their own kinds.
func TestMetricsKinds(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m := newMeterReader(t)
	c, _, _ := e.client(lease.Config{MeterProvider: m.mp})
	other, _, _ := e.client(lease.Config{})
	shared := attribute.String("pglease.lock.kind", "shared")
	permit := attribute.String("pglease.lock.kind", "permit")

	ts, err := c.AcquireShared(e.ctx, lease.Key{Name: "k", ID: "table-shared"})
	if err != nil {
		t.Fatalf("AcquireShared: %v", err)
	}
	as, err := c.Advisory().AcquireShared(e.ctx, lease.Key{Name: "k", ID: "advisory-shared"})
	if err != nil {
		t.Fatalf("advisory AcquireShared: %v", err)
	}
	sem, err := c.Semaphore(lease.Key{Name: "k", ID: "sem"}, 2)
	if err != nil {
		t.Fatal(err)
	}
	var permits []*lease.Lock
	for range 2 {
		p, err := sem.Acquire(e.ctx)
		if err != nil {
			t.Fatalf("a permit: %v", err)
		}
		permits = append(permits, p)
	}
	m.wantSum("pglease.lock.held", 1, table, shared)
	m.wantSum("pglease.lock.held", 1, advisory, shared)
	m.wantSum("pglease.lock.held", 2, table, permit)
	m.wantSum("pglease.lock.held", 0, exclusive)
	m.wantCount("pglease.lock.acquire.duration", 1, table, shared, outcome("acquired"))
	m.wantCount("pglease.lock.acquire.duration", 1, advisory, shared, outcome("acquired"))
	m.wantCount("pglease.lock.acquire.duration", 2, table, permit, outcome("acquired"))
	m.wantCount("pglease.lock.acquire.duration", 4)

	// A third permit of two: refused, as a permit.
	if _, err := sem.TryAcquire(e.ctx); !errors.Is(err, lease.ErrLocked) {
		t.Fatalf("TryAcquire of a full semaphore: %v", err)
	}
	m.wantCount("pglease.lock.acquire.duration", 1, table, permit, outcome("locked"))

	// A reader waiting for another client's writer: a wait of kind shared.
	wk := lease.Key{Name: "k", ID: "written"}
	wl := mustAcquire(t, e.ctx, other, wk)
	got := make(chan *lease.Lock, 1)
	go func() {
		l, err := c.AcquireShared(e.ctx, wk)
		if err != nil {
			t.Errorf("waiting AcquireShared: %v", err)
		}
		got <- l
	}()
	eventually(t, 10*time.Second, "the reader to be counted as waiting", func() bool {
		return m.sum("pglease.lock.waiting", table, shared) == 1
	})
	m.wantSum("pglease.lock.waiting", 0, exclusive)
	mustRelease(t, e.ctx, wl)
	rl := <-got
	if rl == nil {
		t.FailNow()
	}
	m.wantSum("pglease.lock.waiting", 0)
	m.wantCount("pglease.lock.wait.duration", 1, table, shared, outcome("acquired"))
	m.wantCount("pglease.lock.wait.duration", 1)
	m.wantSum("pglease.lock.held", 2, table, shared)

	// A shared grant deleted by a DBA: a loss of kind shared.
	e.exec("DELETE FROM "+e.table("locks")+" WHERE token = $1", ts.Token())
	waitLost(t, ts, "shared grant was deleted")
	m.wantSum("pglease.lock.losses", 1, table, shared, reason("row_deleted"))
	m.wantSum("pglease.lock.losses", 1)
	m.wantSum("pglease.lock.held", 1, table, shared)

	for _, l := range append(permits, as, rl) {
		mustRelease(t, e.ctx, l)
	}
	m.wantSum("pglease.lock.held", 0)

	// A key set of an exclusive and a shared member.
	before, _ := m.hist("pglease.lock.acquire.duration")
	set, err := c.AcquireSet(e.ctx, []lease.SetMember{
		{Key: lease.Key{Name: "k", ID: "set-x"}},
		{Key: lease.Key{Name: "k", ID: "set-s"}, Shared: true},
	})
	if err != nil {
		t.Fatalf("AcquireSet: %v", err)
	}
	m.wantCount("pglease.lock.acquire.duration", before+1)
	m.wantCount("pglease.lock.acquire.duration", 1, table, exclusive, outcome("acquired"))
	m.wantSum("pglease.lock.held", 1, table, exclusive)
	m.wantSum("pglease.lock.held", 1, table, shared)
	if err := set.Release(e.ctx); err != nil {
		t.Fatalf("releasing the set: %v", err)
	}
	m.wantSum("pglease.lock.held", 0)
}
