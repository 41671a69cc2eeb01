package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
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

func newDaemon(log *slog.Logger, path string) *daemon {
	d := &daemon{log: log, path: path, applier: ruleset.NewApplier(), health: health.NewManager(),
		counters: ruleset.NewReader(), pendingFlush: map[string]flushReq{}}
	d.metrics = metrics.New(metrics.Sources{
		Config:   d.running.Load,
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
	d.closeListener()
	d.health.Stop()
	_ = d.applier.Close()
	_ = d.counters.Close()
	if d.flows != nil {
		_ = d.flows.Close()
	}
}

// daemon is the control loop. One goroutine owns the config, the Applier
// and the flow resets, so every kernel change is serialized without locks;
// probe loops only report events to it.
type daemon struct {
	log     *slog.Logger
	path    string
	cfg     *vip.Config
	running atomic.Pointer[vip.Config] // cfg, for the HTTP handlers
	applier *ruleset.Applier
	health  *health.Manager
	flows   *flows.Flows // nil: client resets unavailable (logged at start)
	// counters reads kernel counters for scrapes, on its own socket.
	counters *ruleset.Reader
	metrics  *metrics.Metrics
	http     *listener
	retry    *time.Timer // pending re-apply after a kernel error; nil when none
	backoff  time.Duration
	// drift: signals from the Applier's watch on our table (nil while
	// re-watching), and the periodic check that backs it up.
	drift        <-chan struct{}
	driftEvery   time.Duration
	nextDriftChk time.Time
	// pendingFlush: backends that went down and whose clients are reset
	// once the kernel no longer sends new connections to them.
	pendingFlush map[string]flushReq
}

type flushReq struct {
	pool    string
	backend vip.Backend
	proto   vip.Protocol
	nudge   bool
	decided time.Time // when the deciding probe finished
}

func (d *daemon) start() error {
	cfg, err := vip.Load(d.path)
	if err != nil {
		logConfigErrors(d.log, "invalid config", err)
		return errors.New("invalid config")
	}
	d.log.Info("starting", "version", version, "config", d.path, "table", cfg.Table, "pools", len(cfg.Pools))
	d.checkForwarding()
	if err := d.listen(cfg.Metrics.Listen); err != nil {
		return err
	}
	if f, err := flows.New(); err != nil {
		d.log.Error("clients of failed backends cannot be reset (needs CAP_NET_ADMIN and CAP_NET_RAW); they will wait for their own timeouts", "err", err)
	} else {
		d.flows = f
		if !f.LooseTracking() {
			d.log.Warn("net.netfilter.nf_conntrack_tcp_loose is 0: idle clients of failed backends cannot be nudged to reconnect")
		}
	}
	if err := d.health.Update(health.TargetsOf(cfg)); err != nil {
		return err
	}
	// The first apply waits for one round of probes (each bounded by its
	// timeout), so nftlb neither sends traffic to a dead backend nor
	// rejects traffic to a live one; a table left by a previous run keeps
	// serving meanwhile.
	d.waitFirstProbes(cfg)
	if err := d.apply(cfg, "start"); err != nil {
		return err
	}
	d.setConfig(cfg)
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
	safety := time.NewTicker(time.Second)
	defer safety.Stop()
	for {
		var retry <-chan time.Time
		if d.retry != nil {
			retry = d.retry.C
		}
		select {
		case <-watchdog:
			d.notify(sddaemon.SdNotifyWatchdog)
		case _, ok := <-d.drift:
			if !ok { // the watch socket failed: check now, watch again
				d.drift = nil
				d.watch(ctx)
			}
			d.checkDrift("watch")
		case now := <-safety.C:
			if d.drift == nil {
				d.watch(ctx)
			}
			if now.After(d.nextDriftChk) {
				d.checkDrift("periodic")
			}
		case <-ctx.Done():
			return exitOK
		case sig := <-sigs:
			switch sig {
			case syscall.SIGHUP:
				d.notify(reloadingState())
				d.reload()
				d.notify(sddaemon.SdNotifyReady)
			default:
				// The rules stay: a restart or upgrade drops no traffic, and
				// `nftlb cleanup` is the way to remove them.
				d.log.Info("stopping; rules stay in the kernel", "signal", sig.String(), "table", d.cfg.Table)
				return exitOK
			}
		case ev := <-d.health.Events():
			d.healthChanged(ev)
		case <-retry:
			d.retry = nil
			if err := d.apply(d.cfg, "retry"); err != nil {
				d.scheduleRetry(err)
			}
			d.flushPending()
		}
	}
}

// watch subscribes to changes of our table by others.
func (d *daemon) watch(ctx context.Context) {
	ch, err := d.applier.Watch(ctx)
	if err != nil {
		d.log.Warn("cannot watch the table for changes by others; relying on the periodic check", "err", err)
		return
	}
	d.drift = ch
}

// checkDrift compares the kernel with what nftlb applied and, if someone
// else changed or deleted the table, restores it at once. The periodic
// safety net backs off with the table's size: a check reads the whole
// table (0.2 s at 1,000 pools, 5 s at 10,000), and it runs in this loop.
func (d *daemon) checkDrift(why string) {
	start := time.Now()
	dr, err := d.applier.Check()
	took := time.Since(start)
	d.driftEvery = max(30*time.Second, 20*took)
	d.nextDriftChk = time.Now().Add(d.driftEvery)
	if err != nil {
		d.log.Warn("drift check failed", "err", err)
		return
	}
	if !dr.Drifted() {
		return
	}
	d.metrics.DriftRepairs.Inc()
	attrs := []any{"found_by", why, "gone", dr.Gone, "check", took}
	if dr.Unrecognized != "" {
		attrs = append(attrs, "unrecognized", dr.Unrecognized)
	}
	if len(dr.Changes) > 0 {
		attrs = append(attrs, "changes", dr.Changes)
	}
	d.log.Warn("nftlb's table was changed by someone else; restoring it", attrs...)
	if err := d.apply(d.cfg, "drift"); err != nil {
		d.scheduleRetry(err)
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
		if ev.To == health.Down && ev.From != health.Down {
			d.queueFlush(ev)
		}
	}
	if err := d.apply(d.cfg, "health"); err != nil {
		d.scheduleRetry(err)
		return
	}
	for _, ev := range evs {
		latency := time.Since(ev.Result.At)
		d.metrics.ProbeToKernel.Observe(latency.Seconds())
		d.log.Info("probe to kernel", "pool", ev.Target.Pool, "backend", ev.Target.Addr.String(),
			"to", ev.To.String(), "latency", latency)
	}
	d.flushPending()
}

// queueFlush records that a backend's clients must be reset, if it is
// still in the config (an event can race a reload).
func (d *daemon) queueFlush(ev health.Event) {
	for i := range d.cfg.Pools {
		p := &d.cfg.Pools[i]
		for _, b := range p.Backends {
			if p.ID(b) == ev.Target.ID {
				d.pendingFlush[ev.Target.ID] = flushReq{pool: p.Name, backend: b, proto: p.Protocol,
					nudge: p.Health.ResetClients && p.Protocol == vip.TCP, decided: ev.Result.At}
			}
		}
	}
}

// flushPending resets the clients of backends that went down, now that
// the kernel sends no new connection to them. A backend the rules still
// use (on_all_down: serve-all) is left alone.
func (d *daemon) flushPending() {
	applied := d.applier.Applied()
	if applied == nil {
		return // the last apply failed; a retry is scheduled and flushes after it
	}
	for id, req := range d.pendingFlush {
		delete(d.pendingFlush, id)
		if p := applied.Pool(req.pool); p == nil || p.Uses(req.backend.Addr) {
			continue
		}
		if d.flows == nil {
			continue
		}
		res, err := d.flows.Flush(req.backend.Addr, string(req.proto), req.nudge)
		if err != nil {
			d.log.Error("resetting clients of a failed backend", "pool", req.pool, "backend", req.backend.Addr.String(), "err", err)
			continue
		}
		d.metrics.ClientsReset.Add(float64(res.Nudged))
		d.log.Info("connections of failed backend flushed", "pool", req.pool, "backend", req.backend.Addr.String(),
			"conntrack_deleted", res.Deleted, "clients_nudged", res.Nudged, "since_probe", time.Since(req.decided))
	}
}

// reload validates the file completely, and prepares its health checks,
// before anything changes; an invalid file, or one the kernel rejects,
// leaves the running rules and config as they are.
func (d *daemon) reload() {
	cfg, err := vip.Load(d.path)
	if err != nil {
		logConfigErrors(d.log, "reload rejected: invalid config; keeping the running rules", err)
		d.metrics.ReloadResult(false, time.Now())
		return
	}
	d.checkForwarding()
	if err := d.listen(cfg.Metrics.Listen); err != nil {
		d.log.Error("reload rejected: keeping the running rules", "err", err)
		d.metrics.ReloadResult(false, time.Now())
		return
	}
	if err := d.health.Update(health.TargetsOf(cfg)); err != nil {
		d.log.Error("reload rejected: keeping the running rules", "err", err)
		d.metrics.ReloadResult(false, time.Now())
		_ = d.listen(d.cfg.Metrics.Listen)
		return
	}
	d.waitFirstProbes(cfg) // only new backends have no result yet
	if err := d.apply(cfg, "reload"); err != nil {
		d.log.Error("reload rejected: kernel refused the new rules; keeping the running config", "err", err)
		d.metrics.ReloadResult(false, time.Now())
		_ = d.listen(d.cfg.Metrics.Listen)
		if err := d.health.Update(health.TargetsOf(d.cfg)); err != nil {
			d.log.Error("restoring health checks", "err", err)
		}
		// The transaction failed as a whole, so the kernel still holds the
		// old rules; the Applier forgot them, so re-assert them in full.
		if err := d.apply(d.cfg, "restore"); err != nil {
			d.scheduleRetry(err)
		}
		return
	}
	d.setConfig(cfg)
}

// desired is the state the kernel should have: each pool with the
// backends whose health is Up, or all of them when none is and the pool
// says on_all_down: serve-all.
func (d *daemon) desired(cfg *vip.Config) *ruleset.Table {
	up := map[string]bool{}
	anyUp := map[string]bool{}
	for i := range cfg.Pools {
		p := &cfg.Pools[i]
		for _, b := range p.Backends {
			if d.health.State(p.ID(b)) == health.Up {
				up[p.ID(b)] = true
				anyUp[p.Name] = true
			}
		}
	}
	return ruleset.Build(ruleset.FromConfig(cfg, func(p *vip.Pool, b vip.Backend) bool {
		return up[p.ID(b)] || (!anyUp[p.Name] && p.Health.OnAllDown == vip.AllDownServeAll)
	}))
}

func (d *daemon) apply(cfg *vip.Config, why string) error {
	next := d.desired(cfg)
	res, err := d.applier.Apply(next)
	if err != nil {
		d.metrics.ApplyErrors.Inc()
		return err
	}
	if !res.Plan.Empty() {
		d.metrics.ApplyDuration.Observe(res.Duration.Seconds())
	}
	if d.retry != nil {
		d.retry.Stop()
		d.retry = nil
	}
	d.backoff = 0
	if res.Plan.Empty() && why != "start" {
		d.log.Info("ruleset unchanged", "why", why)
		return nil
	}
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
	return nil
}

// scheduleRetry re-applies with exponential backoff (1s..30s). The Applier
// has forgotten the kernel state, so the retry is a full replace.
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
