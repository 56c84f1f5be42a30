package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// rawRPCNode is a JSON-RPC node speaking raw HTTP/1.1 over keep-alive
// connections: reply writes the answer to the n-th request the node got
// (from 0, over all connections), whose JSON-RPC id is id. It returns the
// node's URL.
func rawRPCNode(t *testing.T, reply func(c net.Conn, n int, id string)) string {
	t.Helper()
	var count atomic.Int64
	return rawBackend(t, func(c net.Conn, r *bufio.Reader) {
		for {
			_, body, err := readRawRequest(r)
			if err != nil {
				return
			}
			var req struct {
				ID json.RawMessage `json:"id"`
			}
			json.Unmarshal([]byte(body), &req)
			reply(c, int(count.Add(1)-1), string(req.ID))
		}
	})
}

// okReply is a well-formed JSON-RPC reply with result "ok".
func okReply(id string) string {
	body := `{"id":` + id + `,"result":"ok","error":null}`
	return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
}

// TestRPCReplyFramings: replies framed in each way HTTP/1.1 allows (and a
// few a node gets slightly wrong) give the caller the result, or a JSON
// error, and the call after each on the same node is answered: no reply
// is read into the next call's.
func TestRPCReplyFramings(t *testing.T) {
	t.Parallel()
	body := func(id string) string { return `{"id":` + id + `,"result":"first","error":null}` }
	tests := []struct {
		name  string
		reply func(id string) string
		code  int
	}{
		{"length", func(id string) string {
			return "HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len(body(id))) + "\r\n\r\n" + body(id)
		}, 200},
		{"chunked with trailer", func(id string) string {
			b := body(id)
			return "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n" + b[:3] + "\r\n" + strconv.FormatInt(int64(len(b)-3), 16) + "\r\n" + b[3:] + "\r\n0\r\nX-Sum: 1\r\n\r\n"
		}, 200},
		{"chunked and length", func(id string) string {
			b := body(id)
			return "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n" + strconv.FormatInt(int64(len(b)), 16) + "\r\n" + b + "\r\n0\r\n\r\n"
		}, 200},
		{"interim responses", func(id string) string {
			return "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" +
				"HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len(body(id))) + "\r\n\r\n" + body(id)
		}, 200},
		{"connection close", func(id string) string {
			return "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: " + strconv.Itoa(len(body(id))) + "\r\n\r\n" + body(id)
		}, 200},
		{"HTTP/1.0 keep-alive", func(id string) string {
			return "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: " + strconv.Itoa(len(body(id))) + "\r\n\r\n" + body(id)
		}, 200},
		{"no content", func(id string) string { return "HTTP/1.1 204 No Content\r\n\r\n" }, 502},
		{"empty length", func(id string) string { return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" }, 502},
		{"large", func(id string) string {
			b := `{"id":` + id + `,"result":"` + strings.Repeat("x", 3<<20) + `","error":null}`
			return "HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len(b)) + "\r\n\r\n" + b
		}, 200},
		// A node that counts its body short: a newline its encoder adds,
		// a length in characters rather than bytes (Python's len(str)).
		{"newline past length", func(id string) string {
			return "HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len(body(id))) + "\r\n\r\n" + body(id) + "\n"
		}, 200},
		{"length in characters", func(id string) string {
			b := `{"id":` + id + `,"result":"café","error":null}`
			return "HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len([]rune(b))) + "\r\n\r\n" + b
		}, 502},
		{"two replies", func(id string) string { return okReply(id) + okReply("null") }, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, ts := newTestServer(t, testConfig())
			node := rawRPCNode(t, func(c net.Conn, n int, id string) {
				if n == 0 {
					io.WriteString(c, tt.reply(id))
					return
				}
				io.WriteString(c, okReply(id))
			})
			registerURLs(t, ts.URL, "go.micro.srv.framing", node)
			code, got := do(t, "POST", ts.URL+"/framing/call", `{}`)
			if code != tt.code {
				t.Fatalf("first call = %d %s, want %d", code, got, tt.code)
			}
			if code != 200 {
				wantError(t, "first call", code, got, tt.code)
			}
			for i := range 3 {
				if code, got := do(t, "POST", ts.URL+"/framing/call", `{}`); code != 200 || string(got) != `"ok"` {
					t.Fatalf("call %d after the reply = %d %s, want 200 \"ok\"", i+2, code, got)
				}
			}
		})
	}
}

// TestRPCSlowReplyBounded: a node that sends its reply's head or body a
// byte at a time, finishing long after the call's timeout, gets the
// caller a 504 at the timeout, not the reply.
func TestRPCSlowReplyBounded(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.ClientRequestTimeout = 200 * time.Millisecond
	_, ts := newTestServer(t, cfg)
	drip := func(c net.Conn, s string) {
		for i := range len(s) {
			if _, err := c.Write([]byte{s[i]}); err != nil {
				return // the sidecar hung up
			}
			time.Sleep(5 * time.Millisecond) // the attack: a byte now and then
		}
	}
	for _, part := range []string{"head", "body"} {
		t.Run(part, func(t *testing.T) {
			node := rawRPCNode(t, func(c net.Conn, n int, id string) {
				r := okReply(id)
				pad := strings.Repeat(" ", 400) // 2 s of drip
				head, body, _ := strings.Cut(r, "\r\n\r\n")
				if part == "head" {
					drip(c, head+"\r\nX-Pad: "+pad+"\r\n\r\n"+body)
					return
				}
				b := `{"id":` + id + `,"result":"ok","error":null}` + pad
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: "+strconv.Itoa(len(b))+"\r\n\r\n")
				drip(c, b)
			})
			registerURLs(t, ts.URL, "go.micro.srv.drip"+part, node)
			code, got := do(t, "POST", ts.URL+"/drip"+part+"/call", `{}`)
			wantError(t, "POST /drip"+part+"/call", code, got, http.StatusGatewayTimeout)
		})
	}
}

// TestRPCNodeClosesAfterReply: a node that closes its connection after
// each reply without saying so (no Connection: close) costs no call: the
// next call, a POST that cannot be sent twice, does not go out on the
// closed connection.
func TestRPCNodeClosesAfterReply(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, testConfig())
	closed := make(chan struct{}, 10)
	node := rawRPCNode(t, func(c net.Conn, n int, id string) {
		io.WriteString(c, okReply(id))
		c.Close()
		closed <- struct{}{}
	})
	registerURLs(t, ts.URL, "go.micro.srv.closer", node)
	for i := range 4 {
		if code, got := do(t, "POST", ts.URL+"/closer/call", `{}`); code != 200 || string(got) != `"ok"` {
			t.Fatalf("call %d = %d %s, want 200 \"ok\"", i+1, code, got)
		}
		<-closed // the node has closed the connection the sidecar pooled
	}
}

// TestRPCConcurrentRepliesKeepTheirOwn: concurrent calls over the pooled
// connections of one node, with results small enough to be returned
// from the connection's buffer, larger than it, and chunked, each get
// their own result, whole (a result aliases its connection's buffer until
// it is written).
func TestRPCConcurrentRepliesKeepTheirOwn(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, testConfig())
	node := httptestServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Params []struct {
				I, N int
			} `json:"params"`
			ID json.RawMessage `json:"id"`
		}
		body, _ := io.ReadAll(r.Body)
		json.Unmarshal(body, &req)
		p := req.Params[0]
		reply := `{"id":` + string(req.ID) + `,"result":"` + strconv.Itoa(p.I) + strings.Repeat("x", p.N) + `","error":null}`
		if p.I%3 == 0 {
			io.WriteString(w, reply[:10]) // chunked: unknown length
			w.(http.Flusher).Flush()
			io.WriteString(w, reply[10:])
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(reply)))
		io.WriteString(w, reply)
	}))
	registerURLs(t, ts.URL, "go.micro.srv.many", node.URL)
	var next atomic.Int64
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 30 * time.Second}
	errs := make(chan string, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1))
				if i > 400 {
					return
				}
				n := []int{0, 100, 3000, 4090, 5000, 20000}[i%6]
				resp, err := client.Post(ts.URL+"/many/call", "application/json", strings.NewReader(fmt.Sprintf(`{"i":%d,"n":%d}`, i, n)))
				if err != nil {
					errs <- err.Error()
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if want := `"` + strconv.Itoa(i) + strings.Repeat("x", n) + `"`; resp.StatusCode != 200 || string(b) != want {
					errs <- fmt.Sprintf("call %d = %d %.80q (%d bytes), want 200 %.80q (%d bytes)", i, resp.StatusCode, b, len(b), want, len(want))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

// httptestServer is an httptest.Server closed at cleanup.
func httptestServer(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(h)
	t.Cleanup(s.Close)
	return s
}

// TestRPCCallerGoneMidReply: a caller that hangs up while the node is
// half way through its reply ends the backend exchange at once (the node
// sees its connection closed) on the connections serve accepts, and the
// half-read connection serves no other call.
func TestRPCCallerGoneMidReply(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.ClientRequestTimeout = time.Minute
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s, err := newServer(cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); <-served })
	base := "http://" + ln.Addr().String()

	halfway := make(chan struct{})
	nodeSawClose := make(chan struct{})
	node := rawRPCNode(t, func(c net.Conn, n int, id string) {
		if n > 0 {
			io.WriteString(c, okReply(id))
			return
		}
		b := `{"id":` + id + `,"result":"first","error":null}`
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: "+strconv.Itoa(len(b))+"\r\n\r\n"+b[:10])
		close(halfway)
		c.SetReadDeadline(time.Now().Add(time.Minute))
		if _, err := c.Read(make([]byte, 1)); err != nil {
			close(nodeSawClose) // the sidecar closed the connection
		}
		io.WriteString(c, b[10:]) // too late
	})
	registerURLs(t, base, "go.micro.srv.half", node)

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	body := `{"service":"go.micro.srv.half","method":"Half.X","request":{}}`
	fmt.Fprintf(c, "POST /rpc HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", ln.Addr(), len(body), body)
	<-halfway
	c.Close()
	select {
	case <-nodeSawClose:
	case <-time.After(30 * time.Second):
		t.Fatal("the node's connection stayed open 30s after the caller left")
	}
	for i := range 3 {
		if code, got := do(t, "POST", base+"/half/call", `{}`); code != 200 || string(got) != `"ok"` {
			t.Fatalf("call %d after = %d %s, want 200 \"ok\"", i+1, code, got)
		}
	}
}

// TestRPCReplyLengthNotTrusted: a reply that announces a body near the
// limit and sends a few bytes of it costs the sidecar about what arrived,
// not what was announced: a node's word alone does not make it allocate
// 16 MB a call. Not parallel: it counts the process's allocations.
func TestRPCReplyLengthNotTrusted(t *testing.T) {
	_, ts := newTestServer(t, testConfig())
	node := rawRPCNode(t, func(c net.Conn, n int, id string) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: "+strconv.Itoa(maxReplyBytes)+"\r\n\r\n{\"id\":"+id)
		c.Close()
	})
	registerURLs(t, ts.URL, "go.micro.srv.liar", node)
	do(t, "POST", ts.URL+"/liar/call", `{}`) // warm: pools, registry
	const calls = 10
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range calls {
		code, got := do(t, "POST", ts.URL+"/liar/call", `{}`)
		wantError(t, "POST /liar/call", code, got, http.StatusBadGateway)
	}
	runtime.ReadMemStats(&after)
	if perCall := (after.TotalAlloc - before.TotalAlloc) / calls; perCall > 1<<20 {
		t.Errorf("a call whose reply announced %d bytes and sent a few allocated %d bytes, want well under 1 MiB", maxReplyBytes, perCall)
	}
}

// TestRPCCallerNotReadingBounded: a caller that asks for a large result
// and never reads it holds the call (its goroutine, the result, and the
// backend connection the result was read from) for a bounded time, not
// for as long as it keeps its connection open.
func TestRPCCallerNotReadingBounded(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.ClientRequestTimeout = time.Second // the node's reply must arrive within it, the caller's reading not
	s, ts := newTestServer(t, cfg)
	big := strings.Repeat("x", 6<<20) // more than the socket buffers hold (4 MiB at most on Linux)
	node := rawRPCNode(t, func(c net.Conn, n int, id string) {
		b := `{"id":` + id + `,"result":"` + big + `","error":null}`
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: "+strconv.Itoa(len(b))+"\r\n\r\n"+b)
	})
	registerURLs(t, ts.URL, "go.micro.srv.big", node)
	idle := func() int {
		n := 0
		s.rpc.conns.pools.Range(func(_, v any) bool {
			p := v.(*connPool)
			p.mu.Lock()
			n += len(p.idle)
			p.mu.Unlock()
			return true
		})
		return n
	}

	c, err := net.Dial("tcp", ts.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.(*net.TCPConn).SetReadBuffer(4 << 10)
	body := `{"service":"go.micro.srv.big","method":"Big.X","request":{}}`
	fmt.Fprintf(c, "POST /rpc HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", ts.Listener.Addr(), len(body), body)
	// The caller reads nothing; the call must end, and give its backend
	// connection back, on its own.
	eventually(t, 30*time.Second, "the backend connection back in the pool", func() bool { return idle() == 1 })
}
