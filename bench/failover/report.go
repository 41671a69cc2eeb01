package main

import (
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
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
	return benchkit.Median(ok), slices.Max(ok), missing
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
	fs := make([]float64, len(xs))
	sum := 0
	for i, x := range xs {
		fs[i] = float64(x)
		sum += x
	}
	return fmt.Sprintf("%g", benchkit.MedianFloat(fs)), fmt.Sprint(slices.Max(xs)), sum
}

func printFailoverTable(o options, p profile, res map[string][]runResult) {
	bound := p.bound()
	haproxy := p.contender == "haproxy"
	fmt.Printf("\n### Detection and resets: %s (%d runs per fault; interval %v, timeout %v, rise %d, fall %d; %d new conn/s)\n\n",
		p.name, p.runs, p.interval, p.timeout, rise, fall, o.rate)
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
		{"flush done: deciding probe → `connections of failed backend flushed` logged", "", func(r runResult) time.Duration { return r.flushed }},
		{"idle client's read fails: fault →", ms(bound + time.Second), func(r runResult) time.Duration { return r.idle }},
		{"recovery: restore → `to=up` logged", "≤ " + ms(rise*p.interval) + " + probe", func(r runResult) time.Duration { return r.back }},
		{"longest pause between two new connections", ms(time.Second / time.Duration(o.rate)), func(r runResult) time.Duration { return r.maxGap }},
	}
	if haproxy {
		durRows = []durRow{
			{"detection: fault → `Server be/bN is DOWN` logged", ms(bound), func(r runResult) time.Duration { return r.detect }},
			{"idle client's read fails: fault →", "", func(r runResult) time.Duration { return r.idle }},
			{"`shutdown-sessions` backend: detection", ms(bound), func(r runResult) time.Duration { return r.sdDetect }},
			{"`shutdown-sessions` backend: idle client's read fails: fault →", "", func(r runResult) time.Duration { return r.sdIdle }},
			{"recovery: restore → `is UP` logged", "≤ " + ms(rise*p.interval) + " + check", func(r runResult) time.Duration { return r.back }},
			{"longest pause between two new connections", ms(time.Second / time.Duration(o.rate)), func(r runResult) time.Duration { return r.maxGap }},
		}
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
		over := 0
		for _, r := range res[f.name] {
			if r.detect > bound {
				over++
			}
		}
		fmt.Printf("\n- %s: %d of %d detections over the bound %v; the idle connection %s", f.name, over, len(res[f.name]), bound,
			idleSummary(res[f.name], func(r runResult) (time.Duration, string, time.Duration) { return r.idle, r.idleErr, r.detect }))
		if haproxy {
			fmt.Printf("; through `%s` (shutdown-sessions) %s", haproxySDPool,
				idleSummary(res[f.name], func(r runResult) (time.Duration, string, time.Duration) { return r.sdIdle, r.sdIdleErr, r.sdDetect }))
		}
	}
	fmt.Println()
}

// idleSummary says how the idle connections of some runs ended: by what
// (reset, eof, not within detection + 2 s) and when, relative to the
// detection that concerns them.
func idleSummary(rs []runResult, get func(runResult) (idle time.Duration, how string, detect time.Duration)) string {
	kinds := map[string]int{}
	var rel []time.Duration
	for _, r := range rs {
		idle, how, det := get(r)
		if idle < 0 {
			kinds["nothing (still open 2 s after detection)"]++
			continue
		}
		kinds[how]++
		rel = append(rel, idle-det)
	}
	slices.Sort(rel)
	relS := ""
	if len(rel) > 0 {
		relS = fmt.Sprintf(", relative to detection: median %s, range %s .. %s", signed(rel[len(rel)/2]), signed(rel[0]), signed(rel[len(rel)-1]))
	}
	return "ended by " + countList(kinds) + relS
}

// printComparison puts the profiles of -contender all side by side.
func printComparison(o options, profs []profile, res []map[string][]runResult) {
	fmt.Printf("\n### Side by side (%d new conn/s; freeze = like SIGSTOP, kill = listeners and connections closed)\n\n", o.rate)
	head := "| |"
	sep := "|---|"
	var cols []int
	for i, p := range profs {
		if res[i] == nil {
			continue
		}
		cols = append(cols, i)
		head += fmt.Sprintf(" %s: interval %v, timeout %v, fall %d |", p.name, p.interval, p.timeout, fall)
		sep += "---|"
		if p.contender == "haproxy" {
			head += fmt.Sprintf(" %s + `on-marked-down shutdown-sessions` (same runs) |", p.name)
			sep += "---|"
		}
	}
	fmt.Println(head)
	fmt.Println(sep)
	row := func(name string, cell func(p profile, rs map[string][]runResult, sd bool) string) {
		line := "| " + name + " |"
		for _, i := range cols {
			line += " " + cell(profs[i], res[i], false) + " |"
			if profs[i].contender == "haproxy" {
				line += " " + cell(profs[i], res[i], true) + " |"
			}
		}
		fmt.Println(line)
	}
	row("runs per fault", func(p profile, rs map[string][]runResult, _ bool) string { return fmt.Sprint(len(rs["freeze"])) })
	row("bound: interval × fall + timeout", func(p profile, _ map[string][]runResult, _ bool) string { return ms(p.bound()) })
	for _, f := range faults {
		row(fmt.Sprintf("detection, %s: median / worst", f.name), func(p profile, rs map[string][]runResult, sd bool) string {
			var ds []time.Duration
			for _, r := range rs[f.name] {
				if sd {
					ds = append(ds, r.sdDetect)
				} else {
					ds = append(ds, r.detect)
				}
			}
			m, w := durCell(ds)
			return m + " / " + w
		})
	}
	for _, f := range faults {
		row(fmt.Sprintf("failed new conns, started fault → detection+1s, %s: median (total)", f.name), func(p profile, rs map[string][]runResult, sd bool) string {
			if sd {
				return "(no load on this frontend)"
			}
			var xs []int
			for _, r := range rs[f.name] {
				xs = append(xs, r.failed)
			}
			m, _, sum := intCell(xs)
			return fmt.Sprintf("%s (%d)", m, sum)
		})
	}
	row("failed new conns started after detection+100ms / to the victim after detection (totals)", func(p profile, rs map[string][]runResult, sd bool) string {
		if sd {
			return "(no load on this frontend)"
		}
		late, victim := 0, 0
		for _, f := range faults {
			for _, r := range rs[f.name] {
				late += r.lateFailed
				victim += r.toVictim
			}
		}
		return fmt.Sprintf("%d / %d", late, victim)
	})
	for _, f := range faults {
		row(fmt.Sprintf("idle client on the victim, %s", f.name), func(p profile, rs map[string][]runResult, sd bool) string {
			return idleSummary(rs[f.name], func(r runResult) (time.Duration, string, time.Duration) {
				if sd {
					return r.sdIdle, r.sdIdleErr, r.sdDetect
				}
				return r.idle, r.idleErr, r.detect
			})
		})
	}
	for i, p := range profs {
		if p.contender != "haproxy" || res[i] == nil {
			continue
		}
		var durs []time.Duration
		for _, r := range res[i]["freeze"] {
			if m := checkDuration.FindStringSubmatch(r.probe); m != nil {
				n, _ := strconv.Atoi(m[1])
				durs = append(durs, time.Duration(n)*time.Millisecond)
			}
		}
		slices.Sort(durs)
		if len(durs) > 0 {
			fmt.Printf("\nHAProxy's failed checks of a frozen server lasted %s .. %s (the `check duration` of its DOWN lines) with `timeout check %v`. The detections fit the next check starting `inter` after the previous one ended (our reading of these times, not of HAProxy's source): a freeze is then taken out after about fall × (inter + check duration) + phase, while nftlb keeps a fixed period (bound interval × fall + timeout).\n",
				ms(durs[0]), ms(durs[len(durs)-1]), p.timeout)
		}
		fmt.Printf("\nThrough HAProxy, a new connection to a killed server is not refused: HAProxy accepts it, retries the dead server (`retries 3`, with a turn-around of min(timeout connect, 1 s) between attempts, no `option redispatch` by default) and the client times out (3 s here) or gets an EOF; through nftlb the client gets a refusal (RST) at once.\n")
	}
}

var checkDuration = regexp.MustCompile(`check duration: (\d+)ms`)

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
		s.window.Round(time.Second), benchkit.Pct(s.user+s.sys, s.window), s.user, s.sys)
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
