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
cd "$(dirname "$0")/.."
MSGS=${1:-100000}
SUBS=${SUBS:-4}
SIZE=${SIZE:-64}
DURATION=${DURATION:-10s}

NATS_BIN=$(command -v nats-server || echo /usr/sbin/nats-server)
if [ ! -x "$NATS_BIN" ]; then
	echo "pubsub.sh: nats-server not installed (scripts/install-debian.sh)" >&2
	exit 1
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT

go build -o "$tmp/sidecar" .
go build -o "$tmp/pubsubload" ./bench/pubsubload

# start_sidecar NAME ARGS... starts a sidecar and sets URL to its address.
start_sidecar() {
	name=$1
	shift
	"$tmp/sidecar" --address 127.0.0.1:0 --log_level error "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
	pids+=("$!")
	for _ in $(seq 200); do
		grep -q 'listening on' "$tmp/$name.out" 2>/dev/null && break
		sleep 0.05
	done
	URL=$(sed -n 's/.*listening on http:\/\/\(.*\)/\1/p' "$tmp/$name.out")
	[ -n "$URL" ] || { echo "pubsub.sh: sidecar $name did not start: $(cat "$tmp/$name.err")" >&2; exit 1; }
}

port=$((20000 + RANDOM % 20000))
"$NATS_BIN" -a 127.0.0.1 -p "$port" >"$tmp/nats.log" 2>&1 &
pids+=("$!")
for _ in $(seq 100); do
	(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
	sleep 0.05
done

start_sidecar nats-a --broker nats --broker_address "nats://127.0.0.1:$port"
NA=$URL
start_sidecar nats-b --broker nats --broker_address "nats://127.0.0.1:$port"
NB=$URL
start_sidecar peer-a
PA=$URL
start_sidecar peer-b --registry sidecar --registry_address "http://$PA"
PB=$URL

field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p"; }
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
