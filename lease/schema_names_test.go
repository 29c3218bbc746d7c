package lease_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
	"github.com/pglease/pglease/migrations"
)

// advisoryOf returns c's advisory fast path.
func advisoryOf(t *testing.T, c *lease.Client) *lease.Advisory {
	t.Helper()
	return c.Advisory()
}

// Schema names that the validator accepts work end to end: the migrations,
// both modes, fencing, tokens from the schema's own sequence, and waiters
// woken through the schema's notification channel, by a table release and by
// an advisory one.
func TestSchemaNamesAccepted(t *testing.T) {
	t.Parallel()
	names := []string{
		`we"ird "quoted"`,
		`"`,
		`$`,
		`$lead`,
		`trail$`,
		`a$b$c`,
		`x$f$y$gen$`,
		`$1`,
		`  spaces  inside `,
		`UPPER Case`,
		`PG_upper`,
		`блокировки`,
		`日本語 🔒`,
		strings.Repeat("é", 31) + "x", // 63 bytes
		`a@b`,
		`x@schema@`,
		"new\nline\ttab",
		`100%s %d`,
		`--x /*y`,
		`a,b;c`,
	}
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			testSchemaName(t, name)
		})
	}
}

func testSchemaName(t *testing.T, schema string) {
	c := pgtest.Shared(t)
	t.Cleanup(func() { pgtest.DropSchema(t, c, schema) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	admin := pgtest.NewPool(t, c, "schema-names")
	if _, err := migrations.Up(ctx, admin, schema); err != nil {
		t.Fatalf("migrations.Up(%q): %v", schema, err)
	}
	e := &env{t: t, db: &pgtest.DB{Cluster: c, Schema: schema, Pool: admin}, ctx: ctx}
	lastToken := func() int64 {
		t.Helper()
		var v int64
		if err := admin.QueryRow(ctx, "SELECT last_value FROM "+e.table("token_seq")).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	var prev int64
	next := func(mode string, l *lease.Lock) {
		t.Helper()
		if l.Token() <= prev {
			t.Fatalf("%s token %d after %d: tokens of one key must grow", mode, l.Token(), prev)
		}
		if v := lastToken(); v != l.Token() {
			t.Fatalf("%s token %d, but this schema's token_seq is at %d: drawn from another sequence", mode, l.Token(), v)
		}
		prev = l.Token()
	}

	a, _, _ := e.client(slowTimers)
	b, _, _ := e.client(slowTimers)
	k := lease.Key{Name: "schema names", ID: schema}

	// Table mode, fenced.
	lt, err := a.TryAcquire(ctx, k)
	if err != nil {
		t.Fatalf("TryAcquire: %v", err)
	}
	next("table", lt)
	if err := pgx.BeginFunc(ctx, admin, func(tx pgx.Tx) error { return lt.Fence(ctx, tx) }); err != nil {
		t.Fatalf("Fence: %v", err)
	}
	mustRelease(t, ctx, lt)

	// Advisory mode. Its release announces itself on this schema's channel
	// (a constant that migration 00002 pasted into advisory_release) to a
	// session that listens and holds this schema's listener lock.
	listener := e.rawListener()
	var channel, want string
	if err := listener.QueryRow(ctx, "SELECT "+e.table("channel")+"(), 'pglease_' || md5($1), "+e.table("mark_listening")+"()",
		schema).Scan(&channel, &want, nil); err != nil {
		t.Fatal(err)
	}
	if channel != want {
		t.Fatalf("channel() = %q, want %q", channel, want)
	}
	adv := advisoryOf(t, a)
	la, err := adv.TryAcquire(ctx, k)
	if err != nil {
		t.Fatalf("advisory TryAcquire: %v", err)
	}
	next("advisory", la)
	mustRelease(t, ctx, la)
	announced := false
	for _, p := range e.nextNotifications(listener, "probe") {
		var triples [][]any
		if err := json.Unmarshal([]byte(p), &triples); err != nil {
			t.Fatalf("payload %q: %v", p, err)
		}
		for _, tr := range triples {
			announced = announced || (len(tr) == 3 && tr[0] == k.Name && tr[1] == k.ID && tr[2] == float64(la.Token()))
		}
	}
	if !announced {
		t.Fatalf("the advisory release of %s token %d was not announced on %q", k, la.Token(), channel)
	}

	// A blocking Acquire in another client is woken by a table release: with
	// its poll and the holder's expiry an hour away, only the notification can
	// wake it, and it asks exactly once more. It waits for an advisory holder
	// too (that wait backs off from 10 ms, so its attempts are not counted).
	warmUp(t, e, b)
	for _, mode := range []string{"table", "advisory"} {
		var held *lease.Lock
		if mode == "table" {
			held, err = a.TryAcquire(ctx, k)
		} else {
			held, err = adv.TryAcquire(ctx, k)
		}
		if err != nil {
			t.Fatalf("%s TryAcquire: %v", mode, err)
		}
		next(mode, held)
		base := lease.Attempts(b)
		got := goAcquire(ctx, b, k)
		eventually(t, waitLimit, "the waiter's first attempt", func() bool { return lease.Attempts(b) > base })
		mustRelease(t, ctx, held)
		r := await(t, got, "the waiter after a "+mode+" release")
		if r.err != nil {
			t.Fatalf("Acquire after a %s release: %v", mode, r.err)
		}
		if n := lease.Attempts(b) - base; mode == "table" && n != 1 {
			t.Fatalf("after a %s release the waiter sent %d acquire statements, want 1 (the release hands it the key)", mode, n)
		}
		next("table, after a "+mode+" release,", r.l)
		mustRelease(t, ctx, r.l)
	}

	// The grant sets, for a role whose name needs quoting too: the
	// application role takes and fences a lock, the DBA role frees it, and
	// revoke_grants takes everything back.
	role := pgtest.NewRole(t, c, `app "role" é`)
	e.grant("application", role)
	e.grant("dba", role)
	ra, rpool, _ := e.clientAs(role, lease.Config{HeartbeatInterval: 100 * time.Millisecond})
	lr, err := ra.TryAcquire(ctx, k)
	if err != nil {
		t.Fatalf("TryAcquire as role %q: %v", role.Name, err)
	}
	next("table, as a role,", lr)
	if err := pgx.BeginFunc(ctx, rpool, func(tx pgx.Tx) error { return lr.Fence(ctx, tx) }); err != nil {
		t.Fatalf("Fence as role %q: %v", role.Name, err)
	}
	var freed int64
	if err := rpool.QueryRow(ctx, "SELECT "+e.table("force_release")+"($1, $2, 'test')", k.Name, k.ID).Scan(&freed); err != nil || freed != lr.Token() {
		t.Fatalf("force_release as role %q = %d, %v; want %d", role.Name, freed, err, lr.Token())
	}
	select {
	case <-lr.Done():
	case <-time.After(time.Minute):
		t.Fatal("the holder was not told of the forced release")
	}
	e.exec("SELECT "+e.table("revoke_grants")+"(quote_ident($1)::regrole)", role.Name)
	if _, err := rpool.Exec(ctx, "SELECT count(*) FROM "+e.table("held")); err == nil {
		t.Fatalf("role %q still reads held after revoke_grants", role.Name)
	}
}

// Names that the released migration 00002 cannot handle (and $user, which
// search_path reads as another schema) are refused by lease.New and by
// migrations.Up before anything reaches the database.
func TestSchemaNamesRefused(t *testing.T) {
	t.Parallel()
	c := pgtest.Shared(t)
	pool := pgtest.NewPool(t, c, "schema-names")
	ctx := context.Background()
	for _, name := range []string{`it's`, `a$$b`, `q''q`, `x@guard@`, `x@listener@`, `@channel@`, `back\slash`, `$user`} {
		t.Cleanup(func() { pgtest.DropSchema(t, c, name) })
		_, err := lease.New(pool, &lease.Config{Schema: name})
		if !errors.Is(err, lease.ErrInvalidSchema) || !errors.Is(err, lease.ErrInvalidConfig) {
			t.Errorf("lease.New(Schema %q) = %v, want ErrInvalidSchema and ErrInvalidConfig", name, err)
		}
		_, err = migrations.Up(ctx, pool, name)
		if !errors.Is(err, lease.ErrInvalidSchema) || !errors.Is(err, migrations.ErrInvalidConfig) {
			t.Errorf("migrations.Up(%q) = %v, want ErrInvalidSchema and ErrInvalidConfig", name, err)
		}
		if err != nil && name != "$user" && !strings.Contains(err.Error(), "migration 00002 builds") {
			t.Errorf("migrations.Up(%q) = %v: want it to say that the released migration builds function bodies from the name", name, err)
		}
		// Nothing was created: not the schema, nor the one 00002 would have
		// drawn tokens from (q''q would have used "q'q").
		var n int
		if err := pool.QueryRow(ctx, "SELECT count(*) FROM pg_namespace WHERE nspname = $1 OR nspname = replace($1, '''''', '''')",
			name).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 0 {
			t.Errorf("%q was refused, but a schema of that name exists", name)
		}
	}
}
