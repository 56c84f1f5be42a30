# shellcheck shell=bash disable=SC2034 # the scripts use what it sets
# lib.sh holds what the bench/*.sh scripts share. A script sources it
# first, before it changes directory, then goes to the repository's root:
#
#	set -euo pipefail
#	. "$(dirname "$0")/lib.sh"
#	cd "$(dirname "$0")/.."
#
# Sourcing only defines functions and the constants below; the functions
# that build or start something expect the repository's root as the
# current directory and $tmp from tmpdir.

# The request every proxy row of compare.sh, instructions.sh and profile.sh
# makes, and the JSON-RPC call of their rpc row.
PATH_Q='/bench/hello?x=1'
RPC_BODY='{"service":"go.micro.srv.bench","method":"Bench.Hello","request":{"x":"1"}}'

# fail MESSAGE... prints "SCRIPT: MESSAGE" on stderr and exits 1.
fail() {
	echo "$(basename "$0"): $*" >&2
	exit 1
}

# tmpdir [SIGNAL] makes the scratch directory $tmp and the array pids, and
# sets an EXIT trap that sends SIGNAL (default TERM) to every pid in pids,
# waits for it and removes $tmp.
# shellcheck disable=SC2120 # SIGNAL is optional
tmpdir() {
	tmp=$(mktemp -d)
	pids=()
	kill_signal=${1:-TERM}
	trap cleanup EXIT
}

# cleanup is tmpdir's EXIT trap.
cleanup() {
	local p
	for p in "${pids[@]}"; do
		kill -s "$kill_signal" "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	rm -rf "$tmp"
}

# need_files N raises the open-files limit to the hard limit when it is
# under N, and fails when the hard limit is under N too.
need_files() {
	if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$1" ]; then
		ulimit -n "$(ulimit -Hn)"
		if [ "$(ulimit -n)" -lt "$1" ]; then
			fail "ulimit -n is $(ulimit -n), need $1"
		fi
	fi
}

# install_missing CMD[:PACKAGE]... installs the Debian PACKAGE (default
# CMD) of each CMD that is neither on PATH nor in /usr/sbin.
install_missing() {
	local c need=()
	for c in "$@"; do
		command -v "${c%%:*}" >/dev/null || [ -x "/usr/sbin/${c%%:*}" ] || need+=("${c#*:}")
	done
	if [ ${#need[@]} -gt 0 ]; then
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
	fi
}

# sbin CMD prints CMD's path: on PATH, else /usr/sbin/CMD (Debian's
# nginx, haproxy and nats-server are there, outside a user's PATH).
sbin() { command -v "$1" || echo "/usr/sbin/$1"; }

# build NAME... builds into $tmp the sidecar (NAME sidecar: the
# repository's root) and the programs under bench/ (NAME proxybackend,
# brokerload, ...).
build() {
	local n
	for n in "$@"; do
		if [ "$n" = sidecar ]; then
			go build -o "$tmp/sidecar" .
		else
			go build -o "$tmp/$n" "./bench/$n"
		fi
	done
}

# port prints a loopback port below the ephemeral range that nothing
# listens on and that it has not printed before in this run (so that
# ports picked before their servers start differ).
port() {
	local p
	while :; do
		p=$((20000 + RANDOM % 12000))
		grep -qx "$p" "$tmp/ports" 2>/dev/null && continue
		(exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
		echo "$p" >>"$tmp/ports"
		echo "$p"
		return
	done
}

# wait_port PORT [SECONDS] waits until something accepts connections on
# 127.0.0.1:PORT, for SECONDS (default 10) at most.
wait_port() {
	local i
	for ((i = 0; i < ${2:-10} * 20; i++)); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
		sleep 0.05
	done
	fail "nothing listens on 127.0.0.1:$1"
}

# wait_line FILE PATTERN waits until FILE has a line matching PATTERN (a
# server printing its address), for 10 s at most; then it prints FILE
# (and, for NAME.out, NAME.err) and fails.
wait_line() {
	local i
	for ((i = 0; i < 200; i++)); do
		grep -q "$2" "$1" 2>/dev/null && return
		sleep 0.05
	done
	echo "$(basename "$0"): no '$2' in $1" >&2
	cat "$1" "${1%.out}.err" >&2 2>/dev/null || true
	exit 1
}

# run_sidecar NAME ARGS... starts the sidecar ($sidecar_bin, default
# $tmp/sidecar) on a free port with --log_level error and ARGS, its output
# in $tmp/NAME.out and $tmp/NAME.err, waits until it listens and sets PID
# and ADDR (host:port).
run_sidecar() {
	local name=$1
	shift
	: >"$tmp/$name.out" # a sidecar of the same NAME before printed its address there
	"${sidecar_bin:-$tmp/sidecar}" --address 127.0.0.1:0 --log_level error "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
	PID=$!
	pids+=("$PID")
	wait_line "$tmp/$name.out" 'listening on'
	ADDR=$(sed -n 's/.*listening on http:\/\/\(.*\)/\1/p' "$tmp/$name.out")
}

# start_backend starts $tmp/proxybackend (build proxybackend) on a free
# port, its output in $tmp/backend.out, waits until it listens and sets
# BE_PID, BACKEND (host:port) and BPORT.
start_backend() {
	"$tmp/proxybackend" -address 127.0.0.1:0 >"$tmp/backend.out" 2>&1 &
	BE_PID=$!
	pids+=("$BE_PID")
	wait_line "$tmp/backend.out" 'listening on'
	BACKEND=$(sed -n 's/listening on //p' "$tmp/backend.out")
	BPORT=${BACKEND##*:}
}

# register ADDR registers the service go.micro.srv.bench, one node at the
# backend's port $BPORT, with the sidecar at ADDR (host:port).
register() {
	curl -fsS -o /dev/null -H 'Content-Type: application/json' \
		-d "{\"name\":\"go.micro.srv.bench\",\"nodes\":[{\"id\":\"b\",\"address\":\"127.0.0.1\",\"port\":$BPORT}]}" \
		"http://$1/registry"
}

# rpc_lua writes $tmp/rpc.lua, a wrk script that POSTs $RPC_BODY.
rpc_lua() {
	cat >"$tmp/rpc.lua" <<LUA
wrk.method = "POST"
wrk.body = '$RPC_BODY'
wrk.headers["Content-Type"] = "application/json"
LUA
}

# wrk_requests prints the request count of the wrk report on its input.
wrk_requests() { sed -n 's/^ *\([0-9]*\) requests in.*/\1/p'; }

# field NAME prints the number after NAME= (a word of its own) in the
# lines on its input: "rate=123 p99=4.5ms" | field p99 prints 4.5.
field() { sed -n "s/\(.* \|^\)$1=\([0-9.]*\).*/\2/p"; }

# nginx_conf PORT BACKEND WORKERS [DIRECTIVE...] writes $tmp/nginx.conf:
# nginx in the foreground with WORKERS worker processes on
# 127.0.0.1:PORT, a reverse proxy to BACKEND (host:port) over keep-alive
# connections with X-Forwarded-* set, no access log, its files under
# $tmp/nginx. Each DIRECTIVE (e.g. 'master_process off;') is a line of the
# main context. Run it with
#	"$NGINX" -p "$tmp/nginx" -c "$tmp/nginx.conf" -e "$tmp/nginx/error.log"
nginx_conf() {
	local port=$1 backend=$2 workers=$3
	shift 3
	mkdir -p "$tmp/nginx"
	{
		echo "worker_processes $workers;"
		[ $# -eq 0 ] || printf '%s\n' "$@"
		cat <<CONF
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 4096; }
http {
	access_log off;
	client_body_temp_path $tmp/nginx/body;
	proxy_temp_path $tmp/nginx/proxy;
	fastcgi_temp_path $tmp/nginx/fastcgi;
	uwsgi_temp_path $tmp/nginx/uwsgi;
	scgi_temp_path $tmp/nginx/scgi;
	upstream backend {
		server $backend;
		keepalive 256;
	}
	server {
		listen 127.0.0.1:$port;
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
	} >"$tmp/nginx.conf"
}

# haproxy_conf PORT BACKEND THREADS writes $tmp/haproxy.cfg: haproxy in
# http mode with THREADS threads on 127.0.0.1:PORT in front of BACKEND
# (host:port), keep-alive on both sides and connections reused, X-Forwarded-For
# set. Run it with
#	"$HAPROXY" -db -f "$tmp/haproxy.cfg"
haproxy_conf() {
	cat >"$tmp/haproxy.cfg" <<CONF
global
	nbthread $3
	maxconn 4096
defaults
	mode http
	timeout connect 5s
	timeout client 30s
	timeout server 30s
	option http-keep-alive
	option forwardfor
	http-reuse always
frontend front
	bind 127.0.0.1:$1
	default_backend nodes
backend nodes
	server node $2
CONF
}
