package lease

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Defaults and limits of AdvisoryConfig.
const (
	// AdvisoryMaxConnsDefault is how many connections an Advisory pins at most.
	AdvisoryMaxConnsDefault = 4
	// AdvisoryCheckIntervalDefault bounds how long a dropped pinned connection
	// goes unnoticed.
	AdvisoryCheckIntervalDefault = time.Second
	// AdvisoryMinCheckInterval is the shortest CheckInterval accepted.
	AdvisoryMinCheckInterval = 10 * time.Millisecond
)

// ErrAdvisoryUnsupported: the connection does not keep its server session from
// one statement to the next, so a session-level advisory lock taken through it
// could end up held by a session that some other client is given. That is what
// a transaction-pooling proxy (PgBouncer with pool_mode = transaction or
// statement) does. Use the table mode (Client.Acquire) through such a proxy, or
// give the advisory mode a direct connection or a session-pooling one.
var ErrAdvisoryUnsupported = errors.New("lease: advisory mode refused: the connection does not keep its server session " +
	"(a transaction-pooling proxy such as PgBouncer in pool_mode=transaction?); " +
	"use the table mode (Client.Acquire) through it, or connect the advisory mode directly or through session pooling")

// ErrNotFenceable: Lock.Fence of an advisory lock was given a transaction on
// another connection. An advisory lock fences only work done on its own
// connection: use Lock.BeginTxFunc.
var ErrNotFenceable = errors.New("lease: an advisory lock fences only transactions on its own connection (use Lock.BeginTxFunc)")

// AdvisoryConfig configures the advisory path (Config.Advisory). The zero
// value works.
type AdvisoryConfig struct {
	// MaxConns is the most connections the Advisory keeps open and pinned,
	// besides the Client's pool (they are opened with the pool's connection
	// settings). Held advisory locks share them: a thousand locks can live on
	// one connection. A blocking Acquire waits in the server on a pinned
	// connection that holds no lock; when none is free and MaxConns are open it
	// waits for a release notification instead. Defaults to
	// AdvisoryMaxConnsDefault (4).
	MaxConns int

	// CheckInterval bounds how long a dropped pinned connection (a killed
	// backend, a server restart, a network cut) goes unnoticed: every pinned
	// connection that holds locks is checked three times per interval, each
	// check allowed a third of it, and when one fails every lock on that
	// connection is reported lost (Lock.Done closes, cause ErrLost). A
	// connection busy with a transaction run through Lock.BeginTxFunc is
	// checked by that transaction's own statements instead. At least
	// AdvisoryMinCheckInterval. Defaults to AdvisoryCheckIntervalDefault (1s).
	CheckInterval time.Duration
}

func (cfg *AdvisoryConfig) resolve() (AdvisoryConfig, error) {
	var c AdvisoryConfig
	if cfg != nil {
		c = *cfg
	}
	if c.MaxConns == 0 {
		c.MaxConns = AdvisoryMaxConnsDefault
	}
	if c.MaxConns < 1 {
		return c, &ConfigError{"AdvisoryConfig.MaxConns", fmt.Sprintf("%d is negative; leave it 0 for %d", c.MaxConns, AdvisoryMaxConnsDefault)}
	}
	if c.CheckInterval == 0 {
		c.CheckInterval = AdvisoryCheckIntervalDefault
	}
	if c.CheckInterval < AdvisoryMinCheckInterval {
		return c, &ConfigError{"AdvisoryConfig.CheckInterval", fmt.Sprintf("%s is below the minimum %s; leave it 0 for %s", c.CheckInterval, AdvisoryMinCheckInterval, AdvisoryCheckIntervalDefault)}
	}
	return c, nil
}

// AdvisoryKey is the 64-bit PostgreSQL advisory lock key of key in schema: the
// first 8 bytes of SHA-256(schema || 0x00 || name || 0x00 || id), all UTF-8,
// read as a big-endian signed integer. The SQL function key_hash(name, id)
// computes the same value, so a DBA finds an advisory holder with
//
//	SELECT * FROM lease.advisory_held WHERE key = lease.key_hash('invoice', '42');
//
// Two keys whose values collide exclude each other on the advisory path (and
// a table-mode acquire of one is refused while the other is held on the
// advisory path), as if they were one key; neither is ever granted wrongly.
func AdvisoryKey(schema string, key Key) int64 {
	h := sha256.New()
	h.Write([]byte(schema))
	h.Write([]byte{0})
	h.Write([]byte(key.Name))
	h.Write([]byte{0})
	h.Write([]byte(key.ID))
	var sum [sha256.Size]byte
	return int64(binary.BigEndian.Uint64(h.Sum(sum[:0])[:8]))
}

// Advisory acquires locks on the advisory fast path: a session-level
// PostgreSQL advisory lock on AdvisoryKey(schema, key), held by a connection
// pinned for the lock's lifetime. It writes nothing to a table, so an acquire
// and a release cost about what a bare pg_advisory_lock and pg_advisory_unlock
// do; in exchange the lock lives and dies with its connection, not with a
// lease. Choose it for short critical sections where that trade is right.
//
// The locks are ordinary Locks: Token (from the same sequence as the table
// mode's, so tokens of a key grow across both modes), Done, Context, Err and
// Release behave the same. A key is never held in both modes at once. A lock
// is lost (Done closes, cause a *LostError with LossConnectionLost) when its
// connection drops; that is noticed within AdvisoryConfig.CheckInterval. Work
// done through Lock.BeginTxFunc runs on the lock's own connection and is
// fenced by construction: if the connection is gone, so is the transaction.
//
// There is one Advisory per Client (Client.Advisory): the Client's Close
// closes it, and the Client's local FIFO queue per key covers both modes.
// Behind a transaction-pooling proxy it refuses with ErrAdvisoryUnsupported.
type Advisory struct {
	c    *Client
	pins *pinSet
	hash func(Key) int64 // AdvisoryKey, or a test's collision
}

// advisoryLock is an advisory Lock's heldMode.
type advisoryLock struct {
	a      *Advisory
	s      *pinnedConn
	k      int64 // the advisory key value
	shared bool  // pg_advisory_lock_shared
}

type advQueries struct {
	acquire      string
	release      string
	unlockIfHeld string
	// The shared lock's (schema version 6).
	acquireShared      string
	releaseShared      string
	unlockSharedIfHeld string
	probe              string
	ping               string
	held               string
}

func newAdvQueries(schema string) advQueries {
	s := pgx.Identifier{schema}.Sanitize()
	return advQueries{
		acquire:      `SELECT ` + s + `.advisory_acquire($1, $2, $3, $4)`,
		release:      `SELECT ` + s + `.advisory_release($1, $2, $3, $4)`,
		unlockIfHeld: `SELECT ` + s + `.advisory_unlock_if_held($1)`,

		acquireShared:      `SELECT ` + s + `.advisory_acquire_shared($1, $2, $3, $4)`,
		releaseShared:      `SELECT ` + s + `.advisory_release_shared($1, $2, $3, $4)`,
		unlockSharedIfHeld: `SELECT ` + s + `.advisory_unlock_shared_if_held($1)`,
		probe:              `SELECT pg_backend_pid(), current_setting('server_version_num')::int, ` + s + `.key_hash($1, $2)`,
		ping:               `SELECT pg_backend_pid()`,
		held: `SELECT holder_id, host, pid, application, acquired_at,
			(extract(epoch FROM time_left) * 1000000)::bigint
			FROM ` + s + `.held WHERE name = $1 AND entity_id = $2 AND alive`,
	}
}

func newAdvisory(c *Client) *Advisory {
	a := &Advisory{c: c, pins: &pinSet{c: c, cfg: c.cfg.Advisory, q: newAdvQueries(c.cfg.Schema)}}
	a.hash = func(k Key) int64 { return AdvisoryKey(c.cfg.Schema, k) }
	return a
}

// Key returns the advisory lock key of key: AdvisoryKey with the client's
// schema.
func (a *Advisory) Key(key Key) int64 { return a.hash(key) }

// Acquire blocks until it holds key on the advisory path or ctx is done. It
// waits in the server's lock queue (fair, no polling) on a pinned connection
// of its own that holds no other lock, so the locks on other connections can
// be released meanwhile; when ctx is done the wait is cancelled in the server
// and no waiting backend is left behind. A key held on the table path is
// waited for through the release notification, as Client.Acquire does. A key
// this Client holds (in either mode) is refused at once, as Client.Acquire
// refuses it.
func (a *Advisory) Acquire(ctx context.Context, key Key) (*Lock, error) {
	return a.c.acquire(ctx, a, key, true)
}

// TryAcquire makes one attempt and returns at once: the lock, or an error that
// matches ErrLocked (a *LockedError; HolderID is 0 when the key is held on the
// advisory path).
func (a *Advisory) TryAcquire(ctx context.Context, key Key) (*Lock, error) {
	return a.c.acquire(ctx, a, key, false)
}

// Do acquires key on the advisory path, runs fn with the lock and a context
// cancelled if the lock is lost, and releases it, like Client.Do.
func (a *Advisory) Do(ctx context.Context, key Key, fn func(ctx context.Context, l *Lock) error) error {
	return runHeld(ctx, key.String(), func(ctx context.Context) (*Lock, error) { return a.Acquire(ctx, key) }, fn)
}

// What advisory_acquire returns when it did not acquire.
const (
	advBusy      = 0  // the advisory key is held by another session, or the row is being changed
	advTableHeld = -1 // a live holder has the key on the table path
)

func (a *Advisory) usableLocked() error {
	a.pins.mu.Lock()
	defer a.pins.mu.Unlock()
	return a.pins.usableLocked()
}

func (a *Advisory) subscribeFirst() bool { return false }
func (a *Advisory) askOnSubscribe() bool { return true }

// wideWake: an advisory waiter of a key held on the table path hears the
// release on the schema's channel.
func (a *Advisory) wideWake() bool { return true }

func (a *Advisory) busyRetry() time.Duration { return 2 * time.Millisecond }

// explain says who holds key, as far as one cheap look tells.
func (a *Advisory) explain(ctx context.Context, e *LockedError) error {
	if e.busy {
		return e
	}
	key := e.Key
	var expiresInMicroseconds int64
	err := a.c.pool.QueryRow(ctx, a.pins.q.held, key.Name, key.ID).Scan(
		&e.HolderID, &e.Host, &e.PID, &e.Application, &e.AcquiredAt, &expiresInMicroseconds)
	if err != nil {
		return &LockedError{Key: key} // released meanwhile, or the look failed: still locked as far as we know
	}
	e.ExpiresIn = time.Duration(expiresInMicroseconds) * time.Microsecond
	return e
}

// attempt asks the database once, on a pinned connection. Blocking attempts
// wait in the server on a connection that holds no lock; when there is none
// to be had, they make a non-blocking attempt instead.
func (a *Advisory) attempt(ctx context.Context, key Key, ks *keyState, req request, wait bool) (*Lock, *LockedError, error) {
	shared := req.kind == Shared
	c, p := a.c, a.pins
	k := a.hash(key)
	s, blocking, err := p.claim(ctx, k, wait)
	if err != nil {
		return nil, nil, err
	}
	if s == nil {
		return nil, &LockedError{Key: key, busy: true}, nil
	}

	tok, err := p.run(ctx, s, key, k, blocking, shared)

	c.mu.Lock()
	p.mu.Lock()
	ok := err == nil && tok > 0 && !s.dead && !p.closed && !c.closed
	p.unclaimLocked(s, k, blocking, ok)
	var l *Lock
	if ok {
		l = newLock(c, &advisoryLock{a: a, s: s, k: k, shared: shared}, key, req, tok, 0, time.Now())
		s.locks[l] = struct{}{}
		c.holdLocked(ks, l)
	}
	dead, closed := s.dead, p.closed || c.closed
	p.mu.Unlock()
	c.mu.Unlock()
	switch {
	case ok:
		return l, nil, nil
	case err != nil:
		if ctx.Err() != nil {
			return nil, nil, context.Cause(ctx)
		}
		if errors.Is(err, errConnLost) {
			return nil, nil, errRetry // whatever it took went with the connection
		}
		return nil, nil, fmt.Errorf("lease: advisory acquire %s: %w", key, err)
	case tok == advTableHeld && a.dropOwnRow(ctx, key):
		return nil, nil, errRetry
	case tok <= 0:
		return nil, &LockedError{Key: key, busy: tok == advBusy}, nil
	case closed:
		return nil, nil, ErrClosed // the connection is being closed: the lock goes with it
	case dead:
		return nil, nil, errRetry // lost just now, with the connection
	}
	return nil, nil, errRetry
}

// dropOwnRow deletes the table row of key that belongs to this client's own
// holder, if that is what holds the key, and reports whether it did. Such a
// row is an orphan (an acquire cancelled in flight that committed late, a
// release a crash undid): the client holds no lock on key, or it would not be
// asking, and as the head of the key's queue the caller runs alone among this
// client's acquirers of it. The heartbeat would find the row too, but its
// clean-up queues behind this very acquirer, which would wait for the row for
// as long as the client lives.
func (a *Advisory) dropOwnRow(ctx context.Context, key Key) bool {
	c := a.c
	c.mu.Lock()
	h := c.h
	live := h != nil && !h.lost
	keep := []int64{} // an array, not NULL
	if ks := c.keys[key.mapKey()]; live && ks != nil {
		keep = ks.tableTokensLocked(h, key)
	}
	c.mu.Unlock()
	if !live {
		return false
	}
	dctx, cancel := context.WithTimeout(ctx, c.cfg.ReleaseTimeout)
	defer cancel()
	var dropped int
	err := c.pool.QueryRow(dctx, c.q.leave, key.Name, key.ID, h.id, h.secret, keep).Scan(&dropped)
	if err != nil || dropped == 0 {
		return false
	}
	c.log.Info("pglease: deleted a lock row of this client's holder that it does not hold", "name", key.Name, "id", key.ID, "holder_id", h.id)
	return true
}

// close gives the advisory path up. Called by Client.Close.
func (a *Advisory) close() { a.pins.close() }

func (h *advisoryLock) holderID() int64 { return 0 }

func (h *advisoryLock) goneReason() LossReason { return LossConnectionLost }

// release lets go of an advisory lock on its own connection. deleted is true
// when the session let go of it, or the connection was closed (which frees
// it).
func (h *advisoryLock) release(ctx context.Context, l *Lock) (bool, error) {
	p, s, c := h.a.pins, h.s, h.a.c
	p.use(s, 1)
	defer p.use(s, -1)
	if err := s.lockConn(ctx); err != nil {
		if errors.Is(err, errConnLost) {
			return true, nil // the connection was closed meanwhile, and the lock with it
		}
		// The connection is busy with a transaction through another lock on it
		// for longer than ReleaseTimeout: release when it is done.
		p.wg.Add(1)
		p.use(s, 1)
		go func() {
			defer p.wg.Done()
			defer p.use(s, -1)
			if s.lockConn(context.Background()) == nil {
				ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
				defer cancel()
				_, _ = h.unlock(ctx, l)
			}
		}()
		return false, fmt.Errorf("its connection is busy with a transaction; released when that ends: %w", err)
	}
	return h.unlock(ctx, l)
}

// unlock sends advisory_release, bounded by ctx; the caller holds the
// connection.
func (h *advisoryLock) unlock(ctx context.Context, l *Lock) (bool, error) {
	p, s, c := h.a.pins, h.s, h.a.c
	var released bool
	q := p.q.release
	if h.shared {
		q = p.q.releaseShared
	}
	err := s.conn.QueryRow(ctx, q, l.key.Name, l.key.ID, h.k, l.token).Scan(&released)
	s.unlockConn()
	if err != nil {
		// Closing the connection is the one sure way to free the lock now.
		// But if the session was gone already (the server died, a failover),
		// the lock went with it before this release: lost, not released.
		gone := connectionFailure(err) // replication.go
		p.lose(s, "release failed", err)
		return !gone, nil
	}
	c.mu.Lock()
	p.mu.Lock()
	p.forgetLocked(l)
	p.mu.Unlock()
	c.dropLocked(l)
	c.mu.Unlock()
	return released, nil
}

// fence: an advisory lock fences only a transaction on its own connection,
// where it does so by construction.
func (h *advisoryLock) fence(_ context.Context, l *Lock, tx pgx.Tx) error {
	if tx.Conn() != h.s.conn {
		return fmt.Errorf("lease: fence %s: %w", l.key, ErrNotFenceable)
	}
	return nil
}

func (h *advisoryLock) beginTxFunc(ctx context.Context, l *Lock, opts pgx.TxOptions, fn func(pgx.Tx) error) error {
	p, s := h.a.pins, h.s
	p.use(s, 1) // so that tries look elsewhere rather than queue behind fn
	defer p.use(s, -1)
	if err := s.lockConn(ctx); err != nil {
		if errors.Is(err, errConnLost) {
			return fmt.Errorf("lease: %s: %w", l.key, l.endedError(l.Err()))
		}
		return err
	}
	defer s.unlockConn()
	if err := l.Err(); err != nil { // released or lost while we waited
		return fmt.Errorf("lease: %s: %w", l.key, l.endedError(err))
	}
	lost := func(err error) error {
		if s.conn.IsClosed() {
			p.lose(s, "connection lost during a transaction", err)
			return fmt.Errorf("lease: %s: %w: %w", l.key, ErrLost, err)
		}
		return err
	}
	s.soft.Store(true)
	tx, err := s.conn.BeginTx(ctx, opts)
	if err != nil {
		s.soft.Store(false)
		return lost(err)
	}
	ferr := fn(tx)
	s.soft.Store(false)
	ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), h.a.c.cfg.ReleaseTimeout)
	defer cancel()
	if ferr != nil {
		if rerr := tx.Rollback(ectx); rerr != nil && !errors.Is(rerr, pgx.ErrTxClosed) {
			return errors.Join(ferr, lost(rerr))
		}
		if s.conn.IsClosed() {
			return errors.Join(ferr, lost(ferr))
		}
		return ferr
	}
	if err := tx.Commit(ectx); err != nil {
		return lost(err)
	}
	return nil
}
