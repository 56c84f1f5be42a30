package main

// rpc.go owns RPC: POST /rpc and the /[service]/[method] path mapping,
// forwarded as JSON-RPC calls to the nodes of a service found in the
// registry, with load balancing (balancer.go), safe retries, a deadline
// covering all attempts, and passive ejection of failing nodes.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"
)

const maxReplyBytes = 16 << 20 // largest backend reply the sidecar reads

// rpcHandler forwards calls to service nodes found in the registry. It owns
// pools of keep-alive connections to the nodes, over which it speaks
// HTTP/1.1 itself on the handler's goroutine (the proxy's client,
// proxy_conn.go), and a balancer. Safe for concurrent use; it starts no
// goroutines beyond a timer per pool with idle connections, and Close
// releases idle backend connections.
type rpcHandler struct {
	cfg       *Config
	reg       Registry
	log       *slog.Logger
	bal       *balancer
	upstreams *upstreams  // calls by service (stats_upstream.go)
	conns     *connPools  // keep-alive connections to the nodes (proxy_conn.go)
	via       *via        // refuses loops, and stamps what is forwarded
	direct    retryBudget // retry budget of calls to an explicit address

	nextID atomic.Uint64 // JSON-RPC id of the next call
	date   dateCache     // the Date field of replies

	// Counters without a service label: their service names come from
	// callers, not the registry, and would make label values unbounded.
	unknown        atomic.Int64 // calls for services the registry does not list
	directCalls    atomic.Int64 // calls to an explicit address (--rpc_allow_address)
	budgetRefusals atomic.Int64 // retries refused by the retry budget
}

// newRPCHandler builds the handler; clientTLS verifies backends called over
// https (see backendScheme); v is the server's place in Via.
func newRPCHandler(cfg *Config, reg Registry, clientTLS *tls.Config, v *via, logger *slog.Logger) *rpcHandler {
	h := &rpcHandler{
		cfg:       cfg,
		reg:       reg,
		log:       logger,
		bal:       newBalancer(cfg.Balancer, time.Now, logger),
		upstreams: newUpstreams("rpc", cfg.StatsMaxServices),
		conns:     newConnPools(cfg, clientTLS),
		via:       v,
	}
	h.bal.useTLS = func(n *Node) bool { return backendScheme(cfg, n) == "https" }
	h.bal.upstreams = h.upstreams
	h.upstreams.nodes = h.bal.nodes
	h.direct.init(time.Now())
	return h
}

// Close releases idle backend connections. Calls in flight are the HTTP
// server's to drain. Idempotent.
func (h *rpcHandler) Close() error {
	h.conns.close()
	return nil
}

// rpcCall is one call to forward.
type rpcCall struct {
	service string
	method  string
	request []byte // valid JSON: params[0] of the JSON-RPC request
	address string // explicit host:port; empty means balance over the registry
}

// rpcForm is the JSON form of POST /rpc. Field names match
// case-insensitively.
type rpcForm struct {
	Service  string          `json:"service"`
	Method   string          `json:"method"`
	Endpoint string          `json:"endpoint"`
	Request  json.RawMessage `json:"request"`
	Address  string          `json:"address"`
}

// handleRPC serves POST /rpc: form fields or a JSON object naming service,
// method (or endpoint) and request.
func (h *rpcHandler) handleRPC(w http.ResponseWriter, r *http.Request) {
	if !h.checkVia(w, r) {
		return
	}
	c, err := h.parseRPC(w, r)
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	h.call(w, r, c)
}

// parseRPC reads the body of POST /rpc, as a form when its Content-Type
// says so (or, without a Content-Type, when it is not a JSON object).
func (h *rpcHandler) parseRPC(w http.ResponseWriter, r *http.Request) (rpcCall, error) {
	body, err := readBody(w, r, h.cfg.MaxBodyBytes)
	if err != nil {
		return rpcCall{}, err
	}
	ct, params := r.Header.Get("Content-Type"), map[string]string(nil)
	if ct != "application/json" { // the common case, without a parse
		ct, params, _ = mime.ParseMediaType(ct)
	}
	var f rpcForm
	var request []byte
	trimmed := bytes.TrimSpace(body)
	switch {
	case ct == "multipart/form-data":
		form, err := multipart.NewReader(bytes.NewReader(body), params["boundary"]).ReadForm(h.cfg.MaxBodyBytes)
		if err != nil {
			return rpcCall{}, errorf(http.StatusBadRequest, "rpc: invalid multipart form: %v", err)
		}
		defer form.RemoveAll()
		get := func(k string) string {
			if v := form.Value[k]; len(v) > 0 {
				return v[0]
			}
			return ""
		}
		f = rpcForm{Service: get("service"), Method: get("method"), Endpoint: get("endpoint"), Address: get("address")}
		request = []byte(get("request"))
	case (ct == "application/x-www-form-urlencoded" || ct == "") && (len(trimmed) == 0 || trimmed[0] != '{'):
		// A body that opens with "{" is JSON whatever the type: curl -d
		// labels everything a form, and no form starts with "{".
		vals, err := url.ParseQuery(string(body))
		if err != nil {
			return rpcCall{}, errorf(http.StatusBadRequest, "rpc: invalid form body: %v", err)
		}
		f = rpcForm{Service: vals.Get("service"), Method: vals.Get("method"), Endpoint: vals.Get("endpoint"), Address: vals.Get("address")}
		request = []byte(vals.Get("request"))
	default:
		if f, err = decodeRPCForm(body); err != nil {
			return rpcCall{}, err
		}
		if len(f.Request) > 0 && f.Request[0] == '"' {
			var text string
			if err := json.Unmarshal(f.Request, &text); err != nil {
				return rpcCall{}, errorf(http.StatusBadRequest, `rpc: field "request": %v`, err)
			}
			request = []byte(text)
		} else if len(f.Request) > 0 && string(f.Request) != "null" {
			request = f.Request
		}
	}
	c := rpcCall{service: f.Service, method: f.Method, address: f.Address}
	if c.method == "" {
		c.method = f.Endpoint
	}
	if err := checkName("service", c.service); err != nil {
		return rpcCall{}, errorf(http.StatusBadRequest, "rpc: %v", err)
	}
	if err := checkName("method", c.method); err != nil {
		return rpcCall{}, errorf(http.StatusBadRequest, `rpc: %v (or "endpoint")`, err)
	}
	if c.request, err = requestJSON(request); err != nil {
		return rpcCall{}, err
	}
	if c.address != "" {
		if !h.cfg.RPCAllowAddress {
			return rpcCall{}, errorf(http.StatusForbidden, `rpc: field "address" is refused: calling an explicit address needs --rpc_allow_address`)
		}
		if _, _, err := splitHostPort(c.address); err != nil {
			return rpcCall{}, errorf(http.StatusBadRequest, `rpc: field "address" %q: %v`, c.address, err)
		}
	}
	return c, nil
}

// checkVia answers a request that went round a loop (its Via names this
// sidecar, or too many sidecars) with a JSON 508, before its body is read
// or its path mapped: a node registered at the sidecar's own address gets
// POST /, which would otherwise be a 404 the caller sees as a 502.
func (h *rpcHandler) checkVia(w http.ResponseWriter, r *http.Request) bool {
	if err := h.via.check(r.Header["Via"]); err != nil {
		writeError(w, http.StatusLoopDetected, "rpc: %v", err)
		return false
	}
	return true
}

// requestJSON checks the text of a request field: empty means {}.
func requestJSON(b []byte) ([]byte, error) {
	b = bytes.TrimSpace(b)
	if len(b) == 0 || string(b) == "null" {
		return []byte("{}"), nil
	}
	if !validJSON(b) {
		return nil, errorf(http.StatusBadRequest, `rpc: field "request" is not valid JSON`)
	}
	return b, nil
}

// decodeRPCForm decodes the JSON form of POST /rpc as decodeJSON
// would, but reads the members in place (the request aliases body). What
// is not plain (a name or a string with an escape or a non-ASCII byte, a
// field of the wrong type, a body that is not an object) goes through
// decodeJSON, whose rules and errors are encoding/json's.
func decodeRPCForm(body []byte) (rpcForm, error) {
	slow := func() (rpcForm, error) {
		var f rpcForm
		err := decodeJSON(body, &f)
		return f, err
	}
	if !validJSON(body) {
		return slow()
	}
	m, ok := members(body)
	if !ok {
		return slow()
	}
	var out rpcForm
	for key, value, ok := m.next(); ok; key, value, ok = m.next() {
		var field *string
		switch {
		case !plainKey(key):
			return slow()
		case asciiEqualFold(key, "request"):
			out.Request = value
			continue
		case asciiEqualFold(key, "service"):
			field = &out.Service
		case asciiEqualFold(key, "method"):
			field = &out.Method
		case asciiEqualFold(key, "endpoint"):
			field = &out.Endpoint
		case asciiEqualFold(key, "address"):
			field = &out.Address
		default:
			continue
		}
		switch {
		case string(value) == "null": // leaves the field as it is, as encoding/json does
		case value[0] == '"' && plainKey(value[1:len(value)-1]):
			*field = string(value[1 : len(value)-1])
		default:
			return slow()
		}
	}
	return out, nil
}

// handlePath serves /[service]/[method]: the path names the service and
// method (see mapPath); a POST body is the request, or for GET the query
// parameters as a JSON object.
func (h *rpcHandler) handlePath(w http.ResponseWriter, r *http.Request) {
	if !h.checkVia(w, r) {
		return
	}
	service, method, err := mapPath(h.cfg.Namespace, r.URL.Path)
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	c := rpcCall{service: service, method: method}
	switch r.Method {
	case http.MethodGet:
		c.request = queryJSON(r.URL.Query())
	case http.MethodPost:
		body, err := readBody(w, r, h.cfg.MaxBodyBytes)
		if err != nil {
			writeHTTPError(w, err)
			return
		}
		if c.request, err = requestJSON(body); err != nil {
			writeError(w, http.StatusBadRequest, "rpc: request body is not valid JSON")
			return
		}
	default:
		w.Header().Set("Allow", "GET, POST")
		writeError(w, http.StatusMethodNotAllowed, "rpc: method %s not allowed on %s; POST a JSON body or GET with query parameters", r.Method, r.URL.Path)
		return
	}
	h.call(w, r, c)
}

// queryJSON turns query parameters into a JSON object: a parameter given
// once is a string, one given several times an array of strings.
func queryJSON(q url.Values) []byte {
	obj := make(map[string]any, len(q))
	for k, v := range q {
		if len(v) == 1 {
			obj[k] = v[0]
		} else {
			obj[k] = v
		}
	}
	b, _ := json.Marshal(obj) // strings only: cannot fail
	return b
}

// mapPath maps a URL path to a service and method as the micro API does,
// with namespace ns ("go.micro.srv"):
//
//	/foo/bar          ns.foo     Foo.Bar
//	/foo/bar/baz      ns.foo     Bar.Baz
//	/foo/bar/baz/cat  ns.foo.bar Baz.Cat
//	/v1/foo/bar       ns.v1.foo  Foo.Bar
//	/v1/foo/bar/baz   ns.v1.foo  Bar.Baz
//
// The last two segments name the method, each camel-cased on "-"
// (baz-xyz is BazXyz); the segments before them name the service, except
// that a three-segment path starting with a version (v1, v2, ...) keeps the
// version in the service. A path with fewer than two segments names no
// method (404); a segment outside [A-Za-z0-9_-] is a 400.
func mapPath(ns, p string) (service, method string, err error) {
	p = strings.TrimSuffix(strings.TrimPrefix(p, "/"), "/")
	if p == "" {
		return "", "", errorf(http.StatusNotFound, "rpc: path / names no service; call /[service]/[method] or POST /rpc")
	}
	parts := strings.Split(p, "/")
	for _, s := range parts {
		if err := checkSegment(s); err != nil {
			return "", "", err
		}
	}
	if len(parts) == 1 {
		return "", "", errorf(http.StatusNotFound, "rpc: path /%s names a service but no method; want /%s/[method]", parts[0], parts[0])
	}
	n := len(parts)
	svc := parts[:n-2]
	if n == 2 || (n == 3 && isVersion(parts[0])) {
		svc = parts[:n-1]
		if n == 2 {
			svc = parts[:1]
		}
	}
	m1, m2 := camel(parts[n-2]), camel(parts[n-1])
	if m1 == "" || m2 == "" {
		return "", "", errorf(http.StatusBadRequest, "rpc: path %q names no method: a method segment is only dashes", "/"+p)
	}
	service = strings.Join(svc, ".")
	if ns != "" {
		service = ns + "." + service
	}
	if len(service) > maxNameLen {
		return "", "", errorf(http.StatusBadRequest, "rpc: service name from path is longer than %d bytes", maxNameLen)
	}
	return service, m1 + "." + m2, nil
}

// checkSegment accepts a path segment of letters, digits, '_' and '-'.
func checkSegment(s string) error {
	if s == "" {
		return errorf(http.StatusBadRequest, "rpc: path has an empty segment")
	}
	if len(s) > maxNameLen {
		return errorf(http.StatusBadRequest, "rpc: path segment longer than %d bytes", maxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return errorf(http.StatusBadRequest, "rpc: path segment %q may hold only letters, digits, '_' and '-'", s)
		}
	}
	return nil
}

// isVersion reports whether s is a version segment: v1, v2, v10 ...
func isVersion(s string) bool {
	if len(s) < 2 || s[0] != 'v' {
		return false
	}
	for i := 1; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// camel upper-cases the first letter of s and of each word after a '-',
// dropping the dashes: baz-xyz is BazXyz.
func camel(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	for _, w := range strings.Split(s, "-") {
		if w == "" {
			continue
		}
		r, n := utf8.DecodeRuneInString(w)
		b.WriteRune(unicode.ToUpper(r))
		b.WriteString(w[n:])
	}
	return b.String()
}

// attempt is the outcome of one try of a call on one node.
type attempt struct {
	code       int       // HTTP status for the caller
	result     []byte    // the JSON-RPC result, verbatim, when code is 200; it may alias the buffer of the connection the exchange holds
	err        *apiError // the error for the caller otherwise
	nodeFailed bool      // counts against the node for ejection
	retry      bool      // safe to retry: nothing reached the app
}

// Reply header values the handler sets by assignment rather than
// Header.Set, which would allocate them per call. Never modified.
var (
	jsonContentType = []string{"application/json"}
	noSniff         = []string{"nosniff"}
)

// call forwards c and writes the answer: the backend's result verbatim, or
// a JSON error. Retries go to another node where one exists.
func (h *rpcHandler) call(w http.ResponseWriter, r *http.Request, c rpcCall) {
	timeout, lowered, err := requestTimeout(r.Header, h.cfg.ClientRequestTimeout)
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	start := time.Now()
	x := &rpcExchange{h: h, r: r, c: c}
	x.ctx.parent, x.ctx.deadline = r.Context(), start.Add(timeout)
	defer x.ctx.release()
	ctx := &x.ctx

	var st *svcState
	budget := &h.direct
	if c.address == "" {
		svc, err := h.reg.GetService(ctx, c.service)
		if errors.Is(err, errNotFound) {
			h.bal.forget(c.service)
			h.unknown.Add(1)
			writeError(w, http.StatusNotFound, "rpc: service %q not found", c.service)
			return
		}
		if err != nil {
			writeError(w, http.StatusServiceUnavailable, "rpc: look up %s: %v", c.service, err)
			return
		}
		st = h.bal.service(svc)
		budget = &st.budget
	} else {
		h.directCalls.Add(1)
	}
	budget.deposit()

	x.id = strconv.AppendUint(x.idBuf[:0], h.nextID.Add(1), 10)
	x.method = appendJSONString(x.methodBuf[:0], c.method)
	x.watch = watchCaller(r, x)
	defer x.end()

	var triedBuf [4]*nodeState
	tried := triedBuf[:0] // nodes this call failed on: retries go elsewhere
	var res attempt
	directURL := ""
	if c.address != "" {
		directURL = "http://" + c.address + "/"
	}
	for try := 0; ; try++ {
		url, addr := directURL, c.address
		t0 := h.bal.now() // the balancer's clock (time.Now; a test's moves ejections on)
		var n *nodeState
		if st != nil {
			if n = h.bal.pick(st, tried, t0); n == nil {
				res = attempt{code: http.StatusServiceUnavailable, err: h.apiErr(http.StatusServiceUnavailable, "rpc: service %q has no nodes", c.service)}
				break
			}
			url, addr = n.url, n.addr
		}
		res = x.try(url, addr)
		if res.code == http.StatusGatewayTimeout && (lowered || x.callerLeft()) {
			res.nodeFailed = false // the caller's own short deadline, or its leaving, says nothing of the node
		}
		if n != nil {
			h.bal.done(n, t0, h.bal.now().Sub(t0), !res.nodeFailed)
		}
		if res.nodeFailed {
			h.log.Debug("attempt failed", "service", c.service, "node", addr, "try", try, "code", res.code)
		}
		if !res.retry || try >= h.cfg.ClientRetries {
			break
		}
		wait := retryBackoff(try)
		if time.Now().Add(wait).After(x.ctx.deadline) {
			break
		}
		if !budget.withdraw(time.Now()) {
			h.budgetRefusals.Add(1)
			break
		}
		if st != nil {
			st.up.retries.Add(1)
		}
		if !sleepCtx(ctx, wait) {
			break
		}
		if n != nil {
			tried = append(tried, n)
		}
	}
	if res.code != http.StatusOK && x.ended() && (res.err == nil || res.retry) {
		// The time ran out in an attempt or while waiting to retry, or
		// the caller left.
		res = h.expired(x.callerLeft(), c, timeout)
	}
	if st != nil {
		st.up.record(res.code, time.Since(start)) // the call's one count, before its answer goes out
	}
	if res.code != http.StatusOK {
		writeJSON(w, res.code, res.err)
		return
	}
	hd := w.Header()
	hd["Content-Type"] = jsonContentType
	hd["X-Content-Type-Options"] = noSniff
	hd["Date"] = h.date.field(time.Now())
	if len(res.result) <= smallReply {
		w.WriteHeader(http.StatusOK)
		w.Write(res.result) // into net/http's buffer: it does not block
		return
	}
	hd["Content-Length"] = []string{strconv.Itoa(len(res.result))}
	// A large result can fill the socket's buffers and block on a
	// caller that does not read it, holding the result and the backend
	// connection it came from (end): the caller has the call's timeout,
	// afresh, to take it. net/http lifts the deadline once the handler's
	// response is flushed.
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(h.cfg.ClientRequestTimeout))
	w.WriteHeader(http.StatusOK)
	w.Write(res.result)
}

// dateCache is the Date field of replies (RFC 9110 section 6.6.1, one
// second's resolution), formatted once a second rather than by net/http
// for every reply. Safe for concurrent use; the slices it hands out are
// never modified.
type dateCache struct{ v atomic.Pointer[dateField] }

type dateField struct {
	sec   int64    // unix seconds of the time formatted
	value []string // the header value, as http.Header holds it
}

// field returns the Date field of a reply sent at now.
func (d *dateCache) field(now time.Time) []string {
	sec := now.Unix()
	if f := d.v.Load(); f != nil && f.sec == sec {
		return f.value
	}
	f := &dateField{sec: sec, value: []string{now.UTC().Format(http.TimeFormat)}}
	d.v.Store(f)
	return f.value
}

// smallReply is the largest result written without a Content-Length of
// the handler's: net/http buffers that much of a response before sending
// its header (2 KiB), and sets the Content-Length itself when the handler
// has written all of it by then.
const smallReply = 2 << 10

// expired is the answer once the call has ended: 504 when its time ran
// out; when the caller has gone (gone), the answer is moot.
func (h *rpcHandler) expired(gone bool, c rpcCall, timeout time.Duration) attempt {
	if gone {
		// Nobody reads this answer; 499 is what access logs call it.
		return attempt{code: statusClientClosed, err: &apiError{ID: errorID, Code: statusClientClosed, Detail: "rpc: caller went away", Status: "Client Closed Request"}}
	}
	return attempt{code: http.StatusGatewayTimeout, err: h.apiErr(http.StatusGatewayTimeout, "rpc: call %s %s: no reply within %s", c.service, c.method, timeout)}
}

func (h *rpcHandler) apiErr(code int, format string, args ...any) *apiError {
	return &apiError{ID: errorID, Code: code, Detail: fmt.Sprintf(format, args...), Status: http.StatusText(code)}
}

// rpcExchange is one call on its way to the nodes: its context and
// deadline, its JSON-RPC id and method, and the backend connection it
// uses, which the watch of the caller (callerGone) ends when the caller
// goes away. The call's one allocation of the sidecar's own, besides the
// watch.
type rpcExchange struct {
	h         *rpcHandler
	r         *http.Request
	c         rpcCall
	ctx       callContext
	id        []byte // the JSON-RPC id: decimal digits in idBuf
	method    []byte // the method as a JSON string, in methodBuf when it fits
	watch     callerWatchStop
	idBuf     [20]byte
	methodBuf [64]byte

	mu   sync.Mutex   // guards conn and gone; held by callerGone while it acts
	conn *backendConn // the connection of the attempt in flight, for callerGone
	gone bool         // the caller went away

	// The connection whose buffer a 200 result aliases, held until the
	// result is written (end), and what to do with it then.
	held     *backendConn
	heldSize int  // bytes of held's buffer that are the reply
	heldKeep bool // the reply was read whole: held may serve another call
}

// callerGone ends the attempt in flight when the caller goes away: its
// connection's blocked read or write returns at once.
func (x *rpcExchange) callerGone() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.gone = true
	if x.conn != nil {
		x.conn.SetDeadline(aLongTimeAgo)
	}
}

// callerLeft reports whether the caller went away: callerGone ran, or the
// request's context says so (the errorConn tells callerGone before
// net/http cancels the context).
func (x *rpcExchange) callerLeft() bool {
	x.mu.Lock()
	gone := x.gone
	x.mu.Unlock()
	return gone || x.r.Context().Err() != nil
}

// ended reports whether the call is over before its answer: its time is
// up or its caller left.
func (x *rpcExchange) ended() bool {
	return x.ctx.over() || x.callerLeft()
}

// attach makes c the connection callerGone ends; false if the caller has
// already gone.
func (x *rpcExchange) attach(c *backendConn) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.conn = c
	return !x.gone
}

// detach takes the connection back from callerGone's reach and reports
// whether the caller went away meanwhile (its deadline may then be past).
func (x *rpcExchange) detach() (gone bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.conn = nil
	return x.gone
}

// end stops the watch of the caller and releases the connection a result
// was read from.
func (x *rpcExchange) end() {
	x.watch.stop()
	if c := x.held; c != nil {
		x.held = nil
		c.br.Discard(x.heldSize)
		if x.heldKeep {
			c.pool.put(c, time.Now())
		} else {
			c.close()
		}
	}
}

// try sends one attempt of the call to the node at addr (whose pool is
// url's) over a pooled connection and classifies the outcome. A 200's
// result aliases the connection's buffer, which the exchange holds until
// end; any other outcome is done with its connection when try returns.
func (x *rpcExchange) try(url, addr string) attempt {
	h, c := x.h, &x.c
	bc, head, err := x.exchange(h.conns.pool(url, addr))
	if err != nil {
		return x.failed(addr, err)
	}
	var raw []byte
	size := 0 // bytes of bc's buffer raw aliases
	keep := !head.close
	switch {
	case head.code == http.StatusNoContent || head.code == http.StatusNotModified:
	case head.chunked:
		if raw, err = readReply(httputil.NewChunkedReader(bc.br)); err == nil && len(raw) <= maxReplyBytes {
			err = bc.readTrailer(http.Header{}, backendHeaderSize)
		}
	case head.length > maxReplyBytes:
		x.detach()
		bc.close()
		return attempt{code: http.StatusBadGateway, nodeFailed: true,
			err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: reply exceeds %d bytes", c.service, addr, maxReplyBytes)}
	case head.length >= 0 && head.length <= int64(bc.br.Size()):
		raw, err = bc.br.Peek(int(head.length))
		size = len(raw)
	case head.length >= 0:
		raw, err = readLength(bc.br, int(head.length))
	default: // the node's close ends the reply
		raw, err = readReply(bc.br)
		keep = false
	}
	gone := x.detach()
	keep = keep && err == nil && !gone && len(raw) <= maxReplyBytes
	done := func() {
		bc.br.Discard(size)
		if keep {
			bc.pool.put(bc, time.Now())
		} else {
			bc.close()
		}
	}
	if err != nil {
		done()
		if x.ended() {
			return attempt{code: http.StatusGatewayTimeout, nodeFailed: true} // call writes the error
		}
		return attempt{code: http.StatusBadGateway, nodeFailed: true,
			err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: read reply: %v", c.service, addr, err)}
	}
	a := h.classify(c, addr, x.id, head.code, raw)
	if a.code != http.StatusOK {
		done()
		return a
	}
	x.held, x.heldSize, x.heldKeep = bc, size, keep
	return a
}

// readLength reads a reply of n bytes (at most maxReplyBytes) into a
// buffer that grows as they arrive, doubling from 64 KiB: the node's
// Content-Length alone does not make the sidecar allocate it.
func readLength(r io.Reader, n int) ([]byte, error) {
	b := make([]byte, 0, min(n, 64<<10))
	for len(b) < n {
		if len(b) == cap(b) {
			b = slices.Grow(b, min(len(b), n-len(b)))
		}
		m, err := r.Read(b[len(b):min(cap(b), n)])
		b = b[:len(b)+m]
		if err != nil && len(b) < n {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return b, err
		}
	}
	return b, nil
}

// readReply reads a reply of unknown length, up to one byte more than
// maxReplyBytes.
func readReply(r io.Reader) ([]byte, error) {
	return io.ReadAll(io.LimitReader(r, maxReplyBytes+1))
}

// exchange writes the call's request on a connection of pool and reads the
// response head. It uses an idle connection if there is one (probed first
// when it has been idle a while: a POST cannot be sent twice); when that
// fails before anything was written or read, the node probably closed it,
// and a fresh one is tried once. On success the connection is attached
// (callerGone ends it), its body unread.
func (x *rpcExchange) exchange(pool *connPool) (*backendConn, respHead, error) {
	c := pool.get(time.Now(), true)
	for fresh := c == nil; ; fresh = true {
		if c == nil {
			var err error
			if c, err = pool.dial(&x.ctx); err != nil {
				return nil, respHead{}, err
			}
		}
		if !x.attach(c) {
			x.detach()
			c.close()
			return nil, respHead{}, errCallerGone
		}
		h, started, wrote, err := x.roundTrip(c)
		if err == nil {
			return c, h, nil
		}
		reused := c.reused
		gone := x.detach()
		c.close()
		if fresh || !reused || started || wrote || gone {
			return nil, respHead{}, err
		}
		x.h.log.Debug("pooled connection failed; trying a fresh one", "service", x.c.service, "node", pool.addr, "err", err)
		c = nil
	}
}

// roundTrip writes the request on c and reads the final response head,
// skipping 1xx interim responses, all within the call's deadline. started
// says whether any byte of a response arrived, wrote whether the request
// was written.
func (x *rpcExchange) roundTrip(c *backendConn) (h respHead, started, wrote bool, err error) {
	c.SetDeadline(x.ctx.deadline)
	writeRPCRequest(c.bw, x.r, c.pool.addr, &x.c, x.method, x.id, time.Until(x.ctx.deadline), x.h.via.entry(x.r), x.h.cfg.AuthToken != "")
	if err := c.bw.Flush(); err != nil {
		return h, false, false, err
	}
	for interim := 0; ; interim++ {
		h, started, err = c.readResponseHead(backendHeaderSize)
		if err != nil {
			return h, started, true, err
		}
		if h.code >= 200 {
			return h, true, true, nil
		}
		if h.code == http.StatusSwitchingProtocols {
			return h, true, true, errors.New("101 Switching Protocols to a request without an upgrade")
		}
		if interim == maxInterim {
			return h, true, true, fmt.Errorf("more than %d interim responses", maxInterim)
		}
	}
}

// failed is the attempt of an exchange that failed: a dial that failed
// may go to another node; a timeout or the caller's leaving is written by
// call (expired).
func (x *rpcExchange) failed(addr string, err error) attempt {
	h, c := x.h, &x.c
	if x.ended() {
		return attempt{code: http.StatusGatewayTimeout, nodeFailed: true} // call writes the error
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return attempt{code: http.StatusServiceUnavailable, nodeFailed: true, retry: true,
			err: h.apiErr(http.StatusServiceUnavailable, "rpc: call %s: %v", c.service, dialError(op))}
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return attempt{code: http.StatusGatewayTimeout, nodeFailed: true,
			err: h.apiErr(http.StatusGatewayTimeout, "rpc: call %s on %s: %v", c.service, addr, err)}
	}
	return attempt{code: http.StatusBadGateway, nodeFailed: true,
		err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: %v", c.service, addr, err)}
}

// classify turns a node's reply (status code, body raw) to the request
// with JSON-RPC id into the attempt's outcome.
func (h *rpcHandler) classify(c *rpcCall, addr string, id []byte, code int, raw []byte) attempt {
	if len(raw) > maxReplyBytes {
		return attempt{code: http.StatusBadGateway, nodeFailed: true,
			err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: reply exceeds %d bytes", c.service, addr, maxReplyBytes)}
	}
	failed := code >= 500
	retry := code == http.StatusServiceUnavailable
	rep, ok := parseReply(raw)
	if !ok || (rep.Result == nil && rep.Error == nil) {
		status := http.StatusBadGateway
		if retry {
			status = http.StatusServiceUnavailable
		}
		if code == http.StatusLoopDetected {
			// A sidecar refused the call as a loop (this one, when the
			// node is its own address): the caller gets the 508.
			var e apiError
			if json.Unmarshal(raw, &e) != nil || e.Detail == "" {
				e.Detail = snippet(raw)
			}
			return attempt{code: http.StatusLoopDetected, nodeFailed: true,
				err: h.apiErr(http.StatusLoopDetected, "rpc: call %s on %s: %s", c.service, addr, e.Detail)}
		}
		detail := fmt.Sprintf("rpc: call %s on %s: not a JSON-RPC reply (HTTP %d): %.200q", c.service, addr, code, raw)
		return attempt{code: status, nodeFailed: failed || code < 300, retry: retry, err: h.apiErr(status, "%s", detail)}
	}
	if !idAnswers(rep.ID, id) {
		// Not the answer to this call: the node, or something between, is
		// confused, and its result cannot be trusted to be this call's.
		return attempt{code: http.StatusBadGateway, nodeFailed: true,
			err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: reply id %.64s does not answer request id %s", c.service, addr, rep.ID, id)}
	}
	if len(rep.Error) > 0 && string(rep.Error) != "null" {
		a := appError(c.service, rep.Error)
		return attempt{code: a.Code, err: a, nodeFailed: failed, retry: retry}
	}
	result := rep.Result
	if len(result) == 0 {
		result = []byte("null")
	}
	if retry || failed {
		// A result with a 5xx status: the node answered, but says it failed.
		return attempt{code: http.StatusBadGateway, nodeFailed: true, retry: retry,
			err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: HTTP %d", c.service, addr, code)}
	}
	return attempt{code: http.StatusOK, result: result}
}

// The JSON-RPC request around the caller's request, params[0]:
// {"jsonrpc":"2.0","method":M,"params":[request],"id":N}. A JSON-RPC 2.0
// request, which 2.0 servers refuse without the "jsonrpc" member, and
// still the 1.0 request go-micro and net/rpc/jsonrpc servers read, since
// they ignore members they do not know. params stays a one-element array,
// as 1.0 servers want it.
const (
	rpcBodyMethod = `{"jsonrpc":"2.0","method":`
	rpcBodyParams = `,"params":[`
	rpcBodyID     = `],"id":`
)

// writeRPCRequest writes the JSON-RPC request of call c to the node at
// host on bw, head and body, straight from the caller's request r: method
// is c.method as a JSON string, id the JSON-RPC id, timeout the budget
// left (the Timeout field, in ns), via the sidecar's Via entry. The
// caller's fields go on but for hop-by-hop ones (RFC 9110 section 7.6.1),
// the body framing and Content-Type the sidecar writes itself,
// Accept-Encoding (the sidecar asks for no compression), Expect, the
// Micro-* and Timeout fields it sets, and the caller's Authorization when
// dropAuth (it was the sidecar's own token). Via gets the sidecar after
// the caller's entries. A W3C traceparent is passed through or started.
func writeRPCRequest(bw *bufio.Writer, r *http.Request, host string, c *rpcCall, method, id []byte, timeout time.Duration, via string, dropAuth bool) {
	bodyLen := len(rpcBodyMethod) + len(method) + len(rpcBodyParams) + len(c.request) + len(rpcBodyID) + len(id) + 1
	bw.WriteString("POST / HTTP/1.1\r\nHost: ")
	bw.WriteString(host)
	bw.WriteString("\r\nContent-Type: application/json\r\nContent-Length: ")
	bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(bodyLen), 10))
	bw.WriteString("\r\nMicro-Service: ")
	bw.WriteString(c.service)
	bw.WriteString("\r\nMicro-Endpoint: ")
	bw.WriteString(c.method)
	bw.WriteString("\r\nMicro-Id: ")
	bw.Write(id)
	bw.WriteString("\r\nTimeout: ")
	bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(max(timeout, 1)), 10))
	bw.WriteString("\r\n")
	tp := r.Header["Traceparent"]
	keepTrace := len(tp) == 1 && validTraceparent(tp[0])
	conn := r.Header["Connection"]
	agent := false
	for k, vv := range r.Header {
		if hopByHop(k, conn) || skipRPCField(k, dropAuth, keepTrace) {
			continue
		}
		agent = agent || k == "User-Agent"
		for _, v := range vv {
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	if !agent {
		bw.WriteString("User-Agent: Go-http-client/1.1\r\n") // what net/http's client sent
	}
	for _, v := range r.Header["Via"] {
		bw.WriteString("Via: ")
		bw.WriteString(v)
		bw.WriteString("\r\n")
	}
	bw.WriteString("Via: ")
	bw.WriteString(via)
	if !keepTrace {
		bw.WriteString("\r\nTraceparent: ")
		bw.Write(appendTraceparent(bw.AvailableBuffer()))
	}
	bw.WriteString("\r\n\r\n" + rpcBodyMethod)
	bw.Write(method)
	bw.WriteString(rpcBodyParams)
	bw.Write(c.request)
	bw.WriteString(rpcBodyID)
	bw.Write(id)
	bw.WriteByte('}')
}

// skipRPCField reports whether the caller's field k, not hop-by-hop, is
// still not passed on to a node as it is (see writeRPCRequest).
func skipRPCField(k string, dropAuth, keepTrace bool) bool {
	switch k {
	case "Host", "Content-Length", "Content-Type", "Accept-Encoding", "Expect", "Timeout",
		"Micro-Service", "Micro-Endpoint", "Micro-Id", "Via":
		return true
	case "Authorization":
		return dropAuth
	case "Traceparent", "Tracestate":
		return !keepTrace
	}
	return false
}

// appendJSONString appends s as a JSON string, as json.Marshal writes it
// (HTML characters escaped); without a copy through json.Marshal when s
// needs no escape, as method names do.
func appendJSONString(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			m, _ := json.Marshal(s) // a string: cannot fail
			return append(dst, m...)
		}
	}
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}

// rpcReply is a JSON-RPC reply in either style: 1.0, {"id","result",
// "error"} with error null or a string; or 2.0, {"jsonrpc":"2.0","id"}
// with "result" or an "error" object. An absent member stays nil, a null
// one holds "null". An error that is not null wins over a result (a 2.0
// server must not send both; a 1.0 one sends result null with an error).
// The members alias the reply's bytes.
type rpcReply struct {
	ID     json.RawMessage `json:"id"`
	Result json.RawMessage `json:"result"`
	Error  json.RawMessage `json:"error"`
}

// parseReply reads a reply as json.Unmarshal into an rpcReply would, with
// members matched case-insensitively and the last of duplicates winning,
// but without copying them; ok is false when raw is not a JSON object.
// A member name with an escape or a non-ASCII byte (which encoding/json
// folds by Unicode rules) goes through json.Unmarshal.
func parseReply(raw []byte) (rep rpcReply, ok bool) {
	if !validJSON(raw) {
		return rep, false
	}
	m, ok := members(raw)
	if !ok {
		return rep, false
	}
	for key, value, ok := m.next(); ok; key, value, ok = m.next() {
		switch {
		case !plainKey(key):
			var slow rpcReply
			return slow, json.Unmarshal(raw, &slow) == nil
		case asciiEqualFold(key, "id"):
			rep.ID = value
		case asciiEqualFold(key, "result"):
			rep.Result = value
		case asciiEqualFold(key, "error"):
			rep.Error = value
		}
	}
	return rep, true
}

// idAnswers reports whether a reply's id answers the request id sent (an
// integer): the same integer, or the same digits as a string. An absent or
// null id is accepted: a 2.0 server answers null when it could not read
// the request's id, some 1.0 servers do not echo it, and HTTP pairs the
// reply with its request anyway.
func idAnswers(got json.RawMessage, sent []byte) bool {
	s := string(got)
	return s == "" || s == "null" || s == string(sent) ||
		len(s) == len(sent)+2 && s[0] == '"' && s[len(s)-1] == '"' && s[1:len(s)-1] == string(sent)
}

// callContext is a call's context: the caller's request context with the
// call's deadline. Its timer and cancellation are made on the first call
// of Done or Err, which only a call that must wait (a registry fetch, a
// dial, a retry's backoff) or has failed makes: a call answered from the
// registry's memory over a pooled connection, which the connection's
// deadline bounds, makes neither. Safe for concurrent use; release ends
// it.
type callContext struct {
	parent   context.Context
	deadline time.Time
	once     sync.Once
	ctx      context.Context
	cancel   context.CancelFunc
}

func (c *callContext) init() { c.ctx, c.cancel = context.WithDeadline(c.parent, c.deadline) }

func (c *callContext) Deadline() (time.Time, bool) { return c.deadline, true }
func (c *callContext) Value(key any) any           { return c.parent.Value(key) }

func (c *callContext) Done() <-chan struct{} {
	c.once.Do(c.init)
	if c.ctx == nil { // released: the call is over, its request ends now
		return c.parent.Done()
	}
	return c.ctx.Done()
}

func (c *callContext) Err() error {
	c.once.Do(c.init)
	if c.ctx == nil {
		return context.Canceled
	}
	return c.ctx.Err()
}

// over reports whether the call's time is up or its caller has gone: the
// context is done, or about to be (a connection's deadline, the same
// instant, may fire before the context's timer does).
func (c *callContext) over() bool {
	return c.Err() != nil || !time.Now().Before(c.deadline)
}

// release cancels the context if it was made, once nothing uses it.
func (c *callContext) release() {
	c.once.Do(func() {})
	if c.cancel != nil {
		c.cancel()
	}
}

// appError is the caller's error for a JSON-RPC error member, in either
// style:
//   - a string (1.0 style) holding a go-micro error {"id","code","detail",
//     "status"} keeps its code as the HTTP status; any other string is a
//     500 with that text as detail;
//   - a go-micro error as an object, likewise;
//   - a JSON-RPC 2.0 error object {"code","message","data"} gets the status
//     of its code (rpc2Status), and its message, data and code in detail;
//   - anything else is a 500 with the member's JSON as detail.
func appError(service string, raw json.RawMessage) *apiError {
	var text string
	if err := json.Unmarshal(raw, &text); err != nil {
		var obj struct {
			apiError
			Message string          `json:"message"`
			Data    json.RawMessage `json:"data"`
		}
		if json.Unmarshal(raw, &obj) != nil || (obj.Code == 0 && obj.Message == "" && obj.Detail == "") {
			return &apiError{ID: service, Code: http.StatusInternalServerError, Detail: string(raw), Status: http.StatusText(http.StatusInternalServerError)}
		}
		if obj.Detail != "" && obj.Code >= 400 && obj.Code <= 599 {
			return fillError(service, &obj.apiError)
		}
		message := obj.Message
		if message == "" {
			message = obj.Detail // a go-micro error with a JSON-RPC code
		}
		code := rpc2Status(obj.Code)
		return &apiError{ID: service, Code: code, Detail: rpc2Detail(obj.Code, message, obj.Data), Status: http.StatusText(code)}
	}
	var e apiError
	if t := strings.TrimSpace(text); strings.HasPrefix(t, "{") && json.Unmarshal([]byte(t), &e) == nil && e.Code >= 400 && e.Code <= 599 {
		return fillError(service, &e)
	}
	if text == "" {
		text = "backend returned an empty error"
	}
	return &apiError{ID: service, Code: http.StatusInternalServerError, Detail: text, Status: http.StatusText(http.StatusInternalServerError)}
}

// rpc2Status is the HTTP status of a JSON-RPC 2.0 error code (SPEC,
// "Backend wire protocol"): a request the server could not parse, an
// invalid request and invalid params are 400, an unknown method 404;
// internal errors, the server errors -32000 to -32099 and codes the
// application defines are 500. A code that looks like an HTTP status is
// not taken for one: JSON-RPC codes are the application's own.
func rpc2Status(code int) int {
	switch code {
	case -32700, -32600, -32602:
		return http.StatusBadRequest
	case -32601:
		return http.StatusNotFound
	}
	return http.StatusInternalServerError
}

// rpc2Detail is the detail of a JSON-RPC 2.0 error: "message: data
// (JSON-RPC error code)", data unquoted when it is a string and compacted
// otherwise, so the caller sees what the server said and its code, which
// the HTTP status alone does not keep.
func rpc2Detail(code int, message string, data json.RawMessage) string {
	var b strings.Builder
	b.WriteString(message)
	if len(data) > 0 && string(data) != "null" {
		if b.Len() > 0 {
			b.WriteString(": ")
		}
		var s string
		var buf bytes.Buffer
		if json.Unmarshal(data, &s) == nil {
			b.WriteString(s)
		} else if json.Compact(&buf, data) == nil {
			b.Write(buf.Bytes())
		} else {
			b.Write(data)
		}
	}
	if b.Len() > 0 {
		b.WriteString(" ")
	}
	fmt.Fprintf(&b, "(JSON-RPC error %d)", code)
	return b.String()
}

// fillError completes a backend's go-micro error.
func fillError(service string, e *apiError) *apiError {
	if e.ID == "" {
		e.ID = service
	}
	if e.Status == "" {
		e.Status = http.StatusText(e.Code)
	}
	if e.Detail == "" {
		e.Detail = e.Status
	}
	return e
}

// metrics emits the RPC counters without a service label; those by
// service are h.upstreams, which stats writes itself (histograms).
func (h *rpcHandler) metrics(emit emitFunc) {
	emit("sidecar_rpc_unknown_service_total", "Calls for services the registry does not list.", "counter", float64(h.unknown.Load()))
	emit("sidecar_rpc_direct_calls_total", "Calls to an explicit address (--rpc_allow_address).", "counter", float64(h.directCalls.Load()))
	emit("sidecar_rpc_retry_budget_exhausted_total", "Retries refused by the retry budget.", "counter", float64(h.budgetRefusals.Load()))
}
