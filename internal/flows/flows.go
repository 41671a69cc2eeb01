// Package flows acts on the connections nftlb has already balanced: it
// counts the conntrack entries per backend and, when a backend becomes
// unreachable, deletes its entries and nudges its TCP clients so that they
// notice at once instead of waiting for their own timeouts.
//
// New connections avoid a backend as soon as it leaves its pool's map, but
// a connection already DNATed to it keeps its conntrack entry (and so its
// NAT binding) and an idle client never finds out that the peer is gone.
// Flush fixes both:
//
//  1. it deletes the conntrack entries whose reply source is the backend;
//  2. for TCP it sends each affected client a pair of out-of-window pure
//     ACKs (see [nudges]) from the flow's original destination (VIP:port)
//     through a raw socket marked [ruleset.NudgeMark], which the table's
//     nudge chain exempts from conntrack.
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
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
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

// Flows deletes and counts the conntrack entries of balanced flows and
// sends the client nudges. Its methods are safe for concurrent use.
type Flows struct {
	mu     sync.Mutex
	h      *netlink.Handle // NETLINK_NETFILTER socket, in New's namespace
	raw    int             // AF_INET/SOCK_RAW/IPPROTO_RAW socket with SO_MARK, in New's namespace
	loose  bool
	closed bool
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
	return &Flows{h: h, raw: fd, loose: readLoose()}, nil
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
	if f.closed {
		return nil
	}
	f.closed = true
	f.h.Close()
	return unix.Close(f.raw)
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
}

// Flush deletes the conntrack entries of proto ("tcp" or "udp") whose reply
// source is backend, the post-DNAT backend address and port, and, for TCP
// with nudge set, sends the client of each deleted entry a pair of
// out-of-window ACKs (see [nudges]) from the entry's original destination
// (VIP:port), after all the deletions.
//
// Only DNATed entries match (original destination differs from the reply
// source): the LB host's own connections to the backend, such as health
// checks, and traffic routed to the backend's address directly are left
// alone. Only TCP entries in a state with a synchronized client socket
// (SYN_RECV through LAST_ACK) are nudged: an entry in SYN_SENT has no use
// for one (the client retransmits its SYN, which is balanced anew) and
// would answer with a RST, and TIME_WAIT/CLOSE entries have no socket left.
//
// Flush removes the backend's entries; it does not stop new ones: take the
// backend out of its pool's map first. On error the Result still counts
// what was done.
func (f *Flows) Flush(backend netip.AddrPort, proto string, nudge bool) (Result, error) {
	p, err := protoNumber(proto)
	if err != nil {
		return Result{}, err
	}
	backend = netip.AddrPortFrom(backend.Addr().Unmap(), backend.Port())
	if !backend.Addr().Is4() {
		return Result{}, fmt.Errorf("flows: backend %s: only IPv4 is supported", backend)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return Result{}, ErrClosed
	}

	m := &backendMatcher{backend: backend, proto: p, nudge: nudge && p == protoTCP}
	var res Result
	var errs []error
	for attempt := 1; ; attempt++ {
		n, err := f.h.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, m)
		res.Deleted += int(n)
		if err == nil {
			break
		}
		// An interrupted dump still had its matches deleted; dump again
		// for the ones it missed (deleted entries are not seen twice).
		if errors.Is(err, netlink.ErrDumpInterrupted) && attempt < dumpAttempts {
			continue
		}
		errs = append(errs, fmt.Errorf("flows: delete conntrack entries of %s/%s: %w", backend, proto, err))
		break
	}

	for _, t := range m.targets {
		to := &unix.SockaddrInet4{Addr: t.client.Addr().As4()}
		sent := 0
		for i, n := range nudges(t, rand.Uint32(), rand.Uint32(), uint16(rand.Uint32())) {
			if err := unix.Sendto(f.raw, buildNudge(n), 0, to); err != nil {
				errs = append(errs, fmt.Errorf("flows: nudge %d/2 to %s from %s: %w", i+1, t.client, t.vip, err))
				continue
			}
			sent++
		}
		if sent == 2 {
			res.Nudged++
		}
	}
	return res, errors.Join(errs...)
}

// Count returns the number of conntrack entries of proto ("tcp" or "udp")
// per reply source, the post-DNAT backend address and port. Like Flush it
// counts only DNATed entries; for TCP it leaves out entries in TIME_WAIT and
// CLOSE, connections already closed that conntrack remembers for a while,
// so the numbers are the connections still open per backend. A dump the
// kernel interrupts (the table changed meanwhile) is retried; if the last
// attempt is interrupted too, the counts of that partial dump are returned
// with an error wrapping netlink.ErrDumpInterrupted.
func (f *Flows) Count(proto string) (map[netip.AddrPort]int, error) {
	p, err := protoNumber(proto)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, ErrClosed
	}
	var list []*netlink.ConntrackFlow
	for attempt := 1; ; attempt++ {
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
		if fl.Forward.Protocol != p || !dnated(fl) || (p == protoTCP && closedTCP(fl)) {
			continue
		}
		if rs, ok := replySource(fl); ok {
			counts[rs]++
		}
	}
	return counts, err
}

func protoNumber(proto string) (uint8, error) {
	switch proto {
	case "tcp":
		return protoTCP, nil
	case "udp":
		return protoUDP, nil
	}
	return 0, fmt.Errorf("flows: protocol %q: want tcp or udp", proto)
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

// backendMatcher is the netlink.CustomConntrackFilter of one Flush. It
// records the flows it matches (ConntrackDeleteFilters deletes every match)
// so that their clients can be nudged afterwards.
type backendMatcher struct {
	backend netip.AddrPort
	proto   uint8
	nudge   bool
	seen    map[nudgeTarget]bool
	targets []nudgeTarget
}

func (m *backendMatcher) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	if fl.Forward.Protocol != m.proto || !dnated(fl) {
		return false
	}
	if rs, ok := replySource(fl); !ok || rs != m.backend {
		return false
	}
	if m.nudge && nudgeable(fl) {
		client, ok1 := addrPort(fl.Forward.SrcIP, fl.Forward.SrcPort)
		vip, ok2 := addrPort(fl.Forward.DstIP, fl.Forward.DstPort)
		if t := (nudgeTarget{client, vip}); ok1 && ok2 && !m.seen[t] {
			if m.seen == nil {
				m.seen = map[nudgeTarget]bool{}
			}
			m.seen[t] = true
			m.targets = append(m.targets, t)
		}
	}
	return true
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
