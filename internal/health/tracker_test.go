package health

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// seq runs a tracker over results written as a string: o = OK,
// n = NotReady, x = Unreachable. It returns the state after each result.
func seq(rise, fall int, results string) string {
	tr := NewTracker(rise, fall)
	var out []string
	for i, c := range results {
		r := Result{At: time.Unix(int64(i), 0)}
		switch c {
		case 'o':
			r.Outcome = OK
		case 'n':
			r.Outcome, r.Err = NotReady, errors.New("status 500")
		case 'x':
			r.Outcome, r.Err = Unreachable, errors.New("refused")
		}
		tr.Observe(r)
		out = append(out, tr.State().String())
	}
	return strings.Join(out, " ")
}

func TestTracker(t *testing.T) {
	tests := []struct {
		name       string
		rise, fall int
		results    string
		want       string
	}{
		{"first result decides: up", 2, 3, "o", "up"},
		{"first result decides: down", 2, 3, "x", "down"},
		{"first result decides: unready", 2, 3, "n", "unready"},
		{"fall consecutive failures take it out", 2, 3, "oxxx", "up up up down"},
		{"a success resets the failure count", 2, 3, "oxxoxxo", "up up up up up up up"},
		{"rise consecutive successes bring it back", 2, 3, "xoxoo", "down down down down up"},
		{"unready after fall not-ready answers", 2, 3, "onnn", "up up up unready"},
		{"mixed failures: the deciding one names the state", 2, 3, "oxxn", "up up up unready"},
		{"mixed failures: unreachable last", 2, 3, "onnx", "up up up down"},
		{"unready then unreachable fall times: down", 2, 3, "nxxx", "unready unready unready down"},
		{"unready, one lost probe does not reset clients", 2, 3, "nxnxn", "unready unready unready unready unready"},
		{"down does not become unready", 2, 3, "xnnnn", "down down down down down"},
		{"unready recovers with rise", 2, 3, "nooo", "unready unready up up"},
		{"rise=fall=1", 1, 1, "oxoxn", "up down up down down"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := seq(tt.rise, tt.fall, tt.results); got != tt.want {
				t.Errorf("%q with rise %d fall %d:\n got  %s\n want %s", tt.results, tt.rise, tt.fall, got, tt.want)
			}
		})
	}
}

func TestTrackerReportsTransitionsOnce(t *testing.T) {
	tr := NewTracker(2, 2)
	var changes []string
	for i, o := range []Outcome{OK, OK, Unreachable, Unreachable, Unreachable, OK, OK, OK} {
		from, changed := tr.Observe(Result{Outcome: o, At: time.Unix(int64(i), 0)})
		if changed {
			changes = append(changes, from.String()+">"+tr.State().String())
		}
	}
	if got := strings.Join(changes, " "); got != "unknown>up up>down down>up" {
		t.Errorf("transitions: %s", got)
	}
	if tr.Transitions() != 3 || !tr.Since().Equal(time.Unix(6, 0)) {
		t.Errorf("Transitions=%d Since=%v", tr.Transitions(), tr.Since())
	}
}
