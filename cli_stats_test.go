package main

import (
	"strings"
	"testing"
)

// TestCLIStatsServices: `sidecar stats` prints a row per upstream service,
// from /stats and, without --enable_stats, from /metrics, where the
// services' histogram buckets are read, not printed.
func TestCLIStatsServices(t *testing.T) {
	t.Parallel()
	host, port := newGreeter(t)
	const name = "go.micro.srv.greeter"
	for _, flags := range [][]string{nil, {"--enable_stats"}} {
		_, url, _ := startBinary(t, flags...)
		wantOK(t, runClient(t, "", nil, "register", "service", serviceJSON(name, "greeter-1", host, port), "--proxy_address", url))
		for range 3 {
			wantOK(t, runClient(t, "", nil, "call", name, "Say.Hello", `{"name":"x"}`, "--proxy_address", url))
		}
		r := runClient(t, "", nil, "stats", "--proxy_address", url)
		wantOK(t, r, "stats")
		if !regexpLine(r.stdout, "Service", "Via", "Calls", "Success") || !regexpLine(r.stdout, name, "rpc", "3", "100%") {
			t.Errorf("stats %v: want a Services table with %s, 3 calls, 100%%:\n%s", flags, name, r.stdout)
		}
		if strings.Contains(r.stdout, "_bucket") || strings.Contains(r.stdout, "sidecar_rpc_calls_total") {
			t.Errorf("stats %v prints the services' raw series:\n%s", flags, r.stdout)
		}
	}
}
