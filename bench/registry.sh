#!/usr/bin/env bash
# registry.sh benchmarks the sidecar's registry watches: 1,000 websocket
# watchers while a 10,000-node service is registered and renewed; prints
# the sidecar's RSS (now and peak) and the time from a change to its event
# at the 1,000th watcher (p50/p90/p99/max). See bench/registryload.
#
#	bench/registry.sh [watchers] [nodes] [changes]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
WATCHERS=${1:-1000}
NODES=${2:-10000}
CHANGES=${3:-200}
# Each watcher holds a descriptor in the sidecar and in registryload.
need_files $((WATCHERS + 1000))

tmpdir
build sidecar registryload

run_sidecar sidecar

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -srm), $(nproc) CPUs, $(go version | cut -d' ' -f3), load $(cut -d' ' -f1-3 /proc/loadavg)"
"$tmp/registryload" -url "http://$ADDR" -pid "$PID" -watchers "$WATCHERS" -nodes "$NODES" -changes "$CHANGES"
