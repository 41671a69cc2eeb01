package main

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

// changeResult: Apply of one pool's change while n pools exist.
type changeResult struct {
	n                        int
	down, up, swap, swapBack []time.Duration // Apply, one sample per change
	downCPU, upCPU, swapCPU  [2]time.Duration
	desired                  []time.Duration // the daemon's desired state + Build of the whole table, per change
	diff                     []time.Duration // ruleset.Diff alone (pure)
	downPlan, swapPlan       string
	cold                     time.Duration
}

// configOf is the same N-pool config the YAML describes, built in code.
func configOf(n int) *vip.Config {
	h := vip.Health{Type: vip.CheckNone, Interval: 2 * time.Second, Timeout: time.Second, Rise: 2, Fall: 3, ResetClients: true, OnAllDown: vip.AllDownReject}
	cfg := &vip.Config{Table: "nftlb", Masquerade: true, Health: h}
	for i := range n {
		p := vip.Pool{Name: poolName(i), VIP: poolVIP(i), Port: vipPort, Protocol: vip.TCP, Scheduler: vip.RoundRobin, Health: h}
		for _, a := range backendAddrs {
			p.Backends = append(p.Backends, vip.Backend{Addr: netip.AddrPortFrom(netip.MustParseAddr(a), backendPort), Weight: 1})
		}
		cfg.Pools = append(cfg.Pools, p)
	}
	return cfg
}

// desired mirrors the daemon's desiredTable for backends that are up or
// down (the ones in down): a per-backend state lookup by ID, then
// FromConfig and BuildOn (over what the kernel has) of the whole table.
// The daemon does this on every change.
func desired(cfg *vip.Config, down map[string]bool, kernel *ruleset.Table) *ruleset.Table {
	usable := map[string]bool{}
	for i := range cfg.Pools {
		p := &cfg.Pools[i]
		for _, b := range p.Backends {
			if id := p.ID(b); !down[id] {
				usable[id] = true
			}
		}
	}
	return ruleset.BuildOn(ruleset.FromConfig(cfg, func(p *vip.Pool, b vip.Backend) bool { return usable[p.ID(b)] }), kernel)
}

func runChange(ctx context.Context, o options, _ string) ([]changeResult, error) {
	fmt.Printf("\n## 2. One backend's change\n\nA fresh namespace with N pools × 3 backends applied; then, %d times each, for pool k (spread over the table): `down` = k's first backend goes down (health: its slots go to the other two, map elements only), `up` = back (map elements); `swap` = k's first backend replaced in the config by 198.18.1.14 (accounted from the start; same slot count, so map elements only), `swap back`. Times are the Applier's `Apply` (diff, encoding, netlink round trip); the table is built before the clock starts.\n\n```\n", o.changes)
	defer fmt.Println("```")
	var out []changeResult
	for _, n := range o.changePools {
		r, err := oneChangeSeries(ctx, n, o.changes)
		if err != nil {
			return nil, fmt.Errorf("%d pools: %w", n, err)
		}
		out = append(out, r)
		line := fmt.Sprintf("pools=%-5d cold=%s  down: median %s p99 %s max %s (cpu user %v sys %v) | up: median %s p99 %s | swap: median %s p99 %s max %s (cpu user %v sys %v) | swap back: median %s p99 %s | desired+Build %s, Diff %s | plans: down %s; swap %s",
			n, ms(r.cold), ms(benchkit.Median(r.down)), ms(benchkit.Quantile(r.down, .99)), ms(slices.Max(r.down)), r.downCPU[0].Round(time.Millisecond), r.downCPU[1].Round(time.Millisecond),
			ms(benchkit.Median(r.up)), ms(benchkit.Quantile(r.up, .99)),
			ms(benchkit.Median(r.swap)), ms(benchkit.Quantile(r.swap, .99)), ms(slices.Max(r.swap)), r.swapCPU[0].Round(time.Millisecond), r.swapCPU[1].Round(time.Millisecond),
			ms(benchkit.Median(r.swapBack)), ms(benchkit.Quantile(r.swapBack, .99)), ms(benchkit.Median(r.desired)), ms(benchkit.Median(r.diff)), r.downPlan, r.swapPlan)
		fmt.Println(line)
		benchkit.Progress("%s", line)
	}
	return out, nil
}

// changeTarget spreads the changed pools over the table.
func changeTarget(i, n int) int { return (i*7919 + n/2) % n }

func oneChangeSeries(ctx context.Context, n, changes int) (changeResult, error) {
	r := changeResult{n: n}
	benchkit.Progress("change: %d pools, %d changes of each kind", n, changes)
	cfg := configOf(n)
	ns, err := newScratch()
	if err != nil {
		return r, err
	}
	defer ns.del()
	a := ruleset.NewApplier(nftables.WithNetNSFd(int(ns.fd)))
	defer a.Close()
	full := desired(cfg, nil, nil)
	res, err := a.Apply(full)
	if err != nil {
		return r, err
	}
	r.cold = res.Duration

	apply := func(t *ruleset.Table, wantRule bool, into *[]time.Duration, cpu *[2]time.Duration) error {
		u0, s0 := benchkit.Rusage()
		st := time.Now()
		res, err := a.Apply(t)
		d := time.Since(st)
		u1, s1 := benchkit.Rusage()
		if err != nil {
			return err
		}
		if len(res.Plan.Pools) != 1 || res.Plan.Full || !res.Plan.Pools[0].Slots || res.Plan.Pools[0].Rule != wantRule ||
			len(res.Plan.AccountAdd)+len(res.Plan.AccountDel) != 0 {
			return fmt.Errorf("unexpected plan: full=%v pools=%d account=%d/%d", res.Plan.Full, len(res.Plan.Pools), len(res.Plan.AccountAdd), len(res.Plan.AccountDel))
		}
		*into = append(*into, d)
		cpu[0] += u1 - u0
		cpu[1] += s1 - s0
		return nil
	}

	for i := range changes {
		if err := ctx.Err(); err != nil {
			return r, err
		}
		k := changeTarget(i, n)
		p := &cfg.Pools[k]
		st := time.Now()
		down := desired(cfg, map[string]bool{p.ID(p.Backends[0]): true}, full)
		r.desired = append(r.desired, time.Since(st))
		st = time.Now()
		plan := ruleset.Diff(full, down)
		r.diff = append(r.diff, time.Since(st))
		if i == 0 {
			r.downPlan = planString(plan)
		}
		if err := apply(down, false, &r.down, &r.downCPU); err != nil {
			return r, fmt.Errorf("down %d: %w", i, err)
		}
		if err := apply(full, false, &r.up, &r.upCPU); err != nil {
			return r, fmt.Errorf("up %d: %w", i, err)
		}
	}

	// Swap: b4 is accounted from the start, so a swap changes map elements only.
	spec := ruleset.FromConfig(cfg, func(*vip.Pool, vip.Backend) bool { return true })
	b4 := netip.MustParseAddrPort(fmt.Sprintf("198.18.1.14:%d", backendPort))
	spec.Accounted = append(spec.Accounted, ruleset.Endpoint{Addr: b4, Protocol: vip.TCP})
	base := ruleset.Build(spec)
	if _, err := a.Apply(base); err != nil {
		return r, err
	}
	var ignore [2]time.Duration
	for i := range changes {
		if err := ctx.Err(); err != nil {
			return r, err
		}
		k := changeTarget(i, n)
		s := spec
		s.Pools = slices.Clone(spec.Pools)
		s.Pools[k].Backends = slices.Clone(s.Pools[k].Backends)
		s.Pools[k].Backends[0] = vip.Backend{Addr: b4, Weight: 1}
		s.Pools[k].Configured = s.Pools[k].Backends // a config change: b4 replaces b1
		swapped := ruleset.BuildOn(s, base)
		if i == 0 {
			r.swapPlan = planString(ruleset.Diff(base, swapped))
		}
		if err := apply(swapped, false, &r.swap, &r.swapCPU); err != nil {
			return r, fmt.Errorf("swap %d: %w", i, err)
		}
		if err := apply(base, false, &r.swapBack, &ignore); err != nil {
			return r, fmt.Errorf("swap back %d: %w", i, err)
		}
	}
	return r, nil
}

func planString(p ruleset.Plan) string {
	if p.Full {
		return "full"
	}
	s := ""
	for _, c := range p.Pools {
		s += fmt.Sprintf("[%s slots=%v rule=%v dispatch=%v]", c.Name, c.Slots, c.Rule, c.Dispatch)
	}
	return s
}

func printChange(o options, rs []changeResult) {
	fmt.Printf("\n### One backend's change (%d changes of each kind; Apply of a table differing in one pool)\n\n", o.changes)
	fmt.Printf("| pools × 3 backends | change | median | p99 | max | CPU user + sys, all %d changes |\n|---|---|---|---|---|---|\n", o.changes)
	for _, r := range rs {
		rows := []struct {
			name string
			ds   []time.Duration
			cpu  string
		}{
			{"backend down (health): map elements", r.down, fmt.Sprintf("%v + %v", r.downCPU[0].Round(time.Millisecond), r.downCPU[1].Round(time.Millisecond))},
			{"backend up (health): map elements", r.up, fmt.Sprintf("%v + %v", r.upCPU[0].Round(time.Millisecond), r.upCPU[1].Round(time.Millisecond))},
			{"backend swapped (config, same count): map elements", r.swap, fmt.Sprintf("%v + %v", r.swapCPU[0].Round(time.Millisecond), r.swapCPU[1].Round(time.Millisecond))},
			{"swapped back: map elements", r.swapBack, ""},
		}
		for _, row := range rows {
			fmt.Printf("| %d | %s | %s | %s | %s | %s |\n", r.n, row.name, ms(benchkit.Median(row.ds)), ms(benchkit.Quantile(row.ds, .99)), ms(slices.Max(row.ds)), row.cpu)
		}
	}
	fmt.Printf("\nNot in the Apply times, but paid by the daemon on every change before it: ")
	for i, r := range rs {
		if i > 0 {
			fmt.Printf("; ")
		}
		fmt.Printf("at %d pools, the desired state + `Build` of the whole table %s (median); `Diff` of two such tables (pure, inside Apply) takes %s", r.n, ms(benchkit.Median(r.desired)), ms(benchkit.Median(r.diff)))
	}
	fmt.Printf(".\n")
}
