package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

const (
	whoPort  = 7000
	httpPort = 8080
	udpPort  = 9000
)

func timeout(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// mustServe(t)(b.ServeTCP(port)) fails the test if the server did not start.
func mustServe(t *testing.T) func(*Server, error) *Server {
	return func(s *Server, err error) *Server {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
}

// remoteHost returns the address part of an ip:port.
func remoteHost(t *testing.T, remote string) netip.Addr {
	t.Helper()
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		t.Fatalf("remote %q: %v", remote, err)
	}
	return ap.Addr()
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

func TestLab(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	rootForward := readFile(t, "/proc/sys/net/ipv4/ip_forward")
	start := time.Now()
	l := NewT(t, Options{})
	t.Logf("lab %s with %d backends up in %v", l.Prefix, len(l.Backends), time.Since(start))

	for i, b := range l.Backends {
		if want := fmt.Sprintf("b%d", i+1); b.Name != want || b.NS.Name != l.Prefix+"-"+want {
			t.Errorf("backend %d: name %q ns %q", i+1, b.Name, b.NS.Name)
		}
		if want := netip.AddrFrom4([4]byte{198, 18, 1, byte(11 + i)}); b.Addr != want {
			t.Errorf("backend %s: addr %v, want %v", b.Name, b.Addr, want)
		}
		mustServe(t)(b.ServeTCP(whoPort))
		mustServe(t)(b.ServeHTTP(httpPort))
		mustServe(t)(b.ServeUDP(udpPort))
	}
	b1, b2, b3 := l.Backend(1), l.Backend(2), l.Backend(3)

	t.Run("Sysctl", func(t *testing.T) {
		out, err := l.LB.Run(t.Context(), "cat", "/proc/sys/net/ipv4/ip_forward")
		if err != nil || strings.TrimSpace(out) != "1" {
			t.Errorf("LB ip_forward = %q, %v; want 1", out, err)
		}
		if got := readFile(t, "/proc/sys/net/ipv4/ip_forward"); got != rootForward {
			t.Errorf("root ip_forward changed: %q -> %q", rootForward, got)
		}
	})

	t.Run("RoutedTCP", func(t *testing.T) {
		for _, b := range l.Backends {
			name, remote, err := l.Who(timeout(t, 5*time.Second), l.Client, b.AddrPort(whoPort).String())
			if err != nil {
				t.Fatal(err)
			}
			if name != b.Name || remoteHost(t, remote) != l.ClientAddr {
				t.Errorf("who %s = %s %s, want %s from %v", b.Addr, name, remote, b.Name, l.ClientAddr)
			}
		}
	})

	t.Run("FromLB", func(t *testing.T) {
		name, remote, err := l.Who(timeout(t, 5*time.Second), l.LB, b1.AddrPort(whoPort).String())
		if err != nil {
			t.Fatal(err)
		}
		if name != "b1" || remoteHost(t, remote) != l.LBBackendAddr {
			t.Errorf("who = %s %s, want b1 from %v", name, remote, l.LBBackendAddr)
		}
	})

	t.Run("Echo", func(t *testing.T) {
		ctx := timeout(t, 5*time.Second)
		c, err := l.Client.Dial(ctx, "tcp", b2.AddrPort(whoPort).String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		r := bufio.NewReader(c)
		greeting, err := r.ReadString('\n')
		if err != nil || !strings.HasPrefix(greeting, "b2 198.18.0.2:") {
			t.Fatalf("greeting %q, %v", greeting, err)
		}
		if want := fmt.Sprintf("b2 %s\n", c.LocalAddr()); greeting != want {
			t.Errorf("greeting %q, want %q", greeting, want)
		}
		for _, msg := range []string{"hello\n", "again\n"} {
			io.WriteString(c, msg)
			got, err := r.ReadString('\n')
			if err != nil || got != msg {
				t.Fatalf("echo %q = %q, %v", msg, got, err)
			}
		}
	})

	t.Run("UDP", func(t *testing.T) {
		for _, b := range l.Backends {
			name, remote, err := l.WhoUDP(timeout(t, 5*time.Second), l.Client, b.AddrPort(udpPort).String())
			if err != nil {
				t.Fatal(err)
			}
			if name != b.Name || remoteHost(t, remote) != l.ClientAddr {
				t.Errorf("who udp %s = %s %s", b.Addr, name, remote)
			}
		}
	})

	t.Run("HTTP", func(t *testing.T) {
		base := "http://" + b3.AddrPort(httpPort).String()
		srv := b3.servers[1]
		name, remote, err := l.WhoHTTP(timeout(t, 5*time.Second), l.Client, base+"/")
		if err != nil || name != "b3" || remoteHost(t, remote) != l.ClientAddr {
			t.Fatalf("who http = %s %s, %v", name, remote, err)
		}
		if body, err := l.Get(timeout(t, 5*time.Second), l.Client, base+"/readyz"); err != nil || body != "ok\n" {
			t.Fatalf("readyz = %q, %v", body, err)
		}
		srv.SetReady(false)
		_, err = l.Get(timeout(t, 5*time.Second), l.Client, base+"/readyz")
		var se *HTTPStatusError
		if !errors.As(err, &se) || se.StatusCode != 500 {
			t.Fatalf("unready readyz: %v, want status 500", err)
		}
		if name, _, err := l.WhoHTTP(timeout(t, 5*time.Second), l.Client, base+"/x"); err != nil || name != "b3" {
			t.Errorf("unready: who http = %s, %v", name, err)
		}
		srv.SetReady(true)
		if _, err := l.Get(timeout(t, 5*time.Second), l.Client, base+"/readyz"); err != nil {
			t.Errorf("ready again: %v", err)
		}
	})

	t.Run("Hung", func(t *testing.T) {
		tcp := mustServe(t)(b2.ServeTCP(7100))
		web := mustServe(t)(b2.ServeHTTP(7101))
		udp := mustServe(t)(b2.ServeUDP(7102))
		for _, s := range []*Server{tcp, web, udp} {
			s.SetHung(true)
		}

		// The connect succeeds, the greeting never comes.
		ctx := timeout(t, 5*time.Second)
		c, err := l.Client.Dial(ctx, "tcp", tcp.Addr().String())
		if err != nil {
			t.Fatalf("connect to hung server: %v", err)
		}
		defer c.Close()
		r := bufio.NewReader(c)
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if line, err := r.ReadString('\n'); !isTimeout(err) {
			t.Fatalf("read from hung server = %q, %v; want timeout", line, err)
		}
		if _, _, err := l.Who(timeout(t, 200*time.Millisecond), l.Client, tcp.Addr().String()); !isTimeout(err) {
			t.Errorf("who hung tcp: %v, want timeout", err)
		}
		if _, _, err := l.WhoHTTP(timeout(t, 200*time.Millisecond), l.Client, "http://"+web.Addr().String()+"/readyz"); !isTimeout(err) {
			t.Errorf("hung http: %v, want timeout", err)
		}
		if _, _, err := l.WhoUDP(timeout(t, 200*time.Millisecond), l.Client, udp.Addr().String()); !isTimeout(err) {
			t.Errorf("hung udp: %v, want timeout", err)
		}
		// Accepting happens on the server's goroutines, maybe just after
		// the client gave up.
		waitFor(t, "hung tcp: 2 accepted", func() bool { return tcp.Accepted() == 2 })
		waitFor(t, "hung http: 1 accepted", func() bool { return web.Accepted() == 1 })
		waitFor(t, "hung udp: 1 received", func() bool { return udp.Accepted() == 1 })

		for _, s := range []*Server{tcp, web, udp} {
			s.SetHung(false)
		}
		// The waiting connection gets its greeting now.
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "b2 ") {
			t.Errorf("after unhang: %q, %v", line, err)
		}
		if _, _, err := l.Who(timeout(t, 5*time.Second), l.Client, tcp.Addr().String()); err != nil {
			t.Errorf("who after unhang: %v", err)
		}
		if _, err := l.Get(timeout(t, 5*time.Second), l.Client, "http://"+web.Addr().String()+"/readyz"); err != nil {
			t.Errorf("http after unhang: %v", err)
		}
		if _, _, err := l.WhoUDP(timeout(t, 5*time.Second), l.Client, udp.Addr().String()); err != nil {
			t.Errorf("udp after unhang: %v", err)
		}
	})

	t.Run("ServerClose", func(t *testing.T) {
		s := mustServe(t)(b3.ServeTCP(7200))
		ctx := timeout(t, 5*time.Second)
		c, err := l.Client.Dial(ctx, "tcp", s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		r := bufio.NewReader(c)
		if _, err := r.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		// The open connection is closed by the server...
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if line, err := r.ReadString('\n'); err == nil || isTimeout(err) {
			t.Errorf("read after server close = %q, %v; want EOF or reset", line, err)
		}
		// ...and new connects are refused, quickly.
		start := time.Now()
		_, err = l.Client.Dial(timeout(t, 5*time.Second), "tcp", s.Addr().String())
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("connect after close: %v, want ECONNREFUSED", err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("refusal took %v", d)
		}
		if n := s.Accepted(); n != 1 {
			t.Errorf("accepted %d, want 1", n)
		}
		if err := s.Close(); err != nil {
			t.Errorf("second close: %v", err)
		}
	})

	t.Run("LinkDown", func(t *testing.T) {
		if err := b3.SetLink(false); err != nil {
			t.Fatal(err)
		}
		if _, _, err := l.Who(timeout(t, 300*time.Millisecond), l.Client, b3.AddrPort(whoPort).String()); err == nil {
			t.Fatal("backend with link down still reachable")
		}
		if _, _, err := l.Who(timeout(t, 5*time.Second), l.Client, b2.AddrPort(whoPort).String()); err != nil {
			t.Errorf("other backend: %v", err)
		}
		if err := b3.SetLink(true); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		name, _, err := l.Who(timeout(t, 5*time.Second), l.Client, b3.AddrPort(whoPort).String())
		if err != nil || name != "b3" {
			t.Fatalf("after link up: %s, %v", name, err)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("first connect after link up took %v", d)
		}
	})
}

// TestCloseLeavesNothing runs alone (not parallel): it compares the root
// namespace before and after and checks for leaked goroutines.
func TestCloseLeavesNothing(t *testing.T) {
	RequireRoot(t)
	before := rootState(t)
	l, err := New(Options{Backends: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	for _, b := range l.Backends {
		mustServe(t)(b.ServeTCP(whoPort))
		mustServe(t)(b.ServeHTTP(httpPort))
		mustServe(t)(b.ServeUDP(udpPort))
	}
	// Leave a few things in flight: open keep-alive connections, and
	// connections and requests held by hung servers.
	b1, b2 := l.Backend(1), l.Backend(2)
	c1, err := l.Client.Dial(timeout(t, 5*time.Second), "tcp", b1.AddrPort(whoPort).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	for _, s := range b2.servers {
		s.SetHung(true)
	}
	c2, err := l.Client.Dial(timeout(t, 5*time.Second), "tcp", b2.AddrPort(whoPort).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	hungGet := make(chan error, 1)
	go func() {
		_, err := l.Get(timeout(t, 10*time.Second), l.Client, "http://"+b2.AddrPort(httpPort).String()+"/")
		hungGet <- err
	}()
	if _, _, err := l.WhoHTTP(timeout(t, 5*time.Second), l.Client, "http://"+b1.AddrPort(httpPort).String()+"/"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "hung HTTP request accepted", func() bool { return b2.servers[1].Accepted() == 1 })

	if err := l.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	if err := <-hungGet; err == nil {
		t.Error("request to a hung server succeeded")
	}

	names, err := listNamespaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if strings.HasPrefix(n, l.Prefix) {
			t.Errorf("namespace %s left after Close", n)
		}
	}
	if after := rootState(t); after != before {
		t.Errorf("root namespace changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if _, err := l.Backend(1).ServeTCP(whoPort); err == nil {
		t.Error("ServeTCP on a closed lab succeeded")
	}
	waitNoLeaks(t)
}

// TestSetupFailure runs alone (not parallel): it sets a package hook.
func TestSetupFailure(t *testing.T) {
	RequireRoot(t)
	if _, err := New(Options{Backends: MaxBackends + 1}); err == nil {
		t.Error("New with too many backends succeeded")
	}
	before := rootState(t)
	var prefix string
	testHookSetup = func(l *Lab) error {
		prefix = l.Prefix
		return errors.New("injected failure")
	}
	t.Cleanup(func() { testHookSetup = nil })
	l, err := New(Options{})
	if err == nil || !strings.Contains(err.Error(), "injected failure") || l != nil {
		t.Fatalf("New = %v, %v; want the injected failure", l, err)
	}
	names, err := listNamespaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if strings.HasPrefix(n, prefix) {
			t.Errorf("namespace %s left after failed setup", n)
		}
	}
	if after := rootState(t); after != before {
		t.Errorf("root namespace changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

func TestParallelLabs(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	const n = 2
	labs := make([]*Lab, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range labs {
		wg.Go(func() { labs[i], errs[i] = New(Options{Backends: 2}) })
	}
	wg.Wait()
	for i, l := range labs {
		if l != nil {
			t.Cleanup(func() { l.Close() })
		}
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
	}
	if labs[0].Prefix == labs[1].Prefix {
		t.Fatalf("same prefix %s", labs[0].Prefix)
	}
	servers := make([]*Server, n)
	for i, l := range labs {
		servers[i] = mustServe(t)(l.Backend(1).ServeTCP(whoPort))
	}
	// Same addresses, same ports: each client must reach its own lab only.
	const calls = 20
	for i, l := range labs {
		wg.Go(func() {
			for range calls {
				name, remote, err := l.Who(timeout(t, 5*time.Second), l.Client, l.Backend(1).AddrPort(whoPort).String())
				if err != nil || name != "b1" || !strings.HasPrefix(remote, "198.18.0.2:") {
					t.Errorf("lab %d: who = %s %s, %v", i, name, remote, err)
					return
				}
			}
		})
	}
	wg.Wait()
	for i, s := range servers {
		if got := s.Accepted(); got != calls {
			t.Errorf("lab %d: server accepted %d, want %d", i, got, calls)
		}
	}
	if err := labs[0].Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := labs[1].Who(timeout(t, 5*time.Second), labs[1].Client, labs[1].Backend(1).AddrPort(whoPort).String()); err != nil {
		t.Errorf("lab 1 after closing lab 0: %v", err)
	}
}

func TestCleanupStale(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	l, err := New(Options{Backends: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	for _, ns := range l.Namespaces() {
		if !staleName.MatchString(ns.Name) {
			t.Errorf("staleName does not match %s", ns.Name)
		}
	}
	for _, other := range []string{"nlbx-t1", "nlbtest", NSPrefix + "12345-c", NSPrefix + "abcdef-x", "x" + l.Prefix + "-c"} {
		if staleName.MatchString(other) {
			t.Errorf("staleName matches %s", other)
		}
	}
	// Only this lab's namespaces: other labs (other tests, other
	// packages) may be running.
	if err := cleanupStale(func(n string) bool { return staleName.MatchString(n) && strings.HasPrefix(n, l.Prefix+"-") }); err != nil {
		t.Fatal(err)
	}
	names, err := listNamespaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if strings.HasPrefix(n, l.Prefix) {
			t.Errorf("namespace %s survived cleanup", n)
		}
	}
	if err := l.Close(); err != nil {
		t.Errorf("close after cleanup: %v", err)
	}
}

func TestDo(t *testing.T) {
	t.Parallel()
	RequireRoot(t)
	l := NewT(t, Options{Backends: 1})
	root, err := netns.GetFromPath("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	lbns, err := netns.GetFromName(l.LB.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer lbns.Close()

	for range 50 {
		err := l.LB.Do(func() error {
			cur, err := netns.Get()
			if err != nil {
				return err
			}
			defer cur.Close()
			if !cur.Equal(lbns) {
				return errors.New("Do: not in the LB namespace")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// Threads released by Do are back in the root namespace.
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			cur, err := netns.Get()
			if err != nil {
				t.Error(err)
				return
			}
			defer cur.Close()
			if !cur.Equal(root) {
				t.Error("a thread outside Do is not in the root namespace")
			}
		})
	}
	wg.Wait()

	sentinel := errors.New("sentinel")
	if err := l.Client.Do(func() error { return sentinel }); err != sentinel {
		t.Errorf("Do error = %v, want f's error unchanged", err)
	}
	func() {
		defer func() {
			if p := recover(); p == nil || !strings.Contains(fmt.Sprint(p), "boom") {
				t.Errorf("recovered %v, want boom", p)
			}
		}()
		l.Client.Do(func() error { panic("boom") })
	}()
	if err := (&NS{Name: l.Prefix + "-nonexistent"}).Do(func() error { return nil }); err == nil {
		t.Error("Do in a missing namespace succeeded")
	}
	// Command and Run run in the namespace.
	out, err := l.Backend(1).NS.Run(t.Context(), "ip", "-o", "-4", "addr", "show", "dev", "eth0")
	if err != nil || !strings.Contains(out, "198.18.1.11/24") {
		t.Errorf("Run: %q, %v", out, err)
	}
	if _, err := l.Client.Run(t.Context(), "false"); err == nil || !strings.Contains(err.Error(), l.Client.Name) {
		t.Errorf("Run false: %v", err)
	}
}

func BenchmarkNew(b *testing.B) {
	RequireRoot(b)
	for b.Loop() {
		l, err := New(Options{})
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// rootState describes the root namespace: links, addresses, routes,
// forwarding.
func rootState(t *testing.T) string {
	t.Helper()
	var sb strings.Builder
	for _, args := range [][]string{{"-o", "link"}, {"-o", "addr"}, {"route"}, {"-6", "route"}} {
		out, err := ipOutput("", args...)
		if err != nil {
			t.Fatal(err)
		}
		sb.Write(out)
	}
	sb.WriteString("ip_forward=" + readFile(t, "/proc/sys/net/ipv4/ip_forward") + "\n")
	return sb.String()
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	err := poll(5*time.Second, func() (bool, error) { return cond(), nil })
	if err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// waitNoLeaks waits until no goroutine of a lab server, HTTP connection
// or Do is left.
func waitNoLeaks(t *testing.T) {
	t.Helper()
	markers := []string{"internal/lab.(*Server)", "internal/lab.(*NS).Do", "net/http.(*conn).serve", "net/http.(*persistConn)"}
	var leaked []string
	err := poll(5*time.Second, func() (bool, error) {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		leaked = nil
		for g := range strings.SplitSeq(string(buf), "\n\n") {
			if slices.ContainsFunc(markers, func(m string) bool { return strings.Contains(g, m) }) {
				leaked = append(leaked, g)
			}
		}
		return len(leaked) == 0, nil
	})
	if err != nil {
		t.Errorf("leaked goroutines:\n%s", strings.Join(leaked, "\n\n"))
	}
}
