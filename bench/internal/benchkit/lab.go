package benchkit

import (
	"context"
	"time"

	"github.com/nftlb/nftlb/internal/lab"
)

// NewLab builds a lab (client, LB, backends b1..bN; internal/lab) and
// returns it with its teardown, to defer: the teardown logs a failure
// instead of returning it, since it runs on every way out, Ctrl-C included.
// what labels the progress lines ("part 1", "probe").
func NewLab(what string, backends int) (*lab.Lab, func(), error) {
	Progress("%s: building the lab (client, LB, %d backends)", what, backends)
	l, err := lab.New(lab.Options{Backends: backends})
	if err != nil {
		return nil, nil, err
	}
	Progress("%s: lab namespaces %s-*", what, l.Prefix)
	return l, func() {
		Progress("%s: tearing down the lab %s", what, l.Prefix)
		if err := l.Close(); err != nil {
			Progress("teardown: %v", err)
		}
	}, nil
}

// Who opens one connection from the lab's client to addr (a VIP) and
// returns the name of the backend that answered: a lab "who" server, which
// greets at once, or with http a lab HTTP server (GET /). within bounds
// the whole exchange.
func Who(ctx context.Context, l *lab.Lab, addr string, http bool, within time.Duration) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	var name string
	var err error
	if http {
		name, _, err = l.WhoHTTP(cctx, l.Client, "http://"+addr+"/")
	} else {
		name, _, err = l.Who(cctx, l.Client, addr)
	}
	return name, err
}
