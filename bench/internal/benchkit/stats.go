package benchkit

import (
	"slices"
	"time"
)

// Median of durations, the mean of the middle two for an even count; -1
// (printed as "-", "not measured") for none.
func Median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return -1
	}
	return median(ds)
}

// MedianFloat is Median for float64s; 0 for none.
func MedianFloat(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	return median(xs)
}

// median of a non-empty slice; integer types round the mean of the
// middle two towards zero.
func median[T ~int64 | ~float64](xs []T) T {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// Quantile by nearest rank: the smallest value with at least q of the
// samples at or below it (p99 of 50 samples is the largest); -1 for none.
func Quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return -1
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*q+0.999999) - 1
	return s[max(0, min(i, len(s)-1))]
}

// Pct is part in % of whole (CPU time over wall time: % of one core); 0
// when whole is not positive.
func Pct(part, whole time.Duration) float64 {
	if whole <= 0 {
		return 0
	}
	return 100 * float64(part) / float64(whole)
}
