package pgtest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Patroni with etcd: a synchronous standby, a switchover through the REST
// API, a failover after the leader's machine "dies", and its return.
func TestPatroni(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	p := StartPatroni(t, PatroniOptions{})
	ms, err := p.Members(ctx)
	if err != nil {
		t.Fatal(err)
	}
	roles := map[string]string{}
	for _, m := range ms {
		roles[m.Name] = m.Role
	}
	if roles["node0"] != "leader" || roles["node1"] != "sync_standby" {
		t.Fatalf("roles %v; want node0 leader and node1 its synchronous standby", roles)
	}
	exec1(t, ctx, p.URL(), `CREATE TABLE t (n int)`)
	exec1(t, ctx, p.URL(), `INSERT INTO t VALUES (1)`)

	if err := p.Switchover(ctx, "node1"); err != nil {
		t.Fatal(err)
	}
	if l, err := p.Leader(ctx); err != nil || l != "node1" {
		t.Fatalf("leader after the switchover: %q, %v; want node1", l, err)
	}
	if n := count(t, ctx, p.URL(), `SELECT count(*) FROM t`); n != 1 {
		t.Fatalf("%d rows after the switchover, want 1", n)
	}
	if err := p.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	exec1(t, ctx, p.URL(), `INSERT INTO t VALUES (2)`) // acknowledged by node0, the synchronous standby now

	old, leader, took, err := p.Failover(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if old != "node1" || leader != "node0" {
		t.Fatalf("failover from %s to %s; want node1 to node0", old, leader)
	}
	t.Logf("patroni failover: no writable leader for %s", took.Round(time.Millisecond))
	if n := count(t, ctx, p.URL(), `SELECT count(*) FROM t`); n != 2 {
		t.Fatalf("%d rows after the failover, want both acknowledged ones", n)
	}
	if port := count(t, ctx, p.URL(), `SELECT inet_server_port()`); p.NodeURL("node0") == "" ||
		port != count(t, ctx, p.NodeURL("node0"), `SELECT inet_server_port()`) {
		t.Fatalf("the multi-host URL reached port %d, not node0", port)
	}
	if err := p.Restart(ctx, "node1"); err != nil {
		t.Fatal(err)
	}
	ms, err = p.Members(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.Name == "node1" && m.Role != "sync_standby" {
			t.Fatalf("node1 back as %q, want sync_standby", m.Role)
		}
		if m.Timeline < 3 {
			t.Fatalf("%s on timeline %d after a switchover and a failover, want 3 or more", m.Name, m.Timeline)
		}
	}
}

// synchronous_mode_strict, as README's Failover section describes it: with
// its only synchronous standby gone, a non-strict Patroni empties
// synchronous_standby_names and commits go on, on one node alone (lost with
// it); a strict one names '*' and commits wait until a standby is back.
func TestPatroniSynchronousModeStrict(t *testing.T) {
	t.Parallel()
	for _, strict := range []bool{false, true} {
		t.Run(fmt.Sprintf("strict=%v", strict), func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			p := StartPatroni(t, PatroniOptions{Strict: strict, TTL: 5 * time.Second})
			leader, err := p.Leader(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var standby string
			for _, n := range p.Names() {
				if n != leader {
					standby = n
				}
			}
			url := p.NodeURL(leader)
			exec1(t, ctx, url, `CREATE TABLE t (n int)`)
			if err := p.KillNode(standby); err != nil {
				t.Fatal(err)
			}
			want := map[bool]string{false: "", true: "*"}[strict]
			names := func() string {
				conn, err := pgx.Connect(ctx, url)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close(context.Background())
				var s string
				if err := conn.QueryRow(ctx, `SHOW synchronous_standby_names`).Scan(&s); err != nil {
					t.Fatal(err)
				}
				return s
			}
			deadline := time.Now().Add(60 * time.Second)
			for s := names(); s != want; s = names() {
				if time.Now().After(deadline) {
					t.Fatalf("synchronous_standby_names is %q 60s after the standby died; want %q (strict %v)", s, want, strict)
				}
				time.Sleep(100 * time.Millisecond) // polls what Patroni's loop sets
			}
			done := make(chan error, 1)
			go func() {
				conn, err := pgx.Connect(ctx, url+"&application_name=committer")
				if err != nil {
					done <- err
					return
				}
				defer conn.Close(context.Background())
				_, err = conn.Exec(ctx, `INSERT INTO t VALUES (1)`)
				done <- err
			}()
			if !strict {
				// Nothing to wait for: the commit returns, on one node.
				select {
				case err := <-done:
					if err != nil {
						t.Fatal(err)
					}
				case <-time.After(30 * time.Second):
					t.Fatal("a commit did not return 30s after Patroni emptied synchronous_standby_names")
				}
				return
			}
			deadline = time.Now().Add(30 * time.Second)
			for count(t, ctx, url, `SELECT count(*) FROM pg_stat_activity
				WHERE application_name = 'committer' AND wait_event = 'SyncRep'`) == 0 {
				select {
				case err := <-done:
					t.Fatalf("the commit returned (%v) with no standby, in strict mode", err)
				default:
				}
				if time.Now().After(deadline) {
					t.Fatal("the commit is not waiting for a standby after 30s, in strict mode")
				}
				time.Sleep(10 * time.Millisecond) // polls the server's view of the committer
			}
			if err := p.Restart(ctx, standby); err != nil {
				t.Fatal(err)
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if n := count(t, ctx, p.NodeURL(standby), `SELECT count(*) FROM t`); n != 1 {
				t.Fatalf("the standby back has %d rows after the waiting commit returned, want 1", n)
			}
		})
	}
}
