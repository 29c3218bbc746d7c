package lease_test

// Tests of waiting: notifications, the shared LISTEN connection and its
// recovery, the holder-expiry wake-up, polling where notifications do not
// arrive, local FIFO coalescing and cancellation. Every client here polls once
// an hour and its holders live for an hour, unless a test says otherwise: a
// waiter that gets the lock within the test's time-out was woken by what the
// test is about, not by a timer.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// slowTimers: no fallback poll and no holder expiry within any test.
var slowTimers = lease.Config{PollInterval: time.Hour, TTL: time.Hour}

// waitLimit bounds how long a test waits for something that should happen
// within milliseconds; it only turns a hang into a failure.
const waitLimit = 30 * time.Second

type acquired struct {
	l   *lease.Lock
	err error
}

// goAcquire runs c.Acquire in a goroutine and returns where its result goes.
func goAcquire(ctx context.Context, c *lease.Client, k lease.Key) <-chan acquired {
	ch := make(chan acquired, 1)
	go func() {
		l, err := c.Acquire(ctx, k)
		ch <- acquired{l, err}
	}()
	return ch
}

// await returns the result of an Acquire started by goAcquire.
func await(t *testing.T, ch <-chan acquired, what string) acquired {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(waitLimit):
		t.Fatalf("%s: still waiting after %s", what, waitLimit)
		return acquired{}
	}
}

func mustAcquire(t *testing.T, ctx context.Context, c *lease.Client, k lease.Key) *lease.Lock {
	t.Helper()
	l, err := c.Acquire(ctx, k)
	if err != nil {
		t.Fatalf("acquire %s: %v", k, err)
	}
	return l
}

func mustRelease(t *testing.T, ctx context.Context, l *lease.Lock) {
	t.Helper()
	if err := l.Release(ctx); err != nil {
		t.Fatalf("release %s: %v", l.Key(), err)
	}
}

// warmUp makes c start its LISTEN connection (an Acquire that has to wait
// does), keeps it for the rest of the test (rather than for the dispatcher's
// linger after the last waiter), and waits until it listens, so that the
// wake-up every (re)connect sends is over before a test counts attempts.
func warmUp(t *testing.T, e *env, c *lease.Client) {
	t.Helper()
	lease.KeepListening(c)
	k := lease.Key{Name: "warm-up", ID: fmt.Sprintf("%p", c)}
	other, _, _ := e.client(lease.Config{})
	held := mustAcquire(t, e.ctx, other, k)
	got := goAcquire(e.ctx, c, k)
	eventually(t, waitLimit, "the LISTEN connection", func() bool { return lease.Listening(c) })
	mustRelease(t, e.ctx, held)
	r := await(t, got, "the warm-up acquire")
	if r.err != nil {
		t.Fatal(r.err)
	}
	mustRelease(t, e.ctx, r.l)
	_ = other.Close(e.ctx)
}

// A release in one client hands the key to a waiter in another, which hears
// of it through a notification on its holder's channel: with the fallback
// poll and the holder's expiry an hour away, the waiter gets the lock at once,
// and sends no statement after the one that queued it.
func TestReleaseWakesWaiterInOtherClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.client(slowTimers)
	b, _, _ := e.client(slowTimers)
	warmUp(t, e, b)
	k := lease.Key{Name: "wake", ID: "1"}
	la := mustAcquire(t, e.ctx, a, k)
	base := lease.Attempts(b)
	got := goAcquire(e.ctx, b, k)
	eventually(t, waitLimit, "b's first attempt", func() bool { return lease.Attempts(b) == base+1 })
	mustRelease(t, e.ctx, la)
	r := await(t, got, "b after a's release")
	if r.err != nil {
		t.Fatal(r.err)
	}
	if n := lease.Attempts(b) - base; n != 1 {
		t.Fatalf("b sent %d acquire statements, want 1 (the one that queued it; the release hands the key over)", n)
	}
	mustRelease(t, e.ctx, r.l)
}

// The LISTEN connection is terminated while goroutines wait, and a release
// happens while it is down (its notification is lost). When the listener is
// back it wakes every waiter, they get the lock in turn, and later releases
// are announced on the new connection.
func TestListenerKilledWhileWaiting(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.client(slowTimers)
	b, _, _ := e.client(slowTimers)
	warmUp(t, e, b)
	if n := lease.ListenerConnections(b); n != 1 {
		t.Fatalf("%d LISTEN connections after warm-up, want 1", n)
	}
	k := lease.Key{Name: "listener", ID: "1"}
	la := mustAcquire(t, e.ctx, a, k)
	base := lease.Attempts(b)
	const waiters = 3
	results := make([]<-chan acquired, waiters)
	for i := range waiters {
		results[i] = goAcquire(e.ctx, b, k)
		eventually(t, waitLimit, "waiter queued", func() bool { return lease.QueueLen(b, k) == i+1 })
	}
	eventually(t, waitLimit, "the head's first attempt", func() bool { return lease.Attempts(b) == base+1 })

	resume := lease.PauseListener(b)
	defer resume()
	pid := lease.ListenerPID(b)
	n, err := e.db.Cluster.TerminateBackends(e.ctx, "pid = $1", int(pid))
	if err != nil || n != 1 {
		t.Fatalf("terminated %d backends (pid %d): %v", n, pid, err)
	}
	eventually(t, waitLimit, "the listener to notice", func() bool { return lease.ListenerPID(b) == 0 })
	mustRelease(t, e.ctx, la) // announced while nobody of b listens
	resume()

	for i, ch := range results {
		r := await(t, ch, fmt.Sprintf("waiter %d after the listener came back", i))
		if r.err != nil {
			t.Fatalf("waiter %d: %v", i, r.err)
		}
		mustRelease(t, e.ctx, r.l)
	}
	if n := lease.ListenerConnections(b); n != 2 {
		t.Fatalf("%d LISTEN connections, want 2 (one reconnect)", n)
	}
	newPID := lease.ListenerPID(b)
	if newPID == 0 || newPID == pid {
		t.Fatalf("listener pid %d after reconnect (was %d)", newPID, pid)
	}
	if n := e.count("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", int(newPID)); n != 1 {
		t.Fatalf("new LISTEN backend %d not found in pg_stat_activity", newPID)
	}

	// Notifications arrive on the new connection.
	k2 := lease.Key{Name: "listener", ID: "2"}
	la2 := mustAcquire(t, e.ctx, a, k2)
	base = lease.Attempts(b)
	got := goAcquire(e.ctx, b, k2)
	eventually(t, waitLimit, "b's first attempt on the second key", func() bool { return lease.Attempts(b) == base+1 })
	mustRelease(t, e.ctx, la2)
	r := await(t, got, "b after the second release")
	if r.err != nil {
		t.Fatal(r.err)
	}
	mustRelease(t, e.ctx, r.l)
	if n := lease.ListenerConnections(b); n != 2 {
		t.Fatalf("%d LISTEN connections at the end, want 2", n)
	}
}

// Fifty goroutines of one client queue on one key held by another client. They
// get it in the order they asked, and the client sends one acquire statement
// per wake-up: one for the head before the release, then one per goroutine.
func TestLocalFIFOOneAttemptPerWakeUp(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.client(slowTimers)
	b, _, _ := e.client(slowTimers)
	warmUp(t, e, b)
	k := lease.Key{Name: "fifo", ID: "1"}
	la := mustAcquire(t, e.ctx, a, k)
	base := lease.Attempts(b)

	const n = 50
	var (
		mu    sync.Mutex
		order []int
		wg    sync.WaitGroup
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := b.Acquire(e.ctx, k)
			if err != nil {
				t.Errorf("goroutine %d: %v", i, err)
				return
			}
			mu.Lock()
			order = append(order, i)
			mu.Unlock()
			if err := l.Release(e.ctx); err != nil {
				t.Errorf("goroutine %d: release: %v", i, err)
			}
		}()
		eventually(t, waitLimit, "goroutine queued", func() bool { return lease.QueueLen(b, k) == i+1 })
	}
	eventually(t, waitLimit, "the head's first attempt", func() bool { return lease.Attempts(b) == base+1 })
	if got := lease.Attempts(b) - base; got != 1 {
		t.Fatalf("%d acquire statements while %d goroutines wait, want 1", got, n)
	}
	mustRelease(t, e.ctx, la)
	all := make(chan struct{})
	go func() { wg.Wait(); close(all) }()
	select {
	case <-all:
	case <-time.After(waitLimit):
		left := lease.QueueLen(b, k)
		_ = b.Close(e.ctx) // ends the waiting goroutines while the test still runs
		<-all
		t.Fatalf("after %s, %d of %d goroutines had not had the lock", waitLimit, left, n)
	}
	if t.Failed() {
		t.FailNow()
	}
	for i, g := range order {
		if g != i {
			t.Fatalf("acquisition order %v, want 0..%d", order, n-1)
		}
	}
	// The head queued in the database and was handed the key; each of the
	// others asks once, when its turn comes, and finds the key free.
	if got := lease.Attempts(b) - base; got != n {
		t.Fatalf("%d acquire statements, want %d (one per wake-up)", got, n)
	}
	if q := lease.QueueLen(b, k); q != 0 {
		t.Fatalf("queue length %d at the end", q)
	}
}

// Waiters whose contexts are cancelled (the middle one, then the head, then
// the last) leave nothing behind: no queue entry, no subscription, no key
// state, no row; the rest of the queue moves on; a later TryAcquire by the same
// client works; Close leaves no row of the client. (Goroutine leaks fail the
// package through goleak in TestMain.)
func TestCancelledWaiterLeavesNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.client(slowTimers)
	b, _, _ := e.client(slowTimers)
	warmUp(t, e, b)
	hb, ok := b.HolderID()
	if !ok {
		t.Fatal("b has no holder after warm-up")
	}
	k := lease.Key{Name: "cancel", ID: "1"}
	la := mustAcquire(t, e.ctx, a, k)
	base := lease.Attempts(b)

	var cancels [3]context.CancelFunc
	var results [3]<-chan acquired
	for i := range results {
		ctx, cancel := context.WithCancel(e.ctx)
		cancels[i] = cancel
		results[i] = goAcquire(ctx, b, k)
		eventually(t, waitLimit, "waiter queued", func() bool { return lease.QueueLen(b, k) == i+1 })
	}
	eventually(t, waitLimit, "the head's first attempt", func() bool { return lease.Attempts(b) == base+1 })

	cancelled := func(i, queueLeft int) {
		t.Helper()
		cancels[i]()
		r := await(t, results[i], fmt.Sprintf("cancelled waiter %d", i))
		if !errors.Is(r.err, context.Canceled) || r.l != nil {
			t.Fatalf("cancelled waiter %d: lock %v, error %v; want context.Canceled", i, r.l, r.err)
		}
		// The last one to give up leaves a clean-up in the queue for a
		// moment: it deletes the client's waiter row in the database.
		eventually(t, waitLimit, fmt.Sprintf("queue length %d after cancelling waiter %d", queueLeft, i),
			func() bool { return lease.QueueLen(b, k) == queueLeft })
	}
	cancelled(1, 2) // the middle: no attempt of its own
	if got := lease.Attempts(b) - base; got != 1 {
		t.Fatalf("%d acquire statements after cancelling a queued waiter, want 1", got)
	}
	cancelled(0, 1) // the head: the last one becomes head and asks once
	eventually(t, waitLimit, "the new head's attempt", func() bool { return lease.Attempts(b) == base+2 })
	cancelled(2, 0)

	if n := lease.KeyStates(b); n != 0 {
		t.Fatalf("b keeps state for %d keys", n)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("waiting")); n != 0 {
		t.Fatalf("%d waiter rows left in the database", n)
	}
	if n := lease.Subscriptions(b); n != 0 {
		t.Fatalf("b's dispatcher has %d subscriptions", n)
	}
	if n := e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE holder_id = $1", hb); n != 0 {
		t.Fatalf("%d lock rows of b's holder", n)
	}
	if _, err := b.TryAcquire(e.ctx, k); !errors.Is(err, lease.ErrLocked) {
		t.Fatalf("TryAcquire while a holds: %v, want ErrLocked", err)
	}
	mustRelease(t, e.ctx, la)
	lb, err := b.TryAcquire(e.ctx, k)
	if err != nil {
		t.Fatalf("TryAcquire after the cancellations: %v", err)
	}
	if lb.HolderID() != hb {
		t.Fatalf("lock of holder %d, want b's %d", lb.HolderID(), hb)
	}
	if err := b.Close(e.ctx); err != nil {
		t.Fatal(err)
	}
	if n := e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE holder_id = $1", hb); n != 0 {
		t.Fatalf("%d lock rows of b after Close", n)
	}
	if n := e.count("SELECT count(*) FROM "+e.table("holders")+" WHERE id = $1", hb); n != 0 {
		t.Fatal("b's holder row is left after Close")
	}
	if !errors.Is(lb.Err(), lease.ErrClosed) {
		t.Fatalf("lock after Close: %v, want ErrClosed", lb.Err())
	}
}

// A holder that dies without a word (its pool is closed: no release, no
// notification) is taken over when its lease runs out: the waiter wakes at
// the expiry it was told, not at its hourly poll.
func TestWaiterWakesAtHolderExpiry(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, poolA, _ := e.client(lease.Config{TTL: time.Second, HeartbeatInterval: 200 * time.Millisecond, PollInterval: time.Hour})
	b, _, _ := e.client(slowTimers)
	warmUp(t, e, b)
	k := lease.Key{Name: "expiry", ID: "1"}
	la := mustAcquire(t, e.ctx, a, k)
	base := lease.Attempts(b)
	got := goAcquire(e.ctx, b, k)
	eventually(t, waitLimit, "b's first attempt", func() bool { return lease.Attempts(b) == base+1 })
	poolA.Close()
	r := await(t, got, "b after a's holder expired")
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.l.Token() <= la.Token() {
		t.Fatalf("token %d after takeover, not above %d", r.l.Token(), la.Token())
	}
	// One attempt at each expiry b was told of (a renewed a few times while b
	// waited), and no polling in between: far fewer than a poll every few
	// milliseconds would make.
	if n := lease.Attempts(b) - base; n > 10 {
		t.Fatalf("b sent %d acquire statements while waiting about a second", n)
	}
	mustRelease(t, e.ctx, r.l)
}

// Behind something that swallows notifications (as a transaction-pooling proxy
// may), waiting falls back to the poll, and the client says so once in its log
// however often its listener reconnects.
func TestNoNotificationsFallsBackToPolling(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.client(slowTimers)
	proxy := newDropNotifyProxy(t, e.db.Cluster.URL())
	logs := &logBuffer{}
	pool := pgtest.NewPool(t, e.db.Cluster, e.db.Schema+"-proxied", func(c *pgxpool.Config) {
		c.MaxConns = 4
		c.ConnConfig.Host, c.ConnConfig.Port = "127.0.0.1", proxy.port
		c.ConnConfig.Fallbacks = nil
	})
	b, err := lease.New(pool, &lease.Config{Schema: e.db.Schema, TTL: time.Hour, PollInterval: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = b.Close(e.ctx) }()

	const warning = "notifications do not arrive"
	k := lease.Key{Name: "proxied", ID: "1"}
	for round := range 2 {
		la := mustAcquire(t, e.ctx, a, k)
		got := goAcquire(e.ctx, b, k)
		eventually(t, waitLimit, "b's listener to connect", func() bool { return lease.ListenerPID(b) != 0 })
		eventually(t, waitLimit, "the warning", func() bool { return logs.count(warning) > 0 })
		if lease.Listening(b) {
			t.Fatal("Listening reports true although notifications do not arrive")
		}
		mustRelease(t, e.ctx, la)
		r := await(t, got, "b polling")
		if r.err != nil {
			t.Fatal(r.err)
		}
		mustRelease(t, e.ctx, r.l)
		if round == 0 { // a reconnect does not repeat the warning
			conns := lease.ListenerConnections(b)
			if n, err := e.db.Cluster.TerminateBackends(e.ctx, "pid = $1", int(lease.ListenerPID(b))); err != nil || n != 1 {
				t.Fatalf("terminated %d backends: %v", n, err)
			}
			eventually(t, waitLimit, "the listener to reconnect", func() bool { return lease.ListenerConnections(b) > conns })
		}
	}
	if n := proxy.dropped(); n == 0 {
		t.Fatal("the proxy dropped no notification: the test did not test anything")
	}
	if n := logs.count(warning); n != 1 {
		t.Fatalf("the warning was logged %d times, want once:\n%s", n, logs.String())
	}
}

// logBuffer is a concurrency-safe log sink.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) count(s string) int { return strings.Count(l.String(), s) }

// dropNotifyProxy forwards TCP connections to a PostgreSQL server and drops
// every NotificationResponse the server sends: LISTEN and NOTIFY succeed, and
// nothing is ever delivered.
type dropNotifyProxy struct {
	port   uint16
	ln     net.Listener
	target string

	mu      sync.Mutex
	conns   []net.Conn
	drops   int
	wg      sync.WaitGroup
	closing bool
}

func newDropNotifyProxy(t *testing.T, url string) *dropNotifyProxy {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		t.Fatal(err)
	}
	if strings.HasPrefix(cfg.ConnConfig.Host, "/") {
		t.Fatalf("the proxy needs a TCP server, got socket %s", cfg.ConnConfig.Host)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &dropNotifyProxy{ln: ln, port: uint16(ln.Addr().(*net.TCPAddr).Port),
		target: net.JoinHostPort(cfg.ConnConfig.Host, strconv.Itoa(int(cfg.ConnConfig.Port)))}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *dropNotifyProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		if p.closing {
			p.mu.Unlock()
			c.Close()
			s.Close()
			return
		}
		p.conns = append(p.conns, c, s)
		p.wg.Add(2)
		p.mu.Unlock()
		go func() {
			defer p.wg.Done()
			_, _ = io.Copy(s, c)
			s.Close()
			c.Close()
		}()
		go func() {
			defer p.wg.Done()
			p.filter(c, s)
			s.Close()
			c.Close()
		}()
	}
}

// filter copies server messages to the client, less NotificationResponses
// ('A'). Every message the server sends has a type byte and a length (the
// client asks for no TLS, so no one-byte answer comes first).
func (p *dropNotifyProxy) filter(client, server net.Conn) {
	var hdr [5]byte
	for {
		if _, err := io.ReadFull(server, hdr[:]); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
		if n < 0 {
			return
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(server, body); err != nil {
			return
		}
		if hdr[0] == 'A' {
			p.mu.Lock()
			p.drops++
			p.mu.Unlock()
			continue
		}
		if _, err := client.Write(append(hdr[:], body...)); err != nil {
			return
		}
	}
}

func (p *dropNotifyProxy) dropped() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.drops
}

func (p *dropNotifyProxy) close() {
	p.mu.Lock()
	p.closing = true
	conns := p.conns
	p.mu.Unlock()
	p.ln.Close()
	for _, c := range conns {
		c.Close()
	}
	p.wg.Wait()
}

// The notification of a client's own release can arrive before the release's
// reply. It must not be taken for a row deleted from under the lock.
func TestOwnReleaseNotReportedLost(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	logs := &logBuffer{}
	cfg := slowTimers
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	c, _, _ := e.client(cfg)
	warmUp(t, e, c)
	k := lease.Key{Name: "own", ID: "1"}
	for range 300 {
		mustRelease(t, e.ctx, mustAcquire(t, e.ctx, c, k))
	}
	if n := logs.count("lock lost"); n != 0 {
		t.Fatalf("%d releases were logged as lost locks:\n%s", n, logs.String())
	}
}
