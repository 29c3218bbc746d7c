package lease_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// The grant sets of migration 5, tried as each role would: what it can do,
// and what it is refused.

// grant gives role the named grant set on e's schema, as the schema's owner.
func (e *env) grant(set string, role *pgtest.Role) {
	e.t.Helper()
	e.exec("SELECT "+e.table("grant_"+set)+"(quote_ident($1)::regrole)", role.Name)
}

// appRoleWithCounters is a role with the application grant set, and a
// table counters (k, n, last_token) in e's schema that it may read and
// update: the user's own data that its critical sections write.
func (e *env) appRoleWithCounters() *pgtest.Role {
	e.t.Helper()
	app := pgtest.NewRole(e.t, e.db.Cluster, "pglease_app")
	e.grant("application", app)
	e.exec("CREATE TABLE " + e.table("counters") + " (k text PRIMARY KEY, n bigint NOT NULL, last_token bigint NOT NULL)")
	e.exec("GRANT SELECT, UPDATE ON " + e.table("counters") + " TO " + pgx.Identifier{app.Name}.Sanitize())
	return app
}

// rolePool is a plain pool logged in as role, for SQL the role sends itself.
func (e *env) rolePool(role *pgtest.Role, modify ...func(*pgxpool.Config)) *pgxpool.Pool {
	e.t.Helper()
	return pgtest.NewPool(e.t, e.db.Cluster, "roles-"+role.Name, append([]func(*pgxpool.Config){role.Connect}, modify...)...)
}

// wantSQLState runs sql on pool and fails unless it is refused with code.
func (e *env) wantSQLState(pool *pgxpool.Pool, code, sql string, args ...any) {
	e.t.Helper()
	_, err := pool.Exec(e.ctx, sql, args...)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != code {
		e.t.Errorf("%s: got %v, want SQLSTATE %s", sql, err, code)
	}
}

// lockRow is the owner's view of a key's row: its token and holder, 0 when
// there is none.
func (e *env) lockRow(k lease.Key) (token, holder int64) {
	e.t.Helper()
	err := e.db.Pool.QueryRow(e.ctx, "SELECT token, holder_id FROM "+e.table("locks")+" WHERE name = $1 AND entity_id = $2",
		k.Name, k.ID).Scan(&token, &holder)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, 0
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return token, holder
}

// Everything a service does works for the application role, on both paths,
// with no privilege on any table but SELECT on locks.
func TestApplicationRoleCanUseEverything(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	app := pgtest.NewRole(t, e.db.Cluster, "pglease_app")
	e.grant("application", app)

	a, aPool, _ := e.clientAs(app, lease.Config{})
	b, _, _ := e.clientAs(app, lease.Config{})
	k := lease.Key{Name: "order", ID: "7"}
	l, err := a.Acquire(e.ctx, k)
	if err != nil {
		t.Fatalf("Acquire as the application role: %v", err)
	}
	if _, err := b.TryAcquire(e.ctx, k); !errors.Is(err, lease.ErrLocked) {
		t.Fatalf("TryAcquire of a held key = %v, want ErrLocked", err)
	}
	err = pgx.BeginFunc(e.ctx, aPool, func(tx pgx.Tx) error {
		if err := l.Fence(e.ctx, tx); err != nil {
			return err
		}
		var held bool
		if err := tx.QueryRow(e.ctx, "SELECT "+e.table("holds")+"($1, $2, $3)", k.Name, k.ID, l.Token()).Scan(&held); err != nil {
			return err
		}
		if !held {
			t.Error("holds = false for the live holder's token")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("fence and holds as the application role: %v", err)
	}
	var n int
	if err := aPool.QueryRow(e.ctx, "SELECT count(*) FROM "+e.table("held")+" WHERE alive").Scan(&n); err != nil || n != 1 {
		t.Errorf("the held view as the application role: %d live rows, %v; want 1", n, err)
	}

	// A waiter of the same role gets the key at the release.
	got := acquireInBackground(t, e.ctx, b, k)
	if err := l.Release(e.ctx); err != nil {
		t.Fatalf("Release: %v", err)
	}
	lb := <-got
	if lb == nil {
		t.FailNow()
	}
	if lb.Token() <= l.Token() {
		t.Errorf("token after the handover %d, not above %d", lb.Token(), l.Token())
	}

	// A dead holder's lock is taken over by the role.
	hb, _ := b.HolderID()
	e.expireHolder(hb)
	eventually(t, 30*time.Second, "the expired holder's lock to be reported lost", func() bool { return closed(lb.Done()) })
	lt, err := a.Acquire(e.ctx, k)
	if err != nil {
		t.Fatalf("takeover of a dead holder's lock: %v", err)
	}
	if lt.Token() <= lb.Token() {
		t.Errorf("token after the takeover %d, not above %d", lt.Token(), lb.Token())
	}
	if err := lt.Release(e.ctx); err != nil {
		t.Fatal(err)
	}

	// The advisory path.
	adv := lease.Key{Name: "order", ID: "8"}
	la, err := a.Advisory().Acquire(e.ctx, adv)
	if err != nil {
		t.Fatalf("advisory Acquire as the application role: %v", err)
	}
	if _, err := b.TryAcquire(e.ctx, adv); !errors.Is(err, lease.ErrLocked) {
		t.Errorf("table TryAcquire of an advisory-held key = %v, want ErrLocked", err)
	}
	if err := la.Release(e.ctx); err != nil {
		t.Fatalf("advisory Release: %v", err)
	}

	// The kinds: shared on both paths, a semaphore, a key set, and a queue
	// place given up (the waiter row goes with it).
	kinds := lease.Key{Name: "order", ID: "9"}
	rs, err := a.AcquireShared(e.ctx, kinds)
	if err != nil {
		t.Fatalf("AcquireShared as the application role: %v", err)
	}
	ras, err := b.Advisory().AcquireShared(e.ctx, kinds)
	if err != nil {
		t.Fatalf("advisory AcquireShared as the application role: %v", err)
	}
	c, _, _ := e.clientAs(app, lease.Config{})
	wctx, cancel := context.WithCancel(e.ctx)
	gotW := make(chan error, 1)
	go func() {
		_, err := c.Acquire(wctx, kinds)
		gotW <- err
	}()
	eventually(t, 30*time.Second, "the writer to queue", func() bool {
		var n int
		_ = aPool.QueryRow(e.ctx, "SELECT count(*) FROM "+e.table("waiting")+" WHERE name = $1 AND entity_id = $2", kinds.Name, kinds.ID).Scan(&n)
		return n == 1
	})
	cancel()
	if err := <-gotW; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled writer: %v", err)
	}
	if err := c.Close(e.ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	eventually(t, 30*time.Second, "the writer's waiter row to go", func() bool {
		return e.count("SELECT count(*) FROM "+e.table("waiters")) == 0
	})
	if err := errors.Join(rs.Release(e.ctx), ras.Release(e.ctx)); err != nil {
		t.Fatalf("releasing the shared locks: %v", err)
	}
	sem, err := a.Semaphore(lease.Key{Name: "order", ID: "10"}, 2)
	if err != nil {
		t.Fatal(err)
	}
	p, err := sem.Acquire(e.ctx)
	if err != nil {
		t.Fatalf("a semaphore permit as the application role: %v", err)
	}
	set, err := b.AcquireSet(e.ctx, []lease.SetMember{{Key: lease.Key{Name: "order", ID: "11"}}, {Key: lease.Key{Name: "order", ID: "12"}, Shared: true}})
	if err != nil {
		t.Fatalf("a key set as the application role: %v", err)
	}
	if err := errors.Join(p.Release(e.ctx), set.Release(e.ctx)); err != nil {
		t.Fatalf("releasing the permit and the set: %v", err)
	}

	if err := a.Close(e.ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := b.Close(e.ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("locks")); n != 0 {
		t.Errorf("%d lock rows left after Close", n)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("holders") + " WHERE expires_at > clock_timestamp()"); n != 0 {
		t.Errorf("%d live holder rows left after Close", n)
	}
}

// Mutual exclusion holds for clients of the application role, and no key is
// left locked by nobody.
func TestApplicationRoleMutualExclusion(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	app := e.appRoleWithCounters()
	mutualExclusion(t, e, func(cfg lease.Config) (*lease.Client, *pgxpool.Pool, string) {
		return e.clientAs(app, cfg)
	})
}

// A service of the application role cannot touch another holder's lock or
// lease, not even one of its own role: no table writes, and every function
// that acts for a holder wants that holder's secret.
func TestApplicationRoleRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	app := pgtest.NewRole(t, e.db.Cluster, "pglease_app")
	e.grant("application", app)
	victim, _, _ := e.clientAs(app, lease.Config{})
	k := lease.Key{Name: "invoice", ID: "1"}
	l, err := victim.Acquire(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	vid, _ := victim.HolderID()
	token, _ := e.lockRow(k)
	var expires time.Time
	if err := e.db.Pool.QueryRow(e.ctx, "SELECT expires_at FROM "+e.table("holders")+" WHERE id = $1", vid).Scan(&expires); err != nil {
		t.Fatal(err)
	}

	p := e.rolePool(app)
	// The attacker is a holder of its own, with a secret of its own.
	var own int64
	if err := p.QueryRow(e.ctx, "SELECT "+e.table("register")+"('h', 1, 'attacker', interval '1 minute', $1)",
		[]byte("attacker's secret, 32 bytes long")).Scan(&own); err != nil {
		t.Fatalf("register as the application role: %v", err)
	}
	wrong := []byte("a guess at the victim's secret..")

	const denied, notHolder = "42501", lease.SQLStateNotThisHolder
	// Tables: no writes at all.
	e.wantSQLState(p, denied, "DELETE FROM "+e.table("locks")+" WHERE holder_id = $1", vid)
	e.wantSQLState(p, denied, "INSERT INTO "+e.table("locks")+" (name, entity_id, token, holder_id) VALUES ('invoice', '2', 1, $1)", own)
	e.wantSQLState(p, denied, "UPDATE "+e.table("holders")+" SET expires_at = expires_at + interval '1 hour' WHERE id = $1", vid)
	e.wantSQLState(p, denied, "DELETE FROM "+e.table("holders")+" WHERE id = $1", vid)
	e.wantSQLState(p, denied, "TRUNCATE "+e.table("locks"))
	e.wantSQLState(p, denied, "SELECT 1 FROM "+e.table("locks")+" FOR SHARE")
	// USAGE on token_seq draws tokens (the advisory path does), which only
	// ever grow; moving the sequence back is refused.
	e.wantSQLState(p, denied, "SELECT setval($1::regclass, 1)", e.table("token_seq"))
	// Version 1's functions run with the caller's rights, which do not
	// reach the tables.
	e.wantSQLState(p, denied, "SELECT "+e.table("release")+"($1, $2, $3)", k.Name, k.ID, token)
	e.wantSQLState(p, denied, "SELECT * FROM "+e.table("acquire")+"($1, $2, $3)", k.Name, k.ID, vid)
	e.wantSQLState(p, denied, "SELECT * FROM "+e.table("renew")+"($1)", vid)
	// Version 5's functions want the victim's secret.
	e.wantSQLState(p, notHolder, "SELECT "+e.table("release")+"($1, $2, $3, $4, $5)", k.Name, k.ID, token, vid, wrong)
	e.wantSQLState(p, notHolder, "SELECT * FROM "+e.table("acquire")+"($1, $2, $3, $4)", k.Name, k.ID, vid, wrong)
	e.wantSQLState(p, notHolder, "SELECT * FROM "+e.table("renew")+"($1, $2)", vid, wrong)
	e.wantSQLState(p, notHolder, "SELECT "+e.table("close_holder")+"($1, $2)", vid, wrong)
	e.wantSQLState(p, notHolder, "SELECT "+e.table("drop_orphan")+"($1, $2, $3, $4)", k.Name, k.ID, vid, wrong)
	e.wantSQLState(p, notHolder, "SELECT * FROM "+e.table("holder_locks")+"($1, $2)", vid, wrong)
	// Version 6's: acquire_keys (every acquire of this version's client) and
	// leave want the secret too. grant_keys, the engine behind acquire_keys,
	// runs with the caller's rights: called for the victim directly, it
	// cannot take the victim's grant as an orphan of the victim's own. Nor
	// may the queue be written to.
	e.wantSQLState(p, notHolder, "SELECT * FROM "+e.table("acquire_keys")+"($1, $2, '{x}', 1, $3, $4, false, '{}')",
		[]string{k.Name}, []string{k.ID}, vid, wrong)
	e.wantSQLState(p, notHolder, "SELECT "+e.table("leave")+"($1, $2, $3, $4, '{}')", k.Name, k.ID, vid, wrong)
	e.wantSQLState(p, denied, "SELECT * FROM "+e.table("grant_keys")+"($1, $2, '{x}', 1, $3, false, '{}')",
		[]string{k.Name}, []string{k.ID}, vid)
	e.wantSQLState(p, denied, "INSERT INTO "+e.table("waiters")+" (name, entity_id, holder_id, kind) VALUES ('invoice', '1', $1, 'x')", own)
	e.wantSQLState(p, denied, "DELETE FROM "+e.table("waiters"))
	// Its own secret does not release someone else's lock either.
	var released bool
	if err := p.QueryRow(e.ctx, "SELECT "+e.table("release")+"($1, $2, $3, $4, $5)", k.Name, k.ID, token, own,
		[]byte("attacker's secret, 32 bytes long")).Scan(&released); err != nil || released {
		t.Errorf("release of the victim's lock under the attacker's own holder = %v, %v; want false, nil", released, err)
	}
	// And the DBA's tool is not the application's.
	e.wantSQLState(p, denied, "SELECT "+e.table("force_release")+"($1, $2)", k.Name, k.ID)
	e.wantSQLState(p, denied, "SELECT "+e.table("grant_application")+"(quote_ident($1)::regrole)", app.Name)

	// The victim is untouched: same row, same token, lease not extended.
	if tok, h := e.lockRow(k); tok != token || h != vid {
		t.Errorf("victim's row is now token %d of holder %d, want token %d of holder %d", tok, h, token, vid)
	}
	var after time.Time
	if err := e.db.Pool.QueryRow(e.ctx, "SELECT expires_at FROM "+e.table("holders")+" WHERE id = $1", vid).Scan(&after); err != nil {
		t.Fatal(err)
	}
	if after.Sub(expires) > victim.Config().TTL {
		t.Errorf("victim's lease moved from %v to %v", expires, after)
	}
	if l.Err() != nil {
		t.Errorf("victim's lock: %v", l.Err())
	}
	if err := l.Release(e.ctx); err != nil {
		t.Fatal(err)
	}
	if tok, _ := e.lockRow(k); tok != 0 {
		t.Errorf("row left after the victim's own release: token %d", tok)
	}
}

// A registration with a secret too short, or a TTL that is not positive, is
// refused and leaves no row.
func TestRegisterRefusesBadInput(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, tc := range []struct {
		ttl    string
		secret []byte
	}{
		{"1 minute", nil},
		{"1 minute", []byte("fifteen bytes..")},
		{"0 seconds", []byte("sixteen bytes...")},
		{"-1 second", []byte("sixteen bytes...")},
	} {
		e.wantSQLState(e.db.Pool, "22023", "SELECT "+e.table("register")+"('h', 1, 'a', $1::interval, $2)", tc.ttl, tc.secret)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("holders")); n != 0 {
		t.Errorf("%d holder rows after refused registrations", n)
	}
}

// The DBA role reads the views and frees a stuck lock with force_release,
// which its holder hears of at once and which is recorded; it writes nothing
// else.
func TestDBARole(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dba := pgtest.NewRole(t, e.db.Cluster, "pglease_dba")
	e.grant("dba", dba)
	holder, _, _ := e.client(lease.Config{})
	k := lease.Key{Name: "report", ID: "q3"}
	l, err := holder.Acquire(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	var logged []string
	p := e.rolePool(dba, func(c *pgxpool.Config) {
		c.ConnConfig.RuntimeParams["client_min_messages"] = "log"
		c.ConnConfig.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
			mu.Lock()
			logged = append(logged, n.Severity+": "+n.Message)
			mu.Unlock()
		}
	})
	var n int
	if err := p.QueryRow(e.ctx, "SELECT count(*) FROM "+e.table("held")+" WHERE name = $1 AND alive", k.Name).Scan(&n); err != nil || n != 1 {
		t.Fatalf("held as the DBA role: %d rows, %v", n, err)
	}
	if err := p.QueryRow(e.ctx, "SELECT count(*) FROM "+e.table("holder_status")).Scan(&n); err != nil || n != 1 {
		t.Errorf("holder_status as the DBA role: %d rows, %v", n, err)
	}
	const denied = "42501"
	e.wantSQLState(p, denied, "DELETE FROM "+e.table("locks"))
	e.wantSQLState(p, denied, "SELECT * FROM "+e.table("locks"))
	e.wantSQLState(p, denied, "SELECT "+e.table("register")+"('h', 1, 'a', interval '1 minute', $1)", []byte("sixteen bytes..."))
	e.wantSQLState(p, denied, "SELECT * FROM "+e.table("renew")+"(1, $1)", []byte("sixteen bytes..."))
	e.wantSQLState(p, denied, "SELECT * FROM "+e.table("acquire_keys")+"('{report}', '{q3}', '{x}', 1, 1, $1, false, '{}')", []byte("sixteen bytes..."))
	e.wantSQLState(p, denied, "SELECT * FROM "+e.table("waiters"))
	e.wantSQLState(p, denied, "DELETE FROM "+e.table("waiters"))
	if err := p.QueryRow(e.ctx, "SELECT count(*) FROM "+e.table("waiting")).Scan(&n); err != nil || n != 0 {
		t.Errorf("waiting as the DBA role: %d rows, %v; want 0", n, err)
	}
	if tok, _ := e.lockRow(k); tok != l.Token() {
		t.Fatalf("lock row changed by refused statements: token %d, want %d", tok, l.Token())
	}

	var freed *int64
	if err := p.QueryRow(e.ctx, "SELECT "+e.table("force_release")+"($1, $2, $3)", k.Name, k.ID, "stuck since Tuesday").Scan(&freed); err != nil {
		t.Fatalf("force_release as the DBA role: %v", err)
	}
	if freed == nil || *freed != l.Token() {
		t.Fatalf("force_release returned %v, want token %d", freed, l.Token())
	}
	select {
	case <-l.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the holder was not told of the forced release")
	}
	var lost *lease.LostError
	if !errors.As(l.Err(), &lost) || lost.Reason != lease.LossRowDeleted {
		t.Errorf("holder's lock ended with %v, want a LostError with reason %v", l.Err(), lease.LossRowDeleted)
	}
	var by, reason string
	var tok int64
	err = p.QueryRow(e.ctx, "SELECT released_by, reason, token FROM "+e.table("forced_releases")+" WHERE name = $1 AND entity_id = $2",
		k.Name, k.ID).Scan(&by, &reason, &tok)
	if err != nil || by != dba.Name || reason != "stuck since Tuesday" || tok != l.Token() {
		t.Errorf("forced_releases: %q %q %d, %v; want %q %q %d", by, reason, tok, err, dba.Name, "stuck since Tuesday", l.Token())
	}
	mu.Lock()
	found := false
	for _, m := range logged {
		if strings.HasPrefix(m, "LOG: ") && strings.Contains(m, "force-released lock (report, q3)") && strings.Contains(m, dba.Name) {
			found = true
		}
	}
	mu.Unlock()
	if !found {
		t.Errorf("no LOG message of the forced release; messages: %q", logged)
	}
	// The key is free again, for anyone.
	if l2, err := holder.TryAcquire(e.ctx, k); err != nil {
		t.Errorf("TryAcquire after the forced release: %v", err)
	} else if l2.Token() <= l.Token() {
		t.Errorf("token after the forced release %d, not above %d", l2.Token(), l.Token())
	}
	// A key nobody holds: NULL, and nothing recorded.
	if err := p.QueryRow(e.ctx, "SELECT "+e.table("force_release")+"('report', 'none')").Scan(&freed); err != nil || freed != nil {
		t.Errorf("force_release of a free key = %v, %v; want NULL", freed, err)
	}
	if n := e.count("SELECT count(*) FROM " + e.table("forced_releases")); n != 1 {
		t.Errorf("%d forced_releases rows, want 1", n)
	}
}

// revoke_grants takes every privilege back.
func TestRevokeGrants(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	app := pgtest.NewRole(t, e.db.Cluster, "pglease_app")
	e.grant("application", app)
	e.grant("dba", app)
	e.exec("SELECT "+e.table("revoke_grants")+"(quote_ident($1)::regrole)", app.Name)
	p := e.rolePool(app)
	e.wantSQLState(p, "42501", "SELECT count(*) FROM "+e.table("held"))
	e.wantSQLState(p, "42501", "SELECT "+e.table("register")+"('h', 1, 'a', interval '1 minute', $1)", []byte("sixteen bytes..."))
	ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancel()
	var n int
	if err := e.db.Pool.QueryRow(ctx, `SELECT count(*) FROM information_schema.role_routine_grants
		WHERE grantee = $1 AND routine_schema = $2`, app.Name, e.db.Schema).Scan(&n); err != nil || n != 0 {
		t.Errorf("%d routine grants left, %v", n, err)
	}
}

// force_release frees every grant of a key, shared locks and permits too
// (version 5's refused a key with more than one), records each, returns the
// largest token, and hands the key to the waiter queued behind them in the
// same transaction; each holder learns it lost its grant.
func TestForceReleaseEveryGrant(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	dba := pgtest.NewRole(t, e.db.Cluster, "pglease_dba")
	e.grant("dba", dba)
	p := e.rolePool(dba, func(*pgxpool.Config) {})
	a, _, _ := e.client(fastHeartbeat)
	b, _, _ := e.client(fastHeartbeat)
	w, _, _ := e.client(slowTimers) // only the handoff can wake it
	force := func(k lease.Key, want []*lease.Lock) {
		t.Helper()
		var freed *int64
		if err := p.QueryRow(e.ctx, "SELECT "+e.table("force_release")+"($1, $2, 'audit')", k.Name, k.ID).Scan(&freed); err != nil {
			t.Fatalf("force_release of %s: %v", k, err)
		}
		top := int64(0)
		for _, l := range want {
			top = max(top, l.Token())
		}
		if freed == nil || *freed != top {
			t.Fatalf("force_release of %s returned %v, want the largest token %d", k, freed, top)
		}
		if n := e.count("SELECT count(*) FROM "+e.table("forced_releases")+" WHERE name = $1 AND entity_id = $2", k.Name, k.ID); n != len(want) {
			t.Errorf("%d forced_releases rows for %s, want %d", n, k, len(want))
		}
		for _, l := range want {
			select {
			case <-l.Done():
			case <-time.After(waitLimit):
				t.Fatalf("the holder of token %d was not told of the forced release", l.Token())
			}
		}
	}

	k := lease.Key{Name: "report", ID: "shared"}
	s1, err := a.TryAcquireShared(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := b.TryAcquireShared(e.ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	got := goAcquire(e.ctx, w, k)
	eventually(t, waitLimit, "the writer queued", func() bool { return e.count("SELECT count(*) FROM "+e.table("waiters")) == 1 })
	force(k, []*lease.Lock{s1, s2})
	r := await(t, got, "the writer after the forced release")
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.l.Token() <= max(s1.Token(), s2.Token()) {
		t.Errorf("the writer's token %d is not above the freed ones", r.l.Token())
	}
	mustRelease(t, e.ctx, r.l)

	pk := lease.Key{Name: "report", ID: "permits"}
	var permits []*lease.Lock
	for _, c := range []*lease.Client{a, b} {
		sem, err := c.Semaphore(pk, 3)
		if err != nil {
			t.Fatal(err)
		}
		l, err := sem.TryAcquire(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		permits = append(permits, l)
	}
	force(pk, permits)
	if n := e.keyRows("locks", pk); n != 0 {
		t.Errorf("%d grants of %s left after force_release", n, pk)
	}
	e.keysLeftFree(k, pk)
}
