#!/bin/sh
# install-chromium.sh installs the Debian package chromium, which the stats
# page browser test (stats_browser_test.go) drives headless. Idempotent:
# it returns at once when a Chromium is already on PATH, under any of the
# names the test looks for (chromium, chromium-browser, google-chrome).
set -eu

for name in chromium chromium-browser google-chrome; do
	if command -v "$name" >/dev/null 2>&1; then
		echo "install-chromium: $(command -v "$name") already present"
		exit 0
	fi
done
SUDO=
if [ "$(id -u)" != 0 ]; then
	SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version
