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
	if strings.Contains(d.SQL, ".acquire_keys(") {
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
// holder, behind the one that holds the key now.
func TestAcquireStalledPastItsLeaseIsNotHandedOut(t *testing.T) {
	t.Parallel()
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
	k := lease.Key{Name: "stalled", ID: "1"}

	warm, err := a.Acquire(e.ctx, lease.Key{Name: "stalled", ID: "warm"}) // registers a's holder
	if err != nil {
		t.Fatal(err)
	}
	if err := warm.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	first, _ := a.HolderID()

	tr.stalling.Store(true)
	got := acquireInBackground(t, e.ctx, a, k)
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
		case la := <-got:
			if la != nil {
				t.Fatalf("a's Acquire returned token %d, granted before its lease ran out, while b holds the key with token %d", la.Token(), lb.Token())
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
	la := <-got
	if la == nil {
		t.FailNow()
	}
	if la.Token() <= lb.Token() {
		t.Errorf("a got token %d after b's %d", la.Token(), lb.Token())
	}
	if err := la.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
}
