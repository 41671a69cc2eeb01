package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"

	"github.com/vishvananda/netns"

	"github.com/nftlb/nftlb/bench/internal/benchkit"
	"github.com/nftlb/nftlb/internal/lab"
)

// scratch is an empty network namespace of our own (lo up, nothing else),
// named like a lab's LB namespace (nlbtXXXXXX-lb) so that `make clean-lab`
// removes it if this program is killed hard.
type scratch struct {
	*lab.NS
	fd netns.NsHandle // for nftables.WithNetNSFd; closed last
}

var (
	liveMu sync.Mutex
	live   = map[string]bool{} // namespaces created and not deleted yet
)

func newScratch() (*scratch, error) {
	var name string
	for range 10 {
		b := make([]byte, 3)
		_, _ = rand.Read(b)
		n := lab.NSPrefix + hex.EncodeToString(b) + "-lb"
		if _, err := os.Stat(filepath.Join("/var/run/netns", n)); errors.Is(err, os.ErrNotExist) {
			name = n
			break
		}
	}
	if name == "" {
		return nil, errors.New("no free namespace name")
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	liveMu.Lock()
	live[name] = true
	liveMu.Unlock()
	s := &scratch{NS: &lab.NS{Name: name}, fd: -1}
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		s.del()
		return nil, fmt.Errorf("ip -n %s link set lo up: %v: %s", name, err, out)
	}
	fd, err := netns.GetFromName(name)
	if err != nil {
		s.del()
		return nil, err
	}
	s.fd = fd
	return s, nil
}

// del deletes the namespace (close every Applier using fd first).
func (s *scratch) del() {
	if s.fd >= 0 {
		_ = s.fd.Close()
		s.fd = -1
	}
	if out, err := exec.Command("ip", "netns", "del", s.Name).CombinedOutput(); err != nil {
		benchkit.Progress("ip netns del %s: %v: %s", s.Name, err, out)
		return
	}
	liveMu.Lock()
	delete(live, s.Name)
	liveMu.Unlock()
}

// deleteLeftovers deletes namespaces whose deletion failed or was skipped.
func deleteLeftovers() {
	liveMu.Lock()
	names := make([]string, 0, len(live))
	for n := range live {
		names = append(names, n)
	}
	liveMu.Unlock()
	for _, n := range names {
		(&scratch{NS: &lab.NS{Name: n}, fd: -1}).del()
	}
}
