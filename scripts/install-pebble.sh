#!/bin/sh
# install-pebble.sh installs Pebble, the ACME test CA that acme_test.go runs
# against. Idempotent: does nothing when the binary is already there.
set -eu
version=v2.10.1
bin="$(go env GOPATH)/bin/pebble"
if [ -x "$bin" ]; then
	echo "pebble: $bin already installed"
	exit 0
fi
go install "github.com/letsencrypt/pebble/v2/cmd/pebble@$version"
# The test also needs pebble's test certificates from the module source,
# which go install leaves in the module cache; make sure they are there.
go mod download -x "github.com/letsencrypt/pebble/v2@$version" >/dev/null 2>&1 || true
echo "pebble: installed $bin ($version)"
