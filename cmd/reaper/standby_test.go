package main

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pglease/pglease/internal/pgtest"
)

// Pointed at a standby, the reaper says so and exits 1, in either mode,
// without deleting anything on the primary.
func TestRefusesStandby(t *testing.T) {
	t.Parallel()
	rs := pgtest.Replicated(t, pgtest.ReplicaOptions{Standbys: 1, NoFsync: true})
	db := pgtest.NewDBOn(t, rs.Cluster())
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	db.AddLocks(ctx, t, db.AddHolders(ctx, t, 1, false), 2)
	if err := rs.WaitStreaming(ctx); err != nil {
		t.Fatal(err)
	}
	env := []string{"DATABASE_URL=" + rs.Node(1).URL()}
	for _, args := range [][]string{{"--once"}, {"--schedule", "@every 1s"}} {
		res := runIn(t, ctx, env, append(args, "--schema", db.Schema)...)
		if res.code != exitFailed || !strings.Contains(res.stderr, msgStandby) ||
			!strings.Contains(res.stderr, "target_session_attrs=read-write") {
			t.Errorf("%q against a standby: exit %d, stderr %q; want exit 1 and %q with a hint", args, res.code, res.stderr, msgStandby)
		}
	}
	if n := db.Count(ctx, t, `SELECT count(*) FROM `+db.Qualified("locks")); n != 2 {
		t.Fatalf("%d lock rows on the primary, want the 2 dead ones untouched", n)
	}
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A daemon given a multi-host URL goes on reaping after the primary dies and
// a standby takes over, and stops cleanly.
func TestDaemonAcrossFailover(t *testing.T) {
	t.Parallel()
	rs := pgtest.Replicated(t, pgtest.ReplicaOptions{Standbys: 2, Sync: true, NoFsync: true})
	db := pgtest.NewDBOn(t, rs.Cluster())
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	locks := `SELECT count(*) FROM ` + db.Qualified("locks")
	waitReaped := func(what string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for db.Count(ctx, t, locks) != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("%s: dead rows not reaped after 30s", what)
			}
			time.Sleep(50 * time.Millisecond) // polls what the daemon does on its schedule
		}
	}
	db.AddLocks(ctx, t, db.AddHolders(ctx, t, 2, false), 3)

	dctx, stop := context.WithCancel(ctx)
	var stderr syncBuffer
	exited := make(chan int, 1)
	go func() {
		exited <- run(dctx, []string{"--schedule", "@every 1s", "--schema", db.Schema},
			[]string{"DATABASE_URL=" + rs.URL()}, &bytes.Buffer{}, &stderr)
	}()
	waitReaped("before the failover")

	if err := rs.KillPrimary(); err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Failover(ctx); err != nil {
		t.Fatal(err)
	}
	// The pools' connections died with the old primary; the next passes
	// reach the new one. The test's own pool drops its dead ones first.
	deadline := time.Now().Add(30 * time.Second)
	for _, err := db.Pool.Exec(ctx, `SELECT 1`); err != nil; _, err = db.Pool.Exec(ctx, `SELECT 1`) {
		if time.Now().After(deadline) {
			t.Fatalf("the test's pool does not reach the new primary: %v", err)
		}
	}
	db.AddLocks(ctx, t, db.AddHolders(ctx, t, 1, false), 4)
	waitReaped("after the failover")
	select {
	case code := <-exited:
		t.Fatalf("the daemon exited (%d) across the failover:\n%s", code, stderr.String())
	default:
	}
	stop()
	if code := <-exited; code != exitOK {
		t.Fatalf("the daemon exited %d on stop:\n%s", code, stderr.String())
	}
	if strings.Contains(stderr.String(), msgStandby) {
		t.Fatalf("the daemon took the new primary for a standby:\n%s", stderr.String())
	}
}
