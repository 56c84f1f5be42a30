package main

// rpc.go owns RPC: POST /rpc and the /[service]/[method] path mapping,
// forwarded to JSON-RPC backends. (Stub: issue 3 fills it in.)

import (
	"log/slog"
	"net/http"
)

// rpcHandler forwards calls to service nodes found in the registry.
type rpcHandler struct {
	cfg *Config
	reg Registry
	log *slog.Logger
}

func newRPCHandler(cfg *Config, reg Registry, logger *slog.Logger) *rpcHandler {
	return &rpcHandler{cfg: cfg, reg: reg, log: logger}
}

// handleRPC serves POST /rpc.
func (h *rpcHandler) handleRPC(w http.ResponseWriter, r *http.Request) {
	writeError(w, http.StatusNotImplemented, "rpc: not implemented")
}

// handlePath serves /[service]/[method].
func (h *rpcHandler) handlePath(w http.ResponseWriter, r *http.Request) {
	writeError(w, http.StatusNotImplemented, "rpc: not implemented")
}

// Close releases idle backend connections.
func (h *rpcHandler) Close() error { return nil }
