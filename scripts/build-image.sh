#!/usr/bin/env bash
# build-image.sh builds the sidecar's container image with Buildah from the
# static binary built here (Dockerfile, SOURCE=local), exports it as an OCI
# archive and checks, on the exported archive, what a user of the image
# depends on:
#
#   static     the binary has no program interpreter and no dynamic section
#              (it must run in an image with no libc), and is stripped
#   certs      the CA bundle is at /etc/ssl/certs/ca-certificates.crt
#   entrypoint the image's Entrypoint+Cmd, run with the image's Env and
#              nothing else from the unpacked root filesystem (chroot, in a
#              network namespace of its own), starts the sidecar
#   listen     it binds :8081 on every interface, as MICRO_ADDRESS says
#   health     GET /health answers 200 {"status":"ok",...}
#   user       the process runs as uid 65534 and gid 65534 (the image's
#              USER), not root
#   version    the image's command with --version prints the version
#   warning    it warns that it runs exposed without a token
#   shutdown   SIGTERM ends it with status 0
#
# Usage (as root; no container engine is needed):
#   bash scripts/build-image.sh              build, export, check
#   bash scripts/build-image.sh --self-test  the above, then build the broken
#                                            variants below and require the
#                                            checks to refuse each one
#   bash scripts/build-image.sh --break KIND build a broken variant and check
#                                            it (fails): dynamic (a cgo
#                                            binary), entrypoint (a wrong
#                                            path) or root (no USER)
#   bash scripts/build-image.sh --check FILE check an OCI archive built
#                                            elsewhere (e.g. the Dockerfile's
#                                            Go build stage, then
#                                            buildah push IMG oci-archive:FILE)
#
# Environment: IMAGE (the name in the archive, default
# localhost/sidecar:latest), OUT (the OCI archive, default
# build/sidecar-image.tar). Buildah's storage (driver vfs) is a temporary
# directory, removed at exit: the archive is the product, and nothing piles
# up (Buildah 1.28 leaves a working container behind for a FROM of a stage).
# Missing tools (buildah, jq, binutils, iproute2, curl) are installed with
# apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

IMAGE="${IMAGE:-localhost/sidecar:latest}"
OUT="${OUT:-$repo/build/sidecar-image.tar}"
PORT=8081     # what the image's MICRO_ADDRESS sets
WANT_ID=65534 # nobody

say() { echo "build-image: $*"; }
# fail names the check that failed; --self-test matches on "FAIL <check>".
fail() {
	echo "build-image: FAIL $1: $2" >&2
	exit 1
}
pass() { say "ok   $1: $2"; }

# Temporary directories go when the script exits, however it exits.
tmpdirs=()
trap 'rm -rf "${tmpdirs[@]}"' EXIT
newtmp() { # newtmp VAR: a new directory in VAR
	local d
	d=$(mktemp -d)
	tmpdirs+=("$d")
	printf -v "$1" %s "$d"
}

bh() { buildah --root "$BUILDAH_ROOT/root" --runroot "$BUILDAH_ROOT/run" --storage-driver vfs "$@"; }

# ensure_tools installs what is missing, one Debian package per command.
ensure_tools() {
	local missing=() cmd pkg
	for pair in buildah:buildah jq:jq readelf:binutils ss:iproute2 ip:iproute2 curl:curl unshare:util-linux chroot:coreutils; do
		cmd=${pair%%:*} pkg=${pair#*:}
		command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
	done
	[ ${#missing[@]} -eq 0 ] && return
	[ "$(id -u)" -eq 0 ] || fail tools "missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root"
	say "installing ${missing[*]} with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } ||
		fail tools "apt-get install ${missing[*]} failed"
}

# build makes the image IMAGE from a binary built here and exports it to
# OUT. kind names a deliberate defect, or is empty.
build() {
	local kind=$1 ctx
	newtmp ctx
	newtmp BUILDAH_ROOT
	# -buildvcs=auto overrides a GOFLAGS=-buildvcs=false: the binary names
	# its commit when built from a git clone (not from a git worktree,
	# where Go finds no repository).
	local cgo=0
	[ "$kind" = dynamic ] && cgo=1 # net and os/user then link libc
	CGO_ENABLED=$cgo go build -buildvcs=auto -trimpath -ldflags=-s -o "$ctx/sidecar" .
	cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
	cp Dockerfile "$ctx/Dockerfile"
	case "$kind" in
	"" | dynamic) ;;
	entrypoint) sed -i 's|^ENTRYPOINT \["/sidecar"\]|ENTRYPOINT ["/bin/sidecar"]|' "$ctx/Dockerfile" ;;
	root) sed -i '/^USER /d' "$ctx/Dockerfile" ;;
	*) fail usage "unknown --break kind $kind (dynamic, entrypoint or root)" ;;
	esac
	if [ -n "$kind" ] && cmp -s Dockerfile "$ctx/Dockerfile" && [ "$kind" != dynamic ]; then
		fail usage "--break $kind changed nothing in the Dockerfile (did it change?)"
	fi
	say "building $IMAGE${kind:+ (broken: $kind)} with buildah $(buildah --version | awk '{print $3}')"
	bh build --quiet --build-arg SOURCE=local -f "$ctx/Dockerfile" -t "$IMAGE" "$ctx" >/dev/null
	mkdir -p "$(dirname "$OUT")"
	rm -f "$OUT"
	bh push --quiet "$IMAGE" "oci-archive:$OUT:$IMAGE" >/dev/null
	say "exported $OUT ($(du -h "$OUT" | cut -f1))"
}

# check unpacks the OCI archive OUT and checks the image in it.
check() {
	local work
	newtmp work
	mkdir "$work/oci" "$work/rootfs"
	tar -xf "$OUT" -C "$work/oci"
	local blobs="$work/oci/blobs/sha256" manifest config
	manifest=$(jq -r '.manifests[0].digest' "$work/oci/index.json")
	config=$(jq -r '.config.digest' "$blobs/${manifest#sha256:}")
	jq '.config' "$blobs/${config#sha256:}" >"$work/config.json"
	for layer in $(jq -r '.layers[].digest' "$blobs/${manifest#sha256:}"); do
		tar -xf "$blobs/${layer#sha256:}" -C "$work/rootfs"
	done
	if find "$work/rootfs" -name '.wh.*' | grep -q .; then
		fail layers "whiteout files in a FROM scratch image"
	fi
	local rootfs="$work/rootfs"

	# static: a dynamic binary names an interpreter (ld.so) that a
	# scratch image does not have.
	local bin="$rootfs/sidecar"
	[ -f "$bin" ] || fail static "no /sidecar in the image"
	local headers
	headers=$(readelf -lW "$bin") || fail static "/sidecar is not an ELF executable"
	if grep -qE '^\s*(INTERP|DYNAMIC)\s' <<<"$headers"; then
		fail static "/sidecar is dynamically linked ($(grep -oE 'Requesting program interpreter: [^]]*' <<<"$headers" || echo 'DYNAMIC segment')); build it with CGO_ENABLED=0"
	fi
	if readelf -SW "$bin" | grep -q '\.symtab'; then
		fail static "/sidecar is not stripped (build with -ldflags=-s)"
	fi
	pass static "/sidecar has no interpreter, no dynamic section, no symbol table"

	grep -q 'BEGIN CERTIFICATE' "$rootfs/etc/ssl/certs/ca-certificates.crt" 2>/dev/null ||
		fail certs "no CA bundle at /etc/ssl/certs/ca-certificates.crt"
	pass certs "/etc/ssl/certs/ca-certificates.crt ($(grep -c 'BEGIN CERTIFICATE' "$rootfs/etc/ssl/certs/ca-certificates.crt") certificates)"
	jq -e --arg p "$PORT/tcp" '.ExposedPorts | has($p)' "$work/config.json" >/dev/null ||
		fail expose "the image does not expose $PORT/tcp"

	# The rest runs the image's own command in a network namespace of its
	# own: port 8081 of this host may be taken, and nothing outside sees it.
	unshare --net -- bash "$repo/scripts/build-image.sh" __run "$rootfs" "$work/config.json" "$work"
	say "image $IMAGE passed every check: $(jq -r '.User' "$work/config.json") $(jq -c '.Entrypoint' "$work/config.json") $(jq -c '.Env' "$work/config.json")"
}

# run_in_netns runs the image's command from rootfs as the image's user
# with the image's environment and checks it. It runs inside unshare --net.
run_in_netns() {
	local rootfs=$1 config=$2 work=$3
	ip link set lo up
	local user uid gid
	user=$(jq -r '.User // ""' "$config")
	[ -z "$user" ] && user=0 # no USER: root, as every engine runs it
	[[ $user =~ ^[0-9]+(:[0-9]+)?$ ]] ||
		fail user "USER $user is not numeric uid[:gid]: the image has no /etc/passwd to look names up in"
	uid=${user%%:*}
	gid=0 # an engine finds no group for a bare uid in an image without /etc/group
	[[ $user == *:* ]] && gid=${user#*:}
	local argv=() envv=()
	mapfile -t argv < <(jq -r '((.Entrypoint // []) + (.Cmd // []))[]' "$config")
	mapfile -t envv < <(jq -r '(.Env // [])[]' "$config")
	[ ${#argv[@]} -gt 0 ] || fail entrypoint "the image has neither Entrypoint nor Cmd"

	mkfifo "$work/stdout"
	env -i "${envv[@]}" chroot --userspec="$uid:$gid" "$rootfs" "${argv[@]}" >"$work/stdout" 2>"$work/stderr" &
	pid=$! # global: the EXIT trap stops it when a check fails
	trap '[ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true' EXIT
	# Awaits the address line the sidecar prints once it is bound.
	local line=""
	exec 3<"$work/stdout"
	if ! read -r -t 30 -u 3 line || [[ $line != "sidecar listening on "* ]]; then
		fail entrypoint "$(printf '%q ' "${argv[@]}")(the image's command) did not start the sidecar: ${line:-no address line}; stderr: $(tr '\n' ' ' <"$work/stderr")"
	fi
	pass entrypoint "$(printf '%s ' "${argv[@]}")printed: $line"

	local procroot
	procroot=$(readlink "/proc/$pid/root")
	[ "$procroot" = "$rootfs" ] || fail entrypoint "the process runs in $procroot, not in the unpacked image"

	local listening
	listening=$(ss -Hltnp "sport = :$PORT")
	grep -q "pid=$pid," <<<"$listening" || fail listen "the sidecar (pid $pid) does not listen on :$PORT: ${listening:-nothing does}"
	grep -qE "(\*|0\.0\.0\.0|\[::\]):$PORT\s" <<<"$listening" || fail listen "it listens on $(awk '{print $4}' <<<"$listening"), not on every interface"
	pass listen "$(awk '{print $4}' <<<"$listening") (every interface)"

	local body
	body=$(curl -fsS --max-time 10 "http://127.0.0.1:$PORT/health") || fail health "GET /health failed"
	jq -e '.status == "ok"' <<<"$body" >/dev/null || fail health "GET /health = $body, want status ok"
	pass health "GET /health = $body"

	local ids
	ids=$(awk '/^Uid:/ {print "uid", $2, $3, $4, $5} /^Gid:/ {print "gid", $2, $3, $4, $5}' "/proc/$pid/status" | tr '\n' ' ')
	[ "$ids" = "uid $WANT_ID $WANT_ID $WANT_ID $WANT_ID gid $WANT_ID $WANT_ID $WANT_ID $WANT_ID " ] ||
		fail user "the sidecar runs as ${ids}(real, effective, saved, fs), want $WANT_ID for all: set USER $WANT_ID:$WANT_ID"
	pass user "uid and gid $WANT_ID"

	local version
	version=$(env -i "${envv[@]}" chroot --userspec="$uid:$gid" "$rootfs" "${argv[@]}" --version) ||
		fail version "$(printf '%s ' "${argv[@]}")--version failed"
	[[ $version == "sidecar "* ]] || fail version "--version printed $version"
	pass version "$version"

	kill -TERM "$pid"
	local status=0
	wait "$pid" || status=$?
	pid=""
	exec 3<&-
	[ "$status" -eq 0 ] || fail shutdown "exit status $status after SIGTERM; stderr: $(tr '\n' ' ' <"$work/stderr")"
	pass shutdown "SIGTERM: exit 0"
	grep -q 'level=WARN msg="no auth token' "$work/stderr" ||
		fail warning "no warning about running exposed without a token; stderr: $(tr '\n' ' ' <"$work/stderr")"
	pass warning "$(grep -o 'msg="no auth token[^"]*"' "$work/stderr")"
}

# self_test checks the image, then requires each broken variant to fail
# the check named beside it.
self_test() {
	local start=$SECONDS
	build ""
	check
	local tmp
	newtmp tmp
	for pair in dynamic:static entrypoint:entrypoint root:user; do
		local kind=${pair%%:*} want=${pair#*:} status=0
		IMAGE="localhost/sidecar:broken-$kind" OUT="$tmp/$kind.tar" \
			bash "$repo/scripts/build-image.sh" --break "$kind" >"$tmp/$kind.log" 2>&1 || status=$?
		if [ "$status" -eq 0 ]; then
			cat "$tmp/$kind.log" >&2
			fail self-test "the image broken by $kind passed every check"
		fi
		if ! grep -q "FAIL $want:" "$tmp/$kind.log"; then
			cat "$tmp/$kind.log" >&2
			fail self-test "the image broken by $kind failed, but not the $want check"
		fi
		say "ok   self-test: broken by $kind, refused: $(grep -o "FAIL $want:.*" "$tmp/$kind.log" | cut -c1-160)"
	done
	say "self-test passed in $((SECONDS - start))s"
}

case "${1:-}" in
__run) # internal: check runs the image through unshare --net and this
	run_in_netns "$2" "$3" "$4"
	;;
"")
	ensure_tools
	build ""
	check
	;;
--self-test)
	ensure_tools
	self_test
	;;
--check)
	if [ $# -ne 2 ] || [ ! -f "$2" ]; then
		fail usage "--check FILE (an OCI archive)"
	fi
	ensure_tools
	OUT=$(realpath "$2") IMAGE="$2"
	check
	;;
--break)
	[ $# -eq 2 ] || fail usage "--break KIND (dynamic, entrypoint or root)"
	ensure_tools
	build "$2"
	check
	;;
*)
	fail usage "unknown argument $1 (see the comment at the top of scripts/build-image.sh)"
	;;
esac
