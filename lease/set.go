package lease

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/dispatch"
)

// Key sets: several keys locked all or nothing, in one statement. The
// statement takes the keys' transaction locks in one canonical order (by key
// hash), so acquirers of overlapping sets never deadlock, checks every key,
// and inserts every grant or none: nobody ever sees part of a set granted. A
// set that has to wait is queued on each of its keys, with waiter rows
// inserted together under all the keys' locks, so any two sets that share a
// key are queued in the same order on every key they share.

// SetMember is one key of a set, exclusive unless Shared.
type SetMember struct {
	Key    Key
	Shared bool
}

func (m SetMember) kind() Kind {
	if m.Shared {
		return Shared
	}
	return Exclusive
}

// LockSet is a held set of keys: one Lock per key, each with its own token.
// It is held while all of them are: the loss of any one ends the set (Done,
// Context, Err), and Release releases them all.
type LockSet struct {
	locks []*Lock // in the order the caller gave
	ctx   context.Context
	stop  context.CancelCauseFunc
	stops []func() bool

	once   sync.Once
	relErr error
}

// AcquireSet blocks until it holds every key of members (each exclusive or
// shared), or ctx is done. It holds none of them meanwhile. members must have
// 1 to MaxSetKeys keys, each once (else a *SetError). Keys of a set are
// table-mode locks.
func (c *Client) AcquireSet(ctx context.Context, members []SetMember) (*LockSet, error) {
	return c.acquireSet(ctx, members, true)
}

// TryAcquireSet takes every key of members at once, or none and returns an
// error matching ErrLocked (a *LockedError naming a key that is held).
func (c *Client) TryAcquireSet(ctx context.Context, members []SetMember) (*LockSet, error) {
	return c.acquireSet(ctx, members, false)
}

// DoSet acquires the set, runs fn with it and a context that ends if any of
// its locks is lost, and releases it (also when fn panics). If a lock was
// lost before fn returned, the error matches ErrLost.
func (c *Client) DoSet(ctx context.Context, members []SetMember, fn func(ctx context.Context, s *LockSet) error) error {
	return runHeld(ctx, "key set", func(ctx context.Context) (*LockSet, error) { return c.AcquireSet(ctx, members) }, fn)
}

// validateSet checks members and returns them in canonical order (by key
// hash, the order the database takes their locks in) with their hashes.
func (c *Client) validateSet(members []SetMember) ([]SetMember, []int64, error) {
	if len(members) == 0 {
		return nil, nil, &SetError{Reason: "it has no keys"}
	}
	if len(members) > MaxSetKeys {
		return nil, nil, &SetError{Reason: fmt.Sprintf("it has %d keys; the limit is %d", len(members), MaxSetKeys)}
	}
	seen := make(map[Key]bool, len(members))
	for _, m := range members {
		if err := m.Key.Validate(); err != nil {
			return nil, nil, &SetError{Reason: "a key is invalid", Err: err}
		}
		if seen[m.Key] {
			return nil, nil, &SetError{Reason: fmt.Sprintf("key %s appears twice", m.Key)}
		}
		seen[m.Key] = true
	}
	type hk struct {
		m SetMember
		h int64
	}
	sorted := make([]hk, len(members))
	for i, m := range members {
		sorted[i] = hk{m, AdvisoryKey(c.cfg.Schema, m.Key)}
	}
	slices.SortFunc(sorted, func(a, b hk) int {
		switch {
		case a.h < b.h:
			return -1
		case a.h > b.h:
			return 1
		}
		// Equal hashes (a collision): any fixed order will do.
		if a.m.Key.mapKey() < b.m.Key.mapKey() {
			return -1
		}
		return 1
	})
	out := make([]SetMember, len(sorted))
	hashes := make([]int64, len(sorted))
	for i, x := range sorted {
		out[i], hashes[i] = x.m, x.h
	}
	return out, hashes, nil
}

func newLockSet(locks []*Lock) *LockSet {
	s := &LockSet{locks: locks}
	ctx, cancel := context.WithCancelCause(context.Background())
	s.ctx, s.stop = ctx, cancel
	for _, l := range locks {
		s.stops = append(s.stops, context.AfterFunc(l.ctx, func() { cancel(context.Cause(l.ctx)) }))
	}
	return s
}

// Locks returns the set's locks, in the order the keys were given.
func (s *LockSet) Locks() []*Lock { return slices.Clone(s.locks) }

// Lock returns the set's lock of key, or nil.
func (s *LockSet) Lock(key Key) *Lock {
	for _, l := range s.locks {
		if l.key == key {
			return l
		}
	}
	return nil
}

// Done is closed when any lock of the set is no longer held.
func (s *LockSet) Done() <-chan struct{} { return s.ctx.Done() }

// Context ends when any lock of the set does, with that lock's cause.
func (s *LockSet) Context() context.Context { return s.ctx }

// Err is nil while every lock of the set is held, else the cause of the
// first that ended (a *LostError, ErrReleased or ErrClosed).
func (s *LockSet) Err() error {
	if s.ctx.Err() == nil {
		return nil
	}
	return context.Cause(s.ctx)
}

// Release releases every lock of the set. It returns nil when all were
// released, else the errors of those that were lost or failed, joined (an
// error matching ErrLost when a lock had been lost). Idempotent.
func (s *LockSet) Release(ctx context.Context) error {
	s.once.Do(func() {
		var errs []error
		for _, l := range s.locks {
			errs = append(errs, l.Release(ctx))
		}
		for _, stop := range s.stops {
			stop()
		}
		s.stop(ErrReleased)
		s.relErr = errors.Join(errs...)
	})
	return s.relErr
}

// Fence fences tx with every lock of the set (see Lock.Fence): it fails,
// with an error matching ErrLost, unless all are still held.
func (s *LockSet) Fence(ctx context.Context, tx pgx.Tx) error {
	for _, l := range s.locks {
		if err := l.Fence(ctx, tx); err != nil {
			return err
		}
	}
	return nil
}

// BeginTxFunc runs fn in a transaction fenced by every lock of the set, and
// commits it if fn returns nil.
func (s *LockSet) BeginTxFunc(ctx context.Context, opts pgx.TxOptions, fn func(pgx.Tx) error) error {
	if len(s.locks) == 0 {
		return nil
	}
	c := s.locks[0].c
	return pgx.BeginTxFunc(ctx, c.pool, opts, func(tx pgx.Tx) error {
		if err := s.Fence(ctx, tx); err != nil {
			return err
		}
		return fn(tx)
	})
}

// setSlot is one key of a set being acquired: its place in this client's
// queue of the key.
type setSlot struct {
	m  SetMember
	ks *keyState
	w  *waiter
}

// acquireSet is AcquireSet and TryAcquireSet. It takes its turn in this
// client's queue of every key, in canonical order (so two sets of one client
// cannot wait for each other), and then asks the database for all keys in
// one statement per wake-up, as acquireObserved does for one key.
func (c *Client) acquireSet(ctx context.Context, members []SetMember, wait bool) (*LockSet, error) {
	sorted, _, err := c.validateSet(members)
	if err != nil {
		return nil, err
	}
	obs := c.met.startAcquire(c.table, Exclusive)
	s, err := c.acquireSetObserved(ctx, members, sorted, wait, &obs)
	obs.done(ctx, err)
	return s, err
}

func (c *Client) acquireSetObserved(ctx context.Context, members, sorted []SetMember, wait bool, obs *acquireObs) (*LockSet, error) {
	if err := ctx.Err(); err != nil {
		return nil, context.Cause(ctx)
	}
	slots := make([]setSlot, 0, len(sorted))
	defer func() {
		for i := len(slots) - 1; i >= 0; i-- {
			c.leave(slots[i].m.Key, slots[i].ks, slots[i].w)
		}
	}()
	for _, m := range sorted {
		c.mu.Lock()
		if l := heldIn(ctx, c, m.Key); l != nil {
			err := c.heldHereLocked(l)
			c.mu.Unlock()
			return nil, err
		}
		if c.closed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		ks, w, err := c.enqueueLocked(m.Key, m.Key.mapKey(), m.kind(), wait, false)
		c.mu.Unlock()
		if err != nil {
			return nil, err
		}
		slots = append(slots, setSlot{m: m, ks: ks, w: w})
		if err := c.awaitTurn(ctx, w, obs); err != nil {
			return nil, err
		}
	}

	keys := make([]Key, len(sorted))
	kinds := make([]Kind, len(sorted))
	for i, m := range sorted {
		keys[i], kinds[i] = m.Key, m.kind()
	}
	var subs []*dispatch.Sub
	defer func() {
		for _, sub := range subs {
			sub.Close()
		}
	}()
	if wait {
		for _, k := range keys {
			subs = append(subs, c.disp.Subscribe(k.mapKey(), false))
		}
	}
	backoff := c.table.busyRetry()
	for {
		// A key this client holds in a way that keeps the set out: wait for
		// its release first.
		c.mu.Lock()
		var free chan struct{}
		for _, sl := range slots {
			if b := sl.ks.blocksLocked(sl.m.kind()); b != nil {
				if !wait {
					err := c.heldHereLocked(b)
					c.mu.Unlock()
					return nil, err
				}
				free = sl.ks.free
				break
			}
		}
		c.mu.Unlock()
		if free != nil {
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

		h, err := c.ensureHolder(ctx)
		if err != nil {
			return nil, err
		}
		wakes := make([]reflect.SelectCase, 0, len(subs)+3)
		for _, sub := range subs {
			wakes = append(wakes, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(sub.C())})
		}
		c.mu.Lock()
		keep := []int64{}
		fresh := false
		for _, sl := range slots {
			keep = append(keep, sl.ks.tableTokensLocked(h, sl.m.Key)...)
			fresh = fresh || sl.ks.poked
			sl.ks.poked = false
		}
		c.mu.Unlock()
		g, err := c.grant(ctx, h, keys, kinds, 1, wait, keep, fresh)
		obs.attempt()
		if errors.Is(err, errRetry) {
			continue
		}
		if err != nil {
			if wait && connectionFailure(err) {
				if err := c.pauseAfterFailure(ctx, err); err != nil {
					return nil, err
				}
				continue
			}
			return nil, fmt.Errorf("lease: acquire key set: %w", err)
		}
		if g.acquired {
			c.mu.Lock()
			for _, sl := range slots {
				sl.ks.queued = false
			}
			if h.lost || c.closed {
				closed := c.closed
				c.mu.Unlock()
				for i, k := range keys {
					c.releaseInBackground(h, k, g.tokens[i])
				}
				if closed {
					return nil, ErrClosed
				}
				continue
			}
			if c.expiredLocked(h) { // see expiredLocked
				c.mu.Unlock()
				c.loseHolder(h, LossRenewalTimeout) // its clean-up deletes the grants
				continue
			}
			byKey := make(map[Key]*Lock, len(keys))
			for i, sl := range slots {
				req := request{kind: sl.m.kind(), permits: 1}
				byKey[sl.m.Key] = c.holdTableLocked(h, sl.ks, sl.m.Key, req, g.tokens[i], g.slots[i], g.at)
			}
			c.mu.Unlock()
			locks := make([]*Lock, len(members))
			for i, m := range members {
				locks[i] = byKey[m.Key]
			}
			return newLockSet(locks), nil
		}
		if g.queued {
			c.mu.Lock()
			for _, sl := range slots {
				sl.ks.queued = true
			}
			c.mu.Unlock()
		}
		refused := g.refusal(keys[max(g.blocked, 0)])
		if !wait {
			return nil, refused
		}
		obs.wait()
		delay := dispatch.Jitter(c.cfg.PollInterval)
		if refused.busy {
			delay = min(delay, dispatch.Jitter(backoff))
			backoff = min(backoff*2, c.cfg.PollInterval)
		} else {
			backoff = c.table.busyRetry()
			if e := refused.ExpiresIn + time.Millisecond; refused.ExpiresIn > 0 && e < delay {
				delay = e
			}
		}
		t := time.NewTimer(delay)
		wakes = append(wakes,
			reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(t.C)},
			reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())},
			reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(c.closing)})
		chosen, _, _ := reflect.Select(wakes)
		t.Stop()
		switch chosen {
		case len(wakes) - 2:
			return nil, context.Cause(ctx)
		case len(wakes) - 1:
			return nil, ErrClosed
		}
	}
}
