package ruleset

import "slices"

// Plan is what one apply changes. A full plan replaces the whole table in
// one transaction; otherwise only the listed pools' objects are touched.
type Plan struct {
	Full       bool // replace the table (first apply, after a failure, table renamed)
	Masquerade bool // the postrouting rule changes
	Pools      []PoolChange
	// Accounting elements to add and delete (backends added to or removed
	// from the config); the others keep their counters.
	AccountAdd, AccountDel []Endpoint
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
func (p Plan) Empty() bool {
	return !p.Full && !p.Masquerade && len(p.Pools) == 0 && len(p.AccountAdd) == 0 && len(p.AccountDel) == 0
}

// Diff computes the smallest change from prev (what the kernel has; nil if
// unknown) to next. It is pure.
func Diff(prev, next *Table) Plan {
	if prev == nil || prev.Name != next.Name {
		return Plan{Full: true}
	}
	plan := Plan{Masquerade: prev.Masquerade != next.Masquerade}
	// Both pool lists are sorted by name (Build sorts), so one merge walk
	// finds removed, added and common pools in O(n).
	var added []PoolChange
	i, j := 0, 0
	for i < len(prev.Pools) || j < len(next.Pools) {
		switch {
		case j == len(next.Pools) || (i < len(prev.Pools) && prev.Pools[i].Name < next.Pools[j].Name):
			plan.Pools = append(plan.Pools, PoolChange{Name: prev.Pools[i].Name, Old: &prev.Pools[i]})
			i++
		case i == len(prev.Pools) || next.Pools[j].Name < prev.Pools[i].Name:
			n := &next.Pools[j]
			added = append(added, PoolChange{Name: n.Name, New: n, Dispatch: true, Slots: true, Rule: true})
			j++
		default:
			o, n := &prev.Pools[i], &next.Pools[j]
			c := PoolChange{
				Name: n.Name, Old: o, New: n,
				Dispatch: !o.sameDispatch(n),
				Slots:    !slices.Equal(o.Slots, n.Slots),
				Rule:     !o.sameRule(n),
			}
			if c.Dispatch || c.Slots || c.Rule {
				added = append(added, c)
			}
			i++
			j++
		}
	}
	// Removals first: a removed pool may free the VIP:port an added one takes.
	plan.Pools = append(plan.Pools, added...)
	plan.AccountAdd, plan.AccountDel = sortedDiff(prev.Accounted, next.Accounted)
	return plan
}

// sortedDiff returns what is in b but not a, and in a but not b; both
// inputs are sorted and unique.
func sortedDiff(a, b []Endpoint) (add, del []Endpoint) {
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j == len(b) || (i < len(a) && compareEndpoints(a[i], b[j]) < 0):
			del = append(del, a[i])
			i++
		case i == len(a) || compareEndpoints(b[j], a[i]) < 0:
			add = append(add, b[j])
			j++
		default:
			i++
			j++
		}
	}
	return add, del
}
