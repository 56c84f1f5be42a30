package main

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// client.go is how the sidecar calls other HTTP servers: the transport to
// backends, the budget of a call (the caller's Timeout header), retry
// pacing and backoff, the trace context passed on, the hop-by-hop header
// policy, and the one way to call a JSON API (callJSON) that the registry
// backends, the peer broker and the CLI share.

// Limits and pacing of calls to backends (service nodes).
const (
	retryBackoffBase  = 10 * time.Millisecond
	retryBackoffMax   = time.Second
	maxDialTimeout    = 5 * time.Second
	idleConnsPerHost  = 256 // the default of 2 makes a busy proxy dial on almost every call
	maxIdleConns      = 4096
	backendHeaderSize = 64 << 10
)

// newBackendTransport is the HTTP transport to service nodes that the RPC
// handler and the reverse proxy each own: direct (whatever HTTP_PROXY
// says), bounded dial and header times, many idle connections per node, and
// clientTLS for nodes called over https.
func newBackendTransport(cfg *Config, clientTLS *tls.Config) *http.Transport {
	dialer := &net.Dialer{Timeout: min(cfg.ClientRequestTimeout, maxDialTimeout), KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy:                  nil, // backends are reached directly, whatever HTTP_PROXY says
		DialContext:            dialer.DialContext,
		MaxIdleConns:           maxIdleConns,
		MaxIdleConnsPerHost:    idleConnsPerHost,
		IdleConnTimeout:        90 * time.Second,
		ResponseHeaderTimeout:  cfg.ClientRequestTimeout + time.Second, // a safety net: each call's deadline ends first
		MaxResponseHeaderBytes: backendHeaderSize,
		TLSClientConfig:        clientTLS,
		TLSHandshakeTimeout:    min(cfg.ClientRequestTimeout, maxDialTimeout),
	}
}

// dialError says once what a failed dial to a node means: "connect to
// 127.0.0.1:1: connection refused". The *net.OpError's own text is "dial
// tcp 127.0.0.1:1: connect: connection refused", and its inner error
// after a "connect" prefix said connect twice. The cause stays wrapped:
// errors.Is(err, syscall.ECONNREFUSED) holds.
func dialError(op *net.OpError) error {
	cause := op.Err
	var se *os.SyscallError
	if errors.As(cause, &se) {
		cause = se.Err
	}
	if op.Addr == nil { // the name did not resolve: the DNS error names it
		return fmt.Errorf("connect: %w", cause)
	}
	return fmt.Errorf("connect to %s: %w", op.Addr, cause)
}

// requestTimeout is the budget of a call: def, or less when the caller's
// Timeout header asks for less (lowered is then true).
func requestTimeout(h http.Header, def time.Duration) (timeout time.Duration, lowered bool, err error) {
	v := h.Get("Timeout")
	if v == "" {
		return def, false, nil
	}
	d, err := parseTimeout(v)
	if err != nil {
		return 0, false, err
	}
	if d < def {
		return d, true, nil
	}
	return def, false, nil
}

// parseTimeout reads the Timeout header: a Go duration (250ms) or integer
// nanoseconds, as go-micro clients send.
func parseTimeout(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if n, nerr := strconv.ParseInt(v, 10, 64); nerr == nil {
		d, err = time.Duration(n), nil
	}
	if err != nil || d <= 0 {
		return 0, errorf(http.StatusBadRequest, "header Timeout %q is not a positive duration such as 250ms or integer nanoseconds", v)
	}
	return d, nil
}

// retryBackoff is the jittered wait before retry number try+1, of an
// exponentially growing step.
func retryBackoff(try int) time.Duration {
	return jitter(min(retryBackoffBase<<min(try, 10), retryBackoffMax))
}

// jitter returns a random duration in [d/2, d], so clients that failed
// together do not retry together.
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

// sleepCtx waits d or until ctx ends, reporting whether d passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// backoff is a jittered exponential backoff: each delay is drawn from
// [d/2, d) where d doubles from min up to max. Not safe for concurrent use.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max} }

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else if b.cur *= 2; b.cur > b.max {
		b.cur = b.max
	}
	return jitter(b.cur)
}

func (b *backoff) reset() { b.cur = 0 }

// snippet is the start of a response body for error messages.
func snippet(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// traceToStart reports whether a request with header h starts a new trace
// rather than passing its traceparent on: it has none, several, or one
// that is not valid (ensureTraceparent's rule, for the writers that send
// the header without changing it).
func traceToStart(h http.Header) bool {
	v := h["Traceparent"]
	return len(v) != 1 || !validTraceparent(v[0])
}

// ensureTraceparent keeps a valid W3C traceparent in h or starts a new
// trace (version 00, random trace and span ids, sampled). A tracestate
// without a valid traceparent is meaningless and is dropped.
func ensureTraceparent(h http.Header) {
	if v := h.Values("Traceparent"); len(v) == 1 && validTraceparent(v[0]) {
		return
	}
	var b [55]byte
	h.Set("Traceparent", string(appendTraceparent(b[:0])))
	h.Del("Tracestate")
}

// appendTraceparent appends the traceparent of a new trace: version 00,
// random trace and span ids, sampled.
func appendTraceparent(dst []byte) []byte {
	var raw [24]byte
	for i := 0; i < len(raw); i += 8 {
		u := rand.Uint64() | 1 // never all zeros, which is invalid
		for j := range 8 {
			raw[i+j] = byte(u >> (8 * j))
		}
	}
	var b [55]byte
	copy(b[:], "00-")
	hex.Encode(b[3:35], raw[:16])
	b[35] = '-'
	hex.Encode(b[36:52], raw[16:])
	copy(b[52:], "-01")
	return append(dst, b[:]...)
}

// validTraceparent checks the W3C Trace Context header: version-traceid-
// parentid-flags in lower-case hex, ids not all zero, version not ff; a
// future version may append fields after a dash.
func validTraceparent(s string) bool {
	if len(s) < 55 || (len(s) > 55 && (s[:2] == "00" || s[55] != '-')) {
		return false
	}
	if s[2] != '-' || s[35] != '-' || s[52] != '-' || s[:2] == "ff" {
		return false
	}
	return isLowerHex(s[:2]) && isLowerHex(s[3:35]) && isLowerHex(s[36:52]) && isLowerHex(s[53:55]) &&
		strings.Trim(s[3:35], "0") != "" && strings.Trim(s[36:52], "0") != ""
}

func isLowerHex(p string) bool {
	for i := 0; i < len(p); i++ {
		if c := p[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// statusError is a non-2xx answer of another HTTP server: a registry
// backend, another sidecar, or the sidecar the CLI talks to.
type statusError struct {
	code   int    // the HTTP status
	detail string // the "detail" of a JSON error (a sidecar's errors), else the start of the body
	body   []byte // the body as read, within the call's limit
}

func (e *statusError) Error() string { return fmt.Sprintf("status %d: %s", e.code, e.detail) }

// errResponseTooLarge is a 2xx answer longer than the call's limit.
var errResponseTooLarge = errors.New("response too large")

// newJSONRequest builds a request to url whose body is v encoded as JSON,
// with its Content-Type; a nil v sends no body.
func newJSONRequest(ctx context.Context, method, url string, v any) (*http.Request, error) {
	var body io.Reader
	if v != nil {
		b, err := json.Marshal(v)
		if err != nil {
			return nil, fmt.Errorf("encode: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return nil, err
	}
	if v != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	return req, nil
}

// callJSON is how the sidecar calls a JSON HTTP API: it sends req with
// client and reads at most limit bytes of the answer. Any status but 2xx
// is a *statusError, whatever the body's size; a 2xx answer over the limit
// is errResponseTooLarge; a 2xx answer is decoded into out unless out is
// nil. It returns the response (its body read and closed; nil when
// nothing was received) and the bytes read. Sending's failure is
// client.Do's error as is (a *url.Error naming the method and URL), so
// callers can tell a refused connection or a timeout; the other errors do
// not name the request, callers prefix their own. Callers set the deadline
// on req's context and decide which failures are worth retrying.
func callJSON(client *http.Client, req *http.Request, limit int64, out any) (*http.Response, []byte, error) {
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return resp, nil, fmt.Errorf("read: %w", err)
	}
	tooLarge := int64(len(data)) > limit
	if tooLarge {
		data = data[:limit]
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		se := &statusError{code: resp.StatusCode, detail: snippet(data), body: data}
		var e apiError
		if json.Unmarshal(data, &e) == nil && e.Detail != "" {
			se.detail = e.Detail
		}
		return resp, data, se
	}
	if tooLarge {
		return resp, nil, fmt.Errorf("%w: exceeds %d bytes", errResponseTooLarge, limit)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return resp, data, fmt.Errorf("bad JSON: %w", err)
		}
	}
	return resp, data, nil
}

// httpBaseURL parses addr as host:port or an http(s) URL without a path.
func httpBaseURL(addr string) (*url.URL, error) {
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil {
		return nil, err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("scheme %q is not http or https", u.Scheme)
	}
	if u.Host == "" {
		return nil, errors.New("no host")
	}
	if u.Path != "" && u.Path != "/" || u.RawQuery != "" {
		return nil, errors.New("want host:port or scheme://host:port, without a path")
	}
	u.Path = ""
	return u, nil
}

// The hop-by-hop policy. A field that describes one connection rather than
// the message must not cross to the next one (RFC 9110 section 7.6.1):
// every place where the sidecar passes a caller's fields on to another
// server, or a server's fields back to a caller, applies this one rule.
// RPC (backendHeader) and the broker (messageHeader, fields that become a
// message's headers) strip a copied http.Header with removeHopByHop; the
// proxy's own HTTP/1.1 client asks hopByHop field by field as it writes a
// request (writeRequestHead) and copies a response (backendConn.header),
// so its hot path copies and allocates nothing for the rule. Upgrade
// requests (websockets) go through httputil.ReverseProxy, which applies the
// same rule and then sets Connection: Upgrade and Upgrade itself. It lives
// here because it is part of how the sidecar talks to other HTTP servers.

// hopByHop reports whether the field named k (in canonical form, as the
// keys of an http.Header are) is hop-by-hop in a message whose Connection
// field values are conn: one of the fields RFC 9110 section 7.6.1 names
// (with Proxy-Connection and Keep-Alive, which proxies have used), or one
// that a Connection option names. It does not allocate.
func hopByHop(k string, conn []string) bool {
	switch k {
	case "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
		"Te", "Trailer", "Transfer-Encoding", "Upgrade":
		return true
	}
	return len(conn) > 0 && hasToken(conn, k)
}

// removeHopByHop deletes from h every field hopByHop names, those its
// Connection field lists included.
func removeHopByHop(h http.Header) {
	conn := h["Connection"]
	for k := range h {
		if hopByHop(k, conn) {
			delete(h, k)
		}
	}
}

// hasToken reports whether the comma-separated lists in values (the lines
// of one field, as http.Header holds them) hold token, compared
// case-insensitively (RFC 9110 section 5.6.1), without allocating.
func hasToken(values []string, token string) bool {
	for _, v := range values {
		if listHasToken(v, token) {
			return true
		}
	}
	return false
}

// listHasToken reports whether the comma-separated list v holds token,
// compared ASCII case-insensitively, around optional whitespace. v is a
// field value as a string, or as the bytes the proxy's response parser
// holds (proxy_conn.go), which a conversion would copy.
func listHasToken[S string | []byte](v S, token string) bool {
	for len(v) > 0 {
		i := 0
		for i < len(v) && v[i] != ',' {
			i++
		}
		if asciiEqualFold(trimOWS(v[:i]), token) {
			return true
		}
		if i == len(v) {
			break
		}
		v = v[i+1:]
	}
	return false
}

// trimOWS trims the optional whitespace (spaces and tabs) of RFC 9110
// section 5.6.3 around b.
func trimOWS[S string | []byte](b S) S {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}

// asciiEqualFold compares b with the ASCII string s case-insensitively.
func asciiEqualFold[S string | []byte](b S, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range len(b) {
		x, y := b[i], s[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// Loop detection (RFC 9110 section 7.6.3). Every request the sidecar
// forwards (the proxy's, websocket upgrades included, and RPC's) carries
// the sidecar in Via as "1.1 sidecar-<id>" (the received protocol, then a
// pseudonym with an id drawn at random per server), appended after the
// Via the caller sent. A request whose Via already names this sidecar went
// round a loop: a node registered at the sidecar's own address (directly,
// or behind a load balancer or NAT the registry cannot see through), or
// sidecars that name each other. A request that already passed through
// maxSidecarHops sidecars is in a loop of other sidecars, or a chain too
// long to be meant. Either is refused with a JSON 508 before anything is
// looked up or sent, so a loop costs one forwarded request, not thousands.
// The RPC and proxy handlers share the server's via; the CLI is a client
// of a sidecar and needs none.

const (
	// maxSidecarHops is the most sidecars that may forward one request:
	// one whose Via lists this many already is refused.
	maxSidecarHops = 8
	viaPrefix      = "sidecar-" // a sidecar's pseudonym in Via: the prefix and 16 hex digits
	viaIDLen       = len(viaPrefix) + 16
)

// via is a server's place in the Via field: its pseudonym, the entries it
// appends, and the count of requests refused as loops. Read-only after
// newVia but for the counter; safe for concurrent use.
type via struct {
	id      string    // "sidecar-" and 16 hex digits
	entries [3]string // "1.0 <id>", "1.1 <id>", "2 <id>": appended without allocating
	refused atomic.Int64
}

// newVia draws a new pseudonym.
func newVia() *via {
	var b [8]byte
	crand.Read(b[:]) // never fails (crypto/rand)
	v := &via{id: viaPrefix + hex.EncodeToString(b[:])}
	v.entries = [3]string{"1.0 " + v.id, "1.1 " + v.id, "2 " + v.id}
	return v
}

// entry is the Via entry this sidecar appends to a request it received as
// r: the protocol version it was received with, then the pseudonym.
func (v *via) entry(r *http.Request) string {
	switch {
	case r.ProtoMajor == 1 && r.ProtoMinor == 0:
		return v.entries[0]
	case r.ProtoMajor == 2:
		return v.entries[2]
	}
	return v.entries[1]
}

// appendTo returns the Via field values of a forwarded request: the
// caller's values then this sidecar's entry, in a new slice (values may be
// shared with the caller's header).
func (v *via) appendTo(values []string, r *http.Request) []string {
	return append(values[:len(values):len(values)], v.entry(r))
}

// check returns the reason to refuse a request with Via field values
// values as a loop (the caller answers 508), or nil. It does not allocate
// when the request is let through.
func (v *via) check(values []string) error {
	hops := 0
	for _, line := range values {
		for rest := line; rest != ""; {
			var elem string
			elem, rest = nextViaEntry(rest)
			by := viaReceivedBy(elem)
			if by == v.id {
				v.refused.Add(1)
				return fmt.Errorf("loop detected: the request already passed through this sidecar (%s in Via); is a node registered at the sidecar's own address, or do sidecars forward to each other?", v.id)
			}
			if isSidecarID(by) {
				hops++
			}
		}
	}
	if hops >= maxSidecarHops {
		v.refused.Add(1)
		return fmt.Errorf("loop detected: the request already passed through %d sidecars (Via); at most %d may forward one request", hops, maxSidecarHops)
	}
	return nil
}

// nextViaEntry splits the first entry off a Via field value: up to a comma
// outside a comment (comments, in parentheses, may hold commas and nest;
// a backslash quotes the next byte in them).
func nextViaEntry(s string) (entry, rest string) {
	depth := 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\' && depth > 0:
			i++
		case c == '(':
			depth++
		case c == ')' && depth > 0:
			depth--
		case c == ',' && depth == 0:
			return s[:i], s[i+1:]
		}
	}
	return s, ""
}

// viaReceivedBy is the received-by part of one Via entry
// ("[protocol-name/]version received-by [comment]"), or "".
func viaReceivedBy(entry string) string {
	entry = trimOWS(entry)
	i := strings.IndexAny(entry, " \t")
	if i < 0 {
		return ""
	}
	by := trimOWS(entry[i:])
	if j := strings.IndexAny(by, " \t("); j >= 0 {
		by = by[:j]
	}
	return by
}

// isSidecarID reports whether a Via received-by is a sidecar's pseudonym.
func isSidecarID(by string) bool {
	return len(by) == viaIDLen && strings.HasPrefix(by, viaPrefix) && isLowerHex(by[len(viaPrefix):])
}

// metrics emits the count of requests refused as loops.
func (v *via) metrics(emit emitFunc) {
	emit("sidecar_loops_refused_total", "Requests refused with 508 Loop Detected: their Via named this sidecar or too many sidecars.", "counter", float64(v.refused.Load()))
}
