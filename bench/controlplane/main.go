// Command controlplane measures nftlb's control plane, each time in a fresh
// network namespace of its own (nothing in the root namespace is touched;
// every address is in 198.18.0.0/15):
//
//  1. cold apply of N pools x 3 backends: the real binary (`nftlb run`,
//     health `type: none`) from process start to its `ruleset applied` line,
//     with its peak RSS; the same ruleset loaded with `nft -f` (the output of
//     `nftlb render`); and the in-process cost of each step (config load,
//     health start, Build, Apply) with Go heap figures;
//  2. one backend's change while 1,000 / 10,000 pools exist: the Applier's
//     Apply for a pool's backend going down/up (health: map elements) and
//     for a backend swapped in the config (map elements), 50 changes each;
//  3. the daemon's RSS and CPU while it health-checks 1,000 pools x 3
//     backends (tcp, every second) against real listening backends in a lab,
//     and the TIME_WAIT sockets its probes leave in the LB namespace.
//
// Where a goal is missed it prints CPU profiles of the in-process path
// (runtime/pprof, `go tool pprof -top`). Progress goes to stderr, markdown
// to stdout. Namespaces and processes are removed at the end, also on
// errors and Ctrl-C.
//
//	go build -o bin/nftlb ./cmd/nftlb
//	go run ./bench/controlplane -nftlb bin/nftlb
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
)

type options struct {
	bin         string
	pools       []int
	runs        int
	runsLarge   int
	changePools []int
	changes     int
	probePools  int
	window      time.Duration
	backend     string
	profile     string
	perf        bool
	skip        map[string]bool
	timeout     time.Duration
}

func main() {
	var o options
	var pools, changePools, skip string
	flag.StringVar(&o.bin, "nftlb", "bin/nftlb", "the nftlb binary (go build -o bin/nftlb ./cmd/nftlb)")
	flag.StringVar(&pools, "pools", "1,100,1000,10000", "cold apply: pool counts (3 backends each)")
	flag.IntVar(&o.runs, "runs", 3, "cold apply: runs per pool count and method (a fresh namespace each)")
	flag.IntVar(&o.runsLarge, "runs-large", 3, "cold apply: runs for pool counts of 5,000 and more (each takes ~30 s)")
	flag.StringVar(&changePools, "change-pools", "1000,10000", "one backend's change: pool counts")
	flag.IntVar(&o.changes, "changes", 50, "one backend's change: changes of each kind")
	flag.IntVar(&o.probePools, "probe-pools", 1000, "daemon under probing: pools (x 3 backends, tcp checks every 1s)")
	flag.DurationVar(&o.window, "window", 10*time.Second, "daemon under probing: measurement window")
	flag.StringVar(&o.backend, "backend", "silent", "daemon under probing: what the backends serve on the checked port: silent (accepts, sends nothing first, like TLS or HTTP) or who (greets at once)")
	flag.StringVar(&o.profile, "profile", "missed", "CPU and allocation profiles of the in-process paths at the largest -pools: missed (when a goal is missed), always, never")
	flag.BoolVar(&o.perf, "perf", true, "perf record the probing daemon for 10 s after the window (if perf is installed)")
	flag.StringVar(&skip, "skip", "", "comma-separated parts to skip: cold, change, probe")
	flag.DurationVar(&o.timeout, "timeout", 15*time.Minute, "give up after this long")
	flag.Parse()
	var err error
	if o.pools, err = intList(pools); err == nil {
		o.changePools, err = intList(changePools)
	}
	o.skip = map[string]bool{}
	for s := range strings.SplitSeq(skip, ",") {
		if s = strings.TrimSpace(s); s != "" {
			o.skip[s] = true
		}
	}
	if err != nil || o.runs < 1 || o.runsLarge < 1 || o.changes < 1 || o.probePools < 1 || o.probePools > 30000 || o.window < 2*time.Second ||
		(o.backend != "silent" && o.backend != "who") || (o.profile != "missed" && o.profile != "always" && o.profile != "never") {
		fmt.Fprintln(os.Stderr, "controlplane: want -pools and -change-pools as lists of 1..30000, -runs and -runs-large >= 1, -changes >= 1, 1 <= -probe-pools <= 30000, -window >= 2s, -backend silent|who, -profile missed|always|never")
		os.Exit(2)
	}
	benchkit.Run("controlplane", o.timeout, func(ctx context.Context) error { return run(ctx, o) }, deleteLeftovers)
}

func intList(s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 30000 {
			return nil, fmt.Errorf("bad pool count %q", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func run(ctx context.Context, o options) error {
	if err := benchkit.NeedRoot(); err != nil {
		return err
	}
	bin, err := benchkit.NftlbBinary(o.bin)
	if err != nil {
		return err
	}
	o.bin = bin
	dir, err := os.MkdirTemp("", "nftlb-controlplane-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	start := time.Now()
	fmt.Printf("# nftlb control-plane benchmark\n\n")
	fmt.Printf("- started %s on %s, %d CPUs, kernel %s, %s, %s\n", start.UTC().Format(time.RFC3339), benchkit.Hostname(), runtime.NumCPU(), benchkit.Kernel(), runtime.Version(), nftVersion())
	fmt.Printf("- load average at start: %s\n", benchkit.Loadavg())
	fmt.Printf("- flags: -pools %s -runs %d -runs-large %d -change-pools %s -changes %d -probe-pools %d -window %v -backend %s\n\n",
		benchkit.JoinInts(o.pools), o.runs, o.runsLarge, benchkit.JoinInts(o.changePools), o.changes, o.probePools, o.window, o.backend)

	var (
		cold   []coldResult
		change []changeResult
		probe  *probeResult
	)
	if !o.skip["cold"] {
		if cold, err = runCold(ctx, o, dir); err != nil {
			return err
		}
	}
	if !o.skip["change"] {
		if change, err = runChange(ctx, o, dir); err != nil {
			return err
		}
	}
	if !o.skip["probe"] {
		if probe, err = runProbe(ctx, o, dir); err != nil {
			return err
		}
	}

	fmt.Printf("\n## Results\n")
	if cold != nil {
		printCold(cold)
	}
	if change != nil {
		printChange(o, change)
	}
	if probe != nil {
		printProbe(o, probe)
	}
	missed := printGoals(o, cold, change, probe)
	if o.profile == "always" || (o.profile == "missed" && missed) {
		if err := runProfiles(ctx, o, dir, cold, change); err != nil {
			return err
		}
	}
	fmt.Printf("\nload average at end: %s; total time %v\n", benchkit.Loadavg(), time.Since(start).Round(time.Second))
	return nil
}

// poolVIP is pool i's VIP: 198.18.128.1 upwards (198.18.128.0/17 holds
// 32,767 of them).
func poolVIP(i int) netip.Addr { return benchkit.AddrAdd(vipBase, i+1) }

var vipBase = netip.AddrFrom4([4]byte{198, 18, 128, 0})

func poolName(i int) string { return fmt.Sprintf("p%05d", i) }

const (
	vipPort     = 443
	backendPort = 443
)

var backendAddrs = []string{"198.18.1.11", "198.18.1.12", "198.18.1.13"}

// configYAML is N pools x 3 backends (198.18.1.11-13:443), VIPs from
// 198.18.128.1, port 443, with the given health block.
func configYAML(n int, health string, portOf func(pool int) uint16) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# written by bench/controlplane: %d pools x %d backends\nmetrics:\n  listen: 127.0.0.1:9742\nhealth:\n%spools:\n", n, len(backendAddrs), health)
	for i := range n {
		fmt.Fprintf(&b, "  - name: %s\n    vip: %s\n    port: %d\n    backends: [", poolName(i), poolVIP(i), vipPort)
		for j, a := range backendAddrs {
			if j > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "%s:%d", a, portOf(i))
		}
		b.WriteString("]\n")
	}
	return b.String()
}

func writeConfig(dir string, n int, health, tag string) (string, error) {
	return writeConfigPorts(dir, n, health, tag, func(int) uint16 { return backendPort })
}

// writeConfigPorts: pool i's backends listen on portOf(i).
func writeConfigPorts(dir string, n int, health, tag string, portOf func(pool int) uint16) (string, error) {
	path := filepath.Join(dir, fmt.Sprintf("%s-%d.yaml", tag, n))
	return path, os.WriteFile(path, []byte(configYAML(n, health, portOf)), 0o644)
}

func nftVersion() string {
	out, err := exec.Command("nft", "--version").Output()
	if err != nil {
		return "nft ?"
	}
	return strings.TrimSpace(string(out))
}

// ms formats a duration for tables: 3 significant-ish digits.
func ms(d time.Duration) string {
	switch {
	case d < 0:
		return "-"
	case d >= time.Second:
		return fmt.Sprintf("%.2f s", d.Seconds())
	case d >= 100*time.Millisecond:
		return fmt.Sprintf("%.0f ms", float64(d)/1e6)
	case d >= 10*time.Millisecond:
		return fmt.Sprintf("%.1f ms", float64(d)/1e6)
	default:
		return fmt.Sprintf("%.2f ms", float64(d)/1e6)
	}
}

func mib(kb int64) string {
	if kb < 0 {
		return "?"
	}
	return fmt.Sprintf("%.1f MiB", float64(kb)/1024)
}

func bytesMiB(b uint64) string {
	if b < 1<<20 {
		return fmt.Sprintf("%.0f KiB", float64(b)/(1<<10))
	}
	return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
}

func medianInt(xs []int64) int64 {
	if len(xs) == 0 {
		return -1
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
