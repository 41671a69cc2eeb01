package main

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/nftlb/nftlb/internal/lab"
)

// load is one wrk invocation's shape.
type load struct {
	key   string // "new", "keepalive", "bulk"
	path  string
	conns int
	close bool // Connection: close: a new TCP connection per request
}

var (
	loadNew       = load{"new", "/small", 50, true}
	loadKeepAlive = load{"keepalive", "/small", 50, false}
	loadBulk      = load{"bulk", "/big", 4, false}
)

const wrkThreads = 2

func (ld load) args(url string, d time.Duration) []string {
	a := []string{"wrk", "-t", strconv.Itoa(wrkThreads), "-c", strconv.Itoa(ld.conns),
		"-d", fmt.Sprintf("%ds", int(d/time.Second)), "--latency"}
	if ld.close {
		a = append(a, "-H", "Connection: close")
	}
	return append(a, url+ld.path)
}

// wrkResult is what one wrk run reports.
type wrkResult struct {
	rps      float64 // Requests/sec
	bps      float64 // Transfer/sec, bytes
	p50, p99 time.Duration
	requests int64
	sockErr  int64 // connect + read + write + timeout
	sockErrs string
	non2xx   int64
	raw      string
	cpu      float64 // wrk's own CPU (user+sys), % of one core
}

// runWrk runs wrk in the client namespace (pinned to CPU 0 when pin).
func runWrk(ctx context.Context, client *lab.NS, url string, ld load, d time.Duration, pin bool) (wrkResult, error) {
	args := ld.args(url, d)
	if pin {
		args = append([]string{"taskset", "-c", wrkCPU}, args...)
	}
	ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	t0 := time.Now()
	cmd := client.Command(ctx, args[0], args[1:]...)
	raw, err := cmd.CombinedOutput()
	out := string(raw)
	if err != nil {
		return wrkResult{}, fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
	}
	r, err := parseWrk(out)
	// ip netns exec and taskset exec wrk: the rusage is wrk's.
	r.cpu = 100 * float64(cmd.ProcessState.UserTime()+cmd.ProcessState.SystemTime()) / float64(time.Since(t0))
	if err != nil {
		return r, fmt.Errorf("%s: %w; output:\n%s", strings.Join(args, " "), err, out)
	}
	return r, nil
}

var (
	reRPS      = regexp.MustCompile(`(?m)^Requests/sec:\s+([0-9.]+)`)
	reTransfer = regexp.MustCompile(`(?m)^Transfer/sec:\s+([0-9.]+)([KMGT]?B)`)
	reP50      = regexp.MustCompile(`(?m)^\s+50%\s+([0-9.]+)(us|ms|s|m|h)\s*$`)
	reP99      = regexp.MustCompile(`(?m)^\s+99%\s+([0-9.]+)(us|ms|s|m|h)\s*$`)
	reRequests = regexp.MustCompile(`(?m)^\s+([0-9]+) requests in `)
	reSockErr  = regexp.MustCompile(`Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)`)
	reNon2xx   = regexp.MustCompile(`Non-2xx or 3xx responses: ([0-9]+)`)
)

func parseWrk(out string) (wrkResult, error) {
	r := wrkResult{raw: out}
	m := reRPS.FindStringSubmatch(out)
	if m == nil {
		return r, fmt.Errorf("no Requests/sec line")
	}
	r.rps, _ = strconv.ParseFloat(m[1], 64)
	if m = reTransfer.FindStringSubmatch(out); m == nil {
		return r, fmt.Errorf("no Transfer/sec line")
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	// wrk's binary units: 1 KB = 1024 B.
	r.bps = v * float64(map[string]float64{"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}[m[2]])
	var err error
	if r.p50, err = wrkTime(reP50.FindStringSubmatch(out)); err != nil {
		return r, fmt.Errorf("50%% latency: %w", err)
	}
	if r.p99, err = wrkTime(reP99.FindStringSubmatch(out)); err != nil {
		return r, fmt.Errorf("99%% latency: %w", err)
	}
	if m = reRequests.FindStringSubmatch(out); m != nil {
		r.requests, _ = strconv.ParseInt(m[1], 10, 64)
	}
	if m = reSockErr.FindStringSubmatch(out); m != nil {
		r.sockErrs = fmt.Sprintf("connect %s, read %s, write %s, timeout %s", m[1], m[2], m[3], m[4])
		for _, s := range m[1:] {
			n, _ := strconv.ParseInt(s, 10, 64)
			r.sockErr += n
		}
	}
	if m = reNon2xx.FindStringSubmatch(out); m != nil {
		r.non2xx, _ = strconv.ParseInt(m[1], 10, 64)
	}
	return r, nil
}

func wrkTime(m []string) (time.Duration, error) {
	if m == nil {
		return 0, fmt.Errorf("not found")
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return 0, err
	}
	unit := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second, "m": time.Minute, "h": time.Hour}[m[2]]
	return time.Duration(v * float64(unit)), nil
}
