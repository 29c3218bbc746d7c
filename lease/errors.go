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
	// this cause when its lease could not be renewed in time, its holder
	// expired, or its row was deleted from under it. Fence returns it too.
	ErrLost = errors.New("lease: lock lost")
	// ErrReleased: the cause of a Lock's Context after Release.
	ErrReleased = errors.New("lease: lock released")
	// ErrClosed: the Client was closed.
	ErrClosed = errors.New("lease: client closed")
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

// SQLStateHolderExpired is the SQLSTATE the SQL function acquire raises when the
// calling holder has expired. The client handles it by registering anew.
const SQLStateHolderExpired = "55L02"

// LockedError reports that a key is held by someone else. It matches ErrLocked
// with errors.Is; read it with errors.As.
type LockedError struct {
	Key Key
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
}

func (e *LockedError) Error() string {
	if e.HolderID == 0 {
		return fmt.Sprintf("lease: %s is locked", e.Key)
	}
	return fmt.Sprintf("lease: %s is locked by holder %d (%s pid %d, %s) for up to %s more",
		e.Key, e.HolderID, e.Host, e.PID, e.Application, e.ExpiresIn.Round(time.Millisecond))
}

// Is makes errors.Is(err, ErrLocked) true.
func (e *LockedError) Is(target error) bool { return target == ErrLocked }

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
