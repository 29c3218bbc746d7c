// Command contention shows pglease doing its job: several worker processes
// contend for the same entities, one is killed with SIGKILL while it holds a
// lock, a survivor takes the lock over once the dead worker's lease runs out,
// and the DBA view shows who holds what. Every critical section is a fenced
// read-increment-write of a counter; at the end the counters must equal the
// number of completed sections.
//
//	go run ./examples/contention
//
// It uses DATABASE_URL when set, else starts a throwaway PostgreSQL from the
// server binaries on the machine (as the postgres user when run as root).
package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
	"github.com/pglease/pglease/migrations"
)

const (
	schema  = "pglease_example"
	workers = 4
	ttl     = 3 * time.Second
)

var entities = []string{"1", "2", "3"}

func main() {
	if len(os.Args) == 3 && os.Args[1] == "worker" {
		if err := worker(os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, "worker:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "contention:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	url := os.Getenv("DATABASE_URL")
	if url == "" {
		fmt.Println("DATABASE_URL is not set: starting a throwaway PostgreSQL")
		cl, err := pgtest.Start(pgtest.Options{})
		if err != nil {
			return err
		}
		defer cl.Stop()
		url = cl.URL()
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+schema+" CASCADE"); err != nil {
		return err
	}
	if _, err := migrations.Up(ctx, pool, schema); err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, "CREATE TABLE "+schema+".orders (id text PRIMARY KEY, n bigint NOT NULL DEFAULT 0, last_token bigint NOT NULL DEFAULT 0)"); err != nil {
		return err
	}
	for _, id := range entities {
		if _, err := pool.Exec(ctx, "INSERT INTO "+schema+".orders (id) VALUES ($1)", id); err != nil {
			return err
		}
	}

	self, err := os.Executable()
	if err != nil {
		return err
	}
	procs := make([]*exec.Cmd, workers)
	for i := range procs {
		cmd := exec.Command(self, "worker", strconv.Itoa(i+1))
		cmd.Env = append(os.Environ(), "DATABASE_URL="+url)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Start(); err != nil {
			return err
		}
		procs[i] = cmd
	}
	defer func() {
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGTERM)
		}
		for _, p := range procs {
			_ = p.Wait()
		}
	}()

	// Let them work, then kill whoever holds order 2 in the middle of its work.
	time.Sleep(2 * time.Second)
	var victimPID int32
	var token int64
	for victimPID == 0 {
		err := pool.QueryRow(ctx, "SELECT pid, token FROM "+schema+".held WHERE name = 'order' AND entity_id = '2' AND alive").Scan(&victimPID, &token)
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
	fmt.Printf("\n>>> killed pid %d with SIGKILL while it held order/2 (token %d); its lease runs out within %s\n\n", victimPID, token, ttl)
	printHeld(ctx, pool, "held locks right after the kill (the dead worker's row is still there):")

	for {
		var newToken int64
		var pid int32
		err := pool.QueryRow(ctx, "SELECT pid, token FROM "+schema+".held WHERE name = 'order' AND entity_id = '2' AND alive").Scan(&pid, &newToken)
		if err == nil && pid != victimPID {
			fmt.Printf("\n>>> pid %d took order/2 over %.1fs after the kill, with token %d > %d\n\n", pid, time.Since(killedAt).Seconds(), newToken, token)
			break
		}
		if ctx.Err() != nil {
			return errors.New("no survivor took order/2 over")
		}
		time.Sleep(20 * time.Millisecond)
	}
	printHeld(ctx, pool, "held locks after the takeover:")
	time.Sleep(time.Second)
	for _, p := range procs {
		_ = p.Process.Signal(syscall.SIGTERM)
	}
	for _, p := range procs {
		_ = p.Wait()
	}

	fmt.Println("\ncounters (every increment was fenced; the killed worker's last one, if any, was rejected or committed before it died):")
	rows, err := pool.Query(ctx, "SELECT id, n, last_token FROM "+schema+".orders ORDER BY id")
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var n, last int64
		if err := rows.Scan(&id, &n, &last); err != nil {
			return err
		}
		fmt.Printf("  order/%s: %d increments, last token %d\n", id, n, last)
	}
	return rows.Err()
}

func printHeld(ctx context.Context, pool *pgxpool.Pool, title string) {
	fmt.Println(title)
	const q = `SELECT name || '/' || entity_id, token, coalesce(application, '?'), coalesce(pid, 0),
	                  to_char(age, 'SS.MS'), to_char(time_left, 'SS.MS'), alive
	             FROM ` + schema + `.held ORDER BY name, entity_id`
	rows, err := pool.Query(ctx, q)
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
}

// worker acquires random orders, does a fenced increment, holds a moment and
// releases, until SIGTERM.
func worker(name string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		return err
	}
	defer pool.Close()
	client, err := lease.New(pool, &lease.Config{
		Schema: schema,
		TTL:    ttl,
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
			var n int64
			if err := tx.QueryRow(ctx, "SELECT n FROM "+schema+".orders WHERE id = $1", id).Scan(&n); err != nil {
				return err
			}
			time.Sleep(time.Duration(100+rand.IntN(300)) * time.Millisecond) // the work
			_, err := tx.Exec(ctx, "UPDATE "+schema+".orders SET n = $2, last_token = $3 WHERE id = $1", id, n+1, lock.Token())
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
