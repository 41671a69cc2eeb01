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

// BenchmarkApplyCold: render and apply N pools x 3 backends into a
// namespace without the table (one transaction that creates it all).
func BenchmarkApplyCold(b *testing.B) {
	for _, n := range []int{1, 100, 1000, 10000} {
		b.Run(fmt.Sprintf("pools=%d", n), func(b *testing.B) {
			ns := newScratchNS(b)
			spec := manyPools(n)
			for b.Loop() {
				b.StopTimer()
				_, _ = ns.nftErr("delete", "table", "ip", "nftlb")
				b.StartTimer()
				a := ns.applier()
				if _, err := a.Apply(Build(spec)); err != nil {
					b.Fatal(err)
				}
				_ = a.Close()
			}
		})
	}
}

// BenchmarkApplyRestart: the daemon's first apply after a restart with an
// unchanged config: a new Applier reads the table, adopts it, sends nothing.
func BenchmarkApplyRestart(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("pools=%d", n), func(b *testing.B) {
			ns := newScratchNS(b)
			tbl := Build(manyPools(n))
			if _, err := ns.applier().Apply(tbl); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				a := ns.applier()
				res, err := a.Apply(tbl)
				if err != nil || !res.Adopted || !res.Plan.Empty() {
					b.Fatalf("Apply = %+v, %v; want adopted, nothing sent", res, err)
				}
				_ = a.Close()
			}
		})
	}
}

// BenchmarkRead: read back and verify a table of N pools x 3 backends.
func BenchmarkRead(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("pools=%d", n), func(b *testing.B) {
			ns := newScratchNS(b)
			tbl := Build(manyPools(n))
			if _, err := ns.applier().Apply(tbl); err != nil {
				b.Fatal(err)
			}
			c := ns.conn()
			for b.Loop() {
				if _, err := Read(c, tbl.Name); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkCheck: drift check of a table of N pools without drift.
func BenchmarkCheck(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("pools=%d", n), func(b *testing.B) {
			ns := newScratchNS(b)
			a := ns.applier()
			if _, err := a.Apply(Build(manyPools(n))); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if d, err := a.Check(); err != nil || d.Drifted() {
					b.Fatalf("Check = %v, %v", d, err)
				}
			}
		})
	}
}

// BenchmarkApplyOneBackendChange: one backend of one pool goes down or up
// while N pools exist; the transaction changes 2 of that pool's slot-map
// elements and nothing else.
func BenchmarkApplyOneBackendChange(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("pools=%d", n), func(b *testing.B) {
			ns := newScratchNS(b)
			a := ns.applier()
			full := manyPools(n)
			down := full
			down.Pools = slices.Clone(full.Pools)
			down.Pools[n/2].Configured = full.Pools[n/2].Backends
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
