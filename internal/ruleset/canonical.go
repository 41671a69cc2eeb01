package ruleset

import (
	"regexp"
	"slices"
	"strings"
)

var (
	counterValues = regexp.MustCompile(`packets \d+ bytes \d+`)
	mapTypeLine   = regexp.MustCompile(`^(type|typeof) .* : `)
	// typeof names expressions where type names data types.
	typeofData = strings.NewReplacer("ip daddr", "ipv4_addr", "tcp dport", "inet_service", "udp dport", "inet_service", "th dport", "inet_service")
)

// Canonical reduces an nft table listing (or Text's output) to a form in
// which two descriptions of the same table compare equal: counter values
// zeroed, set elements sorted one per line, top-level blocks sorted (the
// kernel lists objects in creation order, which differs after incremental
// changes), and a map's key type line kept only as its data type (netlink-made
// maps carry no typeof, so nft lists their integer key as "type 0").
func Canonical(listing string) string {
	var blocks []string
	var cur []string
	var header string
	inElements := false
	var els []string
	for _, raw := range strings.Split(listing, "\n") {
		line := strings.TrimSpace(raw)
		switch {
		case line == "":
			continue
		case strings.HasPrefix(line, "table "):
			header = line
			continue
		case inElements || strings.HasPrefix(line, "elements = {"):
			line = strings.TrimPrefix(line, "elements = {")
			closed := strings.HasSuffix(line, "}")
			line = strings.TrimSuffix(line, "}")
			for _, e := range strings.Split(line, ",") {
				if e = strings.TrimSpace(e); e != "" {
					els = append(els, counterValues.ReplaceAllString(e, "packets 0 bytes 0"))
				}
			}
			inElements = !closed
			if closed {
				slices.Sort(els)
				for _, e := range els {
					cur = append(cur, "element "+e)
				}
				els = nil
			}
			continue
		case mapTypeLine.MatchString(line):
			line = "data " + typeofData.Replace(mapTypeLine.ReplaceAllString(line, ""))
		}
		line = counterValues.ReplaceAllString(line, "packets 0 bytes 0")
		if line == "}" && len(cur) > 0 {
			blocks = append(blocks, strings.Join(append(cur, "}"), "\n"))
			cur = nil
			continue
		}
		cur = append(cur, line)
	}
	slices.Sort(blocks)
	return header + "\n" + strings.Join(blocks, "\n") + "\n"
}
