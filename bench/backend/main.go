// Command backend is the HTTP server bench/dataplane runs in each backend
// namespace of its lab. It serves
//
//	GET /small  a 64-byte body
//	GET /big    a 10 MiB body, written from one buffer allocated at start
//
// over HTTP/1.1 with keep-alive (a request with "Connection: close", or an
// HTTP/1.0 request without "Connection: keep-alive", gets its response and
// then the server closes the connection: the server side closes first, as
// a web server does).
//
// It is deliberately not net/http: a hand-written request reader and
// precomputed responses keep the server's CPU per request small, so that
// on a 2-core VM the backends are not what limits the load balancers under
// test. It runs with GOMAXPROCS 1 (-procs) so its CPU use is one core at
// most and easy to read from /proc.
//
//	backend -listen 198.18.1.11:8080
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"syscall"
)

const (
	smallSize = 64
	bigSize   = 10 << 20
	maxHeader = 16 << 10 // bytes of request line + headers we accept
)

var (
	smallBody = append(bytes.Repeat([]byte("x"), smallSize-1), '\n')
	bigBody   []byte // allocated in main
)

func main() {
	listen := flag.String("listen", ":8080", "TCP address to serve HTTP on")
	procs := flag.Int("procs", 1, "GOMAXPROCS")
	flag.Parse()
	runtime.GOMAXPROCS(*procs)
	bigBody = bytes.Repeat([]byte("0123456789abcdef"), bigSize/16)

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "backend:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "backend: serving http on %s (GOMAXPROCS %d)\n", ln.Addr(), runtime.GOMAXPROCS(0))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	go func() {
		<-sig
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: keep serving the connections we have.
			continue
		}
		go serve(c)
	}
}

// request is what we need of one HTTP request.
type request struct {
	method, path string
	keepAlive    bool
	bodyLen      int64
}

func serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 4096)
	for {
		req, err := readRequest(r)
		if err != nil {
			if !errors.Is(err, io.EOF) && !isReset(err) {
				writeStatus(c, 400, "Bad Request")
			}
			return
		}
		if req.bodyLen > 0 {
			if _, err := io.CopyN(io.Discard, r, req.bodyLen); err != nil {
				return
			}
		}
		if err := respond(c, req); err != nil || !req.keepAlive {
			return
		}
	}
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, net.ErrClosed)
}

// readRequest reads a request line and headers. It returns io.EOF for a
// connection closed between requests (a health check's connect-close).
func readRequest(r *bufio.Reader) (request, error) {
	var req request
	n := 0
	line, err := readLine(r, &n)
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) && n == 0 {
			return req, io.EOF
		}
		return req, err
	}
	f := bytes.Fields(line)
	if len(f) != 3 || !bytes.HasPrefix(f[2], []byte("HTTP/1.")) {
		return req, fmt.Errorf("bad request line %q", line)
	}
	req.method, req.path = string(f[0]), string(f[1])
	http11 := string(f[2]) != "HTTP/1.0"
	req.keepAlive = http11
	for {
		line, err := readLine(r, &n)
		if err != nil {
			return req, err
		}
		if len(line) == 0 {
			return req, nil
		}
		k, v, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return req, fmt.Errorf("bad header line %q", line)
		}
		v = bytes.TrimSpace(v)
		switch {
		case bytes.EqualFold(k, []byte("Connection")):
			switch {
			case bytes.EqualFold(v, []byte("close")):
				req.keepAlive = false
			case bytes.EqualFold(v, []byte("keep-alive")):
				req.keepAlive = true
			}
		case bytes.EqualFold(k, []byte("Content-Length")):
			cl, err := strconv.ParseInt(string(v), 10, 64)
			if err != nil || cl < 0 {
				return req, fmt.Errorf("bad Content-Length %q", v)
			}
			req.bodyLen = cl
		}
	}
}

// readLine returns one line without its CR LF, counting bytes into *n
// and refusing more than maxHeader in total. EOF before a full line is
// io.ErrUnexpectedEOF.
func readLine(r *bufio.Reader, n *int) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	*n += len(line)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil, io.ErrUnexpectedEOF
		}
		return nil, err
	}
	if *n > maxHeader {
		return nil, errors.New("request header too large")
	}
	return bytes.TrimRight(line, "\r\n"), nil
}

// Precomputed response heads.
var (
	smallHead      = head(smallSize, true)
	smallHeadClose = head(smallSize, false)
	bigHead        = head(bigSize, true)
	bigHeadClose   = head(bigSize, false)
	smallResp      = append(slices.Clone(smallHead), smallBody...)
	smallRespClose = append(slices.Clone(smallHeadClose), smallBody...)
)

func head(n int, keepAlive bool) []byte {
	conn := "keep-alive"
	if !keepAlive {
		conn = "close"
	}
	return fmt.Appendf(nil, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n", n, conn)
}

func respond(c net.Conn, req request) error {
	if req.method != "GET" && req.method != "HEAD" {
		return writeStatus(c, 405, "Method Not Allowed")
	}
	var h, body []byte
	switch req.path {
	case "/small":
		h, body = smallHead, smallBody
		if !req.keepAlive {
			h = smallHeadClose
		}
	case "/big":
		h, body = bigHead, bigBody
		if !req.keepAlive {
			h = bigHeadClose
		}
	default:
		return writeStatus(c, 404, "Not Found")
	}
	if req.method == "HEAD" {
		_, err := c.Write(h)
		return err
	}
	if len(body) == smallSize {
		// Head and body in one write, one segment.
		resp := smallResp
		if !req.keepAlive {
			resp = smallRespClose
		}
		_, err := c.Write(resp)
		return err
	}
	bufs := net.Buffers{h, body}
	_, err := bufs.WriteTo(c)
	return err
}

func writeStatus(c net.Conn, code int, text string) error {
	body := text + "\n"
	_, err := fmt.Fprintf(c, "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", code, text, len(body), body)
	if err == nil {
		err = errors.New("closing after an error response")
	}
	return err
}
