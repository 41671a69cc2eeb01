//go:build race

package e2e

// raceEnabled: the test binary was built with -race, so the daemon under
// test is too (its loop, HTTP handlers and probe goroutines together).
const raceEnabled = true
