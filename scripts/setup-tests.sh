#!/bin/sh
# setup-tests.sh installs what the optional integration tests drive: Pebble
# (ACME), Chromium (the stats page) and any other peer a script exists for.
# Each installer is idempotent and quick when its tool is present. A failed
# install is reported and the matching tests skip with a message.
set -u
cd "$(dirname "$0")"
status=0
for s in install-*.sh; do
	[ -f "$s" ] || continue
	if ! bash "$s"; then
		echo "setup-tests: $s failed; the tests that need it will skip" >&2
		status=1
	fi
done
exit $status
