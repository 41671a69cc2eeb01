// Package lab builds throw-away network-namespace topologies for nftlb's
// end-to-end tests: a client, a load balancer/router and N backends, each in
// its own network namespace, wired with veth pairs and a bridge.
//
//	client ns (<prefix>-c)        LB ns (<prefix>-lb)                 backend ns (<prefix>-bI)
//	eth0 198.18.0.2/24 ---veth--- eth0 198.18.0.1/24
//	default via 198.18.0.1        default via 198.18.0.2
//	                              ip_forward=1
//	                              br0 198.18.1.1/24 -- vbI ---veth--- eth0 198.18.1.(10+I)/24
//	                                                                  default via 198.18.1.1
//
// VIPs live in 198.18.100.0/24 (see [VIP]) and exist only as nftables DNAT
// rules on the LB: the client reaches them through its default route, and
// the LB's default route (towards the client, which plays "upstream") lets
// the LB host itself originate connections to a VIP, which the daemon DNATs
// in the nat output hook.
//
// Every interface is created inside the lab's namespaces; nothing is added
// to the root namespace, and every address is in 198.18.0.0/15. Namespace
// names are [NSPrefix] + 6 random hex digits + a role suffix, so parallel
// labs never collide; [CleanupStale] removes leftovers of crashed runs.
//
// Backends run in-process servers ([Backend.ServeTCP], [Backend.ServeHTTP],
// [Backend.ServeUDP]) whose sockets are created inside the backend namespace
// (see [NS.Do]) and then served by ordinary goroutines.
//
// The lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and the iproute2 `ip`
// command; tests call [RequireRoot] (or [NewT], which calls it).
package lab

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// testHookSetup, if set, runs near the end of setup; an error makes New
// fail there (tests of the cleanup of a half-built lab).
var testHookSetup func(*Lab) error

// NSPrefix starts the name of every namespace a lab creates.
const NSPrefix = "nlbt"

// Interface names inside the lab namespaces.
const (
	ClientIf  = "eth0" // client's interface towards the LB
	LBUpIf    = "eth0" // LB's interface towards the client
	LBBridge  = "br0"  // LB's bridge holding one port per backend
	BackendIf = "eth0" // backend's interface towards the LB bridge
)

// Options tune [New]. The zero value is a valid lab with 3 backends.
type Options struct {
	// Backends is the number of backends (default 3, at most MaxBackends).
	Backends int
}

// MaxBackends bounds Options.Backends (addresses 198.18.1.11 upwards).
const MaxBackends = 200

// setupTimeout bounds the wait for links to come up in New and SetLink.
const setupTimeout = 10 * time.Second

var (
	clientAddr    = netip.MustParseAddr("198.18.0.2")
	lbClientAddr  = netip.MustParseAddr("198.18.0.1")
	lbBackendAddr = netip.MustParseAddr("198.18.1.1")
)

// VIP returns 198.18.100.host, an address in the VIP range 198.18.100.0/24
// that is not configured anywhere: only DNAT rules give it a meaning.
func VIP(host byte) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 100, host}) }

// BackendAddr returns the address of backend i (1-based): 198.18.1.(10+i).
func BackendAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 1, byte(10 + i)}) }

// Lab is a running topology. Create it with [New] or [NewT] and always
// [Lab.Close] it.
type Lab struct {
	// Prefix is NSPrefix plus 6 random hex digits; every namespace of the
	// lab is named Prefix + "-" + role ("c", "lb", "b1", ...).
	Prefix string
	// Client and LB are the client and load-balancer namespaces.
	Client, LB *NS
	// Backends are in order b1..bN.
	Backends []*Backend
	// ClientAddr is the client's address (198.18.0.2), LBClientAddr the
	// LB's address on the client link (198.18.0.1), LBBackendAddr the LB's
	// address on the backend bridge (198.18.1.1).
	ClientAddr, LBClientAddr, LBBackendAddr netip.Addr

	closeOnce sync.Once
	closeErr  error
}

// Namespaces returns every namespace of the lab: client, LB, backends.
func (l *Lab) Namespaces() []*NS {
	nss := []*NS{l.Client, l.LB}
	for _, b := range l.Backends {
		nss = append(nss, b.NS)
	}
	return nss
}

// Backend returns backend i (1-based, like its name "bI").
func (l *Lab) Backend(i int) *Backend { return l.Backends[i-1] }

// New creates the namespaces and links of a lab and waits until every link
// is up and every bridge port forwards. If anything fails, whatever was
// created is deleted again.
func New(opts Options) (*Lab, error) {
	if opts.Backends == 0 {
		opts.Backends = 3
	}
	if opts.Backends < 0 || opts.Backends > MaxBackends {
		return nil, fmt.Errorf("lab: Backends = %d, want 1..%d", opts.Backends, MaxBackends)
	}
	prefix, err := newPrefix()
	if err != nil {
		return nil, err
	}
	l := &Lab{
		Prefix:        prefix,
		Client:        &NS{Name: prefix + "-c"},
		LB:            &NS{Name: prefix + "-lb"},
		ClientAddr:    clientAddr,
		LBClientAddr:  lbClientAddr,
		LBBackendAddr: lbBackendAddr,
	}
	for i := 1; i <= opts.Backends; i++ {
		name := "b" + strconv.Itoa(i)
		l.Backends = append(l.Backends, &Backend{
			Name:  name,
			NS:    &NS{Name: prefix + "-" + name},
			Addr:  BackendAddr(i),
			index: i,
			lab:   l,
		})
	}
	if err := l.setup(); err != nil {
		if cerr := deleteNamespaces(l.nsNames()); cerr != nil {
			err = errors.Join(err, fmt.Errorf("lab: cleanup after failed setup: %w", cerr))
		}
		return nil, err
	}
	return l, nil
}

// newPrefix picks a random prefix that no existing namespace uses, so that
// cleaning up after a failed setup can never delete someone else's
// namespace.
func newPrefix() (string, error) {
	for range 10 {
		var rnd [3]byte
		if _, err := rand.Read(rnd[:]); err != nil {
			return "", fmt.Errorf("lab: random prefix: %w", err)
		}
		prefix := NSPrefix + hex.EncodeToString(rnd[:])
		taken, err := filepath.Glob(filepath.Join(netnsDir, prefix+"-*"))
		if err != nil {
			return "", err
		}
		if len(taken) == 0 {
			return prefix, nil
		}
	}
	return "", errors.New("lab: no free namespace prefix")
}

// NewT is New for tests: it calls [RequireRoot], registers Close with
// t.Cleanup and fails the test if the lab cannot be built.
func NewT(t testing.TB, opts Options) *Lab {
	t.Helper()
	RequireRoot(t)
	l, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("lab close: %v", err)
		}
	})
	return l
}

func (l *Lab) nsNames() []string {
	var names []string
	for _, n := range l.Namespaces() {
		names = append(names, n.Name)
	}
	return names
}

func (l *Lab) setup() error {
	var add []string
	for _, name := range l.nsNames() {
		add = append(add, "netns add "+name)
	}
	if err := ipBatch("", add); err != nil {
		return err
	}

	// LB: create every link here, moving the far ends into client and
	// backend namespaces, so that no interface ever exists in the root ns.
	lb := []string{
		fmt.Sprintf("link add %s type veth peer name %s netns %s", LBUpIf, ClientIf, l.Client.Name),
		"link add " + LBBridge + " type bridge",
	}
	for _, b := range l.Backends {
		lb = append(lb,
			fmt.Sprintf("link add %s type veth peer name %s netns %s", b.lbPort(), BackendIf, b.NS.Name),
			fmt.Sprintf("link set %s master %s", b.lbPort(), LBBridge))
	}
	lb = append(lb, "link set lo up", "link set "+LBUpIf+" up", "link set "+LBBridge+" up")
	for _, b := range l.Backends {
		lb = append(lb, "link set "+b.lbPort()+" up")
	}
	lb = append(lb,
		fmt.Sprintf("addr add %s/24 dev %s", lbClientAddr, LBUpIf),
		fmt.Sprintf("addr add %s/24 dev %s", lbBackendAddr, LBBridge),
		fmt.Sprintf("route add default via %s dev %s", clientAddr, LBUpIf))
	if err := ipBatch(l.LB.Name, lb); err != nil {
		return err
	}
	// Forwarding, and no ICMP redirects: a packet for a VIP without a
	// DNAT rule bounces between client and LB until its TTL runs out.
	err := l.LB.Do(func() error {
		return writeSysctls(map[string]string{
			"net/ipv4/ip_forward":                         "1",
			"net/ipv4/conf/all/send_redirects":            "0",
			"net/ipv4/conf/" + LBUpIf + "/send_redirects": "0",
		})
	})
	if err != nil {
		return fmt.Errorf("lab: sysctl in %s: %w", l.LB.Name, err)
	}

	// Client and backends are independent of each other.
	var wg sync.WaitGroup
	errs := make([]error, len(l.Backends)+1)
	wg.Go(func() {
		errs[0] = ipBatch(l.Client.Name, []string{
			"link set lo up",
			"link set " + ClientIf + " up",
			fmt.Sprintf("addr add %s/24 dev %s", clientAddr, ClientIf),
			fmt.Sprintf("route add default via %s dev %s", lbClientAddr, ClientIf),
		})
	})
	for i, b := range l.Backends {
		wg.Go(func() {
			errs[i+1] = ipBatch(b.NS.Name, []string{
				"link set lo up",
				"link set " + BackendIf + " up",
				fmt.Sprintf("addr add %s/24 dev %s", b.Addr, BackendIf),
				fmt.Sprintf("route add default via %s dev %s", lbBackendAddr, BackendIf),
			})
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if testHookSetup != nil {
		if err := testHookSetup(l); err != nil {
			return err
		}
	}
	return l.waitLinks(l.lbLinks())
}

// lbLinks returns the names of the LB's links that must be up:
// name -> whether it is a bridge port that must also be forwarding.
func (l *Lab) lbLinks() map[string]bool {
	want := map[string]bool{LBUpIf: false, LBBridge: false}
	for _, b := range l.Backends {
		want[b.lbPort()] = true
	}
	return want
}

// waitLinks polls until the LB links of want (see lbLinks) are
// operationally up and, for bridge ports, forwarding, so that the first
// SYN of a test is not lost to a link that is still coming up (TCP would
// retransmit it only after a second).
func (l *Lab) waitLinks(want map[string]bool) error {
	var notReady []string
	err := poll(setupTimeout, func() (bool, error) {
		var err error
		notReady, err = l.linksNotReady(want)
		return len(notReady) == 0, err
	})
	if errors.Is(err, errPollTimeout) {
		return fmt.Errorf("lab: links in %s not ready after %v: %s", l.LB.Name, setupTimeout, strings.Join(notReady, ", "))
	}
	return err
}

var errPollTimeout = errors.New("timed out")

// poll calls cond every few milliseconds until it reports true or fails,
// or timeout passes (errPollTimeout).
func poll(timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := cond()
		if err != nil || ok {
			return err
		}
		if time.Now().After(deadline) {
			return errPollTimeout
		}
		<-tick.C
	}
}

// linksNotReady returns the links of want (name -> is a bridge port) that
// are not up (or not forwarding) in the LB namespace.
func (l *Lab) linksNotReady(want map[string]bool) ([]string, error) {
	out, err := ipOutput(l.LB.Name, "-j", "-d", "link", "show")
	if err != nil {
		return nil, err
	}
	var links []struct {
		Name      string `json:"ifname"`
		OperState string `json:"operstate"`
		LinkInfo  struct {
			SlaveData struct {
				State string `json:"state"`
			} `json:"info_slave_data"`
		} `json:"linkinfo"`
	}
	if err := json.Unmarshal(out, &links); err != nil {
		return nil, fmt.Errorf("lab: parse ip -j link show in %s: %w", l.LB.Name, err)
	}
	seen := map[string]bool{}
	var bad []string
	for _, ln := range links {
		port, ok := want[ln.Name]
		if !ok {
			continue
		}
		seen[ln.Name] = true
		switch {
		case ln.OperState != "UP":
			bad = append(bad, ln.Name+" "+ln.OperState)
		case port && ln.LinkInfo.SlaveData.State != "forwarding":
			bad = append(bad, ln.Name+" "+ln.LinkInfo.SlaveData.State)
		}
	}
	for name := range want {
		if !seen[name] {
			bad = append(bad, name+" missing")
		}
	}
	return bad, nil
}

// Close stops every server of the lab and deletes all its namespaces. It
// is idempotent and safe to call from several goroutines; later calls
// return the first call's result.
//
// Close does not kill processes started in the namespaces (start them with
// a context that is canceled first, e.g. t.Context()); a namespace with a
// live process stays alive, unnamed, until the process exits.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() {
		var errs []error
		for _, b := range l.Backends {
			errs = append(errs, b.closeServers())
		}
		errs = append(errs, deleteNamespaces(l.nsNames()))
		l.closeErr = errors.Join(errs...)
	})
	return l.closeErr
}

// staleName matches the namespaces New creates.
var staleName = regexp.MustCompile(`^` + NSPrefix + `[0-9a-f]{6}-(c|lb|b[0-9]+)$`)

// CleanupStale deletes every namespace left behind by a lab (named
// NSPrefix + 6 hex digits + "-" + role), e.g. after a crashed test run.
// Never call it while labs are in use: it deletes theirs too.
func CleanupStale() error {
	return cleanupStale(staleName.MatchString)
}

func cleanupStale(match func(string) bool) error {
	names, err := listNamespaces()
	if err != nil {
		return err
	}
	var stale []string
	for _, n := range names {
		if match(n) {
			stale = append(stale, n)
		}
	}
	return deleteNamespaces(stale)
}

// listNamespaces returns the names `ip netns list` shows.
func listNamespaces() ([]string, error) {
	out, err := ipOutput("", "netns", "list")
	if err != nil {
		return nil, err
	}
	var names []string
	for line := range strings.Lines(string(out)) {
		if f := strings.Fields(line); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	return names, nil
}

// deleteNamespaces deletes the named namespaces, tolerating those that do
// not exist, and checks that none of them is left.
func deleteNamespaces(names []string) error {
	if len(names) == 0 {
		return nil
	}
	var cmds []string
	for _, n := range names {
		cmds = append(cmds, "netns delete "+n)
	}
	// -force: go on after a failed line (a namespace that was never
	// created); success is judged by listing what is left.
	batchErr := ipBatchArgs([]string{"-force"}, cmds)
	left, err := listNamespaces()
	if err != nil {
		return errors.Join(batchErr, err)
	}
	del := map[string]bool{}
	for _, n := range names {
		del[n] = true
	}
	var remaining []string
	for _, n := range left {
		if del[n] {
			remaining = append(remaining, n)
		}
	}
	if len(remaining) > 0 {
		return fmt.Errorf("lab: namespaces not deleted: %s: %w", strings.Join(remaining, " "), batchErr)
	}
	return nil
}

// ipBatch runs `ip [-n ns] -batch -` with cmds as its input.
func ipBatch(ns string, cmds []string) error {
	var args []string
	if ns != "" {
		args = []string{"-n", ns}
	}
	return ipBatchArgs(args, cmds)
}

func ipBatchArgs(args, cmds []string) error {
	args = append(args, "-batch", "-")
	cmd := exec.Command("ip", args...)
	script := strings.Join(cmds, "\n") + "\n"
	cmd.Stdin = strings.NewReader(script)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("lab: ip %s <<%q: %w: %s", strings.Join(args, " "), script, err, strings.TrimSpace(out.String()))
	}
	return nil
}

// ipOutput runs `ip [-n ns] args...` and returns its stdout.
func ipOutput(ns string, args ...string) ([]byte, error) {
	if ns != "" {
		args = append([]string{"-n", ns}, args...)
	}
	cmd := exec.Command("ip", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("lab: ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// writeSysctls writes /proc/sys entries (key = path below /proc/sys).
// /proc/sys/net resolves to the network namespace of the calling thread,
// so run it inside [NS.Do].
func writeSysctls(kv map[string]string) error {
	for k, v := range kv {
		if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
			return err
		}
	}
	return nil
}

var (
	rootOnce sync.Once
	rootErr  error
)

// RequireRoot skips the test unless the process can build labs: root with
// CAP_SYS_ADMIN and CAP_NET_ADMIN, and a working `ip netns`. When the
// environment variable CI is set, it fails the test instead, so that a CI
// job cannot silently skip the lab tests.
func RequireRoot(t testing.TB) {
	t.Helper()
	rootOnce.Do(func() { rootErr = checkRoot() })
	if rootErr == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("needs root and network namespaces: %v", rootErr)
	}
	t.Skipf("skipping network-namespace lab test (needs root and network namespaces): %v", rootErr)
}

func checkRoot() error {
	if os.Geteuid() != 0 {
		return errors.New("not running as root")
	}
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return err
	}
	for line := range strings.Lines(string(status)) {
		hexCaps, ok := strings.CutPrefix(line, "CapEff:")
		if !ok {
			continue
		}
		caps, err := strconv.ParseUint(strings.TrimSpace(hexCaps), 16, 64)
		if err != nil {
			return fmt.Errorf("parse CapEff: %w", err)
		}
		const capNetAdmin, capSysAdmin = 12, 21
		if caps&(1<<capNetAdmin) == 0 || caps&(1<<capSysAdmin) == 0 {
			return errors.New("missing CAP_NET_ADMIN or CAP_SYS_ADMIN")
		}
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("iproute2: %w", err)
	}
	if _, err := ipOutput("", "netns", "list"); err != nil {
		return err
	}
	return nil
}
