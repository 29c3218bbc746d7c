package torture

import (
	"cmp"
	"fmt"
	"slices"
	"sort"
	"strings"
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

// readRow is one committed fenced read of the counter (table
// torture_reads): the value a reader saw, and its token.
type readRow struct {
	section, key, proc string
	token, n           int64
	committedAt        int64 // Unix µs, database clock
}

// checkCounter is oracle A. counter is each counter's final value (a key's,
// or a semaphore slot's), log the committed writes, sections what the
// processes reported (reads are checkReads').
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
		if s.read {
			continue
		}
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

// checkReads is oracle A for readers. A read fenced with a shared lock with
// token T sees exactly the writes of its key with tokens smaller than T:
// every such write's grant was gone before T was granted, with its fenced
// transaction ended (a grant never takes over a row that a fence has
// locked), and no writer is granted the key while the read's fence holds the
// reader's row, so no write with a larger token can commit before the read.
// The same row lock means no exclusive grant with a larger token is made
// before the read commits (the database clock tells). And every read that
// reported success is in the reads table, none that was rejected is.
func checkReads(reads []readRow, log []logRow, ivs []*interval, sections []*section) []string {
	var v []string
	writes := map[string][]int64{} // tokens of the committed writes, by key, sorted
	for _, l := range log {
		writes[l.key] = append(writes[l.key], l.token)
	}
	for _, toks := range writes {
		slices.Sort(toks)
	}
	excl := map[string][]*interval{}
	for _, iv := range ivs {
		if iv.exclusive() && iv.at != 0 {
			excl[iv.key] = append(excl[iv.key], iv)
		}
	}
	sort.Slice(reads, func(i, j int) bool { return reads[i].token < reads[j].token })
	logged := map[string]bool{}
	for _, rd := range reads {
		logged[rd.section] = true
		toks := writes[rd.key]
		if before := int64(sort.Search(len(toks), func(i int) bool { return toks[i] >= rd.token })); rd.n != before {
			v = append(v, fmt.Sprintf("A: key %s: read %s with token %d saw the counter at %d, but %d writes have smaller tokens (%s)",
				rd.key, rd.section, rd.token, rd.n, before, map[bool]string{true: "it saw a write of a later grant", false: "it missed a write of an earlier grant"}[rd.n > before]))
		}
		for _, iv := range excl[rd.key] {
			if iv.token > rd.token && iv.at < rd.committedAt {
				v = append(v, fmt.Sprintf("A: key %s: read %s with token %d committed %s after %s acquired token %d exclusively",
					rd.key, rd.section, rd.token, time.Duration(rd.committedAt-iv.at)*time.Microsecond, iv.proc, iv.token))
			}
		}
	}
	for _, s := range sections {
		if !s.read {
			continue
		}
		switch s.outcome {
		case OutcomeOK:
			if !logged[s.id] {
				v = append(v, fmt.Sprintf("A: read %s reported success but is not in the reads table", s.id))
			}
		case OutcomeFenced, OutcomeLost, OutcomeFailed:
			if logged[s.id] {
				v = append(v, fmt.Sprintf("A: read %s reported %s but it committed", s.id, s.outcome))
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
// counts up to the drop if it ended within notice of it.
//
// The suite knows a drop only to lie between d.from (taken before it acts)
// and d.to (once it is done): a Patroni switchover shuts the old primary down
// seconds after it was asked for. And a backend told to terminate may still
// grant a lock before it exits, so a lock granted up to dropSlack after d.to
// may be in a dropped connection too; it died at its grant, at the latest.
// The connection died at some moment t, no earlier than d.from and the
// grant, no later than d.to (or the late grant), and the holder ended within
// notice of t. The earliest such t, if there is one, is where the interval is
// cut: the overlaps excused are those that no t could explain.
func truncated(iv *interval, pauses, drops []pauseRec, notice time.Duration) int64 {
	end := iv.end
	for _, p := range pauses {
		if p.proc == iv.proc && p.from >= iv.start && p.from < end {
			end = p.from
		}
	}
	if iv.adv {
		for _, d := range drops {
			last := max(d.to, d.from)
			if iv.start > last {
				if iv.start-last > int64(dropSlack) {
					continue
				}
				last = iv.start
			}
			t := max(d.from, iv.start, iv.end-int64(notice))
			if d.proc == iv.proc && t <= last && t < end {
				end = t
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
	var best *pauseRec
	for i, d := range drops {
		if d.proc == a.proc && (best == nil || abs(d.from-a.start) < abs(best.from-a.start)) {
			best = &drops[i]
		}
	}
	if best == nil {
		return ", advisory"
	}
	if best.to > best.from {
		return fmt.Sprintf(", advisory, its connection dropped between %+v and %+v",
			time.Duration(best.from-a.start), time.Duration(best.to-a.start))
	}
	return fmt.Sprintf(", advisory, its connection dropped at %+v", time.Duration(best.from-a.start))
}

func abs(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

// overlap is a pair of intervals of one key that overlap, a starting first.
type overlap struct{ a, b *interval }

// conflict reports whether a and b may not overlap: any pair but two shared
// grants, or two permits (of different slots: their number is checked by
// checkPermits).
func conflict(a, b *interval) bool {
	switch {
	case a.kind == KindShared && b.kind == KindShared:
		return false
	case a.kind == KindPermit && b.kind == KindPermit:
		return a.slot == b.slot
	}
	return true
}

// label names iv's grant in messages: its token, and its kind unless
// exclusive.
func (iv *interval) label() string {
	switch iv.kind {
	case KindShared:
		return fmt.Sprintf("token %d (shared)", iv.token)
	case KindPermit:
		return fmt.Sprintf("token %d (permit %d of %d)", iv.token, iv.slot, iv.permits)
	}
	return fmt.Sprintf("token %d", iv.token)
}

// checkIntervals is oracle B: no two intervals of one key overlap, unless
// both are shared, or both are permits of different slots. An overlap
// that disappears when the paused process's interval is cut at its pause is
// excused and returned, for the fence checks; so is one that disappears when
// an advisory holder's interval is cut where its connection was dropped, if it
// noticed within notice. Any other is a violation.
func checkIntervals(ivs []*interval, pauses, drops []pauseRec, notice time.Duration) (v []string, excused []overlap) {
	keys, byKey := groupByKey(ivs, func(*interval) bool { return true })
	for _, k := range keys {
		list := byKey[k]
		sort.Slice(list, func(i, j int) bool { return list[i].start < list[j].start })
		for i, a := range list {
			if a.end == 0 {
				v = append(v, fmt.Sprintf("B: %s token %d by %s never ended", k, a.token, a.proc))
				continue
			}
			for _, b := range list[i+1:] {
				if b.start >= a.end || !conflict(a, b) {
					continue
				}
				if truncated(a, pauses, drops, notice) <= b.start {
					excused = append(excused, overlap{a, b})
					continue
				}
				v = append(v, fmt.Sprintf("B: %s: %s held %s until +%s (%s%s), but %s acquired %s at +%s",
					k, a.proc, a.label(), time.Duration(a.end-a.start), a.how(), nearestDrop(a, drops), b.proc, b.label(), time.Duration(b.start-a.start)))
			}
		}
	}
	return v, excused
}

// groupByKey returns the intervals of ivs that keep accepts, by key, and
// their keys in order.
func groupByKey(ivs []*interval, keep func(*interval) bool) ([]string, map[string][]*interval) {
	byKey := map[string][]*interval{}
	for _, iv := range ivs {
		if keep(iv) {
			byKey[iv.key] = append(byKey[iv.key], iv)
		}
	}
	keys := make([]string, 0, len(byKey))
	for k := range byKey {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys, byKey
}

// checkPermits is oracle B for semaphores: at most N permit intervals of a
// key overlap at any instant, with every interval cut where truncated cuts
// it (a paused holder cannot know; there oracle A must still hold); a
// permit's slot is between 1 and N, and every holder agrees on N. It returns
// the violations, how many instants had more than N only before the cuts
// (excused), and the most permits of one key ever in use.
func checkPermits(ivs []*interval, pauses, drops []pauseRec, notice time.Duration) (v []string, excused, peak int) {
	keys, byKey := groupByKey(ivs, func(iv *interval) bool { return iv.kind == KindPermit && iv.end != 0 })
	for _, k := range keys {
		list := byKey[k]
		n := list[0].permits
		for _, iv := range list {
			if iv.permits != n {
				v = append(v, fmt.Sprintf("B: %s: holders disagree on the permits: %s believed %d, %s %d",
					k, list[0].proc, n, iv.proc, iv.permits))
				break
			}
		}
		for _, iv := range list {
			if iv.slot < 1 || iv.slot > n {
				v = append(v, fmt.Sprintf("B: %s: %s was given %s", k, iv.proc, iv.label()))
			}
		}
		cut, at, open := mostOverlapping(list, func(iv *interval) int64 { return truncated(iv, pauses, drops, notice) })
		peak = max(peak, cut)
		if cut > n {
			var who []string
			for _, iv := range open {
				who = append(who, fmt.Sprintf("%s %s", iv.proc, iv.label()))
			}
			v = append(v, fmt.Sprintf("B: %s: %d permits of %d held at once at +%s: %s",
				k, cut, n, time.Duration(at-list[0].start), strings.Join(who, ", ")))
		} else if raw, _, _ := mostOverlapping(list, func(iv *interval) int64 { return iv.end }); raw > n {
			excused++
		}
	}
	return v, excused, peak
}

// mostOverlapping returns the most intervals of list open at one instant,
// each from its start to end(iv), the first instant it happens, and those
// intervals.
func mostOverlapping(list []*interval, end func(*interval) int64) (most int, at int64, open []*interval) {
	type edge struct {
		t  int64
		iv *interval
		up bool
	}
	var edges []edge
	for _, iv := range list {
		if e := end(iv); e > iv.start {
			edges = append(edges, edge{iv.start, iv, true}, edge{e, iv, false})
		}
	}
	// Ends before starts at one instant: [a, b) and [b, c) do not overlap.
	slices.SortFunc(edges, func(a, b edge) int {
		if a.t != b.t {
			return cmp.Compare(a.t, b.t)
		}
		if a.up == b.up {
			return 0
		}
		if a.up {
			return 1
		}
		return -1
	})
	cur := map[*interval]bool{}
	for _, e := range edges {
		if !e.up {
			delete(cur, e.iv)
			continue
		}
		cur[e.iv] = true
		if len(cur) > most {
			most, at = len(cur), e.t
			open = open[:0]
			for iv := range cur {
				open = append(open, iv)
			}
		}
	}
	sort.Slice(open, func(i, j int) bool { return open[i].start < open[j].start })
	return most, at, open
}

// handoffs are the figures of checkHandoff for one sort of kill.
type handoffs struct {
	keys, passed int           // keys of kills, and of those, keys granted to another process later
	slowest      time.Duration // the longest from a kill to the next grant of its key
	// alone: of the keys passed on, those that nothing but the kill could
	// keep past its lease (free is kill + ttl), and their slowest.
	alone        int
	slowestAlone time.Duration
}

// checkHandoff: the keys of a killed process pass on once its lease has run
// out, whether it held them or waited for them (a dead waiter keeps its
// place in the queue until its holder expires). A process that waited for
// one such key alone, through the whole of [free, free + bound - ttl],
// without anyone acquiring the key meanwhile, is a violation. free is kill +
// ttl, or later where something else kept the key: another process's grant
// of it that began before the kill (of another key: before the window's
// end), until it ended (for a killed one, until its lease ran out); a waiter
// that died, until its lease ran out; and for a key that a key set waited
// for through the window, whatever kept the set's other keys. end is when
// the run stopped; later kills are not judged. It returns the figures for
// the keys killed holders held, and for the keys that killed waiters headed
// the queue of, and for the keys that killed waiters had just been handed by
// a release: how many passed on, and how soon, of all and of those that
// nothing else kept.
func checkHandoff(kills []killRec, ivs []*interval, waits []*wait, ttl, bound time.Duration, end int64) (v []string, held, head, handed handoffs) {
	const never = int64(1<<63 - 1)
	delta := int64(bound - ttl)
	for _, k := range kills {
		keys := slices.Clone(k.waited)
		for _, iv := range k.held {
			keys = append(keys, iv.key)
		}
		for _, key := range keys {
			next := int64(0)
			for _, iv := range ivs {
				if iv.key == key && iv.proc != k.proc && iv.start > k.t && (next == 0 || iv.start < next) {
					next = iv.start
				}
			}
			fig := (*handoffs)(nil)
			switch {
			case key == k.handed:
				fig = &handed
			case slices.ContainsFunc(k.held, func(iv *interval) bool { return iv.key == key }):
				fig = &held
			case key == k.head:
				fig = &head
			}

			// When could the key be free at the latest?
			free := k.t + int64(ttl)
			kept := map[string]bool{key: true}
			for changed := true; changed; {
				changed = false
				later := func(u int64) {
					if u > free {
						free, changed = u, true
					}
				}
				for _, iv := range ivs {
					if iv.proc == k.proc || !kept[iv.key] || iv.start >= free+delta {
						continue
					}
					if iv.key == key && iv.start > k.t {
						continue // a grant of the key after the kill is the handoff itself
					}
					switch {
					case iv.end == 0:
						later(never / 2)
					case iv.killed:
						later(iv.end + int64(ttl))
					default:
						later(iv.end)
					}
				}
				for _, w := range waits {
					if w.proc == k.proc || !slices.ContainsFunc(w.keys, func(x string) bool { return kept[x] }) {
						continue
					}
					if w.died && w.to < free+delta {
						later(w.to + int64(ttl))
					}
					if len(w.keys) > 1 && w.from < free+delta && (w.to == 0 || w.to > free) {
						for _, x := range w.keys {
							if !kept[x] {
								kept[x], changed = true, true
							}
						}
					}
				}
			}
			if fig != nil {
				fig.keys++
				if next != 0 {
					fig.passed++
					fig.slowest = max(fig.slowest, time.Duration(next-k.t))
					if free == k.t+int64(ttl) {
						fig.alone++
						fig.slowestAlone = max(fig.slowestAlone, time.Duration(next-k.t))
					}
				}
			}
			if free+delta > end || (next != 0 && next <= free+delta) {
				continue
			}
			for _, w := range waits {
				if w.proc != k.proc && len(w.keys) == 1 && w.keys[0] == key && w.from <= free && (w.to == 0 || w.to > free+delta) {
					what := "held"
					if fig == &handed {
						what = "had just been handed"
					} else if fig == &head {
						what = "headed the queue of"
					} else if fig == nil {
						what = "waited for"
					}
					v = append(v, fmt.Sprintf("handoff: %s, which killed %s %s, not taken within %s of when it could be free (+%s after the kill) although %s was waiting for it",
						key, k.proc, what, time.Duration(delta), time.Duration(free-k.t).Round(time.Millisecond), w.proc))
					break
				}
			}
		}
	}
	return v, held, head, handed
}

// checkFenceOrder: a write fenced with token T never lands after a later
// acquisition of its counter's key (for a permit, of its slot), on the
// database clock: the write's log row was inserted (committed_at) before the
// acquired_at of every acquisition with a larger token. The fence's row lock makes a takeover wait until the write's
// transaction ends, so the opposite order means the fence let a stale write
// through.
func checkFenceOrder(log []logRow, ivs []*interval) []string {
	var v []string
	byKey := map[string][]*interval{}
	for _, iv := range ivs {
		byKey[iv.ckey()] = append(byKey[iv.ckey()], iv)
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
