package reaper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/robfig/cron/v3"

	"github.com/pglease/pglease/internal/ident"
)

// Defaults used for the zero values of Config's fields.
const (
	// SchemaDefault is the schema the pglease tables live in, the same as
	// lease.SchemaDefault.
	SchemaDefault = "lease"
	// BatchSizeDefault is how many rows one batch deletes at most.
	BatchSizeDefault = 1000
	// BatchTimeoutDefault bounds one batch: its transaction is cancelled
	// after this long.
	BatchTimeoutDefault = 10 * time.Second
)

// Limits of Config's fields.
const (
	// MaxBatchSize is the largest BatchSize accepted. Bigger batches hold
	// their row locks longer and make each notification burst bigger.
	MaxBatchSize = 100_000
	// MinBatchTimeout is the smallest BatchTimeout accepted (PostgreSQL
	// timeouts are in milliseconds, and 0 would mean "no timeout").
	MinBatchTimeout = time.Millisecond
)

// Errors. Every error this package returns wraps one of them, so callers can
// tell a bad configuration from a failed pass with errors.Is.
var (
	// ErrInvalidConfig is wrapped by every error New returns.
	ErrInvalidConfig = errors.New("reaper: invalid config")
	// ErrInvalidSchedule is wrapped by the errors of Start and ParseSchedule
	// for a schedule that cannot be parsed.
	ErrInvalidSchedule = errors.New("reaper: invalid schedule")
	// ErrAlreadyStarted is returned by Start when a schedule is running.
	ErrAlreadyStarted = errors.New("reaper: already started: call Stop before starting again")

	// ErrPass is wrapped by every error of a pass (RunOnce, or a scheduled
	// pass reported to OnPass). One of the more specific errors below is
	// usually wrapped as well.
	ErrPass = errors.New("reaper: pass failed")
	// ErrUnreachable: no connection to the database could be made or kept.
	ErrUnreachable = errors.New("reaper: database unreachable")
	// ErrTimeout: a batch ran into BatchTimeout.
	ErrTimeout = errors.New("reaper: batch timed out")
	// ErrNotMigrated: the schema does not exist or is older than
	// SchemaVersion (see SchemaError).
	ErrNotMigrated = errors.New("reaper: schema not migrated")
	// ErrPermission: the database role lacks a privilege the reaper needs.
	ErrPermission = errors.New("reaper: permission denied")

	// ErrInterrupted is returned by a pass whose context was cancelled. It
	// is not a failure: the work done so far is committed, and the error
	// also wraps the context's error.
	ErrInterrupted = errors.New("reaper: pass interrupted")
)

// Config configures a Reaper. The zero value works: every field has a default.
type Config struct {
	// Schema holds the pglease tables. Defaults to SchemaDefault ("lease").
	Schema string

	// BatchSize is the most rows one batch (one transaction) deletes.
	// Defaults to BatchSizeDefault (1000); at most MaxBatchSize.
	BatchSize int

	// BatchTimeout bounds each batch: its statements are cancelled by the
	// server (statement_timeout, lock_timeout) after this long, and the
	// client gives up shortly after that if the server does not answer.
	// Defaults to BatchTimeoutDefault (10s); at least MinBatchTimeout.
	BatchTimeout time.Duration

	// DryRun makes passes count what they would delete, without deleting
	// or locking anything. Defaults to false.
	DryRun bool

	// Logger receives the reaper's logs: a pass that deleted (or skipped)
	// something, a failed scheduled pass, a skipped scheduled run. Defaults
	// to nil, which discards them.
	Logger *slog.Logger

	// OnPass, when set, is called after every pass (RunOnce and scheduled
	// passes) with its Stats and error, on the goroutine that ran the pass.
	// It must not call Stop. Defaults to nil (not called).
	OnPass func(Stats, error)
}

// Stats describes one pass.
type Stats struct {
	// Holders is how many dead holder rows were deleted (or, in a dry run,
	// would be).
	Holders int64
	// Locks is how many lock rows of dead holders were deleted (or, in a
	// dry run, would be).
	Locks int64
	// Skipped is how many lock rows of dead holders were left in place
	// because another transaction had them locked (a fenced write, an
	// acquirer taking the key over, another reaper). A later pass deletes
	// them. Always 0 in a dry run.
	Skipped int64
	// Batches is how many delete transactions the pass committed. Always 0
	// in a dry run.
	Batches int
	// Duration is how long the pass took.
	Duration time.Duration
	// DryRun reports whether the pass was a dry run.
	DryRun bool
}

// Reaper deletes the rows of dead holders. It is safe for concurrent use.
type Reaper struct {
	pool *pgxpool.Pool
	cfg  Config
	log  *slog.Logger

	// SQL, built once with the quoted schema name.
	setLocal    string
	reapHolders string
	reapLocks   string
	dryRun      string

	mu      sync.Mutex // guards cron and cancel
	cron    *cron.Cron
	cancel  context.CancelFunc
	running atomic.Bool // a scheduled pass is running
}

// New returns a Reaper that works on pool. cfg may be nil for all defaults.
// It validates the configuration but does not contact the database.
func New(pool *pgxpool.Pool, cfg *Config) (*Reaper, error) {
	if pool == nil {
		return nil, fmt.Errorf("%w: pool is nil: pass the *pgxpool.Pool of the database that holds the pglease schema", ErrInvalidConfig)
	}
	var c Config
	if cfg != nil {
		c = *cfg
	}
	if c.Schema == "" {
		c.Schema = SchemaDefault
	}
	if err := ident.ValidateSchema(c.Schema); err != nil {
		return nil, fmt.Errorf("%w: Schema is not a usable schema name: %s", ErrInvalidConfig, schemaProblem(err))
	}
	switch {
	case c.BatchSize < 0:
		return nil, fmt.Errorf("%w: BatchSize %d is negative: leave it 0 for the default (%d) or set 1 to %d",
			ErrInvalidConfig, c.BatchSize, BatchSizeDefault, MaxBatchSize)
	case c.BatchSize > MaxBatchSize:
		return nil, fmt.Errorf("%w: BatchSize %d is above the limit of %d: smaller batches hold row locks for less time",
			ErrInvalidConfig, c.BatchSize, MaxBatchSize)
	case c.BatchSize == 0:
		c.BatchSize = BatchSizeDefault
	}
	switch {
	case c.BatchTimeout < 0:
		return nil, fmt.Errorf("%w: BatchTimeout %s is negative: leave it 0 for the default (%s) or set at least %s",
			ErrInvalidConfig, c.BatchTimeout, BatchTimeoutDefault, MinBatchTimeout)
	case c.BatchTimeout == 0:
		c.BatchTimeout = BatchTimeoutDefault
	case c.BatchTimeout < MinBatchTimeout:
		return nil, fmt.Errorf("%w: BatchTimeout %s is below %s: PostgreSQL timeouts count whole milliseconds",
			ErrInvalidConfig, c.BatchTimeout, MinBatchTimeout)
	}
	log := c.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Reaper{pool: pool, cfg: c, log: log}
	r.buildSQL()
	return r, nil
}

// schemaProblem is what ident found wrong with a schema name, without the
// text of ident's own sentinel ("lease: invalid schema name"): errors of
// this package start with "reaper:" and speak for the reaper alone.
func schemaProblem(err error) string {
	return strings.TrimPrefix(err.Error(), ident.ErrInvalidSchema.Error()+": ")
}

// Config returns the configuration in effect, with defaults filled in.
func (r *Reaper) Config() Config { return r.cfg }

func (r *Reaper) buildSQL() {
	fn := func(name string) string { return pgx.Identifier{r.cfg.Schema, name}.Sanitize() }
	ms := r.cfg.BatchTimeout.Milliseconds()
	// The lock wait gives up before the statement does, so that a batch
	// stuck behind DDL is reported as such, not as a slow batch: a tenth of
	// the timeout earlier, and at least 100ms earlier when the timeout
	// allows, because the wait starts only once the function has started
	// (which on a fresh connection can take tens of milliseconds).
	lockMS := max(1, ms-max(ms/10, min(100, ms/2)))
	r.setLocal = "SET LOCAL statement_timeout = " + strconv.FormatInt(ms, 10) +
		"; SET LOCAL lock_timeout = " + strconv.FormatInt(lockMS, 10)

	// The reaping itself is the schema's own SQL (migration 00004), which a
	// DBA or pg_cron can call too; see its comments for why it is safe. The
	// functions commit asynchronously by themselves.
	r.reapHolders = `SELECT ` + fn("reap_holders") + `($1)`
	r.reapLocks = `SELECT deleted, skipped, next_from FROM ` + fn("reap_locks") + `($1, $2)`
	r.dryRun = `SELECT holders, locks FROM ` + fn("reap_dry_run") + `()`
}
