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
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
MODE=${1:-proxy}
SECS=${2:-10}
OUT=${3:-/tmp/sidecar-profile-$MODE}
mkdir -p "$OUT"
tmpdir
go build -tags pprof -o "$OUT/sidecar" .
sidecar_bin=$OUT/sidecar
build proxybackend
GOMAXPROCS=1 start_backend
PPROF=127.0.0.1:$(port)
handler=rpc
[ "$MODE" = proxy ] && handler=proxy
SIDECAR_PPROF=$PPROF GOMAXPROCS=1 run_sidecar sidecar --handler "$handler"
SIDECAR=$ADDR
register "$SIDECAR"
args=("http://$SIDECAR$PATH_Q")
if [ "$MODE" = rpc ]; then
	rpc_lua
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
reqs=$(wrk_requests <"$OUT/wrk.txt")
echo "allocations per request: $(( (m1 - m0) / reqs )) (runtime Mallocs over the run / wrk's requests)"
go tool pprof -top -nodecount=40 "$OUT/sidecar" "$OUT/cpu.pprof" 2>/dev/null | head -50
echo "# allocations during the run (alloc_objects, diff)"
go tool pprof -top -nodecount=30 -sample_index=alloc_objects -diff_base "$OUT/allocs-before.pprof" "$OUT/sidecar" "$OUT/allocs.pprof" 2>/dev/null | head -40
echo "profiles in $OUT"
