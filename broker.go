package main

// broker.go owns pub/sub: POST /broker publishes, a websocket GET /broker
// subscribes. (Stub: issue 5 fills it in.)

import (
	"log/slog"
	"net/http"
)

// broker delivers messages published on a topic to its subscribers.
type broker struct {
	cfg     *Config
	streams *streams
	log     *slog.Logger
}

func newBroker(cfg *Config, st *streams, logger *slog.Logger) *broker {
	return &broker{cfg: cfg, streams: st, log: logger}
}

// handlePublish serves POST /broker?topic=T.
func (b *broker) handlePublish(w http.ResponseWriter, r *http.Request) {
	writeError(w, http.StatusNotImplemented, "broker: not implemented")
}

// handleSubscribe serves the websocket GET /broker?topic=T[&queue=Q].
func (b *broker) handleSubscribe(w http.ResponseWriter, r *http.Request) {
	writeError(w, http.StatusNotImplemented, "broker: not implemented")
}

// Close ends subscriptions and waits for their goroutines.
func (b *broker) Close() error { return nil }
