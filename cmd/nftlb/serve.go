package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/nftlb/nftlb/internal/status"
	"github.com/nftlb/nftlb/internal/vip"
)

// listener serves /metrics and /status on metrics.listen. A reload that
// changes the address binds the new one before closing the old, so a bad
// address rejects the reload instead of leaving nothing listening.
type listener struct {
	addr string
	srv  *http.Server
}

func (d *daemon) handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", d.metrics.Handler())
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(d.statusDoc())
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "nftlb: /metrics (Prometheus), /status (JSON; `nftlb status` prints it)")
	})
	return mux
}

// listen (re)binds the HTTP listener to addr if it changed. The new
// address is bound before the old one is closed, except when only the
// host changes (the same port would be busy): then the old one is closed
// first and restored if the new bind fails.
func (d *daemon) listen(addr string) error {
	if d.http != nil && d.http.addr == addr {
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil && d.http != nil && samePort(d.http.addr, addr) {
		old := d.http.addr
		d.closeListener()
		d.http = nil
		if ln, err = net.Listen("tcp", addr); err != nil {
			if rerr := d.listen(old); rerr != nil {
				d.log.Error("cannot restore the metrics listener", "addr", old, "err", rerr)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("metrics.listen %s: %w", addr, err)
	}
	srv := &http.Server{Handler: d.handler(), ReadHeaderTimeout: 5 * time.Second, ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelWarn)}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics listener stopped", "addr", addr, "err", err)
		}
	}()
	d.closeListener()
	d.http = &listener{addr: addr, srv: srv}
	d.log.Info("serving metrics and status", "addr", ln.Addr().String())
	return nil
}

func samePort(a, b string) bool {
	_, pa, err1 := net.SplitHostPort(a)
	_, pb, err2 := net.SplitHostPort(b)
	return err1 == nil && err2 == nil && pa == pb
}

func (d *daemon) closeListener() {
	if d.http != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = d.http.srv.Shutdown(ctx)
		cancel()
	}
}

// activeConnections counts nftlb's open connections per backend (TCP and
// UDP, one conntrack dump at most every 5 s however often it is scraped).
func (d *daemon) activeConnections() (map[netip.AddrPort]int, error) {
	if d.flows == nil {
		return nil, errors.New("conntrack not available")
	}
	return d.flows.Count(5 * time.Second)
}

func (d *daemon) statusDoc() status.Doc {
	cfg := d.running.Load()
	if cfg == nil {
		return status.Doc{Time: time.Now(), Errors: []string{"starting: no config applied yet"}}
	}
	in := status.Inputs{Config: cfg, Health: d.health.Statuses(), Version: version, Now: time.Now()}
	var err error
	if in.Counters, err = d.counters.Counters(cfg.Table); err != nil {
		in.Errors = append(in.Errors, "kernel counters: "+err.Error())
	}
	if in.Active, err = d.activeConnections(); err != nil {
		in.Errors = append(in.Errors, "conntrack: "+err.Error())
	}
	return status.Build(in)
}

// notify tells systemd (Type=notify) about the daemon's state; outside
// systemd (no NOTIFY_SOCKET) it does nothing.
func (d *daemon) notify(state string) {
	if _, err := sddaemon.SdNotify(false, state); err != nil {
		d.log.Warn("sd_notify failed", "state", strings.ReplaceAll(state, "\n", " "), "err", err)
	}
}

// reloadingState is RELOADING=1 with the monotonic timestamp systemd wants
// (Type=notify-reload and systemd >= 253 check it).
func reloadingState() string {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", ts.Nano()/1000)
}

// checkForwarding warns when the kernel will not route VIP traffic.
func (d *daemon) checkForwarding() {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		d.log.Warn("cannot read net.ipv4.ip_forward", "err", err)
		return
	}
	if strings.TrimSpace(string(b)) != "1" {
		d.log.Warn("net.ipv4.ip_forward is 0: connections from other hosts to the VIPs are DNATed but not forwarded; " +
			"enable it (install systemd/99-nftlb.conf into /etc/sysctl.d/ or run sysctl -w net.ipv4.ip_forward=1)")
	}
}

// cmdStatus prints a running daemon's /status.
func cmdStatus(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("status", "[-addr HOST:PORT] [-json]", stderr)
	addr := fs.String("addr", vip.DefaultMetricsListen, "the daemon's metrics.listen address")
	asJSON := fs.Bool("json", false, "print the raw JSON")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + *addr + "/status")
	if err != nil {
		fmt.Fprintf(stderr, "nftlb status: %v (is nftlb running, and is -addr its metrics.listen?)\n", err)
		return exitError
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil || resp.StatusCode != http.StatusOK {
		fmt.Fprintf(stderr, "nftlb status: %s: %v\n", resp.Status, err)
		return exitError
	}
	if *asJSON {
		_, _ = stdout.Write(body)
		return exitOK
	}
	var doc status.Doc
	if err := json.Unmarshal(body, &doc); err != nil {
		fmt.Fprintf(stderr, "nftlb status: bad answer from %s: %v\n", *addr, err)
		return exitError
	}
	if err := doc.WriteTable(stdout); err != nil {
		return exitError
	}
	return exitOK
}
