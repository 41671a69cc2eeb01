package ruleset

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"

	"github.com/nftlb/nftlb/internal/lab"
	"github.com/nftlb/nftlb/internal/vip"
)

// scratchNS is an empty network namespace for one test, deleted on cleanup.
type scratchNS struct {
	t    testing.TB
	name string
	fd   netns.NsHandle
}

func newScratchNS(t testing.TB) *scratchNS {
	t.Helper()
	lab.RequireRoot(t)
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := lab.NSPrefix + hex.EncodeToString(b) + "-rs"
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	fd, err := netns.GetFromName(name)
	if err != nil {
		_ = exec.Command("ip", "netns", "del", name).Run()
		t.Fatal(err)
	}
	// The Applier's netlink socket was opened inside the namespace; the fd
	// must outlive it (closing it early made connections talk to the root
	// namespace in google/nftables v0.3.0), so it is closed last.
	t.Cleanup(func() {
		_ = fd.Close()
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	return &scratchNS{t: t, name: name, fd: fd}
}

func (n *scratchNS) applier() *Applier {
	a := NewApplier(nftables.WithNetNSFd(int(n.fd)))
	n.t.Cleanup(func() { _ = a.Close() })
	return a
}

func (n *scratchNS) nft(args ...string) string {
	n.t.Helper()
	out, err := n.nftErr(args...)
	if err != nil {
		n.t.Fatalf("nft %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return out
}

func (n *scratchNS) nftErr(args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", n.name, "nft"}, args...)...).CombinedOutput()
	return string(out), err
}

func (n *scratchNS) nftInput(text string, args ...string) {
	n.t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", n.name, "nft"}, args...)...)
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		n.t.Fatalf("nft %s: %v: %s\ninput:\n%s", strings.Join(args, " "), err, out, text)
	}
}

func assertKernelMatches(t *testing.T, ns *scratchNS, want *Table) {
	t.Helper()
	got := ns.nft("list", "table", "ip", want.Name)
	if a, b := Canonical(got), Canonical(want.Text()); a != b {
		t.Fatalf("kernel table differs from Text():\n--- kernel\n%s\n--- render\n%s", got, want.Text())
	}
}

// Every golden rendering is valid nft input.
func TestGoldenFilesPassNftCheck(t *testing.T) {
	ns := newScratchNS(t)
	files, _ := filepath.Glob("testdata/*.nft")
	if len(files) == 0 {
		t.Fatal("no golden files")
	}
	for _, f := range files {
		text, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		ns.nftInput(string(text), "-c", "-f", "-")
	}
}

// Apply programs exactly what Text describes, on the first (full) apply
// and after every kind of incremental change.
func TestApplyMatchesTextThroughChanges(t *testing.T) {
	ns := newScratchNS(t)
	a := ns.applier()
	for i, spec := range changeSteps() {
		tbl := Build(spec)
		res, err := a.Apply(tbl)
		if err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if (i == 0) != res.Plan.Full {
			t.Errorf("step %d: Full = %v", i, res.Plan.Full)
		}
		assertKernelMatches(t, ns, tbl)
	}
}

// changeSteps is a sequence of specs covering every kind of incremental
// change: a backend down, all down, a pool added, a pool removed with
// masquerade off, scheduler changes, empty pools, no pools, and back.
func changeSteps() []Spec {
	specs := goldenSpecs()
	steps := []Spec{specs["readme"]}
	s := specs["readme"]
	s.Pools = slices.Clone(s.Pools)
	s.Pools[0].Backends = s.Pools[0].Backends[:2] // a backend down
	steps = append(steps, s)
	s.Pools = slices.Clone(s.Pools)
	s.Pools[0].Backends = nil // all down: reject
	steps = append(steps, s)
	s.Pools = append(slices.Clone(s.Pools), specs["weights"].Pools[0]) // pool added
	steps = append(steps, s)
	s.Pools = slices.Clone(s.Pools[1:]) // pool removed
	s.Masquerade = false
	return append(steps, s, specs["schedulers-nomasq"], specs["empty-pools"], specs["no-pools"], specs["readme"])
}

func TestRefusesTableItDidNotCreate(t *testing.T) {
	ns := newScratchNS(t)
	ns.nftInput("table ip nftlb {\n counter mine { }\n chain prerouting {\n type nat hook prerouting priority dstnat; counter accept\n }\n}\n", "-f", "-")
	before := ns.nft("list", "ruleset")
	a := ns.applier()
	_, err := a.Apply(Build(goldenSpecs()["readme"]))
	if !errors.Is(err, ErrNotOwned) {
		t.Fatalf("Apply over a foreign table: err = %v, want ErrNotOwned", err)
	}
	if _, err := a.Remove("nftlb"); !errors.Is(err, ErrNotOwned) {
		t.Fatalf("Remove of a foreign table: err = %v, want ErrNotOwned", err)
	}
	if after := ns.nft("list", "ruleset"); after != before {
		t.Errorf("foreign table changed:\n%s\n---\n%s", before, after)
	}
}

// A restarted daemon (a new Applier) adopts the table left by the last run
// and applies only the difference, and other tables are untouched
// throughout.
func TestRestartAdoptsOwnTableAndLeavesOthers(t *testing.T) {
	ns := newScratchNS(t)
	ns.nftInput("table inet other {\n counter c { packets 7 bytes 70 }\n chain input {\n type filter hook input priority 0; counter packets 3 bytes 30 accept\n }\n}\n", "-f", "-")
	other := ns.nft("list", "table", "inet", "other")
	if _, err := ns.applier().Apply(Build(goldenSpecs()["weights"])); err != nil {
		t.Fatal(err)
	}
	spec := goldenSpecs()["weights"]
	spec.Pools[0].Backends = spec.Pools[0].Backends[:1]
	res, err := ns.applier().Apply(Build(spec))
	if err != nil {
		t.Fatal(err)
	}
	if !res.Adopted || res.Plan.Full || len(res.Plan.Pools) != 1 {
		t.Errorf("a new Applier should adopt the table and change one pool: Adopted %v, Plan %+v", res.Adopted, res.Plan)
	}
	assertKernelMatches(t, ns, Build(spec))
	removed, err := ns.applier().Remove("lb")
	if err != nil || !removed {
		t.Fatalf("Remove = %v, %v", removed, err)
	}
	if _, err := ns.nftErr("list", "table", "ip", "lb"); err == nil {
		t.Error("table still there after Remove")
	}
	if removed, err := ns.applier().Remove("lb"); err != nil || removed {
		t.Errorf("second Remove = %v, %v; want false, nil", removed, err)
	}
	if got := ns.nft("list", "table", "inet", "other"); got != other {
		t.Errorf("table inet other changed:\n%s\n---\n%s", other, got)
	}
}

// Element lists are split across messages: one nested attribute overflows
// its 16-bit length around 1,100 dispatch elements, and a wrapped length
// can make the kernel accept a truncated list without an error.
func TestLargeTableIsComplete(t *testing.T) {
	ns := newScratchNS(t)
	tbl := Build(manyPools(3000))
	if _, err := ns.applier().Apply(tbl); err != nil {
		t.Fatal(err)
	}
	assertKernelMatches(t, ns, tbl)
}

func TestReaderCounters(t *testing.T) {
	ns := newScratchNS(t)
	spec := goldenSpecs()["readme"]
	if _, err := ns.applier().Apply(Build(spec)); err != nil {
		t.Fatal(err)
	}
	// Counters as a live table would have them.
	ns.nft("reset", "counters", "table", "ip", "nftlb")
	r := NewReader(nftables.WithNetNSFd(int(ns.fd)))
	t.Cleanup(func() { _ = r.Close() })
	c, err := r.Counters("nftlb")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Pools) != 2 || len(c.Backends) != 5 {
		t.Errorf("counters: %d pools, %d backends; want 2 and 5: %+v", len(c.Pools), len(c.Backends), c)
	}
	if _, ok := c.Pools["kube-apiserver"]; !ok {
		t.Errorf("no counter for pool kube-apiserver: %+v", c.Pools)
	}
	e := Endpoint{Addr: netip.MustParseAddrPort("198.18.1.12:30080"), Protocol: vip.TCP}
	if _, ok := c.Backends[e]; !ok {
		t.Errorf("no counters for %s: %+v", e, c.Backends)
	}
	if _, err := r.Counters("missing"); err == nil {
		t.Error("Counters of a missing table: no error")
	}
}

// Current reads the kernel's table for a new Applier without changing
// anything; the next Apply adopts it and, unchanged, sends nothing.
func TestCurrentThenApplyAdopts(t *testing.T) {
	ns := newScratchNS(t)
	tbl := Build(goldenSpecs()["readme"])
	if _, err := ns.applier().Apply(tbl); err != nil {
		t.Fatal(err)
	}
	a := ns.applier()
	cur, err := a.Current("nftlb")
	if err != nil || cur == nil {
		t.Fatalf("Current = %v, %v", cur, err)
	}
	if !Same(cur, tbl) {
		t.Errorf("Current differs from what was applied:\n%+v", Diff(cur, tbl))
	}
	res, err := a.Apply(tbl)
	if err != nil || !res.Adopted || !res.Plan.Empty() {
		t.Errorf("Apply after Current: %+v, %v; want adopted and empty", res, err)
	}
	other := goldenSpecs()["readme"]
	other.Pools = slices.Clone(other.Pools)
	other.Pools[0].Backends = other.Pools[0].Backends[:1]
	if Same(cur, Build(other)) {
		t.Error("Same ignores a removed backend")
	}
	if none, err := ns.applier().Current("absent"); err != nil || none != nil {
		t.Errorf("Current of a missing table = %v, %v", none, err)
	}
}
