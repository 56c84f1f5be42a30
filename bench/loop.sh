#!/usr/bin/env bash
# loop.sh measures one request into a request loop: a sidecar with a
# service registered at its own address (the mistake of issue 13), one
# request by the proxy and one by RPC. It prints the answer, the time
# curl took, and the sidecar's descriptors and RSS (VmRSS, VmHWM peak)
# from /proc before and after.
#
#	bench/loop.sh              the working tree
#	bench/loop.sh REF          also the commit REF (e.g. a commit before Via), for comparison
#
# The registration is made on purpose: a sidecar that refuses its own
# address at registration prints "registration refused" instead.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
tmpdir
go build -o "$tmp/sidecar-tree" .
bins=("$tmp/sidecar-tree")
if [ $# -gt 0 ]; then
	mkdir "$tmp/src"
	git archive "$1" | tar -x -C "$tmp/src"
	(cd "$tmp/src" && go build -o "$tmp/sidecar-$1" .)
	bins+=("$tmp/sidecar-$1")
fi

measure() { # binary handler method path
	local bin=$1 handler=$2 method=$3 path=$4 out="$tmp/out" pid url port code
	: >"$out"
	"$bin" --address 127.0.0.1:0 --handler "$handler" >"$out" 2>/dev/null &
	pid=$!
	wait_line "$out" listening
	url=$(awk '{print $NF}' "$out")
	port=${url##*:}
	code=$(curl -s -o /dev/null -w '%{http_code}' -d "{\"name\":\"go.micro.srv.loop\",\"nodes\":[{\"id\":\"self\",\"address\":\"127.0.0.1\",\"port\":$port}]}" "$url/registry")
	if [ "$code" != 200 ]; then
		echo "$(basename "$bin") $handler: registration refused ($code)"
	else
		local fd0 rss0 res fd1 rss1 hwm
		fd0=$(ls /proc/$pid/fd | wc -l)
		rss0=$(awk '/VmRSS/{print $2}' /proc/$pid/status)
		res=$(curl -s -o /dev/null -X "$method" -d '{}' -w '%{http_code} in %{time_total}s' "$url$path")
		fd1=$(ls /proc/$pid/fd | wc -l)
		rss1=$(awk '/VmRSS/{print $2}' /proc/$pid/status)
		hwm=$(awk '/VmHWM/{print $2}' /proc/$pid/status)
		echo "$(basename "$bin") $handler $method $path: $res; descriptors $fd0 -> $fd1; RSS ${rss0} kB -> ${rss1} kB (peak ${hwm} kB)"
	fi
	kill $pid
	wait $pid 2>/dev/null || true
}

for bin in "${bins[@]}"; do
	measure "$bin" proxy GET /loop/x
	measure "$bin" rpc POST /loop/call
done
