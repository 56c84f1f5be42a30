#!/bin/sh
# install-curl.sh installs curl, which TestBrokerSeedPublish uses to run the
# seed's literal publish command. Idempotent: it returns at once when curl
# is already on PATH.
set -eu

if command -v curl >/dev/null 2>&1; then
	exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then
	SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends curl >/dev/null
curl --version | head -1
