package pgtest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
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

// A Patroni cluster on loopback: a single-node etcd and Patroni nodes that
// bootstrap PostgreSQL from the binaries on the machine, in synchronous
// mode. Patroni, not the test, decides who leads; the helpers kill the
// leader (its Patroni and its PostgreSQL at once, as a dying machine does),
// ask for a switchover and ask who leads, through Patroni's REST API.

// PatroniOptions configure a Patroni cluster.
type PatroniOptions struct {
	// Nodes is the number of Patroni nodes: 2 or 3. Zero means 2.
	Nodes int
	// Strict sets synchronous_mode_strict: with no synchronous standby left,
	// commits wait instead of going on unreplicated.
	Strict bool
	// TTL is Patroni's leader key TTL, the longest a dead leader keeps its
	// role. Zero means 8s (loop_wait 1s, retry_timeout 3s).
	TTL time.Duration
}

// Patroni is a running Patroni cluster. Its methods are safe for concurrent
// use.
type Patroni struct {
	base     *Cluster // the owner of the directory and of the user to run as
	etcdPort int
	etcd     *os.Process
	etcdDone chan struct{}
	nodes    []*patroniNode
	http     *http.Client
}

type patroniNode struct {
	name    string
	pgPort  int
	apiPort int
	dir     string
	conf    string

	mu   sync.Mutex
	proc *os.Process
	done chan struct{}
}

// PatroniMember is one member as Patroni's /cluster reports it.
type PatroniMember struct {
	Name     string `json:"name"`
	Role     string `json:"role"` // leader, sync_standby, replica
	State    string `json:"state"`
	Port     int    `json:"port"`
	Timeline int    `json:"timeline"`
}

// StartPatroni starts etcd and the Patroni nodes of a cluster for this test
// alone, stopped and removed when the test ends, and returns once there is a
// leader that accepts writes and a synchronous standby. Without patroni,
// etcd or the server binaries the test is skipped with a one-line reason, or
// fails under CI=true.
func StartPatroni(tb testing.TB, opts PatroniOptions) *Patroni {
	tb.Helper()
	patroni := RequireProgram(tb, "patroni")
	etcd := RequireProgram(tb, "etcd")
	p, err := startPatroni(patroni, etcd, opts)
	if errors.Is(err, ErrNoServerBinaries) {
		unavailable(tb, fmt.Sprintf("%v; Patroni starts PostgreSQL from them", err))
	}
	if err != nil {
		tb.Fatal(err) // says "pgtest: ..." itself
	}
	tb.Cleanup(p.Stop)
	return p
}

func startPatroni(patroniBin, etcdBin string, opts PatroniOptions) (*Patroni, error) {
	if opts.Nodes == 0 {
		opts.Nodes = 2
	}
	if opts.Nodes < 2 || opts.Nodes > 3 {
		return nil, fmt.Errorf("pgtest: PatroniOptions.Nodes is %d; 2 or 3", opts.Nodes)
	}
	if opts.TTL == 0 {
		opts.TTL = 8 * time.Second
	}
	base, err := newOwned()
	if err != nil {
		return nil, err
	}
	p := &Patroni{base: base, http: &http.Client{Timeout: 5 * time.Second}}
	if err := p.startEtcd(etcdBin); err != nil {
		p.Stop()
		return nil, err
	}
	for i := 0; i < opts.Nodes; i++ {
		n, err := p.newNode(i, opts)
		if err != nil {
			p.Stop()
			return nil, err
		}
		p.nodes = append(p.nodes, n)
		if err := p.startNode(patroniBin, n); err != nil {
			p.Stop()
			return nil, err
		}
		if i == 0 {
			// The first node bootstraps the cluster alone, so that it is the
			// first leader and the others copy it.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			_, err := p.WaitLeader(ctx, "")
			cancel()
			if err != nil {
				p.Stop()
				return nil, err
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := p.WaitHealthy(ctx); err != nil {
		p.Stop()
		return nil, err
	}
	return p, nil
}

func (p *Patroni) mkdir(path string) error {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	if p.base.uid >= 0 {
		if err := os.Chown(path, p.base.uid, p.base.gid); err != nil {
			return fmt.Errorf("pgtest: %w", err)
		}
	}
	return nil
}

func (p *Patroni) startEtcd(bin string) error {
	dir := filepath.Join(p.base.dir, "etcd")
	if err := p.mkdir(dir); err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		client, err1 := freePort()
		peer, err2 := freePort()
		if err := errors.Join(err1, err2); err != nil {
			return fmt.Errorf("pgtest: %w", err)
		}
		cu, pu := "http://127.0.0.1:"+strconv.Itoa(client), "http://127.0.0.1:"+strconv.Itoa(peer)
		cmd := p.base.command(bin, "--name", "etcd0", "--data-dir", filepath.Join(dir, "data"),
			"--listen-client-urls", cu, "--advertise-client-urls", cu,
			"--listen-peer-urls", pu, "--initial-advertise-peer-urls", pu,
			"--initial-cluster", "etcd0="+pu, "--log-level", "warn")
		logf, err := os.OpenFile(filepath.Join(dir, "etcd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("pgtest: %w", err)
		}
		done, err := spawn(cmd, logf, syscall.SIGKILL)
		if err != nil {
			return fmt.Errorf("pgtest: start etcd: %w", err)
		}
		p.etcd, p.etcdDone, p.etcdPort = cmd.Process, done, client
		err = pollUntil(30*time.Second, done, func() error {
			resp, err := p.http.Get(cu + "/health")
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if !bytes.Contains(b, []byte(`"true"`)) {
				return fmt.Errorf("etcd /health: %s", b)
			}
			return nil
		})
		if err == nil {
			return nil
		}
		_ = p.etcd.Kill()
		<-done
		if attempt == 2 {
			return fmt.Errorf("pgtest: etcd did not become healthy: %w; log:\n%s", err, tail(filepath.Join(dir, "etcd.log")))
		}
	}
}

func (p *Patroni) newNode(i int, opts PatroniOptions) (*patroniNode, error) {
	n := &patroniNode{name: "node" + strconv.Itoa(i), dir: filepath.Join(p.base.dir, "node"+strconv.Itoa(i))}
	var err error
	if n.pgPort, err = freePort(); err != nil {
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	if n.apiPort, err = freePort(); err != nil {
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	if err := p.mkdir(n.dir); err != nil {
		return nil, err
	}
	if err := p.mkdir(filepath.Join(n.dir, "sock")); err != nil {
		return nil, err
	}
	ttl := int(opts.TTL / time.Second)
	retry := max((ttl-1)/2, 2) // loop_wait + 2*retry_timeout <= ttl
	// JSON is YAML: the configuration is written with encoding/json, so
	// that no value needs YAML quoting by hand.
	conf := map[string]any{
		"scope":     "pglease",
		"namespace": "/pgtest/",
		"name":      n.name,
		"log":       map[string]any{"level": "WARNING"},
		"restapi": map[string]any{
			"listen":          "127.0.0.1:" + strconv.Itoa(n.apiPort),
			"connect_address": "127.0.0.1:" + strconv.Itoa(n.apiPort),
		},
		"etcd3": map[string]any{"hosts": []string{"127.0.0.1:" + strconv.Itoa(p.etcdPort)}, "protocol": "http"},
		"bootstrap": map[string]any{
			"dcs": map[string]any{
				"ttl": ttl, "loop_wait": 1, "retry_timeout": retry,
				"maximum_lag_on_failover": 1 << 20,
				"synchronous_mode":        true,
				"synchronous_mode_strict": opts.Strict,
				"postgresql": map[string]any{
					"use_pg_rewind": true,
					"use_slots":     true,
					"parameters": map[string]any{
						"wal_keep_size":               "256MB",
						"max_connections":             100,
						"wal_retrieve_retry_interval": "100ms",
						"hot_standby_feedback":        "on",
					},
				},
			},
			"initdb": []any{map[string]any{"encoding": "UTF8"}, map[string]any{"locale": "C"}, "data-checksums"},
		},
		"postgresql": map[string]any{
			"listen":          "127.0.0.1:" + strconv.Itoa(n.pgPort),
			"connect_address": "127.0.0.1:" + strconv.Itoa(n.pgPort),
			"data_dir":        filepath.Join(n.dir, "data"),
			"bin_dir":         p.base.binDir,
			"pgpass":          filepath.Join(n.dir, "pgpass"),
			"pg_hba": []string{
				"local all all trust",
				"host all all 127.0.0.1/32 trust",
				"host replication all 127.0.0.1/32 trust",
			},
			"authentication": map[string]any{
				"superuser":   map[string]any{"username": "postgres"},
				"replication": map[string]any{"username": "postgres"},
				"rewind":      map[string]any{"username": "postgres"},
			},
			"parameters": map[string]any{
				"unix_socket_directories": filepath.Join(n.dir, "sock"),
				"shared_buffers":          "16MB",
				"fsync":                   "off",
				"log_min_messages":        "warning",
			},
		},
		"tags": map[string]any{},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	n.conf = filepath.Join(n.dir, "patroni.yml")
	if err := os.WriteFile(n.conf, b, 0o644); err != nil {
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	return n, nil
}

// startNode starts n's Patroni, which starts (or bootstraps, or copies) its
// PostgreSQL.
func (p *Patroni) startNode(bin string, n *patroniNode) error {
	cmd := p.base.command(bin, n.conf)
	cmd.Dir = n.dir
	cmd.Env = append(cmd.Env, "HOME="+n.dir)
	logf, err := os.OpenFile(filepath.Join(n.dir, "patroni.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	// SIGTERM on our death: Patroni stops its PostgreSQL on the way out.
	done, err := spawn(cmd, logf, syscall.SIGTERM)
	if err != nil {
		return fmt.Errorf("pgtest: start patroni %s: %w", n.name, err)
	}
	n.mu.Lock()
	n.proc, n.done = cmd.Process, done
	n.mu.Unlock()
	return nil
}

func (p *Patroni) node(name string) (*patroniNode, error) {
	for _, n := range p.nodes {
		if n.name == name {
			return n, nil
		}
	}
	return nil, fmt.Errorf("pgtest: no Patroni node %q", name)
}

// URL is a multi-host connection string naming every node's PostgreSQL, with
// target_session_attrs=read-write.
func (p *Patroni) URL() string {
	hosts := make([]string, len(p.nodes))
	for i, n := range p.nodes {
		hosts[i] = "127.0.0.1:" + strconv.Itoa(n.pgPort)
	}
	return "postgres://postgres@" + strings.Join(hosts, ",") +
		"/postgres?sslmode=disable&target_session_attrs=read-write&connect_timeout=2"
}

// NodeURL is the connection string of one node's PostgreSQL.
func (p *Patroni) NodeURL(name string) string {
	n, err := p.node(name)
	if err != nil {
		return ""
	}
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", n.pgPort)
}

// Cluster returns a Cluster for the multi-host URL, for NewDBOn and NewPool.
func (p *Patroni) Cluster() *Cluster { return External(p.URL()) }

// Names returns the node names.
func (p *Patroni) Names() []string {
	names := make([]string, len(p.nodes))
	for i, n := range p.nodes {
		names[i] = n.name
	}
	return names
}

// Members asks any running node's REST API for the cluster's members.
func (p *Patroni) Members(ctx context.Context) ([]PatroniMember, error) {
	var last error
	for _, n := range p.nodes {
		if !n.running() {
			continue
		}
		var out struct {
			Members []PatroniMember `json:"members"`
		}
		err := p.get(ctx, n, "/cluster", &out)
		if err == nil {
			return out.Members, nil
		}
		last = err
	}
	if last == nil {
		last = errors.New("no Patroni node is running")
	}
	return nil, fmt.Errorf("pgtest: patroni /cluster: %w", last)
}

// Leader returns the name of the member Patroni reports as the running
// leader, "" when there is none right now.
func (p *Patroni) Leader(ctx context.Context) (string, error) {
	ms, err := p.Members(ctx)
	if err != nil {
		return "", err
	}
	for _, m := range ms {
		if m.Role == "leader" && m.State == "running" {
			return m.Name, nil
		}
	}
	return "", nil
}

// WaitLeader waits until a leader other than not runs and accepts writes
// through its own port, and returns its name.
func (p *Patroni) WaitLeader(ctx context.Context, not string) (string, error) {
	var leader string
	err := pollUntil(2*time.Minute, ctx.Done(), func() error {
		l, err := p.Leader(ctx)
		if err != nil {
			return err
		}
		if l == "" || l == not {
			return fmt.Errorf("leader %q", l)
		}
		if err := p.writable(ctx, l); err != nil {
			return err
		}
		leader = l
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("pgtest: no Patroni leader other than %q: %w%s", not, err, p.logs())
	}
	return leader, nil
}

func (p *Patroni) writable(ctx context.Context, name string) error {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, p.NodeURL(name))
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var ro string
	if err := conn.QueryRow(cctx, `SHOW transaction_read_only`).Scan(&ro); err != nil {
		return err
	}
	if ro != "off" {
		return fmt.Errorf("%s is read-only", name)
	}
	return nil
}

// WaitHealthy waits until every running node is a member in state running,
// one of them the leader and another its synchronous standby.
func (p *Patroni) WaitHealthy(ctx context.Context) error {
	err := pollUntil(2*time.Minute, ctx.Done(), func() error {
		ms, err := p.Members(ctx)
		if err != nil {
			return err
		}
		running, leader, sync := 0, 0, 0
		for _, m := range ms {
			if m.State == "running" || m.State == "streaming" {
				running++
			}
			switch m.Role {
			case "leader":
				leader++
			case "sync_standby":
				sync++
			}
		}
		want := 0
		for _, n := range p.nodes {
			if n.running() {
				want++
			}
		}
		if running != want || leader != 1 || sync < 1 {
			return fmt.Errorf("members %+v", ms)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("pgtest: Patroni cluster not healthy: %w", err)
	}
	return nil
}

// KillNode kills a node's Patroni and every process of its PostgreSQL with
// SIGKILL, Patroni first so that it cannot start PostgreSQL again.
func (p *Patroni) KillNode(name string) error {
	n, err := p.node(name)
	if err != nil {
		return err
	}
	n.mu.Lock()
	proc, done := n.proc, n.done
	n.proc = nil
	n.mu.Unlock()
	if proc != nil {
		_ = proc.Kill()
		<-done
	}
	return killPostmaster(filepath.Join(n.dir, "data"))
}

// killPostmaster SIGKILLs the postmaster of dataDir and its children, and
// waits until they are gone.
func killPostmaster(dataDir string) error {
	b, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pgtest: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil {
		return fmt.Errorf("pgtest: postmaster.pid: %w", err)
	}
	for _, x := range withChildren(pid) {
		_ = syscall.Kill(x, syscall.SIGKILL)
	}
	// Not our children (Patroni's, and Patroni is gone): poll until the
	// postmaster no longer exists, reaped by init.
	return pollUntil(30*time.Second, nil, func() error {
		if err := syscall.Kill(pid, 0); err == nil {
			return fmt.Errorf("postmaster %d still exists", pid)
		}
		return nil
	})
}

// KillLeader kills the current leader's Patroni and PostgreSQL and returns
// its name.
func (p *Patroni) KillLeader(ctx context.Context) (string, error) {
	l, err := p.Leader(ctx)
	if err != nil {
		return "", err
	}
	if l == "" {
		return "", errors.New("pgtest: no Patroni leader to kill")
	}
	return l, p.KillNode(l)
}

// Failover kills the leader and waits until Patroni has promoted another
// node that accepts writes. It returns the old and new leaders and how long
// the cluster had no writable leader, as seen from here.
func (p *Patroni) Failover(ctx context.Context) (old, leader string, took time.Duration, err error) {
	old, err = p.KillLeader(ctx)
	if err != nil {
		return "", "", 0, err
	}
	start := time.Now()
	leader, err = p.WaitLeader(ctx, old)
	return old, leader, time.Since(start), err
}

// Restart starts a killed node's Patroni again; it rejoins as a standby
// (pg_rewind when needed) and the call returns once the cluster is healthy.
func (p *Patroni) Restart(ctx context.Context, name string) error {
	n, err := p.node(name)
	if err != nil {
		return err
	}
	if n.running() {
		return fmt.Errorf("pgtest: Patroni node %s is running", name)
	}
	bin, err := patroniPath()
	if err != nil {
		return err
	}
	if err := p.startNode(bin, n); err != nil {
		return err
	}
	return p.WaitHealthy(ctx)
}

func patroniPath() (string, error) {
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if isExec(filepath.Join(dir, "patroni")) {
			return filepath.Join(dir, "patroni"), nil
		}
	}
	return "", errors.New("pgtest: patroni not on PATH")
}

// Switchover asks Patroni (REST API POST /switchover) to hand the leader
// role to candidate, and waits until candidate leads and accepts writes.
func (p *Patroni) Switchover(ctx context.Context, candidate string) error {
	l, err := p.Leader(ctx)
	if err != nil {
		return err
	}
	n, err := p.node(l)
	if err != nil {
		return err
	}
	body, _ := json.Marshal(map[string]string{"leader": l, "candidate": candidate})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost,
		"http://127.0.0.1:"+strconv.Itoa(n.apiPort)+"/switchover", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := p.http.Do(req)
	if err != nil {
		return fmt.Errorf("pgtest: patroni switchover: %w", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("pgtest: patroni switchover to %s: %s: %s", candidate, resp.Status, b)
	}
	got, err := p.WaitLeader(ctx, l)
	if err != nil {
		return err
	}
	if got != candidate {
		return fmt.Errorf("pgtest: switchover to %s made %s the leader", candidate, got)
	}
	return nil
}

func (p *Patroni) get(ctx context.Context, n *patroniNode, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:"+strconv.Itoa(n.apiPort)+path, nil)
	if err != nil {
		return err
	}
	resp, err := p.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", resp.Status, b)
	}
	return json.Unmarshal(b, out)
}

// logs returns the tails of the nodes' Patroni logs, for an error.
func (p *Patroni) logs() string {
	var b strings.Builder
	for _, n := range p.nodes {
		fmt.Fprintf(&b, "\n%s patroni log:\n%s", n.name, tail(filepath.Join(n.dir, "patroni.log")))
	}
	return b.String()
}

func (n *patroniNode) running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.proc != nil
}

// Stop stops every Patroni node (which stops its PostgreSQL) and etcd, and
// removes their files.
func (p *Patroni) Stop() {
	var wg sync.WaitGroup
	for _, n := range p.nodes {
		n.mu.Lock()
		proc, done := n.proc, n.done
		n.proc = nil
		n.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if proc != nil {
				_ = proc.Signal(syscall.SIGTERM)
				select {
				case <-done:
				case <-time.After(30 * time.Second):
					_ = proc.Kill()
					<-done
				}
			}
			_ = killPostmaster(filepath.Join(n.dir, "data")) // what a stopped Patroni left running
		}()
	}
	wg.Wait()
	if p.etcd != nil {
		_ = p.etcd.Kill()
		<-p.etcdDone
	}
	_ = os.RemoveAll(p.base.dir)
}

// pollUntil calls f until it returns nil, for up to limit or until done is
// closed, and returns f's last error if it never did.
func pollUntil(limit time.Duration, done <-chan struct{}, f func() error) error {
	deadline := time.Now().Add(limit)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-done:
			return err
		case <-time.After(50 * time.Millisecond): // polls processes outside ours
		}
	}
}
