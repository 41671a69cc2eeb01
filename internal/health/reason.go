package health

import (
	"context"
	"errors"
	"strings"
	"syscall"
)

// Reason sums a probe result up in one word from a fixed set, for a
// metric label whose cardinality must stay bounded: ok, refused, reset,
// timeout, unreachable, http_status, tls, other.
func Reason(r Result) string {
	err := r.Err
	switch {
	case r.Outcome == OK:
		return "ok"
	case err == nil:
		return "other"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT):
		return "timeout"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "unreachable"
	case strings.Contains(err.Error(), "HTTP status"):
		return "http_status"
	case r.Outcome == NotReady:
		return "tls"
	}
	return "other"
}
