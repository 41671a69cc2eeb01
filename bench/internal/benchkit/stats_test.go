package benchkit

import (
	"testing"
	"time"
)

func TestMedian(t *testing.T) {
	ms := time.Millisecond
	for _, c := range []struct {
		in   []time.Duration
		want time.Duration
	}{
		{nil, -1},
		{[]time.Duration{5 * ms}, 5 * ms},
		{[]time.Duration{3 * ms, 1 * ms, 2 * ms}, 2 * ms},
		{[]time.Duration{4 * ms, 1 * ms, 3 * ms, 2 * ms}, 2500 * time.Microsecond},
		{[]time.Duration{-1, 7 * ms}, 7*ms/2 - 1}, // -1 counts as a value; (-1+7ms)/2 rounds towards zero
	} {
		if got := Median(c.in); got != c.want {
			t.Errorf("Median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

func TestMedianDoesNotSortItsInput(t *testing.T) {
	in := []time.Duration{3, 1, 2}
	Median(in)
	Quantile(in, .5)
	MedianFloat([]float64{3, 1, 2})
	if in[0] != 3 || in[1] != 1 || in[2] != 2 {
		t.Errorf("input reordered: %v", in)
	}
}

func TestMedianFloat(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{1.5}, 1.5},
		{[]float64{9, 1, 5}, 5},
		{[]float64{1, 2, 4, 10}, 3},
	} {
		if got := MedianFloat(c.in); got != c.want {
			t.Errorf("MedianFloat(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

func TestQuantile(t *testing.T) {
	var fifty []time.Duration
	for i := 50; i >= 1; i-- {
		fifty = append(fifty, time.Duration(i))
	}
	for _, c := range []struct {
		in   []time.Duration
		q    float64
		want time.Duration
	}{
		{nil, .99, -1},
		{[]time.Duration{7}, .99, 7},
		{fifty, .99, 50}, // nearest rank: ceil(49.5) = 50th
		{fifty, .5, 25},
		{fifty, .9, 45},
		{fifty, 0, 1},
		{fifty, 1, 50},
		{[]time.Duration{1, 2, 3, 4}, .25, 1},
		{[]time.Duration{1, 2, 3, 4}, .26, 2},
	} {
		if got := Quantile(c.in, c.q); got != c.want {
			t.Errorf("Quantile(%d values, %v) = %v, want %v", len(c.in), c.q, got, c.want)
		}
	}
}

func TestPct(t *testing.T) {
	if got := Pct(time.Second, 4*time.Second); got != 25 {
		t.Errorf("Pct(1s, 4s) = %v", got)
	}
	if got := Pct(time.Second, 0); got != 0 {
		t.Errorf("Pct(1s, 0) = %v", got)
	}
}
