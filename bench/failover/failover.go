package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/lab"
)

const (
	apiPort    = 6443
	healthPort = 8080
	connTO     = 3 * time.Second // each new connection's timeout
)

var vip1 = fmt.Sprintf("%s:%d", lab.VIP(1), apiPort)

// failLab is the lab of part 1: three backends serving who on 6443 and
// /readyz on 8080, one pool checked over HTTP.
type failLab struct {
	*lab.Lab
	who, http []*lab.Server
}

func failoverConfig(p profile, l *lab.Lab) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# written by bench/failover\nhealth:\n  interval: %v\n  timeout: %v\n  rise: %d\n  fall: %d\n", p.interval, p.timeout, rise, fall)
	fmt.Fprintf(&b, "pools:\n  - name: kube-apiserver\n    vip: %s\n    port: %d\n    health:\n      type: http\n      port: %d\n      path: /readyz\n    backends:\n",
		lab.VIP(1), apiPort, healthPort)
	for _, be := range l.Backends {
		fmt.Fprintf(&b, "      - %s:%d\n", be.Addr, apiPort)
	}
	return b.String()
}

// fault is one way a backend fails, and how it is undone.
type fault struct {
	name        string
	break_, fix func(h *failLab, i int) error
}

var faults = []fault{
	{"freeze",
		// Like SIGSTOP: the kernel still completes handshakes, nothing answers.
		func(h *failLab, i int) error { h.who[i].SetHung(true); h.http[i].SetHung(true); return nil },
		func(h *failLab, i int) error { h.who[i].SetHung(false); h.http[i].SetHung(false); return nil }},
	{"kill",
		// Like a killed process: listeners closed (connects refused), its
		// accepted connections closed by the kernel.
		func(h *failLab, i int) error { return errors.Join(h.http[i].Close(), h.who[i].Close()) },
		func(h *failLab, i int) error {
			var err error
			if h.who[i], err = h.Backends[i].ServeTCP(apiPort); err != nil {
				return err
			}
			h.http[i], err = h.Backends[i].ServeHTTP(healthPort)
			return err
		}},
}

// runResult is what one run measured. Durations are from the fault
// (our clock, taken just before breaking the backend); -1 means "did not
// happen".
type runResult struct {
	kind   string
	run    int
	victim string
	jitter time.Duration // random wait before the fault (phase vs the probe schedule)

	detect  time.Duration // fault -> time= of the "backend state changed ... to=down" line
	probe   string        // the deciding probe, as logged
	kernel  time.Duration // the daemon's "probe to kernel" latency
	apply   time.Duration // "ruleset applied" duration of that change
	flushed time.Duration // deciding probe -> "connections of failed backend flushed" logged; -1: none
	idle    time.Duration // fault -> the idle connection's read returned an error; -1: not within detection+2s
	idleErr string

	before, beforeFailed int // new connections started before the fault (baseline)
	window, failed       int // started in [fault, detection+1s]
	late, lateFailed     int // started after detection+100ms
	toVictim             int // started after detection and reached the victim (failures count as such)
	failKinds            map[string]int
	beforeFails          []string      // failures before the fault: start - fault, kind
	timeouts             []string      // connections that hit their own 3 s timeout: start - detection, and where
	maxGap               time.Duration // longest pause between two new connections (a stall of this program or the machine)
	back                 time.Duration // restore -> "to=up" line (recovery, for information)

	// HAProxy only: its second backend, with on-marked-down
	// shutdown-sessions (its own checks, its own idle connection).
	sdDetect  time.Duration
	sdIdle    time.Duration // fault -> that idle connection's read failed; -1: not within its detection+2s
	sdIdleErr string
}

func runFailover(ctx context.Context, o options, p profile, dir string) (map[string][]runResult, error) {
	l, closeLab, err := benchkit.NewLab("part 1 "+p.name, 3)
	if err != nil {
		return nil, err
	}
	defer closeLab()
	h := &failLab{Lab: l}
	for _, b := range l.Backends {
		w, err := b.ServeTCP(apiPort)
		if err != nil {
			return nil, err
		}
		s, err := b.ServeHTTP(healthPort)
		if err != nil {
			return nil, err
		}
		h.who, h.http = append(h.who, w), append(h.http, s)
	}
	var d *benchkit.Proc
	var hp *haproxyRun
	if p.contender == "haproxy" {
		benchkit.Progress("part 1: starting haproxy (inter %v, timeout check %v, rise %d, fall %d, httpchk GET /readyz on %d) in %s", p.interval, p.timeout, rise, fall, healthPort, l.LB.Name)
		if hp, err = startHAProxy(ctx, l, dir, p); err != nil {
			return nil, err
		}
		defer hp.stop()
		d = hp.Proc
	} else {
		benchkit.Progress("part 1: starting nftlb (interval %v, timeout %v, rise %d, fall %d, http /readyz on %d)", p.interval, p.timeout, rise, fall, healthPort)
		if d, err = startDaemon(ctx, l, o.bin, dir, failoverConfig(p, l)); err != nil {
			return nil, err
		}
		defer d.Stop()
	}
	for i := range 3 {
		cctx, cancel := context.WithTimeout(ctx, connTO)
		_, _, err := l.Who(cctx, l.Client, vip1)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("connection %d to %s before any fault: %w", i+1, vip1, err)
		}
	}

	fmt.Printf("## Part 1: detection and client resets: %s (interval %v, timeout %v, rise %d, fall %d)\n\n", p.name, p.interval, p.timeout, rise, fall)
	if p.contender == "haproxy" {
		fmt.Printf("HAProxy in TCP mode in the LB namespace, the VIP on its lo; `option httpchk GET /readyz`, `check port %d inter %v fall %d rise %d`, `timeout check %v`. Backend `%s` is HAProxy's default; `%s` (frontend port %d, same servers) adds `on-marked-down shutdown-sessions`. Detection = HAProxy's own log line `Server be/bN is DOWN` (`log stdout format rfc5424`, HAProxy's timestamp, µs). Before each run every server has the full check health (rise + fall - 1, from `show servers state`): a server that has just come back goes down after one failed check. New connections go to port %d only; each run keeps one idle connection on the victim through each frontend. After each run the backend is restored and the run waits for both `UP` lines. Before each fault a random 0..interval wait puts the fault at a random phase of the check schedule. Victims rotate b1, b2, b3. Bound = interval*fall + timeout = %v.\n\n",
			healthPort, p.interval, fall, rise, p.timeout, haproxyPool, haproxySDPool, sdPort, apiPort, p.bound())
	} else {
		fmt.Printf("One lab and one nftlb for all runs: after each run the backend is restored and the run waits for nftlb to log it up again (and apply that). Before each fault a random 0..interval wait puts the fault at a random phase of the probe schedule. Victims rotate b1, b2, b3. Bound = interval*fall + timeout = %v.\n\n", p.bound())
	}
	fmt.Println("```")
	results := map[string][]runResult{}
	for _, f := range faults {
		for run := 1; run <= p.runs; run++ {
			if hp != nil {
				if err := hp.waitFullHealth(ctx, 3*p.interval*(rise+fall)); err != nil {
					return nil, err
				}
			}
			r, err := oneRun(ctx, o, p, h, d, f, run)
			if err != nil {
				return nil, fmt.Errorf("%s run %d: %w", f.name, run, err)
			}
			results[f.name] = append(results[f.name], r)
			line := r.String()
			fmt.Println(line)
			benchkit.Progress("%s", line)
		}
	}
	fmt.Println("```")
	return results, nil
}

func (r runResult) String() string {
	kinds := make([]string, 0, len(r.failKinds))
	for k, n := range r.failKinds {
		kinds = append(kinds, fmt.Sprintf("%s=%d", k, n))
	}
	sort.Strings(kinds)
	idle := "not-ended"
	if r.idle >= 0 {
		idle = fmt.Sprintf("%v(%s)", ms(r.idle), r.idleErr)
	}
	timeouts := ""
	if n := len(r.timeouts); n > 0 {
		shown := r.timeouts
		if n > 8 { // HAProxy: every connection to the broken server before detection
			shown = append(slices.Clone(shown[:4]), fmt.Sprintf("…%d more…", n-8))
			shown = append(shown, r.timeouts[n-4:]...)
		}
		timeouts = " timeouts(start-detection)=" + strings.Join(shown, ",")
	}
	if len(r.beforeFails) > 0 {
		timeouts += " failed_before_fault(start-fault)=" + strings.Join(r.beforeFails, ",")
	}
	flushed := "none"
	if r.flushed >= 0 {
		flushed = ms(r.flushed)
	}
	if r.sdDetect != 0 {
		sdIdle := "not-ended"
		if r.sdIdle >= 0 {
			sdIdle = fmt.Sprintf("%v(%s)", ms(r.sdIdle), r.sdIdleErr)
		}
		timeouts += fmt.Sprintf(" shutdown-sessions:detect=%s,idle_end=%s", ms(r.sdDetect), sdIdle)
	}
	return fmt.Sprintf("%-6s run=%2d victim=%s phase=%-7s detect=%-7s probe->kernel=%-7s apply=%-7s flushed_after_probe=%-7s idle_end=%-20s before=%d/%d failed window=%d/%d failed(%s) after_det+100ms=%d/%d failed to_victim_after_det=%d back_up=%s max_gap=%s%s probe=%q",
		r.kind, r.run, r.victim, ms(r.jitter), ms(r.detect), ms(r.kernel), ms(r.apply), flushed, idle,
		r.beforeFailed, r.before, r.failed, r.window, strings.Join(kinds, ","), r.lateFailed, r.late, r.toVictim, ms(r.back), ms(r.maxGap), timeouts, r.probe)
}

func ms(d time.Duration) string {
	if d < 0 {
		return "-"
	}
	switch {
	case d >= time.Second:
		return fmt.Sprintf("%.3fs", d.Seconds())
	case d >= 10*time.Millisecond:
		return fmt.Sprintf("%.0fms", float64(d)/1e6)
	default:
		return fmt.Sprintf("%.2fms", float64(d)/1e6)
	}
}

// idleConn is a long-lived connection to the VIP that says nothing after
// the greeting, like a quiet client-go watch.
type idleConn struct {
	c     net.Conn
	ended chan idleEnd
}

type idleEnd struct {
	at  time.Time
	err error
}

// dialIdle opens connections to addr until one lands on backend name.
func dialIdle(ctx context.Context, l *lab.Lab, addr, name string) (*idleConn, error) {
	for range 12 {
		cctx, cancel := context.WithTimeout(ctx, connTO)
		c, err := l.Client.Dial(cctx, "tcp", addr)
		cancel()
		if err != nil {
			return nil, err
		}
		r := bufio.NewReader(c)
		_ = c.SetReadDeadline(time.Now().Add(connTO))
		line, err := r.ReadString('\n')
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("idle connection: greeting: %w", err)
		}
		if f := strings.Fields(line); len(f) == 0 || f[0] != name {
			c.Close()
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Minute)) // a safety net only
		ic := &idleConn{c: c, ended: make(chan idleEnd, 1)}
		go func() {
			_, err := r.ReadByte() // blocks: nothing is sent either way
			ic.ended <- idleEnd{time.Now(), err}
		}()
		return ic, nil
	}
	return nil, fmt.Errorf("no connection to %s landed on %s", addr, name)
}

// wait returns how the idle connection ended, if it did by until (or
// before this call: the load's last connections can keep the caller past
// until, and an end that is already known must not lose a race against
// an expired timer).
func (ic *idleConn) wait(ctx context.Context, until time.Time) (idleEnd, bool, error) {
	select {
	case end := <-ic.ended:
		return end, true, nil
	default:
	}
	t := time.NewTimer(time.Until(until))
	defer t.Stop()
	select {
	case end := <-ic.ended:
		return end, true, nil
	case <-t.C:
		return idleEnd{}, false, nil
	case <-ctx.Done():
		return idleEnd{}, false, ctx.Err()
	}
}

func errKind(err error) string {
	var ne net.Error
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, io.EOF):
		return "eof"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, syscall.EHOSTUNREACH):
		return "unreachable"
	}
	return "other"
}

// load opens a new connection to the VIP from the client namespace at a
// steady rate and records what happened to each.
type load struct {
	mu       sync.Mutex
	attempts []attempt
	stop     chan struct{}
	wg       sync.WaitGroup
}

type attempt struct {
	start   time.Time
	backend string
	err     error
}

func startLoad(ctx context.Context, l *lab.Lab, rate int) *load {
	p := &load{stop: make(chan struct{})}
	p.wg.Go(func() {
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			start := time.Now()
			p.wg.Go(func() {
				cctx, cancel := context.WithTimeout(ctx, connTO)
				defer cancel()
				name, _, err := l.Who(cctx, l.Client, vip1)
				p.mu.Lock()
				p.attempts = append(p.attempts, attempt{start, name, err})
				p.mu.Unlock()
			})
		}
	})
	return p
}

// finish stops opening connections and waits for those in flight.
func (p *load) finish() []attempt {
	close(p.stop)
	p.wg.Wait()
	return p.attempts
}

func oneRun(ctx context.Context, o options, p profile, h *failLab, d *benchkit.Proc, f fault, run int) (runResult, error) {
	vi := (run - 1) % len(h.Backends)
	victim := h.Backends[vi]
	target := fmt.Sprintf("%s:%d", victim.Addr, apiPort)
	r := runResult{kind: f.name, run: run, victim: victim.Name, flushed: -1, idle: -1, sdIdle: -1, failKinds: map[string]int{}}
	isHAProxy := p.contender == "haproxy"
	if isHAProxy {
		r.apply, r.kernel = -1, -1 // nftlb's own lines; HAProxy has none
	}

	ic, err := dialIdle(ctx, h.Lab, vip1, victim.Name)
	if err != nil {
		return r, err
	}
	defer ic.c.Close()
	var ic2 *idleConn
	if isHAProxy {
		if ic2, err = dialIdle(ctx, h.Lab, vipSD, victim.Name); err != nil {
			return r, err
		}
		defer ic2.c.Close()
	}
	ld := startLoad(ctx, h.Lab, o.rate)
	stopped := false
	defer func() {
		if !stopped {
			ld.finish()
		}
	}()
	r.jitter = 200*time.Millisecond + rand.N(p.interval)
	if err := benchkit.Sleep(ctx, r.jitter); err != nil {
		return r, err
	}

	mark := d.Log.Len()
	t0 := time.Now()
	if err := f.break_(h, vi); err != nil {
		return r, err
	}
	if took := time.Since(t0); took > 5*time.Millisecond {
		benchkit.Progress("note: breaking %s took %v", victim.Name, took)
	}
	bound := p.bound()
	e, at, err := d.WaitFor(ctx, mark, bound+10*time.Second, benchkit.Match("backend state changed", "pool", p.pool(), "backend", target, "to", "down"))
	if err != nil {
		return r, fmt.Errorf("waiting for %s to be taken out: %w", target, err)
	}
	det := e.Time
	r.detect = det.Sub(t0)
	r.probe = e.Str("probe")
	var sdDet time.Time
	if isHAProxy {
		e2, _, err := d.WaitFor(ctx, mark, bound+10*time.Second, benchkit.Match("backend state changed", "pool", haproxySDPool, "backend", target, "to", "down"))
		if err != nil {
			return r, fmt.Errorf("waiting for %s to be taken out of %s: %w", target, haproxySDPool, err)
		}
		sdDet = e2.Time
		r.sdDetect = sdDet.Sub(t0)
	} else {
		if a, _, err := d.WaitFor(ctx, at, 5*time.Second, benchkit.Match("ruleset applied")); err == nil {
			r.apply = a.Dur("duration")
		} else {
			return r, err
		}
		k, _, err := d.WaitFor(ctx, at, 5*time.Second, benchkit.Match("probe to kernel", "backend", target, "to", "down"))
		if err != nil {
			return r, err
		}
		r.kernel = k.Dur("latency")
		// The deciding probe ended `latency` before the "probe to kernel"
		// line; the flush line comes when the worker is done.
		if fl, _, err := d.WaitFor(ctx, at, 2*time.Second, benchkit.Match("connections of failed backend flushed", "backend", target)); err == nil && r.kernel >= 0 {
			r.flushed = fl.Time.Sub(k.Time.Add(-r.kernel))
		}
	}

	// New connections until detection + 1 s, then let those in flight end.
	if err := benchkit.Sleep(ctx, time.Until(det.Add(time.Second+20*time.Millisecond))); err != nil {
		return r, err
	}
	attempts := ld.finish()
	stopped = true
	sort.Slice(attempts, func(i, j int) bool { return attempts[i].start.Before(attempts[j].start) })
	if end, ok, err := ic.wait(ctx, det.Add(2*time.Second)); err != nil {
		return r, err
	} else if ok {
		r.idle, r.idleErr = end.at.Sub(t0), errKind(end.err)
	}
	if ic2 != nil {
		if end, ok, err := ic2.wait(ctx, sdDet.Add(2*time.Second)); err != nil {
			return r, err
		} else if ok {
			r.sdIdle, r.sdIdleErr = end.at.Sub(t0), errKind(end.err)
		}
	}
	for i, a := range attempts {
		if i > 0 {
			r.maxGap = max(r.maxGap, a.start.Sub(attempts[i-1].start))
		}
		if errKind(a.err) == "timeout" {
			where := "connect"
			if strings.Contains(a.err.Error(), "read greeting") {
				where = "greeting"
			}
			r.timeouts = append(r.timeouts, fmt.Sprintf("%+dms/%s", a.start.Sub(det).Milliseconds(), where))
		}
		switch {
		case a.start.Before(t0):
			r.before++
			if a.err != nil {
				r.beforeFailed++
				r.beforeFails = append(r.beforeFails, fmt.Sprintf("%+dms/%s", a.start.Sub(t0).Milliseconds(), errKind(a.err)))
			}
			continue
		case !a.start.After(det.Add(time.Second)):
			r.window++
			if a.err != nil {
				r.failed++
				r.failKinds[errKind(a.err)]++
			}
		}
		if a.start.After(det.Add(100 * time.Millisecond)) {
			r.late++
			if a.err != nil {
				r.lateFailed++
			}
		}
		// A healthy backend greets within milliseconds, so a failed
		// connection is one that reached the broken backend.
		if a.start.After(det) && (a.backend == victim.Name || a.err != nil) {
			r.toVictim++
		}
	}

	// Restore, at a random phase of the probe schedule too, and wait until
	// nftlb has put the backend back.
	if err := benchkit.Sleep(ctx, rand.N(p.interval)); err != nil {
		return r, err
	}
	mark = d.Log.Len()
	t1 := time.Now()
	if err := f.fix(h, vi); err != nil {
		return r, err
	}
	within := time.Duration(rise+1)*p.interval + p.timeout + 10*time.Second
	up, at, err := d.WaitFor(ctx, mark, within, benchkit.Match("backend state changed", "pool", p.pool(), "backend", target, "from", "down", "to", "up"))
	if err != nil {
		return r, fmt.Errorf("waiting for %s to be back: %w", target, err)
	}
	r.back = up.Time.Sub(t1)
	if isHAProxy {
		if _, _, err := d.WaitFor(ctx, mark, within, benchkit.Match("backend state changed", "pool", haproxySDPool, "backend", target, "from", "down", "to", "up")); err != nil {
			return r, fmt.Errorf("waiting for %s to be back in %s: %w", target, haproxySDPool, err)
		}
		return r, nil
	}
	if _, _, err := d.WaitFor(ctx, at, 5*time.Second, benchkit.Match("probe to kernel", "backend", target, "to", "up")); err != nil {
		return r, err
	}
	return r, nil
}
