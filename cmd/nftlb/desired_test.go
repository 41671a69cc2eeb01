package main

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/nftlb/nftlb/internal/health"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

func TestDesiredTable(t *testing.T) {
	a, b, c := netip.MustParseAddrPort("198.18.1.11:80"), netip.MustParseAddrPort("198.18.1.12:80"), netip.MustParseAddrPort("198.18.1.13:80")
	cfg := func(policy vip.AllDownPolicy) *vip.Config {
		return &vip.Config{Table: "nftlb", Masquerade: true, Pools: []vip.Pool{{
			Name: "p", VIP: netip.MustParseAddr("198.18.100.1"), Port: 80, Protocol: vip.TCP, Scheduler: vip.RoundRobin,
			Health:   vip.Health{OnAllDown: policy},
			Backends: []vip.Backend{{Addr: a, Weight: 1}, {Addr: b, Weight: 1}, {Addr: c, Weight: 1}},
		}}}
	}
	kernelWith := func(addrs ...netip.AddrPort) *ruleset.Table {
		var bs []vip.Backend
		for _, x := range addrs {
			bs = append(bs, vip.Backend{Addr: x, Weight: 1})
		}
		return ruleset.Build(ruleset.Spec{Table: "nftlb", Pools: []ruleset.PoolSpec{{Name: "p", VIP: netip.MustParseAddr("198.18.100.1"),
			Port: 80, Protocol: vip.TCP, Scheduler: vip.RoundRobin, Backends: bs}}})
	}
	S := func(states ...health.State) func(string) health.State {
		return func(id string) health.State {
			for i, x := range []netip.AddrPort{a, b, c} {
				if id == vip.BackendID("p", x) {
					return states[i]
				}
			}
			return health.Unknown
		}
	}
	U, D, N, K := health.Up, health.Down, health.Unready, health.Unknown
	tests := []struct {
		name   string
		policy vip.AllDownPolicy
		states func(string) health.State
		kernel *ruleset.Table
		want   []netip.AddrPort
	}{
		{"up only", vip.AllDownReject, S(U, D, N), nil, []netip.AddrPort{a}},
		{"unknown keeps the kernel's choice", vip.AllDownReject, S(U, K, K), kernelWith(b), []netip.AddrPort{a, b}},
		{"unknown without a kernel table: out", vip.AllDownReject, S(K, K, U), nil, []netip.AddrPort{c}},
		{"all down, reject", vip.AllDownReject, S(D, D, N), nil, nil},
		{"serve-all prefers backends that answer", vip.AllDownServeAll, S(D, N, D), nil, []netip.AddrPort{b}},
		{"serve-all with every backend down: all", vip.AllDownServeAll, S(D, D, D), nil, []netip.AddrPort{a, b, c}},
		{"serve-all not needed", vip.AllDownServeAll, S(D, U, D), nil, []netip.AddrPort{b}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := desiredTable(cfg(tt.policy), tt.states, tt.kernel).Pool("p").Slots
			var want []netip.AddrPort
			want = append(want, tt.want...)
			if !slices.Equal(distinct(got), want) {
				t.Errorf("slots %v, want %v", got, want)
			}
		})
	}
}

// distinct: the backends the slots go to (a pool has more slots than
// backends), sorted.
func distinct(s []netip.AddrPort) []netip.AddrPort {
	out := slices.Clone(s)
	slices.SortFunc(out, func(x, y netip.AddrPort) int { return x.Compare(y) })
	out = slices.Compact(out)
	if len(out) == 0 {
		return nil
	}
	return out
}

// BenchmarkDesiredTable: what the daemon computes before every apply, at
// 10,000 pools x 3 backends with one backend down, over the kernel's table.
func BenchmarkDesiredTable(b *testing.B) {
	cfg := &vip.Config{Table: "nftlb", Masquerade: true}
	for i := range 10000 {
		p := vip.Pool{Name: fmt.Sprintf("p%05d", i), VIP: netip.AddrFrom4([4]byte{198, 18, byte(100 + i/250), byte(1 + i%250)}),
			Port: 443, Protocol: vip.TCP, Scheduler: vip.RoundRobin}
		for j := range 3 {
			p.Backends = append(p.Backends, vip.Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 1, byte(11 + j)}), 443), Weight: 1})
		}
		cfg.Pools = append(cfg.Pools, p)
	}
	down := cfg.Pools[5000].ID(cfg.Pools[5000].Backends[0])
	state := func(id string) health.State {
		if id == down {
			return health.Down
		}
		return health.Up
	}
	kernel := desiredTable(cfg, func(string) health.State { return health.Up }, nil)
	for b.Loop() {
		_ = desiredTable(cfg, state, kernel)
	}
}
