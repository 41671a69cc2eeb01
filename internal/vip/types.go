// Package vip is nftlb's configuration model: it decodes the YAML file,
// fills in defaults and validates it. It is pure: no I/O beyond reading the
// file, no kernel, no network. Every error carries file:line:col and the
// field path, and all errors of a file are reported at once.
package vip

import (
	"net/netip"
	"time"
)

// Protocol is a pool's transport protocol.
type Protocol string

const (
	TCP Protocol = "tcp"
	UDP Protocol = "udp"
)

// Scheduler picks a backend for a new connection.
type Scheduler string

const (
	RoundRobin Scheduler = "round-robin" // numgen inc
	Random     Scheduler = "random"      // numgen random
	SourceHash Scheduler = "source-hash" // jhash ip saddr
)

// CheckType is the kind of health probe.
type CheckType string

const (
	CheckTCP   CheckType = "tcp"
	CheckHTTP  CheckType = "http"
	CheckHTTPS CheckType = "https"
	CheckNone  CheckType = "none"
)

// Defaults, in one place so docs, parser and tests agree.
const (
	DefaultTable         = "nftlb"
	DefaultMetricsListen = "127.0.0.1:9742"
	DefaultInterval      = 2 * time.Second
	DefaultTimeout       = 1 * time.Second
	DefaultRise          = 2
	DefaultFall          = 3
	DefaultHTTPPath      = "/"
	DefaultHTTPSPath     = "/readyz"
	DefaultExpectStatus  = 200
	MaxPoolNameLen       = 32
	MaxWeight            = 100
)

// Config is a fully validated configuration with all defaults applied.
type Config struct {
	File       string // path it was read from, for messages
	Table      string // the one nftables table (family ip) nftlb owns
	Masquerade bool
	Metrics    Metrics
	Health     Health // defaults; every Pool.Health is already merged with these
	Pools      []Pool
}

// Metrics configures the Prometheus/status listener.
type Metrics struct {
	Listen string // host:port
}

// Health is a pool's effective health-check configuration.
type Health struct {
	Type          CheckType
	Port          uint16 // where probes go; 0 = the backend's own port
	Interval      time.Duration
	Timeout       time.Duration
	Rise          int
	Fall          int
	Path          string // http(s)
	Host          string // http(s) Host header; empty = backend address
	ExpectStatus  int    // http(s)
	TLSSkipVerify bool
	CAFile        string
	ServerName    string
	CertFile      string
	KeyFile       string
	// ResetClients: when a backend becomes unreachable, delete its conntrack
	// entries and nudge its TCP clients so they reconnect elsewhere at once.
	ResetClients bool
	// OnAllDown: what a pool does when no backend is healthy.
	OnAllDown AllDownPolicy
}

// AllDownPolicy is what a pool does when every backend fails its checks.
type AllDownPolicy string

const (
	AllDownReject   AllDownPolicy = "reject"    // refuse new connections (TCP reset / ICMP unreachable)
	AllDownServeAll AllDownPolicy = "serve-all" // fail open: balance over all backends
)

// Pool is one virtual service: VIP:port/protocol balanced over backends.
type Pool struct {
	Name      string
	VIP       netip.Addr
	Port      uint16
	Protocol  Protocol
	Scheduler Scheduler
	Health    Health
	Backends  []Backend
	Line      int // line of the pool in the file, for messages
}

// Backend is one real server of a pool.
type Backend struct {
	Addr   netip.AddrPort
	Weight int // 1..MaxWeight
}

// BackendID is the stable identity of a backend across reloads: pool/addr:port.
func BackendID(pool string, addr netip.AddrPort) string {
	return pool + "/" + addr.String()
}

// ID returns the backend's stable identity within pool p.
func (p *Pool) ID(b Backend) string { return BackendID(p.Name, b.Addr) }
