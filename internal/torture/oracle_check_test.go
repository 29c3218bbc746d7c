package torture

import (
	"strings"
	"testing"
	"time"
)

// The oracles must find what they are meant to find: each is fed a made-up
// history with one known violation, and a clean one.

const ms = int64(time.Millisecond)

func expect(t *testing.T, v []string, want string) {
	t.Helper()
	if want == "" {
		if len(v) != 0 {
			t.Fatalf("want no violation, got %q", v)
		}
		return
	}
	for _, x := range v {
		if strings.Contains(x, want) {
			return
		}
	}
	t.Fatalf("want a violation containing %q, got %q", want, v)
}

func TestCheckCounter(t *testing.T) {
	clean := []logRow{
		{section: "p0-1", key: "k0", token: 5, n: 1},
		{section: "p1-1", key: "k0", token: 7, n: 2, prev: 5},
	}
	secs := []*section{
		{id: "p0-1", outcome: OutcomeOK},
		{id: "p1-1", outcome: OutcomeUnknown},
		{id: "p2-1", outcome: OutcomeFenced},
	}
	expect(t, checkCounter(map[string]int64{"k0": 2}, clean, secs), "")

	// Two holders read 1 and both wrote 2: one update is lost.
	lostUpdate := append(clean[:2:2], logRow{section: "p2-1", key: "k0", token: 6, n: 2, prev: 7})
	expect(t, checkCounter(map[string]int64{"k0": 2}, lostUpdate, nil), "counter is 2 but 3 writes")
	expect(t, checkCounter(map[string]int64{"k0": 2}, lostUpdate, nil), "two writes from one read")

	// A stale holder wrote after a newer token.
	stale := []logRow{clean[0], {section: "p1-1", key: "k0", token: 4, n: 2, prev: 5}}
	expect(t, checkCounter(map[string]int64{"k0": 2}, stale, nil), "a stale holder wrote")

	// A success that did not commit, a rejection that did.
	expect(t, checkCounter(map[string]int64{"k0": 1}, clean[:1], []*section{{id: "p1-1", outcome: OutcomeOK}}),
		"reported success but is not in the log")
	expect(t, checkCounter(map[string]int64{"k0": 2}, clean, []*section{{id: "p1-1", outcome: OutcomeFenced}}),
		"reported fenced but its write committed")
}

func TestCheckTokensAndFenceOrder(t *testing.T) {
	ivs := []*interval{
		{proc: "p0", key: "k0", token: 5, at: 1000},
		{proc: "p1", key: "k0", token: 7, at: 2000},
	}
	expect(t, checkTokens(ivs), "")
	expect(t, checkTokens([]*interval{ivs[0], {proc: "p1", key: "k0", token: 4, at: 2000}}), "token 4 acquired after token 5")

	expect(t, checkFenceOrder([]logRow{{section: "p0-1", key: "k0", token: 5, committedAt: 1500}}, ivs), "")
	expect(t, checkFenceOrder([]logRow{{section: "p0-1", key: "k0", token: 5, committedAt: 2500}}, ivs),
		"landed 500µs after p1 acquired token 7")
}

func TestCheckIntervals(t *testing.T) {
	a := &interval{proc: "p0", key: "k0", token: 1, start: 0, end: 100 * ms}
	b := &interval{proc: "p1", key: "k0", token: 2, start: 101 * ms, end: 200 * ms}
	other := &interval{proc: "p2", key: "k1", token: 3, start: 50 * ms, end: 150 * ms}
	v, ex := checkIntervals([]*interval{b, a, other}, nil, nil, 0)
	expect(t, v, "")
	if len(ex) != 0 {
		t.Fatalf("excused %v", ex)
	}

	late := &interval{proc: "p0", key: "k0", token: 1, start: 0, end: 150 * ms, release: ReleaseOK}
	v, _ = checkIntervals([]*interval{late, b}, nil, nil, 0)
	expect(t, v, "p0 held token 1 until +150ms (release ok), but p1 acquired token 2 at +101ms")

	// Paused from 50ms: it could not know; the overlap is excused.
	v, ex = checkIntervals([]*interval{late, b}, []pauseRec{{proc: "p0", from: 50 * ms, to: 140 * ms}}, nil, 0)
	expect(t, v, "")
	if len(ex) != 1 {
		t.Fatalf("want 1 excused overlap, got %d", len(ex))
	}
	// Paused only after the other had acquired: not excused.
	v, _ = checkIntervals([]*interval{late, b}, []pauseRec{{proc: "p0", from: 120 * ms, to: 140 * ms}}, nil, 0)
	expect(t, v, "p0 held token 1")
	// Another process's pause excuses nothing.
	v, _ = checkIntervals([]*interval{late, b}, []pauseRec{{proc: "p1", from: 50 * ms, to: 140 * ms}}, nil, 0)
	expect(t, v, "p0 held token 1")

	v, _ = checkIntervals([]*interval{{proc: "p0", key: "k0", token: 1, start: 5}}, nil, nil, 0)
	expect(t, v, "never ended")

	// An advisory holder whose connection was dropped at 90ms and that
	// noticed at 150ms is excused if notice allows 60ms, not if 50ms.
	adv := &interval{proc: "p0", key: "k0", token: 1, start: 0, end: 150 * ms, adv: true}
	drops := []pauseRec{{proc: "p0", from: 90 * ms}}
	v, ex = checkIntervals([]*interval{adv, b}, nil, drops, 60*time.Millisecond)
	expect(t, v, "")
	if len(ex) != 1 {
		t.Fatalf("want 1 excused overlap, got %d", len(ex))
	}
	v, _ = checkIntervals([]*interval{adv, b}, nil, drops, 50*time.Millisecond)
	expect(t, v, "p0 held token 1")
	// A table-mode lock does not live in its connection: no excuse.
	v, _ = checkIntervals([]*interval{late, b}, nil, drops, time.Second)
	expect(t, v, "p0 held token 1")

	// A drop known only to lie in a window (a Patroni switchover, asked
	// for 310ms before p0's grant and done 2s after it): the grant was on
	// the old primary, its backend died after it, and p0 noticed at 34ms,
	// after p1's grant at 25ms on a backend told to terminate too. A drop
	// at any t from the grant to 34ms explains the overlap; not so when p0
	// took 50ms longer than notice allows to notice, nor when the grant came
	// more than dropSlack after the window.
	adv2 := &interval{proc: "p0", key: "k0", token: 1, start: 310 * ms, end: 344 * ms, adv: true}
	b2 := &interval{proc: "p1", key: "k0", token: 2, start: 335 * ms, end: 340 * ms, adv: true}
	window := []pauseRec{{proc: "p0", from: 0, to: 2310 * ms}}
	v, ex = checkIntervals([]*interval{adv2, b2}, nil, window, 60*time.Millisecond)
	expect(t, v, "")
	if len(ex) != 1 {
		t.Fatalf("want 1 excused overlap in the window, got %d", len(ex))
	}
	slow := &interval{proc: "p0", key: "k0", token: 1, start: 310 * ms, end: 420 * ms, adv: true}
	v, _ = checkIntervals([]*interval{slow, b2}, nil, window, 60*time.Millisecond)
	expect(t, v, "dropped between -310ms and 2s")
	after := []pauseRec{{proc: "p0", from: 0, to: 50 * ms}}
	v, _ = checkIntervals([]*interval{adv2, b2}, nil, after, 60*time.Millisecond)
	expect(t, v, "p0 held token 1")
	// Within dropSlack after the window, the grant may be on a backend told
	// to terminate: it died at its grant at the latest.
	justAfter := []pauseRec{{proc: "p0", from: 0, to: 100 * ms}}
	v, _ = checkIntervals([]*interval{adv2, b2}, nil, justAfter, 60*time.Millisecond)
	expect(t, v, "")
}

func TestCheckReads(t *testing.T) {
	log := []logRow{
		{section: "w1", key: "k0", token: 5, n: 1},
		{section: "w2", key: "k0", token: 9, n: 2, prev: 5},
		{section: "w3", key: "k1", token: 7, n: 1},
	}
	ivs := []*interval{
		{proc: "p0", key: "k0", token: 5, at: 1000},
		{proc: "p1", key: "k0", token: 6, at: 2000, kind: KindShared},
		{proc: "p2", key: "k0", token: 8, at: 2100, kind: KindShared},
		{proc: "p3", key: "k0", token: 9, at: 5000},
	}
	reads := []readRow{
		{section: "r1", key: "k0", token: 6, n: 1, committedAt: 3000},
		{section: "r2", key: "k0", token: 8, n: 1, committedAt: 4000},
		{section: "r3", key: "k0", token: 10, n: 2, committedAt: 6000},
		{section: "r4", key: "k1", token: 4, n: 0, committedAt: 100},
	}
	secs := []*section{
		{id: "r1", outcome: OutcomeOK, read: true},
		{id: "r5", outcome: OutcomeFenced, read: true},
		{id: "w1", outcome: OutcomeOK}, // a write: checkCounter's
	}
	expect(t, checkReads(reads, log, ivs, secs), "")
	// The counter checks leave reads alone.
	expect(t, checkCounter(map[string]int64{"k0": 2, "k1": 1}, log, secs[1:]), "")

	// A reader saw a write with a larger token than its own (a writer
	// wrote while it held the key shared), or missed an earlier one.
	saw := []readRow{{section: "r1", key: "k0", token: 6, n: 2, committedAt: 3000}}
	expect(t, checkReads(saw, log, ivs, nil), "read r1 with token 6 saw the counter at 2, but 1 writes have smaller tokens (it saw a write of a later grant)")
	missed := []readRow{{section: "r3", key: "k0", token: 10, n: 1, committedAt: 6000}}
	expect(t, checkReads(missed, log, ivs, nil), "it missed a write of an earlier grant")
	// A read that committed after a later exclusive grant.
	late := []readRow{{section: "r2", key: "k0", token: 8, n: 1, committedAt: 5500}}
	expect(t, checkReads(late, log, ivs, nil), "read r2 with token 8 committed 500µs after p3 acquired token 9 exclusively")
	// A later shared grant is no harm.
	expect(t, checkReads([]readRow{{section: "r1", key: "k0", token: 6, n: 1, committedAt: 2500}}, log, ivs, nil), "")
	// Outcomes against the reads table.
	expect(t, checkReads(reads, log, ivs, []*section{{id: "r9", outcome: OutcomeOK, read: true}}),
		"read r9 reported success but is not in the reads table")
	expect(t, checkReads(reads, log, ivs, []*section{{id: "r2", outcome: OutcomeLost, read: true}}),
		"read r2 reported lost but it committed")
}

func TestCheckIntervalsKinds(t *testing.T) {
	r1 := &interval{proc: "p0", key: "k0", token: 1, start: 0, end: 100 * ms, kind: KindShared}
	r2 := &interval{proc: "p1", key: "k0", token: 2, start: 50 * ms, end: 150 * ms, kind: KindShared}
	w := &interval{proc: "p2", key: "k0", token: 3, start: 120 * ms, end: 200 * ms}
	v, _ := checkIntervals([]*interval{r1, r2}, nil, nil, 0)
	expect(t, v, "") // readers share
	v, _ = checkIntervals([]*interval{r1, r2, w}, nil, nil, 0)
	expect(t, v, "p1 held token 2 (shared) until +100ms (release ), but p2 acquired token 3 at +70ms")
	// A writer's interval overlaps a reader's: the same, either way round.
	v, _ = checkIntervals([]*interval{{proc: "p2", key: "k0", token: 0, start: 0, end: 60 * ms}, r2}, nil, nil, 0)
	expect(t, v, "but p1 acquired token 2 (shared) at +50ms")
	// Set members are judged per key, as single locks.
	m1 := &interval{proc: "p3", key: "k1", token: 4, start: 0, end: 100 * ms, set: "p3-s1"}
	m2 := &interval{proc: "p3", key: "k0", token: 5, start: 0, end: 100 * ms, set: "p3-s1", kind: KindShared}
	v, _ = checkIntervals([]*interval{m1, m2, r2}, nil, nil, 0)
	expect(t, v, "")
	v, _ = checkIntervals([]*interval{m1, m2, {proc: "p4", key: "k1", token: 6, start: 90 * ms, end: 95 * ms}}, nil, nil, 0)
	expect(t, v, "k1: p3 held token 4 until +100ms")

	// Permits of different slots overlap; of one slot they do not.
	p1 := &interval{proc: "p0", key: "k0", token: 1, start: 0, end: 100 * ms, kind: KindPermit, slot: 1, permits: 2}
	p2 := &interval{proc: "p1", key: "k0", token: 2, start: 50 * ms, end: 150 * ms, kind: KindPermit, slot: 2, permits: 2}
	p3 := &interval{proc: "p2", key: "k0", token: 3, start: 90 * ms, end: 200 * ms, kind: KindPermit, slot: 1, permits: 2}
	v, _ = checkIntervals([]*interval{p1, p2}, nil, nil, 0)
	expect(t, v, "")
	v, _ = checkIntervals([]*interval{p1, p2, p3}, nil, nil, 0)
	expect(t, v, "p0 held token 1 (permit 1 of 2) until +100ms (release ), but p2 acquired token 3 (permit 1 of 2) at +90ms")
}

func TestCheckPermits(t *testing.T) {
	permit := func(proc string, token int64, slot int, from, to int64) *interval {
		return &interval{proc: proc, key: "k0", token: token, start: from * ms, end: to * ms, kind: KindPermit, slot: slot, permits: 2}
	}
	a, b := permit("p0", 1, 1, 0, 100), permit("p1", 2, 2, 50, 150)
	c := permit("p2", 3, 1, 100, 200) // starts as a ends: no overlap
	v, ex, peak := checkPermits([]*interval{a, b, c}, nil, nil, 0)
	expect(t, v, "")
	if ex != 0 || peak != 2 {
		t.Fatalf("excused %d, peak %d; want 0, 2", ex, peak)
	}
	// A third permit while two are held: too many, whatever its slot.
	d := permit("p3", 4, 3, 60, 70)
	v, _, peak = checkPermits([]*interval{a, b, d}, nil, nil, 0)
	expect(t, v, "k0: 3 permits of 2 held at once at +60ms: p0 token 1 (permit 1 of 2), p1 token 2 (permit 2 of 2), p3 token 4 (permit 3 of 2)")
	expect(t, v, "k0: p3 was given token 4 (permit 3 of 2)")
	if peak != 3 {
		t.Fatalf("peak %d, want 3", peak)
	}
	// The same while p0 was paused from 55ms: excused.
	v, ex, _ = checkPermits([]*interval{a, b, d}, []pauseRec{{proc: "p0", from: 55 * ms, to: 90 * ms}}, nil, 0)
	expect(t, v, "k0: p3 was given") // the slot is still wrong
	for _, x := range v {
		if strings.Contains(x, "held at once") {
			t.Fatalf("not excused: %s", x)
		}
	}
	if ex != 1 {
		t.Fatalf("excused %d, want 1", ex)
	}
	// Holders that disagree on N.
	e := permit("p4", 5, 1, 300, 400)
	e.permits = 3
	v, _, _ = checkPermits([]*interval{a, e}, nil, nil, 0)
	expect(t, v, "holders disagree on the permits: p0 believed 2, p4 3")

	// A permit's write is fenced by its slot: a later grant of another slot
	// is no harm, of the same slot it is.
	log := []logRow{{section: "s1", key: "k0/1", token: 1, committedAt: 80_000}}
	expect(t, checkFenceOrder(log, []*interval{{key: "k0", token: 2, at: 60_000, kind: KindPermit, slot: 2}}), "")
	expect(t, checkFenceOrder(log, []*interval{{proc: "p1", key: "k0", token: 2, at: 60_000, kind: KindPermit, slot: 1}}),
		"write s1 with token 1 landed 20ms after p1 acquired token 2")
}

func TestCheckHandoff(t *testing.T) {
	ttl, bound := time.Second, 2*time.Second
	held := &interval{proc: "p0", key: "k0", token: 1, start: 0, end: 500 * ms, killed: true}
	kills := []killRec{{proc: "p0", t: 500 * ms, held: []*interval{held}}}
	waiting := []*wait{{proc: "p1", keys: []string{"k0"}, from: 100 * ms}}
	next := &interval{proc: "p1", key: "k0", token: 2, start: 1600 * ms, end: 1700 * ms}

	v, h, _, _ := checkHandoff(kills, []*interval{held, next}, waiting, ttl, bound, 10_000*ms)
	expect(t, v, "")
	if h.keys != 1 || h.passed != 1 || h.slowest != 1100*time.Millisecond {
		t.Fatalf("handoffs %+v; want 1 of 1, 1.1s", h)
	}
	v, _, _, _ = checkHandoff(kills, []*interval{held}, waiting, ttl, bound, 10_000*ms)
	expect(t, v, "not taken within 1s of when it could be free (+1s after the kill) although p1 was waiting")
	// Nobody waited: nothing to hand over.
	v, _, _, _ = checkHandoff(kills, []*interval{held}, nil, ttl, bound, 10_000*ms)
	expect(t, v, "")
	// The run ended too soon after the kill to judge.
	v, _, _, _ = checkHandoff(kills, []*interval{held}, waiting, ttl, bound, 2000*ms)
	expect(t, v, "")

	// A reader that shared the key with the killed one kept it until 3s: a
	// writer waiting for it is judged from then on.
	reader := &interval{proc: "p2", key: "k0", token: 3, start: 200 * ms, end: 3000 * ms, kind: KindShared}
	lateNext := &interval{proc: "p1", key: "k0", token: 4, start: 3500 * ms, end: 3600 * ms}
	v, _, _, _ = checkHandoff(kills, []*interval{held, reader, lateNext}, waiting, ttl, bound, 10_000*ms)
	expect(t, v, "")
	v, _, _, _ = checkHandoff(kills, []*interval{held, reader}, waiting, ttl, bound, 10_000*ms)
	expect(t, v, "(+2.5s after the kill) although p1 was waiting")
	// Killed too, it kept the key until its own lease ran out.
	killedReader := &interval{proc: "p2", key: "k0", token: 3, start: 200 * ms, end: 1000 * ms, killed: true, kind: KindShared}
	v, _, _, _ = checkHandoff(kills, []*interval{held, killedReader}, waiting, ttl, bound, 10_000*ms)
	expect(t, v, "(+1.5s after the kill) although p1 was waiting")

	// A waiter killed at the head of the queue: the next waiter gets the key
	// once its lease ran out; figures for the head.
	headKill := []killRec{{proc: "p3", t: 500 * ms, waited: []string{"k0"}, head: "k0"}}
	deadWait := &wait{proc: "p3", keys: []string{"k0"}, from: 50 * ms, to: 500 * ms, died: true}
	waits := []*wait{deadWait, waiting[0]}
	v, _, hd, _ := checkHandoff(headKill, []*interval{next}, waits, ttl, bound, 10_000*ms)
	expect(t, v, "")
	if hd.keys != 1 || hd.passed != 1 || hd.slowest != 1100*time.Millisecond || hd.alone != 1 || hd.slowestAlone != hd.slowest {
		t.Fatalf("head figures %+v; want 1 of 1, 1.1s, alone", hd)
	}
	// Kept by a killed holder until 2s: passed on, but not alone.
	holderKilled := &interval{proc: "p6", key: "k0", token: 8, start: 0, end: 1000 * ms, killed: true}
	later := &interval{proc: "p1", key: "k0", token: 10, start: 2600 * ms, end: 2700 * ms}
	v, _, hd, _ = checkHandoff(headKill, []*interval{holderKilled, later}, waits, ttl, bound, 10_000*ms)
	expect(t, v, "")
	if hd.passed != 1 || hd.alone != 0 || hd.slowest != 2100*time.Millisecond {
		t.Fatalf("head figures %+v; want passed 1 in 2.1s, none alone", hd)
	}
	v, _, _, _ = checkHandoff(headKill, nil, waits, ttl, bound, 10_000*ms)
	expect(t, v, "k0, which killed p3 headed the queue of, not taken")

	// Behind a key set that waits for k1 too, which p4 holds until 4s: the
	// key could not be free before.
	setWait := &wait{proc: "p5", keys: []string{"k0", "k1"}, from: 60 * ms}
	other := &interval{proc: "p4", key: "k1", token: 9, start: 100 * ms, end: 4000 * ms}
	v, _, _, _ = checkHandoff(headKill, []*interval{other}, append(waits, setWait), ttl, bound, 10_000*ms)
	expect(t, v, "(+3.5s after the kill) although p1 was waiting")
	v, _, _, _ = checkHandoff(headKill, []*interval{other}, append(waits, setWait), ttl, bound, 4400*ms)
	expect(t, v, "") // too soon to judge

	// A waiter killed just after a release handed it the key: the next
	// waiter gets it once the dead holder's lease ran out, whether the
	// dead one had reported the grant (acted) or not; figures for the
	// handed kills, none for the head or the held.
	handedWait := &wait{proc: "p7", keys: []string{"k0"}, from: 50 * ms, to: 500 * ms, died: true}
	handedKill := []killRec{{proc: "p7", t: 500 * ms, waited: []string{"k0"}, handed: "k0", handedTok: 11}}
	v, hl, hd, hn := checkHandoff(handedKill, []*interval{next}, []*wait{handedWait, waiting[0]}, ttl, bound, 10_000*ms)
	expect(t, v, "")
	if hn.keys != 1 || hn.passed != 1 || hn.slowest != 1100*time.Millisecond || hn.alone != 1 || hl.keys+hd.keys != 0 {
		t.Fatalf("handed figures %+v (held %+v, head %+v); want 1 of 1 in 1.1s, alone, and no other", hn, hl, hd)
	}
	actedIv := &interval{proc: "p7", key: "k0", token: 11, start: 490 * ms, end: 500 * ms, killed: true}
	acted := []killRec{{proc: "p7", t: 500 * ms, held: []*interval{actedIv}, handed: "k0", handedTok: 11, acted: true}}
	v, hl, _, hn = checkHandoff(acted, []*interval{actedIv, next}, waiting, ttl, bound, 10_000*ms)
	expect(t, v, "")
	if hn.keys != 1 || hn.passed != 1 || hl.keys != 0 {
		t.Fatalf("handed figures %+v (held %+v); want the acted kill counted as handed only", hn, hl)
	}
	v, _, _, _ = checkHandoff(handedKill, nil, []*wait{handedWait, waiting[0]}, ttl, bound, 10_000*ms)
	expect(t, v, "k0, which killed p7 had just been handed, not taken within 1s")
}

func TestLateWrites(t *testing.T) {
	pauses := []pauseRec{{proc: "p0", from: 100 * ms, to: 400 * ms}}
	secs := []*section{
		{id: "p0-1", proc: "p0", readT: 90 * ms, endT: 420 * ms, outcome: OutcomeFenced},
		{id: "p0-2", proc: "p0", readT: 10 * ms, endT: 20 * ms, outcome: OutcomeOK},    // before the pause
		{id: "p1-1", proc: "p1", readT: 90 * ms, endT: 420 * ms, outcome: OutcomeLost}, // not paused
	}
	if rej, db := lateWrites(secs, pauses); rej != 1 || db != 1 {
		t.Fatalf("rejected %d, by the SQL fence %d; want 1, 1", rej, db)
	}
}
