#!/usr/bin/env bash
# compare.sh measures what the sidecar costs per call against the proxies
# people pick, all in front of the same small Go backend
# (bench/proxybackend), in one run:
#
#   direct   the backend alone (GET /bench/hello?x=1)
#   proxy    sidecar --handler=proxy, the same GET
#   rpc      sidecar /rpc: POST /rpc {"service":"go.micro.srv.bench",
#            "method":"Bench.Hello","request":{"x":"1"}}, a JSON-RPC call
#            to the same backend
#   nginx    nginx as a reverse proxy (upstream keepalive)
#   haproxy  haproxy in http mode (keep-alive both sides)
#   caddy    caddy's reverse_proxy
#
# Throughput: wrk -t2 -c64 for DURATION against each, one after the other;
# requests/s, CPU per request (utime+stime of the server's processes from
# /proc/PID/stat over the run, divided by the requests wrk counted), and
# the ratios to nginx (and /rpc's to the proxy). Latency: bench/openloop
# at a fixed rate (2,000 and 10,000 requests/s, LAT_DURATION each),
# measured from each request's scheduled time; the added latency is the
# p50 and p99 minus the backend's own.
#
#	bench/compare.sh [duration]        e.g. bench/compare.sh 10s
#
# Equal parallelism: PROCS (default 1) is GOMAXPROCS of the Go servers
# (backend, sidecars, caddy), nginx's worker_processes and haproxy's
# nbthread. wrk, nginx, haproxy and caddy are Debian packages, installed
# when missing. RATES (default "2000 10000") and LAT_DURATION (10s) set
# the latency runs; LAT=0 skips them. ONLY (e.g. "proxy rpc nginx") keeps
# those rows (with nginx's row the ratios are printed).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
DURATION=${1:-10s}
PROCS=${PROCS:-1}
THREADS=2
CONNS=64
RATES=${RATES:-2000 10000}
LAT_DURATION=${LAT_DURATION:-10s}
LAT=${LAT:-1}

install_missing wrk nginx:nginx-light haproxy caddy
NGINX=$(sbin nginx)
HAPROXY=$(sbin haproxy)
CADDY=$(sbin caddy)

tmpdir
build sidecar proxybackend openloop
rpc_lua

# wait_ok URL waits until URL answers 200.
wait_ok() {
	for _ in $(seq 200); do
		curl -fsS -o /dev/null "$1" 2>/dev/null && return
		sleep 0.05
	done
	echo "compare.sh: $1 does not answer" >&2
	tail -n 5 "$tmp"/*.log "$tmp"/nginx/error.log >&2 2>/dev/null || true
	exit 1
}

# ticks PID prints the CPU ticks (utime+stime) of PID and its children.
ticks() {
	local total=0 p s
	for p in "$1" $(pgrep -P "$1" || true); do
		s=$(cat "/proc/$p/stat")
		s=${s##*) }
		set -- $s
		total=$((total + ${12} + ${13}))
	done
	echo "$total"
}
HZ=$(getconf CLK_TCK)

GOMAXPROCS=$PROCS start_backend
GOMAXPROCS=$PROCS run_sidecar proxy --handler proxy
PROXY_PID=$PID PROXY_ADDR=$ADDR
register "$ADDR"
GOMAXPROCS=$PROCS run_sidecar rpc --handler rpc
RPC_PID=$PID RPC_ADDR=$ADDR
register "$ADDR"

NPORT=$(port)
nginx_conf "$NPORT" "$BACKEND" "$PROCS"
"$NGINX" -p "$tmp/nginx" -c "$tmp/nginx.conf" -e "$tmp/nginx/error.log" &
NGINX_PID=$!
pids+=("$NGINX_PID")

HPORT=$(port)
haproxy_conf "$HPORT" "$BACKEND" "$PROCS"
"$HAPROXY" -db -f "$tmp/haproxy.cfg" >"$tmp/haproxy.log" 2>&1 &
HAPROXY_PID=$!
pids+=("$HAPROXY_PID")

CPORT=$(port)
cat >"$tmp/Caddyfile" <<CONF
{
	admin off
	auto_https off
}
http://127.0.0.1:$CPORT {
	reverse_proxy $BACKEND
}
CONF
XDG_DATA_HOME=$tmp XDG_CONFIG_HOME=$tmp GOMAXPROCS=$PROCS "$CADDY" run --config "$tmp/Caddyfile" --adapter caddyfile >"$tmp/caddy.log" 2>&1 &
CADDY_PID=$!
pids+=("$CADDY_PID")

wait_ok "http://127.0.0.1:$NPORT$PATH_Q"
wait_ok "http://127.0.0.1:$HPORT$PATH_Q"
wait_ok "http://127.0.0.1:$CPORT$PATH_Q"
wait_ok "http://$PROXY_ADDR$PATH_Q"

# name|url|pid|wrk args|openloop args
targets=(
	"direct|http://$BACKEND$PATH_Q|$BE_PID||"
	"proxy|http://$PROXY_ADDR$PATH_Q|$PROXY_PID||"
	"rpc|http://$RPC_ADDR/rpc|$RPC_PID|-s $tmp/rpc.lua|-method POST -body $RPC_BODY"
	"nginx|http://127.0.0.1:$NPORT$PATH_Q|$NGINX_PID||"
	"haproxy|http://127.0.0.1:$HPORT$PATH_Q|$HAPROXY_PID||"
	"caddy|http://127.0.0.1:$CPORT$PATH_Q|$CADDY_PID||"
)
if [ -n "${ONLY:-}" ]; then
	kept=()
	for t in "${targets[@]}"; do
		[[ " $ONLY " == *" ${t%%|*} "* ]] && kept+=("$t")
	done
	targets=("${kept[@]}")
fi

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -srm), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $(go version | cut -d' ' -f3), $("$NGINX" -v 2>&1 | cut -d' ' -f3), haproxy $("$HAPROXY" -v | sed -n '1s/.*version \([^ ]*\).*/\1/p'), caddy $("$CADDY" version | cut -d' ' -f1)"
echo "# wrk -t$THREADS -c$CONNS -d$DURATION; PROCS=$PROCS (GOMAXPROCS, nginx workers, haproxy threads)"

declare -A RPS CPU
for t in "${targets[@]}"; do
	IFS='|' read -r name url pid wargs _ <<<"$t"
	# shellcheck disable=SC2086
	wrk -t"$THREADS" -c"$CONNS" -d1s $wargs "$url" >/dev/null # warm up connections and caches
	before=$(ticks "$pid")
	# shellcheck disable=SC2086
	out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" $wargs "$url")
	after=$(ticks "$pid")
	if grep -q -e 'Non-2xx' -e 'Socket errors' <<<"$out"; then
		echo "compare.sh: $name answered errors:" >&2
		echo "$out" >&2
		exit 1
	fi
	reqs=$(wrk_requests <<<"$out")
	RPS[$name]=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out")
	CPU[$name]=$(awk -v t=$((after - before)) -v hz="$HZ" -v q="$reqs" 'BEGIN { printf "%.2f", t/hz/q*1e6 }')
done

printf '\n%-8s %12s %12s %14s %14s\n' path requests/s cpu/request 'rate/nginx' 'cpu/nginx'
for t in "${targets[@]}"; do
	IFS='|' read -r name _ <<<"$t"
	awk -v n="$name" -v r="${RPS[$name]}" -v c="${CPU[$name]}" -v nr="${RPS[nginx]:-0}" -v nc="${CPU[nginx]:-0}" \
		'BEGIN { if (nr > 0) printf "%-8s %12.0f %10.2fus %13.2fx %13.2fx\n", n, r, c, r/nr, c/nc; else printf "%-8s %12.0f %10.2fus\n", n, r, c }'
done
[ -n "${RPS[rpc]:-}" ] && [ -n "${RPS[proxy]:-}" ] && awk -v rr="${RPS[rpc]}" -v pr="${RPS[proxy]}" -v rc="${CPU[rpc]}" -v pc="${CPU[proxy]}" \
	'BEGIN { printf "\nrpc/proxy: rate %.2fx (goal >= 0.9x), cpu per request %.2fx (goal <= 1.2x)\n", rr/pr, rc/pc }'
[ -n "${RPS[nginx]:-}" ] && [ -n "${RPS[proxy]:-}" ] && awk -v sr="${RPS[proxy]}" -v nr="${RPS[nginx]}" -v sc="${CPU[proxy]}" -v nc="${CPU[nginx]}" \
	'BEGIN { printf "proxy/nginx: rate %.2fx (goal >= 0.7x), cpu per request %.2fx (goal <= 1.5x)\n", sr/nr, sc/nc }'

[ "$LAT" = 0 ] && exit 0
echo
echo "# added latency at a fixed rate: bench/openloop -conns 32 -duration $LAT_DURATION, from each request's scheduled time; added = p - direct's p"
printf '%-8s %7s %9s %9s %9s %11s %11s %7s\n' path rate achieved p50 p99 'added p50' 'added p99' errors
for rate in $RATES; do
	declare -A P50 P99
	for t in "${targets[@]}"; do
		IFS='|' read -r name url _ _ oargs <<<"$t"
		args=()
		if [ -n "$oargs" ]; then
			args=(-method POST -body "$RPC_BODY")
		fi
		"$tmp/openloop" -url "$url" -rate "$rate" -duration 1s -conns 32 "${args[@]}" >/dev/null 2>&1 || true # warm up
		out=$("$tmp/openloop" -url "$url" -rate "$rate" -duration "$LAT_DURATION" -conns 32 "${args[@]}")
		P50[$name]=$(field p50 <<<"$out")
		P99[$name]=$(field p99 <<<"$out")
		awk -v n="$name" -v r="$rate" -v a="$(field achieved <<<"$out")" -v p50="${P50[$name]}" -v p99="${P99[$name]}" \
			-v d50="${P50[direct]:-0}" -v d99="${P99[direct]:-0}" -v e="$(field errors <<<"$out")" \
			'BEGIN { printf "%-8s %7d %9.0f %7.3fms %7.3fms %9.3fms %9.3fms %7d\n", n, r, a, p50, p99, p50-d50, p99-d99, e }'
	done
done
