package lease

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"

	"github.com/pglease/pglease/internal/dispatch"
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

// AdvisoryConfig configures an Advisory. The zero value works.
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
// is lost (Done closes, cause ErrLost) when its connection drops; that is
// noticed within AdvisoryConfig.CheckInterval. Work done through
// Lock.BeginTxFunc runs on the lock's own connection and is fenced by
// construction: if the connection is gone, so is the transaction.
//
// An Advisory belongs to its Client: the Client's Close closes it, and the
// Client's local FIFO queue per key covers both modes. Behind a
// transaction-pooling proxy it refuses with ErrAdvisoryUnsupported.
type Advisory struct {
	c      *Client
	cfg    AdvisoryConfig
	schema string
	q      advQueries
	hash   func(Key) int64 // AdvisoryKey, or a test's collision

	wg sync.WaitGroup // session checkers and background releases

	// Guarded by c.mu.
	sessions []*advSession
	opening  int
	closed   bool
	refused  error // set once a proxy was detected: every later attempt fails with it
}

// advSession is one pinned connection and the advisory locks it holds.
type advSession struct {
	conn *pgx.Conn
	pid  int32         // pg_backend_pid() of the session
	sem  chan struct{} // held (filled) while a statement or a transaction uses conn
	soft *atomic.Bool  // a done ctx sends a cancel request instead of closing conn
	stop chan struct{} // closed when the session is given up

	// Guarded by c.mu.
	locks   map[*Lock]struct{}
	keys    map[int64]struct{} // advisory key values held or being acquired here
	users   int                // foreground statements queued or running
	waiting bool               // a blocking acquire waits in the server on it
	dead    bool
}

// advHold is what an advisory Lock has that a table Lock has not.
type advHold struct {
	a *Advisory
	s *advSession
	k int64
}

type advQueries struct {
	acquire      string
	release      string
	unlockIfHeld string
	probe        string
	ping         string
	held         string
}

func newAdvQueries(schema string) advQueries {
	s := pgx.Identifier{schema}.Sanitize()
	return advQueries{
		acquire:      `SELECT ` + s + `.advisory_acquire($1, $2, $3, $4)`,
		release:      `SELECT ` + s + `.advisory_release($1, $2, $3, $4)`,
		unlockIfHeld: `SELECT ` + s + `.advisory_unlock_if_held($1)`,
		probe:        `SELECT pg_backend_pid(), current_setting('server_version_num')::int, ` + s + `.key_hash($1, $2)`,
		ping:         `SELECT pg_backend_pid()`,
		held: `SELECT holder_id, host, pid, application, acquired_at,
			(extract(epoch FROM time_left) * 1000000)::bigint
			FROM ` + s + `.held WHERE name = $1 AND entity_id = $2 AND alive`,
	}
}

// Advisory returns a handle for the advisory fast path, with its own pinned
// connections (none are opened until the first acquire). cfg may be nil for
// all defaults. It is closed with the Client.
func (c *Client) Advisory(cfg *AdvisoryConfig) (*Advisory, error) {
	rc, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	a := &Advisory{c: c, cfg: rc, schema: c.cfg.Schema, q: newAdvQueries(c.cfg.Schema)}
	a.hash = func(k Key) int64 { return AdvisoryKey(a.schema, k) }
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	c.advs = append(c.advs, a)
	return a, nil
}

// Key returns the advisory lock key of key: AdvisoryKey with the client's
// schema.
func (a *Advisory) Key(key Key) int64 { return a.hash(key) }

// Acquire blocks until it holds key on the advisory path or ctx is done. It
// waits in the server's lock queue (fair, no polling) on a pinned connection
// of its own that holds no other lock, so the locks on other connections can
// be released meanwhile; when ctx is done the wait is cancelled in the server
// and no waiting backend is left behind. A key held on the table path is
// waited for through the release notification, as Client.Acquire does.
func (a *Advisory) Acquire(ctx context.Context, key Key) (*Lock, error) {
	return a.acquire(ctx, key, true)
}

// TryAcquire makes one attempt and returns at once: the lock, or an error that
// matches ErrLocked (a *LockedError; HolderID is 0 when the key is held on the
// advisory path).
func (a *Advisory) TryAcquire(ctx context.Context, key Key) (*Lock, error) {
	return a.acquire(ctx, key, false)
}

// Do acquires key on the advisory path, runs fn with a context cancelled if
// the lock is lost, and releases it, like Client.Do.
func (a *Advisory) Do(ctx context.Context, key Key, fn func(ctx context.Context) error) error {
	return runHeld(ctx, key, a.Acquire, fn)
}

// Result of one advisory attempt that did not acquire.
const (
	advBusy      = 0  // the advisory key is held by another session, or the row is being changed
	advTableHeld = -1 // a live holder has the key on the table path
)

func (a *Advisory) acquire(ctx context.Context, key Key, wait bool) (*Lock, error) {
	if err := key.Validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, context.Cause(ctx)
	}
	c := a.c
	k := a.hash(key)
	mk := key.mapKey()
	c.mu.Lock()
	if c.closed || a.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	if a.refused != nil {
		err := a.refused
		c.mu.Unlock()
		return nil, err
	}
	ks, w, err := c.enqueueLocked(key, mk, wait, false)
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	defer c.leave(mk, ks, w)
	if err := c.awaitTurn(ctx, w); err != nil {
		return nil, err
	}

	var sub *dispatch.Sub
	defer func() {
		if sub != nil {
			sub.Close()
		}
	}()
	backoff := 2 * time.Millisecond
	for {
		c.mu.Lock()
		free := ks.free
		if ks.held == nil {
			free = nil
		}
		if free != nil && !wait {
			err := c.lockedByUsLocked(key, ks)
			c.mu.Unlock()
			return nil, err
		}
		c.mu.Unlock()
		if free != nil { // this client holds it (in either mode): wait for our own release
			select {
			case <-free:
				continue
			case <-ctx.Done():
				return nil, context.Cause(ctx)
			case <-c.closing:
				return nil, ErrClosed
			}
		}
		var wake <-chan struct{}
		if sub != nil {
			wake = sub.C() // before asking: a release in between still wakes us
		}
		l, res, err := a.attempt(ctx, key, k, ks, wait)
		if errors.Is(err, errRetry) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if l != nil {
			return l, nil
		}
		if !wait {
			return nil, a.lockedError(ctx, key, res)
		}
		if sub == nil {
			// Subscribe only now, so that the plain advisory path never opens
			// the LISTEN connection, and ask again at once: a release between
			// the attempt and the subscription would not wake us.
			sub = c.disp.Subscribe(mk)
			continue
		}
		delay := dispatch.Jitter(c.cfg.PollInterval)
		if res == advBusy {
			if backoff < delay {
				delay = backoff
			}
			backoff = min(backoff*2, c.cfg.PollInterval)
		} else {
			backoff = 2 * time.Millisecond
		}
		t := time.NewTimer(delay)
		select {
		case <-wake:
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, context.Cause(ctx)
		case <-c.closing:
			t.Stop()
			return nil, ErrClosed
		}
		t.Stop()
	}
}

// lockedError says who holds key, as far as one cheap look tells.
func (a *Advisory) lockedError(ctx context.Context, key Key, res int64) error {
	e := &LockedError{Key: key}
	if res != advTableHeld {
		return e
	}
	var expiresInMicroseconds int64
	err := a.c.pool.QueryRow(ctx, a.q.held, key.Name, key.ID).Scan(
		&e.HolderID, &e.Host, &e.PID, &e.Application, &e.AcquiredAt, &expiresInMicroseconds)
	if err != nil {
		return &LockedError{Key: key} // released meanwhile, or the look failed: still locked as far as we know
	}
	e.ExpiresIn = time.Duration(expiresInMicroseconds) * time.Microsecond
	return e
}

// attempt asks the database once, on a pinned connection. Blocking attempts
// wait in the server on a connection that holds no lock; when there is none
// to be had, they make a non-blocking attempt instead. It returns the lock, or
// advBusy / advTableHeld.
func (a *Advisory) attempt(ctx context.Context, key Key, k int64, ks *keyState, blocking bool) (*Lock, int64, error) {
	c := a.c
	c.mu.Lock()
	if c.closed || a.closed {
		c.mu.Unlock()
		return nil, 0, ErrClosed
	}
	if a.refused != nil {
		err := a.refused
		c.mu.Unlock()
		return nil, 0, err
	}
	s, open := a.pickLocked(k, blocking)
	if s == nil && !open && blocking {
		blocking = false
		s, open = a.pickLocked(k, false)
	}
	if s == nil && !open {
		// Every pinned connection is waiting or has this key value (a
		// colliding key of ours) already: busy, as far as we can tell.
		c.mu.Unlock()
		return nil, advBusy, nil
	}
	// Claim the connection before letting go of c.mu (a new one is claimed
	// as it is registered), so that no one else picks it for a wait.
	claim := func(s *advSession) {
		if blocking {
			s.waiting = true
		} else {
			s.users++
		}
		s.keys[k] = struct{}{}
	}
	if s != nil {
		claim(s)
	}
	c.mu.Unlock()
	if open {
		var err error
		if s, err = a.openSession(ctx, claim); err != nil {
			return nil, 0, err
		}
	}

	tok, err := a.run(ctx, s, key, k, blocking)

	c.mu.Lock()
	if blocking {
		s.waiting = false
	} else {
		s.users--
	}
	if err != nil || tok <= 0 || s.dead || a.closed || c.closed {
		delete(s.keys, k)
	}
	switch {
	case err != nil:
		c.mu.Unlock()
		if ctx.Err() != nil {
			return nil, 0, context.Cause(ctx)
		}
		if errors.Is(err, errSessionLost) {
			return nil, 0, errRetry // whatever it took went with the connection
		}
		return nil, 0, fmt.Errorf("lease: advisory acquire %s: %w", key, err)
	case tok <= 0:
		c.mu.Unlock()
		return nil, tok, nil
	case a.closed || c.closed:
		c.mu.Unlock()
		return nil, 0, ErrClosed // the connection is being closed: the lock goes with it
	case s.dead:
		c.mu.Unlock()
		return nil, 0, errRetry // lost just now, with the connection
	}
	l := &Lock{c: c, key: key, token: tok, acquiredAt: time.Now(), adv: &advHold{a: a, s: s, k: k}}
	l.ctx, l.cancel = context.WithCancelCause(context.Background())
	s.locks[l] = struct{}{}
	ks.held = l
	ks.free = make(chan struct{})
	c.mu.Unlock()
	return l, 0, nil
}

// pickLocked chooses a pinned connection for an attempt on key value k. A
// connection never holds (or acquires) one key value twice: session-level
// advisory locks nest, and a nested hold would make colliding keys of one
// client share a lock. A blocking attempt needs a connection with no lock and
// nothing running, so that nothing waits for it while it waits in the server.
// Non-blocking ones go to an idle connection, preferring one with locks (so
// that empty ones stay free for waits), else queue behind the least busy. When
// open is true the caller must open a new connection (counted in a.opening).
func (a *Advisory) pickLocked(k int64, blocking bool) (s *advSession, open bool) {
	var best *advSession
	for _, x := range a.sessions {
		if x.dead || x.waiting {
			continue
		}
		if _, dup := x.keys[k]; dup {
			continue
		}
		if blocking {
			if x.users == 0 && len(x.keys) == 0 {
				return x, false
			}
			continue
		}
		switch {
		case best == nil:
			best = x
		case x.users == 0 && (best.users > 0 || len(x.locks) > len(best.locks)):
			best = x
		case x.users > 0 && best.users > 0 && x.users < best.users:
			best = x
		}
	}
	if best != nil && best.users == 0 {
		return best, false
	}
	if len(a.sessions)+a.opening < a.cfg.MaxConns {
		a.opening++
		return nil, true
	}
	return best, false
}

var errSessionLost = errors.New("lease: pinned connection lost")

// run sends advisory_acquire on s. A blocking call is cancelled in the server
// when ctx is done (a cancel request; the connection stays); other calls are
// bounded by ReleaseTimeout, past which the connection is closed.
func (a *Advisory) run(ctx context.Context, s *advSession, key Key, k int64, blocking bool) (int64, error) {
	if err := s.lockConn(ctx); err != nil {
		return 0, err
	}
	defer s.unlockConn()
	var tok int64
	var err error
	if blocking {
		s.soft.Store(true)
		err = s.conn.QueryRow(ctx, a.q.acquire, key.Name, key.ID, k, true).Scan(&tok)
		s.soft.Store(false)
	} else {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.c.cfg.ReleaseTimeout)
		err = s.conn.QueryRow(sctx, a.q.acquire, key.Name, key.ID, k, false).Scan(&tok)
		cancel()
	}
	if err == nil {
		return tok, nil
	}
	if s.conn.IsClosed() {
		a.loseSession(s, "connection lost during acquire", err)
		return 0, fmt.Errorf("%w: %w", errSessionLost, err)
	}
	// The server reported an error, possibly after it had granted the lock
	// (a cancel that arrived just then): make sure the session lets it go.
	uctx, cancel := context.WithTimeout(context.Background(), a.c.cfg.ReleaseTimeout)
	defer cancel()
	if _, uerr := s.conn.Exec(uctx, a.q.unlockIfHeld, k); uerr != nil {
		a.loseSession(s, "clean-up after a failed acquire failed", uerr)
	}
	return 0, err
}

// use counts a user of s's connection other than an attempt (a release, a
// transaction), so that pickLocked sees it busy.
func (a *Advisory) use(s *advSession, d int) {
	a.c.mu.Lock()
	s.users += d
	a.c.mu.Unlock()
}

// lockConn waits for s's connection. It fails when ctx is done or s is given up.
func (s *advSession) lockConn(ctx context.Context) error {
	select {
	case s.sem <- struct{}{}:
		return nil
	default:
	}
	select {
	case s.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-s.stop:
		return errSessionLost
	}
}

func (s *advSession) unlockConn() { <-s.sem }

// advWatch decides what a done ctx does to a statement on a pinned
// connection: statements that may wait (a blocking acquire, a user's
// transaction) are cancelled in the server and the connection stays; the
// others are bounded, and one that runs out of time closes the connection,
// which frees everything it held.
type advWatch struct {
	soft     *atomic.Bool
	hard     pgconn.DeadlineContextWatcherHandler
	cancel   pgconn.CancelRequestContextWatcherHandler
	usedSoft bool
}

func (h *advWatch) HandleCancel(ctx context.Context) {
	h.usedSoft = h.soft.Load()
	if h.usedSoft {
		h.cancel.HandleCancel(ctx)
	} else {
		h.hard.HandleCancel(ctx)
	}
}

func (h *advWatch) HandleUnwatchAfterCancel() {
	if h.usedSoft {
		h.cancel.HandleUnwatchAfterCancel()
	} else {
		h.hard.HandleUnwatchAfterCancel()
	}
}

// openSession opens, checks and registers a pinned connection, claimed for
// its first use. The caller has counted it in a.opening.
func (a *Advisory) openSession(ctx context.Context, claim func(*advSession)) (*advSession, error) {
	s, err := a.connect(ctx)
	c := a.c
	c.mu.Lock()
	a.opening--
	if err != nil {
		if errors.Is(err, ErrAdvisoryUnsupported) && a.refused == nil {
			a.refused = err
		}
		c.mu.Unlock()
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		return nil, err
	}
	if a.closed || c.closed {
		c.mu.Unlock()
		_ = s.conn.Close(context.Background())
		return nil, ErrClosed
	}
	a.sessions = append(a.sessions, s)
	claim(s)
	a.wg.Add(1)
	c.mu.Unlock()
	go a.check(s)
	return s, nil
}

func (a *Advisory) connect(ctx context.Context) (*advSession, error) {
	cc := a.c.pool.Config().ConnConfig.Copy()
	soft := new(atomic.Bool)
	grace := a.c.cfg.ReleaseTimeout
	cc.BuildContextWatcherHandler = func(pc *pgconn.PgConn) ctxwatch.Handler {
		return &advWatch{
			soft:   soft,
			hard:   pgconn.DeadlineContextWatcherHandler{Conn: pc.Conn()},
			cancel: pgconn.CancelRequestContextWatcherHandler{Conn: pc, DeadlineDelay: grace},
		}
	}
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		return nil, fmt.Errorf("lease: advisory: connect: %w", err)
	}
	s := &advSession{
		conn:  conn,
		sem:   make(chan struct{}, 1),
		soft:  soft,
		stop:  make(chan struct{}),
		locks: map[*Lock]struct{}{},
		keys:  map[int64]struct{}{},
	}
	if err := a.setup(ctx, s); err != nil {
		_ = conn.Close(context.Background())
		return nil, err
	}
	return s, nil
}

// probeKey is hashed by the server and by Go when a connection is set up, so
// that a mismatch (which would break the exclusion between the two modes) is
// refused before any lock is taken.
var probeKey = Key{Name: "pglease probe", ID: "é"}

// setup checks a new pinned connection and configures its session.
//
// Proxy detection: a transaction-pooling proxy hands a client's next
// statement to whichever server session is free, so a session-level lock
// would stay with a session that other clients are then given. setup asks the
// server for its backend pid, then opens a transaction on one of the pool's
// connections (which pins a server session for that transaction) and asks it
// for its pid, then asks the new connection again. Connected directly (or
// through session pooling), the two connections are two sessions and the new
// one keeps its pid. Behind PgBouncer in transaction mode the pool's
// transaction is given the session the new connection just used (PgBouncer
// reuses the most recent one first), or the new connection's next statement
// lands on another session: either way it is refused with
// ErrAdvisoryUnsupported. Every later check compares the pid again.
func (a *Advisory) setup(ctx context.Context, s *advSession) error {
	var pid, version int32
	var h int64
	if err := s.conn.QueryRow(ctx, a.q.probe, probeKey.Name, probeKey.ID).Scan(&pid, &version, &h); err != nil {
		return fmt.Errorf("lease: advisory: set up connection: %w", err)
	}
	if want := AdvisoryKey(a.schema, probeKey); h != want {
		return fmt.Errorf("lease: advisory: key_hash(%q, %q) in schema %q is %d, the client computes %d: the two modes would not exclude each other",
			probeKey.Name, probeKey.ID, a.schema, h, want)
	}
	s.pid = pid
	if err := a.probeProxy(ctx, s); err != nil {
		return err
	}

	// The session's own settings: nothing may cut a wait or an idle session
	// short (the locks would go with it), and the server should notice a
	// vanished client soon, so that its locks are freed.
	secs := strconv.Itoa(max(1, int(a.cfg.CheckInterval/time.Second)))
	q := `SELECT pg_backend_pid(),
		set_config('lock_timeout', '0', false),
		set_config('statement_timeout', '0', false),
		set_config('idle_in_transaction_session_timeout', '0', false),
		set_config('default_transaction_isolation', 'read committed', false),
		set_config('tcp_keepalives_idle', $1, false),
		set_config('tcp_keepalives_interval', '1', false),
		set_config('tcp_keepalives_count', '3', false)`
	args := []any{secs}
	if version >= 140000 {
		q += `,
		set_config('idle_session_timeout', '0', false),
		set_config('client_connection_check_interval', $2, false)`
		args = append(args, strconv.Itoa(max(1, int(a.cfg.CheckInterval/time.Millisecond))))
	}
	rows, err := s.conn.Query(ctx, q, args...)
	if err != nil {
		return fmt.Errorf("lease: advisory: configure session: %w", err)
	}
	var again int32
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			return fmt.Errorf("lease: advisory: configure session: %w", err)
		}
		again, _ = vals[0].(int32)
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("lease: advisory: configure session: %w", err)
	}
	if again != pid {
		return fmt.Errorf("%w (backend pid changed from %d to %d between two statements)", ErrAdvisoryUnsupported, pid, again)
	}
	return nil
}

func (a *Advisory) probeProxy(ctx context.Context, s *advSession) error {
	// Bounded: it needs one of the pool's connections, which the caller might
	// be holding all of.
	ctx, cancel := context.WithTimeout(ctx, a.c.cfg.ReleaseTimeout)
	defer cancel()
	for try := 0; ; try++ {
		retry, err := a.probeProxyOnce(ctx, s)
		if err == nil || !retry || try == 1 {
			return err
		}
	}
}

// probeProxyOnce runs the check once. retry is true when the pool's
// connection turned out to be dead (after a server restart, say).
func (a *Advisory) probeProxyOnce(ctx context.Context, s *advSession) (retry bool, err error) {
	pc, err := a.c.pool.Acquire(ctx)
	if err != nil {
		return false, fmt.Errorf("lease: advisory: proxy check: %w", err)
	}
	defer pc.Release()
	defer func() { retry = err != nil && pc.Conn().IsClosed() }()
	tx, err := pc.Begin(ctx)
	if err != nil {
		return false, fmt.Errorf("lease: advisory: proxy check: %w", err)
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.Background(), a.c.cfg.ReleaseTimeout)
		defer cancel()
		_ = tx.Rollback(rctx)
	}()
	var other int32
	if err := tx.QueryRow(ctx, a.q.ping).Scan(&other); err != nil {
		return false, fmt.Errorf("lease: advisory: proxy check: %w", err)
	}
	if other == s.pid {
		return false, fmt.Errorf("%w (a pool connection's transaction ran in server session %d, which the new pinned connection had just used)", ErrAdvisoryUnsupported, other)
	}
	var again int32
	if err := s.conn.QueryRow(ctx, a.q.ping).Scan(&again); err != nil {
		return false, fmt.Errorf("lease: advisory: proxy check: %w", err)
	}
	if again != s.pid {
		return false, fmt.Errorf("%w (backend pid changed from %d to %d between two statements)", ErrAdvisoryUnsupported, s.pid, again)
	}
	return false, nil
}

// check pings s while it holds locks, and gives it up when a ping fails, runs
// out of time, or finds another server session.
func (a *Advisory) check(s *advSession) {
	defer a.wg.Done()
	period := a.cfg.CheckInterval / 3
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		a.c.mu.Lock()
		n := len(s.locks)
		a.c.mu.Unlock()
		if n == 0 {
			continue // nothing to report; a dead idle connection is found when next used
		}
		select {
		case s.sem <- struct{}{}:
		default:
			continue // in use: the statement running on it finds out
		}
		ctx, cancel := context.WithTimeout(context.Background(), period)
		var pid int32
		err := s.conn.QueryRow(ctx, a.q.ping).Scan(&pid)
		cancel()
		s.unlockConn()
		if err == nil && pid != s.pid {
			a.c.mu.Lock()
			if a.refused == nil {
				a.refused = fmt.Errorf("%w (backend pid changed from %d to %d)", ErrAdvisoryUnsupported, s.pid, pid)
			}
			a.c.mu.Unlock()
			err = errors.New("the connection moved to another server session")
		}
		if err != nil {
			a.loseSession(s, "connection check failed", err)
			return
		}
	}
}

// loseSession gives s up: every lock on it is reported lost, and its
// connection is closed (the server then frees whatever the session held).
func (a *Advisory) loseSession(s *advSession, reason string, err error) {
	c := a.c
	c.mu.Lock()
	if s.dead {
		c.mu.Unlock()
		return
	}
	locks := a.dropSessionLocked(s)
	c.mu.Unlock()
	// Closing the socket is safe while another goroutine uses the connection:
	// its statement fails at once.
	_ = s.conn.PgConn().Conn().Close()
	c.log.Warn("pglease: advisory connection lost", "backend_pid", s.pid, "reason", reason, "error", err, "locks", len(locks))
	for _, l := range locks {
		c.log.Warn("pglease: lock lost", "name", l.key.Name, "id", l.key.ID, "token", l.token, "reason", reason)
		l.cancel(ErrLost)
	}
}

// dropSessionLocked marks s dead and forgets its locks, which it returns.
func (a *Advisory) dropSessionLocked(s *advSession) []*Lock {
	s.dead = true
	close(s.stop)
	for i, x := range a.sessions {
		if x == s {
			a.sessions = append(a.sessions[:i], a.sessions[i+1:]...)
			break
		}
	}
	locks := make([]*Lock, 0, len(s.locks))
	for l := range s.locks {
		locks = append(locks, l)
	}
	for _, l := range locks {
		a.dropLocked(l)
	}
	return locks
}

// dropLocked forgets l as held. c.mu must be held. Idempotent.
func (a *Advisory) dropLocked(l *Lock) {
	s := l.adv.s
	if _, ok := s.locks[l]; ok {
		delete(s.locks, l)
		delete(s.keys, l.adv.k)
	}
	a.c.dropLocked(l)
}

// close gives every pinned connection up; their locks end with cause
// ErrClosed. Called by Client.Close.
func (a *Advisory) close() {
	c := a.c
	c.mu.Lock()
	a.closed = true
	sessions := append([]*advSession(nil), a.sessions...)
	var locks []*Lock
	for _, s := range sessions {
		locks = append(locks, a.dropSessionLocked(s)...)
	}
	c.mu.Unlock()
	for _, l := range locks {
		l.cancel(ErrClosed)
	}
	for _, s := range sessions {
		_ = s.conn.PgConn().Conn().Close()
	}
	a.wg.Wait()
}

// closeAdvisories closes every Advisory of c. Called by Close.
func (c *Client) closeAdvisories() {
	c.mu.Lock()
	advs := c.advs
	c.advs = nil
	c.mu.Unlock()
	for _, a := range advs {
		a.close()
	}
}

// Advisory reports whether l was acquired on the advisory path.
func (l *Lock) Advisory() bool { return l.adv != nil }

// release lets go of an advisory lock on its own connection.
func (h *advHold) release(ctx context.Context, l *Lock) error {
	a, s, c := h.a, h.s, h.a.c
	l.cancel(ErrReleased) // no-op if it was lost or closed first
	if cause := context.Cause(l.ctx); !errors.Is(cause, ErrReleased) {
		if errors.Is(cause, ErrClosed) {
			return nil
		}
		return fmt.Errorf("lease: release %s: %w before release", l.key, ErrLost)
	}
	rctx, cancel := releaseContext(ctx, c.cfg.ReleaseTimeout)
	defer cancel()
	a.use(s, 1)
	defer a.use(s, -1)
	if err := s.lockConn(rctx); err != nil {
		if errors.Is(err, errSessionLost) {
			return nil // the connection was closed meanwhile, and the lock with it
		}
		// The connection is busy with a transaction through another lock on it
		// for longer than ReleaseTimeout: release when it is done.
		a.wg.Add(1)
		a.use(s, 1)
		go func() {
			defer a.wg.Done()
			defer a.use(s, -1)
			if s.lockConn(context.Background()) == nil {
				ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
				defer cancel()
				h.unlock(ctx, l)
			}
		}()
		return fmt.Errorf("lease: release %s: its connection is busy with a transaction; released when that ends: %w", l.key, err)
	}
	return h.unlock(rctx, l)
}

// unlock sends advisory_release, bounded by ctx; the caller holds the
// connection.
func (h *advHold) unlock(ctx context.Context, l *Lock) error {
	a, s, c := h.a, h.s, h.a.c
	var released bool
	err := s.conn.QueryRow(ctx, a.q.release, l.key.Name, l.key.ID, h.k, l.token).Scan(&released)
	s.unlockConn()
	if err != nil {
		// Closing the connection is the one sure way to free the lock now.
		a.loseSession(s, "release failed", err)
		return fmt.Errorf("lease: release %s: %w (its connection was closed, which frees it)", l.key, err)
	}
	c.mu.Lock()
	a.dropLocked(l)
	c.mu.Unlock()
	if !released {
		return fmt.Errorf("lease: release %s: %w before release (its session did not hold it)", l.key, ErrLost)
	}
	return nil
}

// fence: an advisory lock fences only a transaction on its own connection,
// where it does so by construction.
func (h *advHold) fence(l *Lock, tx pgx.Tx) error {
	if err := l.Err(); err != nil {
		return fmt.Errorf("lease: fence %s token %d: %w", l.key, l.token, ErrLost)
	}
	if tx.Conn() != h.s.conn {
		return fmt.Errorf("lease: fence %s: %w", l.key, ErrNotFenceable)
	}
	return nil
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
	if l.adv == nil {
		return pgx.BeginTxFunc(ctx, l.c.pool, opts, func(tx pgx.Tx) error {
			if err := l.Fence(ctx, tx); err != nil {
				return err
			}
			return fn(tx)
		})
	}
	return l.adv.txFunc(ctx, l, opts, fn)
}

func (h *advHold) txFunc(ctx context.Context, l *Lock, opts pgx.TxOptions, fn func(pgx.Tx) error) error {
	a, s := h.a, h.s
	if err := l.Err(); err != nil {
		return fmt.Errorf("lease: %s: %w", l.key, err)
	}
	a.use(s, 1) // so that tries look elsewhere rather than queue behind fn
	defer a.use(s, -1)
	if err := s.lockConn(ctx); err != nil {
		if errors.Is(err, errSessionLost) {
			return fmt.Errorf("lease: %s: %w", l.key, ErrLost)
		}
		return err
	}
	defer s.unlockConn()
	if err := l.Err(); err != nil { // released or lost while we waited
		return fmt.Errorf("lease: %s: %w", l.key, err)
	}
	lost := func(err error) error {
		if s.conn.IsClosed() {
			a.loseSession(s, "connection lost during a transaction", err)
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
	ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.c.cfg.ReleaseTimeout)
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
