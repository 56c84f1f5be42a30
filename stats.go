package main

// stats.go owns observability: request counters by route template and
// status class, the /stats page and JSON, and /metrics. (Stub: issue 7
// fills it in.)

import (
	"log/slog"
	"net/http"
)

// emitFunc receives one metric sample for /metrics and /stats: its name,
// help text, kind ("counter" or "gauge"), value and label pairs
// ("service", "foo", ...). Components that own counters offer a method
// `metrics(emit emitFunc)` that calls it once per sample.
type emitFunc func(name, help, kind string, value float64, labels ...string)

// stats counts the requests the sidecar serves.
type stats struct {
	cfg *Config
	log *slog.Logger
}

func newStats(cfg *Config, logger *slog.Logger) *stats {
	return &stats{cfg: cfg, log: logger}
}

// wrap counts every request that next serves.
func (st *stats) wrap(next http.Handler) http.Handler { return next }

// handleStats serves GET /stats.
func (st *stats) handleStats(w http.ResponseWriter, r *http.Request) {
	writeError(w, http.StatusNotFound, "stats: start the sidecar with --enable_stats")
}

// handleMetrics serves GET /metrics.
func (st *stats) handleMetrics(w http.ResponseWriter, r *http.Request) {
	writeError(w, http.StatusNotImplemented, "stats: not implemented")
}
