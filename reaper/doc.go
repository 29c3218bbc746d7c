// Package reaper deletes what dead pglease holders left behind: their holder
// rows and their lock rows.
//
// A holder is dead when its expires_at has passed on the database clock
// (clock_timestamp(), never the reaper's own clock), or when its row is gone.
// A dead holder's locks are already free to take: acquirers take them over
// without waiting for the reaper. The reaper only keeps the tables small and
// the held view honest, and its deletes wake the waiters of the keys it frees
// (the delete trigger on the locks table sends the notifications).
//
// # What a pass does
//
// [Reaper.RunOnce] runs one pass. The work is done by the schema's own SQL
// functions (migration 00004), which a DBA or pg_cron can call as well, so a
// pass first checks that the schema is at [SchemaVersion] or later
// (schema_info()). Then, in two steps:
//
//  1. Delete dead holder rows, a batch (one call of reap_holders) at a time.
//     Rows are picked with FOR UPDATE SKIP LOCKED and the DELETE checks the
//     expiry again, so a heartbeat that renewed the holder a moment ago wins,
//     and a heartbeat still in flight waits for the delete and then finds no
//     row to renew.
//  2. Delete the lock rows whose holder row is gone, a batch (one call of
//     reap_locks) at a time, again with FOR UPDATE SKIP LOCKED and a re-check
//     in the DELETE. reap_locks finds them by walking the distinct values of
//     the locks_holder_id index (never scanning the whole locks table), and
//     hands back a cursor so that the next batch goes on where it stopped.
//
// Holder rows go first on purpose. A lock row is deleted only once its holder
// row is gone, and a holder row that is gone can never be renewed, so the
// reaper can never delete a lock row whose holder then comes back to life.
// The lock rows of a holder that died during a pass, or whose row was locked
// at that moment, are left for the next pass.
//
// # Failure model
//
//   - Every batch is its own transaction, bounded by [Config.BatchTimeout]
//     (a statement_timeout and lock_timeout inside the transaction, and a
//     context deadline a little later in case the network stalls). A failed
//     or timed-out batch rolls back and the pass stops with an error; work
//     already committed stays done. Running the next pass later is always
//     safe: a pass has no state of its own.
//   - A row that another transaction has locked (a fenced write holding
//     FOR SHARE through fence(), an acquirer taking the key over, another
//     reaper) is skipped, not waited on, and counted in [Stats.Skipped]. A
//     later pass deletes it. The reaper never makes an acquirer or a fenced
//     write wait for more than one batch's row locks.
//   - Any number of reapers may run at once against the same schema: they
//     skip each other's rows, so they neither fail nor deadlock, and each row
//     is deleted by exactly one of them.
//   - Batches commit asynchronously (synchronous_commit off). A batch lost in
//     a database crash only means rows that were dead stay until the next
//     pass; a lost delete can never make a dead holder alive again.
//   - When the context passed to RunOnce is cancelled, the batch in flight is
//     finished (bounded by BatchTimeout) rather than abandoned, and RunOnce
//     returns the work done so far with an error wrapping the context's.
//   - The reaper never changes the locks or holders of live holders, and it
//     never uses the Go clock for expiry.
//
// # Schedules
//
// [Reaper.Start] runs passes on a cron schedule until [Reaper.Stop]: a
// standard five-field expression ("*/5 * * * *"), an optional leading seconds
// field, or a descriptor ("@hourly", "@every 30s"). One pass runs at a time:
// a pass due while the previous one still runs is skipped and logged. A pass
// failure is logged and reported to [Config.OnPass]; the schedule carries on.
package reaper
