package lease

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/pglease/pglease/internal/dispatch"
)

// The acquire engine: every acquire, on either path, goes through acquire
// below. It queues the caller behind this client's other acquirers of the
// key (one database attempt per wake-up, in FIFO order), makes the attempt
// through the path's acquireMode, and waits for a release notification, the
// holder's expiry or the fallback poll between attempts. A new path or lock
// kind implements acquireMode; it does not copy this loop.

// acquireMode is what the engine needs from a path.
type acquireMode interface {
	// usableLocked returns an error when the path cannot be used at all
	// (closed, refused behind a proxy). Client.mu is held.
	usableLocked() error
	// attempt asks the database once. It returns the lock, registered as
	// held in ks, or a *LockedError saying why not, or an error; errRetry
	// asks the engine to try again at once. wait says whether the caller
	// would wait (a path may then wait in the server, or queue).
	attempt(ctx context.Context, key Key, ks *keyState, req request, wait bool) (*Lock, *LockedError, error)
	// explain returns the error TryAcquire reports for a refusal, looking
	// up more about the holder if that is cheap.
	explain(ctx context.Context, e *LockedError) error
	// subscribeFirst: a waiting acquirer subscribes to release notifications
	// before its first attempt (else only after a refusal, so that an
	// acquire that is not refused, or a path that waits in the server, never
	// needs LISTEN).
	subscribeFirst() bool
	// askOnSubscribe: after subscribing, upon a refusal, ask again at once
	// (a release in between would be missed). The table path need not: the
	// database hands the key over, and tells the holder, whose dispatcher
	// keeps it in keyState.handed for the acquirer (or, not yet listening,
	// wakes every waiter once it listens).
	askOnSubscribe() bool
	// wideWake: a waiter needs to hear every release of the key (the
	// schema's channel), not only what the database tells its holder.
	wideWake() bool
	// busyRetry is how soon a waiter that found the key busy (being changed
	// right now) looks again when no notification wakes it first.
	busyRetry() time.Duration
}

// keyState serialises this client's acquirers of one key: they queue in FIFO
// order and only the head asks the database, once per wake-up. Fields are
// guarded by Client.mu.
type keyState struct {
	// held is this client's locks on the key, in either mode: one, or
	// several shared ones or permits (each a grant of its own).
	held []*Lock
	free chan struct{} // closed (and renewed) whenever a held lock is dropped; nil while none is
	// queued: the database may have a waiter row of this client's holder
	// for the key (an attempt said so). The next acquirer keeps it; when the
	// last one gives up without the key, a clean-up deletes it.
	queued bool
	// waiterID is the waiter row the database has for this client's holder
	// on the key, as the last attempt said (0: none known); handed is a
	// grant the database handed over to the holder (serve, in migration 7),
	// kept for the head acquirer, which takes it when it is for waiterID and
	// of the kind it asks for; poked: the database asked the holder to ask
	// again, through the key's locks.
	waiterID int64
	handed   *dispatch.Handoff
	poked    bool
	queue    []*waiter
}

// leftQueueLocked records that the holder has no place in the key's queue
// in the database any more (c.mu held): it got the key, or a clean-up is
// deleting its waiter row and any grant handed over meanwhile.
func (ks *keyState) leftQueueLocked() {
	ks.queued = false
	ks.waiterID = 0
	ks.handed = nil
}

// blocksLocked returns a lock this client holds on the key that keeps a
// request of kind k out (c.mu held): an exclusive lock, or any lock when k
// is exclusive; nil when there is none.
func (ks *keyState) blocksLocked(k Kind) *Lock {
	for _, l := range ks.held {
		if !compatible(l.kind, k) {
			return l
		}
	}
	return nil
}

// tableTokensLocked is the tokens of the table locks of holder h this
// client holds on key, and of its releases of key still pending (c.mu
// held): the grants an acquire must keep. (A pending release deletes its
// row when it is retried; an acquire must neither delete it as an orphan nor
// take it as a grant it did not know of.)
func (ks *keyState) tableTokensLocked(h *holder, key Key) []int64 {
	keep := []int64{}
	for _, l := range ks.held {
		if t, ok := l.mode.(*tableLock); ok && t.h == h {
			keep = append(keep, l.token)
		}
	}
	for tok, k := range h.pending {
		if k == key {
			keep = append(keep, tok)
		}
	}
	return keep
}

type waiter struct {
	turn    chan struct{}
	cleanup bool    // an orphan clean-up, not an acquirer
	started bool    // a clean-up that has had its turn (Client.mu)
	h       *holder // whose rows a clean-up deletes
}

// cleanupPendingLocked reports whether an orphan clean-up of h's rows of the
// key waits for its turn, not yet started (c.mu held).
func (ks *keyState) cleanupPendingLocked(h *holder) bool {
	for _, w := range ks.queue {
		if w.cleanup && !w.started && w.h == h {
			return true
		}
	}
	return false
}

// wantedLocked reports whether an acquirer of this client queues for the key.
// Orphan clean-ups in the queue do not count: TryAcquire queues behind them
// for one round trip instead of reporting a lock nobody holds.
func (ks *keyState) wantedLocked() bool {
	for _, w := range ks.queue {
		if !w.cleanup {
			return true
		}
	}
	return false
}

// errRetry: the attempt should be repeated at once (the holder was replaced,
// a pinned connection was lost).
var errRetry = errors.New("lease: retry")

// acquire is Acquire and TryAcquire of every path, for an exclusive lock.
func (c *Client) acquire(ctx context.Context, m acquireMode, key Key, wait bool) (*Lock, error) {
	return c.acquireReq(ctx, m, key, exclusiveReq, wait)
}

// acquireReq is every acquire of one key, of any kind.
func (c *Client) acquireReq(ctx context.Context, m acquireMode, key Key, req request, wait bool) (*Lock, error) {
	obs := c.met.startAcquire(m, req.kind) // metrics: does nothing without a MeterProvider
	l, err := c.acquireObserved(ctx, m, key, req, wait, &obs)
	obs.done(ctx, err)
	return l, err
}

// acquireObserved is acquireReq, telling obs when it starts waiting and each
// attempt it makes.
func (c *Client) acquireObserved(ctx context.Context, m acquireMode, key Key, req request, wait bool, obs *acquireObs) (*Lock, error) {
	if err := key.Validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, context.Cause(ctx)
	}
	mk := key.mapKey()
	c.mu.Lock()
	if l := heldIn(ctx, c, key); l != nil {
		err := c.heldHereLocked(l)
		c.mu.Unlock()
		return nil, err
	}
	if err := c.usableLocked(m); err != nil {
		c.mu.Unlock()
		return nil, err
	}
	ks, w, err := c.enqueueLocked(key, mk, req.kind, wait, false)
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	defer c.leave(key, ks, w)
	if err := c.awaitTurn(ctx, w, obs); err != nil {
		return nil, err
	}

	var sub *dispatch.Sub
	defer func() {
		if sub != nil {
			sub.Close()
		}
	}()
	backoff := m.busyRetry()
	for {
		c.mu.Lock()
		var free chan struct{}
		if b := ks.blocksLocked(req.kind); b != nil {
			if !wait {
				err := c.heldHereLocked(b)
				c.mu.Unlock()
				return nil, err
			}
			free = ks.free
		}
		c.mu.Unlock()
		if free != nil { // this client holds it (in either mode) in a way that keeps us out: wait for its release
			obs.wait()
			select {
			case <-free:
				continue
			case <-ctx.Done():
				return nil, context.Cause(ctx)
			case <-c.closing:
				return nil, ErrClosed
			}
		}
		if wait && sub == nil && m.subscribeFirst() {
			sub = c.disp.Subscribe(mk, m.wideWake())
		}
		var wake <-chan struct{}
		if sub != nil {
			wake = sub.C() // before asking: a release in between still wakes us
		}
		l, refused, err := m.attempt(ctx, key, ks, req, wait)
		obs.attempt()
		if errors.Is(err, errRetry) {
			continue
		}
		if err != nil {
			if wait && connectionFailure(err) { // a failover, say: see replication.go
				if err := c.pauseAfterFailure(ctx, err); err != nil {
					return nil, err
				}
				continue
			}
			return nil, err
		}
		if l != nil {
			return l, nil
		}
		if !wait {
			return nil, m.explain(ctx, refused)
		}
		obs.wait()
		if sub == nil {
			sub = c.disp.Subscribe(mk, m.wideWake())
			if m.askOnSubscribe() {
				continue
			}
			wake = sub.C()
			c.mu.Lock()
			pending := ks.handed != nil || ks.poked // heard before we subscribed
			c.mu.Unlock()
			if pending {
				continue
			}
		}
		if refused.busy && !sub.Wide() {
			// Held on the advisory path, most likely, whose releases the
			// database announces only on the schema's channel: listen there
			// too while this acquire waits. The wake-up that follows the
			// LISTEN makes up for a release in between.
			sub.Close()
			sub = c.disp.Subscribe(mk, true)
			wake = sub.C()
		}
		delay := dispatch.Jitter(c.cfg.PollInterval)
		if refused.busy {
			// Someone is acquiring right now (or holds the key on the
			// advisory path, or has its row locked). Its release will wake
			// us; look again soon only in case its acquire fails, which
			// announces nothing.
			if b := dispatch.Jitter(backoff); b < delay {
				delay = b // jittered: waiters woken together do not retry together
			}
			backoff = min(backoff*2, c.cfg.PollInterval)
		} else {
			backoff = m.busyRetry()
			if e := refused.ExpiresIn + time.Millisecond; refused.ExpiresIn > 0 && e < delay {
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

func (c *Client) usableLocked(m acquireMode) error {
	if c.closed {
		return ErrClosed
	}
	return m.usableLocked()
}

// enqueueLocked queues a waiter for key in this client's FIFO (c.mu held).
// For a try (wait false) it refuses with a *LockedError instead when the key
// is held by this client in a way that keeps kind k out, or wanted by an
// acquirer of this client.
func (c *Client) enqueueLocked(key Key, mk string, k Kind, wait, cleanup bool) (*keyState, *waiter, error) {
	ks := c.keys[mk]
	if ks == nil {
		ks = &keyState{}
		c.keys[mk] = ks
	}
	if !wait && !cleanup {
		if b := ks.blocksLocked(k); b != nil {
			return nil, nil, c.heldHereLocked(b)
		}
		if ks.wantedLocked() {
			return nil, nil, c.lockedHereLocked(key)
		}
	}
	w := &waiter{turn: make(chan struct{}), cleanup: cleanup}
	ks.queue = append(ks.queue, w)
	if len(ks.queue) == 1 {
		close(w.turn)
	}
	return ks, w, nil
}

// awaitTurn blocks until w heads its queue, ctx is done or the client closes.
// A turn that is not there at once makes obs a wait.
func (c *Client) awaitTurn(ctx context.Context, w *waiter, obs *acquireObs) error {
	select {
	case <-w.turn:
		return nil
	default:
	}
	obs.wait()
	select {
	case <-w.turn:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-c.closing:
		return ErrClosed
	}
}

// leave removes w from the key's queue and hands the turn to the next
// waiter. When w was the last acquirer of this client for the key and the
// database may still have its waiter row, a clean-up deletes the row: a
// waiter that gave up must not keep its place ahead of others.
func (c *Client) leave(key Key, ks *keyState, w *waiter) {
	mk := key.mapKey()
	c.mu.Lock()
	for i, x := range ks.queue {
		if x == w {
			ks.queue = append(ks.queue[:i], ks.queue[i+1:]...)
			if i == 0 && len(ks.queue) > 0 {
				close(ks.queue[0].turn)
			}
			break
		}
	}
	h := c.h
	drop := !w.cleanup && (ks.queued || ks.handed != nil) && !ks.wantedLocked() && h != nil && !h.lost && !c.closed
	if drop {
		// The clean-up deletes the waiter row, or the grant the database
		// handed over meanwhile (which hands the key on).
		ks.leftQueueLocked()
		ks.poked = false
	}
	c.gcKeyLocked(mk, ks)
	c.mu.Unlock()
	if drop {
		c.cleanupOrphan(key, h)
	}
}

func (c *Client) gcKeyLocked(mk string, ks *keyState) {
	if len(ks.held) == 0 && len(ks.queue) == 0 && c.keys[mk] == ks {
		delete(c.keys, mk)
	}
}

// holdLocked records l as one of this client's locks on its key (c.mu held).
func (c *Client) holdLocked(ks *keyState, l *Lock) {
	ks.held = append(ks.held, l)
	if ks.free == nil {
		ks.free = make(chan struct{})
	}
	c.met.heldChange(l, 1)
}

// dropLocked forgets l as this client's lock on its key (c.mu held).
// Idempotent.
func (c *Client) dropLocked(l *Lock) {
	mk := l.key.mapKey()
	ks := c.keys[mk]
	if ks == nil {
		return
	}
	i := slices.Index(ks.held, l)
	if i < 0 {
		return
	}
	ks.held = slices.Delete(ks.held, i, i+1)
	close(ks.free)
	ks.free = nil
	if len(ks.held) > 0 {
		ks.free = make(chan struct{})
	}
	c.gcKeyLocked(mk, ks)
	c.met.heldChange(l, -1)
}

// Locks are not reentrant, and an acquirer of a key this client holds waits
// for its release like any other: that serialises a process's goroutines as
// it serialises processes. But an acquirer inside the critical section of the
// very lock it asks for would wait for itself: the context tells. Lock.Context
// and the context Do gives its callback carry their locks, and an acquire
// whose ctx carries a live lock of this client on the same key is refused at
// once with ErrAlreadyHeld.

type heldCtxKey struct{}

// heldChain is the locks a context was derived under, innermost first.
type heldChain struct {
	l    *Lock
	next *heldChain
}

// withHeld returns ctx carrying l besides the locks it carries already.
func withHeld(ctx context.Context, l *Lock) context.Context {
	next, _ := ctx.Value(heldCtxKey{}).(*heldChain)
	return context.WithValue(ctx, heldCtxKey{}, &heldChain{l: l, next: next})
}

// heldIn returns the live lock of c on key that ctx carries, if any.
func heldIn(ctx context.Context, c *Client, key Key) *Lock {
	for h, _ := ctx.Value(heldCtxKey{}).(*heldChain); h != nil; h = h.next {
		if h.l.c == c && h.l.key == key && h.l.Err() == nil {
			return h.l
		}
	}
	return nil
}

// heldHereLocked is the error for a try of a key this client holds as l, or
// for an acquire from inside l's critical section (c.mu held).
func (c *Client) heldHereLocked(l *Lock) error {
	e := c.lockedHereLocked(l.key)
	e.ByThisClient = true
	e.HolderID = l.HolderID()
	e.AcquiredAt = l.acquiredAt
	if t, ok := l.mode.(*tableLock); ok {
		e.ExpiresIn = time.Until(t.h.deadline)
	}
	return e
}

// lockedHereLocked is the error for a try of a key that another acquirer of
// this client is acquiring.
func (c *Client) lockedHereLocked(key Key) *LockedError {
	return &LockedError{Key: key, Host: c.cfg.Owner.Host, PID: c.cfg.Owner.PID, Application: c.cfg.Owner.Application}
}

// hold is what a critical section runs under: a Lock, or a LockSet.
type hold interface {
	Context() context.Context
	Err() error
	Release(context.Context) error
	// carry returns ctx carrying the hold's locks (see withHeld).
	carry(ctx context.Context) context.Context
}

func (l *Lock) carry(ctx context.Context) context.Context { return withHeld(ctx, l) }

func (s *LockSet) carry(ctx context.Context) context.Context {
	for _, l := range s.locks {
		ctx = withHeld(ctx, l)
	}
	return ctx
}

// runHeld is every Do: acquire, run fn under the hold with a context that
// ends with ctx or with the hold (its cause then the hold's), release (also
// when fn panics: the panic goes on after the release), and report a loss
// during fn as an error matching ErrLost. what names the hold in that error.
func runHeld[H hold](ctx context.Context, what string, acquire func(context.Context) (H, error), fn func(ctx context.Context, h H) error) (err error) {
	h, err := acquire(ctx)
	if err != nil {
		return err
	}
	released := false
	defer func() {
		if !released { // fn panicked
			_ = h.Release(context.WithoutCancel(ctx))
		}
	}()
	fctx, cancel := context.WithCancelCause(h.carry(ctx))
	hctx := h.Context()
	stop := context.AfterFunc(hctx, func() { cancel(context.Cause(hctx)) })
	defer func() {
		stop()
		cancel(nil)
	}()
	ferr := fn(fctx, h)
	lost := h.Err()
	rerr := h.Release(context.WithoutCancel(ctx))
	released = true
	if errors.Is(lost, ErrLost) {
		return errors.Join(fmt.Errorf("lease: %s: during the critical section: %w", what, lost), ferr)
	}
	return errors.Join(ferr, rerr)
}
