#!/usr/bin/env bash
# broker.sh benchmarks the sidecar's /broker: fan-out (1 publisher, 100
# websocket subscribers, 16 B messages: delivered messages/s and sidecar CPU
# per delivery) and RSS per idle subscriber (5,000 subscribers). When
# nats-server is installed (scripts/install-debian.sh) it runs the same
# load against nats-server's websocket listener and prints the ratios.
#
#	bench/broker.sh [messages]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
MSGS=${1:-200000}
SUBS=100
IDLE=5000
# Each idle subscriber holds a descriptor in the server and in brokerload.
need_files $((IDLE + 1000))

tmpdir
build sidecar brokerload

# start_sidecar starts a fresh sidecar and sets SC_PID and SC_URL.
start_sidecar() {
	run_sidecar sidecar
	SC_PID=$PID
	SC_URL=ws://$ADDR
}

# start_nats starts a fresh nats-server with a websocket listener and sets
# NATS_PID and NATS_URL.
NATS_BIN=$(sbin nats-server)
start_nats() {
	local p
	p=$(port)
	cat >"$tmp/nats.conf" <<CONF
listen: 127.0.0.1:-1
websocket { listen: "127.0.0.1:$p", no_tls: true }
CONF
	"$NATS_BIN" -c "$tmp/nats.conf" >"$tmp/nats.log" 2>&1 &
	NATS_PID=$!
	pids+=("$NATS_PID")
	wait_port "$p"
	NATS_URL="ws://127.0.0.1:$p"
}

stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -srm), $(nproc) CPUs, $(go version | cut -d' ' -f3)"
start_sidecar
sc_fan=$("$tmp/brokerload" -target sidecar -url "$SC_URL" -pid "$SC_PID" -mode fanout -subs $SUBS -msgs "$MSGS" -size 16)
echo "$sc_fan"
stop "$SC_PID"
start_sidecar
sc_idle=$("$tmp/brokerload" -target sidecar -url "$SC_URL" -pid "$SC_PID" -mode idle -subs $IDLE)
echo "$sc_idle"
stop "$SC_PID"

if [ ! -x "$NATS_BIN" ]; then
	echo "nats-server not installed (scripts/install-debian.sh): no comparison"
	exit 0
fi
echo "# peer: $("$NATS_BIN" --version)"
start_nats
nats_fan=$("$tmp/brokerload" -target nats -url "$NATS_URL" -pid "$NATS_PID" -mode fanout -subs $SUBS -msgs "$MSGS" -size 16)
echo "$nats_fan"
stop "$NATS_PID"
start_nats
nats_idle=$("$tmp/brokerload" -target nats -url "$NATS_URL" -pid "$NATS_PID" -mode idle -subs $IDLE)
echo "$nats_idle"
stop "$NATS_PID"

sc_rate=$(echo "$sc_fan" | field rate)
nats_rate=$(echo "$nats_fan" | field rate)
sc_cpu=$(echo "$sc_fan" | field cpu_per_delivery)
nats_cpu=$(echo "$nats_fan" | field cpu_per_delivery)
sc_sub=$(echo "$sc_idle" | field per_subscriber)
nats_sub=$(echo "$nats_idle" | field per_subscriber)
awk -v a="$sc_rate" -v b="$nats_rate" -v c="$sc_cpu" -v d="$nats_cpu" -v e="$sc_sub" -v f="$nats_sub" 'BEGIN {
	printf "ratio sidecar/nats: fanout rate %.2fx (goal >= 0.4x), cpu per delivery %.2fx, idle subscriber %.1f KB vs %.1f KB (goal < 18 KB)\n", a/b, (d > 0 ? c/d : 0), e, f
}'
