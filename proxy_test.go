package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// proxyTestConfig is testConfig with the proxy handler.
func proxyTestConfig() *Config {
	cfg := testConfig()
	cfg.Handler = "proxy"
	return cfg
}

// registerURLs registers the servers at urls as nodes of service.
func registerURLs(t *testing.T, base, service string, urls ...string) {
	t.Helper()
	var nodes []string
	for i, u := range urls {
		_, port, err := net.SplitHostPort(strings.TrimPrefix(u, "http://"))
		if err != nil {
			t.Fatalf("node URL %q: %v", u, err)
		}
		nodes = append(nodes, fmt.Sprintf(`{"Id":"%s-%d","Address":"127.0.0.1","Port":%s}`, service, i, port))
	}
	body := fmt.Sprintf(`{"Name":%q,"Nodes":[%s]}`, service, strings.Join(nodes, ","))
	if code, resp := do(t, "POST", base+"/registry", body, "Content-Type", "application/json"); code != http.StatusOK {
		t.Fatalf("POST /registry %s = %d %s", body, code, resp)
	}
}

// deadURL is the URL of a port nothing listens on.
func deadURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := "http://" + ln.Addr().String()
	ln.Close()
	return u
}

// seen is one request as a backend saw it.
type seen struct {
	method, uri, host, body string
	header                  http.Header
}

// recordingBackend answers every request with 200 "node NAME" and records
// what arrived.
func recordingBackend(t *testing.T, name string) (*httptest.Server, func() seen, *atomic.Int64) {
	t.Helper()
	var mu sync.Mutex
	var last seen
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		last = seen{method: r.Method, uri: r.RequestURI, host: r.Host, body: string(b), header: r.Header.Clone()}
		mu.Unlock()
		w.Header().Set("X-Backend", name)
		w.Header().Set("Keep-Alive", "timeout=5") // hop-by-hop: must not reach the caller
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, "node "+name)
	}))
	t.Cleanup(srv.Close)
	return srv, func() seen { mu.Lock(); defer mu.Unlock(); return last }, &hits
}

// TestProxyPassesThrough: method, path, query, body and end-to-end headers
// reach the node unchanged; forwarding headers are set, hop-by-hop headers
// removed, a traceparent passed or started; the answer comes back as is.
func TestProxyPassesThrough(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, proxyTestConfig())
	foo, lastFoo, _ := recordingBackend(t, "foo")
	v1, lastV1, _ := recordingBackend(t, "v1foo")
	registerURLs(t, ts.URL, "go.micro.srv.foo", foo.URL)
	registerURLs(t, ts.URL, "go.micro.srv.v1.foo", v1.URL)
	const trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	tests := []struct {
		name, method, path, body string
		header                   []string
		last                     func() seen
		node                     string
	}{
		{"GET", "GET", "/foo/bar?x=1", "", nil, lastFoo, "foo"},
		{"POST", "POST", "/foo/bar?x=1", `{"a":1}`, nil, lastFoo, "foo"},
		{"PUT", "PUT", "/foo/bar?x=1", "put body", nil, lastFoo, "foo"},
		{"DELETE", "DELETE", "/foo/bar?x=1", "", nil, lastFoo, "foo"},
		{"PATCH escaped path", "PATCH", "/foo/a%2Fb/c?q=%20&x=1&x=2", "p", nil, lastFoo, "foo"},
		{"service root", "GET", "/foo", "", nil, lastFoo, "foo"},
		{"version", "GET", "/v1/foo/bar?x=1", "", nil, lastV1, "v1foo"},
		{"traceparent kept", "GET", "/foo/t", "", []string{"Traceparent", trace}, lastFoo, "foo"},
		{"hop-by-hop removed", "GET", "/foo/h", "", []string{"Connection", "X-Hop", "X-Hop", "1", "Keep-Alive", "timeout=1", "Proxy-Authorization", "Basic eA=="}, lastFoo, "foo"},
		{"forwarded chain", "GET", "/foo/f", "", []string{"X-Forwarded-For", "10.0.0.1"}, lastFoo, "foo"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, ts.URL+tt.path, strings.NewReader(tt.body))
			req.Header.Set("X-End-To-End", "kept")
			for i := 0; i+1 < len(tt.header); i += 2 {
				req.Header.Set(tt.header[i], tt.header[i+1])
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			call := tt.method + " " + tt.path
			if resp.StatusCode != 200 || string(b) != "node "+tt.node || resp.Header.Get("X-Backend") != tt.node {
				t.Fatalf("%s = %d %q (X-Backend %q), want 200 %q", call, resp.StatusCode, b, resp.Header.Get("X-Backend"), "node "+tt.node)
			}
			if v := resp.Header.Get("Keep-Alive"); v != "" {
				t.Errorf("%s: caller got hop-by-hop Keep-Alive %q", call, v)
			}
			got := tt.last()
			if got.method != tt.method || got.uri != tt.path || got.body != tt.body {
				t.Errorf("%s: backend saw %s %s body %q, want %s %s body %q", call, got.method, got.uri, got.body, tt.method, tt.path, tt.body)
			}
			h := got.header
			wantXFF := "127.0.0.1"
			if tt.name == "forwarded chain" {
				wantXFF = "10.0.0.1, 127.0.0.1"
			}
			if h.Get("X-Forwarded-For") != wantXFF || h.Get("X-Forwarded-Proto") != "http" || h.Get("X-Forwarded-Host") != strings.TrimPrefix(ts.URL, "http://") {
				t.Errorf("%s: X-Forwarded-For/Proto/Host = %q %q %q, want %q http %s", call, h.Get("X-Forwarded-For"), h.Get("X-Forwarded-Proto"), h.Get("X-Forwarded-Host"), wantXFF, ts.URL)
			}
			if h.Get("X-End-To-End") != "kept" {
				t.Errorf("%s: end-to-end header X-End-To-End = %q, want kept", call, h.Get("X-End-To-End"))
			}
			for _, k := range []string{"X-Hop", "Keep-Alive", "Proxy-Authorization", "Connection"} {
				if v := h.Get(k); v != "" {
					t.Errorf("%s: backend got hop-by-hop %s: %q", call, k, v)
				}
			}
			tp := h.Get("Traceparent")
			if !validTraceparent(tp) || (tt.name == "traceparent kept" && tp != trace) {
				t.Errorf("%s: backend traceparent %q, want valid (and %q when sent)", call, tp, trace)
			}
			if !strings.HasPrefix(got.host, "127.0.0.1:") {
				t.Errorf("%s: backend Host %q, want the node's address", call, got.host)
			}
		})
	}
}

// TestProxyAuthorizationDropped: the sidecar's own bearer token is not
// passed to nodes.
func TestProxyAuthorizationDropped(t *testing.T) {
	t.Parallel()
	cfg := proxyTestConfig()
	cfg.AuthToken = "s3cret"
	_, ts := newTestServer(t, cfg)
	foo, last, _ := recordingBackend(t, "foo")
	auth := []string{"Authorization", "Bearer s3cret", "Content-Type", "application/json"}
	body := fmt.Sprintf(`{"Name":"go.micro.srv.foo","Nodes":[{"Id":"f","Address":"127.0.0.1","Port":%s}]}`, foo.URL[strings.LastIndex(foo.URL, ":")+1:])
	if code, b := do(t, "POST", ts.URL+"/registry", body, auth...); code != 200 {
		t.Fatalf("register = %d %s", code, b)
	}
	if code, b := do(t, "GET", ts.URL+"/foo/x", "", auth...); code != 200 {
		t.Fatalf("GET /foo/x = %d %s", code, b)
	}
	if v := last().header.Get("Authorization"); v != "" {
		t.Errorf("backend got Authorization %q, want none", v)
	}
}

func TestProxyService(t *testing.T) {
	t.Parallel()
	tests := []struct {
		path, want string
		code       int
	}{
		{"/foo", "ns.foo", 0},
		{"/foo/", "ns.foo", 0},
		{"/foo/bar/baz?x", "ns.foo", 0},
		{"/v1/foo/bar", "ns.v1.foo", 0},
		{"/v1", "ns.v1", 0},
		{"/v1/", "ns.v1", 0},
		{"/vx/foo", "ns.vx", 0},
		{"/", "", 404},
		{"//foo", "ns.foo", 0},
		{"///foo//bar", "ns.foo", 0},
		{"/v1//foo/bar", "ns.v1.foo", 0},
		{"/fo%6F/x", "ns.foo", 0},
		{"/./foo", "", 404},
		{"/../foo", "", 404},
		{"/%2e%2e/foo", "", 404},
		{"/foo%2Fbar/x", "", 404},
		{"/%zz/x", "", 404},
		{"//", "", 404},
		{"/foo.bar/x", "", 404},
		{"/" + strings.Repeat("a", 300), "", 404},
	}
	for _, tt := range tests {
		got, err := proxyService("ns", tt.path)
		var he *httpError
		code := 0
		if errors.As(err, &he) {
			code = he.code
		}
		if got != tt.want || code != tt.code {
			t.Errorf("proxyService(ns, %q) = %q, %v; want %q, code %d", tt.path, got, err, tt.want, tt.code)
		}
	}
}

func FuzzProxyService(f *testing.F) {
	for _, s := range []string{"/foo/bar", "/v1/foo", "/", "//", "/v1//x", "/é/x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, path string) {
		name, err := proxyService("go.micro.srv", path)
		if err == nil && (!strings.HasPrefix(name, "go.micro.srv.") || len(name) > maxNameLen) {
			t.Errorf("proxyService(%q) = %q", path, name)
		}
	})
}

// TestProxyErrors: unknown services, dead nodes and hung nodes each give
// the right JSON error. A hung node's 504 names the deadline that ended
// the call (the flag's, or the lower one of the caller's Timeout header);
// without one the call would hang for good. The time each answer took is
// logged, not asserted: a bound of a second over the deadline, which this
// test had, is what a loaded machine breaks (TestProxyBadNodes answered in
// 1.5 s); the fault battery (TestFaultHungBackend) reports how far past
// the deadline 504s come.
func TestProxyErrors(t *testing.T) {
	t.Parallel()
	cfg := proxyTestConfig()
	cfg.ClientRequestTimeout = 300 * time.Millisecond
	_, ts := newTestServer(t, cfg)
	hung := hungServer(t)
	registerURLs(t, ts.URL, "go.micro.srv.hung", hung.URL)
	registerURLs(t, ts.URL, "go.micro.srv.down", deadURL(t), deadURL(t))
	tests := []struct {
		name, method, path string
		header             []string
		code               int
		detail             string // in the error's detail
	}{
		{"unknown service", "GET", "/nope/x", nil, 404, ""},
		{"root", "GET", "/", nil, 404, ""},
		{"bad segment", "GET", "/a.b/c", nil, 404, ""},
		{"bad timeout header", "GET", "/hung/x", []string{"Timeout", "soon"}, 400, ""},
		{"all nodes down GET", "GET", "/down/x", nil, 503, ""},
		{"all nodes down POST", "POST", "/down/x", nil, 503, ""},
		{"hung node", "GET", "/hung/x", nil, 504, "within 300ms"},
		{"hung node, lowered timeout", "POST", "/hung/x", []string{"Timeout", "50ms"}, 504, "within 50ms"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			code, body := do(t, tt.method, ts.URL+tt.path, "body", tt.header...)
			e := wantError(t, tt.method+" "+tt.path, code, body, tt.code)
			if !strings.Contains(e.Detail, tt.detail) {
				t.Errorf("%s %s: detail %q, want it to say %q", tt.method, tt.path, e.Detail, tt.detail)
			}
			t.Logf("%s %s: %d in %s", tt.method, tt.path, code, time.Since(start).Round(time.Millisecond))
		})
	}
}

// TestProxyRetryAndEject: with one dead and one live node every request
// succeeds (a failed dial is retried on the other node, with or without a
// body), and the dead node is ejected; a POST that reached a node which
// then broke the connection is not retried.
func TestProxyRetryAndEject(t *testing.T) {
	t.Parallel()
	cfg := proxyTestConfig()
	cfg.ClientRetries = 2
	s, ts := newTestServer(t, cfg)
	live, _, hits := recordingBackend(t, "live")
	registerURLs(t, ts.URL, "go.micro.srv.flaky", deadURL(t), live.URL)
	for i := range 20 {
		method := []string{"GET", "POST"}[i%2]
		if code, body := do(t, method, ts.URL+"/flaky/x", "payload"); code != 200 || string(body) != "node live" {
			t.Fatalf("%s /flaky/x #%d = %d %s, want 200 from the live node", method, i, code, body)
		}
	}
	if hits.Load() != 20 {
		t.Errorf("live node got %d requests, want 20", hits.Load())
	}
	st := (*s.proxy.bal.services.Load())["go.micro.srv.flaky"]
	if st == nil || st.up.ejections.Load() == 0 {
		t.Errorf("dead node was not ejected")
	}

	var breaks atomic.Int64
	breaker := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		breaks.Add(1)
		io.ReadAll(r.Body)
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close() // reached the app, then no answer
		}
	}))
	t.Cleanup(breaker.Close)
	registerURLs(t, ts.URL, "go.micro.srv.breaks", breaker.URL, deadURL(t))
	tests := []struct {
		method string
		body   string
		tries  int64 // attempts that reach the breaking node, at most
	}{
		{"POST", "not idempotent", 1},
		{"PUT", "a body cannot be sent again", 1},
	}
	for _, tt := range tests {
		breaks.Store(0)
		code, body := do(t, tt.method, ts.URL+"/breaks/x", tt.body)
		wantError(t, tt.method+" /breaks/x", code, body, http.StatusBadGateway)
		if n := breaks.Load(); n > tt.tries {
			t.Errorf("%s /breaks/x reached the node %d times, want at most %d", tt.method, n, tt.tries)
		}
	}
}

// TestProxyLargeUpload: a 64 MiB body streams: the node receives its start
// while the caller has not finished sending (the caller waits for that
// before sending the rest, so a proxy buffering whole bodies would hang).
func TestProxyLargeUpload(t *testing.T) {
	t.Parallel()
	const size, chunk = 64 << 20, 1 << 20
	_, ts := newTestServer(t, proxyTestConfig())
	started := make(chan struct{})
	var received atomic.Int64
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		buf := make([]byte, 64<<10)
		var once sync.Once
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				received.Add(int64(n))
				once.Do(func() { close(started) })
			}
			if err != nil {
				break
			}
		}
		fmt.Fprint(w, received.Load())
	}))
	t.Cleanup(up.Close)
	registerURLs(t, ts.URL, "go.micro.srv.up", up.URL)

	pr, pw := io.Pipe()
	go func() {
		block := make([]byte, chunk)
		pw.Write(block)
		select {
		case <-started:
		case <-time.After(10 * time.Second):
			pw.CloseWithError(errors.New("the node received nothing while the caller was still sending"))
			return
		}
		for sent := chunk; sent < size; sent += chunk {
			if _, err := pw.Write(block); err != nil {
				return
			}
		}
		pw.Close()
	}()
	req, _ := http.NewRequest("POST", ts.URL+"/up/load", pr)
	req.ContentLength = size
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST 64 MiB: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != strconv.Itoa(size) {
		t.Fatalf("POST 64 MiB = %d %q, want 200 %d", resp.StatusCode, b, size)
	}
}

// TestProxyServerSentEvents: the first event reaches the caller while the
// node has not finished the response; a stream silent for longer than
// --proxy_idle_timeout is ended.
func TestProxyServerSentEvents(t *testing.T) {
	t.Parallel()
	cfg := proxyTestConfig()
	cfg.ProxyIdleTimeout = 200 * time.Millisecond
	s, ts := newTestServer(t, cfg)
	release := make(chan struct{})
	sse := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: first\n\n")
		w.(http.Flusher).Flush()
		if r.URL.Path == "/events/silent" {
			<-r.Context().Done() // sends nothing more
			return
		}
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "data: second\n\n")
	}))
	t.Cleanup(func() { sse.CloseClientConnections(); sse.Close() })
	registerURLs(t, ts.URL, "go.micro.srv.events", sse.URL)

	resp, err := http.Get(ts.URL + "/events/live")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	rd := bufio.NewReader(resp.Body)
	line, err := rd.ReadString('\n')
	if err != nil || line != "data: first\n" {
		t.Fatalf("first event line = %q, %v; want %q before the node finishes", line, err, "data: first\n")
	}
	close(release)
	rest, _ := io.ReadAll(rd)
	if string(rest) != "\ndata: second\n\n" {
		t.Errorf("rest of the stream = %q", rest)
	}

	// How many idle checks end a stream, and how far apart, is
	// TestProxyWebsocketIdle's, on timers it fires; here the real timer
	// ends a silent stream, not before its idle timeout.
	client := &http.Client{Timeout: 10 * time.Second} // a stream the proxy never ends fails the test
	start := time.Now()
	resp2, err := client.Get(ts.URL + "/events/silent")
	if err != nil {
		t.Fatal(err)
	}
	defer resp2.Body.Close()
	b, err := io.ReadAll(resp2.Body)
	if err == nil || string(b) != "data: first\n\n" {
		t.Errorf("silent stream = %q, %v; want the first event, then an aborted stream", b, err)
	}
	if took := time.Since(start); took < cfg.ProxyIdleTimeout {
		t.Errorf("silent stream ended after %s, before its idle timeout %s", took, cfg.ProxyIdleTimeout)
	}
	if n := s.proxy.idleTimeouts.Load(); n != 1 {
		t.Errorf("idle timeouts = %d, want 1", n)
	}
}

// echoWebsocket is a websocket echo node.
func echoWebsocket(t *testing.T) (*httptest.Server, chan error) {
	t.Helper()
	ended := make(chan error, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		for {
			typ, msg, err := c.Read(r.Context())
			if err != nil {
				ended <- err
				return
			}
			if err := c.Write(r.Context(), typ, msg); err != nil {
				ended <- err
				return
			}
		}
	}))
	t.Cleanup(func() { srv.CloseClientConnections(); srv.Close() })
	return srv, ended
}

// TestProxyWebsocket: a websocket echo node works through the proxy, and
// shutting the sidecar down ends the proxied connection on both sides.
func TestProxyWebsocket(t *testing.T) {
	t.Parallel()
	s, ts := newTestServer(t, proxyTestConfig())
	echo, ended := echoWebsocket(t)
	registerURLs(t, ts.URL, "go.micro.srv.echo", echo.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, ts.URL+"/echo/ws", nil)
	if err != nil {
		t.Fatalf("dial through the proxy: %v", err)
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)
	for _, msg := range []string{"hello", strings.Repeat("x", 100<<10)} {
		if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		_, got, err := c.Read(ctx)
		if err != nil || string(got) != msg {
			t.Fatalf("echo of %d bytes = %d bytes, %v", len(msg), len(got), err)
		}
	}
	if n := s.proxy.upgraded.Load(); n != 1 {
		t.Errorf("upgraded connections = %d, want 1", n)
	}

	closed := make(chan struct{})
	go func() { s.streams.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("streams.Close did not return with a proxied websocket open")
	}
	if _, _, err := c.Read(ctx); err == nil {
		t.Errorf("caller's websocket still open after shutdown")
	}
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Errorf("node's websocket still open after shutdown")
	}
	eventually(t, time.Second, "upgraded gauge back to 0", func() bool { return s.proxy.upgraded.Load() == 0 })
	if code, body := do(t, "GET", ts.URL+"/echo/ws", "", "Connection", "Upgrade", "Upgrade", "websocket"); code != 503 {
		t.Errorf("upgrade after shutdown = %d %s, want 503", code, body)
	}
}

// manualTimers stands in for the proxy's call timers (proxyHandler.
// afterFunc): a timer fires only when the test calls fire, so a test
// decides how many idle checks pass between two messages. Safe for
// concurrent use.
type manualTimers struct {
	mu     sync.Mutex      // guards ticks, resets
	ticks  []func()        // each call's timer function, in order of creation
	resets []time.Duration // every Reset of any timer, in order
}

func (m *manualTimers) afterFunc(_ time.Duration, f func()) callTimer {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ticks = append(m.ticks, f)
	return manualTimer{m}
}

// takeResets returns the durations timers were reset to since the last
// call.
func (m *manualTimers) takeResets() []time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.resets
	m.resets = nil
	return r
}

func (m *manualTimers) count() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.ticks)
}

// fire runs call i's timer function, as the runtime does when it expires.
func (m *manualTimers) fire(i int) {
	m.mu.Lock()
	f := m.ticks[i]
	m.mu.Unlock()
	f()
}

type manualTimer struct{ m *manualTimers }

func (t manualTimer) Reset(d time.Duration) bool {
	t.m.mu.Lock()
	defer t.m.mu.Unlock()
	t.m.resets = append(t.m.resets, d)
	return true
}

func (manualTimer) Stop() bool { return true }

// TestProxyWebsocketIdle: a proxied websocket with no bytes either way for
// --proxy_idle_timeout ends; one with bytes between every two idle checks
// stays open however many checks pass.
func TestProxyWebsocketIdle(t *testing.T) {
	t.Parallel()
	dial := func(t *testing.T, tweaks ...func(*server)) (*server, *websocket.Conn, context.Context) {
		t.Helper()
		cfg := proxyTestConfig()
		cfg.ProxyIdleTimeout = 200 * time.Millisecond
		s, ts := newTestServer(t, cfg, tweaks...)
		echo, _ := echoWebsocket(t)
		registerURLs(t, ts.URL, "go.micro.srv.echo", echo.URL)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		t.Cleanup(cancel)
		c, _, err := websocket.Dial(ctx, ts.URL+"/echo/ws", nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.CloseNow() })
		return s, c, ctx
	}
	echo := func(t *testing.T, ctx context.Context, c *websocket.Conn) {
		t.Helper()
		if err := c.Write(ctx, websocket.MessageText, []byte("ping")); err != nil {
			t.Fatal(err)
		}
		if _, _, err := c.Read(ctx); err != nil {
			t.Fatalf("read while active: %v", err)
		}
	}

	t.Run("idle checks", func(t *testing.T) {
		t.Parallel()
		timers := &manualTimers{}
		s, c, ctx := dial(t, func(s *server) { s.proxy.afterFunc = timers.afterFunc })
		if n := timers.count(); n != 1 {
			t.Fatalf("%d call timers after one proxied websocket, want 1", n)
		}
		timers.takeResets() // the header deadline's
		// Traffic between every two checks keeps it open past many idle
		// periods.
		for range 3 * idleChecks {
			echo(t, ctx, c)
			timers.fire(0)
		}
		for range idleChecks - 1 {
			timers.fire(0)
		}
		if n := s.proxy.idleTimeouts.Load(); n != 0 {
			t.Fatalf("idle timeouts = %d after traffic and %d silent checks, want 0", n, idleChecks-1)
		}
		echo(t, ctx, c) // still open
		timers.fire(0)  // sees the echo
		for range idleChecks - 1 {
			timers.fire(0)
		}
		if n := s.proxy.idleTimeouts.Load(); n != 0 {
			t.Fatalf("idle timeouts = %d after %d silent checks, want 0", n, idleChecks-1)
		}
		timers.fire(0)
		if n := s.proxy.idleTimeouts.Load(); n != 1 {
			t.Fatalf("idle timeouts = %d after %d silent checks, want 1", n, idleChecks)
		}
		// Every check was set a quarter of the idle timeout after the
		// one before: a stream ends 1 to 1.25 idle timeouts after its
		// last byte.
		for _, d := range timers.takeResets() {
			if d != s.cfg.ProxyIdleTimeout/idleChecks {
				t.Fatalf("idle check timer reset to %s, want %s", d, s.cfg.ProxyIdleTimeout/idleChecks)
			}
		}
		if _, _, err := c.Read(ctx); err == nil {
			t.Fatal("read on an idle websocket returned a message")
		}
	})

	t.Run("real timer", func(t *testing.T) {
		t.Parallel()
		s, c, ctx := dial(t)
		echo(t, ctx, c)
		if _, _, err := c.Read(ctx); err == nil || ctx.Err() != nil {
			t.Fatalf("read on an idle websocket = %v, want the end of the stream before the test's deadline", err)
		}
		if n := s.proxy.idleTimeouts.Load(); n != 1 {
			t.Errorf("idle timeouts = %d, want 1", n)
		}
	})
}

// BenchmarkProxy is the full proxy path: client -> sidecar -> local node
// with a small fixed body -> sidecar -> client, over real loopback HTTP.
func BenchmarkProxy(b *testing.B) {
	cfg := proxyTestConfig()
	_, ts := newTestServer(b, cfg)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "hello, world\n")
	}))
	defer backend.Close()
	_, p, _ := net.SplitHostPort(backend.Listener.Addr().String())
	reg := `{"name":"go.micro.srv.hello","nodes":[{"id":"h","address":"127.0.0.1","port":` + p + `}]}`
	if resp, err := http.Post(ts.URL+"/registry", "application/json", strings.NewReader(reg)); err != nil || resp.StatusCode != 200 {
		b.Fatalf("register: %v", err)
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := client.Get(ts.URL + "/hello/world?x=1")
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
}

// countingBackend is a node whose handler is h, counting the connections
// it accepts.
func countingBackend(t *testing.T, h http.HandlerFunc) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var accepts atomic.Int64
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			accepts.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv, &accepts
}

// TestProxyConnectionReuse: sequential requests of every kind of response
// framing reuse one pooled connection to the node; the bodies and the
// status codes without a body come through intact.
func TestProxyConnectionReuse(t *testing.T) {
	t.Parallel()
	s, ts := newTestServer(t, proxyTestConfig())
	node, accepts := countingBackend(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/reuse/204":
			w.WriteHeader(http.StatusNoContent)
		case "/reuse/304":
			w.WriteHeader(http.StatusNotModified)
		case "/reuse/chunked":
			io.WriteString(w, "part one,")
			w.(http.Flusher).Flush()
			io.WriteString(w, "part two")
		default:
			b, _ := io.ReadAll(r.Body)
			w.Header().Set("Content-Length", strconv.Itoa(len(b)+5))
			io.WriteString(w, "echo:"+string(b))
		}
	})
	registerURLs(t, ts.URL, "go.micro.srv.reuse", node.URL)
	tests := []struct {
		method, path, body string
		code               int
		want               string
	}{
		{"GET", "/reuse/a", "", 200, "echo:"},
		{"POST", "/reuse/a", "payload", 200, "echo:payload"},
		{"HEAD", "/reuse/a", "", 200, ""},
		{"GET", "/reuse/204", "", 204, ""},
		{"GET", "/reuse/304", "", 304, ""},
		{"GET", "/reuse/chunked", "", 200, "part one,part two"},
		{"PUT", "/reuse/a", strings.Repeat("x", 100<<10), 200, "echo:" + strings.Repeat("x", 100<<10)},
		{"GET", "/reuse/a", "", 200, "echo:"},
	}
	for i := 0; i < 3; i++ {
		for _, tt := range tests {
			code, body := do(t, tt.method, ts.URL+tt.path, tt.body)
			if code != tt.code || string(body) != tt.want {
				t.Fatalf("%s %s = %d %.40q, want %d %.40q", tt.method, tt.path, code, body, tt.code, tt.want)
			}
		}
	}
	if n := accepts.Load(); n != 1 {
		t.Errorf("node accepted %d connections for %d sequential requests, want 1", n, 3*len(tests))
	}
	if n := s.proxy.conns.dials.Load(); n != 1 {
		t.Errorf("proxy dialled %d times, want 1", n)
	}
}

// TestProxyBadTrailer: a trailer field that net/http would refuse to read
// (a name that is not a token, a control character in a value) is not
// passed on: the caller's response is aborted, as a malformed head is
// refused.
func TestProxyBadTrailer(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, proxyTestConfig())
	node := rawBackend(t, func(c net.Conn, r *bufio.Reader) {
		req, _, err := readRawRequest(r)
		if err != nil {
			return
		}
		trailer := "Bad Name: x"
		if req.URL.Path == "/trailer/control" {
			trailer = "X-Sum: a\x01b"
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"+trailer+"\r\n\r\n")
	})
	registerURLs(t, ts.URL, "go.micro.srv.trailer", node)
	for _, path := range []string{"/trailer/name", "/trailer/control"} {
		nc, err := net.Dial("tcp", ts.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(time.Minute)) // a broken test must not hang
		fmt.Fprintf(nc, "GET %s HTTP/1.1\r\nHost: %s\r\nTE: trailers\r\nConnection: close\r\n\r\n", path, ts.Listener.Addr())
		raw, _ := io.ReadAll(nc)
		if !bytes.HasPrefix(raw, []byte("HTTP/1.1 200 OK\r\n")) {
			t.Fatalf("GET %s: %q, want the node's 200", path, raw)
		}
		if bytes.Contains(raw, []byte("Bad Name")) || bytes.Contains(raw, []byte("\x01")) || bytes.HasSuffix(raw, []byte("\r\n\r\n")) {
			t.Errorf("GET %s: the response ends cleanly or passes the bad trailer on:\n%q", path, raw)
		}
	}
}

// TestProxyChunkedWithLengthNotReused: a node's response with both
// Transfer-Encoding and Content-Length is read as chunked and passed on
// without the Content-Length, and the connection is not used again (RFC
// 9112 section 6.3: such framing ought to be handled as an error; the
// node and the proxy may disagree on where the response ends).
func TestProxyChunkedWithLengthNotReused(t *testing.T) {
	t.Parallel()
	s, ts := newTestServer(t, proxyTestConfig())
	node := rawBackend(t, func(c net.Conn, r *bufio.Reader) {
		for {
			req, _, err := readRawRequest(r)
			if err != nil {
				return
			}
			if req.URL.Path == "/both/framings" {
				io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n2\r\nok\r\n0\r\n\r\n")
				continue
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	registerURLs(t, ts.URL, "go.micro.srv.both", node)
	for _, path := range []string{"/both/framings", "/both/plain", "/both/plain"} {
		resp, err := http.Get(ts.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || string(b) != "ok" || resp.Header.Get("Content-Length") == "3" {
			t.Fatalf("GET %s = %d %q %v (Content-Length %q), want 200 ok", path, resp.StatusCode, b, err, resp.Header.Get("Content-Length"))
		}
	}
	if n := s.proxy.conns.dials.Load(); n != 2 {
		t.Errorf("proxy dialled %d times, want 2: a new connection after the response with two framings, then reuse", n)
	}
}

// rawBackend is a node speaking raw HTTP/1.1: serve gets each accepted
// connection with a reader over it.
func rawBackend(t *testing.T, serve func(c net.Conn, r *bufio.Reader)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close() // the proxy may hold it idle in its pool
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				serve(c, bufio.NewReader(c))
			}()
		}
	}()
	return "http://" + ln.Addr().String()
}

// readRawRequest reads one request (head and body) from r.
func readRawRequest(r *bufio.Reader) (*http.Request, string, error) {
	req, err := http.ReadRequest(r)
	if err != nil {
		return nil, "", err
	}
	b, err := io.ReadAll(req.Body)
	return req, string(b), err
}

// TestProxyNodeClosesIdle: a node that closes each connection after one
// answer, without saying so, costs no request: a GET that meets the closed
// pooled connection is sent again on a fresh one, and a POST (which cannot
// be sent again) finds the connection closed before it is sent.
func TestProxyNodeClosesIdle(t *testing.T) {
	t.Parallel()
	s, ts := newTestServer(t, proxyTestConfig())
	s.proxy.conns.staleAfter = 0 // probe before every POST on a pooled connection
	closed := make(chan struct{}, 100)
	node := rawBackend(t, func(c net.Conn, r *bufio.Reader) {
		_, body, err := readRawRequest(r)
		if err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: "+strconv.Itoa(len(body)+3)+"\r\n\r\nok "+body)
		c.Close()
		closed <- struct{}{}
	})
	registerURLs(t, ts.URL, "go.micro.srv.closer", node)
	for i, method := range []string{"GET", "GET", "POST", "GET", "POST", "POST"} {
		body := ""
		if method == "POST" {
			body = "p" + strconv.Itoa(i)
		}
		code, got := do(t, method, ts.URL+"/closer/x", body)
		if code != 200 || string(got) != "ok "+body {
			t.Fatalf("%s #%d = %d %q, want 200 %q", method, i, code, got, "ok "+body)
		}
		<-closed // the node has closed the connection the proxy pooled
	}
}

// TestProxyChunked: a body of unknown length goes to the node chunked and
// comes back chunked, trailers included.
func TestProxyChunked(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, proxyTestConfig())
	node := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Trailer", "X-Sum")
		w.Header().Set("X-Request-Chunked", strconv.FormatBool(len(r.TransferEncoding) > 0 && r.TransferEncoding[0] == "chunked"))
		w.Write(b[:len(b)/2])
		w.(http.Flusher).Flush()
		w.Write(b[len(b)/2:])
		w.Header().Set("X-Sum", strconv.Itoa(len(b)))
	}))
	t.Cleanup(node.Close)
	registerURLs(t, ts.URL, "go.micro.srv.chunks", node.URL)
	want := strings.Repeat("0123456789", 10_000)
	req, _ := http.NewRequest("POST", ts.URL+"/chunks/x", io.MultiReader(strings.NewReader(want[:5]), strings.NewReader(want[5:])))
	req.ContentLength = -1
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 || string(b) != want {
		t.Fatalf("POST chunked = %d, %d bytes, %v; want 200 and the %d bytes sent", resp.StatusCode, len(b), err, len(want))
	}
	if got := resp.Header.Get("X-Request-Chunked"); got != "true" {
		t.Errorf("node saw a chunked request: %s, want true", got)
	}
	if len(resp.TransferEncoding) == 0 || resp.Trailer.Get("X-Sum") != strconv.Itoa(len(want)) {
		t.Errorf("response transfer encoding %v, trailer X-Sum %q; want chunked and %d", resp.TransferEncoding, resp.Trailer.Get("X-Sum"), len(want))
	}
}

// TestProxyLargeResponse: bodies much larger than any buffer come through
// whole: with a Content-Length, chunked, and delimited by the node's close.
func TestProxyLargeResponse(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, proxyTestConfig())
	const size = 5<<20 + 123
	block := strings.Repeat("abcdefghijklmnopqrstuvwxyz012345", size/32+1)[:size]
	node := rawBackend(t, func(c net.Conn, r *bufio.Reader) {
		for {
			req, _, err := readRawRequest(r)
			if err != nil {
				return
			}
			switch req.URL.Path {
			case "/big/length":
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: "+strconv.Itoa(size)+"\r\n\r\n"+block)
			case "/big/chunked":
				bw := bufio.NewWriter(c)
				bw.WriteString("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
				cw := httputil.NewChunkedWriter(bw)
				for i := 0; i < size; i += 70_000 {
					cw.Write([]byte(block[i:min(i+70_000, size)]))
				}
				cw.Close()
				bw.WriteString("\r\n")
				bw.Flush()
			default: // until close
				io.WriteString(c, "HTTP/1.1 200 OK\r\n\r\n"+block)
				return
			}
		}
	})
	registerURLs(t, ts.URL, "go.micro.srv.big", node)
	for _, path := range []string{"/big/length", "/big/chunked", "/big/close", "/big/length"} {
		code, b := do(t, "GET", ts.URL+path, "")
		if code != 200 || len(b) != size || string(b) != block {
			t.Errorf("GET %s = %d, %d bytes; want 200 and the node's %d bytes", path, code, len(b), size)
		}
	}
}

// TestProxyBadNodes: a node sending a header larger than the limit, a
// malformed answer, a slow trickle of header bytes (slowloris) or closing
// without an answer each give a JSON error. The trickle is cut off at the
// 300 ms timeout: the node sees the proxy hang up long before its last
// byte. (That, not the time the call took, is what the test checks: a
// loaded machine answered a correct 504 in 1.5 s.)
func TestProxyBadNodes(t *testing.T) {
	t.Parallel()
	cfg := proxyTestConfig()
	cfg.ClientRequestTimeout = 300 * time.Millisecond
	_, ts := newTestServer(t, cfg)
	const trickle = 100 // header bytes of the slowloris, one per 50 ms: 5 s
	trickled := make(chan int, 1)
	node := rawBackend(t, func(c net.Conn, r *bufio.Reader) {
		req, _, err := readRawRequest(r)
		if err != nil {
			return
		}
		switch req.URL.Path {
		case "/bad/huge":
			io.WriteString(c, "HTTP/1.1 200 OK\r\nX-Big: "+strings.Repeat("b", backendHeaderSize+1)+"\r\n\r\n")
		case "/bad/manyfields":
			io.WriteString(c, "HTTP/1.1 200 OK\r\n"+strings.Repeat("X-Field: 0123456789\r\n", backendHeaderSize/20)+"\r\n")
		case "/bad/garbage":
			io.WriteString(c, "SMTP ready\r\n\r\n")
		case "/bad/twolengths":
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
		case "/bad/samelengths":
			// The same length written twice, differently: net/http
			// refuses it, and would refuse the proxy's answer.
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 05\r\nContent-Length: 5\r\n\r\nhello")
		case "/bad/version":
			io.WriteString(c, "HTTP/1.A 200 OK\r\nContent-Length: 2\r\n\r\nok")
		case "/bad/http10chunked":
			// RFC 9112 section 6.1: faulty framing.
			io.WriteString(c, "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
		case "/bad/slowloris":
			io.WriteString(c, "HTTP/1.1 200 OK\r\n")
			n := 0
			for ; n < trickle; n++ {
				if _, err := io.WriteString(c, "X"); err != nil {
					break // the proxy hung up
				}
				time.Sleep(50 * time.Millisecond) // the attack: a byte now and then
			}
			trickled <- n
		case "/bad/hangup":
		}
	})
	registerURLs(t, ts.URL, "go.micro.srv.bad", node)
	tests := []struct {
		path string
		code int
	}{
		{"/bad/huge", 502},
		{"/bad/manyfields", 502},
		{"/bad/garbage", 502},
		{"/bad/twolengths", 502},
		{"/bad/samelengths", 502},
		{"/bad/version", 502},
		{"/bad/http10chunked", 502},
		{"/bad/slowloris", 504},
		{"/bad/hangup", 502},
	}
	for _, tt := range tests {
		code, body := do(t, "POST", ts.URL+tt.path, "x")
		wantError(t, "POST "+tt.path, code, body, tt.code)
	}
	if n := <-trickled; n == trickle {
		t.Errorf("the slowloris node wrote all %d header bytes, want the proxy to hang up at its 300ms timeout", n)
	}
}

// TestProxyTLSNode: a node registered with the metadata https=true is
// called over TLS, verified against --client_ca_file, its connection
// reused.
func TestProxyTLSNode(t *testing.T) {
	t.Parallel()
	var accepts atomic.Int64
	node := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "tls=%v", r.TLS != nil)
	}))
	node.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			accepts.Add(1)
		}
	}
	node.StartTLS()
	t.Cleanup(node.Close)
	ca := t.TempDir() + "/ca.pem"
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: node.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := proxyTestConfig()
	cfg.ClientCAFile = ca
	_, ts := newTestServer(t, cfg)
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(node.URL, "https://"))
	reg := `{"Name":"go.micro.srv.secure","Nodes":[{"Id":"s","Address":"127.0.0.1","Port":` + port + `,"Metadata":{"https":"true"}}]}`
	if code, b := do(t, "POST", ts.URL+"/registry", reg, "Content-Type", "application/json"); code != 200 {
		t.Fatalf("register = %d %s", code, b)
	}
	for i := range 3 {
		if code, b := do(t, "GET", ts.URL+"/secure/x", ""); code != 200 || string(b) != "tls=true" {
			t.Fatalf("GET /secure/x #%d = %d %s, want 200 tls=true", i, code, b)
		}
	}
	if n := accepts.Load(); n != 1 {
		t.Errorf("TLS node accepted %d connections, want 1", n)
	}
}

// TestProxyCloseClosesPool: Close closes the idle connections to nodes.
func TestProxyCloseClosesPool(t *testing.T) {
	t.Parallel()
	s, ts := newTestServer(t, proxyTestConfig())
	var open atomic.Int64
	node := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	node.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			open.Add(1)
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	node.Start()
	t.Cleanup(node.Close)
	registerURLs(t, ts.URL, "go.micro.srv.pooled", node.URL)
	if code, b := do(t, "GET", ts.URL+"/pooled/x", ""); code != 200 {
		t.Fatalf("GET = %d %s", code, b)
	}
	if n := open.Load(); n != 1 {
		t.Fatalf("open connections to the node = %d, want 1", n)
	}
	s.proxy.Close()
	eventually(t, 2*time.Second, "pooled connection closed", func() bool { return open.Load() == 0 })
}

// TestProxyStreamsEndOnShutdown: a proxied event stream or chunked body
// that never ends does not hold shutdown for --shutdown_timeout: once
// serve's context is cancelled the stream ends cleanly (the caller sees
// the end of the body, not a broken connection) and serve returns.
func TestProxyStreamsEndOnShutdown(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, contentType string
	}{
		{"event stream", "text/event-stream"},
		{"chunked", "application/octet-stream"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			node := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", tt.contentType)
				io.WriteString(w, "data: first\n\n")
				w.(http.Flusher).Flush()
				<-r.Context().Done() // never ends on its own
			}))
			t.Cleanup(func() { node.CloseClientConnections(); node.Close() })

			cfg := proxyTestConfig()
			cfg.ShutdownTimeout = 10 * time.Second
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			served := make(chan error, 1)
			leaks := trackGoroutines(t, func() {
				s, err := newServer(cfg, testLogger(t))
				if err != nil {
					ln.Close()
					t.Fatalf("newServer: %v", err)
				}
				go func() { served <- s.serve(ctx, ln) }()
			})
			base := "http://" + ln.Addr().String()
			registerURLs(t, base, "go.micro.srv.events", node.URL)

			resp, err := http.Get(base + "/events/x")
			if err != nil {
				cancel()
				<-served
				t.Fatal(err)
			}
			defer resp.Body.Close()
			rd := bufio.NewReader(resp.Body)
			if line, err := rd.ReadString('\n'); err != nil || line != "data: first\n" {
				cancel()
				<-served
				t.Fatalf("first line = %q, %v; want %q", line, err, "data: first\n")
			}
			read := make(chan error, 1)
			go func() {
				_, err := io.ReadAll(rd)
				read <- err
			}()

			start := time.Now()
			cancel()
			select {
			case err := <-served:
				if err != nil {
					t.Errorf("serve: %v", err)
				}
			case <-time.After(cfg.ShutdownTimeout + 5*time.Second):
				t.Fatal("serve did not return")
			}
			if took := time.Since(start); took > 3*time.Second {
				t.Errorf("serve returned %s after shutdown began, want well under --shutdown_timeout %s", took, cfg.ShutdownTimeout)
			}
			select {
			case err := <-read:
				if err != nil {
					t.Errorf("stream ended with %v, want a clean end of the body", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the caller's stream did not end")
			}
			leaks() // serve returned: nothing of the server runs on
		})
	}
}

// TestProxyStalledUploadAnswered: a caller whose upload stalls gets the
// JSON error of the idle timeout, not a connection cut without an answer.
func TestProxyStalledUploadAnswered(t *testing.T) {
	t.Parallel()
	cfg := proxyTestConfig()
	cfg.ProxyIdleTimeout = 200 * time.Millisecond
	_, ts := newTestServer(t, cfg)
	node, _, hits := recordingBackend(t, "upload")
	registerURLs(t, ts.URL, "go.micro.srv.upload", node.URL)

	conn, err := net.Dial("tcp", ts.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, "POST /upload/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nx"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("read response to a stalled upload: %v; want the JSON error", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	wantError(t, "POST /upload/x with a stalled body", resp.StatusCode, body, http.StatusGatewayTimeout)
	if n := hits.Load(); n != 0 {
		t.Errorf("node answered %d requests, want 0 (the body never completed)", n)
	}
}
