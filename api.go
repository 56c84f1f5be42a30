package main

// api.go holds what every HTTP endpoint shares: the one JSON error writer,
// body decoding with limits, CORS and the tracking of
// long-lived websocket streams for shutdown.

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// errorID is the "id" of errors the sidecar itself writes, as go-micro's
// errors carry the id of the service that raised them.
const errorID = "go.micro.sidecar"

// statusClientClosed is the status of a call whose caller closed the
// connection before the answer, as access logs call it. Nobody reads it.
const statusClientClosed = 499

// apiError is the error body of every failed request: the go-micro error
// shape the seeds use, with code equal to the HTTP status.
type apiError struct {
	ID     string `json:"id"`
	Code   int    `json:"code"`
	Detail string `json:"detail"`
	Status string `json:"status"`
}

// unreadBodyGrace bounds how long the server may wait for the rest of a
// body nobody read: after a handler answers, net/http reads what is left
// so the connection can be reused, and a client that stalls there would
// hold it. Past the grace the connection is closed instead.
const unreadBodyGrace = 2 * time.Second

// writeError writes the JSON error for code. Every failure the sidecar
// answers goes through here.
func writeError(w http.ResponseWriter, code int, format string, args ...any) {
	// Many errors are answered before the body is read. The server resets
	// the read deadline for the next request on the connection.
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(unreadBodyGrace))
	writeJSON(w, code, apiError{
		ID:     errorID,
		Code:   code,
		Detail: fmt.Sprintf(format, args...),
		Status: http.StatusText(code),
	})
}

// writeJSON writes v as the JSON body with status code.
func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		code = http.StatusInternalServerError
		b, _ = json.Marshal(apiError{ID: errorID, Code: code, Detail: "encode response: " + err.Error(), Status: http.StatusText(code)})
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)+1))
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	w.Write(append(b, '\n'))
}

// httpError is an error that knows the HTTP status its caller gets: the
// helpers of handlers return it (errorf), the proxy classifies a failed
// call into one, and writeHTTPError answers with it.
type httpError struct {
	code int
	err  error
}

func (e *httpError) Error() string { return e.err.Error() }
func (e *httpError) Unwrap() error { return e.err }

func errorf(code int, format string, args ...any) error {
	return &httpError{code: code, err: fmt.Errorf(format, args...)}
}

// writeHTTPError writes err through writeError with its status: an
// *httpError's code, or 500.
func writeHTTPError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	var he *httpError
	if errors.As(err, &he) {
		code = he.code
	}
	writeError(w, code, "%s", err.Error())
}

// bodyReadTimeout bounds reading one request body the sidecar reads whole:
// a client that sends a Content-Length and then stalls must not hold a
// handler (and a connection) forever. The server clears read deadlines for
// the next request on the connection.
const bodyReadTimeout = 30 * time.Second

// readBody reads the whole request body up to limit bytes, whatever its
// Content-Type, within bodyReadTimeout. An empty, oversized or stalled body
// is an *httpError.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	return readBodyWithin(w, r, limit, bodyReadTimeout)
}

func readBodyWithin(w http.ResponseWriter, r *http.Request, limit int64, timeout time.Duration) ([]byte, error) {
	// Not every ResponseWriter has deadlines (a test recorder); reading
	// then goes unbounded, as it would without this.
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(timeout))
	var b []byte
	var err error
	if n := r.ContentLength; n >= 0 && n <= limit && n < 1<<20 {
		// The server's body reader ends at the length: read it into
		// one buffer of that size.
		b = make([]byte, n)
		if _, err = io.ReadFull(r.Body, b); err == io.EOF {
			err = io.ErrUnexpectedEOF // a body shorter than its length
		}
	} else {
		b, err = io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	}
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, errorf(http.StatusRequestTimeout, "request body not received within %s", timeout)
		}
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, errorf(http.StatusRequestEntityTooLarge, "request body exceeds %d bytes", limit)
		}
		return nil, errorf(http.StatusBadRequest, "read request body: %v", err)
	}
	return b, nil
}

// decodeJSON decodes body into v, explaining which field was wrong.
func decodeJSON(body []byte, v any) error {
	if len(strings.TrimSpace(string(body))) == 0 {
		return errorf(http.StatusBadRequest, "request body is empty; want a JSON object")
	}
	if err := json.Unmarshal(body, v); err != nil {
		var te *json.UnmarshalTypeError
		var se *json.SyntaxError
		switch {
		case errors.As(err, &te) && te.Field != "":
			return errorf(http.StatusBadRequest, "invalid JSON: field %q must be %s, not %s", te.Field, te.Type, te.Value)
		case errors.As(err, &te):
			return errorf(http.StatusBadRequest, "invalid JSON: want %s, not %s", te.Type, te.Value)
		case errors.As(err, &se):
			return errorf(http.StatusBadRequest, "invalid JSON at byte %d: %v", se.Offset, err)
		}
		return errorf(http.StatusBadRequest, "invalid JSON: %v", err)
	}
	return nil
}

// corsPolicy answers cross-origin requests for the origins of --cors. With
// no origins configured it adds nothing, and browsers refuse cross-origin
// calls. "*" allows every origin but never with credentials.
type corsPolicy struct {
	any     bool
	origins map[string]bool // lower-case scheme://host[:port]
}

func newCORSPolicy(origins []string) corsPolicy {
	p := corsPolicy{origins: map[string]bool{}}
	for _, o := range origins {
		if o == "*" {
			p.any = true
			continue
		}
		p.origins[strings.ToLower(strings.TrimSuffix(o, "/"))] = true
	}
	return p
}

// allowed reports whether a browser page from origin may call the sidecar.
func (p corsPolicy) allowed(origin string) bool {
	return p.any || p.origins[strings.ToLower(origin)]
}

// handle sets the CORS response headers, answers a preflight request
// itself and refuses a request from a page of another origin that --cors
// does not allow, reporting whether it answered (the caller then stops).
// The refusal matters for "simple" requests, which browsers send without a
// preflight: a page anywhere could otherwise POST to a loopback sidecar.
func (p corsPolicy) handle(w http.ResponseWriter, r *http.Request) bool {
	origin := r.Header.Get("Origin")
	preflight := r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != ""
	if origin == "" {
		return false
	}
	h := w.Header()
	h.Add("Vary", "Origin")
	if !p.allowed(origin) {
		if !preflight && sameOrigin(origin, r.Host) {
			return false // the sidecar's own page (/stats)
		}
		writeError(w, http.StatusForbidden, "origin %s is not allowed (see --cors)", origin)
		return true
	}
	if p.origins[strings.ToLower(origin)] {
		h.Set("Access-Control-Allow-Origin", origin)
		h.Set("Access-Control-Allow-Credentials", "true")
	} else {
		h.Set("Access-Control-Allow-Origin", "*")
	}
	if !preflight {
		return false
	}
	h.Set("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS")
	if req := r.Header.Get("Access-Control-Request-Headers"); req != "" {
		h.Set("Access-Control-Allow-Headers", req)
	}
	h.Set("Access-Control-Max-Age", "600")
	w.WriteHeader(http.StatusNoContent)
	return true
}

// streams tracks long-lived websocket handlers so shutdown can end them:
// http.Server.Shutdown neither closes nor waits for hijacked connections.
// Safe for concurrent use; Close cancels every stream's context and waits
// for the handlers to return.
type streams struct {
	cors   corsPolicy
	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc

	mu     sync.Mutex // guards closed and the Add side of wg
	closed bool
	wg     sync.WaitGroup
}

func newStreams(cors corsPolicy) *streams {
	ctx, cancel := context.WithCancel(context.Background())
	return &streams{cors: cors, ctx: ctx, cancel: cancel}
}

// isWebsocket reports whether r asks for a websocket upgrade.
func isWebsocket(r *http.Request) bool {
	return hasToken(r.Header["Connection"], "upgrade") && hasToken(r.Header["Upgrade"], "websocket")
}

// accept upgrades r to a websocket and registers the stream; the
// middleware has checked the origin against --cors. The returned context
// ends when the request does or the sidecar shuts down (shuttingDown then
// tells which); done must be called when the handler returns. On failure
// accept has written the JSON error and returns a nil conn.
func (g *streams) accept(w http.ResponseWriter, r *http.Request, readLimit int64) (*websocket.Conn, context.Context, func()) {
	conn, release := g.acceptConn(w, r, readLimit)
	if conn == nil {
		return nil, nil, nil
	}
	ctx, cancel := context.WithCancel(r.Context())
	stop := afterFunc(g.ctx, cancel)
	return conn, ctx, func() {
		stop()
		cancel()
		release()
	}
}

// acceptConn is accept for a stream that watches the shutdown itself (the
// broker's subscribers, whose handler returns at once: a context of the
// request would be held, unused, for the subscriber's life). release must
// be called when the stream ends.
func (g *streams) acceptConn(w http.ResponseWriter, r *http.Request, readLimit int64) (*websocket.Conn, func()) {
	// The library answers a handshake it refuses in plain text: check
	// the request first, so the refusal is the JSON error.
	if err := checkHandshake(w.Header(), r); err != nil {
		writeHTTPError(w, err)
		return nil, nil
	}
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		writeError(w, http.StatusServiceUnavailable, "sidecar is shutting down")
		return nil, nil
	}
	g.wg.Add(1)
	g.mu.Unlock()

	// The middleware checked the origin against the same policy as CORS.
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		// Accept has answered, in plain text: checkHandshake leaves it
		// only a connection that cannot be hijacked, which HTTP/1.1
		// connections always can.
		g.wg.Done()
		return nil, nil
	}
	conn.SetReadLimit(readLimit)
	return conn, g.wg.Done
}

// checkHandshake checks r as the opening handshake of a websocket (RFC
// 6455 section 4.2.1) with the same rules as websocket.Accept, which
// answers a refusal in plain text. A refusal is an *httpError; the headers
// RFC 6455 asks for with it are set on h.
func checkHandshake(h http.Header, r *http.Request) error {
	upgrade := func(format string, args ...any) error {
		h.Set("Connection", "Upgrade")
		h.Set("Upgrade", "websocket")
		return errorf(http.StatusUpgradeRequired, "websocket: "+format, args...)
	}
	switch {
	case !r.ProtoAtLeast(1, 1):
		return upgrade("the handshake needs HTTP/1.1, not %s", r.Proto)
	case !hasToken(r.Header["Connection"], "upgrade"):
		return upgrade("the Connection header must contain Upgrade, not %q", r.Header.Get("Connection"))
	case !hasToken(r.Header["Upgrade"], "websocket"):
		return upgrade("the Upgrade header must contain websocket, not %q", r.Header.Get("Upgrade"))
	case r.Method != http.MethodGet:
		return errorf(http.StatusMethodNotAllowed, "websocket: the handshake is a GET, not a %s", r.Method)
	case r.Header.Get("Sec-WebSocket-Version") != "13":
		h.Set("Sec-WebSocket-Version", "13") // section 4.4: the versions the server speaks
		return errorf(http.StatusBadRequest, "websocket: Sec-WebSocket-Version %q is not supported; want 13", r.Header.Get("Sec-WebSocket-Version"))
	}
	keys := r.Header.Values("Sec-WebSocket-Key")
	switch {
	case len(keys) == 0:
		return errorf(http.StatusBadRequest, "websocket: missing Sec-WebSocket-Key header")
	case len(keys) > 1:
		return errorf(http.StatusBadRequest, "websocket: %d Sec-WebSocket-Key headers; want one", len(keys))
	}
	if b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(keys[0])); err != nil || len(b) != 16 {
		return errorf(http.StatusBadRequest, "websocket: Sec-WebSocket-Key %q must be 16 bytes in base64", keys[0])
	}
	return nil
}

// join registers a stream that the caller serves itself, such as a proxied
// websocket: stop is called when the sidecar shuts down, and Close waits
// until done is called; done waits for a stop that has begun. ok is false
// once Close has begun.
func (g *streams) join(stop func()) (done func(), ok bool) {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil, false
	}
	g.wg.Add(1)
	g.mu.Unlock()
	unregister := afterFunc(g.ctx, stop)
	return func() {
		unregister()
		g.wg.Done()
	}, true
}

// afterFunc is context.AfterFunc whose stop, once f has started, waits for
// f to return, so an owner that calls stop in its Close leaves no goroutine
// of f running. stop reports whether it kept f from running; it may be
// called more than once.
func afterFunc(ctx context.Context, f func()) (stop func() bool) {
	ran := make(chan struct{})
	stopf := context.AfterFunc(ctx, func() {
		defer close(ran)
		f()
	})
	var once sync.Once
	var stopped bool
	return func() bool {
		once.Do(func() { stopped = stopf() })
		if !stopped {
			<-ran
		}
		return stopped
	}
}

// shuttingDown reports whether Close has begun.
func (g *streams) shuttingDown() bool { return g.ctx.Err() != nil }

// closeStatus is how a stream closes its websocket when its context ends.
func (g *streams) closeStatus() (websocket.StatusCode, string) {
	if g.shuttingDown() {
		return websocket.StatusGoingAway, "sidecar shutting down"
	}
	return websocket.StatusNormalClosure, ""
}

// Close ends every stream and waits for their handlers. Idempotent.
func (g *streams) Close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.cancel()
	g.wg.Wait()
}

// loopbackHost reports whether the Host header host[:port] names this
// machine's loopback: localhost or a loopback address.
func loopbackHost(hostport string) bool {
	// The usual Host of a sidecar on loopback, without a parse: what
	// follows the prefix is a port (net.SplitHostPort does not check it)
	// unless it holds another colon.
	for _, prefix := range [...]string{"127.0.0.1:", "localhost:"} {
		if port, ok := strings.CutPrefix(hostport, prefix); ok && strings.IndexByte(port, ':') < 0 {
			return true
		}
	}
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.EqualFold(host, "localhost") || strings.HasSuffix(strings.ToLower(host), ".localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// sameOrigin reports whether origin names host, as a same-origin page does.
func sameOrigin(origin, host string) bool {
	u, err := url.Parse(origin)
	return err == nil && strings.EqualFold(u.Host, host)
}

// splitHostPort splits "host:port" with a numeric port in 1..65535.
func splitHostPort(hostport string) (string, int, error) {
	host, p, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 1 || port > 65535 {
		return "", 0, fmt.Errorf("port %q is not a number from 1 to 65535", p)
	}
	if host == "" {
		return "", 0, errors.New("host is empty")
	}
	return host, port, nil
}

// checkHTTPURL accepts absolute http and https URLs only.
func checkHTTPURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return err
	}
	if !slices.Contains([]string{"http", "https"}, u.Scheme) || u.Host == "" {
		return errors.New("want an absolute http:// or https:// URL")
	}
	return nil
}

// jsonServerErrors makes the answers that net/http writes itself, before
// any handler runs, the JSON error too: a malformed request line or
// header, a bad or missing Host, headers over MaxHeaderBytes (431), an
// unsupported protocol version (505), Transfer-Encoding (501) or Expect
// (417). net/http writes them in plain text straight to the connection,
// so the connections of ln are wrapped (errorConn) to rewrite them. Call
// it once hs is configured and before hs serves ln; it chains hs's
// ConnContext, ConnState and Handler.
//
// What cannot be made JSON: these answers inside TLS (net/http needs the
// *tls.Conn itself, so TLS connections are not wrapped; plain HTTP sent to
// the TLS port is answered by tls.go), and a request whose headers do not
// arrive within ReadHeaderTimeout, which net/http closes without an
// answer.
func jsonServerErrors(hs *http.Server, ln net.Listener) net.Listener {
	maxHeader := hs.MaxHeaderBytes
	if maxHeader <= 0 {
		maxHeader = http.DefaultMaxHeaderBytes
	}
	connCtx, connState, next := hs.ConnContext, hs.ConnState, hs.Handler
	if next == nil {
		next = http.DefaultServeMux
	}
	hs.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		if connCtx != nil {
			ctx = connCtx(ctx, c)
		}
		if ec, ok := c.(*errorConn); ok {
			ctx = context.WithValue(ctx, errorConnKey{}, ec)
		}
		return ctx
	}
	hs.ConnState = func(c net.Conn, st http.ConnState) {
		if ec, ok := c.(*errorConn); ok && st == http.StateIdle {
			ec.handling.Store(false) // the answer is written; what comes next is net/http's again
		}
		if connState != nil {
			connState(c, st)
		}
	}
	hs.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if ec, ok := r.Context().Value(errorConnKey{}).(*errorConn); ok {
			ec.handling.Store(true)
		}
		next.ServeHTTP(w, r)
	})
	return &errorListener{Listener: ln, maxHeader: maxHeader}
}

// errorConnKey is the request context key of the request's *errorConn.
type errorConnKey struct{}

// errorListener wraps the plain connections it accepts in errorConn.
type errorListener struct {
	net.Listener
	maxHeader int // the server's MaxHeaderBytes, for the 431's detail
}

func (l *errorListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if _, ok := c.(*tls.Conn); ok {
		return c, nil // net/http needs the *tls.Conn; see jsonServerErrors
	}
	return &errorConn{Conn: c, maxHeader: l.maxHeader}, nil
}

// errorConn is a server connection that rewrites the error answers net/http
// writes itself into the JSON error. Between two requests the connection
// is net/http's: from the moment a handler begins (handling) until
// http.Server reports the connection idle again, or for good once it is
// hijacked, every byte written is the handler's and passes untouched.
// Otherwise a write that is an HTTP answer with a status of 400 or more
// is net/http's own, always written whole in one call, and is replaced.
//
// It also tells a handler's callerWatch when the caller goes away (see
// watchCaller): net/http learns it from a read that fails, the
// connection's background read while the handler runs or a read of the
// body, and cancels the request's context then; errorConn sees the same
// read fail first.
type errorConn struct {
	net.Conn
	maxHeader int
	handling  atomic.Bool // a handler answers the current request, or has hijacked the connection
	replaced  bool        // an answer was rewritten: drop the rest of it; net/http's goroutine only

	watchMu sync.Mutex  // guards watch and gone; held while watch.callerGone runs
	watch   callerWatch // told when a read fails; nil when no handler watches
	gone    bool        // a read failed otherwise than by a deadline: the caller has gone for good
}

// Read tells the handler that watches (if one does) when a read fails, as
// net/http cancels the request's context for any read that fails. Its
// frame stays small: net/http's background read, a new goroutine for
// every request, reads through it, and a few more bytes of stack would
// make each of those goroutines grow its stack (a copy costing more than
// the rest of the read; seen under callgrind).
func (c *errorConn) Read(p []byte) (n int, err error) {
	n, err = c.Conn.Read(p)
	if err != nil {
		c.readFailed(err)
	}
	return
}

// readFailed notes a failed read and tells the watching handler.
func (c *errorConn) readFailed(err error) {
	ne, ok := err.(net.Error)
	timeout := ok && ne.Timeout() // a deadline, which a later read may not meet
	c.watchMu.Lock()
	defer c.watchMu.Unlock()
	if !timeout {
		c.gone = true
	}
	if w := c.watch; w != nil {
		c.watch = nil
		w.callerGone()
	}
}

// callerWatch is what a handler does when its caller goes away: end the
// backend call the caller no longer waits for.
type callerWatch interface{ callerGone() }

// callerWatchStop ends a watch that watchCaller began; its zero value
// ends none.
type callerWatchStop struct {
	ec      *errorConn
	ctxStop func() bool
}

// watchCaller calls w.callerGone once r's caller goes away, until stop:
// when r's context is cancelled for it. On the sidecar's plain
// connections the errorConn tells it, with a few field writes; elsewhere
// (TLS connections, tests serving the handler without the listener)
// context.AfterFunc does, which costs about a microsecond and seven
// allocations a request (a child of the request's context, its map and
// channel).
func watchCaller(r *http.Request, w callerWatch) callerWatchStop {
	ec, ok := r.Context().Value(errorConnKey{}).(*errorConn)
	if !ok {
		return callerWatchStop{ctxStop: context.AfterFunc(r.Context(), w.callerGone)}
	}
	ec.watchMu.Lock()
	defer ec.watchMu.Unlock()
	if ec.gone || r.Context().Err() != nil {
		w.callerGone()
		return callerWatchStop{}
	}
	ec.watch = w
	return callerWatchStop{ec: ec}
}

// stop ends the watch; a callerGone in progress has returned when it
// returns (on the errorConn path).
func (s callerWatchStop) stop() {
	switch {
	case s.ec != nil:
		s.ec.watchMu.Lock()
		s.ec.watch = nil
		s.ec.watchMu.Unlock()
	case s.ctxStop != nil:
		s.ctxStop()
	}
}

func (c *errorConn) Write(p []byte) (int, error) {
	if c.handling.Load() {
		return c.Conn.Write(p)
	}
	if c.replaced {
		return len(p), nil // net/http closes the connection after such an answer
	}
	code, detail, ok := parseServerAnswer(p)
	if !ok || code < 400 {
		return c.Conn.Write(p)
	}
	c.replaced = true
	if code == http.StatusRequestHeaderFieldsTooLarge {
		detail = fmt.Sprintf("the request line and headers exceed %d KiB", c.maxHeader>>10)
	}
	b, _ := json.Marshal(apiError{ID: errorID, Code: code, Detail: detail, Status: http.StatusText(code)})
	answer := fmt.Sprintf("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n%s\n",
		code, http.StatusText(code), len(b)+1, b)
	if _, err := io.WriteString(c.Conn, answer); err != nil {
		return 0, err
	}
	return len(p), nil
}

// CloseWrite half-closes the connection, as net/http does after a 431 so
// the client reads the answer before the connection resets.
func (c *errorConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// ReadFrom keeps the connection's sendfile and splice for response
// bodies, which only handlers write.
func (c *errorConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok && c.handling.Load() {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c}, r)
}

// parseServerAnswer reads the status of an answer net/http writes itself
// ("HTTP/1.1 400 Bad Request: malformed Host header\r\n...") and says
// what was wrong: the text after the status, or what the status means
// for a request net/http refused.
func parseServerAnswer(p []byte) (code int, detail string, ok bool) {
	line, rest, found := strings.Cut(string(p), "\r\n")
	proto, status, _ := strings.Cut(line, " ")
	if !found || !strings.HasPrefix(proto, "HTTP/1.") || len(status) < 3 {
		return 0, "", false
	}
	code, err := strconv.Atoi(status[:3])
	if err != nil || code < 100 || code > 999 {
		return 0, "", false
	}
	if _, text, ok := strings.Cut(status, ": "); ok && text != "" {
		detail = text // "malformed Host header", "unsupported protocol version"
	}
	switch {
	case code == http.StatusNotImplemented && strings.HasSuffix(rest, "Unsupported transfer encoding"):
		detail = "unsupported Transfer-Encoding: the sidecar reads chunked and identity bodies"
	case code == http.StatusExpectationFailed:
		detail = "unsupported Expect header: only 100-continue is understood"
	case code == http.StatusHTTPVersionNotSupported:
		detail += "; the sidecar speaks HTTP/1.0 and HTTP/1.1"
	case detail == "" && code == http.StatusBadRequest:
		detail = "malformed HTTP request: the request line or a header does not parse"
	case detail == "":
		detail = http.StatusText(code)
	}
	return code, detail, true
}
