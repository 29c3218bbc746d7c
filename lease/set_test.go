package lease_test

// Tests of key sets: every key of a set or none, in one statement; sets that
// overlap and are asked for in any order never deadlock, never exclude each
// other wrongly and never let each other in at once; tokens grow per key in
// grant order; the loss of any key ends the set; bad sets are refused before
// any SQL.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/pglease/pglease/lease"
)

// exclusiveSet is a set of keys, each exclusive.
func exclusiveSet(keys ...lease.Key) []lease.SetMember {
	m := make([]lease.SetMember, len(keys))
	for i, k := range keys {
		m[i] = lease.SetMember{Key: k}
	}
	return m
}

// waiterRows counts every row of the waiters table.
func (e *env) waiterRows() int {
	e.t.Helper()
	return e.count("SELECT count(*) FROM " + e.table("waiters"))
}

// lockTokens returns the tokens of the lock rows of k, in token order.
func (e *env) lockTokens(k lease.Key) []int64 {
	e.t.Helper()
	rows, err := e.db.Pool.Query(e.ctx, "SELECT token FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2 ORDER BY token", k.Name, k.ID)
	if err != nil {
		e.t.Fatal(err)
	}
	tokens, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		e.t.Fatal(err)
	}
	return tokens
}

// Six clients, three goroutines each, ask again and again for sets of two to
// five of eight keys, each key given in a random order and some shared. What
// must hold:
//   - no deadlock: every AcquireSet returns well within 20 seconds;
//   - exclusion: while a key is held exclusively nobody else holds it, seen
//     by counters in the test and by the lock rows in every snapshot;
//   - all or nothing: a checker takes snapshots (REPEATABLE READ) of the
//     lock rows over and over. A set is marked in a table before its release
//     starts; in every snapshot where a granted set is not marked, either
//     every token of it is visible or none is. A grant made in more than one
//     transaction, or one that left out a key, shows as a part of a set;
//   - tokens in grant order: a fenced transaction of each holder checks its
//     token against the last exclusive and the largest shared token of each
//     key, and counts exclusive sections with a read-then-write that loses
//     updates if two writers overlap;
//   - nothing left: no lock row and no waiter row at the end.
func TestSetsOverlappingNoDeadlockAllOrNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	counters, releasing := e.table("set_counters"), e.table("set_releasing")
	e.exec("CREATE TABLE " + counters + " (k text PRIMARY KEY, n bigint NOT NULL, last_x bigint NOT NULL, max_s bigint NOT NULL)")
	e.exec("CREATE TABLE " + releasing + " (set_id bigint PRIMARY KEY)")
	const nkeys, clients, goroutines, rounds = 8, 6, 3, 6
	keys := make([]lease.Key, nkeys)
	for i := range keys {
		keys[i] = lease.Key{Name: "set", ID: strconv.Itoa(i)}
		e.exec("INSERT INTO "+counters+" VALUES ($1, 0, 0, 0)", keys[i].ID)
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)

	// Every AcquireSet must return within this bound; a deadlock (or a waiter
	// never served) makes one end with the deadline.
	ctx, cancel := context.WithTimeout(e.ctx, 20*time.Second)
	defer cancel()

	type granted struct {
		id     int64
		tokens []int64
		keys   []string
	}
	var (
		mu         sync.Mutex
		grants     []granted
		nextID     atomic.Int64
		writers    [nkeys]atomic.Int32
		readers    [nkeys]atomic.Int32
		xSections  [nkeys]atomic.Int64
		violations atomic.Int64
		wg         sync.WaitGroup
	)
	cs := make([]*lease.Client, clients)
	for ci := range cs {
		cs[ci], _, _ = e.client(lease.Config{})
	}
	for ci, c := range cs {
		for g := range goroutines {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, uint64(ci*goroutines+g)))
				for r := range rounds {
					order := rng.Perm(nkeys)[:2+rng.IntN(4)]
					members := make([]lease.SetMember, len(order))
					for i, ki := range order {
						members[i] = lease.SetMember{Key: keys[ki], Shared: rng.IntN(3) == 0}
					}
					s, err := c.AcquireSet(ctx, members)
					if err != nil {
						if ctx.Err() != nil {
							t.Errorf("client %d goroutine %d round %d: AcquireSet still waiting at the 20 s bound (deadlock, or a waiter never served): %v", ci, g, r, err)
						} else {
							t.Errorf("client %d goroutine %d round %d: AcquireSet: %v", ci, g, r, err)
						}
						return
					}
					locks := s.Locks()
					gr := granted{id: nextID.Add(1)}
					for i, l := range locks {
						if l.Key() != members[i].Key || (l.Kind() == lease.Shared) != members[i].Shared {
							t.Errorf("lock %d of the set is %s %s, asked for %+v", i, l.Kind(), l.Key(), members[i])
						}
						gr.tokens = append(gr.tokens, l.Token())
						gr.keys = append(gr.keys, l.Key().ID)
					}
					mu.Lock()
					grants = append(grants, gr)
					mu.Unlock()

					for i, ki := range order {
						if members[i].Shared {
							readers[ki].Add(1)
							if writers[ki].Load() != 0 {
								violations.Add(1)
								t.Errorf("key %d held shared while held exclusively", ki)
							}
						} else if !writers[ki].CompareAndSwap(0, 1) || readers[ki].Load() != 0 {
							violations.Add(1)
							t.Errorf("key %d held exclusively while held by another", ki)
						}
					}

					// The counters of the set's keys, in key order (so that
					// two shared holders never wait for each other's rows).
					byKey := slices.Clone(order)
					slices.Sort(byKey)
					err = s.BeginTxFunc(ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
						for _, ki := range byKey {
							l := s.Lock(keys[ki])
							if l.Kind() == lease.Shared {
								var lastX int64
								if err := tx.QueryRow(ctx, "UPDATE "+counters+" SET max_s = greatest(max_s, $2) WHERE k = $1 RETURNING last_x",
									keys[ki].ID, l.Token()).Scan(&lastX); err != nil {
									return err
								}
								if l.Token() <= lastX {
									violations.Add(1)
									t.Errorf("key %d: shared token %d not above the last exclusive token %d", ki, l.Token(), lastX)
								}
								continue
							}
							var n, lastX, maxS int64
							if err := tx.QueryRow(ctx, "SELECT n, last_x, max_s FROM "+counters+" WHERE k = $1", keys[ki].ID).Scan(&n, &lastX, &maxS); err != nil {
								return err
							}
							if l.Token() <= lastX || l.Token() <= maxS {
								violations.Add(1)
								t.Errorf("key %d: exclusive token %d not above the last exclusive %d and the largest shared %d", ki, l.Token(), lastX, maxS)
							}
							if _, err := tx.Exec(ctx, "UPDATE "+counters+" SET n = $2, last_x = $3 WHERE k = $1", keys[ki].ID, n+1, l.Token()); err != nil {
								return err
							}
						}
						return nil
					})
					if err != nil {
						t.Errorf("fenced transaction of a held set: %v", err)
					} else {
						for i, ki := range order {
							if !members[i].Shared {
								xSections[ki].Add(1)
							}
						}
					}
					if _, err := e.db.Pool.Exec(ctx, "INSERT INTO "+releasing+" VALUES ($1)", gr.id); err != nil {
						t.Errorf("mark set %d released: %v", gr.id, err)
					}
					for i, ki := range order {
						if members[i].Shared {
							readers[ki].Add(-1)
						} else {
							writers[ki].Store(0)
						}
					}
					if err := s.Release(ctx); err != nil {
						t.Errorf("release of a set: %v", err)
					}
					if !errors.Is(s.Err(), lease.ErrReleased) {
						t.Errorf("set after Release: Err = %v, want ErrReleased", s.Err())
					}
				}
			}()
		}
	}

	// The checker.
	type snapshot struct {
		tokens    map[int64]bool
		releasing map[int64]bool
	}
	var snaps []snapshot
	done := make(chan struct{})
	checked := make(chan struct{})
	go func() {
		defer close(checked)
		for {
			select {
			case <-done:
				return
			default:
			}
			snap := snapshot{tokens: map[int64]bool{}, releasing: map[int64]bool{}}
			err := pgx.BeginTxFunc(ctx, e.db.Pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
				rows, err := tx.Query(ctx, "SELECT token, entity_id, kind::text FROM "+e.table("locks")+" WHERE name = 'set'")
				if err != nil {
					return err
				}
				kinds := map[string]string{}
				for rows.Next() {
					var token int64
					var id, kind string
					if err := rows.Scan(&token, &id, &kind); err != nil {
						return err
					}
					snap.tokens[token] = true
					if kinds[id] != "" && (kinds[id] == "x" || kind == "x") {
						violations.Add(1)
						t.Errorf("key %s: an exclusive grant and another grant in one snapshot", id)
					}
					kinds[id] = kind
				}
				if err := rows.Err(); err != nil {
					return err
				}
				rows, err = tx.Query(ctx, "SELECT set_id FROM "+releasing)
				if err != nil {
					return err
				}
				ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
				for _, id := range ids {
					snap.releasing[id] = true
				}
				return err
			})
			if err != nil {
				if ctx.Err() == nil {
					t.Errorf("checker: %v", err)
				}
				return
			}
			snaps = append(snaps, snap)
		}
	}()
	wg.Wait()
	close(done)
	<-checked

	// All or nothing, in every snapshot (of the sets granted, if some
	// goroutine failed).
	partial, seenWhole := 0, 0
	for si, snap := range snaps {
		for _, g := range grants {
			if snap.releasing[g.id] {
				continue
			}
			visible := 0
			for _, tok := range g.tokens {
				if snap.tokens[tok] {
					visible++
				}
			}
			switch visible {
			case 0:
			case len(g.tokens):
				seenWhole++
			default:
				partial++
				if partial <= 5 {
					t.Errorf("snapshot %d shows %d of the %d keys %v (tokens %v) of a set before its release", si, visible, len(g.tokens), g.keys, g.tokens)
				}
			}
		}
	}
	if partial > 0 {
		t.Fatalf("%d partial grants seen", partial)
	}
	if t.Failed() {
		t.FailNow()
	}
	if seenWhole == 0 {
		t.Fatalf("the checker's %d snapshots never saw a held set: it checked nothing", len(snaps))
	}
	if v := violations.Load(); v != 0 {
		t.Fatalf("%d violations", v)
	}
	for ki, k := range keys {
		if n := int64(e.count("SELECT n FROM "+counters+" WHERE k = $1", k.ID)); n != xSections[ki].Load() {
			t.Errorf("key %d: counter %d, exclusive sections %d (lost updates: two writers at once)", ki, n, xSections[ki].Load())
		}
	}
	if len(grants) != clients*goroutines*rounds {
		t.Errorf("%d sets granted, want %d", len(grants), clients*goroutines*rounds)
	}
	attempts := int64(0)
	for _, c := range cs {
		attempts += lease.Attempts(c)
	}
	if attempts <= int64(len(grants)) {
		t.Errorf("%d acquire statements for %d grants: no set ever waited, so the test tested no queue", attempts, len(grants))
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks")); n != 0 {
		t.Errorf("%d lock rows left after every release", n)
	}
	if n := e.waiterRows(); n != 0 {
		t.Errorf("%d waiter rows left after every set was granted", n)
	}
	t.Logf("%d sets granted with %d acquire statements; %d snapshots, %d sightings of a whole held set", len(grants), attempts, len(snaps), seenWhole)
}

// TryAcquireSet of free keys takes them all with one acquire statement, for
// one key, a few, and MaxSetKeys. A set with one key held by someone else
// (exclusively, or shared where the set asks for it exclusively) is refused
// with a *LockedError naming that key and its holder, after one statement,
// and leaves no row of its other keys and no waiter row; the same set with
// the key asked for shared, beside a shared holder, is granted.
func TestTryAcquireSetAllOrNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.client(slowTimers)
	b, _, _ := e.client(slowTimers)
	mustRelease(t, e.ctx, mustAcquire(t, e.ctx, b, lease.Key{Name: "register", ID: "b"})) // b's holder row, before counting
	hb, _ := b.HolderID()

	for _, n := range []int{1, 3, lease.MaxSetKeys} {
		members := make([]lease.SetMember, n)
		for i := range members {
			members[i] = lease.SetMember{Key: lease.Key{Name: "try", ID: fmt.Sprintf("%d-%d", n, i)}, Shared: i%3 == 1}
		}
		before := lease.Attempts(b)
		s, err := b.TryAcquireSet(e.ctx, members)
		if err != nil {
			t.Fatalf("TryAcquireSet of %d free keys: %v", n, err)
		}
		if d := lease.Attempts(b) - before; d != 1 {
			t.Fatalf("TryAcquireSet of %d free keys sent %d acquire statements, want 1", n, d)
		}
		locks := s.Locks()
		if len(locks) != n {
			t.Fatalf("%d locks in a set of %d", len(locks), n)
		}
		for i, l := range locks {
			m := members[i]
			if l.Key() != m.Key || (l.Kind() == lease.Shared) != m.Shared || s.Lock(m.Key) != l {
				t.Fatalf("lock %d: %s %s, asked for %+v", i, l.Kind(), l.Key(), m)
			}
			if got := e.lockTokens(m.Key); len(got) != 1 || got[0] != l.Token() || e.rowsOf(m.Key, hb) != 1 {
				t.Fatalf("rows of %s: tokens %v, want b's one row with token %d", m.Key, got, l.Token())
			}
		}
		if err := s.Release(e.ctx); err != nil {
			t.Fatalf("release: %v", err)
		}
		for _, l := range locks {
			if !errors.Is(l.Err(), lease.ErrReleased) {
				t.Fatalf("lock of %s after the set's release: %v", l.Key(), l.Err())
			}
		}
		if !closed(s.Done()) || !errors.Is(s.Err(), lease.ErrReleased) {
			t.Fatalf("set after Release: Err %v", s.Err())
		}
		if left := e.count("SELECT count(*) FROM " + e.table("locks") + " WHERE name = 'try'"); left != 0 {
			t.Fatalf("%d rows left after releasing a set of %d", left, n)
		}
	}

	keys := []lease.Key{{Name: "part", ID: "a"}, {Name: "part", ID: "b"}, {Name: "part", ID: "c"}}
	refused := func(what string, members []lease.SetMember, held lease.Key, holder int64) {
		t.Helper()
		before := lease.Attempts(b)
		s, err := b.TryAcquireSet(e.ctx, members)
		var le *lease.LockedError
		if !errors.Is(err, lease.ErrLocked) || !errors.As(err, &le) || s != nil {
			t.Fatalf("%s: set %v, error %v; want a *LockedError", what, s, err)
		}
		if le.Key != held || le.HolderID != holder {
			t.Fatalf("%s: refused naming %s held by %d, want %s held by %d", what, le.Key, le.HolderID, held, holder)
		}
		if d := lease.Attempts(b) - before; d != 1 {
			t.Fatalf("%s: %d acquire statements, want 1", what, d)
		}
		for _, k := range keys {
			if n := e.rowsOf(k, hb); n != 0 {
				t.Fatalf("%s: b has %d rows of %s after the refusal", what, n, k)
			}
		}
		if n := e.waiterRows(); n != 0 {
			t.Fatalf("%s: %d waiter rows after a try", what, n)
		}
		if n := lease.KeyStates(b); n != 0 {
			t.Fatalf("%s: b keeps state for %d keys", what, n)
		}
	}
	for pos, k := range keys { // the held key first, in the middle, last
		la := mustAcquire(t, e.ctx, a, k)
		refused(fmt.Sprintf("%s held exclusively", k), exclusiveSet(keys...), k, la.HolderID())
		mustRelease(t, e.ctx, la)
		if pos == 1 {
			ls, err := a.AcquireShared(e.ctx, k)
			if err != nil {
				t.Fatal(err)
			}
			refused(fmt.Sprintf("%s held shared, asked exclusively", k), exclusiveSet(keys...), k, ls.HolderID())
			members := exclusiveSet(keys...)
			members[pos].Shared = true
			s, err := b.TryAcquireSet(e.ctx, members)
			if err != nil {
				t.Fatalf("set asking %s shared beside a shared holder: %v", k, err)
			}
			if n := len(e.lockTokens(k)); n != 2 {
				t.Fatalf("%d grants of %s, want a's and b's shared ones", n, k)
			}
			if err := s.Release(e.ctx); err != nil {
				t.Fatal(err)
			}
			mustRelease(t, e.ctx, ls)
		}
	}
}

// AcquireSet of a set with one key held waits holding none of its keys,
// queued on every one of them (the free ones too, so a newcomer's try of a
// free key of the set is refused: it would overtake the set), and takes
// them all when the held key is released.
func TestAcquireSetWaitsHoldingNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.logQueuesOnFailure()
	a, _, _ := e.client(slowTimers)
	b, _, _ := e.client(slowTimers)
	c, _, _ := e.client(slowTimers)
	warmUp(t, e, b)
	hb := holderOf(t, b)
	keys := []lease.Key{{Name: "wait-set", ID: "1"}, {Name: "wait-set", ID: "2"}, {Name: "wait-set", ID: "3"}}
	la := mustAcquire(t, e.ctx, a, keys[1])

	got := make(chan *lease.LockSet, 1)
	go func() {
		s, err := b.AcquireSet(e.ctx, exclusiveSet(keys...))
		if err != nil {
			t.Errorf("AcquireSet: %v", err)
		}
		got <- s
	}()
	for _, k := range keys {
		e.awaitQueue(k, []int64{hb}, fmt.Sprintf("b queued on %s", k))
	}
	for _, k := range keys {
		if n := e.rowsOf(k, hb); n != 0 {
			t.Fatalf("b has %d rows of %s while its set waits", n, k)
		}
	}
	if _, err := c.TryAcquire(e.ctx, keys[0]); !errors.Is(err, lease.ErrLocked) {
		t.Fatalf("TryAcquire of a free key a waiting set is queued on: %v, want ErrLocked", err)
	}
	mustRelease(t, e.ctx, la)
	var s *lease.LockSet
	select {
	case s = <-got:
	case <-time.After(waitLimit):
		t.Fatalf("the set not granted %s after the release", waitLimit)
	}
	if s == nil {
		t.FailNow()
	}
	for _, l := range s.Locks() {
		if got := e.lockTokens(l.Key()); !slices.Equal(got, []int64{l.Token()}) || e.rowsOf(l.Key(), hb) != 1 {
			t.Fatalf("rows of %s: tokens %v, want b's one row with token %d", l.Key(), got, l.Token())
		}
	}
	if n := e.waiterRows(); n != 0 {
		t.Fatalf("%d waiter rows after the set was granted", n)
	}
	if err := s.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
}

// Release of a set releases every key. A member's row deleted by hand (as a
// DBA would) ends the whole set: Done closes, Err is that lock's *LostError,
// Release reports the loss and releases the rest; DoSet reports a loss
// during its callback as ErrLost, and the callback's context ends with it.
func TestSetReleaseAndLoss(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c, _, _ := e.client(fastHeartbeat) // a DBA's DELETE is found by the next heartbeat
	other, _, _ := e.client(slowTimers)
	keys := []lease.Key{{Name: "loss", ID: "1"}, {Name: "loss", ID: "2"}, {Name: "loss", ID: "3"}}
	members := exclusiveSet(keys...)
	members[2].Shared = true
	rowsLeft := func() int {
		return e.count("SELECT count(*) FROM " + e.table("locks") + " WHERE name = 'loss'")
	}

	s, err := c.AcquireSet(e.ctx, members)
	if err != nil {
		t.Fatal(err)
	}
	if n := rowsLeft(); n != 3 {
		t.Fatalf("%d rows for a held set of 3", n)
	}
	if err := s.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Release(e.ctx); err != nil {
		t.Fatalf("second Release: %v, want the first's nil", err)
	}
	if n := rowsLeft(); n != 0 {
		t.Fatalf("%d rows after the set's release", n)
	}

	for _, victim := range []int{0, 2} { // an exclusive member, the shared one
		s, err := c.AcquireSet(e.ctx, members)
		if err != nil {
			t.Fatal(err)
		}
		dead := s.Lock(keys[victim])
		e.exec("DELETE FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2", keys[victim].Name, keys[victim].ID)
		select {
		case <-s.Done():
		case <-time.After(waitLimit):
			t.Fatalf("member %d's row deleted: the set is not reported lost", victim)
		}
		var lost *lease.LostError
		if !errors.As(s.Err(), &lost) || !errors.Is(s.Err(), lease.ErrLost) || lost.Key != keys[victim] || lost.Token != dead.Token() {
			t.Fatalf("set's Err = %v, want the *LostError of %s", s.Err(), keys[victim])
		}
		if !errors.Is(context.Cause(s.Context()), lease.ErrLost) {
			t.Fatalf("set's Context cause %v", context.Cause(s.Context()))
		}
		if err := s.Release(e.ctx); !errors.Is(err, lease.ErrLost) {
			t.Fatalf("Release of a set with a lost member = %v, want ErrLost", err)
		}
		if n := rowsLeft(); n != 0 {
			t.Fatalf("%d rows after releasing a set with a lost member", n)
		}
		// Nothing stays blocked: another client takes every key at once.
		o, err := other.TryAcquireSet(e.ctx, exclusiveSet(keys...))
		if err != nil {
			t.Fatalf("keys of the ended set: %v", err)
		}
		if err := o.Release(e.ctx); err != nil {
			t.Fatal(err)
		}
	}

	var cause error
	err = c.DoSet(e.ctx, members, func(ctx context.Context, s *lease.LockSet) error {
		if _, err := c.Acquire(ctx, keys[0]); !errors.Is(err, lease.ErrAlreadyHeld) {
			return fmt.Errorf("Acquire of a member inside DoSet: %v, want ErrAlreadyHeld", err)
		}
		e.exec("DELETE FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2", keys[1].Name, keys[1].ID)
		select {
		case <-ctx.Done():
			cause = context.Cause(ctx)
			return nil
		case <-time.After(waitLimit):
			return errors.New("the callback's context did not end when a member's row was deleted")
		}
	})
	if !errors.Is(err, lease.ErrLost) || !errors.Is(cause, lease.ErrLost) {
		t.Fatalf("DoSet with a member lost during fn = %v (fn's context ended with %v), want ErrLost", err, cause)
	}
	if n := rowsLeft(); n != 0 {
		t.Fatalf("%d rows after DoSet", n)
	}
	fnErr := errors.New("fn failed")
	if err := c.DoSet(e.ctx, members, func(context.Context, *lease.LockSet) error { return fnErr }); !errors.Is(err, fnErr) || errors.Is(err, lease.ErrLost) {
		t.Fatalf("DoSet whose fn fails = %v, want fn's error alone", err)
	}
	if n := rowsLeft(); n != 0 {
		t.Fatalf("%d rows after DoSet", n)
	}
}

// Bad sets get a *SetError (and an invalid key its *KeyError too) from
// AcquireSet, TryAcquireSet and DoSet, before any SQL: no holder is even
// registered, no row is made, no state is kept and no goroutine is started.
// Not parallel: the goroutine check needs the package to itself.
func TestSetBadInput(t *testing.T) {
	e := newEnv(t)
	c, _, _ := e.client(slowTimers)
	ignore := goleak.IgnoreCurrent()

	many := make([]lease.Key, lease.MaxSetKeys+1)
	for i := range many {
		many[i] = lease.Key{Name: "many", ID: strconv.Itoa(i)}
	}
	k := lease.Key{Name: "bad", ID: "1"}
	cases := []struct {
		name    string
		members []lease.SetMember
		keyErr  bool
	}{
		{"nil", nil, false},
		{"empty", []lease.SetMember{}, false},
		{"duplicate key", exclusiveSet(k, lease.Key{Name: "bad", ID: "2"}, k), false},
		{"duplicate key, once shared", []lease.SetMember{{Key: k}, {Key: k, Shared: true}}, false},
		{"MaxSetKeys+1 keys", exclusiveSet(many...), false},
		{"empty id", exclusiveSet(k, lease.Key{Name: "bad"}), true},
		{"NUL in name", exclusiveSet(lease.Key{Name: "b\x00d", ID: "1"}, k), true},
		{"name over the cap", exclusiveSet(k, lease.Key{Name: strings.Repeat("n", lease.MaxNameBytes+1), ID: "1"}), true},
	}
	for _, tc := range cases {
		for op, f := range map[string]func() (*lease.LockSet, error){
			"AcquireSet":    func() (*lease.LockSet, error) { return c.AcquireSet(e.ctx, tc.members) },
			"TryAcquireSet": func() (*lease.LockSet, error) { return c.TryAcquireSet(e.ctx, tc.members) },
			"DoSet": func() (*lease.LockSet, error) {
				return nil, c.DoSet(e.ctx, tc.members, func(context.Context, *lease.LockSet) error {
					return errors.New("fn ran")
				})
			},
		} {
			s, err := f()
			var se *lease.SetError
			if s != nil || !errors.Is(err, lease.ErrInvalidSet) || !errors.As(err, &se) {
				t.Errorf("%s %s: set %v, err %v; want a *SetError matching ErrInvalidSet", op, tc.name, s, err)
				continue
			}
			var ke *lease.KeyError
			if gotKeyErr := errors.Is(err, lease.ErrInvalidKey) && errors.As(err, &ke); gotKeyErr != tc.keyErr {
				t.Errorf("%s %s: err %v matches ErrInvalidKey (with a *KeyError): %v, want %v", op, tc.name, err, gotKeyErr, tc.keyErr)
			}
		}
	}
	if err := goleak.Find(ignore); err != nil {
		t.Errorf("bad sets started goroutines: %v", err)
	}
	if _, ok := c.HolderID(); ok {
		t.Error("a holder was registered for bad sets only")
	}
	if n := lease.KeyStates(c); n != 0 {
		t.Errorf("c keeps state for %d keys", n)
	}
	if n := lease.Subscriptions(c); n != 0 || lease.ListenerConnections(c) != 0 {
		t.Errorf("%d subscriptions, %d LISTEN connections after bad sets only", n, lease.ListenerConnections(c))
	}
	for _, table := range []string{"holders", "locks", "waiters"} {
		if n := e.count("SELECT count(*) FROM " + e.table(table)); n != 0 {
			t.Errorf("%d rows in %s after bad sets only", n, table)
		}
	}
}
