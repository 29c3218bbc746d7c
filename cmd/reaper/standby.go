package main

import (
	"context"
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
)

// msgStandby is logged when the connection settings reach a standby.
const msgStandby = "reaper refuses to run against a standby"

// onStandby reports (and logs) whether the server the pool reaches is a
// standby. A standby cannot delete anything, and a reaper pointed at one
// would fail every pass while the primary's dead rows piled up; worse, after
// a failover the old primary may come back as a standby. An unreachable
// server is not judged here: the pass, or the daemon's connection check,
// says so in its own words.
func onStandby(ctx context.Context, pool *pgxpool.Pool, log *slog.Logger) bool {
	cctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	var standby bool
	if err := pool.QueryRow(cctx, `SELECT pg_is_in_recovery()`).Scan(&standby); err != nil || !standby {
		return false
	}
	log.Error(msgStandby, "reason", "the server is in recovery (pg_is_in_recovery() is true)",
		"hint", "point the connection settings at the primary, or name every node with target_session_attrs=read-write "+
			"(postgres://host1,host2/db?target_session_attrs=read-write) so that the reaper always reaches the primary, "+
			"also after a failover")
	return true
}
