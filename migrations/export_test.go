package migrations

import (
	"context"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pressly/goose/v3"
)

// UpTo applies the pending migrations of schema up to and including version,
// so that tests can look at a schema as an older release left it.
func UpTo(ctx context.Context, pool *pgxpool.Pool, schema string, version int64) error {
	return withProvider(ctx, pool, schema, true, func(p *goose.Provider) error {
		_, err := p.UpTo(ctx, version)
		return err
	})
}

// LockID is the advisory lock that Up and Down of schema take.
func LockID(schema string) int64 { return lockID(schema) }
