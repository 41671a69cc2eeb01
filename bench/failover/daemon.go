package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nftlb/nftlb/internal/lab"
)

// logEntry is one line of the daemon's JSON log.
type logEntry struct {
	Time time.Time // the daemon's own time= field
	Msg  string
	F    map[string]any
	Raw  string
}

func (e logEntry) str(k string) string {
	switch v := e.F[k].(type) {
	case string:
		return v
	case nil:
		return ""
	default:
		return fmt.Sprint(v)
	}
}

// dur reads a duration field: slog's JSON handler writes durations as
// integer nanoseconds.
func (e logEntry) dur(k string) time.Duration {
	if v, ok := e.F[k].(float64); ok {
		return time.Duration(v)
	}
	return -1
}

// logBook collects the daemon's log lines as they arrive.
type logBook struct {
	mu      sync.Mutex
	partial []byte
	entries []logEntry
	changed chan struct{} // closed and replaced on every new entry
	// parse fills Time, Msg and F from Raw; nil: nftlb's JSON lines.
	parse func(*logEntry)
}

func newLogBook() *logBook { return &logBook{changed: make(chan struct{})} }

func (b *logBook) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.partial = append(b.partial, p...)
	added := false
	for {
		i := bytes.IndexByte(b.partial, '\n')
		if i < 0 {
			break
		}
		line := string(b.partial[:i])
		b.partial = b.partial[i+1:]
		e := logEntry{Raw: line}
		if b.parse != nil {
			b.parse(&e)
		} else if err := json.Unmarshal([]byte(line), &e.F); err == nil {
			e.Msg = e.str("msg")
			e.Time, _ = time.Parse(time.RFC3339Nano, e.str("time"))
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
func (b *logBook) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.entries)
}

// Since returns the entries from index from on.
func (b *logBook) Since(from int) []logEntry {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]logEntry(nil), b.entries[min(from, len(b.entries)):]...)
}

func (b *logBook) String() string {
	var s strings.Builder
	for _, e := range b.Since(0) {
		s.WriteString(e.Raw + "\n")
	}
	return s.String()
}

// match returns a predicate on the message and some fields of a line.
func match(msg string, kv ...string) func(logEntry) bool {
	return func(e logEntry) bool {
		if e.Msg != msg {
			return false
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if e.str(kv[i]) != kv[i+1] {
				return false
			}
		}
		return true
	}
}

// daemon is one `nftlb run` in the lab's LB namespace, logging JSON, or
// one HAProxy (startHAProxy), whose log lines are parsed into the same
// entries.
type daemon struct {
	cmd    *exec.Cmd
	logs   *logBook
	exited chan struct{}
	err    error
}

// startDaemon writes cfg to a temporary file, starts nftlb on it in the
// LB namespace and waits for its first apply.
func startDaemon(ctx context.Context, l *lab.Lab, bin, dir, cfg string) (*daemon, error) {
	path := dir + "/lb.yaml"
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	d := &daemon{logs: newLogBook(), exited: make(chan struct{})}
	// Not bound to ctx: stop() ends it with SIGTERM, also after Ctrl-C.
	d.cmd = l.LB.Command(context.Background(), bin, "run", "-config", path, "-log-format", "json")
	d.cmd.Stdout, d.cmd.Stderr = d.logs, d.logs
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() { d.err = d.cmd.Wait(); close(d.exited) }()
	if _, _, err := d.waitFor(ctx, 0, 60*time.Second, match("ruleset applied")); err != nil {
		d.stop()
		return nil, err
	}
	return d, nil
}

func (d *daemon) name() string {
	if d.logs.parse != nil {
		return "haproxy"
	}
	return "nftlb"
}

// Pid is the daemon's process id: `ip netns exec` execs nftlb, so the
// process we started is nftlb itself.
func (d *daemon) Pid() int { return d.cmd.Process.Pid }

// stop sends SIGTERM and waits (SIGKILL after 10 s).
func (d *daemon) stop() {
	select {
	case <-d.exited:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
}

// waitFor returns the first line at index >= from that satisfies pred,
// and its index.
func (d *daemon) waitFor(ctx context.Context, from int, within time.Duration, pred func(logEntry) bool) (logEntry, int, error) {
	timer := time.NewTimer(within)
	defer timer.Stop()
	b := d.logs
	for {
		b.mu.Lock()
		for ; from < len(b.entries); from++ {
			if pred(b.entries[from]) {
				e := b.entries[from]
				b.mu.Unlock()
				return e, from, nil
			}
		}
		changed := b.changed
		b.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return logEntry{}, 0, ctx.Err()
		case <-d.exited:
			return logEntry{}, 0, fmt.Errorf("%s exited (%v); its log:\n%s", d.name(), d.err, tail(b.String(), 40))
		case <-timer.C:
			return logEntry{}, 0, fmt.Errorf("the expected line did not appear in %s's log within %v; the end of its log:\n%s", d.name(), within, tail(b.String(), 40))
		}
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// procCPU returns the user and system CPU time of pid (utime and stime
// from /proc/PID/stat, in clock ticks of USER_HZ = 100 on Linux).
func procCPU(pid int) (user, sys time.Duration, err error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	const userHZ = 100
	return time.Duration(ut) * time.Second / userHZ, time.Duration(st) * time.Second / userHZ, nil
}

// procStatus returns a field of /proc/PID/status, e.g. "VmRSS".
func procStatus(pid int, key string) string {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "?"
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}
