// Package dispatch wakes waiting acquirers when lock rows are deleted.
//
// One Dispatcher per client holds one LISTEN connection, shared by all its
// waiters. A trigger on the locks table NOTIFYs a JSON array of deleted
// [name, id, token] triples (or "*" after a TRUNCATE); the dispatcher wakes the
// waiters of each key. Notifications are hints, never the basis of a decision:
// a waiter that misses one wakes on its own timer and asks the database. So the
// dispatcher reconnects by itself, wakes every waiter after each (re)connect
// (anything may have been missed meanwhile), and when notifications turn out
// not to arrive at all (a transaction-pooling proxy) it says so once in the log
// and waiting degrades to polling.
package dispatch

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"math/big"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Config configures a Dispatcher.
type Config struct {
	// Connect opens the LISTEN connection.
	Connect func(ctx context.Context) (*pgx.Conn, error)
	// Channel is the notification channel.
	Channel string
	// OnDelete, if set, is called for every deleted lock row announced, from
	// the dispatcher's goroutine. key is name + "\x00" + id.
	OnDelete func(key string, token int64)
	Logger   *slog.Logger
	// ProbeTimeout bounds the self-test that checks notifications arrive at all.
	// Defaults to 2s.
	ProbeTimeout time.Duration
}

// Dispatcher fans notifications out to per-key wake channels.
type Dispatcher struct {
	cfg Config

	mu        sync.Mutex
	subs      map[string]*entry
	started   bool
	listening bool
	degraded  bool
	conns     int // successful LISTEN connections so far

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
	if cfg.ProbeTimeout == 0 {
		cfg.ProbeTimeout = 2 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Dispatcher{cfg: cfg, subs: map[string]*entry{}, ctx: ctx, cancel: cancel, done: make(chan struct{})}
}

// Sub is one waiter's interest in a key.
type Sub struct {
	d      *Dispatcher
	key    string
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
	return &Sub{d: d, key: key}
}

// C returns a channel closed at the next wake-up of the key.
func (s *Sub) C() <-chan struct{} {
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	return s.d.subs[s.key].ch
}

// Close drops the interest. Idempotent.
func (s *Sub) Close() {
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	if e := s.d.subs[s.key]; e != nil {
		e.refs--
		if e.refs == 0 {
			delete(s.d.subs, s.key)
		}
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
	for k := range d.subs {
		d.wakeLocked(k)
	}
}

// Listening reports whether the LISTEN connection is up and notifications were
// seen to arrive on it.
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

func (d *Dispatcher) run() {
	defer close(d.done)
	backoff := 50 * time.Millisecond
	down := false
	for d.ctx.Err() == nil {
		err := d.session()
		if d.ctx.Err() != nil {
			return
		}
		if !down {
			d.cfg.Logger.Warn("pglease: notification listener disconnected; reconnecting", "error", err)
			down = true
		}
		d.mu.Lock()
		ok := d.listening
		d.listening = false
		d.mu.Unlock()
		if ok {
			backoff = 50 * time.Millisecond
		}
		t := time.NewTimer(jitter(backoff))
		select {
		case <-d.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if backoff < 5*time.Second {
			backoff *= 2
		}
		if ok {
			down = false
		}
	}
}

// session runs one LISTEN connection until it fails.
func (d *Dispatcher) session() error {
	conn, err := d.cfg.Connect(d.ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(d.ctx, "LISTEN "+pgx.Identifier{d.cfg.Channel}.Sanitize()); err != nil {
		return err
	}
	// Self-test: our own NOTIFY must come back. Behind a transaction-pooling
	// proxy it may not.
	var nonce [8]byte
	_, _ = rand.Read(nonce[:])
	probe := "probe " + hex.EncodeToString(nonce[:])
	if _, err := conn.Exec(d.ctx, "SELECT pg_notify($1, $2)", d.cfg.Channel, probe); err != nil {
		return err
	}
	d.mu.Lock()
	d.listening = true
	d.conns++
	d.mu.Unlock()
	d.WakeAll() // anything may have been missed while we were not listening

	probeDeadline := time.Now().Add(d.cfg.ProbeTimeout)
	probed := false
	for {
		ctx, cancel := d.ctx, context.CancelFunc(func() {})
		if !probed {
			ctx, cancel = context.WithDeadline(d.ctx, probeDeadline)
		}
		n, err := conn.WaitForNotification(ctx)
		cancel()
		if err != nil {
			if probed || d.ctx.Err() != nil || conn.IsClosed() {
				return err
			}
			// The probe did not come back in time; the connection itself is
			// fine (a timed-out wait leaves it open).
			probed = true
			d.mu.Lock()
			first := !d.degraded
			d.degraded = true
			d.mu.Unlock()
			if first {
				d.cfg.Logger.Warn("pglease: notifications do not arrive (a transaction-pooling proxy?); waiting falls back to polling",
					"channel", d.cfg.Channel)
			}
			continue
		}
		if n.Payload == probe {
			probed = true
			d.mu.Lock()
			d.degraded = false
			d.mu.Unlock()
			continue
		}
		d.handle(n.Payload)
	}
}

func (d *Dispatcher) handle(payload string) {
	if payload == "*" {
		d.WakeAll()
		return
	}
	var rows [][3]json.RawMessage
	if err := json.Unmarshal([]byte(payload), &rows); err != nil {
		return // a probe of another client, or not ours
	}
	type gone struct {
		key   string
		token int64
	}
	var all []gone
	d.mu.Lock()
	for _, r := range rows {
		var name, id string
		var token int64
		if json.Unmarshal(r[0], &name) != nil || json.Unmarshal(r[1], &id) != nil || json.Unmarshal(r[2], &token) != nil {
			continue
		}
		k := name + "\x00" + id
		d.wakeLocked(k)
		all = append(all, gone{k, token})
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
