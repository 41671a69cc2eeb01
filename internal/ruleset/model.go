// Package ruleset turns the desired state (pools with their usable backends)
// into nftlb's one nftables table. Build and Text are pure and testable
// without root; Applier is the only code that talks to the kernel.
//
// The table's shape (family ip, default name nftlb):
//
//	map slots-NNN            slot -> backend address . port, shared by the pools whose
//	                         name hashes to NNN; each pool owns keys [base, base+size)
//	map services             vip . l4proto . port -> goto pool-NAME, with a counter per
//	                         element: the pool's new connections (rule rewrites keep it)
//	chain prerouting         nat hook prerouting priority dstnat: one vmap lookup
//	chain output             nat hook output priority -100: the same, for the LB host's own connections
//	chain postrouting        nat hook postrouting priority srcnat: masquerade what we marked
//	chain nudge              filter hook output priority raw: notrack nftlb's client nudges
//	set backends-conn/-tx/-rx every configured backend, with per-element counters
//	chain forward            filter hook forward priority filter: count DNATed traffic per backend
//	chain pool-NAME          mark, dnat to numgen/jhash mod size offset base
//	                         map @slots-NNN (or reject when no backend is usable)
//
// Dispatch is a single hash lookup whatever the number of pools.
//
// A pool's slot count is fixed by its configured backends, not by their
// health: a backend going down hands its slots to the healthy ones, so a
// health change rewrites only map elements. That matters at scale: any new
// rule holding a dnat makes the kernel re-validate the whole table (22 ms
// at 10,000 pools), while an element change costs a few milliseconds. It
// also keeps source-hash clients of healthy backends where they are.
//
// Pools share slot maps because the kernel finds a set by name with a
// linear walk: 10,000 per-pool maps made a cold apply spend 80% of its
// 7.7 s in that walk. One map for everything is no better, because binding
// a rule to a map walks the map's elements (36 s at 10,000 pools). With
// pools spread over at most slotMaps maps both costs stay small
// (bench/controlplane has the numbers).
package ruleset

import (
	"cmp"
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

	// slotMaps is how many slot maps pools are spread over (by a hash of
	// the pool name, so a pool's map never depends on the other pools).
	// `nft -f` of 10,000 pools takes 1.2-1.3 s with 100 to 1,000 maps, 2.2 s
	// with 32 and 5 s with 10,000.
	slotMaps = 256
	// maxPoolSlots bounds the slot count chosen for exact balance; above it
	// a pool gets just its weights' sum (see slotCount).
	maxPoolSlots = 240
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
	// Configured are all the pool's backends, usable or not: they fix the
	// pool's slot count and each backend's own slots. Nil means Backends.
	Configured []vip.Backend
}

// FromConfig derives the desired state from a validated config and a
// predicate saying which backends may take new connections.
func FromConfig(cfg *vip.Config, usable func(pool *vip.Pool, b vip.Backend) bool) Spec {
	s := Spec{Table: cfg.Table, Masquerade: cfg.Masquerade, Pools: make([]PoolSpec, 0, len(cfg.Pools))}
	n := 0
	for i := range cfg.Pools {
		n += len(cfg.Pools[i].Backends)
	}
	s.Accounted = make([]Endpoint, 0, n)
	for i := range cfg.Pools {
		p := &cfg.Pools[i]
		ps := PoolSpec{Name: p.Name, VIP: p.VIP, Port: p.Port, Protocol: p.Protocol, Scheduler: p.Scheduler,
			Configured: p.Backends}
		ps.Backends = make([]vip.Backend, 0, len(p.Backends))
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
	// Stray are slot-map elements that no pool's range covers, or that
	// hold malformed data: Read reports them (hand edits, damage), Build
	// never makes any, so Diff deletes them.
	Stray []SlotKey
}

// SlotKey is one element of a slot map.
type SlotKey struct {
	Map string
	Key uint32
}

// Pool is one pool as programmed: its dispatch key and its slots.
type Pool struct {
	Name      string
	VIP       netip.Addr
	Port      uint16
	Protocol  vip.Protocol
	Scheduler vip.Scheduler
	// Map is the slot map the pool's rule reads (slots-NNN, by name hash);
	// the pool owns keys Base .. Base+Size-1 in it.
	Map  string
	Base uint32
	// Size is the numgen/jhash modulus: fixed by the configured backends
	// and weights, whatever their health.
	Size int
	// Slots are the targets of keys Base+i: Size of them, or none when no
	// backend is usable (the rule then rejects). A backend of weight w
	// owns Size*w/sum(weights) slots, interleaved (smooth weighted
	// round-robin) so that a heavy backend does not get its connections in
	// a burst; an unusable backend's slots go to the usable ones.
	Slots []netip.AddrPort
}

// Chain names the pool's own chain in the table.
func (p *Pool) Chain() string { return "pool-" + p.Name }

// SlotMap names the map a pool's slots live in: FNV-1a of the pool name,
// so adding or removing other pools never moves it.
func SlotMap(pool string) string {
	h := uint32(2166136261)
	for i := 0; i < len(pool); i++ {
		h = (h ^ uint32(pool[i])) * 16777619
	}
	return slotMapNames[h%slotMaps]
}

var slotMapNames = func() (names [slotMaps]string) {
	for i := range names {
		names[i] = fmt.Sprintf("slots-%03d", i)
	}
	return names
}()

// Build renders the desired state from scratch. It is pure and
// deterministic; BuildOn keeps the key ranges of an existing table.
func Build(s Spec) *Table { return BuildOn(s, nil) }

// BuildOn renders the desired state so that every pool that prev (what
// the kernel has, or nil) already holds with the same slot count keeps its
// key range, and so its rule: the change is then map elements only. New
// and resized pools take the lowest free range of their map. It is pure.
func BuildOn(s Spec, prev *Table) *Table {
	t := &Table{Name: s.Table, Masquerade: s.Masquerade, Pools: make([]Pool, 0, len(s.Pools))}
	for _, ps := range s.Pools {
		conf := ps.Configured
		if conf == nil {
			conf = ps.Backends
		}
		size := slotCount(conf)
		t.Pools = append(t.Pools, Pool{
			Name: ps.Name, VIP: ps.VIP, Port: ps.Port,
			Protocol: ps.Protocol, Scheduler: ps.Scheduler,
			Map: SlotMap(ps.Name), Size: size,
			Slots: assignSlots(conf, ps.Backends, size, ps.Scheduler == vip.SourceHash),
		})
	}
	if len(t.Pools) == 0 {
		t.Pools = nil
	}
	slices.SortFunc(t.Pools, func(a, b Pool) int { return strings.Compare(a.Name, b.Name) })
	allocate(t, prev)
	t.Accounted = slices.Clone(s.Accounted)
	slices.SortFunc(t.Accounted, compareEndpoints)
	t.Accounted = slices.Compact(t.Accounted)
	return t
}

// allocate gives each pool of t its Base: the one it has in prev when its
// map and size are unchanged (and the range is still free), else the
// lowest free range of its map, in pool-name order.
func allocate(t, prev *Table) {
	type span struct{ lo, hi uint64 } // [lo, hi)
	taken := map[string][]span{}
	var fresh []*Pool
	var old []Pool
	if prev != nil {
		old = prev.Pools
	}
	k := 0 // both lists are sorted by name: one merge walk
	for i := range t.Pools {
		p := &t.Pools[i]
		for k < len(old) && old[k].Name < p.Name {
			k++
		}
		var q *Pool
		if k < len(old) && old[k].Name == p.Name {
			q = &old[k]
		}
		if q != nil && q.Map == p.Map && q.Size == p.Size && q.Size > 0 {
			s := span{uint64(q.Base), uint64(q.Base) + uint64(q.Size)}
			free := s.hi <= 1<<32
			for _, o := range taken[p.Map] {
				if s.lo < o.hi && o.lo < s.hi {
					free = false
					break
				}
			}
			if free {
				p.Base = q.Base
				taken[p.Map] = append(taken[p.Map], s)
				continue
			}
		}
		fresh = append(fresh, p)
	}
	for _, spans := range taken {
		slices.SortFunc(spans, func(a, b span) int { return cmp.Compare(a.lo, b.lo) })
	}
	for _, p := range fresh {
		spans := taken[p.Map]
		lo, at := uint64(0), len(spans)
		for i, s := range spans {
			if lo+uint64(p.Size) <= s.lo {
				at = i
				break
			}
			lo = max(lo, s.hi)
		}
		// 2^32 keys per map and at most 240 slots per backend set: a map
		// would need millions of pools to run out.
		p.Base = uint32(lo)
		taken[p.Map] = slices.Insert(spans, at, span{lo, lo + uint64(p.Size)})
	}
}

// slotCount is a pool's fixed number of slots. Weights are reduced by
// their gcd; the count is a multiple of their sum W (so every backend's
// share is exact) and, when it stays small, of lcm(1..min(n,5)) as well,
// so that with any k of up to 5 equal backends usable each gets exactly
// 1/k: 3 equal backends get 6 slots, 2 of them 3 each. Otherwise the
// imbalance is at most one slot.
func slotCount(bs []vip.Backend) int {
	if len(bs) == 0 {
		return 0
	}
	_, w := reducedWeights(bs)
	l := 1
	for k := 2; k <= min(len(bs), 5); k++ {
		l = l / gcd(l, k) * k
	}
	if m := w / gcd(w, l) * l; m <= maxPoolSlots {
		return m
	}
	if w < 60 {
		return w * ((60 + w - 1) / w)
	}
	return w
}

// reducedWeights divides the backends' weights by their gcd (weights 2,2
// lay out like 1,1) and returns their common divisor and reduced sum.
func reducedWeights(bs []vip.Backend) (g, sum int) {
	for _, b := range bs {
		g = gcd(g, b.Weight)
	}
	for _, b := range bs {
		sum += b.Weight / g
	}
	return g, sum
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// assignSlots lays out size slots over the usable backends: each gets its
// weight's share of all slots (largest remainder, ties to the earlier
// backend). Round-robin and random pools get the smoothest interleaving
// (smooth weighted round-robin over those shares), so that any run of
// connections is balanced, not just whole cycles. Sticky (source-hash)
// pools instead start from the layout with every backend usable and hand
// only the unusable backends' slots over: clients of a healthy backend
// stay on it when another one fails. Pure.
func assignSlots(conf, usable []vip.Backend, size int, sticky bool) []netip.AddrPort {
	if len(usable) == 0 || size == 0 {
		return []netip.AddrPort{}
	}
	g, w := reducedWeights(conf)
	scaled := make([]int, len(conf))
	for i, b := range conf {
		scaled[i] = b.Weight / g * (size / w)
	}
	owner := swrr(scaled, size)
	ok := make([]bool, len(conf))
	wUsable := 0
	for i, b := range conf {
		if slices.ContainsFunc(usable, func(u vip.Backend) bool { return u.Addr == b.Addr }) {
			ok[i] = true
			wUsable += b.Weight
		}
	}
	out := make([]netip.AddrPort, size)
	if wUsable == 0 { // usable backends that are not configured: spec error, serve them evenly
		for i := range out {
			out[i] = usable[i%len(usable)].Addr
		}
		return out
	}
	// Targets by largest remainder, ties to the earlier backend.
	target := make([]int, len(conf))
	rem := make([]int, len(conf))
	left := size
	for i, b := range conf {
		if ok[i] {
			target[i] = size * b.Weight / wUsable
			rem[i] = size * b.Weight % wUsable
			left -= target[i]
		}
	}
	for ; left > 0; left-- {
		best := -1
		for i := range conf {
			if ok[i] && (best < 0 || rem[i] > rem[best]) {
				best = i
			}
		}
		target[best]++
		rem[best] = -1
	}
	if !sticky {
		for s, o := range swrr(target, size) {
			out[s] = conf[o].Addr
		}
		return out
	}
	have := make([]int, len(conf))
	for _, o := range owner {
		if ok[o] {
			have[o]++
		}
	}
	for s, o := range owner {
		if !ok[o] {
			best := -1
			for i := range conf {
				if ok[i] && (best < 0 || target[i]-have[i] > target[best]-have[best]) {
					best = i
				}
			}
			o = best
			have[o]++
		}
		out[s] = conf[o].Addr
	}
	return out
}

// swrr expands weights with nginx's smooth weighted round-robin: each step
// every backend gains its weight, the largest is picked and pays the total.
// Weights 5,1,1 give a a b a c a a rather than a a a a a b c. It returns
// the backend index of each of the n (= sum of weights) slots.
func swrr(weights []int, n int) []int {
	total := 0
	for _, w := range weights {
		total += w
	}
	out := make([]int, 0, n)
	cur := make([]int, len(weights))
	for range n {
		best := 0
		for i, w := range weights {
			cur[i] += w
			if cur[i] > cur[best] {
				best = i
			}
		}
		cur[best] -= total
		out = append(out, best)
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
// position) alone. A rejecting rule depends on the protocol only.
func (p *Pool) sameRule(o *Pool) bool {
	if p.Protocol != o.Protocol || (len(p.Slots) == 0) != (len(o.Slots) == 0) {
		return false
	}
	return len(p.Slots) == 0 ||
		p.Scheduler == o.Scheduler && p.Map == o.Map && p.Base == o.Base && p.Size == o.Size
}

// Uses reports whether the pool sends new connections to addr.
func (p *Pool) Uses(addr netip.AddrPort) bool { return slices.Contains(p.Slots, addr) }
