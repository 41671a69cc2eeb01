// Package metrics exposes nftlb's Prometheus metrics. Connection and
// traffic counts come from the kernel's own counters at scrape time (named
// counter objects and per-element set counters that survive rule
// rewrites, reloads and restarts), active connections from conntrack,
// health from the probe manager; the control loop records the rest.
package metrics

import (
	"net/netip"
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/nftlb/nftlb/internal/health"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

// Sources are read at scrape time. Any of them may return errors; the
// scrape then reports what it could and counts the failure.
type Sources struct {
	Config   func() *vip.Config    // the running config; nil before the first apply
	Applied  func() *ruleset.Table // what the kernel was last programmed with
	Health   func() []health.Status
	Counters func(table string) (ruleset.Counters, error)
	Active   func() (map[netip.AddrPort]int, error) // nil: not available
}

// Metrics are the control loop's instruments plus the scrape-time collector.
type Metrics struct {
	Registry        *prometheus.Registry
	ApplyDuration   prometheus.Histogram
	ApplyErrors     prometheus.Counter
	ReloadOK        prometheus.Gauge
	ReloadTimestamp prometheus.Gauge
	Transitions     *prometheus.CounterVec // pool, backend, to
	ProbeDuration   *prometheus.HistogramVec
	ProbeToKernel   prometheus.Histogram
	DriftRepairs    prometheus.Counter
	ClientsReset    prometheus.Counter
}

// New registers every metric.
func New(src Sources, version string) *Metrics {
	r := prometheus.NewRegistry()
	m := &Metrics{
		Registry: r,
		ApplyDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "nftlb_ruleset_apply_duration_seconds", Help: "Time to program one ruleset change (one netlink transaction).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		ApplyErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nftlb_ruleset_apply_errors_total", Help: "Ruleset transactions the kernel refused (retried with a full replace)."}),
		ReloadOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nftlb_config_last_reload_successful", Help: "1 if the last config load (start or SIGHUP) was applied, 0 if it was rejected."}),
		ReloadTimestamp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nftlb_config_last_reload_success_timestamp_seconds", Help: "When a config was last applied successfully."}),
		Transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "nftlb_backend_transitions_total", Help: "Health state changes of a backend, by the state it went to."},
			[]string{"pool", "backend", "to"}),
		ProbeDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "nftlb_probe_duration_seconds", Help: "Health probe durations, by pool.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}, []string{"pool"}),
		ProbeToKernel: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "nftlb_probe_to_kernel_seconds", Help: "From the probe result that changed a backend's state to the kernel having the new rules.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		DriftRepairs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nftlb_drift_repairs_total", Help: "Times nftlb's table was found changed or deleted by someone else and restored."}),
		ClientsReset: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nftlb_clients_reset_total", Help: "TCP clients of unreachable backends nudged to reconnect."}),
	}
	build := prometheus.NewGauge(prometheus.GaugeOpts{Name: "nftlb_build_info", Help: "nftlb's version.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()}})
	build.Set(1)
	r.MustRegister(m.ApplyDuration, m.ApplyErrors, m.ReloadOK, m.ReloadTimestamp, m.Transitions,
		m.ProbeDuration, m.ProbeToKernel, m.DriftRepairs, m.ClientsReset, build,
		&collector{src: src}, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// ReloadResult records a config load's outcome.
func (m *Metrics) ReloadResult(ok bool, at time.Time) {
	if ok {
		m.ReloadOK.Set(1)
		m.ReloadTimestamp.Set(float64(at.Unix()))
		return
	}
	m.ReloadOK.Set(0)
}

var (
	descPoolConns = prometheus.NewDesc("nftlb_pool_connections_total",
		"New connections to a pool's VIP (its nftables named counter), refused ones included.", []string{"pool"}, nil)
	descBackendConns = prometheus.NewDesc("nftlb_backend_connections_total",
		"New connections DNATed to a backend and routed through the LB.", []string{"backend", "protocol"}, nil)
	descBackendPackets = prometheus.NewDesc("nftlb_backend_packets_total",
		"Packets of DNATed connections, to (tx) or from (rx) a backend.", []string{"backend", "protocol", "direction"}, nil)
	descBackendBytes = prometheus.NewDesc("nftlb_backend_bytes_total",
		"Bytes of DNATed connections, to (tx) or from (rx) a backend.", []string{"backend", "protocol", "direction"}, nil)
	descActive = prometheus.NewDesc("nftlb_backend_active_connections",
		"Connections to a backend open right now (conntrack, DNATed entries, TIME_WAIT excluded).", []string{"backend"}, nil)
	descUp = prometheus.NewDesc("nftlb_backend_up",
		"1 if the pool's rules send new connections to the backend, else 0.", []string{"pool", "backend"}, nil)
	descState = prometheus.NewDesc("nftlb_backend_state",
		"The backend's health state: 1 for the current one of unknown, up, unready, down.", []string{"pool", "backend", "state"}, nil)
	descPoolUp = prometheus.NewDesc("nftlb_pool_backends_up",
		"Backends the pool's rules send new connections to.", []string{"pool"}, nil)
	descPoolBackends = prometheus.NewDesc("nftlb_pool_backends",
		"Configured backends of a pool.", []string{"pool"}, nil)
	descLastProbe = prometheus.NewDesc("nftlb_backend_last_probe_info",
		"The last probe's outcome and a bounded reason (ok, refused, reset, timeout, unreachable, http_status, tls, other).",
		[]string{"pool", "backend", "outcome", "reason"}, nil)
	descScrapeErrors = prometheus.NewDesc("nftlb_scrape_errors",
		"Sources that could not be read in this scrape (kernel counters, conntrack).", []string{"source"}, nil)
)

type collector struct{ src Sources }

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPoolConns, descBackendConns, descBackendPackets, descBackendBytes,
		descActive, descUp, descState, descPoolUp, descPoolBackends, descLastProbe, descScrapeErrors} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	cfg := c.src.Config()
	if cfg == nil {
		return
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	kernelErr, activeErr := 0.0, 0.0
	if counts, err := c.src.Counters(cfg.Table); err != nil {
		kernelErr = 1
	} else {
		for pool, n := range counts.Pools {
			counter(descPoolConns, n, pool)
		}
		for e, b := range counts.Backends {
			be, proto := e.Addr.String(), string(e.Protocol)
			counter(descBackendConns, b.Connections, be, proto)
			counter(descBackendPackets, b.TxPackets, be, proto, "tx")
			counter(descBackendPackets, b.RxPackets, be, proto, "rx")
			counter(descBackendBytes, b.TxBytes, be, proto, "tx")
			counter(descBackendBytes, b.RxBytes, be, proto, "rx")
		}
	}
	if c.src.Active != nil {
		if active, err := c.src.Active(); err != nil {
			activeErr = 1
		} else {
			seen := map[netip.AddrPort]bool{}
			for i := range cfg.Pools {
				for _, b := range cfg.Pools[i].Backends {
					if !seen[b.Addr] {
						seen[b.Addr] = true
						gauge(descActive, float64(active[b.Addr]), b.Addr.String())
					}
				}
			}
		}
	}
	gauge(descScrapeErrors, kernelErr, "kernel_counters")
	gauge(descScrapeErrors, activeErr, "conntrack")

	states := map[string]health.Status{}
	for _, s := range c.src.Health() {
		states[s.ID] = s
	}
	applied := c.src.Applied()
	for i := range cfg.Pools {
		p := &cfg.Pools[i]
		var ap *ruleset.Pool
		if applied != nil {
			ap = applied.Pool(p.Name)
		}
		up := 0
		for _, b := range p.Backends {
			s := states[p.ID(b)]
			be := b.Addr.String()
			v := 0.0
			if ap != nil && ap.Uses(b.Addr) {
				v = 1
				up++
			}
			gauge(descUp, v, p.Name, be)
			for _, st := range []health.State{health.Unknown, health.Up, health.Unready, health.Down} {
				x := 0.0
				if s.State == st {
					x = 1
				}
				gauge(descState, x, p.Name, be, st.String())
			}
			if !s.Last.At.IsZero() {
				gauge(descLastProbe, 1, p.Name, be, s.Last.Outcome.String(), health.Reason(s.Last))
			}
		}
		gauge(descPoolUp, float64(up), p.Name)
		gauge(descPoolBackends, float64(len(p.Backends)), p.Name)
	}
}
