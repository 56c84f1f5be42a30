#!/usr/bin/env bash
# pubsub.sh benchmarks pub/sub between two sidecars, in the same run
# through NATS (--broker nats, one nats-server) and through today's peer
# delivery (B uses A's registry; signed HTTP POSTs between the sidecars):
# one publisher on sidecar A, SUBS websocket subscribers on sidecar B.
# For each it prints the maximum rate (messages/s delivered to every
# subscriber), then latency p50/p99 at a fixed rate: RATE (default: half
# the peer delivery's maximum, which both sustain) and, for NATS, half its
# own maximum.
#
#	bench/pubsub.sh [messages]      # SUBS=4 SIZE=64 DURATION=10s RATE=...
#
# Needs nats-server (scripts/install-debian.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
MSGS=${1:-100000}
SUBS=${SUBS:-4}
SIZE=${SIZE:-64}
DURATION=${DURATION:-10s}

NATS_BIN=$(sbin nats-server)
[ -x "$NATS_BIN" ] || fail "nats-server not installed (scripts/install-debian.sh)"

tmpdir
build sidecar pubsubload

nport=$(port)
"$NATS_BIN" -a 127.0.0.1 -p "$nport" >"$tmp/nats.log" 2>&1 &
pids+=("$!")
wait_port "$nport"

run_sidecar nats-a --broker nats --broker_address "nats://127.0.0.1:$nport"
NA=$ADDR
run_sidecar nats-b --broker nats --broker_address "nats://127.0.0.1:$nport"
NB=$ADDR
run_sidecar peer-a
PA=$ADDR
run_sidecar peer-b --registry sidecar --registry_address "http://$PA"
PB=$ADDR

load() { "$tmp/pubsubload" -subs "$SUBS" -size "$SIZE" "$@"; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -srm), $(nproc) CPUs, $(go version | cut -d' ' -f3), $("$NATS_BIN" --version)"
nats_max=$(load -label nats -pub "ws://$NA" -sub "ws://$NB" -mode max -msgs "$MSGS")
echo "$nats_max"
peer_max=$(load -label peer -pub "ws://$PA" -sub "ws://$PB" -mode max -msgs "$MSGS")
echo "$peer_max"
nr=$(echo "$nats_max" | field rate)
pr=$(echo "$peer_max" | field rate)
RATE=${RATE:-$(awk -v r="$pr" 'BEGIN { printf "%d", r / 2 }')}
half=$(awk -v r="$nr" 'BEGIN { printf "%d", r / 2 }')
# A rate the sidecars (or the load program's readers) cannot sustain ends
# with subscribers disconnected as too slow: the run says so and goes on.
load -label nats -pub "ws://$NA" -sub "ws://$NB" -mode rate -rate "$RATE" -duration "$DURATION" || echo "nats rate: failed at $RATE msgs/s"
load -label peer -pub "ws://$PA" -sub "ws://$PB" -mode rate -rate "$RATE" -duration "$DURATION" || echo "peer rate: failed at $RATE msgs/s"
nats_half=$(load -label nats-half-max -pub "ws://$NA" -sub "ws://$NB" -mode rate -rate "$half" -duration "$DURATION") ||
	nats_half="nats-half-max rate: failed at $half msgs/s"
echo "$nats_half"
p99=$(echo "$nats_half" | sed -n 's/.* p99=\([0-9.]*\)ms.*/\1/p')
awk -v a="$nr" -v b="$pr" -v p="${p99:-n/a}" 'BEGIN {
	printf "ratio nats/peer: max rate %.2fx (goal >= 2x); nats p99 at half its max %s ms (goal < 5 ms)\n", a/b, p
}'
