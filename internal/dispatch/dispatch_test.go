package dispatch

import (
	"context"
	"errors"
	"sync"
	"testing"

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
