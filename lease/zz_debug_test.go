package lease_test

import (
	"context"
	"fmt"
	"os"
	"runtime/pprof"
	"time"
)

// debugWatch dumps the database's view after d (temporary).
func (e *env) debugWatch(d time.Duration) {
	t := time.AfterFunc(d, func() {
		ctx := context.Background()
		for _, q := range []string{
			"SELECT 'lock', name||'/'||entity_id, token::text, holder_id::text, kind::text FROM " + e.table("locks"),
			"SELECT 'waiter', name||'/'||entity_id, id::text, holder_id::text, handoff::text FROM " + e.table("waiters"),
			"SELECT 'holder', id::text, (expires_at > clock_timestamp())::text, host, pid::text FROM " + e.table("holders"),
			"SELECT 'act', pid::text, state, coalesce(wait_event_type,'')||':'||coalesce(wait_event,''), left(query, 80) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
			"SELECT 'plock', pid::text, locktype||' '||coalesce(classid::text,'')||' '||coalesce(objid::text,'')||' '||objsubid::text, mode, granted::text FROM pg_locks WHERE locktype = 'advisory'",
		} {
			rows, err := e.db.Pool.Query(ctx, q)
			if err != nil {
				fmt.Fprintln(os.Stderr, "debug:", err)
				continue
			}
			for rows.Next() {
				var a, b, c, d, f string
				if err := rows.Scan(&a, &b, &c, &d, &f); err != nil {
					fmt.Fprintln(os.Stderr, "debug:", err)
					break
				}
				fmt.Fprintln(os.Stderr, "DEBUG", a, b, c, d, f)
			}
			rows.Close()
		}
		_ = pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
	})
	e.t.Cleanup(func() { t.Stop() })
}
