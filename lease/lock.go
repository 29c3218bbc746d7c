package lease

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Lock is a held lock. It stays held until Release, Client.Close, or loss.
//
// A lease can be lost before Release: the process was paused or cut off for
// longer than the TTL, or someone deleted the row. Done and Context tell you
// at once; Fence makes a write in your own transaction safe even when you
// could not have known in time.
type Lock struct {
	c          *Client
	h          *holder
	key        Key
	token      int64
	acquiredAt time.Time
	seq        uint64   // registration order within the holder
	adv        *advHold // advisory locks only (h is nil then)

	ctx    context.Context
	cancel context.CancelCauseFunc

	once   sync.Once
	relErr error
}

// Key returns the locked key.
func (l *Lock) Key() Key { return l.key }

// Token returns the fencing token: larger than the token of every earlier
// acquisition of the same key. Pass it to the SQL function fence (or use
// Fence) in transactions that write what the lock protects.
func (l *Lock) Token() int64 { return l.token }

// AcquiredAt is when the lock row was inserted, on the database clock (for
// an advisory lock: when the acquire returned, on the local clock).
func (l *Lock) AcquiredAt() time.Time { return l.acquiredAt }

// HolderID is the id of the holder row this lock belongs to (0 for an
// advisory lock, which has none).
func (l *Lock) HolderID() int64 {
	if l.h == nil {
		return 0
	}
	return l.h.id
}

// Done is closed when the lock is no longer held: lost, released, or its
// client closed. Err says which.
func (l *Lock) Done() <-chan struct{} { return l.ctx.Done() }

// Context returns a context cancelled when Done closes; its cause
// (context.Cause) is ErrLost, ErrReleased or ErrClosed.
func (l *Lock) Context() context.Context { return l.ctx }

// Err is nil while the lock is held, else ErrLost, ErrReleased or ErrClosed.
func (l *Lock) Err() error {
	if l.ctx.Err() == nil {
		return nil
	}
	return context.Cause(l.ctx)
}

// Release deletes the lock's row, only if it still carries this lock's token:
// a late release never deletes the next holder's lock. It is idempotent,
// returns what the first call returned, and works even when ctx is already
// done (it then takes at most Config.ReleaseTimeout). It returns an error
// matching ErrLost if the lock had been lost before. If the database cannot be
// reached, the release is retried in the background after each heartbeat.
func (l *Lock) Release(ctx context.Context) error {
	l.once.Do(func() { l.relErr = l.release(ctx) })
	return l.relErr
}

func (l *Lock) release(ctx context.Context) error {
	if l.adv != nil {
		return l.adv.release(ctx, l)
	}
	c := l.c
	l.cancel(ErrReleased) // no-op if it was lost or closed first
	if cause := context.Cause(l.ctx); !errors.Is(cause, ErrReleased) {
		if errors.Is(cause, ErrClosed) {
			return nil
		}
		// Lost. The row, if still there, is deleted by token: harmless.
		c.bestEffortRelease(l)
		return fmt.Errorf("lease: release %s: %w before release", l.key, ErrLost)
	}
	// This client's next acquirer of the key waits until the row is gone
	// (dropLocked below), so it never races its own release.
	rctx, cancel := releaseContext(ctx, c.cfg.ReleaseTimeout)
	defer cancel()
	var deleted bool
	err := c.pool.QueryRow(rctx, c.q.release, l.key.Name, l.key.ID, l.token).Scan(&deleted)
	c.mu.Lock()
	c.dropLocked(l)
	if err != nil && !l.h.lost {
		l.h.pending[l.token] = l.key
	}
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("lease: release %s (retried in the background; the row expires with the holder otherwise): %w", l.key, err)
	}
	if !deleted {
		// The row was gone or carried another token: taken over or deleted
		// before we knew.
		return fmt.Errorf("lease: release %s: %w before release (the row was gone)", l.key, ErrLost)
	}
	return nil
}

func (c *Client) bestEffortRelease(l *Lock) {
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
	defer cancel()
	_, _ = c.pool.Exec(ctx, c.q.release, l.key.Name, l.key.ID, l.token)
}

// releaseContext is ctx without its cancellation, bounded by timeout.
func releaseContext(ctx context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), timeout)
}

// Fence calls the SQL function fence inside tx: it fails, with an error
// matching ErrLost, unless this lock is still held with its token, and it
// takes a row lock that keeps any takeover or reap of the lock waiting until
// tx ends. Call it in the transaction that writes what the lock protects,
// before the write; if it fails, roll back.
//
// An advisory lock fences only a transaction on its own connection (see
// BeginTxFunc), and fails with ErrNotFenceable for any other.
func (l *Lock) Fence(ctx context.Context, tx pgx.Tx) error {
	if l.adv != nil {
		return l.adv.fence(l, tx)
	}
	if err := l.Err(); err != nil {
		return fmt.Errorf("lease: fence %s token %d: %w", l.key, l.token, ErrLost)
	}
	if _, err := tx.Exec(ctx, l.c.q.fence, l.key.Name, l.key.ID, l.token); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == SQLStateNotHeld {
			return fmt.Errorf("lease: fence %s token %d: %w (%w)", l.key, l.token, ErrLost, err)
		}
		return fmt.Errorf("lease: fence %s: %w", l.key, err)
	}
	return nil
}
