package health

import (
	"container/heap"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nftlb/nftlb/internal/vip"
)

// Target is one backend to check.
type Target struct {
	ID    string         // stable identity across reloads: pool/addr:port
	Pool  string         // the pool's name
	Addr  netip.AddrPort // the backend
	Check vip.Health     // the pool's effective health config
}

// probeAddr is where probes go: the backend, on health.port if set.
func (t Target) probeAddr() netip.AddrPort {
	if t.Check.Port != 0 {
		return netip.AddrPortFrom(t.Addr.Addr(), t.Check.Port)
	}
	return t.Addr
}

// TargetsOf lists every backend of cfg as a Target.
func TargetsOf(cfg *vip.Config) []Target {
	var out []Target
	for i := range cfg.Pools {
		p := &cfg.Pools[i]
		for _, b := range p.Backends {
			out = append(out, Target{ID: p.ID(b), Pool: p.Name, Addr: b.Addr, Check: p.Health})
		}
	}
	return out
}

// Event reports one state change of one backend.
type Event struct {
	Target   Target
	From, To State
	Result   Result // the probe result that decided it
}

// Status is a backend's current health, for status pages and metrics.
type Status struct {
	Target
	State       State
	Since       time.Time
	Last        Result
	Transitions int
}

// Manager checks targets on one shared schedule. What is probed is a
// unit: one address with one set of probe settings. Targets that need the
// same probe (the same backend listed with the same check in several
// pools) share a unit, so it is probed once per interval and its result
// goes to each of them; rise/fall, state and events stay per target.
//
// Units wait in a heap ordered by their next probe. One timer wakes the
// Manager when the earliest is due (rounded up to a tick, so that units
// due together are started together), and due probes run on worker
// goroutines that exist while there is work: at most maxProbes probes at
// once, and none once they have been idle for a while. So the cost of an
// idle target is a heap entry, not a goroutine and a timer. Probes of a
// unit never overlap, each is bounded by the check's timeout, and a
// unit's first probe is followed by a random part of the interval, so
// that a thousand backends are not probed in lockstep.
//
// Targets of type none are not probed: they are up from the moment they
// are configured.
type Manager struct {
	events chan Event
	ctx    context.Context
	stop   context.CancelFunc
	wg     sync.WaitGroup // worker and event-sender goroutines
	epoch  time.Time      // unit times are nanoseconds since epoch (monotonic)

	mu      sync.Mutex
	checks  map[string]*checker // by Target.ID
	units   map[unitKey]*unit
	queue   unitQueue   // units waiting for their next probe, earliest first
	timer   *time.Timer // runs dispatch at armedAt
	armed   bool
	armedAt int64
	running int        // probes in flight
	idle    []*worker  // idle workers, the most recently busy last
	gone    int        // workers in idle that have left
	backlog []*unit    // due while maxProbes were in flight, first come first
	outbox  []Event    // state changes not yet on the events channel, in order
	sending bool       // a sender goroutine is emptying outbox
	drained *sync.Cond // outbox shrank or the Manager stopped
	stopped bool

	// maxProbes bounds the probes in flight (sockets, goroutines); a due
	// unit beyond it waits for a free slot.
	maxProbes int
	// workerIdle is how long a worker waits for another probe before it
	// leaves.
	workerIdle time.Duration
	// newProber is NewProber; tests replace it.
	newProber func(vip.Health) (Prober, error)
	// observe, if set, sees every probe result (for metrics).
	observe func(Target, Result)
}

const (
	// defaultMaxProbes keeps 3,000 targets at interval 1s on schedule
	// even if every backend hangs until a 1s timeout.
	defaultMaxProbes = 4096
	// maxOutbox is how many state changes may wait for the consumer
	// before probes are held back (as a full channel did).
	maxOutbox = 1024
	// tick is how late a probe may start so that it shares a timer
	// wake-up with others: 3,000 units a second cost 250 wake-ups, not
	// 3,000.
	tick = 4 * time.Millisecond
	// defaultWorkerIdle: workers idle for two intervals of a usual
	// check are not needed.
	defaultWorkerIdle = 2 * time.Second
)

// SetObserver makes f see every probe result, once per target that the
// probe was for, from the probe goroutines. Call it before the first
// Update.
func (m *Manager) SetObserver(f func(Target, Result)) { m.observe = f }

// checker is one target's health. Guarded by Manager.mu.
type checker struct {
	target  Target
	tracker *Tracker
	first   chan struct{} // closed once the first result is in
	unit    *unit         // what feeds it; nil for type none
	slot    int           // its index in unit.subs
}

// unitKey is what makes two targets' probes the same.
type unitKey struct {
	addr  netip.AddrPort // where probes go
	check vip.Health     // probeSettings of the check
	files string         // fingerprint of the TLS files its prober was built from
}

// probeSettings is h without what does not change a probe: rise and fall
// (applied per target), the pool's policies, and the port (part of the
// address probed).
func probeSettings(h vip.Health) vip.Health {
	h.Rise, h.Fall, h.Port, h.ResetClients, h.OnAllDown = 0, 0, 0, false, ""
	return h
}

// unit is one probe schedule. Guarded by Manager.mu, but for ctx, which
// its worker reads while the probe is in flight.
type unit struct {
	key      unitKey
	prober   Prober
	subs     []*checker // the targets its results go to
	next     int64      // when it is due, in Manager.epoch time
	index    int        // in Manager.queue; -1 when not queued
	running  bool       // a probe is in flight
	waiting  bool       // in Manager.backlog
	jitter   bool       // wait a random part of the interval after the next probe
	hurry    bool       // probe again at once: a new target missed the last result
	retired  bool       // no target needs it any more
	ctx      context.Context
	cancel   context.CancelFunc
	blockers int      // units whose probe in flight it waits for
	blocks   []*unit  // units waiting for this one's probe in flight
	notify   []Target // scratch for the observer, reused
}

// NewManager returns a Manager with no targets.
func NewManager() *Manager {
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		events:     make(chan Event, 1024),
		ctx:        ctx,
		stop:       cancel,
		epoch:      time.Now(),
		checks:     map[string]*checker{},
		units:      map[unitKey]*unit{},
		maxProbes:  defaultMaxProbes,
		workerIdle: defaultWorkerIdle,
		newProber:  NewProber,
	}
	m.drained = sync.NewCond(&m.mu)
	m.timer = time.AfterFunc(time.Hour, m.dispatch)
	m.timer.Stop()
	return m
}

// now is the current time in epoch time.
func (m *Manager) now() int64 { return int64(time.Since(m.epoch)) }

// Events delivers state changes. The consumer must keep reading: once
// enough changes wait, probes are held back (changes are never dropped).
func (m *Manager) Events() <-chan Event { return m.events }

// Update makes targets the set being checked. It builds every prober
// first, so an error (an unreadable ca_file, say) changes nothing. A
// target that was already checked keeps its state and history, even if
// its check settings changed; checks of removed targets stop.
func (m *Manager) Update(targets []Target) error {
	probers, files, err := m.build(targets)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	at := time.Now()
	now := int64(at.Sub(m.epoch))
	want := make(map[string]bool, len(targets))
	for _, t := range targets {
		want[t.ID] = true
	}
	var left []*unit // units that lost a target: retired below if none is left
	for id, c := range m.checks {
		if !want[id] {
			left = appendUnit(left, m.detach(c))
			delete(m.checks, id)
		}
	}
	created := map[*unit]bool{}
	for _, t := range targets {
		c := m.checks[t.ID]
		if c == nil {
			c = &checker{tracker: NewTracker(t.Check.Rise, t.Check.Fall), first: make(chan struct{})}
			m.checks[t.ID] = c
		} else {
			c.tracker.SetRiseFall(t.Check.Rise, t.Check.Fall)
		}
		c.target = t
		if t.Check.Type == vip.CheckNone {
			left = appendUnit(left, m.detach(c))
			m.settle(c, at)
			continue
		}
		s := probeSettings(t.Check)
		key := unitKey{addr: t.probeAddr(), check: s, files: files[s]}
		if c.unit != nil && c.unit.key == key {
			continue // same probe, same certificate files: nothing changes
		}
		// A rotated CA or client certificate (same path, new content) makes
		// a new key, so a new prober, as a reload promises.
		prev := m.detach(c)
		left = appendUnit(left, prev)
		u := m.units[key]
		if u == nil {
			u = &unit{key: key, prober: probers[s], index: -1, next: now + int64(jitter(s.Interval))}
			m.units[key] = u
			created[u] = true
		}
		c.unit, c.slot = u, len(u.subs)
		u.subs = append(u.subs, c)
		if prev != nil && created[u] && (prev.running || prev.blockers > 0) {
			// Never two probes of one target at once: the replacement
			// waits for the replaced unit's probe (bounded by its timeout),
			// or for what that one was still waiting for.
			prev.blocks = append(prev.blocks, u)
			u.blockers++
		}
		if !isClosed(c.first) {
			// nftlb is waiting for this target's first result: probe now.
			switch {
			case created[u]:
				u.next, u.jitter = now, true
			case u.running, u.waiting:
				// The coming result is this target's first.
			case u.index >= 0:
				u.next = now
				heap.Fix(&m.queue, u.index)
			case u.blockers > 0:
				u.next = now
			default:
				u.hurry = true // its probe ended just before this target joined
			}
		}
	}
	for _, u := range left {
		if len(u.subs) == 0 && !u.retired {
			m.retire(u)
		}
	}
	// Thousands of first probes due at the same instant would each take a
	// worker at once: 3,000 goroutines whose grown stacks set the daemon's
	// peak RSS (80 MiB at 3,000 targets). Spread a large batch over a few
	// milliseconds per hundred targets (at most 100 ms, which the wait for
	// the first round absorbs), so workers are reused as probes finish.
	if n := len(created); n > firstBurst {
		spread := min(time.Duration(n)*firstSpreadPer, maxFirstSpread)
		for u := range created {
			if u.next == now {
				u.next += int64(jitter(spread))
			}
		}
	}
	for u := range created {
		if u.blockers == 0 {
			m.enqueue(u)
		}
	}
	m.arm(now)
	return nil
}

const (
	firstBurst     = 256                    // first probes dialled at once, at most
	firstSpreadPer = 30 * time.Microsecond  // per target beyond that: 3,000 targets over 90 ms
	maxFirstSpread = 100 * time.Millisecond // never longer
)

func appendUnit(list []*unit, u *unit) []*unit {
	if u == nil {
		return list
	}
	return append(list, u)
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// detach takes c off its unit and returns that unit (nil if none).
func (m *Manager) detach(c *checker) *unit {
	u := c.unit
	if u == nil {
		return nil
	}
	last := len(u.subs) - 1
	u.subs[c.slot] = u.subs[last]
	u.subs[c.slot].slot = c.slot
	u.subs[last] = nil
	u.subs = u.subs[:last]
	c.unit = nil
	return u
}

// retire stops a unit no target needs: out of the queue at once, its
// probe in flight cancelled (its result is dropped); a backlog entry is
// skipped when its turn comes.
func (m *Manager) retire(u *unit) {
	u.retired = true
	if m.units[u.key] == u {
		delete(m.units, u.key)
	}
	if u.index >= 0 {
		heap.Remove(&m.queue, u.index)
	}
	if u.cancel != nil {
		u.cancel()
	}
	if !u.running && u.blockers == 0 {
		m.release(u) // no probe of it will end: let its waiters go
	}
}

// release lets the units that waited for u's probe in flight go. A
// retired one passes the release on to those waiting for it.
func (m *Manager) release(u *unit) {
	blocks := u.blocks
	u.blocks = nil
	for _, b := range blocks {
		if b.blockers--; b.blockers == 0 {
			if b.retired {
				m.release(b)
			} else {
				m.enqueue(b)
			}
		}
	}
}

// settle applies a type none check: the target is up, as if probes
// succeeded until it was (rise of them at most, from unready or down).
func (m *Manager) settle(c *checker, at time.Time) {
	r := Result{Outcome: OK, At: at}
	for range max(c.target.Check.Rise, 1) {
		from, changed := c.tracker.Observe(r)
		if changed {
			m.emit(Event{Target: c.target, From: from, To: c.tracker.State(), Result: r})
		}
		if c.tracker.State() == Up {
			break
		}
	}
	if !isClosed(c.first) {
		close(c.first)
	}
}

// Validate builds the probers targets need (reading TLS files) without
// changing anything, so a reload can be rejected before it starts.
func (m *Manager) Validate(targets []Target) error {
	_, _, err := m.build(targets)
	return err
}

// build makes one prober per distinct probe settings (so HTTP clients are
// shared) and fingerprints the files each one read.
func (m *Manager) build(targets []Target) (map[vip.Health]Prober, map[vip.Health]string, error) {
	probers := map[vip.Health]Prober{}
	files := map[vip.Health]string{}
	for _, t := range targets {
		if t.Check.Type == vip.CheckNone {
			continue
		}
		s := probeSettings(t.Check)
		if _, ok := probers[s]; ok {
			continue
		}
		p, err := m.newProber(s)
		if err != nil {
			return nil, nil, fmt.Errorf("health check of %s: %w", t.ID, err)
		}
		probers[s] = p
		files[s] = fingerprint(s.CAFile, s.CertFile, s.KeyFile)
	}
	return probers, files, nil
}

// fingerprint hashes the contents of the given files (empty names skipped;
// an unreadable file hashes its error, which the prober build reports).
func fingerprint(paths ...string) string {
	if !slices.ContainsFunc(paths, func(p string) bool { return p != "" }) {
		return ""
	}
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

func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return rand.N(d)
}

// enqueue puts u in the queue for its next probe.
func (m *Manager) enqueue(u *unit) {
	if !u.retired && u.index < 0 && !u.running && !u.waiting {
		heap.Push(&m.queue, u)
	}
}

// arm makes the timer fire when the earliest unit is due, rounded up to
// a tick. A timer armed earlier is left alone: dispatch re-arms it.
func (m *Manager) arm(now int64) {
	if m.stopped || len(m.queue) == 0 {
		return
	}
	due := (m.queue[0].next + int64(tick) - 1) / int64(tick) * int64(tick)
	if m.armed && m.armedAt <= due {
		return
	}
	m.armed, m.armedAt = true, due
	m.timer.Reset(time.Duration(due - now))
}

// dispatch starts the probes that are due, from the timer's goroutine.
func (m *Manager) dispatch() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.armed = false
	if m.stopped {
		return
	}
	now := m.now()
	for len(m.queue) > 0 && m.queue[0].next <= now {
		m.run(heap.Pop(&m.queue).(*unit))
	}
	m.arm(now)
}

// run starts a probe of u on the most recently idle worker, or a new
// one; with maxProbes in flight, u waits in the backlog.
func (m *Manager) run(u *unit) {
	if m.running >= m.maxProbes {
		u.waiting = true
		m.backlog = append(m.backlog, u)
		return
	}
	m.running++
	u.running = true
	u.ctx, u.cancel = context.WithTimeout(m.ctx, u.key.check.Timeout)
	for n := len(m.idle); n > 0; n-- {
		w := m.idle[n-1]
		m.idle[n-1] = nil
		m.idle = m.idle[:n-1]
		if w.gone {
			m.gone--
			continue
		}
		w.idle = false
		w.next <- u
		return
	}
	m.wg.Add(1)
	go m.work(u)
}

// worker is a goroutine that runs probes. Reusing workers spares a new
// goroutine's stack growth (a dial is deep) on every probe; the most
// recently idle one is used first, so those not needed time out.
type worker struct {
	next chan *unit // its next probe; buffered so run never waits
	idle bool       // in Manager.idle
	gone bool       // left while idle; dropped from Manager.idle lazily
}

// work probes u, then whatever it is handed next, until it has been idle
// for m.workerIdle.
func (m *Manager) work(u *unit) {
	defer m.wg.Done()
	w := &worker{next: make(chan *unit, 1)}
	timer := time.NewTimer(m.workerIdle)
	defer timer.Stop()
	for {
		m.probe(u)
		m.mu.Lock()
		if m.stopped {
			m.mu.Unlock()
			return
		}
		w.idle = true
		m.idle = append(m.idle, w)
		m.mu.Unlock()
		timer.Reset(m.workerIdle)
		select {
		case u = <-w.next:
			continue
		case <-timer.C:
		case <-m.ctx.Done():
			return
		}
		m.mu.Lock()
		if w.idle {
			// Still unused: leave. Those that left are dropped from the
			// idle list when it is mostly theirs (after a burst).
			w.gone = true
			if m.gone++; m.gone > len(m.idle)/2 {
				m.idle = slices.DeleteFunc(m.idle, func(x *worker) bool { return x.gone })
				m.gone = 0
			}
			m.mu.Unlock()
			return
		}
		m.mu.Unlock()
		u = <-w.next // handed a probe as the timer fired
	}
}

// probe runs one probe of u and hands its result to u's targets.
func (m *Manager) probe(u *unit) {
	r := u.prober.Probe(u.ctx, u.key.addr)
	if r.Err != nil && u.ctx.Err() == context.DeadlineExceeded {
		r.Outcome = Unreachable
		r.Err = fmt.Errorf("no answer within %v: %w", u.key.check.Timeout, r.Err)
	}

	m.mu.Lock()
	u.cancel() // the context's timer
	u.ctx, u.cancel, u.running = nil, nil, false
	m.running--
	m.release(u)
	m.startBacklog()
	if u.retired || m.stopped {
		// Stopped, or replaced mid-probe: the result is stale.
		m.arm(m.now())
		m.mu.Unlock()
		return
	}
	notify := u.notify[:0]
	for _, c := range u.subs {
		from, changed := c.tracker.Observe(r)
		if changed {
			m.emit(Event{Target: c.target, From: from, To: c.tracker.State(), Result: r})
		}
		if !isClosed(c.first) {
			close(c.first)
		}
		if m.observe != nil {
			notify = append(notify, c.target)
		}
	}
	u.notify = notify
	m.mu.Unlock()

	for i := range notify {
		m.observe(notify[i], r)
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	for len(m.outbox) >= maxOutbox && !m.stopped {
		m.drained.Wait() // the consumer is behind: hold this unit back
	}
	if u.retired || m.stopped {
		return
	}
	now := m.now()
	// A fixed period from when it was due, not from when the probe began
	// (up to a tick later), so the period does not drift.
	u.next = max(u.next+int64(u.key.check.Interval), now)
	if u.jitter {
		u.jitter = false
		u.next = now + int64(jitter(u.key.check.Interval))
	}
	if u.hurry {
		u.hurry = false
		u.next = now
	}
	m.enqueue(u)
	m.arm(now)
}

// startBacklog starts units that waited for a free slot.
func (m *Manager) startBacklog() {
	for len(m.backlog) > 0 && m.running < m.maxProbes && !m.stopped {
		u := m.backlog[0]
		m.backlog[0] = nil
		m.backlog = m.backlog[1:]
		u.waiting = false
		if !u.retired {
			m.run(u)
		}
	}
	if len(m.backlog) == 0 {
		m.backlog = nil
	}
}

// emit queues an event for the consumer, in order, from a sender
// goroutine that exists while events wait.
func (m *Manager) emit(ev Event) {
	m.outbox = append(m.outbox, ev)
	if !m.sending && !m.stopped {
		m.sending = true
		m.wg.Add(1)
		go m.send()
	}
}

func (m *Manager) send() {
	defer m.wg.Done()
	for {
		m.mu.Lock()
		if len(m.outbox) == 0 || m.stopped {
			m.sending = false
			m.outbox = nil
			m.mu.Unlock()
			return
		}
		ev := m.outbox[0]
		m.outbox[0] = Event{}
		m.outbox = m.outbox[1:]
		if len(m.outbox) < maxOutbox {
			m.drained.Broadcast()
		}
		m.mu.Unlock()
		select {
		case m.events <- ev:
		case <-m.ctx.Done():
			m.mu.Lock()
			m.sending = false
			m.mu.Unlock()
			return
		}
	}
}

// WaitFirst waits until every current target has had one probe result,
// or ctx ends.
func (m *Manager) WaitFirst(ctx context.Context) {
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
func (m *Manager) State(id string) State {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c := m.checks[id]; c != nil {
		return c.tracker.State()
	}
	return Unknown
}

// Statuses returns every target's status, sorted by ID.
func (m *Manager) Statuses() []Status {
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

// Stop ends every probe and waits for them.
func (m *Manager) Stop() {
	m.mu.Lock()
	m.stopped = true
	m.timer.Stop()
	m.drained.Broadcast()
	m.mu.Unlock()
	m.stop()
	m.wg.Wait()
}

// unitQueue is a heap of units by next probe.
type unitQueue []*unit

func (q unitQueue) Len() int           { return len(q) }
func (q unitQueue) Less(i, j int) bool { return q[i].next < q[j].next }
func (q unitQueue) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].index, q[j].index = i, j
}
func (q *unitQueue) Push(x any) {
	u := x.(*unit)
	u.index = len(*q)
	*q = append(*q, u)
}
func (q *unitQueue) Pop() any {
	old := *q
	u := old[len(old)-1]
	old[len(old)-1] = nil
	u.index = -1
	*q = old[:len(old)-1]
	return u
}
