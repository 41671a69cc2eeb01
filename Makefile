# nftlb — the two commands a newcomer needs are `make demo` and `make test`.
GO      ?= go
BIN     := bin/nftlb
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: build demo test fuzz bench bench-go clean clean-lab install

PREFIX  ?= /usr/local
DESTDIR ?=

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/nftlb

# Builds nftlb, starts a network-namespace lab (client, LB, 3 backends),
# runs nftlb on it, shows balancing and failover with real connections,
# and tears everything down. Needs root.
demo: build
	$(GO) run ./cmd/nftlb-lab -nftlb $(BIN)

# The whole suite: vet, unit and golden tests, real-kernel tests in
# namespaces (root), end-to-end tests of the real binary, a short fuzz run.
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 10m ./...
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime 15s ./internal/vip

# Longer fuzzing of the config parser.
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime 5m ./internal/vip

# Every benchmark scenario in the lab (data plane vs HAProxy and hand-written
# rules, dispatch scale, control plane, failover); rewrites docs/benchmarks.md.
# Root; installs wrk and haproxy if missing; about 11.5 minutes (bench/run.sh has the estimate per part).
bench:
	bash bench/run.sh

# Only the Go benchmarks of render and apply (root: scratch namespace).
bench-go:
	$(GO) test -run '^$$' -bench . -benchtime 5x -count 1 ./internal/ruleset

# Removes lab namespaces (nlbt*) left behind by a killed test or demo.
clean-lab:
	$(GO) run ./internal/lab/cmd/labclean

# Installs the binary, the systemd unit and the sysctl drop-in, and the
# example config only if /etc/nftlb/lb.yaml does not exist yet.
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/nftlb
	sed 's|/usr/local/bin/nftlb|$(PREFIX)/bin/nftlb|g' systemd/nftlb.service > $(BIN).service
	install -D -m 0644 $(BIN).service $(DESTDIR)/etc/systemd/system/nftlb.service
	install -D -m 0644 systemd/99-nftlb.conf $(DESTDIR)/etc/sysctl.d/99-nftlb.conf
	test -e $(DESTDIR)/etc/nftlb/lb.yaml || install -D -m 0644 examples/lb.yaml $(DESTDIR)/etc/nftlb/lb.yaml
	@echo "installed; next: sysctl --system; edit /etc/nftlb/lb.yaml; systemctl daemon-reload; systemctl enable --now nftlb"

clean:
	rm -rf bin
