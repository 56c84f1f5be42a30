package main

// api.go holds what every HTTP endpoint shares: the one JSON error writer,
// body decoding with limits, CORS and the tracking of
// long-lived websocket streams for shutdown.

import (
	"context"
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
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
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
// middleware has checked the origin against --cors. The returned context ends when the request does or
// the sidecar shuts down (shuttingDown then tells which); done must be
// called when the handler returns. On failure accept has written the JSON
// error and returns a nil conn.
func (g *streams) accept(w http.ResponseWriter, r *http.Request, readLimit int64) (*websocket.Conn, context.Context, func()) {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		writeError(w, http.StatusServiceUnavailable, "sidecar is shutting down")
		return nil, nil, nil
	}
	g.wg.Add(1)
	g.mu.Unlock()

	// The middleware checked the origin against the same policy as CORS.
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		g.wg.Done() // Accept has answered the handshake failure
		return nil, nil, nil
	}
	conn.SetReadLimit(readLimit)
	ctx, cancel := context.WithCancel(r.Context())
	stop := afterFunc(g.ctx, cancel)
	return conn, ctx, func() {
		stop()
		cancel()
		g.wg.Done()
	}
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
