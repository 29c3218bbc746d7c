package lease

import (
	"crypto/md5"
	"encoding/hex"

	"github.com/jackc/pgx/v5"
)

// queries holds every statement the client sends, with the schema quoted once.
type queries struct {
	register string
	acquire  string
	// acquireKeys is every table-path acquire (schema version 7: with
	// handoffs); acquireKeysSeen is the same where the schema has version 9,
	// which is told the largest token the holder has had.
	acquireKeys     string
	acquireKeysSeen string
	leave           string
	release         string
	renew           string
	verify          string
	dropHolder      string
	fence           string
	leader          string // who holds a key, for elections
	// markListening registers a LISTEN connection as a listener, so that
	// releases announce themselves to it on channel(); unmarkListening
	// undoes it.
	markListening   string
	unmarkListening string
}

func newQueries(schema string) queries {
	s := pgx.Identifier{schema}.Sanitize()
	return queries{
		register: `SELECT ` + s + `.register($1, $2, $3, $4::bigint * interval '1 microsecond', $5)`,
		acquire: `SELECT acquired, token, holder_id, host, pid, application, acquired_at,
			(extract(epoch FROM expires_in) * 1000000)::bigint, busy
			FROM ` + s + `.acquire($1, $2, $3, $4)`,
		acquireKeys: `SELECT acquired, tokens, slots, acquired_at, busy, queued, blocked,
			holder_id, host, pid, application, held_since,
			(extract(epoch FROM expires_in) * 1000000)::bigint, waiter
			FROM ` + s + `.acquire_keys($1, $2, $3::text[]::"char"[], $4, $5, $6, $7, $8, $9)`,
		acquireKeysSeen: `SELECT acquired, tokens, slots, acquired_at, busy, queued, blocked,
			holder_id, host, pid, application, held_since,
			(extract(epoch FROM expires_in) * 1000000)::bigint, waiter
			FROM ` + s + `.acquire_keys($1, $2, $3::text[]::"char"[], $4, $5, $6, $7, $8, $9, $10)`,
		leave:      `SELECT ` + s + `.leave($1, $2, $3, $4, $5)`,
		release:    `SELECT ` + s + `.release($1, $2, $3, $4, $5)`,
		renew:      `SELECT alive, locks, tokens_xor FROM ` + s + `.renew($1, $2)`,
		verify:     `SELECT name, entity_id, token FROM ` + s + `.holder_locks($1, $2)`,
		dropHolder: `SELECT ` + s + `.close_holder($1, $2)`,
		fence:      `SELECT ` + s + `.fence($1, $2, $3)`,
		leader: `SELECT holder_id, host, pid, application, acquired_at, token,
			(extract(epoch FROM time_left) * 1000000)::bigint
			FROM ` + s + `.held WHERE name = $1 AND entity_id = $2 AND alive`,

		markListening:   `SELECT ` + s + `.mark_listening()`,
		unmarkListening: `SELECT pg_catalog.pg_advisory_unlock_shared(1885826163, pg_catalog.hashtext($1))`,
	}
}

// channelName is the NOTIFY channel of schema, as the SQL function channel()
// computes it.
func channelName(schema string) string {
	sum := md5.Sum([]byte(schema))
	return "pglease_" + hex.EncodeToString(sum[:])
}
