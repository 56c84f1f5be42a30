#!/usr/bin/env bash
# registry.sh benchmarks the sidecar's registry watches: 1,000 websocket
# watchers while a 10,000-node service is registered and renewed; prints
# the sidecar's RSS (now and peak) and the time from a change to its event
# at the 1,000th watcher (p50/p90/p99/max). See bench/registryload.
#
#	bench/registry.sh [watchers] [nodes] [changes]
set -euo pipefail
cd "$(dirname "$0")/.."
WATCHERS=${1:-1000}
NODES=${2:-10000}
CHANGES=${3:-200}
# Each watcher holds a descriptor in the sidecar and in registryload.
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((WATCHERS + 1000)) ]; then
	ulimit -n "$(ulimit -Hn)"
	if [ "$(ulimit -n)" -lt $((WATCHERS + 1000)) ]; then
		echo "registry.sh: ulimit -n is $(ulimit -n), need $((WATCHERS + 1000))" >&2
		exit 1
	fi
fi

tmp=$(mktemp -d)
pid=
cleanup() {
	if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
	rm -rf "$tmp"
}
trap cleanup EXIT

go build -o "$tmp/sidecar" .
go build -o "$tmp/registryload" ./bench/registryload

"$tmp/sidecar" --address 127.0.0.1:0 --log_level error >"$tmp/sidecar.out" 2>"$tmp/sidecar.err" &
pid=$!
for _ in $(seq 100); do
	grep -q 'listening on' "$tmp/sidecar.out" 2>/dev/null && break
	sleep 0.05
done
url=$(sed -n 's/.*listening on \(http:\/\/.*\)/\1/p' "$tmp/sidecar.out")

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -srm), $(nproc) CPUs, $(go version | cut -d' ' -f3), load $(cut -d' ' -f1-3 /proc/loadavg)"
"$tmp/registryload" -url "$url" -pid "$pid" -watchers "$WATCHERS" -nodes "$NODES" -changes "$CHANGES"
