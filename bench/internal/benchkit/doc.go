// Package benchkit is the process plumbing the benchmark programs under
// bench/ (dataplane, controlplane, failover) share, so that they start
// nftlb, read its log and measure processes the same way:
//
//   - [Start] and [StartNftlb] run a process in a lab namespace and collect
//     its output line by line in a [Log] ([Entry]: nftlb's JSON log fields,
//     or whatever a custom parser makes of a line, e.g. HAProxy's syslog);
//     [Proc.WaitFor] waits for a line, [Proc.Stop] ends the process;
//   - [ProcCPU], [ProcStatus], [ProcKB], [Rusage] and [SampleCPU] read CPU
//     and memory of a process from /proc;
//   - [Run] gives main a context that Ctrl-C and SIGTERM cancel, so that
//     deferred teardown (labs, namespaces, daemons) runs;
//   - small helpers: [Median], [Quantile], [Pct], [Progress], [Sleep],
//     [Tail], machine facts ([Hostname], [Kernel], [Loadavg]).
//
// Nothing here needs root by itself; starting a process in a namespace
// does. Formatting of the printed tables stays in each program: their
// output goes into docs/benchmarks.md and each has its own units.
package benchkit
