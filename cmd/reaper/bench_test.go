package main

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/pglease/pglease/internal/pgtest"
)

// BenchmarkOnceMillionDeadRows measures "reaper --once", run as a
// subprocess, on a backlog of 1,000,000 dead lock rows (1,000 dead holders
// with 1,000 each) next to 100,000 live ones. Building the backlog is not
// timed but takes a while; run it on its own with -benchtime=1x:
//
//	go test -run '^$' -bench OnceMillionDeadRows -benchtime=1x ./cmd/reaper/
func BenchmarkOnceMillionDeadRows(b *testing.B) {
	b.StopTimer() // only the subprocess is timed
	bin := binary
	if bin == "" {
		bin = filepath.Join(b.TempDir(), "reaper")
		if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
			b.Fatalf("go build: %v\n%s", err, out)
		}
	}
	db := pgtest.NewDB(b)
	holders, locks := db.Qualified("holders"), db.Qualified("locks")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	exec1 := func(sql string) {
		if _, err := db.Pool.Exec(ctx, sql); err != nil {
			b.Fatalf("%s: %v", sql, err)
		}
	}
	count := func(sql string) int64 { return db.Count(ctx, b, sql) }
	var total time.Duration
	for range b.N {
		b.StopTimer()
		exec1(`TRUNCATE ` + holders + `, ` + locks)
		db.AddLocks(ctx, b, db.AddHolders(ctx, b, 1000, false), 1000)
		db.AddLocks(ctx, b, db.AddHolders(ctx, b, 100, true), 1000)
		exec1(`VACUUM ANALYZE ` + holders + `, ` + locks)
		if n := count(`SELECT count(*) FROM ` + locks); n != 1_100_000 {
			b.Fatalf("fixture: %d lock rows", n)
		}

		cmd := exec.CommandContext(ctx, bin, "--once", "--schema", db.Schema)
		cmd.Env = []string{"DATABASE_URL=" + db.Cluster.URL()}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		b.StartTimer()
		start := time.Now()
		err := cmd.Run()
		total += time.Since(start)
		b.StopTimer()
		if err != nil {
			b.Fatalf("reaper --once: %v\n%s", err, stderr.String())
		}
		if n := count(`SELECT count(*) FROM ` + locks); n != 100_000 {
			b.Fatalf("after the pass: %d lock rows, want the 100000 live ones\n%s", n, stderr.String())
		}
		b.Logf("%s", bytes.TrimSpace(stderr.Bytes()))
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "s/pass")
	b.ReportMetric(1e6*float64(b.N)/total.Seconds(), "rows/s")
}
