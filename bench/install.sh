#!/usr/bin/env bash
# Installs what the benchmarks need and a clean machine lacks: the load
# generator (wrk), the user-space proxy we compare with (haproxy), nft and ip.
set -euo pipefail
need=()
for cmd in wrk:wrk haproxy:haproxy nft:nftables ip:iproute2; do
  command -v "${cmd%%:*}" >/dev/null 2>&1 || need+=("${cmd##*:}")
done
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
wrk --version 2>&1 | head -1 || true
haproxy -v | head -1
