package lease

import (
	"errors"
	"fmt"
	"time"

	"github.com/pglease/pglease/internal/ident"
)

// Sentinel errors. Check them with errors.Is.
var (
	// ErrLocked: the key is held by someone else (TryAcquire). The error is a
	// *LockedError, which says who holds it when that is known.
	ErrLocked = errors.New("lease: locked")
	// ErrLost: the lock is no longer held. A Lock's Context is cancelled with
	// a *LostError, which matches ErrLost and says why: its lease could not be
	// renewed in time, its holder expired, its row was deleted from under it,
	// or (advisory mode) its connection dropped. Fence returns it too.
	ErrLost = errors.New("lease: lock lost")
	// ErrReleased: the cause of a Lock's Context after Release.
	ErrReleased = errors.New("lease: lock released")
	// ErrClosed: the Client was closed. It is also the cause of the Context of
	// every Lock that Close released.
	ErrClosed = errors.New("lease: client closed")
	// ErrAlreadyHeld: the key is held by this very Client. A Client holds a
	// key at most once: Acquire and TryAcquire of a key it holds return a
	// *LockedError matching both ErrAlreadyHeld and ErrLocked at once, in
	// either mode, instead of waiting for a release that only the caller's
	// own process could make (see Client.Acquire).
	ErrAlreadyHeld = errors.New("lease: key already held by this client")
	// ErrInvalidKey is wrapped by every *KeyError.
	ErrInvalidKey = errors.New("lease: invalid key")
	// ErrInvalidConfig is wrapped by every configuration error.
	ErrInvalidConfig = errors.New("lease: invalid config")
	// ErrInvalidSchema is wrapped by every schema name error (it also wraps
	// ErrInvalidConfig when it comes from New).
	ErrInvalidSchema = ident.ErrInvalidSchema
)

// SQLStateNotHeld is the SQLSTATE that the SQL function fence raises when the
// token is not the live holder's. Class 55 (object not in prerequisite state).
const SQLStateNotHeld = "55L01"

// SQLStateNotThisHolder is the SQLSTATE that the SQL functions acting for a
// holder (acquire, release, renew, close_holder, ...) raise when the secret
// given is not that holder's: a caller tried to act for another holder.
// Class 42 (access rule violation).
const SQLStateNotThisHolder = "42L01"

// SQLStateHolderExpired is the SQLSTATE the SQL function acquire raises when the
// calling holder has expired. The client handles it by registering anew.
const SQLStateHolderExpired = "55L02"

// LockedError reports that a key is held by someone else. It matches ErrLocked
// with errors.Is; read it with errors.As.
type LockedError struct {
	Key Key
	// ByThisClient is true when the holder is the Client that asked (the
	// error then also matches ErrAlreadyHeld).
	ByThisClient bool
	// HolderID is the holder's row id, 0 when not known (the key is being
	// acquired by someone else right now, or held on the advisory path).
	HolderID    int64
	Host        string
	PID         int32
	Application string
	AcquiredAt  time.Time
	// ExpiresIn is the holder's lease time left on the database clock at the
	// moment of the check; 0 when not known.
	ExpiresIn time.Duration

	busy bool // being changed right now (an acquire in flight, a locked row)
}

func (e *LockedError) Error() string {
	if e.ByThisClient {
		return fmt.Sprintf("lease: %s is already held by this client (holder %d, since %s); a Client holds a key at most once",
			e.Key, e.HolderID, e.AcquiredAt.Format(time.RFC3339Nano))
	}
	if e.HolderID == 0 {
		return fmt.Sprintf("lease: %s is locked", e.Key)
	}
	return fmt.Sprintf("lease: %s is locked by holder %d (%s pid %d, %s) for up to %s more",
		e.Key, e.HolderID, e.Host, e.PID, e.Application, e.ExpiresIn.Round(time.Millisecond))
}

// Is makes errors.Is(err, ErrLocked) true, and errors.Is(err, ErrAlreadyHeld)
// when the holder is the asking Client itself.
func (e *LockedError) Is(target error) bool {
	return target == ErrLocked || (e.ByThisClient && target == ErrAlreadyHeld)
}

// LossReason says why a lock was lost.
type LossReason int

// Why a lock was lost: the Reason of a *LostError.
const (
	// LossRenewalTimeout: the client could not renew its lease within
	// TTL - SafetyMargin of the start of its last successful renewal (the
	// database unreachable, the process paused), so it gave every lock up
	// before the database could consider them expired.
	LossRenewalTimeout LossReason = iota + 1
	// LossHolderExpired: the database found the client's holder expired (or
	// gone): its lease had run out, and its locks may belong to others.
	LossHolderExpired
	// LossRowDeleted: the lock's row was deleted from under it, by a DBA, the
	// reaper or a takeover, while its holder was alive as far as the client
	// knew.
	LossRowDeleted
	// LossConnectionLost: an advisory lock's pinned connection dropped (a
	// terminated backend, a server restart, a network cut), and the lock with
	// its session.
	LossConnectionLost
)

func (r LossReason) String() string {
	switch r {
	case LossRenewalTimeout:
		return "lease not renewed in time"
	case LossHolderExpired:
		return "holder expired in the database"
	case LossRowDeleted:
		return "row deleted"
	case LossConnectionLost:
		return "connection lost"
	}
	return fmt.Sprintf("LossReason(%d)", int(r))
}

// LostError is the cause of a lost Lock's Context, what Err returns, and what
// Release returns (wrapped) for it. It matches ErrLost; read it with
// errors.As.
type LostError struct {
	Key    Key
	Token  int64
	Reason LossReason
	// Err is the error behind the loss, when there was one (the failed
	// connection check of an advisory lock, say).
	Err error
}

func (e *LostError) Error() string {
	s := fmt.Sprintf("lease: %s token %d lost: %s", e.Key, e.Token, e.Reason)
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Is makes errors.Is(err, ErrLost) true.
func (e *LostError) Is(target error) bool { return target == ErrLost }

// Unwrap returns Err.
func (e *LostError) Unwrap() error { return e.Err }

// KeyError reports an invalid Key. It matches ErrInvalidKey.
type KeyError struct {
	Key    Key
	Field  string // "Name" or "ID"
	Reason string
}

func (e *KeyError) Error() string {
	return fmt.Sprintf("lease: invalid key: %s %s", e.Field, e.Reason)
}

// Is makes errors.Is(err, ErrInvalidKey) true.
func (e *KeyError) Is(target error) bool { return target == ErrInvalidKey }

// ConfigError reports an invalid Config field and how to fix it. It matches
// ErrInvalidConfig.
type ConfigError struct {
	Field string
	Err   string
}

func (e *ConfigError) Error() string { return "lease: invalid config: " + e.Field + ": " + e.Err }

// Is makes errors.Is(err, ErrInvalidConfig) true.
func (e *ConfigError) Is(target error) bool { return target == ErrInvalidConfig }
