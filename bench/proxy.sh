#!/usr/bin/env bash
# proxy.sh benchmarks the sidecar's reverse proxy (--handler=proxy) against
# nginx as a reverse proxy with upstream keepalive, both in front of the
# same small Go backend (bench/proxybackend), and the backend alone. wrk
# drives each with the same threads, connections and duration; the script
# prints requests/s, the ratio to nginx, and each proxy's CPU time per
# request (utime+stime of its processes from /proc/PID/stat).
#
#	bench/proxy.sh [duration]       e.g. bench/proxy.sh 10s
#
# PROCS (default 1) is both nginx's worker_processes and the sidecar's
# GOMAXPROCS, so each proxy gets the same share of the machine. wrk and
# nginx come from Debian packages, installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10s}
PROCS=${PROCS:-1}
THREADS=2
CONNS=64
PATH_Q='/bench/hello?x=1'

if ! command -v wrk >/dev/null || ! { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; }; then
	apt-get update -qq
	apt-get install -y -qq wrk nginx-light >/dev/null || apt-get install -y -qq wrk nginx >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT

go build -o "$tmp/sidecar" .
go build -o "$tmp/proxybackend" ./bench/proxybackend

# wait_line FILE PATTERN waits for a process to print its address.
wait_line() {
	for _ in $(seq 200); do
		grep -q "$2" "$1" 2>/dev/null && return
		sleep 0.05
	done
	echo "proxy.sh: no '$2' in $1" >&2
	cat "$1" >&2
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

# run NAME URL PID benchmarks URL with wrk and prints one result line; PID
# (0 for none) is the proxy whose CPU is measured.
run() {
	local name=$1 url=$2 pid=$3 before after out reqs rps
	wrk -t"$THREADS" -c"$CONNS" -d1s "$url" >/dev/null # warm up connections and caches
	[ "$pid" != 0 ] && before=$(ticks "$pid")
	out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" "$url")
	[ "$pid" != 0 ] && after=$(ticks "$pid")
	if grep -q 'Non-2xx' <<<"$out"; then
		echo "proxy.sh: $name answered errors:" >&2
		echo "$out" >&2
		exit 1
	fi
	reqs=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' <<<"$out")
	rps=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out")
	if [ "$pid" != 0 ]; then
		awk -v n="$name" -v r="$rps" -v q="$reqs" -v t=$((after - before)) -v hz="$HZ" \
			'BEGIN { printf "%-8s requests=%d rate=%.0f req/s cpu=%.2fs cpu_per_request=%.1fus\n", n, q, r, t/hz, t/hz/q*1e6 }'
	else
		awk -v n="$name" -v r="$rps" -v q="$reqs" 'BEGIN { printf "%-8s requests=%d rate=%.0f req/s\n", n, q, r }'
	fi
}

field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p"; }

"$tmp/proxybackend" -address 127.0.0.1:0 >"$tmp/backend.out" 2>&1 &
pids+=($!)
wait_line "$tmp/backend.out" 'listening on'
BACKEND=$(sed -n 's/listening on //p' "$tmp/backend.out")
BPORT=${BACKEND##*:}

GOMAXPROCS=$PROCS "$tmp/sidecar" --address 127.0.0.1:0 --handler proxy --log_level error >"$tmp/sidecar.out" 2>"$tmp/sidecar.err" &
SC_PID=$!
pids+=("$SC_PID")
wait_line "$tmp/sidecar.out" 'listening on'
SIDECAR=$(sed -n 's/.*listening on http:\/\/\(.*\)/\1/p' "$tmp/sidecar.out")
curl -fsS -o /dev/null -H 'Content-Type: application/json' \
	-d "{\"name\":\"go.micro.srv.bench\",\"nodes\":[{\"id\":\"b\",\"address\":\"127.0.0.1\",\"port\":$BPORT}]}" \
	"http://$SIDECAR/registry"

NPORT=$((20000 + RANDOM % 20000))
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx.conf" <<CONF
worker_processes $PROCS;
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
		server $BACKEND;
		keepalive 256;
	}
	server {
		listen 127.0.0.1:$NPORT;
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
"$NGINX" -p "$tmp/nginx" -c "$tmp/nginx.conf" -e "$tmp/nginx/error.log" &
NG_PID=$!
pids+=("$NG_PID")
for _ in $(seq 100); do
	curl -fsS -o /dev/null "http://127.0.0.1:$NPORT$PATH_Q" 2>/dev/null && break
	sleep 0.05
done

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -srm), $(nproc) CPUs, $(go version | cut -d' ' -f3), $("$NGINX" -v 2>&1 | cut -d' ' -f3), wrk -t$THREADS -c$CONNS -d$DURATION, PROCS=$PROCS"
direct=$(run direct "http://$BACKEND$PATH_Q" 0)
echo "$direct"
sidecar=$(run sidecar "http://$SIDECAR$PATH_Q" "$SC_PID")
echo "$sidecar"
nginx=$(run nginx "http://127.0.0.1:$NPORT$PATH_Q" "$NG_PID")
echo "$nginx"
awk -v sr="$(field rate <<<"$sidecar")" -v nr="$(field rate <<<"$nginx")" \
	-v sc="$(field cpu_per_request <<<"$sidecar")" -v nc="$(field cpu_per_request <<<"$nginx")" \
	'BEGIN { printf "ratio sidecar/nginx: rate %.2fx (goal >= 0.9x), cpu per request %.2fx (goal <= 1.5x)\n", sr/nr, sc/nc }'
