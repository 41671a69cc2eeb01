// Package health decides which backends may take new connections. A
// Prober runs one bounded check; a Tracker turns results into states with
// rise/fall hysteresis (pure, no clock); a Manager schedules the probes of
// every backend (one probe for the pools that check the same backend the
// same way) and reports state changes as Events.
package health

import (
	"fmt"
	"time"
)

// State is a backend's health as far as new connections are concerned.
type State int

const (
	// Unknown: not probed yet. Not usable.
	Unknown State = iota
	// Up: takes new connections.
	Up
	// Unready: answers, but not as expected (e.g. /readyz 500 during an API
	// server's graceful shutdown). Drained: no new connections, existing
	// ones continue.
	Unready
	// Down: unreachable (refused, reset, timed out). No new connections,
	// and existing clients are reset so they reconnect elsewhere.
	Down
)

func (s State) String() string {
	switch s {
	case Up:
		return "up"
	case Unready:
		return "unready"
	case Down:
		return "down"
	}
	return "unknown"
}

// ParseState is the inverse of State.String (Unknown for anything else).
func ParseState(s string) State {
	for _, st := range []State{Up, Unready, Down} {
		if st.String() == s {
			return st
		}
	}
	return Unknown
}

// Outcome classifies one probe.
type Outcome int

const (
	OK          Outcome = iota
	NotReady            // an answer, but the wrong one
	Unreachable         // no answer: refused, reset, timeout, unroutable
)

func (o Outcome) String() string {
	switch o {
	case OK:
		return "ok"
	case NotReady:
		return "not-ready"
	}
	return "unreachable"
}

// Result is one probe's outcome.
type Result struct {
	Outcome Outcome
	Err     error // nil when OK
	Latency time.Duration
	At      time.Time // when the probe finished
}

func (r Result) String() string {
	if r.Err == nil {
		return fmt.Sprintf("%s in %v", r.Outcome, r.Latency.Round(time.Microsecond))
	}
	return fmt.Sprintf("%s: %v", r.Outcome, r.Err)
}

// Tracker applies rise/fall to a backend's probe results: it leaves Up
// after fall consecutive failures and returns after rise consecutive
// successes. The very first result decides at once, so at start-up nftlb
// neither sends traffic to a dead backend nor rejects traffic to a live one
// for rise intervals. An Unready backend that then stops answering becomes
// Down after fall unreachable results in a row, so one lost probe of a
// draining server does not reset its clients.
type Tracker struct {
	rise, fall int
	state      State
	since      time.Time
	okRun      int // consecutive OK results
	failRun    int // consecutive failures of either kind
	unreachRun int // consecutive Unreachable results
	last       Result
	changes    int
}

// NewTracker returns a tracker in state Unknown.
func NewTracker(rise, fall int) *Tracker {
	return &Tracker{rise: max(rise, 1), fall: max(fall, 1)}
}

// Observe records r and returns the state before it; changed reports a
// transition.
func (t *Tracker) Observe(r Result) (from State, changed bool) {
	from = t.state
	t.last = r
	next := t.state
	switch r.Outcome {
	case OK:
		t.okRun++
		t.failRun, t.unreachRun = 0, 0
		if t.state == Unknown || (t.state != Up && t.okRun >= t.rise) {
			next = Up
		}
	case NotReady:
		t.okRun, t.unreachRun = 0, 0
		t.failRun++
		if t.state == Unknown || (t.state == Up && t.failRun >= t.fall) {
			next = Unready
		}
	default:
		t.okRun = 0
		t.failRun++
		t.unreachRun++
		switch {
		case t.state == Unknown,
			t.state == Up && t.failRun >= t.fall,
			t.state == Unready && t.unreachRun >= t.fall:
			next = Down
		}
	}
	if next != t.state {
		t.state, t.since = next, r.At
		t.changes++
		return from, true
	}
	return from, false
}

// SetRiseFall changes the thresholds (on reload) without losing history.
func (t *Tracker) SetRiseFall(rise, fall int) { t.rise, t.fall = max(rise, 1), max(fall, 1) }

// State returns the current state.
func (t *Tracker) State() State { return t.state }

// Since returns when the current state began (zero while Unknown).
func (t *Tracker) Since() time.Time { return t.since }

// Last returns the latest result.
func (t *Tracker) Last() Result { return t.last }

// Transitions counts state changes so far.
func (t *Tracker) Transitions() int { return t.changes }
