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
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
SERVICES=${1:-1000}
IDLE=${2:-30s}
CONNS=${CONNS:-74}
WATCH=$((CONNS - 1 - (CONNS / 8 > 2 ? CONNS / 8 : 2))) # blockingBudget in registry_cache.go

command -v consul >/dev/null || bash scripts/install-consul.sh
command -v consul >/dev/null || PATH=$PATH:/usr/local/bin

tmpdir
build sidecar consulload

HTTP_PORT=$(port)
consul agent -dev -bind=127.0.0.1 -client=127.0.0.1 -log-level=error \
	-http-port="$HTTP_PORT" -dns-port=-1 -grpc-port=-1 -grpc-tls-port=-1 \
	-serf-lan-port="$(port)" -serf-wan-port="$(port)" -server-port="$(port)" >"$tmp/consul.out" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
	leader=$(curl -fsS "http://127.0.0.1:$HTTP_PORT/v1/status/leader" 2>/dev/null || true)
	[ -n "$leader" ] && [ "$leader" != '""' ] && break
	sleep 0.1
done
[ -n "$leader" ] && [ "$leader" != '""' ] || { cat "$tmp/consul.out" >&2; fail "no Consul leader"; }

run_sidecar sidecar --registry consul --registry_address "127.0.0.1:$HTTP_PORT" --registry_connections "$CONNS"
SC_PID=$PID
SIDECAR=http://$ADDR

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -srm), $(nproc) CPUs, $(go version | cut -d' ' -f3), $(consul version | head -1), services=$SERVICES --registry_connections=$CONNS"
"$tmp/consulload" -consul "127.0.0.1:$HTTP_PORT" -sidecar "$SIDECAR" -pid "$SC_PID" \
	-services "$SERVICES" -watch "$WATCH" -cold 200 -idle "$IDLE"
