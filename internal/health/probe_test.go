package health

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nftlb/nftlb/internal/vip"
)

// Real-network tests of the probers: every server listens on 127.0.0.1.

// probeTimeout bounds probes that are expected to finish on their own.
const probeTimeout = 5 * time.Second

// --- test PKI ----------------------------------------------------------------

// testPKI is a throwaway CA and the certificates the tests need, all made
// in memory once per test binary.
type testPKI struct {
	caPEM       []byte
	server      tls.Certificate // 127.0.0.1 and api.example, by the CA
	dnsOnly     tls.Certificate // api.example only, by the CA
	expired     tls.Certificate // 127.0.0.1 and api.example, by the CA, expired
	clientPEM   []byte          // client certificate (CN nftlb-health), by the CA
	clientKey   []byte          // its key, PKCS#8 PEM
	otherKeyPEM []byte          // a key that does not match clientPEM
	caPool      *x509.CertPool  // for servers verifying client certificates
}

const clientCN = "nftlb-health"

var makePKI = sync.OnceValues(func() (*testPKI, error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "nftlb test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, _, err := issue(caTmpl, nil, caKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	p := &testPKI{caPEM: pemBlock("CERTIFICATE", caDER), caPool: x509.NewCertPool()}
	p.caPool.AddCert(ca)

	leaf := func(cn string, ext x509.ExtKeyUsage, dns []string, ips []net.IP, from, to time.Time) (tls.Certificate, []byte, *ecdsa.PrivateKey, error) {
		tmpl := &x509.Certificate{
			Subject:     pkix.Name{CommonName: cn},
			NotBefore:   from,
			NotAfter:    to,
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{ext},
			DNSNames:    dns,
			IPAddresses: ips,
		}
		der, key, err := issue(tmpl, ca, caKey, nil)
		if err != nil {
			return tls.Certificate{}, nil, nil, err
		}
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, der, key, nil
	}
	loopback := []net.IP{net.IPv4(127, 0, 0, 1)}
	if p.server, _, _, err = leaf("api.example", x509.ExtKeyUsageServerAuth, []string{"api.example"}, loopback, now.Add(-time.Hour), now.Add(24*time.Hour)); err != nil {
		return nil, err
	}
	if p.dnsOnly, _, _, err = leaf("api.example", x509.ExtKeyUsageServerAuth, []string{"api.example"}, nil, now.Add(-time.Hour), now.Add(24*time.Hour)); err != nil {
		return nil, err
	}
	if p.expired, _, _, err = leaf("api.example", x509.ExtKeyUsageServerAuth, []string{"api.example"}, loopback, now.Add(-2*time.Hour), now.Add(-time.Hour)); err != nil {
		return nil, err
	}
	_, clientDER, clientKey, err := leaf(clientCN, x509.ExtKeyUsageClientAuth, nil, nil, now.Add(-time.Hour), now.Add(24*time.Hour))
	if err != nil {
		return nil, err
	}
	p.clientPEM = pemBlock("CERTIFICATE", clientDER)
	if p.clientKey, err = keyPEM(clientKey); err != nil {
		return nil, err
	}
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	if p.otherKeyPEM, err = keyPEM(other); err != nil {
		return nil, err
	}
	return p, nil
})

// issue signs tmpl with parentKey (self-signed when parent is nil, with
// key as the subject key); a nil key gets a new one.
func issue(tmpl, parent *x509.Certificate, parentKey, key *ecdsa.PrivateKey) ([]byte, *ecdsa.PrivateKey, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, nil, err
	}
	tmpl.SerialNumber = serial
	if key == nil {
		if key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			return nil, nil, err
		}
	}
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	return der, key, err
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func keyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pemBlock("PRIVATE KEY", der), nil
}

// pkiFiles are the PKI's files in a test's temporary directory, for
// NewProber, which wants paths.
type pkiFiles struct {
	dir                     string
	ca, cert, key, otherKey string
}

func getPKI(t *testing.T) (*testPKI, pkiFiles) {
	t.Helper()
	p, err := makePKI()
	if err != nil {
		t.Fatalf("test PKI: %v", err)
	}
	dir := t.TempDir()
	f := pkiFiles{
		dir:      dir,
		ca:       filepath.Join(dir, "ca.pem"),
		cert:     filepath.Join(dir, "client.pem"),
		key:      filepath.Join(dir, "client-key.pem"),
		otherKey: filepath.Join(dir, "other-key.pem"),
	}
	for path, b := range map[string][]byte{f.ca: p.caPEM, f.cert: p.clientPEM, f.key: p.clientKey, f.otherKey: p.otherKeyPEM} {
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return p, f
}

// --- servers and helpers -----------------------------------------------------

// seenRequest is what a test server saw of one request.
type seenRequest struct {
	method, path, query, host, userAgent string
	close                                bool   // Connection: close
	sni                                  string // TLS server name sent by the client
	clientCN                             string // verified client certificate's CN
}

// server is an httptest server on 127.0.0.1 that records requests and
// counts the connections it accepted.
type server struct {
	*httptest.Server
	addr  netip.AddrPort
	conns atomic.Int64
	mu    sync.Mutex
	reqs  []seenRequest
}

// newServer starts h on 127.0.0.1, with TLS when cfg is not nil. It is
// closed at the end of the test.
func newServer(t *testing.T, h http.HandlerFunc, cfg *tls.Config) *server {
	t.Helper()
	s := &server{}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen := seenRequest{method: r.Method, path: r.URL.Path, query: r.URL.RawQuery, host: r.Host,
			userAgent: r.UserAgent(), close: r.Close}
		if r.TLS != nil {
			seen.sni = r.TLS.ServerName
			if len(r.TLS.PeerCertificates) > 0 {
				seen.clientCN = r.TLS.PeerCertificates[0].Subject.CommonName
			}
		}
		s.mu.Lock()
		s.reqs = append(s.reqs, seen)
		s.mu.Unlock()
		h(w, r)
	}))
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			s.conns.Add(1)
		}
	}
	// Rejected handshakes are expected here; keep them out of the output.
	s.Config.ErrorLog = log.New(io.Discard, "", 0)
	if cfg != nil {
		s.TLS = cfg
		s.StartTLS()
	} else {
		s.Start()
	}
	t.Cleanup(s.Close)
	a, err := netip.ParseAddrPort(s.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s.addr = a
	return s
}

func (s *server) requests() []seenRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]seenRequest(nil), s.reqs...)
}

func status(code int) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(code) }
}

func httpCheck(typ vip.CheckType) vip.Health {
	return vip.Health{Type: typ, Path: "/", ExpectStatus: http.StatusOK}
}

// probe builds h's prober and runs one probe of target bounded by timeout.
func probe(t *testing.T, h vip.Health, target netip.AddrPort, timeout time.Duration) Result {
	t.Helper()
	p, err := NewProber(h)
	if err != nil {
		t.Fatalf("NewProber(%+v): %v", h, err)
	}
	return probeWith(t, p, target, timeout)
}

func probeWith(t *testing.T, p Prober, target netip.AddrPort, timeout time.Duration) Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	return p.Probe(ctx, target)
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("still waiting after %v for %s", timeout, what)
		}
		<-tick.C
	}
}

// closedPort returns a 127.0.0.1 port that nothing listens on (it was
// listened on a moment ago, so nothing else is likely to take it).
func closedPort(t *testing.T) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddrPort(l.Addr().String())
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return a
}

// clientTransportGoroutines counts the goroutines of net/http's client
// side (connections of a Transport), the ones a probe could leave behind.
// Test servers' goroutines run net/http.(*conn).serve and are not counted.
func clientTransportGoroutines() int {
	buf := make([]byte, 1<<16)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for g := range bytes.SplitSeq(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte("net/http.(*persistConn)")) || bytes.Contains(g, []byte("net/http.(*Transport)")) {
			count++
		}
	}
	return count
}

// --- tcp -------------------------------------------------------------------

func TestTCPProbe(t *testing.T) {
	tests := []struct {
		name   string
		listen func(t *testing.T) netip.AddrPort
		want   Outcome
		check  func(t *testing.T, r Result)
	}{
		{
			name: "open port",
			listen: func(t *testing.T) netip.AddrPort {
				l, err := net.Listen("tcp4", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				done := make(chan struct{})
				go func() {
					defer close(done)
					for {
						c, err := l.Accept()
						if err != nil {
							return
						}
						c.Close()
					}
				}()
				t.Cleanup(func() { l.Close(); <-done })
				return netip.MustParseAddrPort(l.Addr().String())
			},
			want: OK,
		},
		{
			name:   "closed port",
			listen: closedPort,
			want:   Unreachable,
			check: func(t *testing.T, r Result) {
				// Refused at once by the kernel's RST, not by the deadline.
				if !errors.Is(r.Err, syscall.ECONNREFUSED) {
					t.Errorf("error %v, want ECONNREFUSED", r.Err)
				}
				if r.Latency > time.Second {
					t.Errorf("latency %v, want well under the %v deadline", r.Latency, probeTimeout)
				}
			},
		},
		{
			// A listener that never calls Accept, like a frozen process:
			// the kernel completes the handshake for the backlog anyway,
			// so a tcp check cannot tell it from a working server. That is
			// why http and https checks exist: they need an answer from
			// the application.
			name: "listener that never accepts",
			listen: func(t *testing.T) netip.AddrPort {
				l, err := net.Listen("tcp4", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { l.Close() })
				return netip.MustParseAddrPort(l.Addr().String())
			},
			want: OK,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			target := tc.listen(t)
			r := probe(t, vip.Health{Type: vip.CheckTCP}, target, probeTimeout)
			if r.Outcome != tc.want {
				t.Fatalf("probe %s: %v, want %v", target, r, tc.want)
			}
			if (r.Err == nil) != (tc.want == OK) {
				t.Errorf("probe %s: error %v with outcome %v", target, r.Err, r.Outcome)
			}
			if r.At.IsZero() {
				t.Errorf("result has no time")
			}
			if tc.check != nil {
				tc.check(t, r)
			}
		})
	}
}

// An http check of a listener that never accepts gets no answer: it is
// Unreachable by the deadline, where a tcp check says OK (above).
func TestHTTPProbeListenerThatNeverAccepts(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	r := probe(t, httpCheck(vip.CheckHTTP), netip.MustParseAddrPort(l.Addr().String()), 100*time.Millisecond)
	if r.Outcome != Unreachable || !errors.Is(r.Err, context.DeadlineExceeded) {
		t.Errorf("http probe of a listener that never accepts: %v, want unreachable by the deadline", r)
	}
}

func TestNoneProbe(t *testing.T) {
	r := probe(t, vip.Health{Type: vip.CheckNone}, closedPort(t), probeTimeout)
	if r.Outcome != OK || r.Err != nil {
		t.Errorf("none probe of a closed port: %v, want ok", r)
	}
}

// --- http ------------------------------------------------------------------

func TestHTTPProbe(t *testing.T) {
	tests := []struct {
		name     string
		path     string // health.path
		host     string // health.host
		expect   int    // health.expect_status
		handler  http.HandlerFunc
		want     Outcome
		wantErr  string // in the error; "" means no error
		wantPath string
		wantQry  string
		wantHost string // "" means the target's address
	}{
		{name: "200", path: "/", expect: 200, handler: status(200), want: OK, wantPath: "/"},
		{name: "500 is not ready", path: "/", expect: 200, handler: status(500), want: NotReady,
			wantErr: "HTTP status 500, want 200", wantPath: "/"},
		{name: "503 is not ready", path: "/", expect: 200, handler: status(503), want: NotReady,
			wantErr: "HTTP status 503", wantPath: "/"},
		{name: "expect_status 204 honoured", path: "/", expect: 204, handler: status(204), want: OK, wantPath: "/"},
		{name: "200 when 204 expected", path: "/", expect: 204, handler: status(200), want: NotReady,
			wantErr: "HTTP status 200, want 204", wantPath: "/"},
		{name: "custom Host header", path: "/", host: "api.example", expect: 200, handler: status(200), want: OK,
			wantPath: "/", wantHost: "api.example"},
		{name: "path used", path: "/readyz", expect: 200,
			handler: func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path != "/readyz" {
					w.WriteHeader(http.StatusNotFound)
				}
			},
			want: OK, wantPath: "/readyz"},
		{name: "path with query", path: "/readyz?verbose=1", expect: 200, handler: status(200), want: OK,
			wantPath: "/readyz", wantQry: "verbose=1"},
		{name: "wrong path is 404", path: "/nope", expect: 200, handler: http.NotFound, want: NotReady,
			wantErr: "HTTP status 404", wantPath: "/nope"},
		// A redirect is an answer judged by its status; it is not
		// followed (the server sees one request, never /elsewhere).
		{name: "302 not followed", path: "/", expect: 200,
			handler: func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/" {
					http.Redirect(w, r, "/elsewhere", http.StatusFound)
				}
			},
			want: NotReady, wantErr: "HTTP status 302, want 200", wantPath: "/"},
		{name: "302 expected", path: "/", expect: 302,
			handler: func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, "/elsewhere", http.StatusFound)
			},
			want: OK, wantPath: "/"},
		// The body is read (up to a bound), and a large one changes nothing.
		{name: "large body", path: "/", expect: 200,
			handler: func(w http.ResponseWriter, _ *http.Request) {
				w.Write(bytes.Repeat([]byte("x"), 1<<20))
			},
			want: OK, wantPath: "/"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, tc.handler, nil)
			h := vip.Health{Type: vip.CheckHTTP, Path: tc.path, Host: tc.host, ExpectStatus: tc.expect}
			r := probe(t, h, s.addr, probeTimeout)
			if r.Outcome != tc.want {
				t.Errorf("probe: %v, want %v", r, tc.want)
			}
			if tc.wantErr == "" && r.Err != nil {
				t.Errorf("probe error %v, want none", r.Err)
			}
			if tc.wantErr != "" && !strings.Contains(errText(r.Err), tc.wantErr) {
				t.Errorf("probe error %q, want it to contain %q", errText(r.Err), tc.wantErr)
			}
			reqs := s.requests()
			if len(reqs) != 1 {
				t.Fatalf("server saw %d requests %+v, want exactly 1", len(reqs), reqs)
			}
			got := reqs[0]
			wantHost := tc.wantHost
			if wantHost == "" {
				wantHost = s.addr.String()
			}
			if got.method != http.MethodGet || got.path != tc.wantPath || got.query != tc.wantQry || got.host != wantHost {
				t.Errorf("server saw %s %s?%s Host %s, want GET %s?%s Host %s",
					got.method, got.path, got.query, got.host, tc.wantPath, tc.wantQry, wantHost)
			}
		})
	}
}

// A backend that accepts the request but never answers: the probe returns
// by its deadline as Unreachable and leaves no client goroutine behind.
// One that sends its status and then stalls the body is judged by the
// status: the body read is bounded by the same deadline and its error
// ignored.
func TestHTTPProbeHungBackend(t *testing.T) {
	const timeout = 100 * time.Millisecond
	tests := []struct {
		name    string
		handler func(release <-chan struct{}) http.HandlerFunc
		want    Outcome
	}{
		{
			name: "no answer",
			handler: func(release <-chan struct{}) http.HandlerFunc {
				return func(http.ResponseWriter, *http.Request) { <-release }
			},
			want: Unreachable,
		},
		{
			name: "status then stalled body",
			handler: func(release <-chan struct{}) http.HandlerFunc {
				return func(w http.ResponseWriter, _ *http.Request) {
					w.WriteHeader(http.StatusOK)
					w.Write([]byte("partial"))
					w.(http.Flusher).Flush()
					<-release
				}
			},
			want: OK,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			release := make(chan struct{})
			s := newServer(t, tc.handler(release), nil)
			// Cleanups run last-in first-out: the hung handler is released
			// before the server's Close waits for it.
			t.Cleanup(func() { close(release) })

			p, err := NewProber(httpCheck(vip.CheckHTTP))
			if err != nil {
				t.Fatal(err)
			}
			before := clientTransportGoroutines()
			type result struct {
				r       Result
				elapsed time.Duration
			}
			res := make(chan result, 1)
			pctx, cancel := context.WithTimeout(t.Context(), timeout)
			defer cancel()
			go func() {
				start := time.Now()
				r := p.Probe(pctx, s.addr)
				res <- result{r, time.Since(start)}
			}()
			// While the probe waits, its connection's goroutines are
			// there to be counted: the leak check below is not vacuous.
			waitFor(t, 5*time.Second, "the request to reach the server", func() bool { return len(s.requests()) == 1 })
			if n := clientTransportGoroutines(); n <= before {
				t.Errorf("%d client goroutines during the probe, %d before: the count misses them", n, before)
			}
			out := <-res
			r, elapsed := out.r, out.elapsed
			t.Logf("probe: %v in %v", r, elapsed)
			if r.Outcome != tc.want {
				t.Errorf("probe: %v, want %v", r, tc.want)
			}
			if tc.want == Unreachable && !errors.Is(r.Err, context.DeadlineExceeded) {
				t.Errorf("probe error %v, want a deadline", r.Err)
			}
			if elapsed < timeout-10*time.Millisecond || elapsed > timeout+time.Second {
				t.Errorf("probe returned after %v, want about the %v deadline", elapsed, timeout)
			}
			if n := len(s.requests()); n != 1 {
				t.Errorf("server saw %d requests, want 1", n)
			}
			waitFor(t, 5*time.Second, "the probe's client goroutines to exit", func() bool {
				return clientTransportGoroutines() <= before
			})
		})
	}
}

// Every probe is a full GET (the server sees the request, with nftlb's
// User-Agent) on a connection of its own, which it closes.
func TestProbeSendsFullGETOnNewConnection(t *testing.T) {
	pki, files := getPKI(t)
	for _, typ := range []vip.CheckType{vip.CheckHTTP, vip.CheckHTTPS} {
		t.Run(string(typ), func(t *testing.T) {
			var cfg *tls.Config
			h := httpCheck(typ)
			if typ == vip.CheckHTTPS {
				cfg = &tls.Config{Certificates: []tls.Certificate{pki.server}}
				h.CAFile = files.ca
			}
			s := newServer(t, status(200), cfg)
			p, err := NewProber(h)
			if err != nil {
				t.Fatal(err)
			}
			const probes = 3
			for i := range probes {
				if r := probeWith(t, p, s.addr, probeTimeout); r.Outcome != OK {
					t.Fatalf("probe %d: %v", i, r)
				}
			}
			if n := s.conns.Load(); n != probes {
				t.Errorf("server accepted %d connections for %d probes, want one each", n, probes)
			}
			reqs := s.requests()
			if len(reqs) != probes {
				t.Fatalf("server saw %d requests, want %d", len(reqs), probes)
			}
			for i, r := range reqs {
				if r.method != http.MethodGet || r.userAgent != "nftlb-health-check" || !r.close {
					t.Errorf("request %d: %s User-Agent %q Connection: close %v, want GET, nftlb-health-check, true",
						i, r.method, r.userAgent, r.close)
				}
			}
		})
	}
}

// --- https -----------------------------------------------------------------

func TestHTTPSProbe(t *testing.T) {
	pki, files := getPKI(t)
	var (
		unknownAuthority x509.UnknownAuthorityError
		hostname         x509.HostnameError
		invalid          x509.CertificateInvalidError
	)
	tests := []struct {
		name       string
		cert       tls.Certificate // the server's
		clientAuth bool            // the server requires a client certificate from the CA
		health     func(h *vip.Health)
		want       Outcome
		wantErr    any    // errors.As target, nil for none
		wantSNI    string // what the server saw, when it saw a request
	}{
		{name: "ca_file", cert: pki.server, health: func(h *vip.Health) { h.CAFile = files.ca }, want: OK},
		// Rejecting the certificate is an answer: the backend is there.
		{name: "no ca_file, no skip_verify", cert: pki.server, health: func(*vip.Health) {},
			want: NotReady, wantErr: &unknownAuthority},
		{name: "tls_skip_verify", cert: pki.server, health: func(h *vip.Health) { h.TLSSkipVerify = true }, want: OK},
		{name: "server_name matches", cert: pki.server,
			health: func(h *vip.Health) { h.CAFile, h.ServerName = files.ca, "api.example" }, want: OK, wantSNI: "api.example"},
		{name: "server_name mismatch", cert: pki.server,
			health: func(h *vip.Health) { h.CAFile, h.ServerName = files.ca, "other.example" },
			want:   NotReady, wantErr: &hostname},
		{name: "expired certificate", cert: pki.expired, health: func(h *vip.Health) { h.CAFile = files.ca },
			want: NotReady, wantErr: &invalid},
		{name: "expired certificate, tls_skip_verify", cert: pki.expired,
			health: func(h *vip.Health) { h.TLSSkipVerify = true }, want: OK},
		// host sets only the HTTP Host header: the certificate is checked
		// against the backend's address and no SNI is sent, so a backend
		// whose certificate names only a DNS name needs server_name.
		{name: "host only, certificate without the IP", cert: pki.dnsOnly,
			health: func(h *vip.Health) { h.CAFile, h.Host = files.ca, "api.example" },
			want:   NotReady, wantErr: &hostname},
		{name: "server_name, certificate without the IP", cert: pki.dnsOnly,
			health: func(h *vip.Health) { h.CAFile, h.Host, h.ServerName = files.ca, "api.example", "api.example" },
			want:   OK, wantSNI: "api.example"},
		{name: "client certificate required and given", cert: pki.server, clientAuth: true,
			health: func(h *vip.Health) { h.CAFile, h.CertFile, h.KeyFile = files.ca, files.cert, files.key }, want: OK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := &tls.Config{Certificates: []tls.Certificate{tc.cert}}
			if tc.clientAuth {
				cfg.ClientAuth, cfg.ClientCAs = tls.RequireAndVerifyClientCert, pki.caPool
			}
			s := newServer(t, status(200), cfg)
			h := httpCheck(vip.CheckHTTPS)
			tc.health(&h)
			r := probe(t, h, s.addr, probeTimeout)
			if r.Outcome != tc.want {
				t.Errorf("probe: %v, want %v", r, tc.want)
			}
			if tc.wantErr == nil && r.Err != nil {
				t.Errorf("probe error %v, want none", r.Err)
			}
			if tc.wantErr != nil && !errors.As(r.Err, tc.wantErr) {
				t.Errorf("probe error %v (%T), want a %T", r.Err, r.Err, tc.wantErr)
			}
			reqs := s.requests()
			if tc.want != OK {
				if len(reqs) != 0 {
					t.Errorf("server saw %d requests through a rejected handshake", len(reqs))
				}
				return
			}
			if len(reqs) != 1 {
				t.Fatalf("server saw %d requests, want 1", len(reqs))
			}
			if reqs[0].sni != tc.wantSNI {
				t.Errorf("server saw SNI %q, want %q", reqs[0].sni, tc.wantSNI)
			}
			if tc.clientAuth && reqs[0].clientCN != clientCN {
				t.Errorf("server saw client certificate %q, want %q", reqs[0].clientCN, clientCN)
			}
		})
	}
}

// A server that requires a client certificate refuses a probe without one
// with a TLS alert ("handshake failure" in TLS 1.2; "certificate required"
// in TLS 1.3, after the client's side of the handshake is done). The probe
// must fail, as NotReady: the backend answered, and a probe's missing
// certificate must drain, not reset every client of every backend.
func TestHTTPSProbeMissingClientCert(t *testing.T) {
	pki, files := getPKI(t)
	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		t.Run(tls.VersionName(version), func(t *testing.T) {
			cfg := &tls.Config{Certificates: []tls.Certificate{pki.server}, ClientAuth: tls.RequireAndVerifyClientCert,
				ClientCAs: pki.caPool, MinVersion: version, MaxVersion: version}
			s := newServer(t, status(200), cfg)
			h := httpCheck(vip.CheckHTTPS)
			h.CAFile = files.ca
			r := probe(t, h, s.addr, probeTimeout)
			t.Logf("probe without a client certificate: %v", r)
			if r.Outcome == OK {
				t.Fatalf("probe: %v, want a failure", r)
			}
			// crypto/tls reports a received alert as a *net.OpError with Op
			// "remote error" (tls.AlertError is for QUIC only).
			var op *net.OpError
			if !errors.As(r.Err, &op) || op.Op != "remote error" {
				t.Errorf("probe error %v, want the server's TLS alert", r.Err)
			}
			if r.Outcome != NotReady {
				t.Errorf("probe: %v, want not-ready (the server answered with an alert)", r)
			}
			if n := len(s.requests()); n != 0 {
				t.Errorf("server saw %d requests, want none", n)
			}
		})
	}
}

// An https check of a plain http server: the backend answers, but not
// with TLS: not ready.
func TestHTTPSProbeOfPlainHTTPServer(t *testing.T) {
	s := newServer(t, status(200), nil)
	h := httpCheck(vip.CheckHTTPS)
	h.TLSSkipVerify = true
	r := probe(t, h, s.addr, probeTimeout)
	t.Logf("https probe of an http server: %v", r)
	if r.Outcome != NotReady {
		t.Errorf("probe: %v, want not-ready", r)
	}
}

// --- NewProber ---------------------------------------------------------------

func TestNewProberErrors(t *testing.T) {
	_, files := getPKI(t)
	notPEM := filepath.Join(files.dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(files.dir, "missing.pem")
	tests := []struct {
		name   string
		health func(h *vip.Health)
		want   []string // in the error
	}{
		{name: "ca_file missing", health: func(h *vip.Health) { h.CAFile = missing },
			want: []string{"health.ca_file", missing}},
		{name: "ca_file is a directory", health: func(h *vip.Health) { h.CAFile = files.dir },
			want: []string{"health.ca_file"}},
		{name: "ca_file without PEM", health: func(h *vip.Health) { h.CAFile = notPEM },
			want: []string{"health.ca_file", notPEM, "no PEM certificate"}},
		{name: "ca_file with a key, no certificate", health: func(h *vip.Health) { h.CAFile = files.key },
			want: []string{"health.ca_file", "no PEM certificate"}},
		{name: "key does not match certificate", health: func(h *vip.Health) { h.CertFile, h.KeyFile = files.cert, files.otherKey },
			want: []string{"health.cert_file/key_file"}},
		{name: "key_file missing", health: func(h *vip.Health) { h.CertFile, h.KeyFile = files.cert, missing },
			want: []string{"health.cert_file/key_file", missing}},
		{name: "cert_file not PEM", health: func(h *vip.Health) { h.CertFile, h.KeyFile = notPEM, files.key },
			want: []string{"health.cert_file/key_file"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := httpCheck(vip.CheckHTTPS)
			tc.health(&h)
			p, err := NewProber(h)
			if err == nil {
				t.Fatalf("NewProber(%+v) = %T, want an error", h, p)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}

	// The same files, valid, build a prober.
	h := httpCheck(vip.CheckHTTPS)
	h.CAFile, h.CertFile, h.KeyFile = files.ca, files.cert, files.key
	if _, err := NewProber(h); err != nil {
		t.Errorf("NewProber with valid files: %v", err)
	}
}

// Probe connections close with a reset, leaving no TIME_WAIT socket on the
// LB: at thousands of probes a second those exhaust ports and conntrack.
func TestProbesLeaveNoTimeWait(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c); c.Close() }() // says nothing, closes after the peer
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	target := netip.MustParseAddrPort(ln.Addr().String())
	for _, typ := range []vip.CheckType{vip.CheckTCP, vip.CheckHTTP} {
		h := httpCheck(typ)
		if typ == vip.CheckTCP {
			h = vip.Health{Type: vip.CheckTCP}
		}
		p, err := NewProber(h)
		if err != nil {
			t.Fatal(err)
		}
		for range 10 {
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			p.Probe(ctx, target)
			cancel()
		}
	}
	// /proc/net/tcp: "sl local rem st ..." with hex ports; state 06 = TIME_WAIT.
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && f[3] == "06" && strings.HasSuffix(f[2], fmt.Sprintf(":%04X", port)) {
			n++
		}
	}
	if n != 0 {
		t.Errorf("%d TIME_WAIT sockets towards the probed port after 20 probes, want 0", n)
	}
}
