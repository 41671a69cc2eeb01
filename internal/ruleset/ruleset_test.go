package ruleset

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"

	"github.com/nftlb/nftlb/internal/vip"
)

var update = flag.Bool("update", false, "rewrite golden files in testdata/")

func be(s string, w int) vip.Backend { return vip.Backend{Addr: netip.MustParseAddrPort(s), Weight: w} }

func pool(name, vipAddr string, port uint16, bs ...vip.Backend) PoolSpec {
	return PoolSpec{Name: name, VIP: netip.MustParseAddr(vipAddr), Port: port,
		Protocol: vip.TCP, Scheduler: vip.RoundRobin, Backends: bs}
}

// accounted lists every backend of the spec's pools for accounting, as
// FromConfig does (there, healthy or not).
func accounted(s Spec) Spec {
	for _, p := range s.Pools {
		for _, b := range p.Backends {
			s.Accounted = append(s.Accounted, Endpoint{Addr: b.Addr, Protocol: p.Protocol})
		}
	}
	return s
}

// goldenSpecs are the shapes an operator meets: the README example, every
// scheduler, weights, a NodePort-style port change, empty pools, UDP.
func goldenSpecs() map[string]Spec {
	hash := pool("nodeport-http", "198.18.100.2", 80, be("198.18.1.11:30080", 1), be("198.18.1.12:30080", 1))
	hash.Scheduler = vip.SourceHash
	rnd := pool("dns", "198.18.100.3", 53, be("198.18.1.11:53", 1), be("198.18.1.12:53", 1))
	rnd.Protocol, rnd.Scheduler = vip.UDP, vip.Random
	emptyUDP := pool("syslog", "198.18.100.4", 514)
	emptyUDP.Protocol = vip.UDP
	specs := map[string]Spec{
		"readme": {Table: "nftlb", Masquerade: true, Pools: []PoolSpec{
			pool("kube-apiserver", "198.18.100.1", 6443,
				be("198.18.1.11:6443", 1), be("198.18.1.12:6443", 1), be("198.18.1.13:6443", 1)),
			hash,
		}},
		"weights": {Table: "lb", Masquerade: true, Pools: []PoolSpec{
			pool("web", "198.18.100.1", 80, be("198.18.1.11:8080", 5), be("198.18.1.12:8080", 1), be("198.18.1.13:8080", 1)),
		}},
		"schedulers-nomasq": {Table: "nftlb", Masquerade: false, Pools: []PoolSpec{hash, rnd}},
		"empty-pools": {Table: "nftlb", Masquerade: true, Pools: []PoolSpec{
			pool("kube-apiserver", "198.18.100.1", 6443), emptyUDP,
		}},
		"no-pools": {Table: "nftlb", Masquerade: true},
	}
	for name, s := range specs {
		specs[name] = accounted(s)
	}
	return specs
}

func TestTextGolden(t *testing.T) {
	for name, spec := range goldenSpecs() {
		t.Run(name, func(t *testing.T) {
			got := Build(spec).Text()
			path := filepath.Join("testdata", name+".nft")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("Text() differs from %s (go test -update rewrites it):\n--- got\n%s\n--- want\n%s", path, got, want)
			}
		})
	}
}

func TestBuildIsDeterministicAndSorted(t *testing.T) {
	s := goldenSpecs()["readme"]
	rev := s
	rev.Pools = slices.Clone(s.Pools)
	slices.Reverse(rev.Pools)
	if a, b := Build(s).Text(), Build(rev).Text(); a != b {
		t.Errorf("pool order in the spec changed the rendering:\n%s\n%s", a, b)
	}
}

func TestSlotCount(t *testing.T) {
	eq := func(n int) []vip.Backend {
		var bs []vip.Backend
		for i := range n {
			bs = append(bs, be(fmt.Sprintf("198.18.1.%d:1", i+1), 1))
		}
		return bs
	}
	a, b, c := "198.18.1.1:1", "198.18.1.2:1", "198.18.1.3:1"
	tests := []struct {
		name string
		in   []vip.Backend
		want int
	}{
		{"none", nil, 0},
		{"one", eq(1), 1},
		{"two", eq(2), 2},
		{"three: 1/3 each, or 1/2 of two", eq(3), 6},
		{"four", eq(4), 12},
		{"five", eq(5), 60},
		{"six", eq(6), 60},
		{"seven: lcm 420 too many, a multiple of 7 near 60", eq(7), 63},
		{"weights 2,1", []vip.Backend{be(a, 2), be(b, 1)}, 6},
		{"weights reduced by their gcd", []vip.Backend{be(a, 2), be(b, 2), be(c, 2)}, 6},
		{"weights 5,1,1", []vip.Backend{be(a, 5), be(b, 1), be(c, 1)}, 42},
		{"weights 3,7,100: their sum", []vip.Backend{be(a, 3), be(b, 7), be(c, 100)}, 110},
	}
	for _, tt := range tests {
		if got := slotCount(tt.in); got != tt.want {
			t.Errorf("%s: slotCount = %d, want %d", tt.name, got, tt.want)
		}
	}
}

func TestAssignSlots(t *testing.T) {
	a, b, c := "198.18.1.1:1", "198.18.1.2:1", "198.18.1.3:1"
	abc := []vip.Backend{be(a, 1), be(b, 1), be(c, 1)}
	tests := []struct {
		name   string
		conf   []vip.Backend
		usable []vip.Backend
		want   []string
		sticky bool
	}{
		{"source-hash, all usable", abc, abc, []string{a, b, c, a, b, c}, true},
		{"source-hash, b down: only b's slots move, one to a, one to c", abc, []vip.Backend{abc[0], abc[2]}, []string{a, a, c, a, c, c}, true},
		{"all usable: round-robin", abc, abc, []string{a, b, c, a, b, c}, false},
		{"b down: a and c alternate", abc, []vip.Backend{abc[0], abc[2]}, []string{a, c, a, c, a, c}, false},
		{"only c", abc, abc[2:], []string{c, c, c, c, c, c}, false},
		{"none usable", abc, nil, []string{}, false},
		{"weights interleave", []vip.Backend{be(a, 2), be(b, 1)}, []vip.Backend{be(a, 2), be(b, 1)}, []string{a, b, a, a, b, a}, false},
		{"weights 5,1,1", []vip.Backend{be(a, 5), be(b, 1), be(c, 1)}, []vip.Backend{be(a, 5), be(b, 1), be(c, 1)},
			[]string{a, a, b, a, c, a, a}, false},
	}
	for _, tt := range tests {
		size := slotCount(tt.conf)
		if tt.name == "weights 5,1,1" {
			size = 7 // the smallest layout shows the interleaving
		}
		var got []string
		for _, s := range assignSlots(tt.conf, tt.usable, size, tt.sticky) {
			got = append(got, s.String())
		}
		if got == nil {
			got = []string{}
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestAssignSlotsShares checks, for every subset of usable backends of
// several weightings, that each usable backend gets its exact share (up
// to one slot), and with source-hash keeps every slot it has when all are
// usable.
func TestAssignSlotsShares(t *testing.T) {
	for _, weights := range [][]int{{1, 1, 1}, {1, 2}, {5, 1, 1}, {1, 1, 1, 1, 1}, {3, 7, 100}, {1, 1, 1, 1, 1, 1, 1}, {100, 1}} {
		var conf []vip.Backend
		for i, w := range weights {
			conf = append(conf, be(fmt.Sprintf("198.18.1.%d:1", i+1), w))
		}
		size := slotCount(conf)
		full := assignSlots(conf, conf, size, true)
		for mask := 1; mask < 1<<len(conf); mask++ {
			for _, sticky := range []bool{false, true} {
				var usable []vip.Backend
				wsum := 0
				for i, bk := range conf {
					if mask&(1<<i) != 0 {
						usable = append(usable, bk)
						wsum += bk.Weight
					}
				}
				got := assignSlots(conf, usable, size, sticky)
				if len(got) != size {
					t.Fatalf("weights %v mask %b: %d slots, want %d", weights, mask, len(got), size)
				}
				count := map[netip.AddrPort]int{}
				for i, s := range got {
					count[s]++
					if sticky && full[i] != s && slices.ContainsFunc(usable, func(u vip.Backend) bool { return u.Addr == full[i] }) {
						t.Errorf("weights %v mask %b: slot %d moved from usable %s to %s", weights, mask, i, full[i], s)
					}
				}
				for _, u := range usable {
					exact := float64(size*u.Weight) / float64(wsum)
					if d := float64(count[u.Addr]) - exact; d <= -1 || d >= 1 {
						t.Errorf("weights %v mask %b: %s has %d slots, want %.2f", weights, mask, u.Addr, count[u.Addr], exact)
					}
				}
				if len(count) != len(usable) {
					t.Errorf("weights %v mask %b: slots go to %d backends, want %d", weights, mask, len(count), len(usable))
				}
			}
		}
	}
}

func TestDiff(t *testing.T) {
	base := goldenSpecs()["readme"]
	with := func(f func(s *Spec)) *Table {
		s := base
		s.Pools = slices.Clone(base.Pools)
		for i := range s.Pools {
			s.Pools[i].Backends = slices.Clone(s.Pools[i].Backends)
		}
		f(&s)
		return Build(s)
	}
	prev := Build(base)
	type change struct {
		name                  string
		add, del              bool
		dispatch, slots, rule bool
	}
	tests := []struct {
		name string
		prev *Table
		next *Table
		full bool
		masq bool
		want []change
	}{
		{name: "unknown kernel state", prev: nil, next: prev, full: true},
		{name: "no change", prev: prev, next: with(func(*Spec) {})},
		{name: "table renamed", prev: prev, next: with(func(s *Spec) { s.Table = "other" }), full: true},
		{name: "masquerade off", prev: prev, next: with(func(s *Spec) { s.Masquerade = false }), masq: true},
		{name: "backend removed from the config: map and rule of one pool", prev: prev,
			next: with(func(s *Spec) { s.Pools[0].Backends = s.Pools[0].Backends[:2] }),
			want: []change{{name: "kube-apiserver", slots: true, rule: true}}},
		{name: "backend unhealthy: map elements only, the rule and numgen's position stay", prev: prev,
			next: with(func(s *Spec) {
				s.Pools[0].Configured = s.Pools[0].Backends
				s.Pools[0].Backends = s.Pools[0].Backends[:2]
			}),
			want: []change{{name: "kube-apiserver", slots: true}}},
		{name: "backend replaced, same count: map only, numgen keeps its position", prev: prev,
			next: with(func(s *Spec) { s.Pools[0].Backends[2] = be("198.18.1.14:6443", 1) }),
			want: []change{{name: "kube-apiserver", slots: true}}},
		{name: "scheduler: rule only", prev: prev,
			next: with(func(s *Spec) { s.Pools[0].Scheduler = vip.Random }),
			want: []change{{name: "kube-apiserver", rule: true}}},
		{name: "vip moved: dispatch only", prev: prev,
			next: with(func(s *Spec) { s.Pools[1].VIP = netip.MustParseAddr("198.18.100.9") }),
			want: []change{{name: "nodeport-http", dispatch: true}}},
		{name: "pool added and removed", prev: prev,
			next: with(func(s *Spec) { s.Pools[1].Name = "np" }),
			want: []change{{name: "nodeport-http", del: true}, {name: "np", add: true, dispatch: true, slots: true, rule: true}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			plan := Diff(tt.prev, tt.next)
			if plan.Full != tt.full || plan.Masquerade != tt.masq {
				t.Fatalf("Full=%v Masquerade=%v, want %v %v", plan.Full, plan.Masquerade, tt.full, tt.masq)
			}
			var got []change
			for _, c := range plan.Pools {
				got = append(got, change{c.Name, c.Old == nil, c.New == nil, c.Dispatch, c.Slots, c.Rule})
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("changes = %+v\nwant      %+v", got, tt.want)
			}
			if plan.Empty() != (!tt.full && !tt.masq && len(tt.want) == 0) {
				t.Errorf("Empty() = %v", plan.Empty())
			}
		})
	}
}

// recorder is a batch that records what would be sent, by operation and
// object name, so the shape of a transaction is testable without a kernel.
type recorder struct{ ops []string }

func (r *recorder) add(op, name string) { r.ops = append(r.ops, op+" "+name) }
func (r *recorder) AddTable(t *nftables.Table) *nftables.Table {
	r.add("add-table", t.Name)
	return t
}
func (r *recorder) DelTable(t *nftables.Table) { r.add("del-table", t.Name) }
func (r *recorder) AddChain(c *nftables.Chain) *nftables.Chain {
	r.add("add-chain", c.Name)
	return c
}
func (r *recorder) DelChain(c *nftables.Chain)   { r.add("del-chain", c.Name) }
func (r *recorder) FlushChain(c *nftables.Chain) { r.add("flush-chain", c.Name) }
func (r *recorder) AddRule(x *nftables.Rule) *nftables.Rule {
	r.add("add-rule", x.Chain.Name)
	return x
}
func (r *recorder) AddSet(s *nftables.Set, e []nftables.SetElement) error {
	r.add("add-set", fmt.Sprintf("%s/%d", s.Name, len(e)))
	return nil
}
func (r *recorder) DelSet(s *nftables.Set)   { r.add("del-set", s.Name) }
func (r *recorder) FlushSet(s *nftables.Set) { r.add("flush-set", s.Name) }
func (r *recorder) SetAddElements(s *nftables.Set, e []nftables.SetElement) error {
	r.add("add-elements", fmt.Sprintf("%s/%d", s.Name, len(e)))
	return nil
}
func (r *recorder) SetDeleteElements(s *nftables.Set, e []nftables.SetElement) error {
	r.add("del-elements", fmt.Sprintf("%s/%d", s.Name, len(e)))
	return nil
}
func (r *recorder) AddObj(o nftables.Obj) nftables.Obj {
	r.add("add-counter", o.(*nftables.NamedObj).Name)
	return o
}
func (r *recorder) DeleteObject(o nftables.Obj) { r.add("del-counter", o.(*nftables.NamedObj).Name) }

func manyPools(n int) Spec {
	s := Spec{Table: "nftlb", Masquerade: true}
	for i := range n {
		s.Pools = append(s.Pools, pool(fmt.Sprintf("p%05d", i),
			fmt.Sprintf("198.18.%d.%d", 100+i/250, 1+i%250), 443,
			be("198.18.1.11:443", 1), be("198.18.1.12:443", 1), be("198.18.1.13:443", 1)))
	}
	return accounted(s)
}

func TestQueueShapes(t *testing.T) {
	big := manyPools(1000)
	prev := Build(big)
	down := big
	down.Pools = slices.Clone(big.Pools)
	down.Pools[500].Configured = down.Pools[500].Backends
	down.Pools[500].Backends = down.Pools[500].Backends[1:]
	removed := big
	removed.Pools = slices.Clone(big.Pools)
	removed.Pools[500].Backends = removed.Pools[500].Backends[1:]
	allDown := big
	allDown.Pools = slices.Clone(big.Pools)
	allDown.Pools[9].Configured = allDown.Pools[9].Backends
	allDown.Pools[9].Backends = nil
	swapped := big
	swapped.Pools = slices.Clone(big.Pools)
	swapped.Pools[7].Backends = []vip.Backend{be("198.18.1.14:443", 1), be("198.18.1.12:443", 1), be("198.18.1.13:443", 1)}
	renamed := big
	renamed.Pools = slices.Clone(big.Pools)
	renamed.Pools[3].Name = "renamed"

	tests := []struct {
		name       string
		prev, next *Table
		want       []string
	}{
		{"backend down in one of 1,000 pools: slot elements of that pool, nothing else", prev, BuildOn(down, prev),
			// a b c a b c -> b c b c b c: 4 of the 6 slots change.
			[]string{"del-elements " + SlotMap("p00500") + "/4", "add-elements " + SlotMap("p00500") + "/4"}},
		{"backend removed from the config: fewer slots, so the rule changes too", prev, BuildOn(removed, prev),
			[]string{"flush-chain pool-p00500", "del-elements " + SlotMap("p00500") + "/6", "add-elements " + SlotMap("p00500") + "/2",
				"add-rule pool-p00500"}},
		{"backend swapped: map elements only", prev, BuildOn(swapped, prev),
			[]string{"del-elements " + SlotMap("p00007") + "/2", "add-elements " + SlotMap("p00007") + "/2"}},
		{"pool loses every backend: elements go, reject rule", prev, BuildOn(allDown, prev),
			[]string{"flush-chain pool-p00009", "del-elements " + SlotMap("p00009") + "/6", "add-rule pool-p00009"}},
		{"pool renamed: dispatch moves within the same transaction", prev, BuildOn(renamed, prev),
			[]string{"del-elements services/1",
				"flush-chain pool-p00003", "del-chain pool-p00003",
				// Both maps hold other pools; maps are visited in name order.
				"add-elements " + SlotMap("renamed") + "/6", "del-elements " + SlotMap("p00003") + "/6",
				"add-chain pool-renamed", "add-rule pool-renamed",
				"add-elements services/1"}},
		{"first apply replaces the table atomically", nil, Build(manyPools(1)),
			[]string{"add-table nftlb", "del-table nftlb", "add-table nftlb",
				// Elements after the rules: a rule binding a map walks its
				// elements, and 10,000 such walks cost 12% of a cold apply.
				"add-set " + SlotMap("p00000") + "/0",
				"add-chain pool-p00000", "add-rule pool-p00000",
				"add-elements " + SlotMap("p00000") + "/6",
				"add-set services/0", "add-elements services/1", "add-chain prerouting", "add-chain output", "add-chain postrouting", "add-chain nudge",
				"add-rule prerouting", "add-rule output", "add-rule postrouting", "add-rule nudge",
				"add-set backends-conn/0", "add-elements backends-conn/3", "add-set backends-tx/0", "add-elements backends-tx/3",
				"add-set backends-rx/0", "add-elements backends-rx/3", "add-chain forward",
				"add-rule forward", "add-rule forward", "add-rule forward"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var r recorder
			if err := queue(&r, tt.prev, tt.next, Diff(tt.prev, tt.next)); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(r.ops, tt.want) {
				t.Errorf("ops:\n  %s\nwant:\n  %s", strings.Join(r.ops, "\n  "), strings.Join(tt.want, "\n  "))
			}
		})
	}
}

func TestCanonical(t *testing.T) {
	// The same table as nft lists it after incremental changes: other
	// element order and wrapping, objects in creation order, live counters,
	// and the key type of a netlink-made map.
	kernel := `table ip nftlb {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr . meta l4proto . th dport vmap @services comment "managed by nftlb; edits are overwritten"
	}

	counter pool-a {
		packets 12 bytes 720
	}

	map pool-a {
		type 0 : ipv4_addr . inet_service
		elements = { 1 : 198.18.1.12 . 80, 0 : 198.18.1.11 . 80 }
	}

	map services {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 198.18.100.1 . tcp . 80 : goto pool-a }
	}

	chain pool-a {
		counter name "pool-a" reject with tcp reset
	}
}
`
	render := `table ip nftlb {
	counter pool-a {
		packets 0 bytes 0
	}

	map pool-a {
		typeof numgen inc mod 2 : ip daddr . tcp dport
		elements = { 0 : 198.18.1.11 . 80,
			     1 : 198.18.1.12 . 80 }
	}

	map services {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 198.18.100.1 . tcp . 80 : goto pool-a }
	}

	chain pool-a {
		counter name "pool-a" reject with tcp reset
	}

	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr . meta l4proto . th dport vmap @services comment "managed by nftlb; edits are overwritten"
	}
}
`
	if a, b := Canonical(kernel), Canonical(render); a != b {
		t.Errorf("canonical forms differ:\n%s\n---\n%s", a, b)
	}
	zero := strings.Replace(render, "tcp . 80 :", "tcp . 80 counter packets 0 bytes 0 :", 1)
	live := strings.Replace(render, "tcp . 80 :", "tcp . 80 counter packets 9 bytes 99 :", 1)
	if a, b := Canonical(zero), Canonical(live); a != b {
		t.Errorf("element counter values not normalized:\n%s\n---\n%s", a, b)
	}
	if a, b := Canonical(render), Canonical(strings.Replace(render, "198.18.1.12", "198.18.1.13", 1)); a == b {
		t.Error("canonical form hid a different element")
	}
}

func TestPlanDescribe(t *testing.T) {
	base := goldenSpecs()["readme"]
	prev := Build(base)
	next := base
	next.Pools = slices.Clone(base.Pools)
	next.Pools[0].Backends = next.Pools[0].Backends[:2]
	next.Pools[1].Name = "np"
	nt := Build(next)
	got := Diff(prev, nt).Describe(prev, nt)
	ka := SlotMap("kube-apiserver")
	for _, want := range []string{
		"~ pool kube-apiserver 198.18.100.1:6443/tcp",
		"-   chain pool-kube-apiserver: meta mark set meta mark | 0x00100000 ct mark set ct mark | 0x00100000 meta l4proto tcp dnat ip to numgen inc mod 6 map @" + ka,
		"+   chain pool-kube-apiserver: meta mark set meta mark | 0x00100000 ct mark set ct mark | 0x00100000 meta l4proto tcp dnat ip to numgen inc mod 2 map @" + ka,
		"-   slot: 2 -> 198.18.1.13:6443",
		"- pool nodeport-http 198.18.100.2:80/tcp",
		"+ pool np 198.18.100.2:80/tcp",
		"+   slots 0 -> 198.18.1.11:30080, 1 -> 198.18.1.12:30080",
		"~ map " + ka + ": 4 elements deleted, 0 added",
		"+ map " + SlotMap("np"),
	} {
		if !strings.Contains(got, want) {
			t.Errorf("Describe lacks %q:\n%s", want, got)
		}
	}
	if got := Diff(prev, prev).Describe(prev, prev); got != "table ip nftlb: no changes\n" {
		t.Errorf("no-op: %q", got)
	}
	if got := Diff(nil, prev).Describe(nil, prev); !strings.HasPrefix(got, "table ip nftlb would be created:\ntable ip nftlb {") {
		t.Errorf("create: %q", got)
	}
}
