package lease_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// stallTracer stands in for a process stopped at the worst moment: while
// stalling, it holds up each acquire statement after its reply arrived and
// before the client reads it (the grant is committed), and each renewal
// before it is sent, until let go.
type stallTracer struct {
	stalling    atomic.Bool
	renewOnly   bool          // hold up the renewals alone
	acquireHeld chan struct{} // gets one value per acquire held up
	letGo       chan struct{} // closed to let everything held go on
	once        sync.Once
}

type stallAcquireKey struct{}

func (s *stallTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if !s.stalling.Load() {
		return ctx
	}
	if strings.Contains(d.SQL, ".renew(") {
		<-s.letGo
	}
	if strings.Contains(d.SQL, ".acquire_keys(") && !s.renewOnly {
		return context.WithValue(ctx, stallAcquireKey{}, true)
	}
	return ctx
}

func (s *stallTracer) TraceQueryEnd(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryEndData) {
	if ctx.Value(stallAcquireKey{}) != nil {
		s.acquireHeld <- struct{}{}
		<-s.letGo
	}
}

// A process stopped after the database granted its acquire, and woken after
// its lease ran out and another holder took the key over, must not be handed
// the lock: the acquire gives the holder up and asks again, under a new
// holder, behind the one that holds the key now. For one key and for a key
// set.
func TestAcquireStalledPastItsLeaseIsNotHandedOut(t *testing.T) {
	t.Parallel()
	k := lease.Key{Name: "stalled", ID: "1"}
	t.Run("key", func(t *testing.T) {
		t.Parallel()
		stalledAcquire(t, k, func(ctx context.Context, c *lease.Client) (int64, func(context.Context) error, error) {
			l, err := c.Acquire(ctx, k)
			if err != nil {
				return 0, nil, err
			}
			return l.Token(), l.Release, nil
		})
	})
	t.Run("set", func(t *testing.T) {
		t.Parallel()
		members := []lease.SetMember{{Key: k}, {Key: lease.Key{Name: "stalled", ID: "2"}}}
		stalledAcquire(t, k, func(ctx context.Context, c *lease.Client) (int64, func(context.Context) error, error) {
			s, err := c.AcquireSet(ctx, members)
			if err != nil {
				return 0, nil, err
			}
			return s.Lock(k).Token(), s.Release, nil
		})
	})
}

// stalledAcquire runs the test above for acquire, which takes k (and maybe
// more) for a client and returns k's token and how to release.
func stalledAcquire(t *testing.T, k lease.Key, acquire func(context.Context, *lease.Client) (int64, func(context.Context) error, error)) {
	e := newEnv(t)
	tr := &stallTracer{acquireHeld: make(chan struct{}, 4), letGo: make(chan struct{})}
	pool := pgtest.NewPool(t, e.db.Cluster, fmt.Sprintf("%s-stalled", e.db.Schema), func(c *pgxpool.Config) {
		c.MaxConns = 4
		c.ConnConfig.Tracer = tr
	})
	a, err := lease.New(pool, &lease.Config{Schema: e.db.Schema, TTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close(context.Background()) })
	letGo := func() { tr.once.Do(func() { close(tr.letGo) }) }
	t.Cleanup(letGo)
	b, _, _ := e.client(lease.Config{})

	warm, err := a.Acquire(e.ctx, lease.Key{Name: "stalled", ID: "warm"}) // registers a's holder
	if err != nil {
		t.Fatal(err)
	}
	if err := warm.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	first, _ := a.HolderID()

	type result struct {
		token   int64
		release func(context.Context) error
	}
	got := make(chan result, 1)
	tr.stalling.Store(true)
	go func() {
		token, release, err := acquire(e.ctx, a)
		if err != nil {
			t.Errorf("a's acquire: %v", err)
		}
		got <- result{token, release}
	}()
	<-tr.acquireHeld // granted, and the client has not heard
	eventually(t, 10*time.Second, "a's lease to run out on the server", func() bool {
		return e.count("SELECT count(*) FROM "+e.table("holders")+" WHERE id = $1 AND expires_at < clock_timestamp()", first) == 1
	})
	lb, err := b.Acquire(e.ctx, k) // takes the dead holder's grant over
	if err != nil {
		t.Fatal(err)
	}
	tr.stalling.Store(false)
	letGo()

	// a must now wait behind b, as a waiter of a new holder.
	deadline := time.Now().Add(30 * time.Second)
	for e.count("SELECT count(*) FROM "+e.table("waiters")+" WHERE name = $1 AND entity_id = $2", k.Name, k.ID) != 1 {
		select {
		case r := <-got:
			if r.release != nil {
				t.Fatalf("a's acquire returned token %d, granted before its lease ran out, while b holds the key with token %d", r.token, lb.Token())
			}
			t.FailNow()
		case <-time.After(5 * time.Millisecond):
			if time.Now().After(deadline) {
				t.Fatal("timed out waiting for a to queue behind b")
			}
		}
	}
	if h, _ := a.HolderID(); h == first {
		t.Errorf("a waits as holder %d, the one whose lease ran out", h)
	}
	if err := lb.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	r := <-got
	if r.release == nil {
		t.FailNow()
	}
	if r.token <= lb.Token() {
		t.Errorf("a got token %d after b's %d", r.token, lb.Token())
	}
	if err := r.release(e.ctx); err != nil {
		t.Fatal(err)
	}
}

// A waiter stopped while the key was handed to it, and woken after its
// lease ran out on the server, must not take the handoff: the grant is a
// dead holder's, free for anyone to take over. (Here the handing
// transaction commits only after the lease ran out, so that the
// notification arrives then; the renewals are held up meanwhile, as in a
// stopped process.) The acquire gives the holder up and takes the key
// under a new one, with a new token.
func TestHandoffStalledPastItsLeaseIsNotHandedOut(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.logQueuesOnFailure()
	tr := &stallTracer{renewOnly: true, letGo: make(chan struct{})}
	pool := pgtest.NewPool(t, e.db.Cluster, fmt.Sprintf("%s-stalled", e.db.Schema), func(c *pgxpool.Config) {
		c.MaxConns = 4
		c.ConnConfig.Tracer = tr
	})
	a, err := lease.New(pool, &lease.Config{Schema: e.db.Schema, TTL: time.Second, PollInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close(context.Background()) })
	letGo := func() { tr.once.Do(func() { close(tr.letGo) }) }
	t.Cleanup(letGo)
	h, _, _ := e.client(slowTimers)
	k := lease.Key{Name: "stalled-handoff", ID: "1"}
	mustAcquire(t, e.ctx, h, k)
	gotA := goAcquire(e.ctx, a, k)
	eventually(t, waitLimit, "a queued and listening", func() bool {
		return e.waiterRows() == 1 && lease.Listening(a)
	})
	first := holderOf(t, a)

	tr.stalling.Store(true)
	tx, err := e.db.Pool.Begin(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	handed, to := e.deleteAndReadHandoff(tx, k)
	if to != first {
		t.Fatalf("the delete handed the key to holder %d, want a's, %d", to, first)
	}
	eventually(t, 10*time.Second, "a's lease to run out on the server", func() bool {
		return e.count("SELECT count(*) FROM "+e.table("holders")+" WHERE id = $1 AND expires_at < clock_timestamp()", first) == 1
	})
	if err := tx.Commit(e.ctx); err != nil {
		t.Fatal(err)
	}
	r := await(t, gotA, "a")
	tr.stalling.Store(false)
	letGo()
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.l.HolderID() == first || r.l.Token() <= handed {
		t.Errorf("a holds token %d as holder %d; want a new holder and a token above %d, the one handed to its dead holder %d",
			r.l.Token(), r.l.HolderID(), handed, first)
	}
	mustRelease(t, e.ctx, r.l)
}
