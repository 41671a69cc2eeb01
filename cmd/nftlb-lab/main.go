// Command nftlb-lab is nftlb's demo (`make demo`): it builds a network-
// namespace lab (a client, an LB router and three backends, all in
// 198.18.0.0/15), runs the real nftlb binary on the LB, and shows with
// real connections how new connections spread over the backends, how a
// frozen backend is taken out (and its idle clients reset), and how it
// comes back. Everything is torn down at the end, also on Ctrl-C.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nftlb/nftlb/internal/lab"
)

func main() {
	bin := flag.String("nftlb", "bin/nftlb", "path of the nftlb binary to run (make demo builds it)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *bin); err != nil {
		fmt.Fprintln(os.Stderr, "nftlb-lab:", err)
		os.Exit(1)
	}
}

const (
	apiPort    = 6443
	healthPort = 8080
)

func config(l *lab.Lab) string {
	var b strings.Builder
	b.WriteString(`# written by nftlb-lab
health:
  interval: 500ms
  timeout: 250ms
  rise: 2
  fall: 3
pools:
  - name: kube-apiserver
    vip: 198.18.100.1
    port: 6443
    health:
      type: http
      port: 8080
      path: /readyz
    backends:
`)
	for _, be := range l.Backends {
		fmt.Fprintf(&b, "      - %s:%d\n", be.Addr, apiPort)
	}
	return b.String()
}

func step(format string, args ...any) {
	fmt.Printf("\n\033[1m== "+format+"\033[0m\n", args...)
}

func run(ctx context.Context, bin string) error {
	if os.Geteuid() != 0 {
		return errors.New("the lab needs root (network namespaces, nftables): run it as root")
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	step("Building the lab: client -> LB (router, runs nftlb) -> backends b1 b2 b3")
	l, err := lab.New(lab.Options{Backends: 3})
	if err != nil {
		return err
	}
	defer func() {
		step("Tearing down the lab")
		if err := l.Close(); err != nil {
			fmt.Println("teardown:", err)
		}
	}()
	who := make([]*lab.Server, 3)
	readyz := make([]*lab.Server, 3)
	for i, b := range l.Backends {
		if who[i], err = b.ServeTCP(apiPort); err != nil {
			return err
		}
		if readyz[i], err = b.ServeHTTP(healthPort); err != nil {
			return err
		}
		fmt.Printf("  %s %s: serves :%d, /readyz on :%d\n", b.Name, b.Addr, apiPort, healthPort)
	}
	fmt.Printf("  client %s, LB %s / %s; VIP %s:%d exists only as nftables rules on the LB\n",
		l.ClientAddr, l.LBClientAddr, l.LBBackendAddr, lab.VIP(1), apiPort)

	dir, err := os.MkdirTemp("", "nftlb-lab-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cfgPath := filepath.Join(dir, "lb.yaml")
	if err := os.WriteFile(cfgPath, []byte(config(l)), 0o644); err != nil {
		return err
	}
	step("Starting nftlb in the LB namespace (config %s)", cfgPath)
	fmt.Print(indent(config(l)))
	logs := &logTail{}
	cmd := l.LB.Command(context.Background(), abs, "run", "-config", cfgPath)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", abs, err)
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		fmt.Println("  nftlb stopped (SIGTERM); its rules would stay until `nftlb cleanup`")
	}()
	if err := logs.wait(ctx, "ruleset applied", 1, 10*time.Second); err != nil {
		return err
	}

	step("The table nftlb programmed (nft list table ip nftlb, in the LB namespace)")
	out, err := l.LB.Run(ctx, "nft", "list", "table", "ip", "nftlb")
	if err != nil {
		return err
	}
	fmt.Print(indent(out))

	step("Balancing: 9 new connections from the client to %s:%d", lab.VIP(1), apiPort)
	if err := connections(ctx, l, 9); err != nil {
		return err
	}

	step("Failover: a client holds an idle connection (like a client-go watch); then its backend freezes")
	watch, err := l.Client.Dial(ctx, "tcp", fmt.Sprintf("%s:%d", lab.VIP(1), apiPort))
	if err != nil {
		return err
	}
	defer watch.Close()
	r := bufio.NewReader(watch)
	greet, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	fmt.Printf("  idle connection is on %s\n", strings.Fields(greet)[0])
	reset := make(chan time.Time, 1)
	go func() { _, _ = r.ReadByte(); reset <- time.Now() }()
	frozen := strings.Fields(greet)[0]
	idx := int(frozen[1] - '1')
	t0 := time.Now()
	who[idx].SetHung(true) // like SIGSTOP: handshakes complete, nothing answers
	readyz[idx].SetHung(true)
	fmt.Printf("  froze %s at %s (it still completes TCP handshakes, answers nothing)\n", frozen, t0.Format("15:04:05.000"))
	if err := logs.wait(ctx, "to=down", 1, 10*time.Second); err != nil {
		return err
	}
	fmt.Printf("  nftlb took %s out after %v (interval 500ms x fall 3 + timeout 250ms = 1.75s bound)\n",
		frozen, time.Since(t0).Round(time.Millisecond))
	select {
	case at := <-reset:
		fmt.Printf("  the idle client was reset %v after the freeze, so it reconnects now instead of hanging\n", at.Sub(t0).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		fmt.Println("  the idle client was NOT reset within 5s")
	}
	if err := connections(ctx, l, 6); err != nil {
		return err
	}

	step("Recovery: %s answers again and is back after rise=2 good probes", frozen)
	t1 := time.Now()
	who[idx].SetHung(false)
	readyz[idx].SetHung(false)
	if err := logs.wait(ctx, "from=down to=up", 1, 10*time.Second); err != nil {
		return err
	}
	fmt.Printf("  back after %v\n", time.Since(t1).Round(time.Millisecond))
	if err := connections(ctx, l, 9); err != nil {
		return err
	}

	step("What nftlb logged")
	fmt.Print(indent(logs.String()))
	return nil
}

// connections opens n connections to the VIP and prints where each went.
func connections(ctx context.Context, l *lab.Lab, n int) error {
	count := map[string]int{}
	failed := 0
	for i := 1; i <= n; i++ {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		name, remote, err := l.Who(cctx, l.Client, fmt.Sprintf("%s:%d", lab.VIP(1), apiPort))
		cancel()
		if err != nil {
			failed++
			fmt.Printf("  connection %d: FAILED: %v\n", i, err)
			continue
		}
		count[name]++
		fmt.Printf("  connection %d -> %s (the backend saw the client as %s: masqueraded)\n", i, name, remote)
	}
	names := make([]string, 0, len(count))
	for k := range count {
		names = append(names, k)
	}
	sort.Strings(names)
	var parts []string
	for _, k := range names {
		parts = append(parts, fmt.Sprintf("%s=%d %s", k, count[k], strings.Repeat("#", count[k])))
	}
	fmt.Printf("  => %s   failed=%d\n", strings.Join(parts, "  "), failed)
	return ctx.Err()
}

func indent(s string) string {
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("  | " + line + "\n")
	}
	return b.String()
}

// logTail keeps nftlb's output for waiting on and showing.
type logTail struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (t *logTail) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.buf.Write(p)
}

func (t *logTail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.buf.String()
}

func (t *logTail) wait(ctx context.Context, substr string, n int, within time.Duration) error {
	deadline := time.Now().Add(within)
	for strings.Count(t.String(), substr) < n {
		if time.Now().After(deadline) {
			return fmt.Errorf("nftlb did not log %q within %v; its log:\n%s", substr, within, t)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}
