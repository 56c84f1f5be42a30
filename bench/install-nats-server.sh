#!/usr/bin/env bash
# install-nats-server.sh installs nats-server (Debian package), the peer the
# broker benchmark compares with. Idempotent: quick when already installed.
set -euo pipefail
if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "install-nats-server: need root for apt-get" >&2
	exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
