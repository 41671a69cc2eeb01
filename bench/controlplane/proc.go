package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/nftlb/nftlb/internal/lab"
)

// scratch is an empty network namespace of our own (lo up, nothing else),
// named like a lab's LB namespace (nlbtXXXXXX-lb) so that `make clean-lab`
// removes it if this program is killed hard.
type scratch struct {
	*lab.NS
	fd netns.NsHandle // for nftables.WithNetNSFd; closed last
}

var (
	liveMu sync.Mutex
	live   = map[string]bool{} // namespaces created and not deleted yet
)

func newScratch() (*scratch, error) {
	var name string
	for range 10 {
		b := make([]byte, 3)
		_, _ = rand.Read(b)
		n := lab.NSPrefix + hex.EncodeToString(b) + "-lb"
		if _, err := os.Stat(filepath.Join("/var/run/netns", n)); errors.Is(err, os.ErrNotExist) {
			name = n
			break
		}
	}
	if name == "" {
		return nil, errors.New("no free namespace name")
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	liveMu.Lock()
	live[name] = true
	liveMu.Unlock()
	s := &scratch{NS: &lab.NS{Name: name}, fd: -1}
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		s.del()
		return nil, fmt.Errorf("ip -n %s link set lo up: %v: %s", name, err, out)
	}
	fd, err := netns.GetFromName(name)
	if err != nil {
		s.del()
		return nil, err
	}
	s.fd = fd
	return s, nil
}

// del deletes the namespace (close every Applier using fd first).
func (s *scratch) del() {
	if s.fd >= 0 {
		_ = s.fd.Close()
		s.fd = -1
	}
	if out, err := exec.Command("ip", "netns", "del", s.Name).CombinedOutput(); err != nil {
		progress("ip netns del %s: %v: %s", s.Name, err, out)
		return
	}
	liveMu.Lock()
	delete(live, s.Name)
	liveMu.Unlock()
}

// deleteLeftovers deletes namespaces whose deletion failed or was skipped.
func deleteLeftovers() {
	liveMu.Lock()
	names := make([]string, 0, len(live))
	for n := range live {
		names = append(names, n)
	}
	liveMu.Unlock()
	for _, n := range names {
		(&scratch{NS: &lab.NS{Name: n}, fd: -1}).del()
	}
}

// logEntry is one line of nftlb's JSON log.
type logEntry struct {
	Time time.Time
	Msg  string
	F    map[string]any
	Raw  string
	Seen time.Time // when this program read it
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

// dur reads a duration field (slog's JSON handler: integer nanoseconds).
func (e logEntry) dur(k string) time.Duration {
	if v, ok := e.F[k].(float64); ok {
		return time.Duration(v)
	}
	return -1
}

// logBook collects a daemon's log lines; onLine (optional) runs for each
// line as it arrives, before anyone waiting is woken.
type logBook struct {
	mu      sync.Mutex
	partial []byte
	entries []logEntry
	changed chan struct{}
	onLine  func(logEntry)
}

func newLogBook(onLine func(logEntry)) *logBook {
	return &logBook{changed: make(chan struct{}), onLine: onLine}
}

func (b *logBook) Write(p []byte) (int, error) {
	now := time.Now()
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
		e := logEntry{Raw: line, Seen: now}
		if err := json.Unmarshal([]byte(line), &e.F); err == nil {
			e.Msg = e.str("msg")
			e.Time, _ = time.Parse(time.RFC3339Nano, e.str("time"))
		}
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

func (b *logBook) Since(from int) []logEntry {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.entries[min(from, len(b.entries)):])
}

func (b *logBook) String() string {
	var s strings.Builder
	for _, e := range b.Since(0) {
		s.WriteString(e.Raw + "\n")
	}
	return s.String()
}

// daemon is one `nftlb run` in a namespace, logging JSON.
type daemon struct {
	cmd    *exec.Cmd
	logs   *logBook
	exited chan struct{}
	err    error
}

// startDaemon starts `nftlb run` in ns; the caller waits for what it needs.
// It is not bound to a context: stop ends it (SIGTERM), also after Ctrl-C.
func startDaemon(ns *lab.NS, bin, cfgPath string, onLine func(logEntry)) (*daemon, error) {
	d := &daemon{logs: newLogBook(onLine), exited: make(chan struct{})}
	d.cmd = ns.Command(context.Background(), bin, "run", "-config", cfgPath, "-log-format", "json")
	d.cmd.Stdout, d.cmd.Stderr = d.logs, d.logs
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() { d.err = d.cmd.Wait(); close(d.exited) }()
	return d, nil
}

// Pid is nftlb's pid: `ip netns exec` execs the command.
func (d *daemon) Pid() int { return d.cmd.Process.Pid }

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

// waitFor returns the first line at index >= from that satisfies pred.
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
			// Lines written just before the exit may still be unread.
			time.Sleep(50 * time.Millisecond)
			b.mu.Lock()
			for ; from < len(b.entries); from++ {
				if pred(b.entries[from]) {
					e := b.entries[from]
					b.mu.Unlock()
					return e, from, nil
				}
			}
			b.mu.Unlock()
			return logEntry{}, 0, fmt.Errorf("nftlb exited (%v); its log:\n%s", d.err, tail(b.String(), 20))
		case <-timer.C:
			return logEntry{}, 0, fmt.Errorf("the expected line did not appear in nftlb's log within %v; the end of its log:\n%s", within, tail(b.String(), 20))
		}
	}
}

func msgIs(msg string) func(logEntry) bool { return func(e logEntry) bool { return e.Msg == msg } }

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// procCPU returns utime and stime of pid (/proc/PID/stat, USER_HZ = 100).
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

// procKB returns a "NNN kB" field of /proc/PID/status (VmRSS, VmHWM) in kB;
// -1 if unreadable.
func procKB(pid int, key string) int64 {
	v := procStatus(pid, key)
	n, err := strconv.ParseInt(strings.TrimSuffix(v, " kB"), 10, 64)
	if err != nil {
		return -1
	}
	return n
}

func procStatus(pid int, key string) string {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "?"
	}
	for line := range strings.Lines(string(raw)) {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

// rusage is this process's CPU so far (getrusage RUSAGE_SELF, µs).
func rusage() (user, sys time.Duration) {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())
}
