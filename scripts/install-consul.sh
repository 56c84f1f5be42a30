#!/usr/bin/env bash
# install-consul.sh puts a `consul` binary on PATH for the Consul tests
# (TestConsulAgent). Idempotent: it returns at once when consul is there.
#
# There is no Debian package of Consul and no download of release binaries
# here, so it builds Consul from source through the Go module proxy. `go
# install github.com/hashicorp/consul@VERSION` refuses (Consul's go.mod has
# replace directives), so a throw-away module requires it and builds it. Two
# of Consul's sub-modules are on the proxy but not in the checksum database,
# hence the narrow GONOSUMDB. The build takes several minutes on 2 cores.
set -euo pipefail

VERSION="${CONSUL_VERSION:-v1.20.2}"
DEST="${CONSUL_INSTALL_DIR:-/usr/local/bin}"

if command -v consul >/dev/null 2>&1; then
	echo "install-consul: $(command -v consul) already present"
	exit 0
fi
if [ -x "$DEST/consul" ]; then
	echo "install-consul: $DEST/consul already present (add $DEST to PATH)"
	exit 0
fi
command -v go >/dev/null || { echo "install-consul: go not found" >&2; exit 1; }

# The throw-away module and the binary get names of their own (mktemp), so
# two runs at once (two CI jobs, two worktrees) neither rewrite each other's
# go.mod nor move each other's half-written binary; the module cache they
# share is safe for concurrent use. The last rename wins, and it is atomic
# because the temporary binary sits in DEST itself.
mkdir -p "$DEST"
work=$(mktemp -d)
tmp=$(mktemp "$DEST/consul.XXXXXX")
trap 'rm -rf "$work" "$tmp"' EXIT
cd "$work"
cat > go.mod <<MOD
module consulbuild

go 1.22
MOD
cat > tools.go <<'SRC'
//go:build tools

package tools

import _ "github.com/hashicorp/consul"
SRC

export GOFLAGS=-mod=mod
export GONOSUMDB=github.com/hashicorp/consul/envoyextensions,github.com/hashicorp/consul/troubleshoot
echo "install-consul: building consul $VERSION from the Go module proxy (several minutes)"
start=$(date +%s)
go get "github.com/hashicorp/consul@$VERSION"
CGO_ENABLED=0 go build -trimpath -o "$tmp" github.com/hashicorp/consul
chmod 0755 "$tmp"
mv -f "$tmp" "$DEST/consul"
echo "install-consul: $DEST/consul built in $(( $(date +%s) - start ))s: $("$DEST/consul" version | head -1)"
