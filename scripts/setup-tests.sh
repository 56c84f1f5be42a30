#!/bin/sh
# setup-tests.sh installs what the integration tests drive: Consul, Pebble
# (ACME), Chromium (the stats page), nats-server, curl, python3, git, and
# any other tool a script install-*.sh exists for. Each installer is
# idempotent and quick when its tool is present. It runs every installer,
# reports each failure, and exits non-zero if any failed: CI (.ci/run)
# stops there. Without a tool its tests skip with a message, or fail when
# SIDECAR_REQUIRE_INTEGRATION=1 or CI=true (tools_test.go).
set -u
cd "$(dirname "$0")"
status=0
for s in install-*.sh; do
	[ -f "$s" ] || continue
	if ! bash "$s"; then
		echo "setup-tests: $s failed" >&2
		status=1
	fi
done
exit $status
