package flows

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nftlb/nftlb/internal/lab"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

const (
	tcpVIPPort  = 80
	tcpBackPort = 8080
	udpVIPPort  = 53
	udpBackPort = 5353
	// resetBudget is how soon after Flush returns the client must see its
	// connection reset.
	resetBudget = time.Second
)

var (
	tcpVIP = lab.VIP(1)
	udpVIP = lab.VIP(2)
)

// TestMain checks that the tests left the root namespace alone: its
// ruleset is unchanged and its conntrack table gained no entry of the lab
// address range (every kernel change happens in lab namespaces).
func TestMain(m *testing.M) {
	before, beforeErr := rootState()
	code := m.Run()
	if beforeErr == nil {
		after, err := rootState()
		switch {
		case err != nil:
			fmt.Fprintf(os.Stderr, "root namespace check: %v\n", err)
			code = 1
		case after.ruleset != before.ruleset:
			fmt.Fprintf(os.Stderr, "root namespace ruleset changed during the tests:\n--- before\n%s\n--- after\n%s\n", before.ruleset, after.ruleset)
			code = 1
		case after.labEntries > before.labEntries:
			fmt.Fprintf(os.Stderr, "root namespace conntrack gained entries in 198.18.0.0/15: %d -> %d\n", before.labEntries, after.labEntries)
			code = 1
		}
	}
	os.Exit(code)
}

type rootSnapshot struct {
	ruleset    string
	labEntries int // conntrack entries mentioning 198.18.0.0/15
}

// rootState reads (never writes) the root namespace: TestMain's thread and
// the processes it starts are in it, as lab.NS.Do restores or discards
// every thread it switches.
func rootState() (rootSnapshot, error) {
	if os.Geteuid() != 0 {
		return rootSnapshot{}, errors.New("not root")
	}
	rs, err := exec.Command("nft", "list", "ruleset").Output()
	if err != nil {
		return rootSnapshot{}, fmt.Errorf("nft list ruleset: %w", err)
	}
	ct, err := exec.Command("conntrack", "-L", "-f", "ipv4").Output()
	if err != nil {
		return rootSnapshot{}, fmt.Errorf("conntrack -L: %w", err)
	}
	n := 0
	for line := range strings.Lines(string(ct)) {
		if strings.Contains(line, "=198.18.") || strings.Contains(line, "=198.19.") {
			n++
		}
	}
	return rootSnapshot{ruleset: string(rs), labEntries: n}, nil
}

// env is a lab with who servers on every backend, nftlb's table in the LB
// namespace and a Flows opened there.
type env struct {
	t   *testing.T
	l   *lab.Lab
	a   *ruleset.Applier
	f   *Flows
	tcp []*lab.Server // per backend, in order
	udp []*lab.Server
}

func newEnv(t *testing.T, backends int) *env {
	t.Helper()
	l := lab.NewT(t, lab.Options{Backends: backends})
	e := &env{t: t, l: l}
	for _, b := range l.Backends {
		s, err := b.ServeTCP(tcpBackPort)
		if err != nil {
			t.Fatal(err)
		}
		u, err := b.ServeUDP(udpBackPort)
		if err != nil {
			t.Fatal(err)
		}
		e.tcp, e.udp = append(e.tcp, s), append(e.udp, u)
	}

	// The applier's netlink socket is made with the namespace fd, which
	// must outlive it (see ruleset's kernel tests): cleanups run in reverse.
	fd, err := netns.GetFromPath(l.LB.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fd.Close() })
	e.a = ruleset.NewApplier(nftables.WithNetNSFd(int(fd)))
	t.Cleanup(func() { e.a.Close() })

	err = l.LB.Do(func() error {
		var err error
		e.f, err = New()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.f.Close(); err != nil {
			t.Errorf("Flows.Close: %v", err)
		}
	})
	if !e.f.LooseTracking() {
		t.Fatal("nf_conntrack_tcp_loose is off in the LB namespace; nudges cannot work")
	}
	t.Cleanup(func() {
		if t.Failed() {
			e.dump()
		}
	})
	return e
}

// dump logs the LB's conntrack table and ruleset, to diagnose a failure.
func (e *env) dump() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ct, err := e.l.LB.Run(ctx, "conntrack", "-L")
	e.t.Logf("LB conntrack -L (err %v):\n%s", err, ct)
	rs, err := e.l.LB.Run(ctx, "nft", "list", "ruleset")
	e.t.Logf("LB nft list ruleset (err %v):\n%s", err, rs)
}

// apply programs a TCP pool on tcpVIP and a UDP pool on udpVIP, both
// round-robin over the given backends (1-based).
func (e *env) apply(backends ...int) {
	e.t.Helper()
	var tb, ub []vip.Backend
	for _, i := range backends {
		tb = append(tb, vip.Backend{Addr: e.l.Backend(i).AddrPort(tcpBackPort), Weight: 1})
		ub = append(ub, vip.Backend{Addr: e.l.Backend(i).AddrPort(udpBackPort), Weight: 1})
	}
	spec := ruleset.Spec{Table: "nftlb", Masquerade: true, Pools: []ruleset.PoolSpec{
		{Name: "web", VIP: tcpVIP, Port: tcpVIPPort, Protocol: vip.TCP, Scheduler: vip.RoundRobin, Backends: tb},
		{Name: "dns", VIP: udpVIP, Port: udpVIPPort, Protocol: vip.UDP, Scheduler: vip.RoundRobin, Backends: ub},
	}}
	if _, err := e.a.Apply(ruleset.Build(spec)); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) backend(name string) (int, *lab.Backend) {
	e.t.Helper()
	for i, b := range e.l.Backends {
		if b.Name == name {
			return i + 1, b
		}
	}
	e.t.Fatalf("no backend %q", name)
	return 0, nil
}

// others returns the 1-based indexes of every backend but i.
func (e *env) others(i int) []int {
	var out []int
	for j := 1; j <= len(e.l.Backends); j++ {
		if j != i {
			out = append(out, j)
		}
	}
	return out
}

// connect opens a TCP connection from the client to the VIP and reads the
// greeting; it returns the connection, its reader and the backend's name.
func (e *env) connect(ctx context.Context) (net.Conn, *bufio.Reader, string) {
	e.t.Helper()
	c, err := e.l.Client.Dial(ctx, "tcp", netip.AddrPortFrom(tcpVIP, tcpVIPPort).String())
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		e.t.Fatalf("read greeting: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	f := strings.Fields(line)
	if len(f) != 2 {
		e.t.Fatalf("greeting %q", line)
	}
	return c, br, f[0]
}

// count returns Count(0) (a fresh dump), failing the test on error.
func (e *env) count() map[netip.AddrPort]int {
	e.t.Helper()
	m, err := e.f.Count(0)
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

// waitCount polls Count(0) until it equals want or the deadline passes.
func (e *env) waitCount(want map[netip.AddrPort]int) {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		got := e.count()
		if equalCounts(got, want) {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("Count = %v, want %v", got, want)
		}
		<-tick.C
	}
}

func equalCounts(a, b map[netip.AddrPort]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// tcpPool is a round-robin TCP pool on vip:tcpVIPPort over the given
// backends (1-based) on tcpBackPort.
func (e *env) tcpPool(name string, vipAddr netip.Addr, backends ...int) ruleset.PoolSpec {
	var bs []vip.Backend
	for _, i := range backends {
		bs = append(bs, vip.Backend{Addr: e.l.Backend(i).AddrPort(tcpBackPort), Weight: 1})
	}
	return ruleset.PoolSpec{Name: name, VIP: vipAddr, Port: tcpVIPPort, Protocol: vip.TCP, Scheduler: vip.RoundRobin, Backends: bs}
}

// applyPools programs nftlb's table with exactly the given pools.
func (e *env) applyPools(pools ...ruleset.PoolSpec) {
	e.t.Helper()
	if _, err := e.a.Apply(ruleset.Build(ruleset.Spec{Table: "nftlb", Masquerade: true, Pools: pools})); err != nil {
		e.t.Fatal(err)
	}
}

// dial opens a TCP connection from the client to addr and reads the
// greeting; it returns the connection, its reader and the backend's index.
func (e *env) dial(ctx context.Context, addr netip.AddrPort) (net.Conn, *bufio.Reader, int) {
	e.t.Helper()
	c, err := e.l.Client.Dial(ctx, "tcp", addr.String())
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		e.t.Fatalf("read greeting via %s: %v", addr, err)
	}
	c.SetReadDeadline(time.Time{})
	f := strings.Fields(line)
	if len(f) != 2 {
		e.t.Fatalf("greeting %q", line)
	}
	i, _ := e.backend(f[0])
	return c, br, i
}

// echo checks that the connection still works: a line comes back.
func (e *env) echo(c net.Conn, br *bufio.Reader) {
	e.t.Helper()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, "still there?\n"); err != nil {
		e.t.Fatalf("connection via %s broken: %v", c.RemoteAddr(), err)
	}
	if line, err := br.ReadString('\n'); err != nil || line != "still there?\n" {
		e.t.Fatalf("connection via %s broken: echo %q, %v", c.RemoteAddr(), line, err)
	}
}

// entry returns the LB's conntrack entry of the client's connection c (by
// its original tuple), nil if there is none.
func (e *env) entry(c net.Conn) *netlink.ConntrackFlow {
	e.t.Helper()
	src := netip.MustParseAddrPort(c.LocalAddr().String())
	dst := netip.MustParseAddrPort(c.RemoteAddr().String())
	e.f.mu.Lock()
	list, err := e.f.h.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
	e.f.mu.Unlock()
	if err != nil {
		e.t.Fatalf("list conntrack: %v", err)
	}
	for _, fl := range list {
		s, _ := addrPort(fl.Forward.SrcIP, fl.Forward.SrcPort)
		d, _ := addrPort(fl.Forward.DstIP, fl.Forward.DstPort)
		if fl.Forward.Protocol == protoTCP && s == src && d == dst {
			return fl
		}
	}
	return nil
}

// flush runs Flush(targets), failing the test on error, and checks that
// the result's totals are the sums of its per-target counts.
func (e *env) flush(targets ...Target) (Result, time.Time, time.Time) {
	e.t.Helper()
	start := time.Now()
	r, err := e.f.Flush(targets)
	end := time.Now()
	if err != nil {
		e.t.Fatalf("Flush(%v): %v", targets, err)
	}
	e.t.Logf("Flush(%v) = %+v in %v", targets, r, end.Sub(start))
	var sum TargetResult
	for _, tr := range r.PerTarget {
		sum.Deleted += tr.Deleted
		sum.Nudged += tr.Nudged
	}
	if len(r.PerTarget) != len(targets) || sum != (TargetResult{r.Deleted, r.Nudged}) {
		e.t.Errorf("Flush = %+v: per-target counts do not add up to the totals", r)
	}
	return r, start, end
}

// ioResult is how a client's blocked I/O ended.
type ioResult struct {
	at  time.Time
	err error
}

// watchIdle reads from an idle connection in the background and reports
// how the read ended.
func watchIdle(br *bufio.Reader) <-chan ioResult {
	res := make(chan ioResult, 1)
	go func() {
		_, err := br.ReadByte()
		if err == nil {
			err = errors.New("idle connection received data")
		}
		res <- ioResult{time.Now(), err}
	}()
	return res
}

// waitReset waits until res delivers, at the latest resetBudget after
// flushEnd, and checks the connection was reset by the nudge's doing, not
// earlier.
func waitReset(t *testing.T, res <-chan ioResult, flushStart, flushEnd time.Time) {
	t.Helper()
	timer := time.NewTimer(time.Until(flushEnd.Add(resetBudget)))
	defer timer.Stop()
	select {
	case r := <-res:
		if r.at.Before(flushStart) {
			t.Fatalf("connection failed before Flush (%v before it): %v", flushStart.Sub(r.at), r.err)
		}
		if !errors.Is(r.err, syscall.ECONNRESET) {
			t.Fatalf("connection ended with %v, want connection reset", r.err)
		}
		t.Logf("client reset %v after Flush returned (%v after it started; Flush took %v)",
			r.at.Sub(flushEnd), r.at.Sub(flushStart), flushEnd.Sub(flushStart))
	case <-timer.C:
		t.Fatalf("client connection not reset within %v of Flush", resetBudget)
	}
}

// breakBackend makes backend b unreachable the way mode says.
func (e *env) breakBackend(mode string, i int) {
	e.t.Helper()
	switch mode {
	case "link-down":
		if err := e.l.Backend(i).SetLink(false); err != nil {
			e.t.Fatal(err)
		}
	case "hung":
		e.tcp[i-1].SetHung(true)
	default:
		e.t.Fatalf("mode %q", mode)
	}
}

// assertNewConnectionsAvoid checks that new connections to the VIP work and
// land on other backends than name.
func (e *env) assertNewConnectionsAvoid(ctx context.Context, name string) {
	e.t.Helper()
	for range 2 * len(e.l.Backends) {
		ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		got, _, err := e.l.Who(ctx, e.l.Client, netip.AddrPortFrom(tcpVIP, tcpVIPPort).String())
		cancel()
		if err != nil {
			e.t.Fatalf("new connection after Flush: %v", err)
		}
		if got == name {
			e.t.Fatalf("new connection after Flush went to the dead backend %s", name)
		}
	}
}

var modes = []string{"link-down", "hung"}

// An idle client of a dead backend is reset within a second of Flush.
func TestFlushResetsIdleClient(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) { testFlushResets(t, mode, false) })
	}
}

// A client that keeps writing (and waiting for echoes) is reset too.
func TestFlushResetsBusyClient(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) { testFlushResets(t, mode, true) })
	}
}

func testFlushResets(t *testing.T, mode string, busy bool) {
	e := newEnv(t, 3)
	e.apply(1, 2, 3)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	c, br, name := e.connect(ctx)
	i, bx := e.backend(name)
	c.SetDeadline(time.Now().Add(20 * time.Second)) // a bound for the goroutine below, far beyond the assertions
	var res <-chan ioResult
	if busy {
		busyRes := make(chan ioResult, 1)
		res = busyRes
		echoed := make(chan struct{}, 100)
		go func() {
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for n := 0; ; n++ {
				msg := fmt.Sprintf("ping %d\n", n)
				if _, err := c.Write([]byte(msg)); err != nil {
					busyRes <- ioResult{time.Now(), err}
					return
				}
				line, err := br.ReadString('\n')
				if err != nil {
					busyRes <- ioResult{time.Now(), err}
					return
				}
				if line != msg {
					busyRes <- ioResult{time.Now(), fmt.Errorf("echo %q, want %q", line, msg)}
					return
				}
				select {
				case echoed <- struct{}{}:
				default:
				}
				<-tick.C
			}
		}()
		for range 3 {
			select {
			case <-echoed:
			case r := <-res:
				t.Fatalf("busy client failed before the backend broke: %v", r.err)
			}
		}
	} else {
		res = watchIdle(br)
	}

	e.breakBackend(mode, i)
	e.apply(e.others(i)...)
	backend := bx.AddrPort(tcpBackPort)
	if n := e.count()[backend]; n != 1 {
		t.Fatalf("Count before Flush: %d entries for %s, want 1", n, backend)
	}

	r, start, end := e.flush(Target{VIP: netip.AddrPortFrom(tcpVIP, tcpVIPPort), Backend: backend, Proto: "tcp", Nudge: true})
	// One client: Nudged counts it once, though it was sent two ACKs.
	if r.Deleted < 1 || r.Nudged != 1 {
		t.Errorf("Flush = %+v, want Deleted >= 1 and Nudged 1", r)
	}
	waitReset(t, res, start, end)
	e.assertNewConnectionsAvoid(ctx, name)
}

// Without the nudge the entry goes but an idle client notices nothing: the
// nudge is what resets it.
func TestFlushWithoutNudgeLeavesIdleClientHanging(t *testing.T) {
	e := newEnv(t, 3)
	e.apply(1, 2, 3)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	c, br, name := e.connect(ctx)
	i, bx := e.backend(name)
	e.breakBackend("link-down", i)
	e.apply(e.others(i)...)
	backend := bx.AddrPort(tcpBackPort)

	r, _, _ := e.flush(Target{VIP: netip.AddrPortFrom(tcpVIP, tcpVIPPort), Backend: backend, Proto: "tcp"})
	if r.Deleted < 1 || r.Nudged != 0 {
		t.Errorf("Flush(nudge=false) = %+v, want Deleted >= 1 and Nudged 0", r)
	}
	if n := e.count()[backend]; n != 0 {
		t.Errorf("Count after Flush: %d entries for %s, want 0", n, backend)
	}
	c.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
	_, err := br.ReadByte()
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("idle read after Flush without nudge: %v, want a timeout", err)
	}
	e.assertNewConnectionsAvoid(ctx, name)
}

// A UDP flow's entry is deleted by its own target and by nothing else.
func TestFlushUDP(t *testing.T) {
	e := newEnv(t, 3)
	e.apply(1, 2, 3)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	c, err := e.l.Client.Dial(ctx, "udp", netip.AddrPortFrom(udpVIP, udpVIPPort).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(buf[:n]))
	if len(f) != 2 {
		t.Fatalf("reply %q", buf[:n])
	}
	_, bx := e.backend(f[0])
	backend := bx.AddrPort(udpBackPort)
	vipPort := netip.AddrPortFrom(udpVIP, udpVIPPort)

	if got, want := e.count(), map[netip.AddrPort]int{backend: 1}; !equalCounts(got, want) {
		t.Fatalf("Count = %v, want %v", got, want)
	}
	// The protocol, the backend's port and the VIP are part of the match.
	for _, tg := range []Target{
		{VIP: vipPort, Backend: backend, Proto: "tcp", Nudge: true},
		{VIP: vipPort, Backend: bx.AddrPort(udpBackPort + 1), Proto: "udp", Nudge: true},
		{VIP: netip.AddrPortFrom(tcpVIP, udpVIPPort), Backend: backend, Proto: "udp", Nudge: true},
		{VIP: netip.AddrPortFrom(udpVIP, udpVIPPort+1), Backend: backend, Proto: "udp", Nudge: true},
	} {
		if r, _, _ := e.flush(tg); r.Deleted != 0 || r.Nudged != 0 {
			t.Fatalf("Flush(%+v) = %+v; want nothing done", tg, r)
		}
	}
	r, _, _ := e.flush(Target{VIP: vipPort, Backend: backend, Proto: "udp", Nudge: true})
	if r.Deleted != 1 || r.Nudged != 0 {
		t.Errorf("Flush(udp) = %+v, want Deleted 1, Nudged 0 (UDP is never nudged)", r)
	}
	if got := e.count(); len(got) != 0 {
		t.Errorf("Count after Flush = %v, want none", got)
	}
}

// Count reports the open connections per backend, TCP and UDP: nftlb's
// ones only, and not those already closed.
func TestCount(t *testing.T) {
	e := newEnv(t, 3)
	e.apply(1, 2)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	// A connection opened and closed again: TIME_WAIT, not counted.
	if _, _, err := e.l.Who(ctx, e.l.Client, netip.AddrPortFrom(tcpVIP, tcpVIPPort).String()); err != nil {
		t.Fatal(err)
	}
	want := map[netip.AddrPort]int{}
	for range 3 {
		_, _, name := e.connect(ctx)
		_, b := e.backend(name)
		want[b.AddrPort(tcpBackPort)]++
	}
	// Round-robin over two backends: 2 and 1.
	if len(want) != 2 {
		t.Fatalf("3 connections went to %v, want both backends", want)
	}
	// A UDP exchange: its entry lives on (conntrack's UDP timeout).
	name, _, err := e.l.WhoUDP(ctx, e.l.Client, netip.AddrPortFrom(udpVIP, udpVIPPort).String())
	if err != nil {
		t.Fatal(err)
	}
	_, b := e.backend(name)
	want[b.AddrPort(udpBackPort)]++
	// The LB host's own connection to a backend (a health check, say) is
	// not DNATed and not counted.
	direct, err := e.l.LB.Dial(ctx, "tcp", e.l.Backend(3).AddrPort(tcpBackPort).String())
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	e.waitCount(want)
}

// (a) A backend in two pools, taken out of one: Flush of that pool's
// target leaves the connection through the other pool's VIP alone.
func TestFlushSharedBackend(t *testing.T) {
	e := newEnv(t, 2)
	vip1, vip2 := netip.AddrPortFrom(tcpVIP, tcpVIPPort), netip.AddrPortFrom(lab.VIP(3), tcpVIPPort)
	e.applyPools(e.tcpPool("web", vip1.Addr(), 1), e.tcpPool("web2", vip2.Addr(), 1))
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	_, br1, i1 := e.dial(ctx, vip1)
	c2, br2, i2 := e.dial(ctx, vip2)
	if i1 != 1 || i2 != 1 {
		t.Fatalf("connections went to backends %d and %d, want 1 and 1", i1, i2)
	}
	backend := e.l.Backend(1).AddrPort(tcpBackPort)
	e.waitCount(map[netip.AddrPort]int{backend: 2})
	res1 := watchIdle(br1)
	before := e.entry(c2)
	if before == nil {
		t.Fatal("no conntrack entry for the connection through VIP2")
	}

	// Pool web finds backend 1 down; web2 still uses it.
	e.applyPools(e.tcpPool("web", vip1.Addr(), 2), e.tcpPool("web2", vip2.Addr(), 1))
	r, start, end := e.flush(Target{VIP: vip1, Backend: backend, Proto: "tcp", Nudge: true})
	if r.Deleted != 1 || r.Nudged != 1 {
		t.Errorf("Flush = %+v, want Deleted 1 and Nudged 1 (the VIP1 client only)", r)
	}
	waitReset(t, res1, start, end)

	if after := e.entry(c2); after == nil {
		t.Error("the conntrack entry of the connection through VIP2 was deleted")
	} else if rs, _ := replySource(after); rs != backend {
		t.Errorf("the connection through VIP2 now answers from %s, want %s", rs, backend)
	}
	e.echo(c2, br2)
	if got, want := e.count(), (map[netip.AddrPort]int{backend: 1}); !equalCounts(got, want) {
		t.Errorf("Count after Flush = %v, want %v", got, want)
	}
}

// (b) A flow that another NAT rule (kube-proxy, Docker, here a plain nft
// table) DNATs to the backend, without nftlb's ct mark, is neither counted
// nor flushed.
func TestUnmarkedFlowIgnored(t *testing.T) {
	e := newEnv(t, 2)
	vip1 := netip.AddrPortFrom(tcpVIP, tcpVIPPort)
	e.applyPools(e.tcpPool("web", vip1.Addr(), 1))
	backend := e.l.Backend(1).AddrPort(tcpBackPort)
	other := netip.AddrPortFrom(lab.VIP(9), 6443)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	nft := e.l.LB.Command(ctx, "nft", "-f", "-")
	nft.Stdin = strings.NewReader(fmt.Sprintf(
		"table ip other {\n\tchain pre {\n\t\ttype nat hook prerouting priority -110;\n\t\tip daddr %s tcp dport %d dnat to %s\n\t}\n}\n",
		other.Addr(), other.Port(), backend))
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v: %s", err, out)
	}

	c1, _, i1 := e.dial(ctx, vip1)
	c2, br2, i2 := e.dial(ctx, other)
	if i1 != 1 || i2 != 1 {
		t.Fatalf("connections went to backends %d and %d, want 1 and 1", i1, i2)
	}
	// The setup is what the test means: the same backend, one flow marked,
	// the other not.
	fl1, fl2 := e.entry(c1), e.entry(c2)
	if fl1 == nil || fl2 == nil {
		t.Fatalf("conntrack entries: %v, %v", fl1, fl2)
	}
	rs1, _ := replySource(fl1)
	rs2, _ := replySource(fl2)
	if rs1 != backend || rs2 != backend || fl1.Mark&ruleset.ConnMark == 0 || fl2.Mark&ruleset.ConnMark != 0 {
		t.Fatalf("entries: %v (mark %#x), %v (mark %#x); want both from %s, the first marked",
			fl1, fl1.Mark, fl2, fl2.Mark, backend)
	}

	if got, want := e.count(), (map[netip.AddrPort]int{backend: 1}); !equalCounts(got, want) {
		t.Errorf("Count = %v, want %v (nftlb's connection only)", got, want)
	}
	// A target naming the other rule's address matches nothing: the flow
	// is not nftlb's.
	if r, _, _ := e.flush(Target{VIP: other, Backend: backend, Proto: "tcp", Nudge: true}); r.Deleted != 0 || r.Nudged != 0 {
		t.Errorf("Flush(other rule's target) = %+v, want nothing done", r)
	}
	if r, _, _ := e.flush(Target{VIP: vip1, Backend: backend, Proto: "tcp"}); r.Deleted != 1 {
		t.Errorf("Flush(nftlb's target) = %+v, want Deleted 1", r)
	}
	if e.entry(c1) != nil {
		t.Error("nftlb's entry survived its Flush")
	}
	if e.entry(c2) == nil {
		t.Error("the other rule's entry was deleted")
	}
	e.echo(c2, br2)
	if got := e.count(); len(got) != 0 {
		t.Errorf("Count after Flush = %v, want none", got)
	}
}

// (c) One Flush with two targets deletes and nudges both backends'
// clients, in one conntrack dump.
func TestFlushTwoTargets(t *testing.T) {
	e := newEnv(t, 3)
	e.apply(1, 2, 3)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	vip1 := netip.AddrPortFrom(tcpVIP, tcpVIPPort)

	// Round-robin: consecutive connections go to different backends.
	_, br1, i1 := e.dial(ctx, vip1)
	_, br2, i2 := e.dial(ctx, vip1)
	if i1 == i2 {
		t.Fatalf("both connections went to backend %d", i1)
	}
	res1, res2 := watchIdle(br1), watchIdle(br2)
	rest := 6 - i1 - i2
	e.breakBackend("hung", i1)
	e.breakBackend("link-down", i2)
	e.apply(rest)

	targets := []Target{
		{VIP: vip1, Backend: e.l.Backend(i1).AddrPort(tcpBackPort), Proto: "tcp", Nudge: true},
		{VIP: netip.AddrPortFrom(udpVIP, udpVIPPort), Backend: e.l.Backend(i1).AddrPort(udpBackPort), Proto: "udp"}, // no flow
		{VIP: vip1, Backend: e.l.Backend(i2).AddrPort(tcpBackPort), Proto: "tcp", Nudge: true},
	}
	dumps := e.f.dumps.Load()
	r, start, end := e.flush(targets...)
	if n := e.f.dumps.Load() - dumps; n != 1 {
		t.Errorf("Flush of %d targets dumped conntrack %d times, want 1", len(targets), n)
	}
	want := []TargetResult{{1, 1}, {0, 0}, {1, 1}}
	if r.Deleted != 2 || r.Nudged != 2 || !slices.Equal(r.PerTarget, want) {
		t.Errorf("Flush = %+v, want Deleted 2, Nudged 2, PerTarget %v", r, want)
	}
	waitReset(t, res1, start, end)
	waitReset(t, res2, start, end)
	if got := e.count(); len(got) != 0 {
		t.Errorf("Count after Flush = %v, want none", got)
	}
}

// fakeClock is a clock that moves only when told to.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// (d) Count caches a dump for maxAge; a Flush that deleted something
// drops the cache.
func TestCountCache(t *testing.T) {
	e := newEnv(t, 2)
	clock := &fakeClock{t: time.Now()}
	e.f.now = clock.Now
	e.apply(1, 2)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	vip1 := netip.AddrPortFrom(tcpVIP, tcpVIPPort)
	const maxAge = 10 * time.Second

	count := func(wantDumps int64) map[netip.AddrPort]int {
		t.Helper()
		before := e.f.dumps.Load()
		m, err := e.f.Count(maxAge)
		if err != nil {
			t.Fatal(err)
		}
		if n := e.f.dumps.Load() - before; n != wantDumps {
			t.Fatalf("Count dumped %d times, want %d", n, wantDumps)
		}
		return m
	}

	_, _, i1 := e.dial(ctx, vip1)
	b1 := e.l.Backend(i1).AddrPort(tcpBackPort)
	first := count(1)
	if want := (map[netip.AddrPort]int{b1: 1}); !equalCounts(first, want) {
		t.Fatalf("Count = %v, want %v", first, want)
	}
	first[b1] = 99 // the caller's copy: the cache is not changed

	// A second connection; within maxAge Count still says what it said.
	_, _, i2 := e.dial(ctx, vip1)
	b2 := e.l.Backend(i2).AddrPort(tcpBackPort)
	clock.Advance(maxAge - time.Nanosecond)
	if got, want := count(0), (map[netip.AddrPort]int{b1: 1}); !equalCounts(got, want) {
		t.Fatalf("cached Count = %v, want %v", got, want)
	}
	// maxAge after the dump, a new one.
	clock.Advance(time.Nanosecond)
	fresh := map[netip.AddrPort]int{b1: 1}
	fresh[b2]++
	if got := count(1); !equalCounts(got, fresh) {
		t.Fatalf("Count after maxAge = %v, want %v", got, fresh)
	}
	if got := count(0); !equalCounts(got, fresh) {
		t.Fatalf("cached Count = %v, want %v", got, fresh)
	}
	// maxAge 0 always dumps.
	if _, err := e.f.Count(0); err != nil {
		t.Fatal(err)
	}
	if got := count(0); !equalCounts(got, fresh) {
		t.Fatalf("cached Count = %v, want %v", got, fresh)
	}

	// A Flush that deletes nothing keeps the cache; one that deletes
	// drops it.
	if r, _, _ := e.flush(Target{VIP: vip1, Backend: e.l.Backend(1).AddrPort(9), Proto: "tcp"}); r.Deleted != 0 {
		t.Fatalf("Flush = %+v, want nothing deleted", r)
	}
	count(0)
	if r, _, _ := e.flush(Target{VIP: vip1, Backend: b1, Proto: "tcp"}); r.Deleted != 1 {
		t.Fatalf("Flush = %+v, want Deleted 1", r)
	}
	want := maps.Clone(fresh)
	if want[b1]--; want[b1] == 0 {
		delete(want, b1)
	}
	if got := count(1); !equalCounts(got, want) {
		t.Fatalf("Count after Flush = %v, want %v", got, want)
	}
}

// Callers that arrive while a Count dump runs wait for it and share its
// result: one dump for all.
func TestCountSharesDump(t *testing.T) {
	e := newEnv(t, 2)
	e.apply(1, 2)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	_, _, i := e.dial(ctx, netip.AddrPortFrom(tcpVIP, tcpVIPPort))
	want := map[netip.AddrPort]int{e.l.Backend(i).AddrPort(tcpBackPort): 1}

	const followers = 8
	entered, release := make(chan struct{}), make(chan struct{})
	waiting := make(chan struct{}, followers)
	e.f.testHook = func(ev string) {
		switch ev {
		case "dump":
			entered <- struct{}{}
			<-release
		case "wait":
			waiting <- struct{}{}
		}
	}
	type result struct {
		m   map[netip.AddrPort]int
		err error
	}
	results := make(chan result, followers+1)
	count := func() {
		m, err := e.f.Count(0) // maxAge 0: no cache, only sharing
		results <- result{m, err}
	}
	dumps := e.f.dumps.Load()
	go count()
	select {
	case <-entered:
	case <-ctx.Done():
		t.Fatal("the first Count did not start a dump")
	}
	for range followers {
		go count()
	}
	for range followers {
		select {
		case <-waiting:
		case <-ctx.Done():
			t.Fatal("followers did not wait for the running dump")
		}
	}
	close(release)
	var got []map[netip.AddrPort]int
	for range followers + 1 {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		if !equalCounts(r.m, want) {
			t.Errorf("Count = %v, want %v", r.m, want)
		}
		got = append(got, r.m)
	}
	if n := e.f.dumps.Load() - dumps; n != 1 {
		t.Errorf("%d concurrent Counts dumped %d times, want 1", followers+1, n)
	}
	// Each caller has its own map.
	got[0][netip.AddrPort{}] = 1
	for _, m := range got[1:] {
		if len(m) != len(want) {
			t.Fatalf("callers share one map: %v", m)
		}
	}
}

func TestClosedAndBadArguments(t *testing.T) {
	e := newEnv(t, 1)
	vip1 := netip.AddrPortFrom(tcpVIP, tcpVIPPort)
	good := Target{VIP: vip1, Backend: netip.MustParseAddrPort("198.18.1.11:80"), Proto: "tcp"}
	dumps := e.f.dumps.Load()
	for _, tg := range []Target{
		{VIP: vip1, Backend: good.Backend, Proto: "sctp"},
		{VIP: vip1, Backend: netip.MustParseAddrPort("[::1]:80"), Proto: "tcp"},
		{VIP: netip.MustParseAddrPort("[2001:db8::1]:80"), Backend: good.Backend, Proto: "tcp"},
		{VIP: vip1, Proto: "tcp"},
	} {
		if r, err := e.f.Flush([]Target{tg}); err == nil || r.Deleted != 0 || len(r.PerTarget) != 1 {
			t.Errorf("Flush(%+v) = %+v, %v; want an error", tg, r, err)
		}
	}
	if r, err := e.f.Flush(nil); err != nil || r.Deleted != 0 {
		t.Errorf("Flush(nil) = %+v, %v", r, err)
	}
	if n := e.f.dumps.Load() - dumps; n != 0 {
		t.Errorf("Flush without a valid target dumped %d times", n)
	}
	// An invalid target does not stop the valid ones.
	r, err := e.f.Flush([]Target{{VIP: vip1, Backend: good.Backend, Proto: "icmp"}, good})
	if err == nil || !strings.Contains(err.Error(), "target 0") || len(r.PerTarget) != 2 {
		t.Errorf("Flush(bad, good) = %+v, %v; want an error about target 0", r, err)
	}
	if n := e.f.dumps.Load() - dumps; n != 1 {
		t.Errorf("Flush(bad, good) dumped %d times, want 1", n)
	}

	if _, err := e.f.Count(time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := e.f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.f.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := e.f.Flush([]Target{good}); !errors.Is(err, ErrClosed) {
		t.Errorf("Flush after Close: %v, want ErrClosed", err)
	}
	if _, err := e.f.Count(time.Hour); !errors.Is(err, ErrClosed) {
		t.Errorf("Count (cached) after Close: %v, want ErrClosed", err)
	}
	if _, err := e.f.Count(0); !errors.Is(err, ErrClosed) {
		t.Errorf("Count after Close: %v, want ErrClosed", err)
	}
}
