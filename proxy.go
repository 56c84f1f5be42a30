package main

// proxy.go owns the reverse proxy of --handler=proxy: every path the
// sidecar does not own goes, with its query, unchanged to a node of the
// service its first segment names. Nodes are chosen and ejected by a
// balancer (balancer.go); requests are retried on another node only where
// that is safe; ordinary requests get a timeout for the response headers,
// and streams (server-sent events, chunked bodies, websockets) an idle
// timeout instead of a total one. Ordinary requests travel over the
// sidecar's own HTTP/1.1 client (proxy_conn.go), upgrades over
// httputil.ReverseProxy and an http.Transport.

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
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	defaultProxyIdleTimeout = 60 * time.Second
	proxyBufferSize         = 32 << 10    // copy buffer of one streamed body
	idleChecks              = 4           // checks per idle period: a stream ends 1 to 1.25 periods after its last byte
	shutdownWriteGrace      = time.Second // a stream's caller has this long to take its end at shutdown
)

// Causes of an outgoing request's end, read back by the error handler.
var (
	errHeaderTimeout = errors.New("no response headers in time")
	errIdleTimeout   = errors.New("stream idle for too long")
	errShutdown      = errors.New("sidecar shutting down")
	errCallerGone    = errors.New("caller went away")
)

// proxyHandler is the reverse proxy. Ordinary requests go through its own
// HTTP/1.1 forwarder (forward, proxy_conn.go) over pools of keep-alive
// connections to the nodes, on the handler's goroutine. Upgrade requests
// (websockets) go through an httputil.ReverseProxy whose Rewrite sets the
// forwarding headers and whose Transport is the proxyHandler itself:
// RoundTrip picks nodes and retries over a backend http.Transport. Both
// share one balancer. Safe for concurrent use; it starts no goroutines of
// its own beyond a timer per request in flight and one per pool with idle
// connections; proxied websockets are registered with streams so shutdown
// ends them, and Close releases idle backend connections.
type proxyHandler struct {
	cfg       *Config
	reg       Registry
	log       *slog.Logger
	bal       *balancer
	upstreams *upstreams      // requests by service (stats_upstream.go)
	transport *http.Transport // upgrade requests only
	conns     *connPools      // every other request
	buffers   *bufferPool
	streams   *streams
	via       *via // refuses loops, and stamps what is forwarded
	rp        *httputil.ReverseProxy
	// afterFunc starts each call's timer (time.AfterFunc); a test swaps
	// it for timers that fire when the test says, to drive the idle check
	// without sleeping.
	afterFunc func(time.Duration, func()) callTimer

	// Counters without a service label (service names here come from
	// paths, not the registry).
	unknown        atomic.Int64 // requests for services the registry does not list
	budgetRefusals atomic.Int64 // retries refused by the retry budget
	idleTimeouts   atomic.Int64 // streams ended by --proxy_idle_timeout
	upgraded       atomic.Int64 // upgraded connections (websockets) open now
}

// newProxyHandler builds the proxy; clientTLS verifies nodes called over
// https (see backendScheme); v is the server's place in Via.
func newProxyHandler(cfg *Config, reg Registry, g *streams, clientTLS *tls.Config, v *via, logger *slog.Logger) *proxyHandler {
	p := &proxyHandler{
		cfg:       cfg,
		reg:       reg,
		log:       logger,
		bal:       newBalancer(cfg.Balancer, time.Now, logger),
		upstreams: newUpstreams("proxy", cfg.StatsMaxServices),
		transport: newBackendTransport(cfg, clientTLS),
		conns:     newConnPools(cfg, clientTLS),
		buffers:   &bufferPool{},
		streams:   g,
		via:       v,
		afterFunc: func(d time.Duration, f func()) callTimer { return time.AfterFunc(d, f) },
	}
	// Bodies pass through as the node encoded them: the transport must not
	// ask for gzip on the caller's behalf and decode it.
	p.transport.DisableCompression = true
	p.bal.useTLS = func(n *Node) bool { return backendScheme(cfg, n) == "https" }
	p.bal.upstreams = p.upstreams
	p.upstreams.nodes = p.bal.nodes
	p.rp = &httputil.ReverseProxy{
		Rewrite:   p.rewrite,
		Transport: p,
		// Server-sent events and bodies of unknown length (chunked
		// streams) are flushed on every write whatever this says
		// (ReverseProxy.flushInterval); a body with a Content-Length goes
		// through the connection's buffer. -1 (flush every write of every
		// body) cost 14% more CPU per request (bench/proxy.sh, since replaced by
		// bench/compare.sh).
		FlushInterval: 0,
		BufferPool:    p.buffers,
		ErrorHandler:  p.writeProxyError,
		ErrorLog:      slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
	}
	return p
}

// Close releases idle backend connections, waiting for a sweep of them in
// progress. Requests in flight are the HTTP server's to drain, proxied
// websockets the streams' to end. Idempotent.
func (p *proxyHandler) Close() error {
	p.conns.close()
	p.transport.CloseIdleConnections()
	return nil
}

// proxyService names the service of a proxied path (as sent, escaped)
// with namespace ns: its first non-empty segment (/foo/... and //foo/...
// are ns.foo), or its first two when the first is a version (/v1/foo/...
// is ns.v1.foo). Segments are unescaped one by one, so %2F is no
// separator. A path naming no valid service ("/", "/./foo", "/../foo") is
// a 404. The path itself goes to the node as it came.
func proxyService(ns, path string) (string, error) {
	first, rest := nextSegment(path)
	if first == "" {
		return "", errorf(http.StatusNotFound, "proxy: path %q names no service; want /[service]/...", path)
	}
	if checkSegment(first) != nil {
		return "", errorf(http.StatusNotFound, "proxy: path %q names no service: a service segment holds only letters, digits, '_' and '-'", path)
	}
	name := first
	if isVersion(first) {
		if second, _ := nextSegment(rest); second != "" && checkSegment(second) == nil {
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

// nextSegment returns the first non-empty segment of the escaped path p,
// unescaped ("" if there is none or it does not unescape), and what
// follows it. It allocates only for a segment with a percent sign.
func nextSegment(p string) (seg, rest string) {
	p = strings.TrimLeft(p, "/")
	seg, rest, _ = strings.Cut(p, "/")
	if strings.IndexByte(seg, '%') >= 0 {
		u, err := url.PathUnescape(seg)
		if err != nil {
			return "", rest
		}
		seg = u
	}
	return seg, rest
}

// Phases of a proxied request, which decide what its timer enforces.
const (
	phaseSending   = iota // the request body is still going out: idle timeout
	phaseHeaders          // waiting for response headers: the request timeout
	phaseStreaming        // the response (or upgraded connection) flows: idle timeout
)

// proxyCall is the state of one proxied request and carries what the
// forwarder, RoundTrip and the error handler need, so a request costs one
// allocation of the sidecar's own. For an upgrade it is the outgoing
// request's context (cancelled with a cause: header timeout, idle stream,
// shutdown); for an ordinary request its context is the caller's, and an
// abort ends the backend connection's blocked reads and writes instead.
type proxyCall struct {
	context.Context                         // Value(proxyCallKey{}) is the call
	cancel          context.CancelCauseFunc // upgrades: cancels Context
	watch           callerWatchStop         // ordinary requests: stops the caller-gone watch

	p         *proxyHandler
	service   string
	st        *svcState
	w         http.ResponseWriter // the caller's; unblocked by a write deadline when idle
	start     time.Time
	timeout   time.Duration // for the response headers
	lowered   bool          // the caller's Timeout header lowered timeout
	retrySafe bool          // idempotent without a body: may be sent again
	upgrade   bool          // the caller asks for a protocol upgrade
	recorded  bool          // the outcome is counted (record); the handler's goroutine only

	phase atomic.Int32
	due   atomic.Int64 // unix ns by which headers must arrive, in phaseHeaders
	bytes atomic.Int64 // bytes moved either way: the idle check's activity

	timer callTimer
	mu    sync.Mutex   // guards ended, seen, quiet, cause, conn; held by the timer while it acts
	ended bool         // the handler returned: w is off limits
	seen  int64        // bytes at the previous idle check
	quiet int          // idle checks in a row without a byte
	cause error        // why the call was aborted; nil while it runs
	conn  *backendConn // the connection in use by the forwarder, for abort

	bodyRead int64 // bytes of the caller's body consumed; the handler's goroutine only

	body  proxyBody // the outgoing request body, when there is one
	resp  proxyBody // the response body
	up    upgradeConn
	tried [4]*nodeState

	trace    []byte // the traceparent of a trace the sidecar starts (in traceBuf), or nil
	traceBuf [55]byte
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
// starts the call's timer, and forwards the request: an upgrade (a
// websocket) through the ReverseProxy and RoundTrip, any other request
// through forward, over the sidecar's own HTTP/1.1 client (proxy_conn.go).
func (p *proxyHandler) handle(w http.ResponseWriter, r *http.Request) {
	if err := p.via.check(r.Header["Via"]); err != nil {
		writeError(w, http.StatusLoopDetected, "proxy: %v", err)
		return
	}
	service, err := proxyService(p.cfg.Namespace, r.URL.EscapedPath())
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	timeout, lowered, err := requestTimeout(r.Header, p.cfg.ClientRequestTimeout)
	if err != nil {
		writeHTTPError(w, err)
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
	st.budget.deposit()

	pc := &proxyCall{p: p, service: service, st: st, w: w, start: time.Now(), timeout: timeout, lowered: lowered}
	hasBody := r.ContentLength != 0 // no body is sent for 0; -1 is chunked
	pc.retrySafe = !hasBody && idempotent(r.Method)
	pc.upgrade = r.Header.Get("Upgrade") != "" && hasToken(r.Header["Connection"], "upgrade")
	if !pc.upgrade {
		pc.Context = r.Context()
		pc.watch = watchCaller(r, pc)
	} else {
		pc.Context, pc.cancel = context.WithCancelCause(r.Context())
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
	pc.timer = p.afterFunc(first, pc.tick)
	defer pc.end()
	if pc.upgrade {
		p.rp.ServeHTTP(w, r.WithContext(pc))
		return
	}
	p.forward(w, r, pc)
}

// forward sends an ordinary request to a node of the call's service over a
// pooled connection and streams the answer back, all on the handler's
// goroutine. Nodes are picked and retried as in RoundTrip. An error before
// the response starts is the caller's JSON error; one after it aborts the
// caller's response (http.ErrAbortHandler), as ReverseProxy does.
func (p *proxyHandler) forward(w http.ResponseWriter, r *http.Request, pc *proxyCall) {
	if traceToStart(r.Header) {
		pc.trace = appendTraceparent(pc.traceBuf[:0]) // one trace for every attempt
	}
	tried := pc.tried[:0] // nodes this request failed on: retries go elsewhere
	for try := 0; ; try++ {
		t0 := time.Now()
		n := p.bal.pick(pc.st, tried, t0)
		if n == nil {
			p.fail(w, r, pc, &httpError{http.StatusServiceUnavailable, fmt.Errorf("service %q has no nodes", pc.service)})
			return
		}
		c, h, err := p.exchange(pc, r, n, t0)
		if err == nil {
			p.bal.done(n, t0, time.Since(t0), h.code < 500)
			pc.record(h.code)
			p.respond(w, r, pc, c, h)
			return
		}
		if pe := pc.failed(n, try, t0, err); pe != nil {
			p.fail(w, r, pc, pe)
			return
		}
		tried = append(tried, n)
	}
}

// exchange sends r to node n and reads the response head. It uses an idle
// connection of the node's pool if there is one; when that fails before
// anything of the response arrived and the request can be sent again
// (nothing of its body consumed, and idempotent or not sent at all), the
// node probably closed the idle connection, and a fresh one is tried once,
// as net/http does. On success the connection is attached to pc, its
// response body unread.
func (p *proxyHandler) exchange(pc *proxyCall, r *http.Request, n *nodeState, now time.Time) (*backendConn, respHead, error) {
	pool := p.conns.pool(n.url, n.addr)
	c := pool.get(now, !pc.retrySafe)
	for fresh := c == nil; ; fresh = true {
		if c == nil {
			var err error
			if c, err = pc.dial(pool); err != nil {
				return nil, respHead{}, err
			}
		}
		if !pc.attach(c) {
			pc.detach()
			c.close()
			return nil, respHead{}, errors.New("aborted")
		}
		h, started, wrote, err := p.roundTrip(pc, r, c)
		if err == nil {
			return c, h, nil
		}
		reused := c.reused
		aborted := pc.detach()
		c.close()
		var ce *callerError
		if fresh || !reused || started || aborted || pc.bodyRead > 0 || (wrote && !idempotent(r.Method)) || errors.As(err, &ce) {
			return nil, respHead{}, err
		}
		p.log.Debug("pooled connection failed; trying a fresh one", "service", pc.service, "node", n.addr, "err", err)
		c = nil
	}
}

// dial opens a connection to pool's node; without a body to send first,
// no later than the response header deadline.
func (pc *proxyCall) dial(pool *connPool) (*backendConn, error) {
	if pc.phase.Load() != phaseHeaders {
		return pool.dial(pc.Context)
	}
	ctx, cancel := context.WithDeadline(pc.Context, time.Unix(0, pc.due.Load()))
	defer cancel()
	return pool.dial(ctx)
}

// roundTrip writes r (head and body) on c and reads the final response
// head, skipping 1xx interim responses. started says whether any byte of a
// response arrived, wrote whether the request was written without error.
// When writing the body fails, the node may have answered early (a 413,
// say): that answer is used if it can be read.
func (p *proxyHandler) roundTrip(pc *proxyCall, r *http.Request, c *backendConn) (h respHead, started, wrote bool, err error) {
	writeRequestHead(c.bw, r, c.pool.addr, p.via.entry(r), r.ContentLength, p.cfg.AuthToken != "", pc.trace)
	var werr error
	if r.ContentLength != 0 {
		if werr = p.sendBody(pc, r, c); werr != nil {
			var ce *callerError
			if errors.As(werr, &ce) {
				return h, false, false, werr
			}
			pc.bodySent() // the header deadline bounds the wait for an early answer
		}
	}
	if werr == nil {
		werr = c.bw.Flush()
	}
	if werr != nil && pc.bodyRead == 0 {
		return h, false, false, werr
	}
	for interim := 0; ; interim++ {
		h, started, err = c.readResponseHead(backendHeaderSize)
		if err != nil {
			if werr != nil {
				err = werr
			}
			return h, started, werr == nil, err
		}
		if h.code >= 200 || h.code == http.StatusSwitchingProtocols {
			break
		}
		if interim == maxInterim {
			return h, true, true, fmt.Errorf("more than %d interim responses", maxInterim)
		}
	}
	if h.code == http.StatusSwitchingProtocols {
		return h, true, true, errors.New("101 Switching Protocols to a request without an upgrade")
	}
	if werr != nil {
		h.close = true
	}
	return h, true, true, nil
}

// callerError is a failure to read the caller's request body: not the
// node's fault.
type callerError struct{ err error }

func (e *callerError) Error() string { return "read request body: " + e.err.Error() }
func (e *callerError) Unwrap() error { return e.err }

// sendBody streams the caller's body to c, with its Content-Length or
// chunked. A small body is read straight into the connection's write
// buffer; a large one goes through a pooled copy buffer. The end of the
// body starts the wait for the response headers.
func (p *proxyHandler) sendBody(pc *proxyCall, r *http.Request, c *backendConn) error {
	bw := c.bw
	if r.ContentLength > 0 && r.ContentLength <= int64(bw.Available()) {
		for remaining := r.ContentLength; remaining > 0; {
			buf := bw.AvailableBuffer()[:remaining]
			n, err := r.Body.Read(buf)
			if n > 0 {
				pc.bodyRead += int64(n)
				pc.bytes.Add(int64(n))
				remaining -= int64(n)
				bw.Write(buf[:n]) // in place: bufio copies it onto itself
			}
			if err != nil && (err != io.EOF || remaining > 0) {
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return &callerError{err}
			}
		}
		pc.bodySent()
		return nil
	}
	buf := p.buffers.Get()
	defer p.buffers.Put(buf)
	var dst io.Writer = bw
	var cw io.WriteCloser
	if r.ContentLength < 0 {
		cw = httputil.NewChunkedWriter(bw)
		dst = cw
	}
	remaining := r.ContentLength
	for {
		b := buf
		if remaining >= 0 && remaining < int64(len(b)) {
			b = b[:remaining]
		}
		n, err := r.Body.Read(b)
		if n > 0 {
			pc.bodyRead += int64(n)
			pc.bytes.Add(int64(n))
			if remaining > 0 {
				remaining -= int64(n)
			}
			if _, werr := dst.Write(b[:n]); werr != nil {
				return werr
			}
			if cw != nil {
				// A chunked upload may be a stream: pass each piece on.
				if werr := bw.Flush(); werr != nil {
					return werr
				}
			}
		}
		if err == io.EOF || (err == nil && remaining == 0) {
			break
		}
		if err != nil {
			return &callerError{err}
		}
	}
	if remaining > 0 {
		return &callerError{io.ErrUnexpectedEOF}
	}
	if cw != nil {
		cw.Close()
		bw.WriteString("\r\n") // no trailer
	}
	pc.bodySent()
	return nil
}

// respond writes the response whose head c just read to w, then its body.
// The connection goes back to the pool only when the body was read to its
// end and neither side asked to close it; any other end closes it. A
// failure once the status is written aborts the caller's response.
//
// A stream (an event stream, or a body of unknown length) joins the
// streams, since http.Server.Shutdown would wait for it until the drain
// timeout: shutdown aborts it, and the caller's response then ends
// cleanly (a chunked body gets its last chunk).
func (p *proxyHandler) respond(w http.ResponseWriter, r *http.Request, pc *proxyCall, c *backendConn, h respHead) {
	bodyless := r.Method == http.MethodHead || h.code == http.StatusNoContent || h.code == http.StatusNotModified
	stream := !bodyless && (h.stream || h.length < 0)
	if stream {
		done, ok := p.streams.join(pc.shutdown)
		if !ok {
			pc.detach()
			c.close()
			writeError(w, http.StatusServiceUnavailable, "proxy: sidecar is shutting down")
			return
		}
		defer done()
	}
	pc.phase.Store(phaseStreaming)
	pc.timer.Reset(p.cfg.ProxyIdleTimeout / idleChecks)
	c.header(w.Header(), h.chunked)
	w.WriteHeader(h.code)
	var err error
	if !bodyless {
		err = p.copyBody(w, pc, c, h)
	}
	aborted := pc.detach()
	if err == nil && !aborted && !h.close && (bodyless || h.length >= 0 || h.chunked) {
		c.pool.put(c, time.Now())
	} else {
		c.close()
	}
	if err != nil && stream && pc.causeOf() == errShutdown {
		p.log.Debug("stream ended by shutdown", "service", pc.service)
		return
	}
	if err != nil {
		p.log.Debug("response aborted", "service", pc.service, "err", err)
		panic(http.ErrAbortHandler)
	}
}

// copyBody copies the response body from c to w: Content-Length bytes,
// chunks up to the last one (trailers become the caller's trailers), or
// everything up to the node's close. Bytes already buffered go out without
// a copy; a large body is read through a pooled buffer. Event streams and
// bodies of unknown length are flushed on every write, so each event
// reaches the caller at once.
func (p *proxyHandler) copyBody(w http.ResponseWriter, pc *proxyCall, c *backendConn, h respHead) error {
	var rc *http.ResponseController
	if h.stream || h.length < 0 {
		rc = http.NewResponseController(w)
	}
	var src io.Reader = c.br
	if h.chunked {
		src = httputil.NewChunkedReader(c.br)
	}
	var buf []byte
	defer func() {
		if buf != nil {
			p.buffers.Put(buf)
		}
	}()
	remaining := h.length
	for {
		var chunk []byte
		var rerr error
		peeked := false
		switch {
		case h.length >= 0 && remaining == 0:
			return nil
		case h.length >= 0 && (c.br.Buffered() > 0 || remaining < connBufferSize):
			if c.br.Buffered() == 0 {
				_, rerr = c.br.Peek(1)
			}
			if rerr == nil {
				chunk, _ = c.br.Peek(int(min(int64(c.br.Buffered()), remaining)))
				peeked = true
			}
		default:
			if buf == nil {
				buf = p.buffers.Get()
			}
			b := buf
			if h.length >= 0 && remaining < int64(len(b)) {
				b = b[:remaining]
			}
			var n int
			n, rerr = src.Read(b)
			chunk = b[:n]
		}
		if len(chunk) > 0 {
			pc.bytes.Add(int64(len(chunk)))
			if _, err := w.Write(chunk); err != nil {
				return fmt.Errorf("write to caller: %w", err)
			}
			if rc != nil {
				if err := rc.Flush(); err != nil {
					return fmt.Errorf("flush to caller: %w", err)
				}
			}
			if peeked {
				c.br.Discard(len(chunk))
			}
			if remaining > 0 {
				remaining -= int64(len(chunk))
			}
		}
		if rerr == io.EOF {
			switch {
			case h.chunked:
				return c.readTrailer(w.Header(), backendHeaderSize)
			case h.length < 0:
				return nil // the node's close ends the body
			}
			rerr = io.ErrUnexpectedEOF
		}
		if rerr != nil {
			return fmt.Errorf("read response body: %w", rerr)
		}
	}
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
	pc.watch.stop()
	pc.mu.Lock()
	pc.ended = true
	pc.mu.Unlock()
	pc.timer.Stop()
	if pc.cancel != nil {
		pc.cancel(nil)
	}
}

// abort ends the call for cause: the upgrade's context is cancelled, the
// forwarder's connection and a read of the caller's body unblocked.
// pc.mu is held.
func (pc *proxyCall) abort(cause error) {
	if pc.cause == nil {
		pc.cause = cause
	}
	if pc.cancel != nil {
		pc.cancel(cause)
		return
	}
	if pc.conn != nil {
		pc.conn.SetDeadline(aLongTimeAgo)
	}
	if pc.phase.Load() == phaseSending {
		http.NewResponseController(pc.w).SetReadDeadline(aLongTimeAgo)
	}
}

// shutdown aborts an ordinary call's stream as the sidecar shuts down. The
// caller has shutdownWriteGrace to take the end of the response; one that
// does not read holds shutdown no longer.
func (pc *proxyCall) shutdown() {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if !pc.ended {
		pc.abort(errShutdown)
		http.NewResponseController(pc.w).SetWriteDeadline(time.Now().Add(shutdownWriteGrace))
	}
}

// callerGone aborts an ordinary call whose caller went away.
func (pc *proxyCall) callerGone() {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if !pc.ended {
		pc.abort(errCallerGone)
	}
}

// causeOf is why the call was aborted, or nil.
func (pc *proxyCall) causeOf() error {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.cause
}

// attach makes c the connection an abort ends; false if the call is
// already aborted.
func (pc *proxyCall) attach(c *backendConn) bool {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.conn = c
	if pc.cause != nil {
		c.SetDeadline(aLongTimeAgo)
		return false
	}
	return true
}

// detach takes the connection back from abort's reach and reports whether
// the call was aborted (the connection may then have a past deadline).
func (pc *proxyCall) detach() (aborted bool) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.conn = nil
	return pc.cause != nil
}

// callTimer is the part of *time.Timer a proxied call uses.
type callTimer interface {
	Reset(d time.Duration) bool
	Stop() bool
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
		pc.abort(errHeaderTimeout)
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
	pc.abort(errIdleTimeout)
	if !pc.upgrade && pc.phase.Load() == phaseStreaming {
		// A write blocked on a caller that stopped reading ends too.
		// Before the response starts the caller's connection must stay
		// writable for the JSON error.
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

// rewrite prepares an outgoing upgrade request (writeRequestHead does the
// same for the others): path and query stay as they came;
// the Host header names the node; X-Forwarded-For extends the caller's
// chain, X-Forwarded-Host and -Proto describe the caller's request; Via
// gets the sidecar after the caller's entries; the sidecar's own bearer
// token is not passed on; a W3C traceparent is passed through or started.
// ReverseProxy has already removed hop-by-hop headers.
func (p *proxyHandler) rewrite(pr *httputil.ProxyRequest) {
	if prior := pr.In.Header["X-Forwarded-For"]; len(prior) > 0 {
		pr.Out.Header["X-Forwarded-For"] = prior
	}
	pr.SetXForwarded()
	pr.Out.Host = ""
	pr.Out.Header["Via"] = p.via.appendTo(pr.Out.Header["Via"], pr.In)
	if p.cfg.AuthToken != "" {
		delete(pr.Out.Header, "Authorization")
	}
	ensureTraceparent(pr.Out.Header)
	if pc := callOf(pr.In); pc != nil && pr.Out.Body != nil {
		pc.body = proxyBody{rc: pr.Out.Body, pc: pc, request: true}
		pr.Out.Body = &pc.body
	}
}

// RoundTrip sends an upgrade request (the ReverseProxy's outgoing request)
// to a node of the call's service; forward does the same for the others.
// On a failure that is safe to retry (a request that never reached a node,
// or an idempotent one without a body) it tries another node, within the
// retry budget and the request timeout. Every outcome feeds the node's
// ejection. Errors are *httpError.
func (p *proxyHandler) RoundTrip(req *http.Request) (*http.Response, error) {
	pc := callOf(req)
	if pc == nil {
		return nil, &httpError{http.StatusBadGateway, errors.New("request without a proxied call")}
	}
	tried := pc.tried[:0] // nodes this request failed on: retries go elsewhere
	out := req
	for try := 0; ; try++ {
		t0 := time.Now()
		n := p.bal.pick(pc.st, tried, t0)
		if n == nil {
			return nil, &httpError{http.StatusServiceUnavailable, fmt.Errorf("service %q has no nodes", pc.service)}
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
			p.bal.done(n, t0, time.Since(t0), resp.StatusCode < 500)
			pc.record(resp.StatusCode)
			return pc.received(resp), nil
		}
		if pe := pc.failed(n, try, t0, err); pe != nil {
			return nil, pe
		}
		tried = append(tried, n)
	}
}

// failed feeds a failed attempt on n to the balancer and decides what
// follows: nil to try another node (after a backoff, within the retry
// budget and the request timeout), or the caller's error.
func (pc *proxyCall) failed(n *nodeState, try int, t0 time.Time, err error) *httpError {
	p := pc.p
	pe, nodeFailed, retry := pc.classify(err)
	p.bal.done(n, t0, time.Since(t0), !nodeFailed)
	if nodeFailed {
		p.log.Debug("attempt failed", "service", pc.service, "node", n.addr, "try", try, "err", err)
	}
	wait := retryBackoff(try)
	if !retry || try >= p.cfg.ClientRetries || time.Now().Add(wait).After(pc.start.Add(pc.timeout)) {
		return pe
	}
	if !pc.st.budget.withdraw(time.Now()) {
		p.budgetRefusals.Add(1)
		return pe
	}
	pc.st.up.retries.Add(1)
	if !sleepCtx(pc, wait) || pc.causeOf() != nil {
		pe, _, _ = pc.classify(context.Canceled)
		return pe
	}
	return nil
}

// classify turns a failed attempt into the caller's error, and says whether
// it counts against the node and whether another node may be tried: a
// request that never reached a node (a failed dial, nothing of the body
// read), or an idempotent one without a body.
func (pc *proxyCall) classify(err error) (pe *httpError, nodeFailed, retry bool) {
	cause := pc.causeOf()
	if cause == nil && pc.phase.Load() == phaseHeaders && time.Now().UnixNano() >= pc.due.Load() {
		cause = errHeaderTimeout // a dial ran into the deadline before the timer did
	}
	switch {
	case cause == errHeaderTimeout:
		// The caller's own short deadline says nothing of the node.
		return &httpError{http.StatusGatewayTimeout, fmt.Errorf("no response headers within %s", pc.timeout)}, !pc.lowered, false
	case cause == errIdleTimeout:
		return &httpError{http.StatusGatewayTimeout, fmt.Errorf("request body idle for %s", pc.p.cfg.ProxyIdleTimeout)}, false, false
	case cause == errShutdown:
		return &httpError{http.StatusServiceUnavailable, cause}, false, false
	case cause == errCallerGone || pc.Err() != nil:
		return &httpError{statusClientClosed, errCallerGone}, false, false
	}
	var ce *callerError
	if errors.As(err, &ce) {
		return &httpError{http.StatusBadRequest, err}, false, false
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return &httpError{http.StatusServiceUnavailable, dialError(op)}, true, pc.bytes.Load() == 0
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return &httpError{http.StatusGatewayTimeout, err}, true, false
	}
	return &httpError{http.StatusBadGateway, err}, true, pc.retrySafe
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
	p.fail(w, r, callOf(r), err)
}

// fail answers a proxied request that failed before its response started
// with the JSON error of its status.
func (p *proxyHandler) fail(w http.ResponseWriter, r *http.Request, pc *proxyCall, err error) {
	pe := &httpError{http.StatusBadGateway, err}
	errors.As(err, &pe)
	service := "?"
	if pc != nil {
		service = pc.service
		pc.record(pe.code)
	}
	writeError(w, pe.code, "proxy: %s %s to %s: %v", r.Method, r.URL.Path, service, pe.err)
}

// record counts the call's outcome, once: the status of the node's
// response head, or of the caller's error. Its latency is to that point: a
// stream's length is the caller's, not the node's. The one place where a
// proxied request is counted by service (forward, RoundTrip and fail call
// it, on the handler's goroutine).
func (pc *proxyCall) record(code int) {
	if pc.recorded {
		return
	}
	pc.recorded = true
	pc.st.up.record(code, time.Since(pc.start))
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

// metrics emits the proxy counters without a service label; those by
// service are p.upstreams, which stats writes itself (histograms).
func (p *proxyHandler) metrics(emit emitFunc) {
	emit("sidecar_proxy_unknown_service_total", "Proxied requests for services the registry does not list.", "counter", float64(p.unknown.Load()))
	emit("sidecar_proxy_retry_budget_exhausted_total", "Proxy retries refused by the retry budget.", "counter", float64(p.budgetRefusals.Load()))
	emit("sidecar_proxy_idle_timeouts_total", "Proxied streams ended by --proxy_idle_timeout.", "counter", float64(p.idleTimeouts.Load()))
	emit("sidecar_proxy_upgraded_connections", "Upgraded connections (websockets) proxied now.", "gauge", float64(p.upgraded.Load()))
	emit("sidecar_proxy_backend_dials_total", "Connections the proxy opened to nodes for ordinary requests.", "counter", float64(p.conns.dials.Load()))
}
