package health

// Load measurements of the Manager: BenchmarkLoad runs the manager of
// legacy_test.go (the one before the shared scheduler) and the current one
// side by side, each in a child process of its own so that CPU time (from
// getrusage) and RSS (VmRSS) are the manager's and not the other run's, and
// the backends in a third process (they accept and close, as a backend's
// kernel and server would), so their work is not counted either.
//
//	go test -run '^$' -bench Load -benchtime 1x ./internal/health
//
// NFTLB_HEALTH_LOAD_WINDOW (default 5s) sets the measured window,
// NFTLB_HEALTH_LOAD_ONLY a scenario name, and NFTLB_HEALTH_PROFILE_DIR
// makes every run write a CPU profile of its window and a heap profile
// there (SCENARIO-IMPL.cpu, .heap) for go tool pprof.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nftlb/nftlb/internal/vip"
)

const helperEnv = "NFTLB_HEALTH_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "backends":
		os.Exit(serveBackends())
	case "load":
		os.Exit(runLoad())
	}
	os.Exit(m.Run())
}

// serveBackends listens on NFTLB_HEALTH_BACKENDS ports of 127.0.0.1,
// prints them on one line, accepts and closes until stdin closes.
func serveBackends() int {
	n, err := strconv.Atoi(os.Getenv("NFTLB_HEALTH_BACKENDS"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ports := make([]string, n)
	for i := range n {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		ports[i] = strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				_ = c.Close()
			}
		}()
	}
	fmt.Println(strings.Join(ports, ","))
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// startBackends runs serveBackends in a child process and returns its ports.
func startBackends(tb testing.TB, n int) []uint16 {
	tb.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"=backends", "NFTLB_HEALTH_BACKENDS="+strconv.Itoa(n))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = stdin.Close(); _ = cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		tb.Fatalf("backends: %v", err)
	}
	var ports []uint16
	for _, f := range strings.Split(strings.TrimSpace(line), ",") {
		p, err := strconv.Atoi(f)
		if err != nil {
			tb.Fatal(err)
		}
		ports = append(ports, uint16(p))
	}
	return ports
}

// loadManager is what the two managers have in common.
type loadManager interface {
	Update([]Target) error
	WaitFirst(context.Context)
	Events() <-chan Event
	SetObserver(func(Target, Result))
	Stop()
}

type loadScenario struct {
	name     string
	backends int  // listeners to start
	instant  bool // a prober that answers OK at once, without a socket: the manager's own cost
	targets  func(ports []uint16) []Target
}

var loadHealth = vip.Health{Type: vip.CheckTCP, Interval: time.Second, Timeout: 500 * time.Millisecond, Rise: 2, Fall: 3}

func loopback(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), port)
}

// pools makes n pools of per backends; addr picks backend j of pool i.
func pools(n, per int, h vip.Health, addr func(i, j int) netip.AddrPort) []Target {
	out := make([]Target, 0, n*per)
	for i := range n {
		name := fmt.Sprintf("pool%05d", i)
		for j := range per {
			a := addr(i, j)
			out = append(out, Target{ID: vip.BackendID(name, a), Pool: name, Addr: a, Check: h})
		}
	}
	return out
}

var loadScenarios = []loadScenario{
	// bench/controlplane's probe part: 1,000 pools of the same 3 backends.
	{"tcp-1000x3-shared", 3, false, func(ports []uint16) []Target {
		return pools(1000, 3, loadHealth, func(_, j int) netip.AddrPort { return loopback(ports[j]) })
	}},
	// 3,000 distinct backends: nothing to share, every target is probed.
	{"tcp-3000-distinct", 3000, false, func(ports []uint16) []Target {
		return pools(1000, 3, loadHealth, func(i, j int) netip.AddrPort { return loopback(ports[i*3+j]) })
	}},
	// 10,000 pools whose checks are off.
	// 3,000 distinct targets whose probes cost nothing: what is left is
	// scheduling, goroutines, timers, contexts and bookkeeping.
	{"instant-3000", 0, true, func([]uint16) []Target {
		return pools(1000, 3, loadHealth, func(i, j int) netip.AddrPort {
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), uint16(80+j))
		})
	}},
	{"none-10000", 0, false, func([]uint16) []Target {
		h := loadHealth
		h.Type = vip.CheckNone
		return pools(10000, 1, h, func(i, _ int) netip.AddrPort {
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), 80)
		})
	}},
}

// loadReport is what one measured run found.
type loadReport struct {
	Targets     int
	FirstRound  time.Duration // Update to WaitFirst done
	Window      time.Duration
	User, Sys   time.Duration // getrusage(RUSAGE_SELF) over the window
	Probes      int64         // Probe calls over the window
	Results     int64         // results handed to the observer over the window (one per target)
	Events      int64         // state changes over the window
	Mallocs     uint64        // over the window
	AllocBytes  uint64        // over the window
	RSS, HWM    int64         // VmRSS and VmHWM at the end, bytes
	RSSBase     int64         // VmRSS before the manager started
	StackInuse  uint64
	HeapInuse   uint64
	GoSys       uint64
	Goroutines  int
	GoroutBase  int
	NumGC       uint32
	ProbeErrors int64 // results that were not OK over the window
}

func (r loadReport) cpu() float64 { return float64(r.User+r.Sys) / float64(r.Window) * 100 }

// runLoad is the child of one measured run.
func runLoad() int {
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "load:", err); return 2 }
	impl, name := os.Getenv("NFTLB_HEALTH_LOAD_IMPL"), os.Getenv("NFTLB_HEALTH_LOAD_SCENARIO")
	window, err := time.ParseDuration(os.Getenv("NFTLB_HEALTH_LOAD_WINDOW"))
	if err != nil {
		return fail(err)
	}
	var ports []uint16
	if s := os.Getenv("NFTLB_HEALTH_LOAD_PORTS"); s != "" {
		for _, f := range strings.Split(s, ",") {
			p, err := strconv.Atoi(f)
			if err != nil {
				return fail(err)
			}
			ports = append(ports, uint16(p))
		}
	}
	var sc *loadScenario
	for i := range loadScenarios {
		if loadScenarios[i].name == name {
			sc = &loadScenarios[i]
		}
	}
	if sc == nil {
		return fail(fmt.Errorf("no scenario %q", name))
	}
	targets := sc.targets(ports)
	var probes, results, events, errs atomic.Int64
	var lm loadManager
	legacyProber, newProber := legacyNewProber, NewProber
	if sc.instant {
		instant := func(vip.Health) (Prober, error) {
			return proberFunc(func(context.Context, netip.AddrPort) Result { return Result{Outcome: OK, At: time.Now()} }), nil
		}
		legacyProber, newProber = instant, instant
	}
	switch impl {
	case "legacy":
		m := newLegacyManager()
		m.newProber = countingProber(&probes, legacyProber)
		lm = m
	case "new":
		m := NewManager()
		m.newProber = countingProber(&probes, newProber)
		lm = m
	default:
		return fail(fmt.Errorf("no implementation %q", impl))
	}
	lm.SetObserver(func(_ Target, r Result) {
		results.Add(1)
		if r.Outcome != OK {
			errs.Add(1)
		}
	})
	go func() {
		for range lm.Events() {
			events.Add(1)
		}
	}()
	runtime.GC()
	rep := loadReport{Targets: len(targets), RSSBase: procStatus("VmRSS"), GoroutBase: runtime.NumGoroutine()}
	start := time.Now()
	if err := lm.Update(targets); err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	lm.WaitFirst(ctx)
	cancel()
	rep.FirstRound = time.Since(start)
	time.Sleep(defaultWorkerIdle + time.Second) // warm-up: past the first round's burst, and its workers gone

	dir := os.Getenv("NFTLB_HEALTH_PROFILE_DIR")
	base := filepath.Join(dir, name+"-"+impl)
	if dir != "" {
		f, err := os.Create(base + ".cpu")
		if err != nil {
			return fail(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fail(err)
		}
	}
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	u0, s0 := rusage()
	p0, r0, e0, x0 := probes.Load(), results.Load(), events.Load(), errs.Load()
	t0 := time.Now()
	time.Sleep(window) // the measured window: the manager runs on its own
	rep.Window = time.Since(t0)
	u1, s1 := rusage()
	p1, r1, e1, x1 := probes.Load(), results.Load(), events.Load(), errs.Load()
	runtime.ReadMemStats(&ms1)
	if dir != "" {
		pprof.StopCPUProfile()
	}
	rep.User, rep.Sys = u1-u0, s1-s0
	rep.Probes, rep.Results, rep.Events, rep.ProbeErrors = p1-p0, r1-r0, e1-e0, x1-x0
	rep.Mallocs, rep.AllocBytes = ms1.Mallocs-ms0.Mallocs, ms1.TotalAlloc-ms0.TotalAlloc
	rep.StackInuse, rep.HeapInuse, rep.GoSys, rep.NumGC = ms1.StackInuse, ms1.HeapInuse, ms1.Sys, ms1.NumGC-ms0.NumGC
	rep.RSS, rep.HWM = procStatus("VmRSS"), procStatus("VmHWM")
	rep.Goroutines = runtime.NumGoroutine()
	if dir != "" {
		f, err := os.Create(base + ".heap")
		if err != nil {
			return fail(err)
		}
		defer f.Close()
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			return fail(err)
		}
	}
	lm.Stop()
	if err := json.NewEncoder(os.Stdout).Encode(rep); err != nil {
		return fail(err)
	}
	return 0
}

// countingProber wraps newProber so every Probe call is counted.
func countingProber(n *atomic.Int64, newProber func(vip.Health) (Prober, error)) func(vip.Health) (Prober, error) {
	return func(h vip.Health) (Prober, error) {
		p, err := newProber(h)
		if err != nil {
			return nil, err
		}
		return proberFunc(func(ctx context.Context, a netip.AddrPort) Result { n.Add(1); return p.Probe(ctx, a) }), nil
	}
}

type proberFunc func(context.Context, netip.AddrPort) Result

func (f proberFunc) Probe(ctx context.Context, a netip.AddrPort) Result { return f(ctx, a) }

func rusage() (user, sys time.Duration) {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())
}

// procStatus reads a "kB" line of /proc/self/status, in bytes.
func procStatus(key string) int64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n * 1024
			}
		}
	}
	return 0
}

func BenchmarkLoad(b *testing.B) {
	window := 5 * time.Second
	if s := os.Getenv("NFTLB_HEALTH_LOAD_WINDOW"); s != "" {
		var err error
		if window, err = time.ParseDuration(s); err != nil {
			b.Fatal(err)
		}
	}
	type row struct {
		scenario      string
		legacy, fresh loadReport
	}
	var rows []row
	for _, sc := range loadScenarios {
		if only := os.Getenv("NFTLB_HEALTH_LOAD_ONLY"); only != "" && only != sc.name {
			continue
		}
		var ports []string
		if sc.backends > 0 {
			for _, p := range startBackends(b, sc.backends) {
				ports = append(ports, strconv.Itoa(int(p)))
			}
		}
		r := row{scenario: sc.name}
		for _, impl := range []string{"legacy", "new"} {
			b.Run(sc.name+"/"+impl, func(b *testing.B) {
				cmd := exec.Command(os.Args[0])
				cmd.Env = append(os.Environ(), helperEnv+"=load", "NFTLB_HEALTH_LOAD_IMPL="+impl,
					"NFTLB_HEALTH_LOAD_SCENARIO="+sc.name, "NFTLB_HEALTH_LOAD_WINDOW="+window.String(),
					"NFTLB_HEALTH_LOAD_PORTS="+strings.Join(ports, ","))
				cmd.Stderr = os.Stderr
				out, err := cmd.Output()
				if err != nil {
					b.Fatalf("%s/%s: %v", sc.name, impl, err)
				}
				var rep loadReport
				if err := json.Unmarshal(out, &rep); err != nil {
					b.Fatalf("%s/%s: %v: %s", sc.name, impl, err, out)
				}
				probes := float64(max(rep.Probes, 1))
				b.ReportMetric(0, "ns/op")
				b.ReportMetric(rep.cpu(), "%cpu")
				b.ReportMetric(float64(rep.Sys)/float64(rep.User+rep.Sys+1)*100, "%sys")
				b.ReportMetric(float64(rep.RSS)/(1<<20), "MiB-rss")
				b.ReportMetric(float64(rep.StackInuse)/(1<<20), "MiB-stack")
				b.ReportMetric(float64(rep.Probes)/rep.Window.Seconds(), "probes/s")
				b.ReportMetric(float64(rep.Mallocs)/probes, "allocs/probe")
				b.ReportMetric(float64(rep.AllocBytes)/probes, "B/probe")
				b.ReportMetric(float64(rep.Mallocs)/rep.Window.Seconds(), "allocs/s")
				b.ReportMetric(float64(rep.Goroutines), "goroutines")
				if impl == "legacy" {
					r.legacy = rep
				} else {
					r.fresh = rep
				}
			})
		}
		rows = append(rows, r)
	}
	if len(rows) == 0 {
		return
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nwindow %v per run; CPU from getrusage (user+sys, %% of one core), RSS = VmRSS at the end (test binary ~%.0f MiB before the manager started)\n",
		window, float64(rows[0].legacy.RSSBase)/(1<<20))
	fmt.Fprintf(&sb, "%-20s %-7s %8s %8s %9s %7s %7s %7s %8s %9s %9s %8s %9s %8s %7s\n", "scenario", "impl", "targets", "probes/s", "results/s",
		"cpu%", "user%", "sys%", "rss MiB", "stack MiB", "heap MiB", "allocs/s", "KiB/s", "allocs/pr", "gorout")
	line := func(name, impl string, r loadReport) {
		w := r.Window.Seconds()
		p := float64(max(r.Probes, 1))
		fmt.Fprintf(&sb, "%-20s %-7s %8d %8.0f %9.0f %7.2f %7.2f %7.2f %8.1f %9.2f %9.2f %8.0f %9.1f %8.1f %7d\n", name, impl, r.Targets,
			float64(r.Probes)/w, float64(r.Results)/w, r.cpu(), float64(r.User)/float64(r.Window)*100, float64(r.Sys)/float64(r.Window)*100,
			float64(r.RSS)/(1<<20), float64(r.StackInuse)/(1<<20), float64(r.HeapInuse)/(1<<20), float64(r.Mallocs)/w, float64(r.AllocBytes)/w/1024,
			float64(r.Mallocs)/p, r.Goroutines)
	}
	ratio := func(a, b float64) string {
		if a == 0 {
			return "-"
		}
		return fmt.Sprintf("%.3f", b/a)
	}
	for _, r := range rows {
		line(r.scenario, "legacy", r.legacy)
		line(r.scenario, "new", r.fresh)
		fmt.Fprintf(&sb, "%-20s %-7s cpu x%s  user x%s  sys x%s  rss x%s  stack x%s  allocs/s x%s  bytes/s x%s  (new/legacy)\n", r.scenario, "ratio",
			ratio(r.legacy.cpu(), r.fresh.cpu()),
			ratio(float64(r.legacy.User), float64(r.fresh.User)), ratio(float64(r.legacy.Sys), float64(r.fresh.Sys)),
			ratio(float64(r.legacy.RSS), float64(r.fresh.RSS)), ratio(float64(r.legacy.StackInuse), float64(r.fresh.StackInuse)),
			ratio(float64(r.legacy.Mallocs)/r.legacy.Window.Seconds(), float64(r.fresh.Mallocs)/r.fresh.Window.Seconds()),
			ratio(float64(r.legacy.AllocBytes)/r.legacy.Window.Seconds(), float64(r.fresh.AllocBytes)/r.fresh.Window.Seconds()))
		if r.legacy.ProbeErrors+r.fresh.ProbeErrors > 0 {
			fmt.Fprintf(&sb, "%-20s failed probes in the window: legacy %d, new %d\n", r.scenario, r.legacy.ProbeErrors, r.fresh.ProbeErrors)
		}
	}
	b.Log(sb.String())
}

// BenchmarkTCPProbe is one tcp probe, as the Manager runs it (a context
// with the check's timeout), with the prober before and after, against a
// listener of a child process.
func BenchmarkTCPProbe(b *testing.B) {
	target := loopback(startBackends(b, 1)[0])
	for _, impl := range []struct {
		name   string
		prober Prober
	}{{"legacy", legacyTCPProber{}}, {"new", tcpProber{}}} {
		b.Run(impl.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				ctx, cancel := context.WithTimeout(context.Background(), loadHealth.Timeout)
				r := impl.prober.Probe(ctx, target)
				cancel()
				if r.Outcome != OK {
					b.Fatal(r)
				}
			}
		})
	}
}
