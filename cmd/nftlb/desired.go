package main

import (
	"github.com/nftlb/nftlb/internal/health"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

// desiredTable is the state the kernel should have: each pool with the
// backends that may take new connections. It is the one place that rule
// lives; the daemon and `nftlb diff` both use it.
//
//   - Up: yes. Unready, Down: no.
//   - Unknown (not probed yet: just started, or re-created after a reload
//     the kernel refused): keep what the kernel has, so a restart never
//     drops a serving backend nor adds an unchecked one.
//   - No backend usable and on_all_down: serve-all: fail open, preferring
//     backends that answer (unready, unknown) over ones that do not.
func desiredTable(cfg *vip.Config, stateOf func(id string) health.State, kernel *ruleset.Table) *ruleset.Table {
	// Indexed by pool and backend position, not by ID string: at 10,000
	// pools this runs before every apply (IDs are built once, for stateOf).
	usable := make(map[*vip.Pool][]bool, len(cfg.Pools))
	for i := range cfg.Pools {
		p := &cfg.Pools[i]
		use := make([]bool, len(p.Backends))
		states := make([]health.State, len(p.Backends))
		var kp *ruleset.Pool
		serving := false
		for j, b := range p.Backends {
			states[j] = stateOf(p.ID(b))
			switch states[j] {
			case health.Up:
				use[j] = true
			case health.Unknown:
				if kp == nil && kernel != nil {
					kp = kernel.Pool(p.Name)
				}
				use[j] = kp != nil && kp.Uses(b.Addr)
			}
			serving = serving || use[j]
		}
		if !serving && p.Health.OnAllDown == vip.AllDownServeAll {
			for j := range p.Backends {
				if states[j] != health.Down {
					use[j], serving = true, true
				}
			}
			if !serving {
				for j := range use {
					use[j] = true
				}
			}
		}
		usable[p] = use
	}
	// BuildOn keeps the kernel's key ranges, so a health change is map
	// elements only and a restart with the same config sends nothing.
	return ruleset.BuildOn(ruleset.FromConfig(cfg, func(p *vip.Pool, b vip.Backend) bool {
		for j := range p.Backends {
			if p.Backends[j].Addr == b.Addr {
				return usable[p][j]
			}
		}
		return false
	}), kernel)
}
