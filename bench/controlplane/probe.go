package main

import (
	"bufio"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/lab"
)

const (
	probeInterval = time.Second
	probeTimeout  = 500 * time.Millisecond // must be below the interval
	probeWarmup   = 5 * time.Second
)

type probeSample struct {
	at, span  time.Duration // since the window started; since the previous sample
	user, sys time.Duration
	rss       int64
	timeWait  int
	conntrack string
	changes   int
}

type probeResult struct {
	pools, targets  int
	startup         time.Duration // exec -> every target up
	window          time.Duration
	user, sys       time.Duration
	selfCPU         time.Duration // this program (the lab's servers) over the window
	rss, hwm        int64
	maxRSS          int64
	threads         string
	samples         []probeSample
	changes         int     // state changes after every target was up
	probes          float64 // probes the daemon completed in the window (its nftlb_probe_duration_seconds counts)
	maxTimeWait     int
	gomem           map[string]float64 // from the daemon's /metrics
	perfDSO, perfFn string
	perfErr         string
}

// probePortBase: pool i's backends listen on probePortBase+i.
const probePortBase = 20000

func probePort(i int) uint16 { return uint16(probePortBase + i) }

func probeHealth() string {
	return fmt.Sprintf("  type: tcp\n  interval: %v\n  timeout: %v\n  rise: 2\n  fall: 3\n", probeInterval, probeTimeout)
}

func runProbe(ctx context.Context, o options, dir string) (*probeResult, error) {
	n := o.probePools
	res := &probeResult{pools: n, targets: n * len(backendAddrs), gomem: map[string]float64{}}
	fmt.Printf("\n## 3. The daemon while health-checking\n\nA lab (client, LB, b1..b3; internal/lab), `nftlb run` in the LB namespace with %d pools × 3 backends, `type: tcp` checks every %v (timeout %v); pool i's backends are b1..b3:%d+i, so every target is a distinct address:port and a real probe (nftlb probes an address:port that several pools check the same way only once), and each backend port runs a %s server (goroutines of this program). After every target is up and %v of warm-up, a %v window: nftlb's CPU (utime + stime, /proc/PID/stat), VmRSS, TIME_WAIT sockets in the LB namespace (`ss -Htan state time-wait`, counted), conntrack entries.\n\n```\n",
		n, probeInterval, probeTimeout, probePortBase, o.backend, probeWarmup, o.window)
	defer fmt.Println("```")
	l, closeLab, err := benchkit.NewLab("probe", len(backendAddrs))
	if err != nil {
		return nil, err
	}
	defer closeLab()
	for _, b := range l.Backends {
		serve := b.ServeHTTP // accepts and sends nothing until asked: the probe's close is the first FIN
		if o.backend == "who" {
			serve = b.ServeTCP
		}
		for i := range n {
			if _, err := serve(probePort(i)); err != nil {
				return nil, err
			}
		}
	}
	cfgPath, err := writeConfigPorts(dir, n, probeHealth(), "probe", probePort)
	if err != nil {
		return nil, err
	}
	benchkit.Progress("probe: starting nftlb (%d pools, %d targets) in %s", n, res.targets, l.LB.Name)
	t0 := time.Now()
	d, err := benchkit.StartNftlb(l.LB, o.bin, cfgPath, nil)
	if err != nil {
		return nil, err
	}
	defer d.Stop()
	if _, _, err := d.WaitFor(ctx, 0, time.Minute, benchkit.Match("ruleset applied")); err != nil {
		return nil, err
	}
	if err := d.WaitTargetsUp(ctx, 0, res.targets, time.Minute-time.Since(t0)); err != nil {
		return nil, err
	}
	res.startup = time.Since(t0)
	startMark := d.Log.Len()
	benchkit.Progress("probe: all %d targets up %v after exec", res.targets, res.startup.Round(time.Millisecond))
	for _, i := range []int{0, n - 1} {
		addr := fmt.Sprintf("%s:%d", poolVIP(i), vipPort)
		name, err := benchkit.Who(ctx, l, addr, o.backend != "who", 3*time.Second)
		if err != nil {
			return nil, fmt.Errorf("a connection through pool %s (%s): %w", poolName(i), addr, err)
		}
		benchkit.Progress("probe: %s (%s) -> %s", poolName(i), addr, name)
	}
	changesSince := func() int {
		c := 0
		for _, e := range d.Log.Since(startMark) {
			if e.Msg == "backend state changed" {
				c++
			}
		}
		return c
	}
	if err := benchkit.Sleep(ctx, probeWarmup); err != nil {
		return nil, err
	}
	pid := d.Pid()
	if err := benchkit.CheckComm(pid, "nftlb"); err != nil {
		return nil, err
	}
	benchkit.Progress("probe: measuring nftlb (pid %d) over %v", pid, o.window)
	p0, perr := probeCount(ctx, l)
	su0, ss0 := benchkit.Rusage()
	total, err := benchkit.SampleCPU(ctx, pid, o.window, 2*time.Second, func(c benchkit.CPUSample) {
		sm := probeSample{at: c.At, span: c.Span, user: c.User, sys: c.Sys, rss: benchkit.ProcKB(pid, "VmRSS"),
			timeWait: timeWait(ctx, l.LB), conntrack: benchkit.ConntrackCount(l.LB), changes: changesSince()}
		res.samples = append(res.samples, sm)
		res.maxRSS = max(res.maxRSS, sm.rss)
		res.maxTimeWait = max(res.maxTimeWait, sm.timeWait)
		line := fmt.Sprintf("+%-6v nftlb cpu %5.1f%% (user %v, sys %v)  VmRSS %s  LB TIME_WAIT %d  conntrack %s  state changes %d",
			sm.at.Round(100*time.Millisecond), benchkit.Pct(sm.user+sm.sys, sm.span), sm.user, sm.sys, mib(sm.rss), sm.timeWait, sm.conntrack, sm.changes)
		fmt.Println(line)
		benchkit.Progress("probe: %s", line)
	})
	if err != nil {
		return nil, fmt.Errorf("nftlb: %w", err)
	}
	res.window = total.At
	res.user, res.sys = total.User, total.Sys
	if p1, err := probeCount(ctx, l); err == nil && perr == nil {
		res.probes = p1 - p0
	} else {
		benchkit.Progress("probe: counting probes: %v %v", perr, err)
	}
	su1, ss1 := benchkit.Rusage()
	res.selfCPU = su1 + ss1 - su0 - ss0
	res.rss, res.hwm, res.threads = benchkit.ProcKB(pid, "VmRSS"), benchkit.ProcKB(pid, "VmHWM"), benchkit.ProcStatus(pid, "Threads")
	res.changes = changesSince()
	if err := scrapeGoMem(ctx, l, res.gomem); err != nil {
		benchkit.Progress("probe: /metrics: %v", err)
	}
	fmt.Printf("window %v: %.0f probes (%.0f/s); nftlb cpu user %v + sys %v = %.1f%% of one core; VmRSS %s (max sampled %s), VmHWM %s, threads %s; Go: %s; this program (the backends) cpu %v\n",
		res.window.Round(time.Millisecond), res.probes, res.probes/res.window.Seconds(), res.user, res.sys, benchkit.Pct(res.user+res.sys, res.window), mib(res.rss), mib(res.maxRSS), mib(res.hwm), res.threads, goMemString(res.gomem), res.selfCPU.Round(time.Millisecond))
	if o.perf {
		perfDaemon(ctx, pid, dir, res)
	}
	return res, nil
}

// timeWait counts TIME_WAIT TCP sockets in ns (ss -H: no header line).
func timeWait(ctx context.Context, ns *lab.NS) int {
	out, err := ns.Run(ctx, "ss", "-Htan", "state", "time-wait")
	if err != nil {
		return -1
	}
	n := 0
	for line := range strings.Lines(out) {
		if strings.TrimSpace(line) != "" {
			n++
		}
	}
	return n
}

// probeCount sums the daemon's nftlb_probe_duration_seconds_count over
// its pools: the probes it has completed.
func probeCount(ctx context.Context, l *lab.Lab) (float64, error) {
	body, err := metricsText(ctx, l)
	if err != nil {
		return 0, err
	}
	var n float64
	for line := range strings.Lines(body) {
		if !strings.HasPrefix(line, "nftlb_probe_duration_seconds_count{") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("parse %q: %w", line, err)
		}
		n += v
	}
	return n, nil
}

// metricsText GETs the daemon's whole /metrics from inside the LB
// namespace.
func metricsText(ctx context.Context, l *lab.Lab) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return l.Get(cctx, l.LB, "http://127.0.0.1:9742/metrics")
}

var goMemKeys = []string{
	"process_resident_memory_bytes", "go_memstats_heap_inuse_bytes", "go_memstats_heap_idle_bytes", "go_memstats_heap_released_bytes",
	"go_memstats_stack_inuse_bytes", "go_memstats_sys_bytes", "go_memstats_next_gc_bytes", "go_goroutines", "go_threads",
}

// scrapeGoMem reads the Go runtime's figures from the daemon's /metrics
// (its listener is on 127.0.0.1 inside the LB namespace).
func scrapeGoMem(ctx context.Context, l *lab.Lab, into map[string]float64) error {
	body, err := metricsText(ctx, l)
	if err != nil {
		return err
	}
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		for _, k := range goMemKeys {
			if f[0] == k {
				v, err := strconv.ParseFloat(f[1], 64)
				if err == nil {
					into[k] = v
				}
			}
		}
	}
	return sc.Err()
}

func goMemString(m map[string]float64) string {
	if len(m) == 0 {
		return "-"
	}
	mb := func(k string) string { return fmt.Sprintf("%.1f MiB", m[k]/(1<<20)) }
	return fmt.Sprintf("heap in use %s, heap idle %s (released %s), stacks %s, runtime sys %s, next GC at %s, %.0f goroutines, %.0f threads",
		mb("go_memstats_heap_inuse_bytes"), mb("go_memstats_heap_idle_bytes"), mb("go_memstats_heap_released_bytes"),
		mb("go_memstats_stack_inuse_bytes"), mb("go_memstats_sys_bytes"), mb("go_memstats_next_gc_bytes"), m["go_goroutines"], m["go_threads"])
}

// perfDaemon samples the daemon with perf for 10 s (after the window, so
// perf's own cost is not in the CPU figures) and keeps the top entries by
// DSO (kernel vs nftlb) and by symbol.
func perfDaemon(ctx context.Context, pid int, dir string, res *probeResult) {
	perf, err := exec.LookPath("perf")
	if err != nil {
		res.perfErr = "perf not installed"
		return
	}
	data := filepath.Join(dir, "perf.data")
	benchkit.Progress("probe: perf record -p %d for 10 s", pid)
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(cctx, perf, "record", "-q", "-F", "999", "-p", strconv.Itoa(pid), "-o", data, "--", "sleep", "10").CombinedOutput(); err != nil {
		res.perfErr = fmt.Sprintf("perf record: %v: %s", err, benchkit.Tail(string(out), 3))
		return
	}
	report := func(sort string, limit int) string {
		out, err := exec.CommandContext(cctx, perf, "report", "-i", data, "--stdio", "--no-children", "--sort", sort, "--percent-limit", "0.5").Output()
		if err != nil {
			return fmt.Sprintf("perf report: %v", err)
		}
		var lines []string
		for line := range strings.Lines(string(out)) {
			line = strings.TrimRight(line, "\n")
			if strings.HasPrefix(line, "#") || strings.TrimSpace(line) == "" {
				continue
			}
			lines = append(lines, line)
			if len(lines) == limit {
				break
			}
		}
		return strings.Join(lines, "\n")
	}
	res.perfDSO = report("dso", 6)
	res.perfFn = report("dso,sym", 25)
}

func printProbe(o options, r *probeResult) {
	fmt.Printf("\n### The daemon while health-checking %d pools × 3 backends (%d tcp targets every %v, backends %q), %v window\n\n", r.pools, r.targets, probeInterval, o.backend, r.window.Round(time.Second))
	fmt.Printf("| metric | value |\n|---|---|\n")
	fmt.Printf("| exec → every target up | %s |\n", ms(r.startup))
	fmt.Printf("| CPU, %% of one core (utime + stime over the window) | %.1f %% |\n", benchkit.Pct(r.user+r.sys, r.window))
	fmt.Printf("| of which user / system | %.1f %% / %.1f %% (%v / %v) |\n", benchkit.Pct(r.user, r.window), benchkit.Pct(r.sys, r.window), r.user, r.sys)
	if r.probes > 0 {
		fmt.Printf("| probes completed in the window (the daemon's own count) | %.0f (%.0f/s) |\n", r.probes, r.probes/r.window.Seconds())
		fmt.Printf("| CPU per probe, user + sys | %.0f µs + %.0f µs |\n", float64(r.user.Microseconds())/r.probes, float64(r.sys.Microseconds())/r.probes)
	}
	var per []float64
	for _, s := range r.samples {
		per = append(per, benchkit.Pct(s.user+s.sys, s.span))
	}
	sort.Float64s(per)
	if len(per) > 0 {
		fmt.Printf("| CPU per ~2 s sample, min / max | %.1f %% / %.1f %% |\n", per[0], per[len(per)-1])
	}
	fmt.Printf("| VmRSS at the end (max sampled) | %s (%s) |\n", mib(r.rss), mib(r.maxRSS))
	fmt.Printf("| VmHWM (peak since exec) | %s |\n", mib(r.hwm))
	if len(r.gomem) > 0 {
		fmt.Printf("| Go runtime (daemon's /metrics) | %s |\n", goMemString(r.gomem))
	}
	fmt.Printf("| TIME_WAIT sockets in the LB namespace, max sampled | %d |\n", r.maxTimeWait)
	fmt.Printf("| state changes after start-up (should be 0) | %d |\n", r.changes)
	fmt.Printf("| this program (the 3 backends' servers), CPU over the window | %.1f %% |\n", benchkit.Pct(r.selfCPU, r.window))
	if r.perfErr != "" {
		fmt.Printf("\nperf: %s\n", r.perfErr)
	} else if r.perfDSO != "" {
		fmt.Printf("\n`perf record -F 999 -p PID` for 10 s after the window, `perf report --no-children --sort dso` and `--sort dso,sym` (top entries):\n\n```\n%s\n\n%s\n```\n", r.perfDSO, r.perfFn)
	}
}
