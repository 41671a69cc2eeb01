package ruleset

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
)

// conn is a lasting netlink connection inside the namespace, closed on cleanup.
func (n *scratchNS) conn() *nftables.Conn {
	n.t.Helper()
	c, err := nftables.New(nftables.WithNetNSFd(int(n.fd)), nftables.AsLasting())
	if err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { _ = c.CloseLasting() })
	return c
}

func assertReadEquals(t *testing.T, c *nftables.Conn, want *Table, what string) {
	t.Helper()
	got, err := Read(c, want.Name)
	if err != nil {
		t.Fatalf("%s: Read: %v", what, err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s: Read differs from what was applied:\n got %s\nwant %s", what, dumpTable(got), dumpTable(want))
	}
}

func dumpTable(t *Table) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s masq=%v accounted=%#v\n", t.Name, t.Masquerade, t.Accounted)
	for _, p := range t.Pools {
		fmt.Fprintf(&b, "  %#v\n", p)
	}
	return b.String()
}

// Read gives back exactly the Table that was applied, for every golden
// spec and after each step of the incremental change sequence.
func TestReadRoundTrips(t *testing.T) {
	ns := newScratchNS(t)
	c := ns.conn()
	if _, err := Read(c, "nftlb"); !errors.Is(err, ErrNoTable) {
		t.Fatalf("Read of a missing table: %v, want ErrNoTable", err)
	}
	specs := goldenSpecs()
	names := make([]string, 0, len(specs))
	for name := range specs {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		tbl := Build(specs[name])
		if _, err := ns.applier().Apply(tbl); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		assertReadEquals(t, c, tbl, "golden "+name)
	}
	a := ns.applier()
	for i, spec := range changeSteps() {
		tbl := Build(spec)
		if _, err := a.Apply(tbl); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		assertReadEquals(t, c, tbl, fmt.Sprintf("step %d", i))
	}
	big := Build(manyPools(300))
	if _, err := a.Apply(big); err != nil {
		t.Fatal(err)
	}
	assertReadEquals(t, c, big, "300 pools")
}

// Damage done by hand yields ErrUnrecognized or a Table that differs from
// the applied one; never a panic and never the applied Table.
func TestReadDetectsDamage(t *testing.T) {
	ka, np := SlotMap("kube-apiserver"), SlotMap("nodeport-http")
	damage := []struct {
		name string
		nft  string // nft -f input
		// unrecognized: Read must fail with ErrUnrecognized and this text;
		// empty: Read may instead succeed with a different Table.
		unrecognized string
	}{
		{"map element deleted", "delete element ip nftlb " + ka + " { 0 }", ""},
		{"last map element deleted", "delete element ip nftlb " + ka + " { 5 }", ""},
		{"map element added past a pool", "add element ip nftlb " + np + " { 2 : 198.18.1.13 . 30080 }", ""},
		{"map element far from any pool", "add element ip nftlb " + ka + " { 100000 : 198.18.1.13 . 6443 }", ""},
		{"modulus changed", "flush chain ip nftlb pool-kube-apiserver\nadd rule ip nftlb pool-kube-apiserver meta mark set meta mark | 0x00100000 ct mark set ct mark | 0x00100000 meta l4proto tcp dnat ip to numgen inc mod 4 map @" + ka, ""},
		{"offset changed", "flush chain ip nftlb pool-kube-apiserver\nadd rule ip nftlb pool-kube-apiserver meta mark set meta mark | 0x00100000 ct mark set ct mark | 0x00100000 meta l4proto tcp dnat ip to numgen inc mod 6 offset 6 map @" + ka, ""},
		{"rule reads another pool's map", "flush chain ip nftlb pool-kube-apiserver\nadd rule ip nftlb pool-kube-apiserver meta mark set meta mark | 0x00100000 ct mark set ct mark | 0x00100000 meta l4proto tcp dnat ip to numgen inc mod 6 map @" + np, "set " + ka + ": unexpected"},
		{"map element changed", "delete element ip nftlb " + ka + " { 1 }\nadd element ip nftlb " + ka + " { 1 : 198.18.1.99 . 6443 }", ""},
		{"pool chain flushed", "flush chain ip nftlb pool-kube-apiserver", "chain pool-kube-apiserver: rule count 0, want 1"},
		{"rule added to pool chain", "add rule ip nftlb pool-nodeport-http counter", "chain pool-nodeport-http: rule count 2, want 1"},
		{"forward chain deleted", "flush chain ip nftlb forward\ndelete chain ip nftlb forward", "chain forward: missing"},
		{"postrouting flushed", "flush chain ip nftlb postrouting", ""},
		{"rule added to postrouting", "add rule ip nftlb postrouting counter", "chain postrouting: rule count 2, want 0 or 1"},
		{"rule added to forward", "add rule ip nftlb forward counter", "chain forward: rule count 4, want 3"},
		{"prerouting rule replaced", "flush chain ip nftlb prerouting\nadd rule ip nftlb prerouting ip daddr . meta l4proto . th dport vmap @services", "chain prerouting: rule 1: userdata"},
		{"nudge mark changed", "flush chain ip nftlb nudge\nadd rule ip nftlb nudge meta mark 0x00400000 notrack", "chain nudge: rule 1: expression 2 (cmp)"},
		{"chain policy changed", "chain ip nftlb output { policy drop; }", "chain output: type nat hook 3 priority -100 policy drop"},
		{"extra chain", "add chain ip nftlb extra", "chain extra: unexpected"},
		{"extra set", "add set ip nftlb extra { type ipv4_addr; }", "set extra: unexpected"},
		{"extra counter", "add counter ip nftlb extra", "counter extra: unexpected"},
		{"extra quota", "add quota ip nftlb extra { 25 mbytes }", "object extra: type 2, want counter"},
		{"dispatch element deleted", "delete element ip nftlb services { 198.18.100.1 . tcp . 6443 }", "chain pool-kube-apiserver: unexpected"},
		{"dispatch element to another verdict", "add element ip nftlb services { 198.18.100.9 . tcp . 1 : accept }", "verdict code 1, want goto"},
		{"dispatch to a foreign chain", "add chain ip nftlb mine\nadd element ip nftlb services { 198.18.100.9 . tcp . 1 : goto mine }", "goto mine, want a pool chain"},
		{"second dispatch to a pool", "add element ip nftlb services { 198.18.100.9 . tcp . 1 : goto pool-kube-apiserver }", "both goto pool-kube-apiserver"},
		{"dispatch with another protocol", "add element ip nftlb services { 198.18.100.9 . sctp . 1 : goto pool-kube-apiserver }", "protocol 132"},
		{"accounting element deleted", "delete element ip nftlb backends-tx { 198.18.1.11 . tcp . 6443 }", "set backends-tx: elements differ from backends-conn"},
		{"accounting element deleted everywhere", "delete element ip nftlb backends-conn { 198.18.1.11 . tcp . 6443 }\ndelete element ip nftlb backends-tx { 198.18.1.11 . tcp . 6443 }\ndelete element ip nftlb backends-rx { 198.18.1.11 . tcp . 6443 }", ""},
		{"table dormant", "add table ip nftlb { flags dormant; }", "table flags 0x1, want none"},
		{"rule v0.3.0 cannot decode", "add rule ip nftlb pool-kube-apiserver ct original ip daddr 198.18.1.1", "cannot decode"},
	}
	ns := newScratchNS(t)
	c := ns.conn()
	want := Build(goldenSpecs()["readme"])
	for _, d := range damage {
		t.Run(strings.ReplaceAll(d.name, " ", "_"), func(t *testing.T) {
			_, _ = ns.nftErr("delete", "table", "ip", "nftlb") // damaged tables may not be ours any more
			a := ns.applier()
			if _, err := a.Apply(want); err != nil {
				t.Fatal(err)
			}
			assertReadEquals(t, c, want, "before damage")
			ns.nftInput(d.nft+"\n", "-f", "-")
			got, err := Read(c, "nftlb")
			switch {
			case err != nil && !errors.Is(err, ErrUnrecognized):
				t.Fatalf("Read: %v, want ErrUnrecognized", err)
			case err != nil && !strings.Contains(err.Error(), d.unrecognized):
				t.Errorf("Read: %v, want it to say %q", err, d.unrecognized)
			case err == nil && d.unrecognized != "":
				t.Errorf("Read succeeded (%s), want ErrUnrecognized saying %q", dumpTable(got), d.unrecognized)
			case err == nil && reflect.DeepEqual(got, want):
				t.Errorf("Read gives the applied Table despite the damage")
			}
			if err != nil {
				t.Logf("%v", err)
			}
			// Check sees the damage and the next Apply repairs it:
			// incrementally when the table was still recognised.
			d, err := a.Check()
			if err != nil || !d.Drifted() {
				t.Fatalf("Check = %v, %v; want drift", d, err)
			}
			res, err := a.Apply(want)
			if err != nil {
				t.Fatalf("repair: %v", err)
			}
			if res.Plan.Full != (d.Unrecognized != "") {
				t.Errorf("repair plan Full = %v after drift %v", res.Plan.Full, d)
			}
			assertKernelMatches(t, ns, want)
			assertReadEquals(t, c, want, "after repair")
			if d, err := a.Check(); err != nil || d.Drifted() {
				t.Errorf("Check after repair = %v, %v; want no drift", d, err)
			}
		})
	}
}
