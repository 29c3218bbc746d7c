package lease

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/dispatch"
)

// Replication and failover: what the client does when its primary goes away
// and a standby takes over (a waiter keeps waiting through it), and what it
// checks about the server's replication at first use.

// failoverRetryMax bounds the pause of a waiting acquirer between attempts
// while the server cannot be reached.
const failoverRetryMax = 250 * time.Millisecond

// pauseAfterFailure pauses a waiting acquirer whose attempt failed on the
// connection (connectionFailure): that is what a failover looks like from
// here, and the next attempt gets a connection that the multi-host
// connection string takes to the new primary. It returns nil to try again,
// or the cause when ctx ended or the client closed meanwhile.
func (c *Client) pauseAfterFailure(ctx context.Context, err error) error {
	c.log.Debug("pglease: acquire attempt failed on the connection; retrying", "error", err)
	t := time.NewTimer(dispatch.Jitter(min(c.cfg.PollInterval, failoverRetryMax)))
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-c.closing:
		return ErrClosed
	}
}

// connectionFailure reports whether err means the server could not be
// reached or went away, rather than that it refused the request.
func connectionFailure(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	if pgErr, ok := errors.AsType[*pgconn.PgError](err); ok {
		switch pgErr.Code {
		case "57P01", // admin_shutdown: the server is shutting down (a switchover)
			"57P02", // crash_shutdown
			"57P03", // cannot_connect_now: starting up, or promoting
			"25006", // read_only_sql_transaction: a standby, or a demoted primary
			"08000", "08003", "08006", "08001", "08004":
			return true
		}
		return false
	}
	if _, ok := errors.AsType[*pgconn.ConnectError](err); ok {
		return true
	}
	if _, ok := errors.AsType[net.Error](err); ok {
		return true
	}
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, errConnLost) ||
		pgconn.SafeToRetry(err)
}

// ReplicationPolicy says what a Client does when its first check of the
// server (Config.Replication) finds that an acquire's commit does not wait
// for a standby, so that a failover could lose a granted lock.
type ReplicationPolicy int

const (
	// ReplicationWarn logs one warning, naming the setting to change, when
	// the server streams to standbys that its commits do not wait for. A
	// server with no streaming standby in sight is not warned about: there
	// is no standby to fail over to (or it is one the server does not show,
	// as managed services with replicated storage do).
	ReplicationWarn ReplicationPolicy = iota
	// ReplicationRequireSync refuses table locks unless an acquire's commit
	// waits for a synchronous standby: Acquire and TryAcquire return a
	// *ReplicationError. Use it where a double grant after a failover is
	// worse than no lock at all. The advisory path, which does not survive a
	// failover anyway, is not affected.
	ReplicationRequireSync
	// ReplicationIgnore skips the check.
	ReplicationIgnore
)

func (p ReplicationPolicy) String() string {
	switch p {
	case ReplicationWarn:
		return "warn"
	case ReplicationRequireSync:
		return "require-sync"
	case ReplicationIgnore:
		return "ignore"
	}
	return "ReplicationPolicy(" + strconv.Itoa(int(p)) + ")"
}

// ErrNotReplicated is matched by every *ReplicationError.
var ErrNotReplicated = errors.New("lease: acquires are not replicated synchronously")

// ReplicationError reports that an acquire's commit does not wait for a
// standby (with ReplicationRequireSync). It matches ErrNotReplicated.
type ReplicationError struct {
	// Setting is the server setting to change: synchronous_commit or
	// synchronous_standby_names.
	Setting string
	// Value is its current value, as the client's session sees it.
	Value string
	// Standbys is the number of streaming standbys seen in
	// pg_stat_replication; Async how many of them are asynchronous, -1 when
	// the role may not read it.
	Standbys, Async int
}

func (e *ReplicationError) Error() string {
	var seen string
	switch {
	case e.Async > 0:
		seen = fmt.Sprintf("; %d of %d streaming standbys are asynchronous: a failover to one loses the last acquires, renewals and releases (a lock granted twice, a token drawn again)", e.Async, e.Standbys)
	case e.Standbys == 0:
		seen = "; no streaming standby is connected"
	}
	return fmt.Sprintf("lease: an acquire's commit does not wait for a standby: %s is %q%s; "+
		"set synchronous_standby_names with synchronous_commit on (Patroni: synchronous_mode: true), "+
		"or choose another Config.Replication", e.Setting, e.Value, seen)
}

// Is makes errors.Is(err, ErrNotReplicated) true.
func (e *ReplicationError) Is(target error) bool { return target == ErrNotReplicated }

// serverView is what one round trip tells about the server: its replication
// settings and standbys, who it is, and its clock.
type serverView struct {
	syncCommit, syncNames string
	inRecovery            bool
	standbys, async       int // async: -1 when not readable
	identity              string
	offset, uncertainty   time.Duration // server clock - local clock, ± half the round trip
}

// serverViewSQL reads the server's view in one round trip. Standbys are the
// physical walsenders: a logical replication consumer is not one that could
// be promoted.
const serverViewSQL = `WITH standby AS (SELECT sync_state FROM pg_stat_replication
		WHERE (state = 'streaming' OR state IS NULL) AND pid NOT IN
		      (SELECT active_pid FROM pg_replication_slots WHERE slot_type = 'logical' AND active_pid IS NOT NULL))
	SELECT current_setting('synchronous_commit'), current_setting('synchronous_standby_names'),
	pg_is_in_recovery(),
	(SELECT count(*) FROM standby),
	(SELECT CASE WHEN bool_and(sync_state IS NOT NULL) OR count(*) = 0
		THEN count(*) FILTER (WHERE sync_state IN ('async', 'potential')) ELSE -1 END FROM standby),
	coalesce(host(inet_server_addr()), 'local') || ':' || coalesce(inet_server_port()::text, '') || ' timeline ' ||
	CASE WHEN pg_is_in_recovery() THEN '?' ELSE
		(('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int)::text END,
	(extract(epoch FROM clock_timestamp()) * 1000000)::bigint`

// readServerView reads the server's view on a connection of pool, timing
// the query alone (not the connecting) for the clock reading.
func readServerView(ctx context.Context, pool *pgxpool.Pool) (serverView, error) {
	var v serverView
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return v, err
	}
	defer conn.Release()
	var serverMicros int64
	before := time.Now()
	err = conn.QueryRow(ctx, serverViewSQL).Scan(&v.syncCommit, &v.syncNames, &v.inRecovery, &v.standbys, &v.async,
		&v.identity, &serverMicros)
	after := time.Now()
	if err != nil {
		return v, err
	}
	rtt := after.Sub(before)
	local := before.Add(rtt / 2)
	v.offset = time.UnixMicro(serverMicros).Sub(local.Round(0))
	v.uncertainty = rtt / 2
	return v, nil
}

// commitWaits reports whether a commit in this session waits for a standby.
func (v serverView) commitWaits() bool {
	switch v.syncCommit {
	case "on", "remote_write", "remote_apply":
		return strings.TrimSpace(v.syncNames) != ""
	}
	return false
}

// replicationError is the *ReplicationError that v calls for, or nil.
func (v serverView) replicationError() *ReplicationError {
	if v.commitWaits() {
		return nil
	}
	e := &ReplicationError{Setting: "synchronous_standby_names", Value: v.syncNames, Standbys: v.standbys, Async: v.async}
	if strings.TrimSpace(v.syncNames) != "" {
		e.Setting, e.Value = "synchronous_commit", v.syncCommit
	}
	return e
}

// checkReplication runs once, beside the schema check, before the first
// holder registers: it finds out whether an acquire's commit waits for a
// standby and acts on Config.Replication. It also takes the first reading of
// the server's clock (see noteReconnect).
func (c *Client) checkReplication(ctx context.Context) error {
	if c.cfg.Replication == ReplicationIgnore {
		return nil
	}
	v, err := readServerView(ctx, c.pool)
	if err != nil {
		if c.cfg.Replication == ReplicationRequireSync {
			return fmt.Errorf("lease: check replication: %w", err)
		}
		c.log.Warn("pglease: could not check the server's replication", "error", err)
		return nil
	}
	c.noteServer(v)
	e := v.replicationError()
	switch {
	case e == nil:
		c.log.Debug("pglease: acquires wait for a synchronous standby", "synchronous_standby_names", v.syncNames,
			"synchronous_commit", v.syncCommit, "server", v.identity)
		return nil
	case c.cfg.Replication == ReplicationRequireSync:
		return e
	case v.standbys > 0:
		c.log.Warn("pglease: table locks may not survive a failover: acquires do not wait for a standby",
			"setting", e.Setting, "value", e.Value, "standbys", v.standbys, "async_standbys", v.async,
			"hint", "set synchronous_standby_names with synchronous_commit on (Patroni: synchronous_mode: true)")
	}
	return nil
}

// clockDriftShare is the part of SafetyMargin from which a difference
// between the clocks of two primaries is logged as a warning: expiry is
// decided on the primary's clock, so a new primary whose clock is ahead
// shortens every lease by the difference.
const clockDriftShare = 4

// serverClock is the last reading of the server's clock, with a mutex of
// its own.
type serverClock struct {
	mu       sync.Mutex
	seen     bool
	identity string
	offset   time.Duration
}

// noteServer records a reading and compares it with the last one: when the
// server is another node (a failover, a switchover) whose clock differs from
// the old one's by a meaningful part of SafetyMargin, it says so.
func (c *Client) noteServer(v serverView) {
	c.clock.mu.Lock()
	seen, oldID, oldOffset := c.clock.seen, c.clock.identity, c.clock.offset
	c.clock.seen, c.clock.identity, c.clock.offset = true, v.identity, v.offset
	c.clock.mu.Unlock()
	if !seen || oldID == v.identity {
		return
	}
	diff := v.offset - oldOffset
	attrs := []any{"old_server", oldID, "new_server", v.identity,
		"clock_difference", diff.Round(time.Microsecond), "uncertainty", v.uncertainty.Round(time.Microsecond),
		"safety_margin", c.cfg.SafetyMargin}
	if abs(diff)-v.uncertainty > c.cfg.SafetyMargin/clockDriftShare {
		c.log.Warn("pglease: the new primary's clock differs from the old one's by a meaningful part of SafetyMargin; "+
			"keep the clocks of all nodes within SafetyMargin (NTP)", attrs...)
		return
	}
	c.log.Info("pglease: the server changed (a failover or switchover)", attrs...)
}

func abs(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// noteReconnect reads the server's clock again after the heartbeat
// recovered from failures, in the background: the server may be a new
// primary (noteServer).
func (c *Client) noteReconnect(h *holder) {
	if c.cfg.Replication == ReplicationIgnore {
		return
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		ctx, cancel := context.WithTimeout(h.ctx, c.cfg.HeartbeatInterval)
		defer cancel()
		if v, err := readServerView(ctx, c.pool); err == nil {
			c.noteServer(v)
		}
	}()
}

// ServerClockOffset returns the server's clock minus the local clock, as
// last measured (at first use, and after the heartbeat recovered from a
// failure), and the server it was measured on. ok is false before the first
// measurement.
func (c *Client) ServerClockOffset() (offset time.Duration, server string, ok bool) {
	c.clock.mu.Lock()
	defer c.clock.mu.Unlock()
	return c.clock.offset, c.clock.identity, c.clock.seen
}
