package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/google/nftables"

	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/status"
	"github.com/nftlb/nftlb/internal/vip"
)

// cmdDiff prints what applying a config would change in the kernel right
// now, so an edit can be reviewed before SIGHUP. Backend health comes from
// the running daemon's /status (its metrics.listen); without a daemon,
// every backend counts as up, and the output says so.
func cmdDiff(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("diff", "-config FILE", stderr)
	path := fs.String("config", defaultConfig, "config file")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	cfg, ok := loadConfig(*path, stderr)
	if !ok {
		return exitError
	}
	up, note := runningHealth(cfg.Metrics.Listen)
	fmt.Fprintf(stdout, "# %s\n", note)
	next := ruleset.Build(ruleset.FromConfig(cfg, func(p *vip.Pool, b vip.Backend) bool {
		st, known := up[p.ID(b)]
		return !known || st
	}))
	c, err := nftables.New()
	if err != nil {
		fmt.Fprintf(stderr, "nftlb diff: %v\n", err)
		return exitError
	}
	prev, err := ruleset.Read(c, cfg.Table)
	switch {
	case errors.Is(err, ruleset.ErrNoTable):
		prev = nil
	case errors.Is(err, ruleset.ErrUnrecognized):
		fmt.Fprintf(stdout, "# the kernel's table is not in nftlb's layout (%v)\n", err)
		prev = nil
	case err != nil:
		fmt.Fprintf(stderr, "nftlb diff: %v\n", err)
		return exitError
	}
	if prev != nil {
		// Empty pools keep no scheduler in the kernel; compare like for like.
		for i := range prev.Pools {
			if p := next.Pool(prev.Pools[i].Name); p != nil && len(prev.Pools[i].Slots) == 0 {
				prev.Pools[i].Scheduler = p.Scheduler
			}
		}
	}
	fmt.Fprint(stdout, ruleset.Diff(prev, next).Describe(prev, next))
	return exitOK
}

// runningHealth asks the daemon which backends are up.
func runningHealth(addr string) (map[string]bool, string) {
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get("http://" + addr + "/status")
	if err != nil {
		return nil, fmt.Sprintf("no running nftlb at %s (%v): every backend counted as up", addr, err)
	}
	defer resp.Body.Close()
	var doc status.Doc
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&doc); err != nil {
		return nil, fmt.Sprintf("bad /status from %s (%v): every backend counted as up", addr, err)
	}
	up := map[string]bool{}
	for _, p := range doc.Pools {
		for _, b := range p.Backends {
			up[p.Name+"/"+b.Address] = b.State == "up"
		}
	}
	return up, fmt.Sprintf("backend health from the nftlb running at %s; new backends counted as up", addr)
}
