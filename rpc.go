package main

// rpc.go owns RPC: POST /rpc and the /[service]/[method] path mapping,
// forwarded as JSON-RPC calls to the nodes of a service found in the
// registry, with load balancing (balancer.go), safe retries, a deadline
// covering all attempts, and passive ejection of failing nodes.

import (
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
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"
)

const maxReplyBytes = 16 << 20 // largest backend reply the sidecar reads

// rpcHandler forwards calls to service nodes found in the registry. It owns
// one HTTP transport shared by every call and a balancer. Safe for
// concurrent use; it starts no goroutines, and Close releases idle backend
// connections.
type rpcHandler struct {
	cfg       *Config
	reg       Registry
	log       *slog.Logger
	bal       *balancer
	upstreams *upstreams // calls by service (stats_upstream.go)
	transport *http.Transport
	via       *via        // refuses loops, and stamps what is forwarded
	direct    retryBudget // retry budget of calls to an explicit address

	nextID atomic.Uint64 // JSON-RPC id of the next call

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
		transport: newBackendTransport(cfg, clientTLS),
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
	h.transport.CloseIdleConnections()
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
	ct, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	var f rpcForm
	var request string
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
		request = get("request")
	case (ct == "application/x-www-form-urlencoded" || ct == "") && (len(trimmed) == 0 || trimmed[0] != '{'):
		// A body that opens with "{" is JSON whatever the type: curl -d
		// labels everything a form, and no form starts with "{".
		vals, err := url.ParseQuery(string(body))
		if err != nil {
			return rpcCall{}, errorf(http.StatusBadRequest, "rpc: invalid form body: %v", err)
		}
		f = rpcForm{Service: vals.Get("service"), Method: vals.Get("method"), Endpoint: vals.Get("endpoint"), Address: vals.Get("address")}
		request = vals.Get("request")
	default:
		if err := decodeJSON(body, &f); err != nil {
			return rpcCall{}, err
		}
		if len(f.Request) > 0 && f.Request[0] == '"' {
			if err := json.Unmarshal(f.Request, &request); err != nil {
				return rpcCall{}, errorf(http.StatusBadRequest, `rpc: field "request": %v`, err)
			}
		} else if len(f.Request) > 0 && string(f.Request) != "null" {
			request = string(f.Request)
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
func requestJSON(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if s == "" || s == "null" {
		return []byte("{}"), nil
	}
	if !json.Valid([]byte(s)) {
		return nil, errorf(http.StatusBadRequest, `rpc: field "request" is not valid JSON`)
	}
	return []byte(s), nil
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
		if c.request, err = requestJSON(string(body)); err != nil {
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
	result     []byte    // the JSON-RPC result, verbatim, when code is 200
	err        *apiError // the error for the caller otherwise
	nodeFailed bool      // counts against the node for ejection
	retry      bool      // safe to retry: nothing reached the app
}

// call forwards c and writes the answer: the backend's result verbatim, or
// a JSON error. Retries go to another node where one exists.
func (h *rpcHandler) call(w http.ResponseWriter, r *http.Request, c rpcCall) {
	timeout, lowered, err := requestTimeout(r.Header, h.cfg.ClientRequestTimeout)
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	start := time.Now()
	deadline := start.Add(timeout)
	ctx, cancel := context.WithDeadline(r.Context(), deadline)
	defer cancel()

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

	id := h.nextID.Add(1)
	idText := strconv.FormatUint(id, 10)
	header := backendHeader(r.Header, h.cfg.AuthToken != "")
	header["Micro-Service"] = []string{c.service}
	header["Micro-Endpoint"] = []string{c.method}
	header["Micro-Id"] = []string{idText}
	header["Via"] = h.via.appendTo(r.Header["Via"], r)
	body := jsonRPCBody(c.method, c.request, idText)

	var triedBuf [4]*nodeState
	tried := triedBuf[:0] // nodes this call failed on: retries go elsewhere
	var res attempt
	for try := 0; ; try++ {
		target := "http://" + c.address + "/"
		t0 := time.Now()
		var n *nodeState
		if st != nil {
			if n = h.bal.pick(st, tried, t0); n == nil {
				res = attempt{code: http.StatusServiceUnavailable, err: h.apiErr(http.StatusServiceUnavailable, "rpc: service %q has no nodes", c.service)}
				break
			}
			target = n.url
		}
		res = h.try(ctx, target, header, body, c, idText, deadline)
		if res.code == http.StatusGatewayTimeout && (lowered || r.Context().Err() != nil) {
			res.nodeFailed = false // the caller's own short deadline, or its leaving, says nothing of the node
		}
		if n != nil {
			h.bal.done(n, t0, time.Since(t0), !res.nodeFailed)
		}
		if res.nodeFailed {
			h.log.Debug("attempt failed", "service", c.service, "node", target, "try", try, "code", res.code)
		}
		if !res.retry || try >= h.cfg.ClientRetries {
			break
		}
		wait := retryBackoff(try)
		if time.Now().Add(wait).After(deadline) {
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
	if res.code != http.StatusOK && ctx.Err() != nil && (res.err == nil || res.retry) {
		// The time ran out in an attempt or while waiting to retry.
		res = h.expired(ctx, r, c, timeout)
	}
	if st != nil {
		st.up.record(res.code, time.Since(start)) // the call's one count, before its answer goes out
	}
	if res.code != http.StatusOK {
		writeJSON(w, res.code, res.err)
		return
	}
	hd := w.Header()
	hd.Set("Content-Type", "application/json")
	hd.Set("Content-Length", strconv.Itoa(len(res.result)))
	hd.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	w.Write(res.result)
}

// expired is the answer once the call's context has ended: 504 when its
// time ran out, otherwise the caller has gone and the answer is moot.
func (h *rpcHandler) expired(ctx context.Context, r *http.Request, c rpcCall, timeout time.Duration) attempt {
	if r.Context().Err() != nil {
		// Nobody reads this answer; 499 is what access logs call it.
		return attempt{code: statusClientClosed, err: &apiError{ID: errorID, Code: statusClientClosed, Detail: "rpc: caller went away", Status: "Client Closed Request"}}
	}
	return attempt{code: http.StatusGatewayTimeout, err: h.apiErr(http.StatusGatewayTimeout, "rpc: call %s %s: no reply within %s", c.service, c.method, timeout)}
}

func (h *rpcHandler) apiErr(code int, format string, args ...any) *apiError {
	return &apiError{ID: errorID, Code: code, Detail: fmt.Sprintf(format, args...), Status: http.StatusText(code)}
}

// jsonRPCBody is {"jsonrpc":"2.0","method":M,"params":[request],"id":N}:
// a JSON-RPC 2.0 request, which 2.0 servers refuse without the "jsonrpc"
// member, and still the 1.0 request go-micro and net/rpc/jsonrpc servers
// read, since they ignore members they do not know. params stays a
// one-element array, as 1.0 servers want it.
func jsonRPCBody(method string, request []byte, id string) []byte {
	m, _ := json.Marshal(method) // a string: cannot fail
	b := make([]byte, 0, len(m)+len(request)+len(id)+48)
	b = append(b, `{"jsonrpc":"2.0","method":`...)
	b = append(b, m...)
	b = append(b, `,"params":[`...)
	b = append(b, request...)
	b = append(b, `],"id":`...)
	b = append(b, id...)
	return append(b, '}')
}

// backendHeader is the caller's header for a backend call: without
// hop-by-hop headers, the body framing the transport sets itself,
// Accept-Encoding (the transport negotiates compression itself), and the
// caller's Authorization when it was the sidecar's own token. A W3C
// traceparent is passed through or started. The value slices are shared
// with in, which is not modified.
func backendHeader(in http.Header, dropAuth bool) http.Header {
	out := make(http.Header, len(in)+6)
	for k, v := range in {
		out[k] = v
	}
	removeHopByHop(out)
	for _, k := range []string{"Content-Length", "Content-Type", "Accept-Encoding", "Expect", "Timeout"} {
		delete(out, k)
	}
	if dropAuth {
		delete(out, "Authorization")
	}
	out["Content-Type"] = []string{"application/json"}
	ensureTraceparent(out)
	return out
}

// rpcReply is a JSON-RPC reply in either style: 1.0, {"id","result",
// "error"} with error null or a string; or 2.0, {"jsonrpc":"2.0","id"}
// with "result" or an "error" object. An absent member stays nil, a null
// one holds "null". An error that is not null wins over a result (a 2.0
// server must not send both; a 1.0 one sends result null with an error).
type rpcReply struct {
	ID     json.RawMessage `json:"id"`
	Result json.RawMessage `json:"result"`
	Error  json.RawMessage `json:"error"`
}

// idAnswers reports whether a reply's id answers the request id sent (an
// integer): the same integer, or the same digits as a string. An absent or
// null id is accepted: a 2.0 server answers null when it could not read
// the request's id, some 1.0 servers do not echo it, and HTTP pairs the
// reply with its request anyway.
func idAnswers(got json.RawMessage, sent string) bool {
	s := string(got)
	return s == "" || s == "null" || s == sent || s == `"`+sent+`"`
}

// try sends one attempt of c, whose JSON-RPC id is id, to target and
// classifies the outcome.
func (h *rpcHandler) try(ctx context.Context, target string, header http.Header, body []byte, c rpcCall, id string, deadline time.Time) attempt {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target, bytes.NewReader(body))
	if err != nil {
		return attempt{code: http.StatusBadGateway, err: h.apiErr(http.StatusBadGateway, "rpc: call %s: %v", c.service, err)}
	}
	req.Header = header
	header["Timeout"] = []string{strconv.FormatInt(int64(time.Until(deadline)), 10)}
	resp, err := h.transport.RoundTrip(req)
	if err != nil {
		if ctx.Err() != nil {
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
				err: h.apiErr(http.StatusGatewayTimeout, "rpc: call %s on %s: %v", c.service, req.URL.Host, err)}
		}
		return attempt{code: http.StatusBadGateway, nodeFailed: true,
			err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: %v", c.service, req.URL.Host, err)}
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxReplyBytes+1))
	if err != nil {
		if ctx.Err() != nil {
			return attempt{code: http.StatusGatewayTimeout, nodeFailed: true}
		}
		return attempt{code: http.StatusBadGateway, nodeFailed: true,
			err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: read reply: %v", c.service, req.URL.Host, err)}
	}
	if len(raw) > maxReplyBytes {
		return attempt{code: http.StatusBadGateway, nodeFailed: true,
			err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: reply exceeds %d bytes", c.service, req.URL.Host, maxReplyBytes)}
	}
	failed := resp.StatusCode >= 500
	retry := resp.StatusCode == http.StatusServiceUnavailable
	var rep rpcReply
	if err := json.Unmarshal(raw, &rep); err != nil || (rep.Result == nil && rep.Error == nil) {
		code := http.StatusBadGateway
		if retry {
			code = http.StatusServiceUnavailable
		}
		if resp.StatusCode == http.StatusLoopDetected {
			// A sidecar refused the call as a loop (this one, when the
			// node is its own address): the caller gets the 508.
			var e apiError
			if json.Unmarshal(raw, &e) != nil || e.Detail == "" {
				e.Detail = snippet(raw)
			}
			return attempt{code: http.StatusLoopDetected, nodeFailed: true,
				err: h.apiErr(http.StatusLoopDetected, "rpc: call %s on %s: %s", c.service, req.URL.Host, e.Detail)}
		}
		detail := fmt.Sprintf("rpc: call %s on %s: not a JSON-RPC reply (HTTP %d): %.200q", c.service, req.URL.Host, resp.StatusCode, raw)
		return attempt{code: code, nodeFailed: failed || resp.StatusCode < 300, retry: retry, err: h.apiErr(code, "%s", detail)}
	}
	if !idAnswers(rep.ID, id) {
		// Not the answer to this call: the node, or something between, is
		// confused, and its result cannot be trusted to be this call's.
		return attempt{code: http.StatusBadGateway, nodeFailed: true,
			err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: reply id %.64s does not answer request id %s", c.service, req.URL.Host, rep.ID, id)}
	}
	if len(rep.Error) > 0 && string(rep.Error) != "null" {
		a := appError(c.service, rep.Error)
		return attempt{code: a.Code, err: a, nodeFailed: failed, retry: retry}
	}
	result := []byte(rep.Result)
	if len(result) == 0 {
		result = []byte("null")
	}
	if retry || failed {
		// A result with a 5xx status: the node answered, but says it failed.
		return attempt{code: http.StatusBadGateway, nodeFailed: true, retry: retry,
			err: h.apiErr(http.StatusBadGateway, "rpc: call %s on %s: HTTP %d", c.service, req.URL.Host, resp.StatusCode)}
	}
	return attempt{code: http.StatusOK, result: result}
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
