package ruleset

import (
	"fmt"
	"strings"
)

// Describe prints the plan for a person, as the nft objects that change:
// "-" lines are what the kernel has now, "+" lines what it would have.
// prev is what the kernel has (nil: no table), next the target.
func (p Plan) Describe(prev, next *Table) string {
	var b strings.Builder
	switch {
	case p.Full && prev == nil:
		fmt.Fprintf(&b, "table ip %s would be created:\n", next.Name)
		b.WriteString(next.Text())
		return b.String()
	case p.Full:
		fmt.Fprintf(&b, "table ip %s would be replaced whole:\n", next.Name)
		b.WriteString(next.Text())
		return b.String()
	case p.Empty():
		return fmt.Sprintf("table ip %s: no changes\n", next.Name)
	}
	fmt.Fprintf(&b, "table ip %s:\n", next.Name)
	for _, c := range p.Pools {
		switch {
		case c.New == nil:
			fmt.Fprintf(&b, "- pool %s %s\n", c.Name, c.Old.key())
			fmt.Fprintf(&b, "-   chain %s: %s\n", c.Old.Chain(), c.Old.ruleText())
		case c.Old == nil:
			fmt.Fprintf(&b, "+ pool %s %s\n", c.Name, c.New.key())
			fmt.Fprintf(&b, "+   chain %s: %s\n", c.New.Chain(), c.New.ruleText())
			if len(c.New.Slots) > 0 {
				fmt.Fprintf(&b, "+   slots %s\n", strings.Join(c.New.slotsText(), ", "))
			}
		default:
			fmt.Fprintf(&b, "~ pool %s %s\n", c.Name, c.New.key())
			if c.Dispatch {
				fmt.Fprintf(&b, "-   map services: %s : goto %s\n", c.Old.dispatchKey(), c.Old.Chain())
				fmt.Fprintf(&b, "+   map services: %s : goto %s\n", c.New.dispatchKey(), c.New.Chain())
			}
			if c.Rule {
				fmt.Fprintf(&b, "-   chain %s: %s\n", c.Old.Chain(), c.Old.ruleText())
				fmt.Fprintf(&b, "+   chain %s: %s\n", c.New.Chain(), c.New.ruleText())
			}
			if c.Slots {
				writeLineDiff(&b, "slot", c.Old.slotsText(), c.New.slotsText())
			}
		}
	}
	for _, m := range p.Maps {
		switch {
		case m.Create:
			fmt.Fprintf(&b, "+ map %s\n", m.Name)
		case m.Delete:
			fmt.Fprintf(&b, "- map %s\n", m.Name)
		}
		if len(m.Del)+len(m.Add) > 0 {
			fmt.Fprintf(&b, "~ map %s: %d elements deleted, %d added\n", m.Name, len(m.Del), len(m.Add))
		}
	}
	if p.Masquerade {
		fmt.Fprintf(&b, "~ masquerade: %v -> %v\n", prev.Masquerade, next.Masquerade)
	}
	for _, e := range p.AccountDel {
		fmt.Fprintf(&b, "- accounting: %s\n", e)
	}
	for _, e := range p.AccountAdd {
		fmt.Fprintf(&b, "+ accounting: %s\n", e)
	}
	return b.String()
}

func (p *Pool) key() string { return fmt.Sprintf("%s:%d/%s", p.VIP, p.Port, p.Protocol) }

// slotsText is the pool's slots as "N -> backend" lines.
func (p *Pool) slotsText() []string {
	out := make([]string, len(p.Slots))
	for i, s := range p.Slots {
		out[i] = fmt.Sprintf("%d -> %s", i, s)
	}
	return out
}

// writeLineDiff prints the slots that differ, position by position.
func writeLineDiff(b *strings.Builder, what string, old, new []string) {
	for i := range max(len(old), len(new)) {
		var o, n string
		if i < len(old) {
			o = old[i]
		}
		if i < len(new) {
			n = new[i]
		}
		if o == n {
			continue
		}
		if o != "" {
			fmt.Fprintf(b, "-   %s: %s\n", what, o)
		}
		if n != "" {
			fmt.Fprintf(b, "+   %s: %s\n", what, n)
		}
	}
}
