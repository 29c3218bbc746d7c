package lease_test

import (
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

const asyncWarning = "table locks may not survive a failover"

func withLogs(cfg lease.Config) (lease.Config, *logBuffer) {
	logs := &logBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	return cfg, logs
}

// The hazard itself, with an asynchronous standby: a lock granted on the
// primary, lost with it by a failover to a standby that never received the
// grant, is granted again to a second holder while the first still holds it
// (until its heartbeat finds its row gone). The token is not drawn again
// (token_guard). The check at first use warns about exactly this, once, and
// ReplicationRequireSync refuses table locks and leaves no row behind.
func TestReplicationAsyncHazard(t *testing.T) {
	t.Parallel()
	rs := pgtest.Replicated(t, pgtest.ReplicaOptions{Standbys: 1, NoFsync: true})
	e := newEnvOn(t, rs.Cluster())
	// a renews rarely, so that its next renewal (which finds its row gone)
	// usually comes after b's grant: two holders at once.
	cfg, logs := withLogs(lease.Config{TTL: 30 * time.Second, HeartbeatInterval: 12 * time.Second})
	a, _, _ := e.client(cfg)
	first := mustAcquire(t, e.ctx, a, lease.Key{Name: "warmup", ID: "1"})
	mustRelease(t, e.ctx, first)
	if n := logs.count(asyncWarning); n != 1 || logs.count("synchronous_standby_names") == 0 {
		t.Fatalf("%d warnings %q naming synchronous_standby_names after the first acquire; want one:\n%s", n, asyncWarning, logs.String())
	}

	strict, _, _ := e.client(lease.Config{Replication: lease.ReplicationRequireSync})
	_, err := strict.TryAcquire(e.ctx, lease.Key{Name: "strict", ID: "1"})
	var re *lease.ReplicationError
	if !errors.Is(err, lease.ErrNotReplicated) || !errors.As(err, &re) || re.Setting != "synchronous_standby_names" ||
		re.Async != 1 || !strings.Contains(err.Error(), "synchronous_standby_names") {
		t.Fatalf("ReplicationRequireSync with an asynchronous standby: %v; want a ReplicationError naming synchronous_standby_names", err)
	}
	if _, ok := strict.HolderID(); ok {
		t.Fatal("a refused client registered a holder")
	}
	// A role with only the application grants sees the standby in
	// pg_stat_replication but not its sync_state: the check still finds the
	// hazard, from the settings, and says it could not tell how many of the
	// standbys are asynchronous.
	app := pgtest.NewRole(t, e.db.Cluster, "pglease_app")
	e.grant("application", app)
	appCfg, appLogs := withLogs(lease.Config{})
	appWarn, _, _ := e.clientAs(app, appCfg)
	mustRelease(t, e.ctx, mustAcquire(t, e.ctx, appWarn, lease.Key{Name: "app", ID: "1"}))
	if appLogs.count(asyncWarning) != 1 || appLogs.count("async_standbys=-1") != 1 {
		t.Fatalf("an application role's client: want one warning with async_standbys=-1:\n%s", appLogs.String())
	}
	appStrict, _, _ := e.clientAs(app, lease.Config{Replication: lease.ReplicationRequireSync})
	_, err = appStrict.TryAcquire(e.ctx, lease.Key{Name: "app", ID: "2"})
	if !errors.As(err, &re) || re.Setting != "synchronous_standby_names" || re.Standbys != 1 || re.Async != -1 {
		t.Fatalf("ReplicationRequireSync as an application role: %v (%+v); want a ReplicationError with 1 standby, Async -1", err, re)
	}
	if err := rs.WaitStreaming(e.ctx); err != nil { // a's holder row is on the standby
		t.Fatal(err)
	}

	key := lease.Key{Name: "job", ID: "1"}
	if err := rs.PauseStreaming(e.ctx, 1); err != nil {
		t.Fatal(err)
	}
	held := mustAcquire(t, e.ctx, a, key) // committed on the primary alone
	if err := rs.KillPrimary(); err != nil {
		t.Fatal(err)
	}
	if err := rs.ResumeStreaming(e.ctx, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Failover(e.ctx); err != nil {
		t.Fatal(err)
	}
	b, _, _ := e.client(failoverConfig)
	second, err := b.TryAcquire(e.ctx, key)
	if err != nil {
		t.Fatalf("the key whose grant the failover lost: %v; want it granted again (the hazard)", err)
	}
	t.Logf("granted twice: a (token %d, never released, its holder alive; lost yet: %v) and b (token %d)",
		held.Token(), closed(held.Done()), second.Token())
	if second.Token() <= held.Token() {
		t.Fatalf("b's token %d is not above the lost grant's %d: a token was drawn again", second.Token(), held.Token())
	}
	// The first holder finds out at its next renewal: its row is gone.
	select {
	case <-held.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("a never found that its lock's row is gone on the new primary")
	}
	var lost *lease.LostError
	if !errors.As(held.Err(), &lost) || lost.Reason != lease.LossRowDeleted {
		t.Fatalf("a's lock ended with %v; want LossRowDeleted", held.Err())
	}
	mustRelease(t, e.ctx, second)
	if n := logs.count(asyncWarning); n != 1 {
		t.Fatalf("%d warnings by the end; want exactly one per client", n)
	}
}

// With a synchronous standby the check is satisfied: no warning, and
// ReplicationRequireSync hands out table locks.
func TestReplicationSynchronousPasses(t *testing.T) {
	t.Parallel()
	rs := pgtest.Replicated(t, pgtest.ReplicaOptions{Standbys: 1, Sync: true, NoFsync: true})
	e := newEnvOn(t, rs.Cluster())
	cfg, logs := withLogs(lease.Config{Replication: lease.ReplicationRequireSync})
	c, _, _ := e.client(cfg)
	mustRelease(t, e.ctx, mustAcquire(t, e.ctx, c, lease.Key{Name: "sync", ID: "1"}))
	if logs.count("level=WARN") != 0 {
		t.Fatalf("warnings with a synchronous standby:\n%s", logs.String())
	}
	if _, server, ok := c.ServerClockOffset(); !ok || !strings.Contains(server, "timeline 1") {
		t.Fatalf("server %q (measured %v) after the first use; want the primary on timeline 1", server, ok)
	}
}

// A server with no standby at all: no warning (nothing to fail over to), but
// ReplicationRequireSync still refuses, saying no standby is connected;
// ReplicationIgnore skips the check; a bad policy is a ConfigError.
func TestReplicationSingleServer(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg, logs := withLogs(lease.Config{})
	c, _, _ := e.client(cfg)
	mustRelease(t, e.ctx, mustAcquire(t, e.ctx, c, lease.Key{Name: "single", ID: "1"}))
	if logs.count(asyncWarning) != 0 {
		t.Fatalf("a replication warning for a server without standbys:\n%s", logs.String())
	}
	if offset, _, ok := c.ServerClockOffset(); !ok || offset > time.Second || offset < -time.Second {
		t.Fatalf("clock offset %s (measured %v) against a server on this machine", offset, ok)
	}
	strict, _, _ := e.client(lease.Config{Replication: lease.ReplicationRequireSync})
	_, err := strict.Acquire(e.ctx, lease.Key{Name: "single", ID: "2"})
	var re *lease.ReplicationError
	if !errors.As(err, &re) || re.Standbys != 0 || !strings.Contains(err.Error(), "no streaming standby") {
		t.Fatalf("ReplicationRequireSync without standbys: %v", err)
	}
	if n := e.count(`SELECT count(*) FROM ` + e.table("holders")); n != 1 {
		t.Fatalf("%d holder rows; want only the first client's", n)
	}
	ignore, _, _ := e.client(lease.Config{Replication: lease.ReplicationIgnore})
	mustRelease(t, e.ctx, mustAcquire(t, e.ctx, ignore, lease.Key{Name: "single", ID: "3"}))
	if _, _, ok := ignore.ServerClockOffset(); ok {
		t.Fatal("ReplicationIgnore measured the server anyway")
	}
	if _, err := lease.New(e.db.Pool, &lease.Config{Replication: 7}); !errors.Is(err, lease.ErrInvalidConfig) ||
		!strings.Contains(err.Error(), "Replication") {
		t.Fatalf("Replication 7: %v; want a ConfigError naming the field", err)
	}
}

// Clocks of two primaries that differ by a meaningful part of SafetyMargin
// (a quarter, beyond the measurement's uncertainty) are warned about; a small
// difference, or the same server again, is not.
func TestReplicationClockDifference(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	cfg, logs := withLogs(lease.Config{TTL: 6 * time.Second, SafetyMargin: time.Second})
	c, _, _ := e.client(cfg)
	lease.NoteServerReading(c, "a:1 timeline 1", 5*time.Millisecond, time.Millisecond)
	lease.NoteServerReading(c, "a:1 timeline 1", 900*time.Millisecond, time.Millisecond) // same server: no comparison
	lease.NoteServerReading(c, "b:1 timeline 2", 910*time.Millisecond, time.Millisecond)
	if logs.count("level=WARN") != 0 || logs.count("the server changed") != 1 {
		t.Fatalf("a 10ms difference: want one INFO and no warning:\n%s", logs.String())
	}
	lease.NoteServerReading(c, "a:1 timeline 3", 910*time.Millisecond-300*time.Millisecond, 10*time.Millisecond)
	if logs.count("level=WARN") != 1 || logs.count("clock_difference=-300ms") != 1 {
		t.Fatalf("a 300ms difference with SafetyMargin 1s: want one warning naming it:\n%s", logs.String())
	}
	if offset, server, ok := c.ServerClockOffset(); !ok || server != "a:1 timeline 3" || offset != 610*time.Millisecond {
		t.Fatalf("last reading %s on %q (%v)", offset, server, ok)
	}
}
