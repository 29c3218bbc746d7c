package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/ident"
	"github.com/pglease/pglease/reaper"
)

// Exit codes, for schedulers to act on.
const (
	exitOK     = 0 // done (or stopped by SIGINT/SIGTERM after finishing its batch)
	exitFailed = 1 // a pass or a migration failed: database down, timeout, permissions
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
)

const usageText = `reaper deletes the rows that dead pglease holders left behind.

Usage:
  reaper --once     [flags]        one pass, then exit (cron, Kubernetes CronJob)
  reaper --schedule SPEC [flags]   a pass on a schedule until SIGINT/SIGTERM (daemon)
  reaper migrate up|status|down [flags]
                                   apply, show or roll back the pglease schema

Flags (each has an environment variable; a flag given wins over it):
  --database-url URL     PostgreSQL connection string           DATABASE_URL
                         (URL or "key=value ..."). When neither is set, the
                         libpq variables are used: PGHOST, PGPORT, PGUSER,
                         PGPASSWORD, PGDATABASE, PGSSLMODE, PGPASSFILE, ...
                         Prefer the environment or a .pgpass file to putting a
                         password on the command line, where ps shows it.
  --schema NAME          schema of the pglease tables           REAPER_SCHEMA
                         (default "lease")
  --once                 run one pass and exit                  REAPER_ONCE
  --schedule SPEC        cron expression ("*/5 * * * *", with   REAPER_SCHEDULE
                         an optional leading seconds field and
                         CRON_TZ=Zone/Name prefix) or a
                         descriptor ("@hourly", "@every 30s")
  --batch-size N         rows per batch (one transaction)       REAPER_BATCH_SIZE
                         (default 1000, at most 100000)
  --batch-timeout D      time limit of one batch                REAPER_BATCH_TIMEOUT
                         (default 10s)
  --dry-run              count what would be deleted, delete    REAPER_DRY_RUN
                         nothing
  --listen ADDR          with --schedule: serve /healthz and    REAPER_LISTEN
                         /metrics (Prometheus) on ADDR, e.g.
                         ":9187" (port 0 picks a free port; the
                         address is logged)
  --log-format F         text or json (default text)            REAPER_LOG_FORMAT
  --log-level L          debug, info, warn or error             REAPER_LOG_LEVEL
                         (default info)
  --version              print the version and exit
  --help                 print this help and exit

Flags of "reaper migrate":
  --database-url, --schema, --log-format, --log-level as above, and
  --yes                  confirm "migrate down", which drops the tables and
                         every lock in them

Exit codes:
  0  done; also after SIGINT/SIGTERM, once the batch in flight has finished
  1  a pass or migration failed (database unreachable, timeout, permissions):
     the message says what and how to fix it; running again later is safe
  2  bad flags, environment variables or configuration

Logs go to stderr. A pass that finds nothing to delete logs nothing (at the
default level), so a crontab entry mails only when something happened.

Examples:
  # crontab: every 5 minutes
  */5 * * * * DATABASE_URL=postgres://reaper@db/app reaper --once

  # see what a pass would delete
  reaper --once --dry-run --database-url "postgres://reaper@db:5432/app"

  # daemon with metrics on :9187, JSON logs
  REAPER_SCHEDULE="@every 30s" reaper --listen :9187 --log-format json

  # create or upgrade the schema (as its owner), then check it
  reaper migrate up --database-url "postgres://owner@db/app"
  reaper migrate status
`

// options are the parsed flags and environment.
type options struct {
	databaseURL  string
	urlSource    string // where the connection settings came from, for messages
	schema       string
	once         bool
	schedule     string
	batchSize    int
	batchTimeout time.Duration
	dryRun       bool
	listen       string
	logFormat    string
	logLevel     string
	version      bool
	yes          bool
	action       string // migrate: up, status or down
}

// usageError is bad input: exit code 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: "reaper: " + fmt.Sprintf(format, args...)}
}

// run is the whole program: main only wires it to the process. env holds
// "KEY=value" strings; the libpq PG* variables are read by pgx from the
// process environment itself.
func run(ctx context.Context, args, env []string, stdout, stderr io.Writer) int {
	getenv := lookupEnv(env)
	if len(args) > 0 && args[0] == "migrate" {
		return runMigrate(ctx, args[1:], getenv, stdout, stderr)
	}
	opts, err := parse(args, getenv, false)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(stdout, usageText)
		return exitOK
	case err != nil:
		return usage(stderr, err)
	}
	if opts.version {
		fmt.Fprintln(stdout, versionString())
		return exitOK
	}
	log, err := newLogger(stderr, opts)
	if err != nil {
		return usage(stderr, err)
	}
	pool, err := openPool(ctx, opts)
	if err != nil {
		return usage(stderr, err)
	}
	defer pool.Close()

	var m metrics
	r, err := reaper.New(pool, &reaper.Config{
		Schema:       opts.schema,
		BatchSize:    opts.batchSize,
		BatchTimeout: opts.batchTimeout,
		DryRun:       opts.dryRun,
		Logger:       log,
		OnPass:       m.observe,
	})
	if err != nil {
		return usage(stderr, err)
	}
	if opts.once {
		return runOnce(ctx, r, log, opts)
	}
	return runDaemon(ctx, r, &m, log, opts)
}

func usage(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "%v\nRun \"reaper --help\" for usage.\n", err)
	return exitUsage
}

func runOnce(ctx context.Context, r *reaper.Reaper, log *slog.Logger, opts *options) int {
	_, err := r.RunOnce(ctx) // the reaper logs what the pass did
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, reaper.ErrInterrupted):
		log.Info(msgInterrupted)
		return exitOK
	default:
		log.Error(msgPassFailed, "error", err.Error(), "connection_settings", opts.urlSource)
		return exitFailed
	}
}

func runDaemon(ctx context.Context, r *reaper.Reaper, m *metrics, log *slog.Logger, opts *options) int {
	var srv *http.Server
	httpFailed := make(chan error, 1)
	if opts.listen != "" {
		ln, err := net.Listen("tcp", opts.listen)
		if err != nil {
			log.Error(msgHTTPFailed, "error", err.Error(), "listen", opts.listen,
				"hint", "choose a free address with --listen, e.g. :9187")
			return exitFailed
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			_, _ = io.WriteString(w, "ok\n")
		})
		mux.Handle("/metrics", m)
		srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		log.Info(msgListening, "addr", ln.Addr().String())
		go func() {
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				httpFailed <- err
			}
		}()
	}
	if err := r.Start(opts.schedule); err != nil { // validated in parse already
		log.Error(msgStartFailed, "error", err.Error())
		return exitUsage
	}
	log.Info(msgStarted, "schema", opts.schema, "schedule", opts.schedule,
		"next_run", r.NextRun().Format(time.RFC3339), "dry_run", opts.dryRun)

	code := exitOK
	select {
	case <-ctx.Done():
		log.Info(msgStopping)
	case err := <-httpFailed:
		log.Error(msgHTTPFailed, "error", err.Error())
		code = exitFailed
	}
	// A running pass finishes its batch, which takes at most the batch
	// timeout (plus the client's grace); give it a little more than that.
	stopCtx, cancel := context.WithTimeout(context.Background(), r.Config().BatchTimeout+5*time.Second)
	defer cancel()
	if err := r.Stop(stopCtx); err != nil {
		log.Error(msgStopFailed, "error", err.Error())
		code = exitFailed
	}
	if srv != nil {
		_ = srv.Shutdown(stopCtx)
	}
	log.Info(msgStopped)
	return code
}

// parse reads flags, then fills in the unset ones from the environment.
func parse(args []string, getenv func(string) string, migrate bool) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("reaper", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	env := map[string]string{} // flag name → environment variable
	str := func(p *string, name, envName, def string) {
		fs.StringVar(p, name, def, "")
		if envName != "" {
			env[name] = envName
		}
	}
	str(&o.databaseURL, "database-url", "DATABASE_URL", "")
	str(&o.schema, "schema", "REAPER_SCHEMA", reaper.SchemaDefault)
	str(&o.logFormat, "log-format", "REAPER_LOG_FORMAT", "text")
	str(&o.logLevel, "log-level", "REAPER_LOG_LEVEL", "info")
	if migrate {
		fs.BoolVar(&o.yes, "yes", false, "")
	} else {
		str(&o.schedule, "schedule", "REAPER_SCHEDULE", "")
		str(&o.listen, "listen", "REAPER_LISTEN", "")
		fs.BoolVar(&o.once, "once", false, "")
		env["once"] = "REAPER_ONCE"
		fs.BoolVar(&o.dryRun, "dry-run", false, "")
		env["dry-run"] = "REAPER_DRY_RUN"
		fs.IntVar(&o.batchSize, "batch-size", reaper.BatchSizeDefault, "")
		env["batch-size"] = "REAPER_BATCH_SIZE"
		fs.DurationVar(&o.batchTimeout, "batch-timeout", reaper.BatchTimeoutDefault, "")
		env["batch-timeout"] = "REAPER_BATCH_TIMEOUT"
		fs.BoolVar(&o.version, "version", false, "")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, usagef("%v", err)
	}
	if migrate {
		if fs.NArg() == 0 {
			return nil, usagef("migrate needs an action: up, status or down")
		}
		o.action = fs.Arg(0)
		switch o.action {
		case "up", "status", "down":
		default:
			return nil, usagef("migrate %q: the actions are up, status and down", o.action)
		}
		if err := fs.Parse(fs.Args()[1:]); err != nil { // flags after the action
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, usagef("%v", err)
		}
	}
	if fs.NArg() > 0 {
		return nil, usagef("unexpected argument %q: all options are flags", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for name, envName := range env {
		v := getenv(envName)
		if set[name] || v == "" {
			continue
		}
		if err := fs.Set(name, v); err != nil {
			what := "invalid value"
			if name == "database-url" {
				v = "(not shown)"
			}
			return nil, usagef("%s %s=%q: %v", what, envName, v, err)
		}
	}
	o.urlSource = "the PG* environment variables"
	switch {
	case set["database-url"]:
		o.urlSource = "--database-url"
	case o.databaseURL != "":
		o.urlSource = "DATABASE_URL"
	}
	return o, o.validate(migrate)
}

func (o *options) validate(migrate bool) error {
	if err := ident.ValidateSchema(o.schema); err != nil {
		return usagef("--schema %q is not usable: %s", o.schema, strings.TrimPrefix(err.Error(), "lease: "))
	}
	switch o.logFormat {
	case "text", "json":
	default:
		return usagef("--log-format %q: use text or json", o.logFormat)
	}
	if _, err := parseLevel(o.logLevel); err != nil {
		return err
	}
	if migrate || o.version {
		return nil
	}
	switch {
	case o.once && o.schedule != "":
		return usagef("--once and --schedule both given: use --once for cron and CronJobs, --schedule for a daemon")
	case !o.once && o.schedule == "":
		return usagef("nothing to do: give --once (one pass, for cron and CronJobs) or --schedule SPEC (daemon), or \"migrate up\"")
	case o.listen != "" && o.once:
		return usagef("--listen needs --schedule: a single pass (--once) exits before anything could scrape it")
	}
	if o.schedule != "" {
		if err := reaper.ValidateSchedule(o.schedule); err != nil {
			return usagef("--schedule: %s", strings.TrimPrefix(err.Error(), "reaper: "))
		}
	}
	if o.listen != "" {
		if _, _, err := net.SplitHostPort(o.listen); err != nil {
			return usagef("--listen %q: want host:port or :port, e.g. :9187 or 127.0.0.1:9187", o.listen)
		}
	}
	if o.batchSize < 1 || o.batchSize > reaper.MaxBatchSize {
		return usagef("--batch-size %d: use 1 to %d (default %d)", o.batchSize, reaper.MaxBatchSize, reaper.BatchSizeDefault)
	}
	if o.batchTimeout < reaper.MinBatchTimeout {
		return usagef("--batch-timeout %s: use a duration of at least %s, e.g. 10s (the default)", o.batchTimeout, reaper.MinBatchTimeout)
	}
	return nil
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, usagef("--log-level %q: use debug, info, warn or error", s)
	}
	return l, nil
}

func newLogger(w io.Writer, o *options) (*slog.Logger, error) {
	level, err := parseLevel(o.logLevel)
	if err != nil {
		return nil, err
	}
	ho := &slog.HandlerOptions{Level: level}
	if o.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, ho)), nil
	}
	return slog.New(slog.NewTextHandler(w, ho)), nil
}

// openPool parses the connection settings. It does not connect: the first
// pass does, and reports a failure to connect as a failed pass (exit 1).
func openPool(ctx context.Context, o *options) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(o.databaseURL)
	if err != nil {
		return nil, usagef("the connection settings from %s cannot be parsed%s (want a URL like "+
			"postgres://user@host:5432/dbname?sslmode=require, or key=value pairs like \"host=db dbname=app\"; "+
			"the value is not shown because it may contain a password)", o.urlSource, parseReason(err))
	}
	cfg.MaxConns = 2
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = 10 * time.Second
	}
	if cfg.ConnConfig.RuntimeParams["application_name"] == "" {
		cfg.ConnConfig.RuntimeParams["application_name"] = "pglease-reaper"
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, usagef("the connection settings from %s are not usable: %v", o.urlSource, err)
	}
	return pool, nil
}

// parseReason says why connection settings did not parse, without quoting
// any part of them: pgx's message names the problem, but it quotes the
// settings (with the password masked on a best-effort basis only), and a URL
// parse error quotes the URL as given.
func parseReason(err error) string {
	var pce *pgconn.ParseConfigError
	if !errors.As(err, &pce) {
		return ""
	}
	s := pce.Error()
	inner := pce.Unwrap()
	if inner != nil {
		s = strings.TrimSuffix(s, " ("+inner.Error()+")")
	}
	i := strings.LastIndex(s, "`: ")
	if i < 0 {
		return ""
	}
	reason := s[i+3:]
	switch reason {
	case "failed to configure TLS", "invalid connect_timeout":
		if inner != nil {
			reason += ": " + inner.Error()
		}
	case "failed to parse as URL":
		reason = "it is not a valid URL"
	case "failed to parse as keyword/value":
		reason = "it is neither a URL nor valid key=value pairs"
	}
	return ": " + reason
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
