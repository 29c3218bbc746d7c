package lease_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/lease"
)

// Campaigners of several clients: one leads at a time, each resignation
// hands leadership to exactly one other, the observer sees every leader in
// token order, and nobody leads at the end.
func TestElectionOneLeaderAtATime(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := lease.Key{Name: "election", ID: "scanner"}
	obsClient, _, _ := e.client(lease.Config{})
	obsEl, err := obsClient.Election(key)
	if err != nil {
		t.Fatal(err)
	}
	octx, ocancel := context.WithCancel(e.ctx)
	defer ocancel()
	observed := obsEl.Observe(octx)
	if first := <-observed; first != (lease.Leader{}) {
		t.Fatalf("first observation %+v, want nobody leading", first)
	}

	// The observer's reports, for the candidates to wait on.
	var sawMu sync.Mutex
	saw := sync.NewCond(&sawMu)
	seenTokens := map[int64]bool{}
	var seen []lease.Leader
	observerDone := make(chan struct{})
	go func() {
		defer close(observerDone)
		for l := range observed {
			sawMu.Lock()
			seen = append(seen, l)
			seenTokens[l.Token] = true
			saw.Broadcast()
			sawMu.Unlock()
		}
	}()

	const candidates, terms = 4, 3
	var leading atomic.Int32
	var violations atomic.Int32
	tokens := make(chan int64, candidates*terms)
	var wg sync.WaitGroup
	for range candidates {
		c, _, _ := e.client(lease.Config{})
		el, err := c.Election(key)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range terms {
				l, err := el.Campaign(e.ctx)
				if err != nil {
					t.Errorf("Campaign: %v", err)
					return
				}
				if leading.Add(1) != 1 {
					violations.Add(1)
				}
				// The database agrees on who leads.
				who, err := el.Leader(e.ctx)
				if err != nil || who.Token != l.Token() || who.HolderID != l.HolderID() {
					t.Errorf("Leader() = %+v, %v while leading with token %d, holder %d", who, err, l.Token(), l.HolderID())
				}
				tokens <- l.Token()
				// Every leader is observed while it leads.
				sawMu.Lock()
				giveUp := false
				stop := time.AfterFunc(waitLimit, func() {
					sawMu.Lock()
					giveUp = true
					saw.Broadcast()
					sawMu.Unlock()
				})
				for !seenTokens[l.Token()] && !giveUp {
					saw.Wait()
				}
				if giveUp {
					t.Errorf("leader with token %d was not observed while it led", l.Token())
				}
				sawMu.Unlock()
				stop.Stop()
				leading.Add(-1)
				if err := l.Release(e.ctx); err != nil { // resign
					t.Errorf("resign: %v", err)
				}
			}
		}()
	}
	wg.Wait()
	close(tokens)
	if v := violations.Load(); v != 0 {
		t.Fatalf("%d times two candidates led at once", v)
	}
	var prev int64
	campaigned := map[int64]bool{}
	for tok := range tokens {
		campaigned[tok] = true
		if tok <= prev {
			t.Errorf("leader token %d after %d: later leaders must have larger tokens", tok, prev)
		}
		prev = tok
	}
	if _, err := obsEl.Leader(e.ctx); !errors.Is(err, lease.ErrNoLeader) {
		t.Errorf("Leader() after every resignation = %v, want ErrNoLeader", err)
	}
	// The observer ends with nobody leading, after every leader in token
	// order.
	eventually(t, waitLimit, "the observer to see nobody leading", func() bool {
		sawMu.Lock()
		defer sawMu.Unlock()
		return len(seen) > 1 && seen[len(seen)-1] == (lease.Leader{})
	})
	ocancel()
	<-observerDone // its channel is closed when its ctx ends
	// Every observed leader is a Campaign's, but for one case: a key handed
	// to a waiting candidate whose own attempt took it first adopts the
	// grant under a new token, so the observer may see that candidate's
	// holder lead with the handed token just before its Campaign's.
	var leaders []int64
	nCampaigns := 0
	for i, l := range seen {
		if l.Token == 0 {
			continue
		}
		leaders = append(leaders, l.Token)
		switch {
		case campaigned[l.Token]:
			nCampaigns++
		case i+1 < len(seen) && seen[i+1].HolderID == l.HolderID && campaigned[seen[i+1].Token]:
		default:
			t.Errorf("observed leader %+v is no Campaign's", l)
		}
	}
	if nCampaigns != candidates*terms {
		t.Errorf("observed %d of the %d Campaigns' leaders: %+v", nCampaigns, candidates*terms, seen)
	}
	for i := 1; i < len(leaders); i++ {
		if leaders[i] <= leaders[i-1] {
			t.Errorf("observed leaders out of token order: %v", leaders)
		}
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks")); n != 0 {
		t.Errorf("%d lock rows left after every resignation", n)
	}
}

// TryCampaign names the leader; a leader that stops renewing (a paused or
// killed process) is succeeded after its lease, the observer sees the new
// leader, and the old leader's late fenced write is rejected.
func TestElectionSuccessionAfterLeaderStops(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	key := lease.Key{Name: "election", ID: "singleton"}
	e.exec("CREATE TABLE " + e.table("scans") + " (token bigint NOT NULL)")
	old, oldPool, _ := e.client(lease.Config{})
	next, _, _ := e.client(lease.Config{})
	watcher, _, _ := e.client(lease.Config{})
	oldEl, _ := old.Election(key)
	nextEl, _ := next.Election(key)
	watchEl, _ := watcher.Election(key)

	leader, err := oldEl.Campaign(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, err = nextEl.TryCampaign(e.ctx)
	var le *lease.LockedError
	if !errors.As(err, &le) || le.HolderID != leader.HolderID() {
		t.Fatalf("TryCampaign while another leads = %v, want a LockedError naming holder %d", err, leader.HolderID())
	}
	octx, ocancel := context.WithCancel(e.ctx)
	defer ocancel()
	observed := watchEl.Observe(octx)
	if l := <-observed; l.Token != leader.Token() || l.Application == "" || l.Since.IsZero() || l.ExpiresIn <= 0 {
		t.Fatalf("observed %+v, want the leader with token %d", l, leader.Token())
	}

	// The leader stops renewing: its lease runs out in the database.
	oid, _ := old.HolderID()
	e.expireHolder(oid)
	successor, err := nextEl.Campaign(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if successor.Token() <= leader.Token() {
		t.Fatalf("successor's token %d is not above %d", successor.Token(), leader.Token())
	}
	select {
	case l := <-observed:
		if l.Token != successor.Token() && l != (lease.Leader{}) {
			t.Fatalf("observed %+v after the succession, want the successor (token %d) or nobody", l, successor.Token())
		}
		if l.Token != successor.Token() {
			if l2 := <-observed; l2.Token != successor.Token() {
				t.Fatalf("observed %+v, want the successor (token %d)", l2, successor.Token())
			}
		}
	case <-time.After(waitLimit):
		t.Fatal("the observer did not see the successor")
	}
	// The old leader wakes up and writes, fenced: rejected.
	err = pgx.BeginFunc(e.ctx, oldPool, func(tx pgx.Tx) error {
		if err := leader.Fence(e.ctx, tx); err != nil {
			return err
		}
		_, err := tx.Exec(e.ctx, "INSERT INTO "+e.table("scans")+" VALUES ($1)", leader.Token())
		return err
	})
	if !errors.Is(err, lease.ErrLost) {
		t.Fatalf("the old leader's fenced write = %v, want ErrLost", err)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("scans")); n != 0 {
		t.Fatalf("%d writes of the old leader landed", n)
	}
	eventually(t, waitLimit, "the old leader to learn it lost", func() bool { return closed(leader.Done()) })
	if err := successor.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks") + " WHERE name = 'election'"); n != 0 {
		t.Errorf("%d election rows left after the successor resigned", n)
	}
}

// Bad input and a closed client.
func TestElectionBadInput(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c, _, _ := e.client(lease.Config{})
	if _, err := c.Election(lease.Key{Name: "", ID: "x"}); !errors.Is(err, lease.ErrInvalidKey) {
		t.Errorf("Election with an empty name = %v, want ErrInvalidKey", err)
	}
	el, err := c.Election(lease.Key{Name: "election", ID: "x"})
	if err != nil {
		t.Fatal(err)
	}
	l, err := el.Campaign(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := el.TryCampaign(e.ctx); !errors.Is(err, lease.ErrAlreadyHeld) {
		t.Errorf("TryCampaign while leading = %v, want ErrAlreadyHeld", err)
	}
	observed := el.Observe(e.ctx)
	if got := <-observed; got.Token != l.Token() {
		t.Errorf("observed %+v, want token %d", got, l.Token())
	}
	if err := c.Close(e.ctx); err != nil {
		t.Fatal(err)
	}
	select { // Close ends every observer
	case _, ok := <-observed:
		for ok {
			_, ok = <-observed
		}
	case <-time.After(waitLimit):
		t.Fatal("Observe's channel stayed open after Close")
	}
	if _, ok := <-el.Observe(e.ctx); ok {
		t.Error("Observe on a closed client sent a value")
	}
	if _, err := el.Campaign(e.ctx); !errors.Is(err, lease.ErrClosed) {
		t.Errorf("Campaign on a closed client = %v, want ErrClosed", err)
	}
}
