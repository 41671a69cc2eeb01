// Package flows acts on the connections nftlb has already balanced: it
// counts the conntrack entries per backend and, when a backend becomes
// unreachable, deletes its entries and nudges its TCP clients so that they
// notice at once instead of waiting for their own timeouts.
//
// New connections avoid a backend as soon as it leaves its pool's map, but
// a connection already DNATed to it keeps its conntrack entry (and so its
// NAT binding) and an idle client never finds out that the peer is gone.
// Flush fixes both, for a batch of failed backends ([Target]) at once:
//
//  1. it deletes the conntrack entries that nftlb DNATed (ct mark bit
//     [ruleset.ConnMark], set by every pool chain) from the target's VIP:port
//     to the backend, all targets in one walk of the conntrack table;
//  2. for TCP it sends each affected client a pair of out-of-window pure
//     ACKs (see [nudges]) from the flow's original destination (VIP:port)
//     through a raw socket marked [ruleset.NudgeMark], which the table's
//     nudge chain exempts from conntrack.
//
// Matching on the ct mark and the VIP, not on the backend alone, leaves
// alone the flows that other software (kube-proxy, Docker) DNATs to the same
// address and port, and those of another pool that shares the backend and
// still considers it healthy.
//
// We do not know the client's receive window, so one ACK with a random
// sequence number would land inside it with probability window/2^32 and
// leave that client untouched. The pair's sequence numbers are s and
// s+2^31: a receive window is below 2^31 wide (at most 65535<<14 < 2^30),
// so it cannot hold both and at least one ACK is out of window.
//
// The client answers an unacceptable ACK with a duplicate ACK (RFC 793
// 3.9); it answers at most one of the pair, since Linux rate-limits those
// answers per socket (net.ipv4.tcp_invalid_ratelimit), and one is enough.
// With the entry gone, that ACK starts a new conntrack flow
// (nf_conntrack_tcp_loose, on by default, picks up mid-stream ACKs), so
// nftlb's rules DNAT it to a healthy backend. That backend has no such
// socket and answers with a RST whose sequence number is the ACK's
// acknowledgment number, exactly the client's rcv_nxt; conntrack un-NATs it
// to come from VIP:port and the client's connection is reset. The client
// then reconnects through a healthy backend. A busy client needs no nudge
// (its next segment takes the same path), an idle one does. UDP flows need
// only the deletion: the next datagram is balanced anew.
//
// Only IPv4 (nftlb's table is family ip). Flows works in the network
// namespace of the thread that called [New]: its sockets are created there
// and stay there, whichever thread uses them later.
package flows

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/nftlb/nftlb/internal/ruleset"
)

// dumpAttempts bounds the retries of a conntrack dump that the kernel
// interrupted (the table changed during the dump: NLM_F_DUMP_INTR).
const dumpAttempts = 5

// netlinkTimeout bounds each send and receive on the netlink socket, so a
// wedged kernel cannot hang the daemon.
const netlinkTimeout = 10 * time.Second

// ErrClosed is returned by methods of a closed Flows.
var ErrClosed = errors.New("flows: closed")

// errCountAborted is what the callers sharing a Count dump get if the dump
// panicked instead of returning.
var errCountAborted = errors.New("flows: conntrack count aborted")

// Flows deletes and counts the conntrack entries of balanced flows and
// sends the client nudges. Its methods are safe for concurrent use.
type Flows struct {
	mu     sync.Mutex      // serializes the use of h and raw
	h      *netlink.Handle // NETLINK_NETFILTER socket, in New's namespace
	raw    int             // AF_INET/SOCK_RAW/IPPROTO_RAW socket with SO_MARK, in New's namespace
	loose  bool
	closed atomic.Bool // set under mu; read without it by Count's cached path

	// Count's cache and its in-flight dump, guarded by cmu (never held
	// during a dump, so a cached Count never waits for a Flush).
	cmu      sync.Mutex
	cache    *countCall // last successful dump, nil if none or invalidated
	inflight *countCall // the dump running now, shared by its callers
	gen      uint64     // bumped by every Flush that deleted entries

	now      func() time.Time // time.Now; tests substitute a clock
	dumps    atomic.Int64     // conntrack dumps started (Flush and Count), for tests
	testHook func(event string)
}

// countCall is one Count dump: its result, shared by every caller that
// arrived while it ran, and then cached.
type countCall struct {
	done   chan struct{} // closed when counts and err are set
	at     time.Time     // when the dump started: the counts are at least this old
	gen    uint64        // Flows.gen when the dump started
	counts map[netip.AddrPort]int
	err    error
}

// New opens a conntrack netlink socket and a raw IPv4 socket (marked
// [ruleset.NudgeMark]) in the network namespace of the calling thread; a
// caller that is not in the initial namespace must hold its OS thread
// locked (runtime.LockOSThread, or lab.NS.Do in tests). Needs CAP_NET_ADMIN
// (conntrack, SO_MARK) and CAP_NET_RAW.
func New() (*Flows, error) {
	h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("flows: open conntrack netlink socket: %w", err)
	}
	if err := h.SetSocketTimeout(netlinkTimeout); err != nil {
		h.Close()
		return nil, fmt.Errorf("flows: conntrack netlink socket timeout: %w", err)
	}
	// IPPROTO_RAW implies IP_HDRINCL and makes the socket send-only.
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("flows: open raw socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(ruleset.NudgeMark)); err != nil {
		unix.Close(fd)
		h.Close()
		return nil, fmt.Errorf("flows: raw socket SO_MARK: %w", err)
	}
	return &Flows{h: h, raw: fd, loose: readLoose(), now: time.Now}, nil
}

// readLoose reports nf_conntrack_tcp_loose of the calling thread's
// namespace (/proc/sys/net resolves per thread); unreadable counts as on,
// the kernel default.
func readLoose() bool {
	b, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_tcp_loose")
	return err != nil || strings.TrimSpace(string(b)) != "0"
}

// LooseTracking reports whether net.netfilter.nf_conntrack_tcp_loose was on
// in the namespace when New ran. With it off, conntrack treats the client's
// answer to a nudge as invalid instead of starting a new flow, so nudges
// cannot reset anything: the daemon should warn.
func (f *Flows) LooseTracking() bool { return f.loose }

// Close releases both sockets. Idempotent.
func (f *Flows) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed.Load() {
		return nil
	}
	f.closed.Store(true)
	f.h.Close()
	return unix.Close(f.raw)
}

func (f *Flows) hook(event string) {
	if f.testHook != nil {
		f.testHook(event)
	}
}

// Target is one failed backend of one pool: its flows are nftlb's (their ct
// mark has [ruleset.ConnMark]), go to VIP (the pool's vip:port, the flow's
// original destination) and were DNATed to Backend (the reply source), with
// protocol Proto ("tcp" or "udp"). Nudge asks for the TCP clients of the
// deleted flows to be nudged (see [Flows.Flush]); it is ignored for UDP.
type Target struct {
	VIP, Backend netip.AddrPort
	Proto        string
	Nudge        bool
}

// TargetResult is what Flush did for one target.
type TargetResult struct {
	Deleted int // conntrack entries deleted
	Nudged  int // TCP clients nudged
}

// Result says what one Flush did.
type Result struct {
	// Deleted is the number of conntrack entries deleted (including ones
	// that vanished on their own between the dump and the delete).
	Deleted int
	// Nudged is the number of TCP clients nudged: clients, not packets.
	// Each client is sent a pair of ACKs (see [nudges]) and counts once,
	// when both were sent; a client with a failed send is reported in
	// Flush's error instead.
	Nudged int
	// PerTarget has one element per target passed to Flush, in the same
	// order; Deleted and Nudged are their sums. An invalid target, or a
	// repeat of an earlier one, has zero counts.
	PerTarget []TargetResult
}

// Flush deletes the conntrack entries of every target in one dump of the
// conntrack table, then, for the TCP targets with Nudge set, sends the
// client of each deleted entry a pair of out-of-window ACKs (see [nudges])
// from the entry's original destination (the target's VIP).
//
// An entry matches a target when its ct mark has [ruleset.ConnMark] (nftlb's
// pool chains DNATed it), its protocol is the target's, its original
// destination is the target's VIP and its reply source is the target's
// Backend. So the LB host's own connections to the backend (health checks),
// traffic routed to it directly, flows that other NAT rules (kube-proxy,
// Docker, another table) send to it and flows of another pool that shares
// the backend are all left alone. Only TCP entries in a state with a
// synchronized client socket (SYN_RECV through LAST_ACK) are nudged: an
// entry in SYN_SENT has no use for one (the client retransmits its SYN,
// which is balanced anew) and would answer with a RST, and TIME_WAIT/CLOSE
// entries have no socket left.
//
// A target with an unknown protocol or a non-IPv4 address is reported in the
// error and skipped; the others are still flushed. A target repeated (same
// VIP, Backend and Proto) is flushed once, its counts going to its first
// occurrence, and nudged if any occurrence asks for it. With no valid
// target Flush does not dump the table.
//
// Flush removes the targets' entries; it does not stop new ones: take the
// backends out of their pools' maps first. On error the Result still counts
// what was done. A Flush that deleted entries invalidates Count's cache.
func (f *Flows) Flush(targets []Target) (Result, error) {
	res := Result{PerTarget: make([]TargetResult, len(targets))}
	m, errs := newFlushMatcher(targets)

	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed.Load() {
		return res, ErrClosed
	}
	if len(m.keys) == 0 {
		return res, errors.Join(errs...)
	}

	for attempt := 1; ; attempt++ {
		f.dumps.Add(1)
		// The second filter only sees the flows whose deletion failed (see
		// deleteFailed) and never matches.
		n, err := f.h.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, m, deleteFailed{m})
		res.Deleted += int(n)
		if err == nil {
			break
		}
		// An interrupted dump still had its matches deleted; dump again
		// for the ones it missed (deleted entries are not seen twice).
		if errors.Is(err, netlink.ErrDumpInterrupted) && attempt < dumpAttempts {
			continue
		}
		errs = append(errs, fmt.Errorf("flows: delete conntrack entries of %d targets: %w", len(m.keys), err))
		break
	}
	for i, n := range m.deleted {
		res.PerTarget[i].Deleted = n
	}
	if res.Deleted > 0 {
		f.invalidateCounts()
	}

	for _, p := range m.nudges {
		to := &unix.SockaddrInet4{Addr: p.client.Addr().As4()}
		sent := 0
		for i, n := range nudges(p.nudgeTarget, rand.Uint32(), rand.Uint32(), uint16(rand.Uint32())) {
			if err := unix.Sendto(f.raw, buildNudge(n), 0, to); err != nil {
				errs = append(errs, fmt.Errorf("flows: nudge %d/2 to %s from %s: %w", i+1, p.client, p.vip, err))
				continue
			}
			sent++
		}
		if sent == 2 {
			res.Nudged++
			res.PerTarget[p.target].Nudged++
		}
	}
	return res, errors.Join(errs...)
}

// invalidateCounts drops Count's cache and keeps a dump already running
// (which may have seen the entries just deleted) from filling it.
func (f *Flows) invalidateCounts() {
	f.cmu.Lock()
	f.gen++
	f.cache = nil
	f.cmu.Unlock()
}

// Count returns the number of open connections per backend (reply source:
// the post-DNAT backend address and port), TCP and UDP together, from one
// dump of the conntrack table. It counts only nftlb's connections (ct mark
// bit [ruleset.ConnMark], DNATed) and, for TCP, leaves out entries in
// TIME_WAIT and CLOSE, connections already closed that conntrack remembers
// for a while.
//
// The result of a successful dump is cached: a call within maxAge of the
// start of the last one returns its counts without dumping again (maxAge <= 0
// always dumps), and callers that arrive while a dump runs wait for it and
// share its result. A Flush that deletes entries drops the cache. Each
// caller gets its own copy of the map.
//
// A dump the kernel interrupts (the table changed meanwhile) is retried; if
// the last attempt is interrupted too, the counts of that partial dump are
// returned, not cached, with an error wrapping netlink.ErrDumpInterrupted.
func (f *Flows) Count(maxAge time.Duration) (map[netip.AddrPort]int, error) {
	if f.closed.Load() {
		return nil, ErrClosed
	}
	f.cmu.Lock()
	if c := f.cache; c != nil && f.now().Sub(c.at) < maxAge {
		f.cmu.Unlock()
		return maps.Clone(c.counts), nil
	}
	if c := f.inflight; c != nil {
		f.cmu.Unlock()
		f.hook("wait")
		<-c.done
		return maps.Clone(c.counts), c.err
	}
	c := &countCall{done: make(chan struct{}), at: f.now(), gen: f.gen, err: errCountAborted}
	f.inflight = c
	f.cmu.Unlock()

	defer func() {
		f.cmu.Lock()
		f.inflight = nil
		if c.err == nil && c.gen == f.gen {
			f.cache = c
		}
		f.cmu.Unlock()
		close(c.done)
	}()
	c.counts, c.err = f.countDump()
	return maps.Clone(c.counts), c.err
}

// countDump dumps the conntrack table once (retrying interrupted dumps) and
// counts nftlb's open connections per backend.
func (f *Flows) countDump() (map[netip.AddrPort]int, error) {
	f.hook("dump")
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed.Load() {
		return nil, ErrClosed
	}
	var list []*netlink.ConntrackFlow
	var err error
	for attempt := 1; ; attempt++ {
		f.dumps.Add(1)
		list, err = f.h.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
		if err == nil {
			break
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return nil, fmt.Errorf("flows: list conntrack entries: %w", err)
		}
		if attempt == dumpAttempts {
			err = fmt.Errorf("flows: list conntrack entries: %d attempts: %w", attempt, err)
			break
		}
	}
	counts := map[netip.AddrPort]int{}
	for _, fl := range list {
		if rs, ok := countable(fl); ok {
			counts[rs]++
		}
	}
	return counts, err
}

// countable reports whether Count counts fl, and for which backend: an
// open TCP or UDP connection that nftlb DNATed.
func countable(fl *netlink.ConntrackFlow) (netip.AddrPort, bool) {
	if !ours(fl) || !dnated(fl) {
		return netip.AddrPort{}, false
	}
	switch fl.Forward.Protocol {
	case protoTCP:
		if closedTCP(fl) {
			return netip.AddrPort{}, false
		}
	case protoUDP:
	default:
		return netip.AddrPort{}, false
	}
	return replySource(fl)
}

func protoNumber(proto string) (uint8, error) {
	switch proto {
	case "tcp":
		return protoTCP, nil
	case "udp":
		return protoUDP, nil
	}
	return 0, fmt.Errorf("protocol %q: want tcp or udp", proto)
}

// nudgeTarget is one client to nudge: the ACK goes from vip to client.
type nudgeTarget struct {
	client, vip netip.AddrPort
}

// nudges returns the two ACKs that nudge t's client: sequence numbers seq
// and seq+2^31 (mod 2^32), the same ack, IP IDs id and id+1. Whatever the
// client's state, the sequence numbers it accepts in a bare ACK form one
// range of at most window+1 numbers (RFC 793: rcv_nxt..rcv_nxt+window;
// Linux's tcp_sequence: rcv_wup..rcv_wup+rcv_wnd, rcv_wup being rcv_nxt at
// the last window update), and a window is at most 65535<<14 < 2^30. Two
// numbers 2^31 apart cannot both lie in a range that short, so at least one
// ACK of the pair is out of window and draws the duplicate ACK that resets
// the client. Pure: the caller picks seq, ack and id.
func nudges(t nudgeTarget, seq, ack uint32, id uint16) [2]nudgePacket {
	n := nudgePacket{From: t.vip, To: t.client, Seq: seq, Ack: ack, ID: id}
	m := n
	m.Seq, m.ID = seq+1<<31, id+1
	return [2]nudgePacket{n, m}
}

// flowKey identifies the flows of one target.
type flowKey struct {
	proto        uint8
	vip, backend netip.AddrPort
}

// keyTarget is what a flowKey maps to: the target's index and whether its
// clients are nudged.
type keyTarget struct {
	index int
	nudge bool
}

// pendingNudge is a client to nudge once the deletions are done, and the
// index of the target it counts for.
type pendingNudge struct {
	nudgeTarget
	target int
}

// flushMatcher is the netlink.CustomConntrackFilter of one Flush: it
// matches the flows of all its targets (ConntrackDeleteFilters deletes every
// match) and records, per target, the deletions and the clients to nudge
// afterwards.
type flushMatcher struct {
	keys    map[flowKey]keyTarget
	deleted []int // per target index
	seen    map[nudgeTarget]bool
	nudges  []pendingNudge

	// The flow matched last, until the next call: deleteFailed undoes its
	// records if the library reports its deletion as failed.
	last       *netlink.ConntrackFlow
	lastTarget int
	lastNudge  bool // last added the final element of nudges
}

// newFlushMatcher validates targets and returns their matcher and one error
// per invalid target.
func newFlushMatcher(targets []Target) (*flushMatcher, []error) {
	m := &flushMatcher{keys: map[flowKey]keyTarget{}, deleted: make([]int, len(targets)), seen: map[nudgeTarget]bool{}}
	var errs []error
	for i, t := range targets {
		p, err := protoNumber(t.Proto)
		if err != nil {
			errs = append(errs, fmt.Errorf("flows: target %d (%s -> %s): %w", i, t.VIP, t.Backend, err))
			continue
		}
		vip, be := unmap(t.VIP), unmap(t.Backend)
		if !vip.Addr().Is4() || !be.Addr().Is4() {
			errs = append(errs, fmt.Errorf("flows: target %d (%s -> %s): only IPv4 is supported", i, t.VIP, t.Backend))
			continue
		}
		k := flowKey{proto: p, vip: vip, backend: be}
		kt, dup := m.keys[k]
		if !dup {
			kt.index = i
		}
		kt.nudge = kt.nudge || (t.Nudge && p == protoTCP)
		m.keys[k] = kt
	}
	return m, errs
}

func (m *flushMatcher) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	m.last = nil
	if !ours(fl) {
		return false
	}
	vip, ok1 := addrPort(fl.Forward.DstIP, fl.Forward.DstPort)
	backend, ok2 := replySource(fl)
	if !ok1 || !ok2 {
		return false
	}
	kt, ok := m.keys[flowKey{proto: fl.Forward.Protocol, vip: vip, backend: backend}]
	if !ok {
		return false
	}
	m.deleted[kt.index]++
	m.last, m.lastTarget, m.lastNudge = fl, kt.index, false
	if kt.nudge && nudgeable(fl) {
		client, ok := addrPort(fl.Forward.SrcIP, fl.Forward.SrcPort)
		if t := (nudgeTarget{client, vip}); ok && !m.seen[t] {
			m.seen[t] = true
			m.nudges = append(m.nudges, pendingNudge{t, kt.index})
			m.lastNudge = true
		}
	}
	return true
}

// deleteFailed is the filter ConntrackDeleteFilters tries after the
// flushMatcher. The library tries a flow's filters in order and stops at the
// first match whose delete succeeds (or finds the entry gone); when the
// delete fails it goes on to the next filter. So deleteFailed is called with
// the flow the matcher just matched only if that flow's deletion failed, and
// then undoes the matcher's records of it: the per-target counts add up to
// the library's, and a client whose entry is still there is not nudged
// (its answer would reach the old backend). The library counts the failure
// in its error. It never matches.
type deleteFailed struct{ m *flushMatcher }

func (d deleteFailed) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	m := d.m
	if m.last == nil || fl != m.last {
		return false
	}
	m.deleted[m.lastTarget]--
	if m.lastNudge {
		p := m.nudges[len(m.nudges)-1]
		m.nudges = m.nudges[:len(m.nudges)-1]
		delete(m.seen, p.nudgeTarget)
	}
	m.last = nil
	return false
}

// ours reports whether nftlb's pool chains handled the flow: its ct mark
// has the ConnMark bit.
func ours(fl *netlink.ConntrackFlow) bool {
	return fl.Mark&ruleset.ConnMark != 0
}

// replySource is the reply tuple's source: for a DNATed flow, the backend.
func replySource(fl *netlink.ConntrackFlow) (netip.AddrPort, bool) {
	return addrPort(fl.Reverse.SrcIP, fl.Reverse.SrcPort)
}

// dnated reports whether the flow's destination was translated: its
// original destination differs from the source of its replies.
func dnated(fl *netlink.ConntrackFlow) bool {
	dst, ok1 := addrPort(fl.Forward.DstIP, fl.Forward.DstPort)
	rs, ok2 := replySource(fl)
	return ok1 && ok2 && dst != rs
}

func tcpState(fl *netlink.ConntrackFlow) (uint8, bool) {
	if pi, ok := fl.ProtoInfo.(*netlink.ProtoInfoTCP); ok && pi != nil {
		return pi.State, true
	}
	return 0, false
}

// nudgeable: the client has a synchronized socket that an ACK can provoke.
// An entry without a TCP state (never seen so far) is nudged: a nudge is
// harmless where it is not needed.
func nudgeable(fl *netlink.ConntrackFlow) bool {
	s, ok := tcpState(fl)
	return !ok || (s >= nl.TCP_CONNTRACK_SYN_RECV && s <= nl.TCP_CONNTRACK_LAST_ACK)
}

func closedTCP(fl *netlink.ConntrackFlow) bool {
	s, ok := tcpState(fl)
	return ok && (s == nl.TCP_CONNTRACK_TIME_WAIT || s == nl.TCP_CONNTRACK_CLOSE)
}

func addrPort(ip net.IP, port uint16) (netip.AddrPort, bool) {
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a.Unmap(), port), true
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
