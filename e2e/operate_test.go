package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/nftlb/nftlb/internal/lab"
	"github.com/nftlb/nftlb/internal/ruleset"
)

// scrape fetches and parses the daemon's /metrics from inside the LB
// namespace (metrics.listen defaults to 127.0.0.1:9742 there).
func scrape(t *testing.T, l *lab.Lab) map[string]*dto.MetricFamily {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return l.LB.Dial(ctx, network, addr)
		},
	}}
	resp, err := client.Get("http://127.0.0.1:9742/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse metrics: %v\n%s", err, body)
	}
	return fams
}

// value returns the metric of family name whose labels include want.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	t.Helper()
	f := fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.Metric {
		have := map[string]string{}
		for _, lp := range m.Label {
			have[lp.GetName()] = lp.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		}
	}
	return 0, false
}

func mustValue(t *testing.T, fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	t.Helper()
	v, ok := value(t, fams, name, want)
	if !ok {
		t.Fatalf("no metric %s%v", name, want)
	}
	return v
}

// Kernel-backed counters match the connections the test made.
func TestMetricsCountConnections(t *testing.T) {
	t.Parallel()
	h := newHealthLab(t)
	startDaemon(t, h.Lab, healthYAML(h.Lab, ""))
	shares(t, h.Lab, vipAddr(1, apiPort), 30)
	// Three connections held open: one per backend.
	for range 3 {
		dialKeepAlive(t, h.Lab, vipAddr(1, apiPort))
	}
	m := scrape(t, h.Lab)
	if v := mustValue(t, m, "nftlb_pool_connections_total", map[string]string{"pool": "api"}); v != 33 {
		t.Errorf("nftlb_pool_connections_total = %v, want 33", v)
	}
	for _, b := range h.Backends {
		be := fmt.Sprintf("%s:%d", b.Addr, apiPort)
		if v := mustValue(t, m, "nftlb_backend_connections_total", map[string]string{"backend": be}); v != 11 {
			t.Errorf("%s: nftlb_backend_connections_total = %v, want 11", be, v)
		}
		if v := mustValue(t, m, "nftlb_backend_active_connections", map[string]string{"backend": be}); v != 1 {
			t.Errorf("%s: active connections = %v, want 1", be, v)
		}
		for _, dir := range []string{"tx", "rx"} {
			if v := mustValue(t, m, "nftlb_backend_packets_total", map[string]string{"backend": be, "direction": dir}); v < 22 {
				t.Errorf("%s %s packets = %v, want >= 22 (2 per connection at least)", be, dir, v)
			}
		}
		if v := mustValue(t, m, "nftlb_backend_up", map[string]string{"pool": "api", "backend": be}); v != 1 {
			t.Errorf("%s up = %v", be, v)
		}
		if v := mustValue(t, m, "nftlb_backend_last_probe_info", map[string]string{"backend": be, "outcome": "ok", "reason": "ok"}); v != 1 {
			t.Errorf("%s last probe info = %v", be, v)
		}
	}
	if v := mustValue(t, m, "nftlb_pool_backends_up", map[string]string{"pool": "api"}); v != 3 {
		t.Errorf("backends up = %v", v)
	}
	if v := mustValue(t, m, "nftlb_config_last_reload_successful", nil); v != 1 {
		t.Errorf("last reload successful = %v", v)
	}
	for _, name := range []string{"nftlb_build_info", "nftlb_ruleset_apply_duration_seconds", "nftlb_probe_duration_seconds"} {
		if _, ok := m[name]; !ok {
			t.Errorf("no %s", name)
		}
	}
}

// Prometheus counters never go backwards: not across a health flap, a
// reload, or a restart of the daemon.
func TestCountersAreMonotonic(t *testing.T) {
	t.Parallel()
	h := newHealthLab(t)
	d := startDaemon(t, h.Lab, healthYAML(h.Lab, ""))
	counters := []string{"nftlb_pool_connections_total", "nftlb_backend_connections_total", "nftlb_backend_packets_total", "nftlb_backend_bytes_total"}
	last := map[string]float64{}
	check := func(step string) {
		t.Helper()
		shares(t, h.Lab, vipAddr(1, apiPort), 6)
		m := scrape(t, h.Lab)
		for _, name := range counters {
			for _, metric := range m[name].GetMetric() {
				key := name + fmt.Sprint(metric.GetLabel())
				v := metric.GetCounter().GetValue()
				if v < last[key] {
					t.Errorf("%s: %s went back from %v to %v", step, key, last[key], v)
				}
				if v == 0 && strings.Contains(name, "connections") && !strings.Contains(key, "other") {
					t.Errorf("%s: %s is 0", step, key)
				}
				last[key] = v
			}
		}
	}
	check("start")
	h.http[1].SetReady(false)
	d.waitTransition(h.Backend(2), "up", "unready", time.Now(), detectBound+margin+2*time.Second)
	check("flap down")
	h.http[1].SetReady(true)
	d.waitTransition(h.Backend(2), "unready", "up", time.Now(), 5*time.Second)
	check("flap up")
	if got := d.reload(healthYAML(h.Lab, "      rise: 3\n") + poolYAML("other", 2, apiPort, backendsOn(h.Lab, apiPort)[:1], "")); got != "ruleset applied" {
		t.Fatalf("reload: %s", got)
	}
	check("reload")
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	startDaemon(t, h.Lab, healthYAML(h.Lab, "      rise: 3\n")+poolYAML("other", 2, apiPort, backendsOn(h.Lab, apiPort)[:1], ""))
	check("restart")
}

func TestStatusCommand(t *testing.T) {
	t.Parallel()
	h := newHealthLab(t)
	d := startDaemon(t, h.Lab, healthYAML(h.Lab, ""))
	h.http[2].SetReady(false)
	d.waitTransition(h.Backend(3), "up", "unready", time.Now(), detectBound+margin+2*time.Second)
	shares(t, h.Lab, vipAddr(1, apiPort), 4)
	out, err := nftlb(t, h.Lab, "status")
	if err != nil {
		t.Fatalf("nftlb status: %v\n%s", err, out)
	}
	t.Logf("nftlb status:\n%s", out)
	for _, want := range []string{"POOL", "api", "198.18.100.1:6443/tcp", "round-robin", "2/3",
		"198.18.1.11:6443", "up", "198.18.1.13:6443", "unready", "HTTP status 500"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q", want)
		}
	}
	if out, err := nftlb(t, h.Lab, "status", "-addr", "127.0.0.1:1"); err == nil || !strings.Contains(out, "is nftlb running") {
		t.Errorf("status of nothing: %v %s", err, out)
	}
}

// sd_notify: READY after the first apply, RELOADING (with MONOTONIC_USEC)
// then READY around SIGHUP, WATCHDOG while running, STOPPING at exit.
func TestSystemdNotify(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	msgs := make(chan string, 100)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	expect := func(prefix string) string {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case m := <-msgs:
				if strings.HasPrefix(m, prefix) {
					return m
				}
			case <-deadline:
				t.Fatalf("no %q notification within 10s", prefix)
			}
		}
	}
	d := startDaemonEnv(t, l, configYAML("", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), "")),
		[]string{"NOTIFY_SOCKET=" + sock, "WATCHDOG_USEC=200000"})
	expect("READY=1")
	expect("WATCHDOG=1")
	d.signal(syscall.SIGHUP)
	if m := expect("RELOADING=1"); !strings.Contains(m, "MONOTONIC_USEC=") {
		t.Errorf("reloading notification without MONOTONIC_USEC: %q", m)
	}
	expect("READY=1")
	d.signal(syscall.SIGTERM)
	expect("STOPPING=1")
	_ = os.Remove(sock)
}

// Someone runs `nft flush ruleset` (or deletes a map element) on the LB:
// nftlb notices and restores its table within a second, and traffic
// resumes. Changes to other tables are left alone.
func TestDriftRepair(t *testing.T) {
	t.Parallel()
	l := newLab(t, 3)
	d := startDaemon(t, l, configYAML("", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), "")))
	restored := func(what string, start time.Time, ok func() bool) {
		t.Helper()
		for !ok() {
			if time.Since(start) > 5*time.Second {
				t.Fatalf("%s: not restored within 5s; log:\n%s", what, d.logs)
			}
			time.Sleep(10 * time.Millisecond) // polling the kernel
		}
		took := time.Since(start)
		t.Logf("%s: restored after %v", what, took.Round(time.Millisecond))
		if took > time.Second {
			t.Errorf("%s: restored after %v, want within 1s", what, took)
		}
	}
	tableBack := func() bool {
		out, err := l.LB.Run(context.Background(), "nft", "list", "table", "ip", "nftlb")
		return err == nil && strings.Contains(out, "198.18.1.12 . 6443")
	}

	start := time.Now()
	nft(t, l, "flush", "ruleset")
	restored("nft flush ruleset", start, tableBack)
	assertKernelMatchesRender(t, d, "nftlb")
	if count, _ := shares(t, l, vipAddr(1, apiPort), 3); len(count) != 3 {
		t.Errorf("after repair: %v", count)
	}

	slots := func() int {
		out, err := l.LB.Run(context.Background(), "nft", "list", "map", "ip", "nftlb", ruleset.SlotMap("api"))
		if err != nil {
			return -1
		}
		return strings.Count(out, " : 198.18.1.")
	}
	before := slots()
	start = time.Now()
	nft(t, l, "delete", "element", "ip", "nftlb", ruleset.SlotMap("api"), "{ 1 }")
	restored("delete element", start, func() bool { return slots() == before })
	assertKernelMatchesRender(t, d, "nftlb")

	repairs := strings.Count(d.logs.String(), "changed by someone else")
	nft(t, l, "add", "table", "ip", "other")
	nft(t, l, "add", "chain", "ip", "other", "c")
	// A full round trip through the daemon's loop (a reload) orders this
	// check after any reaction to the other table.
	d.reload(configYAML("", poolYAML("api", 1, apiPort, backendsOn(l, apiPort), "")))
	if n := strings.Count(d.logs.String(), "changed by someone else"); n != repairs {
		t.Errorf("a change to another table was taken for drift:\n%s", d.logs)
	}
	if v := mustValue(t, scrape(t, l), "nftlb_drift_repairs_total", nil); v != 2 {
		t.Errorf("nftlb_drift_repairs_total = %v, want 2", v)
	}
}

// nftlb diff shows what an edit would change, using the running daemon's
// health, before SIGHUP; after the reload it shows nothing.
func TestDiffCommand(t *testing.T) {
	t.Parallel()
	h := newHealthLab(t)
	d := startDaemon(t, h.Lab, healthYAML(h.Lab, ""))
	h.http[2].SetReady(false)
	d.waitTransition(h.Backend(3), "up", "unready", time.Now(), detectBound+margin+2*time.Second)
	edited := healthYAML(h.Lab, "") + poolYAML("web", 2, 80, backendsOn(h.Lab, apiPort)[:2], "")
	path := writeTemp(t, edited)
	out, err := nftlb(t, h.Lab, "diff", "-config", path)
	if err != nil {
		t.Fatalf("diff: %v\n%s", err, out)
	}
	t.Logf("nftlb diff:\n%s", out)
	for _, want := range []string{"health from the nftlb running at 127.0.0.1:9742", "+ pool web 198.18.100.2:80/tcp",
		"+   slots 0 -> 198.18.1.11:6443, 1 -> 198.18.1.12:6443"} {
		if !strings.Contains(out, want) {
			t.Errorf("diff lacks %q", want)
		}
	}
	if strings.Contains(out, "pool api") {
		t.Errorf("diff shows the unchanged pool api (its unready backend counted as up?):\n%s", out)
	}
	d.reload(edited)
	if out, _ := nftlb(t, h.Lab, "diff", "-config", d.config); !strings.Contains(out, "no changes") {
		t.Errorf("diff after the reload:\n%s", out)
	}
}
