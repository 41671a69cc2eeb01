package flows

import (
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"

	"github.com/nftlb/nftlb/internal/ruleset"
)

// kubeMark is a ct mark bit of someone else (kube-proxy's masquerade bit).
const kubeMark = 0x4000

// flow builds a conntrack entry client -> dst, answered by replySrc (to
// the masquerade address 198.18.1.1), with ct mark mark.
func flow(proto uint8, client, dst, replySrc string, state uint8, mark uint32) *netlink.ConntrackFlow {
	c, d, r := netip.MustParseAddrPort(client), netip.MustParseAddrPort(dst), netip.MustParseAddrPort(replySrc)
	fl := &netlink.ConntrackFlow{
		FamilyType: 2,
		Forward: netlink.IPTuple{Protocol: proto, SrcIP: net.IP(c.Addr().AsSlice()), SrcPort: c.Port(),
			DstIP: net.IP(d.Addr().AsSlice()), DstPort: d.Port()},
		Reverse: netlink.IPTuple{Protocol: proto, SrcIP: net.IP(r.Addr().AsSlice()), SrcPort: r.Port(),
			DstIP: net.ParseIP("198.18.1.1").To4(), DstPort: c.Port()},
		Mark: mark,
	}
	if proto == protoTCP {
		fl.ProtoInfo = &netlink.ProtoInfoTCP{State: state}
	}
	return fl
}

const (
	vipA     = "198.18.100.1:80"
	vipB     = "198.18.100.3:80"
	backend  = "198.18.1.11:8080"
	backend2 = "198.18.1.12:8080"
	client   = "198.18.0.2:40000"
	client2  = "198.18.0.2:40001"
	estab    = nl.TCP_CONNTRACK_ESTABLISHED
	timeWait = nl.TCP_CONNTRACK_TIME_WAIT
	ourMark  = ruleset.ConnMark
)

func target(vip, backend, proto string, nudge bool) Target {
	return Target{VIP: netip.MustParseAddrPort(vip), Backend: netip.MustParseAddrPort(backend), Proto: proto, Nudge: nudge}
}

func mustMatcher(t *testing.T, targets ...Target) *flushMatcher {
	t.Helper()
	m, errs := newFlushMatcher(targets)
	if len(errs) != 0 {
		t.Fatal(errs)
	}
	return m
}

func nt(client, vip string) nudgeTarget {
	return nudgeTarget{netip.MustParseAddrPort(client), netip.MustParseAddrPort(vip)}
}

func TestFlushMatcher(t *testing.T) {
	tests := []struct {
		name        string
		fl          *netlink.ConntrackFlow
		match, nudg bool
	}{
		{"established", flow(protoTCP, client, vipA, backend, estab, ourMark), true, true},
		{"other ct mark bits too", flow(protoTCP, client, vipA, backend, estab, ourMark|kubeMark|0xff), true, true},
		{"close-wait", flow(protoTCP, client, vipA, backend, nl.TCP_CONNTRACK_CLOSE_WAIT, ourMark), true, true},
		{"syn-recv", flow(protoTCP, client, vipA, backend, nl.TCP_CONNTRACK_SYN_RECV, ourMark), true, true},
		{"syn-sent: deleted, not nudged", flow(protoTCP, client, vipA, backend, nl.TCP_CONNTRACK_SYN_SENT, ourMark), true, false},
		{"time-wait: deleted, not nudged", flow(protoTCP, client, vipA, backend, timeWait, ourMark), true, false},
		{"no ct mark (kube-proxy, docker, another table)", flow(protoTCP, client, vipA, backend, estab, 0), false, false},
		{"someone else's ct mark", flow(protoTCP, client, vipA, backend, estab, kubeMark|ourMark<<1|ourMark>>1), false, false},
		{"other VIP (another pool sharing the backend)", flow(protoTCP, client, vipB, backend, estab, ourMark), false, false},
		{"other VIP port", flow(protoTCP, client, "198.18.100.1:81", backend, estab, ourMark), false, false},
		{"other backend", flow(protoTCP, client, vipA, backend2, estab, ourMark), false, false},
		{"other backend port", flow(protoTCP, client, vipA, "198.18.1.11:8081", estab, ourMark), false, false},
		{"udp", flow(protoUDP, client, vipA, backend, 0, ourMark), false, false},
		{"not DNATed (health check)", flow(protoTCP, "198.18.1.1:40000", backend, backend, estab, 0), false, false},
	}
	for _, tt := range tests {
		m := mustMatcher(t, target(vipA, backend, "tcp", true))
		if got := m.MatchConntrackFlow(tt.fl); got != tt.match {
			t.Errorf("%s: match = %v, want %v", tt.name, got, tt.match)
		}
		if got := len(m.nudges) == 1; got != tt.nudg {
			t.Errorf("%s: nudges = %v, want nudge %v", tt.name, m.nudges, tt.nudg)
		}
		if want := map[bool]int{true: 1}[tt.match]; m.deleted[0] != want {
			t.Errorf("%s: deleted = %v, want [%d]", tt.name, m.deleted, want)
		}
	}

	// Nudges: client and VIP of each flow, once each (a retried dump can
	// show a flow again), none when nudging is off.
	m := mustMatcher(t, target(vipA, backend, "tcp", true))
	for _, fl := range []*netlink.ConntrackFlow{
		flow(protoTCP, client, vipA, backend, estab, ourMark),
		flow(protoTCP, client2, vipA, backend, estab, ourMark),
		flow(protoTCP, client, vipA, backend, estab, ourMark),
	} {
		m.MatchConntrackFlow(fl)
	}
	want := []pendingNudge{{nt(client, vipA), 0}, {nt(client2, vipA), 0}}
	if !slices.Equal(m.nudges, want) {
		t.Errorf("nudges = %v, want %v", m.nudges, want)
	}
	off := mustMatcher(t, target(vipA, backend, "tcp", false))
	if !off.MatchConntrackFlow(flow(protoTCP, client, vipA, backend, estab, ourMark)) || len(off.nudges) != 0 {
		t.Errorf("nudge off: nudges = %v, want match and none", off.nudges)
	}

	// UDP matches on the UDP protocol and never nudges, even if asked to.
	u := mustMatcher(t, target(vipA, backend, "udp", true))
	if u.MatchConntrackFlow(flow(protoTCP, client, vipA, backend, estab, ourMark)) {
		t.Error("udp target matched a tcp flow")
	}
	if !u.MatchConntrackFlow(flow(protoUDP, client, vipA, backend, 0, ourMark)) || len(u.nudges) != 0 {
		t.Errorf("udp: nudges = %v", u.nudges)
	}
}

// One matcher serves all the targets of a Flush and keeps count per target.
func TestFlushMatcherTargets(t *testing.T) {
	targets := []Target{
		target(vipA, backend, "tcp", true),
		target(vipA, backend2, "tcp", false),
		target(vipB, backend, "udp", false),
		target("[::ffff:198.18.100.3]:80", backend, "tcp", false), // vipB, unmapped
		target(vipA, backend, "tcp", false),                       // repeat of 0
		target(vipA, backend2, "tcp", true),                       // repeat of 1, asking for nudges
	}
	m := mustMatcher(t, targets...)
	flows := []*netlink.ConntrackFlow{
		flow(protoTCP, client, vipA, backend, estab, ourMark),   // 0
		flow(protoTCP, client2, vipA, backend2, estab, ourMark), // 1, nudged: the repeat asked
		flow(protoUDP, client, vipB, backend, 0, ourMark),       // 2
		flow(protoTCP, client2, vipB, backend, estab, ourMark),  // 3
		flow(protoTCP, client, vipB, backend2, estab, ourMark),  // none
	}
	for _, fl := range flows {
		m.MatchConntrackFlow(fl)
	}
	if want := []int{1, 1, 1, 1, 0, 0}; !slices.Equal(m.deleted, want) {
		t.Errorf("deleted = %v, want %v", m.deleted, want)
	}
	want := []pendingNudge{{nt(client, vipA), 0}, {nt(client2, vipA), 1}}
	if !slices.Equal(m.nudges, want) {
		t.Errorf("nudges = %v, want %v", m.nudges, want)
	}
}

func TestFlushMatcherInvalidTargets(t *testing.T) {
	m, errs := newFlushMatcher([]Target{
		target(vipA, backend, "sctp", false),
		target(vipA, "[2001:db8::1]:80", "tcp", false),
		target("[2001:db8::2]:80", backend, "tcp", false),
		{VIP: netip.MustParseAddrPort(vipA), Proto: "tcp"}, // no backend
		target(vipA, backend, "udp", false),
	})
	if len(errs) != 4 {
		t.Fatalf("errors = %v, want 4", errs)
	}
	for i, err := range errs {
		if !strings.HasPrefix(err.Error(), "flows: target ") {
			t.Errorf("error %d = %q, want it to name the target", i, err)
		}
	}
	if len(m.keys) != 1 || m.keys[flowKey{protoUDP, netip.MustParseAddrPort(vipA), netip.MustParseAddrPort(backend)}].index != 4 {
		t.Errorf("keys = %v, want the udp target only", m.keys)
	}
}

// deleteLoop plays ConntrackDeleteFilters' loop over flows: each flow is
// tried against the filters in order, and a match stops the loop unless its
// delete fails (fail says which flows fail to delete).
func deleteLoop(flows []*netlink.ConntrackFlow, fail func(int) bool, filters ...netlink.CustomConntrackFilter) (deleted int) {
	for i, fl := range flows {
		for _, f := range filters {
			if f.MatchConntrackFlow(fl) {
				if !fail(i) {
					deleted++
					break
				}
			}
		}
	}
	return deleted
}

// A flow whose deletion fails is taken back out of the counts and nudges.
func TestDeleteFailed(t *testing.T) {
	m := mustMatcher(t, target(vipA, backend, "tcp", true), target(vipA, backend2, "tcp", true))
	flows := []*netlink.ConntrackFlow{
		flow(protoTCP, client, vipA, backend, estab, ourMark),   // deleted
		flow(protoTCP, client2, vipA, backend, estab, ourMark),  // fails
		flow(protoTCP, client, vipA, backend2, estab, 0),        // not ours
		flow(protoTCP, client2, vipA, backend2, estab, ourMark), // deleted
		flow(protoTCP, client, vipA, backend2, estab, ourMark),  // fails
	}
	n := deleteLoop(flows, func(i int) bool { return i == 1 || i == 4 }, m, deleteFailed{m})
	if want := []int{1, 1}; !slices.Equal(m.deleted, want) || n != 2 {
		t.Errorf("deleted = %v (library %d), want %v (2)", m.deleted, n, want)
	}
	want := []pendingNudge{{nt(client, vipA), 0}, {nt(client2, vipA), 1}}
	if !slices.Equal(m.nudges, want) {
		t.Errorf("nudges = %v, want %v", m.nudges, want)
	}
	// The failed ones are found again by a retry.
	if !maps.Equal(m.seen, map[nudgeTarget]bool{nt(client, vipA): true, nt(client2, vipA): true}) {
		t.Errorf("seen = %v", m.seen)
	}
	m2 := mustMatcher(t, target(vipA, backend, "tcp", true))
	deleteLoop(flows[1:2], func(int) bool { return true }, m2, deleteFailed{m2})
	m2.MatchConntrackFlow(flows[1])
	if len(m2.nudges) != 1 || m2.deleted[0] != 1 {
		t.Errorf("after a failed delete and a successful match: nudges %v, deleted %v", m2.nudges, m2.deleted)
	}
}

func TestCountable(t *testing.T) {
	be := netip.MustParseAddrPort(backend)
	tests := []struct {
		name string
		fl   *netlink.ConntrackFlow
		ok   bool
	}{
		{"tcp established", flow(protoTCP, client, vipA, backend, estab, ourMark), true},
		{"tcp syn-sent", flow(protoTCP, client, vipA, backend, nl.TCP_CONNTRACK_SYN_SENT, ourMark), true},
		{"tcp time-wait", flow(protoTCP, client, vipA, backend, timeWait, ourMark), false},
		{"tcp close", flow(protoTCP, client, vipA, backend, nl.TCP_CONNTRACK_CLOSE, ourMark), false},
		{"udp", flow(protoUDP, client, vipA, backend, 0, ourMark|kubeMark), true},
		{"sctp", flow(132, client, vipA, backend, 0, ourMark), false},
		{"not ours", flow(protoTCP, client, vipA, backend, estab, kubeMark), false},
		{"not DNATed", flow(protoTCP, client, backend, backend, estab, ourMark), false},
	}
	for _, tt := range tests {
		got, ok := countable(tt.fl)
		if ok != tt.ok || (ok && got != be) {
			t.Errorf("%s: countable = %v, %v; want %v", tt.name, got, ok, tt.ok)
		}
	}
}
