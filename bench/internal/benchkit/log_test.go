package benchkit

import (
	"strings"
	"testing"
	"time"
)

const appliedLine = `{"time":"2026-11-23T18:06:13.123456789Z","level":"INFO","msg":"ruleset applied","duration":1500000,"full":true,"changed":"p0"}`

func TestParseJSON(t *testing.T) {
	e := Entry{Raw: appliedLine}
	ParseJSON(&e)
	if e.Msg != "ruleset applied" {
		t.Errorf("Msg = %q", e.Msg)
	}
	if want := time.Date(2026, 11, 23, 18, 6, 13, 123456789, time.UTC); !e.Time.Equal(want) {
		t.Errorf("Time = %v, want %v", e.Time, want)
	}
	if d := e.Dur("duration"); d != 1500*time.Microsecond {
		t.Errorf("Dur(duration) = %v", d)
	}
	if s := e.Str("full"); s != "true" {
		t.Errorf("Str(full) = %q (a bool field)", s)
	}
	if s := e.Str("changed"); s != "p0" {
		t.Errorf("Str(changed) = %q", s)
	}
	if s, d := e.Str("absent"), e.Dur("absent"); s != "" || d != -1 {
		t.Errorf("absent field: Str %q, Dur %v", s, d)
	}
	if d := e.Dur("changed"); d != -1 {
		t.Errorf("Dur of a string field = %v, want -1", d)
	}

	plain := Entry{Raw: "backend: serving http on 198.18.1.11:8080"}
	ParseJSON(&plain)
	if plain.Msg != "" || !plain.Time.IsZero() || plain.Str("msg") != "" {
		t.Errorf("a non-JSON line got fields: %+v", plain)
	}
}

func TestLogSplitsLines(t *testing.T) {
	var seen []string
	b := NewLog(nil, func(e Entry) { seen = append(seen, e.Msg) })
	for _, chunk := range []string{`{"msg":"sta`, `rting"}` + "\n" + `{"msg":"a"}` + "\n" + `not json` + "\n" + `{"msg":"par`} {
		if n, err := b.Write([]byte(chunk)); n != len(chunk) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	if b.Len() != 3 {
		t.Fatalf("Len = %d, want 3 complete lines", b.Len())
	}
	got := b.Since(0)
	if got[0].Msg != "starting" || got[1].Msg != "a" || got[2].Msg != "" || got[2].Raw != "not json" {
		t.Errorf("entries = %+v", got)
	}
	if strings.Join(seen, ",") != "starting,a," {
		t.Errorf("onLine saw %q", seen)
	}
	if s := b.Since(2); len(s) != 1 || s[0].Raw != "not json" {
		t.Errorf("Since(2) = %+v", s)
	}
	if s := b.Since(10); len(s) != 0 {
		t.Errorf("Since(10) = %+v", s)
	}
	if want := "{\"msg\":\"starting\"}\n{\"msg\":\"a\"}\nnot json\n{\"msg\":\"par"; b.String() != want {
		t.Errorf("String = %q, want %q (with the incomplete line)", b.String(), want)
	}
	// Since returns a copy.
	got[0].Msg = "changed"
	if b.Since(0)[0].Msg != "starting" {
		t.Error("Since shares its entries with the log")
	}
}

func TestLogCustomParse(t *testing.T) {
	b := NewLog(func(e *Entry) {
		if f := strings.Fields(e.Raw); len(f) == 2 {
			e.Msg = "backend state changed"
			e.F = map[string]any{"backend": f[0], "to": f[1]}
		}
	}, nil)
	b.Write([]byte("b1 down\n{\"msg\":\"json is not parsed\"}\n"))
	e := b.Since(0)
	if !Match("backend state changed", "backend", "b1", "to", "down")(e[0]) {
		t.Errorf("custom entry = %+v", e[0])
	}
	if e[1].Msg != "" {
		t.Errorf("custom parser replaced, not preceded by, JSON: %+v", e[1])
	}
}

func TestMatch(t *testing.T) {
	e := Entry{Msg: "backend state changed", F: map[string]any{"pool": "p0", "to": "down"}}
	for i, c := range []struct {
		pred func(Entry) bool
		want bool
	}{
		{Match("backend state changed"), true},
		{Match("backend state changed", "to", "down"), true},
		{Match("backend state changed", "pool", "p0", "to", "down"), true},
		{Match("backend state changed", "to", "up"), false},
		{Match("backend state changed", "from", "up"), false},
		{Match("ruleset applied"), false},
	} {
		if got := c.pred(e); got != c.want {
			t.Errorf("case %d: %v, want %v", i, got, c.want)
		}
	}
}

func TestTail(t *testing.T) {
	if got := Tail("a\nb\nc\n", 2); got != "b\nc" {
		t.Errorf("Tail = %q", got)
	}
	if got := Tail("a\nb", 5); got != "a\nb" {
		t.Errorf("Tail = %q", got)
	}
	long := strings.Repeat("x", 500)
	if got := Tail(long, 1); got != strings.Repeat("x", 400)+" …" {
		t.Errorf("Tail of a long line has %d bytes", len(got))
	}
}
