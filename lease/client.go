package lease

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/dispatch"
)

// Client acquires and holds locks for one process. It registers one holder
// row, renews it with one statement per HeartbeatInterval however many locks it
// holds, and keeps one LISTEN connection for its waiters. A Client is safe for
// concurrent use; make one per process and Close it on the way out.
//
// Where things live: the acquire engine that every path and kind goes through
// is in engine.go; the table path in table.go, the holder and its heartbeat in
// holder.go, clean-ups in cleanup.go; the advisory path in advisory.go, its
// pinned connections in pinned.go; every statement in queries.go.
type Client struct {
	pool    *pgxpool.Pool
	poolCfg *pgxpool.Config // for connections of our own: see connect
	cfg     Config
	log     *slog.Logger
	q       queries
	disp    *dispatch.Dispatcher
	table   tableMode
	adv     *Advisory
	met     *meters // nil without Config.MeterProvider

	// Lock order: mu before the advisory path's pinSet.mu; nothing else is
	// taken while mu is held, and mu is never held while calling into the
	// dispatcher or sending a statement.
	// The held-locks instrument (metrics) is updated under mu.
	mu            sync.Mutex
	closed        bool
	closing       chan struct{} // closed by Close
	h             *holder       // the live holder; nil when none
	hInit         chan struct{} // non-nil while a holder is being registered
	schemaChecked bool          // the schema passed checkSchema once
	schemaHave    int           // the version it had then (see grant)
	keys          map[string]*keyState
	wg            sync.WaitGroup // heartbeats and clean-ups

	attempts atomic.Int64 // acquire statements sent and answered (or failed), for tests and benchmarks
	cleanups atomic.Int64 // orphan clean-up statements answered (or failed), for tests

	clock serverClock // replication.go
}

// New returns a Client using pool, which stays the caller's (Close does not
// close it). cfg may be nil for all defaults. New does no I/O: the schema is
// checked and the holder row registered on first use. The schema must have
// been migrated: see package migrations.
//
// The connections the Client opens besides the pool's (one LISTEN connection
// while it has waiters, the advisory path's pinned connections) are opened as
// the pool opens its own: from its ConnConfig, through its BeforeConnect and
// AfterConnect hooks, so a hook that supplies a short-lived password serves
// them too.
func New(pool *pgxpool.Pool, cfg *Config) (*Client, error) {
	if pool == nil {
		return nil, errNilPool
	}
	rc, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	met, err := newMeters(rc.MeterProvider)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", &ConfigError{Field: "MeterProvider", Err: "making the instruments failed"}, err)
	}
	c := &Client{
		pool:    pool,
		poolCfg: pool.Config(),
		cfg:     rc,
		log:     rc.Logger,
		q:       newQueries(rc.Schema),
		closing: make(chan struct{}),
		keys:    map[string]*keyState{},
		met:     met,
	}
	c.table = tableMode{c}
	c.adv = newAdvisory(c)
	c.disp = dispatch.New(dispatch.Config{
		Connect:     func(ctx context.Context) (*pgx.Conn, error) { return c.connect(ctx, nil) },
		Channel:     channelName(rc.Schema),
		AfterListen: c.markListening,
		Unlisten:    c.unmarkListening,
		OnDelete:    c.onRowDeleted,
		OnHandoff:   c.onHandoff,
		OnPoke:      c.onPoke,
		Received:    c.met.notified,
		Logger:      rc.Logger,
	})
	return c, nil
}

// connect opens a connection of the client's own, the way the pool opens its
// connections: a copy of its ConnConfig (changed by modify, if given), its
// BeforeConnect hook, the connection, its AfterConnect hook.
func (c *Client) connect(ctx context.Context, modify func(*pgx.ConnConfig)) (*pgx.Conn, error) {
	cc := c.poolCfg.ConnConfig.Copy()
	if modify != nil {
		modify(cc)
	}
	if hook := c.poolCfg.BeforeConnect; hook != nil {
		if err := hook(ctx, cc); err != nil {
			return nil, fmt.Errorf("the pool's BeforeConnect: %w", err)
		}
	}
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return nil, err
	}
	if hook := c.poolCfg.AfterConnect; hook != nil {
		if err := hook(ctx, conn); err != nil {
			_ = conn.Close(context.Background())
			return nil, fmt.Errorf("the pool's AfterConnect: %w", err)
		}
	}
	return conn, nil
}

// markListening registers the LISTEN connection as a listener, so that
// advisory releases, which are announced only while someone listens, are
// announced to it. A schema made before mark_listening existed (an early
// pre-release) lacks the function, and announces every release anyway.
func (c *Client) markListening(ctx context.Context, conn *pgx.Conn) error {
	_, err := conn.Exec(ctx, c.q.markListening)
	if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok && pgErr.Code == "42883" { // undefined_function
		return nil
	}
	return err
}

// unmarkListening undoes markListening on a connection that stops listening
// on the schema's channel.
func (c *Client) unmarkListening(ctx context.Context, conn *pgx.Conn) error {
	_, err := conn.Exec(ctx, c.q.unmarkListening, c.cfg.Schema)
	return err
}

// onHandoff is told by the dispatcher of a key the database handed to a
// holder of this client. It is kept for the key's head acquirer (see
// tableMode.attempt), if the client still wants the key; else the clean-up
// that followed the last acquirer, or the heartbeat's check, deletes the
// grant.
func (c *Client) onHandoff(hd dispatch.Handoff) {
	c.mu.Lock()
	defer c.mu.Unlock()
	h := c.h
	if h == nil || h.lost || hd.Channel != h.channel {
		return
	}
	if ks := c.keys[hd.Key]; ks != nil && ks.wantedLocked() {
		ks.handed = &hd
	}
}

// onPoke is told by the dispatcher that the database asks the holder to look
// at a key again: the next attempt goes through the key's locks. When no
// acquirer of this client wants the key any more, a clean-up (leave) serves
// the key instead, so that the waiters after ours are not left waiting for a
// poke that came to us.
func (c *Client) onPoke(mk, channel string) {
	c.mu.Lock()
	if c.h == nil || c.h.channel != channel {
		c.mu.Unlock()
		return // for a holder given up: its rows go with it
	}
	ks := c.keys[mk]
	if ks != nil && ks.wantedLocked() {
		ks.poked = true
		c.mu.Unlock()
		return
	}
	h := c.h
	c.mu.Unlock()
	if h != nil {
		name, id, _ := strings.Cut(mk, "\x00")
		c.cleanupOrphan(Key{Name: name, ID: id}, h)
	}
}

// Config returns the client's configuration with defaults filled in.
func (c *Client) Config() Config { return c.cfg }

// HolderID returns the id of the client's live holder row, if it has one.
func (c *Client) HolderID() (int64, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.h == nil {
		return 0, false
	}
	return c.h.id, true
}

// Advisory returns the client's handle for the advisory fast path, configured
// by Config.Advisory. There is one per Client: every call returns the same
// handle, and its pinned connections (none until the first advisory acquire)
// are shared by all its callers and closed by Close.
func (c *Client) Advisory() *Advisory { return c.adv }

// Acquire blocks until it holds key or ctx is done. A key whose holder is dead
// is taken over at once. While it waits it costs the database nothing but a
// query at the holder's expiry and every PollInterval: a release anywhere
// wakes it through a notification.
//
// Locks are not reentrant. An acquirer of a key that this Client holds (in
// either mode) waits for its release like any other, so goroutines of one
// process take turns as processes do. Called from inside the critical section
// of that very lock, with a context derived from Lock.Context or from the
// one Do gives its callback, it would wait for itself: it returns at once a
// *LockedError matching ErrAlreadyHeld (and ErrLocked) instead. TryAcquire
// of a key this Client holds returns that error too.
func (c *Client) Acquire(ctx context.Context, key Key) (*Lock, error) {
	return c.acquire(ctx, c.table, key, true)
}

// TryAcquire makes one attempt and returns at once: the lock, or an error that
// matches ErrLocked (a *LockedError saying who holds the key, when known).
func (c *Client) TryAcquire(ctx context.Context, key Key) (*Lock, error) {
	return c.acquire(ctx, c.table, key, false)
}

// Do acquires key, runs fn with the lock and a context that is cancelled if
// the lock is lost, and releases the lock, also when fn panics (the panic
// then goes on). Use the lock in fn to fence writes (Lock.Fence,
// Lock.BeginTxFunc). If the lock was lost before fn returned, the error
// matches ErrLost (joined with fn's own error, if any).
func (c *Client) Do(ctx context.Context, key Key, fn func(ctx context.Context, l *Lock) error) error {
	return runHeld(ctx, key.String(), func(ctx context.Context) (*Lock, error) { return c.Acquire(ctx, key) }, fn)
}

// Close releases every lock the client holds, deletes its holder row, stops
// its goroutines and its LISTEN connection, and makes pending and later
// acquires fail with ErrClosed. The pool is left open. Close is idempotent;
// if ctx ends first, the rows left behind expire after TTL.
func (c *Client) Close(ctx context.Context) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	close(c.closing)
	h := c.h
	c.h = nil
	var locks []*Lock
	if h != nil && !h.lost {
		h.lost = true
		h.stop()
		for _, l := range h.locks {
			locks = append(locks, l)
		}
		for _, l := range locks {
			c.forgetLocked(l)
		}
	} else {
		h = nil
	}
	c.mu.Unlock()
	for _, l := range locks {
		l.cancel(ErrClosed)
	}
	var err error
	if h != nil {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.ReleaseTimeout)
		if _, e := c.pool.Exec(dctx, c.q.dropHolder, h.id, h.secret); e != nil {
			err = fmt.Errorf("lease: close: delete holder %d (its rows expire after the TTL): %w", h.id, e)
		}
		cancel()
	}
	c.adv.close()
	c.disp.Close()
	// Every goroutine ends promptly now: heartbeats were stopped, clean-ups are
	// bounded by ReleaseTimeout.
	c.wg.Wait()
	return err
}
