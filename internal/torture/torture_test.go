package torture

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/internal/torture/proxy"
	"github.com/pglease/pglease/reaper"
)

var longFlag = flag.Bool("torture.long", false,
	"run the long torture mode: 8 processes, every scenario for 85s (also PGLEASE_TORTURE=long)")

// EnvMode selects the long mode with the value "long".
const EnvMode = "PGLEASE_TORTURE"

// EnvReport names a file that every scenario's result line is appended to.
const EnvReport = "PGLEASE_TORTURE_REPORT"

func TestMain(m *testing.M) { pgtest.Main(m) }

func long() bool { return *longFlag || os.Getenv(EnvMode) == "long" }

// scenario is one kind of fault, injected by fault until ctx is done. fault
// must leave the system healthy when it returns (server running, proxy
// healed, no process stopped).
type scenario struct {
	name   string
	adjust func(p *params)
	fault  func(ctx context.Context, r *run)
}

var scenarios = []scenario{
	{"kill", nil, faultKill},
	{"pause", pausing, faultPause},
	{"terminate", func(p *params) { p.noLoss = true }, faultTerminate},
	{"restart", nil, faultRestart},
	{"network", func(p *params) { p.proxied = p.procs / 2 }, faultNetwork},
	{"serverpause", nil, faultServerPause},
	{"reaper", func(p *params) { p.reapBound = 500*time.Millisecond + grace }, faultKillWithReapers},
	// 8. Mixed modes: each acquisition picks the advisory or the table path,
	// so advisory locks contend with advisory and with table locks.
	{"mixed-kill", mixed, faultKill},
	{"mixed-terminate", mixed, faultTerminate},
	{"mixed-restart", mixed, faultRestart},
	// 9. Lock kinds: shared locks (readers and writers on the same keys),
	// semaphore permits, and key sets (2 to 4 keys, some members shared,
	// with single keys among them), under kills of holders and of waiters
	// at the head of a queue, pauses and restarts. The short mode runs each
	// kind and each fault once (a set's single keys are shared or
	// exclusive, so sets-pause pauses readers too); the long mode all.
	{"shared-kill", kinds("shared", mixed), faultKillKinds},
	{"shared-pause", kinds("shared", pausing), faultPause},
	{"semaphore-kill", kinds("semaphore", nil), faultKillKinds},
	{"semaphore-restart", kinds("semaphore", nil), faultRestart},
	{"sets-kill", kinds("set", nil), faultKillKinds},
	{"sets-pause", kinds("set", pausing), faultPause},
	// 10. Direct handoff: kills of waiters just handed a key by a release,
	// frozen before the handoff or racing it, among kills of holders; on
	// one key (two in the long mode) so that a queue is always there. The
	// long mode also hands shared locks and permits.
	{"handoff-kill", handoffKeys(""), faultKillHandoff},
	{"handoff-shared-kill", handoffKeys("shared"), faultKillHandoff},
	{"handoff-semaphore-kill", handoffKeys("semaphore"), faultKillHandoff},
}

// longOnly names the scenarios that run in the long mode only: the short
// mode runs in every go test and is kept to a few minutes.
var longOnly = map[string]bool{"shared-pause": true, "semaphore-kill": true,
	"handoff-shared-kill": true, "handoff-semaphore-kill": true}

// handoffKeys adjusts a handoff scenario: few keys, so that every release
// has a queue to serve, of kind kind (exclusive when empty), for the whole
// duration of the others (a handed kill and its pass-on take a TTL or two).
func handoffKeys(kind string) func(p *params) {
	return func(p *params) {
		if kind != "" {
			dur := p.dur
			kinds(kind, nil)(p)
			p.dur = dur // kinds shortens the short mode; a handed kill and its pass-on need the time
		}
		p.keys = 1
		if long() {
			p.keys = 2
		}
	}
}

func mixed(p *params) { p.mode = "mixed" }

func pausing(p *params) {
	p.rawFence = 1 // a paused holder writes without asking the client first
	p.workMin, p.work = 100*time.Millisecond, 200*time.Millisecond
	p.noLoss = true
}

// kinds adjusts a scenario to lock kind kind (holder flag -kind), then by
// also. Its keys are few, so that readers share them, semaphores fill up and
// queues form; outside the long mode it runs for a third of the time of the
// others (2s).
func kinds(kind string, also func(p *params)) func(p *params) {
	return func(p *params) {
		p.kind, p.readers, p.permits = kind, 0.6, 2
		switch kind {
		case "set":
			p.keys = 4
		default:
			p.keys = 1
		}
		if long() {
			p.keys++
			p.permits = 3
		} else {
			p.dur /= 3
		}
		if also != nil {
			also(p)
		}
	}
}

func TestTorture(t *testing.T) {
	bin := buildHolder(t)
	c := pgtest.Owned(t, pgtest.Options{NoFsync: true})
	base := params{
		procs: 4, keys: 2, dur: 6 * time.Second,
		ttl: 1500 * time.Millisecond, poll: 300 * time.Millisecond,
		work: 60 * time.Millisecond, rawFence: 0.5, check: 300 * time.Millisecond,
	}
	if testing.Short() {
		base.dur = 4 * time.Second
	}
	if long() {
		base.procs, base.keys, base.dur = 8, 4, 85*time.Second
	}
	for _, sc := range scenarios {
		if longOnly[sc.name] && !long() {
			continue
		}
		t.Run(sc.name, func(t *testing.T) {
			p := base
			if sc.adjust != nil {
				sc.adjust(&p)
			}
			r := newRun(t, c, bin, sc.name, p)
			r.fail(r.exec(sc.fault))
		})
	}
}

// buildHolder builds the helper binary, with the race detector when this test
// binary has it.
func buildHolder(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "holder")
	goTool := "go" // the go command that runs this test is on PATH, or named by GOROOT
	if _, err := exec.LookPath(goTool); err != nil && os.Getenv("GOROOT") != "" {
		goTool = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	}
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "github.com/pglease/pglease/internal/torture/holder")
	cmd := exec.Command(goTool, args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the holder: %v\n%s", err, out)
	}
	return bin
}

// exec runs the scenario: processes, faults for p.dur, a settling time
// without faults, a graceful stop, and the checks. It prints the scenario's
// line and returns the violations.
func (r *run) exec(fault func(ctx context.Context, r *run)) []string {
	r.t0 = Now()
	for i := 0; i < r.p.procs; i++ {
		r.start(i < r.p.proxied)
	}
	bg, stopBg := context.WithCancel(context.Background())
	r.bg = bg
	var mwg sync.WaitGroup
	mwg.Add(1)
	go func() { defer mwg.Done(); r.monitor(bg) }()

	ctx, cancel := context.WithTimeout(context.Background(), r.p.dur)
	fault(ctx, r)
	cancel()
	// Let the keys change hands without faults for a while, so that the
	// last faults' effects are seen.
	time.Sleep(r.p.ttl + r.p.poll)
	r.end = Now()
	stopBg()
	mwg.Wait()
	for _, f := range r.afterBg {
		f()
	}
	r.stopAll()
	return r.check()
}

// check runs every oracle and check, prints the scenario's line, and returns
// the violations.
func (r *run) check() []string {
	t := r.t
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := pgx.Identifier{r.schema}.Sanitize()

	counter := map[string]int64{}
	rows, err := r.admin.Query(ctx, `SELECT key, n FROM `+s+`.torture_counter`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var k string
		var n int64
		if err := rows.Scan(&k, &n); err != nil {
			t.Fatal(err)
		}
		counter[k] = n
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	rows, err = r.admin.Query(ctx, `SELECT section, key, proc, token, n, prev_token,
		(extract(epoch FROM committed_at) * 1000000)::bigint FROM `+s+`.torture_log`)
	if err != nil {
		t.Fatal(err)
	}
	var log []logRow
	for rows.Next() {
		var l logRow
		if err := rows.Scan(&l.section, &l.key, &l.proc, &l.token, &l.n, &l.prev, &l.committedAt); err != nil {
			t.Fatal(err)
		}
		log = append(log, l)
	}
	if rows.Err() != nil {
		t.Fatal(rows.Err())
	}
	rows, err = r.admin.Query(ctx, `SELECT section, key, proc, token, n,
		(extract(epoch FROM committed_at) * 1000000)::bigint FROM `+s+`.torture_reads`)
	if err != nil {
		t.Fatal(err)
	}
	reads, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (readRow, error) {
		var x readRow
		err := row.Scan(&x.section, &x.key, &x.proc, &x.token, &x.n, &x.committedAt)
		return x, err
	})
	if err != nil {
		t.Fatal(err)
	}
	hend, handedLeft := r.handedEnd(ctx)
	end, deadWaiters := r.endState(ctx)
	end = append(hend, end...)
	r.extra = append(r.extra, fmt.Sprintf(" end_dead_waiters=%d", deadWaiters))

	r.mu.Lock()
	defer r.mu.Unlock()
	var v []string
	v = append(v, r.violations...)
	v = append(v, end...)
	v = append(v, checkCounter(counter, log, r.sectionSeq)...)
	v = append(v, checkReads(reads, log, r.intervals, r.sectionSeq)...)
	v = append(v, checkTokens(r.intervals)...)
	v = append(v, checkFenceOrder(log, r.intervals)...)
	iv, excused := checkIntervals(r.intervals, r.pauses, r.drops, r.p.check+grace)
	v = append(v, iv...)
	pv, excusedPermits, peak := checkPermits(r.intervals, r.pauses, r.drops, r.p.check+grace)
	v = append(v, pv...)
	bound := r.p.ttl + r.p.poll + grace
	hv, held, head, handed := checkHandoff(r.kills, r.intervals, r.waits, r.p.ttl, bound, r.end)
	v = append(v, hv...)
	if len(r.kills) > 0 {
		r.extra = append(r.extra, fmt.Sprintf(" kills_holding=%d handed_over=%d slowest_handover=%s",
			countHeld(r.kills), held.passed, held.slowest.Round(time.Millisecond)))
	}
	if r.p.waiterKills {
		// A waiter killed at the head of its key's queue keeps its place
		// until its lease runs out: then the key passes on.
		// slowest_passon_alone: of the kills after which nothing else (a
		// killed holder, another dead waiter, a reader sharing the key)
		// could keep the key past the dead waiter's lease.
		r.extra = append(r.extra, fmt.Sprintf(" head_waiter_kills=%d passed_on=%d slowest_passon=%s alone=%d slowest_passon_alone=%s",
			head.keys, head.passed, head.slowest.Round(time.Millisecond), head.alone, head.slowestAlone.Round(time.Millisecond)))
		if head.keys == 0 {
			v = append(v, "kill: no waiter was killed at the head of a queue: the scenario did not exercise the queue")
		}
	}
	if r.p.handedKills {
		// A waiter killed just after a release handed it the key holds
		// the key (dead) until its lease runs out: then it passes on.
		r.extra = append(r.extra, handedFigures(r.kills, handed, r.handedTries)+fmt.Sprintf(" handed_dead_rows_at_end=%d", handedLeft))
		if handed.keys == 0 {
			v = append(v, "handoff: no waiter was killed just after a release handed it the key: the scenario did not exercise the handoff")
		}
	}
	v = append(v, r.kindFigures(reads, peak, excusedPermits)...)
	rejected, fencedInDB := lateWrites(r.sectionSeq, r.pauses)

	// Losses. Where noLoss is set, a process that was not paused must never
	// lose a lock because its row went away (a late release of someone
	// else's, a reap of a live holder): the table lease does not depend on
	// connections. A lease that could not be renewed in time is counted, not
	// judged: on a loaded 2-core machine a renewal can be slow.
	lost, slow := 0, 0
	for _, x := range r.intervals {
		if x.lostT == 0 && x.release != ReleaseLost {
			continue
		}
		lost++
		if !r.p.noLoss || pausedDuring(r.pauses, x) {
			continue
		}
		switch {
		// A loss that comes between the end of a round and its Release is
		// told by Release only: its reason says whether the row went.
		case x.lostT == 0 && (x.lostWhy == "" || x.lostWhy == "row deleted"):
			v = append(v, fmt.Sprintf("loss: %s's release of %s token %d found the row gone, without being told first",
				x.proc, x.key, x.token))
		case x.lostWhy == "row deleted":
			v = append(v, fmt.Sprintf("loss: %s lost %s token %d at +%s without being paused: its row was deleted",
				x.proc, x.key, x.token, time.Duration(x.lostT-x.start)))
		default:
			slow++
		}
	}
	if r.p.noLoss {
		r.extra = append(r.extra, fmt.Sprintf(" lost_to_slow_renewals=%d", slow))
	}
	if len(r.pauses) > 0 && r.p.noLoss && rejected == 0 {
		v = append(v, "pause: no paused holder's late write was rejected: the scenario did not exercise the fence")
	}

	for _, hp := range r.procs {
		if !hp.killed {
			switch {
			case hp.exitErr != nil:
				v = append(v, fmt.Sprintf("%s: exited with %v", hp.name, hp.exitErr))
			case !hp.bye:
				v = append(v, fmt.Sprintf("%s: exited without saying bye", hp.name))
			case hp.leak != "":
				v = append(v, fmt.Sprintf("%s: leak: %s", hp.name, hp.leak))
			}
		}
		if b, err := os.ReadFile(hp.errPath); err == nil {
			for _, bad := range []string{"DATA RACE", "panic:", "fatal error:"} {
				if strings.Contains(string(b), bad) {
					v = append(v, fmt.Sprintf("%s: %q in its stderr (%s)", hp.name, bad, hp.errPath))
				}
			}
		}
	}
	// The survivors closed their clients and pools: no backend of theirs
	// may be left once the server has seen the sockets close.
	var left int
	for i := 0; ; i++ {
		err := r.admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE $1`,
			"torture-"+r.name+"-%").Scan(&left)
		if err == nil && left == 0 {
			break
		}
		if i == 100 {
			v = append(v, fmt.Sprintf("connections: %d backends of this scenario's processes still open after they exited (err %v)", left, err))
			break
		}
		time.Sleep(100 * time.Millisecond) // backends exit asynchronously
	}

	if r.p.mode != "" {
		adv := 0
		for _, x := range r.intervals {
			if x.adv {
				adv++
			}
		}
		r.extra = append(r.extra, fmt.Sprintf(" mode=%s advisory_acquired=%d", r.p.mode, adv))
	}
	committed := 0
	for _, sct := range r.sectionSeq {
		if sct.outcome == OutcomeOK {
			committed++
		}
	}
	ops := len(r.intervals) + r.acqErrors + len(r.sectionSeq) + r.releases
	line := fmt.Sprintf("torture: scenario=%s procs=%d ops=%d sections=%d committed=%d faults=%d violations=%d"+
		" | acquired=%d lost=%d late_writes_rejected=%d (by SQL fence %d) excused_overlaps=%d%s",
		r.name, len(r.procs), ops, len(r.sectionSeq), committed, r.faults, len(v),
		len(r.intervals), lost, rejected, fencedInDB, len(excused), strings.Join(r.extra, ""))
	fmt.Println(line)
	if path := os.Getenv(EnvReport); path != "" {
		if f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644); err == nil {
			fmt.Fprintln(f, line)
			_ = f.Close()
		}
	}
	return v
}

// endState checks what the processes left in the database once they are all
// gone: when every holder's lease has run out (at most a TTL after the last
// process exited), nothing is held and the waiting view shows no live
// waiter; reap_holders and reap_locks then leave no holder, lock or waiter
// row at all. It returns the violations and how many dead waiter rows there
// were before the reap.
func (r *run) endState(ctx context.Context) ([]string, int) {
	s := pgx.Identifier{r.schema}.Sanitize()
	var v []string
	var live int
	for deadline := time.Now().Add(r.p.ttl + grace); ; {
		err := r.admin.QueryRow(ctx, `SELECT count(*) FROM `+s+`.holders WHERE expires_at > clock_timestamp()`).Scan(&live)
		if err == nil && live == 0 {
			break
		}
		if time.Now().After(deadline) {
			v = append(v, fmt.Sprintf("end: %d holder rows still live %s after every process was gone (err %v)", live, r.p.ttl+grace, err))
			break
		}
		time.Sleep(50 * time.Millisecond) // until the leases have run out, on the database clock
	}
	var heldAlive, waitAlive, waitDead int
	if err := r.admin.QueryRow(ctx, `SELECT (SELECT count(*) FROM `+s+`.held WHERE alive),
			(SELECT count(*) FROM `+s+`.waiting WHERE alive), (SELECT count(*) FROM `+s+`.waiting WHERE NOT alive)`).
		Scan(&heldAlive, &waitAlive, &waitDead); err != nil {
		return append(v, fmt.Sprintf("end: read the held and waiting views: %v", err)), 0
	}
	if heldAlive > 0 {
		v = append(v, fmt.Sprintf("end: %d locks still held once every process was gone and its lease had run out", heldAlive))
	}
	if waitAlive > 0 {
		v = append(v, fmt.Sprintf("end: the waiting view shows %d live waiters once every process was gone and its lease had run out", waitAlive))
	}
	var holders, locks, waiters int
	if _, err := r.admin.Exec(ctx, `SELECT `+s+`.reap_holders(1000)`); err != nil {
		return append(v, fmt.Sprintf("end: reap_holders: %v", err)), waitDead
	}
	if _, err := r.admin.Exec(ctx, `SELECT * FROM `+s+`.reap_locks(1000)`); err != nil {
		return append(v, fmt.Sprintf("end: reap_locks: %v", err)), waitDead
	}
	if err := r.admin.QueryRow(ctx, `SELECT (SELECT count(*) FROM `+s+`.holders), (SELECT count(*) FROM `+s+`.locks),
			(SELECT count(*) FROM `+s+`.waiting)`).Scan(&holders, &locks, &waiters); err != nil {
		return append(v, fmt.Sprintf("end: count what is left: %v", err)), waitDead
	}
	if holders+locks+waiters > 0 {
		v = append(v, fmt.Sprintf("end: after reap_holders and reap_locks, %d holder rows, %d lock rows and %d waiters (view waiting) are left",
			holders, locks, waiters))
	}
	return v, waitDead
}

// kindFigures adds the scenario's figures of its lock kind to its line, and
// returns a violation for a scenario that did not exercise its kind: readers
// that never shared a key or never read, a semaphore never full, no key set
// of two keys or more with a shared member (r.mu held).
func (r *run) kindFigures(reads []readRow, peak, excusedPermits int) []string {
	var v []string
	switch r.p.kind {
	case "shared", "set":
		shared, overlaps := 0, 0
		for i, a := range r.intervals {
			if a.kind != KindShared {
				continue
			}
			shared++
			for _, b := range r.intervals[i+1:] {
				if b.kind == KindShared && b.key == a.key && b.proc != a.proc && b.start < a.end && a.start < b.end {
					overlaps++
				}
			}
		}
		r.extra = append(r.extra, fmt.Sprintf(" kind=%s shared_acquired=%d readers_overlapping=%d reads=%d",
			r.p.kind, shared, overlaps, len(reads)))
		if overlaps == 0 && r.p.kind == "shared" { // sets share keys less often: their exercise is below
			v = append(v, "shared: no two readers ever held a key at once: the scenario did not exercise shared locks")
		}
		if len(reads) == 0 {
			v = append(v, "shared: no fenced read committed: the scenario did not exercise readers")
		}
	case "semaphore":
		r.extra = append(r.extra, fmt.Sprintf(" kind=semaphore permits=%d most_permits_in_use=%d excused_permit_overlaps=%d",
			r.p.permits, peak, excusedPermits))
		if peak < r.p.permits {
			v = append(v, fmt.Sprintf("semaphore: never more than %d of %d permits in use: the scenario did not exercise the semaphore",
				peak, r.p.permits))
		}
	}
	if r.p.kind == "set" {
		sets, sharedMembers := map[string]int{}, 0
		for _, iv := range r.intervals {
			if iv.set != "" {
				sets[iv.set]++
				if iv.kind == KindShared {
					sharedMembers++
				}
			}
		}
		largest := 0
		for _, n := range sets {
			largest = max(largest, n)
		}
		r.extra = append(r.extra, fmt.Sprintf(" sets=%d largest_set=%d shared_members=%d", len(sets), largest, sharedMembers))
		if largest < 2 || sharedMembers == 0 {
			v = append(v, "sets: no key set of two keys or more with a shared member was acquired: the scenario did not exercise key sets")
		}
	}
	return v
}

// fail fails the test with the violations, and shows the holders' logs.
func (r *run) fail(v []string) {
	t := r.t
	for i, x := range v {
		if i == 30 {
			t.Errorf("... and %d more", len(v)-30)
			break
		}
		t.Error(x)
	}
	if len(v) > 0 || os.Getenv("PGLEASE_TORTURE_DEBUG") != "" {
		t.Logf("holder logs are in %s", r.dir)
		for _, hp := range r.procs {
			if b, err := os.ReadFile(hp.errPath); err == nil && len(b) > 0 {
				if len(b) > 3000 {
					b = b[len(b)-3000:]
				}
				t.Logf("--- %s stderr (tail) ---\n%s", hp.name, b)
			}
		}
	}
}

// countHeld counts the kills of processes that held a lock, other than
// those just handed one (counted apart).
func countHeld(kills []killRec) int {
	n := 0
	for _, k := range kills {
		if len(k.held) > 0 && k.handed == "" {
			n++
		}
	}
	return n
}

func pausedDuring(pauses []pauseRec, iv *interval) bool {
	end := iv.end
	if end == 0 {
		end = 1<<63 - 1
	}
	for _, p := range pauses {
		if p.proc == iv.proc && p.to >= iv.start && p.from <= end {
			return true
		}
	}
	return false
}

// sleep waits d or until ctx is done, and reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func scenarioNamed(name string) scenario {
	for _, sc := range scenarios {
		if sc.name == name {
			return sc
		}
	}
	panic("no scenario " + name)
}

func between(lo, hi time.Duration) time.Duration { return lo + rand.N(hi-lo+1) }

func pick(procs []*holderProc) *holderProc { return procs[rand.IntN(len(procs))] }

// 1. SIGKILL of holders at random moments; each is replaced by a new process.
// Two kills in three hit a process that holds a lock, when there is one.
func faultKill(ctx context.Context, r *run) {
	for sleep(ctx, between(r.p.ttl/6, r.p.ttl/2)) {
		r.killOne()
	}
}

// killOne kills a live process, one that holds a lock two times in three,
// and starts another.
func (r *run) killOne() {
	live := r.live()
	if len(live) == 0 {
		return
	}
	if rand.IntN(3) > 0 {
		r.mu.Lock()
		var holding []*holderProc
		for _, hp := range live {
			if len(r.open[hp.name]) > 0 {
				holding = append(holding, hp)
			}
		}
		r.mu.Unlock()
		if len(holding) > 0 {
			live = holding
		}
	}
	hp := pick(live)
	r.kill(hp)
	r.start(hp.viaProxy)
}

// 9. SIGKILL as in faultKill, and first and then every other time of the
// waiter at the head of a key's queue, as the waiting view shows it (when a
// queue forms within a TTL): a dead waiter keeps its place until its lease
// runs out, ahead of the waiters behind it and of those that come after, and
// then the key must pass on.
func faultKillKinds(ctx context.Context, r *run) {
	r.p.waiterKills = true // the checks judge what it did
	for i := 0; sleep(ctx, between(r.p.ttl/6, r.p.ttl/2)); i++ {
		if i%2 == 0 {
			if hp, key := r.headWaiter(ctx, r.p.ttl); hp != nil {
				r.killHead(hp, key)
				r.start(hp.viaProxy)
				continue
			}
		}
		r.killOne()
	}
}

// headWaiter looks, for up to d, for a live process of the scenario that
// heads the queue of a key (among live waiters, in the waiting view), with
// another live waiter behind it if there is such a queue, and still waits
// for that key.
func (r *run) headWaiter(ctx context.Context, d time.Duration) (*holderProc, string) {
	s := pgx.Identifier{r.schema}.Sanitize()
	for deadline := time.Now().Add(d); time.Now().Before(deadline) && ctx.Err() == nil; {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		var key, app string
		err := r.admin.QueryRow(qctx, `SELECT entity_id, application FROM (
				SELECT entity_id, application,
				       row_number() OVER (PARTITION BY name, entity_id ORDER BY waiter_id) AS place,
				       count(*) OVER (PARTITION BY name, entity_id) AS queued
				  FROM `+s+`.waiting WHERE alive) q
			 WHERE place = 1 AND application LIKE $1 ORDER BY queued > 1 DESC, random() LIMIT 1`,
			"torture-"+r.name+"-%").Scan(&key, &app)
		cancel()
		if err == nil {
			name := strings.TrimPrefix(app, "torture-")
			r.mu.Lock()
			hp := r.byName[name]
			w := r.waiting[name]
			ok := hp != nil && !hp.killed && !hp.paused && !hp.stopped && w != nil && w.wants(key)
			r.mu.Unlock()
			if ok {
				return hp, key
			}
		}
		time.Sleep(20 * time.Millisecond) // polling the waiting view for a queue to form
	}
	return nil, ""
}

// 2. SIGSTOP of a holder for longer than its TTL, then SIGCONT. Most victims
// are stopped right after a section read the counter, so that they resume
// into their fenced write; the others at a random moment.
func faultPause(ctx context.Context, r *run) {
	for i := 0; sleep(ctx, between(r.p.ttl/4, r.p.ttl/2)); i++ {
		var hp *holderProc
		if i == 0 || rand.IntN(4) > 0 { // the first always: a short run may have room for one pause only
			got := make(chan *holderProc, 1)
			r.mu.Lock()
			r.onRead = func(x *holderProc, _ Event) {
				if x.killed || x.paused || x.stopped {
					return
				}
				_ = x.cmd.Process.Signal(syscall.SIGSTOP) // at once, before its wait ends
				x.paused = true
				r.onRead = nil
				got <- x
			}
			r.mu.Unlock()
			select {
			case hp = <-got:
			case <-time.After(2 * r.p.ttl):
				r.mu.Lock()
				r.onRead = nil
				r.mu.Unlock()
				select {
				case hp = <-got:
				default:
					continue
				}
			}
		} else {
			live := r.live()
			if len(live) == 0 {
				continue
			}
			hp = pick(live)
			r.mu.Lock()
			hp.paused = true
			r.mu.Unlock()
		}
		from, ok := r.pauseNow(hp)
		if !ok {
			r.resume(hp, Now())
			continue
		}
		time.Sleep(between(2*r.p.ttl, 2*r.p.ttl+r.p.ttl/2))
		r.resume(hp, from)
	}
}

// 3. pg_terminate_backend of a random client backend of the holders about
// every 100 ms.
func faultTerminate(ctx context.Context, r *run) {
	prefix := "torture-" + r.name + "-"
	for sleep(ctx, between(70*time.Millisecond, 130*time.Millisecond)) {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		var app string
		var ok bool
		before := Now() // never later than the backend's exit
		err := r.admin.QueryRow(qctx, `SELECT application_name, pg_terminate_backend(pid) FROM pg_stat_activity
			WHERE pid = (SELECT a.pid FROM pg_stat_activity a
			             WHERE a.application_name LIKE $1 AND a.backend_type = 'client backend' ORDER BY random() LIMIT 1)`,
			prefix+"%").Scan(&app, &ok)
		cancel()
		if err == nil && ok {
			r.dropped(before, before, strings.TrimPrefix(app, "torture-"))
			r.mu.Lock()
			r.faults++
			r.mu.Unlock()
		}
	}
}

// 4. Server restarts, fast and immediate in turn, while locks are held and
// waited for.
func faultRestart(ctx context.Context, r *run) {
	mode := pgtest.Immediate
	for sleep(ctx, between(r.p.ttl/2, r.p.ttl)) {
		if mode == pgtest.Immediate {
			mode = pgtest.Fast
		} else {
			mode = pgtest.Immediate
		}
		var names []string
		for _, hp := range r.live() {
			names = append(names, hp.name)
		}
		now := Now()
		r.dropped(now, now, names...)
		if err := r.c.Restart(mode); err != nil {
			r.violate("restart: %v", err)
			return
		}
		r.mu.Lock()
		r.faults++
		if mode == pgtest.Fast {
			r.fastRestarts++
		}
		r.mu.Unlock()
	}
	r.extra = append(r.extra, fmt.Sprintf(" fast_restarts=%d immediate_restarts=%d", r.fastRestarts, r.faults-r.fastRestarts))
}

// 5. Network faults through the proxy, for half of the processes (the others
// connect directly, so they can take over what the cut-off ones lose): lost
// replies of successful acquires, a blackhole longer than the TTL, latency of
// half the TTL per round trip, connection resets.
func faultNetwork(ctx context.Context, r *run) {
	px := r.px
	count := func(n int) {
		r.mu.Lock()
		r.faults += n
		r.mu.Unlock()
	}
	lostReplies, blackholes, latencies, resets := 0, 0, 0, 0
	defer func() {
		r.extra = append(r.extra, fmt.Sprintf(" lost_acquire_replies=%d blackholes=%d latency_periods=%d resets=%d",
			lostReplies, blackholes, latencies, resets))
		if lostReplies == 0 {
			// The proxy recognises acquires by the SQL they call: a client
			// that calls something else would go untested.
			r.violate("network: no acquire reply was lost: the proxy did not recognise the client's acquires")
		}
	}()
	// Every kind once, whatever the duration; then again while time is left.
	for first := true; first || ctx.Err() == nil; first = false {
		// The replies of two successful acquires are lost; then of two more,
		// each followed by a blackhole that outlasts the client's clean-up
		// of the orphan row (ReleaseTimeout) but not its lease.
		for _, after := range []time.Duration{0, r.p.ttl / 5} {
			before := px.LostReplies()
			px.BlackholeAfterLoss(after)
			px.LoseAcquireReplies(2)
			deadline := time.Now().Add(3 * r.p.ttl)
			for px.LostReplies()-before < 2 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond) // waiting on the proxy's counter
			}
			px.LoseAcquireReplies(0)
			n := px.LostReplies() - before
			lostReplies += n
			count(n)
			time.Sleep(r.p.ttl / 3)
		}
		px.BlackholeAfterLoss(0)

		// Cut off a holder: wait (a while) for a proxied process to be in
		// a section, between its read and its write, so that a direct one
		// has something to take over and the holder is busy with it when
		// its lease runs out; else for one that holds a lock.
		if !r.cutReading(px, 2*r.p.ttl) {
			r.waitHolding(true, 2*r.p.ttl)
			px.Blackhole(true)
		}
		time.Sleep(r.p.ttl * 3 / 2)
		px.Blackhole(false)
		blackholes++
		count(1)
		time.Sleep(r.p.ttl / 3)

		px.SetLatency(r.p.ttl / 4) // each way: half the TTL per round trip
		time.Sleep(r.p.ttl)
		px.SetLatency(0)
		latencies++
		count(1)
		time.Sleep(r.p.ttl / 3)

		for i := 0; i < 3; i++ {
			if px.Reset() > 0 {
				resets++
				count(1)
			}
			time.Sleep(r.p.ttl / 5)
		}
	}
}

// cutReading waits up to d for a process that connects through the proxy to
// report a section's read, and blackholes the proxy at once, from the read
// hook. It reports whether it did.
func (r *run) cutReading(px *proxy.Proxy, d time.Duration) bool {
	cut := make(chan struct{})
	r.mu.Lock()
	r.onRead = func(x *holderProc, _ Event) {
		if !x.viaProxy {
			return
		}
		px.Blackhole(true)
		r.onRead = nil
		close(cut)
	}
	r.mu.Unlock()
	select {
	case <-cut:
		return true
	case <-time.After(d):
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	select {
	case <-cut: // just now
		return true
	default:
		r.onRead = nil
		return false
	}
}

// waitHolding waits up to d for a live process that connects through the
// proxy (or not) to hold a lock.
func (r *run) waitHolding(viaProxy bool, d time.Duration) {
	for deadline := time.Now().Add(d); time.Now().Before(deadline); {
		r.mu.Lock()
		for name, open := range r.open {
			if hp := r.byName[name]; hp != nil && hp.viaProxy == viaProxy && len(open) > 0 {
				r.mu.Unlock()
				return
			}
		}
		r.mu.Unlock()
		time.Sleep(5 * time.Millisecond) // polling what the processes reported
	}
}

// 6. The server itself paused (SIGSTOP of the postmaster and every backend)
// for longer than the TTL.
func faultServerPause(ctx context.Context, r *run) {
	for sleep(ctx, between(r.p.ttl/2, r.p.ttl)) {
		if err := r.c.Pause(); err != nil {
			r.violate("pause server: %v", err)
			return
		}
		time.Sleep(r.p.ttl * 3 / 2)
		if err := r.c.Resume(); err != nil {
			r.violate("resume server: %v", err)
			return
		}
		r.mu.Lock()
		r.faults++
		r.mu.Unlock()
	}
}

// 7. Reapers running throughout, two of them with tiny batches, while holders
// are killed (so there is something to reap). The reapers go on until the
// checks begin.
func faultKillWithReapers(ctx context.Context, r *run) {
	fctx := ctx
	ctx = r.bg
	var wg sync.WaitGroup
	var mu sync.Mutex
	var passes int
	var st reaper.Stats
	for _, batch := range []int{1, 2, 0} {
		pool := pgtest.NewPool(r.t, r.c, "torture-reaper", func(c *pgxpool.Config) { c.MaxConns = 2 })
		rp, err := reaper.New(pool, &reaper.Config{Schema: r.schema, BatchSize: batch, BatchTimeout: 5 * time.Second})
		if err != nil {
			r.t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for sleep(ctx, between(50*time.Millisecond, 150*time.Millisecond)) {
				s, err := rp.RunOnce(ctx)
				if err != nil && !errors.Is(err, reaper.ErrInterrupted) && ctx.Err() == nil {
					r.violate("reaper (batch %d): %v", batch, err)
				}
				mu.Lock()
				passes++
				st.Holders += s.Holders
				st.Locks += s.Locks
				st.Skipped += s.Skipped
				mu.Unlock()
			}
		}()
	}
	faultKill(fctx, r)
	r.afterBg = append(r.afterBg, func() {
		wg.Wait()
		r.extra = append(r.extra, fmt.Sprintf(" reaper_passes=%d reaped_holders=%d reaped_locks=%d skipped=%d",
			passes, st.Holders, st.Locks, st.Skipped))
	})
}

// TestOraclesCatchSabotage runs holders broken on purpose and checks that the
// oracles notice: a writer that skips the fence breaks oracle A once a paused
// holder resumes, and a holder that ignores Done breaks oracle B once the
// network cuts it off. For the lock kinds: readers that write now and then
// under their shared lock break the readers' part of oracle A (an honest
// reader sees a write of a later grant, or misses one of an earlier), and
// semaphore holders that ask for twice the permits they report break the
// permit count of oracle B. It runs in every mode: an oracle that cannot fail
// proves nothing.
func TestOraclesCatchSabotage(t *testing.T) {
	bin := buildHolder(t)
	c := pgtest.Owned(t, pgtest.Options{NoFsync: true})
	for _, tc := range []struct {
		sc     scenario
		flag   string
		oracle string        // the violation must start so
		detail string        // and contain this
		dur    time.Duration // 0: 12s
		// readers, when set: the share of readers (honest reads
		// overlapping the sabotaged writes are what must see them).
		readers float64
	}{
		{scenarioNamed("pause"), "-sabotage-unfenced", "A:", "", 0, 0},
		{scenarioNamed("network"), "-sabotage-ignore-loss", "B:", "", 0, 0},
		{scenarioNamed("shared-kill"), "-sabotage-reader-writes", "A: key k0: read ", "", 2 * time.Second, 0.9},
		{scenarioNamed("semaphore-kill"), "-sabotage-over-permits", "B: k0: ", "permits of 2 held at once", 2 * time.Second, 0},
	} {
		t.Run(tc.sc.name+tc.flag, func(t *testing.T) {
			// One key: whatever a sabotaged holder keeps believing in, the
			// others want.
			p := params{procs: 4, keys: 1, dur: 12 * time.Second, ttl: 1500 * time.Millisecond,
				poll: 300 * time.Millisecond, work: 60 * time.Millisecond, rawFence: 0.5}
			tc.sc.adjust(&p)
			if tc.dur != 0 {
				p.dur = tc.dur
			}
			if tc.readers != 0 {
				p.readers = tc.readers
			}
			p.noLoss = false
			p.sabotage = []string{tc.flag}
			r := newRun(t, c, bin, strings.ReplaceAll(strings.TrimPrefix(tc.flag, "-"), "-", "_"), p)
			v := r.exec(tc.sc.fault)
			for _, x := range v {
				if strings.HasPrefix(x, tc.oracle) && strings.Contains(x, tc.detail) {
					t.Logf("caught, as it should be: %s (and %d more)", x, len(v)-1)
					return
				}
			}
			t.Errorf("oracle %s (%q) did not catch %s; violations: %q", tc.oracle, tc.detail, tc.flag, v)
		})
	}
}
