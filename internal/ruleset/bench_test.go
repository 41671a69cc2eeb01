package ruleset

import (
	"fmt"
	"slices"
	"testing"
)

// BenchmarkRender is the pure part: config-derived spec to table and text.
func BenchmarkRender(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		spec := manyPools(n)
		b.Run(fmt.Sprintf("pools=%d", n), func(b *testing.B) {
			for b.Loop() {
				_ = Build(spec)
			}
		})
	}
}

// BenchmarkApplyCold: render and apply N pools x 3 backends into a table
// that a previous run left (the daemon's first apply: one transaction that
// replaces the table).
func BenchmarkApplyCold(b *testing.B) {
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("pools=%d", n), func(b *testing.B) {
			ns := newScratchNS(b)
			spec := manyPools(n)
			for b.Loop() {
				a := ns.applier() // new Applier: no memory of the kernel, full replace
				if _, err := a.Apply(Build(spec)); err != nil {
					b.Fatal(err)
				}
				_ = a.Close()
			}
		})
	}
}

// BenchmarkApplyOneBackendChange: one backend of one pool goes down or up
// while N pools exist; the transaction touches that pool's map and rule.
func BenchmarkApplyOneBackendChange(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("pools=%d", n), func(b *testing.B) {
			ns := newScratchNS(b)
			a := ns.applier()
			full := manyPools(n)
			down := full
			down.Pools = slices.Clone(full.Pools)
			down.Pools[n/2].Backends = full.Pools[n/2].Backends[1:]
			tables := []*Table{Build(down), Build(full)}
			if _, err := a.Apply(tables[1]); err != nil {
				b.Fatal(err)
			}
			i := 0
			for b.Loop() {
				if _, err := a.Apply(tables[i%2]); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	}
}
