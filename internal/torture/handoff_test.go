package torture

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// 10. Direct handoff under kills: SIGKILL of a waiter just handed the key by
// a release (migration 7's serve), taken in turn two ways. Frozen: the
// suite stops the waiter at the head of a queue (SIGSTOP, for less than its
// lease can last without a renewal), waits for the handoff notification on
// the waiter's holder channel, and kills it: the process never saw its
// grant. Live: the suite listens on that channel while the waiter runs and
// kills it the moment the notification arrives, racing the client (which
// may or may not have taken the grant by then). Either way the dead
// holder's new grant stays until its lease runs out, the waiters behind it
// get the key then, and nothing is left held by the dead. Every third kill
// is of a holder, or of any process (as in faultKill).
func faultKillHandoff(ctx context.Context, r *run) {
	r.p.handedKills = true // the checks judge what it did
	for i := 0; sleep(ctx, between(r.p.ttl/6, r.p.ttl/2)); i++ {
		if i%3 == 2 {
			r.killOne()
			continue
		}
		// No fallback kill when no handoff comes, and none before the
		// key of a handed kill has passed on (or could have): a kill of
		// another waiter meanwhile would keep the key too, and the
		// pass-on would not be judged alone.
		if key, t := r.killHanded(ctx, i%3 == 0); key != "" {
			r.waitPassedOn(ctx, key, t, r.p.ttl+r.p.poll+grace)
		}
	}
}

// waitPassedOn waits up to d for a process to report a grant of key that
// began after t.
func (r *run) waitPassedOn(ctx context.Context, key string, t int64, d time.Duration) {
	for deadline := time.Now().Add(d); time.Now().Before(deadline) && ctx.Err() == nil; {
		r.mu.Lock()
		n := len(r.intervals)
		passed := false
		for i := n - 1; i >= 0 && r.intervals[i].start > t; i-- {
			passed = passed || r.intervals[i].key == key
		}
		r.mu.Unlock()
		if passed {
			return
		}
		time.Sleep(20 * time.Millisecond) // polling what the processes reported
	}
}

// killHanded looks for a live waiter at the head of a key's queue behind a
// live grant of another holder, listens on its holder channel, and kills it
// once a handoff of that key reaches it (freeze: stopped first). It reports
// the key and the time of the kill if it killed one; a process it stopped
// but was not handed anything in time is resumed.
func (r *run) killHanded(ctx context.Context, freeze bool) (string, int64) {
	hp, key, holder := r.queuedBehindLive(ctx, r.p.ttl)
	if hp == nil {
		return "", 0
	}
	r.mu.Lock()
	r.handedTries++
	r.mu.Unlock()
	s := pgx.Identifier{r.schema}.Sanitize()
	lctx, cancel := context.WithTimeout(ctx, r.p.ttl)
	defer cancel()
	pc, err := r.admin.Acquire(lctx)
	if err != nil {
		return "", 0
	}
	conn := pc.Hijack() // its LISTEN and any interrupted wait leave with it
	defer func() { _ = conn.Close(context.Background()) }()
	var ch string
	if err := conn.QueryRow(lctx, `SELECT `+s+`.channel() || '_' || $1::bigint`, holder).Scan(&ch); err != nil {
		return "", 0
	}
	if _, err := conn.Exec(lctx, `LISTEN `+pgx.Identifier{ch}.Sanitize()); err != nil {
		return "", 0
	}
	// Still waiting for the key, or handed it before the LISTEN (then
	// there is no notification to wait for, and the process may have
	// acted on it: look for another).
	var waiting bool
	if err := conn.QueryRow(lctx, `SELECT EXISTS (SELECT FROM `+s+`.waiters WHERE holder_id = $1 AND entity_id = $2)
			AND NOT EXISTS (SELECT FROM `+s+`.locks WHERE holder_id = $1 AND entity_id = $2)`, holder, key).Scan(&waiting); err != nil || !waiting {
		return "", 0
	}
	// Frozen: stopped for at most 2/5 of the TTL. Its last renewal was at
	// most a heartbeat (TTL/3) before, so its lease outlives the stop and
	// the release can serve it.
	wait := r.p.ttl
	if freeze {
		wait = r.p.ttl * 2 / 5
		r.mu.Lock()
		ok := !hp.killed && !hp.paused && !hp.stopped
		if ok {
			hp.paused = true
		}
		r.mu.Unlock()
		if !ok {
			return "", 0
		}
		if _, stopped := r.pauseNow(hp); !stopped {
			r.thaw(hp)
			return "", 0
		}
	}
	wctx, wcancel := context.WithTimeout(ctx, wait)
	defer wcancel()
	for {
		n, err := conn.WaitForNotification(wctx)
		if err != nil {
			if freeze {
				r.thaw(hp)
			}
			return "", 0
		}
		tok, ok := handedTo(n.Payload, key)
		if !ok {
			continue // a poke, or a handoff of some other key
		}
		t := r.killHandedNow(hp, key, holder, tok, freeze)
		r.start(hp.viaProxy)
		return key, t
	}
}

// thaw resumes a process frozen by killHanded. Unlike resume it records no
// pause: the freeze was shorter than the lease, so nothing it held may have
// been taken meanwhile, and no overlap of its intervals is excused.
func (r *run) thaw(hp *holderProc) {
	_ = hp.cmd.Process.Signal(syscall.SIGCONT)
	r.mu.Lock()
	defer r.mu.Unlock()
	hp.paused = false
}

// handedTo parses a holder channel's payload and returns the token of a
// handoff of key, if it is one.
func handedTo(payload, key string) (int64, bool) {
	var msg []json.RawMessage
	if err := json.Unmarshal([]byte(payload), &msg); err != nil || len(msg) < 4 {
		return 0, false
	}
	var typ, id string
	var tok int64
	if json.Unmarshal(msg[0], &typ) != nil || typ != "h" || json.Unmarshal(msg[2], &id) != nil || id != key ||
		json.Unmarshal(msg[3], &tok) != nil {
		return 0, false
	}
	return tok, true
}

// queuedBehindLive looks, for up to d, for a live process of the scenario
// that heads the queue of a single key (in the waiting view), still waits
// for it, and waits behind a live grant of another holder: the release of
// that grant is a handoff to it. It returns the process, the key and its
// holder id.
func (r *run) queuedBehindLive(ctx context.Context, d time.Duration) (*holderProc, string, int64) {
	s := pgx.Identifier{r.schema}.Sanitize()
	for deadline := time.Now().Add(d); time.Now().Before(deadline) && ctx.Err() == nil; {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		var key, app string
		var holder int64
		err := r.admin.QueryRow(qctx, `SELECT q.entity_id, q.application, q.holder_id FROM (
				SELECT name, entity_id, application, holder_id, set_size,
				       row_number() OVER (PARTITION BY name, entity_id ORDER BY waiter_id) AS place
				  FROM `+s+`.waiting WHERE alive) q
			 WHERE q.place = 1 AND q.set_size = 1 AND q.application LIKE $1
			   AND EXISTS (SELECT FROM `+s+`.held h WHERE h.name = q.name AND h.entity_id = q.entity_id
			                  AND h.alive AND h.holder_id <> q.holder_id)
			 ORDER BY random() LIMIT 1`, "torture-"+r.name+"-%").Scan(&key, &app, &holder)
		cancel()
		if err == nil {
			name := strings.TrimPrefix(app, "torture-")
			r.mu.Lock()
			hp := r.byName[name]
			w := r.waiting[name]
			ok := hp != nil && !hp.killed && !hp.paused && !hp.stopped && w != nil && len(w.keys) == 1 && w.wants(key)
			r.mu.Unlock()
			if ok {
				return hp, key, holder
			}
		} else if !errors.Is(err, pgx.ErrNoRows) && ctx.Err() == nil {
			time.Sleep(50 * time.Millisecond) // the server is busy: ask again soon
		}
		time.Sleep(10 * time.Millisecond) // polling the waiting view for a queue behind a live grant
	}
	return nil, "", 0
}

// killHandedNow kills hp, just handed key (grant token tok of holder id
// holder), and records the kill; frozen says it was stopped at the time.
func (r *run) killHandedNow(hp *holderProc, key string, holder, tok int64, frozen bool) int64 {
	r.mu.Lock()
	hp.killed = true
	hp.killT = Now()
	r.mu.Unlock()
	_ = hp.cmd.Process.Signal(syscall.SIGKILL) // also ends a stopped process
	<-hp.exited
	r.mu.Lock()
	defer r.mu.Unlock()
	k := killRec{proc: hp.name, t: hp.killT, held: hp.diedHolding, handed: key, handedTok: tok,
		handedHolder: holder, frozen: frozen}
	if w := hp.diedWaiting; w != nil {
		k.waited = w.keys
	}
	for _, iv := range hp.diedHolding {
		if iv.token == tok {
			k.acted = true // it had reported the grant: the client took the handoff before it died
		}
	}
	hp.paused = false // a freeze shorter than the lease: no pause that could excuse anything
	r.kills = append(r.kills, k)
	r.faults++
	return k.t
}

// handedEnd checks, before the end state is reaped, what the dead holders of
// handed kills left: a lock row of such a holder on a key that another
// process was later granted exclusively (for a permit: the same slot) is a
// grant that was given over the dead one's head. It returns the
// violations and the count of rows of those holders still there (locks and
// waiters), which expire and are reaped.
func (r *run) handedEnd(ctx context.Context) ([]string, int) {
	r.mu.Lock()
	var holders []int64
	byHolder := map[int64]killRec{}
	for _, k := range r.kills {
		if k.handed != "" {
			holders = append(holders, k.handedHolder)
			byHolder[k.handedHolder] = k
		}
	}
	r.mu.Unlock()
	if len(holders) == 0 {
		return nil, 0
	}
	s := pgx.Identifier{r.schema}.Sanitize()
	rows, err := r.admin.Query(ctx, `SELECT holder_id, entity_id, token, kind::text, slot, 'lock' FROM `+s+`.locks WHERE holder_id = ANY($1)
		UNION ALL SELECT holder_id, entity_id, 0, kind::text, 0, 'waiter' FROM `+s+`.waiters WHERE holder_id = ANY($1)`, holders)
	if err != nil {
		return []string{fmt.Sprintf("end: read the rows of handed-and-killed holders: %v", err)}, 0
	}
	type left struct {
		holder      int64
		key, what   string
		token, slot int64
		kind        string
	}
	lefts, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (left, error) {
		var x left
		err := row.Scan(&x.holder, &x.key, &x.token, &x.kind, &x.slot, &x.what)
		return x, err
	})
	if err != nil {
		return []string{fmt.Sprintf("end: read the rows of handed-and-killed holders: %v", err)}, 0
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var v []string
	for _, x := range lefts {
		if x.what != "lock" {
			continue
		}
		k := byHolder[x.holder]
		for _, iv := range r.intervals {
			if iv.key != x.key || iv.proc == k.proc || iv.start <= k.t {
				continue
			}
			if iv.kind == KindExclusive || iv.kind == "" || (iv.kind == KindPermit && x.kind == KindPermit && int64(iv.slot) == x.slot) {
				v = append(v, fmt.Sprintf("handoff: %s (holder %d), killed at %s just after being handed %s token %d, still has lock row token %d although %s was granted it (%s token %d) at %s",
					k.proc, x.holder, r.since(k.t), k.handed, k.handedTok, x.token, iv.proc, iv.kind, iv.token, r.since(iv.start)))
				break
			}
		}
	}
	return v, len(lefts)
}

// handedFigures is the summary of handed kills for the scenario line.
func handedFigures(kills []killRec, fig handoffs, tries int) string {
	frozen, acted := 0, 0
	for _, k := range kills {
		if k.handed == "" {
			continue
		}
		if k.frozen {
			frozen++
		}
		if k.acted {
			acted++
		}
	}
	return " handed_tries=" + strconv.Itoa(tries) + " handed_waiter_kills=" + strconv.Itoa(fig.keys) + " (frozen=" + strconv.Itoa(frozen) +
		" live=" + strconv.Itoa(fig.keys-frozen) + " acted=" + strconv.Itoa(acted) + ")" +
		fmt.Sprintf(" handed_passed_on=%d slowest_handed_passon=%s handed_alone=%d slowest_handed_passon_alone=%s",
			fig.passed, fig.slowest.Round(time.Millisecond), fig.alone, fig.slowestAlone.Round(time.Millisecond))
}
