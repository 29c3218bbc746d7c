package lease_test

// Shared locks on the advisory path (pg_advisory_lock_shared), alone and
// beside the table path's.

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/pglease/pglease/lease"
)

// TestSharedExcludesWriters with every acquisition on a path chosen at
// random: shared and exclusive holders on the table and the advisory path
// exclude each other as on one path.
func TestAdvisorySharedExcludesWriters(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	readersAndWriters(t, e, func(c *lease.Client) [2]func(context.Context, lease.Key) (*lease.Lock, error) {
		if rand.IntN(2) == 0 {
			return [2]func(context.Context, lease.Key) (*lease.Lock, error){c.Advisory().Acquire, c.Advisory().AcquireShared}
		}
		return [2]func(context.Context, lease.Key) (*lease.Lock, error){c.Acquire, c.AcquireShared}
	})
}

// Shared holders on the advisory path share the key with each other and
// with the table path's; an exclusive acquirer on either path is refused
// while any of them holds it, and one that waits gets the key once they
// have released; and while the key is held exclusively on either path, a
// shared acquirer on either is refused. Every release frees the key.
func TestAdvisoryShared(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var cs [4]*lease.Client
	var advs [4]*lease.Advisory
	for i := range cs {
		cs[i], _, _ = e.client(slowTimers)
		advs[i] = cs[i].Advisory()
	}
	k := lease.Key{Name: "adv-shared", ID: "1"}
	ak := advs[0].Key(k)
	type try struct {
		what string
		call func() (*lease.Lock, error)
	}
	refused := func(when string, tries ...try) {
		t.Helper()
		for _, x := range tries {
			l, err := x.call()
			if l != nil {
				_ = l.Release(e.ctx)
			}
			wantLocked(t, when+": "+x.what, l, err)
		}
	}
	exclusiveTries := []try{
		{"table TryAcquire", func() (*lease.Lock, error) { return cs[3].TryAcquire(e.ctx, k) }},
		{"advisory TryAcquire", func() (*lease.Lock, error) { return advs[3].TryAcquire(e.ctx, k) }},
	}
	sharedTries := func(i int) []try {
		return []try{
			{"table TryAcquireShared", func() (*lease.Lock, error) { return cs[i].TryAcquireShared(e.ctx, k) }},
			{"advisory TryAcquireShared", func() (*lease.Lock, error) { return advs[i].TryAcquireShared(e.ctx, k) }},
		}
	}

	// Two advisory shared holders at once, and a table one beside them.
	var shared []*lease.Lock
	for _, a := range advs[:2] {
		l, err := a.TryAcquireShared(e.ctx, k)
		if err != nil {
			t.Fatalf("advisory TryAcquireShared beside %d shared holders: %v", len(shared), err)
		}
		if l.Kind() != lease.Shared || !l.Advisory() {
			t.Fatalf("advisory shared lock of kind %s, advisory %v", l.Kind(), l.Advisory())
		}
		shared = append(shared, l)
	}
	if pids := e.holdersOf(ak); len(pids) != 2 {
		t.Fatalf("%d sessions hold the advisory key, want the 2 shared holders", len(pids))
	}
	lt, err := cs[2].TryAcquireShared(e.ctx, k)
	if err != nil {
		t.Fatalf("table TryAcquireShared beside advisory shared holders: %v", err)
	}
	shared = append(shared, lt)
	for i := 1; i < len(shared); i++ {
		if shared[i].Token() <= shared[i-1].Token() {
			t.Errorf("shared tokens %d then %d: they must grow", shared[i-1].Token(), shared[i].Token())
		}
	}
	refused("3 shared holders", exclusiveTries...)
	// One shared holder left, on either path, still keeps writers out.
	mustRelease(t, e.ctx, shared[0])
	mustRelease(t, e.ctx, shared[1])
	refused("a table shared holder", exclusiveTries...)
	la, err := advs[0].TryAcquireShared(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	mustRelease(t, e.ctx, lt)
	refused("an advisory shared holder", exclusiveTries...)

	// A waiting table writer gets the key after the last shared holder
	// (advisory) releases.
	base := lease.Attempts(cs[3])
	got := goAcquire(e.ctx, cs[3], k)
	eventually(t, waitLimit, "the table writer refused once", func() bool { return lease.Attempts(cs[3]) > base })
	mustRelease(t, e.ctx, la)
	r := await(t, got, "the table writer")
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.l.Token() <= la.Token() {
		t.Errorf("writer's token %d not above the last reader's %d", r.l.Token(), la.Token())
	}
	if pids := e.holdersOf(ak); len(pids) != 0 {
		t.Errorf("the advisory key is still held by %v after every advisory release", pids)
	}
	refused("a table writer", append(sharedTries(0), sharedTries(1)...)...)
	mustRelease(t, e.ctx, r.l)

	// A waiting advisory writer gets the key after table and advisory
	// shared holders release.
	lt, err = cs[2].TryAcquireShared(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	la, err = advs[1].TryAcquireShared(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	gotAdv := goLock(func() (*lease.Lock, error) { return advs[3].Acquire(e.ctx, k) })
	eventually(t, waitLimit, "the advisory writer waiting", func() bool { return e.waitingOn(ak) == 1 })
	mustRelease(t, e.ctx, la)
	mustRelease(t, e.ctx, lt)
	r = await(t, gotAdv, "the advisory writer")
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.l.Token() <= slices.Max([]int64{la.Token(), lt.Token()}) {
		t.Errorf("advisory writer's token %d not above the readers' %d and %d", r.l.Token(), la.Token(), lt.Token())
	}
	refused("an advisory writer", append(sharedTries(0), sharedTries(2)...)...)

	// A waiting advisory reader gets the key after the writer releases.
	gotReader := goLock(func() (*lease.Lock, error) { return advs[0].AcquireShared(e.ctx, k) })
	eventually(t, waitLimit, "the advisory reader waiting", func() bool { return e.waitingOn(ak) == 1 })
	mustRelease(t, e.ctx, r.l)
	r = await(t, gotReader, "the advisory reader")
	if r.err != nil {
		t.Fatal(r.err)
	}
	// DoShared beside it, and the key free after both.
	if err := advs[1].DoShared(e.ctx, k, func(_ context.Context, l *lease.Lock) error {
		if l.Kind() != lease.Shared {
			t.Errorf("DoShared's lock is %s", l.Kind())
		}
		return nil
	}); err != nil {
		t.Fatalf("DoShared beside a shared holder: %v", err)
	}
	mustRelease(t, e.ctx, r.l)
	if pids := e.holdersOf(ak); len(pids) != 0 {
		t.Errorf("the advisory key is still held by %v after every release", pids)
	}
	l, err := advs[3].TryAcquire(e.ctx, k)
	if err != nil {
		t.Fatalf("advisory TryAcquire after every shared release: %v", err)
	}
	mustRelease(t, e.ctx, l)
	e.closeClients(cs[:]...)
	e.keysLeftFree(k)
}
