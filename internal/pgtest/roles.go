package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Role is a login role of its own for one test, with no privileges but
// those granted to PUBLIC, dropped (with every privilege granted to it in
// the cluster's postgres database) when the test ends.
type Role struct {
	Name     string
	password string
}

// NewRole creates a login role on c with a fresh name and password. Roles
// belong to the cluster, not to a schema, so the name is random; the test's
// cluster user must be allowed to create roles (a throwaway cluster's is a
// superuser).
func NewRole(tb testing.TB, c *Cluster, prefix string) *Role {
	tb.Helper()
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	pw := make([]byte, 16)
	_, _ = rand.Read(pw)
	r := &Role{Name: prefix + "_" + hex.EncodeToString(b), password: hex.EncodeToString(pw)}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.URL())
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	defer conn.Close(context.Background())
	// CREATE ROLE takes no parameters: the name is an identifier, the
	// password a literal, each quoted for what it is.
	lit := "'" + strings.ReplaceAll(r.password, "'", "''") + "'"
	if _, err := conn.Exec(ctx, "CREATE ROLE "+pgx.Identifier{r.Name}.Sanitize()+" LOGIN PASSWORD "+lit); err != nil {
		unavailable(tb, "pgtest: cannot create a role on this server: "+err.Error())
	}
	tb.Cleanup(func() { r.drop(tb, c) })
	return r
}

// Password is the role's password.
func (r *Role) Password() string { return r.password }

// Connect makes a pool configuration log in as the role.
func (r *Role) Connect(cfg *pgxpool.Config) {
	cfg.ConnConfig.User = r.Name
	cfg.ConnConfig.Password = r.password
}

func (r *Role) drop(tb testing.TB, c *Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.URL())
	if err != nil {
		tb.Logf("pgtest: drop role %s: %v", r.Name, err)
		return
	}
	defer conn.Close(context.Background())
	// Sessions of the role still open (a pool closing late) would keep
	// DROP ROLE from succeeding.
	_, _ = conn.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", r.Name)
	id := pgx.Identifier{r.Name}.Sanitize()
	if _, err := conn.Exec(ctx, "DROP OWNED BY "+id+"; DROP ROLE "+id); err != nil {
		tb.Logf("pgtest: drop role %s: %v", r.Name, err)
	}
}
