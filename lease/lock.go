package lease

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Lock is a held lock. It stays held until Release, Client.Close, or loss.
//
// A lease can be lost before Release: the process was paused or cut off for
// longer than the TTL, or someone deleted the row. Done and Context tell you
// at once; Fence makes a write in your own transaction safe even when you
// could not have known in time.
//
// A Lock ends once, for one reason, and every method tells the same story:
// Err, the cause of Context and what Release returns agree.
type Lock struct {
	c          *Client
	mode       heldMode // the table or the advisory path
	key        Key
	kind       Kind
	slot       int64 // a permit's slot, 1 to permits; 0 for other kinds
	permits    int   // a semaphore's permits; 0 for other kinds
	token      int64
	acquiredAt time.Time

	ctx  context.Context
	stop context.CancelCauseFunc // through cancel only

	endMu sync.Mutex // serialises cancel when losses are counted (metrics)

	// releasing is set (under Client.mu) when Release starts: the deletion of
	// its own row, announced or found by the heartbeat, is then no loss.
	releasing bool

	once   sync.Once
	relErr error
}

// heldMode is what a Lock does differently on each path.
type heldMode interface {
	// release lets go of the lock in the database, bounded by ctx. deleted is
	// false when the database no longer had it (taken over or deleted
	// before). An error means the outcome is unknown and the mode retries in
	// the background.
	release(ctx context.Context, l *Lock) (deleted bool, err error)
	// fence guards tx (see Lock.Fence); l is known to be held.
	fence(ctx context.Context, l *Lock, tx pgx.Tx) error
	// beginTxFunc runs fn in a transaction fenced by l (see Lock.BeginTxFunc).
	beginTxFunc(ctx context.Context, l *Lock, opts pgx.TxOptions, fn func(pgx.Tx) error) error
	// holderID is the holder row's id, 0 when the path has none.
	holderID() int64
	// goneReason is why a lock that release found gone was lost.
	goneReason() LossReason
}

func newLock(c *Client, m heldMode, key Key, req request, token, slot int64, acquiredAt time.Time) *Lock {
	l := &Lock{c: c, mode: m, key: key, kind: req.kind, token: token, acquiredAt: acquiredAt}
	if req.kind == Permit {
		l.slot, l.permits = slot, req.permits
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	l.ctx, l.stop = withHeld(ctx, l), cancel
	return l
}

// cancel ends l with cause unless it has ended already: the first cause
// wins. With metrics, a loss is counted before Done closes, so that whoever
// sees Done sees the count, and only by the call that ends the lock.
func (l *Lock) cancel(cause error) {
	if l.c.met == nil {
		l.stop(cause)
		return
	}
	l.endMu.Lock()
	defer l.endMu.Unlock()
	if l.ctx.Err() != nil {
		return
	}
	if e, ok := cause.(*LostError); ok {
		l.c.met.lost(l, e.Reason)
	}
	l.stop(cause)
}

// Key returns the locked key.
func (l *Lock) Key() Key { return l.key }

// Kind says how the lock holds its key: Exclusive, Shared, or a semaphore's
// Permit.
func (l *Lock) Kind() Kind { return l.kind }

// Slot is which permit of its semaphore the lock holds, 1 to Permits; 0 for
// a lock of another kind.
func (l *Lock) Slot() int { return int(l.slot) }

// Permits is the number of permits of the lock's semaphore; 0 for a lock of
// another kind.
func (l *Lock) Permits() int { return l.permits }

// Token returns the fencing token: larger than the token of every earlier
// grant of the same key, of any kind and on either path: each is drawn
// under the key's locks and committed before they are let go. Pass it to the SQL function fence (or use Fence) in transactions that
// write what the lock protects.
func (l *Lock) Token() int64 { return l.token }

// AcquiredAt is when the lock row was inserted, on the database clock (for
// an advisory lock: when the acquire returned, on the local clock).
func (l *Lock) AcquiredAt() time.Time { return l.acquiredAt }

// HolderID is the id of the holder row this lock belongs to (0 for an
// advisory lock, which has none).
func (l *Lock) HolderID() int64 { return l.mode.holderID() }

// Advisory reports whether l was acquired on the advisory path.
func (l *Lock) Advisory() bool {
	_, ok := l.mode.(*advisoryLock)
	return ok
}

// Done is closed when the lock is no longer held: lost, released, or its
// client closed. Err says which.
func (l *Lock) Done() <-chan struct{} { return l.ctx.Done() }

// Context returns a context cancelled when Done closes; its cause
// (context.Cause) is a *LostError (matching ErrLost), ErrReleased or
// ErrClosed. An acquire of the same key by the same Client with this context
// (or one derived from it) is refused at once with ErrAlreadyHeld: it would
// wait for its own release.
func (l *Lock) Context() context.Context { return l.ctx }

// Err is nil while the lock is held, else a *LostError (matching ErrLost),
// ErrReleased or ErrClosed.
func (l *Lock) Err() error {
	if l.ctx.Err() == nil {
		return nil
	}
	return context.Cause(l.ctx)
}

// lose ends l as lost for reason (a no-op if it ended already) and logs it.
func (l *Lock) lose(reason LossReason, err error) {
	if l.ctx.Err() != nil {
		return
	}
	// Done first, the log line after: the holder is told before anything
	// slower happens (pinSet.lose closes the connection next).
	l.cancel(&LostError{Key: l.key, Token: l.token, Reason: reason, Err: err})
	l.c.log.Warn("pglease: lock lost", "name", l.key.Name, "id", l.key.ID, "token", l.token, "reason", reason.String())
}

// Release lets go of the lock: it deletes the lock's row only if it still
// carries this lock's token (a late release never deletes the next holder's
// lock), or unlocks the advisory lock on its own connection. It is
// idempotent, returns what the first call returned, and works even when ctx
// is already done (it then takes at most Config.ReleaseTimeout).
//
// It returns nil when the lock was released, by this call or by
// Client.Close; an error matching ErrLost (wrapping the same *LostError that
// Err returns) when the lock had been lost before; any other error when the
// database could not be reached, in which case the release is retried in the
// background after each heartbeat.
func (l *Lock) Release(ctx context.Context) error {
	l.once.Do(func() { l.relErr = l.release(ctx) })
	return l.relErr
}

func (l *Lock) release(ctx context.Context) error {
	c := l.c
	c.mu.Lock()
	ended := l.ctx.Err() != nil
	l.releasing = true
	c.mu.Unlock()
	if !ended {
		rctx, cancel := releaseContext(ctx, c.cfg.ReleaseTimeout)
		deleted, err := l.mode.release(rctx, l)
		cancel()
		switch {
		case err != nil:
			l.cancel(ErrReleased)
			if errors.Is(context.Cause(l.ctx), ErrReleased) {
				return fmt.Errorf("lease: release %s (retried in the background; the row expires with the holder otherwise): %w", l.key, err)
			}
		case deleted:
			l.cancel(ErrReleased)
		default:
			l.lose(l.mode.goneReason(), nil) // taken over, deleted or dropped before we knew
		}
	}
	switch cause := context.Cause(l.ctx); {
	case errors.Is(cause, ErrLost):
		return fmt.Errorf("lease: release %s: %w", l.key, cause)
	default: // ErrReleased, or ErrClosed: Close released it
		return nil
	}
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
	if err := l.Err(); err != nil {
		return fmt.Errorf("lease: fence %s token %d: %w", l.key, l.token, l.endedError(err))
	}
	return l.mode.fence(ctx, l, tx)
}

// endedError is err (the lock's cause) as a fence or a transaction reports
// it: a lock that was released or closed is no longer held either, so every
// such error matches ErrLost as well as its cause.
func (l *Lock) endedError(cause error) error {
	if errors.Is(cause, ErrLost) {
		return cause
	}
	return fmt.Errorf("%w (%w)", ErrLost, cause)
}

// BeginTxFunc runs fn in a transaction that is fenced by the lock, and commits
// it if fn returns nil (else rolls it back), like pgx.BeginTxFunc.
//
// A table-mode lock runs it on a pool connection and calls Fence first. An
// advisory lock runs it on its own pinned connection: if that connection is
// gone, so is the transaction, and the lock cannot be released until fn
// returns, so the write can never land after the lock passed on. The
// connection is shared with the Client's other advisory locks on it, whose
// releases wait for fn: keep it short. When ctx is done a statement of fn is
// cancelled in the server and the connection stays. Its default isolation
// level is READ COMMITTED.
func (l *Lock) BeginTxFunc(ctx context.Context, opts pgx.TxOptions, fn func(pgx.Tx) error) error {
	if err := l.Err(); err != nil {
		return fmt.Errorf("lease: %s: %w", l.key, l.endedError(err))
	}
	return l.mode.beginTxFunc(ctx, l, opts, fn)
}
