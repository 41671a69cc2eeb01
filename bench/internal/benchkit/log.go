package benchkit

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// Entry is one line of a process's output. For nftlb (-log-format json)
// ParseJSON fills Time, Msg and F; other parsers (HAProxy's log) fill the
// same fields so that the same waits and predicates work on them.
type Entry struct {
	Time time.Time      // the line's own timestamp (nftlb's time field); zero if none
	Msg  string         // nftlb's msg field
	F    map[string]any // every field of the JSON line
	Raw  string         // the line as written, without its newline
}

// Str returns field k as a string ("" if absent).
func (e Entry) Str(k string) string {
	switch v := e.F[k].(type) {
	case string:
		return v
	case nil:
		return ""
	default:
		return fmt.Sprint(v)
	}
}

// Dur reads a duration field: slog's JSON handler writes durations as
// integer nanoseconds. -1 if absent or not a number.
func (e Entry) Dur(k string) time.Duration {
	if v, ok := e.F[k].(float64); ok {
		return time.Duration(v)
	}
	return -1
}

// ParseJSON fills Msg, Time and F of e from a JSON line of nftlb's log
// (slog's JSON handler); a line that is not JSON keeps only Raw.
func ParseJSON(e *Entry) {
	if err := json.Unmarshal([]byte(e.Raw), &e.F); err == nil {
		e.Msg = e.Str("msg")
		e.Time, _ = time.Parse(time.RFC3339Nano, e.Str("time"))
	}
}

// Match returns a predicate on the message and some fields of a line:
// Match("backend state changed", "to", "down") matches a line with that
// msg whose to field is "down".
func Match(msg string, kv ...string) func(Entry) bool {
	return func(e Entry) bool {
		if e.Msg != msg {
			return false
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if e.Str(kv[i]) != kv[i+1] {
				return false
			}
		}
		return true
	}
}

// Log collects a process's output (it is the process's stdout and
// stderr) as entries, one per line, as the lines arrive; waiters are woken
// on every new line. The benchmarks read times from these lines, so a line
// is parsed once, when it arrives.
type Log struct {
	mu      sync.Mutex
	partial []byte
	entries []Entry
	changed chan struct{} // closed and replaced on every new line
	parse   func(*Entry)
	onLine  func(Entry)
}

// NewLog returns an empty log. parse fills an entry from its Raw line (nil:
// ParseJSON). onLine (optional) runs for each line as it arrives, before
// anyone waiting is woken: the place to read /proc at the moment a line is
// written (controlplane's peak RSS at `ruleset applied`). It runs with the
// log locked and must not call the log's methods.
func NewLog(parse func(*Entry), onLine func(Entry)) *Log {
	if parse == nil {
		parse = ParseJSON
	}
	return &Log{changed: make(chan struct{}), parse: parse, onLine: onLine}
}

// Write appends p; every complete line becomes an entry.
func (b *Log) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.partial = append(b.partial, p...)
	added := false
	for {
		i := bytes.IndexByte(b.partial, '\n')
		if i < 0 {
			break
		}
		e := Entry{Raw: string(b.partial[:i])}
		b.partial = b.partial[i+1:]
		b.parse(&e)
		if b.onLine != nil {
			b.onLine(e)
		}
		b.entries = append(b.entries, e)
		added = true
	}
	if added {
		close(b.changed)
		b.changed = make(chan struct{})
	}
	return len(p), nil
}

// Len is the number of complete lines so far: a mark for "after now".
func (b *Log) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.entries)
}

// Since returns a copy of the entries from index from on.
func (b *Log) Since(from int) []Entry {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.entries[min(max(from, 0), len(b.entries)):])
}

// String is the output so far, an incomplete last line included.
func (b *Log) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var s strings.Builder
	for _, e := range b.entries {
		s.WriteString(e.Raw + "\n")
	}
	s.Write(b.partial)
	return s.String()
}

// find returns the first entry at index >= *from that satisfies pred, and
// advances *from past the entries it looked at; ok false if none. It also
// returns the channel that is closed on the next new line.
func (b *Log) find(from *int, pred func(Entry) bool) (e Entry, at int, ok bool, changed <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for ; *from < len(b.entries); *from++ {
		if pred(b.entries[*from]) {
			at = *from
			return b.entries[at], at, true, nil
		}
	}
	return Entry{}, 0, false, b.changed
}

// Tail returns the last n lines of s, each cut to 400 bytes: enough of a
// process's log for an error message.
func Tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	for i, l := range lines {
		if len(l) > 400 {
			lines[i] = l[:400] + " …"
		}
	}
	return strings.Join(lines, "\n")
}
