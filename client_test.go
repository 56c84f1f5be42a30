package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestHopByHop is the table of the one hop-by-hop policy (RFC 9110
// section 7.6.1), run through every place that applies it: RPC's backend
// header, the proxy's request head and response header, and the broker's
// message header. Each row lists the fields of a message and the names
// that must survive; the fields are ones no place drops for its own
// reasons.
func TestHopByHop(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		fields []string // name, value, name, value, ...
		want   []string // canonical names that are passed on
	}{
		{
			name: "the fields of the RFC and the ones proxies used",
			fields: []string{"Connection", "keep-alive", "Keep-Alive", "timeout=5", "Proxy-Connection", "keep-alive",
				"Proxy-Authenticate", "Basic", "Proxy-Authorization", "Basic eA==", "Te", "gzip", "Trailer", "X-Sum",
				"Transfer-Encoding", "chunked", "Upgrade", "h2c", "X-End", "1"},
			want: []string{"X-End"},
		},
		{
			name:   "fields named by Connection",
			fields: []string{"Connection", "X-Hop, x-other", "X-Hop", "1", "X-Other", "2", "X-End", "3"},
			want:   []string{"X-End"},
		},
		{
			name:   "Connection over two lines, with spaces and tabs",
			fields: []string{"Connection", "close", "Connection", " X-A ,\tX-B\t", "X-A", "1", "X-B", "2", "X-C", "3"},
			want:   []string{"X-C"},
		},
		{
			name:   "an end-to-end field named by Connection",
			fields: []string{"Connection", "Cache-Control", "Cache-Control", "no-cache", "Accept", "*/*"},
			want:   []string{"Accept"},
		},
		{
			name:   "options compared without regard to case",
			fields: []string{"Connection", "X-HOP", "X-Hop", "1", "X-End", "2"},
			want:   []string{"X-End"},
		},
		{
			name:   "empty options name nothing",
			fields: []string{"Connection", " , ,", "X-A", "1"},
			want:   []string{"X-A"},
		},
		{
			name:   "a name that only contains an option stays",
			fields: []string{"Connection", "X-Ho", "X-Hop", "1", "X-H", "2"},
			want:   []string{"X-H", "X-Hop"},
		},
		{
			name:   "no hop-by-hop field",
			fields: []string{"Accept", "*/*", "X-A", "1", "Cache-Control", "no-cache"},
			want:   []string{"Accept", "Cache-Control", "X-A"},
		},
	}
	// Each place, given the fields, returns the canonical names it passes on
	// among them.
	places := []struct {
		name string
		pass func(t *testing.T, h http.Header) http.Header
	}{
		{"rpc request head", func(t *testing.T, h http.Header) http.Header {
			r, err := http.NewRequest(http.MethodPost, "http://sidecar/rpc", nil)
			if err != nil {
				t.Fatal(err)
			}
			r.Header = h
			var buf bytes.Buffer
			bw := bufio.NewWriter(&buf)
			c := &rpcCall{service: "svc", method: "S.M", request: []byte("{}")}
			writeRPCRequest(bw, r, "node:80", c, []byte(`"S.M"`), []byte("1"), time.Second, "1.1 sidecar-0123456789abcdef", false)
			bw.Flush()
			out, err := http.ReadRequest(bufio.NewReader(&buf))
			if err != nil {
				t.Fatalf("writeRPCRequest wrote %q: %v", buf.String(), err)
			}
			return out.Header
		}},
		{"removeHopByHop", func(t *testing.T, h http.Header) http.Header {
			removeHopByHop(h)
			return h
		}},
		{"proxy request head", func(t *testing.T, h http.Header) http.Header {
			r, err := http.NewRequest(http.MethodGet, "http://sidecar/svc/x", nil)
			if err != nil {
				t.Fatal(err)
			}
			r.Header = h
			r.RemoteAddr = "127.0.0.1:5000"
			var buf bytes.Buffer
			bw := bufio.NewWriter(&buf)
			writeRequestHead(bw, r, "node:80", "", 0, false, nil)
			bw.Flush()
			out, err := http.ReadRequest(bufio.NewReader(&buf))
			if err != nil {
				t.Fatalf("writeRequestHead wrote %q: %v", buf.String(), err)
			}
			return out.Header
		}},
		{"proxy response header", func(t *testing.T, h http.Header) http.Header {
			var raw strings.Builder
			raw.WriteString("HTTP/1.1 200 OK\r\n")
			for k, vv := range h {
				for _, v := range vv {
					raw.WriteString(k + ": " + v + "\r\n")
				}
			}
			raw.WriteString("\r\n")
			c := &backendConn{br: bufio.NewReader(strings.NewReader(raw.String()))}
			head, _, err := c.readResponseHead(backendHeaderSize)
			if err != nil {
				t.Fatalf("readResponseHead(%q): %v", raw.String(), err)
			}
			out := http.Header{}
			c.header(out, head.chunked)
			return out
		}},
		{"broker messageHeader", func(t *testing.T, h http.Header) http.Header {
			out := http.Header{}
			for k, v := range messageHeader(h) {
				out[k] = []string{v}
			}
			return out
		}},
	}
	for _, tt := range tests {
		for _, pl := range places {
			t.Run(tt.name+"/"+pl.name, func(t *testing.T) {
				in := http.Header{}
				for i := 0; i < len(tt.fields); i += 2 {
					in.Add(tt.fields[i], tt.fields[i+1])
				}
				out := pl.pass(t, in.Clone())
				var got []string
				for k := range in {
					if _, ok := out[k]; ok {
						got = append(got, k)
					}
				}
				slices.Sort(got)
				if !slices.Equal(got, tt.want) {
					t.Errorf("%s passes on %v of %v, want %v", pl.name, got, in, tt.want)
				}
			})
		}
	}
}

// TestHopByHopNoAlloc: the proxy and RPC apply the policy on their hot
// paths without allocating: writing a request head with hop-by-hop fields
// and Connection options, and a new traceparent, allocates nothing.
func TestHopByHopNoAlloc(t *testing.T) {
	r, err := http.NewRequest(http.MethodGet, "http://sidecar/svc/x?y=1", nil)
	if err != nil {
		t.Fatal(err)
	}
	r.RequestURI = "/svc/x?y=1" // as the server sets it
	r.RemoteAddr = "127.0.0.1:5000"
	r.Header = http.Header{
		"Accept":     {"*/*"},
		"User-Agent": {"test"},
		"Connection": {"keep-alive, X-Hop"},
		"Keep-Alive": {"timeout=5"},
		"X-Hop":      {"1"},
		"Te":         {"trailers"},
	}
	bw := bufio.NewWriterSize(&bytes.Buffer{}, 4<<10)
	trace := appendTraceparent(nil) // the caller sent none: the sidecar starts one
	if n := testing.AllocsPerRun(100, func() {
		writeRequestHead(bw, r, "node:80", "1.1 sidecar-0123456789abcdef", 0, true, trace)
		bw.Reset(nil)
	}); n != 0 {
		t.Errorf("writeRequestHead allocates %v times per request, want 0", n)
	}
	c := &rpcCall{service: "go.micro.srv.svc", method: "Svc.X", request: []byte(`{"a":1}`)}
	method, id := []byte(`"Svc.X"`), []byte("12")
	if n := testing.AllocsPerRun(100, func() {
		writeRPCRequest(bw, r, "node:80", c, method, id, time.Second, "1.1 sidecar-0123456789abcdef", true)
		bw.Reset(nil)
	}); n != 0 {
		t.Errorf("writeRPCRequest allocates %v times per call, want 0", n)
	}
	if n := testing.AllocsPerRun(100, func() {
		if !hopByHop("X-Hop", r.Header["Connection"]) || hopByHop("Accept", r.Header["Connection"]) {
			t.Fatal("hopByHop is wrong about X-Hop or Accept")
		}
	}); n != 0 {
		t.Errorf("hopByHop allocates %v times, want 0", n)
	}
}

// TestCallJSON: the one way the sidecar calls a JSON API, against a real
// server: a 2xx answer is decoded, any other status is a *statusError with
// the sidecar's error detail or the start of the body, and the answer is
// read within the limit.
func TestCallJSON(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
			io.WriteString(w, `{"name":"a"}`)
		case "/sidecar-error":
			writeError(w, http.StatusNotFound, "service %q not found", "x")
		case "/text-error":
			http.Error(w, "  unknown service  ", http.StatusBadRequest)
		case "/big":
			io.WriteString(w, `{"name":"`+strings.Repeat("x", 100)+`"}`)
		case "/big-error":
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, strings.Repeat("y", 100))
		case "/bad-json":
			io.WriteString(w, `{"name":`)
		case "/echo":
			w.Header().Set("X-Got-Type", r.Header.Get("Content-Type"))
			io.Copy(w, r.Body)
		}
	}))
	t.Cleanup(srv.Close)
	type named struct{ Name string }
	tests := []struct {
		path     string
		limit    int64
		wantName string
		wantCode int    // of a *statusError
		wantText string // in the error
	}{
		{path: "/ok", limit: 64, wantName: "a"},
		{path: "/sidecar-error", limit: 1024, wantCode: 404, wantText: `status 404: service "x" not found`},
		{path: "/text-error", limit: 64, wantCode: 400, wantText: "status 400: unknown service"},
		{path: "/big", limit: 64, wantText: "exceeds 64 bytes"},
		{path: "/big-error", limit: 64, wantCode: 503, wantText: "status 503: " + strings.Repeat("y", 64)},
		{path: "/bad-json", limit: 64, wantText: "bad JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			req, err := newJSONRequest(context.Background(), http.MethodGet, srv.URL+tt.path, nil)
			if err != nil {
				t.Fatal(err)
			}
			var out named
			_, _, err = callJSON(srv.Client(), req, tt.limit, &out)
			var se *statusError
			switch {
			case tt.wantText == "" && err != nil:
				t.Fatalf("callJSON(%s) = %v, want no error", tt.path, err)
			case tt.wantText != "" && (err == nil || !strings.Contains(err.Error(), tt.wantText)):
				t.Fatalf("callJSON(%s) = %v, want an error with %q", tt.path, err, tt.wantText)
			case tt.wantCode != 0 && (!errors.As(err, &se) || se.code != tt.wantCode):
				t.Fatalf("callJSON(%s) = %#v, want a *statusError with code %d", tt.path, err, tt.wantCode)
			case tt.wantCode == 0 && errors.As(err, &se):
				t.Fatalf("callJSON(%s) = %v, a *statusError for a 2xx answer", tt.path, err)
			}
			if out.Name != tt.wantName {
				t.Errorf("callJSON(%s) decoded name %q, want %q", tt.path, out.Name, tt.wantName)
			}
		})
	}

	t.Run("JSON body", func(t *testing.T) {
		req, err := newJSONRequest(context.Background(), http.MethodPost, srv.URL+"/echo", named{"b"})
		if err != nil {
			t.Fatal(err)
		}
		var out named
		resp, _, err := callJSON(srv.Client(), req, 64, &out)
		if err != nil || out.Name != "b" || resp.Header.Get("X-Got-Type") != "application/json" {
			t.Fatalf("callJSON(POST /echo) = %v, %+v, Content-Type %q; want the body back as JSON", err, out, resp.Header.Get("X-Got-Type"))
		}
	})

	t.Run("refused", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		req, _ := newJSONRequest(context.Background(), http.MethodGet, "http://"+addr+"/", nil)
		resp, _, err := callJSON(http.DefaultClient, req, 64, nil)
		var op *net.OpError
		if resp != nil || !errors.As(err, &op) || op.Op != "dial" {
			t.Fatalf("callJSON to a closed port = %v, %v; want a dial error and no response", resp, err)
		}
	})
}

// loopRelay is a TCP relay to target (host:port) that counts the
// connections it carries: a load balancer in front of a sidecar, which
// the registry cannot tell from a node. Past limit it closes new
// connections at once, so a request loop in the code under test ends
// instead of exhausting descriptors. It returns the relay's URL.
func loopRelay(t *testing.T, target string, limit int64) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex // guards open
	open := map[net.Conn]bool{}
	track := func(c net.Conn, add bool) {
		mu.Lock()
		defer mu.Unlock()
		if add {
			open[c] = true
		} else {
			delete(open, c)
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if conns.Add(1) > limit {
				c.Close()
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				up, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer up.Close()
				track(c, true)
				track(up, true)
				defer track(c, false)
				defer track(up, false)
				done := make(chan struct{})
				go func() {
					io.Copy(up, c)
					up.(*net.TCPConn).CloseWrite()
					close(done)
				}()
				io.Copy(c, up)
				c.(*net.TCPConn).CloseWrite()
				<-done
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return "http://" + ln.Addr().String(), &conns
}

// loopLimit is how many connections a loopRelay carries: enough for every
// test's legitimate requests, few enough that a loop ends quickly.
const loopLimit = 40

// TestLoopRefused is the request loop of issue 13 through the real
// server: a service whose node is the sidecar itself (here behind a
// relay, as behind a load balancer, so no check at registration can see
// it). One request is one JSON 508, after one forwarded request, in every
// mode: the proxy (ordinary and websocket upgrades), RPC by path and
// /rpc. Before Via, the proxy recursed until the relay stopped it, and
// RPC answered a 502 about the sidecar's own 404.
func TestLoopRefused(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, handler, method, path, body string
		upgrade                           bool
	}{
		{name: "proxy GET", handler: "proxy", method: "GET", path: "/loop/x?y=1"},
		{name: "proxy POST", handler: "proxy", method: "POST", path: "/loop/x", body: "some body"},
		{name: "proxy websocket", handler: "proxy", method: "GET", path: "/loop/ws", upgrade: true},
		{name: "rpc by path", handler: "rpc", method: "POST", path: "/loop/call", body: `{"a":1}`},
		{name: "rpc by GET path", handler: "rpc", method: "GET", path: "/loop/call?a=1"},
		{name: "/rpc", handler: "rpc", method: "POST", path: "/rpc", body: `{"service":"go.micro.srv.loop","method":"Loop.Call","request":{}}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := testConfig()
			cfg.Handler = tt.handler
			_, ts := newTestServer(t, cfg)
			relay, conns := loopRelay(t, ts.Listener.Addr().String(), loopLimit)
			registerURLs(t, ts.URL, "go.micro.srv.loop", relay)
			call := tt.method + " " + tt.path
			if tt.upgrade {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				c, resp, err := websocket.Dial(ctx, ts.URL+tt.path, nil)
				if err == nil {
					c.CloseNow()
					t.Fatalf("websocket %s through a loop: connected, want 508", tt.path)
				}
				if resp == nil {
					t.Fatalf("websocket %s: %v, want a 508 answer", tt.path, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				wantError(t, call, resp.StatusCode, body, http.StatusLoopDetected)
			} else {
				code, body := do(t, tt.method, ts.URL+tt.path, tt.body, "Content-Type", "application/json")
				e := wantError(t, call, code, body, http.StatusLoopDetected)
				if !strings.Contains(e.Detail, "loop") {
					t.Errorf("%s: detail %q does not say loop", call, e.Detail)
				}
			}
			if n := conns.Load(); n != 1 {
				t.Errorf("%s: the loop took %d connections through the relay, want 1", call, n)
			}
			if n := getMetrics(t, ts.URL)["sidecar_loops_refused_total"]; n != 1 {
				t.Errorf("%s: sidecar_loops_refused_total = %v, want 1", call, n)
			}
		})
	}
}

// TestLoopTwoSidecars: sidecars chained on purpose work, each adding
// itself to Via after what the caller sent; two that name each other
// are a loop (508 at once); and a request that passed through more
// sidecars than maxSidecarHops is refused wherever that happens.
func TestLoopTwoSidecars(t *testing.T) {
	t.Parallel()
	a, tsA := newTestServer(t, proxyTestConfig())
	b, tsB := newTestServer(t, proxyTestConfig())
	node, last, hits := recordingBackend(t, "node")
	relayA, connsA := loopRelay(t, tsA.Listener.Addr().String(), loopLimit)
	relayB, connsB := loopRelay(t, tsB.Listener.Addr().String(), loopLimit)
	registerURLs(t, tsA.URL, "go.micro.srv.chain", relayB)
	registerURLs(t, tsB.URL, "go.micro.srv.chain", node.URL)
	registerURLs(t, tsA.URL, "go.micro.srv.ring", relayB)
	registerURLs(t, tsB.URL, "go.micro.srv.ring", relayA)
	if a.via.id == b.via.id || !strings.HasPrefix(a.via.id, "sidecar-") {
		t.Fatalf("sidecar ids %q and %q: want two different sidecar-<id>", a.via.id, b.via.id)
	}

	code, body := do(t, "GET", tsA.URL+"/ring/x", "")
	wantError(t, "GET /ring/x (A and B name each other)", code, body, http.StatusLoopDetected)
	if na, nb := connsA.Load(), connsB.Load(); na != 1 || nb != 1 {
		t.Errorf("the ring took %d connections to A and %d to B, want 1 each", na, nb)
	}

	code, body = do(t, "GET", tsA.URL+"/chain/x", "", "Via", "1.0 fred, 1.1 p.example.net (Apache/1.1)")
	if code != http.StatusOK || string(body) != "node node" {
		t.Fatalf("GET /chain/x through two sidecars = %d %s, want 200 from the node", code, body)
	}
	want := "1.0 fred, 1.1 p.example.net (Apache/1.1), 1.1 " + a.via.id + ", 1.1 " + b.via.id
	if got := strings.Join(last().header.Values("Via"), ", "); got != want {
		t.Errorf("node got Via %q, want %q", got, want)
	}

	fakes := func(n int) string {
		var v []string
		for i := range n {
			v = append(v, fmt.Sprintf("1.1 sidecar-%016x", i+1))
		}
		return strings.Join(v, ", ")
	}
	for _, tt := range []struct {
		before int // sidecars the request passed through before A
		code   int
	}{
		{maxSidecarHops - 2, http.StatusOK},           // A and B make the most
		{maxSidecarHops - 1, http.StatusLoopDetected}, // B would be one too many
		{maxSidecarHops, http.StatusLoopDetected},     // A would be
		{maxSidecarHops + 5, http.StatusLoopDetected},
	} {
		before := hits.Load()
		code, body := do(t, "GET", tsA.URL+"/chain/hops", "", "Via", fakes(tt.before))
		call := fmt.Sprintf("GET /chain/hops after %d sidecars", tt.before)
		if tt.code == http.StatusOK {
			if code != http.StatusOK {
				t.Errorf("%s = %d %s, want 200", call, code, body)
			}
			if n := strings.Count(strings.Join(last().header.Values("Via"), ","), "sidecar-"); n != maxSidecarHops {
				t.Errorf("%s: node saw %d sidecars in Via, want %d", call, n, maxSidecarHops)
			}
			continue
		}
		wantError(t, call, code, body, tt.code)
		if hits.Load() != before {
			t.Errorf("%s reached the node", call)
		}
	}
}

// TestBinarySelfLoop is the reproduction of issue 13 with the built
// binary: a service whose node leads back to the sidecar, one request.
// Before Via, the proxy recursed about 6,000 times (12k descriptors,
// hundreds of MB) and answered a plain-text 431; RPC answered a 502. Now
// it is one JSON 508 and the descriptors stay put. The node is a relay in
// front of the sidecar, as a load balancer would be: the registry refuses
// a node at the sidecar's own address (TestRegistryRefusesOwnAddress), so
// the report's registration no longer gets as far as a loop.
func TestBinarySelfLoop(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct{ handler, method, path, body string }{
		{"proxy", "GET", "/loop/x", ""},
		{"rpc", "POST", "/loop/call", "{}"},
	} {
		t.Run(tt.handler, func(t *testing.T) {
			t.Parallel()
			cmd, base, stderr := startBinary(t, "--handler", tt.handler)
			relay, conns := loopRelay(t, strings.TrimPrefix(base, "http://"), loopLimit)
			registerURLs(t, base, "go.micro.srv.loop", relay)
			pid := cmd.Process.Pid
			fds, rss := procFDs(t, pid), procRSS(t, pid)
			code, body := do(t, tt.method, base+tt.path, tt.body)
			wantError(t, tt.method+" "+tt.path+" at a node that is the sidecar", code, body, http.StatusLoopDetected)
			if n := conns.Load(); n != 1 {
				t.Errorf("the loop took %d connections through the relay, want 1", n)
			}
			fdsAfter, rssAfter := procFDs(t, pid), procRSS(t, pid)
			if fdsAfter > fds+16 {
				t.Errorf("descriptors went from %d to %d; stderr: %.2000s", fds, fdsAfter, stderr)
			}
			t.Logf("%s: descriptors %d -> %d, RSS %d kB -> %d kB", tt.handler, fds, fdsAfter, rss, rssAfter)
		})
	}
}

// TestViaCheck is the table of the Via parser: which fields are this
// sidecar (a loop), which count as sidecar hops, and what is neither.
func TestViaCheck(t *testing.T) { // not parallel: AllocsPerRun
	v := newVia()
	other := func(i int) string { return fmt.Sprintf("sidecar-%016x", i) }
	many := func(n int) []string {
		var out []string
		for i := range n {
			out = append(out, "1.1 "+other(i+1))
		}
		return out
	}
	tests := []struct {
		name   string
		values []string
		refuse bool
	}{
		{"none", nil, false},
		{"others", []string{"1.0 fred, 1.1 p.example.net"}, false},
		{"this sidecar", []string{"1.1 " + v.id}, true},
		{"this sidecar, HTTP/2", []string{"2 " + v.id}, true},
		{"this sidecar with a protocol name", []string{"HTTP/1.1 " + v.id}, true},
		{"this sidecar after others, in a second line", []string{"1.0 fred", "1.1 a, 1.1 " + v.id + " (sidecar)"}, true},
		{"this sidecar, tabs and spaces", []string{" 1.1\t" + v.id + "\t,1.0 fred"}, true},
		{"this sidecar named only in a comment", []string{"1.1 proxy (forwarded to 1.1 " + v.id + ", really)"}, false},
		{"a comment with nested parentheses and a quoted one", []string{`1.1 a (x (y, 1.1 ` + v.id + `) \) , 1.1 ` + v.id + `), 1.0 b`}, false},
		{"this id as a prefix of another name", []string{"1.1 " + v.id + "x"}, false},
		{"a received-by without protocol", []string{v.id}, false},
		{"other sidecars under the limit", many(maxSidecarHops - 1), false},
		{"other sidecars at the limit", many(maxSidecarHops), true},
		{"other sidecars in one line", []string{strings.Join(many(maxSidecarHops), ", ")}, true},
		{"names that only look like sidecars do not count", append(many(maxSidecarHops-1), "1.1 sidecar-envoy", "1.1 sidecar-0123456789ABCDEF"), false},
		{"empty entries", []string{",,, ,", ""}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := v.check(tt.values)
			if (err != nil) != tt.refuse {
				t.Errorf("check(%q) = %v, want refused %v", tt.values, err, tt.refuse)
			}
		})
	}
	r := &http.Request{ProtoMajor: 1, ProtoMinor: 0}
	if got := v.appendTo([]string{"1.0 fred"}, r); len(got) != 2 || got[1] != "1.0 "+v.id {
		t.Errorf("appendTo for an HTTP/1.0 request = %q", got)
	}
	values := many(maxSidecarHops - 1)
	if n := testing.AllocsPerRun(100, func() { v.check(values) }); n != 0 {
		t.Errorf("check of a request let through allocates %v times, want 0", n)
	}
}

// FuzzVia: the Via parser never panics, and a field that ends with this
// sidecar's entry is always refused, whatever comes before it (a comment
// left open swallows what follows it, so the prefix is closed first).
func FuzzVia(f *testing.F) {
	for _, s := range []string{"1.0 fred, 1.1 p.example.net", "1.1 a (x (y, z) \\) w)", "(((", "\\", ",,,", "HTTP/2 sidecar-0123456789abcdef"} {
		f.Add(s)
	}
	v := newVia()
	f.Fuzz(func(t *testing.T, s string) {
		v.check([]string{s})
		if strings.ContainsAny(s, "()\\") {
			return
		}
		if err := v.check([]string{s, "1.1 " + v.id}); err == nil {
			t.Errorf("check(%q, this sidecar) let the request through", s)
		}
	})
}

// TestDialErrorSaidOnce: a node that refuses connections is named once
// and the refusal said once, by RPC and by the proxy alike (the detail
// read "connect: connect: connection refused").
func TestDialErrorSaidOnce(t *testing.T) {
	t.Parallel()
	port := freePort(t) // nothing listens there once freePort returns
	tests := []struct {
		name   string
		cfg    *Config
		method string
		path   string
		want   string
	}{
		{"rpc", testConfig(), "POST", "/gone/call", fmt.Sprintf("rpc: call go.micro.srv.gone: connect to 127.0.0.1:%d: connection refused", port)},
		{"proxy", proxyTestConfig(), "GET", "/gone/call", fmt.Sprintf("proxy: GET /gone/call to go.micro.srv.gone: connect to 127.0.0.1:%d: connection refused", port)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, ts := newTestServer(t, tt.cfg)
			registerURLs(t, ts.URL, "go.micro.srv.gone", fmt.Sprintf("http://127.0.0.1:%d", port))
			code, body := do(t, tt.method, ts.URL+tt.path, `{}`)
			if e := wantError(t, tt.method+" "+tt.path, code, body, http.StatusServiceUnavailable); e.Detail != tt.want {
				t.Errorf("%s %s detail = %q, want %q", tt.method, tt.path, e.Detail, tt.want)
			}
		})
	}
}
