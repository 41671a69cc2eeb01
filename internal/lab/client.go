package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// Who connects over TCP from namespace from to addr ("ip:port"), reads the
// greeting line of a who server ([Backend.ServeTCP]) and returns the
// backend's name and the client address the backend saw. Give ctx a
// deadline: a hung backend never greets.
func (l *Lab) Who(ctx context.Context, from *NS, addr string) (backend, remote string, err error) {
	c, err := from.Dial(ctx, "tcp", addr)
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	stop := bindConn(ctx, c)
	defer stop()
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", "", ctxErr(ctx, fmt.Errorf("lab: who %s: read greeting: %w", addr, err))
	}
	return parseWho(line)
}

// WhoUDP sends one datagram from namespace from to addr ("ip:port") and
// returns the name and the client address from the reply of a UDP server
// ([Backend.ServeUDP]). Each call uses a new socket (so a new source port
// and a new conntrack entry). It does not retransmit: give ctx a deadline.
func (l *Lab) WhoUDP(ctx context.Context, from *NS, addr string) (backend, remote string, err error) {
	c, err := from.Dial(ctx, "udp", addr)
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	stop := bindConn(ctx, c)
	defer stop()
	if _, err := io.WriteString(c, "who\n"); err != nil {
		return "", "", ctxErr(ctx, fmt.Errorf("lab: who udp %s: send: %w", addr, err))
	}
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		return "", "", ctxErr(ctx, fmt.Errorf("lab: who udp %s: read reply: %w", addr, err))
	}
	return parseWho(string(buf[:n]))
}

// WhoHTTP GETs url from namespace from over a new connection (no
// keep-alive, no proxy) and returns the name and client address from the
// body of an HTTP server ([Backend.ServeHTTP]). A status other than 200 is
// an error.
func (l *Lab) WhoHTTP(ctx context.Context, from *NS, url string) (backend, remote string, err error) {
	body, err := l.Get(ctx, from, url)
	if err != nil {
		return "", "", err
	}
	return parseWho(body)
}

// Get GETs url from namespace from over a new connection (no keep-alive,
// no proxy) and returns the body; a status other than 200 is an error that
// includes the status and the body.
func (l *Lab) Get(ctx context.Context, from *NS, url string) (string, error) {
	tr := &http.Transport{
		// The transport dials on its own goroutines, so it must go
		// through NS.Dial to get a socket in the right namespace.
		DialContext:       from.Dial,
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20)) // /metrics of 1,000 pools is ~2 MB
	if err != nil {
		return "", fmt.Errorf("lab: GET %s: read body: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return string(body), &HTTPStatusError{URL: url, StatusCode: resp.StatusCode, Body: string(body)}
	}
	return string(body), nil
}

// HTTPStatusError is returned by Get and WhoHTTP for a status other than 200.
type HTTPStatusError struct {
	URL        string
	StatusCode int
	Body       string
}

func (e *HTTPStatusError) Error() string {
	return fmt.Sprintf("lab: GET %s: status %d: %s", e.URL, e.StatusCode, strings.TrimSpace(e.Body))
}

// parseWho splits a "NAME REMOTEADDR\n" greeting.
func parseWho(line string) (backend, remote string, err error) {
	f := strings.Fields(line)
	if len(f) != 2 {
		return "", "", fmt.Errorf("lab: unexpected greeting %q", line)
	}
	return f[0], f[1], nil
}

// bindConn applies ctx's deadline to c and makes canceling ctx unblock
// c's reads and writes. Call the returned func when done.
func bindConn(ctx context.Context, c net.Conn) (stop func() bool) {
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	return context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
}

// ctxErr prefers ctx's error when ctx is done (the I/O error then only
// says "i/o timeout"), keeping err's text.
func ctxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		return fmt.Errorf("%w (%w)", err, cerr)
	}
	return err
}
