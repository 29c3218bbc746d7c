// Command contention shows pglease doing its job: several worker processes
// contend for the same entities, one is killed with SIGKILL while it holds a
// lock, a survivor takes the lock over once the dead worker's lease runs out,
// and the DBA view shows who holds what. Every critical section is a fenced
// read-increment-write of a counter that also records its token; at the end
// each counter must equal the number of completed sections, and every
// section's token must be larger than the one before it. The last line is the
// verdict; the exit status is 1 when it says FAILED.
//
//	go run ./examples/contention [-schema NAME] [-ttl 3s] [-work 2s] [-keep]
//
// It uses DATABASE_URL when set: there it drops and re-creates the schema
// (pglease_example by default, saying so first) and drops it again at the
// end unless -keep is given. Otherwise it starts a throwaway PostgreSQL from
// the server binaries on the machine (as the postgres user when run as
// root). Ctrl-C stops the workers, drops what it created and exits 0.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/exampledb"
	"github.com/pglease/pglease/internal/ident"
	"github.com/pglease/pglease/lease"
)

const workers = 4

var entities = []string{"1", "2", "3"}

// settings are the flags; the workers get them on their command line.
type settings struct {
	schema string
	ttl    time.Duration
	work   time.Duration // how long the workers contend before the kill
	keep   bool
}

// sql holds the statements, with the schema quoted once.
type sql struct {
	schema, orders, sections, held string
}

func newSQL(schema string) sql {
	return sql{
		schema:   pgx.Identifier{schema}.Sanitize(),
		orders:   pgx.Identifier{schema, "orders"}.Sanitize(),
		sections: pgx.Identifier{schema, "sections"}.Sanitize(),
		held:     pgx.Identifier{schema, "held"}.Sanitize(),
	}
}

func main() {
	var s settings
	fs := flag.NewFlagSet("contention", flag.ExitOnError)
	fs.StringVar(&s.schema, "schema", "pglease_example", "schema to create, use and drop")
	fs.DurationVar(&s.ttl, "ttl", 3*time.Second, "lease TTL of the workers: how long a killed worker's lock stays")
	fs.DurationVar(&s.work, "work", 2*time.Second, "how long the workers contend before one is killed")
	fs.BoolVar(&s.keep, "keep", false, "leave the schema in place at the end, to look at it")
	_ = fs.Parse(os.Args[1:])
	if err := ident.ValidateSchema(s.schema); err != nil {
		fmt.Fprintln(os.Stderr, "contention: -schema:", err)
		os.Exit(2)
	}
	if fs.NArg() == 2 && fs.Arg(0) == "worker" {
		if err := worker(fs.Arg(1), s); err != nil {
			fmt.Fprintln(os.Stderr, "worker:", err)
			os.Exit(1)
		}
		return
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "contention: unexpected argument %q\n", fs.Arg(0))
		os.Exit(2)
	}

	// Ctrl-C reaches the whole process group: the workers and a throwaway
	// server stop by themselves; this process cleans up and says so.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, s)
	switch {
	case ctx.Err() != nil && !errors.Is(err, errCleanup):
		fmt.Println("\ninterrupted: workers stopped, what this run created is removed")
	case errors.Is(err, errFailed):
		os.Exit(1)
	case err != nil:
		fmt.Fprintln(os.Stderr, "contention:", err)
		os.Exit(1)
	}
}

var (
	// errFailed is returned after a FAILED verdict was printed.
	errFailed = errors.New("verdict: FAILED")
	// errCleanup is wrapped by the error of a failed clean-up.
	errCleanup = exampledb.ErrCleanup
)

func run(ctx context.Context, s settings) (err error) {
	q := newSQL(s.schema)
	// Bounds the whole demo; cleaning up gets a context of its own.
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute+s.work+3*s.ttl)
	defer cancel()
	db, err := exampledb.Open(ctx, s.schema, s.keep)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, db.Close()) }()
	pool, url := db.Pool, db.URL
	for _, stmt := range []string{
		"CREATE TABLE " + q.orders + " (id text PRIMARY KEY, n bigint NOT NULL DEFAULT 0, last_token bigint NOT NULL DEFAULT 0)",
		// One row per completed section: the token it wrote with and the
		// token the counter carried before it.
		"CREATE TABLE " + q.sections + " (id text NOT NULL, token bigint NOT NULL, prev_token bigint NOT NULL, worker text NOT NULL)",
	} {
		if _, err := pool.Exec(ctx, stmt); err != nil {
			return err
		}
	}
	for _, id := range entities {
		if _, err := pool.Exec(ctx, "INSERT INTO "+q.orders+" (id) VALUES ($1)", id); err != nil {
			return err
		}
	}

	self, err := os.Executable()
	if err != nil {
		return err
	}
	var procs []*exec.Cmd
	stopWorkers := func() {
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGTERM)
		}
		for _, p := range procs {
			_ = p.Wait()
		}
		procs = nil
	}
	defer stopWorkers()
	for i := range workers {
		cmd := exec.Command(self, "-schema", s.schema, "-ttl", s.ttl.String(), "worker", strconv.Itoa(i+1))
		cmd.Env = append(os.Environ(), "DATABASE_URL="+url)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Start(); err != nil {
			return err
		}
		procs = append(procs, cmd)
	}

	// Let them work, then kill whoever holds order 2 in the middle of its work.
	select {
	case <-time.After(s.work):
	case <-ctx.Done():
		return ctx.Err()
	}
	var victimPID int32
	var token int64
	for victimPID == 0 {
		err := pool.QueryRow(ctx, "SELECT pid, token FROM "+q.held+" WHERE name = 'order' AND entity_id = '2' AND alive").Scan(&victimPID, &token)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	killedAt := time.Now()
	if err := syscall.Kill(int(victimPID), syscall.SIGKILL); err != nil {
		return err
	}
	fmt.Printf("\n>>> killed pid %d with SIGKILL while it held order/2 (token %d); its lease runs out within %s\n\n", victimPID, token, s.ttl)
	printHeld(ctx, pool, q, "held locks right after the kill (the dead worker's row is still there, alive until its lease runs out):")

	var newToken int64
	for {
		var pid int32
		err := pool.QueryRow(ctx, "SELECT pid, token FROM "+q.held+" WHERE name = 'order' AND entity_id = '2' AND alive").Scan(&pid, &newToken)
		if err == nil && pid != victimPID {
			fmt.Printf("\n>>> pid %d took order/2 over %.1fs after the kill, with token %d > %d\n\n", pid, time.Since(killedAt).Seconds(), newToken, token)
			break
		}
		if ctx.Err() != nil {
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return errors.New("no survivor took order/2 over")
			}
			return ctx.Err()
		}
		time.Sleep(20 * time.Millisecond) // polling the DBA view, as a DBA would
	}
	printHeld(ctx, pool, q, "held locks after the takeover:")
	select {
	case <-time.After(time.Second):
	case <-ctx.Done():
		return ctx.Err()
	}
	stopWorkers()
	return verdict(ctx, pool, q, newToken > token)
}

// verdict checks the counters against the completed sections and the tokens
// against each other, prints one line saying so, and returns errFailed when
// something is wrong.
func verdict(ctx context.Context, pool *pgxpool.Pool, q sql, tookOver bool) error {
	fmt.Println("\ncounters (every increment was fenced; the killed worker's last one, if any, was rejected or committed before it died):")
	rows, err := pool.Query(ctx, `SELECT o.id, o.n, o.last_token,
	        (SELECT count(*) FROM `+q.sections+` s WHERE s.id = o.id),
	        (SELECT count(*) FROM `+q.sections+` s WHERE s.id = o.id AND s.token <= s.prev_token)
	   FROM `+q.orders+` o ORDER BY o.id`)
	if err != nil {
		return err
	}
	type order struct {
		id                       string
		n, last, done, regressed int64
	}
	orders, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (order, error) {
		var o order
		return o, r.Scan(&o.id, &o.n, &o.last, &o.done, &o.regressed)
	})
	if err != nil {
		return err
	}
	var n, done, regressed int64
	var problems []string
	for _, o := range orders {
		fmt.Printf("  order/%s: counter %d, %d completed sections, last token %d\n", o.id, o.n, o.done, o.last)
		n, done, regressed = n+o.n, done+o.done, regressed+o.regressed
		if o.n != o.done {
			problems = append(problems, fmt.Sprintf("order/%s counter %d ≠ %d completed sections", o.id, o.n, o.done))
		}
		if o.regressed > 0 {
			problems = append(problems, fmt.Sprintf("order/%s: %d sections wrote with a token not larger than the one before", o.id, o.regressed))
		}
	}
	if !tookOver {
		problems = append(problems, "the takeover of order/2 did not get a larger token")
	}
	if done == 0 {
		problems = append(problems, "no section completed")
	}
	if len(problems) > 0 {
		fmt.Println("verdict: FAILED — " + strings.Join(problems, "; "))
		return errFailed
	}
	fmt.Printf("verdict: ok — counters %d = %d completed sections; tokens increasing at every write and at the takeover\n", n, done)
	return nil
}

func printHeld(ctx context.Context, pool *pgxpool.Pool, q sql, title string) {
	fmt.Println(title)
	rows, err := pool.Query(ctx, `SELECT name || '/' || entity_id, token, coalesce(application, '?'), coalesce(pid, 0),
	                  to_char(age, 'SS.MS'), to_char(time_left, 'SS.MS'), alive
	             FROM `+q.held+` ORDER BY name, entity_id`)
	if err != nil {
		fmt.Println("  ", err)
		return
	}
	defer rows.Close()
	fmt.Printf("  %-10s %6s %-12s %7s %8s %9s %5s\n", "lock", "token", "application", "pid", "age s", "left s", "alive")
	for rows.Next() {
		var key, app, age, left string
		var token int64
		var pid int32
		var alive bool
		if err := rows.Scan(&key, &token, &app, &pid, &age, &left, &alive); err != nil {
			fmt.Println("  ", err)
			return
		}
		fmt.Printf("  %-10s %6d %-12s %7d %8s %9s %5v\n", key, token, app, pid, age, left, alive)
	}
	fmt.Println("  (alive = lease not yet run out; the reaper or a takeover removes it after)")
}

// worker acquires random orders, does a fenced increment, holds a moment and
// releases, until SIGTERM.
func worker(name string, s settings) error {
	q := newSQL(s.schema)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		return err
	}
	defer pool.Close()
	client, err := lease.New(pool, &lease.Config{
		Schema: s.schema,
		TTL:    s.ttl,
		Owner:  lease.Owner{Application: "worker-" + name},
	})
	if err != nil {
		return err
	}
	defer client.Close(context.Background())
	say := func(format string, args ...any) {
		fmt.Printf("worker %s (pid %d): %s\n", name, os.Getpid(), fmt.Sprintf(format, args...))
	}
	for ctx.Err() == nil {
		id := entities[rand.IntN(len(entities))]
		lock, err := client.Acquire(ctx, lease.Key{Name: "order", ID: id})
		if err != nil {
			if ctx.Err() == nil {
				say("acquire order/%s: %v", id, err)
			}
			continue
		}
		// The protected write: fenced, so it cannot land if the lock was lost,
		// however long this process was paused.
		err = pgx.BeginFunc(lock.Context(), pool, func(tx pgx.Tx) error {
			if err := lock.Fence(ctx, tx); err != nil {
				return err
			}
			var n, prev int64
			if err := tx.QueryRow(ctx, "SELECT n, last_token FROM "+q.orders+" WHERE id = $1", id).Scan(&n, &prev); err != nil {
				return err
			}
			time.Sleep(time.Duration(100+rand.IntN(300)) * time.Millisecond) // the work
			if _, err := tx.Exec(ctx, "UPDATE "+q.orders+" SET n = $2, last_token = $3 WHERE id = $1", id, n+1, lock.Token()); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "INSERT INTO "+q.sections+" (id, token, prev_token, worker) VALUES ($1, $2, $3, $4)",
				id, lock.Token(), prev, name)
			return err
		})
		switch {
		case err == nil:
			say("order/%s done with token %d", id, lock.Token())
		case errors.Is(err, lease.ErrLost):
			say("lost order/%s: %v", id, err)
		case ctx.Err() == nil:
			say("order/%s: %v", id, err)
		}
		_ = lock.Release(context.WithoutCancel(ctx))
	}
	return nil
}
