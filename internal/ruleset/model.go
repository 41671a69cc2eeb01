// Package ruleset turns the desired state (pools with their usable backends)
// into nftlb's one nftables table. Build and Text are pure and testable
// without root; Applier is the only code that talks to the kernel.
//
// The table's shape (family ip, default name nftlb):
//
//	counter pool-NAME        new connections of one pool (named, so rule rewrites keep it)
//	map pool-NAME            slot -> backend address . port, read by the pool's dnat
//	map services             vip . l4proto . port -> goto pool-NAME
//	chain prerouting         nat hook prerouting priority dstnat: one vmap lookup
//	chain output             nat hook output priority -100: the same, for the LB host's own connections
//	chain postrouting        nat hook postrouting priority srcnat: masquerade what we marked
//	chain nudge              filter hook output priority raw: notrack nftlb's client nudges
//	set backends-conn/-tx/-rx every configured backend, with per-element counters
//	chain forward            filter hook forward priority filter: count DNATed traffic per backend
//	chain pool-NAME          mark, count, dnat to numgen/jhash map @pool-NAME (or reject when empty)
//
// Dispatch is a single hash lookup whatever the number of pools, and a
// backend going up or down changes one pool's map elements (and its rule
// only when the slot count changes), never the rest of the table.
package ruleset

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/nftlb/nftlb/internal/vip"
)

const (
	// MasqMark is the packet-mark bit a pool chain sets on a connection's
	// first packet so postrouting masquerades exactly the connections nftlb
	// DNATed. It is clear of kube-proxy's 0x4000/0x8000 and Cilium's 0x0f00
	// range, the marks most likely to share a Kubernetes gateway.
	MasqMark uint32 = 0x00100000
	// ConnMark is the conntrack-mark bit (ct mark) set on every connection
	// a pool chain DNATs: the same bit value as MasqMark, in the separate
	// ct mark space. Flushes and active-connection counts match on it.
	ConnMark = MasqMark
	// NudgeMark is the mark (SO_MARK) on the TCP ACKs nftlb sends to clients
	// of a dead backend. The nudge chain exempts them from conntrack: a
	// tracked nudge would create an entry that captures the client's answer,
	// which must instead start a new, rebalanced flow.
	NudgeMark uint32 = 0x00200000
	// HashSeed is fixed so source-hash keeps a client on the same backend
	// across rule rewrites; with seed 0 the kernel picks a random seed on
	// every rewrite and reshuffles stickiness.
	HashSeed uint32 = 0x6e66746c
	// OwnerComment marks the dispatch rule; a table of our name without it
	// was not created by nftlb and is never taken over.
	OwnerComment = "managed by nftlb; edits are overwritten"

	servicesMap     = "services"
	chainPrerouting = "prerouting"
	chainOutput     = "output"
	chainPost       = "postrouting"
	chainNudge      = "nudge"
	chainForward    = "forward"
	// Per-backend accounting sets: new connections, packets/bytes to the
	// backend and from it. Their elements are the configured backends, not
	// the healthy ones, so health flaps never reset their counters.
	setConn = "backends-conn"
	setTx   = "backends-tx"
	setRx   = "backends-rx"
)

// Spec is the desired state: what the kernel should do right now.
type Spec struct {
	Table      string
	Masquerade bool
	Pools      []PoolSpec
	// Accounted are the backends counted per backend (every configured
	// backend, healthy or not).
	Accounted []Endpoint
}

// Endpoint is a backend as the kernel sees it: address, protocol, port.
type Endpoint struct {
	Addr     netip.AddrPort
	Protocol vip.Protocol
}

func (e Endpoint) String() string { return e.Addr.String() + "/" + string(e.Protocol) }

func compareEndpoints(a, b Endpoint) int {
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c
	}
	return strings.Compare(string(a.Protocol), string(b.Protocol))
}

// PoolSpec is one pool with only its usable backends.
type PoolSpec struct {
	Name      string
	VIP       netip.Addr
	Port      uint16
	Protocol  vip.Protocol
	Scheduler vip.Scheduler
	Backends  []vip.Backend // usable backends; empty = refuse new connections
}

// FromConfig derives the desired state from a validated config and a
// predicate saying which backends may take new connections.
func FromConfig(cfg *vip.Config, usable func(pool *vip.Pool, b vip.Backend) bool) Spec {
	s := Spec{Table: cfg.Table, Masquerade: cfg.Masquerade}
	for i := range cfg.Pools {
		p := &cfg.Pools[i]
		ps := PoolSpec{Name: p.Name, VIP: p.VIP, Port: p.Port, Protocol: p.Protocol, Scheduler: p.Scheduler}
		for _, b := range p.Backends {
			if usable(p, b) {
				ps.Backends = append(ps.Backends, b)
			}
			s.Accounted = append(s.Accounted, Endpoint{Addr: b.Addr, Protocol: p.Protocol})
		}
		s.Pools = append(s.Pools, ps)
	}
	return s
}

// Table is the rendered content of nftlb's table.
type Table struct {
	Name       string
	Masquerade bool
	Pools      []Pool     // sorted by name
	Accounted  []Endpoint // sorted, unique
}

// Pool is one pool as programmed: its dispatch key and its slots.
type Pool struct {
	Name      string
	VIP       netip.Addr
	Port      uint16
	Protocol  vip.Protocol
	Scheduler vip.Scheduler
	// Slots are the numgen/jhash results' targets: a backend of weight w
	// takes w slots, interleaved (smooth weighted round-robin) so that a
	// heavy backend does not get its connections in a burst.
	Slots []netip.AddrPort
}

// Chain, Map and Counter name the pool's objects in the table.
func (p *Pool) Chain() string   { return "pool-" + p.Name }
func (p *Pool) Map() string     { return "pool-" + p.Name }
func (p *Pool) Counter() string { return "pool-" + p.Name }

// Build renders the desired state. It is pure and deterministic.
func Build(s Spec) *Table {
	t := &Table{Name: s.Table, Masquerade: s.Masquerade}
	for _, ps := range s.Pools {
		t.Pools = append(t.Pools, Pool{
			Name: ps.Name, VIP: ps.VIP, Port: ps.Port,
			Protocol: ps.Protocol, Scheduler: ps.Scheduler,
			Slots: slots(ps.Backends),
		})
	}
	slices.SortFunc(t.Pools, func(a, b Pool) int { return strings.Compare(a.Name, b.Name) })
	t.Accounted = slices.Clone(s.Accounted)
	slices.SortFunc(t.Accounted, compareEndpoints)
	t.Accounted = slices.Compact(t.Accounted)
	return t
}

// slots expands weights with nginx's smooth weighted round-robin: each step
// every backend gains its weight, the largest is picked and pays the total.
// Weights 5,1,1 give a a b a c a a rather than a a a a a b c.
func slots(bs []vip.Backend) []netip.AddrPort {
	total := 0
	for _, b := range bs {
		total += b.Weight
	}
	out := make([]netip.AddrPort, 0, total)
	cur := make([]int, len(bs))
	for range total {
		best := 0
		for i, b := range bs {
			cur[i] += b.Weight
			if cur[i] > cur[best] {
				best = i
			}
		}
		cur[best] -= total
		out = append(out, bs[best].Addr)
	}
	return out
}

// Pool returns the pool named name, or nil.
func (t *Table) Pool(name string) *Pool {
	i, ok := slices.BinarySearchFunc(t.Pools, name, func(p Pool, n string) int { return strings.Compare(p.Name, n) })
	if !ok {
		return nil
	}
	return &t.Pools[i]
}

func (p *Pool) dispatchKey() string { return fmt.Sprintf("%s . %s . %d", p.VIP, p.Protocol, p.Port) }

func (p *Pool) sameDispatch(o *Pool) bool {
	return p.VIP == o.VIP && p.Protocol == o.Protocol && p.Port == o.Port
}

// sameRule compares everything the pool chain's rule depends on. The slot
// addresses are map data, so changing them leaves the rule (and numgen's
// position) alone.
func (p *Pool) sameRule(o *Pool) bool {
	return p.Protocol == o.Protocol && p.Scheduler == o.Scheduler && len(p.Slots) == len(o.Slots)
}

// Uses reports whether the pool sends new connections to addr.
func (p *Pool) Uses(addr netip.AddrPort) bool { return slices.Contains(p.Slots, addr) }
