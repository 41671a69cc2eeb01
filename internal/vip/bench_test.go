package vip

import (
	"fmt"
	"strings"
	"testing"
)

// BenchmarkParse: a 10,000-pool file (1.2 MB), the size bench/controlplane
// cold-applies; nftlb parses it before anything else at start and reload.
func BenchmarkParse(b *testing.B) {
	var sb strings.Builder
	sb.WriteString("pools:\n")
	for i := range 10000 {
		fmt.Fprintf(&sb, "  - name: p%05d\n    vip: 198.18.%d.%d\n    port: 443\n    backends: [198.18.1.11:443, 198.18.1.12:443, 198.18.1.13:443]\n",
			i, 128+i/250, 1+i%250)
	}
	data := []byte(sb.String())
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := Parse("bench.yaml", data); err != nil {
			b.Fatal(err)
		}
	}
}
