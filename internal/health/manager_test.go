package health

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nftlb/nftlb/internal/vip"
)

// fakeProber answers per target from a settable outcome; hang makes it
// block until its context ends. It records concurrent probes per target.
type fakeProber struct {
	mu       sync.Mutex
	outcome  map[netip.AddrPort]Outcome
	hang     map[netip.AddrPort]bool
	inFlight map[netip.AddrPort]int
	count    map[netip.AddrPort]int
	overlap  atomic.Bool
	probes   atomic.Int64
}

func newFake() *fakeProber {
	return &fakeProber{outcome: map[netip.AddrPort]Outcome{}, hang: map[netip.AddrPort]bool{}, inFlight: map[netip.AddrPort]int{}, count: map[netip.AddrPort]int{}}
}

func (f *fakeProber) set(a netip.AddrPort, o Outcome, hang bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.outcome[a], f.hang[a] = o, hang
}

func (f *fakeProber) Probe(ctx context.Context, a netip.AddrPort) Result {
	f.probes.Add(1)
	f.mu.Lock()
	f.inFlight[a]++
	f.count[a]++
	if f.inFlight[a] > 1 {
		f.overlap.Store(true)
	}
	o, hang := f.outcome[a], f.hang[a]
	f.mu.Unlock()
	defer func() { f.mu.Lock(); f.inFlight[a]--; f.mu.Unlock() }()
	start := time.Now()
	if hang {
		<-ctx.Done()
		return done(start, Unreachable, ctx.Err())
	}
	if o == OK {
		return done(start, OK, nil)
	}
	return done(start, o, errors.New(o.String()))
}

func check(interval time.Duration) vip.Health {
	return vip.Health{Type: vip.CheckTCP, Interval: interval, Timeout: interval / 2, Rise: 2, Fall: 2}
}

func target(n int, h vip.Health) Target {
	a := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 1, byte(10 + n)}), 80)
	return Target{ID: "p/" + a.String(), Pool: "p", Addr: a, Check: h}
}

func newTestManager(t *testing.T, f *fakeProber) *Manager {
	m := NewManager()
	m.newProber = func(vip.Health) (Prober, error) { return f, nil }
	t.Cleanup(m.Stop)
	return m
}

// events collects a Manager's events so tests can wait for one without
// losing the others.
type events struct {
	mu   sync.Mutex
	list []Event
	seen int // events already matched
}

func collect(t *testing.T, m *Manager) *events {
	e := &events{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case ev := <-m.Events():
				e.mu.Lock()
				e.list = append(e.list, ev)
				e.mu.Unlock()
			case <-m.ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() { m.Stop(); <-done })
	return e
}

// wait returns the first not yet matched event of id to state to.
func (e *events) wait(t *testing.T, id string, to State) Event {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		e.mu.Lock()
		for i := e.seen; i < len(e.list); i++ {
			if ev := e.list[i]; ev.Target.ID == id && ev.To == to {
				e.list = append(e.list[:i], e.list[i+1:]...)
				e.mu.Unlock()
				return ev
			}
		}
		e.mu.Unlock()
		time.Sleep(5 * time.Millisecond) // polling the collected list
	}
	t.Fatalf("no transition of %s to %s within 5s", id, to)
	return Event{}
}

func TestManagerFirstRoundAndTransitions(t *testing.T) {
	f := newFake()
	m := newTestManager(t, f)
	ev := collect(t, m)
	h := check(40 * time.Millisecond)
	a, b := target(1, h), target(2, h)
	f.set(a.Addr, OK, false)
	f.set(b.Addr, Unreachable, false)
	if err := m.Update([]Target{a, b}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m.WaitFirst(ctx)
	if m.State(a.ID) != Up || m.State(b.ID) != Down {
		t.Fatalf("after the first round: a=%s b=%s, want up down", m.State(a.ID), m.State(b.ID))
	}
	ev.wait(t, a.ID, Up)
	ev.wait(t, b.ID, Down)
	f.set(a.Addr, NotReady, false)
	e := ev.wait(t, a.ID, Unready)
	if e.From != Up || e.Result.Outcome != NotReady {
		t.Errorf("event %+v", e)
	}
	f.set(b.Addr, OK, false)
	ev.wait(t, b.ID, Up)
	if f.overlap.Load() {
		t.Error("two probes of one backend overlapped")
	}
}

// A hung backend costs one timeout per probe and delays nobody else.
func TestManagerHungBackendIsBounded(t *testing.T) {
	f := newFake()
	m := newTestManager(t, f)
	collect(t, m)
	h := check(60 * time.Millisecond)
	hung, fine := target(1, h), target(2, h)
	f.set(hung.Addr, OK, true)
	f.set(fine.Addr, OK, false)
	start := time.Now()
	if err := m.Update([]Target{hung, fine}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m.WaitFirst(ctx)
	if m.State(hung.ID) != Down || m.State(fine.ID) != Up {
		t.Fatalf("hung=%s fine=%s", m.State(hung.ID), m.State(fine.ID))
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("first round took %v with a hung backend (timeout %v)", el, h.Timeout)
	}
	for _, s := range m.Statuses() {
		if s.ID == hung.ID && (s.Last.Err == nil || s.Last.Latency > time.Second) {
			t.Errorf("hung probe result: %+v", s.Last)
		}
	}
}

// A reload keeps the state and history of backends that stay, even when
// their check settings change, and stops probing removed ones.
func TestManagerUpdateKeepsState(t *testing.T) {
	f := newFake()
	m := newTestManager(t, f)
	ev := collect(t, m)
	h := check(30 * time.Millisecond)
	a, b := target(1, h), target(2, h)
	f.set(a.Addr, OK, false)
	f.set(b.Addr, OK, false)
	if err := m.Update([]Target{a, b}); err != nil {
		t.Fatal(err)
	}
	ev.wait(t, a.ID, Up)
	before := m.Statuses()[0]
	a2 := a
	a2.Check.Interval, a2.Check.Timeout = 20*time.Millisecond, 10*time.Millisecond
	if err := m.Update([]Target{a2}); err != nil {
		t.Fatal(err)
	}
	if st := m.Statuses(); len(st) != 1 || st[0].State != Up || st[0].Transitions != before.Transitions || !st[0].Since.Equal(before.Since) {
		t.Fatalf("after reload: %+v, before %+v", st, before)
	}
	// The removed backend is no longer probed while the kept one is.
	counts := func() (int, int) { f.mu.Lock(); defer f.mu.Unlock(); return f.count[a.Addr], f.count[b.Addr] }
	a0, b0 := counts()
	deadline := time.Now().Add(5 * time.Second)
	for {
		an, bn := counts()
		if bn > b0+1 { // one probe may have been in flight during Update
			t.Fatalf("removed backend probed %d more times", bn-b0)
		}
		if an >= a0+5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("kept backend not probed")
		}
		time.Sleep(5 * time.Millisecond) // polling the counters
	}
	if f.overlap.Load() {
		t.Error("probes overlapped across the reload")
	}
	if m.State(b.ID) != Unknown {
		t.Errorf("removed backend state %s", m.State(b.ID))
	}
}

func TestManagerUpdateErrorChangesNothing(t *testing.T) {
	f := newFake()
	m := newTestManager(t, f)
	collect(t, m)
	h := check(30 * time.Millisecond)
	a := target(1, h)
	f.set(a.Addr, OK, false)
	if err := m.Update([]Target{a}); err != nil {
		t.Fatal(err)
	}
	m.newProber = func(vip.Health) (Prober, error) { return nil, errors.New("bad ca_file") }
	b := target(2, vip.Health{Type: vip.CheckHTTPS, Interval: time.Second, Timeout: time.Millisecond})
	if err := m.Update([]Target{b}); err == nil {
		t.Fatal("Update with a failing prober succeeded")
	}
	if st := m.Statuses(); len(st) != 1 || st[0].ID != a.ID {
		t.Errorf("a failed Update changed the targets: %+v", st)
	}
}

// A reload re-reads TLS files: same path with new content (a rotated CA
// or client certificate) gets a new prober; the state is kept.
func TestManagerUpdateRereadsRotatedFiles(t *testing.T) {
	var mu sync.Mutex
	var built []*fakeProber
	m := NewManager()
	m.newProber = func(vip.Health) (Prober, error) {
		mu.Lock()
		defer mu.Unlock()
		f := newFake()
		built = append(built, f)
		return f, nil
	}
	t.Cleanup(m.Stop)
	ev := collect(t, m)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, []byte("old CA"), 0o600); err != nil {
		t.Fatal(err)
	}
	h := check(30 * time.Millisecond)
	h.Type, h.CAFile = vip.CheckHTTPS, ca
	a := target(1, h)
	if err := m.Update([]Target{a}); err != nil {
		t.Fatal(err)
	}
	ev.wait(t, a.ID, Up)
	probesOf := func(i int) int64 { mu.Lock(); defer mu.Unlock(); return built[i].probes.Load() }
	nbuilt := func() int { mu.Lock(); defer mu.Unlock(); return len(built) }

	// Same content: the running prober (the first) stays in use.
	if err := m.Update([]Target{a}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ca, []byte("rotated CA"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := m.Update([]Target{a}); err != nil {
		t.Fatal(err)
	}
	latest := nbuilt() - 1
	deadline := time.Now().Add(5 * time.Second)
	for probesOf(latest) < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the prober built from the rotated file is not used")
		}
		time.Sleep(5 * time.Millisecond) // polling the counter
	}
	if probesOf(1) != 0 {
		t.Errorf("the prober of an unchanged reload was used (%d probes): the loop was replaced needlessly", probesOf(1))
	}
	if st := m.Statuses()[0]; st.State != Up || st.Transitions != 1 {
		t.Errorf("state lost across the rotation: %+v", st)
	}
}

// settingsFakes gives every distinct probe settings a fake of its own, so
// a test can count the probes of each unit.
type settingsFakes struct {
	mu     sync.Mutex
	byKind map[vip.Health]*fakeProber
	setup  func(f *fakeProber)
}

func (s *settingsFakes) newProber(h vip.Health) (Prober, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f := s.byKind[h]; f != nil {
		return f, nil
	}
	f := newFake()
	if s.setup != nil {
		s.setup(f)
	}
	s.byKind[h] = f
	return f, nil
}

func (s *settingsFakes) of(h vip.Health) *fakeProber {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.byKind[probeSettings(h)]
}

// observations counts observer calls per target ID.
type observations struct {
	mu sync.Mutex
	n  map[string]int
}

func observe(m *Manager) *observations {
	o := &observations{n: map[string]int{}}
	m.SetObserver(func(t Target, _ Result) { o.mu.Lock(); o.n[t.ID]++; o.mu.Unlock() })
	return o
}

func (o *observations) count(id string) int { o.mu.Lock(); defer o.mu.Unlock(); return o.n[id] }

func inPool(pool string, n int, h vip.Health) Target {
	t := target(n, h)
	t.Pool, t.ID = pool, vip.BackendID(pool, t.Addr)
	return t
}

// One backend listed with the same check in three pools is probed once
// per interval; each pool's target gets every result, applies its own
// rise/fall and has its own events. A pool with other settings has a
// probe of its own.
func TestManagerSharesIdenticalProbes(t *testing.T) {
	fakes := &settingsFakes{byKind: map[vip.Health]*fakeProber{}}
	m := NewManager()
	m.newProber = fakes.newProber
	t.Cleanup(m.Stop)
	obs := observe(m)
	ev := collect(t, m)
	h := check(20 * time.Millisecond)
	quick, slow := h, h
	quick.Fall = 1
	slow.Fall = 3
	a, b, c := inPool("a", 1, quick), inPool("b", 1, slow), inPool("c", 1, h)
	other := h
	other.Interval = 30 * time.Millisecond
	d := inPool("d", 1, other)
	if err := m.Update([]Target{a, b, c, d}); err != nil {
		t.Fatal(err)
	}
	for _, x := range []Target{a, b, c, d} {
		if e := ev.wait(t, x.ID, Up); e.Target.Pool != x.Pool || e.From != Unknown {
			t.Errorf("first event of %s: %+v", x.ID, e)
		}
	}
	shared, own := fakes.of(h), fakes.of(other)
	if shared == nil || own == nil || shared == own {
		t.Fatalf("probers: shared %p, own %p", shared, own)
	}
	shared.set(a.Addr, Unreachable, false)
	// fall 1: down on the first failure; fall 3: on the third, later.
	downA := ev.wait(t, a.ID, Down)
	downB := ev.wait(t, b.ID, Down)
	if downA.From != Up || downB.From != Up || !downB.Result.At.After(downA.Result.At) {
		t.Errorf("fall per pool: a %+v, b %+v", downA, downB)
	}
	ev.wait(t, c.ID, Down)
	m.Stop()
	probes := int(shared.probes.Load())
	for _, x := range []Target{a, b, c} {
		// Each probe is observed once per target; a probe stopped in
		// flight is not.
		if n := obs.count(x.ID); n < probes-1 || n > probes {
			t.Errorf("%s observed %d results of %d probes", x.ID, n, probes)
		}
	}
	if shared.overlap.Load() {
		t.Error("probes of the shared unit overlapped")
	}
	if n := obs.count(d.ID); n < 1 || int64(n) > own.probes.Load() {
		t.Errorf("%s observed %d results of its own %d probes", d.ID, n, own.probes.Load())
	}
	st := map[string]Status{}
	for _, s := range m.Statuses() {
		st[s.ID] = s
	}
	if st[d.ID].State != Up || st[a.ID].State != Down || st[a.ID].Transitions != 2 {
		t.Errorf("statuses: %+v", st)
	}
}

// A target added to a backend that another pool already probes gets its
// first result at once, not up to an interval later.
func TestManagerNewTargetOfSharedProbeIsProbedAtOnce(t *testing.T) {
	f := newFake()
	m := newTestManager(t, f)
	collect(t, m)
	h := check(time.Hour) // after its first probe, the unit waits a random part of an hour
	a := inPool("a", 1, h)
	f.set(a.Addr, OK, false)
	if err := m.Update([]Target{a}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m.WaitFirst(ctx)
	b := inPool("b", 1, h)
	if err := m.Update([]Target{a, b}); err != nil {
		t.Fatal(err)
	}
	m.WaitFirst(ctx)
	if ctx.Err() != nil || m.State(b.ID) != Up {
		t.Fatalf("new target of a shared probe: %s after WaitFirst (%v)", m.State(b.ID), ctx.Err())
	}
}

// Type none targets are up from the moment they are configured, with no
// goroutine or timer each: ten thousand of them once cost 118 MiB of
// stacks and 18% of a core. A probed target that becomes none goes up
// (from down: an event), and keeps its history.
func TestManagerNoneTargetsCostNothing(t *testing.T) {
	f := newFake()
	m := newTestManager(t, f)
	m.workerIdle = 10 * time.Millisecond
	ev := collect(t, m)
	base := runtime.NumGoroutine()
	h := check(20 * time.Millisecond)
	probed := inPool("p", 1, h)
	f.set(probed.Addr, Unreachable, false)
	if err := m.Update([]Target{probed}); err != nil {
		t.Fatal(err)
	}
	ev.wait(t, probed.ID, Down)
	if err := m.Update(nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the removed target's worker to leave", func() bool { return runtime.NumGoroutine() <= base })
	probes := f.probes.Load()

	none := vip.Health{Type: vip.CheckNone, Interval: time.Second, Timeout: time.Second, Rise: 2, Fall: 2}
	var targets []Target
	for i := range 10000 {
		a := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), 80)
		targets = append(targets, Target{ID: vip.BackendID("n", a), Pool: "n", Addr: a, Check: none})
	}
	if err := m.Update(targets); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	m.WaitFirst(ctx)
	if ctx.Err() != nil {
		t.Fatal("WaitFirst waited for type none targets")
	}
	for _, s := range m.Statuses() {
		if s.State != Up || s.Transitions != 1 || s.Last.Outcome != OK {
			t.Fatalf("type none target: %+v", s)
		}
	}
	waitFor(t, 10*time.Second, "every none target's event", func() bool {
		ev.mu.Lock()
		defer ev.mu.Unlock()
		return len(ev.list) >= len(targets)
	})
	waitFor(t, 10*time.Second, "the event sender to leave", func() bool { return runtime.NumGoroutine() <= base })
	if n := f.probes.Load() - probes; n != 0 {
		t.Errorf("%d probes of type none targets", n)
	}

	// A probed target that is down becomes none: up at once.
	if err := m.Update([]Target{probed}); err != nil {
		t.Fatal(err)
	}
	ev.wait(t, probed.ID, Down)
	probed.Check = none
	if err := m.Update([]Target{probed}); err != nil {
		t.Fatal(err)
	}
	if e := ev.wait(t, probed.ID, Up); e.From != Down {
		t.Errorf("down to none: %+v", e)
	}
	if st := m.Statuses(); len(st) != 1 || st[0].State != Up || st[0].Transitions != 2 {
		t.Errorf("after becoming none: %+v", st)
	}
}

// Between probes a Manager has no goroutine per target: a thousand idle
// targets cost heap entries, and the workers leave when idle.
func TestManagerIdleTargetsHaveNoGoroutines(t *testing.T) {
	f := newFake()
	m := newTestManager(t, f)
	m.workerIdle = 10 * time.Millisecond
	ev := collect(t, m)
	base := runtime.NumGoroutine()
	h := check(time.Hour) // after the first probe: idle for a random part of an hour
	var targets []Target
	for i := range 1000 {
		a := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), 80)
		targets = append(targets, Target{ID: vip.BackendID("p", a), Pool: "p", Addr: a, Check: h})
	}
	if err := m.Update(targets); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m.WaitFirst(ctx)
	waitFor(t, 10*time.Second, "every target's event", func() bool {
		ev.mu.Lock()
		defer ev.mu.Unlock()
		return len(ev.list) >= len(targets)
	})
	waitFor(t, 10*time.Second, "idle workers to leave", func() bool { return runtime.NumGoroutine() <= base })
	for _, s := range m.Statuses() {
		if s.State != Up {
			t.Fatalf("%+v", s)
		}
	}
}

// At most maxProbes probes are in flight; the others wait their turn and
// every target still gets its results.
func TestManagerBoundsProbesInFlight(t *testing.T) {
	var inFlight, peak atomic.Int64
	hung := proberFunc(func(ctx context.Context, _ netip.AddrPort) Result {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		<-ctx.Done()
		return done(time.Now(), Unreachable, ctx.Err())
	})
	m := NewManager()
	m.maxProbes = 3
	m.newProber = func(vip.Health) (Prober, error) { return hung, nil }
	t.Cleanup(m.Stop)
	ev := collect(t, m)
	h := check(40 * time.Millisecond) // timeout 20ms
	var targets []Target
	for i := range 10 {
		targets = append(targets, target(i, h))
	}
	if err := m.Update(targets); err != nil {
		t.Fatal(err)
	}
	for _, x := range targets {
		if e := ev.wait(t, x.ID, Down); !strings.Contains(errText(e.Result.Err), "no answer within 20ms") {
			t.Errorf("%s: %+v", x.ID, e.Result)
		}
	}
	if p := peak.Load(); p > 3 {
		t.Errorf("%d probes in flight, bound 3", p)
	}
}
