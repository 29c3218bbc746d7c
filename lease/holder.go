package lease

import (
	"context"
	"crypto/rand"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
)

// The holder: one row of the holders table per Client, renewed by the
// heartbeat with one statement per HeartbeatInterval however many table
// locks the client holds.

// holder is one row of the holders table, from this client's point of view.
// Fields are guarded by Client.mu.
type holder struct {
	id       int64
	channel  string          // where the database tells it of handoffs (see serve in migration 7)
	secret   []byte          // the holder's credential (see register in migration 5)
	deadline time.Time       // local: start of last good renewal + TTL - SafetyMargin
	locks    map[int64]*Lock // held, by token
	pending  map[int64]Key   // releases that failed; retried after each renewal
	orphans  map[string]Key  // clean-ups of acquires of unknown outcome that failed; retried after each renewal
	seq      uint64          // registration counter of locks
	lost     bool            // given up: never used again
	ctx      context.Context // cancelled when lost: ends the heartbeat and its query
	stop     context.CancelFunc
	// seen is the largest token of a lock this client has made for the
	// holder: a grant of the holder's it did not know of with a larger
	// token was never one of its locks (see grant).
	seen int64
}

// ensureHolder returns the live holder, registering one if needed. The first
// registration checks the schema first.
func (c *Client) ensureHolder(ctx context.Context) (*holder, error) {
	c.mu.Lock()
	for {
		if c.closed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		if c.h != nil && !c.h.lost {
			h := c.h
			c.mu.Unlock()
			return h, nil
		}
		if c.hInit == nil {
			break
		}
		ch := c.hInit
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
		c.mu.Lock()
	}
	init := make(chan struct{})
	c.hInit = init
	checked := c.schemaChecked
	c.mu.Unlock()

	var err error
	have := 0
	if !checked {
		if have, err = schemaVersion(ctx, c.pool, c.cfg.Schema); err == nil {
			err = c.checkReplication(ctx) // replication.go
		}
	}
	start := time.Now()
	var id int64
	secret := newSecret()
	if err == nil {
		err = c.pool.QueryRow(ctx, c.q.register, c.cfg.Owner.Host, c.cfg.Owner.PID, c.cfg.Owner.Application,
			c.cfg.TTL.Microseconds(), secret).Scan(&id)
		if err != nil {
			err = fmt.Errorf("lease: register holder: %w", err)
		}
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	close(init)
	c.hInit = nil
	if err != nil {
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		return nil, err
	}
	if !c.schemaChecked {
		c.schemaChecked, c.schemaHave = true, have
	}
	if c.closed {
		c.startCleanupLocked(id, secret, "client closed while registering")
		return nil, ErrClosed
	}
	h := &holder{
		id:       id,
		channel:  channelName(c.cfg.Schema) + "_" + strconv.FormatInt(id, 10),
		secret:   secret,
		deadline: start.Add(c.cfg.TTL - c.cfg.SafetyMargin),
		locks:    map[int64]*Lock{},
		pending:  map[int64]Key{},
		orphans:  map[string]Key{},
	}
	h.ctx, h.stop = context.WithCancel(context.Background())
	c.h = h
	c.disp.SetHolder(h.channel)
	c.wg.Add(1)
	go c.heartbeat(h, start)
	c.log.Debug("pglease: holder registered", "holder_id", id)
	return h, nil
}

// heartbeat renews h until it is lost or the client closes.
func (c *Client) heartbeat(h *holder, last time.Time) {
	defer c.wg.Done()
	retrying := false
	for {
		c.mu.Lock()
		deadline := h.deadline
		c.mu.Unlock()
		next := last.Add(c.cfg.HeartbeatInterval)
		if retrying {
			next = time.Now().Add(c.cfg.HeartbeatInterval / 4)
		}
		if next.After(deadline) {
			next = deadline
		}
		t := time.NewTimer(time.Until(next))
		select {
		case <-h.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		start := time.Now()
		if !start.Before(deadline) {
			c.loseHolder(h, LossRenewalTimeout)
			return
		}
		// Rows of locks registered up to cutoff committed before this
		// renewal began, so its count includes them.
		c.mu.Lock()
		cutoff := h.seq
		var wantN, wantX int64
		for tok, l := range h.locks {
			if l.mode.(*tableLock).seq <= cutoff {
				wantN++
				wantX ^= tok
			}
		}
		for _, ks := range c.keys {
			if ks.queued {
				wantN++
			}
		}
		c.mu.Unlock()

		ctx, cancel := context.WithDeadline(h.ctx, deadline)
		var alive bool
		var n, x int64
		renewStart := c.met.now() // metrics
		err := c.pool.QueryRow(ctx, c.q.renew, h.id, h.secret).Scan(&alive, &n, &x)
		cancel()
		c.met.renewed(renewStart, renewalOutcomeOf(h.ctx, err, alive)) // metrics
		if err != nil {
			if h.ctx.Err() != nil {
				return
			}
			c.log.Warn("pglease: heartbeat failed", "holder_id", h.id, "error", err,
				"time_left", time.Until(deadline).Round(time.Millisecond))
			retrying = true
			continue
		}
		if !alive {
			c.loseHolder(h, LossHolderExpired)
			return
		}
		c.mu.Lock()
		if h.lost {
			c.mu.Unlock()
			return
		}
		h.deadline = start.Add(c.cfg.TTL - c.cfg.SafetyMargin)
		pending := make(map[int64]Key, len(h.pending))
		for tok, k := range h.pending {
			pending[tok] = k
		}
		orphans := make([]Key, 0, len(h.orphans))
		for _, k := range h.orphans {
			orphans = append(orphans, k)
		}
		c.mu.Unlock()
		if retrying {
			c.noteReconnect(h) // a new primary, perhaps: replication.go
		}
		last, retrying = start, false
		if n != wantN || x != wantX {
			c.verify(h, cutoff)
		}
		for tok, k := range pending {
			c.retryRelease(h, k, tok)
		}
		for _, k := range orphans {
			c.cleanupOrphan(k, h)
		}
	}
}

// verify runs when the heartbeat's count or XOR of h's rows did not match
// the locks the client holds. It reads h's rows and settles every difference:
//   - a lock registered up to cutoff whose row is gone (deleted by a DBA,
//     say) is reported lost;
//   - a row the client does not hold (an acquire cancelled in flight that
//     committed after its clean-up, a release that a crash undid) is an
//     orphan: it would keep the key locked for as long as this client lives,
//     so it is deleted again.
func (c *Client) verify(h *holder, cutoff uint64) {
	ctx, cancel := context.WithTimeout(h.ctx, c.cfg.HeartbeatInterval)
	defer cancel()
	type row struct {
		key   Key
		token int64
	}
	rows, err := c.pool.Query(ctx, c.q.verify, h.id, h.secret)
	if err != nil {
		return
	}
	present, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var x row
		err := r.Scan(&x.key.Name, &x.key.ID, &x.token)
		return x, err
	})
	if err != nil {
		return
	}
	have := make(map[int64]bool, len(present))
	var waits []Key
	locksOnly := present[:0:0]
	for _, r := range present {
		if r.token == 0 {
			waits = append(waits, r.key)
			continue
		}
		have[r.token] = true
		locksOnly = append(locksOnly, r)
	}
	present = locksOnly
	var lost []*Lock
	var orphans []Key
	c.mu.Lock()
	if h.lost {
		c.mu.Unlock()
		return
	}
	for tok, l := range h.locks {
		if l.mode.(*tableLock).seq <= cutoff && !have[tok] {
			c.forgetLocked(l)
			if !l.releasing { // a lock being released is not lost
				lost = append(lost, l)
			}
		}
	}
	for _, k := range waits {
		if ks := c.keys[k.mapKey()]; ks == nil || !ks.wantedLocked() {
			orphans = append(orphans, k)
		}
	}
	for _, r := range present {
		if h.locks[r.token] == nil {
			if _, releasing := h.pending[r.token]; !releasing {
				orphans = append(orphans, r.key)
			}
		}
	}
	c.mu.Unlock()
	for _, l := range lost {
		l.lose(LossRowDeleted, nil)
	}
	for _, k := range orphans {
		c.log.Info("pglease: deleting a lock row this client does not hold", "name", k.Name, "id", k.ID, "holder_id", h.id)
		c.cleanupOrphan(k, h)
	}
}

// onRowDeleted is told by the dispatcher of every lock row deleted. A row of
// ours deleted by someone else (a DBA, say) means the lock is lost.
func (c *Client) onRowDeleted(mk string, token int64) {
	c.mu.Lock()
	ks := c.keys[mk]
	var l *Lock
	if ks != nil {
		for _, x := range ks.held {
			if x.token == token && !x.Advisory() {
				l = x
			}
		}
	}
	if l == nil {
		c.mu.Unlock()
		return
	}
	if l.releasing {
		// Our own release: its notification can arrive before its reply.
		// Dropping it here (release drops it too) lets this client's next
		// acquirer of the key go a little sooner.
		c.forgetLocked(l)
		c.mu.Unlock()
		return
	}
	c.forgetLocked(l)
	c.mu.Unlock()
	l.lose(LossRowDeleted, nil)
}

// loseHolder gives h up: every lock it has is reported lost, and its rows are
// deleted in the background so that others need not wait for the expiry.
func (c *Client) loseHolder(h *holder, reason LossReason) {
	c.mu.Lock()
	if h.lost {
		c.mu.Unlock()
		return
	}
	h.lost = true
	h.stop()
	if c.h == h {
		c.h = nil
		c.disp.SetHolder("")
	}
	locks := make([]*Lock, 0, len(h.locks))
	for _, l := range h.locks {
		locks = append(locks, l)
	}
	for _, l := range locks {
		c.forgetLocked(l)
	}
	if !c.closed {
		c.startCleanupLocked(h.id, h.secret, reason.String())
	}
	c.mu.Unlock()
	c.log.Warn("pglease: holder lost", "holder_id", h.id, "reason", reason.String(), "locks", len(locks))
	for _, l := range locks {
		l.lose(reason, nil)
	}
}

// startCleanupLocked deletes a given-up holder's rows in the background.
func (c *Client) startCleanupLocked(id int64, secret []byte, reason string) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ReleaseTimeout)
		defer cancel()
		if _, err := c.pool.Exec(ctx, c.q.dropHolder, id, secret); err != nil {
			c.log.Debug("pglease: holder clean-up failed; its rows expire with it", "holder_id", id, "reason", reason, "error", err)
		}
	}()
}

// newSecret returns a fresh holder credential: 32 random bytes. Only its
// SHA-256 reaches the database.
func newSecret() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24+)
	return b
}
