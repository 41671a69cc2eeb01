package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/lab"
)

// cpuStat is the machine-wide "cpu" line of /proc/stat (all CPUs, in
// USER_HZ ticks).
type cpuStat struct {
	total, idle, softirq, steal uint64
}

func readCPUStat() (cpuStat, error) {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuStat{}, err
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return cpuStat{}, fmt.Errorf("parse /proc/stat: %q", line)
	}
	var v [8]uint64 // user nice system idle iowait irq softirq steal
	for i := range v {
		if v[i], err = strconv.ParseUint(f[i+1], 10, 64); err != nil {
			return cpuStat{}, fmt.Errorf("parse /proc/stat: %q", line)
		}
	}
	var s cpuStat
	for _, x := range v {
		s.total += x
	}
	s.idle = v[3] + v[4]
	s.softirq = v[6]
	s.steal = v[7]
	return s, nil
}

// machineCPU is the utilisation between two /proc/stat samples, in % of
// all CPUs: busy (everything but idle, iowait and steal) and the softirq
// part of it.
func machineCPU(a, b cpuStat) (busy, softirq float64) {
	total := float64(b.total - a.total)
	if total <= 0 {
		return 0, 0
	}
	idle := float64(b.idle-a.idle) + float64(b.steal-a.steal)
	return 100 * (total - idle) / total, 100 * float64(b.softirq-a.softirq) / total
}

// synRetrans reads TcpExt TCPSynRetrans of namespace ns: SYNs it had
// to send again because no answer came within the initial RTO (1 s).
func synRetrans(ctx context.Context, ns *lab.NS) (int64, error) {
	out, err := ns.Run(ctx, "cat", "/proc/net/netstat")
	if err != nil {
		return 0, err
	}
	var names []string
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "TcpExt:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i := 1; i < len(f) && i < len(names); i++ {
			if names[i] == "TCPSynRetrans" {
				return strconv.ParseInt(f[i], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("no TcpExt TCPSynRetrans in %s's /proc/net/netstat", ns.Name)
}

// foreignCPU snapshots the CPU time of every process on the machine except
// ours (this program, the backends, the LB process) and the ksoftirqd
// threads (which run the lab's own softirq work): the CPU that other work
// on this shared VM takes from the benchmark.
type foreignCPU map[int]procTime

type procTime struct {
	comm  string
	start string // starttime (field 22): tells a reused pid apart
	cpu   time.Duration
}

func snapForeign(exclude map[int]bool) foreignCPU {
	s := foreignCPU{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return s
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || exclude[pid] {
			continue
		}
		raw, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		st := string(raw)
		i, j := strings.IndexByte(st, '('), strings.LastIndexByte(st, ')')
		if i < 0 || j < i {
			continue
		}
		comm := st[i+1 : j]
		if strings.HasPrefix(comm, "ksoftirqd/") {
			continue
		}
		f := strings.Fields(st[j+1:]) // f[0] is field 3
		if len(f) < 20 {
			continue
		}
		if c, err := benchkit.ProcCPUTotal(pid); err == nil {
			s[pid] = procTime{comm, f[19], c}
		}
	}
	return s
}

// since is the CPU the processes of s used since before (processes that
// started in between count whole, ones that exited are missed), and the
// name of the process that used most.
func (s foreignCPU) since(before foreignCPU) (total time.Duration, top string, topCPU time.Duration) {
	for pid, p := range s {
		d := p.cpu // a new process (or a reused pid)
		if b, ok := before[pid]; ok && b.start == p.start {
			d -= b.cpu
		}
		total += d
		if d > topCPU {
			top, topCPU = p.comm, d
		}
	}
	return total, top, topCPU
}
