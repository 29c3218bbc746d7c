package lease

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// The table path: a lock is a row of the locks table, alive while its
// holder's lease is renewed (holder.go).

// tableMode is the table path's acquireMode.
type tableMode struct{ c *Client }

// tableLock is a table-mode Lock's heldMode.
type tableLock struct {
	h   *holder
	seq uint64 // registration order within the holder (see heartbeat)
}

// busyRetry is how soon a table waiter that found the key busy looks again
// when no notification wakes it first. An acquire in flight takes about one
// WAL flush; a shorter retry mostly finds it still in flight or holding the
// key, and with holds of a few milliseconds it would poll alongside every
// notification.
const busyRetry = 10 * time.Millisecond

func (tableMode) usableLocked() error                             { return nil }
func (tableMode) subscribeFirst() bool                            { return false }
func (tableMode) askOnSubscribe() bool                            { return false }
func (tableMode) wideWake() bool                                  { return false }
func (tableMode) busyRetry() time.Duration                        { return busyRetry }
func (tableMode) explain(_ context.Context, e *LockedError) error { return e }

// attempt asks the database once, through the SQL function acquire_keys.
func (m tableMode) attempt(ctx context.Context, key Key, ks *keyState, req request, wait bool) (*Lock, *LockedError, error) {
	c := m.c
	h, err := c.ensureHolder(ctx)
	if err != nil {
		return nil, nil, err
	}
	c.mu.Lock()
	if hd := ks.handed; hd != nil {
		ks.handed = nil
		if hd.Waiter == ks.waiterID && hd.Channel == h.channel && !h.lost && !c.closed &&
			hd.Kind == req.kind.sqlKind() && hd.Permits == req.permits {
			// The database handed us the key: the grant is committed.
			ks.leftQueueLocked()
			ks.poked = false
			if c.expiredLocked(h) {
				c.mu.Unlock()
				c.loseHolder(h, LossRenewalTimeout) // its clean-up deletes the grant
				return nil, nil, errRetry
			}
			l := c.holdTableLocked(h, ks, key, req, hd.Token, hd.Slot, hd.AcquiredAt)
			c.mu.Unlock()
			return l, nil, nil
		}
		// For a waiter row we left, or of another kind, or one this
		// acquirer has not heard of yet: the attempt below, through the
		// key's locks, adopts it or deletes it as an orphan (and the key
		// goes on to the next waiter).
		ks.poked = true
	}
	fresh := ks.poked
	ks.poked = false
	keep := ks.tableTokensLocked(h, key)
	c.mu.Unlock()
	g, err := c.grant(ctx, h, []Key{key}, []Kind{req.kind}, req.permits, wait, keep, fresh)
	if err != nil {
		c.mu.Lock()
		ks.handed = nil // the clean-up the error scheduled deletes it
		ks.waiterID = 0
		c.mu.Unlock()
		if errors.Is(err, errRetry) {
			return nil, nil, err
		}
		return nil, nil, fmt.Errorf("lease: acquire %s: %w", key, err)
	}
	if !g.acquired {
		c.mu.Lock()
		if g.queued {
			ks.queued = true
			if g.waiter != nil {
				ks.waiterID = *g.waiter
			}
		}
		c.mu.Unlock()
		return nil, g.refusal(key), nil
	}
	c.mu.Lock()
	// The grant took this holder's waiter row, if it had one, and adopted a
	// grant handed over meanwhile.
	ks.leftQueueLocked()
	if h.lost || c.closed {
		closed := c.closed
		c.mu.Unlock()
		// The holder was given up while we asked: this row is not ours to use.
		// Its holder's clean-up may have run before the insert committed, so
		// delete it by its token.
		c.releaseInBackground(h, key, g.tokens[0])
		if closed {
			return nil, nil, ErrClosed
		}
		return nil, nil, errRetry
	}
	if c.expiredLocked(h) {
		c.mu.Unlock()
		c.loseHolder(h, LossRenewalTimeout) // its clean-up deletes the grant
		return nil, nil, errRetry
	}
	l := c.holdTableLocked(h, ks, key, req, g.tokens[0], g.slots[0], g.at)
	c.mu.Unlock()
	return l, nil, nil
}

// expiredLocked reports whether h's lease may have run out on the server by
// now (c.mu held): its deadline, the start of its last good renewal plus the
// TTL less the safety margin, has passed. A grant that arrives then is not
// the caller's to use, though the database made it: the process may have
// been stopped (SIGSTOP, a long GC pause, a frozen VM) between the grant and
// now, long enough for another holder to take the key over. The heartbeat,
// stopped as long, would give the holder up at its next tick; the acquire
// must not hand out the lock in between.
func (c *Client) expiredLocked(h *holder) bool {
	return !time.Now().Before(h.deadline)
}

// holdTableLocked makes the Lock of a table grant and records it as held,
// by h and on the key (c.mu held).
func (c *Client) holdTableLocked(h *holder, ks *keyState, key Key, req request, token, slot int64, at time.Time) *Lock {
	h.seq++
	h.seen = max(h.seen, token)
	tl := &tableLock{h: h, seq: h.seq}
	l := newLock(c, tl, key, req, token, slot, at)
	h.locks[l.token] = l
	c.holdLocked(ks, l)
	return l
}

// grantResult is acquire_keys' answer.
type grantResult struct {
	acquired, busy, queued bool
	tokens, slots          []int64 // in the order of the keys asked for
	at                     time.Time
	blocked                int // index of a key that could not be granted
	holderID               *int64
	host, app              *string
	pid                    *int32
	heldSince              *time.Time
	expiresInMicroseconds  *int64
	waiter                 *int64 // the caller's waiter row, when queued on one key
}

// refusal is the *LockedError of a refused grant, about key.
func (g *grantResult) refusal(key Key) *LockedError {
	e := &LockedError{Key: key, busy: g.busy}
	if g.holderID != nil {
		e.HolderID = *g.holderID
	}
	if g.host != nil {
		e.Host = *g.host
	}
	if g.pid != nil {
		e.PID = *g.pid
	}
	if g.app != nil {
		e.Application = *g.app
	}
	if g.heldSince != nil {
		e.AcquiredAt = *g.heldSince
	}
	if g.expiresInMicroseconds != nil {
		e.ExpiresIn = time.Duration(*g.expiresInMicroseconds) * time.Microsecond
	}
	return e
}

// grant sends one acquire_keys for keys (with kinds, and permits for a
// semaphore), keeping the grants with tokens keep. An error of unknown
// outcome schedules clean-ups of the keys (the grants or waiter rows it may
// have made) and returns the error; one about a holder that expired gives the
// holder up and returns errRetry.
func (c *Client) grant(ctx context.Context, h *holder, keys []Key, kinds []Kind, permits int, wait bool, keep []int64, fresh bool) (*grantResult, error) {
	names := make([]string, len(keys))
	ids := make([]string, len(keys))
	codes := make([]string, len(keys))
	for i, k := range keys {
		names[i], ids[i], codes[i] = k.Name, k.ID, kinds[i].sqlKind()
	}
	var g grantResult
	var at *time.Time
	var blocked *int32
	// Version 9 hands a grant of the holder's that this client did not
	// know of back with its own token when that token is above every one
	// this client has had for the holder (a handoff made while this
	// statement waited for the key); older versions give it a new token.
	// This client's acquirers of a key take turns, so no lock of the key can
	// be made between this read and the statement's.
	sql, args := c.q.acquireKeys, []any{names, ids, codes, permits, h.id, h.secret, wait, keep, fresh}
	c.mu.Lock()
	if c.schemaHave >= 9 {
		sql, args = c.q.acquireKeysSeen, append(args, h.seen)
	}
	c.mu.Unlock()
	err := c.pool.QueryRow(ctx, sql, args...).Scan(
		&g.acquired, &g.tokens, &g.slots, &at, &g.busy, &g.queued, &blocked,
		&g.holderID, &g.host, &g.pid, &g.app, &g.heldSince, &g.expiresInMicroseconds, &g.waiter)
	c.attempts.Add(1) // after the reply: a test that sees the count sees no statement in flight
	if err != nil {
		if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok {
			switch pgErr.Code {
			case SQLStateHolderExpired:
				c.loseHolder(h, LossHolderExpired)
				return nil, errRetry
			case "42883": // undefined_function: the schema went back below version 9
				if sql == c.q.acquireKeysSeen {
					c.mu.Lock()
					c.schemaHave = 8
					c.mu.Unlock()
					return nil, errRetry
				}
			case SQLStateKindConflict:
				e := &KindConflictError{Asked: kinds[0], Detail: strings.TrimPrefix(pgErr.Message, "pglease: ")}
				if len(keys) == 1 {
					e.Key = keys[0]
				}
				if kinds[0] == Permit {
					e.AskedPermits = permits
				}
				return nil, e
			}
			return nil, err
		}
		// The outcome is unknown: grants or waiter rows may have been
		// inserted, or may yet be (a cancel that did not arrive), and the
		// reply lost. Make sure such orphans do not keep the keys locked:
		// deleted now, and found by the heartbeat if they commit later.
		for _, k := range keys {
			c.cleanupOrphan(k, h)
		}
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		return nil, err
	}
	if at != nil {
		g.at = *at
	}
	if blocked != nil {
		g.blocked = int(*blocked) - 1
	}
	return &g, nil
}

func (t *tableLock) holderID() int64 { return t.h.id }

func (t *tableLock) goneReason() LossReason { return LossRowDeleted }

// release deletes the row by its token. On an error the row is deleted again
// after each renewal until that succeeds or the holder is gone.
func (t *tableLock) release(ctx context.Context, l *Lock) (bool, error) {
	c := l.c
	var deleted bool
	err := c.pool.QueryRow(ctx, c.q.release, l.key.Name, l.key.ID, l.token, t.h.id, t.h.secret).Scan(&deleted)
	c.mu.Lock()
	c.forgetLocked(l)
	if err != nil && !t.h.lost {
		t.h.pending[l.token] = l.key
	}
	c.mu.Unlock()
	return deleted, err
}

func (t *tableLock) fence(ctx context.Context, l *Lock, tx pgx.Tx) error {
	if _, err := tx.Exec(ctx, l.c.q.fence, l.key.Name, l.key.ID, l.token); err != nil {
		if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok && pgErr.Code == SQLStateNotHeld {
			return fmt.Errorf("lease: fence %s token %d: %w (%w)", l.key, l.token, ErrLost, err)
		}
		return fmt.Errorf("lease: fence %s: %w", l.key, err)
	}
	return nil
}

func (t *tableLock) beginTxFunc(ctx context.Context, l *Lock, opts pgx.TxOptions, fn func(pgx.Tx) error) error {
	return pgx.BeginTxFunc(ctx, l.c.pool, opts, func(tx pgx.Tx) error {
		if err := l.Fence(ctx, tx); err != nil {
			return err
		}
		return fn(tx)
	})
}

// forgetLocked drops a table lock from its holder and its key (c.mu held).
// Idempotent.
func (c *Client) forgetLocked(l *Lock) {
	if t, ok := l.mode.(*tableLock); ok && t.h.locks[l.token] == l {
		delete(t.h.locks, l.token)
	}
	c.dropLocked(l)
}
