package lab

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/vishvananda/netns"
)

// NS is a named network namespace (as listed by `ip netns list`).
type NS struct {
	Name string
}

// netnsDir is where iproute2 bind-mounts named namespaces.
const netnsDir = "/var/run/netns"

// Path is the namespace's bind mount, /var/run/netns/NAME; open it for
// setns(2) or pass it to tools that take a namespace path.
func (n *NS) Path() string { return netnsDir + "/" + n.Name }

// String returns the namespace name.
func (n *NS) String() string { return n.Name }

// Command returns `ip netns exec NAME name args...`: the command runs in the
// namespace (and, as ip netns exec does, with /sys remounted for it).
// Canceling ctx kills it; ip netns exec execs the command, so the process
// killed is the command itself.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Run runs a command in the namespace and returns its combined output. The
// error names the command and includes the output.
func (n *NS) Run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := n.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ip netns exec %s %s: %w: %s",
			n.Name, strings.Join(append([]string{name}, args...), " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Do runs f on an OS thread that has been switched into the namespace and
// returns f's error unchanged. Sockets f creates belong to the namespace
// for their whole life, so they can be used from any goroutine afterwards.
//
// Only the thread f starts on is in the namespace: f must create its
// sockets itself, not in goroutines it starts (Go starts new threads from
// a clean template thread, so they are in the root namespace), and must
// not resolve host names in ways that use other threads. f runs on a fresh
// goroutine locked to its thread; the thread is switched back afterwards,
// or, if that fails, destroyed rather than reused. A panic in f is
// re-raised in the caller.
func (n *NS) Do(f func() error) error {
	type result struct {
		err      error
		panicked bool
		panicVal any
		stack    []byte
	}
	done := make(chan result, 1)
	go func() {
		// No deferred UnlockOSThread: a goroutine that exits while locked
		// takes its thread down with it, which is what we want whenever
		// the thread could not be switched back.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- result{err: fmt.Errorf("lab: get current netns: %w", err)}
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(n.Path())
		if err != nil {
			done <- result{err: fmt.Errorf("lab: open netns %s: %w", n.Name, err)}
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			done <- result{err: fmt.Errorf("lab: enter netns %s: %w", n.Name, err)}
			return
		}
		var r result
		func() {
			defer func() {
				if p := recover(); p != nil {
					r = result{panicked: true, panicVal: p, stack: debug.Stack()}
				}
			}()
			r.err = f()
		}()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		done <- r
	}()
	r := <-done
	if r.panicked {
		panic(fmt.Sprintf("%v [in lab.NS.Do(%s)]\n%s", r.panicVal, n.Name, r.stack))
	}
	return r.err
}

// Dial connects from inside the namespace, like net.Dialer.DialContext
// (plain TCP, no MPTCP). Use IP literals in addr. Errors are the dialer's,
// unwrapped, so errors.Is(err, syscall.ECONNREFUSED) works.
func (n *NS) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() error {
		var d net.Dialer
		d.SetMultipathTCP(false)
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Listen listens inside the namespace, like net.Listen (plain TCP, no
// MPTCP). The listener can be used from any goroutine.
func (n *NS) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := n.Do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		var err error
		ln, err = lc.Listen(context.Background(), network, addr)
		return err
	})
	return ln, err
}

// ListenPacket is net.ListenPacket inside the namespace.
func (n *NS) ListenPacket(network, addr string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := n.Do(func() error {
		var err error
		pc, err = net.ListenPacket(network, addr)
		return err
	})
	return pc, err
}
