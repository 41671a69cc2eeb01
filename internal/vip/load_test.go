package vip

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"
)

// tcpDefaults is the health of a file that says nothing about health.
var tcpDefaults = Health{
	Type: CheckTCP, Interval: DefaultInterval, Timeout: DefaultTimeout,
	Rise: DefaultRise, Fall: DefaultFall, ResetClients: true, OnAllDown: AllDownReject,
}

func be(addr string, weight int) Backend {
	return Backend{Addr: netip.MustParseAddrPort(addr), Weight: weight}
}

func withHealth(h Health, f func(*Health)) Health {
	f(&h)
	return h
}

func TestParseGood(t *testing.T) {
	httpGlobal := withHealth(tcpDefaults, func(h *Health) {
		h.Type, h.Interval, h.Timeout, h.Rise, h.Fall = CheckHTTP, 5*time.Second, 2*time.Second, 1, 5
		h.Path, h.Host, h.ExpectStatus = "/healthz", "lb.example", 204
		h.ResetClients, h.OnAllDown = false, AllDownServeAll
	})
	tests := []struct {
		name string
		file string // under testdata, or
		in   string // inline YAML
		want *Config
	}{{
		name: "minimal",
		file: "minimal.yaml",
		want: &Config{
			Table: DefaultTable, Masquerade: true, Metrics: Metrics{Listen: DefaultMetricsListen}, Health: tcpDefaults,
			Pools: []Pool{{
				Name: "kube-apiserver", VIP: netip.MustParseAddr("198.18.100.1"), Port: 6443,
				Protocol: TCP, Scheduler: RoundRobin, Health: tcpDefaults, Line: 3,
				Backends: []Backend{be("198.18.1.11:6443", 1), be("198.18.1.12:6443", 1), be("198.18.1.13:6443", 2)},
			}},
		},
	}, {
		name: "full",
		file: "full.yaml",
		want: &Config{
			Table: "lb_main", Masquerade: false, Metrics: Metrics{Listen: "[::1]:9100"}, Health: httpGlobal,
			Pools: []Pool{{
				Name: "web", VIP: netip.MustParseAddr("198.18.100.2"), Port: 80,
				Protocol: TCP, Scheduler: SourceHash, Health: httpGlobal, Line: 18,
				Backends: []Backend{be("198.18.2.1:8080", 1), be("198.18.2.2:8080", 100)},
			}, {
				Name: "api", VIP: netip.MustParseAddr("198.18.100.2"), Port: 443,
				Protocol: TCP, Scheduler: RoundRobin, Line: 26,
				Health: withHealth(httpGlobal, func(h *Health) {
					h.Type, h.Path, h.TLSSkipVerify = CheckHTTPS, "/readyz", true
					h.CAFile, h.ServerName = "/etc/nftlb/ca.pem", "api.example"
					h.CertFile, h.KeyFile = "/etc/nftlb/client.pem", "/etc/nftlb/client-key.pem"
				}),
				Backends: []Backend{be("198.18.3.1:8443", 1)},
			}, {
				// tcp drops the http keys inherited from the global block.
				Name: "dns", VIP: netip.MustParseAddr("198.18.100.3"), Port: 53,
				Protocol: UDP, Scheduler: Random, Line: 39,
				Health: withHealth(httpGlobal, func(h *Health) {
					h.Type, h.Interval, h.Path, h.Host, h.ExpectStatus = CheckTCP, 10*time.Second, "", "", 0
				}),
				Backends: []Backend{be("198.18.4.1:53", 1), be("198.18.4.2:53", 1)},
			}},
		},
	}, {
		name: "anchors and merge keys",
		file: "anchors.yaml",
		want: &Config{
			Table: DefaultTable, Masquerade: true, Metrics: Metrics{Listen: DefaultMetricsListen},
			Health: withHealth(tcpDefaults, func(h *Health) {
				h.Type, h.Path, h.ExpectStatus = CheckHTTP, DefaultHTTPPath, DefaultExpectStatus
			}),
			Pools: []Pool{{
				Name: "web-a", VIP: netip.MustParseAddr("198.18.100.10"), Port: 80, Protocol: TCP, Scheduler: RoundRobin, Line: 5,
				Health: withHealth(tcpDefaults, func(h *Health) {
					h.Type, h.Path, h.ExpectStatus = CheckHTTP, "/healthz", DefaultExpectStatus
					h.Interval, h.Timeout = 3*time.Second, 500*time.Millisecond
				}),
				Backends: []Backend{be("198.18.5.1:8080", 1), be("198.18.5.2:8080", 3)},
			}, {
				Name: "web-b", VIP: netip.MustParseAddr("198.18.100.11"), Port: 80, Protocol: TCP, Scheduler: RoundRobin, Line: 16,
				Health: withHealth(tcpDefaults, func(h *Health) {
					h.Type, h.Path, h.ExpectStatus = CheckHTTP, "/healthz", DefaultExpectStatus
					h.Interval, h.Timeout = 3*time.Second, time.Second
				}),
				Backends: []Backend{be("198.18.5.1:8080", 1), be("198.18.5.2:8080", 3)},
			}},
		},
	}, {
		name: "https defaults and inherited keys a pool's type ignores",
		in: `
health:
  type: https
  ca_file: /ca.pem
  interval: 10s
  timeout: 3s
pools:
  - name: a
    vip: 10.0.0.1
    port: 443
    backends: [10.0.1.1]
  - name: b
    vip: 10.0.0.1
    port: 443
    protocol: udp
    health: {type: none}
    backends: [{address: 10.0.1.1, weight: 0x10}]
`,
		want: &Config{
			Table: DefaultTable, Masquerade: true, Metrics: Metrics{Listen: DefaultMetricsListen},
			Health: withHealth(tcpDefaults, func(h *Health) {
				h.Type, h.Path, h.ExpectStatus, h.CAFile = CheckHTTPS, DefaultHTTPSPath, DefaultExpectStatus, "/ca.pem"
				h.Interval, h.Timeout = 10*time.Second, 3*time.Second
			}),
			Pools: []Pool{{
				Name: "a", VIP: netip.MustParseAddr("10.0.0.1"), Port: 443, Protocol: TCP, Scheduler: RoundRobin, Line: 8,
				Health: withHealth(tcpDefaults, func(h *Health) {
					h.Type, h.Path, h.ExpectStatus, h.CAFile = CheckHTTPS, DefaultHTTPSPath, DefaultExpectStatus, "/ca.pem"
					h.Interval, h.Timeout = 10*time.Second, 3*time.Second
				}),
				Backends: []Backend{be("10.0.1.1:443", 1)},
			}, {
				Name: "b", VIP: netip.MustParseAddr("10.0.0.1"), Port: 443, Protocol: UDP, Scheduler: RoundRobin, Line: 12,
				Health: withHealth(tcpDefaults, func(h *Health) {
					h.Type, h.Interval, h.Timeout = CheckNone, 10*time.Second, 3*time.Second
				}),
				Backends: []Backend{be("10.0.1.1:443", 16)},
			}},
		},
	}, {
		name: "udp pools are unchecked unless a type is named; health.port",
		in: `pools:
  - name: dns
    vip: 198.18.100.3
    port: 53
    protocol: udp
    backends: [198.18.1.11]
  - name: dns-checked
    vip: 198.18.100.4
    port: 53
    protocol: udp
    health: {type: http, port: 10256, path: /healthz}
    backends: [198.18.1.11]
`,
		want: &Config{
			Table: DefaultTable, Masquerade: true, Metrics: Metrics{Listen: DefaultMetricsListen}, Health: tcpDefaults,
			Pools: []Pool{{
				Name: "dns", VIP: netip.MustParseAddr("198.18.100.3"), Port: 53, Protocol: UDP, Scheduler: RoundRobin, Line: 2,
				Health:   withHealth(tcpDefaults, func(h *Health) { h.Type = CheckNone }),
				Backends: []Backend{be("198.18.1.11:53", 1)},
			}, {
				Name: "dns-checked", VIP: netip.MustParseAddr("198.18.100.4"), Port: 53, Protocol: UDP, Scheduler: RoundRobin, Line: 7,
				Health: withHealth(tcpDefaults, func(h *Health) {
					h.Type, h.Port, h.Path, h.ExpectStatus = CheckHTTP, 10256, "/healthz", DefaultExpectStatus
				}),
				Backends: []Backend{be("198.18.1.11:53", 1)},
			}},
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file, data := "lb.yaml", []byte(tt.in)
			if tt.file != "" {
				file = filepath.Join("testdata", tt.file)
				var err error
				if data, err = os.ReadFile(file); err != nil {
					t.Fatal(err)
				}
			}
			tt.want.File = file
			got, err := Parse(file, data)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Parse:\ngot  %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	c, err := Load("testdata/minimal.yaml")
	if err != nil || c.File != "testdata/minimal.yaml" || len(c.Pools) != 1 {
		t.Fatalf("Load = %+v, %v", c, err)
	}
	if _, err := Load("testdata/missing.yaml"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load(missing) error = %v, want os.ErrNotExist", err)
	}
	_, err = Load("testdata/../load_test.go")
	var fe *FieldError
	if !errors.As(err, &fe) || fe.File != "testdata/../load_test.go" {
		t.Errorf("Load(not YAML) error = %v, want a *FieldError naming the file", err)
	}
}

// pool is a valid pool, to keep the bad inputs below short.
const pool = `pools:
  - name: a
    vip: 10.0.0.1
    port: 80
    backends: [10.0.1.1]
`

func TestParseBad(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []string
	}{
		// The file as a whole.
		{"empty file", ``, []string{`lb.yaml: empty file, want a mapping with at least "pools"`}},
		{"only comments", "# nothing\n", []string{`lb.yaml: empty file, want a mapping with at least "pools"`}},
		{"syntax error", "pools: [\n", []string{`lb.yaml:1: invalid YAML: did not find expected node content`}},
		{"tab indentation", "pools:\n\t- a\n", []string{`lb.yaml:2: invalid YAML: found character that cannot start any token`}},
		{"unknown anchor", "pools: *nope\n", []string{`lb.yaml: invalid YAML: unknown anchor 'nope' referenced`}},
		{"two documents", pool + "---\ntable: x\n", []string{`lb.yaml:6:1: more than one YAML document; put everything in one`}},
		{"two documents, first bad", "table: 1\n---\n" + pool, []string{
			`lb.yaml:1:1: missing required field "pools"`,
			`lb.yaml:1:8: table: must start with a letter and contain only letters, digits, '_' and '-', got "1"`,
			`lb.yaml:2:1: more than one YAML document; put everything in one`,
		}},
		{"top level list", "- a\n", []string{`lb.yaml:1:1: the top level must be a mapping, got a list`}},
		{"top level scalar", "pools\n", []string{`lb.yaml:1:1: the top level must be a mapping, got "pools"`}},
		{"top level null", "---\n~\n", []string{`lb.yaml:2:1: the top level must be a mapping, got null`}},
		{"missing pools", "table: x\n", []string{`lb.yaml:1:1: missing required field "pools"`}},
		{"no pools", "pools: []\n", []string{`lb.yaml:1:8: pools: must contain at least one pool`}},
		{"pools null", "pools:\n", []string{`lb.yaml:1:7: pools: must be set`}},
		{"pools mapping", "pools: {a: 1}\n", []string{`lb.yaml:1:8: pools: must be a list, got a mapping`}},
		{"unknown field with suggestion", "tabel: x\n" + pool, []string{`lb.yaml:1:1: unknown field "tabel" (did you mean "table"?)`}},
		{"unknown field without suggestion", "frobnicate: x\n" + pool, []string{`lb.yaml:1:1: unknown field "frobnicate"`}},
		{"duplicate key", pool + "pools: []\n", []string{`lb.yaml:6:1: duplicate key "pools" (first at line 1)`}},
		{"complex key", "? [a]\n: 1\n" + pool, []string{`lb.yaml:1:3: keys must be strings, got a list`}},
		{"three errors at once", "table: -x\nmasquerade: 1\n" + pool + "metrics: {listen: x}\n", []string{
			`lb.yaml:1:8: table: must start with a letter and contain only letters, digits, '_' and '-', got "-x"`,
			`lb.yaml:2:13: masquerade: must be true or false, got "1"`,
			`lb.yaml:8:19: metrics.listen: must be host:port, e.g. 127.0.0.1:9742, got "x"`,
		}},

		// Top-level settings.
		{"table too long", "table: " + strings.Repeat("t", 33) + "\n" + pool, []string{`lb.yaml:1:8: table: must be at most 32 characters, got 33`}},
		{"table with a dot", "table: a.b\n" + pool, []string{`lb.yaml:1:8: table: must start with a letter and contain only letters, digits, '_' and '-', got "a.b"`}},
		{"masquerade quoted", "masquerade: \"true\"\n" + pool, []string{`lb.yaml:1:13: masquerade: must be true or false, got "true"`}},
		{"masquerade null", "masquerade:\n" + pool, []string{`lb.yaml:1:12: masquerade: must be set`}},
		{"metrics unknown field", "metrics: {lisen: x}\n" + pool, []string{`lb.yaml:1:11: metrics: unknown field "lisen" (did you mean "listen"?)`}},
		{"metrics not a mapping", "metrics: 127.0.0.1:1\n" + pool, []string{`lb.yaml:1:10: metrics: must be a mapping, got "127.0.0.1:1"`}},
		{"metrics hostname", "metrics: {listen: example.com:9742}\n" + pool, []string{`lb.yaml:1:19: metrics.listen: host must be an IP address, "localhost" or empty, got "example.com"`}},
		{"metrics port 0", "metrics: {listen: \"localhost:0\"}\n" + pool, []string{`lb.yaml:1:19: metrics.listen: port must be 1-65535, got 0`}},
		{"metrics named port", "metrics: {listen: \":http\"}\n" + pool, []string{`lb.yaml:1:19: metrics.listen: port must be 1-65535, got "http"`}},

		// Health.
		{"health type", "health: {type: htp}\n" + pool, []string{`lb.yaml:1:16: health.type: must be tcp, http, https or none, got "htp" (did you mean "http"?)`}},
		{"health unknown field", "health: {intreval: 2s}\n" + pool, []string{`lb.yaml:1:10: health: unknown field "intreval" (did you mean "interval"?)`}},
		{"health interval", "health:\n  interval: 2 seconds\n" + pool, []string{`lb.yaml:2:13: health.interval: invalid duration "2 seconds": unknown unit " seconds"`}},
		{"health interval no unit", "health:\n  interval: 2\n" + pool, []string{`lb.yaml:2:13: health.interval: invalid duration "2": missing unit`}},
		{"health interval garbage", "health:\n  interval: soon\n" + pool, []string{`lb.yaml:2:13: health.interval: invalid duration "soon": want a number and a unit, e.g. 2s or 500ms`}},
		{"health interval zero", "health:\n  interval: 0s\n" + pool, []string{`lb.yaml:2:13: health.interval: must be greater than 0, got 0s`}},
		{"health timeout negative", "health:\n  timeout: -1s\n" + pool, []string{`lb.yaml:2:12: health.timeout: must be greater than 0, got -1s`}},
		{"health interval list", "health:\n  interval: [2s]\n" + pool, []string{`lb.yaml:2:13: health.interval: must be a duration, got a list`}},
		{"rise and fall", "health: {rise: 0, fall: 101}\n" + pool, []string{
			`lb.yaml:1:16: health.rise: must be 1-100, got 0`,
			`lb.yaml:1:25: health.fall: must be 1-100, got 101`,
		}},
		{"rise not an integer", "health: {rise: abc, fall: 2.5}\n" + pool, []string{
			`lb.yaml:1:16: health.rise: must be an integer, got "abc"`,
			`lb.yaml:1:27: health.fall: must be an integer, got "2.5"`,
		}},
		{"path without slash", "health: {type: http, path: readyz}\n" + pool, []string{`lb.yaml:1:28: health.path: must start with '/', got "readyz"`}},
		{"health port", "health: {port: 0}\n" + pool, []string{`lb.yaml:1:16: health.port: must be 1-65535, got 0`}},
		{"expect_status", "health: {type: http, expect_status: 600}\n" + pool, []string{`lb.yaml:1:37: health.expect_status: must be 100-599, got 600`}},
		{"http keys with tcp", "health: {path: /, host: x, expect_status: 200}\n" + pool, []string{
			`lb.yaml:1:16: health.path: only applies to type http or https (type is tcp)`,
			`lb.yaml:1:25: health.host: only applies to type http or https (type is tcp)`,
			`lb.yaml:1:43: health.expect_status: only applies to type http or https (type is tcp)`,
		}},
		{"tls keys with http", "health: {type: http, tls_skip_verify: true, ca_file: c, server_name: s, cert_file: c, key_file: k}\n" + pool, []string{
			`lb.yaml:1:39: health.tls_skip_verify: only applies to type https (type is http)`,
			`lb.yaml:1:54: health.ca_file: only applies to type https (type is http)`,
			`lb.yaml:1:70: health.server_name: only applies to type https (type is http)`,
			`lb.yaml:1:84: health.cert_file: only applies to type https (type is http)`,
			`lb.yaml:1:97: health.key_file: only applies to type https (type is http)`,
		}},
		{"http key with a pool's type", "health: {type: http}\n" + pool + "    health: {type: none, path: /x}\n", []string{
			`lb.yaml:7:32: pools[0].health.path: only applies to type http or https (type is none)`,
		}},
		{"pool path with inherited type", "health: {type: https}\n" + pool + "    health: {path: /x, server_name: s}\n", nil},
		{"cert without key", "health: {type: https, cert_file: c}\n" + pool, []string{
			`lb.yaml:1:34: health.cert_file: cert_file is set but key_file is not; set both or neither`,
		}},
		{"key in pool, no cert", pool + "    health: {type: https, key_file: k}\n", []string{
			`lb.yaml:6:37: pools[0].health.key_file: key_file is set but cert_file is not; set both or neither`,
		}},
		{"cert in global, key in pool", "health: {type: https, cert_file: c}\n" + pool + "    health: {key_file: k}\n", nil},
		{"global timeout too long, once for all pools", "health:\n  timeout: 2s\n" + pool + "  - name: b\n    vip: 10.0.0.2\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:2:12: health.timeout: timeout (2s) must be less than interval (2s)`,
		}},
		{"pool timeout too long", pool + "    health: {timeout: 3s}\n", []string{
			`lb.yaml:6:23: pools[0].health.timeout: timeout (3s) must be less than interval (2s)`,
		}},
		{"pool interval too short for global timeout", "health: {timeout: 1500ms}\n" + pool + "    health: {interval: 1s}\n", []string{
			`lb.yaml:7:24: pools[0].health.interval: timeout (1.5s) must be less than interval (1s)`,
		}},
		{"pool interval fixes global timeout", "health: {timeout: 5s}\n" + pool + "    health: {interval: 10s}\n", nil},
		{"bad interval gives no timeout error", "health: {timeout: 3s, interval: 2x}\n" + pool, []string{
			`lb.yaml:1:33: health.interval: invalid duration "2x": unknown unit "x"`,
		}},
		{"on_all_down", "health: {on_all_down: serve_all}\n" + pool, []string{
			`lb.yaml:1:23: health.on_all_down: must be reject or serve-all, got "serve_all" (did you mean "serve-all"?)`,
		}},
		{"reset_clients", "health: {reset_clients: no}\n" + pool, []string{
			`lb.yaml:1:25: health.reset_clients: must be true or false, got "no"`,
		}},

		// Pools.
		{"pool not a mapping", "pools: [a]\n", []string{`lb.yaml:1:9: pools[0]: must be a mapping, got "a"`}},
		{"pool missing fields", "pools:\n  - protocol: tcp\n", []string{
			`lb.yaml:2:5: pools[0]: missing required field "name"`,
			`lb.yaml:2:5: pools[0]: missing required field "vip"`,
			`lb.yaml:2:5: pools[0]: missing required field "port"`,
			`lb.yaml:2:5: pools[0]: missing required field "backends"`,
		}},
		{"pool unknown field", pool + "    schedular: random\n", []string{`lb.yaml:6:5: pools[0]: unknown field "schedular" (did you mean "scheduler"?)`}},
		{"pool name", "pools:\n  - name: Kube_API\n    vip: 10.0.0.1\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:2:11: pools[0].name: must contain only lowercase letters, digits and '-', starting with a letter or digit, got "Kube_API"`,
		}},
		{"pool name too long", "pools:\n  - name: " + strings.Repeat("a", 33) + "\n    vip: 10.0.0.1\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:2:11: pools[0].name: must be at most 32 characters, got 33`,
		}},
		{"pool name leading dash", "pools:\n  - name: -a\n    vip: 10.0.0.1\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:2:11: pools[0].name: must contain only lowercase letters, digits and '-', starting with a letter or digit, got "-a"`,
		}},
		{"duplicate pool name", pool + "  - name: a\n    vip: 10.0.0.2\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:6:11: pools[1].name: name "a" already used by pools[0] (line 2)`,
		}},
		{"duplicate vip, port and protocol", pool + "  - name: b\n    vip: 10.0.0.1\n    port: 80\n    backends: [10.0.1.2]\n", []string{
			`lb.yaml:6:5: pools[1]: same vip, port and protocol as pools[0] (line 2)`,
		}},
		{"same vip and port, other protocol", pool + "  - name: b\n    vip: 10.0.0.1\n    port: 80\n    protocol: udp\n    backends: [10.0.1.2]\n", nil},
		{"vip hostname", "pools:\n  - name: a\n    vip: lb.example\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:3:10: pools[0].vip: must be an IPv4 address, got "lb.example" (hostnames are not resolved)`,
		}},
		{"vip with prefix", "pools:\n  - name: a\n    vip: 10.0.0.1/32\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:3:10: pools[0].vip: must be an IPv4 address, got "10.0.0.1/32"`,
		}},
		{"vip IPv6", "pools:\n  - name: a\n    vip: 2001:db8::1\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:3:10: pools[0].vip: IPv6 is not supported yet, got "2001:db8::1"`,
		}},
		{"vip IPv4-mapped IPv6", "pools:\n  - name: a\n    vip: ::ffff:10.0.0.1\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:3:10: pools[0].vip: IPv6 is not supported yet, got "::ffff:10.0.0.1"`,
		}},
		{"vip unspecified", "pools:\n  - name: a\n    vip: 0.0.0.0\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:3:10: pools[0].vip: 0.0.0.0 is the unspecified address, not one that packets can be sent to`,
		}},
		{"vip loopback", "pools:\n  - name: a\n    vip: 127.0.0.53\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:3:10: pools[0].vip: 127.0.0.53 is a loopback address, which never leaves the host it is on`,
		}},
		{"vip multicast", "pools:\n  - name: a\n    vip: 239.1.1.1\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:3:10: pools[0].vip: 239.1.1.1 is a multicast address; only unicast traffic can be balanced`,
		}},
		{"vip broadcast", "pools:\n  - name: a\n    vip: 255.255.255.255\n    port: 80\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:3:10: pools[0].vip: 255.255.255.255 is the broadcast address; only unicast traffic can be balanced`,
		}},
		{"port out of range", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 70000\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:4:11: pools[0].port: must be 1-65535, got 70000`,
		}},
		{"port zero", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 0\n    backends: [10.0.1.1:80]\n", []string{
			`lb.yaml:4:11: pools[0].port: must be 1-65535, got 0`,
		}},
		{"port quoted", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: \"6443\"\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:4:11: pools[0].port: must be an integer, got "6443"`,
		}},
		{"port tagged string", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: !!str 6443\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:4:11: pools[0].port: must be an integer, got "6443"`,
		}},
		{"port huge", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 99999999999999999999\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:4:11: pools[0].port: must be an integer, got "99999999999999999999"`,
		}},
		{"port null", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port:\n    backends: [10.0.1.1]\n", []string{
			`lb.yaml:4:10: pools[0].port: must be set`,
		}},
		{"protocol", pool + "    protocol: sctp\n", []string{`lb.yaml:6:15: pools[0].protocol: must be tcp or udp, got "sctp" (did you mean "tcp"?)`}},
		{"scheduler", pool + "    scheduler: roundrobin\n", []string{
			`lb.yaml:6:16: pools[0].scheduler: must be round-robin, random or source-hash, got "roundrobin" (did you mean "round-robin"?)`,
		}},

		// Backends.
		{"no backends", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends: []\n", []string{
			`lb.yaml:5:15: pools[0].backends: must contain at least one backend`,
		}},
		{"backends not a list", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends: 10.0.1.1\n", []string{
			`lb.yaml:5:15: pools[0].backends: must be a list, got "10.0.1.1"`,
		}},
		{"backend hostname", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends: [web1:80, web2]\n", []string{
			`lb.yaml:5:16: pools[0].backends[0]: must be an IPv4 address, got "web1" (hostnames are not resolved)`,
			`lb.yaml:5:25: pools[0].backends[1]: must be an IPv4 address, got "web2" (hostnames are not resolved)`,
		}},
		{"backend IPv6", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends: [\"[2001:db8::1]:80\", \"2001:db8::2\"]\n", []string{
			`lb.yaml:5:16: pools[0].backends[0]: IPv6 is not supported yet, got "2001:db8::1"`,
			`lb.yaml:5:36: pools[0].backends[1]: IPv6 is not supported yet, got "2001:db8::2"`,
		}},
		{"backend ports", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends: [\"10.0.1.1:70000\", \"10.0.1.2:\", \"10.0.1.3:http\"]\n", []string{
			`lb.yaml:5:16: pools[0].backends[0]: port must be 1-65535, got 70000`,
			`lb.yaml:5:34: pools[0].backends[1]: port must be 1-65535, got ""`,
			`lb.yaml:5:47: pools[0].backends[2]: port must be 1-65535, got "http"`,
		}},
		{"backend loopback", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends: [127.0.0.1]\n", []string{
			`lb.yaml:5:16: pools[0].backends[0]: 127.0.0.1 is a loopback address, which never leaves the host it is on`,
		}},
		{"duplicate backend after defaulting the port", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends:\n      - 10.0.1.1\n      - 10.0.1.2:80\n      - address: 10.0.1.1:80\n", []string{
			`lb.yaml:8:9: pools[0].backends[2]: duplicate backend 10.0.1.1:80, same as pools[0].backends[0] (line 6)`,
		}},
		{"same backend address, other port", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends: [10.0.1.1, 10.0.1.1:81]\n", nil},
		{"backend is the vip", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends: [10.0.0.1]\n", []string{
			`lb.yaml:5:16: pools[0].backends[0]: 10.0.0.1:80 is the pool's own vip and port`,
		}},
		{"backend weight", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends:\n      - {address: 10.0.1.1, weight: 0}\n      - {address: 10.0.1.2, weight: 101}\n      - {address: 10.0.1.3, weight: \"2\"}\n", []string{
			`lb.yaml:6:37: pools[0].backends[0].weight: must be 1-100, got 0`,
			`lb.yaml:7:37: pools[0].backends[1].weight: must be 1-100, got 101`,
			`lb.yaml:8:37: pools[0].backends[2].weight: must be an integer, got "2"`,
		}},
		{"backend misspelt weight", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends:\n      - address: 10.0.1.1\n        wieght: 2\n", []string{
			`lb.yaml:7:9: pools[0].backends[0]: unknown field "wieght" (did you mean "weight"?)`,
		}},
		{"backend without address", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends:\n      - weight: 2\n", []string{
			`lb.yaml:6:9: pools[0].backends[0]: missing required field "address"`,
		}},
		{"backend address not a string", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends:\n      - address: [10.0.1.1]\n", []string{
			`lb.yaml:6:18: pools[0].backends[0].address: must be a string, got a list`,
		}},
		{"backend list", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends: [[10.0.1.1]]\n", []string{
			`lb.yaml:5:16: pools[0].backends[0]: must be an address or a mapping with address and weight, got a list`,
		}},
		{"backend null", "pools:\n  - name: a\n    vip: 10.0.0.1\n    port: 80\n    backends:\n      -\n", []string{
			`lb.yaml:6:8: pools[0].backends[0]: must be set`,
		}},

		// Aliases and merge keys.
		{"alias bomb", aliasBomb + pool + "    health: *h6\n", []string{
			`lb.yaml:2:35: too many nodes (more than 100000, counting each use of an alias)`,
		}},
		{"merge cycle", pool + "    health: &h {<<: *h}\n", []string{
			`lb.yaml:6:13: too many nodes (more than 100000, counting each use of an alias)`,
		}},
		{"merge of a scalar", pool + "    health: {<<: 1}\n", []string{
			`lb.yaml:6:18: pools[0].health: << must merge a mapping or a list of mappings, got "1"`,
		}},
		{"merged key loses to the mapping's own", "x-base: &b {type: http}\n" + pool + "    health: {type: tcp, <<: *b, path: /}\n", []string{
			`lb.yaml:1:1: unknown field "x-base"`,
			`lb.yaml:7:39: pools[0].health.path: only applies to type http or https (type is tcp)`,
		}},
		{"error inside an alias points at the use", "x: &w 0\n" + pool + "    protocol: *w\n", []string{
			`lb.yaml:1:1: unknown field "x"`,
			`lb.yaml:7:15: pools[0].protocol: must be tcp or udp, got "0"`,
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse("lb.yaml", []byte(tt.in))
			if tt.want == nil {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Parse succeeded, want:\n%s", strings.Join(tt.want, "\n"))
			}
			if c != nil {
				t.Errorf("Parse returned a Config with an error")
			}
			var errs Errors
			if !errors.As(err, &errs) || len(errs) != len(tt.want) {
				t.Errorf("Parse error is %T with %d errors, want Errors with %d", err, len(errs), len(tt.want))
			}
			if got, want := err.Error(), strings.Join(tt.want, "\n"); got != want {
				t.Errorf("Parse error:\ngot:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// aliasBomb nests merge keys so that *h6 expands to a million mappings.
const aliasBomb = `x0: &h0 {rise: 1}
x1: &h1 {<<: [*h0, *h0, *h0, *h0, *h0, *h0, *h0, *h0, *h0, *h0]}
x2: &h2 {<<: [*h1, *h1, *h1, *h1, *h1, *h1, *h1, *h1, *h1, *h1]}
x3: &h3 {<<: [*h2, *h2, *h2, *h2, *h2, *h2, *h2, *h2, *h2, *h2]}
x4: &h4 {<<: [*h3, *h3, *h3, *h3, *h3, *h3, *h3, *h3, *h3, *h3]}
x5: &h5 {<<: [*h4, *h4, *h4, *h4, *h4, *h4, *h4, *h4, *h4, *h4]}
x6: &h6 {<<: [*h5, *h5, *h5, *h5, *h5, *h5, *h5, *h5, *h5, *h5]}
`

func TestFieldError(t *testing.T) {
	for _, tt := range []struct {
		e    FieldError
		want string
	}{
		{FieldError{File: "f", Line: 3, Col: 4, Path: "a.b", Msg: "m"}, "f:3:4: a.b: m"},
		{FieldError{File: "f", Line: 3, Col: 4, Msg: "m"}, "f:3:4: m"},
		{FieldError{File: "f", Line: 3, Msg: "m"}, "f:3: m"},
		{FieldError{File: "f", Msg: "m"}, "f: m"},
	} {
		if got := tt.e.Error(); got != tt.want {
			t.Errorf("Error() = %q, want %q", got, tt.want)
		}
	}
	errs := Errors{{File: "f", Line: 9, Col: 1, Msg: "b"}, {File: "f", Line: 2, Col: 5, Msg: "a"}}
	if got, want := errs.Error(), "f:2:5: a\nf:9:1: b"; got != want {
		t.Errorf("Errors.Error() = %q, want %q", got, want)
	}
}

// TestMergeOrder checks YAML merge-key precedence: the mapping's own keys
// first, then the merged mappings in order, each with what it merges itself.
func TestMergeOrder(t *testing.T) {
	in := pool + `    health:
      <<: [{<<: {rise: 3, fall: 3, path: /c}, rise: 1}, {rise: 2, fall: 2, path: /b, timeout: 1500ms}]
      type: http
      path: /own
`
	c, err := Parse("lb.yaml", []byte(in))
	if err != nil {
		t.Fatal(err)
	}
	h := c.Pools[0].Health
	if h.Rise != 1 || h.Fall != 3 || h.Path != "/own" || h.Timeout != 1500*time.Millisecond {
		t.Errorf("merged health = %+v, want rise 1, fall 3, path /own, timeout 1.5s", h)
	}
}

// mergeBomb merges the scalar v a million times through nested aliases.
func mergeBomb(v string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "x0: &v %s\nx1: &m1 {<<: [*v%s]}\n", v, strings.Repeat(", *v", 9))
	for i := 2; i <= 6; i++ {
		fmt.Fprintf(&b, "x%d: &m%d {<<: [*m%d%s]}\n", i, i, i-1, strings.Repeat(fmt.Sprintf(", *m%d", i-1), 9))
	}
	return b.String() + pool + "    health: *m6\n"
}

// backendsBomb gives 150 pools the same list of 150 aliases to v.
func backendsBomb(v string) string {
	return "x0: &v " + v + "\nx1: &b [*v" + strings.Repeat(", *v", 149) + "]\n" +
		"x2: &p {name: a, vip: 10.0.0.1, port: 80, backends: *b}\n" +
		"pools: [*p" + strings.Repeat(", *p", 149) + "]\n"
}

// TestParseAliasWork checks that the work Parse does is bounded by its
// budgets, not by how often an error repeats or by the length of a value
// used through aliases. Each of these once took seconds (a 100 KB merge
// bomb took 45s) and allocated once or more per node visited.
func TestParseAliasWork(t *testing.T) {
	long := strings.Repeat("a", 16<<10)
	tooMuchText := "lb.yaml:1:5: too much text (more than 4 MiB of keys and values, counting each use of an alias)"
	for _, tt := range []struct {
		name, in, want string
	}{
		{"merged scalar", mergeBomb("a"), "lb.yaml:2:15: too many nodes (more than 100000, counting each use of an alias)"},
		{"merged complex key", strings.Replace(aliasBomb, "{rise: 1}", "{[x]: 1}", 1) + pool + "    health: *h6\n",
			"lb.yaml:1:5: too many nodes (more than 100000, counting each use of an alias)"},
		{"merged long scalar", mergeBomb(long), tooMuchText},
		{"long backend in many pools", backendsBomb(long), tooMuchText},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			start := time.Now()
			_, err := Parse("lb.yaml", []byte(tt.in))
			took := time.Since(start)
			runtime.ReadMemStats(&after)
			allocs, bytes := after.Mallocs-before.Mallocs, after.TotalAlloc-before.TotalAlloc
			t.Logf("%d-byte file: %v, %d allocations, %d KiB", len(tt.in), took, allocs, bytes>>10)
			if err == nil || err.Error() != tt.want {
				t.Errorf("Parse error = %v, want %s", err, tt.want)
			}
			// Not one allocation per node, nor a copy of the value per use:
			// these were 66,000-275,000 allocations and 1.6 GB.
			if allocs > 10_000 || bytes > 8*maxText {
				t.Errorf("Parse made %d allocations of %d bytes in all, want at most 10000 and %d", allocs, bytes, 8*maxText)
			}
		})
	}
}
