// Command failover measures nftlb's failover in a network-namespace lab
// (internal/lab: a client, the LB running the real nftlb binary, three
// backends, all in 198.18.0.0/15):
//
//  1. detection and client resets: a backend is frozen (like SIGSTOP) or
//     killed while a client opens new connections at a steady rate and an
//     idle long-lived connection sits on that backend; repeated -runs times
//     per fault kind;
//  2. at 1,000 pools x 3 backends (3,000 TCP probe targets): the daemon's
//     probe-to-kernel latency and apply duration for a change of one pool,
//     and its RSS and CPU while probing.
//
// -contender haproxy runs part 1's fault sequence against HAProxy in TCP
// mode instead (haproxy.go); -contender all runs nftlb at its defaults
// (interval 2s, timeout 1s), nftlb at 200ms/100ms and HAProxy at its
// defaults (inter 2s, timeout check 1s), and prints them side by side.
//
// Progress goes to stderr, results (raw runs, then markdown tables) to
// stdout. The labs are always torn down, also on errors and Ctrl-C.
//
//	go build -o bin/nftlb ./cmd/nftlb
//	go run ./bench/failover -nftlb bin/nftlb
//	go run ./bench/failover -nftlb bin/nftlb -contender all
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
)

type options struct {
	runs     int
	rate     int
	interval time.Duration
	timeout  time.Duration
	bin      string
	skip     bool

	scaleBackend string
	scaleWindow  time.Duration

	contender string
	set       map[string]bool // flags given on the command line
}

// profile is one contender at one check timing: part 1 runs once per
// profile, each in a lab of its own.
type profile struct {
	name              string // as the tables show it
	contender         string // nftlb or haproxy
	interval, timeout time.Duration
	runs              int
}

// bound is the worst case to take a frozen backend out: a fault right
// after a good probe, then fall failed probes, the last one timing out.
func (p profile) bound() time.Duration { return p.interval*fall + p.timeout }

// pool is the name the contender's log gives the failover pool.
func (p profile) pool() string {
	if p.contender == "haproxy" {
		return haproxyPool
	}
	return "kube-apiserver"
}

// profilesOf is what -contender asks for. With all, each profile's runs
// default to 5 per fault, so that each median is of five runs: a detection
// time depends on the fault's random phase in the check schedule, and
// medians of three were too noisy to compare. That makes -contender all
// take about 5 minutes, most of it the 2 s profiles (~11 s per nftlb run,
// ~15 s per HAProxy run: checks every 2 s down and up again).
func profilesOf(o options) []profile {
	runs := func(def int) int {
		if o.set["runs"] {
			return o.runs
		}
		return def
	}
	durOr := func(name string, v, def time.Duration) time.Duration {
		if o.set[name] {
			return v
		}
		return def
	}
	switch o.contender {
	case "haproxy":
		// HAProxy's default inter, and nftlb's default timeout as `timeout check`.
		return []profile{{"HAProxy", "haproxy", durOr("interval", o.interval, 2*time.Second), durOr("timeout", o.timeout, time.Second), o.runs}}
	case "all":
		return []profile{
			{"nftlb (defaults)", "nftlb", 2 * time.Second, time.Second, runs(5)},
			{"nftlb (aggressive)", "nftlb", 200 * time.Millisecond, 100 * time.Millisecond, runs(5)},
			{"HAProxy 2.6 (defaults)", "haproxy", 2 * time.Second, time.Second, runs(5)},
		}
	}
	return []profile{{"nftlb", "nftlb", o.interval, o.timeout, o.runs}}
}

const (
	rise = 2
	fall = 3
)

func main() {
	var o options
	flag.IntVar(&o.runs, "runs", 10, "runs per fault kind (freeze, kill); 0 skips part 1")
	flag.IntVar(&o.rate, "rate", 50, "new connections per second opened by the client during each run")
	flag.DurationVar(&o.interval, "interval", time.Second, "health-check interval of the failover pool")
	flag.DurationVar(&o.timeout, "timeout", 500*time.Millisecond, "health-check timeout of the failover pool")
	flag.StringVar(&o.bin, "nftlb", "bin/nftlb", "the nftlb binary to run (go build -o bin/nftlb ./cmd/nftlb)")
	flag.BoolVar(&o.skip, "skip-scale", false, "skip the 1,000-pool measurement")
	flag.StringVar(&o.scaleBackend, "scale-backend", "who", "1,000 pools: what b1..b3:6443 serve: who (greets at once, so probes end in a RST) or silent (sends nothing first, like TLS: probes end with a FIN and leave TIME_WAIT on the LB)")
	flag.DurationVar(&o.scaleWindow, "scale-window", 10*time.Second, "1,000 pools: how long to measure nftlb's CPU while it probes")
	flag.StringVar(&o.contender, "contender", "nftlb", "part 1 against: nftlb; haproxy (HAProxy in TCP mode, -interval/-timeout default 2s/1s); all (nftlb 2s/1s, nftlb 200ms/100ms, HAProxy 2s/1s, side by side; -runs defaults to 5 for each). Part 2 runs with nftlb only")
	flag.Parse()
	o.set = map[string]bool{}
	flag.Visit(func(f *flag.Flag) { o.set[f.Name] = true })
	profs := profilesOf(o)
	bad := o.runs < 0 || o.rate < 1 || o.rate > 1000 || (o.scaleBackend != "who" && o.scaleBackend != "silent") || o.scaleWindow < time.Second ||
		(o.contender != "nftlb" && o.contender != "haproxy" && o.contender != "all") ||
		(o.contender == "all" && (o.set["interval"] || o.set["timeout"]))
	for _, p := range profs {
		bad = bad || p.interval <= 0 || p.timeout <= 0 || p.timeout >= p.interval
	}
	if bad {
		fmt.Fprintln(os.Stderr, "failover: want -runs >= 0 (0: only the 1,000 pools), 1 <= -rate <= 1000, 0 < -timeout < -interval, -scale-backend who|silent, -scale-window >= 1s, -contender nftlb|haproxy|all (all: no -interval/-timeout)")
		os.Exit(2)
	}
	benchkit.Run("failover", 0, func(ctx context.Context) error { return run(ctx, o) })
}

func run(ctx context.Context, o options) error {
	if err := benchkit.NeedRoot(); err != nil {
		return err
	}
	profs := profilesOf(o)
	bin, err := benchkit.NftlbBinary(o.bin)
	if err != nil && o.contender != "haproxy" { // HAProxy alone does not run nftlb
		return err
	}
	if o.contender != "nftlb" {
		if _, err := exec.LookPath("haproxy"); err != nil {
			return fmt.Errorf("%w (bench/install.sh installs it)", err)
		}
	}
	o.bin = bin
	dir, err := os.MkdirTemp("", "nftlb-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	start := time.Now()
	fmt.Printf("# nftlb failover benchmark\n\n")
	fmt.Printf("- started %s on %s, %d CPUs, kernel %s, %s\n", start.Format(time.RFC3339), benchkit.Hostname(), runtime.NumCPU(), benchkit.Kernel(), runtime.Version())
	fmt.Printf("- load average at start: %s\n", benchkit.Loadavg())
	if o.contender == "nftlb" {
		fmt.Printf("- flags: -runs %d -rate %d -interval %v -timeout %v (rise %d, fall %d) -scale-backend %s -scale-window %v\n",
			o.runs, o.rate, o.interval, o.timeout, rise, fall, o.scaleBackend, o.scaleWindow)
	} else {
		fmt.Printf("- flags: -contender %s -rate %d (runs and check timing per profile below; part 2 is not run)\n", o.contender, o.rate)
	}
	for _, p := range profs {
		fmt.Printf("- part 1 profile %q: %s, interval %v, timeout %v, rise %d, fall %d, %d runs per fault\n", p.name, p.contender, p.interval, p.timeout, rise, fall, p.runs)
	}
	if o.contender != "nftlb" {
		fmt.Printf("- %s\n", haproxyVersion())
	}
	fmt.Println()

	fo := make([]map[string][]runResult, len(profs))
	for i, p := range profs {
		if p.runs == 0 {
			continue
		}
		t := time.Now()
		if fo[i], err = runFailover(ctx, o, p, dir); err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
		benchkit.Progress("part 1 %s: %v", p.name, time.Since(t).Round(time.Second))
	}
	var sc *scaleResult
	if !o.skip && o.contender == "nftlb" {
		if sc, err = runScale(ctx, o, dir); err != nil {
			return err
		}
	}

	fmt.Printf("\n## Results\n\n")
	for i, p := range profs {
		if fo[i] != nil {
			printFailoverTable(o, p, fo[i])
		}
	}
	if len(profs) > 1 {
		printComparison(o, profs, fo)
	}
	if sc != nil {
		printScaleTable(sc)
	}
	fmt.Printf("\nload average at end: %s; total time %v\n", benchkit.Loadavg(), time.Since(start).Round(time.Second))
	return nil
}

func haproxyVersion() string {
	out, err := exec.Command("haproxy", "-v").Output()
	if err != nil {
		return "haproxy: " + err.Error()
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line)
}
