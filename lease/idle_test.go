package lease_test

// A release wakes only the clients that wait for its key: with a hundred
// clients connected and listening (each waits for a key of its own), a
// release of a key nobody waits for reaches none of them, and a release of a
// key one of them waits for reaches that one alone.

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// notificationTypes are the values of pglease.notification.type.
var notificationTypes = []string{"handoff", "poke", "delete", "truncate", "probe", "other"}

// idleWaiter is one of the hundred clients: it waits for key, which another
// client holds, with the LISTEN connection that waiting needs.
type idleWaiter struct {
	c      *lease.Client
	m      *meterReader
	key    lease.Key
	holder int64  // its holder id
	ch     string // its holder channel
	got    <-chan acquired
}

// notifications returns how many notifications of each type w's client has
// received.
func (w *idleWaiter) notifications() map[string]int64 {
	n := make(map[string]int64, len(notificationTypes))
	for _, typ := range notificationTypes {
		n[typ] = w.m.sum("pglease.listener.notifications", notified(typ))
	}
	return n
}

// want fails the test unless w has received exactly the counts of want for
// every type but probe (a client's own self-test; types not in want: 0).
func (w *idleWaiter) want(t *testing.T, what string, want map[string]int64) {
	t.Helper()
	got := w.notifications()
	for _, typ := range notificationTypes {
		if typ != "probe" && got[typ] != want[typ] {
			t.Fatalf("%s: the waiter of %s received %d %q notifications, want %d (all: %v)", what, w.key, got[typ], typ, want[typ], got)
		}
	}
}

func TestIdleListenersNotWoken(t *testing.T) {
	t.Parallel()
	const (
		clients = 100
		cycles  = 50
		// Each waiting client has a pool of conns and a LISTEN connection:
		// more than the shared cluster's 300 connections leave room for,
		// next to the other tests. This test gets a cluster of its own.
		conns = 2
	)
	cl := pgtest.Owned(t, pgtest.Options{NoFsync: true, Settings: map[string]string{"max_connections": "400"}})
	e := newEnvOn(t, cl)
	e.logQueuesOnFailure()
	newClient := func(cfg lease.Config) *lease.Client {
		t.Helper()
		app := fmt.Sprintf("%s-c%d", e.db.Schema, e.n.Add(1))
		pool := pgtest.NewPool(t, cl, app, func(c *pgxpool.Config) { c.MaxConns = conns })
		cfg.Schema = e.db.Schema
		c, err := lease.New(pool, &cfg)
		if err != nil {
			t.Fatalf("lease.New: %v", err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := c.Close(ctx); err != nil {
				t.Errorf("close: %v", err)
			}
		})
		return c
	}
	var channel string
	if err := e.db.Pool.QueryRow(e.ctx, "SELECT "+e.table("channel")+"()").Scan(&channel); err != nil {
		t.Fatal(err)
	}

	// One client holds the hundred keys; each of the hundred waits for one.
	holder := newClient(slowTimers)
	wctx, cancel := context.WithCancel(e.ctx)
	waiters := make([]*idleWaiter, clients)
	held := make([]*lease.Lock, clients)
	for i := range waiters {
		k := lease.Key{Name: "idle", ID: strconv.Itoa(i)}
		held[i] = mustAcquire(t, e.ctx, holder, k)
		m := newMeterReader(t)
		cfg := slowTimers
		cfg.MeterProvider = m.mp
		waiters[i] = &idleWaiter{c: newClient(cfg), m: m, key: k}
	}
	// The waiters' ctx is cancelled, and their Acquires awaited, before the
	// clients close (cleanups run last first).
	t.Cleanup(func() {
		cancel()
		for _, w := range waiters {
			if w == nil || w.got == nil {
				continue
			}
			select {
			case r := <-w.got:
				if r.err == nil {
					t.Errorf("the waiter of %s acquired it after the test", w.key)
				} else if !errors.Is(r.err, context.Canceled) {
					t.Errorf("the waiter of %s: %v, want context.Canceled", w.key, r.err)
				}
			case <-time.After(waitLimit):
				t.Errorf("the waiter of %s did not return after its ctx was cancelled", w.key)
			}
		}
	})
	// Start them in batches, each listening before the next batch starts, so
	// that a hundred self-tests at once do not outlast their timeout on a
	// busy machine.
	const batch = 20
	for start := 0; start < clients; start += batch {
		for _, w := range waiters[start : start+batch] {
			w.got = goAcquire(wctx, w.c, w.key)
		}
		for _, w := range waiters[start : start+batch] {
			eventually(t, 2*waitLimit, fmt.Sprintf("the waiter of %s to listen", w.key), func() bool {
				return lease.Listening(w.c) && lease.Subscriptions(w.c) == 1
			})
		}
	}
	for _, w := range waiters {
		id, ok := w.c.HolderID()
		if !ok {
			t.Fatalf("the waiter of %s has no holder", w.key)
		}
		w.holder, w.ch = id, channel+"_"+strconv.FormatInt(id, 10)
		// In the database's queue, alone.
		e.awaitQueue(w.key, []int64{id}, fmt.Sprintf("the waiter of %s queued", w.key))
	}

	// settle sends one marker on every waiter's holder channel and waits until
	// each has received it (as "other": it is neither a handoff nor a poke).
	// Notifications reach a listener in commit order, so whatever was
	// committed before the markers has then arrived too.
	markers := int64(0)
	settle := func(what string) {
		t.Helper()
		markers++
		tx, err := e.db.Pool.Begin(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range waiters {
			if _, err := tx.Exec(e.ctx, "SELECT pg_notify($1, $2)", w.ch, "marker "+strconv.FormatInt(markers, 10)); err != nil {
				t.Fatal(err)
			}
		}
		if err := tx.Commit(e.ctx); err != nil {
			t.Fatal(err)
		}
		for _, w := range waiters {
			eventually(t, waitLimit, fmt.Sprintf("%s: the waiter of %s to receive marker %d", what, w.key, markers), func() bool {
				return w.m.sum("pglease.listener.notifications", notified("other")) >= markers
			})
		}
	}
	settle("before the releases")
	for _, w := range waiters {
		w.want(t, "while waiting", map[string]int64{"other": markers})
	}

	// (a) A further client takes and releases a key nobody waits for, many
	// times: no waiting client hears of it, nor does a plain LISTEN on the
	// schema's channel (nobody is marked as listening there).
	raw := e.rawListener()
	other := newClient(slowTimers)
	for i := range cycles {
		l := mustAcquire(t, e.ctx, other, lease.Key{Name: "unwatched", ID: "1"})
		if l.Token() <= held[clients-1].Token() {
			t.Fatalf("cycle %d: token %d, not above the held keys' %d", i, l.Token(), held[clients-1].Token())
		}
		mustRelease(t, e.ctx, l)
	}
	if got := e.nextNotifications(raw, "probe unwatched"); len(got) != 0 {
		t.Fatalf("releases of an unwatched key notified the schema's channel: %q", got)
	}
	settle("after the unwatched releases")
	for _, w := range waiters {
		w.want(t, fmt.Sprintf("after %d releases of an unwatched key", cycles), map[string]int64{"other": markers})
		select {
		case r := <-w.got:
			t.Fatalf("the waiter of %s returned (%v, %v) while its key was held", w.key, r.l, r.err)
		default:
		}
	}

	// (b) A release of one waiter's key hands it that key, with one
	// notification to it and none to the other 99.
	const served = 37
	w := waiters[served]
	mustRelease(t, e.ctx, held[served])
	r := await(t, w.got, "the waiter of the released key")
	w.got = nil
	if r.err != nil {
		t.Fatalf("the waiter of the released key: %v", r.err)
	}
	if r.l.Token() <= held[served].Token() {
		t.Fatalf("handed token %d, not above the released %d", r.l.Token(), held[served].Token())
	}
	settle("after the release of a watched key")
	for i, x := range waiters {
		want := map[string]int64{"other": markers}
		if i == served {
			want["handoff"] = 1
		}
		x.want(t, "after one release of a watched key", want)
	}
	if got := e.nextNotifications(raw, "probe watched"); len(got) != 0 {
		t.Fatalf("a handoff notified the schema's channel: %q", got)
	}
	mustRelease(t, e.ctx, r.l)
}
