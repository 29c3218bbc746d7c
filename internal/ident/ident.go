// Package ident validates the identifiers and keys that pglease sends to
// PostgreSQL, so that bad input is refused before any SQL reaches the server.
//
// Its errors carry no package prefix: each caller adds its own ("lease:",
// "migrations:", "reaper:").
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
var ErrInvalidSchema = errors.New("invalid schema name")

// migration00002Placeholders are the placeholders that the released migration
// 00002 replaces after it has pasted the schema's quoted name into its
// template: the same text inside the name is replaced too. (@schema@ is
// replaced first, so a name containing it comes through intact.)
var migration00002Placeholders = []string{"@guard@", "@listener@", "@channel@"}

// ValidateSchema reports whether s can be used as a schema name exactly as
// given. It refuses:
//
//   - the empty name, names longer than MaxIdentifierBytes (PostgreSQL would
//     silently truncate them), invalid UTF-8, and NUL bytes (pgx's quoting
//     silently drops them);
//   - names starting with "pg_", which PostgreSQL reserves (only lowercase:
//     "PG_x" is an ordinary name);
//   - "$user", which search_path reads as the current user's schema even when
//     quoted: the migrations and the functions' pinned search_path would name
//     another schema;
//   - what the released migration 00002 cannot handle, because it builds the
//     bodies of advisory_acquire and advisory_release by pasting the quoted
//     name into SQL text: a single quote (it ends the string literal
//     '<schema>.token_seq' early: the migration fails half-way, or, with a
//     pair of quotes, advisory tokens come from another schema's sequence), a
//     backslash (in that literal it is an escape character in sessions with
//     standard_conforming_strings off: tokens from another schema's
//     sequence), "$$" (it ends the dollar-quoted function body), and the
//     placeholders @guard@, @listener@ and @channel@ (00002 replaces them
//     after the name is in). Released migrations never change, so these
//     names stay refused.
//
// Everything else is accepted: double quotes, spaces, dollar signs other than
// "$$", '@' outside those placeholders, uppercase, any Unicode.
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
	case strings.HasPrefix(s, "pg_"):
		return fmt.Errorf("%w: %q: names starting with pg_ are reserved by PostgreSQL", ErrInvalidSchema, s)
	case s == "$user":
		return fmt.Errorf("%w: %q: search_path reads it as the current user's schema, even quoted", ErrInvalidSchema, s)
	case strings.IndexByte(s, '\'') >= 0:
		return migrationError(s, "a single quote (')", "it would end a string literal early")
	case strings.IndexByte(s, '\\') >= 0:
		return migrationError(s, `a backslash (\)`, "in a string literal it is an escape character when standard_conforming_strings is off")
	case strings.Contains(s, "$$"):
		return migrationError(s, "$$", "it would end the dollar-quoted function body")
	}
	for _, p := range migration00002Placeholders {
		if strings.Contains(s, p) {
			return migrationError(s, p, "the migration replaces that placeholder text after pasting the name in")
		}
	}
	return nil
}

func migrationError(s, what, why string) error {
	return fmt.Errorf("%w: %q contains %s: the released migration 00002 builds the advisory functions' bodies from the schema name, and %s; choose another name",
		ErrInvalidSchema, s, what, why)
}
