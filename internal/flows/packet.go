package flows

import (
	"encoding/binary"
	"net/netip"
)

// Sizes of the nudge packet: a bare IPv4 header and a bare TCP header.
const (
	ipv4HeaderLen = 20
	tcpHeaderLen  = 20
	nudgeLen      = ipv4HeaderLen + tcpHeaderLen

	nudgeTTL    = 64
	nudgeWindow = 1024
	tcpFlagACK  = 0x10
	ipFlagDF    = 0x4000
	protoTCP    = 6
	protoUDP    = 17
)

// nudgePacket is the variable part of one nudge packet.
type nudgePacket struct {
	From, To netip.AddrPort // From: VIP:port (the flow's original destination); To: client ip:port
	Seq, Ack uint32         // Seq out of the client's window (see nudges), Ack random
	ID       uint16         // IPv4 identification
}

// buildNudge returns the 40-byte IPv4+TCP segment of n: a pure ACK (no
// options, no payload) with both checksums filled in. From and To must be
// IPv4 (or IPv4-mapped) addresses. It is pure: the caller picks the random
// fields.
func buildNudge(n nudgePacket) []byte {
	src, dst := n.From.Addr().Unmap().As4(), n.To.Addr().Unmap().As4()
	p := make([]byte, nudgeLen)

	ip := p[:ipv4HeaderLen]
	ip[0] = 0x45 // version 4, IHL 5 words
	ip[1] = 0    // DSCP/ECN
	binary.BigEndian.PutUint16(ip[2:], nudgeLen)
	binary.BigEndian.PutUint16(ip[4:], n.ID)
	binary.BigEndian.PutUint16(ip[6:], ipFlagDF)
	ip[8] = nudgeTTL
	ip[9] = protoTCP
	copy(ip[12:16], src[:])
	copy(ip[16:20], dst[:])
	// The kernel recomputes the IP checksum of IP_HDRINCL packets anyway;
	// fill it so the packet is valid on its own.
	binary.BigEndian.PutUint16(ip[10:], ^fold(sum(0, ip)))

	tcp := p[ipv4HeaderLen:]
	binary.BigEndian.PutUint16(tcp[0:], n.From.Port())
	binary.BigEndian.PutUint16(tcp[2:], n.To.Port())
	binary.BigEndian.PutUint32(tcp[4:], n.Seq)
	binary.BigEndian.PutUint32(tcp[8:], n.Ack)
	tcp[12] = (tcpHeaderLen / 4) << 4 // data offset, no options
	tcp[13] = tcpFlagACK
	binary.BigEndian.PutUint16(tcp[14:], nudgeWindow)
	binary.BigEndian.PutUint16(tcp[16:], ^fold(sum(pseudoSum(src, dst, protoTCP, len(tcp)), tcp)))
	return p
}

// pseudoSum is the one's-complement partial sum of the TCP/UDP IPv4 pseudo
// header: source, destination, zero, protocol, segment length.
func pseudoSum(src, dst [4]byte, proto byte, length int) uint32 {
	s := sum(0, src[:])
	s = sum(s, dst[:])
	return s + uint32(proto) + uint32(length)
}

// sum adds b as big-endian 16-bit words (odd length padded with a zero
// byte) to the unfolded one's-complement sum s.
func sum(s uint32, b []byte) uint32 {
	for len(b) >= 2 {
		s += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		s += uint32(b[0]) << 8
	}
	return s
}

// fold reduces an unfolded one's-complement sum to 16 bits.
func fold(s uint32) uint16 {
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}
