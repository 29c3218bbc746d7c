package lease_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
	"github.com/pglease/pglease/migrations"
)

// exampleDB returns a pool and a fresh migrated schema on the test cluster.
func exampleDB(ctx context.Context) (*pgxpool.Pool, string, func()) {
	cl, err := pgtest.SharedCluster()
	if err != nil {
		panic(err)
	}
	pool, err := pgxpool.New(ctx, cl.URL())
	if err != nil {
		panic(err)
	}
	schema := pgtest.NewSchemaName()
	if _, err := migrations.Up(ctx, pool, schema); err != nil {
		panic(err)
	}
	return pool, schema, func() {
		_, _ = pool.Exec(ctx, "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
		pool.Close()
	}
}

// Two services want the same invoice; the second learns who has it.
func ExampleClient_TryAcquire() {
	ctx := context.Background()
	pool, schema, done := exampleDB(ctx)
	defer done()

	billing, _ := lease.New(pool, &lease.Config{Schema: schema, Owner: lease.Owner{Application: "billing"}})
	defer billing.Close(ctx)
	mailer, _ := lease.New(pool, &lease.Config{Schema: schema, Owner: lease.Owner{Application: "mailer"}})
	defer mailer.Close(ctx)

	key := lease.Key{Name: "invoice", ID: "2024-0042"}
	lock, err := billing.Acquire(ctx, key)
	if err != nil {
		panic(err)
	}
	_, err = mailer.TryAcquire(ctx, key)
	var locked *lease.LockedError
	if errors.As(err, &locked) {
		fmt.Println("mailer: locked by", locked.Application)
	}
	_ = lock.Release(ctx)
	if l, err := mailer.TryAcquire(ctx, key); err == nil {
		fmt.Println("mailer: got it, token is larger:", l.Token() > lock.Token())
		_ = l.Release(ctx)
	}
	// Output:
	// mailer: locked by billing
	// mailer: got it, token is larger: true
}

// Fence guards the write that the lock protects, inside your transaction.
func ExampleLock_Fence() {
	ctx := context.Background()
	pool, schema, done := exampleDB(ctx)
	defer done()
	_, _ = pool.Exec(ctx, "CREATE TABLE "+pgx.Identifier{schema, "invoices"}.Sanitize()+" (id text PRIMARY KEY, state text)")
	_, _ = pool.Exec(ctx, "INSERT INTO "+pgx.Identifier{schema, "invoices"}.Sanitize()+" VALUES ('42', 'draft')")

	client, _ := lease.New(pool, &lease.Config{Schema: schema})
	defer client.Close(ctx)
	lock, err := client.Acquire(ctx, lease.Key{Name: "invoice", ID: "42"})
	if err != nil {
		panic(err)
	}
	defer lock.Release(ctx)

	err = pgx.BeginFunc(lock.Context(), pool, func(tx pgx.Tx) error {
		if err := lock.Fence(ctx, tx); err != nil {
			return err // lost: the write must not happen
		}
		_, err := tx.Exec(ctx, "UPDATE "+pgx.Identifier{schema, "invoices"}.Sanitize()+" SET state = 'sent' WHERE id = '42'")
		return err
	})
	fmt.Println("write:", err)
	// Output:
	// write: <nil>
}

// Readers share a key; a writer waits for them, and readers that come after
// the writer wait for it.
func ExampleClient_AcquireShared() {
	ctx := context.Background()
	pool, schema, done := exampleDB(ctx)
	defer done()
	a, _ := lease.New(pool, &lease.Config{Schema: schema})
	defer a.Close(ctx)
	b, _ := lease.New(pool, &lease.Config{Schema: schema})
	defer b.Close(ctx)

	key := lease.Key{Name: "price-list", ID: "eu"}
	r1, _ := a.AcquireShared(ctx, key)
	r2, err := b.AcquireShared(ctx, key)
	fmt.Println("two readers:", err == nil, r1.Kind(), r2.Kind())
	_, err = b.TryAcquire(ctx, key)
	fmt.Println("writer refused:", errors.Is(err, lease.ErrLocked))
	_ = r1.Release(ctx)
	_ = r2.Release(ctx)
	w, err := b.TryAcquire(ctx, key)
	fmt.Println("writer after the readers:", err == nil, w.Kind())
	_ = w.Release(ctx)
	// Output:
	// two readers: true shared shared
	// writer refused: true
	// writer after the readers: true exclusive
}

// At most two holders of a partner API at once, across every process.
func ExampleClient_Semaphore() {
	ctx := context.Background()
	pool, schema, done := exampleDB(ctx)
	defer done()
	client, _ := lease.New(pool, &lease.Config{Schema: schema})
	defer client.Close(ctx)

	sem, err := client.Semaphore(lease.Key{Name: "partner-api", ID: "acme"}, 2)
	if err != nil {
		panic(err)
	}
	p1, _ := sem.Acquire(ctx)
	p2, _ := sem.Acquire(ctx)
	_, err = sem.TryAcquire(ctx)
	fmt.Println("slots:", p1.Slot(), p2.Slot(), "third refused:", errors.Is(err, lease.ErrLocked))

	other, _ := client.Semaphore(sem.Key(), 3)
	_, err = other.TryAcquire(ctx)
	fmt.Println("another limit refused:", errors.Is(err, lease.ErrKindConflict))
	_ = p1.Release(ctx)
	_ = p2.Release(ctx)
	// Output:
	// slots: 1 2 third refused: true
	// another limit refused: true
}

// Move stock between two warehouses: both keys or neither, and no deadlock
// with a transfer the other way.
func ExampleClient_AcquireSet() {
	ctx := context.Background()
	pool, schema, done := exampleDB(ctx)
	defer done()
	client, _ := lease.New(pool, &lease.Config{Schema: schema})
	defer client.Close(ctx)

	north := lease.Key{Name: "warehouse", ID: "north"}
	south := lease.Key{Name: "warehouse", ID: "south"}
	set, err := client.AcquireSet(ctx, []lease.SetMember{{Key: north}, {Key: south}})
	if err != nil {
		panic(err)
	}
	fmt.Println("held:", len(set.Locks()), set.Lock(north).Token() != set.Lock(south).Token())
	_, err = client.TryAcquireSet(ctx, []lease.SetMember{{Key: south}, {Key: lease.Key{Name: "warehouse", ID: "east"}}})
	fmt.Println("overlapping set refused:", errors.Is(err, lease.ErrLocked))
	fmt.Println("release:", set.Release(ctx))
	// Output:
	// held: 2 true
	// overlapping set refused: true
	// release: <nil>
}
