package metrics

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"net/http/httptest"
	"net/netip"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/nftlb/nftlb/internal/health"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

func testSources(countersErr error) Sources {
	a, b := netip.MustParseAddrPort("198.18.1.11:6443"), netip.MustParseAddrPort("198.18.1.12:6443")
	cfg := &vip.Config{Table: "nftlb", Pools: []vip.Pool{
		{Name: "api", VIP: netip.MustParseAddr("198.18.100.1"), Port: 6443, Protocol: vip.TCP, Scheduler: vip.RoundRobin,
			Backends: []vip.Backend{{Addr: a, Weight: 1}, {Addr: b, Weight: 1}}},
	}}
	applied := ruleset.Build(ruleset.FromConfig(cfg, func(_ *vip.Pool, x vip.Backend) bool { return x.Addr == a }))
	return Sources{
		Config:  func() *vip.Config { return cfg },
		Applied: func() *ruleset.Table { return applied },
		Health: func() []health.Status {
			return []health.Status{
				{Target: health.Target{ID: cfg.Pools[0].ID(cfg.Pools[0].Backends[0])}, State: health.Up,
					Last: health.Result{Outcome: health.OK, At: time.Unix(1, 0)}},
				{Target: health.Target{ID: cfg.Pools[0].ID(cfg.Pools[0].Backends[1])}, State: health.Down,
					Last: health.Result{Outcome: health.Unreachable, Err: syscall.ECONNREFUSED, At: time.Unix(1, 0)}},
			}
		},
		Counters: func(string) (ruleset.Counters, error) {
			if countersErr != nil {
				return ruleset.Counters{}, countersErr
			}
			return ruleset.Counters{
				Pools: map[string]uint64{"api": 7},
				Backends: map[ruleset.Endpoint]ruleset.BackendCounters{
					{Addr: a, Protocol: vip.TCP}: {Connections: 7, TxPackets: 70, TxBytes: 7000, RxPackets: 60, RxBytes: 1 << 40},
				},
			}, nil
		},
		Active: func() (map[netip.AddrPort]int, error) { return map[netip.AddrPort]int{a: 2}, nil },
	}
}

// scrape parses /metrics with Prometheus' own text parser, which rejects
// malformed lines, repeated families and misplaced HELP/TYPE.
func scrape(t *testing.T, m *Metrics, gz bool) map[string]*dto.MetricFamily {
	t.Helper()
	req := httptest.NewRequest("GET", "/metrics", nil)
	if gz {
		req.Header.Set("Accept-Encoding", "gzip")
	}
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, req)
	body := io.Reader(rec.Body)
	if gz {
		if rec.Header().Get("Content-Encoding") != "gzip" {
			t.Fatal("no gzip")
		}
		zr, err := gzip.NewReader(rec.Body)
		if err != nil {
			t.Fatal(err)
		}
		body = zr
	}
	raw, _ := io.ReadAll(body)
	fams, err := textParser().TextToMetricFamilies(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("parse: %v\n%s", err, raw)
	}
	return fams
}

func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	f := fams[name]
	if f == nil {
		t.Fatalf("no family %s", name)
	}
next:
	for _, m := range f.Metric {
		for k, v := range labels {
			found := false
			for _, lp := range m.Label {
				if lp.GetName() == k && lp.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Untyped != nil:
			return m.Untyped.GetValue()
		}
	}
	t.Fatalf("%s%v: no such series", name, labels)
	return 0
}

func TestHandlerStreamsValidText(t *testing.T) {
	m := New(testSources(nil), "test")
	for _, gz := range []bool{false, true} {
		fams := scrape(t, m, gz)
		for _, tt := range []struct {
			name   string
			labels map[string]string
			want   float64
		}{
			{"nftlb_pool_connections_total", map[string]string{"pool": "api"}, 7},
			{"nftlb_backend_connections_total", map[string]string{"backend": "198.18.1.11:6443", "protocol": "tcp"}, 7},
			{"nftlb_backend_bytes_total", map[string]string{"backend": "198.18.1.11:6443", "direction": "rx"}, 1 << 40},
			{"nftlb_backend_packets_total", map[string]string{"backend": "198.18.1.11:6443", "direction": "tx"}, 70},
			{"nftlb_backend_active_connections", map[string]string{"backend": "198.18.1.11:6443"}, 2},
			{"nftlb_backend_active_connections", map[string]string{"backend": "198.18.1.12:6443"}, 0},
			{"nftlb_backend_up", map[string]string{"pool": "api", "backend": "198.18.1.11:6443"}, 1},
			{"nftlb_backend_up", map[string]string{"pool": "api", "backend": "198.18.1.12:6443"}, 0},
			{"nftlb_backend_state", map[string]string{"backend": "198.18.1.12:6443", "state": "down"}, 1},
			{"nftlb_backend_state", map[string]string{"backend": "198.18.1.12:6443", "state": "up"}, 0},
			{"nftlb_backend_last_probe_info", map[string]string{"backend": "198.18.1.12:6443", "outcome": "unreachable", "reason": "refused"}, 1},
			{"nftlb_pool_backends_up", map[string]string{"pool": "api"}, 1},
			{"nftlb_pool_backends", map[string]string{"pool": "api"}, 2},
			{"nftlb_scrape_errors", map[string]string{"source": "kernel_counters"}, 0},
			{"nftlb_build_info", map[string]string{"version": "test"}, 1},
		} {
			if got := value(t, fams, tt.name, tt.labels); got != tt.want {
				t.Errorf("gzip=%v %s%v = %v, want %v", gz, tt.name, tt.labels, got, tt.want)
			}
		}
		if f := fams["nftlb_pool_connections_total"]; f.GetType() != dto.MetricType_COUNTER {
			t.Errorf("nftlb_pool_connections_total is %v, want counter", f.GetType())
		}
	}
}

// A kernel read error drops the kernel families and says so.
func TestHandlerCountsScrapeErrors(t *testing.T) {
	fams := scrape(t, New(testSources(errors.New("netlink: boom")), "test"), false)
	if _, ok := fams["nftlb_pool_connections_total"]; ok {
		t.Error("pool counters reported although the kernel read failed")
	}
	if v := value(t, fams, "nftlb_scrape_errors", map[string]string{"source": "kernel_counters"}); v != 1 {
		t.Errorf("nftlb_scrape_errors{kernel_counters} = %v, want 1", v)
	}
}

func TestLabelEscaping(t *testing.T) {
	var buf bytes.Buffer
	tw := &textWriter{w: bufioWriter(&buf)}
	f := family{"x", "help with \\ and\nnewline", "gauge", []string{"l"}}
	tw.head(f)
	tw.float(f, 1, "a\"b\\c\nd")
	tw.w.Flush()
	fams, err := textParser().TextToMetricFamilies(&buf)
	if err != nil {
		t.Fatalf("%v\n%s", err, buf.String())
	}
	if got := fams["x"].Metric[0].Label[0].GetValue(); got != "a\"b\\c\nd" {
		t.Errorf("label value %q", got)
	}
	if got := fams["x"].GetHelp(); got != "help with \\ and\nnewline" {
		t.Errorf("help %q", got)
	}
}

func bufioWriter(w io.Writer) *bufio.Writer { return bufio.NewWriter(w) }

func textParser() *expfmt.TextParser {
	p := expfmt.NewTextParser(model.UTF8Validation)
	return &p
}
