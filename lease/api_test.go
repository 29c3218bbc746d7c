package lease_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/pglease/pglease/lease"
)

// Bad input gets a typed error before any SQL reaches the server, and leaves
// nothing behind.
func TestBadInput(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c, _, _ := e.client(lease.Config{})

	keys := []struct {
		name string
		key  lease.Key
	}{
		{"empty name", lease.Key{Name: "", ID: "1"}},
		{"empty id", lease.Key{Name: "n", ID: ""}},
		{"both empty", lease.Key{}},
		{"NUL in name", lease.Key{Name: "a\x00b", ID: "1"}},
		{"NUL in id", lease.Key{Name: "n", ID: "1\x00"}},
		{"invalid UTF-8 name", lease.Key{Name: "\xff\xfe", ID: "1"}},
		{"invalid UTF-8 id", lease.Key{Name: "n", ID: "caf\xe9"}},
		{"name over the cap", lease.Key{Name: strings.Repeat("n", lease.MaxNameBytes+1), ID: "1"}},
		{"id over the cap", lease.Key{Name: "n", ID: strings.Repeat("é", lease.MaxIDBytes/2+1)}},
	}
	for _, tc := range keys {
		for op, f := range map[string]func() error{
			"Acquire":    func() error { _, err := c.Acquire(e.ctx, tc.key); return err },
			"TryAcquire": func() error { _, err := c.TryAcquire(e.ctx, tc.key); return err },
			"Do":         func() error { return c.Do(e.ctx, tc.key, func(context.Context, *lease.Lock) error { return nil }) },
		} {
			err := f()
			var ke *lease.KeyError
			if !errors.Is(err, lease.ErrInvalidKey) || !errors.As(err, &ke) {
				t.Errorf("%s %s: err = %v, want a *KeyError matching ErrInvalidKey", op, tc.name, err)
			}
		}
	}
	// The limits themselves are fine.
	ok := lease.Key{Name: strings.Repeat("n", lease.MaxNameBytes), ID: strings.Repeat("i", lease.MaxIDBytes)}
	if err := ok.Validate(); err != nil {
		t.Errorf("key at the limits: %v", err)
	}
	// No SQL reached the server for the bad keys: no holder was even registered.
	if n := e.count("SELECT count(*) FROM " + e.table("holders")); n != 0 {
		t.Errorf("%d holder rows after bad keys only", n)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks")); n != 0 {
		t.Errorf("%d lock rows after bad keys only", n)
	}

	configs := []struct {
		name  string
		cfg   lease.Config
		field string
	}{
		{"negative TTL", lease.Config{TTL: -time.Second}, "TTL"},
		{"TTL below minimum", lease.Config{TTL: time.Millisecond}, "TTL"},
		{"margin too large", lease.Config{TTL: time.Second, SafetyMargin: 600 * time.Millisecond}, "SafetyMargin"},
		{"negative margin", lease.Config{SafetyMargin: -time.Second}, "SafetyMargin"},
		{"heartbeat too slow", lease.Config{TTL: 3 * time.Second, HeartbeatInterval: 2 * time.Second}, "HeartbeatInterval"},
		{"negative heartbeat", lease.Config{HeartbeatInterval: -time.Second}, "HeartbeatInterval"},
		{"poll below 1ms", lease.Config{PollInterval: time.Microsecond}, "PollInterval"},
		{"negative release timeout", lease.Config{ReleaseTimeout: -time.Second}, "ReleaseTimeout"},
		{"NUL in host", lease.Config{Owner: lease.Owner{Host: "a\x00"}}, "Owner.Host"},
		{"application too long", lease.Config{Owner: lease.Owner{Application: strings.Repeat("a", 256)}}, "Owner.Application"},
		{"invalid UTF-8 application", lease.Config{Owner: lease.Owner{Application: "\xff"}}, "Owner.Application"},
		{"negative pid", lease.Config{Owner: lease.Owner{PID: -1}}, "Owner.PID"},
		{"schema too long", lease.Config{Schema: strings.Repeat("s", 64)}, "Schema"},
		{"schema with NUL", lease.Config{Schema: "le\x00ase"}, "Schema"},
		{"reserved schema", lease.Config{Schema: "pg_catalog"}, "Schema"},
	}
	for _, tc := range configs {
		cfg := tc.cfg
		_, err := lease.New(e.db.Pool, &cfg)
		var ce *lease.ConfigError
		if !errors.Is(err, lease.ErrInvalidConfig) || !errors.As(err, &ce) || ce.Field != tc.field {
			t.Errorf("%s: err = %v, want a *ConfigError on %s", tc.name, err, tc.field)
		}
		if tc.field == "Schema" && !errors.Is(err, lease.ErrInvalidSchema) {
			t.Errorf("%s: err = %v, want it to match ErrInvalidSchema", tc.name, err)
		}
	}
	var ce *lease.ConfigError
	if _, err := lease.New(nil, nil); !errors.Is(err, lease.ErrInvalidConfig) || !errors.As(err, &ce) || ce.Field != "pool" {
		t.Errorf("nil pool: %v, want a *ConfigError on pool matching ErrInvalidConfig", err)
	}
	// A zero Config is valid.
	if _, err := lease.New(e.db.Pool, nil); err != nil {
		t.Errorf("nil config: %v", err)
	}
}

// TryAcquire says who holds the key and for how long.
func TestTryAcquireReportsHolder(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.client(lease.Config{Owner: lease.Owner{Host: "host-a", PID: 42, Application: "billing"}})
	b, _, _ := e.client(lease.Config{})
	k := lease.Key{Name: "invoice", ID: "2024-0042"}
	la, err := a.Acquire(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.TryAcquire(e.ctx, k)
	var le *lease.LockedError
	if !errors.Is(err, lease.ErrLocked) || !errors.As(err, &le) {
		t.Fatalf("TryAcquire of a held key = %v, want *LockedError", err)
	}
	if le.HolderID != la.HolderID() || le.Host != "host-a" || le.PID != 42 || le.Application != "billing" {
		t.Errorf("LockedError = %+v, want holder %d host-a/42/billing", le, la.HolderID())
	}
	if le.ExpiresIn <= 0 || le.ExpiresIn > lease.TTLDefault {
		t.Errorf("ExpiresIn = %s, want within (0, %s]", le.ExpiresIn, lease.TTLDefault)
	}
	// The same client asking again is refused locally, as itself.
	if _, err := a.TryAcquire(e.ctx, k); !errors.As(err, &le) || le.HolderID != la.HolderID() {
		t.Errorf("holder's own TryAcquire = %v", err)
	}
	if err := la.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	if err := la.Release(e.ctx); err != nil {
		t.Fatalf("second Release = %v, want the first result (nil)", err)
	}
	if !errors.Is(la.Err(), lease.ErrReleased) || !closed(la.Done()) {
		t.Fatalf("after Release: Err=%v", la.Err())
	}
	lb, err := b.TryAcquire(e.ctx, k)
	if err != nil {
		t.Fatalf("TryAcquire after release: %v", err)
	}
	if lb.Token() <= la.Token() {
		t.Fatalf("token %d not above %d", lb.Token(), la.Token())
	}
}

// A lock row deleted by hand is reported lost, within one heartbeat at most.
func TestRowDeletedByDBAIsLost(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// Notifications are one path; the heartbeat's count is the other. Test both.
	for _, viaHeartbeat := range []bool{false, true} {
		cfg := lease.Config{TTL: 3 * time.Second, HeartbeatInterval: 200 * time.Millisecond}
		c, _, _ := e.client(cfg)
		k := lease.Key{Name: "dba", ID: "x"}
		if viaHeartbeat {
			k.ID = "y"
		}
		l, err := c.Acquire(e.ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		keep, err := c.Acquire(e.ctx, lease.Key{Name: "dba", ID: k.ID + "-other"})
		if err != nil {
			t.Fatal(err)
		}
		del := "DELETE FROM " + e.table("locks") + " WHERE name = $1 AND entity_id = $2"
		if viaHeartbeat {
			// Suppress the trigger's notification the way acquire's takeover does.
			tx, err := e.db.Pool.Begin(e.ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(e.ctx, "SELECT set_config('pglease.quiet', 'on', true)"); err != nil {
				t.Fatal(err)
			}
			if _, err := tx.Exec(e.ctx, del, k.Name, k.ID); err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(e.ctx); err != nil {
				t.Fatal(err)
			}
		} else {
			e.exec(del, k.Name, k.ID)
		}
		select {
		case <-l.Done():
		case <-time.After(5 * time.Second):
			t.Fatalf("viaHeartbeat=%v: a deleted row was not reported lost", viaHeartbeat)
		}
		if !errors.Is(l.Err(), lease.ErrLost) {
			t.Fatalf("Err = %v, want ErrLost", l.Err())
		}
		if err := keep.Err(); err != nil {
			t.Fatalf("the other lock was reported %v", err)
		}
		if err := l.Release(e.ctx); !errors.Is(err, lease.ErrLost) {
			t.Fatalf("Release of a lost lock = %v, want ErrLost", err)
		}
	}
}

// Do runs the function under the lock, releases it, and reports a loss.
func TestDo(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c, _, _ := e.client(lease.Config{})
	k := lease.Key{Name: "do", ID: "1"}
	ran := false
	if err := c.Do(e.ctx, k, func(ctx context.Context, _ *lease.Lock) error {
		ran = true
		if ctx.Err() != nil {
			t.Error("ctx done inside the critical section")
		}
		return nil
	}); err != nil || !ran {
		t.Fatalf("Do = %v, ran=%v", err, ran)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks")); n != 0 {
		t.Fatalf("%d rows after Do", n)
	}
	boom := errors.New("boom")
	if err := c.Do(e.ctx, k, func(context.Context, *lease.Lock) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("Do = %v, want the function's error", err)
	}
	err := c.Do(e.ctx, k, func(ctx context.Context, _ *lease.Lock) error {
		e.exec("DELETE FROM "+e.table("locks")+" WHERE name = $1", k.Name)
		<-ctx.Done() // cancelled by the loss
		return ctx.Err()
	})
	if !errors.Is(err, lease.ErrLost) {
		t.Fatalf("Do with the row deleted = %v, want ErrLost", err)
	}
}

// Close releases everything, removes the holder row, wakes blocked
// acquirers with ErrClosed and refuses new ones.
func TestClose(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.client(lease.Config{})
	b, _, _ := e.client(lease.Config{})
	var held []*lease.Lock
	for _, id := range []string{"1", "2", "3"} {
		l, err := a.Acquire(e.ctx, lease.Key{Name: "c", ID: id})
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, l)
	}
	lb, err := b.Acquire(e.ctx, lease.Key{Name: "c", ID: "b"})
	if err != nil {
		t.Fatal(err)
	}
	blocked := make(chan error, 1)
	go func() {
		_, err := a.Acquire(e.ctx, lease.Key{Name: "c", ID: "b"})
		blocked <- err
	}()
	eventually(t, 5*time.Second, "the blocked acquire to ask the database", func() bool { return lease.Attempts(a) >= 4 })
	if err := a.Close(e.ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-blocked; !errors.Is(err, lease.ErrClosed) {
		t.Fatalf("blocked Acquire after Close = %v, want ErrClosed", err)
	}
	for _, l := range held {
		if !errors.Is(l.Err(), lease.ErrClosed) {
			t.Fatalf("held lock after Close: %v", l.Err())
		}
		if err := l.Release(e.ctx); err != nil {
			t.Fatalf("Release after Close = %v", err)
		}
	}
	if n := e.count("SELECT count(*) FROM "+e.table("holders")+" WHERE id <> $1", lb.HolderID()); n != 0 {
		t.Fatalf("%d holder rows of the closed client left", n)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks") + " WHERE name = 'c' AND entity_id <> 'b'"); n != 0 {
		t.Fatalf("%d lock rows of the closed client left", n)
	}
	if _, err := a.Acquire(e.ctx, lease.Key{Name: "c", ID: "9"}); !errors.Is(err, lease.ErrClosed) {
		t.Fatalf("Acquire after Close = %v", err)
	}
	if err := a.Close(e.ctx); err != nil {
		t.Fatalf("second Close = %v", err)
	}
}

// An Acquire whose context ends while it waits returns the context's error
// and leaves nothing behind.
func TestAcquireContextCancelled(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	a, _, _ := e.client(lease.Config{})
	b, _, _ := e.client(lease.Config{})
	k := lease.Key{Name: "ctx", ID: "1"}
	la, err := a.Acquire(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeoutCause(e.ctx, 300*time.Millisecond, errors.New("gave up"))
	defer cancel()
	if _, err := b.Acquire(ctx, k); err == nil || err.Error() != "gave up" {
		t.Fatalf("Acquire with an expiring ctx = %v, want the ctx's cause", err)
	}
	if n := e.count("SELECT count(*) FROM "+e.table("locks")+" WHERE holder_id <> $1", la.HolderID()); n != 0 {
		t.Fatalf("the cancelled waiter left %d rows", n)
	}
	if err := la.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := b.TryAcquire(e.ctx, k); err != nil {
		t.Fatalf("TryAcquire after the cancelled wait: %v", err)
	}
}
