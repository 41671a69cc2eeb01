package ruleset

import (
	"fmt"
	"strings"
	"sync"

	"github.com/google/nftables"
)

// Counters are the kernel's counts in nftlb's table.
type Counters struct {
	Pools    map[string]uint64 // pool name -> new connections (its services element's counter)
	Backends map[Endpoint]BackendCounters
}

// BackendCounters are one backend's counts from the accounting sets: new
// connections and traffic of connections DNATed to it, routed through the
// LB (the LB host's own connections do not pass the forward hook).
type BackendCounters struct {
	Connections        uint64
	TxPackets, TxBytes uint64 // towards the backend
	RxPackets, RxBytes uint64 // from the backend
}

// Reader reads counters on a connection of its own, so that metrics
// scrapes never share the Applier's (which the control loop owns). It is
// safe for concurrent use.
type Reader struct {
	mu   sync.Mutex
	opts []nftables.ConnOption
	conn *nftables.Conn
}

// NewReader returns a Reader; opts as for NewApplier.
func NewReader(opts ...nftables.ConnOption) *Reader { return &Reader{opts: opts} }

// Close releases the netlink socket.
func (r *Reader) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conn == nil {
		return nil
	}
	err := r.conn.CloseLasting()
	r.conn = nil
	return err
}

// Counters reads every pool counter and accounting element of table ip name.
func (r *Reader) Counters(name string) (Counters, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conn == nil {
		c, err := nftables.New(append([]nftables.ConnOption{nftables.AsLasting()}, r.opts...)...)
		if err != nil {
			return Counters{}, fmt.Errorf("open netlink: %w", err)
		}
		r.conn = c
	}
	out, err := readCounters(r.conn, name)
	if err != nil {
		// A failed dump can leave the socket out of step; start afresh.
		_ = r.conn.CloseLasting()
		r.conn = nil
	}
	return out, err
}

func readCounters(c *nftables.Conn, name string) (Counters, error) {
	tbl := nlTable(name)
	out := Counters{Pools: map[string]uint64{}, Backends: map[Endpoint]BackendCounters{}}
	svc, err := c.GetSetElements(servicesSet(tbl))
	if err != nil {
		return out, fmt.Errorf("read map %s of table ip %s: %w", servicesMap, name, err)
	}
	for _, el := range svc {
		chain, err := gotoChain(el)
		pool, ok := strings.CutPrefix(chain, "pool-")
		if err != nil || !ok || el.Counter == nil {
			continue
		}
		out.Pools[pool] = el.Counter.Packets
	}
	for _, set := range accountingSets(tbl) {
		els, err := c.GetSetElements(set)
		if err != nil {
			return out, fmt.Errorf("read set %s of table ip %s: %w", set.Name, name, err)
		}
		for _, el := range els {
			e, err := decodeEndpointKey(el.Key)
			if err != nil || el.Counter == nil {
				continue
			}
			bc := out.Backends[e]
			switch set.Name {
			case setConn:
				bc.Connections = el.Counter.Packets
			case setTx:
				bc.TxPackets, bc.TxBytes = el.Counter.Packets, el.Counter.Bytes
			case setRx:
				bc.RxPackets, bc.RxBytes = el.Counter.Packets, el.Counter.Bytes
			}
			out.Backends[e] = bc
		}
	}
	return out, nil
}
