package lease

import (
	"context"
	"errors"
	"fmt"
)

// Lock kinds. A key is locked in one of three ways, all on one acquire engine
// with the same guarantees (a lease, a fencing token per grant, takeover of a
// dead holder's grant, the reaper):
//
//   - exclusive (Acquire): one holder;
//   - shared (AcquireShared): any number of shared holders, or one exclusive;
//   - permits of a semaphore (Client.Semaphore): at most N holders.
//
// Every grant is a row of the locks table with its own token. Acquirers that
// have to wait are queued in the waiters table, in arrival order across all
// clients, and are served in that order: a grant is made only when every
// waiter queued before it could be served with it. So a stream of readers
// cannot keep a waiting writer out (a reader that arrives after the writer
// queues behind it), and a writer keeps readers out only for as long as it
// waits and holds; semaphore permits go first come, first served.

// Kind is how a Lock holds its key.
type Kind uint8

const (
	// Exclusive: the only holder of the key.
	Exclusive Kind = iota + 1
	// Shared: one of any number of shared holders; no exclusive holder
	// meanwhile.
	Shared
	// Permit: one of at most N holders of a semaphore's key.
	Permit
)

func (k Kind) String() string {
	switch k {
	case Exclusive:
		return "exclusive"
	case Shared:
		return "shared"
	case Permit:
		return "permit"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// sqlKind is the kind's code in the locks and waiters tables.
func (k Kind) sqlKind() string {
	switch k {
	case Shared:
		return "s"
	case Permit:
		return "p"
	}
	return "x"
}

// MaxPermits is the most permits a semaphore may have. Each permit is a slot
// of the key's unique index, and an acquirer looks at every held one, so the
// limit keeps an acquire one index range scan of bounded size.
const MaxPermits = 1024

// MaxSetKeys is the most keys one AcquireSet may lock at once: a set is
// acquired in one statement that takes a transaction lock per key, and
// PostgreSQL's shared lock table (max_locks_per_transaction, 64 by default,
// times max_connections) bounds how many one transaction may take.
const MaxSetKeys = 64

// ErrInvalidPermits: a semaphore's permits are not between 1 and MaxPermits.
var ErrInvalidPermits = errors.New("lease: invalid permits")

// ErrInvalidSet: a key set is empty, too large, or names a key twice.
var ErrInvalidSet = errors.New("lease: invalid key set")

// ErrKindConflict: the key is in use as another kind than asked for: as a
// semaphore with another number of permits, or as a semaphore by one
// acquirer and as a lock by another.
var ErrKindConflict = errors.New("lease: key used as another kind")

// SQLStateKindConflict is the SQLSTATE the SQL acquire functions raise when a
// key is asked for as another kind than it is held or awaited as.
const SQLStateKindConflict = "55L05"

// KindConflictError reports that a key is held (or awaited) as another kind
// than asked for. It matches ErrKindConflict.
type KindConflictError struct {
	Key Key
	// Asked is the kind asked for, and AskedPermits its permits (0 unless a
	// semaphore).
	Asked        Kind
	AskedPermits int
	// Detail is what the database found, in its words.
	Detail string
}

func (e *KindConflictError) Error() string {
	asked := e.Asked.String()
	if e.Asked == Permit {
		asked = fmt.Sprintf("a semaphore of %d permits", e.AskedPermits)
	}
	return fmt.Sprintf("lease: %s asked for as %s: %s", e.Key, asked, e.Detail)
}

// Is makes errors.Is(err, ErrKindConflict) true.
func (e *KindConflictError) Is(target error) bool { return target == ErrKindConflict }

// PermitsError reports an invalid number of permits. It matches
// ErrInvalidPermits.
type PermitsError struct {
	Key     Key
	Permits int
}

func (e *PermitsError) Error() string {
	return fmt.Sprintf("lease: semaphore %s: %d permits; a semaphore has 1 to %d", e.Key, e.Permits, MaxPermits)
}

// Is makes errors.Is(err, ErrInvalidPermits) true.
func (e *PermitsError) Is(target error) bool { return target == ErrInvalidPermits }

// SetError reports an invalid key set. It matches ErrInvalidSet (and, for an
// invalid key in the set, also the *KeyError's ErrInvalidKey).
type SetError struct {
	Reason string
	Err    error // the *KeyError of an invalid member, if that is the reason
}

func (e *SetError) Error() string {
	if e.Err != nil {
		return "lease: invalid key set: " + e.Reason + ": " + e.Err.Error()
	}
	return "lease: invalid key set: " + e.Reason
}

// Is makes errors.Is(err, ErrInvalidSet) true.
func (e *SetError) Is(target error) bool { return target == ErrInvalidSet }

// Unwrap returns Err.
func (e *SetError) Unwrap() error { return e.Err }

// request is what one acquire asks for.
type request struct {
	kind    Kind
	permits int // a semaphore's N; 1 otherwise
}

var (
	exclusiveReq = request{kind: Exclusive, permits: 1}
	sharedReq    = request{kind: Shared, permits: 1}
)

// compatible reports whether a lock of kind held and a new request of kind
// want may be held by one client at once (the client's own grants of a key
// are its database grants too: two shared or two permits may coexist).
func compatible(held, want Kind) bool {
	return held == want && held != Exclusive
}

// AcquireShared blocks until it holds key shared, or ctx is done: any number
// of shared holders may hold a key at once, but none while it is held
// exclusively. The lock has its own token: Fence checks in a reader's
// transaction that its grant is still live (a read that must not run after a
// writer began), as it guards a writer's write. Waiting is in arrival order
// (see Kind): a reader that arrives while a writer waits queues behind it.
func (c *Client) AcquireShared(ctx context.Context, key Key) (*Lock, error) {
	return c.acquireReq(ctx, c.table, key, sharedReq, true)
}

// TryAcquireShared takes key shared at once if it can, and otherwise returns
// an error matching ErrLocked: the key is held exclusively, or a writer
// waits for it (a reader does not overtake a waiting writer).
func (c *Client) TryAcquireShared(ctx context.Context, key Key) (*Lock, error) {
	return c.acquireReq(ctx, c.table, key, sharedReq, false)
}

// DoShared is Do with a shared lock.
func (c *Client) DoShared(ctx context.Context, key Key, fn func(ctx context.Context, l *Lock) error) error {
	return runHeld(ctx, key.String(), func(ctx context.Context) (*Lock, error) { return c.AcquireShared(ctx, key) }, fn)
}

// Semaphore is a key with a number of permits: at most Permits holders at
// any moment, across every client of the schema. Each holder's Lock is one
// permit, with its own token and lease; a dead holder's permit is taken over
// as a lock is. Every user of the key must agree on the number: an acquirer
// that asks for another number while the key is held or awaited with one
// gets a *KindConflictError, never a silently different limit. Get one with
// Client.Semaphore.
type Semaphore struct {
	c       *Client
	key     Key
	permits int
}

// Semaphore returns the semaphore of key with permits permits (1 to
// MaxPermits). It does no I/O.
func (c *Client) Semaphore(key Key, permits int) (*Semaphore, error) {
	if err := key.Validate(); err != nil {
		return nil, err
	}
	if permits < 1 || permits > MaxPermits {
		return nil, &PermitsError{Key: key, Permits: permits}
	}
	return &Semaphore{c: c, key: key, permits: permits}, nil
}

// Key is the semaphore's key.
func (s *Semaphore) Key() Key { return s.key }

// Permits is the semaphore's number of permits.
func (s *Semaphore) Permits() int { return s.permits }

func (s *Semaphore) req() request { return request{kind: Permit, permits: s.permits} }

// Acquire blocks until it holds one permit, or ctx is done. Permits are
// handed out in arrival order across all clients. The Lock's Slot says which
// permit (1 to Permits) it holds.
func (s *Semaphore) Acquire(ctx context.Context) (*Lock, error) {
	return s.c.acquireReq(ctx, s.c.table, s.key, s.req(), true)
}

// TryAcquire takes a permit at once if one is free and nobody waits for one,
// and otherwise returns an error matching ErrLocked.
func (s *Semaphore) TryAcquire(ctx context.Context) (*Lock, error) {
	return s.c.acquireReq(ctx, s.c.table, s.key, s.req(), false)
}

// Do is Client.Do with one permit.
func (s *Semaphore) Do(ctx context.Context, fn func(ctx context.Context, l *Lock) error) error {
	return runHeld(ctx, s.key.String(), s.Acquire, fn)
}

// AcquireShared takes key shared on the advisory path:
// pg_advisory_lock_shared on a pinned connection. Shared holders on either
// path share the key; nothing coexists with an exclusive holder on either.
func (a *Advisory) AcquireShared(ctx context.Context, key Key) (*Lock, error) {
	return a.c.acquireReq(ctx, a, key, sharedReq, true)
}

// TryAcquireShared is AcquireShared without waiting.
func (a *Advisory) TryAcquireShared(ctx context.Context, key Key) (*Lock, error) {
	return a.c.acquireReq(ctx, a, key, sharedReq, false)
}

// DoShared is Do with a shared advisory lock.
func (a *Advisory) DoShared(ctx context.Context, key Key, fn func(ctx context.Context, l *Lock) error) error {
	return runHeld(ctx, key.String(), func(ctx context.Context) (*Lock, error) { return a.AcquireShared(ctx, key) }, fn)
}
