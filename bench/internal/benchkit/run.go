package benchkit

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Run is a benchmark program's main after its flags: it runs f with a
// context that Ctrl-C and SIGTERM cancel (and timeout, when > 0), so that
// f's deferred teardown of labs, namespaces and daemons runs instead of
// the process dying with them in place; then the cleanups (for what f
// could not defer); then it exits 1 with "name: error" on stderr if f
// failed.
func Run(name string, timeout time.Duration, f func(context.Context) error, cleanups ...func()) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	cancel := context.CancelFunc(func() {})
	if timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, timeout)
	}
	err := f(ctx)
	cancel()
	stop()
	for _, c := range cleanups {
		c()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
}

// NeedRoot fails unless this process is root: the labs need network
// namespaces and nftables.
func NeedRoot() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, nftables)")
	}
	return nil
}

// NftlbBinary returns path (the -nftlb flag) made absolute, since the
// programs run it from `ip netns exec`; the error says how to build it if
// it is missing (the path is returned all the same).
func NftlbBinary(path string) (string, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return path, err
	}
	if _, err := os.Stat(abs); err != nil {
		return abs, fmt.Errorf("%w (build it: go build -o bin/nftlb ./cmd/nftlb)", err)
	}
	return abs, nil
}

// Progress writes a time-stamped line to stderr: the programs' running
// commentary, kept apart from the markdown on stdout.
func Progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%s] "+format+"\n", append([]any{time.Now().Format("15:04:05.000")}, args...)...)
}

// Sleep waits d or until ctx ends (then it returns ctx's error).
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Hostname is the machine's host name, for the report's header.
func Hostname() string { h, _ := os.Hostname(); return h }

// Kernel is the running kernel's release, for the report's header.
func Kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

// Loadavg is the 1, 5 and 15 minute load averages ("?" if unreadable): the
// reports state them at start and end, since this VM is shared.
func Loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// JoinInts formats a list flag back for the report: "1,1000,10000".
func JoinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ",")
}

// AddrAdd returns the IPv4 address n after a (198.18.128.0 + 1 =
// 198.18.128.1): the programs number their pools' VIPs from a base.
func AddrAdd(a netip.Addr, n int) netip.Addr {
	b := a.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
