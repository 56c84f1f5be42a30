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
cd "$(dirname "$0")/.."
SECS=${1:-8}
need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
export GOMAXPROCS=1 GODEBUG=asyncpreemptoff=1

tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT
go build -o "$tmp/sidecar" .
go build -o "$tmp/proxybackend" ./bench/proxybackend
port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 12000))
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
	done
}
BPORT=$(port)
"$tmp/proxybackend" -address "127.0.0.1:$BPORT" >/dev/null 2>&1 &
pids+=($!)
cat >"$tmp/rpc.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"service":"go.micro.srv.bench","method":"Bench.Hello","request":{"x":"1"}}'
wrk.headers["Content-Type"] = "application/json"
LUA
register() {
	curl -fsS -o /dev/null -d "{\"name\":\"go.micro.srv.bench\",\"nodes\":[{\"id\":\"b\",\"address\":\"127.0.0.1\",\"port\":$BPORT}]}" "http://127.0.0.1:$1/registry"
}

# count NAME PORT PATH SETUP -- CMD...: prints the instructions per request.
count() {
	local name=$1 port=$2 path=$3 setup=$4 wargs=() vpid n ir=0 s f
	shift 5
	[ "$name" = rpc ] && wargs=(-s "$tmp/rpc.lua")
	valgrind --tool=callgrind --callgrind-out-file="$tmp/cg-$name.%p" "$@" >"$tmp/$name.log" 2>&1 &
	vpid=$!
	pids+=("$vpid")
	for _ in $(seq 300); do
		(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
		sleep 0.2
	done
	[ -n "$setup" ] && $setup "$port"
	wrk -t1 -c4 -d3s "${wargs[@]}" "http://127.0.0.1:$port$path" >/dev/null
	callgrind_control -z "$vpid" >/dev/null 2>&1
	n=$(wrk -t1 -c4 -d"${SECS}s" "${wargs[@]}" "http://127.0.0.1:$port$path" | sed -n 's/^ *\([0-9]*\) requests in.*/\1/p')
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
count direct "$p" '/bench/hello?x=1' '' -- "$tmp/proxybackend" -address "127.0.0.1:$p"
p=$(port)
count proxy "$p" '/bench/hello?x=1' register -- "$tmp/sidecar" --address "127.0.0.1:$p" --handler proxy --log_level error
p=$(port)
count rpc "$p" /rpc register -- "$tmp/sidecar" --address "127.0.0.1:$p" --log_level error
p=$(port)
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx.conf" <<CONF
worker_processes 1;
master_process off;
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 1024; }
http {
	access_log off;
	client_body_temp_path $tmp/nginx/body;
	proxy_temp_path $tmp/nginx/proxy;
	fastcgi_temp_path $tmp/nginx/fastcgi;
	uwsgi_temp_path $tmp/nginx/uwsgi;
	scgi_temp_path $tmp/nginx/scgi;
	upstream backend { server 127.0.0.1:$BPORT; keepalive 256; }
	server {
		listen 127.0.0.1:$p;
		location / {
			proxy_pass http://backend;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_set_header Host \$proxy_host;
			proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
			proxy_set_header X-Forwarded-Host \$host;
			proxy_set_header X-Forwarded-Proto \$scheme;
		}
	}
}
CONF
count nginx "$p" '/bench/hello?x=1' '' -- "$NGINX" -p "$tmp/nginx" -c "$tmp/nginx.conf" -e "$tmp/nginx/error.log"
p=$(port)
cat >"$tmp/haproxy.cfg" <<CONF
global
	nbthread 1
defaults
	mode http
	timeout connect 5s
	timeout client 30s
	timeout server 30s
	option http-keep-alive
	option forwardfor
	http-reuse always
frontend front
	bind 127.0.0.1:$p
	default_backend nodes
backend nodes
	server node 127.0.0.1:$BPORT
CONF
count haproxy "$p" '/bench/hello?x=1' '' -- "$HAPROXY" -db -f "$tmp/haproxy.cfg"
