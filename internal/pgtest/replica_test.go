package pgtest

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func exec1(t *testing.T, ctx context.Context, url, sql string, args ...any) {
	t.Helper()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func count(t *testing.T, ctx context.Context, url, sql string) int {
	t.Helper()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n int
	if err := conn.QueryRow(ctx, sql).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

func timeline(t *testing.T, ctx context.Context, rs *ReplicaSet, i int) int {
	t.Helper()
	tli, err := rs.Timeline(ctx, i)
	if err != nil {
		t.Fatal(err)
	}
	return tli
}

// A synchronous set: what the primary acknowledged is on the promoted standby,
// the multi-host URL finds the new primary, the other standby follows it, and
// the killed primary comes back as a standby by pg_rewind.
func TestReplicaSetSyncFailover(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	rs := Replicated(t, ReplicaOptions{Standbys: 2, Sync: true, NoFsync: true})
	if rs.Primary() != 0 || rs.Len() != 3 {
		t.Fatalf("primary %d of %d nodes, want 0 of 3", rs.Primary(), rs.Len())
	}
	for i := 1; i < 3; i++ {
		if r, err := rs.InRecovery(ctx, i); err != nil || !r {
			t.Fatalf("node%d in recovery = %v, %v; want a standby", i, r, err)
		}
	}
	if tli := timeline(t, ctx, rs, 0); tli != 1 {
		t.Fatalf("timeline %d before any failover, want 1", tli)
	}
	exec1(t, ctx, rs.URL(), `CREATE TABLE acked (n int)`)
	exec1(t, ctx, rs.URL(), `INSERT INTO acked SELECT generate_series(1, 100)`)
	// A synchronous commit has been flushed by a standby when it returns;
	// kill the primary at once.
	if err := rs.KillPrimary(); err != nil {
		t.Fatal(err)
	}
	p, err := rs.Failover(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p == 0 || rs.Primary() != p {
		t.Fatalf("promoted node%d, Primary() = %d", p, rs.Primary())
	}
	if tli := timeline(t, ctx, rs, p); tli != 2 {
		t.Fatalf("timeline %d after one failover, want 2", tli)
	}
	if n := count(t, ctx, rs.URL(), `SELECT count(*) FROM acked`); n != 100 {
		t.Fatalf("%d of 100 acknowledged rows on the new primary", n)
	}
	if port := count(t, ctx, rs.URL(), `SELECT inet_server_port()`); port != rs.Node(p).Port() {
		t.Fatalf("the multi-host URL reached port %d, the new primary is on %d", port, rs.Node(p).Port())
	}
	// The other standby follows the new primary, synchronously: a commit
	// returns only once it has it.
	exec1(t, ctx, rs.URL(), `INSERT INTO acked VALUES (101)`)
	other := 3 - p
	if tli := timeline(t, ctx, rs, other); tli != 2 {
		t.Fatalf("node%d follows timeline %d, want 2", other, tli)
	}
	if err := rs.Rejoin(ctx, 0, Rewind); err != nil {
		t.Fatal(err)
	}
	if r, err := rs.InRecovery(ctx, 0); err != nil || !r {
		t.Fatalf("rejoined node0 in recovery = %v, %v; want a standby", r, err)
	}
	if n := count(t, ctx, rs.Node(0).URL(), `SELECT count(*) FROM acked`); n != 101 {
		t.Fatalf("the rejoined node has %d of 101 rows", n)
	}
	if tli := timeline(t, ctx, rs, 0); tli != 2 {
		t.Fatalf("rejoined node0 on timeline %d, want 2", tli)
	}
}

// An asynchronous standby cut off from its primary misses what it commits;
// promoted, it does not have it. The node comes back by a base backup.
func TestReplicaSetAsyncLosesCommits(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	rs := Replicated(t, ReplicaOptions{Standbys: 1, NoFsync: true})
	exec1(t, ctx, rs.URL(), `CREATE TABLE t (n int)`)
	if err := rs.WaitStreaming(ctx); err != nil {
		t.Fatal(err)
	}
	if err := rs.PauseStreaming(ctx, 1); err != nil {
		t.Fatal(err)
	}
	exec1(t, ctx, rs.URL(), `INSERT INTO t VALUES (1)`) // returns: no standby is waited for
	if n := count(t, ctx, rs.Node(0).URL(), `SELECT count(*) FROM t`); n != 1 {
		t.Fatalf("primary has %d rows, want 1", n)
	}
	if err := rs.KillPrimary(); err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Failover(ctx); err != nil {
		t.Fatal(err)
	}
	if n := count(t, ctx, rs.URL(), `SELECT count(*) FROM t`); n != 0 {
		t.Fatalf("the promoted standby has %d rows of a commit it never received", n)
	}
	if err := rs.Rejoin(ctx, 0, BaseBackup); err != nil {
		t.Fatal(err)
	}
	exec1(t, ctx, rs.URL(), `INSERT INTO t VALUES (2)`)
	if err := rs.WaitStreaming(ctx); err != nil {
		t.Fatal(err)
	}
	if n := count(t, ctx, rs.Node(0).URL(), `SELECT count(*) FROM t WHERE n = 2`); n != 1 {
		t.Fatalf("node0 rejoined by base backup has %d of the new primary's rows, want 1", n)
	}
}

// With Sync and the only standby stopped, a commit waits for it (SyncRep),
// and goes through when it comes back.
func TestReplicaSetSyncCommitWaits(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	rs := Replicated(t, ReplicaOptions{Standbys: 1, Sync: true, NoFsync: true})
	exec1(t, ctx, rs.URL(), `CREATE TABLE t (n int)`)
	rs.StopNode(1)
	done := make(chan error, 1)
	go func() {
		conn, err := pgx.Connect(ctx, rs.Node(0).URL()+"&application_name=waiter")
		if err != nil {
			done <- err
			return
		}
		defer conn.Close(context.Background())
		_, err = conn.Exec(ctx, `INSERT INTO t VALUES (1)`)
		done <- err
	}()
	deadline := time.Now().Add(30 * time.Second)
	for count(t, ctx, rs.Node(0).URL(), `SELECT count(*) FROM pg_stat_activity
		WHERE application_name = 'waiter' AND wait_event = 'SyncRep'`) == 0 {
		select {
		case err := <-done:
			t.Fatalf("the commit returned (%v) with no synchronous standby running", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the commit is not waiting for a synchronous standby after 30s")
		}
		time.Sleep(10 * time.Millisecond) // polls the server's view of the waiter
	}
	if err := rs.StartNode(1); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := count(t, ctx, rs.Node(1).URL(), `SELECT count(*) FROM t`); n != 1 {
		t.Fatalf("the standby has %d rows after the commit returned, want 1", n)
	}
}

func TestReplicaSetURL(t *testing.T) {
	rs := &ReplicaSet{names: []string{"node0", "node1"}, nodes: []*Cluster{{port: 5001}, {port: 5002}}}
	u := rs.URL()
	if !strings.Contains(u, "127.0.0.1:5001,127.0.0.1:5002") || !strings.Contains(u, "target_session_attrs=read-write") {
		t.Fatalf("URL %q does not name both nodes with target_session_attrs=read-write", u)
	}
	if _, err := StartReplicaSet(ReplicaOptions{Standbys: 3}); err == nil || errors.Is(err, ErrNoServerBinaries) ||
		!strings.Contains(err.Error(), strconv.Itoa(3)) {
		t.Fatalf("3 standbys: %v; want an error that names the number", err)
	}
}
