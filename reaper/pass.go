package reaper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Log messages. They are constant; the details are in the attributes.
const (
	msgPassDone        = "reaper pass done"
	msgPassInterrupted = "reaper pass interrupted"
	msgPassFailed      = "reaper pass failed"
	msgRunSkipped      = "reaper run skipped: the previous pass is still running"
)

// clientGrace is how much longer than BatchTimeout the client waits for the
// server before giving up on a batch itself: the server's own timeouts
// should fire first and say what happened.
const clientGrace = 2 * time.Second

// Steps of a pass, as named in errors.
const (
	stepCheck   = "check schema"
	stepHolders = "delete dead holders"
	stepLocks   = "delete lock rows of dead holders"
	stepDryRun  = "count dead rows (dry run)"
)

// RunOnce runs one pass and reports what it did. Several passes may run at
// once, in this process or others. When ctx is cancelled the batch in flight
// is finished, and RunOnce returns the stats so far with an error wrapping
// ErrInterrupted and ctx's error. Any other error wraps ErrPass and is a
// *PassError.
func (r *Reaper) RunOnce(ctx context.Context) (Stats, error) {
	st, err := r.pass(ctx)
	r.report(st, err, false)
	return st, err
}

func (r *Reaper) pass(ctx context.Context) (Stats, error) {
	start := time.Now()
	st := Stats{DryRun: r.cfg.DryRun}
	err := interrupted(ctx)
	if err == nil {
		err = r.checkSchema(ctx)
	}
	switch {
	case err != nil:
	case r.cfg.DryRun:
		err = r.count(ctx, &st)
	default:
		err = r.reap(ctx, &st)
	}
	st.Duration = time.Since(start)
	return st, err
}

// reap deletes dead holders, then the lock rows of holders that are gone, a
// batch (one call of the schema's reap_holders or reap_locks) at a time.
func (r *Reaper) reap(ctx context.Context, st *Stats) error {
	size := r.cfg.BatchSize
	for {
		if err := interrupted(ctx); err != nil {
			return err
		}
		var n int
		err := r.batch(ctx, stepHolders, true, func(ctx context.Context, tx pgx.Tx) error {
			return tx.QueryRow(ctx, r.reapHolders, size).Scan(&n)
		})
		if err != nil {
			return err
		}
		st.Batches++
		st.Holders += int64(n)
		if n < size {
			break
		}
	}
	// from is reap_locks' cursor: the holder id it looks at next, nil
	// (start) at first and when it has looked at every gone holder.
	var from *int64
	for {
		if err := interrupted(ctx); err != nil {
			return err
		}
		var n int
		var skipped int64
		err := r.batch(ctx, stepLocks, true, func(ctx context.Context, tx pgx.Tx) error {
			return tx.QueryRow(ctx, r.reapLocks, size, from).Scan(&n, &skipped, &from)
		})
		if err != nil {
			return err
		}
		st.Batches++
		st.Locks += int64(n)
		st.Skipped += skipped
		if from == nil {
			return nil
		}
	}
}

// count is the dry run: the schema's reap_dry_run counts what reap would
// delete, taking no locks. Unlike reap, which deletes the locks of a holder
// only once its row is gone, it counts the locks of every holder that is not
// alive: those are the rows a pass would delete once the holder rows are gone.
func (r *Reaper) count(ctx context.Context, st *Stats) error {
	return r.batch(ctx, stepDryRun, false, func(ctx context.Context, tx pgx.Tx) error {
		return tx.QueryRow(ctx, r.dryRun).Scan(&st.Holders, &st.Locks)
	})
}

// batch runs f in a transaction of its own, bounded by BatchTimeout, and
// commits it when commit is true (rolls it back otherwise). Starting a batch
// obeys ctx; once started, a batch runs to its end even if ctx is cancelled,
// so that an interrupted pass keeps the work of its last batch.
func (r *Reaper) batch(ctx context.Context, step string, commit bool, f func(context.Context, pgx.Tx) error) error {
	limit := r.cfg.BatchTimeout + clientGrace
	bctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), limit)
	defer cancel()
	sctx, scancel := context.WithTimeout(ctx, limit)
	tx, err := r.pool.Begin(sctx)
	scancel()
	if err != nil {
		if ctx.Err() != nil {
			return interruptedErr(ctx)
		}
		return r.fail(step, err)
	}
	defer func() { _ = tx.Rollback(bctx) }() // a no-op after Commit
	if _, err := tx.Exec(bctx, r.setLocal); err != nil {
		return r.fail(step, err)
	}
	if err := f(bctx, tx); err != nil {
		return r.fail(step, err)
	}
	if commit {
		if err := tx.Commit(bctx); err != nil {
			return r.fail(step, err)
		}
	}
	return nil
}

func interrupted(ctx context.Context) error {
	if ctx.Err() == nil {
		return nil
	}
	return interruptedErr(ctx)
}

func interruptedErr(ctx context.Context) error {
	return fmt.Errorf("%w: %w", ErrInterrupted, context.Cause(ctx))
}

// PassError is the error of a failed pass: what the pass was doing, what
// went wrong, and how to fix it.
type PassError struct {
	// Step is what the pass was doing, e.g. "delete dead holders".
	Step string
	// Kind is ErrUnreachable, ErrTimeout, ErrNotMigrated,
	// ErrSchemaIncompatible, ErrPermission, or nil when the failure fits
	// none of them.
	Kind error
	// Hint says how to fix it.
	Hint string
	// Err is the underlying error.
	Err error
}

func (e *PassError) Error() string {
	s := "reaper: " + e.Step + " failed"
	if e.Kind != nil {
		s += ": " + trimPrefix(e.Kind.Error())
	}
	if e.Hint != "" {
		s += " (" + e.Hint + ")"
	}
	return s + ": " + e.Err.Error()
}

// Unwrap returns ErrPass, Kind (when set) and the underlying error, so that
// errors.Is and errors.As see all three.
func (e *PassError) Unwrap() []error {
	if e.Kind == nil {
		return []error{ErrPass, e.Err}
	}
	return []error{ErrPass, e.Kind, e.Err}
}

func trimPrefix(s string) string {
	const p = "reaper: "
	if len(s) > len(p) && s[:len(p)] == p {
		return s[len(p):]
	}
	return s
}

// fail classifies err into a PassError with a hint on how to fix it.
func (r *Reaper) fail(step string, err error) error {
	e := &PassError{Step: step, Err: err}
	var pgErr *pgconn.PgError
	var connErr *pgconn.ConnectError
	var netErr net.Error
	switch {
	case errors.As(err, &pgErr):
		switch code := pgErr.Code; {
		case code == "57014":
			e.Kind = ErrTimeout
			e.Hint = fmt.Sprintf("a batch ran longer than the batch timeout of %s: raise the timeout or lower the batch size (%d)",
				r.cfg.BatchTimeout, r.cfg.BatchSize)
		case code == "55P03":
			e.Kind = ErrTimeout
			e.Hint = fmt.Sprintf("waited longer than the batch timeout of %s for a lock, most likely a table lock held by a migration or other DDL on the pglease tables: let it finish or raise the timeout",
				r.cfg.BatchTimeout)
		case code == "42P01" || code == "3F000" || code == "42883":
			e.Kind = ErrNotMigrated
			e.Hint = fmt.Sprintf("schema %q lacks the pglease tables or functions: apply the migrations (reaper migrate up, or migrations.Up) or point the reaper at the schema they were applied to",
				r.cfg.Schema)
		case code == "42501":
			e.Kind = ErrPermission
			e.Hint = fmt.Sprintf("the reaper's role needs the reaper grant set of schema %q: as its owner, SELECT %s.grant_reaper('<role>') (see examples/reaper/grants.sql)",
				r.cfg.Schema, pgx.Identifier{r.cfg.Schema}.Sanitize())
		case code == "28P01" || code == "28000":
			e.Kind = ErrUnreachable
			e.Hint = "the server refused the login: check the user name and password of the connection settings"
		case code == "3D000":
			e.Kind = ErrUnreachable
			e.Hint = "the database named in the connection settings does not exist"
		case len(code) == 5 && code[:2] == "08" || code == "57P01" || code == "57P02" || code == "57P03" || code == "53300":
			e.Kind = ErrUnreachable
			e.Hint = "the connection failed or the server is shutting down or full: the next pass retries"
		}
	case errors.As(err, &connErr):
		e.Kind = ErrUnreachable
		e.Hint = "could not connect: check the connection settings (host, port, user, database) and that PostgreSQL is running and reachable"
	case errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err):
		e.Kind = ErrTimeout
		e.Hint = fmt.Sprintf("the database did not answer within the batch timeout of %s: check the network and the server's load", r.cfg.BatchTimeout)
	case errors.As(err, &netErr):
		e.Kind = ErrUnreachable
		e.Hint = "the connection to the database broke: the next pass retries"
	}
	return e
}

// report hands a pass to OnPass, then logs it: whoever reads the log line
// finds OnPass's effects (metrics, say) already there. A pass that did
// nothing is logged at debug level only. Failures of RunOnce are the caller's
// to log; failures of scheduled passes, which have no caller, are logged here.
func (r *Reaper) report(st Stats, err error, scheduled bool) {
	if r.cfg.OnPass != nil {
		r.cfg.OnPass(st, err)
	}
	attrs := []slog.Attr{
		slog.String("schema", r.cfg.Schema),
		slog.Int64("holders", st.Holders),
		slog.Int64("locks", st.Locks),
		slog.Int64("skipped", st.Skipped),
		slog.Int("batches", st.Batches),
		slog.Int64("duration_ms", st.Duration.Milliseconds()),
		slog.Bool("dry_run", st.DryRun),
	}
	ctx := context.Background()
	switch {
	case err == nil:
		level := slog.LevelInfo
		if st.Holders == 0 && st.Locks == 0 && st.Skipped == 0 {
			level = slog.LevelDebug
		}
		r.log.LogAttrs(ctx, level, msgPassDone, attrs...)
	case errors.Is(err, ErrInterrupted):
		r.log.LogAttrs(ctx, slog.LevelInfo, msgPassInterrupted, attrs...)
	case scheduled:
		r.log.LogAttrs(ctx, slog.LevelError, msgPassFailed, append(attrs, slog.String("error", err.Error()))...)
	}
}
