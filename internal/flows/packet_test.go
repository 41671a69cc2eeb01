package flows

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

func TestBuildNudge(t *testing.T) {
	cases := []nudgePacket{
		{From: netip.MustParseAddrPort("198.18.100.1:80"), To: netip.MustParseAddrPort("198.18.0.2:54321"),
			Seq: 0xdeadbeef, Ack: 0x01020304, ID: 0xabcd},
		{From: netip.MustParseAddrPort("198.18.100.255:65535"), To: netip.MustParseAddrPort("198.19.255.254:1"),
			Seq: 0xffffffff, Ack: 0xffffffff, ID: 0xffff},
		{From: netip.MustParseAddrPort("[::ffff:198.18.100.7]:6443"), To: netip.MustParseAddrPort("198.18.0.2:0"),
			Seq: 0, Ack: 0, ID: 0},
	}
	for _, n := range cases {
		p := buildNudge(n)
		if len(p) != 40 {
			t.Fatalf("%v: length %d, want 40", n, len(p))
		}
		ip, tcp := p[:20], p[20:]
		src, dst := n.From.Addr().Unmap().As4(), n.To.Addr().Unmap().As4()

		// IPv4 header fields.
		if ip[0] != 0x45 || binary.BigEndian.Uint16(ip[2:]) != 40 || binary.BigEndian.Uint16(ip[4:]) != n.ID ||
			binary.BigEndian.Uint16(ip[6:]) != 0x4000 || ip[8] != 64 || ip[9] != 6 ||
			[4]byte(ip[12:16]) != src || [4]byte(ip[16:20]) != dst {
			t.Errorf("%v: bad IPv4 header % x", n, ip)
		}
		if got := fold(sum(0, ip)); got != 0xffff {
			t.Errorf("%v: IPv4 header sums to %#04x, want 0xffff", n, got)
		}

		// TCP header fields.
		if binary.BigEndian.Uint16(tcp[0:]) != n.From.Port() || binary.BigEndian.Uint16(tcp[2:]) != n.To.Port() ||
			binary.BigEndian.Uint32(tcp[4:]) != n.Seq || binary.BigEndian.Uint32(tcp[8:]) != n.Ack ||
			tcp[12] != 5<<4 || tcp[13] != 0x10 || binary.BigEndian.Uint16(tcp[14:]) != 1024 ||
			binary.BigEndian.Uint16(tcp[18:]) != 0 {
			t.Errorf("%v: bad TCP header % x", n, tcp)
		}
		// The receiver's check: pseudo header + segment, checksum
		// included, folds to all ones.
		pseudo := make([]byte, 0, 12+len(tcp))
		pseudo = append(pseudo, src[:]...)
		pseudo = append(pseudo, dst[:]...)
		pseudo = append(pseudo, 0, 6, 0, byte(len(tcp)))
		if got := fold(sum(0, append(pseudo, tcp...))); got != 0xffff {
			t.Errorf("%v: TCP checksum verifies to %#04x, want 0xffff", n, got)
		}
	}
}

// The TCP checksum of a known segment, computed by hand (RFC 1071 style),
// so that a consistently wrong sum/fold pair cannot pass the test above.
func TestNudgeChecksumKnownValue(t *testing.T) {
	p := buildNudge(nudgePacket{
		From: netip.MustParseAddrPort("198.18.100.1:80"),
		To:   netip.MustParseAddrPort("198.18.0.2:40000"),
		Seq:  1, Ack: 2, ID: 1,
	})
	// Pseudo header: c612 6401 c612 0002 0006 0014
	// Segment:       0050 9c40 0000 0001 0000 0002 5010 0400 [csum] 0000
	var s uint32
	for _, w := range []uint32{0xc612, 0x6401, 0xc612, 0x0002, 0x0006, 0x0014,
		0x0050, 0x9c40, 0x0000, 0x0001, 0x0000, 0x0002, 0x5010, 0x0400, 0x0000} {
		s += w
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	want := ^uint16(s)
	if got := binary.BigEndian.Uint16(p[36:]); got != want {
		t.Errorf("TCP checksum %#04x, want %#04x", got, want)
	}
}

func TestSumOddLength(t *testing.T) {
	if got := fold(sum(0, []byte{0x01, 0x02, 0x03})); got != 0x0102+0x0300 {
		t.Errorf("sum of odd-length input = %#04x", got)
	}
	if got := fold(0x1fffe); got != 0xffff {
		t.Errorf("fold(0x1fffe) = %#04x, want 0xffff", got)
	}
}

// inWindow models the receiver's acceptability test for a bare ACK: seq
// within lo..lo+window inclusive, modulo 2^32 (RFC 793 with lo = rcv_nxt;
// Linux's tcp_sequence with lo = rcv_wup, window = rcv_wnd).
func inWindow(seq, lo, window uint32) bool { return seq-lo <= window }

func TestNudgesPair(t *testing.T) {
	target := nudgeTarget{client: netip.MustParseAddrPort("198.18.0.2:40000"), vip: netip.MustParseAddrPort("198.18.100.1:80")}
	const maxWindow = 65535 << 14 // the largest window TCP can advertise
	seqs := []uint32{0, 1, 1<<31 - 1, 1 << 31, 1<<31 + 1, 0xfffffffe, 0xffffffff, 0xdeadbeef}
	for _, seq := range seqs {
		p := nudges(target, seq, 0x01020304, 0xffff)
		a, b := p[0], p[1]
		if a.From != target.vip || a.To != target.client || b.From != target.vip || b.To != target.client {
			t.Errorf("seq %#x: addresses %v -> %v, %v -> %v, want %v -> %v", seq, a.From, a.To, b.From, b.To, target.vip, target.client)
		}
		if a.Ack != 0x01020304 || b.Ack != 0x01020304 {
			t.Errorf("seq %#x: acks %#x, %#x, want both 0x01020304", seq, a.Ack, b.Ack)
		}
		if a.Seq != seq || b.Seq-a.Seq != 1<<31 || a.Seq-b.Seq != 1<<31 {
			t.Errorf("seq %#x: seqs %#x, %#x, want %#x and +2^31", seq, a.Seq, b.Seq, seq)
		}
		if a.ID != 0xffff || b.ID != 0 {
			t.Errorf("IDs %#x, %#x, want 0xffff, 0 (distinct)", a.ID, b.ID)
		}
		// The two packets differ only where they should.
		pa, pb := buildNudge(a), buildNudge(b)
		if binary.BigEndian.Uint32(pb[24:])-binary.BigEndian.Uint32(pa[24:]) != 1<<31 {
			t.Errorf("seq %#x: built packets' seqs %x, %x", seq, pa[24:28], pb[24:28])
		}

		// Whatever the receiver's window position and size, not both are
		// acceptable. Windows up to 2^31-1 would do; TCP's go to maxWindow.
		for _, window := range []uint32{0, 1, 65535, maxWindow, 1<<31 - 1} {
			for _, lo := range []uint32{0, seq, seq - 1, seq + 1, seq - window, seq + 1<<31, seq + 1<<31 - window, seq + 1<<31 + 1, 0xffffffff} {
				if inWindow(a.Seq, lo, window) && inWindow(b.Seq, lo, window) {
					t.Errorf("seq %#x: window %d at %#x accepts both %#x and %#x", seq, window, lo, a.Seq, b.Seq)
				}
			}
		}
	}
	// A single random seq can land in the window; then the other one of
	// the pair is the one that works.
	p := nudges(target, 1000, 7, 1)
	if !inWindow(p[0].Seq, 990, maxWindow) || inWindow(p[1].Seq, 990, maxWindow) {
		t.Errorf("seq 1000 vs window at 990: want the first in window, the second out")
	}
}
