package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"strings"
	"time"

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
func scaleVIP(i int) netip.Addr {
	base := netip.MustParseAddr("198.18.100.0").As4()
	n := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	n += uint32(i + 1)
	return netip.AddrFrom4([4]byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)})
}

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
	progress("part 2: building the lab for %d pools", scalePools)
	l, err := lab.New(lab.Options{Backends: 3})
	if err != nil {
		return nil, err
	}
	defer func() {
		progress("part 2: tearing down the lab")
		if err := l.Close(); err != nil {
			progress("teardown: %v", err)
		}
	}()
	progress("part 2: lab namespaces %s-*", l.Prefix)
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
	progress("part 2: starting nftlb with %d pools, %d tcp probe targets every %v (backends: %s)", scalePools, targets, scaleInterval, o.scaleBackend)
	t0 := time.Now()
	d, err := startDaemon(ctx, l, o.bin, dir, scaleConfig(l))
	if err != nil {
		return nil, err
	}
	defer d.stop()
	res := &scaleResult{backend: o.scaleBackend}

	// Every target's first result moves it unknown -> up.
	deadline := time.Now().Add(60 * time.Second)
	for {
		up := map[string]bool{}
		for _, e := range d.logs.Since(0) {
			if e.Msg == "backend state changed" && e.str("to") == "up" {
				up[e.str("pool")+"/"+e.str("backend")] = true
			}
		}
		if len(up) >= targets {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("only %d of %d targets up after 60s; end of nftlb's log:\n%s", len(up), targets, tail(d.logs.String(), 20))
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return nil, err
		}
	}
	res.startup = time.Since(t0)
	startMark := d.logs.Len()
	progress("part 2: all %d targets up %v after start", targets, res.startup.Round(time.Millisecond))
	for _, i := range []int{0, 1, scalePools - 1} {
		addr := fmt.Sprintf("%s:%d", scaleVIP(i), scalePort)
		cctx, cancel := context.WithTimeout(ctx, connTO)
		var name string
		if i == 0 || o.scaleBackend == "who" {
			name, _, err = l.Who(cctx, l.Client, addr)
		} else {
			name, _, err = l.WhoHTTP(cctx, l.Client, "http://"+addr+"/")
		}
		cancel()
		if err != nil {
			return nil, fmt.Errorf("connection to pool %s at %s: %w", poolName(i), addr, err)
		}
		progress("part 2: %s (%s) -> %s", poolName(i), addr, name)
	}
	// afterStart summarizes the log since all targets were up.
	afterStart := func() (changes int, maxKernel, maxApply time.Duration) {
		for _, e := range d.logs.Since(startMark) {
			switch {
			case e.Msg == "backend state changed" && e.str("pool") != poolName(0):
				changes++
			case e.Msg == "probe to kernel":
				maxKernel = max(maxKernel, e.dur("latency"))
			case e.Msg == "ruleset applied":
				maxApply = max(maxApply, e.dur("duration"))
			}
		}
		return
	}

	// Steady state: RSS and CPU while probing, with a timeline.
	if err := sleep(ctx, 2*time.Second); err != nil {
		return nil, err
	}
	pid := d.Pid()
	if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) != "nftlb" {
		return nil, fmt.Errorf("pid %d is %q, not nftlb", pid, strings.TrimSpace(string(comm)))
	}
	progress("part 2: measuring nftlb's CPU over %v (pid %d)", o.scaleWindow, pid)
	u0, s0, err := procCPU(pid)
	if err != nil {
		return nil, err
	}
	su0, ss0, _ := procCPU(os.Getpid())
	w0 := time.Now()
	pu, ps := u0, s0
	step := min(2*time.Second, o.scaleWindow)
	for next := w0.Add(step); ; next = next.Add(step) {
		last := !next.Before(w0.Add(o.scaleWindow))
		if last {
			next = w0.Add(o.scaleWindow)
		}
		if err := sleep(ctx, time.Until(next)); err != nil {
			return nil, err
		}
		u, s, err := procCPU(pid)
		if err != nil {
			return nil, fmt.Errorf("nftlb: %w", err)
		}
		sm := sample{at: time.Since(w0), user: u - pu, sys: s - ps, timeWait: lbTimeWait(ctx, l), conntrack: lbConntrack(l)}
		sm.changes, sm.maxKernelSoFar, sm.slowestApplySoFar = afterStart()
		pu, ps = u, s
		res.samples = append(res.samples, sm)
		progress("part 2: +%v nftlb cpu user %v sys %v, TIME_WAIT %s, conntrack %s, state changes of untouched pools %d",
			sm.at.Round(time.Second), sm.user, sm.sys, sm.timeWait, sm.conntrack, sm.changes)
		if last {
			break
		}
	}
	res.window = time.Since(w0)
	res.user, res.sys = pu-u0, ps-s0
	su1, ss1, _ := procCPU(os.Getpid())
	res.selfCPU = su1 + ss1 - su0 - ss0
	res.rss, res.hwm, res.threads = procStatus(pid, "VmRSS"), procStatus(pid, "VmHWM"), procStatus(pid, "Threads")

	// Kill b2's 7443 (a port only pool 0 uses): only pool 0 changes.
	victim := l.Backends[1]
	target := fmt.Sprintf("%s:%d", victim.Addr, changingPort)
	missed := func(err error) error {
		select {
		case <-d.exited:
			return err
		default:
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		progress("part 2: %v", strings.SplitN(err.Error(), "\n", 2)[0])
		return nil
	}
	for run := 1; run <= scaleRepeats; run++ {
		r := scaleRun{detect: -1, kernel: -1, apply: -1, kernelUp: -1}
		if err := sleep(ctx, rand.N(scaleInterval)); err != nil { // a random phase of the probe schedule
			return nil, err
		}
		mark := d.logs.Len()
		t := time.Now()
		if err := changing[1].Close(); err != nil {
			return nil, err
		}
		e, at, err := d.waitFor(ctx, mark, 20*time.Second, match("backend state changed", "pool", poolName(0), "backend", target, "to", "down"))
		if err == nil {
			r.detect = e.Time.Sub(t)
			var a, k logEntry
			if a, _, err = d.waitFor(ctx, at, 20*time.Second, match("ruleset applied")); err == nil {
				r.apply, r.changed = a.dur("duration"), a.str("changed")
			}
			if k, _, err = d.waitFor(ctx, at, 20*time.Second, match("probe to kernel", "pool", poolName(0), "backend", target, "to", "down")); err == nil {
				r.kernel = k.dur("latency")
			}
		}
		if err != nil {
			if err := missed(err); err != nil {
				return nil, err
			}
		}
		mark = d.logs.Len()
		if changing[1], err = victim.ServeTCP(changingPort); err != nil {
			return nil, err
		}
		_, at, err = d.waitFor(ctx, mark, 20*time.Second, match("backend state changed", "pool", poolName(0), "backend", target, "to", "up"))
		if err == nil {
			var k logEntry
			if k, _, err = d.waitFor(ctx, at, 20*time.Second, match("probe to kernel", "pool", poolName(0), "backend", target, "to", "up")); err == nil {
				r.kernelUp = k.dur("latency")
			}
		}
		if err != nil {
			if err := missed(err); err != nil {
				return nil, err
			}
		}
		res.runs = append(res.runs, r)
		progress("part 2: kill %d: detect %s, probe->kernel %s (apply %s, changed %s); back up: probe->kernel %s",
			run, ms(r.detect), ms(r.kernel), ms(r.apply), r.changed, ms(r.kernelUp))
	}
	res.spurious, res.maxKernel, res.maxApply = afterStart()

	fmt.Printf("\n## Part 2: %d pools x %d backends, %d tcp probe targets every %v (timeout %v), backends %q\n\n",
		scalePools, len(l.Backends), targets, scaleInterval, scaleTimeout, o.scaleBackend)
	fmt.Println("```")
	fmt.Printf("start -> all %d targets up: %v\n", targets, res.startup.Round(time.Millisecond))
	fmt.Printf("steady state over %v: nftlb cpu user %v + sys %v = %.1f%% of one core; VmRSS %s, VmHWM %s, threads %s; this program (the lab's servers) cpu %v\n",
		res.window.Round(time.Millisecond), res.user, res.sys, pct(res.user+res.sys, res.window), res.rss, res.hwm, res.threads, res.selfCPU)
	for _, sm := range res.samples {
		fmt.Printf("  +%-4v nftlb cpu %5.1f%% (user %v, sys %v)  LB TIME_WAIT %-6s conntrack %-6s  untouched-pool state changes %d  slowest probe->kernel %s, apply %s\n",
			sm.at.Round(time.Second), pct(sm.user+sm.sys, step), sm.user, sm.sys, sm.timeWait, sm.conntrack, sm.changes, orDash(sm.maxKernelSoFar), orDash(sm.slowestApplySoFar))
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

func pct(part, whole time.Duration) float64 {
	if whole <= 0 {
		return 0
	}
	return 100 * float64(part) / float64(whole)
}

// lbConntrack reads the LB namespace's conntrack entry count.
func lbConntrack(l *lab.Lab) string {
	var n string
	err := l.LB.Do(func() error {
		b, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count")
		n = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		return "?"
	}
	return n
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
