// Package dispatch wakes waiting acquirers when the database tells them to.
//
// One Dispatcher per client holds one LISTEN connection, shared by all its
// waiters, and only while someone waits (and for Linger after the last one
// stopped, so that a key taken and waited for in a loop does not reconnect
// every time). It listens on two channels, each only when needed:
//
//   - the holder's channel (SetHolder), while any waiter is subscribed: the
//     database hands a released key to a waiting holder and says so there,
//     ["h", name, id, token, slot, waiter id, kind, permits, acquired_at µs]
//     (OnHandoff), or asks it to look again, ["r", name, id] (OnPoke);
//   - the schema's channel (Config.Channel), while a wide subscriber waits
//     (Subscribe with wide set: a waiter on the advisory path, an election
//     observer), which hears every release: a JSON array of deleted
//     [name, id, token] triples, or "*" after a TRUNCATE. Releases are
//     announced there only while some session holds the schema's listener
//     lock, which AfterListen takes and Unlisten gives back.
//
// Notifications are hints, never the basis of a decision: a waiter that misses
// one wakes on its own timer and asks the database. So the dispatcher
// reconnects by itself, wakes every waiter after each (re)connect and after it
// starts listening on a channel (anything may have been missed meanwhile),
// re-checks an idle connection every ProbeInterval (a half-open TCP connection
// would otherwise go unnoticed for minutes), and when notifications turn out
// not to arrive at all (a transaction-pooling proxy) it says so once in the
// log and waiting degrades to polling.
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
	LingerDefault        = 5 * time.Second
)

// Config configures a Dispatcher.
type Config struct {
	// Connect opens the LISTEN connection.
	Connect func(ctx context.Context) (*pgx.Conn, error)
	// Channel is the schema's notification channel, listened on while a
	// wide subscriber waits.
	Channel string
	// AfterListen, if set, runs after the LISTEN on Channel and before the
	// wake-up that follows it, bounded by ProbeTimeout. An error fails the
	// connection, which is retried. The lease package registers the
	// connection as a listener here, so that releases, which announce
	// themselves only to listeners, reach it.
	AfterListen func(ctx context.Context, conn *pgx.Conn) error
	// Unlisten, if set, runs after the UNLISTEN of Channel when the last wide
	// subscriber has gone: it undoes AfterListen.
	Unlisten func(ctx context.Context, conn *pgx.Conn) error
	// OnDelete, if set, is called for every deleted lock row announced on
	// Channel, from the dispatcher's goroutine, after the key's waiters were
	// woken. key is name + "\x00" + id.
	OnDelete func(key string, token int64)
	// OnHandoff, if set, is called for every key handed to the holder, from
	// the dispatcher's goroutine, before the key's waiters are woken.
	OnHandoff func(Handoff)
	// OnPoke, if set, is called when the holder is asked to look at a key
	// again, with the holder channel it came on, before the key's waiters
	// are woken.
	OnPoke func(key, channel string)
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
	// Linger is how long the connection stays after the last subscriber
	// has gone. Defaults to LingerDefault (5s).
	Linger time.Duration
}

// Handoff is a key granted to the holder by the database (see serve in the
// migrations): the grant exists, committed, with this token.
type Handoff struct {
	Key        string // name + "\x00" + id
	Token      int64
	Slot       int64
	Waiter     int64 // the waiter row the grant replaced
	Kind       string
	Permits    int
	AcquiredAt time.Time
	Channel    string // the holder channel it came on
}

// Kind is what a notification received was.
type Kind uint8

// The kinds of notification.
const (
	KindDelete   Kind = iota // lock rows deleted (a release, a reap, a DBA's DELETE)
	KindTruncate             // the locks table truncated
	KindProbe                // this dispatcher's own self-test
	KindOther                // anything else: another client's self-test, a payload not ours
	KindHandoff              // a key handed to this holder
	KindPoke                 // this holder asked to look at a key again
	NumKinds
)

// Dispatcher fans notifications out to per-key wake channels.
type Dispatcher struct {
	cfg Config

	mu        sync.Mutex
	subs      map[string]*entry
	wide      int       // wide subscriptions
	idleSince time.Time // when the last subscription closed, zero while there are some
	holderCh  string    // the holder's channel, "" while there is none
	interrupt func()    // ends the session's current wait, so it looks at the above again
	started   bool
	stopped   bool // Close was called
	listening bool
	degraded  bool
	warned    bool          // the "notifications do not arrive" warning was logged
	conns     int           // successful LISTEN connections so far
	pid       uint32        // backend pid of the LISTEN connection; 0 when down
	gate      chan struct{} // non-nil: connecting waits until it is closed (tests)

	ctx    context.Context
	cancel context.CancelFunc
	runs   sync.WaitGroup
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
	if cfg.Linger <= 0 {
		cfg.Linger = LingerDefault
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Dispatcher{cfg: cfg, subs: map[string]*entry{}, ctx: ctx, cancel: cancel}
}

// Sub is one waiter's interest in a key.
type Sub struct {
	d      *Dispatcher
	key    string
	e      *entry
	wide   bool
	closed bool
}

// Subscribe registers interest in key and starts the listener if needed.
// A wide subscriber hears every release of the key on the schema's channel;
// the others hear only what the database tells their holder. Take C()
// before asking the database, then wait on it: a wake-up in between is not
// lost.
func (d *Dispatcher) Subscribe(key string, wide bool) *Sub {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.subs[key]
	if e == nil {
		e = &entry{ch: make(chan struct{})}
		d.subs[key] = e
	}
	e.refs++
	d.idleSince = time.Time{}
	if wide {
		d.wide++
		if d.wide == 1 {
			d.interruptLocked()
		}
	}
	if !d.started && !d.stopped {
		d.started = true
		d.runs.Add(1)
		go d.run()
	}
	return &Sub{d: d, key: key, e: e, wide: wide}
}

// SetLinger changes Config.Linger.
func (d *Dispatcher) SetLinger(l time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cfg.Linger = l
	d.interruptLocked()
}

// SetHolder sets the holder channel to listen on ("" for none).
func (d *Dispatcher) SetHolder(ch string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.holderCh != ch {
		d.holderCh = ch
		d.interruptLocked()
	}
}

func (d *Dispatcher) interruptLocked() {
	if d.interrupt != nil {
		d.interrupt()
	}
}

// Wide reports whether the subscriber hears every release of the key.
func (s *Sub) Wide() bool { return s.wide }

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
	if s.wide {
		s.d.wide--
		if s.d.wide == 0 {
			s.d.interruptLocked()
		}
	}
	if len(s.d.subs) == 0 {
		s.d.idleSince = time.Now()
		s.d.interruptLocked()
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
	d.stopped = true // no start after Close
	d.mu.Unlock()
	d.cancel()
	d.runs.Wait()
}

// idleLocked reports whether the listener may stop: nobody has been
// subscribed for Linger.
func (d *Dispatcher) idleLocked() bool {
	return len(d.subs) == 0 && !d.idleSince.IsZero() && time.Since(d.idleSince) >= d.cfg.Linger
}

// stopIfIdle ends the run when the listener may stop; a Subscribe after it
// starts a new one.
func (d *Dispatcher) stopIfIdle() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.idleLocked() {
		d.started = false
		return true
	}
	return false
}

const (
	minBackoff = 50 * time.Millisecond
	maxBackoff = 5 * time.Second
)

func (d *Dispatcher) run() {
	defer d.runs.Done()
	backoff := minBackoff
	down := false
	for d.ctx.Err() == nil {
		if d.stopIfIdle() {
			return
		}
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
		if err == nil { // idle: stopped on purpose
			continue
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

// listenState is what a LISTEN connection listens on.
type listenState struct {
	holder string // the holder channel, or ""
	wide   bool   // the schema's channel, with the listener lock
}

// session runs one LISTEN connection until it fails, or (err nil) until the
// dispatcher has been idle for Linger. ok reports whether it got as far as
// listening.
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
		d.interrupt = nil
		d.mu.Unlock()
	}()
	var on listenState
	probe := "" // the payload of our self-test in flight
	var probeDeadline, quietUntil time.Time
	for {
		d.mu.Lock()
		want := listenState{holder: d.holderCh, wide: d.wide > 0}
		if d.idleLocked() {
			d.mu.Unlock()
			return true, nil
		}
		deadline := quietUntil
		if probe != "" {
			deadline = probeDeadline
		}
		if !d.idleSince.IsZero() {
			if l := d.idleSince.Add(d.cfg.Linger); deadline.IsZero() || l.Before(deadline) {
				deadline = l
			}
		}
		if deadline.IsZero() {
			deadline = time.Now().Add(d.cfg.ProbeInterval)
		}
		wctx, cancel := context.WithDeadline(d.ctx, deadline)
		d.interrupt = cancel // under d.mu with want: a change after this ends the wait
		d.mu.Unlock()

		if want != on {
			added, err := d.apply(conn, on, want)
			if err != nil {
				cancel()
				return ok, err
			}
			on = want
			if added {
				// Our own NOTIFY must come back. Behind a transaction-pooling
				// proxy it may not.
				if probe, err = d.probe(conn, on); err != nil {
					cancel()
					return ok, err
				}
				probeDeadline = time.Now().Add(d.cfg.ProbeTimeout)
				d.mu.Lock()
				if !ok {
					ok = true
					d.conns++
				}
				d.listening = true
				d.pid = conn.PgConn().PID()
				// Anything may have been missed while we were not listening
				// there. In the same critical section as listening = true, so
				// that Listening() reporting true means this wake-up is done.
				d.wakeAllLocked()
				d.mu.Unlock()
				// The wait's deadline was set before the probe: set it again.
				cancel()
				continue
			}
			if on == (listenState{}) {
				quietUntil = time.Time{}
				d.mu.Lock()
				d.listening = false
				d.mu.Unlock()
			}
		}
		if on == (listenState{}) {
			// Nothing to listen on yet (no holder, no wide subscriber): wait
			// for a change.
			<-wctx.Done()
			cancel()
			if d.ctx.Err() != nil {
				return ok, d.ctx.Err()
			}
			continue
		}
		n, err := conn.WaitForNotification(wctx)
		interrupted := wctx.Err() == context.Canceled
		cancel()
		if err != nil {
			if d.ctx.Err() != nil || conn.IsClosed() || !(errors.Is(err, context.DeadlineExceeded) || interrupted) {
				return ok, err
			}
			if interrupted {
				continue // something changed: look again
			}
			if probe != "" && !time.Now().Before(probeDeadline) {
				d.probeLost()
				probe = ""
				quietUntil = time.Now().Add(d.cfg.ProbeInterval)
				continue
			}
			if probe == "" && !time.Now().Before(quietUntil) {
				// Silence for ProbeInterval: is the connection still there?
				if probe, err = d.probe(conn, on); err != nil {
					return ok, err
				}
				probeDeadline = time.Now().Add(d.cfg.ProbeTimeout)
			}
			continue
		}
		quietUntil = time.Now().Add(d.cfg.ProbeInterval)
		if probe != "" && n.Payload == probe {
			d.received(KindProbe)
			probe = ""
			d.mu.Lock()
			d.degraded = false
			d.mu.Unlock()
			continue
		}
		switch {
		case n.Channel == d.cfg.Channel && on.wide:
			d.handle(n.Payload)
		case n.Channel == on.holder:
			d.handleHolder(n.Channel, n.Payload)
		default:
			// Not for us: behind a transaction-pooling proxy a server
			// connection may carry another client's LISTEN, and a
			// notification arrives where it pleases.
			d.received(KindOther)
		}
	}
}

// apply changes what conn listens on from from to to, and reports whether it
// listens on a channel it did not listen on before.
func (d *Dispatcher) apply(conn *pgx.Conn, from, to listenState) (added bool, err error) {
	ctx, cancel := context.WithTimeout(d.ctx, d.cfg.ProbeTimeout)
	defer cancel()
	exec := func(sql string) error {
		_, err := conn.Exec(ctx, sql)
		return err
	}
	if from.holder != to.holder {
		if from.holder != "" {
			if err := exec("UNLISTEN " + pgx.Identifier{from.holder}.Sanitize()); err != nil {
				return false, err
			}
		}
		if to.holder != "" {
			if err := exec("LISTEN " + pgx.Identifier{to.holder}.Sanitize()); err != nil {
				return false, err
			}
			added = true
		}
	}
	switch {
	case to.wide && !from.wide:
		if err := exec("LISTEN " + pgx.Identifier{d.cfg.Channel}.Sanitize()); err != nil {
			return false, err
		}
		if d.cfg.AfterListen != nil {
			if err := d.cfg.AfterListen(ctx, conn); err != nil {
				return false, err
			}
		}
		added = true
	case from.wide && !to.wide:
		if err := exec("UNLISTEN " + pgx.Identifier{d.cfg.Channel}.Sanitize()); err != nil {
			return false, err
		}
		if d.cfg.Unlisten != nil {
			if err := d.cfg.Unlisten(ctx, conn); err != nil {
				return false, err
			}
		}
	}
	return added, nil
}

// probe sends a NOTIFY to ourselves, on a channel conn listens on (the
// holder's, which nobody else hears, when there is one), and returns its
// payload.
func (d *Dispatcher) probe(conn *pgx.Conn, on listenState) (string, error) {
	var nonce [8]byte
	_, _ = rand.Read(nonce[:])
	p := "probe " + hex.EncodeToString(nonce[:])
	ch := on.holder
	if ch == "" {
		ch = d.cfg.Channel
	}
	ctx, cancel := context.WithTimeout(d.ctx, d.cfg.ProbeTimeout)
	defer cancel()
	_, err := conn.Exec(ctx, "SELECT pg_notify($1, $2)", ch, p)
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

// handleHolder handles a notification on the holder channel ch: a handoff
// or a poke.
func (d *Dispatcher) handleHolder(ch, payload string) {
	var f []json.RawMessage
	var tag, name, id string
	if json.Unmarshal([]byte(payload), &f) != nil || len(f) < 3 ||
		json.Unmarshal(f[0], &tag) != nil || json.Unmarshal(f[1], &name) != nil || json.Unmarshal(f[2], &id) != nil {
		d.received(KindOther)
		return
	}
	key := name + "\x00" + id
	switch {
	case tag == "h" && len(f) == 9:
		h := Handoff{Key: key, Channel: ch}
		var at int64
		if json.Unmarshal(f[3], &h.Token) != nil || json.Unmarshal(f[4], &h.Slot) != nil ||
			json.Unmarshal(f[5], &h.Waiter) != nil || json.Unmarshal(f[6], &h.Kind) != nil ||
			json.Unmarshal(f[7], &h.Permits) != nil || json.Unmarshal(f[8], &at) != nil {
			d.received(KindOther)
			return
		}
		h.AcquiredAt = time.UnixMicro(at)
		d.received(KindHandoff)
		if d.cfg.OnHandoff != nil {
			d.cfg.OnHandoff(h)
		}
	case tag == "r":
		d.received(KindPoke)
		if d.cfg.OnPoke != nil {
			d.cfg.OnPoke(key, ch)
		}
	default:
		d.received(KindOther)
		return
	}
	d.Wake(key)
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
