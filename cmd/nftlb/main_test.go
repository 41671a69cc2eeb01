package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nftlb/nftlb/internal/lab"
	"github.com/nftlb/nftlb/internal/ruleset"
)

// The CLI's exit codes and messages, without root: usage errors are 2,
// invalid input 1, and every config error reaches stderr.
func TestCLI(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(good, []byte("pools:\n  - name: api\n    vip: 198.18.100.1\n    port: 6443\n    backends: [198.18.1.11, 198.18.1.12]\n"), 0o644)
	os.WriteFile(bad, []byte("pools:\n  - name: api\n    vip: 198.18.100.1\n    port: 70000\n    wieght: 1\n    backends: []\n"), 0o644)
	tests := []struct {
		args      []string
		code      int
		out, errs []string
	}{
		{nil, exitUsage, nil, []string{"usage: nftlb <command>"}},
		{[]string{"-h"}, exitOK, []string{"commands:", "diff"}, nil},
		{[]string{"nope"}, exitUsage, nil, []string{`unknown command "nope"`}},
		{[]string{"check", "-config", good}, exitOK, []string{"OK: 1 pools, 2 backends, table ip nftlb"}, nil},
		{[]string{"check", "-config", bad}, exitError, nil, []string{
			"bad.yaml:4:11: pools[0].port: must be 1-65535, got 70000",
			`bad.yaml:5:5: pools[0]: unknown field "wieght"`,
			"bad.yaml:6:15: pools[0].backends: must contain at least one backend"}},
		{[]string{"check", "-config", filepath.Join(dir, "missing.yaml")}, exitError, nil, []string{"no such file"}},
		{[]string{"check", "-bogus"}, exitUsage, nil, []string{"flag provided but not defined: -bogus"}},
		{[]string{"check", "-config", good, "extra"}, exitUsage, nil, []string{`unexpected argument "extra"`}},
		{[]string{"render", "-config", good}, exitOK, []string{"table ip nftlb {", "numgen inc mod 2 map @" + ruleset.SlotMap("api")}, nil},
		{[]string{"render", "-h"}, exitOK, nil, []string{"usage: nftlb render -config FILE"}},
		{[]string{"run", "-config", good, "-log-level", "loud"}, exitUsage, nil, []string{"-log-level"}},
		{[]string{"version"}, exitOK, []string{"nftlb "}, nil},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			var out, errs bytes.Buffer
			if code := run(tt.args, &out, &errs); code != tt.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tt.code, &out, &errs)
			}
			for _, w := range tt.out {
				if !strings.Contains(out.String(), w) {
					t.Errorf("stdout lacks %q:\n%s", w, &out)
				}
			}
			for _, w := range tt.errs {
				if !strings.Contains(errs.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, &errs)
				}
			}
		})
	}
}

// `nftlb render` output is valid nft input (nft -c, in a namespace of its
// own; the golden tests cover the text itself).
func TestRenderIsNftInput(t *testing.T) {
	lab.RequireRoot(t) // nft -c needs CAP_NET_ADMIN; fails loudly in CI
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatal("the nft CLI is needed (apt-get install nftables)")
	}
	var out, errs bytes.Buffer
	if code := run([]string{"render", "-config", "../../examples/lb.yaml"}, &out, &errs); code != 0 {
		t.Fatalf("render: %d %s", code, &errs)
	}
	cmd := exec.Command("unshare", "--net", "nft", "-c", "-f", "-")
	cmd.Stdin = &out
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -c rejects the rendering of examples/lb.yaml: %v\n%s", err, b)
	}
}
