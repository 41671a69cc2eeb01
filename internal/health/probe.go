package health

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nftlb/nftlb/internal/vip"
)

// Prober runs one check against a backend. It must return by the
// context's deadline; the Manager sets one per probe.
type Prober interface {
	Probe(ctx context.Context, target netip.AddrPort) Result
}

// NewProber builds the prober a health config asks for. It reads TLS
// files now, so a bad ca_file or key pair fails a reload before anything
// changes rather than on the first probe.
func NewProber(h vip.Health) (Prober, error) {
	switch h.Type {
	case vip.CheckNone:
		return noneProber{}, nil
	case vip.CheckHTTP, vip.CheckHTTPS:
		return newHTTPProber(h)
	default:
		return tcpProber{}, nil
	}
}

type noneProber struct{}

func (noneProber) Probe(context.Context, netip.AddrPort) Result {
	return Result{Outcome: OK, At: time.Now()}
}

// dialer forces plain TCP (Go's default may use MPTCP) and closes every
// probe connection with a reset (SO_LINGER 0), as HAProxy's checks do: a
// normal close leaves a TIME_WAIT socket on the LB per probe, and at 3,000
// probes a second against few distinct backends those exhausted the source
// ports and conntrack in the lab (CPU to 190%, mass false "down"). It
// turns TCP keep-alive off: a probe's connection lives for one exchange,
// and Go's default costs four setsockopt calls per probe.
var dialer = func() *net.Dialer {
	d := &net.Dialer{KeepAlive: -1, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptLinger(int(fd), syscall.SOL_SOCKET, syscall.SO_LINGER, &lingerReset)
		})
		return errors.Join(err, serr)
	}}
	d.SetMultipathTCP(false)
	return d
}()

var lingerReset = syscall.Linger{Onoff: 1, Linger: 0}

type tcpProber struct{}

func (tcpProber) Probe(ctx context.Context, target netip.AddrPort) Result {
	start := time.Now()
	c, err := dialer.DialContext(ctx, "tcp4", target.String())
	if err != nil {
		return done(start, Unreachable, err)
	}
	_ = c.Close()
	return done(start, OK, nil)
}

func done(start time.Time, o Outcome, err error) Result {
	now := time.Now()
	return Result{Outcome: o, Err: err, Latency: now.Sub(start), At: now}
}

type httpProber struct {
	scheme string
	path   string
	host   string
	expect int
	client *http.Client
}

func newHTTPProber(h vip.Health) (*httpProber, error) {
	p := &httpProber{scheme: string(h.Type), path: h.Path, host: h.Host, expect: h.ExpectStatus}
	tr := &http.Transport{
		// A new connection per probe: a kept-alive one would hide a
		// backend that no longer accepts connections, and its state would
		// outlive a frozen server.
		DisableKeepAlives:  true,
		DialContext:        dialer.DialContext,
		Proxy:              nil,
		DisableCompression: true,
	}
	if h.Type == vip.CheckHTTPS {
		cfg, err := tlsConfig(h)
		if err != nil {
			return nil, err
		}
		tr.TLSClientConfig = cfg
	}
	p.client = &http.Client{
		Transport: tr,
		// A redirect is an answer, judged by its status like any other.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return p, nil
}

func tlsConfig(h vip.Health) (*tls.Config, error) {
	cfg := &tls.Config{InsecureSkipVerify: h.TLSSkipVerify, ServerName: h.ServerName, MinVersion: tls.VersionTLS12}
	if h.CAFile != "" {
		pem, err := os.ReadFile(h.CAFile)
		if err != nil {
			return nil, fmt.Errorf("health.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("health.ca_file %s: no PEM certificate in it", h.CAFile)
		}
		cfg.RootCAs = pool
	}
	if h.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(h.CertFile, h.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("health.cert_file/key_file: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// maxBody bounds what a probe reads: enough to finish a /readyz answer,
// never a backend's idea of a large page.
const maxBody = 4096

func (p *httpProber) Probe(ctx context.Context, target netip.AddrPort) Result {
	start := time.Now()
	url := p.scheme + "://" + net.JoinHostPort(target.Addr().String(), strconv.Itoa(int(target.Port()))) + p.path
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return done(start, Unreachable, err)
	}
	if p.host != "" {
		req.Host = p.host
	}
	req.Header.Set("User-Agent", "nftlb-health-check")
	resp, err := p.client.Do(req)
	if err != nil {
		return done(start, classify(err), err)
	}
	_, _ = io.CopyN(io.Discard, resp.Body, maxBody)
	_ = resp.Body.Close()
	if resp.StatusCode != p.expect {
		return done(start, NotReady, fmt.Errorf("HTTP status %d, want %d", resp.StatusCode, p.expect))
	}
	return done(start, OK, nil)
}

// classify tells an answer that is not acceptable from no answer. A
// backend that rejects or is rejected in the TLS handshake (a server
// certificate the probe does not trust, a TLS alert such as "certificate
// required", plain HTTP on an https check) is there: drain it, don't reset
// its clients, because a probe misconfiguration would otherwise reset every
// client of every backend. Everything else that prevents an answer
// (refused, reset, timeout, unroutable) is unreachable.
func classify(err error) Outcome {
	var (
		unknownAuthority x509.UnknownAuthorityError
		hostname         x509.HostnameError
		invalid          x509.CertificateInvalidError
		verify           *tls.CertificateVerificationError
		header           tls.RecordHeaderError
		op               *net.OpError
	)
	switch {
	case errors.As(err, &unknownAuthority), errors.As(err, &hostname), errors.As(err, &invalid),
		errors.As(err, &verify), errors.As(err, &header):
		return NotReady
	case errors.As(err, &op) && op.Op == "remote error": // crypto/tls: an alert from the server
		return NotReady
	case strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"): // net/http drops the RecordHeaderError
		return NotReady
	}
	return Unreachable
}
