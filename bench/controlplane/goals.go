package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/nftables"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

const (
	goalPools      = 10000
	goalCold       = time.Second
	goalChange     = 5 * time.Millisecond
	goalRSSKB      = 50 * 1024
	goalCPUPercent = 5.0
)

func verdict(ok bool) string {
	if ok {
		return "**met**"
	}
	return "**missed**"
}

// printGoals prints the goals table; it reports whether any goal was missed.
func printGoals(o options, cold []coldResult, change []changeResult, probe *probeResult) bool {
	fmt.Printf("\n### Goals\n\n| goal | measured | |\n|---|---|---|\n")
	missed := false
	any := false
	row := func(goal, measured string, ok bool) {
		any = true
		missed = missed || !ok
		fmt.Printf("| %s | %s | %s |\n", goal, measured, verdict(ok))
	}
	for _, r := range cold {
		if r.n != goalPools {
			continue
		}
		var tot, nw, ba []time.Duration
		for i, b := range r.bin {
			tot, nw = append(tot, b.total), append(nw, r.nft[i].wall)
			ba = append(ba, r.inproc[i].build+r.inproc[i].apply)
		}
		t, n := benchkit.Median(tot), benchkit.Median(nw)
		row("cold apply of 10,000 pools × 3 backends under 1 s (`nftlb run`, exec → `ruleset applied`)",
			fmt.Sprintf("%s (median of %d); in-process desired state + Build + Apply alone: %s", ms(t), len(tot), ms(benchkit.Median(ba))), t < goalCold)
		row("… and below `nft -f` of the same ruleset", fmt.Sprintf("nftlb %s vs nft -f %s (%.2f×)", ms(t), ms(n), float64(t)/float64(n)), t < n)
	}
	for _, r := range change {
		if r.n != goalPools {
			continue
		}
		for _, c := range []struct {
			name string
			ds   []time.Duration
		}{{"backend down (health)", r.down}, {"backend up (health)", r.up}, {"backend swapped (config)", r.swap}} {
			p99 := benchkit.Quantile(c.ds, .99)
			row(fmt.Sprintf("one backend change under 5 ms at 10,000 pools: %s, p99", c.name),
				fmt.Sprintf("median %s, p99 %s", ms(benchkit.Median(c.ds)), ms(p99)), p99 < goalChange)
		}
	}
	if probe != nil {
		// Two rows: the window has no scrape, the end comes right after
		// two full /metrics scrapes, which a Prometheus-watched daemon
		// does every 15-30 s.
		row(fmt.Sprintf("daemon under 50 MiB RSS while probing %d backends every second, between scrapes", probe.targets),
			fmt.Sprintf("VmRSS max sampled over the window %s (peak since exec, start-up or inside a scrape: VmHWM %s)", mib(probe.maxRSS), mib(probe.hwm)), probe.maxRSS < goalRSSKB)
		row(fmt.Sprintf("… and right after /metrics scrapes of %d pools", probe.pools),
			fmt.Sprintf("VmRSS %s", mib(probe.rss)), probe.rss < goalRSSKB)
		c := benchkit.Pct(probe.user+probe.sys, probe.window)
		row(fmt.Sprintf("daemon under 5%% of one core while probing %d backends every second", probe.targets),
			fmt.Sprintf("%.1f %% (user %.1f %%, sys %.1f %%)", c, benchkit.Pct(probe.user, probe.window), benchkit.Pct(probe.sys, probe.window)), c < goalCPUPercent)
		fmt.Printf("\nTIME_WAIT in the LB namespace while probing: at most %d sockets (%s backends; probes close with SO_LINGER 0).\n", probe.maxTimeWait, o.backend)
	}
	if !any {
		fmt.Printf("| (the goals concern 10,000 pools and the probing daemon; none of them was measured) | | |\n")
	}
	return missed
}

// runProfiles CPU-profiles the in-process paths at the largest pool count
// measured: the config load, the cold Build + Apply, and one backend's
// change, and prints `go tool pprof -top` of each.
func runProfiles(ctx context.Context, o options, dir string, cold []coldResult, change []changeResult) error {
	n := goalPools
	if len(cold) > 0 {
		n = cold[len(cold)-1].n
	}
	keep, err := os.MkdirTemp("", "nftlb-controlplane-profiles-")
	if err != nil {
		return err
	}
	fmt.Printf("\n### CPU profiles (runtime/pprof in this process; files in %s)\n\n", keep)
	fmt.Printf("The in-process paths at %d pools. In a Go CPU profile, time inside system calls (the kernel's work on our netlink messages) is charged to the syscall functions (`syscall.Syscall6`, `internal/runtime/syscall.Syscall6`); everything else is ours.\n", n)

	cfgPath, err := writeConfig(dir, n, noneHealth, "profile")
	if err != nil {
		return err
	}
	const reps = 2
	profile := func(slug string, allocs bool, name string, f func() error) error {
		path := filepath.Join(keep, slug+".cpu.pprof")
		out, err := os.Create(path)
		if err != nil {
			return err
		}
		defer out.Close()
		runtime.GC()
		base := filepath.Join(keep, slug+".allocs-before.pprof")
		if err := writeAllocs(base); err != nil {
			return err
		}
		u0, s0 := benchkit.Rusage()
		t := time.Now()
		if err := pprof.StartCPUProfile(out); err != nil {
			return err
		}
		ferr := f()
		pprof.StopCPUProfile()
		wall := time.Since(t)
		u1, s1 := benchkit.Rusage()
		if ferr != nil {
			return ferr
		}
		allocsPath := filepath.Join(keep, slug+".allocs.pprof")
		if err := writeAllocs(allocsPath); err != nil {
			return err
		}
		fmt.Printf("\n#### %s\n\nwall %v, this process's CPU user %v + sys %v. CPU (`go tool pprof -top`):\n\n```\n%s```\n",
			name, wall.Round(time.Millisecond), (u1 - u0).Round(time.Millisecond), (s1 - s0).Round(time.Millisecond), pprofTop(ctx, path))
		if allocs {
			fmt.Printf("\nAllocations (`-sample_index=alloc_space`, sampled):\n\n```\n%s```\n", pprofTop(ctx, allocsPath, "-sample_index=alloc_space", "-base", base, "-nodecount=12"))
		}
		return nil
	}
	benchkit.Progress("profile: config load of %d pools x%d", n, reps)
	err = profile("load", true, fmt.Sprintf("config load of %d pools (vip.Load), %d times", n, reps), func() error {
		for range reps {
			if _, err := vip.Load(cfgPath); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	cfg, err := vip.Load(cfgPath)
	if err != nil {
		return err
	}
	benchkit.Progress("profile: cold Build + Apply of %d pools x%d", n, reps)
	var nss []*scratch
	defer func() {
		for _, s := range nss {
			s.del()
		}
	}()
	for range reps + 1 {
		s, err := newScratch()
		if err != nil {
			return err
		}
		nss = append(nss, s)
	}
	coldApply := func(nss []*scratch) func() error {
		return func() error {
			for _, s := range nss {
				a := ruleset.NewApplier(nftables.WithNetNSFd(int(s.fd)))
				_, err := a.Apply(desired(cfg, nil, nil))
				_ = a.Close()
				if err != nil {
					return err
				}
			}
			return nil
		}
	}
	err = profile("cold", true, fmt.Sprintf("cold apply of %d pools (desired state, Build, Apply into an empty namespace), %d times", n, reps), coldApply(nss[:reps]))
	if err != nil {
		return err
	}
	if err := perfSelf(ctx, keep, "cold", fmt.Sprintf("cold apply of %d pools, once", n), coldApply(nss[reps:reps+1])); err != nil {
		return err
	}
	if len(change) == 0 {
		return nil
	}
	cn := change[len(change)-1].n
	benchkit.Progress("profile: %d backend down/up changes at %d pools", o.changes, cn)
	ccfg := configOf(cn)
	s, err := newScratch()
	if err != nil {
		return err
	}
	nss = append(nss, s)
	a := ruleset.NewApplier(nftables.WithNetNSFd(int(s.fd)))
	defer a.Close()
	full := desired(ccfg, nil, nil)
	if _, err := a.Apply(full); err != nil {
		return err
	}
	downs := make([]*ruleset.Table, o.changes)
	for i := range downs {
		p := &ccfg.Pools[changeTarget(i, cn)]
		downs[i] = desired(ccfg, map[string]bool{p.ID(p.Backends[0]): true}, full)
	}
	changes := func() error {
		for _, d := range downs {
			if _, err := a.Apply(d); err != nil {
				return err
			}
			if _, err := a.Apply(full); err != nil {
				return err
			}
		}
		return nil
	}
	if err := profile("change", false, fmt.Sprintf("%d backend down + up changes at %d pools (Apply only)", o.changes, cn), changes); err != nil {
		return err
	}
	if err := perfSelf(ctx, keep, "change", fmt.Sprintf("%d backend down + up changes at %d pools (Apply only)", o.changes, cn), changes); err != nil {
		return err
	}
	spec := ruleset.FromConfig(ccfg, func(*vip.Pool, vip.Backend) bool { return true })
	b4 := netip.MustParseAddrPort(fmt.Sprintf("198.18.1.14:%d", backendPort))
	spec.Accounted = append(spec.Accounted, ruleset.Endpoint{Addr: b4, Protocol: vip.TCP})
	base := ruleset.Build(spec)
	if _, err := a.Apply(base); err != nil {
		return err
	}
	swaps := make([]*ruleset.Table, o.changes)
	for i := range swaps {
		k := changeTarget(i, cn)
		s := spec
		s.Pools = slices.Clone(spec.Pools)
		s.Pools[k].Backends = slices.Clone(s.Pools[k].Backends)
		s.Pools[k].Backends[0] = vip.Backend{Addr: b4, Weight: 1}
		swaps[i] = ruleset.Build(s)
	}
	err = perfSelf(ctx, keep, "swap", fmt.Sprintf("%d backend swaps + swaps back at %d pools (map only; Apply only)", o.changes, cn), func() error {
		for _, sw := range swaps {
			if _, err := a.Apply(sw); err != nil {
				return err
			}
			if _, err := a.Apply(base); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return profile("desired", true, fmt.Sprintf("the daemon's desired state + Build of %d pools, %d times (before every change's Apply)", cn, o.changes), func() error {
		for i := range o.changes {
			p := &ccfg.Pools[changeTarget(i, cn)]
			_ = desired(ccfg, map[string]bool{p.ID(p.Backends[0]): true}, full)
		}
		return nil
	})
}

// perfSelf runs f while `perf record` samples this process (every thread,
// user and kernel), and prints the top symbols: where the kernel's share
// of the time goes, which a Go CPU profile cannot show (a signal-based
// profiler gets one sample per long system call).
func perfSelf(ctx context.Context, dir, slug, name string, f func() error) error {
	perf, err := exec.LookPath("perf")
	if err != nil {
		fmt.Printf("\n(perf not installed: no kernel profile of %s)\n", name)
		return f()
	}
	data := filepath.Join(dir, slug+".perf.data")
	cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	rec := exec.CommandContext(cctx, perf, "record", "-q", "-F", "999", "-p", strconv.Itoa(os.Getpid()), "-o", data)
	if err := rec.Start(); err != nil {
		return err
	}
	recDone := make(chan error, 1)
	go func() { recDone <- rec.Wait() }()
	stopRec := func() {
		_ = rec.Process.Signal(syscall.SIGINT)
		select {
		case <-recDone:
		case <-time.After(30 * time.Second):
			_ = rec.Process.Kill()
			<-recDone
		}
	}
	time.Sleep(500 * time.Millisecond) // let perf attach to every thread
	u0, s0 := benchkit.Rusage()
	t := time.Now()
	ferr := f()
	wall := time.Since(t)
	u1, s1 := benchkit.Rusage()
	stopRec()
	if ferr != nil {
		return ferr
	}
	out, err := exec.CommandContext(cctx, perf, "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,sym", "--percent-limit", "1").Output()
	if err != nil {
		fmt.Printf("\nperf report: %v\n", err)
		return nil
	}
	var lines []string
	for line := range strings.Lines(string(out)) {
		if strings.HasPrefix(line, "#") || strings.TrimSpace(line) == "" {
			continue
		}
		lines = append(lines, line)
		if len(lines) == 20 {
			break
		}
	}
	fmt.Printf("\n#### %s: perf (kernel and user)\n\nwall %v, CPU user %v + sys %v; `perf record -F 999 -p PID`, `perf report --no-children --sort dso,sym` (entries ≥ 1 %%; includes perf's start-up wait of 0.5 s):\n\n```\n%s```\n",
		name, wall.Round(time.Millisecond), (u1 - u0).Round(time.Millisecond), (s1 - s0).Round(time.Millisecond), strings.Join(lines, ""))
	return nil
}

func writeAllocs(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return pprof.Lookup("allocs").WriteTo(f, 0)
}

func pprofTop(ctx context.Context, path string, args ...string) string {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	args = append(append([]string{"tool", "pprof", "-top", "-nodecount=22"}, args...), path)
	out, err := exec.CommandContext(cctx, goBin, args...).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("go tool pprof -top %s: %v\n%s", path, err, out)
	}
	// Drop pprof's header lines up to "Showing nodes ..." but keep the totals.
	var keep []string
	for line := range strings.Lines(string(out)) {
		if strings.HasPrefix(line, "File:") || strings.HasPrefix(line, "Build ID:") || strings.HasPrefix(line, "Time:") || strings.HasPrefix(line, "Duration:") {
			continue
		}
		keep = append(keep, line)
	}
	return strings.Join(slices.Clip(keep), "")
}
