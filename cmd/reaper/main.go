// Command reaper deletes the rows that dead pglease holders left behind, once
// (for cron and Kubernetes CronJobs) or on a schedule (as a daemon), and
// applies the pglease migrations. Run "reaper --help" for the flags.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// The first signal stops the reaper gracefully; a second one kills it.
	go func() {
		<-ctx.Done()
		stop()
	}()
	os.Exit(run(ctx, os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}
