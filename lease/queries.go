package lease

import (
	"crypto/md5"
	"encoding/hex"

	"github.com/jackc/pgx/v5"
)

// queries holds every statement the client sends, with the schema quoted once.
type queries struct {
	register   string
	acquire    string
	release    string
	renew      string
	verify     string
	dropHolder string
	dropOrphan string
	fence      string
	// markListening registers a LISTEN connection as a listener, so that
	// advisory releases announce themselves to it.
	markListening string
}

func newQueries(schema string) queries {
	s := pgx.Identifier{schema}.Sanitize()
	return queries{
		register: `INSERT INTO ` + s + `.holders (host, pid, application, ttl, expires_at)
			VALUES ($1, $2, $3, $4::bigint * interval '1 microsecond',
			        clock_timestamp() + $4::bigint * interval '1 microsecond')
			RETURNING id`,
		acquire: `SELECT acquired, token, holder_id, host, pid, application, acquired_at,
			(extract(epoch FROM expires_in) * 1000000)::bigint, busy
			FROM ` + s + `.acquire($1, $2, $3)`,
		release: `SELECT ` + s + `.release($1, $2, $3)`,
		renew:   `SELECT alive, locks, tokens_xor FROM ` + s + `.renew($1)`,
		verify:  `SELECT name, entity_id, token FROM ` + s + `.locks WHERE holder_id = $1`,
		dropHolder: `WITH l AS (DELETE FROM ` + s + `.locks WHERE holder_id = $1)
			DELETE FROM ` + s + `.holders WHERE id = $1`,
		dropOrphan: `DELETE FROM ` + s + `.locks WHERE name = $1 AND entity_id = $2 AND holder_id = $3`,
		fence:      `SELECT ` + s + `.fence($1, $2, $3)`,

		markListening: `SELECT ` + s + `.mark_listening()`,
	}
}

// channelName is the NOTIFY channel of schema, as the SQL function channel()
// computes it.
func channelName(schema string) string {
	sum := md5.Sum([]byte(schema))
	return "pglease_" + hex.EncodeToString(sum[:])
}
