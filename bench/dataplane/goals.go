package main

import (
	"fmt"
	"time"
)

// printGoals checks scenario 1 and 2 against the data-plane goals
// and says met or missed, with the numbers that decide it. The rows use
// the same "| goal | measured | **met** |" shape as bench/controlplane's,
// so bench/run.sh can gather every program's goals at the top of
// docs/benchmarks.md.
func printGoals(s1 *scenario1, s2 *scenario2) {
	fmt.Printf("\n### Goals\n\n| goal | measured | |\n|---|---|---|\n")
	verdict := func(ok bool) string {
		if ok {
			return "**met**"
		}
		return "**missed**"
	}
	if s1 != nil {
		a, b, c := s1.samples["a"], s1.samples["b"], s1.samples["c"]
		ka := med(b["keepalive"], rps) / med(a["keepalive"], rps)
		bu := med(b["bulk"], gbps) / med(a["bulk"], gbps)
		fmt.Printf("| nftlb / plain routing ≥ 0.8 for requests (keep-alive req/s) and throughput (bulk) | %.2f× and %.2f× | %s |\n",
			ka, bu, verdict(ka >= 0.8 && bu >= 0.8))
		nb, nc := med(b["new"], rps), med(c["new"], rps)
		base := medDur(a["new"], cpuPerReq)
		addB, addC := medDur(b["new"], cpuPerReq)-base, medDur(c["new"], cpuPerReq)-base
		// "Well ahead at equal CPU": more new connections a second, each
		// costing the machine at most three quarters of what HAProxy adds.
		ok := nb > nc && addC > 0 && float64(addB) <= 0.75*float64(addC)
		fmt.Printf("| well ahead of HAProxy on new connections per second at equal CPU | %.0f vs %.0f new conn/s (%.2f×); CPU the LB adds per new connection %s vs %s (%.2f×) | %s |\n",
			nb, nc, nb/nc, fmtDur(addB), fmtDur(addC), float64(addB)/float64(max(addC, time.Nanosecond)), verdict(ok))
	}
	if s2 != nil {
		one, most := s2.get("nftlb", 1), (*scaleRun)(nil)
		for _, r := range s2.runs {
			if r.shape == "nftlb" && (most == nil || r.pools > most.pools) {
				most = r
			}
		}
		if one != nil && most != nil && most != one {
			c1, cn := medDur(one.samples["new"], cpuPerReq), medDur(most.samples["new"], cpuPerReq)
			r := float64(cn) / float64(c1)
			fmt.Printf("| flat dispatch: VIP lookup cost at %d pools within 5%% of 1 pool | CPU per new connection %s vs %s (%.2f×); new conn/s %.2f× | %s |\n",
				most.pools, fmtDur(cn), fmtDur(c1), r, med(most.samples["new"], rps)/med(one.samples["new"], rps), verdict(r <= 1.05))
		}
	}
	fmt.Println()
}
