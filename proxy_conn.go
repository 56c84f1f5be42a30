package main

// proxy_conn.go owns the reverse proxy's HTTP/1.1 client for ordinary
// (non-upgrade) requests: a pool of idle keep-alive connections per node,
// the request written straight from the caller's request, and the response
// head parsed into reused buffers. Everything runs on the handler's
// goroutine: no per-connection goroutines, no channel handoffs, and no
// allocation per request beyond the response header strings. proxy.go
// decides what to send where and what to do with the answer.
//
// The response parser (readResponseHead, readLine, parseField,
// parseLength, readTrailer, header) is written by hand. It is stricter
// than net/http's ReadResponse and never accepts a head that net/http
// refuses, but for one harmless case; FuzzReadResponseHead checks that,
// and that no read goes past the limit.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	connBufferSize  = 4 << 10          // read and write buffer of one backend connection
	poolIdleTimeout = 90 * time.Second // an idle backend connection is closed after this long
	staleCheckAfter = time.Second      // a connection idle longer is probed before a request that cannot be replayed
	staleProbeWait  = time.Millisecond // how long a probe waits to see the connection is still open
	maxInterim      = 5                // 1xx responses skipped before the final one
	maxConnPools    = 4096             // pools kept; beyond, empty pools are dropped
)

// Failures of a backend exchange that are not the network's own errors.
var (
	errHeaderTooLarge = errors.New("response header larger than the limit")
	errMalformed      = errors.New("malformed response")
	aLongTimeAgo      = time.Unix(1, 0) // a deadline in the past: ends blocked reads and writes
)

// connPools is the proxy's set of pools, one per node URL (scheme and
// address). Safe for concurrent use; close closes every idle connection,
// makes later returns close theirs, and waits for a sweep in progress.
type connPools struct {
	dialer     *net.Dialer
	tls        *tls.Config   // base configuration of https nodes
	staleAfter time.Duration // idle time after which a connection is probed; staleCheckAfter
	dials      atomic.Int64
	closed     atomic.Bool
	sweeps     sync.WaitGroup // sweepIdle calls of open pools; Add under the pool's mu

	mu    sync.Mutex // serialises creation and pruning of pools
	pools sync.Map   // node URL -> *connPool
	n     int        // pools in the map; guarded by mu
	spare sync.Pool  // *backendConn with buffers, from closed connections
}

func newConnPools(cfg *Config, clientTLS *tls.Config) *connPools {
	if clientTLS == nil {
		clientTLS = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return &connPools{
		dialer:     &net.Dialer{Timeout: min(cfg.ClientRequestTimeout, maxDialTimeout), KeepAlive: 30 * time.Second},
		tls:        clientTLS,
		staleAfter: staleCheckAfter,
	}
}

// pool returns the pool of the node at url ("http://host:port/" or https).
func (cp *connPools) pool(url, addr string) *connPool {
	if v, ok := cp.pools.Load(url); ok {
		return v.(*connPool)
	}
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if v, ok := cp.pools.Load(url); ok {
		return v.(*connPool)
	}
	if cp.n >= maxConnPools {
		cp.pools.Range(func(k, v any) bool {
			if v.(*connPool).retireIfEmpty() {
				cp.pools.Delete(k)
				cp.n--
			}
			return true
		})
	}
	p := &connPool{owner: cp, addr: addr}
	if strings.HasPrefix(url, "https:") {
		c := cp.tls.Clone()
		if c.ServerName == "" {
			host, _, err := net.SplitHostPort(addr)
			if err != nil {
				host = addr
			}
			c.ServerName = host
		}
		c.NextProtos = []string{"http/1.1"} // this client speaks HTTP/1.1 only
		p.tls = c
	}
	cp.pools.Store(url, p)
	cp.n++
	if cp.closed.Load() {
		p.close()
	}
	return p
}

// close closes every pool's idle connections and waits for the sweeps
// that run. Idempotent.
func (cp *connPools) close() {
	cp.closed.Store(true)
	cp.pools.Range(func(_, v any) bool {
		v.(*connPool).close()
		return true
	})
	cp.sweeps.Wait() // no sweep begins on a closed pool
}

// connPool holds the idle connections of one node, newest last. A sweep
// timer, armed while any connection is idle, closes those idle for longer
// than poolIdleTimeout.
type connPool struct {
	owner *connPools
	addr  string
	tls   *tls.Config // nil: plain TCP

	mu     sync.Mutex // guards the fields below; no I/O while held
	idle   []*backendConn
	closed bool
	sweep  *time.Timer
	armed  bool // sweep is pending
}

// backendConn is one connection to a node with its buffers and the scratch
// space of response parsing, all reused from request to request.
type backendConn struct {
	net.Conn
	pool      *connPool
	br        *bufio.Reader
	bw        *bufio.Writer
	idleSince time.Time
	reused    bool   // served a request before this one
	peek      peeker // tells whether the node closed the connection while idle

	head   []byte     // the response head being parsed: field names and values
	fields []hdrField // offsets of each field in head
}

// hdrField is one response header field: head[k0:k1] is its name,
// head[k1:v1] its value.
type hdrField struct{ k0, k1, v1 int32 }

// get returns an idle connection, or nil when there is none. When probe
// is set (the request cannot be sent again should the node have closed
// the connection), a connection is first checked (alive): a node that
// closes a connection after a response without saying so, or as it
// restarts, leaves it in the pool.
func (p *connPool) get(now time.Time, probe bool) *backendConn {
	for {
		p.mu.Lock()
		n := len(p.idle)
		if n == 0 {
			p.mu.Unlock()
			return nil
		}
		c := p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		idle := now.Sub(c.idleSince)
		if idle >= poolIdleTimeout || (probe && !c.alive(idle >= p.owner.staleAfter)) {
			c.close()
			continue
		}
		c.reused = true
		return c
	}
}

// alive reports whether an idle connection is still open: a peek at its
// socket that does not wait finds neither the node's close nor
// unsolicited bytes (which make the connection unusable too). Where the
// peek cannot tell, a connection idle for long (wait) is probed with a
// read that waits staleProbeWait and must time out; one idle for less
// is taken to be open.
func (c *backendConn) alive(wait bool) bool {
	c.SetReadDeadline(time.Time{}) // the last exchange's deadline, past by now, would fail the peek
	if open, known := c.peek.idle(); known {
		return open
	}
	if !wait {
		return true
	}
	c.SetReadDeadline(time.Now().Add(staleProbeWait))
	_, err := c.br.Peek(1)
	c.SetReadDeadline(time.Time{})
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// dial opens a connection to the node, with a TLS handshake for https
// nodes.
func (p *connPool) dial(ctx context.Context) (*backendConn, error) {
	raw, err := p.owner.dialer.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return nil, err
	}
	p.owner.dials.Add(1)
	conn := raw
	if p.tls != nil {
		tc := tls.Client(raw, p.tls)
		if err := tc.HandshakeContext(ctx); err != nil {
			raw.Close()
			return nil, err
		}
		conn = tc
	}
	c, _ := p.owner.spare.Get().(*backendConn)
	if c == nil {
		c = &backendConn{br: bufio.NewReaderSize(conn, connBufferSize), bw: bufio.NewWriterSize(conn, connBufferSize)}
	} else {
		c.br.Reset(conn)
		c.bw.Reset(conn)
	}
	c.Conn, c.pool, c.reused = conn, p, false
	c.peek.init(raw)
	return c, nil
}

// put returns a connection whose last exchange ended cleanly, its
// response read and discarded. Bytes already buffered past that response
// (a node that counted its body short, or answered twice) are none of the
// next request's: the connection is closed, as net/http's Transport closes
// one on which an unsolicited response arrives. Bytes that arrive later
// are the probe's to find (get).
func (p *connPool) put(c *backendConn, now time.Time) {
	if c.br.Buffered() > 0 {
		c.close()
		return
	}
	p.mu.Lock()
	if p.closed || len(p.idle) >= idleConnsPerHost {
		p.mu.Unlock()
		c.close()
		return
	}
	c.idleSince = now
	p.idle = append(p.idle, c)
	if !p.armed {
		p.armed = true
		if p.sweep == nil {
			p.sweep = time.AfterFunc(poolIdleTimeout, p.sweepIdle)
		} else {
			p.sweep.Reset(poolIdleTimeout)
		}
	}
	p.mu.Unlock()
}

// sweepIdle closes connections idle for longer than poolIdleTimeout and
// rearms for the oldest of the others.
func (p *connPool) sweepIdle() {
	now := time.Now()
	var expired []*backendConn
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.owner.sweeps.Add(1)
	defer p.owner.sweeps.Done()
	k := 0
	for k < len(p.idle) && now.Sub(p.idle[k].idleSince) >= poolIdleTimeout {
		k++
	}
	expired = append(expired, p.idle[:k]...)
	n := copy(p.idle, p.idle[k:])
	clear(p.idle[n:])
	p.idle = p.idle[:n]
	p.armed = false
	if n > 0 && !p.closed {
		p.armed = true
		p.sweep.Reset(poolIdleTimeout - now.Sub(p.idle[0].idleSince))
	}
	p.mu.Unlock()
	for _, c := range expired {
		c.close()
	}
}

// retireIfEmpty closes the pool if it holds no connection, so it can leave
// the set; a connection returned to it later is closed.
func (p *connPool) retireIfEmpty() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.idle) > 0 {
		return false
	}
	p.closed = true
	return true
}

// close closes the idle connections; connections returned later are
// closed too. Idempotent.
func (p *connPool) close() {
	p.mu.Lock()
	p.closed = true
	idle := p.idle
	p.idle = nil
	if p.sweep != nil {
		p.sweep.Stop()
	}
	p.mu.Unlock()
	for _, c := range idle {
		c.close()
	}
}

// close closes the connection and keeps its buffers for another.
func (c *backendConn) close() {
	c.Conn.Close()
	c.Conn = nil
	c.br.Reset(nil)
	c.bw.Reset(nil)
	c.pool.owner.spare.Put(c)
}

// writeRequestHead writes the request line and header of r for a node at
// host: the path and query as they came; Host naming the node;
// X-Forwarded-For extending the caller's chain, X-Forwarded-Host and
// -Proto describing the caller's request; the caller's Via followed by
// via, the sidecar's own entry (a field line of its own after the
// caller's, which RFC 9110 section 5.3 makes the same list); no
// hop-by-hop field (RFC 9110 section 7.6.1), including those the
// Connection field names; no Authorization when dropAuth; the caller's
// Expect is answered by the sidecar's own server, so it is not passed on.
// bodyLen frames the body: > 0 a Content-Length, -1 chunked, 0 none.
// trace, when not empty, is the W3C traceparent of a trace the sidecar
// starts: the caller's Traceparent and Tracestate are then not passed on
// (see traceToStart).
func writeRequestHead(bw *bufio.Writer, r *http.Request, host, via string, bodyLen int64, dropAuth bool, trace []byte) {
	uri := r.RequestURI
	if uri == "" || uri[0] != '/' {
		uri = r.URL.RequestURI()
	}
	bw.WriteString(r.Method)
	bw.WriteByte(' ')
	bw.WriteString(uri)
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	bw.WriteString(host)
	bw.WriteString("\r\n")
	switch {
	case bodyLen > 0:
		bw.WriteString("Content-Length: ")
		bw.Write(strconv.AppendInt(bw.AvailableBuffer(), bodyLen, 10))
		bw.WriteString("\r\n")
	case bodyLen < 0:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	case r.Method == http.MethodPost || r.Method == http.MethodPut || r.Method == http.MethodPatch:
		bw.WriteString("Content-Length: 0\r\n")
	}
	conn := r.Header["Connection"]
	for k, vv := range r.Header {
		if hopByHop(k, conn) || skipRequestField(k, dropAuth) || len(trace) > 0 && (k == "Traceparent" || k == "Tracestate") {
			continue
		}
		for _, v := range vv {
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	if hasToken(r.Header["Te"], "trailers") {
		bw.WriteString("Te: trailers\r\n")
	}
	if len(trace) > 0 {
		bw.WriteString("Traceparent: ")
		bw.Write(trace)
		bw.WriteString("\r\n")
	}
	if via != "" {
		bw.WriteString("Via: ")
		bw.WriteString(via)
		bw.WriteString("\r\n")
	}
	if ip, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		bw.WriteString("X-Forwarded-For: ")
		for _, v := range r.Header["X-Forwarded-For"] {
			bw.WriteString(v)
			bw.WriteString(", ")
		}
		bw.WriteString(ip)
		bw.WriteString("\r\n")
	}
	if r.Host != "" {
		bw.WriteString("X-Forwarded-Host: ")
		bw.WriteString(r.Host)
		bw.WriteString("\r\n")
	}
	if r.TLS != nil {
		bw.WriteString("X-Forwarded-Proto: https\r\n\r\n")
	} else {
		bw.WriteString("X-Forwarded-Proto: http\r\n\r\n")
	}
}

// skipRequestField reports whether the caller's field k, not hop-by-hop,
// is still not passed on as is: the fields the proxy writes itself (Host,
// framing, forwarding), Expect, and Authorization when dropAuth.
func skipRequestField(k string, dropAuth bool) bool {
	switch k {
	case "Host", "Content-Length", "Expect", "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto":
		return true
	case "Authorization":
		return dropAuth
	}
	return false
}

// respHead is what the forwarder needs of a parsed response head.
type respHead struct {
	code    int
	length  int64 // Content-Length; -1 unknown
	chunked bool
	close   bool // the node closes the connection after this response
	stream  bool // text/event-stream: flush every write
}

// readResponseHead reads a response's status line and header fields into
// c.head and c.fields, within limit bytes. started says whether any byte of
// the response arrived (a reused connection failing before that was
// probably closed by the node while idle).
func (c *backendConn) readResponseHead(limit int) (h respHead, started bool, err error) {
	c.head = c.head[:0]
	c.fields = c.fields[:0]
	line, err := c.readLine(&limit)
	if len(line) > 0 || err == nil || err == errHeaderTooLarge {
		started = true
	}
	if err != nil {
		return h, started, err
	}
	// HTTP/1.DIGIT SP 3DIGIT [SP reason]
	if len(line) < 12 || string(line[:7]) != "HTTP/1." || line[7] < '0' || line[7] > '9' || line[8] != ' ' || (len(line) > 12 && line[12] != ' ') {
		return h, true, errMalformed
	}
	for _, d := range line[9:12] {
		if d < '0' || d > '9' {
			return h, true, errMalformed
		}
		h.code = h.code*10 + int(d-'0')
	}
	if h.code < 100 {
		return h, true, errMalformed
	}
	http10 := line[7] == '0'
	h.close = http10 // HTTP/1.0: no keep-alive from this client
	h.length = -1
	lengthSeen := false
	var length hdrField // the first Content-Length field
	for {
		line, err := c.readLine(&limit)
		if err != nil {
			return h, true, err
		}
		if len(line) == 0 {
			break
		}
		key, v, ok := parseField(line)
		if !ok {
			return h, true, errMalformed
		}
		k0 := len(c.head)
		c.head = append(c.head, key...)
		k1 := len(c.head)
		c.head = append(c.head, v...)
		c.fields = append(c.fields, hdrField{int32(k0), int32(k1), int32(len(c.head))})
		switch {
		case asciiEqualFold(key, "Content-Length"):
			// Repeated, it must be the same text, as net/http requires
			// of the proxy's own answer.
			n, ok := parseLength(v)
			if !ok || (lengthSeen && !bytes.Equal(v, c.head[length.k1:length.v1])) {
				return h, true, errMalformed
			}
			if !lengthSeen {
				lengthSeen, h.length, length = true, n, c.fields[len(c.fields)-1]
			}
		case asciiEqualFold(key, "Transfer-Encoding"):
			if http10 {
				// RFC 9112 section 6.1: the framing of an HTTP/1.0
				// message with Transfer-Encoding is faulty.
				return h, true, errMalformed
			}
			if !asciiEqualFold(v, "chunked") || h.chunked {
				return h, true, errors.New("unsupported transfer encoding " + strconv.Quote(string(v)))
			}
			h.chunked = true
		case asciiEqualFold(key, "Connection"):
			if listHasToken(v, "close") {
				h.close = true
			}
		case asciiEqualFold(key, "Content-Type"):
			mt := v
			if i := bytes.IndexByte(mt, ';'); i >= 0 {
				mt = mt[:i]
			}
			h.stream = asciiEqualFold(trimOWS(mt), "text/event-stream")
		}
	}
	if h.chunked {
		// RFC 9112 section 6.3: chunked overrides a Content-Length, which
		// header drops; but the node may have meant the length, so the
		// connection is not used again.
		h.close = h.close || lengthSeen
		h.length = -1
	}
	return h, true, nil
}

// readLine reads one line without its CRLF, counting it against limit.
// The slice is valid until the next read of c.br.
func (c *backendConn) readLine(limit *int) ([]byte, error) {
	line, err := c.br.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		// Longer than the buffer (rare): gather it in a copy.
		buf := append([]byte(nil), line...)
		for err == bufio.ErrBufferFull && len(buf) <= *limit {
			line, err = c.br.ReadSlice('\n')
			buf = append(buf, line...)
		}
		line = buf
	}
	*limit -= len(line)
	if *limit < 0 {
		return nil, errHeaderTooLarge
	}
	if err != nil {
		if err == bufio.ErrBufferFull {
			err = errHeaderTooLarge
		}
		return line, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

// header copies the parsed fields into h, as http.Header.Add would,
// without hop-by-hop fields, those the Connection field names, and a
// Content-Length beside chunked framing. The names and values share one
// string.
func (c *backendConn) header(h http.Header, chunked bool) {
	if len(c.fields) == 0 {
		return
	}
	s := string(c.head)
	var conn []string
	for _, f := range c.fields {
		if asciiEqualFold(c.head[f.k0:f.k1], "Connection") {
			conn = append(conn, s[f.k1:f.v1])
		}
	}
	vals := make([]string, len(c.fields))
	for i, f := range c.fields {
		k := commonHeaderKey(c.head[f.k0:f.k1])
		if k == "" {
			k = http.CanonicalHeaderKey(s[f.k0:f.k1])
		}
		if hopByHop(k, conn) || (chunked && k == "Content-Length") {
			continue
		}
		vals[i] = s[f.k1:f.v1]
		if prev, ok := h[k]; ok {
			h[k] = append(prev, vals[i])
		} else {
			h[k] = vals[i : i+1 : i+1]
		}
	}
}

// commonHeaderKey is the canonical form of a response field name that
// servers send often, as sent in canonical or lower case; "" for any
// other name. It spares http.CanonicalHeaderKey's scan of the name.
func commonHeaderKey(name []byte) string {
	switch string(name) {
	case "Content-Type", "content-type":
		return "Content-Type"
	case "Content-Length", "content-length":
		return "Content-Length"
	case "Date", "date":
		return "Date"
	case "Server", "server":
		return "Server"
	case "Cache-Control", "cache-control":
		return "Cache-Control"
	case "Etag", "ETag", "etag":
		return "Etag"
	case "Last-Modified", "last-modified":
		return "Last-Modified"
	case "Vary", "vary":
		return "Vary"
	case "Content-Encoding", "content-encoding":
		return "Content-Encoding"
	case "Set-Cookie", "set-cookie":
		return "Set-Cookie"
	case "Location", "location":
		return "Location"
	case "Expires", "expires":
		return "Expires"
	}
	return ""
}

// readTrailer reads the trailer fields after a chunked body into h as
// http.TrailerPrefix fields (which the server sends as trailers), within
// limit bytes.
func (c *backendConn) readTrailer(h http.Header, limit int) error {
	for {
		line, err := c.readLine(&limit)
		if err != nil {
			return err
		}
		if len(line) == 0 {
			return nil
		}
		name, v, ok := parseField(line)
		if !ok {
			return errMalformed
		}
		k := http.CanonicalHeaderKey(string(name))
		if hopByHop(k, nil) || k == "Content-Length" {
			continue
		}
		h.Add(http.TrailerPrefix+k, string(v))
	}
}

// parseField splits a header or trailer field line (RFC 9110 section 5):
// a token, a colon, and a value without the whitespace around it. It
// refuses a name that is not a token, including whitespace before the
// colon (RFC 9112 section 5.1) and a line folded onto the previous one
// (obs-fold, section 5.2), both of which net/http tolerates, and a control
// character in the value, which net/http refuses too. The slices alias
// line.
func parseField(line []byte) (name, value []byte, ok bool) {
	colon := -1
	for i, b := range line {
		if b == ':' {
			colon = i
			break
		}
		if !isTokenByte(b) {
			return nil, nil, false
		}
	}
	if colon <= 0 {
		return nil, nil, false
	}
	value = trimOWS(line[colon+1:])
	for _, b := range value {
		if b < ' ' && b != '\t' || b == 0x7f {
			return nil, nil, false
		}
	}
	return line[:colon], value, true
}

// isTokenByte reports whether b may appear in a token (RFC 9110 section
// 5.6.2): a letter, a digit or one of !#$%&'*+-.^_`|~.
func isTokenByte(b byte) bool {
	switch {
	case 'a' <= b && b <= 'z', 'A' <= b && b <= 'Z', '0' <= b && b <= '9':
		return true
	}
	switch b {
	case '!', '#', '$', '%', '&', '\'', '*', '+', '-', '.', '^', '_', '`', '|', '~':
		return true
	}
	return false
}

// parseLength parses a Content-Length value: digits only, no sign.
func parseLength(v []byte) (int64, bool) {
	if len(v) == 0 || len(v) > 18 {
		return 0, false
	}
	var n int64
	for _, d := range v {
		if d < '0' || d > '9' {
			return 0, false
		}
		n = n*10 + int64(d-'0')
	}
	return n, true
}
