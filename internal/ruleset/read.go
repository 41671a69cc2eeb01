package ruleset

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"syscall"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/nftlb/nftlb/internal/vip"
)

var (
	// ErrNoTable: the table does not exist.
	ErrNoTable = errors.New("table does not exist")
	// ErrUnrecognized: the table exists but is not laid out exactly as
	// nftlb makes it (an older nftlb, or edits by hand). The error's text
	// says what differs first.
	ErrUnrecognized = errors.New("unrecognized table layout")
)

// Read reconstructs, from what the kernel holds in table ip name, the *Table
// that Build would have produced, using netlink dumps only: the pools from
// the services vmap's elements, each pool's slots from its map, its
// scheduler from its chain's rule, Masquerade from the postrouting rule,
// Accounted from set backends-conn.
//
// It verifies the layout against what queueFull would create for the
// reconstructed table: exactly the same chains (hook, type, priority,
// policy), sets (flags, key and data types), named counters and no other
// object, the rules expression for expression (including the owner comment
// on the prerouting rule), a well-formed services vmap (each element a
// vip . tcp/udp . port key going to its own pool chain), and the three
// accounting sets holding the same elements, each with a counter. Anything
// else is an error wrapping ErrUnrecognized that says what differs first; a
// missing table is ErrNoTable; a netlink failure is returned as is.
//
// Slot-map elements that do not fit the rules (keys no pool's range
// covers, malformed data, missing keys) are data damage that rewriting
// elements repairs, so they are not an error: a pool's slot i is key
// base+i, a missing or malformed element reads as the invalid
// netip.AddrPort{}, and keys nothing reaches (or malformed) are listed in
// Stray. Build never makes either, so such a Table differs from every
// Build result and Diff repairs exactly those elements.
//
// Normalisation, so that the result is reflect.DeepEqual to Build's: Pools
// and Accounted are nil when empty (as Build makes them from FromConfig's
// specs), a pool's Slots are never nil, pools and accounted endpoints are
// sorted as Build sorts them. The kernel keeps no scheduler, size or base
// for a pool without slots (its rule only rejects): Read reports
// vip.RoundRobin, 0, 0 and the map Build would pick, and Apply and Check
// take those from the table they compare with (adoptUnknowable).
func Read(c *nftables.Conn, name string) (*Table, error) {
	r := &reader{c: c, name: name, rules: map[string][]*nftables.Rule{}, slots: map[string]map[uint32]netip.AddrPort{}}
	return r.read()
}

type reader struct {
	c      *nftables.Conn
	name   string
	tbl    *nftables.Table
	chains map[string]*nftables.Chain
	sets   map[string]*nftables.Set
	objs   map[string]*nftables.NamedObj
	rules  map[string][]*nftables.Rule
	slots  map[string]map[uint32]netip.AddrPort // slot maps' elements, read once
}

func (r *reader) bad(format string, args ...any) error {
	return fmt.Errorf("table ip %s: %w: %s", r.name, ErrUnrecognized, fmt.Sprintf(format, args...))
}

// libErr classifies an error from google/nftables. It wraps netlink and
// kernel errors with %v, so what is not recognisably a transport failure
// is taken for content it cannot decode (v0.3.0 fails on expressions and
// set types it does not know, e.g. `ct original ip daddr`), which is a
// layout nftlb did not make.
func (r *reader) libErr(what string, err error) error {
	if isTransport(err) {
		return fmt.Errorf("table ip %s: %s: %w", r.name, what, err)
	}
	return r.bad("%s: cannot decode: %v", what, err)
}

func isTransport(err error) bool {
	var op *netlink.OpError
	var errno syscall.Errno
	if errors.As(err, &op) || errors.As(err, &errno) {
		return true
	}
	s := err.Error()
	for _, p := range []string{"SendMessages:", "receiveAckAware:", "conn.Execute failed:"} {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

func (r *reader) read() (*Table, error) {
	tables, err := r.c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return nil, r.libErr("list tables", err)
	}
	for _, t := range tables {
		if t.Name == r.name {
			r.tbl = t
		}
	}
	if r.tbl == nil {
		return nil, fmt.Errorf("table ip %s: %w", r.name, ErrNoTable)
	}
	// Any flag (dormant, owner) is something nftlb does not set. v0.3.0
	// decodes the flags in host byte order; swap them back for the message.
	if r.tbl.Flags != 0 {
		flags := binary.BigEndian.Uint32(binaryutil.NativeEndian.PutUint32(r.tbl.Flags))
		return nil, r.bad("table flags %#x, want none", flags)
	}
	if err := r.list(); err != nil {
		return nil, err
	}
	for _, name := range []string{chainPrerouting, chainOutput, chainPost, chainNudge, chainForward} {
		if r.chains[name] == nil {
			return nil, r.bad("chain %s: missing", name)
		}
	}
	for _, name := range []string{servicesMap, setConn, setTx, setRx} {
		if r.sets[name] == nil {
			kind := "set"
			if name == servicesMap {
				kind = "map"
			}
			return nil, r.bad("%s %s: missing", kind, name)
		}
	}
	t := &Table{Name: r.name}
	if t.Pools, err = r.readPools(); err != nil {
		return nil, err
	}
	if t.Stray, err = r.stray(t.Pools); err != nil {
		return nil, err
	}
	post, err := r.chainRules(chainPost)
	if err != nil {
		return nil, err
	}
	switch len(post) {
	case 0:
	case 1:
		t.Masquerade = true
	default:
		return nil, r.bad("chain %s: rule count %d, want 0 or 1", chainPost, len(post))
	}
	if t.Accounted, err = r.readAccounting(); err != nil {
		return nil, err
	}
	if err := r.verifyLayout(t); err != nil {
		return nil, err
	}
	return t, nil
}

// list fetches the table's chains, sets and named objects (one dump each).
func (r *reader) list() error {
	chains, err := r.c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return r.libErr("list chains", err)
	}
	r.chains = map[string]*nftables.Chain{}
	for _, ch := range chains {
		if ch.Table != nil && ch.Table.Name == r.name {
			r.chains[ch.Name] = ch
		}
	}
	sets, err := r.c.GetSets(r.tbl)
	if err != nil {
		return r.libErr("list sets", err)
	}
	r.sets = map[string]*nftables.Set{}
	for _, s := range sets {
		if s.Anonymous {
			// nftlb's rules use no anonymous set.
			return r.bad("anonymous set %s: unexpected", s.Name)
		}
		r.sets[s.Name] = s
	}
	objs, err := r.c.GetNamedObjects(r.tbl)
	if err != nil {
		return r.libErr("list objects", err)
	}
	r.objs = map[string]*nftables.NamedObj{}
	for _, o := range objs {
		no, ok := o.(*nftables.NamedObj)
		if !ok {
			return r.bad("object of type %T: unexpected", o)
		}
		if no.Type != nftables.ObjTypeCounter {
			return r.bad("object %s: type %d, want counter", no.Name, no.Type)
		}
		r.objs[no.Name] = no
	}
	return nil
}

func (r *reader) chainRules(name string) ([]*nftables.Rule, error) {
	if rules, ok := r.rules[name]; ok {
		return rules, nil
	}
	ch := r.chains[name]
	if ch == nil {
		return nil, r.bad("chain %s: missing", name)
	}
	rules, err := r.c.GetRules(r.tbl, ch)
	if err != nil {
		return nil, r.libErr("chain "+name+": list rules", err)
	}
	r.rules[name] = rules
	return rules, nil
}

func (r *reader) elements(name string) ([]nftables.SetElement, error) {
	els, err := r.c.GetSetElements(r.sets[name])
	if err != nil {
		return nil, r.libErr("set "+name+": list elements", err)
	}
	return els, nil
}

// readPools reconstructs the pools from the services vmap, each pool's map
// and its chain's one rule.
func (r *reader) readPools() ([]Pool, error) {
	els, err := r.elements(servicesMap)
	if err != nil {
		return nil, err
	}
	var pools []Pool
	seen := map[string]string{}
	for _, el := range els {
		if len(el.Key) != 12 {
			return nil, r.bad("map %s: key of %d bytes, want 12", servicesMap, len(el.Key))
		}
		ep, err := decodeEndpointKey(el.Key)
		if err != nil {
			return nil, r.bad("map %s: element %x: %v", servicesMap, el.Key, err)
		}
		chain, err := gotoChain(el)
		if err != nil {
			return nil, r.bad("map %s: element %s: %v", servicesMap, ep, err)
		}
		// The element's counter is the pool's connection count. (v0.3.0
		// does not decode a set's counter flag; a table of an nftlb that
		// used named counters fails here, or on its counters, and is
		// replaced whole.)
		if el.Counter == nil {
			return nil, r.bad("map %s: element %s has no counter", servicesMap, ep)
		}
		pname, ok := strings.CutPrefix(chain, "pool-")
		if !ok || pname == "" {
			return nil, r.bad("map %s: element %s: goto %s, want a pool chain", servicesMap, ep, chain)
		}
		if prev, dup := seen[pname]; dup {
			return nil, r.bad("map %s: elements %s and %s both goto %s", servicesMap, prev, ep, chain)
		}
		seen[pname] = ep.String()
		pools = append(pools, Pool{Name: pname, VIP: ep.Addr.Addr(), Port: ep.Addr.Port(), Protocol: ep.Protocol})
	}
	slices.SortFunc(pools, func(a, b Pool) int { return strings.Compare(a.Name, b.Name) })
	for i := range pools {
		if err := r.readPool(&pools[i]); err != nil {
			return nil, err
		}
	}
	return pools, nil
}

func (r *reader) readPool(p *Pool) error {
	if r.chains[p.Chain()] == nil {
		return r.bad("chain %s: missing", p.Chain())
	}
	rules, err := r.chainRules(p.Chain())
	if err != nil {
		return err
	}
	if len(rules) != 1 {
		return r.bad("chain %s: rule count %d, want 1", p.Chain(), len(rules))
	}
	// The scheduler, modulus, offset and map come from the rule; the rest
	// of it is compared with poolRule's in verifyLayout.
	p.Scheduler = vip.RoundRobin
	p.Map = SlotMap(p.Name) // a rejecting rule names no map: the one Build picks
	p.Slots = []netip.AddrPort{}
	selector, modulus, offset := "", uint32(0), uint32(0)
	for _, e := range rules[0].Exprs {
		switch e := e.(type) {
		case *expr.Numgen:
			selector, modulus, offset = "numgen", e.Modulus, e.Offset
			if e.Type == unix.NFT_NG_RANDOM {
				p.Scheduler = vip.Random
			}
		case *expr.Hash:
			selector, modulus, offset = "jhash", e.Modulus, e.Offset
			p.Scheduler = vip.SourceHash
		case *expr.Lookup:
			if e.IsDestRegSet && e.DestRegister == 1 {
				p.Map = e.SetName
			}
		case *expr.Reject:
			selector = "reject"
		}
	}
	switch {
	case selector == "":
		return r.bad("chain %s: rule has no numgen, jhash or reject", p.Chain())
	case selector == "reject":
		return nil
	case modulus == 0 || modulus > maxSlots || uint64(offset)+uint64(modulus) > 1<<32:
		return r.bad("chain %s: %s mod %d offset %d", p.Chain(), selector, modulus, offset)
	}
	els, err := r.slotElements(p.Map)
	if err != nil {
		return err
	}
	// Slot i is key offset+i. A missing or malformed element reads as the
	// invalid netip.AddrPort{}, which Build never makes: Diff then adds
	// the element (after deleting the malformed one, listed in Stray).
	p.Size, p.Base = int(modulus), offset
	p.Slots = make([]netip.AddrPort, modulus)
	for i := range p.Slots {
		p.Slots[i] = els[offset+uint32(i)]
	}
	return nil
}

// slotElements reads slot map name once: key -> target, where a
// malformed element (nonzero padding) maps to the invalid AddrPort{}.
func (r *reader) slotElements(name string) (map[uint32]netip.AddrPort, error) {
	if m, ok := r.slots[name]; ok {
		return m, nil
	}
	if r.sets[name] == nil || !strings.HasPrefix(name, "slots-") {
		return nil, r.bad("map %s: missing", name)
	}
	els, err := r.elements(name)
	if err != nil {
		return nil, err
	}
	m := make(map[uint32]netip.AddrPort, len(els))
	for _, el := range els {
		if len(el.Key) != 4 || len(el.Val) != 8 {
			return nil, r.bad("map %s: element of %d+%d bytes, want 4+8", name, len(el.Key), len(el.Val))
		}
		var target netip.AddrPort
		if el.Val[6] == 0 && el.Val[7] == 0 {
			target = netip.AddrPortFrom(netip.AddrFrom4([4]byte(el.Val[0:4])), binary.BigEndian.Uint16(el.Val[4:6]))
		}
		m[binaryutil.NativeEndian.Uint32(el.Key)] = target
	}
	r.slots[name] = m
	return m, nil
}

// maxSlots bounds the modulus Read accepts (it allocates one slot each).
const maxSlots = 1 << 20

// stray lists the slot-map elements that no pool reaches, and the
// malformed ones: data damage that Diff repairs by deleting them.
func (r *reader) stray(pools []Pool) ([]SlotKey, error) {
	covered := map[SlotKey]bool{}
	for i := range pools {
		p := &pools[i]
		for k := range p.Slots {
			covered[SlotKey{p.Map, p.Base + uint32(k)}] = true
		}
	}
	var out []SlotKey
	for _, name := range keys(r.sets) {
		if !strings.HasPrefix(name, "slots-") {
			continue
		}
		els, err := r.slotElements(name)
		if err != nil {
			return nil, err
		}
		for k, v := range els {
			if key := (SlotKey{name, k}); !covered[key] || !v.IsValid() {
				out = append(out, key)
			}
		}
	}
	slices.SortFunc(out, func(a, b SlotKey) int {
		return cmp.Or(strings.Compare(a.Map, b.Map), cmp.Compare(a.Key, b.Key))
	})
	return out, nil
}

// readAccounting reads backends-conn and checks that -tx and -rx hold the
// same elements, each with a counter.
func (r *reader) readAccounting() ([]Endpoint, error) {
	var want []Endpoint
	for _, name := range []string{setConn, setTx, setRx} {
		els, err := r.elements(name)
		if err != nil {
			return nil, err
		}
		eps := make([]Endpoint, 0, len(els))
		for _, el := range els {
			if len(el.Key) != 12 || len(el.Val) != 0 {
				return nil, r.bad("set %s: element of %d+%d bytes, want 12+0", name, len(el.Key), len(el.Val))
			}
			ep, err := decodeEndpointKey(el.Key)
			if err != nil {
				return nil, r.bad("set %s: element %x: %v", name, el.Key, err)
			}
			if el.Counter == nil {
				return nil, r.bad("set %s: element %s has no counter", name, ep)
			}
			eps = append(eps, ep)
		}
		slices.SortFunc(eps, compareEndpoints)
		if name == setConn {
			want = eps
			continue
		}
		if !slices.Equal(eps, want) {
			return nil, r.bad("set %s: elements differ from %s (%d and %d elements)", name, setConn, len(eps), len(want))
		}
	}
	if len(want) == 0 {
		return nil, nil
	}
	return want, nil
}

// decodeEndpointKey strictly decodes endpointKey's layout: addr . l4proto
// . port, each padded to 4 bytes with zeros.
func decodeEndpointKey(k []byte) (Endpoint, error) {
	if len(k) != 12 {
		return Endpoint{}, fmt.Errorf("key of %d bytes, want 12", len(k))
	}
	if !bytes.Equal(k[5:8], []byte{0, 0, 0}) || k[10] != 0 || k[11] != 0 {
		return Endpoint{}, errors.New("nonzero padding")
	}
	var proto vip.Protocol
	switch k[4] {
	case unix.IPPROTO_TCP:
		proto = vip.TCP
	case unix.IPPROTO_UDP:
		proto = vip.UDP
	default:
		return Endpoint{}, fmt.Errorf("protocol %d, want tcp or udp", k[4])
	}
	addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte(k[0:4])), binary.BigEndian.Uint16(k[8:10]))
	return Endpoint{Addr: addr, Protocol: proto}, nil
}

// gotoChain decodes a vmap element's verdict. v0.3.0 does not fill
// SetElement.VerdictData when reading: Val holds the raw nested
// NFTA_DATA_VERDICT attributes (code, chain).
func gotoChain(el nftables.SetElement) (string, error) {
	if el.VerdictData != nil {
		if el.VerdictData.Kind != expr.VerdictGoto {
			return "", fmt.Errorf("verdict %d, want goto", el.VerdictData.Kind)
		}
		return el.VerdictData.Chain, nil
	}
	ad, err := netlink.NewAttributeDecoder(el.Val)
	if err != nil {
		return "", fmt.Errorf("verdict: %v", err)
	}
	ad.ByteOrder = binary.BigEndian
	code, chain, hasCode := int32(0), "", false
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_VERDICT_CODE:
			code, hasCode = int32(ad.Uint32()), true
		case unix.NFTA_VERDICT_CHAIN:
			chain = ad.String()
		}
	}
	if err := ad.Err(); err != nil {
		return "", fmt.Errorf("verdict: %v", err)
	}
	if !hasCode || code != unix.NFT_GOTO {
		return "", fmt.Errorf("verdict code %d, want goto", code)
	}
	return chain, nil
}

// layout records what queueFull sends, to compare the kernel with.
type layout struct {
	chains []*nftables.Chain
	rules  map[string][]*nftables.Rule
	sets   []*nftables.Set
	objs   []nftables.Obj
}

func (l *layout) AddTable(t *nftables.Table) *nftables.Table { return t }
func (l *layout) DelTable(*nftables.Table)                   {}
func (l *layout) AddChain(c *nftables.Chain) *nftables.Chain {
	l.chains = append(l.chains, c)
	return c
}
func (l *layout) DelChain(*nftables.Chain)   {}
func (l *layout) FlushChain(*nftables.Chain) {}
func (l *layout) AddRule(r *nftables.Rule) *nftables.Rule {
	l.rules[r.Chain.Name] = append(l.rules[r.Chain.Name], r)
	return r
}
func (l *layout) AddSet(s *nftables.Set, _ []nftables.SetElement) error {
	l.sets = append(l.sets, s)
	return nil
}
func (l *layout) DelSet(*nftables.Set)                                      {}
func (l *layout) FlushSet(*nftables.Set)                                    {}
func (l *layout) SetAddElements(*nftables.Set, []nftables.SetElement) error { return nil }
func (l *layout) SetDeleteElements(*nftables.Set, []nftables.SetElement) error {
	return nil
}
func (l *layout) AddObj(o nftables.Obj) nftables.Obj { l.objs = append(l.objs, o); return o }
func (l *layout) DeleteObject(nftables.Obj)          {}

// verifyLayout compares the kernel's chains, rules, sets and objects with
// what queueFull creates for t. The elements were checked while t was
// reconstructed from them.
func (r *reader) verifyLayout(t *Table) error {
	shape := *t
	want := &layout{rules: map[string][]*nftables.Rule{}}
	if err := queueFull(want, &shape); err != nil {
		return r.bad("cannot render: %v", err)
	}
	if err := verifyNames(r, "chain", keys(r.chains), want.chains, func(c *nftables.Chain) string { return c.Name }); err != nil {
		return err
	}
	if err := verifyNames(r, "set", keys(r.sets), want.sets, func(s *nftables.Set) string { return s.Name }); err != nil {
		return err
	}
	if err := verifyNames(r, "counter", keys(r.objs), want.objs, objName); err != nil {
		return err
	}
	for _, wc := range want.chains {
		if got, exp := chainShape(r.chains[wc.Name]), chainShape(wc); got != exp {
			return r.bad("chain %s: %s, want %s", wc.Name, got, exp)
		}
		got, err := r.chainRules(wc.Name)
		if err != nil {
			return err
		}
		exp := want.rules[wc.Name]
		if len(got) != len(exp) {
			return r.bad("chain %s: rule count %d, want %d", wc.Name, len(got), len(exp))
		}
		for i := range exp {
			if d := ruleDiff(got[i], exp[i]); d != "" {
				return r.bad("chain %s: rule %d: %s", wc.Name, i+1, d)
			}
		}
	}
	for _, ws := range want.sets {
		if d := setDiff(r.sets[ws.Name], ws); d != "" {
			return r.bad("set %s: %s", ws.Name, d)
		}
	}
	return nil
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func objName(o nftables.Obj) string {
	if no, ok := o.(*nftables.NamedObj); ok {
		return no.Name
	}
	return fmt.Sprintf("%T", o)
}

// verifyNames reports the first missing or unexpected name, in name order.
func verifyNames[T any](r *reader, kind string, got []string, want []T, name func(T) string) error {
	exp := make([]string, len(want))
	for i, w := range want {
		exp[i] = name(w)
	}
	slices.Sort(exp)
	i, j := 0, 0
	for i < len(got) || j < len(exp) {
		switch {
		case j == len(exp) || (i < len(got) && got[i] < exp[j]):
			if pool, ok := strings.CutPrefix(got[i], "pool-"); ok {
				return r.bad("%s %s: unexpected (no element of map %s goes to pool %s)", kind, got[i], servicesMap, pool)
			}
			return r.bad("%s %s: unexpected", kind, got[i])
		case i == len(got) || exp[j] < got[i]:
			return r.bad("%s %s: missing", kind, exp[j])
		}
		i++
		j++
	}
	return nil
}

func chainShape(c *nftables.Chain) string {
	if c.Hooknum == nil {
		if c.Type != "" || c.Priority != nil || c.Policy != nil {
			return fmt.Sprintf("type %q without hook", c.Type)
		}
		return "regular chain"
	}
	prio, policy := "?", "?"
	if c.Priority != nil {
		prio = fmt.Sprint(int32(*c.Priority))
	}
	if c.Policy != nil {
		policy = map[nftables.ChainPolicy]string{nftables.ChainPolicyAccept: "accept", nftables.ChainPolicyDrop: "drop"}[*c.Policy]
	}
	return fmt.Sprintf("type %s hook %d priority %s policy %s", c.Type, *c.Hooknum, prio, policy)
}

// ruleDiff describes how a kernel rule differs from the rule nftlb makes
// ("" if it does not), after normalising what the kernel fills in itself.
func ruleDiff(got, want *nftables.Rule) string {
	if !bytes.Equal(got.UserData, want.UserData) {
		return fmt.Sprintf("userdata (comment) %q, want %q", got.UserData, want.UserData)
	}
	g, w := normExprs(got.Exprs), normExprs(want.Exprs)
	if gt, wt := exprTypes(g), exprTypes(w); gt != wt {
		return fmt.Sprintf("expressions [%s], want [%s]", gt, wt)
	}
	for i := range w {
		if !reflect.DeepEqual(g[i], w[i]) {
			return fmt.Sprintf("expression %d (%s): %+v, want %+v", i+1, exprName(w[i]), g[i], w[i])
		}
	}
	return ""
}

// normExprs copies what differs between the expressions nftlb sends and
// what the kernel reports back: lookups lose the batch-local set ID, and
// the kernel reports NAT's max registers (equal to the min ones) and the
// proto-specified flag implied by a proto register. v0.3.0 decodes only a
// ct expression's destination register, so "ct mark set" comes back with
// no register at all (a ct load always has one): compare sets without it.
func normExprs(es []expr.Any) []expr.Any {
	out := make([]expr.Any, len(es))
	for i, e := range es {
		switch v := e.(type) {
		case *expr.Lookup:
			c := *v
			c.SetID = 0
			out[i] = &c
		case *expr.Ct:
			c := *v
			if c.SourceRegister || c.Register == 0 {
				c.SourceRegister, c.Register = true, 0
			}
			out[i] = &c
		case *expr.NAT:
			c := *v
			if c.RegAddrMax == 0 {
				c.RegAddrMax = c.RegAddrMin
			}
			if c.RegProtoMax == 0 {
				c.RegProtoMax = c.RegProtoMin
			}
			c.Specified = c.Specified || c.RegProtoMin != 0
			out[i] = &c
		default:
			out[i] = e
		}
	}
	return out
}

func exprName(e expr.Any) string {
	return strings.ToLower(strings.TrimPrefix(fmt.Sprintf("%T", e), "*expr."))
}

func exprTypes(es []expr.Any) string {
	names := make([]string, len(es))
	for i, e := range es {
		names[i] = exprName(e)
	}
	return strings.Join(names, " ")
}

// setDiff describes how a kernel set differs from the one nftlb makes.
// google/nftables v0.3.0 decodes a verdict map's data type into KeyType
// (and leaves DataType without a name), so a verdict map's key type is
// not known here; its elements' key length was checked instead.
func setDiff(got, want *nftables.Set) string {
	gotKey, gotData := got.KeyType, got.DataType
	if got.IsMap && gotKey == nftables.TypeVerdict && gotData.Name == "" {
		gotKey, gotData = want.KeyType, nftables.TypeVerdict
	}
	type shape struct {
		Map, Concat, Interval, Constant, Anonymous, Timeout, Dynamic bool
		Size                                                         uint32
		Key, Data                                                    string
	}
	dt := func(t nftables.SetDatatype) string {
		if t.Name == "" && t.Bytes == 0 {
			return "none"
		}
		return fmt.Sprintf("%s/%d", cmp.Or(t.Name, "?"), t.Bytes)
	}
	g := shape{got.IsMap, got.Concatenation, got.Interval, got.Constant, got.Anonymous, got.HasTimeout, got.Dynamic, got.Size, dt(gotKey), dt(gotData)}
	w := shape{want.IsMap, want.Concatenation, want.Interval, want.Constant, want.Anonymous, want.HasTimeout, want.Dynamic, want.Size, dt(want.KeyType), dt(want.DataType)}
	if g != w {
		return fmt.Sprintf("%+v, want %+v", g, w)
	}
	return ""
}
