package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"time"

	"github.com/google/nftables"

	"github.com/nftlb/nftlb/internal/health"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/status"
	"github.com/nftlb/nftlb/internal/vip"
)

// cmdDiff prints what applying a config would change in the kernel right
// now, so an edit can be reviewed before SIGHUP. Backend health comes from
// the running daemon's /status (its metrics.listen); without a daemon,
// every backend counts as up, and the output says so.
func cmdDiff(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("diff", "-config FILE [-addr HOST:PORT]", stderr)
	path := fs.String("config", defaultConfig, "config file")
	addr := fs.String("addr", "", "the running daemon's metrics.listen, for backend health (default: the file's)")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	cfg, ok := loadConfig(*path, stderr)
	if !ok {
		return exitError
	}
	if *addr == "" {
		*addr = cfg.Metrics.Listen
	}
	states, note := runningHealth(*addr)
	fmt.Fprintf(stdout, "# %s\n", note)
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
	// The daemon's own rule for which backends are used; a backend the
	// daemon does not report (new in this file) counts as up.
	next := desiredTable(cfg, func(id string) health.State {
		if st, ok := states[id]; ok {
			return st
		}
		return health.Up
	}, prev)
	if prev != nil {
		prev = ruleset.Comparable(prev, next)
	}
	fmt.Fprint(stdout, ruleset.Diff(prev, next).Describe(prev, next))
	return exitOK
}

// runningHealth asks the daemon for its backends' states.
func runningHealth(addr string) (map[string]health.State, string) {
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
	states := map[string]health.State{}
	for _, p := range doc.Pools {
		for _, b := range p.Backends {
			if a, err := netip.ParseAddrPort(b.Address); err == nil {
				states[vip.BackendID(p.Name, a)] = health.ParseState(b.State)
			}
		}
	}
	return states, fmt.Sprintf("backend health from the nftlb running at %s; backends it does not report counted as up", addr)
}
