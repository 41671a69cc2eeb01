package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// median and worst (max) of durations; negative values ("did not
// happen") count as worst.
func medWorst(ds []time.Duration) (med, worst time.Duration, missing int) {
	var ok []time.Duration
	for _, d := range ds {
		if d < 0 {
			missing++
			continue
		}
		ok = append(ok, d)
	}
	if len(ok) == 0 {
		return -1, -1, missing
	}
	slices.Sort(ok)
	n := len(ok)
	med = ok[n/2]
	if n%2 == 0 {
		med = (ok[n/2-1] + ok[n/2]) / 2
	}
	return med, ok[n-1], missing
}

func durCell(ds []time.Duration) (string, string) {
	med, worst, missing := medWorst(ds)
	w := ms(worst)
	if missing > 0 {
		w = fmt.Sprintf("%s (%d× never)", w, missing)
	}
	return ms(med), w
}

func intCell(xs []int) (string, string, int) {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	med := float64(s[n/2])
	if n%2 == 0 {
		med = float64(s[n/2-1]+s[n/2]) / 2
	}
	sum := 0
	for _, x := range s {
		sum += x
	}
	return fmt.Sprintf("%g", med), fmt.Sprint(s[n-1]), sum
}

func printFailoverTable(o options, res map[string][]runResult) {
	bound := o.interval*fall + o.timeout
	fmt.Printf("### Detection and resets (%d runs per fault; interval %v, timeout %v, rise %d, fall %d; %d new conn/s)\n\n",
		o.runs, o.interval, o.timeout, rise, fall, o.rate)
	fmt.Printf("| metric | freeze median | freeze worst | kill median | kill worst | bound / expected |\n")
	fmt.Printf("|---|---|---|---|---|---|\n")
	type durRow struct {
		name, expect string
		get          func(runResult) time.Duration
	}
	durRows := []durRow{
		{"detection: fault → `to=down` logged", ms(bound), func(r runResult) time.Duration { return r.detect }},
		{"probe → kernel (daemon's `latency`)", "", func(r runResult) time.Duration { return r.kernel }},
		{"ruleset apply (daemon's `duration`)", "", func(r runResult) time.Duration { return r.apply }},
		{"flush done: deciding probe → (daemon's `since_probe`)", "", func(r runResult) time.Duration { return r.flushed }},
		{"idle client's read fails: fault →", ms(bound + time.Second), func(r runResult) time.Duration { return r.idle }},
		{"recovery: restore → `to=up` logged", "≤ " + ms(rise*o.interval) + " + probe", func(r runResult) time.Duration { return r.back }},
		{"longest pause between two new connections", ms(time.Second / time.Duration(o.rate)), func(r runResult) time.Duration { return r.maxGap }},
	}
	for _, row := range durRows {
		cells := []string{}
		for _, f := range faults {
			var ds []time.Duration
			for _, r := range res[f.name] {
				ds = append(ds, row.get(r))
			}
			m, w := durCell(ds)
			cells = append(cells, m, w)
		}
		fmt.Printf("| %s | %s | %s | %s | %s | %s |\n", row.name, cells[0], cells[1], cells[2], cells[3], row.expect)
	}
	type intRow struct {
		name, expect string
		get          func(runResult) int
	}
	intRows := []intRow{
		{"new conns failed, started fault → detection+1s", "", func(r runResult) int { return r.failed }},
		{"new conns failed, started after detection+100ms", "0", func(r runResult) int { return r.lateFailed }},
		{"new conns to the victim, started after detection", "0", func(r runResult) int { return r.toVictim }},
		{"new conns failed before the fault (baseline)", "0", func(r runResult) int { return r.beforeFailed }},
	}
	for _, row := range intRows {
		cells := []string{}
		for _, f := range faults {
			var xs []int
			for _, r := range res[f.name] {
				xs = append(xs, row.get(r))
			}
			m, w, sum := intCell(xs)
			cells = append(cells, m, fmt.Sprintf("%s (total %d)", w, sum))
		}
		fmt.Printf("| %s | %s | %s | %s | %s | %s |\n", row.name, cells[0], cells[1], cells[2], cells[3], row.expect)
	}
	for _, f := range faults {
		over, kinds := 0, map[string]int{}
		var rel []time.Duration
		for _, r := range res[f.name] {
			if r.detect > bound {
				over++
			}
			if r.idle < 0 {
				kinds["not ended"]++
				continue
			}
			kinds[r.idleErr]++
			rel = append(rel, r.idle-r.detect)
		}
		slices.Sort(rel)
		relS := "-"
		if len(rel) > 0 {
			relS = fmt.Sprintf("median %s, range %s .. %s", signed(rel[len(rel)/2]), signed(rel[0]), signed(rel[len(rel)-1]))
		}
		fmt.Printf("\n- %s: %d of %d detections over the bound %v; the idle connection ended by %s, relative to detection: %s", f.name, over, len(res[f.name]), bound, countList(kinds), relS)
	}
	fmt.Println()
}

func printScaleTable(s *scaleResult) {
	var det, kern, apply, up []time.Duration
	for _, r := range s.runs {
		det, kern, apply, up = append(det, r.detect), append(kern, r.kernel), append(apply, r.apply), append(up, r.kernelUp)
	}
	fmt.Printf("\n### %d pools × 3 backends (%d tcp probe targets, interval %v, timeout %v, backends %q); b2:%d of pool 0 killed %d times\n\n",
		scalePools, scalePools*3, scaleInterval, scaleTimeout, s.backend, changingPort, len(s.runs))
	fmt.Printf("| metric | median | worst |\n|---|---|---|\n")
	for _, row := range []struct {
		name string
		ds   []time.Duration
	}{
		{"detection: kill → `to=down` logged (bound " + ms(scaleInterval*fall+scaleTimeout) + ")", det},
		{"probe → kernel, down (daemon's `latency`)", kern},
		{"ruleset apply of that change (daemon's `duration`)", apply},
		{"probe → kernel, back up", up},
	} {
		m, w := durCell(row.ds)
		fmt.Printf("| %s | %s | %s |\n", row.name, m, w)
	}
	fmt.Printf("| nftlb CPU while probing (utime+stime over %v) | %.1f%% of one core (user %v, sys %v) | |\n",
		s.window.Round(time.Second), pct(s.user+s.sys, s.window), s.user, s.sys)
	fmt.Printf("| nftlb RSS (VmRSS; peak VmHWM) | %s | %s |\n", s.rss, s.hwm)
	fmt.Printf("| state changes of the 999 untouched pools | %d | |\n", s.spurious)
	fmt.Printf("| slowest probe → kernel / apply of any event after start-up | | %s / %s |\n", ms(s.maxKernel), ms(s.maxApply))
}

func signed(d time.Duration) string {
	if d < 0 {
		return "-" + ms(-d)
	}
	return "+" + ms(d)
}

func countList(m map[string]int) string {
	keys := slices.Sorted(maps.Keys(m))
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s ×%d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}
