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
// Progress goes to stderr, results (raw runs, then markdown tables) to
// stdout. The labs are always torn down, also on errors and Ctrl-C.
//
//	go build -o bin/nftlb ./cmd/nftlb
//	go run ./bench/failover -nftlb bin/nftlb
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
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
	flag.Parse()
	if o.runs < 0 || o.rate < 1 || o.rate > 1000 || o.interval <= 0 || o.timeout <= 0 || o.timeout >= o.interval ||
		(o.scaleBackend != "who" && o.scaleBackend != "silent") || o.scaleWindow < time.Second {
		fmt.Fprintln(os.Stderr, "failover: want -runs >= 0 (0: only the 1,000 pools), 1 <= -rate <= 1000, 0 < -timeout < -interval, -scale-backend who|silent, -scale-window >= 1s")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "failover:", err)
		os.Exit(1)
	}
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%s] "+format+"\n", append([]any{time.Now().Format("15:04:05.000")}, args...)...)
}

func run(ctx context.Context, o options) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, nftables)")
	}
	abs, err := filepath.Abs(o.bin)
	if err != nil {
		return err
	}
	if _, err := os.Stat(abs); err != nil {
		return fmt.Errorf("%w (build it: go build -o bin/nftlb ./cmd/nftlb)", err)
	}
	o.bin = abs
	dir, err := os.MkdirTemp("", "nftlb-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	start := time.Now()
	fmt.Printf("# nftlb failover benchmark\n\n")
	fmt.Printf("- started %s on %s, %d CPUs, kernel %s, %s\n", start.Format(time.RFC3339), hostname(), runtime.NumCPU(), kernel(), runtime.Version())
	fmt.Printf("- load average at start: %s\n", loadavg())
	fmt.Printf("- flags: -runs %d -rate %d -interval %v -timeout %v (rise %d, fall %d) -scale-backend %s -scale-window %v\n\n",
		o.runs, o.rate, o.interval, o.timeout, rise, fall, o.scaleBackend, o.scaleWindow)

	var fo map[string][]runResult
	if o.runs > 0 {
		if fo, err = runFailover(ctx, o, dir); err != nil {
			return err
		}
	}
	var sc *scaleResult
	if !o.skip {
		if sc, err = runScale(ctx, o, dir); err != nil {
			return err
		}
	}

	fmt.Printf("\n## Results\n\n")
	if fo != nil {
		printFailoverTable(o, fo)
	}
	if sc != nil {
		printScaleTable(sc)
	}
	fmt.Printf("\nload average at end: %s; total time %v\n", loadavg(), time.Since(start).Round(time.Second))
	return nil
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
