package e2e

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nftlb/nftlb/internal/lab"
	"github.com/nftlb/nftlb/internal/ruleset"
)

const (
	apiPort  = 6443
	nodePort = 30080
	udpPort  = 5353
)

// newLab starts a lab whose backends serve "who" on 6443 and 30080 and
// UDP on 5353.
func newLab(t *testing.T, backends int) *lab.Lab {
	t.Helper()
	l := lab.NewT(t, lab.Options{Backends: backends})
	for _, b := range l.Backends {
		if _, err := b.ServeTCP(apiPort); err != nil {
			t.Fatal(err)
		}
		if _, err := b.ServeTCP(nodePort); err != nil {
			t.Fatal(err)
		}
		if _, err := b.ServeUDP(udpPort); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// poolYAML is one pool entry; extra is indented YAML added to the pool.
func poolYAML(name string, vipHost byte, port int, backends []string, extra string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  - name: %s\n    vip: %s\n    port: %d\n", name, lab.VIP(vipHost), port)
	if extra != "" {
		b.WriteString(extra)
	}
	b.WriteString("    backends:\n")
	for _, be := range backends {
		fmt.Fprintf(&b, "      - %s\n", be)
	}
	return b.String()
}

func configYAML(head string, pools ...string) string {
	return head + "pools:\n" + strings.Join(pools, "")
}

func backendsOn(l *lab.Lab, port int) []string {
	var out []string
	for _, b := range l.Backends {
		out = append(out, fmt.Sprintf("%s:%d", b.Addr, port))
	}
	return out
}

func vipAddr(host byte, port int) string { return fmt.Sprintf("%s:%d", lab.VIP(host), port) }

func TestRoundRobinExactShares(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	d := startDaemon(t, l, configYAML("", poolYAML("kube-apiserver", 1, apiPort, backendsOn(l, apiPort), "")))
	assertKernelMatchesRender(t, d, "nftlb")
	count, order := shares(t, l, vipAddr(1, apiPort), 30)
	for _, b := range l.Backends {
		if count[b.Name] != 10 {
			t.Errorf("round-robin over 30 connections: %v, want 10 each", count)
			break
		}
	}
	// numgen inc: every window of three consecutive connections hits all three.
	for i := 0; i+3 <= len(order); i += 3 {
		if order[i] == order[i+1] || order[i] == order[i+2] || order[i+1] == order[i+2] {
			t.Errorf("connections %d-%d went to %v, not one each", i, i+2, order[i:i+3])
		}
	}
}

func TestWeights(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	bs := backendsOn(l, apiPort)
	weighted := []string{
		"address: " + bs[0], // weight 1 (default)
		"address: " + bs[1] + "\n        weight: 2",
		"address: " + bs[2] + "\n        weight: 3",
	}
	startDaemon(t, l, configYAML("", poolYAML("web", 1, apiPort, weighted, "")))
	count, _ := shares(t, l, vipAddr(1, apiPort), 60)
	if count["b1"] != 10 || count["b2"] != 20 || count["b3"] != 30 {
		t.Errorf("weights 1:2:3 over 60 connections gave %v, want b1=10 b2=20 b3=30", count)
	}
}

func TestSourceHashIsSticky(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	d := startDaemon(t, l, configYAML("", poolYAML("sticky", 1, apiPort, backendsOn(l, apiPort), "    scheduler: source-hash\n")))
	count, _ := shares(t, l, vipAddr(1, apiPort), 20)
	if len(count) != 1 {
		t.Fatalf("source-hash sent one client to several backends: %v", count)
	}
	var first string
	for name := range count {
		first = name
	}
	// A reload that adds another pool rewrites nothing of this one, and
	// the hash seed is fixed, so the client stays where it was.
	d.reload(configYAML("",
		poolYAML("sticky", 1, apiPort, backendsOn(l, apiPort), "    scheduler: source-hash\n"),
		poolYAML("other", 2, apiPort, backendsOn(l, apiPort), "")))
	if got, _ := who(t, l.Client, l, vipAddr(1, apiPort)); got != first {
		t.Errorf("after a reload the client moved from %s to %s", first, got)
	}
}

// NodePort: the VIP listens on 80, the backends on 30080.
func TestBackendPortDiffersFromVIPPort(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	startDaemon(t, l, configYAML("", poolYAML("ingress", 1, 80, backendsOn(l, nodePort), "")))
	count, _ := shares(t, l, vipAddr(1, 80), 9)
	if len(count) != 3 {
		t.Errorf("VIP :80 -> backends :30080 gave %v, want all three", count)
	}
}

func TestUDPPool(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	startDaemon(t, l, configYAML("", poolYAML("dns", 1, udpPort, backendsOn(l, udpPort), "    protocol: udp\n")))
	count := map[string]int{}
	for i := range 9 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		name, _, err := l.WhoUDP(ctx, l.Client, vipAddr(1, udpPort))
		cancel()
		if err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		count[name]++
	}
	if count["b1"] != 3 || count["b2"] != 3 || count["b3"] != 3 {
		t.Errorf("UDP round-robin over 9 flows: %v, want 3 each", count)
	}
}

// Only connections nftlb DNATed are masqueraded: a backend sees the LB's
// address for VIP traffic, and the client's own address for traffic that
// is merely routed through the LB.
func TestMasqueradeIsScopedToVIPTraffic(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	d := startDaemon(t, l, configYAML("", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), "")))
	_, viaVIP := who(t, l.Client, l, vipAddr(1, apiPort))
	if !strings.HasPrefix(viaVIP, l.LBBackendAddr.String()+":") {
		t.Errorf("via the VIP the backend saw %s, want the LB's %s", viaVIP, l.LBBackendAddr)
	}
	_, routed := who(t, l.Client, l, fmt.Sprintf("%s:%d", l.Backend(1).Addr, apiPort))
	if !strings.HasPrefix(routed, l.ClientAddr.String()+":") {
		t.Errorf("plainly routed, the backend saw %s, want the client's %s", routed, l.ClientAddr)
	}
	// masquerade: false keeps the client's address for VIP traffic too (the
	// backends route replies back through the LB).
	d.reload(configYAML("masquerade: false\n", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), "")))
	if _, src := who(t, l.Client, l, vipAddr(1, apiPort)); !strings.HasPrefix(src, l.ClientAddr.String()+":") {
		t.Errorf("masquerade: false, the backend saw %s, want the client's %s", src, l.ClientAddr)
	}
}

func TestLBHostReachesVIP(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	startDaemon(t, l, configYAML("", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), "")))
	seen := map[string]bool{}
	for range 3 {
		name, _ := who(t, l.LB, l, vipAddr(1, apiPort))
		seen[name] = true
	}
	if len(seen) != 3 {
		t.Errorf("the LB host's own connections reached %v, want all three backends", seen)
	}
}

// nftlb owns one table: an unrelated table (rules, counters, a named
// counter) is byte-for-byte the same after run, reload, stop and cleanup.
func TestOtherTablesUntouched(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	nftInput(t, l, `table inet fw {
	counter seen { packets 5 bytes 500 }
	chain input {
		type filter hook input priority 0; policy accept;
		ip saddr 198.19.255.254 counter packets 3 bytes 180 drop
	}
}
table ip nat {
	chain prerouting {
		type nat hook prerouting priority dstnat - 10; policy accept;
		ip daddr 198.19.255.253 tcp dport 1 counter packets 0 bytes 0 dnat to 198.19.255.252
	}
}
`)
	list := func() string {
		return nft(t, l, "-a", "list", "table", "inet", "fw") + nft(t, l, "-a", "list", "table", "ip", "nat")
	}
	before := list()
	d := startDaemon(t, l, configYAML("", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), "")))
	who(t, l.Client, l, vipAddr(1, apiPort))
	d.reload(configYAML("", poolYAML("api2", 2, apiPort, backendsOn(l, apiPort), "")))
	if err := d.stop(); err != nil {
		t.Fatalf("nftlb exit: %v", err)
	}
	if out, err := nftlb(t, l, "cleanup"); err != nil {
		t.Fatalf("cleanup: %v: %s", err, out)
	}
	if after := list(); after != before {
		t.Errorf("other tables changed:\n--- before\n%s\n--- after\n%s", before, after)
	}
}

func TestReloadAddsAndRemovesPools(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	bs := backendsOn(l, apiPort)
	d := startDaemon(t, l, configYAML("", poolYAML("a", 1, apiPort, bs, "")))
	if got := d.reload(configYAML("", poolYAML("a", 1, apiPort, bs, ""), poolYAML("b", 2, apiPort, bs[:1], ""))); got != "ruleset applied" {
		t.Fatalf("reload: %s", got)
	}
	assertKernelMatchesRender(t, d, "nftlb")
	if name, _ := who(t, l.Client, l, vipAddr(2, apiPort)); name != "b1" {
		t.Errorf("new pool b went to %s, want b1", name)
	}
	if got := d.reload(configYAML("", poolYAML("b", 2, apiPort, bs[:1], ""))); got != "ruleset applied" {
		t.Fatalf("reload: %s", got)
	}
	assertKernelMatchesRender(t, d, "nftlb")
	if strings.Contains(nft(t, l, "list", "table", "ip", "nftlb"), lab.VIP(1).String()) {
		t.Error("removed pool a's VIP is still in the table")
	}
	// The same file again changes nothing in the kernel.
	if got := d.reload(configYAML("", poolYAML("b", 2, apiPort, bs[:1], ""))); got != "ruleset unchanged" {
		t.Errorf("identical reload: %s, want ruleset unchanged", got)
	}
}

func TestReloadWithBrokenFileChangesNothing(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	good := configYAML("", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), ""))
	d := startDaemon(t, l, good)
	before := nft(t, l, "-a", "list", "table", "ip", "nftlb")
	broken := configYAML("", poolYAML("api", 1, 70000, []string{"198.18.1.11:6443", "not-an-ip"}, ""))
	if got := d.reload(broken); got != "reload rejected" {
		t.Fatalf("broken reload: %s", got)
	}
	logs := d.logs.String()
	for _, want := range []string{"lb.yaml:4:11: pools[0].port: must be 1-65535, got 70000", "pools[0].backends[1]"} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
	if after := nft(t, l, "-a", "list", "table", "ip", "nftlb"); after != before {
		t.Errorf("table changed after a rejected reload:\n%s\n---\n%s", before, after)
	}
	shares(t, l, vipAddr(1, apiPort), 3)
	// And the next good file is applied as usual.
	if got := d.reload(configYAML("", poolYAML("api", 1, apiPort, backendsOn(l, apiPort)[:2], ""))); got != "ruleset applied" {
		t.Errorf("good reload after a broken one: %s", got)
	}
}

// SIGTERM exits 0 and leaves the rules: a restart or upgrade drops no
// traffic. A new daemon adopts its table: with the same config it
// rewrites nothing (rule handles unchanged).
func TestStopLeavesTrafficFlowingAndRestartTakesOver(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	cfg := configYAML("", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), ""))
	d := startDaemon(t, l, cfg)
	handles := nft(t, l, "-a", "list", "table", "ip", "nftlb")
	d.signal(syscall.SIGTERM)
	<-d.exited
	if d.err != nil {
		t.Fatalf("exit after SIGTERM: %v, want status 0", d.err)
	}
	count, _ := shares(t, l, vipAddr(1, apiPort), 6)
	if len(count) != 3 {
		t.Errorf("after SIGTERM traffic reached %v, want all three backends", count)
	}
	d2 := startDaemon(t, l, cfg)
	assertKernelMatchesRender(t, d2, "nftlb")
	if !strings.Contains(d2.logs.String(), "adopted=true") {
		t.Errorf("restart did not adopt its table:\n%s", d2.logs)
	}
	if after := nft(t, l, "-a", "list", "table", "ip", "nftlb"); ruleset.Canonical(after) != ruleset.Canonical(handles) || !sameHandles(handles, after) {
		t.Errorf("restart with the same config rewrote the table:\n%s\n---\n%s", handles, after)
	}
}

func TestCleanupRemovesOnlyItsTable(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	nftInput(t, l, "table ip keep {\n\tchain c {\n\t\tcounter\n\t}\n}\n")
	d := startDaemon(t, l, configYAML("table: lbtest\n", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), "")))
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	out, err := nftlb(t, l, "cleanup", "-table", "lbtest")
	if err != nil || !strings.Contains(out, "removed table ip lbtest") {
		t.Fatalf("cleanup: %v: %s", err, out)
	}
	tables := nft(t, l, "list", "tables")
	if strings.Contains(tables, "lbtest") || !strings.Contains(tables, "table ip keep") {
		t.Errorf("after cleanup: %s", tables)
	}
	out, err = nftlb(t, l, "cleanup", "-table", "lbtest")
	if err != nil || !strings.Contains(out, "nothing to remove") {
		t.Errorf("second cleanup: %v: %s", err, out)
	}
	// A table nftlb did not create is refused, and kept.
	out, err = nftlb(t, l, "cleanup", "-table", "keep")
	if err == nil || !strings.Contains(out, "not created by nftlb") {
		t.Errorf("cleanup of a foreign table: %v: %s", err, out)
	}
	if !strings.Contains(nft(t, l, "list", "tables"), "table ip keep") {
		t.Error("foreign table removed")
	}
}

// A table of nftlb's name that nftlb did not create stops the start with
// a clear error instead of being taken over.
func TestRefusesForeignTableAtStart(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	nftInput(t, l, "table ip nftlb {\n\tchain c {\n\t\tcounter\n\t}\n}\n")
	cfg := configYAML("", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), ""))
	out, err := nftlb(t, l, "check", "-config", writeTemp(t, cfg))
	if err != nil {
		t.Fatalf("check: %v %s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err = l.LB.Run(ctx, nftlbBin, "run", "-config", writeTemp(t, cfg))
	if err == nil || !strings.Contains(out, "not created by nftlb") {
		t.Errorf("run over a foreign table: %v: %s", err, out)
	}
}

// sameHandles compares the "# handle N" annotations of two nft -a listings.
func sameHandles(a, b string) bool {
	pick := func(s string) []string {
		var out []string
		for _, l := range strings.Split(s, "\n") {
			if i := strings.Index(l, "# handle "); i >= 0 {
				out = append(out, l[i:])
			}
		}
		return out
	}
	return strings.Join(pick(a), ",") == strings.Join(pick(b), ",")
}
