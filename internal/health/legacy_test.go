package health

// The health manager and tcp prober as they were before the shared
// scheduler (commit abeab97), verbatim but for names, so that load_test.go
// can measure before and after in one run.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nftlb/nftlb/internal/vip"
)

func legacyProbeAddr(t Target) netip.AddrPort {
	if t.Check.Port != 0 {
		return netip.AddrPortFrom(t.Addr.Addr(), t.Check.Port)
	}
	return t.Addr
}

// legacyNewProber is NewProber with the old tcp prober.
func legacyNewProber(h vip.Health) (Prober, error) {
	if h.Type == vip.CheckTCP {
		return legacyTCPProber{}, nil
	}
	return NewProber(h)
}

var legacyDialer = func() *net.Dialer {
	d := &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptLinger(int(fd), syscall.SOL_SOCKET, syscall.SO_LINGER, &syscall.Linger{Onoff: 1, Linger: 0})
		})
		return errors.Join(err, serr)
	}}
	d.SetMultipathTCP(false)
	return d
}()

type legacyTCPProber struct{}

func (legacyTCPProber) Probe(ctx context.Context, target netip.AddrPort) Result {
	start := time.Now()
	c, err := legacyDialer.DialContext(ctx, "tcp4", target.String())
	if err != nil {
		return done(start, Unreachable, err)
	}
	_ = c.Close()
	return done(start, OK, nil)
}

// legacyManager is Manager as it was before the shared scheduler: one
// goroutine and timer per target, one probe per target. Kept for the
// before/after load comparison (load_test.go) only.
//
// It ran one probe loop per target. Probes of a target never
// overlap (its loop runs them one after another), each is bounded by the
// check's timeout, and loops start at random offsets within the interval
// so that a thousand backends are not probed in lockstep.
type legacyManager struct {
	events chan Event
	ctx    context.Context
	stop   context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	checks map[string]*legacyChecker

	// newProber is NewProber; tests replace it.
	newProber func(vip.Health) (Prober, error)
	// observe, if set, sees every probe result (for metrics).
	observe func(Target, Result)
}

// SetObserver makes f see every probe result, from the probe loops'
// goroutines. Call it before the first Update.
func (m *legacyManager) SetObserver(f func(Target, Result)) { m.observe = f }

type legacyChecker struct {
	target  Target
	files   string   // fingerprint of the TLS files its prober was built from
	tracker *Tracker // guarded by Manager.mu
	cancel  context.CancelFunc
	first   chan struct{} // closed once the first result is in
	done    chan struct{} // closed when the loop has exited
}

// NewManager returns a Manager with no targets.
func newLegacyManager() *legacyManager {
	ctx, cancel := context.WithCancel(context.Background())
	return &legacyManager{
		events:    make(chan Event, 1024),
		ctx:       ctx,
		stop:      cancel,
		checks:    map[string]*legacyChecker{},
		newProber: legacyNewProber,
	}
}

// Events delivers state changes. The consumer must keep reading: a full
// channel holds back the probe loops (changes are never dropped).
func (m *legacyManager) Events() <-chan Event { return m.events }

// Update makes targets the set being checked. It builds every prober
// first, so an error (an unreadable ca_file, say) changes nothing. A
// target that was already checked keeps its state and history, even if
// its check settings changed; checks of removed targets stop.
func (m *legacyManager) Update(targets []Target) error {
	probers, files, err := m.build(targets)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	want := map[string]bool{}
	for _, t := range targets {
		want[t.ID] = true
	}
	for id, c := range m.checks {
		if !want[id] {
			c.cancel()
			delete(m.checks, id)
		}
	}
	for _, t := range targets {
		old := m.checks[t.ID]
		// Same settings and same certificate files: keep the loop. A
		// rotated CA or client certificate (same path, new content) gets a
		// new prober, as a reload promises.
		if old != nil && old.target == t && old.files == files[t.Check] {
			continue
		}
		c := &legacyChecker{target: t, files: files[t.Check], first: make(chan struct{}), done: make(chan struct{})}
		delay := time.Duration(0) // new: probe now, nftlb is waiting for it
		if old != nil {
			old.cancel()
			c.tracker, c.first = old.tracker, old.first
			c.tracker.SetRiseFall(t.Check.Rise, t.Check.Fall)
			delay = legacyJitter(t.Check.Interval)
		} else {
			c.tracker = NewTracker(t.Check.Rise, t.Check.Fall)
		}
		ctx, cancel := context.WithCancel(m.ctx)
		c.cancel = cancel
		m.checks[t.ID] = c
		m.wg.Add(1)
		go m.loop(ctx, c, probers[t.Check], old, delay)
	}
	return nil
}

// Validate builds the probers targets need (reading TLS files) without
// changing anything, so a reload can be rejected before it starts.
func (m *legacyManager) Validate(targets []Target) error {
	_, _, err := m.build(targets)
	return err
}

// build makes one prober per distinct check config (so HTTP clients are
// shared) and fingerprints the files each one read.
func (m *legacyManager) build(targets []Target) (map[vip.Health]Prober, map[vip.Health]string, error) {
	probers := map[vip.Health]Prober{}
	files := map[vip.Health]string{}
	for _, t := range targets {
		if _, ok := probers[t.Check]; ok {
			continue
		}
		p, err := m.newProber(t.Check)
		if err != nil {
			return nil, nil, fmt.Errorf("health check of %s: %w", t.ID, err)
		}
		probers[t.Check] = p
		files[t.Check] = legacyFingerprint(t.Check.CAFile, t.Check.CertFile, t.Check.KeyFile)
	}
	return probers, files, nil
}

// fingerprint hashes the contents of the given files (empty names skipped;
// an unreadable file hashes its error, which the prober build reports).
func legacyFingerprint(paths ...string) string {
	h := sha256.New()
	for _, p := range paths {
		if p == "" {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			b = []byte(err.Error())
		}
		fmt.Fprintf(h, "%s\x00%d\x00", p, len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func legacyJitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return rand.N(d)
}

// loop probes one target until ctx ends. After the first probe it waits a
// random part of the interval, then keeps a fixed period.
func (m *legacyManager) loop(ctx context.Context, c *legacyChecker, p Prober, prev *legacyChecker, delay time.Duration) {
	defer m.wg.Done()
	defer close(c.done)
	if prev != nil {
		// Never two probes of one backend at once: let the replaced loop
		// finish its probe (bounded by its timeout) first.
		select {
		case <-prev.done:
		case <-ctx.Done():
			return
		}
	}
	t := c.target
	timer := time.NewTimer(delay)
	defer timer.Stop()
	firstDone := prev != nil
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		start := time.Now()
		pctx, cancel := context.WithTimeout(ctx, t.Check.Timeout)
		r := p.Probe(pctx, legacyProbeAddr(t))
		cancel()
		if ctx.Err() != nil {
			return // stopped or replaced mid-probe: the result is stale
		}
		if r.Err != nil && pctx.Err() == context.DeadlineExceeded {
			r.Outcome = Unreachable
			r.Err = fmt.Errorf("no answer within %v: %w", t.Check.Timeout, r.Err)
		}
		if m.observe != nil {
			m.observe(t, r)
		}
		m.record(c, r)
		next := t.Check.Interval - time.Since(start)
		if !firstDone {
			firstDone = true
			next = legacyJitter(t.Check.Interval)
		}
		timer.Reset(max(next, 0))
	}
}

func (m *legacyManager) record(c *legacyChecker, r Result) {
	m.mu.Lock()
	from, changed := c.tracker.Observe(r)
	to := c.tracker.State()
	select {
	case <-c.first:
	default:
		close(c.first)
	}
	m.mu.Unlock()
	if !changed {
		return
	}
	// The tracker has changed, so the event must reach the daemon even if
	// this loop is being replaced by a reload (which keeps the tracker):
	// only the Manager's own end stops the send.
	select {
	case m.events <- Event{Target: c.target, From: from, To: to, Result: r}:
	case <-m.ctx.Done():
	}
}

// WaitFirst waits until every current target has had one probe result,
// or ctx ends.
func (m *legacyManager) WaitFirst(ctx context.Context) {
	m.mu.Lock()
	var firsts []chan struct{}
	for _, c := range m.checks {
		firsts = append(firsts, c.first)
	}
	m.mu.Unlock()
	for _, f := range firsts {
		select {
		case <-f:
		case <-ctx.Done():
			return
		}
	}
}

// State returns a target's state (Unknown if it is not checked).
func (m *legacyManager) State(id string) State {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c := m.checks[id]; c != nil {
		return c.tracker.State()
	}
	return Unknown
}

// Statuses returns every target's status, sorted by ID.
func (m *legacyManager) Statuses() []Status {
	m.mu.Lock()
	out := make([]Status, 0, len(m.checks))
	for _, c := range m.checks {
		out = append(out, Status{Target: c.target, State: c.tracker.State(), Since: c.tracker.Since(),
			Last: c.tracker.Last(), Transitions: c.tracker.Transitions()})
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Stop ends every probe loop and waits for them.
func (m *legacyManager) Stop() {
	m.stop()
	m.wg.Wait()
}
