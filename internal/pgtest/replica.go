package pgtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// A replicated cluster: a primary and streaming standbys on loopback, made
// with pg_basebackup, for the failover tests. Each node is an owned Cluster
// of its own (data directory, port, process); the ReplicaSet knows which one
// is the primary, kills it, promotes a standby and brings the old primary
// back as a standby of the new one.

// ReplicaOptions configure a replicated cluster.
type ReplicaOptions struct {
	// Standbys is the number of streaming standbys: 1 or 2. Zero means 1.
	Standbys int
	// Sync makes every commit wait for one standby to flush it
	// (synchronous_standby_names = 'ANY 1 (every node)', synchronous_commit
	// on). Without it the standbys are asynchronous.
	Sync bool
	// NoFsync turns fsync off on every node. full_page_writes stays on:
	// pg_rewind needs it.
	NoFsync bool
	// Settings are extra postgresql.conf settings for every node.
	Settings map[string]string
}

// ReplicaSet is a primary and its streaming standbys. Its methods are safe
// for concurrent use.
type ReplicaSet struct {
	opts  ReplicaOptions
	names []string

	mu      sync.Mutex
	nodes   []*Cluster
	primary int
	down    []bool // killed or stopped, not started again yet
}

// RejoinMode selects how Rejoin makes a former primary a standby again.
type RejoinMode int

const (
	// Rewind runs pg_rewind against the new primary: only the blocks that
	// changed since the timelines forked are copied.
	Rewind RejoinMode = iota
	// BaseBackup throws the node's data away and copies the new primary
	// afresh with pg_basebackup.
	BaseBackup
)

// Replicated starts a replicated cluster for this test alone, stopped and
// removed when the test ends. Without server binaries the test is skipped
// with a one-line reason, or fails under CI=true.
func Replicated(tb testing.TB, opts ReplicaOptions) *ReplicaSet {
	tb.Helper()
	rs, err := StartReplicaSet(opts)
	if errors.Is(err, ErrNoServerBinaries) {
		unavailable(tb, fmt.Sprintf("%v; this test needs a replicated cluster of its own", err))
	}
	if err != nil {
		tb.Fatal(err) // says "pgtest: ..." itself
	}
	tb.Cleanup(rs.Stop)
	return rs
}

// StartReplicaSet starts a primary and opts.Standbys standbys, and returns
// once every standby streams from the primary.
func StartReplicaSet(opts ReplicaOptions) (*ReplicaSet, error) {
	if opts.Standbys == 0 {
		opts.Standbys = 1
	}
	if opts.Standbys < 1 || opts.Standbys > 2 {
		return nil, fmt.Errorf("pgtest: ReplicaOptions.Standbys is %d; 1 or 2", opts.Standbys)
	}
	rs := &ReplicaSet{opts: opts}
	for i := 0; i <= opts.Standbys; i++ {
		rs.names = append(rs.names, "node"+strconv.Itoa(i))
	}
	rs.down = make([]bool, len(rs.names))
	primary, err := newOwned()
	if err != nil {
		return nil, err
	}
	// Data checksums for pg_rewind: wal_log_hints on the command line would
	// not reach the crash recovery that pg_rewind runs first.
	initdb := primary.command(filepath.Join(primary.binDir, "initdb"), "-D", primary.dataDir(), "-U", "postgres",
		"-A", "trust", "--data-checksums", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
	if out, err := initdb.CombinedOutput(); err != nil {
		_ = os.RemoveAll(primary.dir)
		return nil, fmt.Errorf("pgtest: initdb: %w\n%s", err, out)
	}
	rs.nodes = append(rs.nodes, primary)
	primary.configure(rs.nodeOptions(0))
	if err := primary.startOnFreePort(); err != nil {
		_ = os.RemoveAll(primary.dir)
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// In postgresql.auto.conf, so that pg_basebackup copies it to every
	// standby and a promoted one keeps it; on the command line it could not
	// be changed (SetSynchronousStandbyNames).
	names := ""
	if opts.Sync {
		names = "ANY 1 (" + strings.Join(rs.names, ", ") + ")"
	}
	if err := alterSystem(ctx, primary, "synchronous_standby_names", names); err != nil {
		rs.Stop()
		return nil, err
	}
	// Here too, not on the command line, so that the crash recovery that
	// pg_rewind runs on a killed node keeps the WAL that pg_rewind reads.
	if err := alterSystem(ctx, primary, "wal_keep_size", "256MB"); err != nil {
		rs.Stop()
		return nil, err
	}
	for i := 1; i <= opts.Standbys; i++ {
		sb, err := newOwned()
		if err != nil {
			rs.Stop()
			return nil, err
		}
		rs.nodes = append(rs.nodes, sb)
		sb.configure(rs.nodeOptions(i))
		if err := rs.baseBackup(sb, primary); err != nil {
			rs.Stop()
			return nil, err
		}
		if err := sb.startOnFreePort(); err != nil {
			rs.Stop()
			return nil, err
		}
	}
	if err := rs.WaitStreaming(ctx); err != nil {
		rs.Stop()
		return nil, err
	}
	return rs, nil
}

// nodeOptions returns the settings of node i.
func (rs *ReplicaSet) nodeOptions(i int) Options {
	settings := map[string]string{
		"shared_buffers":               "16MB",
		"max_connections":              "100",
		"cluster_name":                 rs.names[i], // the standby's application_name, named in synchronous_standby_names
		"wal_log_hints":                "on",        // for pg_rewind
		"wal_keep_size":                "256MB",     // so a rewound node finds the WAL it needs
		"wal_retrieve_retry_interval":  "100ms",     // a standby tries again quickly after its primary went away
		"wal_receiver_status_interval": "1s",
		"hot_standby_feedback":         "on",
	}
	if rs.opts.NoFsync {
		settings["fsync"] = "off"
	}
	for k, v := range rs.opts.Settings {
		settings[k] = v
	}
	return Options{Settings: settings}
}

// baseBackup fills sb's (empty) data directory with a copy of from, set up to
// stream from it.
func (rs *ReplicaSet) baseBackup(sb, from *Cluster) error {
	_ = os.RemoveAll(sb.dataDir())
	cmd := sb.command(filepath.Join(sb.binDir, "pg_basebackup"), "-D", sb.dataDir(), "-h", "127.0.0.1",
		"-p", strconv.Itoa(from.port), "-U", "postgres", "-X", "stream", "-R", "-c", "fast", "--no-sync")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pgtest: pg_basebackup from port %d: %w\n%s", from.port, err, out)
	}
	return nil
}

// Stop stops every node and removes their files.
func (rs *ReplicaSet) Stop() {
	rs.mu.Lock()
	nodes := rs.nodes
	rs.mu.Unlock()
	for _, n := range nodes {
		n.Stop()
	}
}

// Node returns node i (0 is the first primary).
func (rs *ReplicaSet) Node(i int) *Cluster {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.nodes[i]
}

// Len returns the number of nodes.
func (rs *ReplicaSet) Len() int { return len(rs.names) }

// Primary returns the index of the current primary: the last one promoted,
// which may be down (killed and not failed over yet).
func (rs *ReplicaSet) Primary() int {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.primary
}

// PrimaryCluster returns the current primary.
func (rs *ReplicaSet) PrimaryCluster() *Cluster {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return rs.nodes[rs.primary]
}

// URL is a multi-host connection string naming every node, with
// target_session_attrs=read-write: a client connects to whichever node is
// the primary at the time.
func (rs *ReplicaSet) URL() string {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	hosts := make([]string, len(rs.nodes))
	for i, n := range rs.nodes {
		hosts[i] = "127.0.0.1:" + strconv.Itoa(n.port)
	}
	return "postgres://postgres@" + strings.Join(hosts, ",") +
		"/postgres?sslmode=disable&target_session_attrs=read-write&connect_timeout=2"
}

// Cluster returns a Cluster for the replica set's multi-host URL, for the
// helpers that take one (NewDBOn, NewPool). It cannot be restarted.
func (rs *ReplicaSet) Cluster() *Cluster { return External(rs.URL()) }

// Kill kills every process of the node with SIGKILL, the way a machine that
// dies takes its server with it: no shutdown checkpoint, no goodbye to the
// clients or standbys.
func (c *Cluster) Kill() error {
	if err := c.signalAll(syscall.SIGKILL); err != nil {
		return err
	}
	c.kill(syscall.SIGKILL) // waits for the postmaster's exit
	return nil
}

// KillPrimary kills the current primary (SIGKILL to every process of it).
func (rs *ReplicaSet) KillPrimary() error {
	rs.mu.Lock()
	i := rs.primary
	rs.mu.Unlock()
	return rs.KillNode(i)
}

// KillNode kills node i with SIGKILL.
func (rs *ReplicaSet) KillNode(i int) error {
	rs.mu.Lock()
	n := rs.nodes[i]
	rs.down[i] = true
	rs.mu.Unlock()
	return n.Kill()
}

// StopNode shuts node i down cleanly (fast shutdown).
func (rs *ReplicaSet) StopNode(i int) {
	rs.mu.Lock()
	n := rs.nodes[i]
	rs.down[i] = true
	rs.mu.Unlock()
	n.kill(syscall.SIGINT)
}

// StartNode starts node i again, in the role its data directory says (a
// standby if it has standby.signal).
func (rs *ReplicaSet) StartNode(i int) error {
	rs.mu.Lock()
	n := rs.nodes[i]
	rs.mu.Unlock()
	if err := n.start(); err != nil {
		return err
	}
	rs.mu.Lock()
	rs.down[i] = false
	rs.mu.Unlock()
	return nil
}

// Failover promotes the standby that received the most WAL (the one a
// failover manager would pick: with Sync it has every commit that was
// acknowledged) and points the other running standbys at it. The old primary
// should be down already (KillPrimary). It returns the new primary's index.
func (rs *ReplicaSet) Failover(ctx context.Context) (int, error) {
	rs.mu.Lock()
	var cand []int
	for i := range rs.nodes {
		if i != rs.primary && !rs.down[i] {
			cand = append(cand, i)
		}
	}
	rs.mu.Unlock()
	best, bestLSN := -1, int64(-1)
	for _, i := range cand {
		var lsn int64
		err := rs.query(ctx, i, `SELECT coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) - '0/0'`, &lsn)
		if err != nil {
			return -1, fmt.Errorf("pgtest: failover: node%d: %w", i, err)
		}
		if lsn > bestLSN {
			best, bestLSN = i, lsn
		}
	}
	if best < 0 {
		return -1, errors.New("pgtest: failover: no running standby to promote")
	}
	return best, rs.Promote(ctx, best)
}

// Promote promotes standby i, waits until it accepts writes, and points the
// other running standbys at it.
func (rs *ReplicaSet) Promote(ctx context.Context, i int) error {
	var ok bool
	if err := rs.query(ctx, i, `SELECT pg_promote(true, 60)`, &ok); err != nil {
		return fmt.Errorf("pgtest: promote node%d: %w", i, err)
	}
	if !ok {
		return fmt.Errorf("pgtest: promote node%d: pg_promote returned false", i)
	}
	if err := rs.waitRole(ctx, i, false); err != nil {
		return err
	}
	rs.mu.Lock()
	rs.primary = i
	var others []int
	for j := range rs.nodes {
		if j != i && !rs.down[j] {
			others = append(others, j)
		}
	}
	rs.mu.Unlock()
	for _, j := range others {
		if err := rs.follow(ctx, j, i); err != nil {
			return err
		}
	}
	return nil
}

// follow points running standby j at node i (primary_conninfo is reloadable).
func (rs *ReplicaSet) follow(ctx context.Context, j, i int) error {
	n := rs.Node(j)
	if err := alterSystem(ctx, n, "primary_conninfo", rs.conninfo(j, i)); err != nil {
		return fmt.Errorf("pgtest: point node%d at node%d: %w", j, i, err)
	}
	return nil
}

// conninfo is the primary_conninfo of node j streaming from node i.
func (rs *ReplicaSet) conninfo(j, i int) string {
	return fmt.Sprintf("host=127.0.0.1 port=%d user=postgres application_name=%s", rs.Node(i).port, rs.names[j])
}

// Rejoin makes node i, which must be down, a standby of the current primary
// and starts it: by pg_rewind (which first runs crash recovery on a node
// that was killed) or by a fresh base backup.
func (rs *ReplicaSet) Rejoin(ctx context.Context, i int, mode RejoinMode) error {
	rs.mu.Lock()
	n, p := rs.nodes[i], rs.nodes[rs.primary]
	if !rs.down[i] || i == rs.primary {
		rs.mu.Unlock()
		return fmt.Errorf("pgtest: rejoin node%d: it must be a stopped node other than the primary", i)
	}
	rs.mu.Unlock()
	switch mode {
	case Rewind:
		src := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres", p.port)
		cmd := n.command(filepath.Join(n.binDir, "pg_rewind"), "-D", n.dataDir(), "--source-server", src,
			"--write-recovery-conf", "--no-sync")
		// pg_rewind reads the source's timeline from its control file,
		// which a promotion updates only at the next checkpoint.
		if err := rs.query(ctx, rs.Primary(), `CHECKPOINT`, nil); err != nil {
			return fmt.Errorf("pgtest: checkpoint before pg_rewind: %w", err)
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("pgtest: pg_rewind node%d: %w\n%s", i, err, out)
		}
	case BaseBackup:
		if err := rs.baseBackup(n, p); err != nil {
			return err
		}
	default:
		return fmt.Errorf("pgtest: rejoin: unknown mode %d", mode)
	}
	// pg_rewind copies the source's postgresql.auto.conf and appends its own
	// primary_conninfo; set it once more with this node's application_name.
	auto := filepath.Join(n.dataDir(), "postgresql.auto.conf")
	f, err := os.OpenFile(auto, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("pgtest: rejoin node%d: %w", i, err)
	}
	_, err = fmt.Fprintf(f, "primary_conninfo = '%s'\n", rs.conninfo(i, rs.Primary()))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("pgtest: rejoin node%d: %w", i, err)
	}
	if err := rs.StartNode(i); err != nil {
		return err
	}
	return rs.WaitStreaming(ctx)
}

// SetSynchronousStandbyNames sets synchronous_standby_names on the primary
// and reloads it: "" makes commits stop waiting (what a failover manager does
// when no synchronous standby is left, unless it is strict).
func (rs *ReplicaSet) SetSynchronousStandbyNames(ctx context.Context, value string) error {
	return alterSystem(ctx, rs.PrimaryCluster(), "synchronous_standby_names", value)
}

// PauseStreaming stops standby i from receiving WAL (its primary_conninfo
// emptied) until ResumeStreaming: what the primary commits meanwhile exists
// nowhere else, the hazard of an asynchronous standby made certain.
func (rs *ReplicaSet) PauseStreaming(ctx context.Context, i int) error {
	if err := alterSystem(ctx, rs.Node(i), "primary_conninfo", ""); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var n int
		if err := rs.query(ctx, i, `SELECT count(*) FROM pg_stat_wal_receiver`, &n); err != nil {
			return err
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pgtest: node%d still receives WAL after 30s", i)
		}
		time.Sleep(20 * time.Millisecond) // polls a process outside ours
	}
}

// ResumeStreaming points standby i at the primary again.
func (rs *ReplicaSet) ResumeStreaming(ctx context.Context, i int) error {
	return rs.follow(ctx, i, rs.Primary())
}

// WaitStreaming waits until every running standby streams from the primary
// and has replayed everything the primary had written when it was called.
func (rs *ReplicaSet) WaitStreaming(ctx context.Context) error {
	rs.mu.Lock()
	p := rs.primary
	var want []string
	for i := range rs.nodes {
		if i != p && !rs.down[i] {
			want = append(want, rs.names[i])
		}
	}
	rs.mu.Unlock()
	var target int64
	if err := rs.query(ctx, p, `SELECT pg_current_wal_lsn() - '0/0'`, &target); err != nil {
		return fmt.Errorf("pgtest: wait for standbys: %w", err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		var n int
		err := rs.query(ctx, p, `SELECT count(*) FROM pg_stat_replication
			WHERE state = 'streaming' AND application_name = ANY($1) AND replay_lsn - '0/0' >= $2`,
			&n, want, target)
		if err != nil {
			return fmt.Errorf("pgtest: wait for standbys: %w", err)
		}
		if n == len(want) {
			return nil
		}
		if time.Now().After(deadline) {
			var seen string
			_ = rs.query(ctx, p, `SELECT coalesce(string_agg(application_name || ' ' || state || ' ' ||
				coalesce(replay_lsn::text, '-'), ', '), 'none') FROM pg_stat_replication`, &seen)
			logs := ""
			for _, name := range want {
				i, _ := strconv.Atoi(strings.TrimPrefix(name, "node"))
				logs += "\n" + name + " log:\n" + tail(filepath.Join(rs.Node(i).dir, "postgres.log"))
			}
			return fmt.Errorf("pgtest: %d of the standbys %v stream from node%d after 60s (seen: %s, want replay at %d)%s",
				n, want, p, seen, target, logs)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond): // polls processes outside ours
		}
	}
}

// Timeline returns node i's timeline: the current WAL's on a primary, the
// one being received or replayed on a standby.
func (rs *ReplicaSet) Timeline(ctx context.Context, i int) (int, error) {
	var tli int64
	err := rs.query(ctx, i, `SELECT CASE WHEN pg_is_in_recovery()
			THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver), (pg_control_checkpoint()).timeline_id)
			ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END`, &tli)
	if err != nil {
		return 0, fmt.Errorf("pgtest: timeline of node%d: %w", i, err)
	}
	return int(tli), nil
}

// InRecovery reports whether node i is a standby.
func (rs *ReplicaSet) InRecovery(ctx context.Context, i int) (bool, error) {
	var r bool
	err := rs.query(ctx, i, `SELECT pg_is_in_recovery()`, &r)
	return r, err
}

// waitRole waits until node i is a standby (recovery true) or accepts writes.
func (rs *ReplicaSet) waitRole(ctx context.Context, i int, recovery bool) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		r, err := rs.InRecovery(ctx, i)
		if err == nil && r == recovery {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pgtest: node%d: in recovery = %v after 60s, want %v (%v)", i, r, recovery, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond): // polls a process outside ours
		}
	}
}

// query runs sql on node i alone and scans its one row into dest; with a
// nil dest it only runs it.
func (rs *ReplicaSet) query(ctx context.Context, i int, sql string, dest any, args ...any) error {
	conn, err := pgx.Connect(ctx, rs.Node(i).URL())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if dest == nil {
		_, err = conn.Exec(ctx, sql, args...)
		return err
	}
	return conn.QueryRow(ctx, sql, args...).Scan(dest)
}

// alterSystem sets a configuration parameter in c's postgresql.auto.conf and
// reloads the configuration.
func alterSystem(ctx context.Context, c *Cluster, name, value string) error {
	conn, err := pgx.Connect(ctx, c.URL())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	lit := "'" + strings.ReplaceAll(value, "'", "''") + "'"
	if _, err := conn.Exec(ctx, `ALTER SYSTEM SET `+pgx.Identifier{name}.Sanitize()+` = `+lit); err != nil {
		return fmt.Errorf("pgtest: ALTER SYSTEM SET %s: %w", name, err)
	}
	if _, err := conn.Exec(ctx, `SELECT pg_reload_conf()`); err != nil {
		return fmt.Errorf("pgtest: reload: %w", err)
	}
	return nil
}
