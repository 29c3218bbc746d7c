package lease

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/dispatch"
)

// Client acquires and holds locks for one process. It registers one holder
// row, renews it with one statement per HeartbeatInterval however many locks it
// holds, and keeps one LISTEN connection for its waiters. A Client is safe for
// concurrent use; make one per process and Close it on the way out.
type Client struct {
	pool *pgxpool.Pool
	cfg  Config
	log  *slog.Logger
	q    queries
	disp *dispatch.Dispatcher

	mu      sync.Mutex
	closed  bool
	closing chan struct{} // closed by Close
	h       *holder       // the live holder; nil when none
	hInit   chan struct{} // non-nil while a holder is being registered
	keys    map[string]*keyState
	advs    []*Advisory    // advisory handles; Close closes them
	wg      sync.WaitGroup // heartbeats and clean-ups

	attempts atomic.Int64 // acquire statements sent and answered (or failed), for tests and benchmarks
}

// holder is one row of the holders table, from this client's point of view.
// Fields are guarded by Client.mu.
type holder struct {
	id       int64
	deadline time.Time       // local: start of last good renewal + TTL - SafetyMargin
	locks    map[int64]*Lock // held, by token
	pending  map[int64]Key   // releases that failed; retried after each renewal
	orphans  map[string]Key  // clean-ups of acquires of unknown outcome that failed; retried after each renewal
	seq      uint64          // registration counter of locks
	lost     bool            // given up: never used again
	ctx      context.Context // cancelled when lost: ends the heartbeat and its query
	stop     context.CancelFunc
}

// keyState serialises this client's acquirers of one key: they queue in FIFO
// order and only the head asks the database, once per wake-up.
type keyState struct {
	held  *Lock
	free  chan struct{} // closed when held is cleared
	queue []*waiter
}

type waiter struct {
	turn    chan struct{}
	cleanup bool // an orphan clean-up, not an acquirer
}

// busyLocked reports whether the key is held or wanted by an acquirer of this
// client. Orphan clean-ups in the queue do not count: TryAcquire queues
// behind them for one round trip instead of reporting a lock nobody holds.
func (ks *keyState) busyLocked() bool {
	if ks.held != nil {
		return true
	}
	for _, w := range ks.queue {
		if !w.cleanup {
			return true
		}
	}
	return false
}

// New returns a Client using pool, which stays the caller's (Close does not
// close it). cfg may be nil for all defaults. New does no I/O: the holder row
// is registered on first use. The schema must exist: see package migrations.
func New(pool *pgxpool.Pool, cfg *Config) (*Client, error) {
	if pool == nil {
		return nil, errNilPool
	}
	rc, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	c := &Client{
		pool:    pool,
		cfg:     rc,
		log:     rc.Logger,
		q:       newQueries(rc.Schema),
		closing: make(chan struct{}),
		keys:    map[string]*keyState{},
	}
	connCfg := pool.Config().ConnConfig.Copy()
	c.disp = dispatch.New(dispatch.Config{
		Connect:     func(ctx context.Context) (*pgx.Conn, error) { return pgx.ConnectConfig(ctx, connCfg) },
		Channel:     channelName(rc.Schema),
		AfterListen: c.markListening,
		OnDelete:    c.onRowDeleted,
		Logger:      rc.Logger,
	})
	return c, nil
}

// markListening registers the LISTEN connection as a listener, so that
// advisory releases, which are announced only while someone listens, are
// announced to it. A schema made before mark_listening existed (an early
// pre-release) lacks the function, and announces every release anyway.
func (c *Client) markListening(ctx context.Context, conn *pgx.Conn) error {
	_, err := conn.Exec(ctx, c.q.markListening)
	if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok && pgErr.Code == "42883" { // undefined_function
		return nil
	}
	return err
}

// Config returns the client's configuration with defaults filled in.
func (c *Client) Config() Config { return c.cfg }

// HolderID returns the id of the client's live holder row, if it has one.
func (c *Client) HolderID() (int64, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.h == nil {
		return 0, false
	}
	return c.h.id, true
}

// Acquire blocks until it holds key or ctx is done. A key whose holder is dead
// is taken over at once. While it waits it costs the database nothing but a
// query at the holder's expiry and every PollInterval: a release anywhere
// wakes it through a notification.
func (c *Client) Acquire(ctx context.Context, key Key) (*Lock, error) {
	return c.acquire(ctx, key, true)
}

// TryAcquire makes one attempt and returns at once: the lock, or an error that
// matches ErrLocked (a *LockedError saying who holds the key, when known).
func (c *Client) TryAcquire(ctx context.Context, key Key) (*Lock, error) {
	return c.acquire(ctx, key, false)
}

// Do acquires key, runs fn with a context that is cancelled if the lock is
// lost, and releases the lock. If the lock was lost before fn returned, the
// error matches ErrLost (joined with fn's own error, if any).
func (c *Client) Do(ctx context.Context, key Key, fn func(ctx context.Context) error) error {
	return runHeld(ctx, key, c.Acquire, fn)
}

// runHeld is Do for both modes: acquire, run fn under the lock's context,
// release, and report a loss during fn as ErrLost.
func runHeld(ctx context.Context, key Key, acquire func(context.Context, Key) (*Lock, error), fn func(ctx context.Context) error) error {
	l, err := acquire(ctx, key)
	if err != nil {
		return err
	}
	ferr := fn(l.Context())
	lost := l.Err()
	rerr := l.Release(context.WithoutCancel(ctx))
	if errors.Is(lost, ErrLost) {
		return errors.Join(fmt.Errorf("lease: %s: %w during the critical section", key, ErrLost), ferr)
	}
	return errors.Join(ferr, rerr)
}

func (c *Client) acquire(ctx context.Context, key Key, wait bool) (*Lock, error) {
	if err := key.Validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, context.Cause(ctx)
	}
	mk := key.mapKey()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	ks, w, err := c.enqueueLocked(key, mk, wait, false)
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	defer c.leave(mk, ks, w)
	if err := c.awaitTurn(ctx, w); err != nil {
		return nil, err
	}

	var sub *dispatch.Sub
	defer func() {
		if sub != nil {
			sub.Close()
		}
	}()
	backoff := busyRetry
	for {
		c.mu.Lock()
		free := ks.free
		if ks.held == nil {
			free = nil
		}
		if free != nil && !wait {
			err := c.lockedByUsLocked(key, ks)
			c.mu.Unlock()
			return nil, err
		}
		c.mu.Unlock()
		if free != nil { // this client holds it: wait for our own release
			select {
			case <-free:
				continue
			case <-ctx.Done():
				return nil, context.Cause(ctx)
			case <-c.closing:
				return nil, ErrClosed
			}
		}
		if wait && sub == nil {
			sub = c.disp.Subscribe(mk)
		}
		var wake <-chan struct{}
		if sub != nil {
			wake = sub.C() // before asking: a release in between still wakes us
		}
		l, res, err := c.attempt(ctx, key, ks)
		if errors.Is(err, errRetry) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if l != nil {
			return l, nil
		}
		if !wait {
			return nil, res
		}
		delay := dispatch.Jitter(c.cfg.PollInterval)
		if res.HolderID == 0 {
			// Busy: someone is acquiring right now (or holds the key on the
			// advisory path, or has its row locked). Its release will wake
			// us; look again soon only in case its acquire fails, which
			// announces nothing.
			if backoff < delay {
				delay = backoff
			}
			backoff = min(backoff*2, c.cfg.PollInterval)
		} else {
			backoff = busyRetry
			if e := res.ExpiresIn + time.Millisecond; e > 0 && e < delay {
				delay = e // wake when the holder's lease runs out
			}
		}
		t := time.NewTimer(delay)
		select {
		case <-wake:
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, context.Cause(ctx)
		case <-c.closing:
			t.Stop()
			return nil, ErrClosed
		}
		t.Stop()
	}
}

// enqueueLocked queues a waiter for key in this client's FIFO (c.mu held).
// For a try (wait false) it refuses with a *LockedError instead when the key
// is held or wanted by an acquirer of this client.
func (c *Client) enqueueLocked(key Key, mk string, wait, cleanup bool) (*keyState, *waiter, error) {
	ks := c.keys[mk]
	if ks == nil {
		ks = &keyState{}
		c.keys[mk] = ks
	}
	if !wait && ks.busyLocked() {
		return nil, nil, c.lockedByUsLocked(key, ks)
	}
	w := &waiter{turn: make(chan struct{}), cleanup: cleanup}
	ks.queue = append(ks.queue, w)
	if len(ks.queue) == 1 {
		close(w.turn)
	}
	return ks, w, nil
}

// awaitTurn blocks until w heads its queue, ctx is done or the client closes.
func (c *Client) awaitTurn(ctx context.Context, w *waiter) error {
	select {
	case <-w.turn:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-c.closing:
		return ErrClosed
	}
}

// leave removes w from the key's queue and hands the turn to the next waiter.
func (c *Client) leave(mk string, ks *keyState, w *waiter) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range ks.queue {
		if x == w {
			ks.queue = append(ks.queue[:i], ks.queue[i+1:]...)
			if i == 0 && len(ks.queue) > 0 {
				close(ks.queue[0].turn)
			}
			break
		}
	}
	c.gcKeyLocked(mk, ks)
}

func (c *Client) gcKeyLocked(mk string, ks *keyState) {
	if ks.held == nil && len(ks.queue) == 0 && c.keys[mk] == ks {
		delete(c.keys, mk)
	}
}

func (c *Client) lockedByUsLocked(key Key, ks *keyState) error {
	e := &LockedError{Key: key, Host: c.cfg.Owner.Host, PID: c.cfg.Owner.PID, Application: c.cfg.Owner.Application}
	if ks.held != nil && ks.held.h != nil { // (an advisory lock has no holder row)
		e.HolderID = ks.held.h.id
		e.AcquiredAt = ks.held.acquiredAt
		e.ExpiresIn = time.Until(ks.held.h.deadline)
	}
	return e
}

// busyRetry is how soon a waiter that found the key busy looks again when no
// notification wakes it first. An acquire in flight takes about one WAL flush;
// a shorter retry mostly finds it still in flight or holding the key, and with
// holds of a few milliseconds it would poll alongside every notification.
const busyRetry = 10 * time.Millisecond

// errRetry: the attempt should be repeated at once (the holder was replaced).
var errRetry = errors.New("lease: retry")

// attempt asks the database once. It returns the lock, or a *LockedError.
func (c *Client) attempt(ctx context.Context, key Key, ks *keyState) (*Lock, *LockedError, error) {
	h, err := c.ensureHolder(ctx)
	if err != nil {
		return nil, nil, err
	}
	var (
		acquired, busy        bool
		token, holderID       *int64
		host, app             *string
		pid                   *int32
		acquiredAt            *time.Time
		expiresInMicroseconds *int64
	)
	err = c.pool.QueryRow(ctx, c.q.acquire, key.Name, key.ID, h.id).Scan(
		&acquired, &token, &holderID, &host, &pid, &app, &acquiredAt, &expiresInMicroseconds, &busy)
	c.attempts.Add(1) // after the reply: a test that sees the count sees no statement in flight
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			if pgErr.Code == SQLStateHolderExpired {
				c.loseHolder(h, "holder expired in the database")
				return nil, nil, errRetry
			}
			return nil, nil, fmt.Errorf("lease: acquire %s: %w", key, err)
		}
		// The outcome is unknown: the row may have been inserted and the reply
		// lost. Make sure such an orphan does not keep the key locked.
		c.cleanupOrphan(key, h)
		if ctx.Err() != nil {
			return nil, nil, context.Cause(ctx)
		}
		return nil, nil, fmt.Errorf("lease: acquire %s: %w", key, err)
	}
	if !acquired {
		e := &LockedError{Key: key}
		if holderID != nil {
			e.HolderID = *holderID
		}
		if host != nil {
			e.Host = *host
		}
		if pid != nil {
			e.PID = *pid
		}
		if app != nil {
			e.Application = *app
		}
		if acquiredAt != nil {
			e.AcquiredAt = *acquiredAt
		}
		if expiresInMicroseconds != nil {
			e.ExpiresIn = time.Duration(*expiresInMicroseconds) * time.Microsecond
		}
		return nil, e, nil
	}
	c.mu.Lock()
	if h.lost || c.closed {
		closed := c.closed
		c.mu.Unlock()
		// The holder was given up while we asked: this row is not ours to use.
		// Its holder's clean-up may have run before the insert committed, so
		// delete it by its token.
		c.releaseInBackground(key, *token)
		if closed {
			return nil, nil, ErrClosed
		}
		return nil, nil, errRetry
	}
	l := &Lock{c: c, h: h, key: key, token: *token}
	if acquiredAt != nil {
		l.acquiredAt = *acquiredAt
	}
	l.ctx, l.cancel = context.WithCancelCause(context.Background())
	h.seq++
	l.seq = h.seq
	h.locks[l.token] = l
	ks.held = l
	ks.free = make(chan struct{})
	c.mu.Unlock()
	return l, nil, nil
}

// ensureHolder returns the live holder, registering one if needed.
func (c *Client) ensureHolder(ctx context.Context) (*holder, error) {
	c.mu.Lock()
	for {
		if c.closed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		if c.h != nil && !c.h.lost {
			h := c.h
			c.mu.Unlock()
			return h, nil
		}
		if c.hInit == nil {
			break
		}
		ch := c.hInit
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
		c.mu.Lock()
	}
	init := make(chan struct{})
	c.hInit = init
	c.mu.Unlock()

	start := time.Now()
	var id int64
	err := c.pool.QueryRow(ctx, c.q.register, c.cfg.Owner.Host, c.cfg.Owner.PID, c.cfg.Owner.Application,
		c.cfg.TTL.Microseconds()).Scan(&id)

	c.mu.Lock()
	defer c.mu.Unlock()
	close(init)
	c.hInit = nil
	if err != nil {
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		return nil, fmt.Errorf("lease: register holder: %w", err)
	}
	if c.closed {
		c.startCleanupLocked(id, "client closed while registering")
		return nil, ErrClosed
	}
	h := &holder{
		id:       id,
		deadline: start.Add(c.cfg.TTL - c.cfg.SafetyMargin),
		locks:    map[int64]*Lock{},
		pending:  map[int64]Key{},
		orphans:  map[string]Key{},
	}
	h.ctx, h.stop = context.WithCancel(context.Background())
	c.h = h
	c.wg.Add(1)
	go c.heartbeat(h, start)
	c.log.Debug("pglease: holder registered", "holder_id", id)
	return h, nil
}

// heartbeat renews h until it is lost or the client closes.
func (c *Client) heartbeat(h *holder, last time.Time) {
	defer c.wg.Done()
	retrying := false
	for {
		c.mu.Lock()
		deadline := h.deadline
		c.mu.Unlock()
		next := last.Add(c.cfg.HeartbeatInterval)
		if retrying {
			next = time.Now().Add(c.cfg.HeartbeatInterval / 4)
		}
		if next.After(deadline) {
			next = deadline
		}
		t := time.NewTimer(time.Until(next))
		select {
		case <-h.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		start := time.Now()
		if !start.Before(deadline) {
			c.loseHolder(h, "lease not renewed in time")
			return
		}
		c.mu.Lock()
		cutoff := h.seq
		var wantN, wantX int64
		for tok, l := range h.locks {
			if l.seq <= cutoff {
				wantN++
				wantX ^= tok
			}
		}
		c.mu.Unlock()

		ctx, cancel := context.WithDeadline(h.ctx, deadline)
		var alive bool
		var n, x int64
		err := c.pool.QueryRow(ctx, c.q.renew, h.id).Scan(&alive, &n, &x)
		cancel()
		if err != nil {
			if h.ctx.Err() != nil {
				return
			}
			c.log.Warn("pglease: heartbeat failed", "holder_id", h.id, "error", err,
				"time_left", time.Until(deadline).Round(time.Millisecond))
			retrying = true
			continue
		}
		if !alive {
			c.loseHolder(h, "holder expired in the database")
			return
		}
		c.mu.Lock()
		if h.lost {
			c.mu.Unlock()
			return
		}
		h.deadline = start.Add(c.cfg.TTL - c.cfg.SafetyMargin)
		pending := make(map[int64]Key, len(h.pending))
		for tok, k := range h.pending {
			pending[tok] = k
		}
		orphans := make([]Key, 0, len(h.orphans))
		for _, k := range h.orphans {
			orphans = append(orphans, k)
		}
		c.mu.Unlock()
		last, retrying = start, false
		if n != wantN || x != wantX {
			c.verify(h, cutoff)
		}
		for tok, k := range pending {
			c.retryRelease(h, k, tok)
		}
		for _, k := range orphans {
			c.cleanupOrphan(k, h)
		}
	}
}

// verify finds which of h's locks registered up to cutoff no longer have a row
// (deleted by hand, say) and reports them lost.
func (c *Client) verify(h *holder, cutoff uint64) {
	c.mu.Lock()
	var tokens []int64
	for tok, l := range h.locks {
		if l.seq <= cutoff {
			tokens = append(tokens, tok)
		}
	}
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.HeartbeatInterval)
	defer cancel()
	rows, err := c.pool.Query(ctx, c.q.verify, h.id, tokens)
	if err != nil {
		return
	}
	present, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return
	}
	have := make(map[int64]bool, len(present))
	for _, t := range present {
		have[t] = true
	}
	var lost []*Lock
	c.mu.Lock()
	for _, tok := range tokens {
		if l := h.locks[tok]; l != nil && !have[tok] {
			c.dropLocked(l)
			if l.ctx.Err() == nil { // a lock being released is not lost
				lost = append(lost, l)
			}
		}
	}
	c.mu.Unlock()
	for _, l := range lost {
		c.log.Warn("pglease: lock lost", "name", l.key.Name, "id", l.key.ID, "token", l.token, "reason", "row deleted")
		l.cancel(ErrLost)
	}
}

func (c *Client) retryRelease(h *holder, k Key, token int64) {
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
	defer cancel()
	if _, err := c.pool.Exec(ctx, c.q.release, k.Name, k.ID, token); err != nil {
		return
	}
	c.mu.Lock()
	delete(h.pending, token)
	c.mu.Unlock()
}

// onRowDeleted is told by the dispatcher of every lock row deleted. A row of
// ours deleted by someone else (a DBA, say) means the lock is lost.
func (c *Client) onRowDeleted(mk string, token int64) {
	c.mu.Lock()
	ks := c.keys[mk]
	if ks == nil || ks.held == nil || ks.held.token != token || ks.held.adv != nil {
		c.mu.Unlock()
		return
	}
	l := ks.held
	c.dropLocked(l)
	c.mu.Unlock()
	if l.ctx.Err() != nil {
		// Being released: the notification of our own release can arrive
		// before its reply. Dropping it here (release drops it too) lets this
		// client's next acquirer of the key go a little sooner.
		return
	}
	c.log.Warn("pglease: lock lost", "name", l.key.Name, "id", l.key.ID, "token", l.token, "reason", "row deleted")
	l.cancel(ErrLost)
}

// dropLocked forgets l as held. c.mu must be held.
func (c *Client) dropLocked(l *Lock) {
	if l.h != nil && l.h.locks[l.token] == l {
		delete(l.h.locks, l.token)
	}
	// Idempotent: the rest only applies while l is the key's held lock.
	mk := l.key.mapKey()
	if ks := c.keys[mk]; ks != nil && ks.held == l {
		ks.held = nil
		close(ks.free)
		ks.free = nil
		c.gcKeyLocked(mk, ks)
	}
}

// loseHolder gives h up: every lock it has is reported lost, and its rows are
// deleted in the background so that others need not wait for the expiry.
func (c *Client) loseHolder(h *holder, reason string) {
	c.mu.Lock()
	if h.lost {
		c.mu.Unlock()
		return
	}
	h.lost = true
	h.stop()
	if c.h == h {
		c.h = nil
	}
	locks := make([]*Lock, 0, len(h.locks))
	for _, l := range h.locks {
		locks = append(locks, l)
	}
	for _, l := range locks {
		c.dropLocked(l)
	}
	if !c.closed {
		c.startCleanupLocked(h.id, reason)
	}
	c.mu.Unlock()
	c.log.Warn("pglease: holder lost", "holder_id", h.id, "reason", reason, "locks", len(locks))
	for _, l := range locks {
		l.cancel(ErrLost)
	}
}

// startCleanupLocked deletes a given-up holder's rows in the background.
func (c *Client) startCleanupLocked(id int64, reason string) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
		defer cancel()
		if _, err := c.pool.Exec(ctx, c.q.dropHolder, id); err != nil {
			c.log.Debug("pglease: holder clean-up failed; its rows expire with it", "holder_id", id, "reason", reason, "error", err)
		}
	}()
}

// releaseInBackground deletes the row of key with token, best effort.
func (c *Client) releaseInBackground(key Key, token int64) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
		defer cancel()
		_, _ = c.pool.Exec(ctx, c.q.release, key.Name, key.ID, token)
	}()
}

// cleanupOrphan deletes the row an acquire of key by h may have left if its
// reply was lost. It queues as a waiter on the key, so that no acquirer of this
// client runs meanwhile, and deletes only if the client then holds no lock on
// the key (a later acquire replaces an orphan itself). If the delete fails, it
// is tried again after each renewal until it succeeds, the client acquires the
// key, or the holder is lost.
func (c *Client) cleanupOrphan(key Key, h *holder) {
	mk := key.mapKey()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return // Close deletes every row of the holder
	}
	ks, w, _ := c.enqueueLocked(key, mk, true, true) // never refuses when waiting
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		defer c.leave(mk, ks, w)
		select {
		case <-w.turn:
		case <-c.closing:
			return
		}
		c.mu.Lock()
		skip := ks.held != nil || h.lost
		if skip {
			// Held: that acquire replaced the orphan. Lost: the rows go
			// with the holder.
			delete(h.orphans, mk)
		}
		c.mu.Unlock()
		if skip {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
		defer cancel()
		_, err := c.pool.Exec(ctx, c.q.dropOrphan, key.Name, key.ID, h.id)
		c.mu.Lock()
		if err != nil && !h.lost {
			// The holder lives on, and so would the orphan: nobody else
			// could take the key while this client never asks for it again.
			h.orphans[mk] = key
		} else {
			delete(h.orphans, mk)
		}
		c.mu.Unlock()
		if err != nil {
			c.log.Debug("pglease: orphan clean-up failed; retried after the next renewal", "name", key.Name, "id", key.ID, "error", err)
		}
	}()
}

// Close releases every lock the client holds, deletes its holder row, stops
// its goroutines and its LISTEN connection, and makes pending and later
// acquires fail with ErrClosed. The pool is left open. Close is idempotent;
// if ctx ends first, the rows left behind expire after TTL.
func (c *Client) Close(ctx context.Context) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	close(c.closing)
	h := c.h
	c.h = nil
	var locks []*Lock
	if h != nil && !h.lost {
		h.lost = true
		h.stop()
		for _, l := range h.locks {
			locks = append(locks, l)
		}
		for _, l := range locks {
			c.dropLocked(l)
		}
	} else {
		h = nil
	}
	c.mu.Unlock()
	for _, l := range locks {
		l.cancel(ErrClosed)
	}
	var err error
	if h != nil {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.ReleaseTimeout)
		if _, e := c.pool.Exec(dctx, c.q.dropHolder, h.id); e != nil {
			err = fmt.Errorf("lease: close: delete holder %d (its rows expire after the TTL): %w", h.id, e)
		}
		cancel()
	}
	c.closeAdvisories()
	c.disp.Close()
	// Every goroutine ends promptly now: heartbeats were stopped, clean-ups are
	// bounded by ReleaseTimeout.
	c.wg.Wait()
	return err
}
