package lease

import (
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Byte limits of a Key. Together with JSON escaping they keep one key inside
// one NOTIFY payload and one B-tree index entry.
const (
	MaxNameBytes = 255
	MaxIDBytes   = 1024
)

// Key names a lockable entity: an entity kind and its id, such as
// Key{Name: "invoice", ID: "2024-0042"}. Both parts are non-empty valid UTF-8
// without NUL bytes, at most MaxNameBytes and MaxIDBytes long.
type Key struct {
	Name string
	ID   string
}

func (k Key) String() string { return strconv.Quote(k.Name) + "/" + strconv.Quote(k.ID) }

// Validate reports why k cannot be used, as a *KeyError, or nil.
func (k Key) Validate() error {
	if err := checkPart(k.Name, MaxNameBytes); err != "" {
		return &KeyError{Key: k, Field: "Name", Reason: err}
	}
	if err := checkPart(k.ID, MaxIDBytes); err != "" {
		return &KeyError{Key: k, Field: "ID", Reason: err}
	}
	return nil
}

func checkPart(s string, max int) string {
	switch {
	case s == "":
		return "is empty"
	case len(s) > max:
		return fmt.Sprintf("is %d bytes, the limit is %d", len(s), max)
	case !utf8.ValidString(s):
		return "is not valid UTF-8"
	case strings.IndexByte(s, 0) >= 0:
		return "contains a NUL byte (PostgreSQL text cannot hold one)"
	}
	return ""
}

// mapKey is the key's identity in maps and in the dispatcher: NUL cannot occur
// in either part, so the encoding is unambiguous.
func (k Key) mapKey() string { return k.Name + "\x00" + k.ID }
