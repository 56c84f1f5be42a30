package main

// registry_remote.go is how the sidecar reaches a remote registry (Consul,
// another sidecar): remoteClient, the one bounded pool of connections a
// backend makes every call through, counted from this side.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// remoteStatuses are the labels of a backend's failures: the statuses that
// mean "back off" (429, 5xx) or "not allowed" (403), and network errors.
var remoteStatuses = [...]string{"403", "429", "500", "502", "503", "504", "5xx", "network"}

// remoteClient is the HTTP client of a remote backend: one pool of at most
// timing.conns connections to it, shared by every call (blocking queries,
// lookups, registrations, the watch stream), and counted from this side:
// connections open and the most at once, requests, and failures by status,
// logged at most once per remoteLogInterval. Safe for concurrent use.
type remoteClient struct {
	client *http.Client // Transport is the remoteClient itself
	tr     *http.Transport
	log    *slog.Logger
	name   string // "consul" or "sidecar registry", for log lines

	open     atomic.Int64 // connections open now
	peak     atomic.Int64 // most connections open at once
	requests atomic.Int64
	failures [len(remoteStatuses)]atomic.Int64

	logMu     sync.Mutex // guards lastLog, unlogged
	lastLog   time.Time
	unlogged  int64 // failures since the last log line
	logWindow time.Duration
}

// newRemoteClient builds the pool of a backend. streams is the number of
// connections taken out of the pool for good (an upgraded websocket no
// longer counts as the transport's), so the pool keeps t.conns-streams.
func newRemoteClient(name string, t remoteTiming, streams int, logger *slog.Logger) *remoteClient {
	rc := &remoteClient{log: logger, name: name, logWindow: remoteLogInterval}
	dialer := &net.Dialer{Timeout: t.timeout, KeepAlive: 30 * time.Second}
	pool := max(t.conns-streams, 1)
	rc.tr = &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		DialContext:         rc.dialer(dialer),
		ForceAttemptHTTP2:   true, // over TLS, HTTP/2 carries many blocking queries on one connection
		MaxConnsPerHost:     pool,
		MaxIdleConns:        pool,
		MaxIdleConnsPerHost: pool,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: t.timeout,
	}
	rc.client = &http.Client{Transport: rc}
	return rc
}

// dialer counts the connections d opens, until each is closed.
func (rc *remoteClient) dialer(d *net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		n := rc.open.Add(1)
		for p := rc.peak.Load(); n > p && !rc.peak.CompareAndSwap(p, n); p = rc.peak.Load() {
		}
		return &countedConn{Conn: conn, open: &rc.open}, nil
	}
}

// countedConn takes itself off its pool's count once closed.
type countedConn struct {
	net.Conn
	open *atomic.Int64
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.open.Add(-1) })
	return c.Conn.Close()
}

// RoundTrip implements http.RoundTripper: the pool's transport, counting
// requests and failures. A call cancelled by its caller is no failure.
func (rc *remoteClient) RoundTrip(req *http.Request) (*http.Response, error) {
	rc.requests.Add(1)
	resp, err := rc.tr.RoundTrip(req)
	switch {
	case err != nil:
		if req.Context().Err() == nil {
			rc.failed("network", req, err)
		}
	case resp.StatusCode == http.StatusForbidden || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		status := fmt.Sprint(resp.StatusCode)
		if !slices.Contains(remoteStatuses[:], status) {
			status = "5xx"
		}
		rc.failed(status, req, errors.New(resp.Status))
	}
	return resp, err
}

// failed counts one failure, and logs it unless a line was logged less
// than logWindow ago; the next line says how many went unlogged.
func (rc *remoteClient) failed(status string, req *http.Request, err error) {
	rc.failures[slices.Index(remoteStatuses[:], status)].Add(1)
	rc.logMu.Lock()
	now := time.Now()
	if now.Sub(rc.lastLog) < rc.logWindow {
		rc.unlogged++
		rc.logMu.Unlock()
		return
	}
	rc.lastLog = now
	unlogged := rc.unlogged
	rc.unlogged = 0
	rc.logMu.Unlock()
	rc.log.Warn(rc.name+" call failed; backing off and serving what is cached", "status", status, "method", req.Method,
		"path", req.URL.Path, "err", err, "failures_unlogged", unlogged, "log_interval", rc.logWindow)
}

// metrics emits the pool's samples.
func (rc *remoteClient) metrics(emit emitFunc) {
	emit("sidecar_registry_connections", "Connections open to the remote registry, counted by this sidecar.", "gauge", float64(rc.open.Load()))
	emit("sidecar_registry_connections_peak", "Most connections open at once to the remote registry.", "gauge", float64(rc.peak.Load()))
	emit("sidecar_registry_requests_total", "Requests sent to the remote registry.", "counter", float64(rc.requests.Load()))
	for i, status := range remoteStatuses {
		emit("sidecar_registry_errors_total", "Failed calls to the remote registry, by HTTP status (network: no answer).", "counter",
			float64(rc.failures[i].Load()), "status", status)
	}
}

func (rc *remoteClient) close() { rc.tr.CloseIdleConnections() }
