package torture

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/internal/torture/proxy"
	"github.com/pglease/pglease/lease"
)

// An acquire commits, its reply is lost, and the network stays down longer
// than the client's clean-up of the orphan row is allowed to take, but not
// long enough to cost the client its lease. The client never asks for that
// key again. The orphan must still go: otherwise a live holder that believes
// it holds nothing keeps the key locked for as long as it lives.
func TestOrphanOfLostReplyIsCleanedUp(t *testing.T) {
	c := pgtest.Shared(t)
	db := pgtest.NewDBOn(t, c)
	addr, err := c.Addr()
	if err != nil {
		t.Fatal(err)
	}
	px, err := proxy.New(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(px.Close)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg, err := pgxpool.ParseConfig(c.URL())
	if err != nil {
		t.Fatal(err)
	}
	cfg.ConnConfig.Host, cfg.ConnConfig.Port = "127.0.0.1", uint16(px.Port())
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	const ttl = 2 * time.Second
	a, err := lease.New(pool, &lease.Config{Schema: db.Schema, TTL: ttl, ReleaseTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close(context.Background()) })
	b, err := lease.New(db.Pool, &lease.Config{Schema: db.Schema, TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(context.Background()) })

	warm, err := a.TryAcquire(ctx, lease.Key{Name: "warm", ID: "1"}) // registers a's holder
	if err != nil {
		t.Fatal(err)
	}
	if err := warm.Release(ctx); err != nil {
		t.Fatal(err)
	}
	key := lease.Key{Name: "orphan", ID: "1"}
	px.BlackholeAfterLoss(600 * time.Millisecond)
	px.LoseAcquireReplies(1)
	if _, err := a.TryAcquire(ctx, key); err == nil {
		t.Fatal("the acquire succeeded although its reply was lost")
	}
	if px.LostReplies() != 1 {
		t.Fatalf("the proxy lost %d replies, want 1", px.LostReplies())
	}
	deadline := time.Now().Add(3 * ttl)
	for {
		l, err := b.TryAcquire(ctx, key)
		if err == nil {
			_ = l.Release(ctx)
			break
		}
		if time.Now().After(deadline) {
			id, alive := a.HolderID()
			t.Fatalf("%s after the lost reply the key is still taken: %v (a's holder %d, alive %v, holds nothing)",
				3*ttl, err, id, alive)
		}
		time.Sleep(50 * time.Millisecond) // polling the database for the key
	}
	if _, alive := a.HolderID(); !alive {
		t.Log("a's holder was lost meanwhile: the orphan went with it (the test proves less this time)")
	}
}
