package lease_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"

	"github.com/pglease/pglease/internal/fuzzseed"
	"github.com/pglease/pglease/internal/pgtest"
	"github.com/pglease/pglease/lease"
)

// validPart is the documented rule for each part of a Key, written out
// independently of Key.Validate.
func validPart(s string, max int) bool {
	return s != "" && len(s) <= max && utf8.ValidString(s) && !strings.ContainsRune(s, 0)
}

// FuzzKeyValidate checks that Key.Validate accepts exactly the keys the
// documentation allows (non-empty, within the byte limits, valid UTF-8, no
// NUL), that an invalid key is refused before any SQL, and that a valid key
// round-trips through the database unchanged: the lock row holds the same
// bytes. Seeds: testdata/fuzz/FuzzKeyValidate at the repository root.
func FuzzKeyValidate(f *testing.F) {
	fuzzseed.Add(f, "../testdata/fuzz/FuzzKeyValidate")
	db := pgtest.NewDB(f)
	client, err := lease.New(db.Pool, &lease.Config{Schema: db.Schema, TTL: time.Minute})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = client.Close(context.Background()) })
	byToken := `SELECT name, entity_id FROM ` + pgx.Identifier{db.Schema, "locks"}.Sanitize() + ` WHERE token = $1`

	f.Fuzz(func(t *testing.T, name, id string) {
		key := lease.Key{Name: name, ID: id}
		err := key.Validate()
		want := validPart(name, lease.MaxNameBytes) && validPart(id, lease.MaxIDBytes)
		if (err == nil) != want {
			t.Fatalf("Validate(%s) = %v, want valid=%v", key, err, want)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err != nil {
			var ke *lease.KeyError
			if !errors.As(err, &ke) || !errors.Is(err, lease.ErrInvalidKey) {
				t.Fatalf("Validate error %v is not a *KeyError matching ErrInvalidKey", err)
			}
			if wantField := map[bool]string{true: "ID", false: "Name"}[validPart(name, lease.MaxNameBytes)]; ke.Field != wantField {
				t.Fatalf("KeyError.Field = %q, want %q", ke.Field, wantField)
			}
			if _, err := client.TryAcquire(ctx, key); !errors.Is(err, lease.ErrInvalidKey) {
				t.Fatalf("TryAcquire of an invalid key: %v, want ErrInvalidKey", err)
			}
			return
		}
		l, err := client.TryAcquire(ctx, key)
		if err != nil {
			t.Fatalf("TryAcquire(%s): %v", key, err)
		}
		if l.Key() != key {
			t.Fatalf("Lock.Key() = %s, want %s", l.Key(), key)
		}
		var gotName, gotID string
		if err := db.Pool.QueryRow(ctx, byToken, l.Token()).Scan(&gotName, &gotID); err != nil {
			t.Fatalf("read the lock row of %s: %v", key, err)
		}
		if gotName != name || gotID != id {
			t.Fatalf("the database holds %q/%q for %q/%q", gotName, gotID, name, id)
		}
		if err := l.Release(ctx); err != nil {
			t.Fatalf("Release(%s): %v", key, err)
		}
	})
}
