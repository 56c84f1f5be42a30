package main

// proxy.go owns the reverse proxy of --handler=proxy: every path the
// sidecar does not own goes, with its query, unchanged to a node of the
// service its first segment names. Nodes are chosen and ejected by a
// balancer (balancer.go); requests are retried on another node only where
// that is safe; ordinary requests get a timeout for the response headers,
// and streams (server-sent events, chunked bodies, websockets) an idle
// timeout instead of a total one.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	defaultProxyIdleTimeout = 60 * time.Second
	proxyBufferSize         = 32 << 10 // copy buffer of one streamed body
	idleChecks              = 4        // checks per idle period: a stream ends 1 to 1.25 periods after its last byte
)

// Causes of an outgoing request's end, read back by the error handler.
var (
	errHeaderTimeout = errors.New("no response headers in time")
	errIdleTimeout   = errors.New("stream idle for too long")
	errShutdown      = errors.New("sidecar shutting down")
)

// proxyHandler is the reverse proxy. It owns a backend transport (shared by
// every request), a balancer, and an httputil.ReverseProxy whose Rewrite
// sets the forwarding headers and whose Transport is the proxyHandler
// itself: RoundTrip picks nodes and retries. Safe for concurrent use; it
// starts no goroutines of its own beyond a timer per request in flight,
// proxied websockets are registered with streams so shutdown ends them,
// and Close releases idle backend connections.
type proxyHandler struct {
	cfg       *Config
	reg       Registry
	log       *slog.Logger
	bal       *balancer
	transport *http.Transport
	streams   *streams
	rp        *httputil.ReverseProxy

	// Counters without a service label (service names here come from
	// paths, not the registry).
	unknown        atomic.Int64 // requests for services the registry does not list
	budgetRefusals atomic.Int64 // retries refused by the retry budget
	idleTimeouts   atomic.Int64 // streams ended by --proxy_idle_timeout
	upgraded       atomic.Int64 // upgraded connections (websockets) open now
}

// newProxyHandler builds the proxy; clientTLS verifies nodes called over
// https (see backendScheme).
func newProxyHandler(cfg *Config, reg Registry, g *streams, clientTLS *tls.Config, logger *slog.Logger) *proxyHandler {
	p := &proxyHandler{
		cfg:       cfg,
		reg:       reg,
		log:       logger,
		bal:       newBalancer(cfg.Balancer, logger),
		transport: newBackendTransport(cfg, clientTLS),
		streams:   g,
	}
	// Bodies pass through as the node encoded them: the transport must not
	// ask for gzip on the caller's behalf and decode it.
	p.transport.DisableCompression = true
	p.bal.useTLS = func(n *Node) bool { return backendScheme(cfg, n) == "https" }
	p.rp = &httputil.ReverseProxy{
		Rewrite:   p.rewrite,
		Transport: p,
		// Server-sent events and bodies of unknown length (chunked
		// streams) are flushed on every write whatever this says
		// (ReverseProxy.flushInterval); a body with a Content-Length goes
		// through the connection's buffer. -1 (flush every write of every
		// body) cost 14% more CPU per request in bench/proxy.sh.
		FlushInterval: 0,
		BufferPool:    &bufferPool{},
		ErrorHandler:  p.writeProxyError,
		ErrorLog:      slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
	}
	return p
}

// Close releases idle backend connections. Requests in flight are the HTTP
// server's to drain, proxied websockets the streams' to end. Idempotent.
func (p *proxyHandler) Close() error {
	p.transport.CloseIdleConnections()
	return nil
}

// proxyService names the service of a proxied path with namespace ns: its
// first segment (/foo/... is ns.foo), or its first two when the first is a
// version (/v1/foo/... is ns.v1.foo). A path naming no valid service is a
// 404.
func proxyService(ns, path string) (string, error) {
	first, rest, _ := strings.Cut(strings.TrimPrefix(path, "/"), "/")
	if first == "" {
		return "", errorf(http.StatusNotFound, "proxy: path %q names no service; want /[service]/...", path)
	}
	if checkSegment(first) != nil {
		return "", errorf(http.StatusNotFound, "proxy: path %q names no service: a service segment holds only letters, digits, '_' and '-'", path)
	}
	name := first
	if isVersion(first) {
		if second, _, _ := strings.Cut(rest, "/"); second != "" && checkSegment(second) == nil {
			name = first + "." + second
		}
	}
	if ns != "" {
		name = ns + "." + name
	}
	if len(name) > maxNameLen {
		return "", errorf(http.StatusNotFound, "proxy: service name from path is longer than %d bytes", maxNameLen)
	}
	return name, nil
}

// Phases of a proxied request, which decide what its timer enforces.
const (
	phaseSending   = iota // the request body is still going out: idle timeout
	phaseHeaders          // waiting for response headers: the request timeout
	phaseStreaming        // the response (or upgraded connection) flows: idle timeout
)

// proxyCall is the state of one proxied request. It is the outgoing
// request's context (cancelled with a cause: header timeout, idle stream,
// shutdown) and carries what RoundTrip and the error handler need, so a
// request costs one allocation of the sidecar's own.
type proxyCall struct {
	context.Context // cancelled by cancel; Value(proxyCallKey{}) is the call
	cancel          context.CancelCauseFunc

	p         *proxyHandler
	service   string
	st        *svcState
	w         http.ResponseWriter // the caller's; unblocked by a write deadline when idle
	start     time.Time
	timeout   time.Duration // for the response headers
	lowered   bool          // the caller's Timeout header lowered timeout
	retrySafe bool          // idempotent without a body: may be sent again
	upgrade   bool          // the caller asks for a protocol upgrade

	phase atomic.Int32
	due   atomic.Int64 // unix ns by which headers must arrive, in phaseHeaders
	bytes atomic.Int64 // bytes moved either way: the idle check's activity

	timer *time.Timer
	mu    sync.Mutex // guards ended, seen, quiet; held by the timer while it acts
	ended bool       // the handler returned: w is off limits
	seen  int64      // bytes at the previous idle check
	quiet int        // idle checks in a row without a byte

	body  proxyBody // the outgoing request body, when there is one
	resp  proxyBody // the response body
	up    upgradeConn
	tried [4]*nodeState
}

// proxyCallKey finds the proxyCall in a request's context.
type proxyCallKey struct{}

func (pc *proxyCall) Value(k any) any {
	if _, ok := k.(proxyCallKey); ok {
		return pc
	}
	return pc.Context.Value(k)
}

// callOf returns the proxyCall of an outgoing request, or nil.
func callOf(r *http.Request) *proxyCall {
	pc, _ := r.Context().Value(proxyCallKey{}).(*proxyCall)
	return pc
}

// handle serves a path the sidecar does not own: it finds the service,
// then lets the ReverseProxy forward the request.
func (p *proxyHandler) handle(w http.ResponseWriter, r *http.Request) {
	service, err := proxyService(p.cfg.Namespace, r.URL.Path)
	if err != nil {
		writeErr(w, err)
		return
	}
	timeout, lowered, err := requestTimeout(r.Header, p.cfg.ClientRequestTimeout)
	if err != nil {
		writeErr(w, err)
		return
	}
	svc, err := p.reg.GetService(r.Context(), service)
	if errors.Is(err, errNotFound) {
		p.bal.forget(service)
		p.unknown.Add(1)
		writeError(w, http.StatusNotFound, "proxy: service %q not found", service)
		return
	}
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, "proxy: look up %s: %v", service, err)
		return
	}
	st := p.bal.service(svc)
	st.calls.Add(1)
	st.budget.deposit()

	pc := &proxyCall{p: p, service: service, st: st, w: w, start: time.Now(), timeout: timeout, lowered: lowered}
	pc.Context, pc.cancel = context.WithCancelCause(r.Context())
	hasBody := r.ContentLength != 0 // ReverseProxy sends no body for 0; -1 is chunked
	pc.retrySafe = !hasBody && idempotent(r.Method)
	pc.upgrade = r.Header.Get("Upgrade") != "" && headerHasToken(r.Header, "Connection", "upgrade")
	if pc.upgrade {
		// http.Server.Shutdown neither ends nor waits for hijacked
		// connections: the streams end this one and wait for it.
		done, ok := p.streams.join(func() { pc.cancel(errShutdown) })
		if !ok {
			pc.cancel(nil)
			writeError(w, http.StatusServiceUnavailable, "proxy: sidecar is shutting down")
			return
		}
		defer done()
	}
	first := timeout
	if hasBody {
		pc.phase.Store(phaseSending)
		first = min(timeout, p.cfg.ProxyIdleTimeout/idleChecks)
	} else {
		pc.phase.Store(phaseHeaders)
		pc.due.Store(pc.start.Add(timeout).UnixNano())
	}
	pc.timer = time.AfterFunc(first, pc.tick)
	defer pc.end()
	p.rp.ServeHTTP(w, r.WithContext(pc))
}

// idempotent reports whether a request with method may be sent twice with
// the same effect (RFC 9110 section 9.2.2).
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodPut, http.MethodDelete, http.MethodTrace:
		return true
	}
	return false
}

// end stops the timer and the outgoing request once the handler returns.
func (pc *proxyCall) end() {
	pc.mu.Lock()
	pc.ended = true
	pc.mu.Unlock()
	pc.timer.Stop()
	pc.cancel(nil)
}

// tick is the call's timer: the header deadline while waiting for the
// response, and the idle check while a body or stream flows.
func (pc *proxyCall) tick() {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.ended {
		return
	}
	idle := pc.p.cfg.ProxyIdleTimeout
	if pc.phase.Load() == phaseHeaders {
		if wait := time.Duration(pc.due.Load() - time.Now().UnixNano()); wait > 0 {
			pc.timer.Reset(wait)
			return
		}
		pc.cancel(errHeaderTimeout)
		return
	}
	if n := pc.bytes.Load(); n != pc.seen {
		pc.seen, pc.quiet = n, 0
		pc.timer.Reset(idle / idleChecks)
		return
	}
	if pc.quiet++; pc.quiet < idleChecks {
		pc.timer.Reset(idle / idleChecks)
		return
	}
	pc.p.idleTimeouts.Add(1)
	pc.cancel(errIdleTimeout)
	if !pc.upgrade {
		// A write blocked on a caller that stopped reading ends too.
		http.NewResponseController(pc.w).SetWriteDeadline(time.Now())
	}
}

// bodySent moves the call from sending to waiting for headers: the request
// timeout runs from the end of the upload, however long that took.
func (pc *proxyCall) bodySent() {
	pc.due.Store(time.Now().Add(pc.timeout).UnixNano())
	if pc.phase.CompareAndSwap(phaseSending, phaseHeaders) {
		pc.timer.Reset(pc.timeout)
	}
}

// rewrite prepares the outgoing request: path and query stay as they came;
// the Host header names the node; X-Forwarded-For extends the caller's
// chain, X-Forwarded-Host and -Proto describe the caller's request; the
// sidecar's own bearer token is not passed on; a W3C traceparent is passed
// through or started. ReverseProxy has already removed hop-by-hop headers.
func (p *proxyHandler) rewrite(pr *httputil.ProxyRequest) {
	if prior := pr.In.Header["X-Forwarded-For"]; len(prior) > 0 {
		pr.Out.Header["X-Forwarded-For"] = prior
	}
	pr.SetXForwarded()
	pr.Out.Host = ""
	if p.cfg.AuthToken != "" {
		delete(pr.Out.Header, "Authorization")
	}
	ensureTraceparent(pr.Out.Header)
	if pc := callOf(pr.In); pc != nil && pr.Out.Body != nil {
		pc.body = proxyBody{rc: pr.Out.Body, pc: pc, request: true}
		pr.Out.Body = &pc.body
	}
}

// proxyError is a proxied request's failure with the status the caller
// gets.
type proxyError struct {
	code int
	err  error
}

func (e *proxyError) Error() string { return e.err.Error() }
func (e *proxyError) Unwrap() error { return e.err }

// RoundTrip sends the outgoing request to a node of the call's service.
// On a failure that is safe to retry (a request that never reached a node,
// or an idempotent one without a body) it tries another node, within the
// retry budget and the request timeout. Every outcome feeds the node's
// ejection. Errors are *proxyError.
func (p *proxyHandler) RoundTrip(req *http.Request) (*http.Response, error) {
	pc := callOf(req)
	if pc == nil {
		return nil, &proxyError{http.StatusBadGateway, errors.New("request without a proxied call")}
	}
	tried := pc.tried[:0] // nodes this request failed on: retries go elsewhere
	out := req
	for try := 0; ; try++ {
		t0 := time.Now()
		n := p.bal.pick(pc.st, tried, t0)
		if n == nil {
			return nil, &proxyError{http.StatusServiceUnavailable, fmt.Errorf("service %q has no nodes", pc.service)}
		}
		if try > 0 {
			out = req.Clone(pc) // a failed attempt's connection may still read the previous one
		}
		out.URL.Scheme, out.URL.Host = "http", n.addr
		if strings.HasPrefix(n.url, "https:") {
			out.URL.Scheme = "https"
		}
		resp, err := p.transport.RoundTrip(out)
		if err == nil {
			p.bal.done(n, time.Since(t0), resp.StatusCode < 500)
			if resp.StatusCode >= 500 {
				pc.st.errors.Add(1)
			}
			return pc.received(resp), nil
		}
		pe, nodeFailed, retry := pc.classify(err)
		p.bal.done(n, time.Since(t0), !nodeFailed)
		if nodeFailed {
			p.log.Debug("attempt failed", "service", pc.service, "node", n.addr, "try", try, "err", err)
		}
		wait := retryBackoff(try)
		if !retry || try >= p.cfg.ClientRetries || time.Now().Add(wait).After(pc.start.Add(pc.timeout)) {
			return nil, pe
		}
		if !pc.st.budget.withdraw(time.Now()) {
			p.budgetRefusals.Add(1)
			return nil, pe
		}
		pc.st.retries.Add(1)
		if !sleepCtx(pc, wait) {
			pe, _, _ = pc.classify(pc.Err())
			return nil, pe
		}
		tried = append(tried, n)
	}
}

// classify turns a failed attempt into the caller's error, and says whether
// it counts against the node and whether another node may be tried: a
// request that never reached a node (a failed dial, nothing of the body
// read), or an idempotent one without a body.
func (pc *proxyCall) classify(err error) (pe *proxyError, nodeFailed, retry bool) {
	switch cause := context.Cause(pc); {
	case cause == errHeaderTimeout:
		// The caller's own short deadline says nothing of the node.
		return &proxyError{http.StatusGatewayTimeout, fmt.Errorf("no response headers within %s", pc.timeout)}, !pc.lowered, false
	case cause == errIdleTimeout:
		return &proxyError{http.StatusGatewayTimeout, fmt.Errorf("request body idle for %s", pc.p.cfg.ProxyIdleTimeout)}, false, false
	case cause == errShutdown:
		return &proxyError{http.StatusServiceUnavailable, cause}, false, false
	case pc.Err() != nil:
		return &proxyError{statusClientClosed, errors.New("caller went away")}, false, false
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return &proxyError{http.StatusServiceUnavailable, fmt.Errorf("connect: %w", op.Err)}, true, pc.bytes.Load() == 0
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return &proxyError{http.StatusGatewayTimeout, err}, true, false
	}
	return &proxyError{http.StatusBadGateway, err}, true, pc.retrySafe
}

// received notes the response headers' arrival, after which the idle
// timeout governs, and wraps the body (or the upgraded connection) to see
// its bytes.
func (pc *proxyCall) received(resp *http.Response) *http.Response {
	pc.phase.Store(phaseStreaming)
	pc.timer.Reset(pc.p.cfg.ProxyIdleTimeout / idleChecks)
	if rwc, ok := resp.Body.(io.ReadWriteCloser); ok && resp.StatusCode == http.StatusSwitchingProtocols {
		pc.p.upgraded.Add(1)
		pc.up = upgradeConn{rwc: rwc, pc: pc}
		resp.Body = &pc.up
		return resp
	}
	pc.resp = proxyBody{rc: resp.Body, pc: pc}
	resp.Body = &pc.resp
	return resp
}

// writeProxyError is the ReverseProxy's one error handler: every failure
// of a proxied request is the JSON error of its status.
func (p *proxyHandler) writeProxyError(w http.ResponseWriter, r *http.Request, err error) {
	pe := &proxyError{http.StatusBadGateway, err}
	errors.As(err, &pe)
	service := "?"
	if pc := callOf(r); pc != nil {
		service = pc.service
		pc.st.errors.Add(1)
		if pe.code == http.StatusGatewayTimeout {
			pc.st.timeouts.Add(1)
		}
	}
	writeError(w, pe.code, "proxy: %s %s to %s: %v", r.Method, r.URL.Path, service, pe.err)
}

// proxyBody is a request or response body seen by the idle check; the end
// of the request body starts the wait for the response headers.
type proxyBody struct {
	rc      io.ReadCloser
	pc      *proxyCall
	request bool // the request body: EOF means it is all sent
}

func (b *proxyBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if n > 0 {
		b.pc.bytes.Add(int64(n))
	}
	if err == io.EOF && b.request {
		b.pc.bodySent()
	}
	return n, err
}

// Close closes a response body. A request body stays open: ReverseProxy
// closes it when the handler returns, and a body the transport closed after
// a failed dial is sent again to another node.
func (b *proxyBody) Close() error {
	if b.request {
		return nil
	}
	return b.rc.Close()
}

// upgradeConn is the node's side of an upgraded connection (a websocket):
// the ReverseProxy reads what the node sends and writes what the caller
// sends through it, so both directions reach the idle check.
type upgradeConn struct {
	rwc    io.ReadWriteCloser
	pc     *proxyCall
	closed atomic.Bool
}

func (c *upgradeConn) Read(p []byte) (int, error) {
	n, err := c.rwc.Read(p)
	c.pc.bytes.Add(int64(n))
	return n, err
}

func (c *upgradeConn) Write(p []byte) (int, error) {
	n, err := c.rwc.Write(p)
	c.pc.bytes.Add(int64(n))
	return n, err
}

// Close may be called more than once (ReverseProxy closes the connection
// both when the copy ends and when the request's context does).
func (c *upgradeConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.pc.p.upgraded.Add(-1)
	}
	return c.rwc.Close()
}

// bufferPool lends the ReverseProxy its copy buffers, so a streamed body
// does not allocate one.
type bufferPool struct{ pool sync.Pool }

func (b *bufferPool) Get() []byte {
	if a, ok := b.pool.Get().(*[proxyBufferSize]byte); ok {
		return a[:]
	}
	return make([]byte, proxyBufferSize)
}

func (b *bufferPool) Put(buf []byte) {
	if len(buf) == proxyBufferSize {
		b.pool.Put((*[proxyBufferSize]byte)(buf))
	}
}

// metrics emits the proxy counters: per service (from the registry, so
// label values are bounded) and totals without labels.
func (p *proxyHandler) metrics(emit emitFunc) {
	p.bal.metrics("sidecar_proxy", emit)
	emit("sidecar_proxy_unknown_service_total", "Proxied requests for services the registry does not list.", "counter", float64(p.unknown.Load()))
	emit("sidecar_proxy_retry_budget_exhausted_total", "Proxy retries refused by the retry budget.", "counter", float64(p.budgetRefusals.Load()))
	emit("sidecar_proxy_idle_timeouts_total", "Proxied streams ended by --proxy_idle_timeout.", "counter", float64(p.idleTimeouts.Load()))
	emit("sidecar_proxy_upgraded_connections", "Upgraded connections (websockets) proxied now.", "gauge", float64(p.upgraded.Load()))
}
