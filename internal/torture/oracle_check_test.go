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
}

func TestCheckHandoff(t *testing.T) {
	ttl, bound := time.Second, 2*time.Second
	held := &interval{proc: "p0", key: "k0", token: 1, start: 0, end: 500 * ms, killed: true}
	kills := []killRec{{proc: "p0", t: 500 * ms, iv: held}}
	waiting := []*wait{{proc: "p1", key: "k0", from: 100 * ms}}
	next := &interval{proc: "p1", key: "k0", token: 2, start: 1600 * ms, end: 1700 * ms}

	v, n, slowest := checkHandoff(kills, []*interval{held, next}, waiting, ttl, bound, 10_000*ms)
	expect(t, v, "")
	if n != 1 || slowest != 1100*time.Millisecond {
		t.Fatalf("handoffs %d, slowest %s; want 1, 1.1s", n, slowest)
	}
	v, _, _ = checkHandoff(kills, []*interval{held}, waiting, ttl, bound, 10_000*ms)
	expect(t, v, "not taken within 2s although p1 was waiting")
	// Nobody waited: nothing to hand over.
	v, _, _ = checkHandoff(kills, []*interval{held}, nil, ttl, bound, 10_000*ms)
	expect(t, v, "")
	// The run ended too soon after the kill to judge.
	v, _, _ = checkHandoff(kills, []*interval{held}, waiting, ttl, bound, 2000*ms)
	expect(t, v, "")
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
