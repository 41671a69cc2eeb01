package ruleset

import (
	"context"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

var (
	chainLine  = regexp.MustCompile(`^\s*chain (\S+) \{`)
	handleLine = regexp.MustCompile(`# handle (\d+)$`)
)

// ruleHandles maps each chain of an `nft -a list` listing to its rules' handles.
func ruleHandles(listing string) map[string][]string {
	out := map[string][]string{}
	chain := ""
	for _, line := range strings.Split(listing, "\n") {
		if m := chainLine.FindStringSubmatch(line); m != nil {
			chain = m[1]
			out[chain] = []string{}
			continue
		}
		if m := handleLine.FindStringSubmatch(line); m != nil && chain != "" && !strings.Contains(line, "{") {
			out[chain] = append(out[chain], m[1])
		}
		if strings.TrimSpace(line) == "}" {
			chain = ""
		}
	}
	return out
}

// newConnection makes the LB host open one TCP connection to vip:port,
// which the output chain counts and DNATs to the pool's next slot. Only
// slot addresses put on lo answer (with a reset: nothing listens).
func (n *scratchNS) newConnection(target string, local ...string) {
	n.t.Helper()
	script := "ip link set lo up"
	for _, a := range local {
		script += "; ip addr replace " + a + "/32 dev lo"
	}
	if out, err := exec.Command("ip", "netns", "exec", n.name, "sh", "-c", script).CombinedOutput(); err != nil {
		n.t.Fatalf("%s: %v: %s", script, err, out)
	}
	host, port, _ := strings.Cut(target, ":")
	// Refused at once by the local slot address; the error is the point.
	_ = exec.Command("ip", "netns", "exec", n.name, "timeout", "5", "bash", "-c",
		"exec 3<>/dev/tcp/"+host+"/"+port).Run()
}

// A restarted daemon (a new Applier) with the same config adopts the
// table: nothing is sent, no rule is rewritten, counters keep counting.
func TestRestartWithSameConfigSendsNothing(t *testing.T) {
	ns := newScratchNS(t)
	spec := goldenSpecs()["readme"]
	if _, err := ns.applier().Apply(Build(spec)); err != nil {
		t.Fatal(err)
	}
	ns.newConnection("198.18.100.1:6443", "198.18.100.1", "198.18.1.11")
	counter := ns.nft("list", "map", "ip", "nftlb", "services")
	if !strings.Contains(counter, "198.18.100.1 . tcp . 6443 counter packets 1 ") {
		t.Fatalf("no connection counted:\n%s", counter)
	}
	before := ns.nft("-a", "list", "table", "ip", "nftlb")
	res, err := ns.applier().Apply(Build(spec))
	if err != nil {
		t.Fatal(err)
	}
	if !res.Adopted || !res.Plan.Empty() || res.Fallback != "" {
		t.Errorf("restart: Adopted %v, Plan %+v, Fallback %q; want adopted, empty plan", res.Adopted, res.Plan, res.Fallback)
	}
	if after := ns.nft("-a", "list", "table", "ip", "nftlb"); after != before {
		t.Errorf("table changed by an unchanged restart:\n%s\n---\n%s", before, after)
	}
	if got := ns.nft("list", "map", "ip", "nftlb", "services"); got != counter {
		t.Errorf("counter changed:\n%s\n---\n%s", counter, got)
	}
}

// With a changed config only the difference is applied: the other rules
// keep their handles (they were not rewritten).
func TestRestartWithChangedConfigAppliesOnlyTheDiff(t *testing.T) {
	ns := newScratchNS(t)
	spec := goldenSpecs()["readme"]
	if _, err := ns.applier().Apply(Build(spec)); err != nil {
		t.Fatal(err)
	}
	before := ruleHandles(ns.nft("-a", "list", "table", "ip", "nftlb"))
	spec.Pools = slices.Clone(spec.Pools)
	spec.Pools[0].Backends = spec.Pools[0].Backends[:2] // kube-apiserver: one backend down
	next := Build(spec)
	res, err := ns.applier().Apply(next)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Adopted || res.Plan.Full || len(res.Plan.Pools) != 1 || res.Plan.Pools[0].Name != "kube-apiserver" {
		t.Fatalf("restart with a change: Adopted %v, Plan %+v; want only pool kube-apiserver", res.Adopted, res.Plan)
	}
	assertKernelMatches(t, ns, next)
	after := ruleHandles(ns.nft("-a", "list", "table", "ip", "nftlb"))
	for chain, handles := range before {
		if chain == "pool-kube-apiserver" {
			if slices.Equal(after[chain], handles) {
				t.Errorf("chain %s: rule not rewritten (handles %v)", chain, handles)
			}
			continue
		}
		if !slices.Equal(after[chain], handles) {
			t.Errorf("chain %s: handles %v, were %v", chain, after[chain], handles)
		}
	}
}

// A table nftlb does not recognise (an extra rule here) is replaced whole,
// and the Result says why.
func TestRestartReplacesUnrecognizedTable(t *testing.T) {
	ns := newScratchNS(t)
	tbl := Build(goldenSpecs()["readme"])
	if _, err := ns.applier().Apply(tbl); err != nil {
		t.Fatal(err)
	}
	ns.nft("add", "rule", "ip", "nftlb", "postrouting", "counter")
	res, err := ns.applier().Apply(tbl)
	if err != nil {
		t.Fatal(err)
	}
	if res.Adopted || !res.Plan.Full || !strings.Contains(res.Fallback, "chain postrouting: rule count 2") {
		t.Errorf("Adopted %v, Full %v, Fallback %q; want a full replace because of postrouting", res.Adopted, res.Plan.Full, res.Fallback)
	}
	assertKernelMatches(t, ns, tbl)
}

// watchTrace records what Watch received.
type watchTrace struct {
	mu     sync.Mutex
	events []traced
}

type traced struct {
	typ       uint16
	family    byte
	table     string
	pid       uint32
	signalled bool
}

func (w *watchTrace) record(m netlink.Message, table string, signalled bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var family byte
	if len(m.Data) > 0 {
		family = m.Data[0]
	}
	w.events = append(w.events, traced{uint16(m.Header.Type & 0xff), family, table, m.Header.PID, signalled})
}

func (w *watchTrace) take() []traced {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.events
	w.events = nil
	return out
}

func watch(t *testing.T, a *Applier) (<-chan struct{}, *watchTrace) {
	t.Helper()
	tr := &watchTrace{}
	a.watchTrace = tr.record
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := a.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		for range ch { // closed once the watcher has stopped
		}
	})
	return ch, tr
}

func waitSignal(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case _, ok := <-ch:
		if !ok {
			t.Fatalf("%s: watch channel closed", what)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no signal within 5s", what)
	}
}

func drain(ch <-chan struct{}) {
	select {
	case <-ch:
	default:
	}
}

// nft flush ruleset: Watch signals, Check reports the table gone, Apply
// restores it. The Applier's own transactions are seen but not signalled.
func TestCheckAfterFlushRuleset(t *testing.T) {
	ns := newScratchNS(t)
	a := ns.applier()
	ch, tr := watch(t, a)
	tbl := Build(goldenSpecs()["readme"])
	if _, err := a.Apply(tbl); err != nil {
		t.Fatal(err)
	}
	if d, err := a.Check(); err != nil || d.Drifted() {
		t.Fatalf("Check after Apply = %v, %v; want no drift", d, err)
	}
	ns.nft("flush", "ruleset")
	waitSignal(t, ch, "flush ruleset")
	// Messages are handled in order: our Apply's came before the flush's.
	own, foreign := 0, 0
	for _, e := range tr.take() {
		if e.table != "nftlb" {
			continue
		}
		if e.pid == a.pid.Load() {
			own++
			if e.signalled {
				t.Errorf("own change signalled: %+v", e)
			}
		} else if e.signalled {
			foreign++
		}
	}
	if own == 0 || foreign == 0 {
		t.Errorf("saw %d own and %d signalled foreign events; want both", own, foreign)
	}
	d, err := a.Check()
	if err != nil || !d.Gone {
		t.Fatalf("Check after flush = %+v, %v; want Gone", d, err)
	}
	res, err := a.Apply(tbl)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Plan.Full {
		t.Errorf("restore: Plan %+v; want full", res.Plan)
	}
	assertKernelMatches(t, ns, tbl)
	if d, err := a.Check(); err != nil || d.Drifted() {
		t.Errorf("Check after restore = %v, %v; want no drift", d, err)
	}
}

// A deleted map element: Check reports that pool's map, and the next
// Apply rewrites only that pool's map.
func TestCheckRepairsOnlyTheDamagedPool(t *testing.T) {
	ns := newScratchNS(t)
	a := ns.applier()
	ch, _ := watch(t, a)
	tbl := Build(goldenSpecs()["readme"])
	if _, err := a.Apply(tbl); err != nil {
		t.Fatal(err)
	}
	ns.nft("delete", "element", "ip", "nftlb", SlotMap("kube-apiserver"), "{ 0 }")
	waitSignal(t, ch, "delete element")
	d, err := a.Check()
	if err != nil {
		t.Fatal(err)
	}
	if !d.Drifted() || d.Gone || d.Unrecognized != "" || !slices.Equal(d.Changes, []string{"pool kube-apiserver: map elements differ"}) {
		t.Fatalf("Check = %+v; want map elements of kube-apiserver", d)
	}
	res, err := a.Apply(tbl)
	if err != nil {
		t.Fatal(err)
	}
	p := res.Plan
	if p.Full || p.Masquerade || len(p.AccountAdd)+len(p.AccountDel) > 0 || len(p.Pools) != 1 {
		t.Fatalf("repair plan %+v; want one pool", p)
	}
	if c := p.Pools[0]; c.Name != "kube-apiserver" || !c.Slots || c.Rule || c.Dispatch {
		t.Errorf("repair %+v; want the map of kube-apiserver only", c)
	}
	if len(p.Maps) != 1 || len(p.Maps[0].Del) != 0 || len(p.Maps[0].Add) != 1 || p.Maps[0].Add[0].Key != 0 {
		t.Errorf("repair %+v; want element 0 added back, nothing else", p.Maps)
	}
	assertKernelMatches(t, ns, tbl)
	if d, err := a.Check(); err != nil || d.Drifted() {
		t.Errorf("Check after repair = %v, %v", d, err)
	}
}

// Other tables are not drift, and their events are not signalled.
func TestOtherTablesAreNotDrift(t *testing.T) {
	ns := newScratchNS(t)
	a := ns.applier()
	ch, tr := watch(t, a)
	tbl := Build(goldenSpecs()["readme"])
	if _, err := a.Apply(tbl); err != nil {
		t.Fatal(err)
	}
	ns.nftInput("add table ip other\nadd set ip other s { type ipv4_addr; }\nadd element ip other s { 10.0.0.1 }\n"+
		"add table inet nftlb\nadd chain inet nftlb c\n", "-f", "-")
	// A change of ours after them: once it is signalled, the watcher has
	// handled the other tables' events too.
	ns.nft("add", "element", "ip", "nftlb", "backends-conn", "{ 198.18.1.99 . tcp . 1 }")
	waitSignal(t, ch, "barrier")
	other, inet := 0, 0
	for _, e := range tr.take() {
		switch {
		case e.table == "other":
			other++
		case e.family == unix.NFPROTO_INET:
			inet++
		default:
			continue
		}
		if e.signalled {
			t.Errorf("signalled for another table: %+v", e)
		}
	}
	if other < 3 || inet < 2 {
		t.Errorf("saw %d events of table ip other and %d of inet nftlb; want at least 3 and 2", other, inet)
	}
	ns.nft("delete", "element", "ip", "nftlb", "backends-conn", "{ 198.18.1.99 . tcp . 1 }")
	waitSignal(t, ch, "barrier removed")
	if d, err := a.Check(); err != nil || d.Drifted() {
		t.Errorf("Check = %v, %v; want no drift", d, err)
	}
}
