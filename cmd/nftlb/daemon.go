package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

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
	// Signals are wired before the first apply so a SIGHUP sent during
	// start-up is not lost (nor kills the process).
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	d := &daemon{log: log, path: *path, applier: ruleset.NewApplier()}
	defer d.applier.Close()
	if err := d.start(); err != nil {
		log.Error("start failed", "err", err)
		return exitError
	}
	return d.loop(context.Background(), sigs)
}

// daemon is the control loop. One goroutine owns the config and the
// Applier, so every kernel change is serialized without locks.
type daemon struct {
	log     *slog.Logger
	path    string
	cfg     *vip.Config
	applier *ruleset.Applier
	retry   *time.Timer // pending re-apply after a kernel error; nil when none
	backoff time.Duration
}

func (d *daemon) start() error {
	cfg, err := vip.Load(d.path)
	if err != nil {
		logConfigErrors(d.log, "invalid config", err)
		return errors.New("invalid config")
	}
	d.log.Info("starting", "version", version, "config", d.path, "table", cfg.Table, "pools", len(cfg.Pools))
	if err := d.apply(cfg, "start"); err != nil {
		return err
	}
	d.cfg = cfg
	return nil
}

func (d *daemon) loop(ctx context.Context, sigs <-chan os.Signal) int {
	for {
		var retry <-chan time.Time
		if d.retry != nil {
			retry = d.retry.C
		}
		select {
		case <-ctx.Done():
			return exitOK
		case sig := <-sigs:
			switch sig {
			case syscall.SIGHUP:
				d.reload()
			default:
				// The rules stay: a restart or upgrade drops no traffic, and
				// `nftlb cleanup` is the way to remove them.
				d.log.Info("stopping; rules stay in the kernel", "signal", sig.String(), "table", d.cfg.Table)
				return exitOK
			}
		case <-retry:
			d.retry = nil
			if err := d.apply(d.cfg, "retry"); err != nil {
				d.scheduleRetry(err)
			}
		}
	}
}

// reload validates the file completely before anything changes; an
// invalid file, or one the kernel rejects, leaves the running rules as
// they are.
func (d *daemon) reload() {
	cfg, err := vip.Load(d.path)
	if err != nil {
		logConfigErrors(d.log, "reload rejected: invalid config; keeping the running rules", err)
		return
	}
	if err := d.apply(cfg, "reload"); err != nil {
		d.log.Error("reload rejected: kernel refused the new rules; keeping the running config", "err", err)
		// The transaction failed as a whole, so the kernel still holds the
		// old rules; the Applier forgot them, so re-assert them in full.
		if err := d.apply(d.cfg, "restore"); err != nil {
			d.scheduleRetry(err)
		}
		return
	}
	d.cfg = cfg
}

func (d *daemon) desired(cfg *vip.Config) *ruleset.Table {
	return ruleset.Build(ruleset.FromConfig(cfg, func(*vip.Pool, vip.Backend) bool { return true }))
}

func (d *daemon) apply(cfg *vip.Config, why string) error {
	res, err := d.applier.Apply(d.desired(cfg))
	if err != nil {
		return err
	}
	if d.retry != nil {
		d.retry.Stop()
		d.retry = nil
	}
	d.backoff = 0
	if res.Plan.Empty() {
		d.log.Info("ruleset unchanged", "why", why)
		return nil
	}
	changed := make([]string, 0, len(res.Plan.Pools))
	for _, c := range res.Plan.Pools {
		changed = append(changed, c.Name)
	}
	d.log.Info("ruleset applied", "why", why, "table", cfg.Table, "full", res.Plan.Full,
		"pools", len(cfg.Pools), "changed", changed, "duration", res.Duration)
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
