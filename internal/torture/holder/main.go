// Command holder is the torture suite's helper process: it contends for locks
// with lease.Client (exclusive, or of the kind -kind names: shared locks with
// readers and writers, semaphore permits, key sets), runs fenced critical
// sections on shared counters (writers write, readers read), and reports
// what it did and when, as JSON lines (torture.Event) on its standard
// output. It stops gracefully when its standard input is closed: it releases
// what it holds, closes its client and pool, checks that it leaked no
// goroutine and no connection, reports EvBye and exits 0.
//
// It is built and started by the tests of package torture; it is not a tool.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/pglease/pglease/internal/torture"
	"github.com/pglease/pglease/lease"
)

type config struct {
	url, schema, proc string
	keys              int
	ttl, poll         time.Duration
	work, workMin     time.Duration
	sections          int
	rawFence          float64
	seed              uint64
	mode              string // table, advisory or mixed
	check             time.Duration
	kind              string  // exclusive, shared, semaphore or set
	readers           float64 // share of shared requests (kinds shared and set)
	permits           int     // a semaphore's N (kind semaphore)
	// Sabotage, for checking that the oracles catch what they should.
	unfenced, ignoreLoss bool
	readerWrites         bool // a reader writes now and then, as if it held the key exclusively
	overPermits          bool // ask for twice the permits the holder reports
}

func main() {
	var cfg config
	flag.StringVar(&cfg.url, "url", "", "connection URL")
	flag.StringVar(&cfg.schema, "schema", "", "pglease schema; the counter tables are in the same schema")
	flag.StringVar(&cfg.proc, "proc", "", "this process's name in events and application_name")
	flag.IntVar(&cfg.keys, "keys", 2, "number of keys to contend for")
	flag.DurationVar(&cfg.ttl, "ttl", 1500*time.Millisecond, "lease TTL")
	flag.DurationVar(&cfg.poll, "poll", 300*time.Millisecond, "fallback poll interval of waiters")
	flag.DurationVar(&cfg.work, "work", 60*time.Millisecond, "most time a section waits between its read and its write")
	flag.DurationVar(&cfg.workMin, "workmin", 0, "least time a section waits between its read and its write")
	flag.IntVar(&cfg.sections, "sections", 2, "most sections per acquisition")
	flag.Float64Var(&cfg.rawFence, "rawfence", 0.5, "share of sections that fence with the SQL function directly instead of Lock.Fence")
	flag.Uint64Var(&cfg.seed, "seed", 1, "random seed")
	flag.StringVar(&cfg.mode, "mode", "table", "table, advisory, or mixed (each acquisition picks one)")
	flag.DurationVar(&cfg.check, "check", 300*time.Millisecond, "AdvisoryConfig.CheckInterval")
	flag.StringVar(&cfg.kind, "kind", "exclusive", "exclusive; shared (readers and writers); semaphore (permits); set (key sets of 2-4 keys, some members shared, and single keys)")
	flag.Float64Var(&cfg.readers, "readers", 0.6, "share of shared requests, of kinds shared and set")
	flag.IntVar(&cfg.permits, "permits", 2, "permits of each semaphore key (kind semaphore)")
	flag.BoolVar(&cfg.readerWrites, "sabotage-reader-writes", false, "readers increment the counter under their shared lock in every other section, at random (oracle A must catch it)")
	flag.BoolVar(&cfg.overPermits, "sabotage-over-permits", false, "ask for twice the permits reported (oracle B must catch it)")
	flag.BoolVar(&cfg.unfenced, "sabotage-unfenced", false, "write without any fence (oracle A must catch it)")
	flag.BoolVar(&cfg.ignoreLoss, "sabotage-ignore-loss", false, "keep believing after Done closes (oracle B must catch it)")
	flag.Parse()
	cfg.workMin = min(cfg.workMin, cfg.work)
	os.Exit(run(cfg))
}

type proc struct {
	cfg    config
	out    *torture.Writer
	rng    *rand.Rand
	pool   *pgxpool.Pool
	client *lease.Client
	adv    *lease.Advisory // nil in table mode
	seq    int
	sets   int
	fence  string // the SQL function, for raw fences
	// avoid: keys this process leaves alone for a while after an acquire of
	// it failed, as an application that moves on to other work would. An
	// orphan row left by a failed acquire is then not replaced by the next
	// acquire of the same process: the client must clean it up.
	avoid map[string]time.Time
}

func run(cfg config) int {
	out := torture.NewWriter(os.Stdout)
	out.Emit(torture.Event{Ev: torture.EvHello, Proc: cfg.proc, PID: os.Getpid()})
	level := slog.LevelWarn
	if os.Getenv("PGLEASE_TORTURE_DEBUG") != "" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	// Stop when the suite closes our standard input.
	stop, cancelStop := context.WithCancel(context.Background())
	stdinDone := make(chan struct{})
	go func() {
		defer close(stdinDone)
		_, _ = io.Copy(io.Discard, bufio.NewReader(os.Stdin))
		cancelStop()
	}()

	pcfg, err := pgxpool.ParseConfig(cfg.url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "holder:", err)
		return 2
	}
	pcfg.MaxConns = 4
	pcfg.ConnConfig.ConnectTimeout = time.Second
	pcfg.ConnConfig.RuntimeParams["application_name"] = "torture-" + cfg.proc
	ctx, cancel := context.WithTimeout(stop, 30*time.Second)
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "holder:", err)
		return 2
	}
	client, err := lease.New(pool, &lease.Config{
		Schema:       cfg.schema,
		TTL:          cfg.ttl,
		SafetyMargin: cfg.ttl / 4,
		PollInterval: cfg.poll,
		// Releases and clean-ups that cannot reach the server give up
		// quickly (and are retried, or expire with the holder).
		ReleaseTimeout: cfg.ttl / 10,
		Owner:          lease.Owner{Application: "torture-" + cfg.proc},
		Advisory:       lease.AdvisoryConfig{CheckInterval: cfg.check},
		Logger:         log.With("proc", cfg.proc),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "holder:", err)
		return 2
	}
	p := &proc{
		cfg: cfg, out: out, pool: pool, client: client,
		rng:   rand.New(rand.NewPCG(cfg.seed, uint64(os.Getpid()))),
		fence: "SELECT " + pgx.Identifier{cfg.schema, "fence"}.Sanitize() + "($1, $2, $3)",
		avoid: map[string]time.Time{},
	}
	switch cfg.kind {
	case "exclusive", "shared", "semaphore", "set":
	default:
		fmt.Fprintln(os.Stderr, "holder: unknown -kind", cfg.kind)
		return 2
	}
	if cfg.mode != "table" {
		p.adv = client.Advisory()
	}
	for stop.Err() == nil {
		p.round(stop)
	}

	var leaks []string
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	if err := client.Close(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "holder: close:", err)
	}
	cancel()
	// A connection whose query was interrupted is closed asynchronously by
	// pgxpool and counts as acquired until then: give it a moment.
	for i := 0; pool.Stat().AcquiredConns() != 0; i++ {
		if i == 50 {
			leaks = append(leaks, fmt.Sprintf("%d pool connections still acquired 5s after Close", pool.Stat().AcquiredConns()))
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	pool.Close()
	<-stdinDone
	if err := goleak.Find(); err != nil {
		leaks = append(leaks, err.Error())
	}
	out.Emit(torture.Event{Ev: torture.EvBye, Proc: cfg.proc, Leak: strings.Join(leaks, "; ")})
	return 0
}

// request is what one round asks for: one key, or a set of keys, each with
// its kind.
type request struct {
	keys  []string
	kinds []string // torture.Kind*, one per key
	set   bool     // through AcquireSet
	adv   bool     // on the advisory path
}

// grant is one lock a round holds.
type grant struct {
	l      *lease.Lock
	key    string // the lock's key (its ID)
	kind   string
	lostAt atomic.Int64 // when this process saw its Done close without a Release
}

// ckey is the counter the grant guards: its key's, or for a permit its
// slot's (permits of one slot exclude each other as exclusive locks do).
func (g *grant) ckey() string {
	if g.kind == torture.KindPermit {
		return fmt.Sprintf("%s/%d", g.key, g.l.Slot())
	}
	return g.key
}

// pick chooses the next round's request, as -kind says.
func (p *proc) pick() request {
	key := fmt.Sprintf("k%d", p.rng.IntN(p.cfg.keys))
	for i := 0; i < 10 && time.Now().Before(p.avoid[key]); i++ {
		key = fmt.Sprintf("k%d", p.rng.IntN(p.cfg.keys))
	}
	shared := func() string {
		if p.rng.Float64() < p.cfg.readers {
			return torture.KindShared
		}
		return torture.KindExclusive
	}
	adv := p.cfg.mode == "advisory" || (p.cfg.mode == "mixed" && p.rng.IntN(2) == 0)
	switch p.cfg.kind {
	case "shared":
		return request{keys: []string{key}, kinds: []string{shared()}, adv: adv}
	case "semaphore":
		return request{keys: []string{key}, kinds: []string{torture.KindPermit}}
	case "set":
		if p.cfg.keys < 2 || p.rng.IntN(4) == 0 {
			return request{keys: []string{key}, kinds: []string{shared()}} // a single key among the sets
		}
		// 2 to 4 keys, in random order (the library sorts them), some
		// shared.
		n := 2 + p.rng.IntN(min(4, p.cfg.keys)-1)
		r := request{set: true}
		for _, i := range p.rng.Perm(p.cfg.keys)[:n] {
			r.keys = append(r.keys, fmt.Sprintf("k%d", i))
			r.kinds = append(r.kinds, shared())
		}
		return r
	}
	return request{keys: []string{key}, kinds: []string{torture.KindExclusive}, adv: adv}
}

// acquire acquires what r asks for. The grants are in the order of r.keys.
func (p *proc) acquire(ctx context.Context, r request) ([]*grant, *lease.LockSet, error) {
	if r.set {
		members := make([]lease.SetMember, len(r.keys))
		for i, k := range r.keys {
			members[i] = lease.SetMember{Key: lease.Key{Name: "torture", ID: k}, Shared: r.kinds[i] == torture.KindShared}
		}
		s, err := p.client.AcquireSet(ctx, members)
		if err != nil {
			return nil, nil, err
		}
		var gs []*grant
		for i, l := range s.Locks() {
			gs = append(gs, &grant{l: l, key: r.keys[i], kind: r.kinds[i]})
		}
		return gs, s, nil
	}
	key := lease.Key{Name: "torture", ID: r.keys[0]}
	var l *lease.Lock
	var err error
	switch {
	case r.kinds[0] == torture.KindPermit:
		permits := p.cfg.permits
		if p.cfg.overPermits {
			permits *= 2
		}
		var sem *lease.Semaphore
		if sem, err = p.client.Semaphore(key, permits); err == nil {
			l, err = sem.Acquire(ctx)
		}
	case r.kinds[0] == torture.KindShared && r.adv:
		l, err = p.adv.AcquireShared(ctx, key)
	case r.kinds[0] == torture.KindShared:
		l, err = p.client.AcquireShared(ctx, key)
	case r.adv:
		l, err = p.adv.Acquire(ctx, key)
	default:
		l, err = p.client.Acquire(ctx, key)
	}
	if err != nil {
		return nil, nil, err
	}
	return []*grant{{l: l, key: r.keys[0], kind: r.kinds[0]}}, nil, nil
}

// round acquires one random key (or set of keys), runs one or more sections,
// and releases it.
func (p *proc) round(stop context.Context) {
	r := p.pick()
	ctx, cancel := context.WithTimeout(stop, 10*p.cfg.ttl)
	ev := torture.Event{Ev: torture.EvAcquiring, Proc: p.cfg.proc, T: torture.Now(), Adv: r.adv}
	if r.set {
		ev.Keys = r.keys
	} else {
		ev.Key, ev.Kind = r.keys[0], r.kinds[0]
	}
	p.out.Emit(ev)
	gs, set, err := p.acquire(ctx, r)
	cancel()
	if err != nil {
		p.out.Emit(torture.Event{Ev: torture.EvAcquireError, Proc: p.cfg.proc, Key: strings.Join(r.keys, ","), T: torture.Now(), Err: err.Error()})
		for _, k := range r.keys {
			p.avoid[k] = time.Now().Add(3 * p.cfg.ttl)
		}
		if stop.Err() == nil {
			time.Sleep(time.Duration(5+p.rng.IntN(20)) * time.Millisecond)
		}
		return
	}
	start := torture.Now()
	setID := ""
	if set != nil {
		p.sets++
		setID = fmt.Sprintf("%s-s%d", p.cfg.proc, p.sets)
	}
	for _, g := range gs {
		ev := torture.Event{Ev: torture.EvAcquired, Proc: p.cfg.proc, Key: g.key, Token: g.l.Token(), T: start,
			Adv: r.adv, Kind: g.kind, Set: setID}
		if !r.adv { // an advisory lock's AcquiredAt is the client's clock, not the database's
			ev.At = g.l.AcquiredAt().UnixMicro()
		}
		if g.kind == torture.KindPermit {
			ev.Slot, ev.Permits = g.l.Slot(), p.cfg.permits
		}
		p.out.Emit(ev)
	}

	// Watch for loss: each grant's interval ends when this process sees its
	// Done close.
	releasing := make(chan struct{})
	var watched sync.WaitGroup
	for _, g := range gs {
		watched.Go(func() {
			select {
			case <-g.l.Done():
			case <-releasing:
				return
			}
			if errors.Is(context.Cause(g.l.Context()), lease.ErrReleased) {
				return
			}
			t := torture.Now()
			g.lostAt.Store(t)
			p.out.Emit(torture.Event{Ev: torture.EvLost, Proc: p.cfg.proc, Key: g.key, Token: g.l.Token(), T: t,
				Err: context.Cause(g.l.Context()).Error(), Reason: lossReason(g.l)})
		})
	}

	n := 1 + p.rng.IntN(p.cfg.sections)
	for i := 0; i < n && (held(gs) || p.cfg.ignoreLoss); i++ {
		p.section(gs)
	}

	// The belief ends here, before Release: a process killed during Release
	// has already said so.
	end := torture.Now()
	for _, g := range gs {
		e := end
		if t := g.lostAt.Load(); t != 0 && t < end && !p.cfg.ignoreLoss {
			e = t
		}
		p.out.Emit(torture.Event{Ev: torture.EvEnd, Proc: p.cfg.proc, Key: g.key, Token: g.l.Token(), T: e})
	}
	close(releasing)
	if set != nil {
		_ = set.Release(context.Background()) // each lock's own result below
	}
	for _, g := range gs {
		rel := torture.Event{Ev: torture.EvReleased, Proc: p.cfg.proc, Key: g.key, Token: g.l.Token(), Release: torture.ReleaseOK}
		if err := g.l.Release(context.Background()); err != nil {
			rel.Release, rel.Err = torture.ReleaseError, err.Error()
			if errors.Is(err, lease.ErrLost) {
				rel.Release, rel.Reason = torture.ReleaseLost, lossReason(g.l)
			}
		}
		p.out.Emit(rel)
	}
	watched.Wait()
}

// held reports whether every grant is still held, as far as the client knows.
func held(gs []*grant) bool {
	for _, g := range gs {
		if g.l.Err() != nil {
			return false
		}
	}
	return true
}

// section runs one critical section with every grant of the round: a writer
// (exclusive, or a permit on its slot's counter) reads its counter, waits,
// and writes counter+1 in a fenced transaction that also logs the write; a
// reader (shared) waits and then reads its counter in a transaction fenced
// with its shared lock, logging what it read and with which token. A set's
// members do all of that in one transaction fenced by every member. It goes
// on after a lock was lost on purpose: the fence, not the client's
// knowledge, must stop a stale write or read.
func (p *proc) section(gs []*grant) {
	p.seq++
	id := fmt.Sprintf("%s-%d", p.cfg.proc, p.seq)
	raw := p.rng.Float64() < p.cfg.rawFence
	ctx, cancel := context.WithTimeout(context.Background(), 4*p.cfg.ttl)
	defer cancel()
	secs := make([]torture.Event, len(gs))
	ns := make([]int64, len(gs))
	for i, g := range gs {
		// A shared lock's section reads, unless the holder is sabotaged
		// into writing with it now and then.
		read := g.kind == torture.KindShared && !(p.cfg.readerWrites && p.rng.IntN(2) == 0)
		secs[i] = torture.Event{Ev: torture.EvSection, Proc: p.cfg.proc, Key: g.key, Token: g.l.Token(), Section: id, Raw: raw,
			Read: read}
		if len(gs) > 1 {
			secs[i].Section = id + "@" + g.key
		}
	}
	emit := func(out, err string) {
		t := torture.Now()
		for _, e := range secs {
			e.Outcome, e.Err, e.T = out, err, t
			p.out.Emit(e)
		}
	}
	for i, g := range gs {
		if secs[i].Read {
			continue
		}
		if err := p.pool.QueryRow(ctx, `SELECT n FROM `+p.table("counter")+` WHERE key = $1`, g.ckey()).Scan(&ns[i]); err != nil {
			emit(torture.OutcomeFailed, err.Error())
			return
		}
	}
	for i, g := range gs {
		p.out.Emit(torture.Event{Ev: torture.EvRead, Proc: p.cfg.proc, Key: g.key, Token: g.l.Token(), Section: secs[i].Section,
			N: ns[i], T: torture.Now()})
	}
	time.Sleep(p.cfg.workMin + time.Duration(p.rng.Int64N(int64(p.cfg.work-p.cfg.workMin)+1)))

	emit(p.write(ctx, gs, secs, ns, raw))
}

// work is a section's transaction: each grant's write or read.
func (p *proc) work(ctx context.Context, tx pgx.Tx, gs []*grant, secs []torture.Event, ns []int64) (string, error) {
	for i, g := range gs {
		var err error
		if secs[i].Read {
			err = p.logRead(ctx, tx, g, secs[i].Section)
		} else {
			err = p.update(ctx, tx, g, secs[i].Section, ns[i])
		}
		if err != nil {
			return torture.OutcomeFailed, err
		}
	}
	return "", nil
}

func (p *proc) write(ctx context.Context, gs []*grant, secs []torture.Event, ns []int64, raw bool) (string, string) {
	if len(gs) == 1 && gs[0].l.Advisory() {
		// Fenced by construction: on the lock's own pinned connection. Any
		// error may have come after COMMIT was sent; the log table tells.
		err := gs[0].l.BeginTxFunc(ctx, pgx.TxOptions{}, func(tx pgx.Tx) error {
			_, err := p.work(ctx, tx, gs, secs, ns)
			return err
		})
		if err != nil {
			return torture.OutcomeUnknown, err.Error()
		}
		return torture.OutcomeOK, ""
	}
	tx, err := p.pool.Begin(ctx)
	if err != nil {
		return torture.OutcomeFailed, err.Error()
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	for _, g := range gs {
		switch {
		case p.cfg.unfenced:
		case raw:
			_, err = tx.Exec(ctx, p.fence, "torture", g.key, g.l.Token())
		default:
			err = g.l.Fence(ctx, tx)
		}
		if err != nil {
			break
		}
	}
	if err != nil {
		var pgErr *pgconn.PgError
		switch {
		case errors.As(err, &pgErr) && pgErr.Code == lease.SQLStateNotHeld:
			return torture.OutcomeFenced, err.Error()
		case errors.Is(err, lease.ErrLost):
			return torture.OutcomeLost, err.Error()
		}
		return torture.OutcomeFailed, err.Error()
	}
	if out, err := p.work(ctx, tx, gs, secs, ns); err != nil {
		return out, err.Error()
	}
	if err := tx.Commit(ctx); err != nil {
		return torture.OutcomeUnknown, err.Error()
	}
	return torture.OutcomeOK, ""
}

// logRead reads g's counter in tx and logs the value with g's token.
func (p *proc) logRead(ctx context.Context, tx pgx.Tx, g *grant, section string) error {
	_, err := tx.Exec(ctx, `INSERT INTO `+p.table("reads")+` (section, key, token, n, proc)
		SELECT $1, key, $3, n, $4 FROM `+p.table("counter")+` WHERE key = $2`, section, g.ckey(), g.l.Token(), p.cfg.proc)
	return err
}

// update writes counter n+1 for g's counter and logs the write, in tx.
func (p *proc) update(ctx context.Context, tx pgx.Tx, g *grant, section string, n int64) error {
	key := g.ckey()
	var prev int64
	if err := tx.QueryRow(ctx, `SELECT last_token FROM `+p.table("counter")+` WHERE key = $1`, key).Scan(&prev); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `UPDATE `+p.table("counter")+` SET n = $2, last_token = $3 WHERE key = $1`,
		key, n+1, g.l.Token()); err != nil {
		return err
	}
	_, err := tx.Exec(ctx, `INSERT INTO `+p.table("log")+` (section, key, token, n, prev_token, proc)
		VALUES ($1, $2, $3, $4, $5, $6)`, section, key, g.l.Token(), n+1, prev, p.cfg.proc)
	return err
}

func (p *proc) table(name string) string {
	return pgx.Identifier{p.cfg.schema, "torture_" + name}.Sanitize()
}

// lossReason is why the client says l was lost: its *LostError's reason, or
// the cause itself when the lock ended otherwise (its client closed).
func lossReason(l *lease.Lock) string {
	cause := context.Cause(l.Context())
	if le, ok := errors.AsType[*lease.LostError](cause); ok {
		return le.Reason.String()
	}
	return cause.Error()
}
