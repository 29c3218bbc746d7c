package torture

import (
	"fmt"
	"slices"
	"sort"
	"time"
)

// The oracles are plain functions of what the processes reported and what the
// database holds at the end, so that they can be tested on made-up histories
// (oracle_check_test.go): an oracle that never fails proves nothing.

// logRow is one committed write of the counter (table torture_log).
type logRow struct {
	section, key, proc string
	token, n, prev     int64
	committedAt        int64 // Unix µs, database clock
}

// checkCounter is oracle A. counter is each key's final value, log the
// committed writes, sections what the processes reported.
func checkCounter(counter map[string]int64, log []logRow, sections []*section) []string {
	var v []string
	byKey := map[string][]logRow{}
	logged := map[string]logRow{}
	for _, l := range log {
		byKey[l.key] = append(byKey[l.key], l)
		logged[l.section] = l
	}
	keys := make([]string, 0, len(counter))
	for k := range counter {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		rows := byKey[k]
		if int64(len(rows)) != counter[k] {
			v = append(v, fmt.Sprintf("A: key %s: counter is %d but %d writes committed (lost or phantom updates)", k, counter[k], len(rows)))
		}
		sort.Slice(rows, func(i, j int) bool { return rows[i].n < rows[j].n })
		for i, l := range rows {
			if l.n != int64(i+1) {
				v = append(v, fmt.Sprintf("A: key %s: write %s set the counter to %d, expected %d (two writes from one read)", k, l.section, l.n, i+1))
				break
			}
			if i > 0 && l.token < rows[i-1].token {
				v = append(v, fmt.Sprintf("A: key %s: write %s with token %d came after write %s with token %d (a stale holder wrote)",
					k, l.section, l.token, rows[i-1].section, rows[i-1].token))
			}
			if l.prev > l.token {
				v = append(v, fmt.Sprintf("A: key %s: write %s with token %d overwrote token %d", k, l.section, l.token, l.prev))
			}
		}
	}
	for _, s := range sections {
		_, in := logged[s.id]
		switch s.outcome {
		case OutcomeOK:
			if !in {
				v = append(v, fmt.Sprintf("A: section %s reported success but is not in the log", s.id))
			}
		case OutcomeFenced, OutcomeLost, OutcomeFailed:
			if in {
				v = append(v, fmt.Sprintf("A: section %s reported %s but its write committed", s.id, s.outcome))
			}
		}
	}
	return v
}

// checkTokens: per key, acquisitions in the order of their acquired_at (the
// database clock, read inside the per-key critical section of acquire) have
// strictly increasing tokens.
func checkTokens(ivs []*interval) []string {
	var v []string
	byKey := map[string][]*interval{}
	for _, iv := range ivs {
		byKey[iv.key] = append(byKey[iv.key], iv)
	}
	for k, list := range byKey {
		list = slices.DeleteFunc(list, func(iv *interval) bool { return iv.at == 0 }) // advisory: no database time
		sort.Slice(list, func(i, j int) bool { return list[i].at < list[j].at })
		for i := 1; i < len(list); i++ {
			a, b := list[i-1], list[i]
			if a.at != b.at && b.token <= a.token {
				v = append(v, fmt.Sprintf("A: key %s: token %d acquired after token %d", k, b.token, a.token))
			}
		}
	}
	return v
}

// truncated is the end of iv's knowable belief: a process paused by the
// suite while it held the lock cannot know what happened from the moment it
// stopped until it runs again, so its interval counts up to the pause. An
// advisory lock lives in its connection: a holder whose connection the suite
// dropped learns of it within the check interval (notice), so its interval
// counts up to the drop if it ended within notice of it. The drop times are
// taken before the suite acts, so they are never later than the real drop.
func truncated(iv *interval, pauses, drops []pauseRec, notice time.Duration) int64 {
	end := iv.end
	for _, p := range pauses {
		if p.proc == iv.proc && p.from >= iv.start && p.from < end {
			end = p.from
		}
	}
	if iv.adv {
		for _, d := range drops {
			// A backend told to terminate may still grant a lock before it
			// exits: a drop just before the start counts too.
			from := max(d.from, iv.start)
			if d.proc == iv.proc && d.from >= iv.start-int64(dropSlack) && from < end && iv.end-from <= int64(notice) {
				end = from
			}
		}
	}
	return end
}

// dropSlack is how long before an advisory lock was acquired a drop of its
// process's connections still counts for it.
const dropSlack = 250 * time.Millisecond

// how tells how an interval ended, for messages.
func (iv *interval) how() string {
	switch {
	case iv.killed:
		return "killed"
	case iv.lostT != 0 && iv.lostT <= iv.end:
		return "lost"
	default:
		return "release " + iv.release
	}
}

// nearestDrop describes the drop of a's process's connections nearest to
// a's start, for messages about advisory locks.
func nearestDrop(a *interval, drops []pauseRec) string {
	if !a.adv {
		return ""
	}
	best := int64(-1)
	for _, d := range drops {
		if d.proc == a.proc && (best < 0 || abs(d.from-a.start) < abs(best-a.start)) {
			best = d.from
		}
	}
	if best < 0 {
		return ", advisory"
	}
	return fmt.Sprintf(", advisory, its connection dropped at %+v", time.Duration(best-a.start))
}

func abs(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

// overlap is a pair of intervals of one key that overlap, a starting first.
type overlap struct{ a, b *interval }

// checkIntervals is oracle B: no two intervals of one key overlap. An overlap
// that disappears when the paused process's interval is cut at its pause is
// excused and returned, for the fence checks; so is one that disappears when
// an advisory holder's interval is cut where its connection was dropped, if it
// noticed within notice. Any other is a violation.
func checkIntervals(ivs []*interval, pauses, drops []pauseRec, notice time.Duration) (v []string, excused []overlap) {
	byKey := map[string][]*interval{}
	for _, iv := range ivs {
		byKey[iv.key] = append(byKey[iv.key], iv)
	}
	keys := make([]string, 0, len(byKey))
	for k := range byKey {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		list := byKey[k]
		sort.Slice(list, func(i, j int) bool { return list[i].start < list[j].start })
		for i, a := range list {
			if a.end == 0 {
				v = append(v, fmt.Sprintf("B: %s token %d by %s never ended", k, a.token, a.proc))
				continue
			}
			for _, b := range list[i+1:] {
				if b.start >= a.end {
					continue
				}
				if truncated(a, pauses, drops, notice) <= b.start {
					excused = append(excused, overlap{a, b})
					continue
				}
				v = append(v, fmt.Sprintf("B: %s: %s held token %d until +%s (%s%s), but %s acquired token %d at +%s",
					k, a.proc, a.token, time.Duration(a.end-a.start), a.how(), nearestDrop(a, drops), b.proc, b.token, time.Duration(b.start-a.start)))
			}
		}
	}
	return v, excused
}

// checkHandoff: the key of a killed holder passes to a waiter once the
// holder's lease has run out: a process that waited for the key through the
// whole of [kill + ttl, kill + bound] without anyone acquiring it meanwhile is
// a violation. end is when the run stopped; later kills are not judged.
func checkHandoff(kills []killRec, ivs []*interval, waits []*wait, ttl, bound time.Duration, end int64) (v []string, handoffs int, slowest time.Duration) {
	for _, k := range kills {
		if k.iv == nil {
			continue
		}
		key := k.iv.key
		next := int64(0)
		for _, iv := range ivs {
			if iv.key == key && iv.start > k.t && (next == 0 || iv.start < next) {
				next = iv.start
			}
		}
		if next != 0 {
			handoffs++
			slowest = max(slowest, time.Duration(next-k.t))
		}
		if k.t+int64(bound) > end || (next != 0 && next <= k.t+int64(bound)) {
			continue
		}
		from, to := k.t+int64(ttl), k.t+int64(bound)
		for _, w := range waits {
			if w.key == key && w.proc != k.proc && w.from <= from && (w.to == 0 || w.to > to) {
				v = append(v, fmt.Sprintf("handoff: %s of killed %s (token %d) not taken within %s although %s was waiting for it",
					key, k.proc, k.iv.token, bound, w.proc))
				break
			}
		}
	}
	return v, handoffs, slowest
}

// checkFenceOrder: a write fenced with token T never lands after a later
// acquisition of its key, on the database clock: the write's log row was
// inserted (committed_at) before the acquired_at of every acquisition with a
// larger token. The fence's row lock makes a takeover wait until the write's
// transaction ends, so the opposite order means the fence let a stale write
// through.
func checkFenceOrder(log []logRow, ivs []*interval) []string {
	var v []string
	byKey := map[string][]*interval{}
	for _, iv := range ivs {
		byKey[iv.key] = append(byKey[iv.key], iv)
	}
	for _, l := range log {
		for _, iv := range byKey[l.key] {
			if iv.token > l.token && iv.at != 0 && iv.at < l.committedAt {
				v = append(v, fmt.Sprintf("A: key %s: write %s with token %d landed %s after %s acquired token %d",
					l.key, l.section, l.token, time.Duration(l.committedAt-iv.at)*time.Microsecond, iv.proc, iv.token))
			}
		}
	}
	return v
}

// lateWrites counts the sections that a pause caught between their read and
// their write and whose write was rejected, and of those, how many the SQL
// function fence rejected (rather than Lock.Fence, from the client's own
// knowledge).
func lateWrites(sections []*section, pauses []pauseRec) (rejected, fencedInDB int) {
	for _, p := range pauses {
		for _, s := range sections {
			if s.proc != p.proc || s.readT == 0 || s.readT > p.from || (s.endT != 0 && s.endT < p.from) {
				continue
			}
			switch s.outcome {
			case OutcomeFenced:
				rejected++
				fencedInDB++
			case OutcomeLost:
				rejected++
			}
		}
	}
	return rejected, fencedInDB
}
