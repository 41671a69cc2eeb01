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
	usable := map[string]bool{}
	for i := range cfg.Pools {
		p := &cfg.Pools[i]
		kp := (*ruleset.Pool)(nil)
		if kernel != nil {
			kp = kernel.Pool(p.Name)
		}
		serving := false
		for _, b := range p.Backends {
			switch stateOf(p.ID(b)) {
			case health.Up:
				usable[p.ID(b)] = true
			case health.Unknown:
				usable[p.ID(b)] = kp != nil && kp.Uses(b.Addr)
			}
			serving = serving || usable[p.ID(b)]
		}
		if serving || p.Health.OnAllDown != vip.AllDownServeAll {
			continue
		}
		for _, b := range p.Backends {
			if stateOf(p.ID(b)) != health.Down {
				usable[p.ID(b)], serving = true, true
			}
		}
		if !serving {
			for _, b := range p.Backends {
				usable[p.ID(b)] = true
			}
		}
	}
	// BuildOn keeps the kernel's key ranges, so a health change is map
	// elements only and a restart with the same config sends nothing.
	return ruleset.BuildOn(ruleset.FromConfig(cfg, func(p *vip.Pool, b vip.Backend) bool { return usable[p.ID(b)] }), kernel)
}
