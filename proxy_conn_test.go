package main

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httputil"
	"reflect"
	"strings"
	"testing"
)

// errReadPastBound is what boundedReader returns once the parser asks for
// more than it may read.
var errReadPastBound = errors.New("test: read past the bound")

// boundedReader serves data, then (if endless) tail over and over, and
// fails any read past max bytes in all: a parser that keeps reading past
// its limit is caught at once instead of hanging.
type boundedReader struct {
	data    []byte
	tail    []byte // repeated after data when non-empty: a source that never ends
	max     int
	n       int  // bytes returned
	overrun bool // a read asked for more than max
}

func (r *boundedReader) Read(p []byte) (int, error) {
	if r.n >= len(r.data) && len(r.tail) == 0 {
		return 0, io.EOF
	}
	if r.n >= r.max {
		r.overrun = true
		return 0, errReadPastBound
	}
	p = p[:min(len(p), r.max-r.n)]
	n := 0
	if r.n < len(r.data) {
		n = copy(p, r.data[r.n:])
	}
	for n < len(p) && len(r.tail) > 0 {
		n += copy(p[n:], r.tail[(r.n+n-len(r.data))%len(r.tail):])
	}
	r.n += n
	return n, nil
}

// headResult is everything readResponseHead (and, for a chunked body,
// readTrailer) made of one response.
type headResult struct {
	h        respHead
	started  bool
	err      error
	head     string      // c.head: the fields' names and values
	fields   []hdrField  // c.fields
	header   http.Header // c.header's output
	consumed int         // bytes of the source the head took
	trailer  http.Header // readTrailer's output, for a chunked body read to its end
	bodyErr  error       // reading the chunked body and its trailer
}

// parseBackendResponse parses resp as a node's response through a
// backendConn with a bufSize read buffer, as the forwarder does. With tail,
// the source goes on with tail forever.
func parseBackendResponse(t *testing.T, resp []byte, limit, bufSize int, tail string) headResult {
	t.Helper()
	// readLine may gather a line up to limit plus one buffer, and the
	// buffer may hold one more buffer's worth read ahead.
	src := &boundedReader{data: resp, tail: []byte(tail), max: limit + 2*bufSize}
	c := &backendConn{br: bufio.NewReaderSize(src, bufSize)}
	var r headResult
	r.h, r.started, r.err = c.readResponseHead(limit)
	if src.overrun {
		t.Fatalf("readResponseHead(limit %d, buffer %d) read more than %d bytes of %q", limit, bufSize, src.max, resp)
	}
	r.head, r.fields = string(c.head), append([]hdrField(nil), c.fields...)
	if r.err != nil {
		return r
	}
	r.consumed = src.n - c.br.Buffered()
	src.max = math.MaxInt // the body may be read to its end
	r.header = http.Header{}
	c.header(r.header, r.h.chunked)
	if r.h.chunked && tail == "" {
		_, r.bodyErr = io.Copy(io.Discard, httputil.NewChunkedReader(c.br))
		if r.bodyErr == nil {
			r.trailer = http.Header{}
			r.bodyErr = c.readTrailer(r.trailer, limit)
		}
	}
	return r
}

// FuzzReadResponseHead feeds arbitrary bytes to the proxy's HTTP/1.1
// response parser as a node's response and checks that it does not panic,
// reads no more than its limit allows (so an endless response cannot hang
// it), gives the same answer whatever its buffer size, passes on no field
// net/http would refuse (in the head or the trailer), and accepts no head
// that net/http's ReadResponse refuses, agreeing with it on the status,
// the Content-Length, chunked framing, keep-alive and the end-to-end
// fields. The parser is stricter than net/http in places (obs-fold, a
// space before the colon, an HTTP/1.0 response with Transfer-Encoding);
// the one head it accepts that net/http refuses is harmless and named in
// agreeWithNetHTTP.
func FuzzReadResponseHead(f *testing.F) {
	f.Add([]byte("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"), uint32(backendHeaderSize))
	f.Fuzz(func(t *testing.T, resp []byte, limit32 uint32) {
		limit := int(limit32 % (backendHeaderSize + 1))
		small := parseBackendResponse(t, resp, limit, 16, "")
		big := parseBackendResponse(t, resp, limit, connBufferSize, "")
		// Errors compare by their text; a failed chunked body by failing.
		a, b := small, big
		if a.err != nil && b.err != nil && a.err.Error() == b.err.Error() {
			a.err, b.err = nil, nil
		}
		if a.bodyErr != nil && b.bodyErr != nil {
			a.bodyErr, b.bodyErr = nil, nil
		}
		if !reflect.DeepEqual(a, b) {
			t.Fatalf("results differ with the buffer size:\n16: %+v\n%d: %+v", small, connBufferSize, big)
		}
		if big.started != (len(resp) > 0) {
			t.Fatalf("started = %v for %d bytes", big.started, len(resp))
		}
		for _, tail := range []string{"x", "X-Field: value\r\n"} {
			if r := parseBackendResponse(t, resp, limit, 16, tail); r.err == nil && r.consumed > limit {
				t.Fatalf("head of %d bytes accepted with limit %d", r.consumed, limit)
			}
		}
		if big.err != nil {
			return
		}
		if big.consumed > limit {
			t.Fatalf("head of %d bytes accepted with limit %d", big.consumed, limit)
		}
		checkFields(t, "header", big.header, "")
		if big.bodyErr == nil {
			checkFields(t, "trailer", big.trailer, http.TrailerPrefix)
		}
		agreeWithNetHTTP(t, resp, big)
	})
}

// checkFields fails if h holds a field that net/http would refuse to read:
// a name that is not a token, a value with a control character.
func checkFields(t *testing.T, what string, h http.Header, prefix string) {
	t.Helper()
	for k, vv := range h {
		name, ok := strings.CutPrefix(k, prefix)
		if !ok || name == "" || strings.IndexFunc(name, func(r rune) bool { return r > 0x7f || !isTokenByte(byte(r)) }) >= 0 {
			t.Fatalf("%s field name %q is not a token", what, k)
		}
		for _, v := range vv {
			if strings.IndexFunc(v, func(r rune) bool { return r < ' ' && r != '\t' || r == 0x7f }) >= 0 {
				t.Fatalf("%s field %s: value %q holds a control character", what, k, v)
			}
		}
	}
}

// agreeWithNetHTTP checks a head the parser accepted against net/http.
func agreeWithNetHTTP(t *testing.T, resp []byte, ours headResult) {
	t.Helper()
	theirs, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(resp)), nil)
	if err != nil && strings.Contains(err.Error(), "bad trailer key") {
		// A Trailer field that announces a framing field. The proxy
		// drops the Trailer field (hop-by-hop) and such trailer fields,
		// so the one difference in what is accepted is harmless.
		return
	}
	if err != nil {
		t.Fatalf("accepted a head net/http refuses (%v): %+v", err, ours.h)
	}
	h := ours.h
	if h.code != theirs.StatusCode {
		t.Fatalf("status %d, net/http %d", h.code, theirs.StatusCode)
	}
	if chunked := len(theirs.TransferEncoding) > 0; h.chunked != chunked {
		t.Fatalf("chunked %v, net/http %v", h.chunked, chunked)
	}
	bodyless := h.code/100 == 1 || h.code == http.StatusNoContent || h.code == http.StatusNotModified
	if !bodyless && h.length != theirs.ContentLength {
		t.Fatalf("length %d, net/http %d", h.length, theirs.ContentLength)
	}
	// The parser closes every HTTP/1.0 connection, and one whose response
	// had both framings; a body that ends with the connection closes it
	// anyway.
	unbounded := !bodyless && h.length < 0 && !h.chunked
	wantClose := theirs.Close
	for _, f := range ours.fields {
		wantClose = wantClose || h.chunked && asciiEqualFold([]byte(ours.head[f.k0:f.k1]), "Content-Length")
	}
	switch {
	case theirs.ProtoMinor == 0 && !h.close:
		t.Fatalf("an HTTP/1.0 response is not closed")
	case theirs.ProtoMinor > 0 && !unbounded && h.close != wantClose:
		t.Fatalf("close %v, want %v (net/http %v)", h.close, wantClose, theirs.Close)
	}
	// The end-to-end fields: neither hop-by-hop fields nor those the
	// Connection field names, which the proxy drops, nor the framing.
	skip := map[string]bool{"Content-Length": true}
	for _, k := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"} {
		skip[k] = true
	}
	for _, f := range ours.fields {
		if asciiEqualFold([]byte(ours.head[f.k0:f.k1]), "Connection") {
			for tok := range strings.SplitSeq(ours.head[f.k1:f.v1], ",") {
				skip[http.CanonicalHeaderKey(strings.Trim(tok, " \t"))] = true
			}
		}
	}
	if theirs.Header.Get("Pragma") == "no-cache" && ours.header.Get("Cache-Control") == "" {
		skip["Cache-Control"] = true // net/http adds it
	}
	for k, vv := range theirs.Header {
		if !skip[k] && !reflect.DeepEqual(vv, ours.header[k]) {
			t.Fatalf("field %s = %q, net/http %q", k, ours.header[k], vv)
		}
	}
	for k, vv := range ours.header {
		if !skip[k] && theirs.Header[k] == nil {
			t.Fatalf("field %s = %q, absent for net/http", k, vv)
		}
	}
}

// TestCommonHeaderKey: the shortcut names are what http.CanonicalHeaderKey
// makes of them.
func TestCommonHeaderKey(t *testing.T) {
	for _, name := range []string{"Content-Type", "content-type", "Content-Length", "content-length", "Date", "date", "Server", "server",
		"Cache-Control", "cache-control", "Etag", "ETag", "etag", "Last-Modified", "last-modified", "Vary", "vary",
		"Content-Encoding", "content-encoding", "Set-Cookie", "set-cookie", "Location", "location", "Expires", "expires"} {
		if got, want := commonHeaderKey([]byte(name)), http.CanonicalHeaderKey(name); got != want {
			t.Errorf("commonHeaderKey(%q) = %q, want %q", name, got, want)
		}
	}
	if got := commonHeaderKey([]byte("X-Other")); got != "" {
		t.Errorf(`commonHeaderKey("X-Other") = %q, want ""`, got)
	}
}

// TestIsTokenByte: the token characters of RFC 9110 section 5.6.2, and no
// other byte.
func TestIsTokenByte(t *testing.T) {
	for b := 0; b < 256; b++ {
		want := b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", byte(b)) >= 0
		if got := isTokenByte(byte(b)); got != want {
			t.Errorf("isTokenByte(%q) = %v, want %v", b, got, want)
		}
	}
}
