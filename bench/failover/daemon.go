package main

import (
	"context"
	"os"
	"path/filepath"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/lab"
)

// startDaemon writes cfg to dir/lb.yaml, starts nftlb on it in the lab's
// LB namespace (logging JSON) and waits for its first apply.
func startDaemon(ctx context.Context, l *lab.Lab, bin, dir, cfg string) (*benchkit.Proc, error) {
	path := filepath.Join(dir, "lb.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	d, err := benchkit.StartNftlb(l.LB, bin, path, nil)
	if err != nil {
		return nil, err
	}
	if _, _, err := d.WaitFor(ctx, 0, 60*time.Second, benchkit.Match("ruleset applied")); err != nil {
		d.Stop()
		return nil, err
	}
	return d, nil
}
