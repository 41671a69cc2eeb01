package main

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
)

func (s sample) brief() string {
	b := fmt.Sprintf("%9.0f req/s %7.3f Gbit/s p50 %-8s p99 %-8s machine %3.0f%% (softirq %2.0f%%) %-9s CPU/req",
		s.rps, gbit(s.bps), fmtDur(s.p50), fmtDur(s.p99), s.busy, s.softirq, fmtDur(s.cpuPerReq))
	if s.lbCPU >= 0 {
		b += fmt.Sprintf(" LB proc %3.0f%%", s.lbCPU)
	}
	b += " backends " + backendCells(s.backendCPU) + fmt.Sprintf(" wrk %3.0f%% others %3.0f%%", s.cpu, s.foreign)
	if s.foreign >= 5 {
		b += " (" + s.foreignTop + ")"
	}
	if s.retried {
		b += " (less disturbed of 2 attempts)"
	}
	if s.synRetrans > 0 {
		b += fmt.Sprintf(" SYN-retransmits %d", s.synRetrans)
	}
	if s.sockErr > 0 || s.non2xx > 0 {
		b += fmt.Sprintf(" ERRORS socket(%s) non-2xx %d", s.sockErrs, s.non2xx)
	}
	return b
}

func backendCells(pcts []float64) string {
	var c []string
	for _, p := range pcts {
		c = append(c, fmt.Sprintf("%.0f%%", p))
	}
	return strings.Join(c, "/")
}

func gbit(bps float64) float64 { return bps * 8 / 1e9 }

// med is the median of f over the samples.
func med(ss []sample, f func(sample) float64) float64 {
	var xs []float64
	for _, s := range ss {
		xs = append(xs, f(s))
	}
	return benchkit.MedianFloat(xs)
}

func medDur(ss []sample, f func(sample) time.Duration) time.Duration {
	return time.Duration(med(ss, func(s sample) float64 { return float64(f(s)) }))
}

func ratio(x, base float64) string {
	if base == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", x/base)
}

func fmtDur(d time.Duration) string {
	switch {
	case d >= time.Second:
		return fmt.Sprintf("%.2fs", d.Seconds())
	case d >= time.Millisecond:
		return fmt.Sprintf("%.2fms", float64(d)/1e6)
	default:
		return fmt.Sprintf("%.0fµs", float64(d)/1e3)
	}
}

func rps(s sample) float64             { return s.rps }
func gbps(s sample) float64            { return gbit(s.bps) }
func p50(s sample) time.Duration       { return s.p50 }
func p99(s sample) time.Duration       { return s.p99 }
func busy(s sample) float64            { return s.busy }
func softirq(s sample) float64         { return s.softirq }
func lbCPU(s sample) float64           { return s.lbCPU }
func wrkOwnCPU(s sample) float64       { return s.cpu }
func cpuPerReq(s sample) time.Duration { return s.cpuPerReq }
func others(s sample) float64          { return s.foreign }
func beCPU(i int) func(sample) float64 {
	return func(s sample) float64 { return s.backendCPU[i] }
}

var loadTitle = map[string]string{"new": "new connections", "keepalive": "keep-alive", "bulk": "bulk 10 MiB"}

func printScenario1(o options, res *scenario1) {
	base := res.samples["a"]
	fmt.Printf("## Scenario 1: one VIP, 3 backends (median of %d runs of %v; ratio to (a) plain routing)\n\n", o.runs, o.duration)
	fmt.Println("| contender | new conn/s | vs (a) | keep-alive req/s | vs (a) | bulk Gbit/s | vs (a) | p50 keep-alive | vs (a) | p99 keep-alive | vs (a) |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, c := range contenders {
		ss := res.samples[c.key]
		nc, ka, bu := med(ss["new"], rps), med(ss["keepalive"], rps), med(ss["bulk"], gbps)
		l50, l99 := medDur(ss["keepalive"], p50), medDur(ss["keepalive"], p99)
		fmt.Printf("| (%s) %s | %.0f%s | %s | %.0f%s | %s | %.2f%s | %s | %s | %s | %s | %s |\n", c.key, c.name,
			nc, dagger(ss["new"]), ratio(nc, med(base["new"], rps)),
			ka, dagger(ss["keepalive"]), ratio(ka, med(base["keepalive"], rps)),
			bu, dagger(ss["bulk"]), ratio(bu, med(base["bulk"], gbps)),
			fmtDur(l50), ratio(float64(l50), float64(medDur(base["keepalive"], p50))),
			fmtDur(l99), ratio(float64(l99), float64(medDur(base["keepalive"], p99))))
	}

	if anyDisturbed(res.samples) {
		fmt.Printf("\n%s\n", daggerNote)
	}
	fmt.Printf("\n### CPU during each load (medians)\n\n")
	fmt.Println("Machine busy: /proc/stat over the wrk run, in % of the whole machine (100 % = both CPUs busy). " +
		"The kernel's forwarding, conntrack and NAT run in softirq context, which cannot be attributed to a namespace " +
		"(and this kernel has no CONFIG_IRQ_TIME_ACCOUNTING: softirq work that runs while a process is on the CPU is charged to that process, " +
		"e.g. a backend's share includes forwarding its responses through the LB namespace, since veth delivers inline). " +
		"So for (a), (b) and (d) the LB's cost is only visible in the machine totals and the throughput it leaves. " +
		"LB process: utime+stime of HAProxy (c), or of the nftlb daemon (b; health checks only, it is not in the data path), % of one core. " +
		"Backends: each bench/backend process, % of one core. wrk: its own rusage, % of one core. " +
		"Others: every other process on the VM (this VM is shared), % of one core. " +
		"CPU per request: the machine's busy CPU time over the run, less the others', divided by the requests wrk completed: " +
		"the whole path's cost (wrk, kernel on all hops, LB, backend) per request, which does not depend on how saturated the machine was; " +
		"its difference to (a) is what the LB adds.")
	fmt.Println()
	fmt.Println("| contender | load | CPU per request | vs (a) | LB adds per request | machine busy | of it softirq | LB process | backends b1/b2/b3 | wrk | others | wrk errors (all runs) |")
	fmt.Println("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
	for _, c := range contenders {
		for _, ld := range loads1 {
			ss := res.samples[c.key][ld.key]
			lb := "–"
			if len(ss) > 0 && ss[0].lbCPU >= 0 {
				lb = fmt.Sprintf("%.0f%%", med(ss, lbCPU))
			}
			var be []float64
			for i := range ss[0].backendCPU {
				be = append(be, med(ss, beCPU(i)))
			}
			cpr, cprA := medDur(ss, cpuPerReq), medDur(base[ld.key], cpuPerReq)
			adds := "–"
			if c.key != "a" {
				adds = fmtDur(cpr - cprA)
			}
			fmt.Printf("| (%s) | %s | %s | %s | %s | %.0f%% | %.0f%% | %s | %s | %.0f%% | %.0f%% | %s |\n", c.key, loadTitle[ld.key],
				fmtDur(cpr), ratio(float64(cpr), float64(cprA)), adds,
				med(ss, busy), med(ss, softirq), lb, backendCells(be),
				med(ss, wrkOwnCPU), med(ss, others), errCell(ss))
		}
	}
	fmt.Printf("\nStart-up until the VIP served (median): ")
	var parts []string
	for _, c := range contenders[1:] {
		d := res.setup[c.key]
		ds := make([]float64, len(d))
		for i, x := range d {
			ds[i] = float64(x)
		}
		p := fmt.Sprintf("(%s) %s", c.key, fmtDur(time.Duration(benchkit.MedianFloat(ds))))
		if n := res.notes[c.key]; n != "" {
			p += " (" + n + ")"
		}
		parts = append(parts, p)
	}
	fmt.Println(strings.Join(parts, ", ") + ".")

	fmt.Printf("\n### Every run\n\n```\n")
	for run := range o.runs {
		for _, c := range contenders {
			for _, ld := range loads1 {
				s := res.samples[c.key][ld.key][run]
				fmt.Printf("run %d (%s) %-9s %s\n", run+1, c.key, ld.key, s.brief())
			}
		}
	}
	fmt.Printf("```\n\n")
}

// dagger marks a cell whose runs include a disturbed one (other
// processes used more than disturbedPct of a core during it).
func dagger(sss ...[]sample) string {
	for _, ss := range sss {
		for _, s := range ss {
			if s.disturbed() {
				return " †"
			}
		}
	}
	return ""
}

const daggerNote = "† at least one of the runs behind this number was disturbed: other processes on this shared VM used more than 25 % of a core during it (see \"others\" in every run)."

func anyDisturbed(m map[string]map[string][]sample) bool {
	for _, byLoad := range m {
		for _, ss := range byLoad {
			if dagger(ss) != "" {
				return true
			}
		}
	}
	return false
}

func errCell(ss []sample) string {
	var sock, non int64
	for _, s := range ss {
		sock += s.sockErr
		non += s.non2xx
	}
	if sock == 0 && non == 0 {
		return "0"
	}
	var parts []string
	for _, s := range ss {
		if s.sockErr > 0 {
			parts = append(parts, s.sockErrs)
		}
	}
	return fmt.Sprintf("%d socket, %d non-2xx (%s)", sock, non, strings.Join(parts, "; "))
}

func printScenario2(o options, res *scenario2) {
	fmt.Printf("## Scenario 2: one VIP while N pools exist (median of %d runs of %v; ratio to the same shape with 1 pool)\n\n", o.runs, o.duration)
	fmt.Println("N counts every pool (nftlb) or rule (seed), the measured one included. nftlb: the measured pool has the default tcp health check, " +
		"the N−1 others (VIPs in 198.18.128.0/17, 3 backends each) `type: none`. Seed: N−1 rules for the other VIPs, then the measured VIP's rule last, " +
		"so each new connection to it walks the whole chain (an average VIP would walk half). Only a connection's first packet goes through the nat chains, " +
		"so keep-alive requests should not depend on N for either.")
	fmt.Println()
	if o.keepDaemon {
		fmt.Println("The nftlb daemon kept running during the loads (-scale-keep-daemon): its own CPU use competes with the data path on this 2-CPU machine.")
	} else {
		fmt.Printf("nftlb's table is measured alone: the daemon applies it, its CPU is measured without load from %v to %v after the apply (\"daemon CPU, no load\", %% of one core), "+
			"then it is stopped with SIGTERM, which leaves the table in the kernel, and the loads run (-scale-keep-daemon keeps it running).\n", daemonSettle, daemonSettle+daemonIdle)
	}
	fmt.Println()
	fmt.Println("| shape | N | load time | rules in LB ns | new conn/s | vs N=1 | CPU per new conn | vs N=1 | keep-alive req/s | vs N=1 | p99 keep-alive | nftlb daemon CPU, no load | others (new conn) | wrk errors |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
	disturbed := false
	for _, sh := range shapes {
		base := res.get(sh.key, 1)
		for _, n := range o.scalePools {
			r := res.get(sh.key, n)
			if r == nil || base == nil {
				continue
			}
			nc, ka := med(r.samples["new"], rps), med(r.samples["keepalive"], rps)
			cpc := medDur(r.samples["new"], cpuPerReq)
			idle := "–"
			if sh.key == "nftlb" {
				idle = fmt.Sprintf("%.1f%%", r.idleCPU)
			}
			all := append(slices.Clone(r.samples["new"]), r.samples["keepalive"]...)
			if dagger(r.samples["new"], r.samples["keepalive"]) != "" {
				disturbed = true
			}
			fmt.Printf("| %s | %d | %s | %s | %.0f%s | %s | %s | %s | %.0f%s | %s | %s | %s | %.0f%% | %s |\n", sh.key, n, fmtDur(r.setup), r.tableSize,
				nc, dagger(r.samples["new"]), ratio(nc, med(base.samples["new"], rps)),
				fmtDur(cpc), ratio(float64(cpc), float64(medDur(base.samples["new"], cpuPerReq))),
				ka, dagger(r.samples["keepalive"]), ratio(ka, med(base.samples["keepalive"], rps)),
				fmtDur(medDur(r.samples["keepalive"], p99)), idle, med(r.samples["new"], others), errCell(all))
		}
	}
	fmt.Println()
	if disturbed {
		fmt.Println(daggerNote)
		fmt.Println()
	}
	fmt.Println("Load time: nftlb = process start until its log says `ruleset applied` (config parse, first probe round, one netlink transaction); seed = `nft -f` of the whole ruleset. " +
		"CPU per new conn: as in scenario 1 (machine CPU less others', per completed request = per connection).")
	for _, r := range res.runs {
		if r.note != "" || r.teardown > time.Second {
			fmt.Printf("- %s N=%d: %s; removal %s\n", r.shape, r.pools, r.note, fmtDur(r.teardown))
		}
	}
	fmt.Printf("\n### Every run\n\n```\n")
	for _, r := range res.runs {
		for _, ld := range loads2 {
			for i, s := range r.samples[ld.key] {
				fmt.Printf("%-5s N=%-5d run %d %-9s %s\n", r.shape, r.pools, i+1, ld.key, s.brief())
			}
		}
	}
	fmt.Printf("```\n")
}
