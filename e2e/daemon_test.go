// Package e2e runs the real nftlb binary against the real kernel: a client
// namespace sends TCP/UDP connections through the LB namespace, where
// `nftlb run` programs nftables, to backend namespaces (see internal/lab).
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nftlb/nftlb/internal/lab"
	"github.com/nftlb/nftlb/internal/ruleset"
)

// nftlbBin is built once for the whole package by TestMain.
var nftlbBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "nftlb-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	nftlbBin = filepath.Join(dir, "nftlb")
	args := []string{"build", "-o", nftlbBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, "../cmd/nftlb")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building nftlb:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// logBuffer collects the daemon's log lines for tests to wait on.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// daemon is one `nftlb run` process in the lab's LB namespace.
type daemon struct {
	t      *testing.T
	lab    *lab.Lab
	config string // path of its config file
	cmd    *exec.Cmd
	logs   *logBuffer
	exited chan struct{}
	err    error // exit status, valid after exited is closed
}

// startDaemon writes cfg, starts nftlb in the LB namespace and waits for
// its first apply. It is stopped (SIGTERM) on cleanup if still running.
func startDaemon(t *testing.T, l *lab.Lab, cfg string) *daemon {
	t.Helper()
	return startDaemonEnv(t, l, cfg, nil)
}

// startDaemonEnv is startDaemon with extra environment variables.
func startDaemonEnv(t *testing.T, l *lab.Lab, cfg string, env []string) *daemon {
	t.Helper()
	d := &daemon{t: t, lab: l, config: filepath.Join(t.TempDir(), "lb.yaml"), logs: &logBuffer{}, exited: make(chan struct{})}
	d.write(cfg)
	d.cmd = l.LB.Command(context.Background(), nftlbBin, "run", "-config", d.config, "-log-level", "debug")
	d.cmd.Stdout, d.cmd.Stderr = d.logs, d.logs
	d.cmd.Env = append(os.Environ(), env...)
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("start nftlb: %v", err)
	}
	go func() { d.err = d.cmd.Wait(); close(d.exited) }()
	t.Cleanup(func() {
		d.stop()
		if t.Failed() {
			t.Logf("nftlb log:\n%s", d.logs)
		}
	})
	d.waitLog("ruleset applied", 1, 20*time.Second)
	return d
}

func (d *daemon) write(cfg string) {
	d.t.Helper()
	if err := os.WriteFile(d.config, []byte(cfg), 0o644); err != nil {
		d.t.Fatal(err)
	}
}

// waitLog waits until substr has appeared at least n times in the log.
func (d *daemon) waitLog(substr string, n int, timeout time.Duration) {
	d.t.Helper()
	deadline := time.Now().Add(timeout)
	for strings.Count(d.logs.String(), substr) < n {
		select {
		case <-d.exited:
			d.t.Fatalf("nftlb exited (%v) while waiting for %q; log:\n%s", d.err, substr, d.logs)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("timed out after %v waiting for %d× %q in the log:\n%s", timeout, n, substr, d.logs)
		}
	}
}

// reload writes cfg, sends SIGHUP and waits until the daemon logged the
// outcome (applied, unchanged or rejected), which it returns.
func (d *daemon) reload(cfg string) string {
	d.t.Helper()
	d.write(cfg)
	outcomes := []string{`ruleset applied" why=reload`, `ruleset unchanged" why=reload`, "reload rejected"}
	before := map[string]int{}
	for _, o := range outcomes {
		before[o] = strings.Count(d.logs.String(), o)
	}
	d.signal(syscall.SIGHUP)
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		logs := d.logs.String()
		for _, o := range outcomes {
			if strings.Count(logs, o) > before[o] {
				return strings.Split(o, `"`)[0]
			}
		}
		select {
		case <-d.exited:
			d.t.Fatalf("nftlb exited (%v) on SIGHUP; log:\n%s", d.err, d.logs)
		case <-time.After(20 * time.Millisecond):
		}
	}
	d.t.Fatalf("no reload outcome logged within 20s; log:\n%s", d.logs)
	return ""
}

func (d *daemon) signal(sig syscall.Signal) {
	d.t.Helper()
	if err := d.cmd.Process.Signal(sig); err != nil {
		d.t.Fatalf("signal %v: %v", sig, err)
	}
}

// stop sends SIGTERM and waits for the exit; it returns the exit error.
func (d *daemon) stop() error {
	select {
	case <-d.exited:
		return d.err
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.exited
		d.t.Errorf("nftlb did not exit within 10s of SIGTERM")
	}
	return d.err
}

func writeTemp(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "lb.yaml")
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// nftlb runs a one-shot nftlb command in the LB namespace.
func nftlb(t *testing.T, l *lab.Lab, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return l.LB.Run(ctx, nftlbBin, args...)
}

func nft(t *testing.T, l *lab.Lab, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := l.LB.Run(ctx, "nft", args...)
	if err != nil {
		t.Fatalf("nft %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func nftInput(t *testing.T, l *lab.Lab, text string) {
	t.Helper()
	cmd := l.LB.Command(context.Background(), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v: %s", err, out)
	}
}

// assertKernelMatchesRender compares the live table with `nftlb render`.
func assertKernelMatchesRender(t *testing.T, d *daemon, table string) {
	t.Helper()
	render, err := nftlb(t, d.lab, "render", "-config", d.config)
	if err != nil {
		t.Fatalf("nftlb render: %v", err)
	}
	live := nft(t, d.lab, "list", "table", "ip", table)
	if a, b := ruleset.Canonical(live), ruleset.Canonical(render); a != b {
		t.Fatalf("kernel table differs from nftlb render (canonical forms):\n%s\n--- kernel\n%s\n--- render\n%s", lineDiff(a, b), live, render)
	}
}

// who opens one TCP connection from ns to addr and returns the backend
// name and the source address the backend saw.
func who(t *testing.T, from *lab.NS, l *lab.Lab, addr string) (string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	name, remote, err := l.Who(ctx, from, addr)
	if err != nil {
		t.Fatalf("connect %s from %s: %v", addr, from.Name, err)
	}
	return name, remote
}

// shares opens n sequential connections and counts them per backend.
func shares(t *testing.T, l *lab.Lab, addr string, n int) (map[string]int, []string) {
	t.Helper()
	count := map[string]int{}
	var order []string
	for range n {
		name, _ := who(t, l.Client, l, addr)
		count[name]++
		order = append(order, name)
	}
	return count, order
}

// lineDiff lists the lines only in a (-) and only in b (+).
func lineDiff(a, b string) string {
	count := map[string]int{}
	for _, l := range strings.Split(a, "\n") {
		count[l]++
	}
	for _, l := range strings.Split(b, "\n") {
		count[l]--
	}
	var out []string
	for l, n := range count {
		for ; n > 0; n-- {
			out = append(out, "- "+l)
		}
		for ; n < 0; n++ {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}
