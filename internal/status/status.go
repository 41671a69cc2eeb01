// Package status is the document behind GET /status and `nftlb status`:
// every pool and backend with its health, last probe and connections.
package status

import (
	"fmt"
	"io"
	"net/netip"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nftlb/nftlb/internal/health"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

// Doc is the whole status.
type Doc struct {
	Table   string    `json:"table"`
	Config  string    `json:"config"`
	Time    time.Time `json:"time"`
	Errors  []string  `json:"errors,omitempty"` // what could not be read (counters, conntrack)
	Pools   []Pool    `json:"pools"`
	Version string    `json:"version"`
}

// Pool is one pool.
type Pool struct {
	Name        string    `json:"name"`
	VIP         string    `json:"vip"`
	Port        uint16    `json:"port"`
	Protocol    string    `json:"protocol"`
	Scheduler   string    `json:"scheduler"`
	Check       string    `json:"check"`
	Connections uint64    `json:"connections_total"`
	BackendsUp  int       `json:"backends_up"`
	Backends    []Backend `json:"backends"`
}

// Backend is one backend of a pool.
type Backend struct {
	Address     string    `json:"address"`
	Weight      int       `json:"weight"`
	State       string    `json:"state"`
	Since       time.Time `json:"since,omitzero"`
	Transitions int       `json:"transitions"`
	LastProbe   Probe     `json:"last_probe"`
	Active      int       `json:"active_connections"`
	Connections uint64    `json:"connections_total"`
}

// Probe is a backend's latest probe result.
type Probe struct {
	Outcome string    `json:"outcome"`
	Error   string    `json:"error,omitempty"`
	Latency float64   `json:"latency_seconds"`
	At      time.Time `json:"at,omitzero"`
}

// Inputs are what a Doc is built from; Counters and Active may be partial.
type Inputs struct {
	Config   *vip.Config
	Health   []health.Status
	Counters ruleset.Counters
	Active   map[netip.AddrPort]int // per backend, from conntrack
	Errors   []string
	Version  string
	Now      time.Time
}

// Build assembles the document. It is pure.
func Build(in Inputs) Doc {
	d := Doc{Table: in.Config.Table, Config: in.Config.File, Time: in.Now, Errors: in.Errors, Version: in.Version}
	byID := map[string]health.Status{}
	for _, s := range in.Health {
		byID[s.ID] = s
	}
	for i := range in.Config.Pools {
		p := &in.Config.Pools[i]
		dp := Pool{Name: p.Name, VIP: p.VIP.String(), Port: p.Port, Protocol: string(p.Protocol),
			Scheduler: string(p.Scheduler), Check: string(p.Health.Type), Connections: in.Counters.Pools[p.Name]}
		for _, b := range p.Backends {
			s := byID[p.ID(b)]
			db := Backend{Address: b.Addr.String(), Weight: b.Weight, State: s.State.String(), Since: s.Since,
				Transitions: s.Transitions, Active: in.Active[b.Addr],
				Connections: in.Counters.Backends[ruleset.Endpoint{Addr: b.Addr, Protocol: p.Protocol}].Connections}
			if !s.Last.At.IsZero() {
				db.LastProbe = Probe{Outcome: s.Last.Outcome.String(), Latency: s.Last.Latency.Seconds(), At: s.Last.At}
				if s.Last.Err != nil {
					db.LastProbe.Error = s.Last.Err.Error()
				}
			}
			if s.State == health.Up {
				dp.BackendsUp++
			}
			dp.Backends = append(dp.Backends, db)
		}
		d.Pools = append(d.Pools, dp)
	}
	return d
}

// WriteTable prints the document for a person: one line per backend.
func (d Doc) WriteTable(w io.Writer) error {
	fmt.Fprintf(w, "table ip %s, config %s, nftlb %s, at %s\n", d.Table, d.Config, d.Version, d.Time.Format(time.RFC3339))
	for _, e := range d.Errors {
		fmt.Fprintf(w, "warning: %s\n", e)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nPOOL\tVIP\tSCHEDULER\tUP\tBACKEND\tWEIGHT\tSTATE\tSINCE\tLAST PROBE\tACTIVE\tCONNS")
	for _, p := range d.Pools {
		for i, b := range p.Backends {
			pool, vipCol, sched, up := "", "", "", ""
			if i == 0 {
				pool = p.Name
				vipCol = fmt.Sprintf("%s:%d/%s", p.VIP, p.Port, p.Protocol)
				sched = p.Scheduler
				up = fmt.Sprintf("%d/%d", p.BackendsUp, len(p.Backends))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%d\t%d\n", pool, vipCol, sched, up,
				b.Address, b.Weight, b.State, since(d.Time, b.Since), probeText(b.LastProbe, p.Check), b.Active, b.Connections)
		}
	}
	return tw.Flush()
}

func since(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return now.Sub(t).Round(time.Second).String()
}

func probeText(p Probe, check string) string {
	if p.Outcome == "" {
		return "-"
	}
	s := fmt.Sprintf("%s %s %s", check, p.Outcome, time.Duration(p.Latency*float64(time.Second)).Round(10*time.Microsecond))
	if p.Error != "" {
		e := p.Error
		if len(e) > 60 {
			e = e[:57] + "..."
		}
		s += ": " + strings.ReplaceAll(e, "\t", " ")
	}
	return s
}
