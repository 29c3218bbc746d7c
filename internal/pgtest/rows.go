package pgtest

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
)

// Fixtures shared by the reaper's tests and the reaper binary's: the rows a
// dead process leaves behind, made directly in the tables. They stand for
// the state a crash leaves, not for anything the library does, so they never
// replace a call of the schema's own functions.

// Qualified returns the quoted, schema-qualified name of one of the schema's
// tables, sequences or functions, such as "holders" or "renew".
func (d *DB) Qualified(name string) string { return pgx.Identifier{d.Schema, name}.Sanitize() }

// AddHolders inserts n holder rows, alive for another hour or dead for an
// hour, and returns their ids.
func (d *DB) AddHolders(ctx context.Context, tb testing.TB, n int, alive bool) []int64 {
	tb.Helper()
	sign := "-"
	if alive {
		sign = "+"
	}
	rows, err := d.Pool.Query(ctx, `INSERT INTO `+d.Qualified("holders")+` (host, pid, application, ttl, expires_at)
		SELECT 'host', g, 'pgtest', interval '1 hour', clock_timestamp() `+sign+` interval '1 hour'
		  FROM generate_series(1, $1) g RETURNING id`, n)
	if err != nil {
		tb.Fatalf("pgtest: add holders: %v", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		tb.Fatalf("pgtest: add holders: %v", err)
	}
	return ids
}

// AddLocks inserts per lock rows for each of holderIDs (which need not
// exist), named "job" with entity ids "<holder id>:<1..per>", each with a
// token from the schema's sequence.
func (d *DB) AddLocks(ctx context.Context, tb testing.TB, holderIDs []int64, per int) {
	tb.Helper()
	_, err := d.Pool.Exec(ctx, `INSERT INTO `+d.Qualified("locks")+` (name, entity_id, token, holder_id)
		SELECT 'job', h::text || ':' || g::text, nextval($3::regclass), h
		  FROM unnest($1::bigint[]) h, generate_series(1, $2) g`,
		holderIDs, per, d.Qualified("token_seq"))
	if err != nil {
		tb.Fatalf("pgtest: add locks: %v", err)
	}
}

// Count runs query, which returns one count.
func (d *DB) Count(ctx context.Context, tb testing.TB, query string, args ...any) int64 {
	tb.Helper()
	var n int64
	if err := d.Pool.QueryRow(ctx, query, args...).Scan(&n); err != nil {
		tb.Fatalf("pgtest: %s: %v", query, err)
	}
	return n
}
