package lease_test

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// The token guard must not be trusted from a session setting that the
// application role can set itself (00005/00006: "anyone may set a setting in
// their own session"). After the guard row is gone (crash recovery, a promoted
// standby; TRUNCATE here, as the other guard tests do), the application role's
// first table-path acquire must bump token_seq by 2^40 even if its session
// claims pglease.guard_<md5(schema)> = on.
func TestTokenGuardNotTrustedFromSessionSetting(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	app := pgtest.NewRole(t, e.db.Cluster, "pglease_app")
	e.grant("application", app)
	sum := md5.Sum([]byte(e.db.Schema))
	guard := "pglease.guard_" + hex.EncodeToString(sum[:])
	for _, path := range []string{"grant", "handoff"} {
		var before int64
		if err := e.db.Pool.QueryRow(e.ctx, "SELECT nextval('"+e.table("token_seq")+"')").Scan(&before); err != nil {
			t.Fatal(err)
		}
		spoof := pgtest.NewPool(t, e.db.Cluster, "spoof-"+path, app.Connect, func(c *pgxpool.Config) {
			c.MaxConns = 4
			c.AfterConnect = func(ctx context.Context, conn *pgx.Conn) error {
				_, err := conn.Exec(ctx, "SELECT set_config($1, 'on', false)", guard)
				return err
			}
		})
		c, err := lease.New(spoof, &lease.Config{Schema: e.db.Schema})
		if err != nil {
			t.Fatal(err)
		}
		k := lease.Key{Name: "spoof", ID: path}
		var tok int64
		if path == "grant" {
			e.exec("TRUNCATE " + e.table("token_guard")) // as crash recovery would
			l, err := c.Acquire(e.ctx, k)
			if err != nil {
				t.Fatal(err)
			}
			tok = l.Token()
			_ = l.Release(e.ctx)
		} else {
			// serve, in the releaser's (spoofing) session, hands the key over.
			w, _, _ := e.client(lease.Config{})
			l, err := c.Acquire(e.ctx, k)
			if err != nil {
				t.Fatal(err)
			}
			got := acquireInBackground(t, e.ctx, w, k)
			eventually(t, 10*time.Second, "the waiter queued", func() bool {
				return e.count("SELECT count(*) FROM "+e.table("waiters")+" WHERE name = $1 AND entity_id = $2", k.Name, k.ID) == 1
			})
			e.exec("TRUNCATE " + e.table("token_guard"))
			if err := l.Release(e.ctx); err != nil {
				t.Fatal(err)
			}
			wl := <-got
			if wl == nil {
				t.FailNow()
			}
			tok = wl.Token()
			_ = wl.Release(e.ctx)
		}
		const bump = 1 << 40
		if tok <= before+bump {
			t.Errorf("%s: token %d drawn after the guard row was lost, not past the bump %d: the session setting %s=on, set by the application role, skipped guard_tokens",
				path, tok, before+bump, guard)
		} else {
			t.Logf("%s: token %d, bumped", path, tok)
		}
		_ = c.Close(e.ctx)
	}
}
