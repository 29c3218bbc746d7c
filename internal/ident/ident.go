// Package ident validates the identifiers and keys that pglease sends to
// PostgreSQL, so that bad input is refused before any SQL reaches the server.
package ident

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// DefaultSchema is the schema used when none is configured.
const DefaultSchema = "lease"

// MaxIdentifierBytes is PostgreSQL's identifier limit (NAMEDATALEN - 1).
const MaxIdentifierBytes = 63

// ErrInvalidSchema is wrapped by every schema validation error.
var ErrInvalidSchema = errors.New("lease: invalid schema name")

// ValidateSchema reports whether s can be used as a schema name exactly as
// given: PostgreSQL would silently truncate a longer name, and pgx's quoting
// silently drops NUL bytes, so both are refused rather than altered.
func ValidateSchema(s string) error {
	switch {
	case s == "":
		return fmt.Errorf("%w: empty (leave it unset for the default %q)", ErrInvalidSchema, DefaultSchema)
	case len(s) > MaxIdentifierBytes:
		return fmt.Errorf("%w: %d bytes, PostgreSQL allows at most %d", ErrInvalidSchema, len(s), MaxIdentifierBytes)
	case !utf8.ValidString(s):
		return fmt.Errorf("%w: not valid UTF-8", ErrInvalidSchema)
	case strings.IndexByte(s, 0) >= 0:
		return fmt.Errorf("%w: contains a NUL byte", ErrInvalidSchema)
	case strings.HasPrefix(strings.ToLower(s), "pg_"):
		return fmt.Errorf("%w: %q: names starting with pg_ are reserved by PostgreSQL", ErrInvalidSchema, s)
	}
	return nil
}
