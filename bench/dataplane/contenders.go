package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/lab"
)

const (
	vipPort     = 80
	backendPort = 8080
	extraPort   = 9000 // the backends of the extra pools of scenario 2 (never connected to)
	wrkCPU      = "0"
	backendCPU  = "1"
)

var vip = lab.VIP(1) // 198.18.100.1

// env is the lab shared by every contender: client, LB and three backend
// namespaces, each backend running bench/backend on :8080.
type env struct {
	o        options
	l        *lab.Lab
	dir      string
	backends []*benchkit.Proc
	closeLab func()
}

// setupEnv builds the lab, tunes the client and LB namespaces for many
// short connections, and starts the backends. On error everything it made
// is gone again; otherwise call teardown.
func setupEnv(ctx context.Context, o options, dir string) (_ *env, err error) {
	l, closeLab, err := benchkit.NewLab("lab", 3)
	if err != nil {
		return nil, err
	}
	e := &env{o: o, l: l, dir: dir, closeLab: closeLab}
	defer func() {
		if err != nil {
			e.teardown()
		}
	}()
	// Only inside the lab's namespaces (ip netns exec sysctl).
	for _, s := range tunedSysctls {
		ns := l.Client
		if s.ns == "lb" {
			ns = l.LB
		}
		if _, err := ns.Run(ctx, "sysctl", "-q", "-w", s.key+"="+s.value); err != nil {
			return nil, err
		}
	}
	for _, b := range l.Backends {
		args := []string{o.backendBin, "-listen", netip.AddrPortFrom(b.Addr, backendPort).String()}
		if o.pin {
			args = append([]string{"taskset", "-c", backendCPU}, args...)
		}
		p, err := benchkit.Start(b.NS, benchkit.Spec{Name: "backend " + b.Name, Args: args})
		if err != nil {
			return nil, err
		}
		e.backends = append(e.backends, p)
	}
	for _, b := range l.Backends {
		if err := e.ready(ctx, fmt.Sprintf("http://%s", netip.AddrPortFrom(b.Addr, backendPort)), nil); err != nil {
			return nil, fmt.Errorf("backend %s: %w", b.Name, err)
		}
	}
	return e, nil
}

// tunedSysctls are set in the lab's client and LB namespaces (never the
// root namespace).
//
// The two source-port ranges are disjoint on purpose. The backends close
// first (Connection: close), so their TIME_WAIT sockets remember each
// connection's 4-tuple and the sender's TCP timestamp for 60 s. nftlb and
// the seed masquerade to the LB's address 198.18.1.1 and keep the client's
// source port; HAProxy connects from 198.18.1.1 too. With overlapping
// ranges, a masqueraded SYN often hit a TIME_WAIT socket HAProxy had left
// on the same 4-tuple with a timestamp from another clock (Linux offsets
// timestamps per address pair); the backend refused it and the client
// retransmitted it 1 s later: ~1,500 SYN retransmissions and a 4× lower
// new-connection rate in each nftlb or seed run within 60 s of an HAProxy
// run. With disjoint ranges that cannot happen; each run reports the
// client's SYN retransmissions so it would show if it did.
var tunedSysctls = []struct{ ns, key, value string }{
	{"client", "net.ipv4.ip_local_port_range", "32768 65535"},
	{"client", "net.ipv4.tcp_tw_reuse", "1"},
	{"lb", "net.ipv4.ip_local_port_range", "1024 32767"},
	{"lb", "net.ipv4.tcp_tw_reuse", "1"},
}

func (e *env) teardown() {
	for _, p := range e.backends {
		p.Stop()
	}
	e.closeLab()
}

// ready GETs base+"/small" from the client until three GETs in a row
// succeed (30 s at most): the path works and ARP entries exist. It gives
// up early when p (if not nil) exits.
func (e *env) ready(ctx context.Context, base string, p *benchkit.Proc) error {
	deadline := time.Now().Add(30 * time.Second)
	ok := 0
	var last error
	for ok < 3 {
		gctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := e.l.Get(gctx, e.l.Client, base+"/small")
		cancel()
		if err == nil {
			ok++
			continue
		}
		ok, last = 0, err
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if p != nil && !p.Alive() {
			return fmt.Errorf("%s exited (%v) before %s/small served: %w", p.Name, p.Err(), base, last)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not serving %s/small after 30s: %w", base, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return nil
}

// cleanupCtx is for teardown steps, which must run also after Ctrl-C
// canceled the main context.
func cleanupCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 2*time.Minute)
}

// running is a started contender.
type running struct {
	url  string         // http://host[:port], without path
	lb   *benchkit.Proc // the LB's user-space process, if any (nftlb, HAProxy)
	stop func() error
	// setup is how long starting took until the VIP served (nftlb:
	// process start to "ruleset applied"; nft -f: the command).
	setup time.Duration
	note  string
	// idleCPU is the nftlb daemon's CPU without load (scenario 2), % of
	// one core; 0 when not measured.
	idleCPU float64
}

// contender is one way to get the client's requests to the backends.
type contender struct {
	key, name string
	start     func(ctx context.Context, e *env) (*running, error)
}

var contenders = []contender{
	{"a", "plain routing (wrk → b1 directly)", startDirect},
	{"b", "nftlb", func(ctx context.Context, e *env) (*running, error) { return startNftlb(ctx, e, 1) }},
	{"c", "HAProxy 2.6 (mode tcp)", startHAProxy},
	{"d", "seed's nft rule", func(ctx context.Context, e *env) (*running, error) { return startSeed(ctx, e, 1) }},
}

func startDirect(ctx context.Context, e *env) (*running, error) {
	url := fmt.Sprintf("http://%s", netip.AddrPortFrom(e.l.Backends[0].Addr, backendPort))
	return &running{url: url, stop: func() error { return nil }}, nil
}

func vipURL() string { return fmt.Sprintf("http://%s", vip) } // port 80

// --- nftlb ---

// extraVIP is the VIP of scenario 2's i-th extra pool (i >= 1):
// 198.18.128.0 + i, inside 198.18.128.0/17.
func extraVIP(i int) netip.Addr {
	if i < 1 || i >= 1<<15 {
		panic("extraVIP out of range")
	}
	return netip.AddrFrom4([4]byte{198, 18, byte(128 + i>>8), byte(i)})
}

// nftlbConfig is one pool "bench" on VIP:80 -> b1..b3:8080 with the default
// health check (tcp, every 2 s), plus pools-1 pools on other VIPs with
// health type none (scenario 2).
func nftlbConfig(l *lab.Lab, pools int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# written by bench/dataplane: %d pool(s)\npools:\n  - name: bench\n    vip: %s\n    port: %d\n    backends:\n", pools, vip, vipPort)
	for _, be := range l.Backends {
		fmt.Fprintf(&b, "      - %s\n", netip.AddrPortFrom(be.Addr, backendPort))
	}
	for i := 1; i < pools; i++ {
		fmt.Fprintf(&b, "  - name: x%05d\n    vip: %s\n    port: %d\n    health:\n      type: none\n    backends:\n", i, extraVIP(i), vipPort)
		for _, be := range l.Backends {
			fmt.Fprintf(&b, "      - %s\n", netip.AddrPortFrom(be.Addr, extraPort))
		}
	}
	return b.String()
}

func startNftlb(ctx context.Context, e *env, pools int) (_ *running, err error) {
	path := filepath.Join(e.dir, fmt.Sprintf("lb-%d.yaml", pools))
	if err := os.WriteFile(path, []byte(nftlbConfig(e.l, pools)), 0o644); err != nil {
		return nil, err
	}
	t0 := time.Now()
	d, err := benchkit.StartNftlb(e.l.LB, e.o.bin, path, nil)
	if err != nil {
		return nil, err
	}
	stop := func() error {
		for _, le := range d.Log.Since(0) {
			if le.Msg == "backend state changed" && le.Str("to") != "up" {
				benchkit.Progress("  nftlb: %s", le.Raw)
			}
		}
		d.Stop()
		// SIGTERM leaves the rules in the kernel; remove the table.
		cctx, cancel := cleanupCtx()
		defer cancel()
		_, err := e.l.LB.Run(cctx, e.o.bin, "cleanup")
		return err
	}
	defer func() {
		if err != nil {
			if serr := stop(); serr != nil {
				err = errors.Join(err, serr)
			}
		}
	}()
	applied, _, err := d.WaitFor(ctx, 0, 3*time.Minute, benchkit.Match("ruleset applied"))
	if err != nil {
		return nil, err
	}
	setup := time.Since(t0)
	if err := e.ready(ctx, vipURL(), d); err != nil {
		return nil, fmt.Errorf("nftlb: %w; its log:\n%s", err, benchkit.Tail(d.Log.String(), 20))
	}
	return &running{url: vipURL(), lb: d, stop: stop, setup: setup,
		note: fmt.Sprintf("first apply (netlink transaction) %v", applied.Dur("duration").Round(time.Millisecond))}, nil
}

// Scenario 2 watches the nftlb daemon's CPU, with no load, for daemonIdle
// from daemonSettle after its first apply, before it stops the daemon.
const (
	daemonSettle = 2 * time.Second
	daemonIdle   = 4 * time.Second
)

// startNftlbTable is scenario 2's nftlb: the daemon applies its table of
// pools pools, its CPU is measured for daemonIdle without load, and then
// (unless -scale-keep-daemon) it is stopped with SIGTERM, which leaves the
// table in the kernel: the loads then measure the table's dispatch alone,
// without the daemon's own CPU use (which grows with the number of pools,
// see README.md) competing for this 2-CPU machine.
func startNftlbTable(ctx context.Context, e *env, pools int) (*running, error) {
	r, err := startNftlb(ctx, e, pools)
	if err != nil {
		return nil, err
	}
	// Skip the first probe round's spread-out start, then measure.
	if err := benchkit.Sleep(ctx, daemonSettle); err != nil {
		return nil, errors.Join(err, r.stop())
	}
	c0, err := benchkit.ProcCPUTotal(r.lb.Pid())
	if err == nil {
		t0 := time.Now()
		if err = benchkit.Sleep(ctx, daemonIdle); err == nil {
			var c1 time.Duration
			if c1, err = benchkit.ProcCPUTotal(r.lb.Pid()); err == nil {
				r.idleCPU = 100 * float64(c1-c0) / float64(time.Since(t0))
			}
		}
	}
	if err != nil {
		return nil, errors.Join(err, r.stop())
	}
	if !e.o.keepDaemon {
		r.lb.Stop() // SIGTERM: the rules stay; r.stop removes them
		if r.lb.Err() != nil {
			return nil, errors.Join(fmt.Errorf("nftlb did not exit cleanly on SIGTERM: %w", r.lb.Err()), r.stop())
		}
		r.lb = nil
		r.note += "; daemon stopped before the loads, its table left in place"
	}
	return r, nil
}

// --- HAProxy ---

// haproxyConfig: maxconn 8000 is far above the 50 connections wrk keeps
// open, and HAProxy needs 2 × maxconn file descriptors, which must fit the
// hard RLIMIT_NOFILE it inherits (20,000 on this VM).
func haproxyConfig(l *lab.Lab) string {
	var b strings.Builder
	fmt.Fprintf(&b, `# written by bench/dataplane
global
    nbthread 2
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend vip
    bind %s:%d
    maxconn 8000
    default_backend pool
backend pool
    balance roundrobin
`, vip, vipPort)
	for _, be := range l.Backends {
		fmt.Fprintf(&b, "    server %s %s check inter 2s fall 3 rise 2\n", be.Name, netip.AddrPortFrom(be.Addr, backendPort))
	}
	return b.String()
}

func startHAProxy(ctx context.Context, e *env) (_ *running, err error) {
	path := filepath.Join(e.dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(haproxyConfig(e.l)), 0o644); err != nil {
		return nil, err
	}
	// HAProxy must own the VIP to bind it: on the LB's lo, for this
	// contender only.
	vipLo := vip.String() + "/32"
	if _, err := e.l.LB.Run(ctx, "ip", "addr", "add", vipLo, "dev", "lo"); err != nil {
		return nil, err
	}
	var hp *benchkit.Proc
	stop := func() error {
		if hp != nil {
			for _, le := range hp.Log.Since(0) {
				if strings.Contains(le.Raw, "DOWN") {
					benchkit.Progress("  haproxy: %s", le.Raw)
				}
			}
			hp.Stop()
		}
		cctx, cancel := cleanupCtx()
		defer cancel()
		_, err := e.l.LB.Run(cctx, "ip", "addr", "del", vipLo, "dev", "lo")
		return err
	}
	defer func() {
		if err != nil {
			if serr := stop(); serr != nil {
				err = errors.Join(err, serr)
			}
		}
	}()
	t0 := time.Now()
	// -db: foreground, no master process; the pid is HAProxy's only process.
	if hp, err = benchkit.Start(e.l.LB, benchkit.Spec{Name: "haproxy", Args: []string{"haproxy", "-db", "-f", path}}); err != nil {
		return nil, err
	}
	if err := e.ready(ctx, vipURL(), hp); err != nil {
		return nil, fmt.Errorf("haproxy: %w; its output:\n%s", err, benchkit.Tail(hp.Log.String(), 20))
	}
	return &running{url: vipURL(), lb: hp, stop: stop, setup: time.Since(t0)}, nil
}

// --- the seed's hand-written rule ---

func seedRule(addr netip.Addr, l *lab.Lab, port int) string {
	var m []string
	for i, be := range l.Backends {
		m = append(m, fmt.Sprintf("%d : %s . %d", i, be.Addr, port))
	}
	return fmt.Sprintf("\t\tip daddr %s tcp dport %d counter dnat ip to numgen inc mod %d map { %s }\n",
		addr, vipPort, len(l.Backends), strings.Join(m, ", "))
}

// seedRuleset is the seed's shape with rules rules in one prerouting
// chain: rules-1 rules for other VIPs first, the measured VIP's rule last
// (so each new connection to it walks the whole chain), and a blanket
// masquerade.
func seedRuleset(l *lab.Lab, rules int) string {
	var b strings.Builder
	b.WriteString("table ip nat {\n\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n")
	for i := 1; i < rules; i++ {
		b.WriteString(seedRule(extraVIP(i), l, extraPort))
	}
	b.WriteString(seedRule(vip, l, backendPort))
	b.WriteString("\t}\n\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tmasquerade\n\t}\n}\n")
	return b.String()
}

func startSeed(ctx context.Context, e *env, rules int) (_ *running, err error) {
	path := filepath.Join(e.dir, fmt.Sprintf("seed-%d.nft", rules))
	if err := os.WriteFile(path, []byte(seedRuleset(e.l, rules)), 0o644); err != nil {
		return nil, err
	}
	stop := func() error {
		cctx, cancel := cleanupCtx()
		defer cancel()
		_, err := e.l.LB.Run(cctx, "nft", "delete", "table", "ip", "nat")
		return err
	}
	t0 := time.Now()
	lctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if _, err := e.l.LB.Run(lctx, "nft", "-f", path); err != nil {
		// nft -f is one transaction: nothing to remove if it failed, but
		// a Ctrl-C may land after the commit.
		_ = stop()
		return nil, err
	}
	setup := time.Since(t0)
	defer func() {
		if err != nil {
			if serr := stop(); serr != nil {
				err = errors.Join(err, serr)
			}
		}
	}()
	if err := e.ready(ctx, vipURL(), nil); err != nil {
		return nil, err
	}
	return &running{url: vipURL(), stop: stop, setup: setup}, nil
}
