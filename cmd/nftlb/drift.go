package main

import (
	"context"
	"time"

	"github.com/google/nftables"

	"github.com/nftlb/nftlb/internal/ruleset"
)

// watch subscribes to changes of our table by others. A failure is logged
// once, and the loop tries again every few seconds.
func (d *daemon) watch(ctx context.Context) {
	ch, err := d.applier.Watch(ctx)
	if err != nil {
		if !d.watchBroken {
			d.log.Warn("cannot watch the table for changes by others; relying on the periodic check", "err", err)
			d.watchBroken = true
		}
		return
	}
	if d.watchBroken {
		d.log.Info("watching the table for changes by others again")
		d.watchBroken = false
	}
	d.drift = ch
}

// checkDrift compares the kernel with what nftlb applied and, if someone
// else changed or deleted the table, restores it with the smallest
// transaction.
func (d *daemon) checkDrift(foundBy string) {
	start := time.Now()
	dr, err := d.applier.Check()
	if err != nil {
		d.log.Warn("drift check failed", "err", err)
		return
	}
	if !dr.Drifted() {
		return
	}
	d.metrics.DriftRepairs.Inc()
	attrs := []any{"found_by", foundBy, "gone", dr.Gone, "check", time.Since(start)}
	if dr.Unrecognized != "" {
		attrs = append(attrs, "unrecognized", dr.Unrecognized)
	}
	if len(dr.Changes) > 0 {
		attrs = append(attrs, "changes", dr.Changes)
	}
	d.log.Warn("nftlb's table was changed by someone else; restoring it", attrs...)
	if _, err := d.apply(d.cfg, "drift"); err != nil {
		d.scheduleRetry(err)
	}
}

// driftScanner is the safety net behind the watch: every 30 s (or 20 times
// what a read costs, for very large tables) it reads the table on its own
// connection, off the control loop, and tells the loop when the kernel
// differs from what was applied; the loop then checks and repairs.
func (d *daemon) driftScanner(table string) {
	every := 30 * time.Second
	var conn *nftables.Conn
	defer func() {
		if conn != nil {
			_ = conn.CloseLasting()
		}
	}()
	for {
		select {
		case <-d.done:
			return
		case <-time.After(every):
		}
		applied := d.applied.Load()
		if cfg := d.running.Load(); cfg != nil {
			table = cfg.Table
		}
		if conn == nil {
			c, err := nftables.New(nftables.AsLasting())
			if err != nil {
				continue
			}
			conn = c
		}
		start := time.Now()
		read, err := ruleset.Read(conn, table)
		every = max(30*time.Second, 20*time.Since(start))
		if err != nil && read == nil {
			_ = conn.CloseLasting()
			conn = nil
		}
		if !ruleset.Same(read, applied) {
			select {
			case d.suspect <- struct{}{}:
			default:
			}
		}
	}
}
