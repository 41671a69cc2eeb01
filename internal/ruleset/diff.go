package ruleset

import "slices"

// Plan is what one apply changes. A full plan replaces the whole table in
// one transaction; otherwise only the listed pools' objects are touched.
type Plan struct {
	Full       bool // replace the table (first apply, after a failure, table renamed)
	Masquerade bool // the postrouting rule changes
	Pools      []PoolChange
}

// PoolChange is one pool's difference between two tables.
type PoolChange struct {
	Name     string
	Old, New *Pool // Old nil: added; New nil: removed
	Dispatch bool  // its services element (vip . proto . port) changes
	Slots    bool  // its map elements change
	Rule     bool  // its chain's rule changes (numgen restarts from 0)
}

// Empty reports whether applying the plan would change nothing.
func (p Plan) Empty() bool { return !p.Full && !p.Masquerade && len(p.Pools) == 0 }

// Diff computes the smallest change from prev (what the kernel has; nil if
// unknown) to next. It is pure.
func Diff(prev, next *Table) Plan {
	if prev == nil || prev.Name != next.Name {
		return Plan{Full: true}
	}
	plan := Plan{Masquerade: prev.Masquerade != next.Masquerade}
	for i := range prev.Pools {
		if next.Pool(prev.Pools[i].Name) == nil {
			plan.Pools = append(plan.Pools, PoolChange{Name: prev.Pools[i].Name, Old: &prev.Pools[i]})
		}
	}
	for i := range next.Pools {
		n := &next.Pools[i]
		o := prev.Pool(n.Name)
		if o == nil {
			plan.Pools = append(plan.Pools, PoolChange{Name: n.Name, New: n, Dispatch: true, Slots: true, Rule: true})
			continue
		}
		c := PoolChange{
			Name: n.Name, Old: o, New: n,
			Dispatch: o.dispatchKey() != n.dispatchKey(),
			Slots:    !slices.Equal(o.Slots, n.Slots),
			Rule:     o.ruleShape() != n.ruleShape(),
		}
		if c.Dispatch || c.Slots || c.Rule {
			plan.Pools = append(plan.Pools, c)
		}
	}
	return plan
}
