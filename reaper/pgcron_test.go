package reaper_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pglease/pglease/internal/pgtest"
)

// The README's pg_cron recipe, run by a real pg_cron: a job that CALLs the
// schema's procedure reap deletes the dead holders and their lock rows on its
// own, leaves every live row as it was, and pg_cron records the runs as
// succeeded: with pg_cron's default of running jobs over a libpq connection,
// and with cron.use_background_workers. pg_cron before 1.5 schedules by the
// minute, so the test can take a minute or more.
func TestPgCronReaps(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"libpq", "background workers"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			pgCronReaps(t, mode == "background workers")
		})
	}
}

func pgCronReaps(t *testing.T, backgroundWorkers bool) {
	c := startWithPgCron(t, backgroundWorkers)
	ctx := ctxFor(t, 4*time.Minute)
	f := &fx{DB: pgtest.NewDBOn(t, c), t: t}
	f.holders, f.locks = f.Qualified("holders"), f.Qualified("locks")

	dead := f.addHolders(ctx, 30, false)
	f.addLocks(ctx, dead, 40)
	f.addLocks(ctx, []int64{1 << 43}, 5) // a holder row that never existed
	live := f.addHolders(ctx, 3, true)
	f.addLocks(ctx, live, 7)
	liveSum := `SELECT count(*) * 1000000007 + coalesce(sum(token), 0) FROM ` + f.locks + ` WHERE holder_id = ANY ($1)`
	before := f.count(ctx, liveSum, live)

	if _, err := f.Pool.Exec(ctx, `CREATE EXTENSION IF NOT EXISTS pg_cron`); err != nil {
		t.Fatal(err)
	}
	var version string
	if err := f.Pool.QueryRow(ctx, `SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'`).Scan(&version); err != nil {
		t.Fatal(err)
	}
	schedule := "* * * * *" // every minute: what pg_cron 1.4 (Debian 12) offers at most
	if secondsSupported(version) {
		schedule = "1 seconds"
	}
	command := `CALL ` + f.fn("reap") + `()`
	var job int64
	if err := f.Pool.QueryRow(ctx, `SELECT cron.schedule($1, $2, $3)`, "pglease-reap-"+f.Schema, schedule, command).Scan(&job); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = f.Pool.Exec(context.Background(), `SELECT cron.unschedule($1)`, job) })
	t.Logf("pg_cron %s: job %d, schedule %q, command %s", version, job, schedule, command)

	// Until the job has run, succeeded, and the dead rows are gone.
	deadRows := `SELECT (SELECT count(*) FROM ` + f.holders + ` WHERE expires_at <= clock_timestamp()) +
		(SELECT count(*) FROM ` + f.locks + ` l WHERE NOT EXISTS
			(SELECT 1 FROM ` + f.holders + ` h WHERE h.id = l.holder_id AND h.expires_at > clock_timestamp()))`
	runs := `SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),
		coalesce(string_agg(DISTINCT status || ': ' || coalesce(return_message, ''), '; '), '')
		FROM cron.job_run_details WHERE jobid = $1`
	deadline := time.Now().Add(150 * time.Second)
	for {
		var ok, failed int
		var messages string
		if err := f.Pool.QueryRow(ctx, runs, job).Scan(&ok, &failed, &messages); err != nil {
			t.Fatal(err)
		}
		if failed > 0 {
			t.Fatalf("pg_cron job failed: %s", messages)
		}
		left := f.count(ctx, deadRows)
		if ok > 0 && left == 0 {
			t.Logf("pg_cron runs: %s", messages)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 150s: %d dead rows left, %d runs succeeded (%s)", left, ok, messages)
		}
		time.Sleep(200 * time.Millisecond) // polling pg_cron's progress, with the deadline above
	}
	if h := f.count(ctx, `SELECT count(*) FROM `+f.holders); h != int64(len(live)) {
		t.Fatalf("%d holder rows left, want the %d live ones", h, len(live))
	}
	if after := f.count(ctx, liveSum, live); after != before || f.count(ctx, `SELECT count(*) FROM `+f.locks) != int64(7*len(live)) {
		t.Fatalf("live lock rows changed: checksum %d before, %d after", before, after)
	}
}

// startWithPgCron starts a cluster of this test's own with pg_cron loaded,
// as the README's recipe configures it, running jobs in background workers
// when asked. Without pg_cron installed the test
// is skipped with a one-line reason, or fails under CI=true.
func startWithPgCron(t *testing.T, backgroundWorkers bool) *pgtest.Cluster {
	t.Helper()
	settings := map[string]string{
		"shared_preload_libraries": "pg_cron",
		"cron.database_name":       "postgres",
		// pg_cron runs each job over a libpq connection to this host; the
		// throwaway cluster listens on 127.0.0.1 only and trusts it.
		"cron.host": "127.0.0.1",
	}
	if backgroundWorkers {
		settings["cron.use_background_workers"] = "on"
		settings["max_worker_processes"] = "16"
	}
	c, err := pgtest.Start(pgtest.Options{NoFsync: true, Settings: settings})
	var missing string
	switch {
	case errors.Is(err, pgtest.ErrNoServerBinaries):
		missing = err.Error()
	case err != nil && strings.Contains(err.Error(), `could not access file "pg_cron"`):
		missing = "pg_cron is not installed (Debian: apt-get install postgresql-15-cron)"
	case err != nil:
		t.Fatal(err)
	}
	if missing != "" {
		if ci, _ := strconv.ParseBool(os.Getenv(pgtest.EnvCI)); ci {
			t.Fatalf("%s (%s=true: .ci/run installs it, so a missing one fails the run)", missing, pgtest.EnvCI)
		}
		t.Skip(missing)
	}
	t.Cleanup(c.Stop)
	return c
}

// secondsSupported reports whether pg_cron version v (extversion, such as
// "1.4-1" or "1.6") takes interval schedules in seconds, which came in 1.5.
func secondsSupported(v string) bool {
	var major, minor int
	if _, err := fmt.Sscanf(strings.SplitN(v, "-", 2)[0], "%d.%d", &major, &minor); err != nil {
		return false
	}
	return major > 1 || major == 1 && minor >= 5
}
