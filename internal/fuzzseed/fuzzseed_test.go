package fuzzseed

import (
	"reflect"
	"testing"
)

func TestParse(t *testing.T) {
	got, err := Parse([]byte("go test fuzz v1\nstring(\"a\\x00b\")\n[]byte(\"\\xff\")\nint64(-3)\nbool(true)\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []any{"a\x00b", []byte{0xff}, int64(-3), true}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %#v, want %#v", got, want)
	}
	for _, bad := range []string{"", "string(\"a\")\n", "go test fuzz v1\nstring(a)\n", "go test fuzz v1\nfloat32(1)\n"} {
		if _, err := Parse([]byte(bad)); err == nil {
			t.Errorf("Parse(%q): want an error", bad)
		}
	}
}
