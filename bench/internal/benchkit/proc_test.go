package benchkit

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// sh starts a shell script the way Start starts a program (no namespace).
func sh(t *testing.T, script string) *Proc {
	t.Helper()
	p, err := start(exec.Command("sh", "-c", script), Spec{Name: "sh"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return p
}

func TestWaitFor(t *testing.T) {
	p := sh(t, `echo '{"msg":"starting"}'; echo '{"msg":"ruleset applied","n":1}'; sleep 0.2; echo '{"msg":"ruleset applied","n":2}'; exec sleep 30`)
	ctx := context.Background()
	e, at, err := p.WaitFor(ctx, 0, 5*time.Second, Match("ruleset applied"))
	if err != nil || at != 1 || e.Str("n") != "1" {
		t.Fatalf("first: %+v at %d, %v", e, at, err)
	}
	e, at, err = p.WaitFor(ctx, at+1, 5*time.Second, Match("ruleset applied"))
	if err != nil || at != 2 || e.Str("n") != "2" {
		t.Fatalf("second (after a wait): %+v at %d, %v", e, at, err)
	}
	if !p.Alive() || p.Err() != nil {
		t.Errorf("Alive %v, Err %v while running", p.Alive(), p.Err())
	}

	_, _, err = p.WaitFor(ctx, 0, 100*time.Millisecond, Match("never"))
	if err == nil || !strings.Contains(err.Error(), "did not appear in sh's output within 100ms") || !strings.Contains(err.Error(), `"n":2`) {
		t.Errorf("timeout error = %v", err)
	}

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, _, err := p.WaitFor(cctx, 0, time.Minute, Match("never")); !errors.Is(err, context.Canceled) {
		t.Errorf("canceled: %v", err)
	}

	p.Stop() // SIGTERM ends the sleep the shell exec'd
	if p.Alive() || p.Err() == nil {
		t.Errorf("after Stop: Alive %v, Err %v", p.Alive(), p.Err())
	}
	select {
	case <-p.Exited():
	default:
		t.Error("Exited not closed after Stop")
	}
}

func TestWaitForExit(t *testing.T) {
	// The line comes just before the exit: it must be found, not reported
	// as an exit without it.
	p := sh(t, `echo '{"msg":"a"}'; echo '{"msg":"last"}'; exit 3`)
	<-p.Exited()
	if e, at, err := p.WaitFor(context.Background(), 0, time.Minute, Match("last")); err != nil || at != 1 || e.Msg != "last" {
		t.Errorf("line before exit: %+v at %d, %v", e, at, err)
	}
	_, _, err := p.WaitFor(context.Background(), 0, time.Minute, Match("never"))
	if err == nil || !strings.Contains(err.Error(), "sh exited (exit status 3)") || !strings.Contains(err.Error(), `{"msg":"last"}`) {
		t.Errorf("exit error = %v", err)
	}
}

func TestWaitTargetsUp(t *testing.T) {
	p := sh(t, `for b in b1 b2 b1 b3; do echo "{\"msg\":\"backend state changed\",\"pool\":\"p0\",\"backend\":\"$b\",\"to\":\"up\"}"; done
echo '{"msg":"backend state changed","pool":"p1","backend":"b1","to":"down"}'; exec sleep 30`)
	if err := p.WaitTargetsUp(context.Background(), 0, 3, 5*time.Second); err != nil {
		t.Errorf("3 targets: %v", err)
	}
	err := p.WaitTargetsUp(context.Background(), 0, 4, 200*time.Millisecond)
	if err == nil || !strings.HasPrefix(err.Error(), "3 of 4 targets up: ") {
		t.Errorf("4 targets: %v", err)
	}
}

func TestParseStatCPU(t *testing.T) {
	// The command name may hold spaces and ')'.
	stat := "1234 (we(ird) name)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 9 0 12345 0 0"
	u, s, err := parseStatCPU(stat)
	if err != nil || u != 2500*time.Millisecond || s != 370*time.Millisecond {
		t.Errorf("parseStatCPU = %v, %v, %v", u, s, err)
	}
	for _, bad := range []string{"", "1234 (x) S 1 2 3", "1234 (x) S 1 2 3 4 5 6 7 8 9 10 x 37"} {
		if _, _, err := parseStatCPU(bad); err == nil {
			t.Errorf("parseStatCPU(%q) did not fail", bad)
		}
	}
}

func TestProcSelf(t *testing.T) {
	if _, _, err := ProcCPU(os.Getpid()); err != nil {
		t.Errorf("ProcCPU(self): %v", err)
	}
	if kb := ProcKB(os.Getpid(), "VmRSS"); kb <= 0 {
		t.Errorf("ProcKB(self, VmRSS) = %d", kb)
	}
	if v := ProcStatus(os.Getpid(), "NoSuchField"); v != "?" {
		t.Errorf("missing field = %q", v)
	}
	if kb := ProcKB(os.Getpid(), "NoSuchField"); kb != -1 {
		t.Errorf("missing kB field = %d", kb)
	}
	if err := CheckComm(os.Getpid(), "surely-not-this"); err == nil {
		t.Error("CheckComm accepted a wrong name")
	}
}

func TestStatusField(t *testing.T) {
	status := "Name:\tnftlb\nVmHWM:\t   61440 kB\nVmRSS:\t   51200 kB\nThreads:\t9\n"
	if v := statusField(status, "VmRSS"); v != "51200 kB" {
		t.Errorf("VmRSS = %q", v)
	}
	if v := statusField(status, "Threads"); v != "9" {
		t.Errorf("Threads = %q", v)
	}
	if v := statusField(status, "Vm"); v != "?" {
		t.Errorf("prefix of a key matched: %q", v)
	}
}

func TestSampleCPU(t *testing.T) {
	var n int
	total, err := SampleCPU(context.Background(), os.Getpid(), 250*time.Millisecond, 100*time.Millisecond, func(s CPUSample) {
		n++
		if s.Span <= 0 || s.At < s.Span {
			t.Errorf("sample %d: %+v", n, s)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 { // 100, 200, then cut to 250 ms
		t.Errorf("%d samples, want 3", n)
	}
	if total.At < 250*time.Millisecond || total.At != total.Span {
		t.Errorf("total = %+v", total)
	}
}

func TestAddrAdd(t *testing.T) {
	for _, c := range []struct {
		base string
		n    int
		want string
	}{
		{"198.18.128.0", 1, "198.18.128.1"},
		{"198.18.128.0", 256, "198.18.129.0"},
		{"198.18.100.0", 1000, "198.18.103.232"},
		{"198.18.128.0", 32767, "198.18.255.255"},
	} {
		if got := AddrAdd(netip.MustParseAddr(c.base), c.n); got.String() != c.want {
			t.Errorf("AddrAdd(%s, %d) = %s, want %s", c.base, c.n, got, c.want)
		}
	}
}

func TestJoinInts(t *testing.T) {
	if got := JoinInts([]int{1, 1000, 10000}); got != "1,1000,10000" {
		t.Errorf("JoinInts = %q", got)
	}
	if got := JoinInts(nil); got != "" {
		t.Errorf("JoinInts(nil) = %q", got)
	}
}
