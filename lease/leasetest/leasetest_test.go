package leasetest_test

import (
	"context"
	"errors"
	"testing"

	"github.com/pglease/pglease/lease"
	"github.com/pglease/pglease/lease/leasetest"
)

func TestMain(m *testing.M) { leasetest.Main(m) }

// The package gives a working, migrated schema of its own to each caller.
func TestNew(t *testing.T) {
	t.Parallel()
	a, b := leasetest.New(t), leasetest.New(t)
	if a.Schema == b.Schema {
		t.Fatalf("two calls share schema %q", a.Schema)
	}
	ctx := context.Background()
	client, err := lease.New(a.Pool, &lease.Config{Schema: a.Schema})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close(ctx)
	l, err := client.Acquire(ctx, lease.Key{Name: "t", ID: "1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.TryAcquire(ctx, lease.Key{Name: "t", ID: "1"}); !errors.Is(err, lease.ErrLocked) {
		t.Fatalf("second acquire = %v, want ErrLocked", err)
	}
	if err := l.Release(ctx); err != nil {
		t.Fatal(err)
	}
	// The other schema is untouched by this one's locks.
	var n int
	if err := b.Pool.QueryRow(ctx, "SELECT count(*) FROM \""+b.Schema+"\".holders").Scan(&n); err != nil || n != 0 {
		t.Fatalf("holders in the other schema: %d, %v", n, err)
	}
}
