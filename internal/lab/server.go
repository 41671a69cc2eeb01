package lab

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
)

// Backend is one backend host of a lab.
type Backend struct {
	// Name is "b1", "b2", ...; servers greet with it.
	Name string
	// NS is the backend's namespace (<prefix>-bI).
	NS *NS
	// Addr is 198.18.1.(10+I), on the backend's eth0.
	Addr netip.Addr

	index int
	lab   *Lab

	mu      sync.Mutex
	servers []*Server
	closed  bool
}

// lbPort is the name of the backend's port on the LB bridge.
func (b *Backend) lbPort() string { return "vb" + strconv.Itoa(b.index) }

// AddrPort returns Addr:port.
func (b *Backend) AddrPort(port uint16) netip.AddrPort { return netip.AddrPortFrom(b.Addr, port) }

// SetLink sets the backend's eth0 up or down, as if its cable were
// (un)plugged. Down: the backend is unreachable (packets to it are dropped,
// connects time out). Up: the link comes back, the backend's default route
// (which the kernel removed with the link) is restored, and SetLink waits
// until the LB's bridge port forwards again.
func (b *Backend) SetLink(up bool) error {
	if !up {
		return ipBatch(b.NS.Name, []string{"link set " + BackendIf + " down"})
	}
	err := ipBatch(b.NS.Name, []string{
		"link set " + BackendIf + " up",
		fmt.Sprintf("route replace default via %s dev %s", lbBackendAddr, BackendIf),
	})
	if err != nil {
		return err
	}
	return b.lab.waitLinks(map[string]bool{b.lbPort(): true})
}

// ServeTCP starts a "who" server on 0.0.0.0:port (0: any free port): on
// accept it writes "NAME REMOTEADDR\n" (REMOTEADDR = ip:port of the peer as
// the backend sees it), then echoes every line it receives until the peer
// closes.
func (b *Backend) ServeTCP(port uint16) (*Server, error) {
	ln, err := b.NS.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		return nil, fmt.Errorf("lab: %s: listen tcp %d: %w", b.Name, port, err)
	}
	s := b.newServer("tcp", ln.Addr())
	s.ln = &countingListener{Listener: ln, n: &s.accepted}
	s.wg.Go(s.serveWho)
	return s, b.track(s)
}

// ServeHTTP starts an HTTP server on 0.0.0.0:port: GET / (any path but
// /readyz) answers "NAME REMOTEADDR\n"; GET /readyz answers 200 "ok", or 500
// "not ready" after SetReady(false).
func (b *Backend) ServeHTTP(port uint16) (*Server, error) {
	ln, err := b.NS.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		return nil, fmt.Errorf("lab: %s: listen http %d: %w", b.Name, port, err)
	}
	s := b.newServer("http", ln.Addr())
	s.ln = &countingListener{Listener: ln, n: &s.accepted}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		s.gateHTTP(r)
		if !s.ready.Load() {
			http.Error(w, "not ready", http.StatusInternalServerError)
			return
		}
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.gateHTTP(r)
		fmt.Fprintf(w, "%s %s\n", s.name, r.RemoteAddr)
	})
	s.http = &http.Server{
		Handler:  mux,
		ErrorLog: log.New(io.Discard, "", 0),
		ConnState: func(_ net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				s.httpConns.Add(1)
			case http.StateClosed, http.StateHijacked:
				s.httpConns.Done()
			}
		},
	}
	s.wg.Go(func() { s.http.Serve(s.ln) })
	return s, b.track(s)
}

// ServeUDP starts a UDP server on 0.0.0.0:port that answers every datagram
// with "NAME REMOTEADDR\n".
func (b *Backend) ServeUDP(port uint16) (*Server, error) {
	pc, err := b.NS.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		return nil, fmt.Errorf("lab: %s: listen udp %d: %w", b.Name, port, err)
	}
	s := b.newServer("udp", pc.LocalAddr())
	s.pc = pc
	s.wg.Go(s.serveUDP)
	return s, b.track(s)
}

func (b *Backend) newServer(kind string, addr net.Addr) *Server {
	s := &Server{
		name:  b.Name,
		kind:  kind,
		conns: map[net.Conn]struct{}{},
		done:  make(chan struct{}),
	}
	s.ready.Store(true)
	s.addr = b.AddrPort(addrPort(addr))
	return s
}

// track registers s for closing by Lab.Close; a server started after the
// lab was closed is closed at once.
func (b *Backend) track(s *Server) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		s.Close()
		return errors.New("lab: backend " + b.Name + ": lab is closed")
	}
	b.servers = append(b.servers, s)
	return nil
}

func (b *Backend) closeServers() error {
	b.mu.Lock()
	b.closed = true
	servers := b.servers
	b.servers = nil
	b.mu.Unlock()
	var errs []error
	for _, s := range servers {
		errs = append(errs, s.Close())
	}
	return errors.Join(errs...)
}

func addrPort(a net.Addr) uint16 {
	switch a := a.(type) {
	case *net.TCPAddr:
		return uint16(a.Port)
	case *net.UDPAddr:
		return uint16(a.Port)
	}
	return 0
}

// Server is a test server running in a backend namespace. Its methods are
// safe for concurrent use.
type Server struct {
	name string
	kind string // "tcp", "http", "udp"
	addr netip.AddrPort

	ln        net.Listener   // tcp, http
	pc        net.PacketConn // udp
	http      *http.Server
	httpConns sync.WaitGroup // http connections not yet closed

	ready    atomic.Bool
	accepted atomic.Int64
	hung     gate

	mu     sync.Mutex
	conns  map[net.Conn]struct{} // tcp: open connections
	closed bool
	done   chan struct{} // closed by Close
	wg     sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

// Addr is the backend address and port the server listens on.
func (s *Server) Addr() netip.AddrPort { return s.addr }

// Port is the port the server listens on.
func (s *Server) Port() uint16 { return s.addr.Port() }

// Accepted returns the number of connections accepted so far (UDP:
// datagrams received, also while hung).
func (s *Server) Accepted() int64 { return s.accepted.Load() }

// SetReady sets what the HTTP server's /readyz answers: 200 when ready
// (the initial state), 500 when not. / is served either way. No effect on
// TCP and UDP servers.
func (s *Server) SetReady(ready bool) { s.ready.Store(ready) }

// SetHung hangs or resumes the server, as if the process were stopped:
// while hung it still accepts connections (and the kernel completes the
// handshakes), but it reads, writes and answers nothing: no greeting, no
// echo, no HTTP response, no UDP reply (datagrams are dropped). Resuming
// lets requests waiting on a still-open connection proceed.
func (s *Server) SetHung(hung bool) { s.hung.set(hung) }

// Close stops the server like a killed process: the listening socket is
// closed (later connects are refused) and every accepted connection is
// closed. It waits for all the server's goroutines to end. Idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		conns := s.conns
		s.conns = nil
		s.mu.Unlock()
		var errs []error
		switch s.kind {
		case "tcp":
			errs = append(errs, s.ln.Close())
			for c := range conns {
				c.Close()
			}
		case "http":
			errs = append(errs, s.http.Close())
		case "udp":
			errs = append(errs, s.pc.Close())
		}
		close(s.done) // releases handlers held by SetHung
		s.wg.Wait()
		if s.kind == "http" {
			// Serve has returned, so no connection can start any more.
			s.httpConns.Wait()
		}
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}

func (s *Server) serveWho() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // e.g. ECONNABORTED: keep serving
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Go(func() { s.handleWho(c) })
		s.mu.Unlock()
	}
}

func (s *Server) handleWho(c net.Conn) {
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
	}()
	if !s.hung.wait(s.done, nil) {
		return
	}
	if _, err := fmt.Fprintf(c, "%s %s\n", s.name, c.RemoteAddr()); err != nil {
		return
	}
	r := bufio.NewReader(c)
	for {
		if !s.hung.wait(s.done, nil) {
			return
		}
		line, err := r.ReadString('\n')
		if line != "" {
			if !s.hung.wait(s.done, nil) {
				return
			}
			if _, werr := io.WriteString(c, line); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// gateHTTP holds a request while the server is hung. If the server closes
// or the client goes away first, it aborts the request: the connection is
// dropped without a response (returning from the handler would send an
// empty 200).
func (s *Server) gateHTTP(r *http.Request) {
	if !s.hung.wait(s.done, r.Context().Done()) {
		panic(http.ErrAbortHandler)
	}
}

func (s *Server) serveUDP() {
	buf := make([]byte, 64<<10)
	for {
		_, from, err := s.pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // e.g. ECONNREFUSED from an earlier reply's ICMP
		}
		s.accepted.Add(1)
		if s.hung.isHung() {
			continue
		}
		fmt.Fprintf(udpWriter{s.pc, from}, "%s %s\n", s.name, from)
	}
}

type udpWriter struct {
	pc net.PacketConn
	to net.Addr
}

func (w udpWriter) Write(p []byte) (int, error) { return w.pc.WriteTo(p, w.to) }

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// gate blocks waiters while hung.
type gate struct {
	mu      sync.Mutex
	hung    bool
	release chan struct{} // closed when hung ends
}

func (g *gate) set(hung bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case hung && !g.hung:
		g.release = make(chan struct{})
	case !hung && g.hung:
		close(g.release)
	}
	g.hung = hung
}

func (g *gate) isHung() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.hung
}

// wait returns true at once if not hung, else when hung ends; false if
// done or stop (which may be nil) is closed first.
func (g *gate) wait(done, stop <-chan struct{}) bool {
	for {
		g.mu.Lock()
		hung, release := g.hung, g.release
		g.mu.Unlock()
		if !hung {
			return true
		}
		select {
		case <-release:
		case <-done:
			return false
		case <-stop:
			return false
		}
	}
}
