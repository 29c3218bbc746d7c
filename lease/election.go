package lease

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Leader election: "exactly one of these processes does X", on a table-mode
// lock of one key. The leader is whoever holds the key; leadership ends as
// the lock does (Release, a lost lease, a row deleted by a DBA), and a
// leader's writes are fenced with its lock's token, so a leader that was
// paused past its lease cannot write after its successor began.

// ErrNoLeader: nobody leads the election right now (Election.Leader).
var ErrNoLeader = errors.New("lease: no leader")

// Election is one leader election: every process that campaigns on the same
// key (and schema) takes part. Get one with Client.Election.
type Election struct {
	c   *Client
	key Key
}

// Leader is who leads an election, as the database saw it.
type Leader struct {
	HolderID    int64
	Host        string
	PID         int32
	Application string
	// Since is when the leader acquired the key (the database's clock).
	Since time.Time
	// Token is the leader's fencing token: a later leader has a larger one.
	Token int64
	// ExpiresIn is how long the leader's lease had left when it was read:
	// if it does not renew, another campaigner takes over after that.
	ExpiresIn time.Duration
}

// Election returns the election on key. Campaigning, resigning and
// observing all go through the Client: its holder is the candidate.
func (c *Client) Election(key Key) (*Election, error) {
	if err := key.Validate(); err != nil {
		return nil, err
	}
	return &Election{c: c, key: key}, nil
}

// Key is the key the election runs on.
func (e *Election) Key() Key { return e.key }

// Campaign blocks until this client leads, or ctx ends. The returned Lock is
// the leadership: its Context ends when leadership ends (with a *LostError
// saying why, or ErrReleased), Fence guards the leader's writes, and Release
// resigns. Within the ctx of a campaign it won (Client.Do style reentry)
// it returns ErrAlreadyHeld; another goroutine of the same client that
// campaigns waits for this leadership to end, as Acquire does.
func (e *Election) Campaign(ctx context.Context) (*Lock, error) {
	return e.c.Acquire(ctx, e.key)
}

// TryCampaign leads at once if nobody else does, and otherwise returns a
// *LockedError (ErrLocked) naming the leader.
func (e *Election) TryCampaign(ctx context.Context) (*Lock, error) {
	return e.c.TryAcquire(ctx, e.key)
}

// Leader reports who leads now, without campaigning, or ErrNoLeader. A
// leader whose lease has run out no longer leads, even while its row is
// still there.
func (e *Election) Leader(ctx context.Context) (Leader, error) {
	var l Leader
	var us int64
	err := e.c.pool.QueryRow(ctx, e.c.q.leader, e.key.Name, e.key.ID).Scan(
		&l.HolderID, &l.Host, &l.PID, &l.Application, &l.Since, &l.Token, &us)
	if errors.Is(err, pgx.ErrNoRows) {
		return Leader{}, ErrNoLeader
	}
	if err != nil {
		return Leader{}, fmt.Errorf("lease: election %s: read the leader: %w", e.key, err)
	}
	l.ExpiresIn = time.Duration(us) * time.Microsecond
	return l, nil
}

// Observe sends who leads at once, and again each time that changes (a new
// token), with the zero Leader while nobody leads. It wakes on the key's
// release notifications, when the leader's lease would run out, and every
// PollInterval in case a notification was missed. A new leader commits no
// notification, so while nobody leads it looks again soon (after 5 ms,
// doubling up to PollInterval) to catch the successor, who usually follows
// within milliseconds of a release or of the old leader's expiry. Failed
// reads are retried at
// the next wake-up. The channel is closed when ctx ends or the client
// closes. Only the latest state matters: a receiver that falls behind gets
// the newest leader, not every one in between.
func (e *Election) Observe(ctx context.Context) <-chan Leader {
	out := make(chan Leader, 1)
	c := e.c
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		close(out)
		return out
	}
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		defer close(out)
		sub := c.disp.Subscribe(e.key.mapKey(), true) // every release of the key
		defer sub.Close()
		var last Leader
		first := true
		const soonFirst = 5 * time.Millisecond
		soon := soonFirst // the next delay while nobody leads: short after a leader, then backing off
		for {
			wake := sub.C() // before the read: a release after it still wakes us
			next := c.cfg.PollInterval
			l, err := e.Leader(ctx)
			switch {
			case err == nil || errors.Is(err, ErrNoLeader):
				if first || l.Token != last.Token {
					first, last = false, l
					select { // replace an unread older state
					case <-out:
					default:
					}
					out <- l
				}
				if err == nil {
					soon = soonFirst
					if l.ExpiresIn+time.Millisecond < next {
						next = l.ExpiresIn + time.Millisecond
					}
				} else {
					next = min(soon, next)
					soon = min(2*soon, c.cfg.PollInterval)
				}
			case ctx.Err() != nil:
				return
			}
			t := time.NewTimer(next)
			select {
			case <-wake:
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			case <-c.closing:
				t.Stop()
				return
			}
			t.Stop()
		}
	}()
	return out
}
