#!/usr/bin/env bash
# install-debian.sh installs the integration tools that come as Debian
# packages, each only when none of its commands is found:
#
#	command(s)                             package(s)                   used by
#	chromium, chromium-browser,            chromium fonts-dejavu-core   stats_browser_test.go (headless page)
#	  google-chrome
#	nats-server (Debian: /usr/sbin)        nats-server                  broker_nats_test.go, bench/
#	curl                                   curl                         TestBrokerSeedPublish (the seed's command)
#	python3                                python3                      TestREADMEPythonGreeter
#	git                                    git                          TestVersionFromGit
#
# Idempotent: with every tool present it runs no apt-get at all; otherwise
# one apt-get update and one install of what is missing.
set -euo pipefail

tools=(
	"chromium chromium-browser google-chrome|chromium fonts-dejavu-core"
	"nats-server /usr/sbin/nats-server|nats-server"
	"curl|curl"
	"python3|python3"
	"git|git"
)

missing=()
for t in "${tools[@]}"; do
	cmds=${t%%|*} pkgs=${t#*|} found=
	for c in $cmds; do
		if command -v "$c" >/dev/null 2>&1; then
			found=$c
			break
		fi
	done
	if [ -n "$found" ]; then
		echo "install-debian: $(command -v "$found") already present"
	else
		missing+=($pkgs)
	fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=
if [ "$(id -u)" != 0 ]; then
	SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-debian: installing ${missing[*]}"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-debian: installed ${missing[*]}"
