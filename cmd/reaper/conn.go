package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// target is whom the connection settings reach: the user, the host (or
// hosts, with fallbacks) and the database. Never the password.
type target struct {
	user, host, database, source string
}

func newTarget(cfg *pgconn.Config, source string) target {
	hostPort := func(host string, port uint16) string {
		if strings.HasPrefix(host, "/") {
			return host + " (Unix socket, port " + strconv.Itoa(int(port)) + ")"
		}
		return net.JoinHostPort(host, strconv.Itoa(int(port)))
	}
	hosts := []string{hostPort(cfg.Host, cfg.Port)}
	for _, fb := range cfg.Fallbacks {
		if h := hostPort(fb.Host, fb.Port); h != hosts[len(hosts)-1] {
			hosts = append(hosts, h)
		}
	}
	db := cfg.Database
	if db == "" {
		db = cfg.User + " (none given: the server takes the user name)"
	}
	return target{user: cfg.User, host: strings.Join(hosts, ", "), database: db, source: source}
}

func (t target) attrs() []slog.Attr {
	return []slog.Attr{
		slog.String("user", t.user),
		slog.String("host", t.host),
		slog.String("database", t.database),
		slog.String("connection_settings", t.source),
	}
}

// openPool parses the connection settings. It does not connect.
func openPool(ctx context.Context, o *options) (*pgxpool.Pool, target, error) {
	cfg, err := pgxpool.ParseConfig(o.databaseURL)
	if err != nil {
		return nil, target{}, usagef("the connection settings from %s cannot be parsed%s (want a URL like "+
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
		return nil, target{}, usagef("the connection settings from %s are not usable: %v", o.urlSource, err)
	}
	return pool, newTarget(&cfg.ConnConfig.Config, o.urlSource), nil
}

// connectHint says how to fix a failed connection.
func connectHint(err error) string {
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && (pgErr.Code == "28P01" || pgErr.Code == "28000"):
		return "the server refused the login: check the user name and password (the user is named in this line)"
	case errors.As(err, &pgErr) && pgErr.Code == "3D000":
		return "the database named in the connection settings does not exist on that server"
	case errors.As(err, &pgErr) && pgErr.Code == "42501":
		return "the role may not connect to that database: GRANT CONNECT ON DATABASE to it (see examples/reaper/grants.sql)"
	}
	return "could not connect: check the connection settings (host, port, user, database) and that PostgreSQL is running and reachable"
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

// Messages of the reaper package that the binary words differently in a dry
// run. The reaper package logs them; a test of the binary fails if they change.
const (
	reaperMsgPassDone = "reaper pass done"
	msgDryRunDone     = "reaper dry run done, would delete"
)

// cliHandler adds what an operator needs to the log lines of the binary and
// of the reaper package: every error names whom the connection settings reach
// (user, host, database: never the password), and a dry run's pass says
// "would delete" rather than reporting deletions.
type cliHandler struct {
	slog.Handler
	target target
	dryRun bool
}

func (h *cliHandler) Handle(ctx context.Context, r slog.Record) error {
	if h.dryRun && r.Message == reaperMsgPassDone {
		nr := slog.NewRecord(r.Time, r.Level, msgDryRunDone, r.PC)
		r.Attrs(func(a slog.Attr) bool { nr.AddAttrs(a); return true })
		r = nr
	}
	if r.Level >= slog.LevelError && h.target.source != "" {
		r = r.Clone()
		r.AddAttrs(h.target.attrs()...)
	}
	return h.Handler.Handle(ctx, r)
}

func (h *cliHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &cliHandler{Handler: h.Handler.WithAttrs(as), target: h.target, dryRun: h.dryRun}
}

func (h *cliHandler) WithGroup(name string) slog.Handler {
	return &cliHandler{Handler: h.Handler.WithGroup(name), target: h.target, dryRun: h.dryRun}
}
