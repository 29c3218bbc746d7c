// Package lease provides lease locks kept in PostgreSQL.
//
// A lock is a row in the locks table keyed by (name, id). A Client registers
// one row in the holders table and renews it with one statement per
// HeartbeatInterval, however many locks it holds. A lock is held while its row
// exists and its holder is alive. Lock rows are only inserted and deleted.
//
// A key is locked exclusively (Acquire), shared (AcquireShared: any number of
// readers, or one writer) or as one of N permits of a semaphore
// (Client.Semaphore); several keys are locked all or nothing with AcquireSet.
// Every grant is a row of its own with its own fencing token, and acquirers
// that wait are served in arrival order across all clients, through a queue
// that DBAs see in the view waiting (see Kind).
//
// # Failure model, in plain words
//
//   - The database is the authority, and only its clock decides expiry. Client
//     clocks may be wrong; it does not matter.
//   - A process that crashes, hangs or is cut off keeps its locks until its
//     holder's lease runs out (TTL after its last renewal); then anyone may take
//     them over, in one round trip. A dropped connection or a recycled pool
//     connection costs nothing: the lease lives in a row, not a session.
//   - A holder whose lease ran out is dead for good. Its heartbeat refuses to
//     renew it, even if the process comes back a moment later.
//   - The client gives up first. It reports every lock lost (Lock.Done closes,
//     Lock.Context is cancelled with a *LostError, matching ErrLost, that says
//     why) when TTL - SafetyMargin has
//     passed on its monotonic clock since the start of its last successful
//     renewal: before the database could consider the lease expired. A lock row
//     deleted from under its holder (by a DBA) is reported lost at the next
//     heartbeat, which counts the holder's rows.
//   - A process can still be paused (GC, SIGSTOP, a VM migration) after it
//     checked its lock and before it wrote. No lease can prevent that. The
//     fencing token can: every grant of a key, of any kind, gets a larger
//     token than the ones before, and the SQL function fence, called in the transaction that
//     writes the protected data, fails unless the token is the live holder's and
//     holds a row lock that keeps any takeover waiting until that transaction
//     ends. A write fenced this way never lands after the lock passed on.
//   - Acquire commits durably. Release commits asynchronously, so a crash can
//     undo it, and an acquire whose ctx ended may still commit after the client
//     gave up on it. Either leaves a row of a live holder that the client does
//     not hold; the heartbeat's count of the holder's rows finds it, and the
//     client deletes it again within a heartbeat or two.
//   - A token is never handed out twice, not even across a crash. The advisory
//     mode draws its tokens without waiting for a WAL flush; after a crash (or
//     a standby's promotion) the first draw moves the sequence 2^40 ahead,
//     past anything handed out before, so tokens may jump but never repeat or
//     go back.
//   - Waiters queue in the database, in arrival order across every client. A
//     release hands the key to the first waiters that fit, in its own
//     transaction, with new tokens, and notifies only their holders; a release
//     nobody waits for notifies nobody. A Client keeps a LISTEN connection
//     only while it waits.
//   - Mutual exclusion never depends on notifications: they only wake waiters
//     early. A missed one costs latency (PollInterval), never correctness: a
//     key handed over whose notification was lost is found by the waiter's
//     next attempt.
//   - A failover keeps table locks only if acquires and renewals were on the
//     standby that takes over: a synchronous one (Config.Replication checks).
//     Advisory locks are lost with their sessions (LossConnectionLost).
//     Connect with every node and target_session_attrs=read-write; waiters
//     ride through, and node clocks must agree to well within SafetyMargin.
//
// # Locks are not reentrant
//
// A Client is one holder. An acquirer of a key the Client already holds waits
// for its release like any other, so goroutines of one process take turns as
// processes do; but an acquire made from inside the critical section of that
// very lock (with a context derived from Lock.Context or from Do's) would wait
// for itself, and returns ErrAlreadyHeld at once.
//
// # Use
//
//	client, err := lease.New(pool, &lease.Config{TTL: 30 * time.Second})
//	defer client.Close(ctx)
//	lock, err := client.Acquire(ctx, lease.Key{Name: "invoice", ID: "42"})
//	defer lock.Release(ctx)
//	err = pgx.BeginFunc(lock.Context(), pool, func(tx pgx.Tx) error {
//	    if err := lock.Fence(ctx, tx); err != nil {
//	        return err // lost: do not write
//	    }
//	    _, err := tx.Exec(ctx, "UPDATE invoices SET ...")
//	    return err
//	})
//
// # Metrics
//
// With Config.MeterProvider set, the Client records OpenTelemetry metrics
// under the meter MeterName: acquire and wait durations, attempts, held
// locks, waiting acquirers, losses by reason, heartbeat durations and
// notifications received (the README's "Metrics" section lists them all).
// Without it nothing is recorded, at no cost.
//
// The schema is created by package migrations (or the reaper binary's
// "migrate up"). Rows of dead holders are taken over by acquirers as needed
// and deleted in bulk by package reaper.
package lease
