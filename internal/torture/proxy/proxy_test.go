package proxy_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/internal/torture/proxy"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func setup(t *testing.T) (*pgtest.DB, *proxy.Proxy) {
	t.Helper()
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
	return db, px
}

func connect(t *testing.T, px *proxy.Proxy) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cfg, err := pgx.ParseConfig(pgtest.Shared(t).URL())
	if err != nil {
		t.Fatal(err)
	}
	cfg.Host, cfg.Port = "127.0.0.1", uint16(px.Port())
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

func ping(conn *pgx.Conn, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var one int
	return conn.QueryRow(ctx, "SELECT 1").Scan(&one)
}

func TestForwardResetBlackholeLatency(t *testing.T) {
	_, px := setup(t)
	conn := connect(t, px)
	if err := ping(conn, 5*time.Second); err != nil {
		t.Fatalf("through the proxy: %v", err)
	}

	px.SetLatency(100 * time.Millisecond)
	start := time.Now()
	if err := ping(conn, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Fatalf("a round trip with 100ms latency each way took %s", d)
	}
	px.SetLatency(0)

	px.Blackhole(true)
	if err := ping(conn, 300*time.Millisecond); err == nil {
		t.Fatal("a query got through the blackhole")
	}
	px.Blackhole(false)
	conn = connect(t, px) // the old one was closed by the cancelled query
	if err := ping(conn, 5*time.Second); err != nil {
		t.Fatalf("after the blackhole: %v", err)
	}

	if n := px.Reset(); n < 1 {
		t.Fatalf("Reset closed %d connections", n)
	}
	if err := ping(conn, 5*time.Second); err == nil {
		t.Fatal("a query worked on a reset connection")
	}
}

// The reply of a successful acquire is lost, but the acquire committed: the
// row is there. An acquire that fails is answered as usual.
func TestLoseAcquireReply(t *testing.T) {
	db, px := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := pgx.Identifier{db.Schema}.Sanitize()
	var h1, h2 int64
	for _, h := range []*int64{&h1, &h2} {
		if err := db.Pool.QueryRow(ctx, `INSERT INTO `+s+`.holders (host, pid, application, ttl, expires_at)
			VALUES ('x', 1, 'proxy-test', interval '1 minute', clock_timestamp() + interval '1 minute') RETURNING id`).Scan(h); err != nil {
			t.Fatal(err)
		}
	}
	acquire := `SELECT acquired FROM ` + s + `.acquire($1, $2, $3)`

	conn := connect(t, px)
	px.LoseAcquireReplies(1)
	var ok bool
	if err := conn.QueryRow(ctx, acquire, "n", "1", h1).Scan(&ok); err == nil {
		t.Fatal("the reply of a successful acquire arrived")
	}
	if px.LostReplies() != 1 {
		t.Fatalf("LostReplies = %d, want 1", px.LostReplies())
	}
	var holder int64
	if err := db.Pool.QueryRow(ctx, `SELECT holder_id FROM `+s+`.locks WHERE name = 'n' AND entity_id = '1'`).Scan(&holder); err != nil || holder != h1 {
		t.Fatalf("the acquire did not commit: holder %d, %v", holder, err)
	}

	conn = connect(t, px)
	px.LoseAcquireReplies(1)
	if err := conn.QueryRow(ctx, acquire, "n", "1", h2).Scan(&ok); err != nil || ok {
		t.Fatalf("a failed acquire: acquired=%v, %v; want false, nil", ok, err)
	}
	if px.LostReplies() != 1 {
		t.Fatalf("LostReplies = %d after a failed acquire, want still 1", px.LostReplies())
	}
	// The prepared statement is reused: only a Bind is sent this time.
	if _, err := db.Pool.Exec(ctx, `DELETE FROM `+s+`.locks`); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(ctx, acquire, "n", "1", h2).Scan(&ok); err == nil {
		t.Fatal("the reply of a successful acquire by a prepared statement arrived")
	}
	if px.LostReplies() != 2 {
		t.Fatalf("LostReplies = %d, want 2", px.LostReplies())
	}
}
