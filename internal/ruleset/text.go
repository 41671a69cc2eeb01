package ruleset

import (
	"fmt"
	"strings"

	"github.com/nftlb/nftlb/internal/vip"
)

// Text renders the table as nft syntax in the layout `nft list table`
// prints, so `nft -c -f -` accepts it and an operator can diff it against
// the kernel. It describes exactly the objects Applier programs; the only
// liberty is the slot maps' `typeof` line, which nft needs to parse the
// file but which netlink-made maps do not carry (they list as type integer).
func (t *Table) Text() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table ip %s {\n", t.Name)
	for _, m := range t.slotMaps() {
		fmt.Fprintf(&b, "\tmap %s {\n\t\ttypeof numgen inc mod 1 : ip daddr . th dport\n", m.name)
		writeElements(&b, slotElementsText(m.els))
		b.WriteString("\t}\n\n")
	}
	b.WriteString("\tmap " + servicesMap + " {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\tcounter\n")
	var svc []string
	for _, p := range t.Pools {
		svc = append(svc, p.dispatchKey()+" counter packets 0 bytes 0 : goto "+p.Chain())
	}
	writeElements(&b, svc)
	b.WriteString("\t}\n\n")
	var acct []string
	for _, e := range t.Accounted {
		acct = append(acct, fmt.Sprintf("%s . %s . %d counter packets 0 bytes 0", e.Addr.Addr(), e.Protocol, e.Addr.Port()))
	}
	for _, name := range []string{setConn, setTx, setRx} {
		b.WriteString("\tset " + name + " {\n\t\ttype ipv4_addr . inet_proto . inet_service\n\t\tcounter\n")
		writeElements(&b, acct)
		b.WriteString("\t}\n\n")
	}

	for _, p := range t.Pools {
		writeChain(&b, p.Chain(), "", p.ruleText())
	}
	dispatch := "ip daddr . meta l4proto . th dport vmap @" + servicesMap
	writeChain(&b, chainPrerouting, "type nat hook prerouting priority dstnat; policy accept;",
		dispatch+fmt.Sprintf(" comment %q", OwnerComment))
	writeChain(&b, chainOutput, "type nat hook output priority -100; policy accept;", dispatch)
	var post []string
	if t.Masquerade {
		post = append(post, fmt.Sprintf("meta mark & 0x%08x != 0x00000000 masquerade", MasqMark))
	}
	writeChain(&b, chainPost, "type nat hook postrouting priority srcnat; policy accept;", post...)
	writeChain(&b, chainNudge, "type filter hook output priority raw; policy accept;",
		fmt.Sprintf("meta mark 0x%08x notrack", NudgeMark))
	writeChain(&b, chainForward, "type filter hook forward priority filter; policy accept;",
		"ct state new ct status dnat ip daddr . meta l4proto . th dport @"+setConn,
		"ct status dnat ip daddr . meta l4proto . th dport @"+setTx,
		"ct status dnat ip saddr . meta l4proto . th sport @"+setRx)
	s := strings.TrimSuffix(b.String(), "\n")
	return s + "}\n"
}

func writeElements(b *strings.Builder, els []string) {
	if len(els) == 0 {
		return
	}
	b.WriteString("\t\telements = { ")
	for i, e := range els {
		if i > 0 {
			b.WriteString(",\n\t\t\t     ")
		}
		b.WriteString(e)
	}
	b.WriteString(" }\n")
}

func writeChain(b *strings.Builder, name, hook string, rules ...string) {
	fmt.Fprintf(b, "\tchain %s {\n", name)
	if hook != "" {
		fmt.Fprintf(b, "\t\t%s\n", hook)
	}
	for _, r := range rules {
		fmt.Fprintf(b, "\t\t%s\n", r)
	}
	b.WriteString("\t}\n\n")
}

func slotElementsText(es []SlotElement) []string {
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = fmt.Sprintf("%d : %s . %d", e.Key, e.Target.Addr(), e.Target.Port())
	}
	return out
}

func (p *Pool) selectorText() string {
	offset := ""
	if p.Base != 0 {
		offset = fmt.Sprintf(" offset %d", p.Base)
	}
	switch p.Scheduler {
	case vip.Random:
		return fmt.Sprintf("numgen random mod %d%s", p.Size, offset)
	case vip.SourceHash:
		return fmt.Sprintf("jhash ip saddr mod %d seed 0x%x%s", p.Size, HashSeed, offset)
	default:
		return fmt.Sprintf("numgen inc mod %d%s", p.Size, offset)
	}
}

func (p *Pool) ruleText() string {
	if len(p.Slots) == 0 {
		if p.Protocol == vip.UDP {
			// nft prints the implied protocol match away: "meta l4proto udp" stays.
			return "meta l4proto udp reject"
		}
		return "reject with tcp reset"
	}
	return fmt.Sprintf("meta mark set meta mark | 0x%08x ct mark set ct mark | 0x%08x meta l4proto %s dnat ip to %s map @%s",
		MasqMark, ConnMark, p.Protocol, p.selectorText(), p.Map)
}
