package ruleset

import (
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// ErrNotOwned is returned when a table of nftlb's name exists but nftlb did
// not create it: nftlb never takes over or deletes someone else's table.
var ErrNotOwned = errors.New("table exists but was not created by nftlb")

// Applier is the only writer of nftlb's table. It remembers what it last
// programmed, so each Apply sends only the difference, as one transaction;
// when it does not know (first Apply of a process, after a failure), it
// reads the table the kernel has and, if it is nftlb's layout, adopts it.
// It is not safe for concurrent use; the daemon calls it from one goroutine
// (only the goroutine started by Watch runs alongside, and it reads just
// the two atomics below).
type Applier struct {
	opts    []nftables.ConnOption
	conn    *nftables.Conn
	applied *Table          // what the kernel has; nil = unknown, next apply reads it
	adopted *Table          // read back by Current, taken over by the next Apply
	owned   map[string]bool // tables verified as ours in this process

	table atomic.Pointer[string] // name of the table Apply programs, for Watch
	pid   atomic.Uint32          // netlink port ID of conn: Watch skips our own changes

	// watchTrace, when set (by tests) before Watch, sees every message
	// Watch receives and whether it signalled.
	watchTrace func(m netlink.Message, table string, signalled bool)
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
	var pid uint32
	opts := append([]nftables.ConnOption{
		nftables.AsLasting(),
		nftables.WithSockOptions(
			func(c *netlink.Conn) error { return c.SetReadBuffer(bufSize) },
			func(c *netlink.Conn) error { return c.SetWriteBuffer(bufSize) },
			func(c *netlink.Conn) error { pid = portID(c); return nil },
		),
	}, a.opts...)
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	a.conn = c
	a.pid.Store(pid)
	return c, nil
}

// portID is the netlink port ID the kernel bound the socket to; nf_tables
// notifications caused by this socket's requests carry it (0 if unknown).
func portID(c *netlink.Conn) uint32 {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	var pid uint32
	_ = rc.Control(func(fd uintptr) {
		if sa, err := unix.Getsockname(int(fd)); err == nil {
			if nl, ok := sa.(*unix.SockaddrNetlink); ok {
				pid = nl.Pid
			}
		}
	})
	return pid
}

// dropConn closes the connection (a failed Flush or dump leaves it with
// mismatched sequence numbers); the next call opens a new one.
func (a *Applier) dropConn() {
	if a.conn != nil {
		_ = a.conn.CloseLasting()
		a.conn = nil
	}
	a.pid.Store(0)
}

// reset drops the connection and forgets what the kernel has, so the next
// Apply reads the table again (and replaces it if it cannot adopt it).
func (a *Applier) reset() {
	a.dropConn()
	a.applied, a.adopted = nil, nil
}

// Close releases the netlink socket. The table stays in the kernel.
func (a *Applier) Close() error {
	a.dropConn()
	return nil
}

// Applied returns what the kernel was last programmed with (nil if unknown).
func (a *Applier) Applied() *Table { return a.applied }

// Result describes one Apply.
type Result struct {
	Plan     Plan
	Duration time.Duration
	// Adopted: the Applier did not know what the kernel had, read the
	// existing table, recognised nftlb's layout and sent only the
	// difference (nothing at all for an unchanged config), so counters,
	// accounting and numgen positions survive a restart.
	Adopted bool
	// Fallback says why an existing table was replaced whole instead of
	// adopted (Read's error, e.g. an older nftlb's layout); "" otherwise.
	Fallback string
}

// Apply programs next. When the Applier does not know what the kernel has
// (its first call, the first after a failure, or after Check found the
// table gone or unrecognizable), it reads the existing table: nftlb's
// layout is adopted and only the difference is sent; no table, or one it
// cannot adopt, is replaced whole in one transaction. Later calls change
// only what differs. A no-op is not sent. On error the kernel still has
// the previous state (the transaction is all or nothing).
func (a *Applier) Apply(next *Table) (Result, error) {
	start := time.Now()
	a.table.Store(&next.Name)
	var res Result
	if a.adopted != nil { // read by Current
		a.applied, a.adopted, res.Adopted = a.adopted, nil, true
	}
	if a.applied == nil {
		c, err := a.connect()
		if err != nil {
			return res, err
		}
		if err := a.checkOwned(c, next.Name); err != nil {
			return res, err
		}
		prev, err := Read(c, next.Name)
		switch {
		case err == nil:
			a.applied, res.Adopted = prev, true
		case errors.Is(err, ErrNoTable):
		default:
			// The full replace is always correct; it only costs the
			// counters. A failed dump may leave the socket out of step.
			res.Fallback = err.Error()
			if !errors.Is(err, ErrUnrecognized) {
				a.dropConn()
			}
		}
	}
	if res.Adopted {
		adoptUnknowable(a.applied, next)
	}
	res.Plan = Diff(a.applied, next)
	if res.Plan.Empty() {
		a.applied = next
		res.Duration = time.Since(start)
		return res, nil
	}
	c, err := a.connect()
	if err != nil {
		return res, err
	}
	if res.Plan.Full {
		if err := a.checkOwned(c, next.Name); err != nil {
			return res, err
		}
	}
	if err := queue(c, a.applied, next, res.Plan); err != nil {
		a.reset()
		return res, fmt.Errorf("build transaction for table ip %s: %w", next.Name, err)
	}
	if err := c.Flush(); err != nil {
		a.reset()
		return res, fmt.Errorf("apply table ip %s: %w", next.Name, err)
	}
	a.applied = next
	res.Duration = time.Since(start)
	return res, nil
}

// Current returns what the kernel has in table ip name as far as the
// Applier knows: what it applied, or else the table read back from the
// kernel (nil, nil when there is none, or one it cannot adopt). The daemon
// uses it at start so that backends not probed yet keep their place.
func (a *Applier) Current(name string) (*Table, error) {
	if a.applied != nil {
		return a.applied, nil
	}
	if a.adopted != nil {
		return a.adopted, nil
	}
	c, err := a.connect()
	if err != nil {
		return nil, err
	}
	if err := a.checkOwned(c, name); err != nil {
		return nil, err
	}
	t, err := Read(c, name)
	switch {
	case err == nil:
		a.adopted = t
		return t, nil
	case errors.Is(err, ErrNoTable), errors.Is(err, ErrUnrecognized):
		return nil, nil
	}
	a.dropConn()
	return nil, err
}

// Same reports whether the kernel's table (as Read returns it) is what
// applied describes. It is pure; a drift scanner can call it off the
// control loop on a table read with its own connection.
func Same(read, applied *Table) bool {
	if read == nil || applied == nil {
		return read == applied
	}
	return Diff(Comparable(read, applied), applied).Empty()
}

// Comparable returns a copy of read (a Table from Read) that takes from
// ref what the kernel does not keep (see adoptUnknowable), so that Diff
// compares like for like. It is pure.
func Comparable(read, ref *Table) *Table {
	cp := *read
	cp.Pools = slices.Clone(read.Pools)
	adoptUnknowable(&cp, ref)
	return &cp
}

// adoptUnknowable copies into read (a Table from Read) what the kernel
// does not keep, from ref: the scheduler, size and base of a pool without
// slots (its rule only rejects, so any of them programs the same kernel
// objects).
func adoptUnknowable(read, ref *Table) {
	for i := range read.Pools {
		p := &read.Pools[i]
		if len(p.Slots) > 0 {
			continue
		}
		if q := ref.Pool(p.Name); q != nil && len(q.Slots) == 0 {
			p.Scheduler, p.Size, p.Base = q.Scheduler, q.Size, q.Base
		}
	}
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
