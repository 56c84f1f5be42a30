#!/usr/bin/env bash
# install-nats-server.sh installs nats-server (Debian package nats-server,
# which puts the binary in /usr/sbin), the server that the NATS broker tests
# (broker_nats_test.go) run against and the broker benchmarks compare with.
# Idempotent: quick when already installed.
set -euo pipefail
if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
	echo "nats-server: already installed"
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "install-nats-server: need root for apt-get (or install the nats-server package)" >&2
	exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
echo "nats-server: installed $(/usr/sbin/nats-server --version)"
