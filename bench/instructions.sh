#!/usr/bin/env bash
# instructions.sh counts the user-space instructions each server executes
# per request, under valgrind's callgrind: direct backend, sidecar proxy,
# sidecar /rpc, nginx (one worker, no master) and haproxy (one thread), in
# front of the same bench/proxybackend. Unlike CPU time on a shared VM
# the count hardly varies from run to run (a few tenths of a percent), so
# it shows what a change to the code saves. Kernel time (the syscalls) is
# not counted: bench/compare.sh measures that with the rest.
#
#	bench/instructions.sh [seconds]
#
# Each server runs under callgrind (50 to 100 times slower), gets a 3 s
# warm-up of wrk -t1 -c4, then the counters are zeroed, wrk runs for
# the given seconds (default 8), and the counters are dumped and divided by
# the requests wrk counted. Go servers run with GOMAXPROCS=1 and
# GODEBUG=asyncpreemptoff=1 (callgrind asserts on the preemption signal).
# valgrind, wrk, nginx and haproxy are Debian packages, installed when
# missing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
SECS=${1:-8}
install_missing valgrind wrk nginx:nginx-light haproxy
NGINX=$(sbin nginx)
HAPROXY=$(sbin haproxy)
export GOMAXPROCS=1 GODEBUG=asyncpreemptoff=1

tmpdir KILL
build sidecar proxybackend
start_backend
rpc_lua

# count NAME PORT PATH SETUP -- CMD...: prints the instructions per request.
count() {
	local name=$1 port=$2 path=$3 setup=$4 wargs=() vpid n ir=0 s f
	shift 5
	[ "$name" = rpc ] && wargs=(-s "$tmp/rpc.lua")
	valgrind --tool=callgrind --callgrind-out-file="$tmp/cg-$name.%p" "$@" >"$tmp/$name.log" 2>&1 &
	vpid=$!
	pids+=("$vpid")
	wait_port "$port" 60
	[ -n "$setup" ] && $setup "127.0.0.1:$port"
	wrk -t1 -c4 -d3s "${wargs[@]}" "http://127.0.0.1:$port$path" >/dev/null
	callgrind_control -z "$vpid" >/dev/null 2>&1
	n=$(wrk -t1 -c4 -d"${SECS}s" "${wargs[@]}" "http://127.0.0.1:$port$path" | wrk_requests)
	callgrind_control -d "$vpid" >/dev/null 2>&1
	sleep 0.5
	kill -9 "$vpid" 2>/dev/null || true
	wait "$vpid" 2>/dev/null || true
	for f in "$tmp"/cg-"$name".*; do
		s=$(sed -n 's/^summary: //p' "$f")
		[ -n "$s" ] && ir=$((ir + s))
	done
	awk -v n="$name" -v r="$n" -v ir="$ir" 'BEGIN { printf "%-8s requests=%d instructions_per_request=%.0f\n", n, r, ir/r }'
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -srm), $(go version | cut -d' ' -f3), $(valgrind --version), wrk -t1 -c4 -d${SECS}s under callgrind"
p=$(port)
count direct "$p" "$PATH_Q" '' -- "$tmp/proxybackend" -address "127.0.0.1:$p"
p=$(port)
count proxy "$p" "$PATH_Q" register -- "$tmp/sidecar" --address "127.0.0.1:$p" --handler proxy --log_level error
p=$(port)
count rpc "$p" /rpc register -- "$tmp/sidecar" --address "127.0.0.1:$p" --log_level error
p=$(port)
nginx_conf "$p" "$BACKEND" 1 'master_process off;'
count nginx "$p" "$PATH_Q" '' -- "$NGINX" -p "$tmp/nginx" -c "$tmp/nginx.conf" -e "$tmp/nginx/error.log"
p=$(port)
haproxy_conf "$p" "$BACKEND" 1
count haproxy "$p" "$PATH_Q" '' -- "$HAPROXY" -db -f "$tmp/haproxy.cfg"
