package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/nftables"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/health"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

const noneHealth = "  type: none\n"

// binRun: `nftlb run` from cold, in a fresh namespace.
type binRun struct {
	total     time.Duration // our clock before exec -> time= of `ruleset applied`
	toStart   time.Duration // ... -> time= of `starting` (exec, Go runtime, before the config is read)
	apply     time.Duration // the line's `duration` (the Applier's Apply)
	hwm, rss  int64         // kB, read when the line arrived
	user, sys time.Duration // utime, stime at that moment
}

// nftRun: `nft -f` of the rendered ruleset, in a fresh namespace.
type nftRun struct {
	wall      time.Duration // our clock around `ip netns exec NS /usr/bin/time -v nft -f F`
	maxRSS    int64         // kB
	user, sys time.Duration
}

// ipRun: the daemon's cold path, step by step, in this process.
type ipRun struct {
	load, health, build, apply time.Duration
	applyUser, applySys        time.Duration // rusage of this process around Apply
	stacks                     uint64        // goroutine stacks in use while the probe loops run
	alloc                      uint64        // bytes allocated by FromConfig+Build+Apply (TotalAlloc delta)
	mallocs                    uint64
	live                       uint64 // heap retained after Apply and a GC, over the heap before
}

type coldResult struct {
	n           int
	cfgBytes    int
	nftBytes    int
	rssSource   string // how nft's peak RSS was measured
	bin         []binRun
	nft         []nftRun
	inproc      []ipRun
	execBase    []time.Duration // `ip netns exec NS nftlb version`
	execTrueRSS int64
}

func runCold(ctx context.Context, o options, dir string) ([]coldResult, error) {
	fmt.Printf("## 1. Cold apply\n\nEach run in a fresh, empty network namespace (lo up): `nftlb run` (health `type: none`, JSON log) from exec to its `ruleset applied` line; `nft -f` of `nftlb render` output; and the daemon's steps in this process. Raw runs:\n\n```\n")
	defer fmt.Println("```")
	timeBin, _ := exec.LookPath("/usr/bin/time")
	var out []coldResult
	for _, n := range o.pools {
		cfgPath, err := writeConfig(dir, n, noneHealth, "cold")
		if err != nil {
			return nil, err
		}
		st, _ := os.Stat(cfgPath)
		nftPath := filepath.Join(dir, fmt.Sprintf("cold-%d.nft", n))
		rendered, err := exec.CommandContext(ctx, o.bin, "render", "-config", cfgPath).Output()
		if err != nil {
			return nil, fmt.Errorf("nftlb render -config %s: %w", cfgPath, err)
		}
		if err := os.WriteFile(nftPath, rendered, 0o644); err != nil {
			return nil, err
		}
		r := coldResult{n: n, cfgBytes: int(st.Size()), nftBytes: len(rendered), rssSource: "wait4 rusage (ip exec's nft)"}
		if timeBin != "" {
			r.rssSource = "/usr/bin/time -v"
		}
		runs := o.runs
		if n >= 5000 {
			runs = o.runsLarge
		}
		benchkit.Progress("cold: %d pools (config %d bytes, rendered ruleset %d bytes), %d runs", n, r.cfgBytes, r.nftBytes, runs)
		for run := 1; run <= runs; run++ {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			b, err := coldBinary(ctx, o.bin, cfgPath)
			if err != nil {
				return nil, fmt.Errorf("%d pools, nftlb run %d: %w", n, run, err)
			}
			f, err := coldNft(ctx, timeBin, nftPath)
			if err != nil {
				return nil, fmt.Errorf("%d pools, nft -f run %d: %w", n, run, err)
			}
			p, err := coldInProcess(ctx, cfgPath)
			if err != nil {
				return nil, fmt.Errorf("%d pools, in-process run %d: %w", n, run, err)
			}
			base, err := execBaseline(ctx, o.bin)
			if err != nil {
				return nil, err
			}
			r.bin, r.nft, r.inproc, r.execBase = append(r.bin, b), append(r.nft, f), append(r.inproc, p), append(r.execBase, base)
			line := fmt.Sprintf("pools=%-5d run=%d  nftlb: exec->starting %-8s exec->applied %-8s apply %-8s VmHWM %-9s cpu user %v sys %v | nft -f: %-8s maxrss %-9s cpu user %v sys %v | in-process: load %-8s health %-8s (stacks %s) build %-8s apply %-8s (user %v sys %v) alloc %s live %s | exec baseline %s",
				n, run, ms(b.toStart), ms(b.total), ms(b.apply), mib(b.hwm), b.user, b.sys,
				ms(f.wall), mib(f.maxRSS), f.user, f.sys,
				ms(p.load), ms(p.health), bytesMiB(p.stacks), ms(p.build), ms(p.apply), p.applyUser.Round(time.Millisecond), p.applySys.Round(time.Millisecond), bytesMiB(p.alloc), bytesMiB(p.live), ms(base))
			fmt.Println(line)
			benchkit.Progress("%s", line)
		}
		out = append(out, r)
	}
	return out, nil
}

func coldBinary(ctx context.Context, bin, cfgPath string) (binRun, error) {
	ns, err := newScratch()
	if err != nil {
		return binRun{}, err
	}
	defer ns.del()
	var pid atomic.Int64
	type snap struct {
		hwm, rss  int64
		user, sys time.Duration
	}
	snaps := make(chan snap, 1)
	onLine := func(e benchkit.Entry) {
		if e.Msg != "ruleset applied" {
			return
		}
		if p := int(pid.Load()); p > 0 {
			u, s, _ := benchkit.ProcCPU(p)
			select {
			case snaps <- snap{benchkit.ProcKB(p, "VmHWM"), benchkit.ProcKB(p, "VmRSS"), u, s}:
			default:
			}
		}
	}
	t0 := time.Now()
	d, err := benchkit.StartNftlb(ns.NS, bin, cfgPath, onLine)
	if err != nil {
		return binRun{}, err
	}
	pid.Store(int64(d.Pid()))
	defer d.Stop()
	applied, _, err := d.WaitFor(ctx, 0, 2*time.Minute, benchkit.Match("ruleset applied"))
	if err != nil {
		return binRun{}, err
	}
	var r binRun
	select {
	case s := <-snaps:
		r.hwm, r.rss, r.user, r.sys = s.hwm, s.rss, s.user, s.sys
	default:
		r.hwm, r.rss = -1, -1
	}
	r.total = applied.Time.Sub(t0)
	r.apply = applied.Dur("duration")
	if st, _, err := d.WaitFor(ctx, 0, time.Second, benchkit.Match("starting")); err == nil {
		r.toStart = st.Time.Sub(t0)
	}
	if applied.Str("full") != "true" {
		return r, fmt.Errorf("first apply was not a full one: %s", applied.Raw)
	}
	d.Stop()
	return r, nil
}

func coldNft(ctx context.Context, timeBin, nftPath string) (nftRun, error) {
	ns, err := newScratch()
	if err != nil {
		return nftRun{}, err
	}
	defer ns.del()
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var cmd *exec.Cmd
	if timeBin != "" {
		cmd = ns.Command(cctx, timeBin, "-v", "nft", "-f", nftPath)
	} else {
		cmd = ns.Command(cctx, "nft", "-f", nftPath)
	}
	var outb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &outb, &outb
	t0 := time.Now()
	err = cmd.Run()
	r := nftRun{wall: time.Since(t0)}
	if err != nil {
		return r, fmt.Errorf("nft -f %s: %w: %s", nftPath, err, benchkit.Tail(outb.String(), 10))
	}
	if timeBin != "" {
		out := outb.String()
		r.maxRSS = timeField(out, "Maximum resident set size (kbytes)")
		r.user = time.Duration(timeField(out, "User time (seconds)")) * time.Millisecond
		r.sys = time.Duration(timeField(out, "System time (seconds)")) * time.Millisecond
	} else if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		r.maxRSS = ru.Maxrss
		r.user, r.sys = time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())
	}
	list, err := ns.Run(ctx, "nft", "list", "tables")
	if err != nil {
		return r, err
	}
	if !strings.Contains(list, "table ip nftlb") {
		return r, fmt.Errorf("no table ip nftlb after nft -f: %q", list)
	}
	return r, nil
}

// timeField reads a GNU time -v field: kbytes as is, seconds as ms.
func timeField(out, key string) int64 {
	for line := range strings.Lines(out) {
		v, ok := strings.CutPrefix(strings.TrimSpace(line), key+":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		if strings.Contains(key, "seconds") {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return -1
			}
			return int64(f * 1000)
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return -1
		}
		return n
	}
	return -1
}

// coldInProcess runs the daemon's cold path step by step: load the config,
// start the probe loops and wait for their first round (type none), then
// desired state -> Build -> Apply into an empty namespace.
func coldInProcess(ctx context.Context, cfgPath string) (ipRun, error) {
	var r ipRun
	runtime.GC()
	t := time.Now()
	cfg, err := vip.Load(cfgPath)
	if err != nil {
		return r, err
	}
	r.load = time.Since(t)

	m := health.NewManager()
	stopDrain := make(chan struct{})
	go func() { // the daemon's loop reads events; so do we
		for {
			select {
			case <-m.Events():
			case <-stopDrain:
				return
			}
		}
	}()
	t = time.Now()
	if err := m.Update(health.TargetsOf(cfg)); err != nil {
		return r, err
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	m.WaitFirst(wctx)
	cancel()
	r.health = time.Since(t)
	var mst runtime.MemStats
	runtime.ReadMemStats(&mst)
	r.stacks = mst.StackInuse
	m.Stop()
	close(stopDrain)

	ns, err := newScratch()
	if err != nil {
		return r, err
	}
	defer ns.del()
	runtime.GC()
	var m0, m1, m2 runtime.MemStats
	runtime.ReadMemStats(&m0)
	t = time.Now()
	tbl := ruleset.Build(ruleset.FromConfig(cfg, func(*vip.Pool, vip.Backend) bool { return true }))
	r.build = time.Since(t)
	a := ruleset.NewApplier(nftables.WithNetNSFd(int(ns.fd)))
	defer a.Close()
	u0, s0 := benchkit.Rusage()
	t = time.Now()
	res, err := a.Apply(tbl)
	r.apply = time.Since(t)
	u1, s1 := benchkit.Rusage()
	if err != nil {
		return r, err
	}
	if !res.Plan.Full {
		return r, fmt.Errorf("cold Apply was not a full replace: %+v", res.Plan)
	}
	runtime.ReadMemStats(&m1)
	r.applyUser, r.applySys = u1-u0, s1-s0
	r.alloc, r.mallocs = m1.TotalAlloc-m0.TotalAlloc, m1.Mallocs-m0.Mallocs
	runtime.GC()
	runtime.ReadMemStats(&m2)
	if m2.HeapAlloc > m0.HeapAlloc {
		r.live = m2.HeapAlloc - m0.HeapAlloc
	}
	runtime.KeepAlive(tbl)
	runtime.KeepAlive(cfg)
	_ = a.Close()
	return r, nil
}

// execBaseline is the cost of starting a Go binary through `ip netns exec`
// and having it exit: `nftlb version`, in a fresh namespace.
func execBaseline(ctx context.Context, bin string) (time.Duration, error) {
	ns, err := newScratch()
	if err != nil {
		return 0, err
	}
	defer ns.del()
	t := time.Now()
	if _, err := ns.Run(ctx, bin, "version"); err != nil {
		return 0, err
	}
	return time.Since(t), nil
}

func printCold(rs []coldResult) {
	fmt.Printf("\n### Cold apply: the binary vs `nft -f` (median of the runs above, each into a fresh empty namespace)\n\n")
	fmt.Printf("| pools × 3 backends | runs | config / rendered ruleset | `nftlb run`: exec → `ruleset applied` | of which before `starting` (exec, runtime init) | of which the Apply (`duration`) | nftlb peak RSS (VmHWM at that line) | nftlb CPU user + sys by then | `nft -f` (wall) | nft peak RSS | nft CPU user + sys | nftlb ÷ nft |\n")
	fmt.Printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rs {
		var tot, st, ap, nw, bu, bs, nu, nsy []time.Duration
		var hwm, nrss []int64
		for _, b := range r.bin {
			tot, st, ap, hwm, bu, bs = append(tot, b.total), append(st, b.toStart), append(ap, b.apply), append(hwm, b.hwm), append(bu, b.user), append(bs, b.sys)
		}
		for _, f := range r.nft {
			nw, nrss, nu, nsy = append(nw, f.wall), append(nrss, f.maxRSS), append(nu, f.user), append(nsy, f.sys)
		}
		fmt.Printf("| %d | %d | %s / %s | %s | %s | %s | %s | %v + %v | %s | %s | %v + %v | %.2f |\n",
			r.n, len(r.bin), kb(r.cfgBytes), kb(r.nftBytes), ms(benchkit.Median(tot)), ms(benchkit.Median(st)), ms(benchkit.Median(ap)), mib(medianInt(hwm)),
			benchkit.Median(bu), benchkit.Median(bs), ms(benchkit.Median(nw)), mib(medianInt(nrss)), benchkit.Median(nu), benchkit.Median(nsy),
			float64(benchkit.Median(tot))/float64(benchkit.Median(nw)))
	}
	var base []time.Duration
	for _, r := range rs {
		base = append(base, r.execBase...)
	}
	fmt.Printf("\nBoth columns include `ip netns exec` (setns, remount of /sys, exec); `ip netns exec NS nftlb version` (start a Go binary, print, exit) takes %s (median of %d). nft's RSS and CPU are from %s; nftlb's CPU from /proc/PID/stat (10 ms ticks).\n",
		ms(benchkit.Median(base)), len(base), rs[0].rssSource)

	fmt.Printf("\n### Cold apply: the daemon's steps in-process (median of the runs above)\n\n")
	fmt.Printf("| pools × 3 backends | config load (`vip.Load`: YAML, validation) | health start (`Update` + first round, 3N loops, type none) | goroutine stacks while they run | desired state + `Build` | `Apply` (cold: one full transaction) | Apply CPU user + sys | Go heap allocated by Build + Apply | heap retained after (table, applier) |\n")
	fmt.Printf("|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rs {
		var l, h, b, a, au, as []time.Duration
		var al, lv, st []int64
		for _, p := range r.inproc {
			l, h, b, a, au, as = append(l, p.load), append(h, p.health), append(b, p.build), append(a, p.apply), append(au, p.applyUser), append(as, p.applySys)
			al, lv, st = append(al, int64(p.alloc)), append(lv, int64(p.live)), append(st, int64(p.stacks))
		}
		fmt.Printf("| %d | %s | %s | %s | %s | %s | %v + %v | %s | %s |\n", r.n, ms(benchkit.Median(l)), ms(benchkit.Median(h)), bytesMiB(uint64(medianInt(st))), ms(benchkit.Median(b)), ms(benchkit.Median(a)),
			benchkit.Median(au).Round(time.Millisecond), benchkit.Median(as).Round(time.Millisecond), bytesMiB(uint64(medianInt(al))), bytesMiB(uint64(medianInt(lv))))
	}
}

func kb(n int) string {
	if n >= 1_000_000 {
		return fmt.Sprintf("%.1f MB", float64(n)/1e6)
	}
	return fmt.Sprintf("%.0f kB", float64(n)/1e3)
}
