// Command scanner shows leader election with pglease: "one scan process at a
// time" for a service. Several scanner processes campaign on one election;
// the leader scans (a fenced write per round), the others wait. The demo
// pauses the leader (SIGSTOP) until a successor leads, lets it go on (its
// next fenced write is rejected and it learns it lost), then kills the
// leader of the moment (SIGKILL): exactly one new leader follows once the
// dead one's lease runs out. An observer that never campaigns prints each
// leader. The last line is the verdict; the exit status is 1 when it says
// FAILED.
//
//	go run ./examples/scanner [-schema NAME] [-ttl 2s] [-scanners 3] [-keep]
//
// It uses DATABASE_URL when set: there it drops and re-creates the schema
// (pglease_scanner by default, saying so first) and drops it again at the
// end unless -keep is given. Otherwise it starts a throwaway PostgreSQL from
// the server binaries on the machine (as the postgres user when run as root).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/exampledb"
	"github.com/pglease/pglease/internal/ident"
	"github.com/pglease/pglease/lease"
)

// election is the key every scanner campaigns on.
var election = lease.Key{Name: "scanner", ID: "service-scanning"}

type settings struct {
	schema   string
	ttl      time.Duration
	scanners int
	keep     bool
}

var errFailed = errors.New("verdict: FAILED")

func main() {
	var s settings
	fs := flag.NewFlagSet("scanner", flag.ExitOnError)
	fs.StringVar(&s.schema, "schema", "pglease_scanner", "schema of the pglease tables and the demo's scans table")
	fs.DurationVar(&s.ttl, "ttl", 2*time.Second, "lease TTL of the scanners: how long a dead leader keeps leading")
	fs.IntVar(&s.scanners, "scanners", 3, "how many scanner processes campaign (2 or more)")
	fs.BoolVar(&s.keep, "keep", false, "with DATABASE_URL: leave the schema in place at the end")
	_ = fs.Parse(os.Args[1:])
	if err := ident.ValidateSchema(s.schema); err != nil {
		fmt.Fprintln(os.Stderr, "scanner:", err)
		os.Exit(2)
	}
	if s.scanners < 2 {
		fmt.Fprintln(os.Stderr, "scanner: -scanners must be 2 or more: one leads, another takes over")
		os.Exit(2)
	}
	if fs.NArg() == 2 && fs.Arg(0) == "campaign" {
		if err := scanner(fs.Arg(1), s); err != nil {
			fmt.Fprintln(os.Stderr, "scanner:", err)
			os.Exit(1)
		}
		return
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "scanner: unexpected argument %q\n", fs.Arg(0))
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, s)
	switch {
	case ctx.Err() != nil && !errors.Is(err, exampledb.ErrCleanup):
		fmt.Println("\ninterrupted: scanners stopped, what this run created is removed")
	case errors.Is(err, errFailed):
		os.Exit(1)
	case err != nil:
		fmt.Fprintln(os.Stderr, "scanner:", err)
		os.Exit(1)
	}
}

func scansTable(schema string) string { return pgx.Identifier{schema, "scans"}.Sanitize() }

// scanner campaigns, scans while it leads (one fenced write every 50 ms),
// and campaigns again when leadership ends. SIGTERM ends it.
func scanner(name string, s settings) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
	if err != nil {
		return err
	}
	defer pool.Close()
	c, err := lease.New(pool, &lease.Config{Schema: s.schema, TTL: s.ttl, Replication: lease.ReplicationIgnore,
		Owner: lease.Owner{Application: "scanner-" + name}})
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	el, err := c.Election(election)
	if err != nil {
		return err
	}
	say := func(format string, args ...any) {
		fmt.Printf("scanner %s (pid %d): %s\n", name, os.Getpid(), fmt.Sprintf(format, args...))
	}
	for ctx.Err() == nil {
		l, err := el.Campaign(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		say("leading, token %d", l.Token())
		for lead := true; lead; {
			err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				if err := l.Fence(ctx, tx); err != nil {
					return err
				}
				_, err := tx.Exec(ctx, "INSERT INTO "+scansTable(s.schema)+" (token, scanner) VALUES ($1, $2)", l.Token(), name)
				return err
			})
			switch {
			case errors.Is(err, lease.ErrLost):
				say("fenced write rejected: no longer the leader (%v)", context.Cause(l.Context()))
				lead = false
			case err != nil && ctx.Err() != nil:
				_ = l.Release(context.Background())
				return nil
			case err != nil:
				return err
			}
			select {
			case <-time.After(50 * time.Millisecond):
			case <-l.Done():
				if lead {
					say("leadership ended: %v", context.Cause(l.Context()))
				}
				lead = false
			case <-ctx.Done():
				_ = l.Release(context.Background())
				return nil
			}
		}
	}
	return nil
}

func run(ctx context.Context, s settings) (err error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute+4*s.ttl)
	defer cancel()
	db, err := exampledb.Open(ctx, s.schema, s.keep)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, db.Close()) }()
	if _, err := db.Pool.Exec(ctx, "CREATE TABLE "+scansTable(s.schema)+
		" (seq bigint GENERATED ALWAYS AS IDENTITY, token bigint NOT NULL, scanner text NOT NULL)"); err != nil {
		return err
	}

	// The observer: a client that never campaigns.
	obs, err := lease.New(db.Pool, &lease.Config{Schema: s.schema, TTL: s.ttl, Replication: lease.ReplicationIgnore})
	if err != nil {
		return err
	}
	defer obs.Close(context.Background())
	el, err := obs.Election(election)
	if err != nil {
		return err
	}
	octx, ocancel := context.WithCancel(ctx)
	defer ocancel()
	leaders := el.Observe(octx)

	self, err := os.Executable()
	if err != nil {
		return err
	}
	procs := map[int]*exec.Cmd{}
	defer func() {
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGCONT)
			_ = p.Process.Signal(syscall.SIGTERM)
		}
		for _, p := range procs {
			_ = p.Wait()
		}
	}()
	for i := range s.scanners {
		cmd := exec.Command(self, "-schema", s.schema, "-ttl", s.ttl.String(), "-scanners", strconv.Itoa(s.scanners),
			"campaign", strconv.Itoa(i+1))
		cmd.Env = append(os.Environ(), "DATABASE_URL="+db.URL)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Start(); err != nil {
			return err
		}
		procs[cmd.Process.Pid] = cmd
	}

	// next waits for the observer to report a leader other than the one
	// with token after (0: anyone), and prints it.
	var changes int
	next := func(after int64) (lease.Leader, error) {
		for {
			select {
			case l, ok := <-leaders:
				if !ok {
					return lease.Leader{}, ctx.Err()
				}
				if l.Token == 0 {
					fmt.Println("observer: nobody leads")
					continue
				}
				changes++
				fmt.Printf("observer: %s (pid %d) leads since %s with token %d\n",
					l.Application, l.PID, l.Since.Format("15:04:05.000"), l.Token)
				if l.Token > after {
					return l, nil
				}
			case <-ctx.Done():
				return lease.Leader{}, ctx.Err()
			}
		}
	}
	first, err := next(0)
	if err != nil {
		return err
	}
	if err := sleep(ctx, s.ttl/2); err != nil {
		return err
	}

	// Pause the leader until a successor leads, then let it go on.
	if err := syscall.Kill(int(first.PID), syscall.SIGSTOP); err != nil {
		return err
	}
	pausedAt := time.Now()
	fmt.Printf("\n>>> paused the leader, pid %d (token %d), with SIGSTOP\n\n", first.PID, first.Token)
	second, err := next(first.Token)
	if err != nil {
		return err
	}
	fmt.Printf("\n>>> pid %d leads %.1fs after the pause; resuming pid %d, whose next fenced write must be rejected\n\n",
		second.PID, time.Since(pausedAt).Seconds(), first.PID)
	if err := syscall.Kill(int(first.PID), syscall.SIGCONT); err != nil {
		return err
	}
	if err := sleep(ctx, s.ttl/2); err != nil {
		return err
	}

	// Kill the leader of the moment.
	if err := syscall.Kill(int(second.PID), syscall.SIGKILL); err != nil {
		return err
	}
	killedAt := time.Now()
	if p := procs[int(second.PID)]; p != nil {
		_ = p.Wait()
		delete(procs, int(second.PID))
	}
	fmt.Printf("\n>>> killed the leader, pid %d (token %d), with SIGKILL; its lease runs out within %s\n\n", second.PID, second.Token, s.ttl)
	third, err := next(second.Token)
	if err != nil {
		return err
	}
	took := time.Since(killedAt)
	fmt.Printf("\n>>> pid %d leads %.1fs after the kill, with token %d\n\n", third.PID, took.Seconds(), third.Token)
	if err := sleep(ctx, s.ttl/2); err != nil {
		return err
	}
	return verdict(ctx, db.Pool, s, first, second, third, took)
}

// verdict checks the scans: written in token order (no write of an earlier
// leader after a later one began), none of the paused leader's after its
// successor's first, and the kill followed by one new leader.
func verdict(ctx context.Context, pool *pgxpool.Pool, s settings, first, second, third lease.Leader, took time.Duration) error {
	var outOfOrder, lateWrites, leadersSeen int
	err := pool.QueryRow(ctx, `SELECT
		    count(*) FILTER (WHERE token < prev),
		    count(*) FILTER (WHERE token = $1 AND seq > (SELECT min(seq) FROM `+scansTable(s.schema)+` WHERE token = $2)),
		    count(DISTINCT token)
		  FROM (SELECT seq, token, max(token) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev
		          FROM `+scansTable(s.schema)+`) w`, first.Token, second.Token).Scan(&outOfOrder, &lateWrites, &leadersSeen)
	if err != nil {
		return err
	}
	ok := outOfOrder == 0 && lateWrites == 0 && third.PID != second.PID && third.Token > second.Token &&
		second.Token > first.Token && took < 3*s.ttl
	if ok {
		fmt.Printf("verdict: ok — %d leaders wrote, every scan in token order; the paused leader wrote nothing after its successor began; one new leader %.1fs after the kill\n",
			leadersSeen, took.Seconds())
		return nil
	}
	fmt.Printf("verdict: FAILED — %d scans out of token order, %d late writes of the paused leader, new leader pid %d token %d after pid %d token %d in %.1fs\n",
		outOfOrder, lateWrites, third.PID, third.Token, second.PID, second.Token, took.Seconds())
	return errFailed
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-time.After(d):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
