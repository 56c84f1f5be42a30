#!/bin/sh
# install-chromium.sh installs the Debian package chromium, which the stats
# page browser test (stats_browser_test.go) drives headless. Idempotent:
# it returns at once when /usr/bin/chromium is already there.
set -eu

if [ -x /usr/bin/chromium ]; then
	exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then
	SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
