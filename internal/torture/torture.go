// Package torture holds what the torture suite (this package's tests) and its
// helper binary (./holder) share: the clock every process reads, and the
// events a holder process reports on its standard output.
//
// The suite runs real OS processes that contend for locks on a throwaway
// PostgreSQL cluster while it injects faults (SIGKILL, SIGSTOP, terminated
// backends, server restarts and pauses, network faults through a proxy,
// reapers; kills, terminations and restarts again with table and advisory
// locks mixed; failovers of a replicated cluster, by the harness and by
// Patroni, in failover_test.go), and checks every run against two oracles:
//
//   - A, the fenced counter: every critical section reads a counter, waits,
//     and writes counter+1 in a transaction that calls fence, logging the
//     write in the same transaction. At the end the counter of each key equals
//     the number of logged writes, every section that reported success is
//     logged, none that was rejected is, and the fencing tokens of the writes
//     never decrease in the order they were made.
//   - B, intervals: each holder reports when it believed it held a lock, on a
//     clock all processes share (CLOCK_MONOTONIC). No two intervals of one key
//     overlap, except where one belongs to a process that was paused by the
//     suite (it cannot know); there oracle A must still hold, and the paused
//     process's late fenced write must have been rejected. An advisory lock
//     lives in its connection: its holder may believe in it until its next
//     connection check after the suite dropped that connection, and no
//     longer.
//
// Lock kinds (holder flag -kind) widen both oracles. Shared locks: readers
// read the counter in a transaction fenced with their shared lock and log
// what they read; a fenced read must see exactly the writes of the key whose
// tokens are smaller than the reader's (A), and only readers' intervals may
// overlap each other (B). Semaphores: each permit's slot has a counter of its
// own, fenced like a lock's (A), and at most N permit intervals of a key
// overlap at any instant (B). Key sets: every member is judged per key like a
// single lock, writes and reads alike.
//
// Run the short mode with plain go test; the long mode with
//
//	go test ./internal/torture/ -run Torture -torture.long -timeout 60m -v
//
// or PGLEASE_TORTURE=long in the environment.
package torture

import (
	"encoding/json"
	"io"
	"sync"

	"golang.org/x/sys/unix"
)

// Now reads CLOCK_MONOTONIC in nanoseconds. Unlike Go's monotonic clock
// readings, which only compare within one process, this clock is the same for
// every process on the machine, so intervals reported by different holder
// processes and fault times recorded by the suite can be compared.
func Now() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		panic(err) // CLOCK_MONOTONIC exists on every Linux
	}
	return ts.Nano()
}

// Event kinds, in the order a holder usually reports them.
const (
	// EvHello: the process started; PID is set.
	EvHello = "hello"
	// EvAcquiring: the process calls Acquire (T: just before).
	EvAcquiring = "acquiring"
	// EvAcquired: Acquire returned a lock. T is read after it returned.
	EvAcquired = "acquired"
	// EvAcquireError: Acquire failed (Err). Not a violation by itself.
	EvAcquireError = "acquire_error"
	// EvRead: a section read the counter (N) and is about to wait before its
	// fenced write. The suite pauses victims on this event. A reader's
	// section starts with it too (N 0: the read that counts is the fenced
	// one, logged in the reads table).
	EvRead = "read"
	// EvSection: a section ended with Outcome.
	EvSection = "section"
	// EvLost: the lock's Done closed without a Release. T is when the holder
	// saw it; Reason is why, as the client's *lease.LostError says.
	EvLost = "lost"
	// EvEnd: the holder stopped believing it holds the lock: just before it
	// calls Release, or when it saw Done close, whichever came first (T).
	EvEnd = "end"
	// EvReleased: Release returned; Release says what.
	EvReleased = "released"
	// EvBye: the process is about to exit after a graceful stop. Leak
	// describes goroutines or connections it failed to clean up.
	EvBye = "bye"
)

// Section outcomes.
const (
	// OutcomeOK: the write committed.
	OutcomeOK = "ok"
	// OutcomeFenced: the SQL function fence refused the token (SQLSTATE
	// 55L01): the database rejected a stale write.
	OutcomeFenced = "fenced"
	// OutcomeLost: Lock.Fence refused locally, the lock being known lost.
	OutcomeLost = "lost"
	// OutcomeFailed: an error before COMMIT was sent: nothing was written.
	OutcomeFailed = "failed"
	// OutcomeUnknown: COMMIT was sent and failed: the log table tells.
	OutcomeUnknown = "unknown"
)

// Kinds of a grant, in EvAcquired and EvAcquiring (the codes of the locks
// table).
const (
	KindExclusive = "x"
	KindShared    = "s"
	KindPermit    = "p"
)

// Release results in EvEnd.
const (
	ReleaseOK    = "ok"    // the row was deleted
	ReleaseLost  = "lost"  // ErrLost: lost before, nothing of anyone else's deleted
	ReleaseError = "error" // any other error
)

// Event is one line of a holder's output, JSON-encoded.
type Event struct {
	Ev   string `json:"ev"`
	Proc string `json:"proc,omitempty"`
	PID  int    `json:"pid,omitempty"`
	Key  string `json:"key,omitempty"`
	// Keys: the keys of a set (EvAcquiring of a key set); Key is then empty.
	Keys    []string `json:"keys,omitempty"`
	Kind    string   `json:"kind,omitempty"`    // Kind*: of the grant (EvAcquired), or of a single-key request (EvAcquiring)
	Slot    int      `json:"slot,omitempty"`    // a permit's slot, 1 to Permits
	Permits int      `json:"permits,omitempty"` // a semaphore's N, as the holder believes it
	Set     string   `json:"set,omitempty"`     // the key set a grant belongs to (EvAcquired)
	Token   int64    `json:"tok,omitempty"`
	T       int64    `json:"t,omitempty"`
	At      int64    `json:"at,omitempty"` // Lock.AcquiredAt, Unix microseconds (database clock)
	Section string   `json:"sec,omitempty"`
	N       int64    `json:"n,omitempty"`
	Outcome string   `json:"out,omitempty"`
	Raw     bool     `json:"raw,omitempty"` // the section fenced with the SQL function, not Lock.Fence
	Read    bool     `json:"ro,omitempty"`  // the section is a fenced read (reads table), not a write
	Adv     bool     `json:"adv,omitempty"` // on the advisory path
	Release string   `json:"rel,omitempty"`
	Err     string   `json:"err,omitempty"`
	Leak    string   `json:"leak,omitempty"`
	Reason  string   `json:"why,omitempty"` // EvLost, and EvReleased of a lock lost before: the LossReason the client reported
}

// Writer writes events as JSON lines, one write per line, so that a line is
// either in the pipe whole or not at all when the process is killed.
type Writer struct {
	mu sync.Mutex
	w  io.Writer
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Emit writes e. A failed write (the suite went away) is ignored: the process
// is stopped soon anyway.
func (w *Writer) Emit(e Event) {
	b, err := json.Marshal(e)
	if err != nil {
		panic(err)
	}
	b = append(b, '\n')
	w.mu.Lock()
	defer w.mu.Unlock()
	_, _ = w.w.Write(b)
}
