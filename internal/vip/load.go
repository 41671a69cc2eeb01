package vip

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// maxNodes bounds the nodes the walker visits, counting every expansion of
// an alias: a few lines of nested aliases (or an alias inside its own
// anchor, which yaml.v3 accepts) would otherwise expand to billions of nodes.
// The budget grows with the file (a real config has about one node per 8
// bytes, the budget allows one per 4), so 10,000 pools (about 1 MB, 130,000
// nodes) parse while a small bomb keeps the base budget.
const maxNodes = 100_000

// maxText bounds the bytes of keys and values the walker visits, again
// counting every use of an alias. Checking a value, and quoting it in an
// error, takes time in proportion to its length, so a long string used
// through many aliases would otherwise cost maxNodes times its length:
// minutes and gigabytes for a 100 KB file. It grows with the file too.
const maxText = 4 << 20

// Load reads the configuration file at path and parses it with Parse. A
// file it cannot read gives a wrapped *fs.PathError, not Errors.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	return Parse(path, data)
}

// Parse decodes, defaults and validates a configuration; file is only used
// in messages and Config.File. On any problem it returns a nil Config and
// an Errors holding every problem found in the file.
func Parse(file string, data []byte) (*Config, error) {
	w := &walker{file: file, seen: map[FieldError]bool{},
		// In whole steps, so that small files (and every bomb) keep the
		// base budgets: +100,000 nodes per 400 KB, +4 MiB text per MiB.
		maxNodes: maxNodes * (1 + len(data)/400_000), maxText: maxText * (1 + len(data)>>20)}
	var spec configSpec
	if root := w.document(data); root != nil {
		spec = w.config(root)
		w.validate(&spec)
	}
	if w.tooBig != nil {
		// What was walked before the budget ran out is incomplete, so
		// other errors (missing fields, say) could be wrong.
		return nil, Errors{w.tooBig}
	}
	if len(w.errs) > 0 {
		return nil, w.errs.sorted()
	}
	return spec.build(file), nil
}

// walker turns a yaml.Node tree into specs by hand rather than with struct
// decoding, so that every value keeps its position for error messages.
type walker struct {
	file   string
	errs   Errors
	seen   map[FieldError]bool // the same global value can fail for every pool
	nodes  int
	text   int // bytes of scalars visited, charged against maxText
	tooBig *FieldError
	// the budgets for this file
	maxNodes, maxText int
}

// pos is where a value was written; a zero pos means the key was absent.
type pos struct {
	node *yaml.Node
	path string
}

// field is a value from the file, or a default when pos is zero. bad marks
// a value that was written but invalid (already reported), so checks
// across fields can skip it instead of piling up follow-on errors.
type field[T any] struct {
	v T
	pos
	bad bool
}

func (f field[T]) set() bool { return f.node != nil }

// ok reports whether f holds a usable value, written or defaulted (pool
// marks its absent required fields bad).
func (f field[T]) ok() bool { return !f.bad }

func (w *walker) errorf(n *yaml.Node, path, format string, args ...any) {
	e := FieldError{File: w.file, Path: path, Msg: fmt.Sprintf(format, args...)}
	if n != nil {
		e.Line, e.Col = n.Line, n.Column
	}
	if !w.seen[e] {
		w.seen[e] = true
		w.errs = append(w.errs, &e)
	}
}

var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// document decodes data and returns its single top-level node, or nil.
func (w *walker) document(data []byte) *yaml.Node {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			w.errorf(nil, "", "empty file, want a mapping with at least \"pools\"")
		} else {
			w.syntaxError(err)
		}
		return nil
	}
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case err == nil:
		w.errorf(&next, "", "more than one YAML document; put everything in one")
	case !errors.Is(err, io.EOF):
		w.syntaxError(err)
	}
	if len(doc.Content) == 0 {
		return nil
	}
	return doc.Content[0]
}

func (w *walker) syntaxError(err error) {
	msg := err.Error()
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		w.errorf(&yaml.Node{Line: line}, "", "invalid YAML: %s", m[2])
		return
	}
	w.errorf(nil, "", "invalid YAML: %s", strings.TrimPrefix(msg, "yaml: "))
}

// visit resolves aliases and charges n to the node budget, and a scalar's
// length to the text budget. It returns nil once a budget is spent; the
// walk then unwinds without reporting more.
func (w *walker) visit(n *yaml.Node) *yaml.Node {
	for ; n != nil && w.tooBig == nil; n = n.Alias {
		if w.nodes++; w.nodes > w.maxNodes {
			w.tooBig = &FieldError{File: w.file, Line: n.Line, Col: n.Column,
				Msg: fmt.Sprintf("too many nodes (more than %d, counting each use of an alias)", w.maxNodes)}
			return nil
		}
		if n.Kind == yaml.ScalarNode {
			if w.text += len(n.Value); w.text > w.maxText {
				w.tooBig = &FieldError{File: w.file, Line: n.Line, Col: n.Column,
					Msg: fmt.Sprintf("too much text (more than %d MiB of keys and values, counting each use of an alias)", w.maxText>>20)}
				return nil
			}
		}
		if n.Kind != yaml.AliasNode {
			return n
		}
	}
	return nil
}

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	}
	if n.Tag == "!!null" {
		return "null"
	}
	return strconv.Quote(n.Value)
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// mapping checks that n is a mapping with no duplicate or unknown keys and
// calls f for each known key, in file order; keys pulled in with a merge
// key ("<<: *anchor") come last and lose to keys written in the mapping.
// It returns the key nodes by name, for required-field checks, or nil if n
// is not a mapping.
func (w *walker) mapping(n *yaml.Node, path string, known []string, f func(key string, v *yaml.Node)) map[string]*yaml.Node {
	m := w.visit(n)
	if m == nil {
		return nil
	}
	if m.Kind != yaml.MappingNode {
		w.nonNull(n, m, path, "must be a mapping, got %s", describe(m))
		return nil
	}
	first := map[string]*yaml.Node{}
	var merges []*yaml.Node // a stack: sources merged depth-first, in order
	// Nested merges can bring the same node here thousands of times, each
	// time with the same error; format it only once.
	reported := map[*yaml.Node]bool{}
	each := func(m *yaml.Node, merging bool) {
		from := len(merges)
		for i := 0; i+1 < len(m.Content) && w.tooBig == nil; i += 2 {
			k, v := w.visit(m.Content[i]), m.Content[i+1]
			switch {
			case k == nil:
				return
			case k.Kind != yaml.ScalarNode:
				if !reported[k] {
					reported[k] = true
					w.errorf(k, path, "keys must be strings, got %s", describe(k))
				}
			case k.Tag == "!!merge":
				merges = append(merges, v)
			case first[k.Value] != nil:
				if !merging {
					w.errorf(k, path, "duplicate key %q (first at line %d)", k.Value, first[k.Value].Line)
				}
			case !slices.Contains(known, k.Value):
				first[k.Value] = k
				msg := fmt.Sprintf("unknown field %q", k.Value)
				if s := suggest(k.Value, known); s != "" {
					msg += fmt.Sprintf(" (did you mean %q?)", s)
				}
				w.errorf(k, path, "%s", msg)
			default:
				first[k.Value] = k
				f(k.Value, v)
			}
		}
		slices.Reverse(merges[from:])
	}
	each(m, false)
	// A merged mapping may merge others in turn; the budget ends cycles.
	for len(merges) > 0 && w.tooBig == nil {
		v := merges[len(merges)-1]
		merges = merges[:len(merges)-1]
		switch src := w.visit(v); {
		case src == nil:
		case src.Kind == yaml.MappingNode:
			each(src, true)
		case src.Kind == yaml.SequenceNode:
			// Charged now, or repeated aliases to a long list could
			// grow the stack far beyond the budget.
			w.nodes += len(src.Content)
			merges = append(merges, src.Content...)
			slices.Reverse(merges[len(merges)-len(src.Content):])
		case !reported[v]:
			reported[v] = true
			w.errorf(v, path, "<< must merge a mapping or a list of mappings, got %s", describe(src))
		}
	}
	return first
}

// require reports the keys missing from the mapping at n.
func (w *walker) require(n *yaml.Node, path string, seen map[string]*yaml.Node, keys ...string) {
	if seen == nil {
		return // not a mapping, already reported
	}
	for _, k := range keys {
		if seen[k] == nil {
			w.errorf(n, path, "missing required field %q", k)
		}
	}
}

// list checks that n is a list and calls f for each item. It returns the
// number of items, or -1 if n is not a list.
func (w *walker) list(n *yaml.Node, path string, f func(i int, item *yaml.Node)) int {
	s := w.visit(n)
	if s == nil {
		return -1
	}
	if s.Kind != yaml.SequenceNode {
		w.nonNull(n, s, path, "must be a list, got %s", describe(s))
		return -1
	}
	for i, item := range s.Content {
		if w.tooBig != nil {
			break
		}
		f(i, item)
	}
	return len(s.Content)
}

// nonNull reports a value of the wrong kind, or a missing one: "port:"
// with nothing after it is a null, which deserves its own message.
func (w *walker) nonNull(n, resolved *yaml.Node, path, format string, args ...any) {
	if resolved.Kind == yaml.ScalarNode && resolved.Tag == "!!null" {
		w.errorf(n, path, "must be set")
		return
	}
	w.errorf(n, path, format, args...)
}

// scalar resolves n, which should hold want, and reports a list, a mapping
// or a null in its place. Errors point at n, where the value is used, even
// when it comes from an alias.
func (w *walker) scalar(n *yaml.Node, path, want string) (*yaml.Node, bool) {
	s := w.visit(n)
	if s == nil {
		return nil, false
	}
	if s.Kind != yaml.ScalarNode || s.Tag == "!!null" {
		w.nonNull(n, s, path, "must be %s, got %s", want, describe(s))
		return nil, false
	}
	return s, true
}

// str accepts any scalar: "name: 8080" is as good a string as any.
func (w *walker) str(n *yaml.Node, path string) field[string] {
	f := field[string]{pos: pos{n, path}, bad: true}
	if s, ok := w.scalar(n, path, "a string"); ok {
		f.v, f.bad = s.Value, false
	}
	return f
}

// integer accepts only YAML integers: a quoted "6443" is a string.
func (w *walker) integer(n *yaml.Node, path string, lo, hi int) field[int] {
	f := field[int]{pos: pos{n, path}, bad: true}
	s, ok := w.scalar(n, path, "an integer")
	if !ok {
		return f
	}
	var i int64
	if s.Tag != "!!int" || s.Decode(&i) != nil {
		w.errorf(n, path, "must be an integer, got %q", s.Value)
	} else if i < int64(lo) || i > int64(hi) {
		w.errorf(n, path, "must be %d-%d, got %d", lo, hi, i)
	} else {
		f.v, f.bad = int(i), false
	}
	return f
}

func (w *walker) boolean(n *yaml.Node, path string) field[bool] {
	f := field[bool]{pos: pos{n, path}, bad: true}
	s, ok := w.scalar(n, path, "true or false")
	if !ok {
		return f
	}
	if s.Tag != "!!bool" || s.Decode(&f.v) != nil {
		w.errorf(n, path, "must be true or false, got %q", s.Value)
		return f
	}
	f.bad = false
	return f
}

func (w *walker) duration(n *yaml.Node, path string) field[time.Duration] {
	f := field[time.Duration]{pos: pos{n, path}, bad: true}
	s, ok := w.scalar(n, path, "a duration")
	if !ok {
		return f
	}
	d, err := time.ParseDuration(s.Value)
	switch {
	case err != nil:
		w.errorf(n, path, "%s", durationError(s.Value, err))
	case d <= 0:
		w.errorf(n, path, "must be greater than 0, got %s", d)
	default:
		f.v, f.bad = d, false
	}
	return f
}

// durationError trims time.ParseDuration's message, which repeats the input.
func durationError(s string, err error) string {
	msg := strings.TrimPrefix(err.Error(), "time: ")
	msg = strings.TrimSuffix(msg, " in duration "+strconv.Quote(s))
	if strings.HasPrefix(msg, "invalid duration") || msg == err.Error() {
		msg = "want a number and a unit, e.g. 2s or 500ms"
	}
	return fmt.Sprintf("invalid duration %q: %s", s, msg)
}

func enum[T ~string](w *walker, n *yaml.Node, path string, opts ...T) field[T] {
	f := field[T]{pos: pos{n, path}, bad: true}
	s, ok := w.scalar(n, path, "a string")
	if !ok {
		return f
	}
	names := make([]string, len(opts))
	for i, o := range opts {
		names[i] = string(o)
	}
	if !slices.Contains(names, s.Value) {
		msg := fmt.Sprintf("must be %s, got %q", orList(names), s.Value)
		if sug := suggest(s.Value, names); sug != "" {
			msg += fmt.Sprintf(" (did you mean %q?)", sug)
		}
		w.errorf(n, path, "%s", msg)
		return f
	}
	f.v, f.bad = T(s.Value), false
	return f
}

// orList formats ["a", "b", "c"] as "a, b or c".
func orList(s []string) string {
	if len(s) < 2 {
		return strings.Join(s, "")
	}
	return strings.Join(s[:len(s)-1], ", ") + " or " + s[len(s)-1]
}

// suggest returns the known name closest to s within edit distance 2, if any.
func suggest(s string, known []string) string {
	best, bestDist := "", 3
	for _, k := range known {
		if d := editDistance(s, k, bestDist); d < bestDist {
			best, bestDist = k, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, or limit if it
// is at least limit (which bounds the work for long keys).
func editDistance(a, b string, limit int) int {
	if d := len(a) - len(b); d >= limit || -d >= limit {
		return limit
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return min(prev[len(b)], limit)
}

// Specs: the file as written, before defaults and checks across fields.

type configSpec struct {
	table      field[string]
	masquerade field[bool]
	listen     field[string]
	health     healthSpec
	pools      []poolSpec
}

type healthSpec struct {
	typ                            field[CheckType]
	interval, timeout              field[time.Duration]
	rise, fall, expectStatus, port field[int]
	path, host, caFile, serverName field[string]
	certFile, keyFile              field[string]
	tlsSkipVerify, resetClients    field[bool]
	onAllDown                      field[AllDownPolicy]
}

type poolSpec struct {
	pos
	name      field[string]
	vip       field[netip.Addr]
	port      field[int]
	protocol  field[Protocol]
	scheduler field[Scheduler]
	health    healthSpec
	backends  []backendSpec
}

type backendSpec struct {
	pos
	addr   field[netip.AddrPort] // port 0 until validate applies the pool's port
	weight field[int]
}

var (
	topFields     = []string{"table", "masquerade", "metrics", "health", "pools"}
	metricsFields = []string{"listen"}
	healthFields  = []string{"type", "interval", "timeout", "rise", "fall", "path", "host", "expect_status",
		"tls_skip_verify", "ca_file", "server_name", "cert_file", "key_file", "reset_clients", "on_all_down", "port"}
	poolFields    = []string{"name", "vip", "port", "protocol", "scheduler", "health", "backends"}
	backendFields = []string{"address", "weight"}
)

func (w *walker) config(n *yaml.Node) configSpec {
	var c configSpec
	if r := w.visit(n); r != nil && r.Kind != yaml.MappingNode {
		w.errorf(n, "", "the top level must be a mapping, got %s", describe(r))
		return c
	}
	seen := w.mapping(n, "", topFields, func(key string, v *yaml.Node) {
		switch key {
		case "table":
			c.table = w.str(v, key)
			w.check(&c.table, tableError)
		case "masquerade":
			c.masquerade = w.boolean(v, key)
		case "metrics":
			w.mapping(v, key, metricsFields, func(_ string, v *yaml.Node) {
				c.listen = w.str(v, "metrics.listen")
				w.check(&c.listen, listenError)
			})
		case "health":
			c.health = w.health(v, key)
		case "pools":
			if w.list(v, key, func(i int, item *yaml.Node) {
				c.pools = append(c.pools, w.pool(item, fmt.Sprintf("pools[%d]", i)))
			}) == 0 {
				w.errorf(v, key, "must contain at least one pool")
			}
		}
	})
	w.require(n, "", seen, "pools")
	return c
}

func (w *walker) health(n *yaml.Node, path string) healthSpec {
	var h healthSpec
	w.mapping(n, path, healthFields, func(key string, v *yaml.Node) {
		p := join(path, key)
		switch key {
		case "type":
			h.typ = enum(w, v, p, CheckTCP, CheckHTTP, CheckHTTPS, CheckNone)
		case "interval":
			h.interval = w.duration(v, p)
		case "timeout":
			h.timeout = w.duration(v, p)
		case "rise":
			h.rise = w.integer(v, p, 1, 100)
		case "fall":
			h.fall = w.integer(v, p, 1, 100)
		case "path":
			h.path = w.str(v, p)
			w.check(&h.path, func(s string) string {
				if !strings.HasPrefix(s, "/") {
					return fmt.Sprintf("must start with '/', got %q", s)
				}
				return ""
			})
		case "host":
			h.host = w.str(v, p)
		case "expect_status":
			h.expectStatus = w.integer(v, p, 100, 599)
		case "tls_skip_verify":
			h.tlsSkipVerify = w.boolean(v, p)
		case "ca_file":
			h.caFile = w.str(v, p)
		case "server_name":
			h.serverName = w.str(v, p)
		case "cert_file":
			h.certFile = w.str(v, p)
		case "key_file":
			h.keyFile = w.str(v, p)
		case "reset_clients":
			h.resetClients = w.boolean(v, p)
		case "port":
			h.port = w.integer(v, p, 1, 65535)
		case "on_all_down":
			h.onAllDown = enum(w, v, p, AllDownReject, AllDownServeAll)
		}
	})
	return h
}

func (w *walker) pool(n *yaml.Node, path string) poolSpec {
	p := poolSpec{pos: pos{n, path}}
	seen := w.mapping(n, path, poolFields, func(key string, v *yaml.Node) {
		fp := join(path, key)
		switch key {
		case "name":
			p.name = w.str(v, fp)
			w.check(&p.name, nameError)
		case "vip":
			p.vip = parseField(w, w.str(v, fp), parseVIP)
		case "port":
			p.port = w.integer(v, fp, 1, 65535)
		case "protocol":
			p.protocol = enum(w, v, fp, TCP, UDP)
		case "scheduler":
			p.scheduler = enum(w, v, fp, RoundRobin, Random, SourceHash)
		case "health":
			p.health = w.health(v, fp)
		case "backends":
			if w.list(v, fp, func(i int, item *yaml.Node) {
				p.backends = append(p.backends, w.backend(item, fmt.Sprintf("%s[%d]", fp, i)))
			}) == 0 {
				w.errorf(v, fp, "must contain at least one backend")
			}
		}
	})
	w.require(n, path, seen, "name", "vip", "port", "backends")
	// Absent required fields must not pass for valid zero values.
	p.name.bad = p.name.bad || !p.name.set()
	p.vip.bad = p.vip.bad || !p.vip.set()
	p.port.bad = p.port.bad || !p.port.set()
	return p
}

func (w *walker) backend(n *yaml.Node, path string) backendSpec {
	b := backendSpec{pos: pos{n, path}, weight: field[int]{v: 1}}
	s := w.visit(n)
	switch {
	case s == nil:
	case s.Kind == yaml.ScalarNode && s.Tag != "!!null":
		b.addr = parseField(w, w.str(n, path), parseBackend)
	case s.Kind == yaml.MappingNode:
		seen := w.mapping(n, path, backendFields, func(key string, v *yaml.Node) {
			if key == "address" {
				b.addr = parseField(w, w.str(v, path+".address"), parseBackend)
			} else {
				b.weight = w.integer(v, path+".weight", 1, MaxWeight)
			}
		})
		w.require(n, path, seen, "address")
		b.addr.bad = b.addr.bad || !b.addr.set()
	default:
		w.nonNull(n, s, path, "must be an address or a mapping with address and weight, got %s", describe(s))
		b.addr.bad = true
	}
	return b
}

// check reports f, and marks it bad, if msg finds fault with its value.
func (w *walker) check(f *field[string], msg func(string) string) {
	if f.set() && f.ok() {
		if m := msg(f.v); m != "" {
			w.errorf(f.node, f.path, "%s", m)
			f.bad = true
		}
	}
}

// parseField converts a string field with parse, which returns a message on
// failure.
func parseField[T any](w *walker, f field[string], parse func(string) (T, string)) field[T] {
	out := field[T]{pos: f.pos, bad: f.bad}
	if f.ok() {
		var msg string
		if out.v, msg = parse(f.v); msg != "" {
			w.errorf(f.node, f.path, "%s", msg)
			out.bad = true
		}
	}
	return out
}
