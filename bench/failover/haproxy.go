package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/lab"
)

// HAProxy in TCP mode in the LB namespace, the user-space contender: the
// VIP is an address on the LB's lo (added for the run, removed after),
// checks are HTTP GET /readyz on each backend's 8080 with HAProxy's
// defaults `inter 2s fall 3 rise 2` and `timeout check` equal to nftlb's
// timeout. Two backends over the same three servers:
//
//	fe    198.18.100.1:6443 -> be     (defaults: a dead server's sessions stay)
//	fe_sd 198.18.100.1:6444 -> be_sd  (on-marked-down shutdown-sessions)
//
// The client's new connections go to fe only; each run keeps one idle
// connection on the victim through each frontend. Detection is read from
// HAProxy's own log (`log stdout format rfc5424`: the "Server be/b1 is
// DOWN" line, timestamped by HAProxy with microseconds), like nftlb's.
const (
	haproxyPool   = "be"
	haproxySDPool = "be_sd"
	sdPort        = 6444
)

var vipSD = fmt.Sprintf("%s:%d", lab.VIP(1), sdPort)

func haproxyConfig(p profile, l *lab.Lab, sock string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `# written by bench/failover
global
    log stdout format rfc5424 local0 info
    stats socket %s mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 50s
    timeout server 50s
    timeout check %dms

frontend fe
    bind %s:%d
    default_backend %s

frontend fe_sd
    bind %s:%d
    default_backend %s
`, sock, p.timeout.Milliseconds(), lab.VIP(1), apiPort, haproxyPool, lab.VIP(1), sdPort, haproxySDPool)
	for _, be := range []struct{ name, extra string }{{haproxyPool, ""}, {haproxySDPool, " on-marked-down shutdown-sessions"}} {
		fmt.Fprintf(&b, "\nbackend %s\n    log global\n    balance roundrobin\n    option httpchk GET /readyz\n    default-server check port %d inter %dms fall %d rise %d%s\n",
			be.name, healthPort, p.interval.Milliseconds(), fall, rise, be.extra)
		for _, s := range l.Backends {
			fmt.Fprintf(&b, "    server %s %s:%d\n", s.Name, s.Addr, apiPort)
		}
	}
	return b.String()
}

var (
	// <PRI>1 TIMESTAMP HOST APP PID MSGID SD MSG
	rfc5424Line = regexp.MustCompile(`^<\d+>1 (\S+) \S+ \S+ \S+ \S+ \S+ (.*)$`)
	// Server be/b1 is DOWN, reason: Layer7 timeout, check duration: 1001ms. ...
	serverState = regexp.MustCompile(`^Server ([^/ ]+)/(\S+) is (UP|DOWN)(?:, (.*))?$`)
)

// haproxyParser turns HAProxy's server state lines into the entries the
// runs wait for: "backend state changed" with pool (HAProxy backend),
// backend (the server's address:port), from, to, probe (HAProxy's reason).
func haproxyParser(l *lab.Lab) func(*benchkit.Entry) {
	addr := map[string]string{}
	for _, b := range l.Backends {
		addr[b.Name] = fmt.Sprintf("%s:%d", b.Addr, apiPort)
	}
	return func(e *benchkit.Entry) {
		m := rfc5424Line.FindStringSubmatch(e.Raw)
		if m == nil {
			return // HAProxy's own stderr copy of the line, start-up notices
		}
		e.Time, _ = time.Parse(time.RFC3339Nano, m[1])
		e.Msg = m[2]
		s := serverState.FindStringSubmatch(m[2])
		if s == nil {
			return
		}
		to, from := strings.ToLower(s[3]), "down"
		if to == "down" {
			from = "up"
		}
		e.Msg = "backend state changed"
		e.F = map[string]any{"pool": s[1], "server": s[2], "backend": addr[s[2]], "from": from, "to": to, "probe": s[4]}
	}
}

// haproxyRun is a running HAProxy and what to undo after it.
type haproxyRun struct {
	*benchkit.Proc
	sock string
	l    *lab.Lab
}

// startHAProxy adds the VIP to the LB's lo, starts HAProxy in the LB
// namespace and waits until every server has passed enough checks to be
// fully up (see waitFullHealth).
func startHAProxy(ctx context.Context, l *lab.Lab, dir string, p profile) (*haproxyRun, error) {
	sock := filepath.Join(dir, "haproxy.sock")
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(haproxyConfig(p, l, sock)), 0o600); err != nil {
		return nil, err
	}
	if out, err := exec.CommandContext(ctx, "haproxy", "-c", "-q", "-f", cfgPath).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("haproxy -c -f %s: %w: %s", cfgPath, err, out)
	}
	if _, err := l.LB.Run(ctx, "ip", "addr", "add", lab.VIP(1).String()+"/32", "dev", "lo"); err != nil {
		return nil, err
	}
	h := &haproxyRun{sock: sock, l: l}
	// -db: foreground, no daemon. Not bound to ctx: stop() ends it.
	hp, err := benchkit.Start(l.LB, benchkit.Spec{Name: "haproxy", Args: []string{"haproxy", "-db", "-f", cfgPath}, Parse: haproxyParser(l)})
	if err != nil {
		h.removeVIP()
		return nil, err
	}
	h.Proc = hp
	if err := h.waitFullHealth(ctx, 3*p.interval*(rise+fall)); err != nil {
		h.stop()
		return nil, err
	}
	return h, nil
}

func (h *haproxyRun) removeVIP() {
	if _, err := h.l.LB.Run(context.Background(), "ip", "addr", "del", lab.VIP(1).String()+"/32", "dev", "lo"); err != nil {
		benchkit.Progress("remove the VIP from the LB's lo: %v", err)
	}
}

// stop ends HAProxy (SIGTERM) and removes the VIP from lo.
func (h *haproxyRun) stop() {
	h.Proc.Stop()
	h.removeVIP()
}

// serversState is `show servers state` from the stats socket: per
// "backend/server", the named columns.
func (h *haproxyRun) serversState() (map[string]map[string]string, error) {
	c, err := net.DialTimeout("unix", h.sock, time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "show servers state\n"); err != nil {
		return nil, err
	}
	var cols []string
	out := map[string]map[string]string{}
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		line := sc.Text()
		if h, ok := strings.CutPrefix(line, "# "); ok {
			cols = strings.Fields(h)
			continue
		}
		f := strings.Fields(line)
		if cols == nil || len(f) < len(cols) {
			continue
		}
		row := map[string]string{}
		for i, c := range cols {
			row[c] = f[i]
		}
		out[row["be_name"]+"/"+row["srv_name"]] = row
	}
	if err := sc.Err(); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		return nil, err
	}
	return out, nil
}

// waitFullHealth waits until every server is running with the full check
// health (rise + fall - 1). HAProxy counts health up to that: a server
// that has just come back up (health = rise) goes down after one failed
// check, not fall, so a fault before then would be detected early.
func (h *haproxyRun) waitFullHealth(ctx context.Context, within time.Duration) error {
	deadline := time.Now().Add(within)
	want := strconv.Itoa(rise + fall - 1)
	var last map[string]map[string]string
	var lastErr error
	for {
		st, err := h.serversState()
		if err == nil && len(st) == 2*len(h.l.Backends) {
			ok := true
			for _, row := range st {
				ok = ok && row["srv_op_state"] == "2" && row["srv_check_health"] == want
			}
			if ok {
				return nil
			}
		}
		last, lastErr = st, err
		if time.Now().After(deadline) {
			return fmt.Errorf("haproxy: servers not all fully up after %v (err %v): %v; end of its log:\n%s", within, lastErr, last, benchkit.Tail(h.Log.String(), 20))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-h.Exited():
			return fmt.Errorf("haproxy exited (%v); its log:\n%s", h.Err(), benchkit.Tail(h.Log.String(), 40))
		case <-time.After(100 * time.Millisecond):
		}
	}
}
