package ruleset

import (
	"errors"
	"fmt"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
)

// ErrNotOwned is returned when a table of nftlb's name exists but nftlb did
// not create it: nftlb never takes over or deletes someone else's table.
var ErrNotOwned = errors.New("table exists but was not created by nftlb")

// Applier is the only writer of nftlb's table. It remembers what it last
// programmed, so each Apply sends only the difference, as one transaction.
// It is not safe for concurrent use; the daemon calls it from one goroutine.
type Applier struct {
	opts    []nftables.ConnOption
	conn    *nftables.Conn
	applied *Table          // what the kernel has; nil = unknown, next apply is full
	owned   map[string]bool // tables verified as ours in this process
}

// NewApplier makes an Applier; opts are extra connection options (tests
// pass nftables.WithNetNSFd to work inside a namespace).
func NewApplier(opts ...nftables.ConnOption) *Applier {
	return &Applier{opts: opts, owned: map[string]bool{}}
}

// bufSize: the default socket buffers give ENOBUFS around 80 pools and
// EMSGSIZE around 1,000 in one batch.
const bufSize = 64 << 20

func (a *Applier) connect() (*nftables.Conn, error) {
	if a.conn != nil {
		return a.conn, nil
	}
	opts := append([]nftables.ConnOption{
		nftables.AsLasting(),
		nftables.WithSockOptions(
			func(c *netlink.Conn) error { return c.SetReadBuffer(bufSize) },
			func(c *netlink.Conn) error { return c.SetWriteBuffer(bufSize) },
		),
	}, a.opts...)
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	a.conn = c
	return c, nil
}

// reset drops the connection (a failed Flush leaves it with mismatched
// sequence numbers) and forgets what the kernel has, so the next Apply is a
// full replace.
func (a *Applier) reset() {
	if a.conn != nil {
		_ = a.conn.CloseLasting()
		a.conn = nil
	}
	a.applied = nil
}

// Close releases the netlink socket. The table stays in the kernel.
func (a *Applier) Close() error {
	if a.conn == nil {
		return nil
	}
	err := a.conn.CloseLasting()
	a.conn = nil
	return err
}

// Applied returns what the kernel was last programmed with (nil if unknown).
func (a *Applier) Applied() *Table { return a.applied }

// Result describes one Apply.
type Result struct {
	Plan     Plan
	Duration time.Duration
}

// Apply programs next. The first call (and the first after a failure)
// replaces the whole table in one transaction; later calls change only
// what differs. A no-op is not sent. On error the kernel still has the
// previous state (the transaction is all or nothing).
func (a *Applier) Apply(next *Table) (Result, error) {
	start := time.Now()
	plan := Diff(a.applied, next)
	if plan.Empty() {
		return Result{Plan: plan, Duration: time.Since(start)}, nil
	}
	c, err := a.connect()
	if err != nil {
		return Result{Plan: plan}, err
	}
	if plan.Full {
		if err := a.checkOwned(c, next.Name); err != nil {
			return Result{Plan: plan}, err
		}
	}
	if err := queue(c, a.applied, next, plan); err != nil {
		a.reset()
		return Result{Plan: plan}, fmt.Errorf("build transaction for table ip %s: %w", next.Name, err)
	}
	if err := c.Flush(); err != nil {
		a.reset()
		return Result{Plan: plan}, fmt.Errorf("apply table ip %s: %w", next.Name, err)
	}
	a.applied = next
	return Result{Plan: plan, Duration: time.Since(start)}, nil
}

// checkOwned verifies, once per table and process, that name is absent or
// carries nftlb's marker.
func (a *Applier) checkOwned(c *nftables.Conn, name string) error {
	if a.owned[name] {
		return nil
	}
	ok, err := owned(c, name)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("table ip %s: %w (no %q rule in chain %s); choose another `table:` or remove it yourself",
			name, ErrNotOwned, OwnerComment, chainPrerouting)
	}
	a.owned[name] = true
	return nil
}

// owned reports whether table ip name is absent (true: free to create) or
// was created by nftlb.
func owned(c *nftables.Conn, name string) (bool, error) {
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return false, fmt.Errorf("list tables: %w", err)
	}
	var tbl *nftables.Table
	for _, t := range tables {
		if t.Name == name {
			tbl = t
		}
	}
	if tbl == nil {
		return true, nil
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return false, fmt.Errorf("list chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name != name || ch.Name != chainPrerouting {
			continue
		}
		rules, err := c.GetRules(tbl, ch)
		if err != nil {
			return false, fmt.Errorf("list rules of table ip %s chain %s: %w", name, ch.Name, err)
		}
		for _, r := range rules {
			if s, ok := userdata.GetString(r.UserData, userdata.TypeComment); ok && s == OwnerComment {
				return true, nil
			}
		}
	}
	return false, nil
}

// Remove deletes nftlb's table, and nothing else. It refuses a table nftlb
// did not create. Removing a table that does not exist is not an error;
// the returned bool says whether there was one.
func (a *Applier) Remove(name string) (bool, error) {
	c, err := a.connect()
	if err != nil {
		return false, err
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return false, fmt.Errorf("list tables: %w", err)
	}
	found := false
	for _, t := range tables {
		found = found || t.Name == name
	}
	if !found {
		return false, nil
	}
	if err := a.checkOwned(c, name); err != nil {
		return false, err
	}
	c.DelTable(nlTable(name))
	if err := c.Flush(); err != nil {
		a.reset()
		return false, fmt.Errorf("delete table ip %s: %w", name, err)
	}
	a.applied = nil
	return true, nil
}
