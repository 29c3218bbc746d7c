// Package pgtest runs tests against a real PostgreSQL: a throwaway cluster
// started from the PostgreSQL binaries on the machine, or the server named by
// PGLEASE_TEST_DATABASE_URL. Each test gets its own schema, so tests run in
// parallel. Fault tests start a cluster of their own (Owned) so that they can
// restart, pause or kill it without disturbing anyone else.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// EnvURL names the environment variable that points the tests at an existing
// server instead of a throwaway cluster.
const EnvURL = "PGLEASE_TEST_DATABASE_URL"

// EnvBinDir names the environment variable that points the harness at the
// directory of the PostgreSQL server binaries (initdb, postgres) to start
// clusters from, instead of looking for them on PATH and in
// /usr/lib/postgresql/*/bin.
const EnvBinDir = "PGLEASE_TEST_PG_BINDIR"

// Options configure a throwaway cluster.
type Options struct {
	// NoFsync turns fsync off, which makes commits cheap but the timings of
	// durable commits meaningless. Benchmarks leave it false.
	NoFsync bool
	// Settings are extra postgresql.conf settings (name → value).
	Settings map[string]string
}

// Cluster is a PostgreSQL server used by tests.
type Cluster struct {
	url   string
	owned bool

	dir     string // data directory (owned clusters only)
	sockDir string
	port    int
	binDir  string
	args    []string
	uid     int // -1 when not switching users
	gid     int

	mu     sync.Mutex
	proc   *os.Process
	exited chan struct{}
}

// URL is a connection string for the cluster's "postgres" database.
func (c *Cluster) URL() string { return c.url }

// Owned reports whether this process started the cluster (and so may restart it).
func (c *Cluster) Owned() bool { return c.owned }

// Port is the TCP port the cluster listens on (owned clusters only).
func (c *Cluster) Port() int { return c.port }

// Addr is the server's TCP address, host:port, for proxies put in front of it.
func (c *Cluster) Addr() (string, error) {
	cfg, err := pgconn.ParseConfig(c.url)
	if err != nil {
		return "", err
	}
	if strings.HasPrefix(cfg.Host, "/") {
		return "", fmt.Errorf("pgtest: %s is a Unix socket, not a TCP address", cfg.Host)
	}
	return net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port))), nil
}

// External returns a Cluster for the server at url. It cannot be restarted.
func External(url string) *Cluster { return &Cluster{url: url} }

// Start initialises and starts a throwaway cluster in a temporary directory.
// When running as root, initdb and postgres run as the "postgres" user.
func Start(opts Options) (*Cluster, error) {
	c, err := newOwned()
	if err != nil {
		return nil, err
	}
	initdb := c.command(filepath.Join(c.binDir, "initdb"), "-D", c.dataDir(), "-U", "postgres", "-A", "trust",
		"-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
	if out, err := initdb.CombinedOutput(); err != nil {
		_ = os.RemoveAll(c.dir)
		return nil, fmt.Errorf("pgtest: initdb: %w\n%s", err, out)
	}
	c.configure(opts)
	if err := c.startOnFreePort(); err != nil {
		_ = os.RemoveAll(c.dir)
		return nil, err
	}
	return c, nil
}

// newOwned makes the directories of an owned cluster (its data directory not
// yet initialised) and finds the binaries and the user to run them as.
func newOwned() (*Cluster, error) {
	binDir, err := findBinDir()
	if err != nil {
		return nil, err
	}
	c := &Cluster{owned: true, binDir: binDir, uid: -1, gid: -1}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("pgtest: running as root needs a \"postgres\" user to run initdb and postgres as: %w", err)
		}
		c.uid, _ = strconv.Atoi(u.Uid)
		c.gid, _ = strconv.Atoi(u.Gid)
	}
	c.dir, err = os.MkdirTemp("", "pglease-pg-")
	if err != nil {
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	c.sockDir = filepath.Join(c.dir, "sock")
	if err := os.Mkdir(c.sockDir, 0o700); err != nil {
		_ = os.RemoveAll(c.dir)
		return nil, fmt.Errorf("pgtest: %w", err)
	}
	if c.uid >= 0 {
		for _, p := range []string{c.dir, c.sockDir} {
			if err := os.Chown(p, c.uid, c.gid); err != nil {
				_ = os.RemoveAll(c.dir)
				return nil, fmt.Errorf("pgtest: %w", err)
			}
		}
	}
	return c, nil
}

func (c *Cluster) dataDir() string { return filepath.Join(c.dir, "data") }

// configure sets the server's command line from the default settings and
// opts.
func (c *Cluster) configure(opts Options) {
	settings := map[string]string{
		"listen_addresses":          "127.0.0.1",
		"unix_socket_directories":   c.sockDir,
		"max_connections":           "300",
		"max_locks_per_transaction": "256",
		"shared_buffers":            "128MB",
		"fsync":                     "on",
		"synchronous_commit":        "on",
		"log_min_messages":          "warning",
		"log_min_error_statement":   "panic",
		"logging_collector":         "off",
		"max_wal_size":              "1GB",
	}
	if opts.NoFsync {
		settings["fsync"] = "off"
		settings["full_page_writes"] = "off"
	}
	for k, v := range opts.Settings {
		settings[k] = v
	}
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	c.args = []string{"-D", c.dataDir()}
	for _, k := range keys {
		c.args = append(c.args, "-c", k+"="+settings[k])
	}
}

// startOnFreePort starts the server on a free port, trying a few in case
// another process takes one first.
func (c *Cluster) startOnFreePort() error {
	for attempt := 0; ; attempt++ {
		port, err := freePort()
		if err != nil {
			return fmt.Errorf("pgtest: %w", err)
		}
		c.port = port
		c.url = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port)
		err = c.start()
		if err == nil || attempt == 3 {
			return err
		}
	}
}

func (c *Cluster) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Dir = c.dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if c.uid >= 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(c.uid), Gid: uint32(c.gid)}}
	}
	return cmd
}

// start runs postgres on c.port and waits until it accepts connections.
func (c *Cluster) start() error {
	args := append([]string{"-p", strconv.Itoa(c.port)}, c.args...)
	cmd := c.command(filepath.Join(c.binDir, "postgres"), args...)
	logPath := filepath.Join(c.dir, "postgres.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	exited, err := spawn(cmd, logf, syscall.SIGQUIT)
	if err != nil {
		return fmt.Errorf("pgtest: start postgres: %w", err)
	}
	c.mu.Lock()
	c.proc, c.exited = cmd.Process, exited
	c.mu.Unlock()

	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		conn, err := pgx.Connect(ctx, c.url)
		cancel()
		if err == nil {
			_ = conn.Close(context.Background())
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("pgtest: postgres exited during start-up; log:\n%s", tail(logPath))
		default:
		}
		if time.Now().After(deadline) {
			c.kill(syscall.SIGQUIT)
			return fmt.Errorf("pgtest: postgres did not accept connections in 60s: %v; log:\n%s", err, tail(logPath))
		}
		time.Sleep(20 * time.Millisecond) // readiness poll of an external process
	}
}

// spawn starts cmd with its output to logf (closed when the process ends)
// and returns a channel closed when it has exited. If this test process dies,
// the child gets deathSig (for postgres, SIGQUIT: an immediate shutdown).
func spawn(cmd *exec.Cmd, logf *os.File, deathSig syscall.Signal) (exited chan struct{}, err error) {
	cmd.Stdout, cmd.Stderr = logf, logf
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	// Pdeathsig follows the OS thread that started the child, so that
	// thread is kept for exactly the child's lifetime.
	cmd.SysProcAttr.Pdeathsig = deathSig
	started := make(chan error, 1)
	exited = make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		if err := cmd.Start(); err != nil {
			started <- err
			close(exited)
			return
		}
		started <- nil
		_ = cmd.Wait()
		_ = logf.Close()
		close(exited)
	}()
	if err := <-started; err != nil {
		_ = logf.Close()
		return nil, err
	}
	return exited, nil
}

// kill signals the postmaster and waits for it to exit.
func (c *Cluster) kill(sig syscall.Signal) {
	c.mu.Lock()
	p, exited := c.proc, c.exited
	c.proc = nil
	c.mu.Unlock()
	if p == nil {
		return
	}
	_ = p.Signal(sig)
	<-exited
}

// ShutdownMode selects how Restart stops the server.
type ShutdownMode int

const (
	// Fast: roll back open transactions, disconnect clients, checkpoint (SIGINT).
	Fast ShutdownMode = iota
	// Immediate: quit at once without a checkpoint; crash recovery on start (SIGQUIT).
	Immediate
)

// Restart stops the server in the given mode and starts it again on the same
// port. Owned clusters only.
func (c *Cluster) Restart(mode ShutdownMode) error {
	if !c.owned {
		return errors.New("pgtest: cannot restart a server this process did not start")
	}
	if mode == Immediate {
		c.kill(syscall.SIGQUIT)
	} else {
		c.kill(syscall.SIGINT)
	}
	return c.start()
}

// Pause stops the postmaster and every backend with SIGSTOP; Resume continues
// them. Owned clusters only.
func (c *Cluster) Pause() error { return c.signalAll(syscall.SIGSTOP) }

// Resume continues a paused server.
func (c *Cluster) Resume() error { return c.signalAll(syscall.SIGCONT) }

func (c *Cluster) signalAll(sig syscall.Signal) error {
	c.mu.Lock()
	p := c.proc
	c.mu.Unlock()
	if !c.owned || p == nil {
		return errors.New("pgtest: not a running owned cluster")
	}
	for _, pid := range withChildren(p.Pid) {
		_ = syscall.Kill(pid, sig)
	}
	return nil
}

// withChildren returns pid and the pids of its children.
func withChildren(pid int) []int {
	pids := []int{pid}
	if kids, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid)); err == nil {
		for _, f := range strings.Fields(string(kids)) {
			if k, err := strconv.Atoi(f); err == nil {
				pids = append(pids, k)
			}
		}
	}
	return pids
}

// Stop shuts the server down (fast) and removes its files. Owned clusters only;
// a no-op otherwise.
func (c *Cluster) Stop() {
	if !c.owned {
		return
	}
	c.kill(syscall.SIGINT)
	_ = os.RemoveAll(c.dir)
}

// TerminateBackends calls pg_terminate_backend on every client backend whose
// pg_stat_activity row matches where (a SQL condition; args are $1...), other
// than the session doing it, and returns how many it terminated.
func (c *Cluster) TerminateBackends(ctx context.Context, where string, args ...any) (int, error) {
	conn, err := pgx.Connect(ctx, c.url)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.Background())
	var n int
	err = conn.QueryRow(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND (`+where+`)`, args...).Scan(&n)
	return n, err
}

// ErrNoServerBinaries is wrapped by the error of Start when the PostgreSQL
// server binaries (initdb, postgres) cannot be found.
var ErrNoServerBinaries = errors.New("pgtest: no PostgreSQL server binaries (initdb, postgres)")

// findBinDir returns the directory of initdb and postgres: the one EnvBinDir
// names when set (and no other), else the one of initdb on PATH, else the
// newest /usr/lib/postgresql/*/bin.
func findBinDir() (string, error) {
	if d := os.Getenv(EnvBinDir); d != "" {
		if isExec(filepath.Join(d, "initdb")) && isExec(filepath.Join(d, "postgres")) {
			return d, nil
		}
		return "", fmt.Errorf("%w in %s=%s", ErrNoServerBinaries, EnvBinDir, d)
	}
	var candidates []string
	if p, err := exec.LookPath("initdb"); err == nil {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			candidates = append(candidates, filepath.Dir(r))
		}
	}
	globbed, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(globbed, func(i, j int) bool { return versionOf(globbed[i]) > versionOf(globbed[j]) })
	candidates = append(candidates, globbed...)
	for _, d := range candidates {
		if isExec(filepath.Join(d, "initdb")) && isExec(filepath.Join(d, "postgres")) {
			return d, nil
		}
	}
	return "", fmt.Errorf("%w on PATH or in /usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)", ErrNoServerBinaries)
}

func versionOf(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}
