package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
)

func TestReason(t *testing.T) {
	op := func(err error) error { return &net.OpError{Op: "dial", Net: "tcp", Err: err} }
	tests := []struct {
		r    Result
		want string
	}{
		{Result{Outcome: OK}, "ok"},
		{Result{Outcome: Unreachable, Err: op(syscall.ECONNREFUSED)}, "refused"},
		{Result{Outcome: Unreachable, Err: op(syscall.ECONNRESET)}, "reset"},
		{Result{Outcome: Unreachable, Err: fmt.Errorf("no answer within 1s: %w", context.DeadlineExceeded)}, "timeout"},
		{Result{Outcome: Unreachable, Err: op(syscall.EHOSTUNREACH)}, "unreachable"},
		{Result{Outcome: NotReady, Err: errors.New("HTTP status 500, want 200")}, "http_status"},
		{Result{Outcome: NotReady, Err: errors.New("x509: certificate signed by unknown authority")}, "tls"},
		{Result{Outcome: Unreachable, Err: errors.New("something else")}, "other"},
	}
	for _, tt := range tests {
		if got := Reason(tt.r); got != tt.want {
			t.Errorf("Reason(%v) = %s, want %s", tt.r, got, tt.want)
		}
	}
}
