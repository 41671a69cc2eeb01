package flows

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"

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

// count returns Count(proto), failing the test on error.
func (e *env) count(proto string) map[netip.AddrPort]int {
	e.t.Helper()
	m, err := e.f.Count(proto)
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

// waitCount polls Count(proto) until it equals want or the deadline passes.
func (e *env) waitCount(proto string, want map[netip.AddrPort]int) {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		got := e.count(proto)
		if equalCounts(got, want) {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("Count(%q) = %v, want %v", proto, got, want)
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

// ioResult is how a client's blocked I/O ended.
type ioResult struct {
	at  time.Time
	err error
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
	res := make(chan ioResult, 1)
	if busy {
		echoed := make(chan struct{}, 100)
		go func() {
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for n := 0; ; n++ {
				msg := fmt.Sprintf("ping %d\n", n)
				if _, err := c.Write([]byte(msg)); err != nil {
					res <- ioResult{time.Now(), err}
					return
				}
				line, err := br.ReadString('\n')
				if err != nil {
					res <- ioResult{time.Now(), err}
					return
				}
				if line != msg {
					res <- ioResult{time.Now(), fmt.Errorf("echo %q, want %q", line, msg)}
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
		go func() {
			_, err := br.ReadByte()
			if err == nil {
				err = errors.New("idle connection received data")
			}
			res <- ioResult{time.Now(), err}
		}()
	}

	e.breakBackend(mode, i)
	e.apply(e.others(i)...)
	backend := bx.AddrPort(tcpBackPort)
	if n := e.count("tcp")[backend]; n != 1 {
		t.Fatalf("Count before Flush: %d entries for %s, want 1", n, backend)
	}

	start := time.Now()
	r, err := e.f.Flush(backend, "tcp", true)
	end := time.Now()
	if err != nil {
		t.Fatalf("Flush: %v", err)
	}
	t.Logf("Flush(%s) = %+v in %v", backend, r, end.Sub(start))
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

	r, err := e.f.Flush(backend, "tcp", false)
	if err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if r.Deleted < 1 || r.Nudged != 0 {
		t.Errorf("Flush(nudge=false) = %+v, want Deleted >= 1 and Nudged 0", r)
	}
	if n := e.count("tcp")[backend]; n != 0 {
		t.Errorf("Count after Flush: %d entries for %s, want 0", n, backend)
	}
	c.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
	_, err = br.ReadByte()
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("idle read after Flush without nudge: %v, want a timeout", err)
	}
	e.assertNewConnectionsAvoid(ctx, name)
}

// A UDP flow's entry is deleted by Flush(udp) and by nothing else.
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
	if _, err := c.Write([]byte("who\n")); err != nil {
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

	if got, want := e.count("udp"), map[netip.AddrPort]int{backend: 1}; !equalCounts(got, want) {
		t.Fatalf("Count(udp) = %v, want %v", got, want)
	}
	if got := e.count("tcp"); len(got) != 0 {
		t.Errorf("Count(tcp) = %v, want none", got)
	}
	// The protocol is part of the match.
	if r, err := e.f.Flush(backend, "tcp", true); err != nil || r != (Result{}) {
		t.Fatalf("Flush(%s, tcp) = %+v, %v; want nothing done", backend, r, err)
	}
	// So is the port.
	if r, err := e.f.Flush(bx.AddrPort(udpBackPort+1), "udp", true); err != nil || r != (Result{}) {
		t.Fatalf("Flush(other port, udp) = %+v, %v; want nothing done", r, err)
	}
	r, err := e.f.Flush(backend, "udp", true)
	if err != nil {
		t.Fatal(err)
	}
	if r != (Result{Deleted: 1}) {
		t.Errorf("Flush(%s, udp) = %+v, want Deleted 1, Nudged 0 (UDP is never nudged)", backend, r)
	}
	if got := e.count("udp"); len(got) != 0 {
		t.Errorf("Count(udp) after Flush = %v, want none", got)
	}
}

// Count reports the open connections per backend: DNATed ones only, and
// not those already closed.
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
	// The LB host's own connection to a backend (a health check, say) is
	// not DNATed and not counted.
	direct, err := e.l.LB.Dial(ctx, "tcp", e.l.Backend(3).AddrPort(tcpBackPort).String())
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	e.waitCount("tcp", want)
	if got := e.count("udp"); len(got) != 0 {
		t.Errorf("Count(udp) = %v, want none", got)
	}
}

func TestClosedAndBadArguments(t *testing.T) {
	e := newEnv(t, 1)
	if _, err := e.f.Flush(netip.MustParseAddrPort("198.18.1.11:80"), "sctp", false); err == nil {
		t.Error("Flush(sctp): no error")
	}
	if _, err := e.f.Flush(netip.MustParseAddrPort("[::1]:80"), "tcp", false); err == nil {
		t.Error("Flush(IPv6 backend): no error")
	}
	if _, err := e.f.Count("icmp"); err == nil {
		t.Error("Count(icmp): no error")
	}
	if err := e.f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.f.Flush(netip.MustParseAddrPort("198.18.1.11:80"), "tcp", true); !errors.Is(err, ErrClosed) {
		t.Errorf("Flush after Close: %v, want ErrClosed", err)
	}
	if _, err := e.f.Count("tcp"); !errors.Is(err, ErrClosed) {
		t.Errorf("Count after Close: %v, want ErrClosed", err)
	}
}
