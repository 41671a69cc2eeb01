package ruleset

import (
	"cmp"
	"net/netip"
	"slices"
)

// Plan is what one apply changes. A full plan replaces the whole table in
// one transaction; otherwise only the listed pools' objects and the listed
// slot-map elements are touched.
type Plan struct {
	Full       bool // replace the table (first apply, after a failure, table renamed)
	Masquerade bool // the postrouting rule changes
	Pools      []PoolChange
	// Maps are the slot maps whose elements (or existence) change.
	Maps []MapChange
	// Accounting elements to add and delete (backends added to or removed
	// from the config); the others keep their counters.
	AccountAdd, AccountDel []Endpoint
}

// PoolChange is one pool's difference between two tables.
type PoolChange struct {
	Name     string
	Old, New *Pool // Old nil: added; New nil: removed
	Dispatch bool  // its services element (vip . proto . port) changes
	Slots    bool  // the backends its slots point at change
	Rule     bool  // its chain's rule changes (numgen restarts from 0)
}

// MapChange is one slot map's difference: elements to delete (stale or
// changed keys) and to add (new or changed keys), in key order.
type MapChange struct {
	Name           string
	Create, Delete bool // the map appears or goes (no pool uses it any more)
	Del            []uint32
	Add            []SlotElement
}

// SlotElement is one slot map element: key -> backend.
type SlotElement struct {
	Key    uint32
	Target netip.AddrPort
}

// Empty reports whether applying the plan would change nothing.
func (p Plan) Empty() bool {
	return !p.Full && !p.Masquerade && len(p.Pools) == 0 && len(p.Maps) == 0 &&
		len(p.AccountAdd) == 0 && len(p.AccountDel) == 0
}

// Diff computes the smallest change from prev (what the kernel has; nil if
// unknown) to next. It is pure.
func Diff(prev, next *Table) Plan {
	if prev == nil || prev.Name != next.Name {
		return Plan{Full: true}
	}
	plan := Plan{Masquerade: prev.Masquerade != next.Masquerade}
	touched := map[string]bool{}
	touch := func(p *Pool) {
		if p != nil {
			touched[p.Map] = true
		}
	}
	// Both pool lists are sorted by name (Build sorts), so one merge walk
	// finds removed, added and common pools in O(n).
	var added []PoolChange
	i, j := 0, 0
	for i < len(prev.Pools) || j < len(next.Pools) {
		switch {
		case j == len(next.Pools) || (i < len(prev.Pools) && prev.Pools[i].Name < next.Pools[j].Name):
			o := &prev.Pools[i]
			plan.Pools = append(plan.Pools, PoolChange{Name: o.Name, Old: o})
			touch(o)
			i++
		case i == len(prev.Pools) || next.Pools[j].Name < prev.Pools[i].Name:
			n := &next.Pools[j]
			added = append(added, PoolChange{Name: n.Name, New: n, Dispatch: true, Slots: true, Rule: true})
			touch(n)
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
			// Keys move when the range does, even with equal targets.
			if c.Slots || (len(n.Slots) > 0 && (o.Map != n.Map || o.Base != n.Base)) || o.Map != n.Map {
				touch(o)
				touch(n)
			}
			i++
			j++
		}
	}
	// Removals first: a removed pool may free the VIP:port an added one takes.
	plan.Pools = append(plan.Pools, added...)
	for _, s := range prev.Stray {
		touched[s.Map] = true
	}
	if len(touched) > 0 {
		plan.Maps = diffMaps(prev, next, touched)
	}
	plan.AccountAdd, plan.AccountDel = sortedDiff(prev.Accounted, next.Accounted)
	return plan
}

// diffMaps compares the touched slot maps element by element, over every
// pool that uses them, so a key that passes from one pool to another in
// the same change is handled like any other.
func diffMaps(prev, next *Table, touched map[string]bool) []MapChange {
	old, oldUsed := slotElements(prev, touched)
	cur, curUsed := slotElements(next, touched)
	stray := map[string][]uint32{}
	for _, s := range prev.Stray {
		stray[s.Map] = append(stray[s.Map], s.Key)
	}
	names := make([]string, 0, len(touched))
	for name := range touched {
		names = append(names, name)
	}
	slices.Sort(names)
	var out []MapChange
	for _, name := range names {
		c := MapChange{Name: name, Create: curUsed[name] && !oldUsed[name], Delete: oldUsed[name] && !curUsed[name]}
		o, n := old[name], cur[name]
		for k, v := range o {
			if w, ok := n[k]; !ok || w != v {
				c.Del = append(c.Del, k)
			}
		}
		for _, k := range stray[name] {
			if _, covered := o[k]; !covered {
				c.Del = append(c.Del, k)
			}
		}
		for k, v := range n {
			if w, ok := o[k]; !ok || w != v {
				c.Add = append(c.Add, SlotElement{k, v})
			}
		}
		if c.Delete {
			c.Del, c.Add = nil, nil // the map goes with its elements
		}
		if !c.Create && !c.Delete && len(c.Del) == 0 && len(c.Add) == 0 {
			continue
		}
		slices.Sort(c.Del)
		c.Del = slices.Compact(c.Del)
		slices.SortFunc(c.Add, func(a, b SlotElement) int { return cmp.Compare(a.Key, b.Key) })
		out = append(out, c)
	}
	return out
}

// slotElements collects the elements the pools of t put in the named
// maps (invalid slots, which Read reports for missing elements, are not
// elements), and which of those maps t uses at all.
func slotElements(t *Table, maps map[string]bool) (map[string]map[uint32]netip.AddrPort, map[string]bool) {
	els := map[string]map[uint32]netip.AddrPort{}
	used := map[string]bool{}
	for i := range t.Pools {
		p := &t.Pools[i]
		if !maps[p.Map] {
			continue
		}
		used[p.Map] = true
		m := els[p.Map]
		if m == nil {
			m = map[uint32]netip.AddrPort{}
			els[p.Map] = m
		}
		for k, s := range p.Slots {
			if s.IsValid() {
				m[p.Base+uint32(k)] = s
			}
		}
	}
	return els, used
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
