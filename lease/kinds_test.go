package lease_test

// Tests of the lock kinds on the table path: shared (reader/writer) locks
// and semaphores of N permits. Each scenario ends by checking that it left
// no key blocked (keysLeftFree). The advisory path's shared locks are in
// kinds_advisory_test.go.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/lease"
)

// hold is one grant as the test saw it, on the process's monotonic clock:
// begin is when its acquire was called, start when it returned, end when its
// holder was about to release it (or saw it end). [start, end] lies inside
// the time the grant was really held, so two such intervals that overlap
// were held at once.
type hold struct {
	key               lease.Key
	kind              lease.Kind
	token             int64
	slot              int
	begin, start, end time.Time
}

// holdLog collects the holds of a test's goroutines.
type holdLog struct {
	mu    sync.Mutex
	holds []hold
}

func (g *holdLog) add(h hold) {
	g.mu.Lock()
	g.holds = append(g.holds, h)
	g.mu.Unlock()
}

func (g *holdLog) all() []hold {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.holds)
}

// count is how many holds match f.
func (g *holdLog) count(f func(hold) bool) int {
	n := 0
	for _, h := range g.all() {
		if f(h) {
			n++
		}
	}
	return n
}

func overlap(a, b hold) bool {
	return a.key == b.key && a.start.Before(b.end) && b.start.Before(a.end)
}

// checkKinds fails t for every pair of holds of one key that overlapped
// although one of them was exclusive, and for every such pair (each kept the
// other out) whose tokens do not grow in the order they held the key. It
// returns how many pairs of shared holds overlapped.
func checkKinds(t *testing.T, holds []hold) (sharedOverlaps int) {
	t.Helper()
	bad := 0
	for i, a := range holds {
		for _, b := range holds[i+1:] {
			if a.key != b.key {
				continue
			}
			exclusive := a.kind == lease.Exclusive || b.kind == lease.Exclusive
			switch {
			case overlap(a, b) && exclusive:
				if bad++; bad <= 5 {
					t.Errorf("%s: a %s hold (token %d) and a %s hold (token %d) overlapped", a.key, a.kind, a.token, b.kind, b.token)
				}
			case overlap(a, b):
				sharedOverlaps++
			case exclusive:
				first, second := a, b
				if b.start.Before(a.start) {
					first, second = b, a
				}
				if first.token >= second.token {
					if bad++; bad <= 5 {
						t.Errorf("%s: %s token %d held after %s token %d: tokens must grow", a.key, second.kind, second.token, first.kind, first.token)
					}
				}
			}
		}
	}
	if bad > 5 {
		t.Errorf("... %d violations in all", bad)
	}
	return sharedOverlaps
}

// checkTokensGrow fails t for every grant whose token is not larger than
// that of every grant of its key that was made before it was asked for.
func checkTokensGrow(t *testing.T, holds []hold) {
	t.Helper()
	bad := 0
	for _, a := range holds {
		for _, b := range holds {
			if a.key == b.key && a.start.Before(b.begin) && a.token >= b.token {
				if bad++; bad <= 5 {
					t.Errorf("%s: token %d granted before token %d was asked for", a.key, a.token, b.token)
				}
			}
		}
	}
}

// maxHeld is how many of holds were held at once, at the most.
func maxHeld(holds []hold) int {
	type ev struct {
		at time.Time
		d  int
	}
	evs := make([]ev, 0, 2*len(holds))
	for _, h := range holds {
		evs = append(evs, ev{h.start, 1}, ev{h.end, -1})
	}
	slices.SortFunc(evs, func(a, b ev) int {
		if c := a.at.Compare(b.at); c != 0 {
			return c
		}
		return a.d - b.d // an end before a start at the same instant
	})
	n, most := 0, 0
	for _, e := range evs {
		n += e.d
		most = max(most, n)
	}
	return most
}

// keyRows counts the rows of key in table (locks or waiters).
func (e *env) keyRows(table string, k lease.Key) int {
	e.t.Helper()
	return e.count("SELECT count(*) FROM "+e.table(table)+" WHERE name = $1 AND entity_id = $2", k.Name, k.ID)
}

// closeClients closes cs and fails the test if a Close fails.
func (e *env) closeClients(cs ...*lease.Client) {
	e.t.Helper()
	for _, c := range cs {
		if err := c.Close(e.ctx); err != nil {
			e.t.Errorf("Close: %v", err)
		}
	}
}

// keysLeftFree checks that a scenario left none of keys blocked, once its
// locks are released and its clients closed: the waiters table empties, a
// fresh client takes each key exclusively at once (taking over whatever a
// dead holder left), and its release leaves no row of the key.
func (e *env) keysLeftFree(keys ...lease.Key) {
	e.t.Helper()
	eventually(e.t, waitLimit, "an empty waiters table", func() bool {
		return e.count("SELECT count(*) FROM "+e.table("waiters")) == 0
	})
	c, _, _ := e.client(lease.Config{})
	for _, k := range keys {
		l, err := c.TryAcquire(e.ctx, k)
		if err != nil {
			e.t.Errorf("%s left blocked: a fresh TryAcquire = %v", k, err)
			continue
		}
		mustRelease(e.t, e.ctx, l)
		if n := e.keyRows("locks", k); n != 0 {
			e.t.Errorf("%s: %d lock rows after the last release", k, n)
		}
	}
	if err := c.Close(e.ctx); err != nil {
		e.t.Errorf("Close: %v", err)
	}
}

// goLock runs acquire in a goroutine and returns where its result goes.
func goLock(acquire func() (*lease.Lock, error)) <-chan acquired {
	ch := make(chan acquired, 1)
	go func() {
		l, err := acquire()
		ch <- acquired{l, err}
	}()
	return ch
}

// pause runs a fenced transaction on l that sleeps in the server: a hold
// that does some work while it lasts.
func pause(ctx context.Context, l *lease.Lock, seconds float64) error {
	return l.BeginTxFunc(ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "SELECT pg_sleep($1)", seconds)
		return err
	})
}

// tryPermit takes a permit of c's semaphore of k with n permits at once, or
// fails t.
func tryPermit(t *testing.T, ctx context.Context, c *lease.Client, k lease.Key, n int) *lease.Lock {
	t.Helper()
	s, err := c.Semaphore(k, n)
	if err != nil {
		t.Fatal(err)
	}
	l, err := s.TryAcquire(ctx)
	if err != nil {
		t.Fatalf("a permit of %s (%d permits): %v", k, n, err)
	}
	return l
}

// holdLoop takes and lets go of k with acquire until ctx ends, each hold a
// fenced transaction of holdFor seconds, and logs every hold.
func holdLoop(t *testing.T, ctx context.Context, log *holdLog, k lease.Key, acquire func(context.Context) (*lease.Lock, error), holdFor float64) {
	for ctx.Err() == nil {
		begin := time.Now()
		l, err := acquire(ctx)
		if err != nil {
			if ctx.Err() == nil {
				t.Errorf("acquire %s: %v", k, err)
			}
			return
		}
		start := time.Now()
		if err := pause(ctx, l, holdFor); err != nil && ctx.Err() == nil {
			t.Errorf("hold of %s token %d: %v", k, l.Token(), err)
		}
		log.add(hold{key: k, kind: l.Kind(), token: l.Token(), slot: l.Slot(), begin: begin, start: start, end: time.Now()})
		if err := l.Release(context.WithoutCancel(ctx)); err != nil {
			t.Errorf("release %s token %d: %v", k, l.Token(), err)
		}
	}
}

// Readers never overlap a writer and writers never overlap each other: 8
// clients × 4 goroutines on 3 keys, two of three acquisitions shared, on the
// table path. Checked three ways: a writer's fenced read-increment-write of
// its key's counter (a lost increment means two writers at once) and a
// reader's two fenced reads of it (a change between them means a writer
// inside a reader's hold); the holds' intervals on the process clock; and
// the tokens, larger for every grant that came after one it excludes.
func TestSharedExcludesWriters(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	readersAndWriters(t, e, func(c *lease.Client) [2]func(context.Context, lease.Key) (*lease.Lock, error) {
		return [2]func(context.Context, lease.Key) (*lease.Lock, error){c.Acquire, c.AcquireShared}
	})
}

// readersAndWriters is TestSharedExcludesWriters. paths returns a client's
// exclusive and shared acquire; it is asked anew for each acquisition.
func readersAndWriters(t *testing.T, e *env, paths func(*lease.Client) [2]func(context.Context, lease.Key) (*lease.Lock, error)) {
	t.Helper()
	counters := e.table("counters")
	e.exec("CREATE TABLE " + counters + " (k text PRIMARY KEY, n bigint NOT NULL, last_token bigint NOT NULL)")
	keys := []lease.Key{{Name: "rw", ID: "1"}, {Name: "rw", ID: "2"}, {Name: "rw", ID: "3"}}
	for _, k := range keys {
		e.exec("INSERT INTO "+counters+" VALUES ($1, 0, 0)", k.ID)
	}
	const clients, goroutines, sections = 8, 4, 8
	var log holdLog
	var writes [3]atomic.Int64
	var violations atomic.Int64
	violation := func(format string, args ...any) {
		if violations.Add(1) <= 5 {
			t.Errorf(format, args...)
		}
	}
	var wg sync.WaitGroup
	var all []*lease.Client
	for range clients {
		c, _, _ := e.client(lease.Config{})
		all = append(all, c)
		for range goroutines {
			wg.Go(func() {
				for range sections {
					ki := rand.IntN(len(keys))
					k := keys[ki]
					shared := rand.IntN(3) > 0
					acquire := paths(c)
					if shared {
						acquire[0] = acquire[1]
					}
					begin := time.Now()
					l, err := acquire[0](e.ctx, k)
					if err != nil {
						t.Errorf("acquire %s (shared %v): %v", k, shared, err)
						return
					}
					start := time.Now()
					want := lease.Exclusive
					if shared {
						want = lease.Shared
					}
					if l.Kind() != want || l.Slot() != 0 || l.Permits() != 0 {
						t.Errorf("lock of kind %s slot %d permits %d, want %s slot 0 permits 0", l.Kind(), l.Slot(), l.Permits(), want)
					}
					err = l.BeginTxFunc(e.ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
						var n, last int64
						if err := tx.QueryRow(e.ctx, "SELECT n, last_token FROM "+counters+" WHERE k = $1", k.ID).Scan(&n, &last); err != nil {
							return err
						}
						if last >= l.Token() {
							violation("%s token %d (shared %v) sees a write by token %d: a writer held it after this grant", k, l.Token(), shared, last)
						}
						if !shared {
							_, err := tx.Exec(e.ctx, "UPDATE "+counters+" SET n = $2, last_token = $3 WHERE k = $1", k.ID, n+1, l.Token())
							return err
						}
						// A reader holds on a while, and reads again: a
						// writer's commit in between would show.
						if _, err := tx.Exec(e.ctx, "SELECT pg_sleep(0.002)"); err != nil {
							return err
						}
						var again int64
						if err := tx.QueryRow(e.ctx, "SELECT n FROM "+counters+" WHERE k = $1", k.ID).Scan(&again); err != nil {
							return err
						}
						if again != n {
							violation("%s: a reader (token %d) saw the counter go from %d to %d during its hold", k, l.Token(), n, again)
						}
						return nil
					})
					end := time.Now()
					if err != nil {
						t.Errorf("critical section on %s: %v", k, err)
					} else if !shared {
						writes[ki].Add(1)
					}
					log.add(hold{key: k, kind: l.Kind(), token: l.Token(), begin: begin, start: start, end: end})
					if err := l.Release(e.ctx); err != nil {
						t.Errorf("release %s: %v", k, err)
					}
				}
			})
		}
	}
	wg.Wait()
	holds := log.all()
	if len(holds) != clients*goroutines*sections {
		t.Fatalf("%d holds, want %d", len(holds), clients*goroutines*sections)
	}
	checkTokensGrow(t, holds)
	shared := checkKinds(t, holds)
	if shared == 0 {
		t.Errorf("no two shared holds overlapped in %d holds: shared locks were not shared", len(holds))
	}
	for i, k := range keys {
		if n := int64(e.count("SELECT n FROM "+counters+" WHERE k = $1", k.ID)); n != writes[i].Load() {
			t.Errorf("%s: counter %d after %d writes (lost increments: two writers at once)", k, n, writes[i].Load())
		}
	}
	t.Logf("%d holds, %d writes, %d pairs of overlapping shared holds", len(holds), writes[0].Load()+writes[1].Load()+writes[2].Load(), shared)
	e.closeClients(all...)
	e.keysLeftFree(keys...)
}

// A semaphore of 3 permits never has more than 3 holders: 8 clients × 2
// goroutines take permits in turn while 3 more clients each take one and die
// holding it (their pools close: no heartbeat gets through, nobody
// releases). The dead permits are taken over by waiters once their leases
// run out, and each dead client reports its loss before that. Checked on the
// process clock (the holds' intervals), in the database (a sampler of the
// held view: never more than 3 live grants, distinct permits 1 to 3), and by
// the slots the locks report.
func TestSemaphoreAtMostN(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const permits, clients, goroutines, dying = 3, 8, 2, 3
	k := lease.Key{Name: "sem", ID: "pool"}
	var log holdLog
	// Everything the test started ends with it, also on a failure.
	sctx, cancel := context.WithCancel(e.ctx)
	var wg sync.WaitGroup
	sampled := make(chan struct{})
	stopAll := sync.OnceFunc(func() {
		cancel()
		wg.Wait()
		<-sampled
	})
	defer stopAll()
	var all []*lease.Client
	for range clients {
		c, _, _ := e.client(lease.Config{})
		all = append(all, c)
		sem, err := c.Semaphore(k, permits)
		if err != nil {
			t.Fatal(err)
		}
		for range goroutines {
			wg.Go(func() { holdLoop(t, sctx, &log, k, sem.Acquire, 0.003) })
		}
	}

	// The database never shows more than permits live grants of the key,
	// nor two on one permit.
	var samples, fullSamples atomic.Int64
	go func() {
		defer close(sampled)
		for sctx.Err() == nil {
			var n, distinct, lo, hi, wrongN int
			err := e.db.Pool.QueryRow(sctx, `SELECT count(*), count(DISTINCT permit), coalesce(min(permit), 1),
				coalesce(max(permit), 1), count(*) FILTER (WHERE kind <> 'permit' OR permits <> $3)
				FROM `+e.table("held")+` WHERE name = $1 AND entity_id = $2 AND alive`, k.Name, k.ID, permits).
				Scan(&n, &distinct, &lo, &hi, &wrongN)
			if err != nil {
				if sctx.Err() == nil {
					t.Errorf("sampling held: %v", err)
				}
				return
			}
			samples.Add(1)
			if n == permits {
				fullSamples.Add(1)
			}
			if n > permits || distinct != n || lo < 1 || hi > permits || wrongN != 0 {
				t.Errorf("held shows %d live grants on %d distinct permits %d..%d (%d not permits of %d)", n, distinct, lo, hi, wrongN, permits)
			}
		}
	}()

	eventually(t, waitLimit, "the semaphore in use", func() bool { return len(log.all()) >= 20 })
	// Clients that die holding a permit: the local deadline (TTL − margin
	// after the last renewal) ends each lock 500 ms before the database
	// lets anyone take it over.
	dyingCfg := lease.Config{TTL: 1500 * time.Millisecond, HeartbeatInterval: 200 * time.Millisecond, SafetyMargin: 500 * time.Millisecond}
	type death struct {
		l      *lease.Lock
		holder int64
	}
	deaths := make(chan death, dying)
	for range dying {
		c, pool, _ := e.client(dyingCfg)
		sem, err := c.Semaphore(k, permits)
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			begin := time.Now()
			l, err := sem.Acquire(sctx)
			if err != nil {
				if sctx.Err() == nil {
					t.Errorf("dying client's Acquire: %v", err)
				}
				return
			}
			start := time.Now()
			pool.Close() // no renewal, release or clean-up gets through from now on
			select {
			case <-l.Done():
			case <-sctx.Done():
				return
			}
			log.add(hold{key: k, kind: l.Kind(), token: l.Token(), slot: l.Slot(), begin: begin, start: start, end: time.Now()})
			deaths <- death{l, l.HolderID()}
		})
	}
	for range dying {
		var d death
		select {
		case d = <-deaths:
		case <-time.After(waitLimit):
			t.Fatal("a dying client's permit was not reported lost")
		}
		var le *lease.LostError
		if !errors.As(d.l.Err(), &le) || le.Reason != lease.LossRenewalTimeout {
			t.Errorf("dying client's permit ended with %v, want a *LostError for the renewal time-out", d.l.Err())
		}
		// Its row goes by a takeover: its holder row is still there (no
		// clean-up got through, no reaper runs).
		eventually(t, waitLimit, fmt.Sprintf("the dead permit (token %d) taken over", d.l.Token()), func() bool {
			return e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE token = $1", d.l.Token()) == 0
		})
		if n := e.count("SELECT count(*) FROM "+e.table("holders")+" WHERE id = $1", d.holder); n != 1 {
			t.Errorf("the dead holder's row is gone (%d): the permit was not taken over but cleaned up", n)
		}
	}
	// The waiters go on after the takeovers.
	last := slices.MaxFunc(log.all(), func(a, b hold) int { return cmp.Compare(a.token, b.token) }).token
	eventually(t, waitLimit, "grants after the takeovers", func() bool {
		return log.count(func(h hold) bool { return h.token > last }) >= 10
	})
	stopAll()

	holds := log.all()
	checkTokensGrow(t, holds)
	if most := maxHeld(holds); most > permits {
		t.Errorf("%d permits held at once, at most %d allowed", most, permits)
	} else if most < permits {
		t.Errorf("at most %d permits held at once under contention: the semaphore never filled its %d", most, permits)
	}
	for i, a := range holds {
		if a.kind != lease.Permit || a.slot < 1 || a.slot > permits {
			t.Errorf("a hold of kind %s on permit %d of %d", a.kind, a.slot, permits)
		}
		for _, b := range holds[i+1:] {
			if overlap(a, b) && a.slot == b.slot {
				t.Errorf("tokens %d and %d held permit %d at once", a.token, b.token, a.slot)
			}
		}
	}
	if fullSamples.Load() == 0 {
		t.Errorf("none of %d samples of held saw all %d permits taken", samples.Load(), permits)
	}
	t.Logf("%d holds, %d samples of held (%d with every permit taken)", len(holds), samples.Load(), fullSamples.Load())
	e.closeClients(all...)
	e.keysLeftFree(k)
}

// A waiting writer is not kept out by a stream of readers: it is served in
// arrival order, before every reader that came after it.
func TestSharedWriterNotStarved(t *testing.T) {
	t.Parallel()
	arrivalOrder(t, newEnv(t), true)
}

// A waiting reader is not kept out by a stream of writers: it is served in
// arrival order, before every writer that came after it.
func TestSharedReaderNotStarved(t *testing.T) {
	t.Parallel()
	arrivalOrder(t, newEnv(t), false)
}

// arrivalOrder runs a stream of holds of one key from 3 clients × 2
// goroutines (overlapping shared holds if readers, else exclusive ones), and
// queues a newcomer of the other kind while the stream runs, behind one more
// holder of the stream's kind (the pin), so that it surely waits; then one
// more acquirer of the stream's kind (the follower) queues behind it, and
// the pin lets go. By the waiting view and the tokens: the newcomer gets the
// key while the stream still runs, after at most the waiters that were
// ahead of it, and before the follower and every stream acquirer that
// started after it queued.
func arrivalOrder(t *testing.T, e *env, readers bool) {
	t.Helper()
	k := lease.Key{Name: "stream", ID: "1"}
	holdFor := 0.003 // seconds: a writer's hold
	if readers {
		holdFor = 0.015 // readers hold longer: they overlap
	}
	var log holdLog
	// The stream's context ends with the test's scenario: a failure that
	// leaves the pin held must not keep the stream waiting for minutes.
	sctx, cancel := context.WithCancel(e.ctx)
	var wg sync.WaitGroup
	var all []*lease.Client
	streamAcquire := func(c *lease.Client) func(context.Context, lease.Key) (*lease.Lock, error) {
		if readers {
			return c.AcquireShared
		}
		return c.Acquire
	}
	for range 3 {
		c, _, _ := e.client(lease.Config{})
		all = append(all, c)
		acquire := streamAcquire(c)
		for range 2 {
			wg.Go(func() {
				holdLoop(t, sctx, &log, k, func(ctx context.Context) (*lease.Lock, error) { return acquire(ctx, k) }, holdFor)
			})
		}
	}
	stopStream := sync.OnceFunc(func() {
		cancel()
		wg.Wait()
	})
	defer stopStream()
	if readers {
		eventually(t, waitLimit, "readers holding at once", func() bool {
			return e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2 AND kind = 's'", k.Name, k.ID) >= 2
		})
	} else {
		eventually(t, waitLimit, "writers queueing", func() bool { return e.keyRows("waiters", k) >= 1 })
	}

	pinClient, _, _ := e.client(lease.Config{})
	late, _, _ := e.client(slowTimers)
	follower, _, _ := e.client(slowTimers)
	all = append(all, pinClient, late, follower)
	warmUp(t, e, late)
	warmUp(t, e, follower)
	lh, _ := late.HolderID()
	fh, _ := follower.HolderID()
	pin, err := streamAcquire(pinClient)(e.ctx, k)
	if err != nil {
		t.Fatalf("pin: %v", err)
	}
	defer func() { _ = pin.Release(e.ctx) }()
	acquire := late.AcquireShared
	if readers {
		acquire = late.Acquire
	}
	begin := time.Now()
	got := goLock(func() (*lease.Lock, error) { return acquire(sctx, k) })
	// Its place, and the last token drawn so far: every grant made after
	// this look has a larger token.
	var position int
	var waiterID, lastToken int64
	place := `SELECT w.position, w.waiter_id, (SELECT last_value FROM ` + e.table("token_seq") + `)
		FROM ` + e.table("waiting") + ` w WHERE w.name = $1 AND w.entity_id = $2 AND w.holder_id = $3`
	eventually(t, waitLimit, "the newcomer queued", func() bool {
		err := e.db.Pool.QueryRow(e.ctx, place, k.Name, k.ID, lh).Scan(&position, &waiterID, &lastToken)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			t.Fatalf("reading the waiting view: %v", err)
		}
		return err == nil
	})
	queuedAt := time.Now()
	if readers {
		// Nor does a try overtake the queued writer, though only readers
		// hold the key.
		l, err := follower.TryAcquireShared(e.ctx, k)
		if l != nil {
			mustRelease(t, e.ctx, l)
		}
		wantLocked(t, "TryAcquireShared while a writer waits", l, err)
	}
	gotFollower := goLock(func() (*lease.Lock, error) { return streamAcquire(follower)(sctx, k) })
	eventually(t, waitLimit, "the follower queued behind the newcomer", func() bool {
		select {
		case rf := <-gotFollower:
			t.Fatalf("the follower, which came after the queued newcomer, got the key first: %v, %v", rf.l != nil, rf.err)
		default:
		}
		var fp int
		var fid, fl int64
		err := e.db.Pool.QueryRow(e.ctx, place, k.Name, k.ID, fh).Scan(&fp, &fid, &fl)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			t.Fatalf("reading the waiting view: %v", err)
		}
		return err == nil && fid > waiterID
	})
	pinToken := pin.Token()
	mustRelease(t, e.ctx, pin)
	r := await(t, got, "the queued newcomer")
	if r.err != nil {
		t.Fatalf("newcomer: %v", r.err)
	}
	l, start := r.l, time.Now()
	if err := pause(e.ctx, l, 0.005); err != nil {
		t.Fatalf("newcomer's hold: %v", err)
	}
	log.add(hold{key: k, kind: l.Kind(), token: l.Token(), begin: begin, start: start, end: time.Now()})
	mustRelease(t, e.ctx, l)
	if n := e.count("SELECT count(*) FROM "+e.table("waiters")+" WHERE holder_id = $1", lh); n != 0 {
		t.Errorf("the served newcomer still has %d waiter rows", n)
	}
	rf := await(t, gotFollower, "the follower")
	if rf.err != nil {
		t.Fatalf("follower: %v", rf.err)
	}
	if rf.l.Token() <= l.Token() {
		t.Errorf("the follower, queued behind the newcomer, got token %d before the newcomer's %d", rf.l.Token(), l.Token())
	}
	mustRelease(t, e.ctx, rf.l)
	// The stream goes on after it.
	eventually(t, waitLimit, "the stream after the newcomer", func() bool {
		return log.count(func(h hold) bool { return h.token > l.Token() }) >= 3
	})

	holds := log.all()
	checkKinds(t, holds)
	if l.Token() <= pinToken {
		t.Errorf("newcomer's token %d not above the pin's %d", l.Token(), pinToken)
	}
	served, overtook, behind := 0, 0, 0
	for _, h := range holds {
		if h.token == l.Token() {
			continue
		}
		if h.token > lastToken && h.token < l.Token() {
			served++ // granted while the newcomer waited: must have been ahead of it
		}
		if h.begin.After(queuedAt) && h.begin.Before(start) {
			behind++ // arrived while it waited
			if h.token < l.Token() {
				overtook++
			}
		}
	}
	if served > position-1 {
		t.Errorf("%d stream grants while the newcomer waited at position %d: more than the %d ahead of it", served, position, position-1)
	}
	if overtook > 0 {
		t.Errorf("%d stream acquirers that started after the newcomer queued got the key before it", overtook)
	}
	t.Logf("newcomer queued at position %d, served after %d stream grants, before the follower and %d stream acquirers that arrived while it waited; %d holds in all",
		position, served, behind-overtook, len(holds))
	stopStream()
	e.closeClients(all...)
	e.keysLeftFree(k)
}

// Bad input: permits out of range and invalid keys are refused before any
// SQL; a key asked for as another kind than it is used as is refused with a
// *KindConflictError, by Acquire and TryAcquire alike. No call leaves a
// waiter row, a grant, local key state or a goroutine behind.
//
// Not parallel: it counts the process's goroutines.
func TestKindsBadInput(t *testing.T) {
	e := newEnv(t)
	a, _, _ := e.client(slowTimers)
	b, _, _ := e.client(slowTimers)
	fresh, _, _ := e.client(slowTimers) // never registers a holder
	warmUp(t, e, a)
	warmUp(t, e, b)
	hb, _ := b.HolderID()

	kSem := lease.Key{Name: "bad", ID: "semaphore"}
	kShared := lease.Key{Name: "bad", ID: "shared"}
	kExcl := lease.Key{Name: "bad", ID: "exclusive"}
	lSem := tryPermit(t, e.ctx, a, kSem, 2)
	lShared, err := a.TryAcquireShared(e.ctx, kShared)
	if err != nil {
		t.Fatal(err)
	}
	lExcl := mustAcquire(t, e.ctx, a, kExcl)
	base := runtime.NumGoroutine()
	kUnused := lease.Key{Name: "bad", ID: "unused"}
	grants := map[lease.Key]int{kSem: 1, kShared: 1, kExcl: 1, kUnused: 0}

	leftNothing := func(what string) {
		t.Helper()
		for k, n := range grants {
			if got := e.keyRows("waiters", k); got != 0 {
				t.Errorf("%s: %d waiter rows of %s", what, got, k)
			}
			if got := e.keyRows("locks", k); got != n {
				t.Errorf("%s: %d grants of %s, want %d", what, got, k, n)
			}
		}
		if n := e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE holder_id = $1", hb); n != 0 {
			t.Errorf("%s: b has %d grants", what, n)
		}
		eventually(t, waitLimit, what+": no local key state", func() bool { return lease.KeyStates(b) == 0 && lease.KeyStates(fresh) == 0 })
		eventually(t, waitLimit, fmt.Sprintf("%s: goroutines back to %d", what, base), func() bool { return runtime.NumGoroutine() <= base })
	}

	// Permits out of range.
	for _, p := range []int{0, -1, lease.MaxPermits + 1, math.MinInt, math.MaxInt} {
		s, err := fresh.Semaphore(kUnused, p)
		var pe *lease.PermitsError
		if s != nil || !errors.Is(err, lease.ErrInvalidPermits) || !errors.As(err, &pe) || pe.Permits != p || pe.Key != kUnused {
			t.Errorf("Semaphore(%d) = %v, %v; want a *PermitsError for %d matching ErrInvalidPermits", p, s, err, p)
		}
	}
	for _, p := range []int{1, lease.MaxPermits} {
		if s, err := fresh.Semaphore(kUnused, p); err != nil || s.Permits() != p || s.Key() != kUnused {
			t.Errorf("Semaphore(%d) = %v, %v", p, s, err)
		}
	}
	leftNothing("permits out of range")

	// Invalid keys, on every entry point of the new kinds.
	for _, bad := range []lease.Key{{}, {Name: "n"}, {Name: "a\x00b", ID: "1"}, {Name: "n", ID: "\xff"}} {
		noop := func(context.Context, *lease.Lock) error { t.Error("fn ran for an invalid key"); return nil }
		for op, f := range map[string]func() error{
			"AcquireShared":             func() error { _, err := fresh.AcquireShared(e.ctx, bad); return err },
			"TryAcquireShared":          func() error { _, err := fresh.TryAcquireShared(e.ctx, bad); return err },
			"DoShared":                  func() error { return fresh.DoShared(e.ctx, bad, noop) },
			"Semaphore":                 func() error { _, err := fresh.Semaphore(bad, 2); return err },
			"Advisory.AcquireShared":    func() error { _, err := fresh.Advisory().AcquireShared(e.ctx, bad); return err },
			"Advisory.TryAcquireShared": func() error { _, err := fresh.Advisory().TryAcquireShared(e.ctx, bad); return err },
			"Advisory.DoShared":         func() error { return fresh.Advisory().DoShared(e.ctx, bad, noop) },
		} {
			var ke *lease.KeyError
			if err := f(); !errors.Is(err, lease.ErrInvalidKey) || !errors.As(err, &ke) {
				t.Errorf("%s(%q/%q) = %v, want a *KeyError", op, bad.Name, bad.ID, err)
			}
		}
	}
	if _, ok := fresh.HolderID(); ok {
		t.Error("bad input registered a holder")
	}
	if n := len(lease.AdvisoryBackends(fresh.Advisory())); n != 0 {
		t.Errorf("bad input opened %d pinned connections", n)
	}
	leftNothing("invalid keys")

	// Kind conflicts. b asks for each key as another kind than a holds it.
	sem3, err := b.Semaphore(kSem, 3)
	if err != nil {
		t.Fatal(err)
	}
	type conflict struct {
		what    string
		key     lease.Key
		kind    lease.Kind
		permits int
		call    func(context.Context) (*lease.Lock, error)
	}
	noop := func(context.Context, *lease.Lock) error { t.Error("Do ran fn on a conflict"); return nil }
	conflicts := []conflict{
		{"a 2-permit semaphore asked for with 3: Acquire", kSem, lease.Permit, 3, sem3.Acquire},
		{"a 2-permit semaphore asked for with 3: TryAcquire", kSem, lease.Permit, 3, sem3.TryAcquire},
		{"a 2-permit semaphore asked for with 3: Do", kSem, lease.Permit, 3, func(ctx context.Context) (*lease.Lock, error) {
			return nil, sem3.Do(ctx, noop)
		}},
		{"a semaphore asked for exclusively: Acquire", kSem, lease.Exclusive, 0, func(ctx context.Context) (*lease.Lock, error) { return b.Acquire(ctx, kSem) }},
		{"a semaphore asked for exclusively: TryAcquire", kSem, lease.Exclusive, 0, func(ctx context.Context) (*lease.Lock, error) { return b.TryAcquire(ctx, kSem) }},
		{"a semaphore asked for shared: AcquireShared", kSem, lease.Shared, 0, func(ctx context.Context) (*lease.Lock, error) { return b.AcquireShared(ctx, kSem) }},
		{"a semaphore asked for shared: TryAcquireShared", kSem, lease.Shared, 0, func(ctx context.Context) (*lease.Lock, error) { return b.TryAcquireShared(ctx, kSem) }},
	}
	for name, key := range map[string]lease.Key{"shared": kShared, "exclusive": kExcl} {
		sem, err := b.Semaphore(key, 2)
		if err != nil {
			t.Fatal(err)
		}
		conflicts = append(conflicts,
			conflict{"a key held " + name + " asked for as a semaphore: Acquire", key, lease.Permit, 2, sem.Acquire},
			conflict{"a key held " + name + " asked for as a semaphore: TryAcquire", key, lease.Permit, 2, sem.TryAcquire})
	}
	for _, tc := range conflicts {
		// A conflict is reported at once; the time-out only turns a wait
		// into a failure.
		ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
		l, err := tc.call(ctx)
		cancel()
		var kc *lease.KindConflictError
		switch {
		case l != nil:
			t.Errorf("%s: granted (kind %s)", tc.what, l.Kind())
			mustRelease(t, e.ctx, l)
		case !errors.Is(err, lease.ErrKindConflict) || !errors.As(err, &kc):
			t.Errorf("%s: %v, want a *KindConflictError", tc.what, err)
		case kc.Key != tc.key || kc.Asked != tc.kind || kc.AskedPermits != tc.permits || kc.Detail == "":
			t.Errorf("%s: %+v, want key %s, kind %s, permits %d and a detail", tc.what, kc, tc.key, tc.kind, tc.permits)
		}
		leftNothing(tc.what)
	}

	// The right number is no conflict, and a kind lasts only as long as the
	// key is in use: once free, it may be a 3-permit semaphore.
	lb := tryPermit(t, e.ctx, b, kSem, 2)
	if lb.Slot() == lSem.Slot() || lb.Permits() != 2 {
		t.Errorf("second permit: slot %d of %d beside slot %d", lb.Slot(), lb.Permits(), lSem.Slot())
	}
	mustRelease(t, e.ctx, lb)
	mustRelease(t, e.ctx, lSem)
	l3, err := sem3.TryAcquire(e.ctx)
	if err != nil {
		t.Fatalf("a free key as a 3-permit semaphore: %v", err)
	}
	mustRelease(t, e.ctx, l3)
	// Nor does a dead holder's: its permit is taken over whatever the
	// number asked for.
	dead, _, _ := e.client(slowTimers)
	ld := tryPermit(t, e.ctx, dead, kUnused, 2)
	e.expireHolder(ld.HolderID())
	lb3 := tryPermit(t, e.ctx, b, kUnused, 3) // beside a dead holder's 2-permit grant
	if n := e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE token = $1", ld.Token()); n != 0 {
		t.Errorf("the dead holder's permit is still there beside the new one")
	}
	mustRelease(t, e.ctx, lb3)
	mustRelease(t, e.ctx, lShared)
	mustRelease(t, e.ctx, lExcl)
	e.closeClients(a, b, fresh, dead)
	e.keysLeftFree(kSem, kShared, kExcl, kUnused)
}

// The views show every grant with its kind (held) and every waiter with
// its place in the queue (waiting), and a waiter leaves waiting when it is
// served or gives up.
func TestKindsInViews(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var cs [4]*lease.Client
	var ids [4]int64
	for i := range cs {
		cs[i], _, _ = e.client(slowTimers)
		warmUp(t, e, cs[i])
		ids[i], _ = cs[i].HolderID()
	}
	a, b, c, d := cs[0], cs[1], cs[2], cs[3]
	kS := lease.Key{Name: "views", ID: "shared"}
	kP := lease.Key{Name: "views", ID: "semaphore"}
	kX := lease.Key{Name: "views", ID: "exclusive"}

	type row struct {
		token, holder   int64
		kind            string
		permit, permits *int
	}
	held := func(k lease.Key) map[int64]row {
		t.Helper()
		rows, err := e.db.Pool.Query(e.ctx, "SELECT token, holder_id, kind, permit, permits FROM "+e.table("held")+
			" WHERE name = $1 AND entity_id = $2 AND alive", k.Name, k.ID)
		if err != nil {
			t.Fatal(err)
		}
		out := map[int64]row{}
		for rows.Next() {
			var r row
			if err := rows.Scan(&r.token, &r.holder, &r.kind, &r.permit, &r.permits); err != nil {
				t.Fatal(err)
			}
			out[r.token] = r
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		return out
	}
	wantHeld := func(k lease.Key, locks ...*lease.Lock) {
		t.Helper()
		rows := held(k)
		if len(rows) != len(locks) {
			t.Errorf("held shows %d grants of %s, want %d", len(rows), k, len(locks))
		}
		for _, l := range locks {
			r, ok := rows[l.Token()]
			switch {
			case !ok:
				t.Errorf("held does not show %s token %d", k, l.Token())
			case r.holder != l.HolderID() || r.kind != l.Kind().String():
				t.Errorf("held shows token %d as %s of holder %d, want %s of %d", l.Token(), r.kind, r.holder, l.Kind(), l.HolderID())
			case l.Kind() == lease.Permit && (r.permit == nil || r.permits == nil || *r.permit != l.Slot() || *r.permits != l.Permits()):
				t.Errorf("held shows permit %v of %v for token %d, want %d of %d", r.permit, r.permits, l.Token(), l.Slot(), l.Permits())
			case l.Kind() != lease.Permit && (r.permit != nil || r.permits != nil):
				t.Errorf("held shows permit %v of %v for a %s lock", r.permit, r.permits, l.Kind())
			}
		}
	}
	type waiter struct {
		holder   int64
		kind     string
		permits  *int
		position int
	}
	waiting := func(k lease.Key) []waiter {
		t.Helper()
		rows, err := e.db.Pool.Query(e.ctx, "SELECT holder_id, kind, permits, position FROM "+e.table("waiting")+
			" WHERE name = $1 AND entity_id = $2 AND alive ORDER BY waiter_id", k.Name, k.ID)
		if err != nil {
			t.Fatal(err)
		}
		ws, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (waiter, error) {
			var w waiter
			err := r.Scan(&w.holder, &w.kind, &w.permits, &w.position)
			return w, err
		})
		if err != nil {
			t.Fatal(err)
		}
		return ws
	}
	queue := func(k lease.Key) string { return fmt.Sprint(waiting(k)) }
	wantQueue := func(k lease.Key, want ...waiter) {
		t.Helper()
		eventually(t, waitLimit, fmt.Sprintf("waiting of %s = %v (now %s)", k, want, queue(k)), func() bool {
			got := waiting(k)
			return slices.EqualFunc(got, want, func(a, b waiter) bool {
				return a.holder == b.holder && a.kind == b.kind && a.position == b.position &&
					(a.permits == nil) == (b.permits == nil) && (a.permits == nil || *a.permits == *b.permits)
			})
		})
	}

	// Every shared holder appears.
	var shared []*lease.Lock
	for _, x := range []*lease.Client{a, b, c} {
		l, err := x.TryAcquireShared(e.ctx, kS)
		if err != nil {
			t.Fatal(err)
		}
		shared = append(shared, l)
	}
	wantHeld(kS, shared...)
	// Permits, each with its slot.
	semA, _ := a.Semaphore(kP, 3)
	semB, _ := b.Semaphore(kP, 3)
	semC, _ := c.Semaphore(kP, 3)
	semD, _ := d.Semaphore(kP, 3)
	var permits []*lease.Lock
	for _, s := range []*lease.Semaphore{semA, semB, semC} {
		l, err := s.TryAcquire(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		permits = append(permits, l)
	}
	wantHeld(kP, permits...)
	if slots := []int{permits[0].Slot(), permits[1].Slot(), permits[2].Slot()}; !slices.Equal(slices.Sorted(slices.Values(slots)), []int{1, 2, 3}) {
		t.Errorf("permit slots %v, want 1, 2, 3", slots)
	}
	lX := mustAcquire(t, e.ctx, a, kX)
	wantHeld(kX, lX)

	// Waiters in arrival order: b (exclusive), c (shared), d (exclusive).
	gotB := goLock(func() (*lease.Lock, error) { return b.Acquire(e.ctx, kX) })
	wantQueue(kX, waiter{ids[1], "exclusive", nil, 1})
	cctx, cancelC := context.WithCancel(e.ctx)
	gotC := goLock(func() (*lease.Lock, error) { return c.AcquireShared(cctx, kX) })
	wantQueue(kX, waiter{ids[1], "exclusive", nil, 1}, waiter{ids[2], "shared", nil, 2})
	gotD := goLock(func() (*lease.Lock, error) { return d.Acquire(e.ctx, kX) })
	wantQueue(kX, waiter{ids[1], "exclusive", nil, 1}, waiter{ids[2], "shared", nil, 2}, waiter{ids[3], "exclusive", nil, 3})
	// A semaphore's waiter, with its number of permits.
	gotP := goLock(func() (*lease.Lock, error) { return semD.Acquire(e.ctx) })
	three := 3
	wantQueue(kP, waiter{ids[3], "permit", &three, 1})

	// c gives up: it leaves, and d moves up.
	cancelC()
	if r := await(t, gotC, "the cancelled waiter"); !errors.Is(r.err, context.Canceled) {
		t.Fatalf("cancelled waiter: %v, %v", r.l, r.err)
	}
	wantQueue(kX, waiter{ids[1], "exclusive", nil, 1}, waiter{ids[3], "exclusive", nil, 2})
	// Served waiters leave.
	mustRelease(t, e.ctx, lX)
	rb := await(t, gotB, "b after a's release")
	if rb.err != nil {
		t.Fatal(rb.err)
	}
	wantHeld(kX, rb.l)
	wantQueue(kX, waiter{ids[3], "exclusive", nil, 1})
	mustRelease(t, e.ctx, rb.l)
	rd := await(t, gotD, "d after b's release")
	if rd.err != nil {
		t.Fatal(rd.err)
	}
	wantQueue(kX)
	mustRelease(t, e.ctx, permits[1])
	rp := await(t, gotP, "d's permit after b's release")
	if rp.err != nil {
		t.Fatal(rp.err)
	}
	if rp.l.Slot() != permits[1].Slot() {
		t.Errorf("d took permit %d, the free one is %d", rp.l.Slot(), permits[1].Slot())
	}
	wantQueue(kP)
	wantHeld(kP, permits[0], permits[2], rp.l)

	for _, l := range append(append(shared, permits[0], permits[2]), rp.l, rd.l) {
		mustRelease(t, e.ctx, l)
	}
	for _, k := range []lease.Key{kS, kP, kX} {
		if n := len(held(k)); n != 0 {
			t.Errorf("held shows %d grants of %s after every release", n, k)
		}
	}
	e.closeClients(cs[:]...)
	e.keysLeftFree(kS, kP, kX)
}

// A DBA's DELETE of one shared grant frees that grant only: its holder is
// told (a *LostError for a deleted row), the key's other shared holders,
// one of them on the same client, keep theirs. Once by the delete's
// notification on the schema's channel, which a client hears while it
// listens there (here: it observes an election; no heartbeat within the
// test), once by the heartbeat's count (the delete made quietly, as a
// takeover's).
func TestSharedGrantDeletedByDBA(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, quiet := range []bool{false, true} {
		t.Run(fmt.Sprintf("quiet=%v", quiet), func(t *testing.T) {
			cfg := slowTimers // only the notification can tell
			if quiet {
				cfg = lease.Config{TTL: 3 * time.Second, HeartbeatInterval: 200 * time.Millisecond}
			}
			a, _, _ := e.client(cfg)
			b, _, _ := e.client(cfg)
			other, _, _ := e.client(slowTimers)
			if !quiet {
				el, err := a.Election(lease.Key{Name: "dba-shared-observed", ID: "1"})
				if err != nil {
					t.Fatal(err)
				}
				octx, stop := context.WithCancel(e.ctx)
				defer stop()
				<-el.Observe(octx) // the first state: nobody leads
				eventually(t, waitLimit, "a listening on the schema's channel", func() bool { return lease.Listening(a) })
			}
			k := lease.Key{Name: "dba-shared", ID: fmt.Sprint(quiet)}
			var locks []*lease.Lock
			for _, c := range []*lease.Client{a, a, b} {
				l, err := c.TryAcquireShared(e.ctx, k)
				if err != nil {
					t.Fatal(err)
				}
				locks = append(locks, l)
			}
			gone, sibling, keep := locks[0], locks[1], locks[2]
			tx, err := e.db.Pool.Begin(e.ctx)
			if err != nil {
				t.Fatal(err)
			}
			if quiet {
				if _, err := tx.Exec(e.ctx, "SELECT set_config('pglease.quiet', 'on', true)"); err != nil {
					t.Fatal(err)
				}
			}
			if tag, err := tx.Exec(e.ctx, "DELETE FROM "+e.table("locks")+" WHERE token = $1", gone.Token()); err != nil || tag.RowsAffected() != 1 {
				t.Fatalf("DELETE: %v, %v", tag, err)
			}
			if err := tx.Commit(e.ctx); err != nil {
				t.Fatal(err)
			}
			select {
			case <-gone.Done():
			case <-time.After(waitLimit):
				t.Fatal("the deleted grant was not reported lost")
			}
			var le *lease.LostError
			if !errors.As(gone.Err(), &le) || le.Reason != lease.LossRowDeleted || le.Token != gone.Token() || le.Key != k {
				t.Fatalf("deleted grant ended with %v, want a *LostError for its deleted row", gone.Err())
			}
			if err := pause(e.ctx, gone, 0); !errors.Is(err, lease.ErrLost) {
				t.Errorf("fenced transaction of the deleted grant = %v, want ErrLost", err)
			}
			for _, l := range []*lease.Lock{sibling, keep} {
				if err := l.Err(); err != nil {
					t.Errorf("token %d of the same key ended too: %v", l.Token(), err)
				}
				if err := pause(e.ctx, l, 0); err != nil {
					t.Errorf("fenced transaction of token %d: %v", l.Token(), err)
				}
			}
			if n := e.keyRows("locks", k); n != 2 {
				t.Errorf("%d grants of the key left, want 2", n)
			}
			if l, err := other.TryAcquire(e.ctx, k); !errors.Is(err, lease.ErrLocked) {
				t.Errorf("exclusive TryAcquire beside 2 shared holders: %v, %v; want ErrLocked", l, err)
			}
			// a may take the key shared again beside its sibling.
			again, err := a.TryAcquireShared(e.ctx, k)
			if err != nil {
				t.Fatalf("shared again after the loss: %v", err)
			}
			if err := gone.Release(e.ctx); !errors.Is(err, lease.ErrLost) {
				t.Errorf("Release of the deleted grant = %v, want ErrLost", err)
			}
			for _, l := range []*lease.Lock{sibling, keep, again} {
				mustRelease(t, e.ctx, l)
			}
			e.closeClients(a, b, other)
			e.keysLeftFree(k)
		})
	}
}
