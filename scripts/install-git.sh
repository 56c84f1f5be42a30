#!/bin/sh
# install-git.sh installs git, which TestVersionFromGit uses to build the
# sidecar from a checkout with a known commit. Idempotent: it returns at
# once when git is already on PATH (it is wherever the repository was
# cloned).
set -eu

if command -v git >/dev/null 2>&1; then
	exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then
	SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends git >/dev/null
git --version
