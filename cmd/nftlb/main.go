// Command nftlb is an L4 load balancer: it reads YAML pools, health-checks
// their backends and programs nftables DNAT over netlink.
//
//	nftlb run     -config F   apply, then serve until SIGTERM; SIGHUP reloads
//	nftlb check   -config F   validate F (exit 1 with every error)
//	nftlb render  -config F   print the ruleset F describes, as nft syntax
//	nftlb status  [-addr A]   print a running daemon's pools and backends
//	nftlb diff    -config F   what applying F would change in the kernel now
//	nftlb cleanup [-table T]  remove nftlb's table, nothing else
//	nftlb version
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"strings"

	"github.com/nftlb/nftlb/internal/ruleset"
	"github.com/nftlb/nftlb/internal/vip"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const defaultConfig = "/etc/nftlb/lb.yaml"

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

// exit codes
const (
	exitOK    = 0
	exitError = 1 // invalid config, kernel error
	exitUsage = 2
)

var commands = []struct {
	name, summary string
	fn            func(args []string, stdout, stderr io.Writer) int
}{
	{"run", "apply the config, then keep it applied until SIGTERM (SIGHUP reloads)", cmdRun},
	{"check", "validate a config file; exit 1 with every error", cmdCheck},
	{"render", "print the nftables ruleset a config describes (nft syntax)", cmdRender},
	{"status", "print a running nftlb's pools and backends", cmdStatus},
	{"diff", "print what applying a config would change in the kernel now", cmdDiff},
	{"cleanup", "remove nftlb's table from the kernel, and nothing else", cmdCleanup},
	{"version", "print the version", cmdVersion},
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "usage: nftlb <command> [flags]\n\ncommands:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun 'nftlb <command> -h' for a command's flags.\n")
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return exitUsage
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		usage(stdout)
		return exitOK
	}
	for _, c := range commands {
		if c.name == args[0] {
			return c.fn(args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "nftlb: unknown command %q\n\n", args[0])
	usage(stderr)
	return exitUsage
}

// newFlags makes a command's flag set; parse reports -h as exitOK and a bad
// flag as exitUsage.
func newFlags(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("nftlb "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: nftlb %s %s\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

func parse(fs *flag.FlagSet, args []string) (int, bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK, false
		}
		return exitUsage, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		fs.Usage()
		return exitUsage, false
	}
	return 0, true
}

// loadConfig prints every error of an invalid file, one per line.
func loadConfig(path string, stderr io.Writer) (*vip.Config, bool) {
	cfg, err := vip.Load(path)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return nil, false
	}
	return cfg, true
}

func cmdCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("check", "-config FILE", stderr)
	path := fs.String("config", defaultConfig, "config file")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	cfg, ok := loadConfig(*path, stderr)
	if !ok {
		return exitError
	}
	n := 0
	for _, p := range cfg.Pools {
		n += len(p.Backends)
	}
	fmt.Fprintf(stdout, "%s: OK: %d pools, %d backends, table ip %s\n", *path, len(cfg.Pools), n, cfg.Table)
	return exitOK
}

func cmdRender(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("render", "-config FILE", stderr)
	path := fs.String("config", defaultConfig, "config file")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	cfg, ok := loadConfig(*path, stderr)
	if !ok {
		return exitError
	}
	// Rendered as if every backend were healthy: what the daemon programs
	// once its checks pass.
	spec := ruleset.FromConfig(cfg, func(*vip.Pool, vip.Backend) bool { return true })
	fmt.Fprint(stdout, ruleset.Build(spec).Text())
	return exitOK
}

func cmdCleanup(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("cleanup", "[-table NAME]", stderr)
	table := fs.String("table", vip.DefaultTable, "nftlb's table (family ip) to remove")
	if code, ok := parse(fs, args); !ok {
		return code
	}
	a := ruleset.NewApplier()
	defer a.Close()
	removed, err := a.Remove(*table)
	if err != nil {
		fmt.Fprintf(stderr, "nftlb cleanup: %v\n", err)
		return exitError
	}
	if removed {
		fmt.Fprintf(stdout, "removed table ip %s\n", *table)
	} else {
		fmt.Fprintf(stdout, "table ip %s does not exist; nothing to remove\n", *table)
	}
	return exitOK
}

func cmdVersion(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("version", "", stderr)
	if code, ok := parse(fs, args); !ok {
		return code
	}
	fmt.Fprintf(stdout, "nftlb %s\n", versionString())
	return exitOK
}

func versionString() string {
	v := version
	if bi, ok := debug.ReadBuildInfo(); ok {
		v += " " + bi.GoVersion
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				v += " " + s.Value
			}
		}
	}
	return v
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("-log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(format) {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("-log-format: want text or json, got %q", format)
}
