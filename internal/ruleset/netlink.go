package ruleset

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/nftlb/nftlb/internal/vip"
)

// batch is the part of *nftables.Conn that queues messages. Nothing here
// reaches the kernel: the caller decides when to Flush.
type batch interface {
	AddTable(*nftables.Table) *nftables.Table
	DelTable(*nftables.Table)
	AddChain(*nftables.Chain) *nftables.Chain
	DelChain(*nftables.Chain)
	FlushChain(*nftables.Chain)
	AddRule(*nftables.Rule) *nftables.Rule
	AddSet(*nftables.Set, []nftables.SetElement) error
	DelSet(*nftables.Set)
	FlushSet(*nftables.Set)
	SetAddElements(*nftables.Set, []nftables.SetElement) error
	SetDeleteElements(*nftables.Set, []nftables.SetElement) error
	AddObj(nftables.Obj) nftables.Obj
	DeleteObject(nftables.Obj)
}

// queue adds the plan's messages to b in an order the kernel accepts within
// one transaction: references are removed before what they point at,
// objects exist before anything points at them, and a slot key is deleted
// before it is added again.
func queue(b batch, prev, next *Table, plan Plan) error {
	if plan.Full {
		if prev != nil && prev.Name != next.Name {
			b.DelTable(nlTable(prev.Name))
		}
		return queueFull(b, next)
	}
	tbl := nlTable(next.Name)
	svc := servicesSet(tbl)
	var delKeys, addKeys []nftables.SetElement
	for _, c := range plan.Pools {
		if c.Old != nil && (c.New == nil || c.Dispatch) {
			delKeys = append(delKeys, c.Old.dispatchElement())
		}
		if c.New != nil && c.Dispatch {
			addKeys = append(addKeys, c.New.dispatchElement())
		}
	}
	for chunk := range slices.Chunk(delKeys, maxElementsPerMsg) {
		if err := b.SetDeleteElements(svc, chunk); err != nil {
			return fmt.Errorf("delete dispatch elements: %w", err)
		}
	}
	// Rules that go or change let go of their map and counter first.
	for _, c := range plan.Pools {
		switch {
		case c.New == nil:
			ch := &nftables.Chain{Name: c.Old.Chain(), Table: tbl}
			b.FlushChain(ch)
			b.DelChain(ch)
		case c.Old != nil && c.Rule:
			b.FlushChain(&nftables.Chain{Name: c.New.Chain(), Table: tbl})
		}
	}
	for _, m := range plan.Maps {
		set := slotSet(tbl, m.Name)
		switch {
		case m.Create:
			if err := b.AddSet(set, nil); err != nil {
				return fmt.Errorf("map %s: %w", m.Name, err)
			}
		case m.Delete:
			continue // below, once no rule uses it
		}
		for chunk := range slices.Chunk(m.Del, maxElementsPerMsg) {
			els := make([]nftables.SetElement, len(chunk))
			for i, k := range chunk {
				els[i] = nftables.SetElement{Key: binaryutil.NativeEndian.PutUint32(k)}
			}
			if err := b.SetDeleteElements(set, els); err != nil {
				return fmt.Errorf("map %s: delete elements: %w", m.Name, err)
			}
		}
		if err := addElements(b, set, slotSetElements(m.Add)); err != nil {
			return fmt.Errorf("map %s: add elements: %w", m.Name, err)
		}
	}
	for _, c := range plan.Pools {
		switch {
		case c.New == nil:
		case c.Old == nil:
			ch := b.AddChain(&nftables.Chain{Name: c.New.Chain(), Table: tbl})
			b.AddRule(poolRule(ch, c.New))
		case c.Rule:
			b.AddRule(poolRule(&nftables.Chain{Name: c.New.Chain(), Table: tbl}, c.New))
		}
	}
	for _, m := range plan.Maps {
		if m.Delete {
			b.DelSet(slotSet(tbl, m.Name))
		}
	}
	if err := addElements(b, svc, addKeys); err != nil {
		return fmt.Errorf("add dispatch elements: %w", err)
	}
	if len(plan.AccountDel) > 0 {
		for _, set := range accountingSets(tbl) {
			for chunk := range slices.Chunk(endpointElements(plan.AccountDel), maxElementsPerMsg) {
				if err := b.SetDeleteElements(set, chunk); err != nil {
					return fmt.Errorf("delete %s elements: %w", set.Name, err)
				}
			}
		}
	}
	for _, set := range accountingSets(tbl) {
		if err := addElements(b, set, endpointElements(plan.AccountAdd)); err != nil {
			return fmt.Errorf("add %s elements: %w", set.Name, err)
		}
	}
	if plan.Masquerade {
		post := &nftables.Chain{Name: chainPost, Table: tbl}
		b.FlushChain(post)
		if next.Masquerade {
			b.AddRule(masqRule(post))
		}
	}
	return nil
}

// queueFull replaces the table in one transaction. AddTable first makes
// DelTable safe when no table exists (a failed DelTable fails the batch),
// and because it is one transaction no packet ever sees an empty table.
// Slot maps get their elements after the rules that bind them: binding a
// rule to a map walks the map's elements (12% of a cold apply of 10,000
// pools when the elements came first).
func queueFull(b batch, t *Table) error {
	tbl := nlTable(t.Name)
	b.AddTable(tbl)
	b.DelTable(tbl)
	b.AddTable(tbl)
	maps := t.slotMaps()
	for _, m := range maps {
		if err := b.AddSet(slotSet(tbl, m.name), nil); err != nil {
			return fmt.Errorf("map %s: %w", m.name, err)
		}
	}
	for i := range t.Pools {
		p := &t.Pools[i]
		ch := b.AddChain(&nftables.Chain{Name: p.Chain(), Table: tbl})
		b.AddRule(poolRule(ch, p))
	}
	for _, m := range maps {
		if err := addElements(b, slotSet(tbl, m.name), slotSetElements(m.els)); err != nil {
			return fmt.Errorf("map %s: %w", m.name, err)
		}
	}
	svc := servicesSet(tbl)
	var els []nftables.SetElement
	for i := range t.Pools {
		els = append(els, t.Pools[i].dispatchElement())
	}
	if err := addSet(b, svc, els); err != nil {
		return fmt.Errorf("services map: %w", err)
	}
	accept := nftables.ChainPolicyAccept
	pre := b.AddChain(&nftables.Chain{Name: chainPrerouting, Table: tbl, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest, Policy: &accept})
	out := b.AddChain(&nftables.Chain{Name: chainOutput, Table: tbl, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest, Policy: &accept})
	post := b.AddChain(&nftables.Chain{Name: chainPost, Table: tbl, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	nudge := b.AddChain(&nftables.Chain{Name: chainNudge, Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityRaw, Policy: &accept})
	b.AddRule(dispatchRule(pre, svc, OwnerComment))
	b.AddRule(dispatchRule(out, svc, ""))
	if t.Masquerade {
		b.AddRule(masqRule(post))
	}
	b.AddRule(&nftables.Rule{Table: tbl, Chain: nudge, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(NudgeMark)},
		&expr.Notrack{},
	}})
	return queueAccounting(b, tbl, t)
}

type slotMapContent struct {
	name string
	els  []SlotElement
}

// slotMaps lists the slot maps t uses (by name) with their elements in
// key order.
func (t *Table) slotMaps() []slotMapContent {
	byName := map[string]*slotMapContent{}
	var out []*slotMapContent
	for i := range t.Pools {
		p := &t.Pools[i]
		m := byName[p.Map]
		if m == nil {
			m = &slotMapContent{name: p.Map}
			byName[p.Map] = m
			out = append(out, m)
		}
		for k, s := range p.Slots {
			m.els = append(m.els, SlotElement{p.Base + uint32(k), s})
		}
	}
	slices.SortFunc(out, func(a, b *slotMapContent) int { return strings.Compare(a.name, b.name) })
	res := make([]slotMapContent, len(out))
	for i, m := range out {
		slices.SortFunc(m.els, func(a, b SlotElement) int { return cmp.Compare(a.Key, b.Key) })
		res[i] = *m
	}
	return res
}

// queueAccounting adds the per-backend counting sets and the forward chain
// that feeds them. Lookups in a set with the counter flag count the
// matching element: new connections, packets and bytes to and from each
// backend of a connection nftlb (or anyone) DNATed.
func queueAccounting(b batch, tbl *nftables.Table, t *Table) error {
	sets := accountingSets(tbl)
	for _, set := range sets {
		if err := addSet(b, set, endpointElements(t.Accounted)); err != nil {
			return fmt.Errorf("%s: %w", set.Name, err)
		}
	}
	accept := nftables.ChainPolicyAccept
	fwd := b.AddChain(&nftables.Chain{Name: chainForward, Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	dnat := ctBitSet(expr.CtKeySTATUS, 0x20) // IPS_DST_NAT
	newConn := ctBitSet(expr.CtKeySTATE, expr.CtStateBitNEW)
	b.AddRule(&nftables.Rule{Table: tbl, Chain: fwd, Exprs: slices.Concat(newConn, dnat, endpointLookup(sets[0], 16, 2))})
	b.AddRule(&nftables.Rule{Table: tbl, Chain: fwd, Exprs: slices.Concat(dnat, endpointLookup(sets[1], 16, 2))})
	b.AddRule(&nftables.Rule{Table: tbl, Chain: fwd, Exprs: slices.Concat(dnat, endpointLookup(sets[2], 12, 0))})
	return nil
}

func accountingSets(tbl *nftables.Table) []*nftables.Set {
	var out []*nftables.Set
	for _, name := range []string{setConn, setTx, setRx} {
		out = append(out, &nftables.Set{
			Table: tbl, Name: name, Concatenation: true, Counter: true,
			KeyType: nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetProto, nftables.TypeInetService),
		})
	}
	return out
}

func endpointElements(es []Endpoint) []nftables.SetElement {
	els := make([]nftables.SetElement, len(es))
	for i, e := range es {
		els[i] = nftables.SetElement{Key: endpointKey(e.Addr, e.Protocol)}
	}
	return els
}

// endpointKey is addr . l4proto . port, each field padded to 4 bytes.
func endpointKey(a netip.AddrPort, p vip.Protocol) []byte {
	key := make([]byte, 12)
	copy(key[0:4], a.Addr().AsSlice())
	key[4] = protoNum(p)
	binary.BigEndian.PutUint16(key[8:10], a.Port())
	return key
}

// ctBitSet: ct KEY & bit != 0 (ct state and ct status have no direction,
// which google/nftables v0.3.0 would mis-encode).
func ctBitSet(key expr.CtKey, bit uint32) []expr.Any {
	return bitSet(&expr.Ct{Register: 1, Key: key}, bit)
}

// bitSet: LOAD & bit != 0, where load puts a 32-bit host-order value (a
// mark, ct state or status) into register 1.
func bitSet(load expr.Any, bit uint32) []expr.Any {
	return []expr.Any{
		load,
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bit), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

// endpointLookup: ip ADDR . meta l4proto . th PORT @set, ADDR and PORT at
// the given network and transport header offsets.
func endpointLookup(set *nftables.Set, addrOff, portOff uint32) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: addrOff, Len: 4},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: unix.NFT_REG32_01},
		&expr.Payload{DestRegister: unix.NFT_REG32_02, Base: expr.PayloadBaseTransportHeader, Offset: portOff, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
	}
}

// maxElementsPerMsg bounds the elements in one netlink message. Their list
// is one nested attribute whose length field is 16 bits: around 1,100
// dispatch elements it overflows, and the kernel answers EINVAL or ENOENT
// (or, when the length wraps to something parseable, accepts a truncated
// list). nft splits large element lists the same way.
const maxElementsPerMsg = 256

// addSet creates s and adds els in messages of bounded size.
func addSet(b batch, s *nftables.Set, els []nftables.SetElement) error {
	if err := b.AddSet(s, nil); err != nil {
		return err
	}
	return addElements(b, s, els)
}

func addElements(b batch, s *nftables.Set, els []nftables.SetElement) error {
	for chunk := range slices.Chunk(els, maxElementsPerMsg) {
		if err := b.SetAddElements(s, chunk); err != nil {
			return err
		}
	}
	return nil
}

func nlTable(name string) *nftables.Table {
	return &nftables.Table{Name: name, Family: nftables.TableFamilyIPv4}
}

func servicesSet(tbl *nftables.Table) *nftables.Set {
	return &nftables.Set{
		Table: tbl, Name: servicesMap, IsMap: true, Concatenation: true, Counter: true,
		KeyType:  nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetProto, nftables.TypeInetService),
		DataType: nftables.TypeVerdict,
	}
}

// slotSet: keys are numgen/jhash results, which the kernel writes in host
// byte order; NativeEndian key order also makes `nft list` print 0, 1, 2.
func slotSet(tbl *nftables.Table, name string) *nftables.Set {
	return &nftables.Set{
		Table: tbl, Name: name, IsMap: true,
		KeyType:      nftables.TypeInteger,
		KeyByteOrder: binaryutil.NativeEndian,
		DataType:     nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService),
	}
}

func protoNum(p vip.Protocol) byte {
	if p == vip.UDP {
		return unix.IPPROTO_UDP
	}
	return unix.IPPROTO_TCP
}

// dispatchElement is vip . l4proto . port; each field of a concatenation
// is padded to 4 bytes.
func (p *Pool) dispatchElement() nftables.SetElement {
	key := endpointKey(netip.AddrPortFrom(p.VIP, p.Port), p.Protocol)
	return nftables.SetElement{Key: key, VerdictData: &expr.Verdict{Kind: expr.VerdictGoto, Chain: p.Chain()}}
}

// slotSetElements: key (host-endian u32) -> address . port (big-endian
// port padded to 4 bytes), the layout dnat reads from two registers.
func slotSetElements(es []SlotElement) []nftables.SetElement {
	els := make([]nftables.SetElement, len(es))
	for i, e := range es {
		val := make([]byte, 8)
		copy(val[0:4], e.Target.Addr().AsSlice())
		binary.BigEndian.PutUint16(val[4:6], e.Target.Port())
		els[i] = nftables.SetElement{Key: binaryutil.NativeEndian.PutUint32(e.Key), Val: val}
	}
	return els
}

// dispatchRule: ip daddr . meta l4proto . th dport vmap @services. The
// concatenation lives in consecutive 32-bit registers starting at reg 1.
func dispatchRule(ch *nftables.Chain, svc *nftables.Set, comment string) *nftables.Rule {
	r := &nftables.Rule{Table: ch.Table, Chain: ch, Exprs: []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: unix.NFT_REG32_01},
		&expr.Payload{DestRegister: unix.NFT_REG32_02, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: svc.Name, SetID: svc.ID, IsDestRegSet: true, DestRegister: 0},
	}}
	if comment != "" {
		r.UserData = userdata.AppendString(nil, userdata.TypeComment, comment)
	}
	return r
}

// masqRule: meta mark & MasqMark != 0 masquerade. NAT chains only see a
// connection's first packet, so the packet mark set there is enough.
func masqRule(ch *nftables.Chain) *nftables.Rule {
	exprs := bitSet(&expr.Meta{Key: expr.MetaKeyMARK, Register: 1}, MasqMark)
	return &nftables.Rule{Table: ch.Table, Chain: ch, Exprs: append(exprs, &expr.Masq{})}
}

func l4protoIs(p vip.Protocol) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{protoNum(p)}},
	}
}

// poolRule is the pool chain's one rule: mark, then dnat through the
// pool's keys of its slot map, or refuse at once when the pool has no
// usable backend (a reset tells a client to try elsewhere; silence would
// make it wait for a timeout). The pool's connections are counted by its
// services element.
func poolRule(ch *nftables.Chain, p *Pool) *nftables.Rule {
	r := &nftables.Rule{Table: ch.Table, Chain: ch}
	if len(p.Slots) == 0 {
		r.Exprs = l4protoIs(p.Protocol)
		if p.Protocol == vip.UDP {
			r.Exprs = append(r.Exprs, &expr.Reject{Type: unix.NFT_REJECT_ICMP_UNREACH, Code: 3 /* ICMP port unreachable */})
		} else {
			r.Exprs = append(r.Exprs, &expr.Reject{Type: unix.NFT_REJECT_TCP_RST})
		}
		return r
	}
	setBit := &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
		Mask: binaryutil.NativeEndian.PutUint32(^MasqMark), Xor: binaryutil.NativeEndian.PutUint32(MasqMark)}
	r.Exprs = []expr.Any{
		// meta mark set meta mark | MasqMark: masquerade this connection.
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		setBit,
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
		// ct mark set ct mark | ConnMark: remember for the connection's
		// life that nftlb DNATed it, so a flush of a failed backend and the
		// active-connection count touch only nftlb's connections.
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		setBit,
		&expr.Ct{Key: expr.CtKeyMARK, SourceRegister: true, Register: 1},
	}
	r.Exprs = append(r.Exprs, l4protoIs(p.Protocol)...)
	n := uint32(p.Size)
	switch p.Scheduler {
	case vip.Random:
		r.Exprs = append(r.Exprs, &expr.Numgen{Register: 1, Type: unix.NFT_NG_RANDOM, Modulus: n, Offset: p.Base})
	case vip.SourceHash:
		r.Exprs = append(r.Exprs,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Hash{SourceRegister: 1, DestRegister: 1, Length: 4, Modulus: n, Seed: HashSeed, Offset: p.Base, Type: expr.HashTypeJenkins})
	default:
		r.Exprs = append(r.Exprs, &expr.Numgen{Register: 1, Type: unix.NFT_NG_INCREMENTAL, Modulus: n, Offset: p.Base})
	}
	r.Exprs = append(r.Exprs,
		&expr.Lookup{SourceRegister: 1, SetName: p.Map, IsDestRegSet: true, DestRegister: 1},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegProtoMin: unix.NFT_REG32_01})
	return r
}
