package lease_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// failoverConfig: a lease long enough to outlive a harness failover (about
// one second) with room to spare, renewed often.
var failoverConfig = lease.Config{
	TTL:          8 * time.Second,
	SafetyMargin: time.Second,
	// A heartbeat every 500ms: retried every 125ms while the primary is gone.
	HeartbeatInterval: 500 * time.Millisecond,
	PollInterval:      300 * time.Millisecond,
	Advisory:          lease.AdvisoryConfig{CheckInterval: 100 * time.Millisecond},
}

// backendOn reports whether pid is a client backend of node i.
func backendOn(t *testing.T, ctx context.Context, rs *pgtest.ReplicaSet, i int, pid uint32) bool {
	t.Helper()
	conn, err := pgx.Connect(ctx, rs.Node(i).URL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, int32(pid)).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// Across a failover to a synchronous standby: a table lock whose holder
// renews in time is kept, never reported lost and never granted to anyone
// else; a waiter queued before the failover gets the key after its release,
// with a larger token; an advisory lock is reported lost with
// LossConnectionLost; the LISTEN connection and the advisory path find the
// new primary by themselves, and the advisory tokens go on growing.
func TestFailoverSynchronous(t *testing.T) {
	t.Parallel()
	rs := pgtest.Replicated(t, pgtest.ReplicaOptions{Standbys: 2, Sync: true, NoFsync: true})
	e := newEnvOn(t, rs.Cluster())
	cfg, logs := withLogs(failoverConfig)
	a, _, _ := e.client(cfg)
	b, _, _ := e.client(failoverConfig)
	key, advKey := lease.Key{Name: "job", ID: "1"}, lease.Key{Name: "adv", ID: "1"}

	held, err := a.Acquire(e.ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	adv, err := a.Advisory().Acquire(e.ctx, advKey)
	if err != nil {
		t.Fatal(err)
	}
	// b waits for the key from before the failover, on a LISTEN connection
	// to the old primary.
	type result struct {
		l   *lease.Lock
		err error
	}
	waited := make(chan result, 1)
	go func() {
		l, err := b.Acquire(e.ctx, key)
		waited <- result{l, err}
	}()
	eventually(t, 10*time.Second, "b's waiter to listen", func() bool {
		return lease.Listening(b) && lease.Subscriptions(b) == 1
	})
	listens := lease.ListenerConnections(b)

	if err := rs.KillPrimary(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	p, err := rs.Failover(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("harness failover (kill to writable new primary): %s", time.Since(killed).Round(time.Millisecond))

	// The advisory lock lived in a session of the old primary.
	select {
	case <-adv.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the advisory lock is not reported lost 5s after its server was killed")
	}
	var lost *lease.LostError
	if !errors.As(adv.Err(), &lost) || lost.Reason != lease.LossConnectionLost {
		t.Fatalf("advisory lock ended with %v; want a LostError for LossConnectionLost", adv.Err())
	}

	// The table lock's holder renews on the new primary: wait until its
	// lease there runs past the moment of the kill plus a full TTL.
	holders := e.table("holders")
	eventually(t, 10*time.Second, "a renewal on the new primary", func() bool {
		var ok bool
		err := e.db.Pool.QueryRow(e.ctx, `SELECT expires_at > clock_timestamp() + $2::interval - interval '500ms'
			FROM `+holders+` WHERE id = $1`, held.HolderID(), failoverConfig.TTL.String()).Scan(&ok)
		return err == nil && ok
	})
	if closed(held.Done()) {
		t.Fatalf("the table lock was reported lost across a synchronous failover: %v", held.Err())
	}
	// The heartbeat's recovery made the client read the new primary's clock.
	eventually(t, 10*time.Second, "the client to notice the new primary", func() bool {
		_, server, _ := a.ServerClockOffset()
		return strings.Contains(server, fmt.Sprintf(":%d timeline 2", rs.Node(p).Port())) &&
			logs.count("the server changed") == 1
	})
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "the server changed") {
			t.Logf("measured: %s", line)
		}
	}
	c, _, _ := e.client(failoverConfig)
	if _, err := c.TryAcquire(e.ctx, key); !errors.Is(err, lease.ErrLocked) {
		t.Fatalf("TryAcquire of a held key on the new primary: %v; want ErrLocked", err)
	}
	select {
	case r := <-waited:
		t.Fatalf("the waiter returned while the key was held: %v, %v", r.l, r.err)
	default:
	}
	eventually(t, 15*time.Second, "b's LISTEN connection on the new primary", func() bool {
		return lease.Listening(b) && lease.ListenerConnections(b) > listens &&
			backendOn(t, e.ctx, rs, p, lease.ListenerPID(b))
	})

	// The advisory path opens a pinned connection on the new primary; its
	// tokens come from the new primary's sequence, bumped past any the old
	// one could have drawn.
	adv2, err := a.Advisory().Acquire(e.ctx, advKey)
	if err != nil {
		t.Fatal(err)
	}
	if adv2.Token() <= adv.Token() {
		t.Fatalf("advisory token %d after the failover, %d before: tokens went back", adv2.Token(), adv.Token())
	}
	if !backendOn(t, e.ctx, rs, p, uint32(lease.AdvisoryBackend(adv2))) {
		t.Fatal("the new advisory lock's pinned connection is not on the new primary")
	}
	if err := adv2.Release(e.ctx); err != nil {
		t.Fatal(err)
	}

	if err := held.Release(e.ctx); err != nil {
		t.Fatalf("release after the failover: %v", err)
	}
	var r result
	select {
	case r = <-waited:
	case <-time.After(15 * time.Second):
		t.Fatal("the waiter queued before the failover did not get the key 15s after its release")
	}
	if r.err != nil {
		t.Fatalf("the waiter queued before the failover: %v", r.err)
	}
	if r.l.Token() <= held.Token() || r.l.Token() <= adv.Token() {
		t.Fatalf("token %d after the failover; before it %d (table) and %d (advisory)", r.l.Token(), held.Token(), adv.Token())
	}
	if err := r.l.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	if n := e.count(`SELECT count(*) FROM ` + e.table("locks")); n != 0 {
		t.Fatalf("%d lock rows left after every lock was released", n)
	}
}

// Contenders on one key across repeated failovers: at most one holds it at
// any time (each holder checks, inside its hold, that nobody else is in),
// and once they stop no row is left locked by nobody.
func TestFailoverMutualExclusion(t *testing.T) {
	t.Parallel()
	rs := pgtest.Replicated(t, pgtest.ReplicaOptions{Standbys: 2, Sync: true, NoFsync: true})
	e := newEnvOn(t, rs.Cluster())
	key := lease.Key{Name: "mx", ID: "1"}
	ctx, stop := context.WithCancel(e.ctx)
	var (
		mu       sync.Mutex
		inside   int
		overlaps int
		grants   int
		lastTok  int64
		goneBack int
	)
	var wg sync.WaitGroup
	for i := 0; i < 3; i++ {
		c, _, _ := e.client(failoverConfig)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				l, err := c.Acquire(ctx, key)
				if err != nil {
					continue // a failed attempt during the failover; try again
				}
				mu.Lock()
				inside++
				if inside > 1 {
					overlaps++
				}
				grants++
				if l.Token() <= lastTok {
					goneBack++
				}
				lastTok = l.Token()
				mu.Unlock()
				select {
				case <-l.Done():
				case <-time.After(20 * time.Millisecond): // the critical section's work
				}
				mu.Lock()
				inside--
				mu.Unlock()
				_ = l.Release(context.Background())
			}
		}()
	}
	for round := 0; round < 2; round++ {
		eventually(t, 20*time.Second, "a grant before the failover", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return grants > round*10+5
		})
		if err := rs.KillPrimary(); err != nil {
			t.Fatal(err)
		}
		old := rs.Primary()
		if _, err := rs.Failover(e.ctx); err != nil {
			t.Fatal(err)
		}
		if err := rs.Rejoin(e.ctx, old, pgtest.Rewind); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 20*time.Second, "grants after the last failover", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return grants > 30
	})
	stop()
	wg.Wait()
	mu.Lock()
	t.Logf("%d grants across 2 failovers", grants)
	defer mu.Unlock()
	if overlaps > 0 || goneBack > 0 {
		t.Fatalf("%d overlapping holds and %d tokens not above the one before, in %d grants", overlaps, goneBack, grants)
	}
	// A release that failed during a failover is retried after a renewal.
	eventually(t, 10*time.Second, "no lock row left once every contender released", func() bool {
		return e.count(`SELECT count(*) FROM `+e.table("locks")) == 0
	})
}

// With the server gone for good, a waiting Acquire keeps trying until its
// context ends and then returns the context's error; TryAcquire returns the
// connection's error at once; releasing an advisory lock whose session died
// with the server reports it lost, not released.
func TestAcquireWhileServerDown(t *testing.T) {
	t.Parallel()
	srv := pgtest.Owned(t, pgtest.Options{NoFsync: true})
	e := newEnvOn(t, srv)
	c, _, _ := e.client(failoverConfig)
	mustRelease(t, e.ctx, mustAcquire(t, e.ctx, c, lease.Key{Name: "down", ID: "0"}))
	// An advisory lock whose connection check would come only in a minute:
	// its Release is the first to find the session gone.
	slow, _, _ := e.client(lease.Config{Advisory: lease.AdvisoryConfig{CheckInterval: time.Minute}})
	adv, err := slow.Advisory().Acquire(e.ctx, lease.Key{Name: "down", ID: "adv"})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Kill(); err != nil {
		t.Fatal(err)
	}
	var lost *lease.LostError
	if err := adv.Release(e.ctx); !errors.As(err, &lost) || lost.Reason != lease.LossConnectionLost {
		t.Fatalf("Release of an advisory lock whose server was killed: %v; want a LostError (LossConnectionLost)", err)
	}
	_, err = c.TryAcquire(e.ctx, lease.Key{Name: "down", ID: "1"})
	if err == nil || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, lease.ErrLocked) {
		t.Fatalf("TryAcquire with the server down: %v; want the connection's error", err)
	}
	ctx, cancel := context.WithTimeout(e.ctx, time.Second)
	defer cancel()
	attempts := lease.Attempts(c)
	_, err = c.Acquire(ctx, lease.Key{Name: "down", ID: "2"})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire with the server down: %v; want the context's deadline", err)
	}
	t.Logf("%d attempts in 1s with the server down", lease.Attempts(c)-attempts)
	if err := srv.Restart(pgtest.Fast); err != nil {
		t.Fatal(err)
	}
	mustRelease(t, e.ctx, mustAcquire(t, e.ctx, c, lease.Key{Name: "down", ID: "3"}))
}
