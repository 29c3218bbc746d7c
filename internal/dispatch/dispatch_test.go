package dispatch

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// newOffline returns a Dispatcher whose connection attempts all fail, to drive
// handle directly.
func newOffline(t *testing.T, onDelete func(string, int64)) *Dispatcher {
	d := New(Config{
		Connect:  func(context.Context) (*pgx.Conn, error) { return nil, errors.New("offline") },
		Channel:  "test",
		OnDelete: onDelete,
	})
	t.Cleanup(d.Close)
	return d
}

// A payload of [name, id, token] triples wakes exactly the waiters of those
// keys and reports each row; names and ids may hold anything JSON can carry.
func TestHandleWakesTheKeysNamed(t *testing.T) {
	var mu sync.Mutex
	var gone []string
	d := newOffline(t, func(k string, tok int64) {
		mu.Lock()
		gone = append(gone, k)
		mu.Unlock()
	})
	odd := d.Subscribe("a\"b\x001/2", true)
	plain := d.Subscribe("x\x00y", true)
	other := d.Subscribe("x\x00z", true)
	defer odd.Close()
	defer plain.Close()
	defer other.Close()
	oddC, plainC, otherC := odd.C(), plain.C(), other.C()

	d.handle(`[["a\"b","1/2",7],["x","y",8]]`)
	if !closed(oddC) || !closed(plainC) {
		t.Fatal("a named key's waiters were not woken")
	}
	if closed(otherC) {
		t.Fatal("a key not named was woken")
	}
	if closed(odd.C()) {
		t.Fatal("C after a wake-up is already closed: the next wake-up would be missed")
	}
	mu.Lock()
	if len(gone) != 2 || gone[0] != "a\"b\x001/2" || gone[1] != "x\x00y" {
		t.Fatalf("OnDelete saw %q", gone)
	}
	mu.Unlock()

	for _, junk := range []string{"probe 0123", "not json", `[["x"]]`, `{"a":1}`} {
		d.handle(junk)
	}
	if closed(otherC) {
		t.Fatal("a probe or a malformed payload woke someone")
	}
	d.handle("*") // TRUNCATE
	if !closed(otherC) {
		t.Fatal("a TRUNCATE did not wake everyone")
	}
}

// Subscriptions are counted per key and dropped when the last one closes.
func TestSubscriptionsCounted(t *testing.T) {
	d := newOffline(t, nil)
	a1, a2, b := d.Subscribe("a", true), d.Subscribe("a", true), d.Subscribe("b", true)
	if n := d.Subscriptions(); n != 2 {
		t.Fatalf("%d keys subscribed, want 2", n)
	}
	a1.Close()
	a1.Close() // idempotent
	if n := d.Subscriptions(); n != 2 {
		t.Fatalf("%d keys subscribed after one of two closed, want 2", n)
	}
	a2.Close()
	b.Close()
	if n := d.Subscriptions(); n != 0 {
		t.Fatalf("%d keys subscribed after all closed", n)
	}
}

// A handoff on the holder channel is told to OnHandoff with every field,
// before the key's waiters are woken; a poke to OnPoke; anything else on
// that channel wakes nobody.
func TestHandleHolderHandoffsAndPokes(t *testing.T) {
	var got []Handoff
	var poked []string
	var order []string
	d := New(Config{
		Connect: func(context.Context) (*pgx.Conn, error) { return nil, errors.New("offline") },
		Channel: "test",
	})
	t.Cleanup(d.Close)
	k := d.Subscribe("a\"b\x001/2", false)
	other := d.Subscribe("x\x00z", false)
	defer k.Close()
	defer other.Close()
	kc, oc := k.C(), other.C()
	d.cfg.OnHandoff = func(h Handoff) {
		got = append(got, h)
		if closed(kc) {
			order = append(order, "woken before OnHandoff")
		}
	}
	d.cfg.OnPoke = func(key, ch string) { poked = append(poked, key+" on "+ch) }

	d.handleHolder("test_7", `["h", "a\"b", "1/2", 41, 3, 9, "p", 4, 1796245415967272]`)
	if len(got) != 1 {
		t.Fatalf("OnHandoff called %d times, want 1", len(got))
	}
	want := Handoff{Key: "a\"b\x001/2", Token: 41, Slot: 3, Waiter: 9, Kind: "p", Permits: 4,
		AcquiredAt: time.UnixMicro(1796245415967272), Channel: "test_7"}
	if got[0] != want {
		t.Fatalf("handoff %+v, want %+v", got[0], want)
	}
	if len(order) != 0 || !closed(kc) {
		t.Fatalf("the key's waiters must be woken after OnHandoff (%v, woken %v)", order, closed(kc))
	}
	if closed(oc) {
		t.Fatal("a handoff of one key woke another")
	}

	d.handleHolder("test_7", `["r", "x", "z"]`)
	if len(poked) != 1 || poked[0] != "x\x00z on test_7" || !closed(oc) {
		t.Fatalf("poke: OnPoke saw %q, key woken %v", poked, closed(oc))
	}

	kc, oc = k.C(), other.C()
	for _, junk := range []string{"probe 12", `["h", "a\"b", "1/2"]`, `["h", "a\"b", "1/2", "x", 3, 9, "p", 4, 1]`,
		`["q", "x", "z"]`, `{"h": 1}`, `[]`} {
		d.handleHolder("test_7", junk)
	}
	if closed(kc) || closed(oc) || len(got) != 1 || len(poked) != 1 {
		t.Fatalf("a malformed payload was acted on: %d handoffs, %d pokes", len(got), len(poked))
	}
}
