package flows

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
)

// flow builds a conntrack entry client -> dst, answered by replySrc (to
// the masquerade address 198.18.1.1).
func flow(proto uint8, client, dst, replySrc string, state uint8) *netlink.ConntrackFlow {
	c, d, r := netip.MustParseAddrPort(client), netip.MustParseAddrPort(dst), netip.MustParseAddrPort(replySrc)
	fl := &netlink.ConntrackFlow{
		FamilyType: 2,
		Forward: netlink.IPTuple{Protocol: proto, SrcIP: net.IP(c.Addr().AsSlice()), SrcPort: c.Port(),
			DstIP: net.IP(d.Addr().AsSlice()), DstPort: d.Port()},
		Reverse: netlink.IPTuple{Protocol: proto, SrcIP: net.IP(r.Addr().AsSlice()), SrcPort: r.Port(),
			DstIP: net.ParseIP("198.18.1.1").To4(), DstPort: c.Port()},
	}
	if proto == protoTCP {
		fl.ProtoInfo = &netlink.ProtoInfoTCP{State: state}
	}
	return fl
}

func TestBackendMatcher(t *testing.T) {
	const (
		vipA     = "198.18.100.1:80"
		backend  = "198.18.1.11:8080"
		client   = "198.18.0.2:40000"
		client2  = "198.18.0.2:40001"
		estab    = nl.TCP_CONNTRACK_ESTABLISHED
		timeWait = nl.TCP_CONNTRACK_TIME_WAIT
	)
	tests := []struct {
		name        string
		fl          *netlink.ConntrackFlow
		match, nudg bool
	}{
		{"established", flow(protoTCP, client, vipA, backend, estab), true, true},
		{"close-wait", flow(protoTCP, client, vipA, backend, nl.TCP_CONNTRACK_CLOSE_WAIT), true, true},
		{"syn-recv", flow(protoTCP, client, vipA, backend, nl.TCP_CONNTRACK_SYN_RECV), true, true},
		{"syn-sent: deleted, not nudged", flow(protoTCP, client, vipA, backend, nl.TCP_CONNTRACK_SYN_SENT), true, false},
		{"time-wait: deleted, not nudged", flow(protoTCP, client, vipA, backend, timeWait), true, false},
		{"other backend", flow(protoTCP, client, vipA, "198.18.1.12:8080", estab), false, false},
		{"other port", flow(protoTCP, client, vipA, "198.18.1.11:8081", estab), false, false},
		{"udp", flow(protoUDP, client, vipA, backend, 0), false, false},
		{"not DNATed (health check)", flow(protoTCP, "198.18.1.1:40000", backend, backend, estab), false, false},
	}
	for _, tt := range tests {
		m := &backendMatcher{backend: netip.MustParseAddrPort(backend), proto: protoTCP, nudge: true}
		if got := m.MatchConntrackFlow(tt.fl); got != tt.match {
			t.Errorf("%s: match = %v, want %v", tt.name, got, tt.match)
		}
		if got := len(m.targets) == 1; got != tt.nudg {
			t.Errorf("%s: targets = %v, want nudge %v", tt.name, m.targets, tt.nudg)
		}
	}

	// Targets: client and VIP of each flow, once each (a retried dump can
	// show a flow again), none when nudging is off.
	m := &backendMatcher{backend: netip.MustParseAddrPort(backend), proto: protoTCP, nudge: true}
	for _, fl := range []*netlink.ConntrackFlow{
		flow(protoTCP, client, vipA, backend, estab),
		flow(protoTCP, client2, vipA, backend, estab),
		flow(protoTCP, client, vipA, backend, estab),
	} {
		m.MatchConntrackFlow(fl)
	}
	want := []nudgeTarget{
		{netip.MustParseAddrPort(client), netip.MustParseAddrPort(vipA)},
		{netip.MustParseAddrPort(client2), netip.MustParseAddrPort(vipA)},
	}
	if !slices.Equal(m.targets, want) {
		t.Errorf("targets = %v, want %v", m.targets, want)
	}
	off := &backendMatcher{backend: netip.MustParseAddrPort(backend), proto: protoTCP}
	if !off.MatchConntrackFlow(flow(protoTCP, client, vipA, backend, estab)) || len(off.targets) != 0 {
		t.Errorf("nudge off: targets = %v, want match and none", off.targets)
	}

	// UDP matches on the UDP protocol and never nudges.
	u := &backendMatcher{backend: netip.MustParseAddrPort(backend), proto: protoUDP}
	if !u.MatchConntrackFlow(flow(protoUDP, client, vipA, backend, 0)) || len(u.targets) != 0 {
		t.Errorf("udp: targets = %v", u.targets)
	}
}
