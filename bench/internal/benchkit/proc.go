package benchkit

import (
	"context"
	"fmt"
	"os/exec"
	"syscall"
	"time"

	"github.com/nftlb/nftlb/internal/lab"
)

// Proc is a long-running process in a lab namespace (nftlb, HAProxy, a
// backend) whose output goes to a Log. `ip netns exec` (and taskset) exec
// their command, so the process started is the program itself: its pid is
// the one to read from /proc and to signal.
type Proc struct {
	Name string // for messages: "nftlb", "haproxy", "backend b1"
	Log  *Log

	cmd    *exec.Cmd
	exited chan struct{}
	err    error // cmd.Wait's; set before exited is closed
}

// Spec is what Start runs and how it reads the output.
type Spec struct {
	Name   string       // for messages
	Args   []string     // the program and its arguments
	Parse  func(*Entry) // see NewLog; nil: ParseJSON (nftlb -log-format json)
	OnLine func(Entry)  // see NewLog; optional
}

// Start starts s.Args in ns. The process is not bound to a context: Stop
// ends it (SIGTERM, then SIGKILL), also after Ctrl-C, so that nftlb exits
// through its own shutdown path.
func Start(ns *lab.NS, s Spec) (*Proc, error) {
	if len(s.Args) == 0 {
		return nil, fmt.Errorf("start %s: no command", s.Name)
	}
	return start(ns.Command(context.Background(), s.Args[0], s.Args[1:]...), s)
}

// StartNftlb starts `bin run -config cfgPath -log-format json` in ns; the
// caller waits for the lines it needs (usually Match("ruleset applied")).
func StartNftlb(ns *lab.NS, bin, cfgPath string, onLine func(Entry)) (*Proc, error) {
	return Start(ns, Spec{Name: "nftlb", Args: []string{bin, "run", "-config", cfgPath, "-log-format", "json"}, OnLine: onLine})
}

func start(cmd *exec.Cmd, s Spec) (*Proc, error) {
	p := &Proc{Name: s.Name, Log: NewLog(s.Parse, s.OnLine), cmd: cmd, exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.Log, p.Log
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", s.Name, err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	return p, nil
}

// Pid is the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Exited is closed when the process has exited and its output is read.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// Alive reports whether the process has not exited yet.
func (p *Proc) Alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// Err is how the process ended (exec.Cmd.Wait's error); nil while it runs.
func (p *Proc) Err() error {
	if p.Alive() {
		return nil
	}
	return p.err
}

// Stop sends SIGTERM and waits; SIGKILL after 10 s. It returns at once if
// the process has exited already.
func (p *Proc) Stop() {
	if !p.Alive() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// WaitFor returns the first line at index >= from that satisfies pred, and
// its index. It fails when ctx ends, when the process exits without such a
// line, or after within; the error ends with the tail of the output.
func (p *Proc) WaitFor(ctx context.Context, from int, within time.Duration, pred func(Entry) bool) (Entry, int, error) {
	timer := time.NewTimer(within)
	defer timer.Stop()
	for {
		e, at, ok, changed := p.Log.find(&from, pred)
		if ok {
			return e, at, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return Entry{}, 0, ctx.Err()
		case <-p.exited:
			// Wait has read all output, but the last lines may have
			// arrived after the look above.
			if e, at, ok, _ := p.Log.find(&from, pred); ok {
				return e, at, nil
			}
			return Entry{}, 0, fmt.Errorf("%s exited (%v); the end of its output:\n%s", p.Name, p.err, Tail(p.Log.String(), 30))
		case <-timer.C:
			return Entry{}, 0, fmt.Errorf("the expected line did not appear in %s's output within %v; the end of it:\n%s", p.Name, within, Tail(p.Log.String(), 30))
		}
	}
}

// WaitTargetsUp waits until nftlb has logged `backend state changed ...
// to=up` for targets distinct pool/backend pairs at index >= from: every
// probe target's first result (unknown -> up) when from is 0.
func (p *Proc) WaitTargetsUp(ctx context.Context, from, targets int, within time.Duration) error {
	up := map[string]bool{}
	_, _, err := p.WaitFor(ctx, from, within, func(e Entry) bool {
		if e.Msg == "backend state changed" && e.Str("to") == "up" {
			up[e.Str("pool")+"/"+e.Str("backend")] = true
		}
		return len(up) >= targets
	})
	if err != nil && ctx.Err() == nil {
		return fmt.Errorf("%d of %d targets up: %w", len(up), targets, err)
	}
	return err
}
