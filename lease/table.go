package lease

import (
	"context"
	"errors"
	"fmt"
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
func (tableMode) subscribeFirst() bool                            { return true }
func (tableMode) busyRetry() time.Duration                        { return busyRetry }
func (tableMode) explain(_ context.Context, e *LockedError) error { return e }

// attempt asks the database once, through the SQL function acquire.
func (m tableMode) attempt(ctx context.Context, key Key, ks *keyState, _ bool) (*Lock, *LockedError, error) {
	c := m.c
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
	err = c.pool.QueryRow(ctx, c.q.acquire, key.Name, key.ID, h.id, h.secret).Scan(
		&acquired, &token, &holderID, &host, &pid, &app, &acquiredAt, &expiresInMicroseconds, &busy)
	c.attempts.Add(1) // after the reply: a test that sees the count sees no statement in flight
	if err != nil {
		if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok {
			if pgErr.Code == SQLStateHolderExpired {
				c.loseHolder(h, LossHolderExpired)
				return nil, nil, errRetry
			}
			return nil, nil, fmt.Errorf("lease: acquire %s: %w", key, err)
		}
		// The outcome is unknown: the row may have been inserted, or may yet
		// be (a cancel that did not arrive), and the reply lost. Make sure
		// such an orphan does not keep the key locked: deleted now, and found
		// by the heartbeat if it commits later.
		c.cleanupOrphan(key, h)
		if ctx.Err() != nil {
			return nil, nil, context.Cause(ctx)
		}
		return nil, nil, fmt.Errorf("lease: acquire %s: %w", key, err)
	}
	if !acquired {
		e := &LockedError{Key: key, busy: busy}
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
		c.releaseInBackground(h, key, *token)
		if closed {
			return nil, nil, ErrClosed
		}
		return nil, nil, errRetry
	}
	var at time.Time
	if acquiredAt != nil {
		at = *acquiredAt
	}
	h.seq++
	tl := &tableLock{h: h, seq: h.seq}
	l := newLock(c, tl, key, *token, at)
	h.locks[l.token] = l
	c.holdLocked(ks, l)
	c.mu.Unlock()
	return l, nil, nil
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
