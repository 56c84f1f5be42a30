#!/usr/bin/env bash
# consul.sh benchmarks the sidecar's Consul registry at the size of a real
# cluster: a Consul dev agent (default limits), 1,000 services registered
# through Consul's own API, and one sidecar with --registry consul. It
# prints, through bench/consulload: the time of a first /rpc call to a
# cold service (and of a second, warm one), the sidecar's memory with
# 1,000 services known and 64 watched, and the requests it sends Consul
# per second (and its CPU) while idle.
#
#	bench/consul.sh [services] [idle window]     e.g. bench/consul.sh 1000 30s
#
# CONNS (default 74) is the sidecar's --registry_connections: 74 lets 64
# services be watched (the default 64 lets 55: the catalog's blocking query
# and a reserve of an eighth for lookups take the rest). The consul binary
# comes from scripts/install-consul.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVICES=${1:-1000}
IDLE=${2:-30s}
CONNS=${CONNS:-74}
WATCH=$((CONNS - 1 - (CONNS / 8 > 2 ? CONNS / 8 : 2))) # blockingBudget in registry_cache.go

command -v consul >/dev/null || bash scripts/install-consul.sh
command -v consul >/dev/null || PATH=$PATH:/usr/local/bin

tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT

go build -o "$tmp/sidecar" .
go build -o "$tmp/consulload" ./bench/consulload

# free_port prints a loopback port nobody listens on now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

HTTP_PORT=$(free_port)
consul agent -dev -bind=127.0.0.1 -client=127.0.0.1 -log-level=error \
	-http-port="$HTTP_PORT" -dns-port=-1 -grpc-port=-1 -grpc-tls-port=-1 \
	-serf-lan-port="$(free_port)" -serf-wan-port="$(free_port)" -server-port="$(free_port)" >"$tmp/consul.out" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
	leader=$(curl -fsS "http://127.0.0.1:$HTTP_PORT/v1/status/leader" 2>/dev/null || true)
	[ -n "$leader" ] && [ "$leader" != '""' ] && break
	sleep 0.1
done
[ -n "$leader" ] && [ "$leader" != '""' ] || { echo "consul.sh: no Consul leader" >&2; cat "$tmp/consul.out" >&2; exit 1; }

"$tmp/sidecar" --address 127.0.0.1:0 --registry consul --registry_address "127.0.0.1:$HTTP_PORT" \
	--registry_connections "$CONNS" --log_level error >"$tmp/sidecar.out" 2>"$tmp/sidecar.err" &
SC_PID=$!
pids+=("$SC_PID")
for _ in $(seq 200); do
	grep -q 'listening on' "$tmp/sidecar.out" 2>/dev/null && break
	sleep 0.05
done
SIDECAR=$(sed -n 's/.*listening on \(http:\/\/.*\)/\1/p' "$tmp/sidecar.out")
[ -n "$SIDECAR" ] || { echo "consul.sh: the sidecar did not start" >&2; cat "$tmp/sidecar.err" >&2; exit 1; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -srm), $(nproc) CPUs, $(go version | cut -d' ' -f3), $(consul version | head -1), services=$SERVICES --registry_connections=$CONNS"
"$tmp/consulload" -consul "127.0.0.1:$HTTP_PORT" -sidecar "$SIDECAR" -pid "$SC_PID" \
	-services "$SERVICES" -watch "$WATCH" -cold 200 -idle "$IDLE"
