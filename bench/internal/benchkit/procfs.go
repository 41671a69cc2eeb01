package benchkit

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nftlb/nftlb/internal/lab"
)

// userHZ is the unit of the CPU times in /proc/PID/stat (USER_HZ, 100 on
// Linux whatever the kernel's HZ).
const userHZ = 100

// ProcCPU returns the user and system CPU time of pid, all its threads
// (utime and stime of /proc/PID/stat: 10 ms ticks).
func ProcCPU(pid int) (user, sys time.Duration, err error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	user, sys, err = parseStatCPU(string(raw))
	if err != nil {
		return 0, 0, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
	}
	return user, sys, nil
}

// ProcCPUTotal is ProcCPU's user + system.
func ProcCPUTotal(pid int) (time.Duration, error) {
	u, s, err := ProcCPU(pid)
	return u + s, err
}

// parseStatCPU reads utime and stime (fields 14 and 15) from the text of
// /proc/PID/stat. The command name (field 2, in parentheses) may hold
// spaces and parentheses, so fields are counted from the last ')'.
func parseStatCPU(stat string) (user, sys time.Duration, err error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("no ')' in %q", stat)
	}
	f := strings.Fields(stat[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("%d fields after the command name", len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("utime %q, stime %q", f[11], f[12])
	}
	return time.Duration(ut) * time.Second / userHZ, time.Duration(st) * time.Second / userHZ, nil
}

// ProcStatus returns field key of /proc/PID/status ("VmRSS" -> "1234 kB",
// "Threads" -> "9"), "?" if it cannot be read.
func ProcStatus(pid int, key string) string {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "?"
	}
	return statusField(string(raw), key)
}

func statusField(status, key string) string {
	for line := range strings.Lines(status) {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

// ProcKB returns a "NNN kB" field of /proc/PID/status (VmRSS, VmHWM) in
// kB; -1 if it cannot be read.
func ProcKB(pid int, key string) int64 {
	n, err := strconv.ParseInt(strings.TrimSuffix(ProcStatus(pid, key), " kB"), 10, 64)
	if err != nil {
		return -1
	}
	return n
}

// Rusage is this process's CPU so far (getrusage RUSAGE_SELF, µs): for
// timing in-process work, where /proc's 10 ms ticks are too coarse.
func Rusage() (user, sys time.Duration) {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())
}

// CheckComm fails unless pid's command name is want: the pid measured must
// be the program itself, not `ip netns exec` or a shell.
func CheckComm(pid int, want string) error {
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if got := strings.TrimSpace(string(comm)); got != want {
		return fmt.Errorf("pid %d is %q, not %s", pid, got, want)
	}
	return nil
}

// CPUSample is a process's CPU use over one step of SampleCPU.
type CPUSample struct {
	At        time.Duration // since the window began
	Span      time.Duration // since the previous sample (or the start)
	User, Sys time.Duration // CPU used in Span
}

// SampleCPU reads pid's CPU at the start and then every step until window
// has passed (the last step is cut to end at the window), calling each
// (optional) after every read; it returns the whole window as one sample
// (At and Span: the time it took). The programs print this timeline to
// show whether the use is steady.
func SampleCPU(ctx context.Context, pid int, window, step time.Duration, each func(CPUSample)) (CPUSample, error) {
	u0, s0, err := ProcCPU(pid)
	if err != nil {
		return CPUSample{}, err
	}
	w0 := time.Now()
	pu, ps, prev := u0, s0, w0
	for next := w0.Add(step); ; next = next.Add(step) {
		last := !next.Before(w0.Add(window))
		if last {
			next = w0.Add(window)
		}
		if err := Sleep(ctx, time.Until(next)); err != nil {
			return CPUSample{}, err
		}
		u, s, err := ProcCPU(pid)
		if err != nil {
			return CPUSample{}, err
		}
		now := time.Now()
		if each != nil {
			each(CPUSample{At: now.Sub(w0), Span: now.Sub(prev), User: u - pu, Sys: s - ps})
		}
		pu, ps, prev = u, s, now
		if last {
			break
		}
	}
	took := time.Since(w0)
	return CPUSample{At: took, Span: took, User: pu - u0, Sys: ps - s0}, nil
}

// ConntrackCount is the number of conntrack entries in ns
// (nf_conntrack_count), "?" if it cannot be read.
func ConntrackCount(ns *lab.NS) string {
	var n string
	err := ns.Do(func() error {
		b, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count")
		n = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		return "?"
	}
	return n
}
