package vip

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode"
)

var (
	tableRe = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_-]*$`)
	nameRe  = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*$`)
)

const maxTableLen = 32

func tableError(s string) string {
	switch {
	case len(s) > maxTableLen:
		return fmt.Sprintf("must be at most %d characters, got %d", maxTableLen, len(s))
	case !tableRe.MatchString(s):
		return fmt.Sprintf("must start with a letter and contain only letters, digits, '_' and '-', got %q", s)
	}
	return ""
}

func nameError(s string) string {
	switch {
	case len(s) > MaxPoolNameLen:
		return fmt.Sprintf("must be at most %d characters, got %d", MaxPoolNameLen, len(s))
	case !nameRe.MatchString(s):
		return fmt.Sprintf("must contain only lowercase letters, digits and '-', starting with a letter or digit, got %q", s)
	}
	return ""
}

func listenError(s string) string {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Sprintf("must be host:port, e.g. %s, got %q", DefaultMetricsListen, s)
	}
	if host != "" && host != "localhost" {
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Sprintf("host must be an IP address, \"localhost\" or empty, got %q", host)
		}
	}
	return portError(port)
}

func portError(s string) string {
	n, err := strconv.ParseUint(s, 10, 32)
	switch {
	case err != nil:
		return fmt.Sprintf("port must be 1-65535, got %q", s)
	case n < 1 || n > 65535:
		return fmt.Sprintf("port must be 1-65535, got %d", n)
	}
	return ""
}

// ipv4Error explains why a is not usable as a VIP or a backend.
func ipv4Error(a netip.Addr, s string) string {
	switch {
	case !a.Is4():
		return fmt.Sprintf("IPv6 is not supported yet, got %q", s)
	case a.IsUnspecified():
		return "0.0.0.0 is the unspecified address, not one that packets can be sent to"
	case a.IsLoopback():
		return fmt.Sprintf("%s is a loopback address, which never leaves the host it is on", a)
	case a.IsMulticast():
		return fmt.Sprintf("%s is a multicast address; only unicast traffic can be balanced", a)
	case a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "255.255.255.255 is the broadcast address; only unicast traffic can be balanced"
	}
	return ""
}

func addrError(s string) string {
	msg := fmt.Sprintf("must be an IPv4 address, got %q", s)
	if strings.ContainsFunc(s, unicode.IsLetter) {
		msg += " (hostnames are not resolved)"
	}
	return msg
}

func parseVIP(s string) (netip.Addr, string) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return a, addrError(s)
	}
	return a, ipv4Error(a, s)
}

// parseBackend parses "ipv4:port" or "ipv4"; the port of the latter is 0
// until validate gives it the pool's port.
func parseBackend(s string) (netip.AddrPort, string) {
	host, port, err := net.SplitHostPort(s)
	if _, perr := netip.ParseAddr(s); perr == nil || err != nil {
		host, port = s, "" // a bare address, IPv6 included
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, addrError(host)
	}
	if msg := ipv4Error(a, host); msg != "" {
		return netip.AddrPort{}, msg
	}
	if host == s {
		return netip.AddrPortFrom(a, 0), ""
	}
	if msg := portError(port); msg != "" {
		return netip.AddrPort{}, msg
	}
	p, _ := strconv.ParseUint(port, 10, 16)
	return netip.AddrPortFrom(a, uint16(p)), ""
}

var defaultHealth = healthSpec{
	typ:          field[CheckType]{v: CheckTCP},
	interval:     field[time.Duration]{v: DefaultInterval},
	timeout:      field[time.Duration]{v: DefaultTimeout},
	rise:         field[int]{v: DefaultRise},
	fall:         field[int]{v: DefaultFall},
	expectStatus: field[int]{v: DefaultExpectStatus},
	resetClients: field[bool]{v: true},
	onAllDown:    field[AllDownPolicy]{v: AllDownReject},
}

// merge returns over with the fields it leaves unset taken from under.
func merge(over, under healthSpec) healthSpec {
	return healthSpec{
		typ:           pick(over.typ, under.typ),
		interval:      pick(over.interval, under.interval),
		timeout:       pick(over.timeout, under.timeout),
		rise:          pick(over.rise, under.rise),
		fall:          pick(over.fall, under.fall),
		path:          pick(over.path, under.path),
		host:          pick(over.host, under.host),
		expectStatus:  pick(over.expectStatus, under.expectStatus),
		tlsSkipVerify: pick(over.tlsSkipVerify, under.tlsSkipVerify),
		caFile:        pick(over.caFile, under.caFile),
		serverName:    pick(over.serverName, under.serverName),
		certFile:      pick(over.certFile, under.certFile),
		keyFile:       pick(over.keyFile, under.keyFile),
		resetClients:  pick(over.resetClients, under.resetClients),
		onAllDown:     pick(over.onAllDown, under.onAllDown),
		port:          pick(over.port, under.port),
	}
}

func pick[T any](over, under field[T]) field[T] {
	if over.set() {
		return over
	}
	return under
}

func (f field[T]) or(def T) T {
	if f.set() {
		return f.v
	}
	return def
}

// validate runs the checks that involve more than one field. It skips
// fields already found bad, so that one mistake gives one error.
func (w *walker) validate(c *configSpec) {
	global := merge(c.health, defaultHealth)
	w.checkTypeKeys(c.health, global.typ)
	names := map[string]*poolSpec{}
	keys := map[string]*poolSpec{}
	for i := range c.pools {
		p := &c.pools[i]
		h := merge(p.health, global)
		w.checkTypeKeys(p.health, h.typ)
		w.checkHealth(p.health, h)
		if p.name.ok() {
			if first := names[p.name.v]; first != nil {
				w.errorf(p.name.node, p.name.path, "name %q already used by %s (line %d)", p.name.v, first.path, first.node.Line)
			} else {
				names[p.name.v] = p
			}
		}
		if p.vip.ok() && p.port.ok() && p.protocol.ok() {
			key := fmt.Sprintf("%s:%d/%s", p.vip.v, p.port.v, p.protocol.or(TCP))
			if first := keys[key]; first != nil {
				w.errorf(p.node, p.path, "same vip, port and protocol as %s (line %d)", first.path, first.node.Line)
			} else {
				keys[key] = p
			}
		}
		w.checkBackends(p)
	}
}

// checkTypeKeys reports keys of a health block (global or a pool's) that
// its effective type ignores. Keys a pool inherits from the global block
// are not checked against the pool's type: a pool may well override type.
func (w *walker) checkTypeKeys(b healthSpec, typ field[CheckType]) {
	if !typ.ok() {
		return
	}
	if typ.v != CheckHTTP && typ.v != CheckHTTPS {
		for _, p := range []pos{b.path.pos, b.host.pos, b.expectStatus.pos} {
			if p.node != nil {
				w.errorf(p.node, p.path, "only applies to type http or https (type is %s)", typ.v)
			}
		}
	}
	if typ.v != CheckHTTPS {
		for _, p := range []pos{b.tlsSkipVerify.pos, b.caFile.pos, b.serverName.pos, b.certFile.pos, b.keyFile.pos} {
			if p.node != nil {
				w.errorf(p.node, p.path, "only applies to type https (type is %s)", typ.v)
			}
		}
	}
}

// checkHealth checks a pool's effective health settings h. The error goes
// where the pool set a value, else to the global value it inherited.
func (w *walker) checkHealth(pool, h healthSpec) {
	if h.timeout.ok() && h.interval.ok() && h.timeout.v >= h.interval.v {
		at := cmp.Or(pool.timeout.pos, pool.interval.pos, h.timeout.pos, h.interval.pos)
		w.errorf(at.node, at.path, "timeout (%s) must be less than interval (%s)", h.timeout.v, h.interval.v)
	}
	if h.typ.ok() && h.typ.v == CheckHTTPS && h.certFile.ok() && h.keyFile.ok() {
		switch cert, key := h.certFile, h.keyFile; {
		case cert.v != "" && key.v == "":
			w.errorf(cert.node, cert.path, "cert_file is set but key_file is not; set both or neither")
		case key.v != "" && cert.v == "":
			w.errorf(key.node, key.path, "key_file is set but cert_file is not; set both or neither")
		}
	}
}

// checkBackends gives port-less backends the pool's port and reports
// duplicates and backends that would loop back to the VIP.
func (w *walker) checkBackends(p *poolSpec) {
	first := map[netip.AddrPort]*backendSpec{}
	for i := range p.backends {
		b := &p.backends[i]
		if !b.addr.ok() {
			continue
		}
		if b.addr.v.Port() == 0 {
			if !p.port.ok() {
				continue
			}
			b.addr.v = netip.AddrPortFrom(b.addr.v.Addr(), uint16(p.port.v))
		}
		if p.vip.ok() && p.port.ok() && b.addr.v == netip.AddrPortFrom(p.vip.v, uint16(p.port.v)) {
			w.errorf(b.node, b.path, "%s is the pool's own vip and port", b.addr.v)
		}
		if f := first[b.addr.v]; f != nil {
			w.errorf(b.node, b.path, "duplicate backend %s, same as %s (line %d)", b.addr.v, f.path, f.node.Line)
		} else {
			first[b.addr.v] = b
		}
	}
}

// build makes the Config of a spec that passed validation.
func (c *configSpec) build(file string) *Config {
	global := merge(c.health, defaultHealth)
	cfg := &Config{
		File:       file,
		Table:      c.table.or(DefaultTable),
		Masquerade: c.masquerade.or(true),
		Metrics:    Metrics{Listen: c.listen.or(DefaultMetricsListen)},
		Health:     global.health(),
	}
	for _, p := range c.pools {
		pool := Pool{
			Name:      p.name.v,
			VIP:       p.vip.v,
			Port:      uint16(p.port.v),
			Protocol:  p.protocol.or(TCP),
			Scheduler: p.scheduler.or(RoundRobin),
			Health:    merge(p.health, global).health(),
			Line:      p.node.Line,
		}
		// There is no generic UDP probe: a UDP pool is not checked unless
		// its config (the pool's or the global block) names a check type,
		// e.g. tcp or http on health.port.
		if pool.Protocol == UDP && !p.health.typ.set() && !c.health.typ.set() {
			pool.Health.Type = CheckNone
		}
		for _, b := range p.backends {
			pool.Backends = append(pool.Backends, Backend{Addr: b.addr.v, Weight: b.weight.v})
		}
		cfg.Pools = append(cfg.Pools, pool)
	}
	return cfg
}

// health returns the effective Health, leaving out what its type ignores.
func (h healthSpec) health() Health {
	out := Health{
		Type:         h.typ.v,
		Interval:     h.interval.v,
		Timeout:      h.timeout.v,
		Rise:         h.rise.v,
		Fall:         h.fall.v,
		ResetClients: h.resetClients.v,
		Port:         uint16(h.port.v),
		OnAllDown:    h.onAllDown.v,
	}
	switch out.Type {
	case CheckHTTPS:
		out.TLSSkipVerify = h.tlsSkipVerify.v
		out.CAFile, out.ServerName = h.caFile.v, h.serverName.v
		out.CertFile, out.KeyFile = h.certFile.v, h.keyFile.v
		out.Path = h.path.or(DefaultHTTPSPath)
	case CheckHTTP:
		out.Path = h.path.or(DefaultHTTPPath)
	}
	if out.Type == CheckHTTP || out.Type == CheckHTTPS {
		out.Host, out.ExpectStatus = h.host.v, h.expectStatus.v
	}
	return out
}
