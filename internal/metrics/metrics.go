// Package metrics exposes nftlb's Prometheus metrics. Connection and
// traffic counts come from the kernel's own counters at scrape time
// (per-element counters of the services map and the accounting sets, which
// survive rule rewrites, reloads and restarts), active connections from
// conntrack, health from the probe manager; the control loop records the
// rest. Handler streams the per-pool and per-backend families.
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
	src             Sources
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
		src:      src,
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
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
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
