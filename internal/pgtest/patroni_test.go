package pgtest

import (
	"context"
	"testing"
	"time"
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
