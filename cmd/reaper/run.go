package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime/debug"
	"strings"

	"github.com/pglease/pglease/reaper"
)

// Exit codes, for schedulers to act on.
const (
	exitOK     = 0 // done (or stopped by SIGINT/SIGTERM after finishing its batch)
	exitFailed = 1 // a pass or a migration failed, or the daemon could not connect at start
	exitUsage  = 2 // bad flags, environment or configuration
)

// version is set at build time with -ldflags "-X main.version=v1.2.3";
// otherwise the module version from the build information is used.
var version = ""

// Log messages. Constant; the details are in the attributes.
const (
	msgListening   = "reaper listening"
	msgStarted     = "reaper started"
	msgStopping    = "reaper stopping"
	msgStopped     = "reaper stopped"
	msgInterrupted = "reaper interrupted, batch in flight finished"
	msgPassFailed  = "reaper pass failed"
	msgStopFailed  = "reaper stop failed"
	msgStartFailed = "reaper start failed"
	msgHTTPFailed  = "reaper http server failed"
	msgNoConnect   = "reaper could not connect at start"
)

// run is the whole program: main only wires it to the process. env holds
// "KEY=value" strings; the libpq PG* variables are read by pgx from the
// process environment itself.
func run(ctx context.Context, args, env []string, stdout, stderr io.Writer) int {
	opts, err := parse(args, lookupEnv(env))
	if err != nil {
		return usage(stderr, err)
	}
	switch {
	case opts.command == cmdHelp && opts.helpTopic == cmdMigrate:
		fmt.Fprint(stdout, migrateUsageText)
		return exitOK
	case opts.command == cmdHelp:
		fmt.Fprint(stdout, usageText)
		return exitOK
	case opts.version:
		fmt.Fprintln(stdout, versionString())
		return exitOK
	case opts.command == cmdMigrate:
		return runMigrate(ctx, opts, stdout, stderr)
	}
	pool, tgt, err := openPool(ctx, opts)
	if err != nil {
		return usage(stderr, err)
	}
	defer pool.Close()
	log, err := newLogger(stderr, opts, tgt)
	if err != nil {
		return usage(stderr, err)
	}
	if onStandby(ctx, pool, log) { // standby.go
		return exitFailed
	}

	m := newMetrics(opts.unhealthyAfter)
	var last reaper.Stats
	r, err := reaper.New(pool, &reaper.Config{
		Schema:       opts.schema,
		BatchSize:    opts.batchSize,
		BatchTimeout: opts.batchTimeout,
		DryRun:       opts.dryRun,
		Logger:       log,
		OnPass: func(st reaper.Stats, err error) {
			last = st // read by runOnce after RunOnce returns, on the same goroutine
			m.observe(st, err)
		},
	})
	if err != nil {
		return usage(stderr, err)
	}
	if opts.once {
		code := runOnce(ctx, r, log)
		if opts.dryRun && code == exitOK {
			fmt.Fprintf(stdout, "dry run: would delete %d dead holder rows and %d lock rows of dead holders in schema %q; nothing was deleted\n",
				last.Holders, last.Locks, opts.schema)
		}
		return code
	}
	return runDaemon(ctx, pool, r, m, log, opts)
}

func usage(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "%v\nRun \"reaper help\" for usage.\n", err)
	return exitUsage
}

// runOnce runs one pass. The reaper logs what the pass did; a failure is
// logged here, with whom the connection settings reach (added by the
// logger's handler).
func runOnce(ctx context.Context, r *reaper.Reaper, log *slog.Logger) int {
	_, err := r.RunOnce(ctx)
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, reaper.ErrInterrupted):
		log.Info(msgInterrupted)
		return exitOK
	default:
		log.Error(msgPassFailed, "error", err.Error())
		return exitFailed
	}
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, usagef("--log-level %q: use debug, info, warn or error", s)
	}
	return l, nil
}

// newLogger returns the logger of the binary, which the reaper package logs
// through as well. Its error lines name whom tgt reaches.
func newLogger(w io.Writer, o *options, tgt target) (*slog.Logger, error) {
	level, err := parseLevel(o.logLevel)
	if err != nil {
		return nil, err
	}
	ho := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(w, ho)
	if o.logFormat == "json" {
		h = slog.NewJSONHandler(w, ho)
	}
	return slog.New(&cliHandler{Handler: h, target: tgt, dryRun: o.dryRun}), nil
}

func lookupEnv(env []string) func(string) string {
	m := make(map[string]string, len(env))
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return func(k string) string { return m[k] }
}

func versionString() string {
	v := version
	goVersion := ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		goVersion = bi.GoVersion
		if v == "" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += " (" + s.Value[:12] + ")"
			}
		}
	}
	if v == "" {
		v = "(devel)"
	}
	return strings.TrimSpace("reaper " + v + " " + goVersion)
}
