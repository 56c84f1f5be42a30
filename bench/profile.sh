#!/usr/bin/env bash
# profile.sh profiles the real sidecar binary (built with -tags pprof,
# stats_pprof.go) under a wrk load: CPU and allocations over the run, as
# pprof files and their top functions.
#
#	bench/profile.sh proxy|rpc [seconds] [outdir]
#
# proxy: GET /bench/hello?x=1 with --handler=proxy; rpc: POST /rpc to the
# same backend (bench/proxybackend). GOMAXPROCS=1 like bench/compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-proxy}
SECS=${2:-10}
OUT=${3:-/tmp/sidecar-profile-$MODE}
mkdir -p "$OUT"
tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT
go build -tags pprof -o "$OUT/sidecar" .
go build -o "$tmp/proxybackend" ./bench/proxybackend
wait_line() {
	for _ in $(seq 200); do
		grep -q "$2" "$1" 2>/dev/null && return
		sleep 0.05
	done
	echo "profile.sh: no '$2' in $1" >&2
	exit 1
}
GOMAXPROCS=1 "$tmp/proxybackend" -address 127.0.0.1:0 >"$tmp/backend.out" 2>&1 &
pids+=($!)
wait_line "$tmp/backend.out" 'listening on'
BACKEND=$(sed -n 's/listening on //p' "$tmp/backend.out")
PPROF=127.0.0.1:$((20000 + RANDOM % 12000))
handler=rpc
[ "$MODE" = proxy ] && handler=proxy
SIDECAR_PPROF=$PPROF GOMAXPROCS=1 "$OUT/sidecar" --address 127.0.0.1:0 --handler "$handler" --log_level error >"$tmp/sidecar.out" 2>&1 &
pids+=($!)
wait_line "$tmp/sidecar.out" 'listening on'
SIDECAR=$(sed -n 's/.*listening on http:\/\/\(.*\)/\1/p' "$tmp/sidecar.out")
curl -fsS -o /dev/null -d "{\"name\":\"go.micro.srv.bench\",\"nodes\":[{\"id\":\"b\",\"address\":\"127.0.0.1\",\"port\":${BACKEND##*:}}]}" "http://$SIDECAR/registry"
args=("http://$SIDECAR/bench/hello?x=1")
if [ "$MODE" = rpc ]; then
	cat >"$tmp/rpc.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"service":"go.micro.srv.bench","method":"Bench.Hello","request":{"x":"1"}}'
wrk.headers["Content-Type"] = "application/json"
LUA
	args=(-s "$tmp/rpc.lua" "http://$SIDECAR/rpc")
fi
wrk -t2 -c64 -d1s "${args[@]}" >/dev/null
mallocs() { curl -fsS "http://$PPROF/debug/vars" | grep -o '"Mallocs": *[0-9]*' | head -1 | grep -o '[0-9]*$'; }
curl -fsS -o "$OUT/allocs-before.pprof" "http://$PPROF/debug/pprof/allocs"
m0=$(mallocs)
wrk -t2 -c64 -d$((SECS + 2))s "${args[@]}" >"$OUT/wrk.txt" &
wpid=$!
curl -fsS -o "$OUT/cpu.pprof" "http://$PPROF/debug/pprof/profile?seconds=$SECS"
curl -fsS -o "$OUT/allocs.pprof" "http://$PPROF/debug/pprof/allocs"
wait "$wpid"
m1=$(mallocs)
grep -E 'Requests/sec|requests in' "$OUT/wrk.txt"
reqs=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' "$OUT/wrk.txt")
echo "allocations per request: $(( (m1 - m0) / reqs )) (runtime Mallocs over the run / wrk's requests)"
go tool pprof -top -nodecount=40 "$OUT/sidecar" "$OUT/cpu.pprof" 2>/dev/null | head -50
echo "# allocations during the run (alloc_objects, diff)"
go tool pprof -top -nodecount=30 -sample_index=alloc_objects -diff_base "$OUT/allocs-before.pprof" "$OUT/sidecar" "$OUT/allocs.pprof" 2>/dev/null | head -40
echo "profiles in $OUT"
