#!/bin/sh
# install-python3.sh installs python3, which TestREADMEPythonGreeter uses to
# run the README's Python greeter against a sidecar. Idempotent: it returns
# at once when python3 is already on PATH.
set -eu

if command -v python3 >/dev/null 2>&1; then
	exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then
	SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends python3 >/dev/null
python3 --version
