package reaper_test

import (
	"testing"
	"time"

	"github.com/pglease/pglease/reaper"
)

// A pass reaps grants of every kind (exclusive, shared, permits, the keys of
// a set) and the waiter rows of dead holders, and leaves a live holder's
// grants and place in the queue alone.
func TestPassReapsEveryKind(t *testing.T) {
	t.Parallel()
	f := newFx(t)
	ctx := ctxFor(t, time.Minute)

	secret := []byte("0123456789abcdef")
	register := func(app string) int64 {
		var id int64
		if err := f.Pool.QueryRow(ctx, `SELECT `+f.fn("register")+`('h', 1, $1, interval '1 hour', $2)`, app, secret).Scan(&id); err != nil {
			t.Fatal(err)
		}
		return id
	}
	acquire := func(holder int64, names, ids, kinds []string, permits int, wait bool) (acquired, queued bool) {
		t.Helper()
		err := f.Pool.QueryRow(ctx, `SELECT acquired, queued FROM `+f.fn("acquire_keys")+`($1, $2, $3::text[]::"char"[], $4, $5, $6, $7, '{}')`,
			names, ids, kinds, permits, holder, secret, wait).Scan(&acquired, &queued)
		if err != nil {
			t.Fatal(err)
		}
		return acquired, queued
	}
	dead, live := register("dead"), register("live")
	for _, g := range []struct {
		holder       int64
		names, kinds []string
		permits      int
	}{
		{dead, []string{"x"}, []string{"x"}, 1},
		{dead, []string{"s"}, []string{"s"}, 1},
		{live, []string{"s"}, []string{"s"}, 1},
		{dead, []string{"sem"}, []string{"p"}, 3},
		{live, []string{"sem"}, []string{"p"}, 3},
		{dead, []string{"set-a", "set-b"}, []string{"x", "s"}, 1},
	} {
		ids := make([]string, len(g.names))
		for i := range ids {
			ids[i] = "1"
		}
		if ok, _ := acquire(g.holder, g.names, ids, g.kinds, g.permits, false); !ok {
			t.Fatalf("holder %d could not take %v", g.holder, g.names)
		}
	}
	// The live holder waits for the exclusive key; the dead one for the set's.
	if ok, queued := acquire(live, []string{"x"}, []string{"1"}, []string{"x"}, 1, true); ok || !queued {
		t.Fatalf("live waiter: acquired %v, queued %v; want queued", ok, queued)
	}
	if ok, queued := acquire(dead, []string{"wait"}, []string{"1"}, []string{"x"}, 1, true); !ok || queued {
		t.Fatalf("dead holder's free key: acquired %v, queued %v", ok, queued)
	}
	if ok, queued := acquire(live, []string{"wait"}, []string{"1"}, []string{"x"}, 1, true); ok || !queued {
		t.Fatalf("live waiter of the second key: acquired %v, queued %v; want queued", ok, queued)
	}
	if _, err := f.Pool.Exec(ctx, `INSERT INTO `+f.Qualified("waiters")+` (name, entity_id, holder_id, kind) VALUES ('set-a', '2', $1, 'x')`, dead); err != nil {
		t.Fatal(err)
	}
	f.expire(ctx, dead)

	st, err := f.reaper(nil, reaper.Config{}).RunOnce(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Holders != 1 || st.Locks != 6 {
		t.Fatalf("stats = %+v, want 1 holder and its 6 grants", st)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.locks+` WHERE holder_id = $1`, dead); n != 0 {
		t.Fatalf("%d grants of the dead holder left", n)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.Qualified("waiters")+` WHERE holder_id = $1`, dead); n != 0 {
		t.Fatalf("%d waiter rows of the dead holder left", n)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.locks+` WHERE holder_id = $1`, live); n != 2 {
		t.Fatalf("%d grants of the live holder left, want its shared lock and its permit", n)
	}
	if n := f.count(ctx, `SELECT count(*) FROM `+f.Qualified("waiting")+` WHERE holder_id = $1 AND alive`, live); n != 2 {
		t.Fatalf("the live holder has %d places in the queue, want 2", n)
	}
	// Nothing is left blocked by the dead: the live waiter is served now.
	for _, k := range []string{"x", "wait"} {
		if ok, _ := acquire(live, []string{k}, []string{"1"}, []string{"x"}, 1, true); !ok {
			t.Fatalf("the live waiter of %q is not served after the reap", k)
		}
	}
}
