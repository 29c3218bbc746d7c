package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pglease/pglease/internal/ident"
	"github.com/pglease/pglease/reaper"
)

// Commands of the binary.
const (
	cmdRun     = "run" // no subcommand: --once or --schedule
	cmdMigrate = "migrate"
	cmdHelp    = "help"
)

// unhealthyAfterDefault is how many failed passes in a row make /healthz
// answer 503.
const unhealthyAfterDefault = 3

// maxUnhealthyAfter bounds --unhealthy-after; a larger value would never be
// reached by a daemon that an operator watches.
const maxUnhealthyAfter = 1_000_000

// options are the parsed flags and environment.
type options struct {
	command   string // cmdRun, cmdMigrate or cmdHelp
	action    string // migrate: up, status or down
	helpTopic string // help: "" or "migrate"

	databaseURL    string
	urlSource      string // where the connection settings came from, for messages
	schema         string
	once           bool
	schedule       string
	batchSize      int
	batchTimeout   time.Duration
	dryRun         bool
	listen         string
	unhealthyAfter int
	skipFirstPass  bool
	logFormat      string
	logLevel       string
	version        bool
	yes            bool
}

// usageError is bad input: exit code 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: "reaper: " + fmt.Sprintf(format, args...)}
}

// Which commands a flag belongs to.
type scope int

const (
	forRun scope = 1 << iota
	forMigrate
	forBoth = forRun | forMigrate
)

// badValue is why a flag's value was refused. The flag package wraps the
// errors of Value.Set in its own text (which says "parse error" and nothing
// about what would have been accepted), so the values keep their error here
// and parse reports it in its own words.
type badValue struct {
	flag, value, want string
}

// parser holds the flag set of every command and what was wrong with a
// value, if anything.
type parser struct {
	fs     *flag.FlagSet
	env    map[string]string // flag name → environment variable
	scopes map[string]scope
	bad    *badValue
}

// Flag values whose errors name what they accept.

type intValue struct {
	p        *parser
	name     string
	v        *int
	min, max int
	def      int
}

func (i *intValue) String() string {
	if i.v == nil {
		return ""
	}
	return strconv.Itoa(*i.v)
}

func (i *intValue) Set(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < i.min || n > i.max {
		i.p.bad = &badValue{i.name, s, fmt.Sprintf("want a whole number from %d to %d (default %d)", i.min, i.max, i.def)}
		return errors.New(i.p.bad.want)
	}
	*i.v = n
	return nil
}

type durationValue struct {
	p    *parser
	name string
	v    *time.Duration
	min  time.Duration
	def  time.Duration
}

func (d *durationValue) String() string {
	if d.v == nil {
		return ""
	}
	return d.v.String()
}

func (d *durationValue) Set(s string) error {
	v, err := time.ParseDuration(strings.TrimSpace(s))
	switch {
	case err != nil:
		want := fmt.Sprintf("want a Go duration such as 5s or 1m (units ns, us, ms, s, m, h; default %s)", d.def)
		if _, numErr := strconv.ParseFloat(strings.TrimSpace(s), 64); numErr == nil {
			want = "a number needs a unit: " + want
		}
		d.p.bad = &badValue{d.name, s, want}
	case v < d.min:
		d.p.bad = &badValue{d.name, s, fmt.Sprintf("want a Go duration of at least %s, such as 5s or 1m (default %s)", d.min, d.def)}
	default:
		*d.v = v
		return nil
	}
	return errors.New(d.p.bad.want)
}

// boolWords are the words strconv.ParseBool accepts, as a message says them.
const boolWords = "want true or false (also accepted: 1, t, T, TRUE, True, 0, f, F, FALSE, False)"

type boolValue struct {
	p    *parser
	name string
	v    *bool
}

func (b *boolValue) String() string {
	if b.v == nil {
		return "false"
	}
	return strconv.FormatBool(*b.v)
}

func (b *boolValue) IsBoolFlag() bool { return true }

func (b *boolValue) Set(s string) error {
	v, err := strconv.ParseBool(s)
	if err != nil {
		b.p.bad = &badValue{b.name, s, boolWords}
		return errors.New(boolWords)
	}
	*b.v = v
	return nil
}

func newParser(o *options) *parser {
	p := &parser{fs: flag.NewFlagSet("reaper", flag.ContinueOnError), env: map[string]string{}, scopes: map[string]scope{}}
	p.fs.SetOutput(io.Discard)
	p.fs.Usage = func() {}
	add := func(name, envName string, sc scope) {
		if envName != "" {
			p.env[name] = envName
		}
		p.scopes[name] = sc
	}
	str := func(v *string, name, envName, def string, sc scope) {
		p.fs.StringVar(v, name, def, "")
		add(name, envName, sc)
	}
	boolean := func(v *bool, name, envName string, sc scope) {
		p.fs.Var(&boolValue{p: p, name: name, v: v}, name, "")
		add(name, envName, sc)
	}
	str(&o.databaseURL, "database-url", "DATABASE_URL", "", forBoth)
	str(&o.schema, "schema", "REAPER_SCHEMA", reaper.SchemaDefault, forBoth)
	str(&o.logFormat, "log-format", "REAPER_LOG_FORMAT", "text", forBoth)
	str(&o.logLevel, "log-level", "REAPER_LOG_LEVEL", "info", forBoth)
	boolean(&o.yes, "yes", "", forMigrate)
	str(&o.schedule, "schedule", "REAPER_SCHEDULE", "", forRun)
	str(&o.listen, "listen", "REAPER_LISTEN", "", forRun)
	boolean(&o.once, "once", "REAPER_ONCE", forRun)
	boolean(&o.dryRun, "dry-run", "REAPER_DRY_RUN", forRun)
	boolean(&o.skipFirstPass, "skip-first-pass", "REAPER_SKIP_FIRST_PASS", forRun)
	boolean(&o.version, "version", "", forRun)
	o.batchSize = reaper.BatchSizeDefault
	p.fs.Var(&intValue{p: p, name: "batch-size", v: &o.batchSize, min: 1, max: reaper.MaxBatchSize, def: reaper.BatchSizeDefault}, "batch-size", "")
	add("batch-size", "REAPER_BATCH_SIZE", forRun)
	o.batchTimeout = reaper.BatchTimeoutDefault
	p.fs.Var(&durationValue{p: p, name: "batch-timeout", v: &o.batchTimeout, min: reaper.MinBatchTimeout, def: reaper.BatchTimeoutDefault}, "batch-timeout", "")
	add("batch-timeout", "REAPER_BATCH_TIMEOUT", forRun)
	o.unhealthyAfter = unhealthyAfterDefault
	p.fs.Var(&intValue{p: p, name: "unhealthy-after", v: &o.unhealthyAfter, min: 1, max: maxUnhealthyAfter, def: unhealthyAfterDefault}, "unhealthy-after", "")
	add("unhealthy-after", "REAPER_UNHEALTHY_AFTER", forRun)
	return p
}

// flagError turns an error of flag.Parse into one that says what to do.
func (p *parser) flagError(err error) error {
	if p.bad != nil {
		return usagef("--%s %q: %s", p.bad.flag, p.bad.value, p.bad.want)
	}
	msg := err.Error()
	if name, ok := strings.CutPrefix(msg, "flag provided but not defined: -"); ok {
		return usagef("unknown flag --%s: \"reaper help\" lists the flags", strings.TrimLeft(name, "-"))
	}
	if name, ok := strings.CutPrefix(msg, "flag needs an argument: -"); ok {
		return usagef("--%s needs a value", strings.TrimLeft(name, "-"))
	}
	return usagef("%v", err)
}

// parse reads the command line, in which flags may come before or after the
// subcommand ("reaper --schema x migrate up" and "reaper migrate up --schema
// x"), then fills in the unset flags of that command from the environment.
func parse(args []string, getenv func(string) string) (*options, error) {
	o := &options{}
	p := newParser(o)
	var words []string // the arguments that are not flags
	helpAsked := false
	for rest := args; ; {
		err := p.fs.Parse(rest)
		if errors.Is(err, flag.ErrHelp) {
			helpAsked = true
			break
		}
		if err != nil {
			return nil, p.flagError(err)
		}
		left := p.fs.Args()
		if len(left) == 0 {
			break
		}
		if used := len(rest) - len(left); used > 0 && rest[used-1] == "--" {
			words = append(words, left...) // everything after "--" is an argument
			break
		}
		words, rest = append(words, left[0]), left[1:]
	}

	o.command = cmdRun
	if len(words) > 0 {
		switch words[0] {
		case cmdMigrate, cmdHelp:
			o.command, words = words[0], words[1:]
		}
	}
	if helpAsked {
		// "reaper migrate --help" is the help of migrate.
		if o.command == cmdMigrate {
			o.helpTopic = cmdMigrate
		}
		o.command = cmdHelp
		return o, nil
	}
	switch o.command {
	case cmdHelp:
		switch {
		case len(words) == 0:
		case words[0] == cmdMigrate && len(words) == 1:
			o.helpTopic = cmdMigrate
		default:
			return nil, usagef("no help on %q: try \"reaper help\" or \"reaper help migrate\"", strings.Join(words, " "))
		}
		return o, nil
	case cmdMigrate:
		if len(words) == 0 {
			return nil, usagef("migrate needs an action: up, status or down")
		}
		o.action, words = words[0], words[1:]
		switch o.action {
		case "up", "status", "down":
		default:
			return nil, usagef("migrate %q: the actions are up, status and down", o.action)
		}
	}
	if len(words) > 0 {
		return nil, usagef("unexpected argument %q: all options are flags; the commands are migrate and help", words[0])
	}

	want := forRun
	if o.command == cmdMigrate {
		want = forMigrate
	}
	set := map[string]bool{}
	var wrong []string
	p.fs.Visit(func(f *flag.Flag) {
		set[f.Name] = true
		if p.scopes[f.Name]&want == 0 {
			wrong = append(wrong, f.Name)
		}
	})
	if len(wrong) > 0 {
		slices.Sort(wrong)
		if o.command == cmdMigrate {
			return nil, usagef("--%s is not a flag of \"reaper migrate\", whose flags are --database-url, --schema, --log-format, --log-level and --yes",
				wrong[0])
		}
		return nil, usagef("--%s is a flag of \"reaper migrate\" only", wrong[0])
	}
	// Variables of the other command are ignored: a deployment that sets
	// REAPER_SCHEDULE for its daemon can still run "reaper migrate up".
	names := make([]string, 0, len(p.env))
	for name := range p.env {
		names = append(names, name)
	}
	slices.Sort(names) // the same variable is reported first every time
	for _, name := range names {
		envName := p.env[name]
		v := getenv(envName)
		if set[name] || v == "" || p.scopes[name]&want == 0 {
			continue
		}
		if err := p.fs.Set(name, v); err != nil {
			if name == "database-url" {
				v = "(not shown)"
			}
			why := err.Error()
			if p.bad != nil {
				why = p.bad.want
			}
			return nil, usagef("%s=%q: %s", envName, v, why)
		}
	}
	o.urlSource = "the PG* environment variables"
	switch {
	case set["database-url"]:
		o.urlSource = "--database-url"
	case o.databaseURL != "":
		o.urlSource = "DATABASE_URL"
	case !hasLibpqEnv(getenv):
		o.urlSource = "the libpq defaults (no --database-url, DATABASE_URL or PG* variable is set: " +
			"the operating system user, over the local Unix socket)"
	}
	return o, o.validate()
}

// libpqEnv are the variables that pgx reads for connection settings.
var libpqEnv = []string{"PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE",
	"PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGAPPNAME", "PGCONNECT_TIMEOUT", "PGSSLCERT",
	"PGSSLKEY", "PGSSLROOTCERT", "PGTARGETSESSIONATTRS"}

func hasLibpqEnv(getenv func(string) string) bool {
	for _, k := range libpqEnv {
		if getenv(k) != "" {
			return true
		}
	}
	return false
}

func (o *options) validate() error {
	if err := ident.ValidateSchema(o.schema); err != nil {
		return usagef("--schema %q is not usable: %s", o.schema, err)
	}
	switch o.logFormat {
	case "text", "json":
	default:
		return usagef("--log-format %q: use text or json", o.logFormat)
	}
	if _, err := parseLevel(o.logLevel); err != nil {
		return err
	}
	if o.command == cmdMigrate || o.version {
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
		if err := checkSchedule(o.schedule); err != nil {
			return err
		}
	}
	if o.listen != "" {
		if _, _, err := net.SplitHostPort(o.listen); err != nil {
			return usagef("--listen %q: want host:port or :port, e.g. :9187 or 127.0.0.1:9187", o.listen)
		}
	}
	return nil
}
