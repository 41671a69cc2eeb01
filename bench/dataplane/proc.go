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

// proc is a long-running process in a lab namespace (a backend, HAProxy or
// nftlb). `ip netns exec` and `taskset` exec their command, so the process
// we start is the program itself: its pid is the one to read from /proc and
// to signal.
type proc struct {
	name   string
	cmd    *exec.Cmd
	out    *logBook
	exited chan struct{}
	err    error
}

// startProc starts name args... in ns. It is not bound to a context:
// stop ends it (SIGTERM, then SIGKILL), also after Ctrl-C.
func startProc(ns *lab.NS, label string, name string, args ...string) (*proc, error) {
	p := &proc{name: label, out: newLogBook(), exited: make(chan struct{})}
	p.cmd = ns.Command(context.Background(), name, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", label, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	return p, nil
}

func (p *proc) Pid() int { return p.cmd.Process.Pid }

func (p *proc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM and waits; SIGKILL after 10 s.
func (p *proc) stop() {
	if !p.alive() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// logEntry is one line of output; for nftlb (-log-format json) its
// message and fields.
type logEntry struct {
	Msg string
	F   map[string]any
	Raw string
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

// logBook collects a process's output lines as they arrive.
type logBook struct {
	mu      sync.Mutex
	partial []byte
	entries []logEntry
	changed chan struct{} // closed and replaced on every new line
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
		if json.Unmarshal([]byte(line), &e.F) == nil {
			e.Msg = e.str("msg")
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

// entries0 returns a copy of the lines so far.
func (b *logBook) entries0() []logEntry {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]logEntry(nil), b.entries...)
}

func (b *logBook) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var s strings.Builder
	for _, e := range b.entries {
		s.WriteString(e.Raw + "\n")
	}
	s.Write(b.partial)
	return s.String()
}

// waitFor returns the first line that satisfies pred.
func (p *proc) waitFor(ctx context.Context, within time.Duration, pred func(logEntry) bool) (logEntry, error) {
	timer := time.NewTimer(within)
	defer timer.Stop()
	b := p.out
	from := 0
	for {
		b.mu.Lock()
		for ; from < len(b.entries); from++ {
			if pred(b.entries[from]) {
				e := b.entries[from]
				b.mu.Unlock()
				return e, nil
			}
		}
		changed := b.changed
		b.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return logEntry{}, ctx.Err()
		case <-p.exited:
			return logEntry{}, fmt.Errorf("%s exited (%v); its output:\n%s", p.name, p.err, tail(b.String(), 30))
		case <-timer.C:
			return logEntry{}, fmt.Errorf("the expected line did not appear in %s's output within %v; the end of it:\n%s", p.name, within, tail(b.String(), 30))
		}
	}
}

func tail(s string, n int) string {
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

// procCPU returns utime+stime of pid (from /proc/PID/stat, in clock ticks
// of USER_HZ = 100), over all its threads.
func procCPU(pid int) (time.Duration, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	const userHZ = 100
	return time.Duration(ut+st) * time.Second / userHZ, nil
}

// cpuStat is the machine-wide "cpu" line of /proc/stat (all CPUs, in
// USER_HZ ticks).
type cpuStat struct {
	total, idle, softirq, steal uint64
}

func readCPUStat() (cpuStat, error) {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuStat{}, err
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return cpuStat{}, fmt.Errorf("parse /proc/stat: %q", line)
	}
	var v [8]uint64 // user nice system idle iowait irq softirq steal
	for i := range v {
		if v[i], err = strconv.ParseUint(f[i+1], 10, 64); err != nil {
			return cpuStat{}, fmt.Errorf("parse /proc/stat: %q", line)
		}
	}
	var s cpuStat
	for _, x := range v {
		s.total += x
	}
	s.idle = v[3] + v[4]
	s.softirq = v[6]
	s.steal = v[7]
	return s, nil
}

// machineCPU is the utilisation between two /proc/stat samples, in % of
// all CPUs: busy (everything but idle, iowait and steal) and the softirq
// part of it.
func machineCPU(a, b cpuStat) (busy, softirq float64) {
	total := float64(b.total - a.total)
	if total <= 0 {
		return 0, 0
	}
	idle := float64(b.idle-a.idle) + float64(b.steal-a.steal)
	return 100 * (total - idle) / total, 100 * float64(b.softirq-a.softirq) / total
}

// synRetrans reads TcpExt TCPSynRetrans of namespace ns: SYNs it had
// to send again because no answer came within the initial RTO (1 s).
func synRetrans(ctx context.Context, ns *lab.NS) (int64, error) {
	out, err := ns.Run(ctx, "cat", "/proc/net/netstat")
	if err != nil {
		return 0, err
	}
	var names []string
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "TcpExt:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i := 1; i < len(f) && i < len(names); i++ {
			if names[i] == "TCPSynRetrans" {
				return strconv.ParseInt(f[i], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("no TcpExt TCPSynRetrans in %s's /proc/net/netstat", ns.Name)
}

// foreignCPU snapshots the CPU time of every process on the machine except
// ours (this program, the backends, the LB process) and the ksoftirqd
// threads (which run the lab's own softirq work): the CPU that other work
// on this shared VM takes from the benchmark.
type foreignCPU map[int]procTime

type procTime struct {
	comm  string
	start string // starttime (field 22): tells a reused pid apart
	cpu   time.Duration
}

func snapForeign(exclude map[int]bool) foreignCPU {
	s := foreignCPU{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return s
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || exclude[pid] {
			continue
		}
		raw, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		st := string(raw)
		i, j := strings.IndexByte(st, '('), strings.LastIndexByte(st, ')')
		if i < 0 || j < i {
			continue
		}
		comm := st[i+1 : j]
		if strings.HasPrefix(comm, "ksoftirqd/") {
			continue
		}
		f := strings.Fields(st[j+1:]) // f[0] is field 3
		if len(f) < 20 {
			continue
		}
		if c, err := procCPU(pid); err == nil {
			s[pid] = procTime{comm, f[19], c}
		}
	}
	return s
}

// since is the CPU the processes of s used since before (processes that
// started in between count whole, ones that exited are missed), and the
// name of the process that used most.
func (s foreignCPU) since(before foreignCPU) (total time.Duration, top string, topCPU time.Duration) {
	for pid, p := range s {
		d := p.cpu // a new process (or a reused pid)
		if b, ok := before[pid]; ok && b.start == p.start {
			d -= b.cpu
		}
		total += d
		if d > topCPU {
			top, topCPU = p.comm, d
		}
	}
	return total, top, topCPU
}
