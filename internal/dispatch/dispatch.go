// Package dispatch wakes waiting acquirers when lock rows are deleted.
//
// One Dispatcher per client holds one LISTEN connection, shared by all its
// waiters. A trigger on the locks table NOTIFYs a JSON array of deleted
// [name, id, token] triples (or "*" after a TRUNCATE); the dispatcher wakes the
// waiters of each key. Notifications are hints, never the basis of a decision:
// a waiter that misses one wakes on its own timer and asks the database. So the
// dispatcher reconnects by itself, wakes every waiter after each (re)connect
// (anything may have been missed meanwhile), re-checks an idle connection
// every ProbeInterval (a half-open TCP connection would otherwise go unnoticed
// for minutes), and when notifications turn out not to arrive at all (a
// transaction-pooling proxy) it says so once in the log and waiting degrades
// to polling.
package dispatch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"math/big"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Defaults of Config.
const (
	ProbeTimeoutDefault  = 2 * time.Second
	ProbeIntervalDefault = 30 * time.Second
)

// Config configures a Dispatcher.
type Config struct {
	// Connect opens the LISTEN connection.
	Connect func(ctx context.Context) (*pgx.Conn, error)
	// Channel is the notification channel.
	Channel string
	// AfterListen, if set, runs on every new connection after its LISTEN
	// and before the wake-up that follows a (re)connect, bounded by
	// ProbeTimeout. An error fails the connection, which is retried. The
	// lease package registers the connection as a listener here, so that
	// releases that announce themselves only to listeners reach it.
	AfterListen func(ctx context.Context, conn *pgx.Conn) error
	// OnDelete, if set, is called for every deleted lock row announced, from
	// the dispatcher's goroutine, after the key's waiters were woken. key is
	// name + "\x00" + id.
	OnDelete func(key string, token int64)
	// Received, if set, is called for every notification that arrives on the
	// LISTEN connection, from the dispatcher's goroutine, with its kind.
	Received func(Kind)
	// Logger receives the dispatcher's records. Defaults to discarding them.
	Logger *slog.Logger
	// ProbeTimeout bounds the self-test that checks notifications arrive at
	// all. Defaults to ProbeTimeoutDefault (2s).
	ProbeTimeout time.Duration
	// ProbeInterval is how long the connection may stay silent before the
	// self-test is repeated, which also finds a connection that died without
	// a word. Defaults to ProbeIntervalDefault (30s).
	ProbeInterval time.Duration
}

// Kind is what a notification received was.
type Kind uint8

// The kinds of notification.
const (
	KindDelete   Kind = iota // lock rows deleted (a release, a reap, a DBA's DELETE)
	KindTruncate             // the locks table truncated
	KindProbe                // this dispatcher's own self-test
	KindOther                // anything else: another client's self-test, a payload not ours
	NumKinds
)

// Dispatcher fans notifications out to per-key wake channels.
type Dispatcher struct {
	cfg Config

	mu        sync.Mutex
	subs      map[string]*entry
	started   bool
	listening bool
	degraded  bool
	warned    bool          // the "notifications do not arrive" warning was logged
	conns     int           // successful LISTEN connections so far
	pid       uint32        // backend pid of the LISTEN connection; 0 when down
	gate      chan struct{} // non-nil: connecting waits until it is closed (tests)

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

type entry struct {
	ch   chan struct{}
	refs int
}

// New returns a Dispatcher. Its connection is opened on first Subscribe.
func New(cfg Config) *Dispatcher {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.ProbeTimeout <= 0 {
		cfg.ProbeTimeout = ProbeTimeoutDefault
	}
	if cfg.ProbeInterval <= 0 {
		cfg.ProbeInterval = ProbeIntervalDefault
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Dispatcher{cfg: cfg, subs: map[string]*entry{}, ctx: ctx, cancel: cancel, done: make(chan struct{})}
}

// Sub is one waiter's interest in a key.
type Sub struct {
	d      *Dispatcher
	key    string
	e      *entry
	closed bool
}

// Subscribe registers interest in key and starts the listener if needed.
// Take C() before asking the database, then wait on it: a wake-up in between
// is not lost.
func (d *Dispatcher) Subscribe(key string) *Sub {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.subs[key]
	if e == nil {
		e = &entry{ch: make(chan struct{})}
		d.subs[key] = e
	}
	e.refs++
	if !d.started && d.ctx.Err() == nil {
		d.started = true
		go d.run()
	}
	return &Sub{d: d, key: key, e: e}
}

// C returns a channel closed at the next wake-up of the key.
func (s *Sub) C() <-chan struct{} {
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	return s.e.ch
}

// Close drops the interest. Idempotent.
func (s *Sub) Close() {
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	s.e.refs--
	if s.e.refs == 0 && s.d.subs[s.key] == s.e {
		delete(s.d.subs, s.key)
	}
}

// Wake wakes the waiters of key, as a notification would.
func (d *Dispatcher) Wake(key string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.wakeLocked(key)
}

func (d *Dispatcher) wakeLocked(key string) {
	if e := d.subs[key]; e != nil {
		close(e.ch)
		e.ch = make(chan struct{})
	}
}

// WakeAll wakes every waiter.
func (d *Dispatcher) WakeAll() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.wakeAllLocked()
}

func (d *Dispatcher) wakeAllLocked() {
	for k := range d.subs {
		d.wakeLocked(k)
	}
}

// Listening reports whether the LISTEN connection is up and notifications were
// not seen to go missing on it. Once it reports true, the wake-up that follows
// a (re)connect has been delivered.
func (d *Dispatcher) Listening() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.listening && !d.degraded
}

// Connections reports how many times the LISTEN connection was established.
func (d *Dispatcher) Connections() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.conns
}

// BackendPID is the server process id of the LISTEN connection, 0 while there
// is none.
func (d *Dispatcher) BackendPID() uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.pid
}

// Subscriptions reports how many keys have waiters subscribed.
func (d *Dispatcher) Subscriptions() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.subs)
}

// PauseConnecting makes the dispatcher wait before its next connection attempt
// until resume is called. For tests that need the listener to stay down.
func (d *Dispatcher) PauseConnecting() (resume func()) {
	g := make(chan struct{})
	d.mu.Lock()
	d.gate = g
	d.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			d.mu.Lock()
			if d.gate == g {
				d.gate = nil
			}
			d.mu.Unlock()
			close(g)
		})
	}
}

// Close stops the listener and waits for it.
func (d *Dispatcher) Close() {
	d.mu.Lock()
	started := d.started
	d.started = true // no start after Close
	d.mu.Unlock()
	d.cancel()
	if started {
		<-d.done
	}
}

const (
	minBackoff = 50 * time.Millisecond
	maxBackoff = 5 * time.Second
)

func (d *Dispatcher) run() {
	defer close(d.done)
	backoff := minBackoff
	down := false
	for d.ctx.Err() == nil {
		d.mu.Lock()
		gate := d.gate
		d.mu.Unlock()
		if gate != nil {
			select {
			case <-gate:
			case <-d.ctx.Done():
				return
			}
		}
		ok, err := d.session()
		if d.ctx.Err() != nil {
			return
		}
		if ok {
			backoff = minBackoff
			down = false
		}
		if !down {
			d.cfg.Logger.Warn("pglease: notification listener disconnected; reconnecting", "error", err)
			down = true
		}
		t := time.NewTimer(jitter(backoff))
		select {
		case <-d.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(backoff*2, maxBackoff)
	}
}

// session runs one LISTEN connection until it fails. ok reports whether it got
// as far as listening.
func (d *Dispatcher) session() (ok bool, err error) {
	conn, err := d.cfg.Connect(d.ctx)
	if err != nil {
		return false, err
	}
	defer conn.Close(context.Background())
	defer func() {
		d.mu.Lock()
		d.listening = false
		d.pid = 0
		d.mu.Unlock()
	}()
	if _, err := conn.Exec(d.ctx, "LISTEN "+pgx.Identifier{d.cfg.Channel}.Sanitize()); err != nil {
		return false, err
	}
	if d.cfg.AfterListen != nil {
		ctx, cancel := context.WithTimeout(d.ctx, d.cfg.ProbeTimeout)
		err := d.cfg.AfterListen(ctx, conn)
		cancel()
		if err != nil {
			return false, err
		}
	}
	// Self-test: our own NOTIFY must come back. Behind a transaction-pooling
	// proxy it may not.
	probe, err := d.probe(conn)
	if err != nil {
		return false, err
	}
	d.mu.Lock()
	d.listening = true
	d.conns++
	d.pid = conn.PgConn().PID()
	// Anything may have been missed while we were not listening. In the same
	// critical section as listening = true, so that Listening() reporting
	// true means this wake-up is done.
	d.wakeAllLocked()
	d.mu.Unlock()

	probeDeadline := time.Now().Add(d.cfg.ProbeTimeout)
	for {
		deadline := probeDeadline
		if probe == "" {
			deadline = time.Now().Add(d.cfg.ProbeInterval)
		}
		ctx, cancel := context.WithDeadline(d.ctx, deadline)
		n, err := conn.WaitForNotification(ctx)
		cancel()
		if err != nil {
			if d.ctx.Err() != nil || conn.IsClosed() || !errors.Is(err, context.DeadlineExceeded) {
				return true, err
			}
			// Silence until the deadline; the connection itself is fine (a
			// timed-out wait leaves it open).
			if probe != "" {
				d.probeLost()
				probe = ""
				continue
			}
			if probe, err = d.probe(conn); err != nil {
				return true, err
			}
			probeDeadline = time.Now().Add(d.cfg.ProbeTimeout)
			continue
		}
		if n.Payload == probe {
			d.received(KindProbe)
			probe = ""
			d.mu.Lock()
			d.degraded = false
			d.mu.Unlock()
			continue
		}
		d.handle(n.Payload)
	}
}

// probe sends a NOTIFY to ourselves and returns its payload.
func (d *Dispatcher) probe(conn *pgx.Conn) (string, error) {
	var nonce [8]byte
	_, _ = rand.Read(nonce[:])
	p := "probe " + hex.EncodeToString(nonce[:])
	ctx, cancel := context.WithTimeout(d.ctx, d.cfg.ProbeTimeout)
	defer cancel()
	_, err := conn.Exec(ctx, "SELECT pg_notify($1, $2)", d.cfg.Channel, p)
	return p, err
}

// probeLost records that our own NOTIFY did not come back in time.
func (d *Dispatcher) probeLost() {
	d.mu.Lock()
	d.degraded = true
	first := !d.warned
	d.warned = true
	d.mu.Unlock()
	if first {
		d.cfg.Logger.Warn("pglease: notifications do not arrive (a transaction-pooling proxy?); waiting falls back to polling",
			"channel", d.cfg.Channel)
	}
}

func (d *Dispatcher) received(k Kind) {
	if d.cfg.Received != nil {
		d.cfg.Received(k)
	}
}

func (d *Dispatcher) handle(payload string) {
	if payload == "*" {
		d.received(KindTruncate)
		d.WakeAll()
		return
	}
	var rows [][3]json.RawMessage
	if err := json.Unmarshal([]byte(payload), &rows); err != nil {
		d.received(KindOther)
		return // a probe of another client, or not ours
	}
	d.received(KindDelete)
	type gone struct {
		key   string
		token int64
	}
	all := make([]gone, 0, len(rows))
	for _, r := range rows {
		var name, id string
		var token int64
		if json.Unmarshal(r[0], &name) != nil || json.Unmarshal(r[1], &id) != nil || json.Unmarshal(r[2], &token) != nil {
			continue
		}
		all = append(all, gone{name + "\x00" + id, token})
	}
	d.mu.Lock()
	for _, g := range all {
		d.wakeLocked(g.key)
	}
	d.mu.Unlock()
	if d.cfg.OnDelete != nil {
		for _, g := range all {
			d.cfg.OnDelete(g.key, g.token)
		}
	}
}

// jitter returns d ± 20%.
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return d
	}
	n, err := rand.Int(rand.Reader, big.NewInt(int64(d)*2/5+1))
	if err != nil {
		return d
	}
	return d*4/5 + time.Duration(n.Int64())
}

// Jitter returns d ± 20%, for callers' fallback timers.
func Jitter(d time.Duration) time.Duration { return jitter(d) }
