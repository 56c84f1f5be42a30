//go:build pprof

package main

// stats_pprof.go, only in a binary built with -tags pprof, serves
// net/http/pprof on the address in SIDECAR_PPROF (e.g. 127.0.0.1:6060), a
// listener of its own, so a benchmark can profile the real binary under
// load (bench/profile.sh), and expvar's /debug/vars (the runtime's
// memstats). Release builds do not contain it.

import (
	_ "expvar" // /debug/vars: memstats, for allocations per request
	"log"
	"net/http"
	_ "net/http/pprof"
	"os"
)

func init() {
	addr := os.Getenv("SIDECAR_PPROF")
	if addr == "" {
		return
	}
	go func() { log.Println(http.ListenAndServe(addr, nil)) }()
}
