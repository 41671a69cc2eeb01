package ruleset

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Drift is how the kernel's table differs from what the Applier last
// applied. The zero value means no drift.
type Drift struct {
	Gone bool // the table no longer exists
	// Unrecognized is Read's reason when the table is no longer in
	// nftlb's layout ("" otherwise). The next Apply replaces it whole.
	Unrecognized string
	// Plan is the repair from what the kernel has back to what was
	// applied, when the layout was recognised; the next Apply sends it.
	Plan Plan
	// Changes summarises the drift, one short line per difference, e.g.
	// "pool kube-apiserver: map elements differ" (at most maxDriftLines).
	Changes []string
}

// Drifted reports whether the kernel differs from what was applied.
func (d Drift) Drifted() bool { return d.Gone || d.Unrecognized != "" || !d.Plan.Empty() }

func (d Drift) String() string {
	if !d.Drifted() {
		return "no drift"
	}
	return strings.Join(d.Changes, "; ")
}

const maxDriftLines = 20

// Check reads the kernel's table and compares it with what the Applier
// last applied. When the two differ it returns the Drift and prepares the
// next Apply to repair it: with the table read back as the Applier's idea
// of the kernel, so the repair is the minimal incremental diff, or, when
// the table is gone or no longer recognised, with no idea at all, so the
// next Apply reads it again and replaces it whole if it must. Without
// drift nothing changes. Before anything was applied there is nothing to
// drift from (the next Apply reads the kernel anyway): no drift. A drift
// is reported once: from then on the Applier's idea of the kernel is what
// the kernel has, so a second Check before the repairing Apply finds
// nothing new.
//
// Like the rest of Applier it is not safe for concurrent use; the daemon
// calls it from its loop, typically when Watch signals.
func (a *Applier) Check() (Drift, error) {
	if a.applied == nil {
		return Drift{}, nil
	}
	c, err := a.connect()
	if err != nil {
		return Drift{}, err
	}
	name := a.applied.Name
	got, err := Read(c, name)
	var d Drift
	switch {
	case err == nil:
		adoptUnknowable(got, a.applied)
		d.Plan = Diff(got, a.applied)
		if d.Plan.Empty() {
			return Drift{}, nil
		}
		d.Changes = summarise(d.Plan)
		a.applied = got
		return d, nil
	case errors.Is(err, ErrNoTable):
		d.Gone = true
		d.Changes = []string{fmt.Sprintf("table ip %s: gone", name)}
	case errors.Is(err, ErrUnrecognized):
		d.Unrecognized = err.Error()
		d.Changes = []string{err.Error()}
	default:
		a.dropConn()
		return Drift{}, fmt.Errorf("check: %w", err)
	}
	if d.Gone {
		// A table created under that name from now on is not the one
		// verified: check ownership again before replacing it. (An
		// edited table stays ours: edits are overwritten.)
		delete(a.owned, name)
	}
	a.applied = nil
	return d, nil
}

// summarise describes a repair plan computed as Diff(kernel, applied).
func summarise(p Plan) []string {
	var out []string
	if p.Masquerade {
		out = append(out, "chain postrouting: masquerade rule differs")
	}
	for i, c := range p.Pools {
		if len(out) == maxDriftLines-1 && len(p.Pools)-i > 1 {
			out = append(out, fmt.Sprintf("%d more pools differ", len(p.Pools)-i))
			break
		}
		switch {
		case c.Old == nil:
			out = append(out, "pool "+c.Name+": missing")
		case c.New == nil:
			out = append(out, "pool "+c.Name+": not applied by nftlb")
		default:
			var what []string
			if c.Dispatch {
				what = append(what, "services element differs")
			}
			if c.Slots {
				what = append(what, "map elements differ")
			}
			if c.Rule {
				what = append(what, "rule differs")
			}
			out = append(out, "pool "+c.Name+": "+strings.Join(what, ", "))
		}
	}
	// Map elements that no changed pool explains: keys no pool reaches.
	explained := map[string]bool{}
	for _, c := range p.Pools {
		if c.Old != nil {
			explained[c.Old.Map] = true
		}
		if c.New != nil {
			explained[c.New.Map] = true
		}
	}
	for _, m := range p.Maps {
		if !explained[m.Name] && len(out) < maxDriftLines {
			out = append(out, fmt.Sprintf("map %s: %d elements no pool uses", m.Name, len(m.Del)))
		}
	}
	if n := len(p.AccountAdd); n > 0 {
		out = append(out, fmt.Sprintf("accounting: %d backends missing (%s first)", n, p.AccountAdd[0]))
	}
	if n := len(p.AccountDel); n > 0 {
		out = append(out, fmt.Sprintf("accounting: %d backends not applied by nftlb (%s first)", n, p.AccountDel[0]))
	}
	return out
}

// Watch signals on the returned channel (capacity 1, coalesced, never
// blocking the watcher) whenever an nf_tables change notification concerns
// the table this Applier programs: table, chain, rule, set, element or
// object events of table ip NAME, NAME being the table of the latest
// Apply (nothing is signalled before the first). Changes of other tables
// and other families, and the Applier's own transactions (recognised by
// the netlink port ID they carry), are not signalled. A lost burst of
// events (the socket's buffer overflowed) is signalled, as it may have
// concerned us. The channel is closed when ctx ends, or after a final
// signal when the socket fails (call Watch again).
//
// Watch reads notifications on a socket of its own, opened with the
// Applier's options (so in its namespace). It parses only each message's
// family and table name: google/nftables v0.3.0's Monitor cannot say which
// table a set-element event belongs to, stops for good on ENOBUFS, and
// blocks forever on its unbuffered channel once the reader stops reading.
func (a *Applier) Watch(ctx context.Context) (<-chan struct{}, error) {
	var raw *netlink.Conn
	opts := append([]nftables.ConnOption{
		nftables.AsLasting(),
		nftables.WithSockOptions(func(c *netlink.Conn) error {
			raw = c
			return c.SetReadBuffer(bufSize)
		}),
	}, a.opts...)
	nc, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("open netlink for monitoring: %w", err)
	}
	if err := raw.JoinGroup(unix.NFNLGRP_NFTABLES); err != nil {
		_ = nc.CloseLasting()
		return nil, fmt.Errorf("join nftables multicast group: %w", err)
	}
	out := make(chan struct{}, 1)
	signal := func() {
		select {
		case out <- struct{}{}:
		default:
		}
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-done:
		}
		_ = nc.CloseLasting() // unblocks Receive
	}()
	trace := a.watchTrace
	go func() {
		defer close(out)
		defer close(done)
		for {
			msgs, err := raw.Receive()
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				signal()
				if errors.Is(err, unix.ENOBUFS) {
					continue
				}
				return
			}
			for _, m := range msgs {
				table, ok := eventTable(m)
				relevant := ok && a.concerns(table, m.Header.PID)
				if trace != nil {
					trace(m, table, relevant)
				}
				if relevant {
					signal()
				}
			}
		}
	}()
	return out, nil
}

func (a *Applier) concerns(table string, pid uint32) bool {
	name := a.table.Load()
	if name == nil || *name != table {
		return false
	}
	own := a.pid.Load()
	return own == 0 || pid != own
}

// eventTable returns the table an nf_tables notification concerns, when
// it is an object event of the ip family. Every such message carries the
// table name as its first attribute type (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE,
// NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_SET_ELEM_LIST_TABLE, NFTA_OBJ_TABLE
// and NFTA_FLOWTABLE_TABLE are all 1).
func eventTable(m netlink.Message) (string, bool) {
	if m.Header.Type>>8 != unix.NFNL_SUBSYS_NFTABLES {
		return "", false
	}
	switch m.Header.Type & 0xff {
	case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE,
		unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN,
		unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE,
		unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET,
		unix.NFT_MSG_NEWSETELEM, unix.NFT_MSG_DELSETELEM,
		unix.NFT_MSG_NEWOBJ, unix.NFT_MSG_DELOBJ,
		unix.NFT_MSG_NEWFLOWTABLE, unix.NFT_MSG_DELFLOWTABLE:
	default:
		return "", false
	}
	if len(m.Data) < 4 || m.Data[0] != unix.NFPROTO_IPV4 {
		return "", false
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[4:])
	if err != nil {
		return "", false
	}
	for ad.Next() {
		if ad.Type() == unix.NFTA_TABLE_NAME {
			return ad.String(), true
		}
	}
	return "", false
}
