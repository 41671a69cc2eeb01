package vip

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.yaml")
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	for _, s := range []string{
		"",
		pool,
		pool + "---\n" + pool,
		aliasBomb + pool + "    health: *h6\n",
		pool + "    health: &h {<<: *h}\n",
		"pools: &p [*p]\n",
		mergeBomb(strings.Repeat("a", 1000)),
		mergeBomb("[x]"),
		backendsBomb("a"),
		"health: {type: https, cert_file: c, timeout: 3s}\n" + pool,
		"pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends: [10.0.0.1, 10.0.1.1:80, {address: 10.0.1.1, weight: 0}]\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("lb.yaml", data)
		if err != nil {
			var errs Errors
			if c != nil || !errors.As(err, &errs) || len(errs) == 0 {
				t.Fatalf("Parse = %v, %v: want a nil Config and a non-empty Errors", c, err)
			}
			return
		}
		if len(c.Pools) == 0 {
			t.Fatal("no pools")
		}
		names := map[string]bool{}
		for _, p := range c.Pools {
			if names[p.Name] || p.Name == "" {
				t.Fatalf("pool name %q empty or not unique", p.Name)
			}
			names[p.Name] = true
			if !p.VIP.Is4() || p.Port == 0 || len(p.Backends) == 0 {
				t.Fatalf("pool %s: vip %s, port %d, %d backends", p.Name, p.VIP, p.Port, len(p.Backends))
			}
			if p.Health.Timeout <= 0 || p.Health.Timeout >= p.Health.Interval {
				t.Fatalf("pool %s: timeout %s, interval %s", p.Name, p.Health.Timeout, p.Health.Interval)
			}
			for _, b := range p.Backends {
				if !b.Addr.Addr().Is4() || b.Addr.Port() == 0 || b.Weight < 1 || b.Weight > MaxWeight {
					t.Fatalf("pool %s: backend %s weight %d", p.Name, b.Addr, b.Weight)
				}
			}
		}
	})
}
