package torture

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/internal/torture/proxy"
)

// params shape one scenario run.
type params struct {
	procs    int           // holder processes kept running
	keys     int           // keys they contend for
	dur      time.Duration // how long faults are injected
	ttl      time.Duration
	poll     time.Duration
	work     time.Duration // most wait inside a section
	workMin  time.Duration
	rawFence float64 // share of sections fencing with the SQL function directly
	proxied  int     // how many of the processes connect through the proxy
	// noLoss: a lock lost by a process that was not paused is a violation.
	noLoss bool
	// reapBound, when set, is how long after its holder's expiry a dead lock
	// row or holder row may still exist (reapers are running).
	reapBound time.Duration
	// mode of the holders: table, advisory or mixed.
	mode string
	// check is AdvisoryConfig.CheckInterval.
	check time.Duration
	// sabotage: extra holder flags that break it on purpose.
	sabotage []string
	// kind of the holders' locks (holder flag -kind): exclusive when empty,
	// shared, semaphore or set; readers is the share of shared requests,
	// permits a semaphore's N.
	kind    string
	readers float64
	permits int
	// waiterKills: the kill fault also killed waiters at the head of a
	// key's queue (set by faultKillKinds).
	waiterKills bool
	// handedKills: the kill fault also killed waiters just handed a key
	// (set by faultKillHandoff).
	handedKills bool
}

// grace absorbs scheduling delays of a loaded 2-core machine running the race
// detector in every check that bounds a duration.
const grace = time.Second

// interval is one acquisition as its holder reported it.
type interval struct {
	proc, key  string
	token      int64
	start, end int64 // shared clock; end 0 while open
	at         int64 // acquired_at, Unix µs, database clock
	lostT      int64 // when the holder saw Done close without Release
	lostWhy    string
	release    string
	killed     bool // ended by the death of its process
	adv        bool // on the advisory path
	kind       string
	slot       int    // a permit's slot
	permits    int    // a permit's N, as its holder believed
	set        string // the key set it belongs to
}

// ckey is the counter iv guards: its key's, or a permit's slot's.
func (iv *interval) ckey() string {
	if iv.kind == KindPermit {
		return fmt.Sprintf("%s/%d", iv.key, iv.slot)
	}
	return iv.key
}

// exclusive reports whether iv excludes every other grant of its key.
func (iv *interval) exclusive() bool { return iv.kind != KindShared && iv.kind != KindPermit }

type section struct {
	id, proc, key string
	token         int64
	readT, endT   int64
	outcome       string
	raw           bool
	read          bool // a fenced read (reads table), not a write
}

type wait struct {
	proc     string
	keys     []string // one key, or a set's
	from, to int64    // to 0 while waiting
	died     bool     // ended by the death of its process
}

func (w *wait) wants(key string) bool { return slices.Contains(w.keys, key) }

type pauseRec struct {
	proc     string
	from, to int64 // the process was certainly stopped from `from` on
}

type killRec struct {
	proc string
	t    int64       // when the signal was sent
	held []*interval // what it held at its death
	// waited: the keys it waited for at its death; head, if the waiting
	// view showed it first in the queue of that key just before the kill.
	waited []string
	head   string
	// handed: the key a release had just handed it when it was killed
	// (faultKillHandoff), with the grant's token and the holder id; frozen,
	// if it was stopped before the handoff; acted, if it had reported the
	// grant before it died.
	handed        string
	handedTok     int64
	handedHolder  int64
	frozen, acted bool
}

// holderProc is one running helper process.
type holderProc struct {
	name     string
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	errPath  string
	viaProxy bool
	exited   chan struct{}
	exitT    int64
	exitErr  error
	killed   bool
	killT    int64
	stopped  bool // asked to stop gracefully
	bye      bool
	leak     string
	paused   bool
	// What its death ended (set by died).
	diedHolding []*interval
	diedWaiting *wait
}

// run is one scenario: its processes, what they reported, and the checks.
type run struct {
	t      *testing.T
	name   string
	p      params
	c      *pgtest.Cluster
	schema string
	admin  *pgxpool.Pool
	px     *proxy.Proxy
	bin    string
	dir    string
	t0     int64
	end    int64 // when faults stopped

	mu           sync.Mutex
	procs        []*holderProc
	byName       map[string]*holderProc
	intervals    []*interval
	open         map[string][]*interval // by process: one, or a set's
	byToken      map[int64]*interval
	sections     map[string]*section
	sectionSeq   []*section
	waits        []*wait
	waiting      map[string]*wait // by process
	pauses       []pauseRec
	drops        []pauseRec // connections of a process dropped by the suite, somewhere from `from` to `to`
	kills        []killRec
	faults       int
	fastRestarts int
	handedTries  int // waiters killHanded listened to (one in the queue behind a live grant)
	acqErrors    int
	releases     int
	violations   []string
	extra        []string
	orphanSeen   map[int64]int64
	waiterSeen   map[string]int64 // stale waiter rows: first seen, by proc and key
	reported     map[string]bool
	onRead       func(hp *holderProc, ev Event) // fault hook, called with mu held
	// bg lives until the checks begin, for what runs beside the processes
	// (reapers); afterBg runs once bg is cancelled.
	bg      context.Context
	afterBg []func()
	readers sync.WaitGroup
}

func newRun(t *testing.T, c *pgtest.Cluster, bin, name string, p params) *run {
	r := &run{
		t: t, name: name, p: p, c: c, bin: bin,
		schema:     "torture_" + name,
		dir:        t.TempDir(),
		byName:     map[string]*holderProc{},
		open:       map[string][]*interval{},
		byToken:    map[int64]*interval{},
		sections:   map[string]*section{},
		waiting:    map[string]*wait{},
		orphanSeen: map[int64]int64{},
		waiterSeen: map[string]int64{},
		reported:   map[string]bool{},
	}
	pgtest.DropSchema(t, c, r.schema) // a previous run killed half-way
	pgtest.Migrate(t, c, r.schema)
	r.admin = pgtest.NewPool(t, c, "torture-admin", func(cfg *pgxpool.Config) { cfg.MaxConns = 4 })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := pgx.Identifier{r.schema}.Sanitize()
	if _, err := r.admin.Exec(ctx, `
		CREATE TABLE `+s+`.torture_counter (key text PRIMARY KEY, n bigint NOT NULL, last_token bigint NOT NULL);
		-- No constraint that would hide a violation: two writes of the same n
		-- must both be recorded to be found.
		CREATE TABLE `+s+`.torture_log (section text PRIMARY KEY, key text NOT NULL, token bigint NOT NULL,
			n bigint NOT NULL, prev_token bigint NOT NULL, proc text NOT NULL,
			committed_at timestamptz NOT NULL DEFAULT clock_timestamp());
		-- Readers' fenced reads: the counter value and the reader's token.
		CREATE TABLE `+s+`.torture_reads (section text PRIMARY KEY, key text NOT NULL, token bigint NOT NULL,
			n bigint NOT NULL, proc text NOT NULL, committed_at timestamptz NOT NULL DEFAULT clock_timestamp())`); err != nil {
		t.Fatal(err)
	}
	for k := 0; k < p.keys; k++ {
		// A semaphore's slots have counters of their own: up to twice its
		// permits, for a holder sabotaged into asking for that many.
		ckeys := []string{fmt.Sprintf("k%d", k)}
		for slot := 1; slot <= 2*p.permits; slot++ {
			ckeys = append(ckeys, fmt.Sprintf("k%d/%d", k, slot))
		}
		if _, err := r.admin.Exec(ctx, `INSERT INTO `+s+`.torture_counter SELECT unnest($1::text[]), 0, 0`, ckeys); err != nil {
			t.Fatal(err)
		}
	}
	if p.proxied > 0 {
		px, err := proxy.New("127.0.0.1:" + strconv.Itoa(c.Port()))
		if err != nil {
			t.Fatal(err)
		}
		r.px = px
		t.Cleanup(px.Close)
	}
	return r
}

func (r *run) since(t int64) string {
	return fmt.Sprintf("%.3fs", float64(t-r.t0)/1e9)
}

func (r *run) violate(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.violateLocked(format, args...)
}

func (r *run) violateLocked(format string, args ...any) {
	r.violations = append(r.violations, fmt.Sprintf(format, args...))
}

// start starts one more holder process.
func (r *run) start(viaProxy bool) *holderProc {
	r.mu.Lock()
	name := fmt.Sprintf("%s-p%d", r.name, len(r.procs))
	r.mu.Unlock()
	port := r.c.Port()
	if viaProxy {
		port = r.px.Port()
	}
	url := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	if !r.c.Owned() {
		url = r.c.URL() // a replicated cluster's multi-host URL (failover_test.go)
	}
	cmd := exec.Command(r.bin,
		"-url", url, "-schema", r.schema, "-proc", name,
		"-keys", strconv.Itoa(r.p.keys), "-ttl", r.p.ttl.String(), "-poll", r.p.poll.String(),
		"-work", r.p.work.String(), "-workmin", r.p.workMin.String(),
		"-rawfence", strconv.FormatFloat(r.p.rawFence, 'f', -1, 64),
		"-seed", strconv.FormatUint(rand.Uint64(), 10))
	if r.p.mode != "" {
		cmd.Args = append(cmd.Args, "-mode", r.p.mode, "-check", r.p.check.String())
	}
	if r.p.kind != "" {
		cmd.Args = append(cmd.Args, "-kind", r.p.kind, "-readers", strconv.FormatFloat(r.p.readers, 'f', -1, 64),
			"-permits", strconv.Itoa(r.p.permits))
	}
	cmd.Args = append(cmd.Args, r.p.sabotage...)
	hp := &holderProc{name: name, cmd: cmd, viaProxy: viaProxy, exited: make(chan struct{}),
		errPath: filepath.Join(r.dir, name+".stderr")}
	errf, err := os.Create(hp.errPath)
	if err != nil {
		r.t.Fatal(err)
	}
	cmd.Stderr = errf
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		r.t.Fatal(err)
	}
	if hp.stdin, err = cmd.StdinPipe(); err != nil {
		r.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	_ = errf.Close() // the child has its own copy
	r.mu.Lock()
	r.procs = append(r.procs, hp)
	r.byName[name] = hp
	r.mu.Unlock()
	r.readers.Add(1)
	go r.read(hp, stdout)
	return hp
}

// read consumes a process's events until it exits.
func (r *run) read(hp *holderProc, stdout io.Reader) {
	defer r.readers.Done()
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var ev Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			r.violate("%s: unreadable output line %q: %v", hp.name, sc.Text(), err)
			continue
		}
		r.record(hp, ev)
	}
	err := hp.cmd.Wait()
	now := Now()
	r.mu.Lock()
	hp.exitT, hp.exitErr = now, err
	r.died(hp, now)
	r.mu.Unlock()
	close(hp.exited)
}

// died closes what the process left open: its belief ends at its death.
func (r *run) died(hp *holderProc, now int64) {
	for _, iv := range r.open[hp.name] {
		end := now
		if hp.killT != 0 {
			end = max(hp.killT, iv.start)
		}
		iv.end, iv.killed = end, true
		hp.diedHolding = append(hp.diedHolding, iv)
	}
	delete(r.open, hp.name)
	if w := r.waiting[hp.name]; w != nil {
		w.to, w.died = now, true
		if hp.killT != 0 {
			w.to = max(hp.killT, w.from)
		}
		hp.diedWaiting = w
		delete(r.waiting, hp.name)
	}
}

func (r *run) record(hp *holderProc, ev Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch ev.Ev {
	case EvAcquiring:
		keys := ev.Keys
		if len(keys) == 0 {
			keys = []string{ev.Key}
		}
		w := &wait{proc: hp.name, keys: keys, from: ev.T}
		r.waits = append(r.waits, w)
		r.waiting[hp.name] = w
	case EvAcquired, EvAcquireError:
		if w := r.waiting[hp.name]; w != nil {
			w.to = ev.T
			delete(r.waiting, hp.name)
		}
		if ev.Ev == EvAcquireError {
			r.acqErrors++
			return
		}
		for _, prev := range r.open[hp.name] {
			if ev.Set == "" || prev.set != ev.Set {
				r.violateLocked("%s: acquired %s token %d while still holding %s token %d", hp.name, ev.Key, ev.Token, prev.key, prev.token)
				break
			}
		}
		if r.byToken[ev.Token] != nil {
			r.violateLocked("%s: token %d handed out twice", hp.name, ev.Token)
		}
		iv := &interval{proc: hp.name, key: ev.Key, token: ev.Token, start: ev.T, at: ev.At, adv: ev.Adv,
			kind: ev.Kind, slot: ev.Slot, permits: ev.Permits, set: ev.Set}
		r.intervals = append(r.intervals, iv)
		r.open[hp.name] = append(r.open[hp.name], iv)
		r.byToken[ev.Token] = iv
	case EvRead:
		s := &section{id: ev.Section, proc: hp.name, key: ev.Key, token: ev.Token, readT: ev.T}
		r.sections[s.id] = s
		r.sectionSeq = append(r.sectionSeq, s)
		if r.onRead != nil {
			r.onRead(hp, ev)
		}
	case EvSection:
		s := r.sections[ev.Section]
		if s == nil { // failed before its read
			s = &section{id: ev.Section, proc: hp.name, key: ev.Key, token: ev.Token}
			r.sections[s.id] = s
			r.sectionSeq = append(r.sectionSeq, s)
		}
		s.outcome, s.raw, s.read, s.endT = ev.Outcome, ev.Raw, ev.Read, ev.T
	case EvLost:
		if iv := r.byToken[ev.Token]; iv != nil && iv.lostT == 0 {
			iv.lostT, iv.lostWhy = ev.T, ev.Reason
		}
	case EvEnd:
		iv := r.byToken[ev.Token]
		if iv == nil || iv.proc != hp.name {
			r.violateLocked("%s: end of token %d that it never acquired", hp.name, ev.Token)
			return
		}
		iv.end = ev.T
		if open := slices.DeleteFunc(r.open[hp.name], func(x *interval) bool { return x == iv }); len(open) > 0 {
			r.open[hp.name] = open
		} else {
			delete(r.open, hp.name)
		}
	case EvReleased:
		if iv := r.byToken[ev.Token]; iv != nil {
			iv.release = ev.Release
			if iv.lostWhy == "" {
				iv.lostWhy = ev.Reason // lost before Release, after the watcher stopped
			}
		}
		r.releases++
	case EvBye:
		hp.bye, hp.leak = true, ev.Leak
	}
}

// kill sends SIGKILL and waits until the process is reaped.
func (r *run) kill(hp *holderProc) { r.killHead(hp, "") }

// killHead is kill of a process that the waiting view showed first in the
// queue of key head (none if empty).
func (r *run) killHead(hp *holderProc, head string) {
	r.mu.Lock()
	hp.killed = true
	// A process cannot act after SIGKILL: its belief ends at the signal (its
	// death follows within microseconds; reaping it can take much longer, and
	// on the advisory path its lock is free as soon as its backend sees the
	// socket close).
	hp.killT = Now()
	r.mu.Unlock()
	_ = hp.cmd.Process.Signal(syscall.SIGKILL)
	<-hp.exited
	r.mu.Lock()
	defer r.mu.Unlock()
	// What it held or waited for (closed at its death by died).
	k := killRec{proc: hp.name, t: hp.killT, held: hp.diedHolding}
	if w := hp.diedWaiting; w != nil {
		k.waited = w.keys
		if w.wants(head) {
			k.head = head
		}
	}
	r.kills = append(r.kills, k)
	r.faults++
}

// pauseNow stops hp with SIGSTOP and returns once the kernel reports it
// stopped: only from then on can the process not know what happens.
func (r *run) pauseNow(hp *holderProc) (int64, bool) {
	if err := hp.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		return 0, false
	}
	stat := fmt.Sprintf("/proc/%d/stat", hp.cmd.Process.Pid)
	for i := 0; i < 2000; i++ {
		b, err := os.ReadFile(stat)
		if err != nil {
			return 0, false
		}
		// pid (comm) state ...: the state follows the last ')'.
		if j := strings.LastIndexByte(string(b), ')'); j >= 0 && j+2 < len(b) && b[j+2] == 'T' {
			return Now(), true
		}
		time.Sleep(100 * time.Microsecond) // polling the kernel's view of another process
	}
	return 0, false
}

func (r *run) resume(hp *holderProc, from int64) {
	_ = hp.cmd.Process.Signal(syscall.SIGCONT)
	now := Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	hp.paused = false
	r.pauses = append(r.pauses, pauseRec{proc: hp.name, from: from, to: now})
	r.faults++
}

// dropped records that the suite dropped connections of the named
// processes between from and to (a terminated backend, a server restart:
// to is from; a failover through Patroni, which shuts the old primary down
// a while after it is asked to: to is when its processes are all gone).
func (r *run) dropped(from, to int64, procs ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, p := range procs {
		r.drops = append(r.drops, pauseRec{proc: p, from: from, to: to})
	}
}

// live returns the processes that have not exited and are not paused.
func (r *run) live() []*holderProc {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*holderProc
	for _, hp := range r.procs {
		select {
		case <-hp.exited:
		default:
			if !hp.killed && !hp.paused && !hp.stopped {
				out = append(out, hp)
			}
		}
	}
	return out
}

// monitor checks the database while the scenario runs: a lock row of a live
// holder that no process believes it holds (an orphan) must not outlive the
// TTL, nor may a waiter row of a live holder whose process does not wait for
// the key (an acquirer that gave up, or one that died: its holder must expire
// within the TTL of its death); and with reapers running, no dead row
// outlives reapBound.
func (r *run) monitor(ctx context.Context) {
	s := pgx.Identifier{r.schema}.Sanitize()
	q := `SELECT l.token, l.entity_id, coalesce(h.expires_at > clock_timestamp(), false),
			coalesce(extract(epoch FROM clock_timestamp() - h.expires_at)::float8, -1)
		FROM ` + s + `.locks l LEFT JOIN ` + s + `.holders h ON h.id = l.holder_id`
	qh := `SELECT coalesce(max(extract(epoch FROM clock_timestamp() - expires_at))::float8, 0),
			coalesce(string_agg(format('%s (%s, expired %s ago, %s locks)', id, application, clock_timestamp() - expires_at,
				(SELECT count(*) FROM ` + s + `.locks l WHERE l.holder_id = h.id)), ', '), '')
		FROM ` + s + `.holders h WHERE expires_at < clock_timestamp()`
	qw := `SELECT entity_id, coalesce(application, ''), position FROM ` + s + `.waiting WHERE alive`
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		rows, err := r.admin.Query(qctx, q)
		if err != nil {
			cancel()
			continue // server down or paused: nothing to learn now
		}
		type row struct {
			token int64
			key   string
			alive bool
			dead  float64
		}
		var seen []row
		for rows.Next() {
			var x row
			if err := rows.Scan(&x.token, &x.key, &x.alive, &x.dead); err == nil {
				seen = append(seen, x)
			}
		}
		err = rows.Err()
		type waiterRow struct {
			key, proc string
			position  int64
		}
		var waiters []waiterRow
		if err == nil {
			var wrows pgx.Rows
			if wrows, err = r.admin.Query(qctx, qw); err == nil {
				for wrows.Next() {
					var x waiterRow
					if err := wrows.Scan(&x.key, &x.proc, &x.position); err == nil {
						x.proc = strings.TrimPrefix(x.proc, "torture-")
						waiters = append(waiters, x)
					}
				}
				err = wrows.Err()
			}
		}
		var deadHolder float64
		var deadWhich string
		if err == nil && r.p.reapBound > 0 {
			err = r.admin.QueryRow(qctx, qh).Scan(&deadHolder, &deadWhich)
		}
		cancel()
		if err != nil {
			continue
		}
		now := Now()
		orphanBound := int64(r.p.ttl + grace)
		r.mu.Lock()
		present := map[int64]bool{}
		for _, x := range seen {
			present[x.token] = true
			if x.alive {
				iv := r.byToken[x.token]
				if iv != nil && iv.end == 0 {
					delete(r.orphanSeen, x.token)
					continue
				}
				first, ok := r.orphanSeen[x.token]
				if !ok {
					r.orphanSeen[x.token] = now
				} else if now-first > orphanBound && !r.reported[fmt.Sprint("orphan", x.token)] {
					r.reported[fmt.Sprint("orphan", x.token)] = true
					what := "never reported acquired"
					if iv != nil {
						what = fmt.Sprintf("released or lost by %s at %s", iv.proc, r.since(iv.end))
					}
					r.violateLocked("orphan: %s token %d (%s) held by a live holder that does not know it for over %s",
						x.key, x.token, what, time.Duration(now-first))
				}
			} else if r.p.reapBound > 0 && x.dead > r.p.reapBound.Seconds() && !r.reported[fmt.Sprint("dead", x.token)] {
				r.reported[fmt.Sprint("dead", x.token)] = true
				r.violateLocked("reaper: dead lock row %s token %d still there %.1fs after its holder expired", x.key, x.token, x.dead)
			}
		}
		for tok := range r.orphanSeen {
			if !present[tok] {
				delete(r.orphanSeen, tok)
			}
		}
		seenWaiters := map[string]bool{}
		for _, x := range waiters {
			id := x.proc + " " + x.key
			seenWaiters[id] = true
			if w := r.waiting[x.proc]; w != nil && w.wants(x.key) {
				delete(r.waiterSeen, id)
				continue
			}
			if hp := r.byName[x.proc]; hp != nil && hp.killed && now-hp.killT > orphanBound && !r.reported["deadwaiter"+id] {
				r.reported["deadwaiter"+id] = true
				r.violateLocked("waiting: %s, killed at %s, is still a live waiter of %s (position %d) %s after its death",
					x.proc, r.since(hp.killT), x.key, x.position, time.Duration(now-hp.killT).Round(time.Millisecond))
				continue
			}
			first, ok := r.waiterSeen[id]
			if !ok {
				r.waiterSeen[id] = now
			} else if now-first > orphanBound && !r.reported["waiter"+id] {
				r.reported["waiter"+id] = true
				r.violateLocked("waiting: %s does not wait for %s, but a live waiter row of its holder has been there for over %s (position %d)",
					x.proc, x.key, time.Duration(now-first).Round(time.Millisecond), x.position)
			}
		}
		for id := range r.waiterSeen {
			if !seenWaiters[id] {
				delete(r.waiterSeen, id)
			}
		}
		if r.p.reapBound > 0 && deadHolder > r.p.reapBound.Seconds() && !r.reported["deadholder"] {
			r.reported["deadholder"] = true
			r.violateLocked("reaper: a dead holder row still there %.1fs after it expired: %s", deadHolder, deadWhich)
		}
		r.mu.Unlock()
	}
}

// stopAll asks every live process to stop, waits for them, and kills those
// that do not stop in time (a violation: a hang).
func (r *run) stopAll() {
	r.mu.Lock()
	procs := append([]*holderProc(nil), r.procs...)
	for _, hp := range procs {
		hp.stopped = true
		if hp.paused { // never left so by the faults; just in case
			_ = hp.cmd.Process.Signal(syscall.SIGCONT)
		}
	}
	r.mu.Unlock()
	for _, hp := range procs {
		_ = hp.stdin.Close()
	}
	deadline := time.After(20*time.Second + 4*r.p.ttl)
	for _, hp := range procs {
		select {
		case <-hp.exited:
		case <-deadline:
			r.violate("%s: did not stop within 20s after its input was closed (hang)", hp.name)
			_ = hp.cmd.Process.Signal(syscall.SIGQUIT) // dumps its goroutines into its stderr
			select {
			case <-hp.exited:
			case <-time.After(5 * time.Second):
				_ = hp.cmd.Process.Kill()
				<-hp.exited
			}
		}
	}
	r.readers.Wait()
}
