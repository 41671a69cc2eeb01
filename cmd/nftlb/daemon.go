package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"sync/atomic"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"

	"github.com/nftlb/nftlb/internal/flows"
	"github.com/nftlb/nftlb/internal/health"
	"github.com/nftlb/nftlb/internal/metrics"
	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

func cmdRun(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("run", "-config FILE [-log-level L] [-log-format text|json]", stderr)
	path := fs.String("config", defaultConfig, "config file")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	format := fs.String("log-format", "text", "text or json")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	log, err := newLogger(stderr, *level, *format)
	if err != nil {
		fmt.Fprintf(stderr, "nftlb run: %v\n", err)
		return exitUsage
	}
	// Signals are wired before anything else so a SIGHUP sent during
	// start-up is not lost (nor kills the process).
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	d := newDaemon(log, *path)
	defer d.close()
	if err := d.start(); err != nil {
		log.Error("start failed", "err", err)
		return exitError
	}
	d.notify(sddaemon.SdNotifyReady)
	code := d.loop(context.Background(), sigs)
	d.notify(sddaemon.SdNotifyStopping)
	return code
}

// daemon is the control loop. One goroutine owns the config, the Applier
// and the pending flushes, so every kernel change is serialized without
// locks. Probe loops report events to it; conntrack flushes and drift
// scans run on goroutines of their own so that neither can stall it.
type daemon struct {
	log     *slog.Logger
	path    string
	cfg     *vip.Config
	applier *ruleset.Applier
	health  *health.Manager
	metrics *metrics.Metrics
	http    *listener

	// For the HTTP handlers and the drift scanner, which run elsewhere.
	running atomic.Pointer[vip.Config]
	applied atomic.Pointer[ruleset.Table]

	counters *ruleset.Reader // kernel counters for scrapes, on its own socket
	flows    *flows.Flows    // nil: client resets unavailable (logged at start)
	flushes  chan []flows.Target
	flushed  chan struct{} // closed when the flush worker has exited
	// pendingFlush: backends that went down; their connections are
	// flushed once no pool rule sends new connections to them.
	pendingFlush map[string]flushReq

	retry   *time.Timer // pending re-apply after a kernel error; nil when none
	backoff time.Duration

	drift       <-chan struct{} // the Applier's watch; nil while unavailable
	watchBroken bool            // a failed watch was logged once
	suspect     chan struct{}   // the drift scanner found a difference
	done        chan struct{}   // closed by close: stops the scanner
}

type flushReq struct {
	pool    string
	backend vip.Backend
	target  flows.Target
	decided time.Time // when the deciding probe finished
}

func newDaemon(log *slog.Logger, path string) *daemon {
	d := &daemon{log: log, path: path, applier: ruleset.NewApplier(), health: health.NewManager(),
		counters: ruleset.NewReader(), pendingFlush: map[string]flushReq{}, suspect: make(chan struct{}, 1),
		done: make(chan struct{})}
	d.metrics = metrics.New(metrics.Sources{
		Config:   d.running.Load,
		Applied:  d.applied.Load,
		Health:   d.health.Statuses,
		Counters: d.counters.Counters,
		Active:   d.activeConnections,
	}, version)
	d.health.SetObserver(func(t health.Target, r health.Result) {
		d.metrics.ProbeDuration.WithLabelValues(t.Pool).Observe(r.Latency.Seconds())
	})
	return d
}

func (d *daemon) close() {
	close(d.done)
	d.closeListener()
	d.health.Stop()
	if d.flushes != nil {
		close(d.flushes)
		<-d.flushed
	}
	_ = d.applier.Close()
	_ = d.counters.Close()
	if d.flows != nil {
		_ = d.flows.Close()
	}
}

func (d *daemon) start() error {
	cfg, err := vip.Load(d.path)
	if err != nil {
		logConfigErrors(d.log, "invalid config", err)
		return errors.New("invalid config")
	}
	d.log.Info("starting", "version", version, "config", d.path, "table", cfg.Table, "pools", len(cfg.Pools))
	d.checkForwarding()
	if f, err := flows.New(); err != nil {
		d.log.Error("clients of failed backends cannot be reset (needs CAP_NET_ADMIN and CAP_NET_RAW); they will wait for their own timeouts", "err", err)
	} else {
		d.flows = f
		if !f.LooseTracking() {
			d.log.Warn("net.netfilter.nf_conntrack_tcp_loose is 0: idle clients of failed backends cannot be nudged to reconnect")
		}
		d.flushes, d.flushed = make(chan []flows.Target, 64), make(chan struct{})
		go d.flushWorker()
	}
	if err := d.health.Update(health.TargetsOf(cfg)); err != nil {
		return err
	}
	// What the kernel already has (a previous run's table): backends whose
	// first probe is late keep their place in it.
	if _, err := d.applier.Current(cfg.Table); err != nil {
		return err
	}
	if err := d.listen(cfg.Metrics.Listen); err != nil {
		return err
	}
	// The first apply waits for one round of probes (each bounded by its
	// timeout), so nftlb neither sends traffic to a dead backend nor
	// rejects traffic to a live one; the old table keeps serving meanwhile.
	d.waitFirstProbes(cfg)
	if _, err := d.apply(cfg, "start"); err != nil {
		return err
	}
	d.setConfig(cfg)
	go d.driftScanner(cfg.Table)
	// Start-up is the heaviest moment (parse, first probe round, the
	// cold transaction, reading an old table back); the runtime would hand
	// that memory back to the OS only over minutes. Return it now, once.
	debug.FreeOSMemory()
	return nil
}

func (d *daemon) setConfig(cfg *vip.Config) {
	d.cfg = cfg
	d.running.Store(cfg)
	d.metrics.ReloadResult(true, time.Now())
}

func (d *daemon) waitFirstProbes(cfg *vip.Config) {
	longest := time.Duration(0)
	for _, p := range cfg.Pools {
		longest = max(longest, p.Health.Timeout)
	}
	ctx, cancel := context.WithTimeout(context.Background(), longest+500*time.Millisecond)
	defer cancel()
	start := time.Now()
	d.health.WaitFirst(ctx)
	d.log.Debug("first probe round done", "duration", time.Since(start))
}

func (d *daemon) loop(ctx context.Context, sigs <-chan os.Signal) int {
	// The watchdog is fed from this loop, so a stuck loop (not just a
	// stuck process) gets nftlb restarted.
	var watchdog <-chan time.Time
	if every, err := sddaemon.SdWatchdogEnabled(false); err == nil && every > 0 {
		t := time.NewTicker(every / 2)
		defer t.Stop()
		watchdog = t.C
	}
	d.watch(ctx)
	rewatch := time.NewTicker(5 * time.Second)
	defer rewatch.Stop()
	for {
		var retry <-chan time.Time
		if d.retry != nil {
			retry = d.retry.C
		}
		select {
		case <-ctx.Done():
			return exitOK
		case <-watchdog:
			d.notify(sddaemon.SdNotifyWatchdog)
		case sig := <-sigs:
			if sig != syscall.SIGHUP {
				// The rules stay: a restart or upgrade drops no traffic, and
				// `nftlb cleanup` is the way to remove them.
				d.log.Info("stopping; rules stay in the kernel", "signal", sig.String(), "table", d.cfg.Table)
				return exitOK
			}
			d.notify(reloadingState())
			d.reload()
			d.notify(sddaemon.SdNotifyReady)
		case ev := <-d.health.Events():
			d.healthChanged(ev)
		case _, ok := <-d.drift:
			if !ok { // the watch socket failed
				d.drift = nil
			}
			d.checkDrift("watch")
		case <-d.suspect:
			d.checkDrift("periodic")
		case <-rewatch.C:
			if d.drift == nil {
				d.watch(ctx)
			}
		case <-retry:
			d.retry = nil
			if _, err := d.apply(d.cfg, "retry"); err != nil {
				d.scheduleRetry(err)
			}
		}
	}
}

// healthChanged handles a burst of state changes with one transaction:
// events already queued are taken along, so flapping backends cost one
// apply per burst, not one per event.
func (d *daemon) healthChanged(first health.Event) {
	evs := []health.Event{first}
	for more := true; more; {
		select {
		case ev := <-d.health.Events():
			evs = append(evs, ev)
		default:
			more = false
		}
	}
	for _, ev := range evs {
		d.log.Info("backend state changed", "pool", ev.Target.Pool, "backend", ev.Target.Addr.String(),
			"from", ev.From.String(), "to", ev.To.String(), "probe", ev.Result.String())
		d.metrics.Transitions.WithLabelValues(ev.Target.Pool, ev.Target.Addr.String(), ev.To.String()).Inc()
		// Unknown -> Down (the first probe after a start) resets nobody: one
		// lost SYN must not reset every client of a healthy backend.
		if ev.To == health.Down && ev.From != health.Unknown {
			d.queueFlush(ev)
		}
	}
	res, err := d.apply(d.cfg, "health")
	if err != nil {
		d.scheduleRetry(err)
		return
	}
	changed := map[string]bool{}
	for _, c := range res.Plan.Pools {
		changed[c.Name] = true
	}
	for _, ev := range evs {
		if !changed[ev.Target.Pool] {
			continue // the kernel did not need to change (e.g. unready -> down)
		}
		latency := time.Since(ev.Result.At)
		d.metrics.ProbeToKernel.Observe(latency.Seconds())
		d.log.Info("probe to kernel", "pool", ev.Target.Pool, "backend", ev.Target.Addr.String(),
			"to", ev.To.String(), "latency", latency)
	}
}

// queueFlush records that a backend's connections must be flushed, if it
// is still in the config (an event can race a reload) and its pool wants
// client resets.
func (d *daemon) queueFlush(ev health.Event) {
	for i := range d.cfg.Pools {
		p := &d.cfg.Pools[i]
		if p.Name != ev.Target.Pool || !p.Health.ResetClients {
			continue
		}
		for _, b := range p.Backends {
			if p.ID(b) == ev.Target.ID {
				d.pendingFlush[ev.Target.ID] = flushReq{pool: p.Name, backend: b, decided: ev.Result.At,
					target: flows.Target{VIP: netip.AddrPortFrom(p.VIP, p.Port), Backend: b.Addr,
						Proto: string(p.Protocol), Nudge: p.Protocol == vip.TCP}}
			}
		}
	}
}

// flushPending hands the flushes whose time has come to the worker: the
// backend is still down and the kernel no longer sends new connections to
// it. A backend still in use (on_all_down: serve-all) stays pending until
// it is out or back up.
func (d *daemon) flushPending(applied *ruleset.Table) {
	if d.flushes == nil {
		clear(d.pendingFlush)
		return
	}
	var batch []flows.Target
	for id, req := range d.pendingFlush {
		if d.health.State(id) != health.Down {
			delete(d.pendingFlush, id) // recovered, or removed by a reload
			continue
		}
		if p := applied.Pool(req.pool); p != nil && p.Uses(req.backend.Addr) {
			continue
		}
		batch = append(batch, req.target)
		delete(d.pendingFlush, id)
	}
	if len(batch) == 0 {
		return
	}
	select {
	case d.flushes <- batch:
	default:
		d.log.Error("flush queue full; dropping client resets", "backends", len(batch))
	}
}

// flushWorker deletes conntrack entries and nudges clients off the loop:
// a conntrack dump walks the host-wide table and can take long on a busy
// gateway.
func (d *daemon) flushWorker() {
	defer close(d.flushed)
	for batch := range d.flushes {
		start := time.Now()
		res, err := d.flows.Flush(batch)
		if err != nil {
			// Flush still handles the targets it can; their counts follow.
			d.log.Error("flushing connections of failed backends", "backends", len(batch), "err", err)
		}
		d.metrics.ClientsReset.Add(float64(res.Nudged))
		for i, t := range batch {
			var tr flows.TargetResult
			if i < len(res.PerTarget) {
				tr = res.PerTarget[i]
			}
			d.log.Info("connections of failed backend flushed", "vip", t.VIP.String(), "backend", t.Backend.String(),
				"conntrack_deleted", tr.Deleted, "clients_nudged", tr.Nudged, "duration", time.Since(start))
		}
	}
}

// reload validates the file completely, and prepares its health checks and
// listener, before anything changes; an invalid file, or one the kernel
// rejects, leaves the running rules and config as they are.
func (d *daemon) reload() {
	reject := func(msg string, err error) {
		d.log.Error("reload rejected: "+msg+"; keeping the running rules", "err", err)
		d.metrics.ReloadResult(false, time.Now())
	}
	cfg, err := vip.Load(d.path)
	if err != nil {
		logConfigErrors(d.log, "reload rejected: invalid config; keeping the running rules", err)
		d.metrics.ReloadResult(false, time.Now())
		return
	}
	targets := health.TargetsOf(cfg)
	if err := d.health.Validate(targets); err != nil {
		reject("health checks", err)
		return
	}
	if err := d.listen(cfg.Metrics.Listen); err != nil {
		reject("listener", err)
		return
	}
	d.checkForwarding()
	if err := d.health.Update(targets); err != nil { // validated above; files may have changed since
		_ = d.listen(d.cfg.Metrics.Listen)
		reject("health checks", err)
		return
	}
	d.waitFirstProbes(cfg) // only new backends have no result yet
	if _, err := d.apply(cfg, "reload"); err != nil {
		reject("the kernel refused the new rules", err)
		_ = d.listen(d.cfg.Metrics.Listen)
		// The transaction failed as a whole, so the kernel still has the
		// old rules. Backends the new file removed come back as unknown,
		// and unknown backends keep their place in the kernel's table.
		if err := d.health.Update(health.TargetsOf(d.cfg)); err != nil {
			d.log.Error("restoring health checks", "err", err)
		}
		if _, err := d.apply(d.cfg, "restore"); err != nil {
			d.scheduleRetry(err)
		}
		return
	}
	d.setConfig(cfg)
}

// apply programs the desired state of cfg. After success it hands due
// flushes to the worker and publishes the table for metrics and drift.
func (d *daemon) apply(cfg *vip.Config, why string) (ruleset.Result, error) {
	kernel, err := d.applier.Current(cfg.Table)
	if err != nil {
		d.metrics.ApplyErrors.Inc()
		return ruleset.Result{}, err
	}
	next := desiredTable(cfg, d.health.State, kernel)
	res, err := d.applier.Apply(next)
	if err != nil {
		d.metrics.ApplyErrors.Inc()
		return res, err
	}
	if d.retry != nil {
		d.retry.Stop()
		d.retry = nil
	}
	d.backoff = 0
	d.applied.Store(next)
	if !res.Plan.Empty() {
		d.metrics.ApplyDuration.Observe(res.Duration.Seconds())
	}
	if res.Plan.Empty() && why != "start" {
		d.log.Info("ruleset unchanged", "why", why)
	} else {
		d.logApplied(cfg, why, res)
	}
	d.flushPending(next)
	return res, nil
}

func (d *daemon) logApplied(cfg *vip.Config, why string, res ruleset.Result) {
	changed := make([]string, 0, len(res.Plan.Pools))
	for _, c := range res.Plan.Pools {
		changed = append(changed, c.Name)
		if c.New != nil && len(c.New.Slots) == 0 {
			d.log.Warn("pool has no usable backend: new connections are refused", "pool", c.Name)
		}
	}
	attrs := []any{"why", why, "table", cfg.Table, "full", res.Plan.Full, "pools", len(cfg.Pools),
		"changed", changed, "duration", res.Duration}
	if res.Adopted {
		// A restart found its own table and changed only what differs:
		// counters and round-robin positions carry on.
		attrs = append(attrs, "adopted", true)
	}
	if res.Fallback != "" {
		attrs = append(attrs, "fallback", res.Fallback)
	}
	d.log.Info("ruleset applied", attrs...)
}

// scheduleRetry re-applies with exponential backoff (1s..30s). The Applier
// has forgotten the kernel state, so the retry starts from a fresh read.
func (d *daemon) scheduleRetry(err error) {
	d.backoff = min(max(2*d.backoff, time.Second), 30*time.Second)
	d.log.Error("apply failed; will retry", "err", err, "in", d.backoff)
	if d.retry != nil {
		d.retry.Stop()
	}
	d.retry = time.NewTimer(d.backoff)
}

// logConfigErrors logs each error of a vip.Errors on its own line, so the
// journal shows file:line:col and the field path for every one.
func logConfigErrors(log *slog.Logger, msg string, err error) {
	var list vip.Errors
	if errors.As(err, &list) {
		for _, e := range list {
			log.Error(msg, "err", e.Error())
		}
		return
	}
	log.Error(msg, "err", err)
}
