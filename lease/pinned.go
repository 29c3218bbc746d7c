package lease

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
)

// The advisory path's pinned connections: opened on demand (through the
// pool's hooks), checked for a transaction-pooling proxy, configured, pinged
// while they hold locks, and given up with their locks when they fail.

// pinSet is the pinned connections of one Client's advisory path.
type pinSet struct {
	c   *Client
	cfg AdvisoryConfig
	q   advQueries

	wg sync.WaitGroup // connection checkers and background releases

	// mu guards the fields below and those of every pinnedConn marked so.
	// Lock order: Client.mu before mu; mu is never held while a statement
	// runs.
	mu      sync.Mutex
	conns   []*pinnedConn
	opening int
	closed  bool
	refused error // set once a proxy was detected: every later attempt fails with it
}

// pinnedConn is one pinned connection and the advisory locks it holds.
type pinnedConn struct {
	conn *pgx.Conn
	pid  int32         // pg_backend_pid() of the session
	sem  chan struct{} // held (filled) while a statement or a transaction uses conn
	soft *atomic.Bool  // a done ctx sends a cancel request instead of closing conn
	stop chan struct{} // closed when the connection is given up

	// Guarded by pinSet.mu.
	locks   map[*Lock]struct{}
	keys    map[int64]struct{} // advisory key values held or being acquired here
	users   int                // foreground statements queued or running
	waiting bool               // a blocking acquire waits in the server on it
	dead    bool
}

var errConnLost = errors.New("lease: pinned connection lost")

// usableLocked returns why no attempt can be made, if so (p.mu held).
func (p *pinSet) usableLocked() error {
	if p.closed {
		return ErrClosed
	}
	return p.refused
}

// claim picks (or opens) a pinned connection for an attempt on key value k
// and claims it: for a wait in the server when blocking, else as a user. A
// blocking attempt that finds no connection free for a wait makes a
// non-blocking one instead (blocking comes back false). A nil connection
// with a nil error means every connection is waiting or already has k: busy,
// as far as this client can tell.
func (p *pinSet) claim(ctx context.Context, k int64, blocking bool) (s *pinnedConn, waits bool, err error) {
	p.mu.Lock()
	if err := p.usableLocked(); err != nil {
		p.mu.Unlock()
		return nil, false, err
	}
	s, open := p.pickLocked(k, blocking)
	if s == nil && !open && blocking {
		blocking = false
		s, open = p.pickLocked(k, false)
	}
	if s == nil && !open {
		p.mu.Unlock()
		return nil, false, nil
	}
	// Claim the connection before letting go of p.mu (a new one is claimed
	// as it is registered), so that no one else picks it for a wait.
	claim := func(s *pinnedConn) {
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
	p.mu.Unlock()
	if open {
		if s, err = p.open(ctx, claim); err != nil {
			return nil, false, err
		}
	}
	return s, blocking, nil
}

// unclaimLocked ends a claim (p.mu held); keep says whether k stays on s.
func (p *pinSet) unclaimLocked(s *pinnedConn, k int64, blocking, keep bool) {
	if blocking {
		s.waiting = false
	} else {
		s.users--
	}
	if !keep {
		delete(s.keys, k)
	}
}

// pickLocked chooses a pinned connection for an attempt on key value k. A
// connection never holds (or acquires) one key value twice: session-level
// advisory locks nest, and a nested hold would make colliding keys of one
// client share a lock. A blocking attempt needs a connection with no lock and
// nothing running, so that nothing waits for it while it waits in the server.
// Non-blocking ones go to an idle connection, preferring one with locks (so
// that empty ones stay free for waits), else queue behind the least busy. When
// open is true the caller must open a new connection (counted in p.opening).
func (p *pinSet) pickLocked(k int64, blocking bool) (s *pinnedConn, open bool) {
	var best *pinnedConn
	for _, x := range p.conns {
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
	if len(p.conns)+p.opening < p.cfg.MaxConns {
		p.opening++
		return nil, true
	}
	return best, false
}

// run sends advisory_acquire on s. A blocking call is cancelled in the server
// when ctx is done (a cancel request; the connection stays); other calls are
// bounded by ReleaseTimeout, past which the connection is closed.
func (p *pinSet) run(ctx context.Context, s *pinnedConn, key Key, k int64, blocking, shared bool) (int64, error) {
	if err := s.lockConn(ctx); err != nil {
		return 0, err
	}
	defer s.unlockConn()
	acquire, unlockIfHeld := p.q.acquire, p.q.unlockIfHeld
	if shared {
		acquire, unlockIfHeld = p.q.acquireShared, p.q.unlockSharedIfHeld
	}
	var tok int64
	var err error
	if blocking {
		s.soft.Store(true)
		err = s.conn.QueryRow(ctx, acquire, key.Name, key.ID, k, true).Scan(&tok)
		s.soft.Store(false)
	} else {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.c.cfg.ReleaseTimeout)
		err = s.conn.QueryRow(sctx, acquire, key.Name, key.ID, k, false).Scan(&tok)
		cancel()
	}
	if err == nil {
		return tok, nil
	}
	if s.conn.IsClosed() {
		p.lose(s, "connection lost during acquire", err)
		return 0, fmt.Errorf("%w: %w", errConnLost, err)
	}
	// The server reported an error, possibly after it had granted the lock
	// (a cancel that arrived just then): make sure the session lets it go.
	uctx, cancel := context.WithTimeout(context.Background(), p.c.cfg.ReleaseTimeout)
	defer cancel()
	if _, uerr := s.conn.Exec(uctx, unlockIfHeld, k); uerr != nil {
		p.lose(s, "clean-up after a failed acquire failed", uerr)
	}
	return 0, err
}

// use counts a user of s's connection other than an attempt (a release, a
// transaction), so that pickLocked sees it busy.
func (p *pinSet) use(s *pinnedConn, d int) {
	p.mu.Lock()
	s.users += d
	p.mu.Unlock()
}

// lockConn waits for s's connection. It fails when ctx is done or s is given up.
func (s *pinnedConn) lockConn(ctx context.Context) error {
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
		return errConnLost
	}
}

func (s *pinnedConn) unlockConn() { <-s.sem }

// pinWatch decides what a done ctx does to a statement on a pinned
// connection: statements that may wait (a blocking acquire, a user's
// transaction) are cancelled in the server and the connection stays; the
// others are bounded, and one that runs out of time closes the connection,
// which frees everything it held.
type pinWatch struct {
	soft     *atomic.Bool
	hard     pgconn.DeadlineContextWatcherHandler
	cancel   pgconn.CancelRequestContextWatcherHandler
	usedSoft bool
}

func (h *pinWatch) HandleCancel(ctx context.Context) {
	h.usedSoft = h.soft.Load()
	if h.usedSoft {
		h.cancel.HandleCancel(ctx)
	} else {
		h.hard.HandleCancel(ctx)
	}
}

func (h *pinWatch) HandleUnwatchAfterCancel() {
	if h.usedSoft {
		h.cancel.HandleUnwatchAfterCancel()
	} else {
		h.hard.HandleUnwatchAfterCancel()
	}
}

// open opens, checks and registers a pinned connection, claimed for its
// first use. The caller has counted it in p.opening.
func (p *pinSet) open(ctx context.Context, claim func(*pinnedConn)) (*pinnedConn, error) {
	s, err := p.connect(ctx)
	p.mu.Lock()
	p.opening--
	if err != nil {
		if errors.Is(err, ErrAdvisoryUnsupported) && p.refused == nil {
			p.refused = err
		}
		p.mu.Unlock()
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		return nil, err
	}
	if p.closed {
		p.mu.Unlock()
		_ = s.conn.Close(context.Background())
		return nil, ErrClosed
	}
	p.conns = append(p.conns, s)
	claim(s)
	p.wg.Add(1)
	p.mu.Unlock()
	go p.check(s)
	return s, nil
}

func (p *pinSet) connect(ctx context.Context) (*pinnedConn, error) {
	soft := new(atomic.Bool)
	grace := p.c.cfg.ReleaseTimeout
	conn, err := p.c.connect(ctx, func(cc *pgx.ConnConfig) {
		cc.BuildContextWatcherHandler = func(pc *pgconn.PgConn) ctxwatch.Handler {
			return &pinWatch{
				soft:   soft,
				hard:   pgconn.DeadlineContextWatcherHandler{Conn: pc.Conn()},
				cancel: pgconn.CancelRequestContextWatcherHandler{Conn: pc, DeadlineDelay: grace},
			}
		}
	})
	if err != nil {
		return nil, fmt.Errorf("lease: advisory: connect: %w", err)
	}
	s := &pinnedConn{
		conn:  conn,
		sem:   make(chan struct{}, 1),
		soft:  soft,
		stop:  make(chan struct{}),
		locks: map[*Lock]struct{}{},
		keys:  map[int64]struct{}{},
	}
	if err := p.setup(ctx, s); err != nil {
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
func (p *pinSet) setup(ctx context.Context, s *pinnedConn) error {
	var pid, version int32
	var h int64
	if err := s.conn.QueryRow(ctx, p.q.probe, probeKey.Name, probeKey.ID).Scan(&pid, &version, &h); err != nil {
		return fmt.Errorf("lease: advisory: set up connection: %w", err)
	}
	schema := p.c.cfg.Schema
	if want := AdvisoryKey(schema, probeKey); h != want {
		return fmt.Errorf("lease: advisory: key_hash(%q, %q) in schema %q is %d, the client computes %d: the two modes would not exclude each other",
			probeKey.Name, probeKey.ID, schema, h, want)
	}
	s.pid = pid
	if err := p.probeProxy(ctx, s); err != nil {
		return err
	}

	// The session's own settings: nothing may cut a wait or an idle session
	// short (the locks would go with it), and the server should notice a
	// vanished client soon, so that its locks are freed.
	secs := strconv.Itoa(max(1, int(p.cfg.CheckInterval/time.Second)))
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
		args = append(args, strconv.Itoa(max(1, int(p.cfg.CheckInterval/time.Millisecond))))
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

func (p *pinSet) probeProxy(ctx context.Context, s *pinnedConn) error {
	// Bounded: it needs one of the pool's connections, which the caller might
	// be holding all of.
	ctx, cancel := context.WithTimeout(ctx, p.c.cfg.ReleaseTimeout)
	defer cancel()
	for try := 0; ; try++ {
		retry, err := p.probeProxyOnce(ctx, s)
		if err == nil || !retry || try == 1 {
			return err
		}
	}
}

// probeProxyOnce runs the check once. retry is true when the pool's
// connection turned out to be dead (after a server restart, say).
func (p *pinSet) probeProxyOnce(ctx context.Context, s *pinnedConn) (retry bool, err error) {
	pc, err := p.c.pool.Acquire(ctx)
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
		rctx, cancel := context.WithTimeout(context.Background(), p.c.cfg.ReleaseTimeout)
		defer cancel()
		_ = tx.Rollback(rctx)
	}()
	var other int32
	if err := tx.QueryRow(ctx, p.q.ping).Scan(&other); err != nil {
		return false, fmt.Errorf("lease: advisory: proxy check: %w", err)
	}
	if other == s.pid {
		return false, fmt.Errorf("%w (a pool connection's transaction ran in server session %d, which the new pinned connection had just used)", ErrAdvisoryUnsupported, other)
	}
	var again int32
	if err := s.conn.QueryRow(ctx, p.q.ping).Scan(&again); err != nil {
		return false, fmt.Errorf("lease: advisory: proxy check: %w", err)
	}
	if again != s.pid {
		return false, fmt.Errorf("%w (backend pid changed from %d to %d between two statements)", ErrAdvisoryUnsupported, s.pid, again)
	}
	return false, nil
}

// check pings s while it holds locks, and gives it up when a ping fails, runs
// out of time, or finds another server session.
func (p *pinSet) check(s *pinnedConn) {
	defer p.wg.Done()
	period := p.cfg.CheckInterval / 3
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		p.mu.Lock()
		n := len(s.locks)
		p.mu.Unlock()
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
		err := s.conn.QueryRow(ctx, p.q.ping).Scan(&pid)
		cancel()
		s.unlockConn()
		if err == nil && pid != s.pid {
			p.mu.Lock()
			if p.refused == nil {
				p.refused = fmt.Errorf("%w (backend pid changed from %d to %d)", ErrAdvisoryUnsupported, s.pid, pid)
			}
			p.mu.Unlock()
			err = errors.New("the connection moved to another server session")
		}
		if err != nil {
			p.lose(s, "connection check failed", err)
			return
		}
	}
}

// lose gives s up: every lock on it is reported lost (but those being
// released: closing the connection releases them), and its connection is
// closed (the server then frees whatever the session held). The locks'
// Done closes first: a session that is still alive (a check that ran out of
// time on a slow server) frees its locks as soon as the socket closes, and
// another holder may have one of them a moment later.
func (p *pinSet) lose(s *pinnedConn, reason string, err error) {
	c := p.c
	c.mu.Lock()
	p.mu.Lock()
	if s.dead {
		p.mu.Unlock()
		c.mu.Unlock()
		return
	}
	locks := p.dropConnLocked(s)
	var lost []*Lock
	for _, l := range locks {
		c.dropLocked(l)
		if !l.releasing {
			lost = append(lost, l)
		}
	}
	p.mu.Unlock()
	c.mu.Unlock()
	for _, l := range lost {
		l.lose(LossConnectionLost, fmt.Errorf("%s: %w", reason, err))
	}
	// Closing the socket is safe while another goroutine uses the connection:
	// its statement fails at once.
	_ = s.conn.PgConn().Conn().Close()
	c.log.Warn("pglease: advisory connection lost", "backend_pid", s.pid, "reason", reason, "error", err, "locks", len(locks))
}

// dropConnLocked marks s dead and forgets its locks, which it returns
// (p.mu held; the caller drops them from the Client).
func (p *pinSet) dropConnLocked(s *pinnedConn) []*Lock {
	s.dead = true
	close(s.stop)
	for i, x := range p.conns {
		if x == s {
			p.conns = append(p.conns[:i], p.conns[i+1:]...)
			break
		}
	}
	locks := make([]*Lock, 0, len(s.locks))
	for l := range s.locks {
		locks = append(locks, l)
		p.forgetLocked(l)
	}
	return locks
}

// forgetLocked drops l from its connection (p.mu held). Idempotent.
func (p *pinSet) forgetLocked(l *Lock) {
	al := l.mode.(*advisoryLock)
	if _, ok := al.s.locks[l]; ok {
		delete(al.s.locks, l)
		delete(al.s.keys, al.k)
	}
}

// close gives every pinned connection up; their locks end with cause
// ErrClosed. Called by Client.Close.
func (p *pinSet) close() {
	c := p.c
	c.mu.Lock()
	p.mu.Lock()
	p.closed = true
	conns := append([]*pinnedConn(nil), p.conns...)
	var locks []*Lock
	for _, s := range conns {
		locks = append(locks, p.dropConnLocked(s)...)
	}
	for _, l := range locks {
		c.dropLocked(l)
	}
	p.mu.Unlock()
	c.mu.Unlock()
	for _, l := range locks {
		l.cancel(ErrClosed)
	}
	for _, s := range conns {
		_ = s.conn.PgConn().Conn().Close()
	}
	p.wg.Wait()
}
