package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/coder/websocket"
)

// wsURL turns the test server's URL and a path into a websocket URL.
func wsURL(ts *httptest.Server, path string) string {
	return "ws" + strings.TrimPrefix(ts.URL, "http") + path
}

// dialBroker opens a websocket to path as the seed's Go example does (an
// empty header) and closes it when the test ends.
func dialBroker(t *testing.T, ts *httptest.Server, path string) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, resp, err := websocket.Dial(ctx, wsURL(ts, path), &websocket.DialOptions{HTTPHeader: make(http.Header)})
	if err != nil {
		t.Fatalf("dial %s: %v (response %v)", path, err, resp)
	}
	conn.SetReadLimit(8 << 20)
	t.Cleanup(func() { conn.CloseNow() })
	return conn
}

// waitSubscribers waits until the broker counts n subscribers.
func waitSubscribers(t *testing.T, s *server, n int64) {
	t.Helper()
	eventually(t, 5*time.Second, fmt.Sprintf("%d subscribers", n), func() bool { return s.broker.subscribers.Load() == n })
}

// readMessage reads one frame and decodes it as the seed's client does.
func readMessage(t *testing.T, ctx context.Context, conn *websocket.Conn) Message {
	t.Helper()
	typ, p, err := conn.Read(ctx)
	if err != nil {
		t.Fatalf("read message: %v", err)
	}
	if typ != websocket.MessageText {
		t.Fatalf("message type = %v, want text", typ)
	}
	var m Message
	if err := json.Unmarshal(p, &m); err != nil {
		t.Fatalf("frame %q is not a broker message: %v", p, err)
	}
	return m
}

func TestBrokerSeedPublish(t *testing.T) {
	s, ts := newTestServer(t, nil)
	sub := dialBroker(t, ts, "/broker?topic=foo")
	waitSubscribers(t, s, 1)

	// The seed's curl: -H "Timestamp: ..." -d "Hello World!" sends
	// Content-Type application/x-www-form-urlencoded.
	code, body := do(t, "POST", ts.URL+"/broker?topic=foo", "Hello World!",
		"Timestamp", "1499951537", "Content-Type", "application/x-www-form-urlencoded")
	if code != http.StatusOK {
		t.Fatalf("POST /broker?topic=foo = %d %s, want 200", code, body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m := readMessage(t, ctx, sub)
	if string(m.Body) != "Hello World!" || m.Header["Timestamp"] != "1499951537" {
		t.Fatalf("got Body %q Header %v, want Body %q with Timestamp 1499951537", m.Body, m.Header, "Hello World!")
	}

	curl := requireTool(t, "curl")
	out, err := exec.Command(curl, "-sS", "-XPOST", "-H", "Timestamp: 1499951538", "-d", "Hello World!", ts.URL+"/broker?topic=foo").CombinedOutput()
	if err != nil {
		t.Fatalf("curl: %v: %s", err, out)
	}
	m = readMessage(t, ctx, sub)
	if string(m.Body) != "Hello World!" || m.Header["Timestamp"] != "1499951538" || m.Header["Content-Type"] != "application/x-www-form-urlencoded" {
		t.Fatalf("after curl got Body %q Header %v, want Hello World! with Timestamp and curl's Content-Type", m.Body, m.Header)
	}
}

func TestBrokerQueueGroup(t *testing.T) {
	s, ts := newTestServer(t, nil)
	g1 := dialBroker(t, ts, "/broker?topic=orders&queue=g")
	g2 := dialBroker(t, ts, "/broker?topic=orders&queue=g")
	all := dialBroker(t, ts, "/broker?topic=orders")
	waitSubscribers(t, s, 3)

	const n = 100
	for i := range n {
		if code, body := do(t, "POST", ts.URL+"/broker?topic=orders", strconv.Itoa(i)); code != http.StatusOK {
			t.Fatalf("publish %d = %d %s", i, code, body)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for i := range n {
		if m := readMessage(t, ctx, all); string(m.Body) != strconv.Itoa(i) {
			t.Fatalf("plain subscriber message %d = %q, want %d", i, m.Body, i)
		}
	}

	var mu sync.Mutex
	got := map[string]int{}
	counts := make([]int, 2)
	total := 0
	var wg sync.WaitGroup
	readCtx, stop := context.WithCancel(ctx)
	defer stop()
	for i, c := range []*websocket.Conn{g1, g2} {
		wg.Go(func() {
			for {
				_, p, err := c.Read(readCtx)
				if err != nil {
					return
				}
				var m Message
				json.Unmarshal(p, &m)
				mu.Lock()
				got[string(m.Body)]++
				counts[i]++
				total++
				if total == n {
					stop()
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if total != n || len(got) != n {
		t.Fatalf("queue group got %d messages, %d distinct, want %d distinct", total, len(got), n)
	}
	for body, c := range got {
		if c != 1 {
			t.Errorf("message %s delivered %d times in the group, want once", body, c)
		}
	}
	if counts[0] == 0 || counts[1] == 0 {
		t.Errorf("group split %v, want both members to get messages", counts)
	}
}

func TestBrokerSlowSubscriber(t *testing.T) {
	s, ts := newTestServer(t, nil)
	s.broker.queueLen = 64
	s.broker.queueBytes = 1 << 20
	s.broker.writeTimeout = time.Second

	// The slow client never reads, and its small receive buffer makes
	// the sidecar's writes block soon.
	dialer := &net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
		var err error
		c.Control(func(fd uintptr) { err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return err
	}}
	dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer dcancel()
	slow, _, err := websocket.Dial(dctx, wsURL(ts, "/broker?topic=load"), &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}},
	})
	if err != nil {
		t.Fatalf("dial slow subscriber: %v", err)
	}
	t.Cleanup(func() { slow.CloseNow() })
	good := dialBroker(t, ts, "/broker?topic=load")
	pub := dialBroker(t, ts, "/broker?topic=load")
	waitSubscribers(t, s, 3)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// The publisher is a subscriber too: it reads its own messages.
	var echoed atomic.Int64
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		for {
			if _, _, err := pub.Read(ctx); err != nil {
				return
			}
			echoed.Add(1)
		}
	}()
	t.Cleanup(func() { pub.CloseNow(); <-pubDone })

	var received atomic.Int64
	goodDone := make(chan error, 1)
	go func() {
		for {
			_, p, err := good.Read(ctx)
			if err != nil {
				goodDone <- err
				return
			}
			if !bytes.HasPrefix(p, []byte(`{"Header":{},"Body":"`)) {
				goodDone <- fmt.Errorf("bad frame %.40q", p)
				return
			}
			received.Add(1)
		}
	}()

	const n, chunk = 10_000, 50
	body := bytes.Repeat([]byte("x"), 1024)
	for sent := 0; sent < n; {
		for range chunk {
			if err := pub.Write(ctx, websocket.MessageBinary, body); err != nil {
				t.Fatalf("publish after %d: %v (slow disconnects %d)", sent, err, s.broker.slowDisconnects.Load())
			}
			sent++
		}
		for received.Load() < int64(sent) || echoed.Load() < int64(sent) {
			select {
			case err := <-goodDone:
				t.Fatalf("good subscriber stopped after %d of %d: %v", received.Load(), sent, err)
			case <-pubDone:
				t.Fatalf("publisher stopped reading after %d of %d", echoed.Load(), sent)
			case <-time.After(time.Millisecond):
			}
		}
	}
	if got := received.Load(); got != n {
		t.Fatalf("good subscriber received %d, want %d", got, n)
	}
	eventually(t, 10*time.Second, "slow subscriber disconnected", func() bool {
		return s.broker.slowDisconnects.Load() == 1 && s.broker.subscribers.Load() == 2
	})
	if d := s.broker.dropped.Load(); d == 0 {
		t.Errorf("dropped = %d, want > 0", d)
	}
	// The slow client finds its connection ended (a close frame or EOF
	// after what was buffered).
	for {
		if _, _, err := slow.Read(ctx); err != nil {
			if ctx.Err() != nil {
				t.Fatalf("slow subscriber's connection stayed open")
			}
			break
		}
	}
}

func TestBrokerBadInput(t *testing.T) {
	cfg := testConfig()
	cfg.MaxBodyBytes = 1024
	cfg.CORS = []string{"https://ok.example"}
	s, ts := newTestServer(t, cfg)

	tests := []struct {
		name, method, path, body string
		header                   []string
		code                     int
	}{
		{"publish without topic", "POST", "/broker", "x", nil, 400},
		{"publish empty topic", "POST", "/broker?topic=", "x", nil, 400},
		{"publish topic with space", "POST", "/broker?topic=a%20b", "x", nil, 400},
		{"publish topic with control", "POST", "/broker?topic=a%00b", "x", nil, 400},
		{"publish long topic", "POST", "/broker?topic=" + strings.Repeat("t", 256), "x", nil, 400},
		{"publish invalid utf8", "POST", "/broker?topic=%ff", "x", nil, 400},
		{"publish oversized body", "POST", "/broker?topic=foo", strings.Repeat("x", 1025), nil, 413},
		{"subscribe without topic", "GET", "/broker", "", nil, 400},
		{"subscribe bad queue", "GET", "/broker?topic=foo&queue=a%20b", "", nil, 400},
		{"subscribe without websocket", "GET", "/broker?topic=foo", "", nil, 426},
		{"subscribe from other origin", "GET", "/broker?topic=foo", "", []string{
			"Connection", "Upgrade", "Upgrade", "websocket", "Sec-WebSocket-Version", "13",
			"Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==", "Origin", "https://evil.example"}, 403},
		{"put", "PUT", "/broker?topic=foo", "x", nil, 405},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body := do(t, tt.method, ts.URL+tt.path, tt.body, tt.header...)
			wantError(t, tt.method+" "+tt.path, code, body, tt.code)
		})
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sub := dialBroker(t, ts, "/broker?topic=foo")

	t.Run("oversized frame", func(t *testing.T) {
		c := dialBroker(t, ts, "/broker?topic=foo")
		if err := c.Write(ctx, websocket.MessageBinary, make([]byte, 1025)); err != nil {
			t.Fatalf("write: %v", err)
		}
		_, _, err := c.Read(ctx)
		if got := websocket.CloseStatus(err); got != websocket.StatusMessageTooBig {
			t.Fatalf("read after oversized frame: %v (status %v), want close %v", err, got, websocket.StatusMessageTooBig)
		}
	})

	t.Run("binary frame is a message", func(t *testing.T) {
		c := dialBroker(t, ts, "/broker?topic=bin")
		garbage := []byte{0xff, 0x00, 0xfe, '"', '\\', 0x80}
		if err := c.Write(ctx, websocket.MessageBinary, garbage); err != nil {
			t.Fatalf("write: %v", err)
		}
		if m := readMessage(t, ctx, c); !bytes.Equal(m.Body, garbage) {
			t.Fatalf("echoed body = %x, want %x", m.Body, garbage)
		}
	})

	garbage := []struct {
		name      string
		bytes     []byte
		wantClose bool // a close frame with a protocol error before EOF
	}{
		{"reserved opcode", []byte{0x83, 0x80, 1, 2, 3, 4}, true},
		{"unmasked frame", []byte{0x82, 0x01, 'x'}, false},
		{"all ones", bytes.Repeat([]byte{0xff}, 64), false},
	}
	for _, g := range garbage {
		t.Run("garbage frame "+g.name, func(t *testing.T) {
			nc, br := rawHandshake(t, ts, "/broker?topic=foo")
			defer nc.Close()
			nc.SetDeadline(time.Now().Add(10 * time.Second))
			nc.Write(g.bytes)
			rest, err := io.ReadAll(br)
			if err != nil {
				t.Fatalf("server did not close the connection: %v (read %x)", err, rest)
			}
			if !g.wantClose {
				return
			}
			if len(rest) < 4 || rest[0] != 0x88 {
				t.Fatalf("server sent %x, want a close frame", rest)
			}
			if code := int(rest[2])<<8 | int(rest[3]); code != int(websocket.StatusProtocolError) {
				t.Fatalf("close code = %d, want %d", code, websocket.StatusProtocolError)
			}
		})
	}

	// The broker keeps serving.
	waitSubscribers(t, s, 1)
	if code, body := do(t, "POST", ts.URL+"/broker?topic=foo", "still here"); code != http.StatusOK {
		t.Fatalf("publish after bad input = %d %s", code, body)
	}
	if m := readMessage(t, ctx, sub); string(m.Body) != "still here" {
		t.Fatalf("after bad input got %q, want %q", m.Body, "still here")
	}
}

func TestBrokerShutdown(t *testing.T) {
	s, ts := newTestServer(t, nil)
	subs := []*websocket.Conn{
		dialBroker(t, ts, "/broker?topic=a"),
		dialBroker(t, ts, "/broker?topic=a&queue=q"),
	}
	waitSubscribers(t, s, 2)
	closed := make(chan struct{})
	go func() {
		s.Close()
		close(closed)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i, c := range subs {
		_, _, err := c.Read(ctx)
		if got := websocket.CloseStatus(err); got != websocket.StatusGoingAway {
			t.Errorf("subscriber %d: read = %v (status %v), want close %v", i, err, got, websocket.StatusGoingAway)
		}
	}
	select {
	case <-closed:
	case <-ctx.Done():
		t.Fatal("server Close did not return")
	}
	if n := s.broker.subscribers.Load(); n != 0 {
		t.Errorf("subscribers after Close = %d, want 0", n)
	}
	// A new subscriber is refused with a JSON error.
	code, body := do(t, "GET", ts.URL+"/broker?topic=a", "", "Connection", "Upgrade", "Upgrade", "websocket",
		"Sec-WebSocket-Version", "13", "Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	wantError(t, "GET /broker after Close", code, body, http.StatusServiceUnavailable)
}

func TestBrokerDeadClient(t *testing.T) {
	s, ts := newTestServer(t, nil, func(s *server) { s.broker.pingInterval = 50 * time.Millisecond })
	c := dialBroker(t, ts, "/broker?topic=a") // never reads: answers no ping
	_ = c
	waitSubscribers(t, s, 1)
	eventually(t, 5*time.Second, "dead subscriber dropped", func() bool { return s.broker.subscribers.Load() == 0 })
}

func TestBrokerMessageHeader(t *testing.T) {
	h := http.Header{
		"Timestamp":      {"1499951537"},
		"Content-Type":   {"text/plain"},
		"X-Multi":        {"a", "b"},
		"Authorization":  {"Bearer secret"},
		"Cookie":         {"session=1"},
		"Connection":     {"keep-alive, X-Private"},
		"X-Private":      {"hop"},
		"Keep-Alive":     {"timeout=5"},
		"Content-Length": {"12"},
	}
	got := messageHeader(h)
	want := map[string]string{"Timestamp": "1499951537", "Content-Type": "text/plain", "X-Multi": "a, b"}
	if len(got) != len(want) {
		t.Fatalf("messageHeader = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("messageHeader[%q] = %q, want %q", k, got[k], v)
		}
	}
}

func TestBrokerMetrics(t *testing.T) {
	s, ts := newTestServer(t, nil)
	dialBroker(t, ts, "/broker?topic=m")
	waitSubscribers(t, s, 1)
	do(t, "POST", ts.URL+"/broker?topic=m", "x")
	eventually(t, 5*time.Second, "delivery", func() bool { return s.broker.delivered.Load() == 1 })
	got := map[string]float64{}
	s.broker.metrics(func(name, help, kind string, value float64, labels ...string) {
		if help == "" || (kind != "counter" && kind != "gauge") {
			t.Errorf("metric %s: help %q kind %q", name, help, kind)
		}
		got[name] = value
	})
	want := map[string]float64{
		"sidecar_broker_published_total":        1,
		"sidecar_broker_delivered_total":        1,
		"sidecar_broker_dropped_total":          0,
		"sidecar_broker_slow_disconnects_total": 0,
		"sidecar_broker_subscribers":            1,
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("metric %s = %v (present %v), want %v", k, g, ok, v)
		}
	}
}

func TestEncodeFrame(t *testing.T) {
	for _, n := range []int{0, 1, 80, 90, 100, 65535, 70000} {
		m := &Message{Header: map[string]string{"K": "v\"<"}, Body: bytes.Repeat([]byte{0xfe}, n)}
		f := encodeFrame(m)
		if f[0] != 0x81 {
			t.Fatalf("body %d: first byte %#x, want 0x81", n, f[0])
		}
		var plen, off int
		switch l := int(f[1]); {
		case l < 126:
			plen, off = l, 2
		case l == 126:
			plen, off = int(f[2])<<8|int(f[3]), 4
		default:
			for _, b := range f[2:10] {
				plen = plen<<8 | int(b)
			}
			off = 10
		}
		if plen != len(f)-off {
			t.Fatalf("body %d: payload length %d, frame holds %d", n, plen, len(f)-off)
		}
		var got Message
		if err := json.Unmarshal(f[off:], &got); err != nil || !bytes.Equal(got.Body, m.Body) || got.Header["K"] != "v\"<" {
			t.Fatalf("body %d: decoded %+v, %v", n, got, err)
		}
	}
}

func FuzzParseTopic(f *testing.F) {
	for _, s := range []string{"foo", "", "a b", "go.micro.topic", "\x00", "ü", "\xff", strings.Repeat("a", 256), "a\u200bb"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := parseTopic(s)
		if err != nil {
			return
		}
		if got != s || len(s) == 0 || len(s) > maxTopicLen || !utf8.ValidString(s) {
			t.Fatalf("parseTopic(%q) accepted", s)
		}
		for _, r := range s {
			if unicode.IsSpace(r) || !unicode.IsPrint(r) {
				t.Fatalf("parseTopic(%q) accepted rune %q", s, r)
			}
		}
	})
}

// BenchmarkBrokerFanout publishes 16-byte messages to 100 websocket
// subscribers on a real server and reports deliveries per second. The
// subscribers are raw websocket readers that only count frames, so the
// broker rather than a client library is measured; the publisher keeps at
// most window messages ahead of them.
func BenchmarkBrokerFanout(b *testing.B) {
	benchmarkBroker(b, "/broker?topic=bench", 100, 512, 100)
}

// BenchmarkBrokerQueueGroup publishes 16-byte messages to a queue group
// of 4 websocket members on a real server and reports deliveries per
// second: the path of a group member's delivery (pick one member with
// room), as BenchmarkBrokerFanout measures plain subscribers'.
func BenchmarkBrokerQueueGroup(b *testing.B) {
	benchmarkBroker(b, "/broker?topic=bench&queue=workers", 4, 2048, 1)
}

// benchmarkBroker publishes to topic "bench" with subs raw subscribers at
// path, window messages ahead of them at most; each publish is delivered
// copies times.
func benchmarkBroker(b *testing.B, path string, subs int, window, copies int64) {
	s, err := newServer(testConfig(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		b.Fatal(err)
	}
	ts := httptest.NewServer(s.handler)
	defer func() { s.Close(); ts.Close() }()

	var received atomic.Int64
	for range subs {
		countFrames(b, ts, path, &received)
	}
	for s.broker.subscribers.Load() != int64(subs) {
		time.Sleep(time.Millisecond)
	}
	m := &Message{Header: map[string]string{}, Body: []byte("0123456789abcdef")}
	publishWindowed(b, window, copies, &received, "deliveries/s", func() error { return s.broker.publish("bench", m) })
}

// countFrames opens a raw websocket subscriber at path that adds each
// frame it receives to received, reading only the frame headers: the
// benchmarks publish 16-byte messages, whose frames are short (payload
// under 126 bytes), so the broker rather than a client library is
// measured. It reads until the benchmark's cleanup closes it.
func countFrames(b *testing.B, ts *httptest.Server, path string, received *atomic.Int64) {
	b.Helper()
	nc, br := rawHandshake(b, ts, path)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			h, err := br.Peek(2)
			if err != nil {
				return
			}
			if _, err := br.Discard(2 + int(h[1]&0x7f)); err != nil {
				return
			}
			received.Add(1)
		}
	}()
	b.Cleanup(func() { nc.Close(); <-done })
}

// publishWindowed calls publish b.N times, each message to make perMsg
// frames in received (countFrames), at most window messages ahead of
// them, waits for the last, and reports the frames per second as unit.
func publishWindowed(b *testing.B, window, perMsg int64, received *atomic.Int64, unit string, publish func() error) {
	b.Helper()
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for i := range int64(b.N) {
		for received.Load() < (i-window)*perMsg {
			runtime.Gosched()
		}
		if err := publish(); err != nil {
			b.Fatal(err)
		}
	}
	for received.Load() < int64(b.N)*perMsg {
		runtime.Gosched()
	}
	b.ReportMetric(float64(int64(b.N)*perMsg)/time.Since(start).Seconds(), unit)
	b.StopTimer()
}

// rawHandshake opens a websocket to path by hand and returns the
// connection with the reader positioned at the first frame.
func rawHandshake(tb testing.TB, ts *httptest.Server, path string) (net.Conn, *bufio.Reader) {
	tb.Helper()
	nc, err := net.DialTimeout("tcp", ts.Listener.Addr().String(), 5*time.Second)
	if err != nil {
		tb.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(nc, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", path, ts.Listener.Addr())
	br := bufio.NewReaderSize(nc, 64<<10)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		nc.Close()
		tb.Fatalf("handshake %s: %v %v", path, resp, err)
	}
	nc.SetDeadline(time.Time{})
	return nc, br
}

// TestBrokerSubscribedOnConnect checks that a client whose handshake is
// done gets a message published right after, with no wait in between.
func TestBrokerSubscribedOnConnect(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	for i := range 20 {
		topic := fmt.Sprint("t", i)
		sub := dialBroker(t, ts, "/broker?topic="+topic)
		if code, body := do(t, "POST", ts.URL+"/broker?topic="+topic, "hello"); code != 200 {
			t.Fatalf("publish: %d %s", code, body)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		m := readMessage(t, ctx, sub)
		cancel()
		if string(m.Body) != "hello" {
			t.Fatalf("round %d: body %q, want hello", i, m.Body)
		}
		sub.CloseNow()
	}
}

// TestBrokerNoDataAfterClose: when the websocket library itself sends a
// close frame (here for a protocol error) while the subscriber's writer is
// busy, the close frame goes out and nothing follows it on the wire, in
// particular no data frame (RFC 6455 section 5.5.1). The queue is deep
// enough that the subscriber is never dropped as too slow, which would
// close it the broker's way instead.
func TestBrokerNoDataAfterClose(t *testing.T) {
	t.Parallel()
	const rounds, maxPublish = 20, 100_000
	s, ts := newTestServer(t, nil, func(s *server) {
		s.broker.queueLen = maxPublish + 1
		s.broker.queueBytes = 1 << 30
	})
	for round := range rounds {
		func() {
			topic := fmt.Sprint("t", round)
			nc, br := rawHandshake(t, ts, "/broker?topic="+topic)
			defer nc.Close()
			nc.SetDeadline(time.Now().Add(time.Minute)) // a broken test must not hang
			waitSubscribers(t, s, 1)
			defer publishBusy(s, topic, maxPublish)()

			// Data is flowing: the writer is busy when the close frame
			// is written.
			if f, err := readWireFrame(br); err != nil || f.opcode() != opText {
				t.Fatalf("round %d: first frame %x, %v; want a message", round, f.b0, err)
			}
			// A continuation frame with no message: a protocol error the
			// library answers with a close frame.
			if _, err := nc.Write([]byte{0x80, 0x80, 1, 2, 3, 4}); err != nil {
				t.Fatal(err)
			}
			for data := 1; ; data++ {
				f, err := readWireFrame(br)
				if err != nil {
					t.Fatalf("round %d: %v after %d messages, and no close frame", round, err, data)
				}
				if f.opcode() == opText || f.opcode() == opPing {
					continue
				}
				if f.b0 != 0x80|opClose || closeCode(f) != websocket.StatusProtocolError {
					t.Fatalf("round %d: frame %x %q, want a close frame with %v", round, f.b0, f.payload, websocket.StatusProtocolError)
				}
				break
			}
			if f, err := readWireFrame(br); err != io.EOF {
				t.Fatalf("round %d: after the close frame: frame %x %q, %v; want the end of the stream", round, f.b0, f.payload, err)
			}
		}()
		waitSubscribers(t, s, 0)
	}
}

// dialStuck opens a websocket subscriber to url whose receive buffer is
// small, so that the sidecar's writes to it block soon once it stops
// reading.
func dialStuck(t *testing.T, url string) *websocket.Conn {
	t.Helper()
	dialer := &net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
		var err error
		c.Control(func(fd uintptr) { err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return err
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}},
	})
	if err != nil {
		t.Fatalf("dial stuck subscriber %s: %v", url, err)
	}
	conn.SetReadLimit(8 << 20)
	t.Cleanup(func() { conn.CloseNow() })
	return conn
}

// messageNumber is the number that starts the body of p, a broker
// message whose body is "N ..." (the tests of slow subscribers number
// what they publish).
func messageNumber(p []byte) (int, error) {
	var m Message
	if err := json.Unmarshal(p, &m); err != nil {
		return 0, fmt.Errorf("frame %.60q is not a broker message: %w", p, err)
	}
	num, _, _ := strings.Cut(string(m.Body), " ")
	i, err := strconv.Atoi(num)
	if err != nil {
		return 0, fmt.Errorf("body %.60q does not start with a message number", m.Body)
	}
	return i, nil
}

// recorder reads a subscriber's messages in the background and records
// their bodies, each a message number.
type recorder struct {
	done chan struct{} // closed when reading ends
	err  error         // why reading ended; read after done

	mu  sync.Mutex // guards got
	got []int      // message numbers, in arrival order
}

func record(t *testing.T, conn *websocket.Conn) *recorder {
	t.Helper()
	r := &recorder{done: make(chan struct{})}
	go func() {
		defer close(r.done)
		for {
			_, p, err := conn.Read(context.Background())
			if err != nil {
				r.err = err
				return
			}
			i, err := messageNumber(p)
			if err != nil {
				r.err = err
				return
			}
			r.mu.Lock()
			r.got = append(r.got, i)
			r.mu.Unlock()
		}
	}()
	t.Cleanup(func() { conn.CloseNow(); <-r.done })
	return r
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.got)
}

func (r *recorder) messages() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

// waitFor waits until cond holds, failing the test if r stops reading
// first or within passes.
func (r *recorder) waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(within)
	for !cond() {
		select {
		case <-r.done:
			t.Fatalf("%s: the healthy subscriber stopped reading after %d messages: %v", what, r.count(), r.err)
		case <-deadline:
			t.Fatalf("after %s: %s never happened (the healthy subscriber has %d messages)", within, what, r.count())
		case <-time.After(time.Millisecond):
		}
	}
}

// readToClose reads the message numbers conn receives until its
// connection ends, which must be with close status want (-1: none).
func readToClose(t *testing.T, conn *websocket.Conn, want websocket.StatusCode) []int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var got []int
	for {
		_, p, err := conn.Read(ctx)
		if err != nil {
			if code := websocket.CloseStatus(err); code != want {
				t.Fatalf("stuck subscriber: read after %d messages: %v (status %v), want close status %v", len(got), err, code, want)
			}
			return got
		}
		k, err := messageNumber(p)
		if err != nil {
			t.Fatalf("stuck subscriber: %v", err)
		}
		got = append(got, k)
	}
}

// onlySubscriber returns the one subscriber s has.
func onlySubscriber(t *testing.T, s *server) *subscriber {
	t.Helper()
	s.broker.mu.Lock()
	defer s.broker.mu.Unlock()
	if len(s.broker.all) != 1 {
		t.Fatalf("%d subscribers, want 1", len(s.broker.all))
	}
	for sub := range s.broker.all {
		return sub
	}
	return nil
}

// queuedFor is the number of frames queued for sub, not yet taken by its
// writer.
func queuedFor(sub *subscriber) int {
	sub.mu.Lock()
	defer sub.mu.Unlock()
	return len(sub.queue)
}

// queuesDrained reports whether every subscriber of s that is not being
// dropped has handed everything queued for it to its connection.
func queuesDrained(s *server) bool {
	b := s.broker
	b.mu.Lock()
	subs := make([]*subscriber, 0, len(b.all))
	for sub := range b.all {
		subs = append(subs, sub)
	}
	b.mu.Unlock()
	for _, sub := range subs {
		sub.mu.Lock()
		idle := sub.slow || sub.closed || len(sub.queue) == 0 && !sub.writing
		sub.mu.Unlock()
		if !idle {
			return false
		}
	}
	return true
}

// TestBrokerStuckSubscriber: one subscriber stops reading, one reads, and
// 20,000 messages are published through POST /broker. Once the stuck one
// is found too far behind, the healthy one receives every message; the
// stuck one is counted as a slow disconnect and, when it reads again,
// finds what was written to it followed by close status 1008; and every
// message is either delivered or counted as dropped in /metrics, nothing
// vanishes. For a queue group (issue 13, section 3) the healthy member
// takes the stuck member's share and its queue, and no message reaches
// both; a plain subscriber gets every message. A stuck member that is
// found out by its write timing out instead (it never reads again) gets no
// close frame, since none can be written, and is counted the same way.
// With --broker nats, NATS hands the group's messages to the sidecar's
// one queue subscription, and the same rule holds.
func TestBrokerStuckSubscriber(t *testing.T) {
	for _, tt := range []struct {
		name, path   string
		copies       int           // subscribers each message is for
		stuckAfter   time.Duration // a group member full this long is too slow
		writeTimeout time.Duration
		readsAgain   bool // the stuck subscriber reads again before its write times out
		nats         bool // --broker nats
	}{
		{"queue group", "/broker?topic=jobs&queue=workers", 1, 20 * time.Millisecond, 2 * time.Minute, true, false},
		{"queue group, write times out", "/broker?topic=jobs&queue=workers", 1, time.Hour, 3 * time.Second, false, false},
		{"queue group over NATS", "/broker?topic=jobs&queue=workers", 1, 20 * time.Millisecond, 2 * time.Minute, true, true},
		{"plain", "/broker?topic=jobs", 2, 20 * time.Millisecond, 2 * time.Minute, true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var cfg *Config
			if tt.nats {
				cfg = natsTestConfig(startNATS(t, "").url)
			}
			s, ts := newTestServer(t, cfg, func(s *server) {
				s.broker.queueLen = 1024
				s.broker.stuckAfter = tt.stuckAfter
				s.broker.writeTimeout = tt.writeTimeout
				// A client that does not read answers no ping: the stuck
				// one must not be dropped as dead before it reads again.
				s.broker.pingInterval = time.Hour
			})
			if tt.nats {
				waitConnected(t, s)
			}
			healthy := record(t, dialBroker(t, ts, tt.path))
			waitSubscribers(t, s, 1)
			hsub := onlySubscriber(t, s)
			stuck := dialStuck(t, wsURL(ts, tt.path))
			waitSubscribers(t, s, 2)

			// Messages until the stuck subscriber is found out (at most
			// limit; the write timeout takes seconds), then 2,000 more.
			const window, limit = 256, 200_000
			pad := strings.Repeat("x", 1024)
			client := &http.Client{Timeout: 10 * time.Second}
			publish := func(i int) {
				resp, err := client.Post(ts.URL+"/broker?topic=jobs", "text/plain", strings.NewReader(fmt.Sprintf("%d %s", i, pad)))
				if err != nil {
					t.Fatalf("publish %d: %v", i, err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("publish %d = %d", i, resp.StatusCode)
				}
			}

			// The publisher keeps the healthy subscriber's queue short,
			// so that it is never full even on a loaded machine: then
			// nothing need be lost.
			room := func() bool {
				if tt.nats && s.broker.published.Load()-s.nats.received.Load() >= window {
					return false // on their way through NATS
				}
				return queuedFor(hsub) < window
			}

			// Until the stuck subscriber is found too slow.
			i := 0
			for ; i < limit && s.broker.slowDisconnects.Load() == 0; i++ {
				healthy.waitFor(t, time.Minute, "room in the healthy subscriber's queue", room)
				publish(i)
			}
			if i == limit {
				t.Fatalf("after %d messages the stuck subscriber was never found too slow: slow disconnects 0, dropped %d, delivered %d",
					i, s.broker.dropped.Load(), s.broker.delivered.Load())
			}
			found := i
			n := found + 2000
			t.Logf("stuck subscriber found too slow after %d messages", found)
			first := found // from here on every message reaches the healthy subscriber
			if tt.copies > 1 {
				first = 0 // as did every one before
			}
			for ; i < n; i++ {
				healthy.waitFor(t, time.Minute, "room in the healthy subscriber's queue", room)
				publish(i)
			}

			// The stuck subscriber reads again: what was written to it,
			// then the close frame.
			want := websocket.StatusPolicyViolation
			if !tt.readsAgain {
				want = -1 // the connection ends without a close frame
			}
			fromStuck := readToClose(t, stuck, want)
			waitSubscribers(t, s, 1)

			// Every message is delivered or counted as dropped.
			var m map[string]float64
			healthy.waitFor(t, time.Minute, "published = delivered + dropped in /metrics", func() bool {
				m = getMetrics(t, ts.URL)
				return m["sidecar_broker_published_total"] == float64(n) &&
					m["sidecar_broker_delivered_total"]+m["sidecar_broker_dropped_total"] == float64(tt.copies*n)
			})
			if got := m["sidecar_broker_slow_disconnects_total"]; got != 1 {
				t.Errorf("/metrics slow disconnects = %v, want 1", got)
			}
			dropped := int(m["sidecar_broker_dropped_total"])
			healthy.waitFor(t, time.Minute, "every message received or counted as dropped", func() bool {
				return healthy.count()+len(fromStuck)+dropped >= tt.copies*n
			})
			got := healthy.messages()
			if total := len(got) + len(fromStuck) + dropped; total != tt.copies*n {
				t.Errorf("healthy subscriber got %d, stuck one %d, dropped %d: %d, want %d",
					len(got), len(fromStuck), dropped, total, tt.copies*n)
			}
			seen := make([]int, n)
			for _, k := range got {
				seen[k]++
			}
			missing := 0
			for k := first; k < n; k++ {
				if seen[k] != 1 {
					missing++
				}
			}
			if missing > 0 {
				t.Errorf("healthy subscriber lacks %d of the %d messages published after the stuck one was found too slow (dropped %d)",
					missing, n-first, dropped)
			}
			if tt.copies == 1 {
				// A write that times out cuts at most one frame; else a
				// group loses nothing.
				if tt.readsAgain && dropped != 0 || dropped > 1 {
					t.Errorf("the queue group lost %d messages (counted as dropped)", dropped)
				}
				for _, k := range fromStuck {
					seen[k]++
				}
				twice := 0
				for _, c := range seen {
					if c > 1 {
						twice++
					}
				}
				if twice > 0 {
					t.Errorf("%d messages reached a member of the queue group twice, or both members", twice)
				}
			}
			t.Logf("healthy %d, stuck %d, dropped %d", len(got), len(fromStuck), dropped)
		})
	}
}

// TestBrokerStuckSubscriberPings: a subscriber that stops reading but
// still sends pings is counted as a slow disconnect when it is closed, as
// one that sends nothing is when its write times out. The pong, written
// by the library from its reader, waited behind the writer's batch that
// could not finish; after 5 s the library gave up and closed the
// connection under it, and the failed write (not a timeout) went
// uncounted.
func TestBrokerStuckSubscriberPings(t *testing.T) {
	t.Parallel()
	// Longer than the library's 5 s for a control frame, so that the
	// defect shows; shorter than the 10 s default, for the suite's time.
	s, ts := newTestServer(t, nil, func(s *server) { s.broker.writeTimeout = 7 * time.Second })
	nc := rawStuckHandshake(t, ts, "/broker?topic=stuck")
	waitSubscribers(t, s, 1)
	sub := onlySubscriber(t, s)
	body := strings.Repeat("x", 20<<10)
	fillUntilBlocked(t, func(int) {
		if code, resp := do(t, "POST", ts.URL+"/broker?topic=stuck", body); code != http.StatusOK {
			t.Fatalf("publish: %d %s", code, resp)
		}
	}, func() int { return queuedFor(sub) })
	if _, err := nc.Write(clientPing); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the stuck subscriber closed", func() bool { return s.broker.subscribers.Load() == 0 })
	if got := getMetrics(t, ts.URL)["sidecar_broker_slow_disconnects_total"]; got != 1 {
		t.Errorf("sidecar_broker_slow_disconnects_total = %v after a subscriber that reads nothing was closed, want 1", got)
	}
}

// TestBrokerPongWhileWriting: a client's ping is answered while the
// subscriber's writer is busy, with the ping's payload, whole between
// data frames: a pong that waits for the writer's batch is not lost.
func TestBrokerPongWhileWriting(t *testing.T) {
	t.Parallel()
	const rounds, maxPublish = 50, 1_000_000
	s, ts := newTestServer(t, nil, func(s *server) {
		s.broker.queueLen = maxPublish + 1
		s.broker.queueBytes = 1 << 30
	})
	nc, br := rawHandshake(t, ts, "/broker?topic=busy")
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(time.Minute)) // a broken test must not hang
	waitSubscribers(t, s, 1)
	defer publishBusy(s, "busy", maxPublish)()
	key := [4]byte{0x12, 0x34, 0x56, 0x78}
	for round := range rounds {
		payload := fmt.Sprint("round ", round)
		ping := append([]byte{0x80 | opPing, 0x80 | byte(len(payload))}, key[:]...)
		for i := range len(payload) {
			ping = append(ping, payload[i]^key[i%4])
		}
		if _, err := nc.Write(ping); err != nil {
			t.Fatal(err)
		}
		for data := 0; ; data++ {
			f, err := readWireFrame(br)
			if err != nil {
				t.Fatalf("round %d: %v after %d messages, and no pong", round, err, data)
			}
			if f.opcode() == opText {
				continue
			}
			if f.b0 != 0x80|opPong || string(f.payload) != payload {
				t.Fatalf("round %d: frame %x %q, want a pong %q", round, f.b0, f.payload, payload)
			}
			break
		}
	}
}

// publishBusy publishes "hello" to topic, at most n times, from a
// goroutine, until the returned stop is called; stop waits for it.
func publishBusy(s *server, topic string, n int) (stop func()) {
	done := make(chan struct{})
	published := make(chan struct{})
	go func() {
		defer close(published)
		for range n {
			select {
			case <-done:
				return
			default:
			}
			s.broker.publish(topic, &Message{Body: []byte("hello")})
		}
	}()
	return func() { close(done); <-published }
}
