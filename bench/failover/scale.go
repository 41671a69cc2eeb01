package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/lab"
)

const (
	scalePools    = 1000
	scaleRepeats  = 5
	scalePort     = 443  // every pool's VIP port
	sharedPort    = 6443 // pools 1..999: b1..b3:6443
	changingPort  = 7443 // pool 0: b1..b3:7443, the only pool that changes
	scaleInterval = time.Second
	scaleTimeout  = 500 * time.Millisecond
)

// scaleVIP is pool i's VIP: 198.18.100.1 .. 198.18.103.232 (in 198.18.100.0/22).
func scaleVIP(i int) netip.Addr { return benchkit.AddrAdd(netip.MustParseAddr("198.18.100.0"), i+1) }

func poolName(i int) string { return fmt.Sprintf("p%04d", i) }

func scaleConfig(l *lab.Lab) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# written by bench/failover: %d pools x %d backends\nhealth:\n  type: tcp\n  interval: %v\n  timeout: %v\n  rise: %d\n  fall: %d\npools:\n",
		scalePools, len(l.Backends), scaleInterval, scaleTimeout, rise, fall)
	for i := range scalePools {
		port := sharedPort
		if i == 0 {
			port = changingPort
		}
		fmt.Fprintf(&b, "  - name: %s\n    vip: %s\n    port: %d\n    health:\n      type: tcp\n    backends:\n", poolName(i), scaleVIP(i), scalePort)
		for _, be := range l.Backends {
			fmt.Fprintf(&b, "      - %s:%d\n", be.Addr, port)
		}
	}
	return b.String()
}

type scaleRun struct {
	detect, kernel, apply, kernelUp time.Duration // -1: not seen within 20 s
	changed                         string
}

// sample is one point of the steady-state timeline.
type sample struct {
	at                time.Duration // since the window started
	user, sys         time.Duration // nftlb's CPU since the previous sample
	timeWait          string        // TIME_WAIT sockets in the LB namespace
	conntrack         string        // conntrack entries in the LB namespace
	changes           int           // state changes of the untouched pools so far
	maxKernelSoFar    time.Duration // longest "probe to kernel" latency so far
	slowestApplySoFar time.Duration
}

type scaleResult struct {
	backend           string // who or silent
	runs              []scaleRun
	startup           time.Duration // start -> all 3,000 targets up
	rss, hwm, threads string
	user, sys         time.Duration // nftlb's CPU over the window
	selfCPU           time.Duration // this program's CPU over the window
	window            time.Duration
	samples           []sample
	spurious          int           // state changes of pools other than pool 0 after start-up
	maxKernel         time.Duration // longest probe-to-kernel latency of any event after start-up
	maxApply          time.Duration // longest apply after start-up
}

func runScale(ctx context.Context, o options, dir string) (*scaleResult, error) {
	l, closeLab, err := benchkit.NewLab(fmt.Sprintf("part 2 (%d pools)", scalePools), 3)
	if err != nil {
		return nil, err
	}
	defer closeLab()
	// Pools 1..999 share b1..b3:6443. "who" greets at once, so nftlb's
	// probe (connect, close) ends with a RST and leaves no TIME_WAIT;
	// "silent" (an HTTP server) sends nothing first, like a TLS server, so
	// each probe closes with a FIN and leaves a TIME_WAIT socket on the LB.
	changing := make([]*lab.Server, len(l.Backends))
	for i, b := range l.Backends {
		serve := b.ServeTCP
		if o.scaleBackend == "silent" {
			serve = b.ServeHTTP
		}
		if _, err := serve(sharedPort); err != nil {
			return nil, err
		}
		if changing[i], err = b.ServeTCP(changingPort); err != nil {
			return nil, err
		}
	}
	targets := scalePools * len(l.Backends)
	benchkit.Progress("part 2: starting nftlb with %d pools, %d tcp probe targets every %v (backends: %s)", scalePools, targets, scaleInterval, o.scaleBackend)
	t0 := time.Now()
	d, err := startDaemon(ctx, l, o.bin, dir, scaleConfig(l))
	if err != nil {
		return nil, err
	}
	defer d.Stop()
	res := &scaleResult{backend: o.scaleBackend}

	// Every target's first result moves it unknown -> up.
	if err := d.WaitTargetsUp(ctx, 0, targets, 60*time.Second); err != nil {
		return nil, err
	}
	res.startup = time.Since(t0)
	startMark := d.Log.Len()
	benchkit.Progress("part 2: all %d targets up %v after start", targets, res.startup.Round(time.Millisecond))
	for _, i := range []int{0, 1, scalePools - 1} {
		addr := fmt.Sprintf("%s:%d", scaleVIP(i), scalePort)
		name, err := benchkit.Who(ctx, l, addr, i != 0 && o.scaleBackend != "who", connTO)
		if err != nil {
			return nil, fmt.Errorf("connection to pool %s at %s: %w", poolName(i), addr, err)
		}
		benchkit.Progress("part 2: %s (%s) -> %s", poolName(i), addr, name)
	}
	// afterStart summarizes the log since all targets were up.
	afterStart := func() (changes int, maxKernel, maxApply time.Duration) {
		for _, e := range d.Log.Since(startMark) {
			switch {
			case e.Msg == "backend state changed" && e.Str("pool") != poolName(0):
				changes++
			case e.Msg == "probe to kernel":
				maxKernel = max(maxKernel, e.Dur("latency"))
			case e.Msg == "ruleset applied":
				maxApply = max(maxApply, e.Dur("duration"))
			}
		}
		return
	}

	// Steady state: RSS and CPU while probing, with a timeline.
	if err := benchkit.Sleep(ctx, 2*time.Second); err != nil {
		return nil, err
	}
	pid := d.Pid()
	if err := benchkit.CheckComm(pid, "nftlb"); err != nil {
		return nil, err
	}
	benchkit.Progress("part 2: measuring nftlb's CPU over %v (pid %d)", o.scaleWindow, pid)
	su0, ss0, _ := benchkit.ProcCPU(os.Getpid())
	step := min(2*time.Second, o.scaleWindow)
	total, err := benchkit.SampleCPU(ctx, pid, o.scaleWindow, step, func(c benchkit.CPUSample) {
		sm := sample{at: c.At, user: c.User, sys: c.Sys, timeWait: lbTimeWait(ctx, l), conntrack: benchkit.ConntrackCount(l.LB)}
		sm.changes, sm.maxKernelSoFar, sm.slowestApplySoFar = afterStart()
		res.samples = append(res.samples, sm)
		benchkit.Progress("part 2: +%v nftlb cpu user %v sys %v, TIME_WAIT %s, conntrack %s, state changes of untouched pools %d",
			sm.at.Round(time.Second), sm.user, sm.sys, sm.timeWait, sm.conntrack, sm.changes)
	})
	if err != nil {
		return nil, fmt.Errorf("nftlb: %w", err)
	}
	res.window = total.At
	res.user, res.sys = total.User, total.Sys
	su1, ss1, _ := benchkit.ProcCPU(os.Getpid())
	res.selfCPU = su1 + ss1 - su0 - ss0
	res.rss, res.hwm, res.threads = benchkit.ProcStatus(pid, "VmRSS"), benchkit.ProcStatus(pid, "VmHWM"), benchkit.ProcStatus(pid, "Threads")

	// Kill b2's 7443 (a port only pool 0 uses): only pool 0 changes.
	victim := l.Backends[1]
	target := fmt.Sprintf("%s:%d", victim.Addr, changingPort)
	missed := func(err error) error {
		select {
		case <-d.Exited():
			return err
		default:
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		benchkit.Progress("part 2: %v", strings.SplitN(err.Error(), "\n", 2)[0])
		return nil
	}
	for run := 1; run <= scaleRepeats; run++ {
		r := scaleRun{detect: -1, kernel: -1, apply: -1, kernelUp: -1}
		if err := benchkit.Sleep(ctx, rand.N(scaleInterval)); err != nil { // a random phase of the probe schedule
			return nil, err
		}
		mark := d.Log.Len()
		t := time.Now()
		if err := changing[1].Close(); err != nil {
			return nil, err
		}
		e, at, err := d.WaitFor(ctx, mark, 20*time.Second, benchkit.Match("backend state changed", "pool", poolName(0), "backend", target, "to", "down"))
		if err == nil {
			r.detect = e.Time.Sub(t)
			var a, k benchkit.Entry
			if a, _, err = d.WaitFor(ctx, at, 20*time.Second, benchkit.Match("ruleset applied")); err == nil {
				r.apply, r.changed = a.Dur("duration"), a.Str("changed")
			}
			if k, _, err = d.WaitFor(ctx, at, 20*time.Second, benchkit.Match("probe to kernel", "pool", poolName(0), "backend", target, "to", "down")); err == nil {
				r.kernel = k.Dur("latency")
			}
		}
		if err != nil {
			if err := missed(err); err != nil {
				return nil, err
			}
		}
		mark = d.Log.Len()
		if changing[1], err = victim.ServeTCP(changingPort); err != nil {
			return nil, err
		}
		_, at, err = d.WaitFor(ctx, mark, 20*time.Second, benchkit.Match("backend state changed", "pool", poolName(0), "backend", target, "to", "up"))
		if err == nil {
			var k benchkit.Entry
			if k, _, err = d.WaitFor(ctx, at, 20*time.Second, benchkit.Match("probe to kernel", "pool", poolName(0), "backend", target, "to", "up")); err == nil {
				r.kernelUp = k.Dur("latency")
			}
		}
		if err != nil {
			if err := missed(err); err != nil {
				return nil, err
			}
		}
		res.runs = append(res.runs, r)
		benchkit.Progress("part 2: kill %d: detect %s, probe->kernel %s (apply %s, changed %s); back up: probe->kernel %s",
			run, ms(r.detect), ms(r.kernel), ms(r.apply), r.changed, ms(r.kernelUp))
	}
	res.spurious, res.maxKernel, res.maxApply = afterStart()

	fmt.Printf("\n## Part 2: %d pools x %d backends, %d tcp probe targets every %v (timeout %v), backends %q\n\n",
		scalePools, len(l.Backends), targets, scaleInterval, scaleTimeout, o.scaleBackend)
	fmt.Println("```")
	fmt.Printf("start -> all %d targets up: %v\n", targets, res.startup.Round(time.Millisecond))
	fmt.Printf("steady state over %v: nftlb cpu user %v + sys %v = %.1f%% of one core; VmRSS %s, VmHWM %s, threads %s; this program (the lab's servers) cpu %v\n",
		res.window.Round(time.Millisecond), res.user, res.sys, benchkit.Pct(res.user+res.sys, res.window), res.rss, res.hwm, res.threads, res.selfCPU)
	for _, sm := range res.samples {
		fmt.Printf("  +%-4v nftlb cpu %5.1f%% (user %v, sys %v)  LB TIME_WAIT %-6s conntrack %-6s  untouched-pool state changes %d  slowest probe->kernel %s, apply %s\n",
			sm.at.Round(time.Second), benchkit.Pct(sm.user+sm.sys, step), sm.user, sm.sys, sm.timeWait, sm.conntrack, sm.changes, orDash(sm.maxKernelSoFar), orDash(sm.slowestApplySoFar))
	}
	for i, r := range res.runs {
		fmt.Printf("kill %d of %s: detect=%s probe->kernel=%s apply=%s changed=%s | back up: probe->kernel=%s\n",
			i+1, target, ms(r.detect), ms(r.kernel), ms(r.apply), r.changed, ms(r.kernelUp))
	}
	fmt.Printf("after start-up: %d state changes of the other %d pools; slowest probe->kernel of any event %s; slowest apply %s\n",
		res.spurious, scalePools-1, ms(res.maxKernel), ms(res.maxApply))
	fmt.Println("```")
	return res, nil
}

// lbTimeWait reads the TIME_WAIT count from `ss -s` in the LB namespace.
func lbTimeWait(ctx context.Context, l *lab.Lab) string {
	out, err := l.LB.Run(ctx, "ss", "-s")
	if err != nil {
		return "?"
	}
	_, after, ok := strings.Cut(out, "timewait ")
	if !ok {
		return "?"
	}
	n, _, _ := strings.Cut(after, ")")
	return strings.TrimSpace(n)
}

func orDash(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	return ms(d)
}
