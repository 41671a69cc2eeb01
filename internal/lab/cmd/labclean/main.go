// Command labclean deletes the network namespaces left behind by lab tests
// that crashed or were killed before Lab.Close ran (see lab.CleanupStale).
// Run it only when no lab tests are running:
//
//	go run ./internal/lab/cmd/labclean
package main

import (
	"fmt"
	"os"

	"github.com/nftlb/nftlb/internal/lab"
)

func main() {
	if err := lab.CleanupStale(); err != nil {
		fmt.Fprintln(os.Stderr, "labclean:", err)
		os.Exit(1)
	}
}
