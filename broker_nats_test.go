package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// natsServerPath finds the nats-server binary (requireTool: on PATH, or in
// /usr/sbin where the Debian package puts it, scripts/install-debian.sh).
// Without one the test skips, or fails in CI.
func natsServerPath(t testing.TB) string {
	t.Helper()
	return requireTool(t, "nats-server")
}

// natsProc is a nats-server child process on free loopback ports.
type natsProc struct {
	t       testing.TB
	bin     string
	conf    string // config file
	port    int
	monitor int // HTTP monitoring port
	url     string
	proc    *toolProcess // nil while stopped
}

// startNATS starts nats-server with extra config lines (authorization,
// tls, cluster ...) and stops it when the test ends.
func startNATS(t testing.TB, extra string) *natsProc {
	t.Helper()
	p := &natsProc{t: t, bin: natsServerPath(t), port: freePortTB(t), monitor: freePortTB(t)}
	p.url = "nats://127.0.0.1:" + strconv.Itoa(p.port)
	p.conf = filepath.Join(t.TempDir(), "nats.conf")
	conf := fmt.Sprintf("listen: 127.0.0.1:%d\nhttp: 127.0.0.1:%d\n%s\n", p.port, p.monitor, extra)
	if err := os.WriteFile(p.conf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	p.start()
	t.Cleanup(p.stop)
	return p
}

// freePortTB is freePort for benchmarks too.
func freePortTB(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// start runs the server (again, on the same ports) and waits until its
// monitoring endpoint answers, which it does once clients can connect.
func (p *natsProc) start() {
	p.t.Helper()
	cmd := exec.Command(p.bin, "-c", p.conf)
	if testing.Verbose() {
		cmd.Stdout, cmd.Stderr = testWriter{p.t}, testWriter{p.t}
	}
	proc, err := startProcess(cmd)
	if err != nil {
		p.t.Fatalf("start nats-server: %v", err)
	}
	p.proc = proc
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", p.monitor))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case err := <-proc.exited:
			p.proc = nil
			p.t.Fatalf("nats-server exited at start: %v (config %s)", err, p.conf)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("nats-server not ready after 20s: %v", err)
		}
	}
}

// stop ends the server (SIGTERM, then SIGKILL) and waits; idempotent.
func (p *natsProc) stop() {
	if p.proc != nil {
		p.proc.stop(syscall.SIGTERM)
		p.proc = nil
	}
}

// kill ends the server at once, as a crash does.
func (p *natsProc) kill() {
	p.proc.stop(os.Kill)
	p.proc = nil
}

// subscriptions returns the number of subscriptions of the server's
// client connections (/connz; /subsz counts the server's own too).
func (p *natsProc) subscriptions(t *testing.T) int {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/connz", p.monitor))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct {
		Connections []struct {
			N int `json:"subscriptions"`
		} `json:"connections"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range v.Connections {
		n += c.N
	}
	return n
}

// natsTestConfig is testConfig with --broker nats at servers and short
// reconnect timings.
func natsTestConfig(servers string) *Config {
	cfg := testConfig()
	cfg.Broker = "nats"
	cfg.BrokerAddress = servers
	cfg.NATS.ReconnectWait = 20 * time.Millisecond
	cfg.NATS.ReconnectMax = 200 * time.Millisecond
	cfg.NATS.HealthGrace = 200 * time.Millisecond
	cfg.NATS.Timeout = 2 * time.Second
	return cfg
}

// natsSidecar builds a sidecar through newServer with its log in logs,
// and serves it.
func natsSidecar(t *testing.T, cfg *Config, logs io.Writer) (*server, string) {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	s, err := newServer(cfg, logger)
	if err != nil {
		t.Fatalf("newServer: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.start(ctx)
	ts := httptest.NewServer(s.handler)
	t.Cleanup(func() {
		cancel()
		s.streams.Close()
		ts.CloseClientConnections()
		ts.Close()
		s.Close()
	})
	return s, ts.URL
}

func waitConnected(t *testing.T, servers ...*server) {
	t.Helper()
	for _, s := range servers {
		eventually(t, 20*time.Second, "sidecar connected to NATS", s.nats.connected.Load)
	}
}

func waitDisconnected(t *testing.T, servers ...*server) {
	t.Helper()
	for _, s := range servers {
		eventually(t, 20*time.Second, "sidecar disconnected from NATS", func() bool { return !s.nats.connected.Load() })
	}
}

// frames is the number of frames the inboxes have read.
func frames(ins ...*inbox) int {
	n := 0
	for _, in := range ins {
		_, t := in.snapshot()
		n += t
	}
	return n
}

// TestNATSTwoSidecars: two sidecars on one nats-server. Plain subscribers
// on both get every message published on either (by POST, with headers,
// and by websocket frame) exactly once, headers exactly as published; a
// queue group with two members on each sidecar gets each message exactly
// once in total. Each sidecar holds one NATS subscription per topic and
// one per queue group, whatever the number of its subscribers.
func TestNATSTwoSidecars(t *testing.T) {
	ns := startNATS(t, "")
	cfgA := natsTestConfig(ns.url)
	cfgA.EnableStats = true
	a, tsA := newTestServer(t, cfgA)
	b, tsB := newTestServer(t, natsTestConfig(ns.url))
	waitConnected(t, a, b)

	plainA := subscribe(t, tsA.URL, "/broker?topic=orders")
	plainB := subscribe(t, tsB.URL, "/broker?topic=orders")
	group := []*inbox{
		subscribe(t, tsA.URL, "/broker?topic=orders&queue=g"),
		subscribe(t, tsA.URL, "/broker?topic=orders&queue=g"),
		subscribe(t, tsB.URL, "/broker?topic=orders&queue=g"),
		subscribe(t, tsB.URL, "/broker?topic=orders&queue=g"),
	}
	if got := ns.subscriptions(t); got != 4 {
		t.Errorf("nats-server has %d subscriptions, want 4: per sidecar one for the topic and one for the group", got)
	}

	const n = 50
	publishN(t, tsA.URL, "orders", "A", n)
	publishN(t, tsB.URL, "orders", "B", n)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range 10 {
		if err := plainA.conn.Write(ctx, websocket.MessageText, fmt.Appendf(nil, "ws-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	want := append(append(bodies("A", n), bodies("B", n)...), bodies("ws", 10)...)

	// Every message reaches each sidecar's topic subscription, and one
	// sidecar's group subscription: 3 per message. Once that many arrived
	// and every frame written was read, no duplicate can still come.
	all := append([]*inbox{plainA, plainB}, group...)
	eventually(t, 20*time.Second, "every delivery made and read", func() bool {
		return a.nats.received.Load()+b.nats.received.Load() == int64(3*len(want)) &&
			a.broker.delivered.Load()+b.broker.delivered.Load() == int64(frames(all...))
	})
	plainA.wantEachOnce(t, "plain on A", want)
	plainB.wantEachOnce(t, "plain on B", want)
	per := make([]int, len(group))
	for _, w := range want {
		got := 0
		for i, m := range group {
			c, _ := m.snapshot()
			got += c[w]
			per[i] += c[w]
		}
		if got != 1 {
			t.Errorf("group g received %q %d times, want once in total", w, got)
		}
	}
	if per[0]+per[1] == 0 || per[2]+per[3] == 0 {
		t.Errorf("group g members got %v, want some on each sidecar", per)
	}
	t.Logf("group g per member: %v", per)

	for _, body := range []string{"A-7", "B-7", "ws-3"} {
		plainA.mu.Lock()
		ha := plainA.header[body]
		plainA.mu.Unlock()
		plainB.mu.Lock()
		hb := plainB.header[body]
		plainB.mu.Unlock()
		if !maps.Equal(ha, hb) {
			t.Errorf("headers of %q: on A %v, on B %v; want the same", body, ha, hb)
		}
		if body == "ws-3" {
			if len(ha) != 0 {
				t.Errorf("headers of a websocket frame = %v, want none", ha)
			}
			continue
		}
		ts := 1499951537 + 7
		if ha["Timestamp"] != strconv.Itoa(ts) || ha["X-From"] != body[:1] || ha["User-Agent"] == "" {
			t.Errorf("headers of %q = %v, want the request's (Timestamp %d, X-From %s, User-Agent)", body, ha, ts, body[:1])
		}
	}
	for _, s := range []*server{a, b} {
		if s.nats.missed.Load()+s.nats.refused.Load()+s.nats.unconfirmed.Load()+s.broker.dropped.Load() != 0 {
			t.Errorf("missed %d refused %d unconfirmed %d dropped %d, want none", s.nats.missed.Load(), s.nats.refused.Load(),
				s.nats.unconfirmed.Load(), s.broker.dropped.Load())
		}
	}

	t.Run("health and metrics", func(t *testing.T) {
		code, body := do(t, "GET", tsA.URL+"/health", "")
		var h struct {
			Status string
			Broker natsHealth
		}
		if err := json.Unmarshal(body, &h); code != http.StatusOK || err != nil || h.Status != "ok" || !h.Broker.Connected || h.Broker.Server != ns.url {
			t.Errorf("GET /health = %d %s, want 200 ok, connected to %s", code, body, ns.url)
		}
		code, body = do(t, "GET", tsA.URL+"/metrics", "")
		for _, m := range []string{"sidecar_broker_nats_connected 1", "sidecar_broker_nats_reconnects_total 0", "sidecar_broker_nats_buffered_bytes",
			"sidecar_broker_nats_published_total 60", "sidecar_broker_nats_received_total", `sidecar_broker_nats_dropped_total{reason="buffer_full"} 0`,
			`sidecar_broker_nats_dropped_total{reason="unconfirmed"} 0`, "sidecar_broker_nats_server_errors_total 0"} {
			if code != http.StatusOK || !strings.Contains(string(body), m) {
				t.Errorf("GET /metrics = %d, want %q in\n%s", code, m, body)
			}
		}
		code, body = do(t, "GET", tsA.URL+"/stats", "", "Accept", "application/json")
		if code != http.StatusOK || !strings.Contains(string(body), `"sidecar_broker_nats_connected"`) {
			t.Errorf("GET /stats (JSON) = %d, want the NATS metrics in %s", code, snippet(body))
		}
	})

	t.Run("last subscriber leaving ends the NATS subscription", func(t *testing.T) {
		plainB.conn.Close(websocket.StatusNormalClosure, "")
		group[2].conn.Close(websocket.StatusNormalClosure, "")
		eventually(t, 10*time.Second, "B's group subscription kept while one member is left", func() bool { return ns.subscriptions(t) == 3 })
		group[3].conn.Close(websocket.StatusNormalClosure, "")
		eventually(t, 10*time.Second, "B's subscriptions gone", func() bool { return ns.subscriptions(t) == 2 })
	})
}

// TestNATSRestart: nats-server stops mid-stream and comes back on the same
// port. Subscribers stay connected and go on receiving; every message
// published while it was down was either buffered and delivered after the
// reconnect or refused with a JSON 503 (the buffer is small): delivered +
// refused = published. /health is 503 while the sidecar is cut off.
func TestNATSRestart(t *testing.T) {
	ns := startNATS(t, "")
	cfgA := natsTestConfig(ns.url)
	cfgA.NATS.BufferBytes = 4 << 10
	a, tsA := newTestServer(t, cfgA)
	b, tsB := newTestServer(t, natsTestConfig(ns.url))
	waitConnected(t, a, b)
	local := subscribe(t, tsA.URL, "/broker?topic=stream")  // on the publisher's sidecar
	remote := subscribe(t, tsB.URL, "/broker?topic=stream") // on the other

	published, refused := 0, 0
	publish := func(phase string, n int) {
		for i := range n {
			code, body := do(t, "POST", tsA.URL+"/broker?topic=stream", fmt.Sprintf("%s-%d", phase, i))
			published++
			switch code {
			case http.StatusOK:
			case http.StatusServiceUnavailable:
				wantError(t, "POST /broker while NATS is down", code, body, http.StatusServiceUnavailable)
				refused++
			default:
				t.Fatalf("POST /broker = %d %s, want 200 or 503", code, body)
			}
		}
	}
	publish("before", 40)
	eventually(t, 10*time.Second, "messages before the restart delivered", func() bool {
		return local.has(bodies("before", 40)) && remote.has(bodies("before", 40))
	})

	ns.kill()
	waitDisconnected(t, a, b)
	eventually(t, 10*time.Second, "/health 503 past the grace period", func() bool {
		code, body := do(t, "GET", tsA.URL+"/health", "")
		return code == http.StatusServiceUnavailable && strings.Contains(string(body), `"status":"disconnected"`)
	})
	publish("during", 100)
	if refused == 0 || refused == 100 {
		t.Fatalf("%d of 100 publishes during the outage refused, want some buffered and some refused (buffer 4 KiB)", refused)
	}
	if code, body := do(t, "GET", tsA.URL+"/metrics", ""); !strings.Contains(string(body), fmt.Sprintf(`sidecar_broker_nats_dropped_total{reason="buffer_full"} %d`, refused)) {
		t.Errorf("GET /metrics = %d, want %d buffer_full drops in\n%s", code, refused, body)
	}

	ns.start()
	waitConnected(t, a, b)
	eventually(t, 10*time.Second, "both sidecars resubscribed", func() bool { return ns.subscriptions(t) == 2 })
	publish("after", 40)
	eventually(t, 20*time.Second, "messages after the restart delivered on both sidecars", func() bool {
		return local.has(bodies("after", 40)) && remote.has(bodies("after", 40))
	})
	// The last of them arrived after every buffered one (one connection, in
	// order), so counting now is final.
	counts, total := local.snapshot()
	for b, c := range counts {
		if c != 1 {
			t.Errorf("%q delivered %d times, want once", b, c)
		}
	}
	if total+refused != published {
		t.Errorf("delivered %d + refused %d = %d, want published %d", total, refused, total+refused, published)
	}
	_, remoteTotal := remote.snapshot()
	t.Logf("published %d, refused %d, delivered on A %d, on B %d (B gets the buffered ones only if it resubscribed before A flushed)",
		published, refused, total, remoteTotal)
	if a.nats.reconnects.Load() != 1 || b.nats.reconnects.Load() != 1 {
		t.Errorf("reconnects A %d B %d, want 1 each", a.nats.reconnects.Load(), b.nats.reconnects.Load())
	}
	if code, _ := do(t, "GET", tsA.URL+"/health", ""); code != http.StatusOK {
		t.Errorf("GET /health after the reconnect = %d, want 200", code)
	}
}

// TestNATSDeadServer: a server that stops answering (SIGSTOP: its sockets
// stay open) is detected by the keepalive, and the sidecar reconnects once
// it answers again.
func TestNATSDeadServer(t *testing.T) {
	ns := startNATS(t, "")
	cfg := natsTestConfig(ns.url)
	cfg.NATS.PingInterval = 200 * time.Millisecond
	cfg.NATS.Timeout = time.Second
	var logs syncBuffer
	s, url := natsSidecar(t, cfg, &logs)
	waitConnected(t, s)
	in := subscribe(t, url, "/broker?topic=t")

	ns.proc.signal(syscall.SIGSTOP)
	defer func() {
		if ns.proc != nil {
			ns.proc.signal(syscall.SIGCONT)
		}
	}()
	waitDisconnected(t, s)
	ns.proc.signal(syscall.SIGCONT)
	waitConnected(t, s)
	publishN(t, url, "t", "x", 5)
	eventually(t, 10*time.Second, "messages after the server came back", func() bool { return in.has(bodies("x", 5)) })
	if !strings.Contains(logs.String(), "no PONG") && !strings.Contains(logs.String(), "timeout") {
		t.Errorf("log does not say why the connection was dropped:\n%s", logs.String())
	}
}

// TestNATSCluster: two nats-server processes joined by routes on
// loopback, one sidecar on each: messages cross both ways. A sidecar
// learns the other server from INFO's connect_urls and fails over to it.
func TestNATSCluster(t *testing.T) {
	r1, r2 := freePort(t), freePort(t)
	route := func(listen, peer int) string {
		return fmt.Sprintf("cluster { name: sidecar_test, listen: 127.0.0.1:%d, routes: [nats-route://127.0.0.1:%d] }", listen, peer)
	}
	n1 := startNATS(t, route(r1, r2))
	n2 := startNATS(t, route(r2, r1))
	a, tsA := newTestServer(t, natsTestConfig(n1.url))
	b, tsB := newTestServer(t, natsTestConfig(n2.url))
	waitConnected(t, a, b)
	inA := subscribe(t, tsA.URL, "/broker?topic=x")
	inB := subscribe(t, tsB.URL, "/broker?topic=x")

	// Interest crosses the route a moment after the SUB: probe until it has.
	for i := 0; !inB.has([]string{"probe"}) || !inA.has([]string{"probe"}); i++ {
		if i == 400 {
			t.Fatal("no probe crossed the route in 20s")
		}
		do(t, "POST", tsA.URL+"/broker?topic=x", "probe")
		do(t, "POST", tsB.URL+"/broker?topic=x", "probe")
		time.Sleep(50 * time.Millisecond)
	}
	publishN(t, tsA.URL, "x", "A", 30)
	publishN(t, tsB.URL, "x", "B", 30)
	want := append(bodies("A", 30), bodies("B", 30)...)
	eventually(t, 10*time.Second, "messages crossed both ways", func() bool { return inA.has(want) && inB.has(want) })

	eventually(t, 10*time.Second, "A learned the second server", func() bool {
		a.nats.mu.Lock()
		defer a.nats.mu.Unlock()
		for _, s := range a.nats.servers {
			if s.implicit && redacted(s.url) == n2.url {
				return true
			}
		}
		return false
	})
	n1.stop()
	eventually(t, 20*time.Second, "A failed over to the learned server", func() bool {
		h, ok := a.nats.health()
		return ok && h.Connected && h.Server == n2.url
	})
	publishN(t, tsA.URL, "x", "C", 10)
	eventually(t, 10*time.Second, "messages after the failover", func() bool { return inB.has(bodies("C", 10)) && inA.has(bodies("C", 10)) })
}

// natsRawClient speaks the NATS protocol from the test, as any other NATS
// client would: it checks the subjects and headers the sidecar uses.
type natsRawClient struct {
	nc net.Conn
	rd *natsReader
}

func dialNATSRaw(t *testing.T, url string) *natsRawClient {
	t.Helper()
	nc, err := net.Dial("tcp", strings.TrimPrefix(url, "nats://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	c := &natsRawClient{nc: nc, rd: newNATSReader(bufio.NewReader(nc))}
	if op, err := c.rd.next(); err != nil || op.kind != natsOpInfo {
		t.Fatalf("raw client: first operation %v, %v; want INFO", op.kind, err)
	}
	c.send(t, `CONNECT {"verbose":false,"headers":true,"protocol":1}`+"\r\n")
	c.flush(t)
	return c
}

func (c *natsRawClient) send(t *testing.T, s string) {
	t.Helper()
	if _, err := io.WriteString(c.nc, s); err != nil {
		t.Fatal(err)
	}
}

// flush sends PING and reads until PONG: the server has what was sent.
func (c *natsRawClient) flush(t *testing.T) {
	t.Helper()
	c.send(t, "PING\r\n")
	for {
		op := c.next(t)
		if op.kind == natsOpPong {
			return
		}
	}
}

func (c *natsRawClient) next(t *testing.T) natsOp {
	t.Helper()
	op, err := c.rd.next()
	if err != nil {
		t.Fatalf("raw client: %v", err)
	}
	if op.kind == natsOpErr {
		t.Fatalf("raw client: -ERR %s", op.text)
	}
	return op
}

// TestNATSSubjectsAndHeaders: a topic is the subject <prefix>.T, headers
// are NATS headers both ways, interoperable with any NATS client; topics
// that are not subjects are a JSON 400.
func TestNATSSubjectsAndHeaders(t *testing.T) {
	ns := startNATS(t, "")
	cfg := natsTestConfig(ns.url)
	cfg.NATS.Prefix = "svc.events"
	s, ts := newTestServer(t, cfg)
	waitConnected(t, s)
	raw := dialNATSRaw(t, ns.url)
	raw.send(t, "SUB svc.events.orders.eu 1\r\n")
	raw.flush(t)

	code, body := do(t, "POST", ts.URL+"/broker?topic=orders.eu", "hello", "X-Test", "a, b", "Timestamp", "1499951537")
	if code != http.StatusOK {
		t.Fatalf("POST = %d %s", code, body)
	}
	op := raw.next(t)
	if op.kind != natsOpMsg || string(op.subject) != "svc.events.orders.eu" || string(op.payload) != "hello" {
		t.Fatalf("raw client got %v %q %q, want MSG on svc.events.orders.eu with hello", op.kind, op.subject, op.payload)
	}
	h, err := parseNATSHeaders(op.header)
	if err != nil || h["X-Test"] != "a, b" || h["Timestamp"] != "1499951537" {
		t.Errorf("headers %q = %v, %v; want X-Test: a, b and Timestamp", op.header, h, err)
	}

	in := subscribe(t, ts.URL, "/broker?topic=orders.eu")
	raw.send(t, "HPUB svc.events.orders.eu 32 37\r\nNATS/1.0\r\nFoo: bar\r\nFoo: baz\r\n\r\nfrom1\r\n")
	raw.send(t, "PUB svc.events.orders.eu 5\r\nfrom2\r\n")
	raw.flush(t)
	eventually(t, 10*time.Second, "messages from a plain NATS client", func() bool { return in.has([]string{"from1", "from2"}) })
	in.mu.Lock()
	h1, h2 := in.header["from1"], in.header["from2"]
	in.mu.Unlock()
	if !maps.Equal(h1, map[string]string{"Foo": "bar, baz"}) || len(h2) != 0 {
		t.Errorf("headers of HPUB = %v, of PUB = %v; want Foo: bar, baz and none", h1, h2)
	}

	for _, topic := range []string{"a..b", ".a", "a.", "*", "a.>", "a.*.b", ">"} {
		code, body := do(t, "POST", ts.URL+"/broker?topic="+topic, "x")
		wantError(t, "POST /broker?topic="+topic, code, body, http.StatusBadRequest)
		code, body = do(t, "GET", ts.URL+"/broker?topic="+topic, "", "Connection", "Upgrade", "Upgrade", "websocket")
		wantError(t, "GET /broker?topic="+topic, code, body, http.StatusBadRequest)
	}
}

// TestNATSMaxPayload: a message larger than the server's max_payload
// (headers included) is a JSON 413, or a websocket close 1009; nothing is
// sent that would make the server drop the connection.
func TestNATSMaxPayload(t *testing.T) {
	ns := startNATS(t, "max_payload: 2048")
	s, ts := newTestServer(t, natsTestConfig(ns.url))
	waitConnected(t, s)
	in := subscribe(t, ts.URL, "/broker?topic=big")

	code, body := do(t, "POST", ts.URL+"/broker?topic=big", strings.Repeat("x", 2049))
	e := wantError(t, "POST 2049 bytes", code, body, http.StatusRequestEntityTooLarge)
	if !strings.Contains(e.Detail, "max_payload of 2048") {
		t.Errorf("detail %q does not name max_payload", e.Detail)
	}
	code, body = do(t, "POST", ts.URL+"/broker?topic=big", strings.Repeat("x", 2000), "X-Pad", strings.Repeat("p", 100))
	wantError(t, "POST 2000 bytes with 100 bytes of header", code, body, http.StatusRequestEntityTooLarge)
	publishN(t, ts.URL, "big", "small", 1)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pub, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+"/broker?topic=big", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.CloseNow()
	pub.Write(ctx, websocket.MessageBinary, bytes.Repeat([]byte("y"), 3000))
	for {
		if _, _, err = pub.Read(ctx); err != nil {
			break
		}
	}
	if websocket.CloseStatus(err) != websocket.StatusMessageTooBig {
		t.Errorf("websocket frame over max_payload ended with %v, want close 1009", err)
	}
	eventually(t, 10*time.Second, "the small message", func() bool { return in.has([]string{"small-0"}) })
	if s.nats.reconnects.Load() != 0 || s.nats.serverErrs.Load() != 0 || s.nats.tooLarge.Load() != 3 {
		t.Errorf("reconnects %d, server errors %d, too large %d; want 0, 0, 3", s.nats.reconnects.Load(), s.nats.serverErrs.Load(), s.nats.tooLarge.Load())
	}
}

// encodeNKeySeed is the inverse of decodeNKeySeed, for tests.
func encodeNKeySeed(seed []byte) string {
	raw := []byte{nkeyPrefixSeed | nkeyPrefixUser>>5, (nkeyPrefixUser & 31) << 3}
	raw = append(raw, seed...)
	sum := crc16(raw)
	return nkeyBase32.EncodeToString(append(raw, byte(sum), byte(sum>>8)))
}

// TestNATSCredentials: user/password and tokens in the URL or by flag, and
// nkeys, against a real server; wrong credentials give a /health error
// (logged once), not a crash or a restart loop.
func TestNATSCredentials(t *testing.T) {
	seed := make([]byte, ed25519.SeedSize)
	rand.Read(seed)
	seedFile := filepath.Join(t.TempDir(), "user.nk")
	os.WriteFile(seedFile, []byte("# a comment\n"+encodeNKeySeed(seed)+"\n"), 0o600)
	_, pub, err := decodeNKeySeed(encodeNKeySeed(seed))
	if err != nil {
		t.Fatal(err)
	}
	rand.Read(seed)
	otherSeed := filepath.Join(t.TempDir(), "other.nk")
	os.WriteFile(otherSeed, []byte(encodeNKeySeed(seed)), 0o600)

	users := startNATS(t, fmt.Sprintf(`authorization { users = [ {user: alice, password: "s3cret"}, {nkey: %s} ] }`, pub))
	tokens := startNATS(t, `authorization { token: "t0ken" }`)
	hostport := func(p *natsProc) string { return strings.TrimPrefix(p.url, "nats://") }
	tests := []struct {
		name string
		ok   bool
		cfg  func(*Config)
	}{
		{"user and password in the URL", true, func(c *Config) { c.BrokerAddress = "nats://alice:s3cret@" + hostport(users) }},
		{"user and password by flag", true, func(c *Config) { c.BrokerAddress = users.url; c.NATS.User, c.NATS.Password = "alice", "s3cret" }},
		{"nkey seed file", true, func(c *Config) { c.BrokerAddress = users.url; c.NATS.NKeyFile = seedFile }},
		{"token in the URL", true, func(c *Config) { c.BrokerAddress = "nats://t0ken@" + hostport(tokens) }},
		{"token by flag", true, func(c *Config) { c.BrokerAddress = tokens.url; c.NATS.Token = "t0ken" }},
		{"wrong password", false, func(c *Config) { c.BrokerAddress = users.url; c.NATS.User, c.NATS.Password = "alice", "guess" }},
		{"no credentials", false, func(c *Config) { c.BrokerAddress = users.url }},
		{"unknown nkey", false, func(c *Config) { c.BrokerAddress = users.url; c.NATS.NKeyFile = otherSeed }},
		{"wrong token", false, func(c *Config) { c.BrokerAddress = "nats://guess@" + hostport(tokens) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := natsTestConfig("")
			tt.cfg(cfg)
			var logs syncBuffer
			s, url := natsSidecar(t, cfg, &logs)
			if tt.ok {
				waitConnected(t, s)
				in := subscribe(t, url, "/broker?topic=t")
				publishN(t, url, "t", "m", 3)
				eventually(t, 10*time.Second, "messages", func() bool { return in.has(bodies("m", 3)) })
				return
			}
			eventually(t, 20*time.Second, "three refused attempts", func() bool { return s.nats.serverErrs.Load() >= 3 })
			var code int
			var body []byte
			eventually(t, 10*time.Second, "/health 503 past the grace period", func() bool {
				code, body = do(t, "GET", url+"/health", "")
				return code != http.StatusOK
			})
			var h struct {
				Status string
				Broker natsHealth
			}
			json.Unmarshal(body, &h)
			if code != http.StatusServiceUnavailable || h.Status != "degraded" || h.Broker.Connected ||
				!strings.Contains(h.Broker.LastError, "Authorization Violation") || strings.Contains(h.Broker.LastError, "s3cret") {
				t.Errorf("GET /health = %d %s, want 503 degraded naming the authorization violation (and no password)", code, body)
			}
			if n := strings.Count(logs.String(), "level=WARN msg=\"nats connection failed; retrying\""); n != 1 {
				t.Errorf("the refusal was logged %d times at warn, want once:\n%s", n, logs.String())
			}
			if code, body := do(t, "POST", url+"/broker?topic=t", "kept"); code != http.StatusOK {
				t.Errorf("POST while refused = %d %s, want 200 (buffered)", code, body)
			}
		})
	}
}

// TestNATSTLS: tls:// with a CA and a client certificate against a server
// that requires and verifies them; nats:// to a server that requires TLS
// upgrades too; without the client certificate /health says why.
func TestNATSTLS(t *testing.T) {
	ca := newTestCA(t, "nats test CA")
	dir := t.TempDir()
	serverCert, serverKey := ca.issue(t, "localhost", false)
	clientCert, clientKey := ca.issue(t, "sidecar", true)
	files := map[string][]byte{"ca.pem": ca.pem, "server.pem": serverCert, "server.key": serverKey, "client.pem": clientCert, "client.key": clientKey}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	path := func(name string) string { return filepath.Join(dir, name) }
	ns := startNATS(t, fmt.Sprintf(`tls { cert_file: %q, key_file: %q, ca_file: %q, verify: true, timeout: 2 }`,
		path("server.pem"), path("server.key"), path("ca.pem")))
	hostport := strings.TrimPrefix(ns.url, "nats://")

	withCert := func(c *Config) {
		c.NATS.TLSCAFile, c.NATS.TLSCertFile, c.NATS.TLSKeyFile = path("ca.pem"), path("client.pem"), path("client.key")
	}
	for _, tt := range []struct {
		name, address string
		cfg           func(*Config)
	}{
		{"tls://", "tls://" + hostport, withCert},
		{"nats:// to a server that requires TLS", "nats://" + hostport, withCert},
		{"--broker_tls", hostport, func(c *Config) { withCert(c); c.NATS.TLS = true }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := natsTestConfig(tt.address)
			tt.cfg(cfg)
			s, ts := newTestServer(t, cfg)
			waitConnected(t, s)
			in := subscribe(t, ts.URL, "/broker?topic=t")
			publishN(t, ts.URL, "t", "m", 3)
			eventually(t, 10*time.Second, "messages over TLS", func() bool { return in.has(bodies("m", 3)) })
		})
	}
	t.Run("no client certificate", func(t *testing.T) {
		cfg := natsTestConfig("tls://" + hostport)
		cfg.NATS.TLSCAFile = path("ca.pem")
		s, ts := newTestServer(t, cfg)
		eventually(t, 20*time.Second, "/health 503 with a TLS error", func() bool {
			code, body := do(t, "GET", ts.URL+"/health", "")
			return code == http.StatusServiceUnavailable && (strings.Contains(string(body), "certificate") || strings.Contains(string(body), "tls"))
		})
		if s.nats.connected.Load() {
			t.Error("connected without a client certificate")
		}
	})
}

// TestNATSCloseFlushes: publishes accepted just before shutdown are sent
// (and confirmed) before the connection closes, and Close leaves no
// goroutine behind.
func TestNATSCloseFlushes(t *testing.T) {
	ns := startNATS(t, "")
	a, _ := newTestServer(t, natsTestConfig(ns.url))
	b, tsB := newTestServer(t, natsTestConfig(ns.url))
	waitConnected(t, a, b)
	in := subscribe(t, tsB.URL, "/broker?topic=t")
	for i := range 500 {
		if err := a.broker.publish("t", &Message{Body: fmt.Appendf(nil, "m-%d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	a.Close()
	if a.nats.discarded.Load() != 0 {
		t.Errorf("%d discarded at Close, want 0", a.nats.discarded.Load())
	}
	eventually(t, 10*time.Second, "every message published before Close", func() bool { return in.has(bodies("m", 500)) })
	if err := a.broker.publish("t", &Message{Body: []byte("late")}); err == nil {
		t.Error("publish after Close succeeded, want a 503")
	}
	// Close returns once every goroutine of the NATS client has ended.
	b.streams.Close()
	b.Close()
	buf := make([]byte, 1<<20)
	if stacks := string(buf[:runtime.Stack(buf, true)]); strings.Contains(stacks, "(*natsBroker)") {
		t.Errorf("goroutines of the NATS client left after Close:\n%s", stacks)
	}
}

// TestNATSBufferedBeforeConnect: a sidecar whose server is not up yet
// answers publishes from its buffer (503 beyond it) and subscribes; once
// the server starts, the subscriptions are made before the buffered
// publishes go out, so the sidecar's own subscribers get them all.
func TestNATSBufferedBeforeConnect(t *testing.T) {
	port := freePort(t)
	cfg := natsTestConfig(fmt.Sprintf("nats://127.0.0.1:%d", port))
	cfg.NATS.BufferBytes = 2 << 10
	s, ts := newTestServer(t, cfg)
	in := subscribe(t, ts.URL, "/broker?topic=early")
	accepted := 0
	for i := range 100 {
		code, body := do(t, "POST", ts.URL+"/broker?topic=early", fmt.Sprintf("e-%d", i))
		if code == http.StatusOK {
			accepted++
			continue
		}
		wantError(t, "POST while not connected", code, body, http.StatusServiceUnavailable)
	}
	if accepted == 0 || accepted == 100 {
		t.Fatalf("%d of 100 accepted with a 2 KiB buffer, want some", accepted)
	}
	eventually(t, 10*time.Second, "health not ok past the grace period", func() bool { _, ok := s.nats.health(); return !ok })
	if h, _ := s.nats.health(); h.BufferedBytes == 0 || h.BufferedBytes > 2<<10 || !strings.Contains(h.LastError, "refused") {
		t.Errorf("health = %+v; want some bytes buffered (at most 2 KiB) and the dial error", h)
	}

	p := &natsProc{t: t, bin: natsServerPath(t), port: port, monitor: freePort(t), conf: filepath.Join(t.TempDir(), "nats.conf")}
	os.WriteFile(p.conf, fmt.Appendf(nil, "listen: 127.0.0.1:%d\nhttp: 127.0.0.1:%d\n", port, p.monitor), 0o600)
	p.start()
	t.Cleanup(p.stop)
	waitConnected(t, s)
	eventually(t, 10*time.Second, "every accepted publish delivered", func() bool {
		_, total := in.snapshot()
		return total == accepted
	})
	if s.nats.reconnects.Load() != 0 {
		t.Errorf("reconnects = %d, want 0 (the first connection is not a reconnect)", s.nats.reconnects.Load())
	}
}

func TestNATSConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args    []string
		env     map[string]string
		wantErr string
	}{
		{args: []string{"--broker", "nats"}},
		{args: []string{"--broker", "nats", "--broker_address", "nats://a:4222, tls://b:4443,c"}},
		{args: []string{"--broker", "nats", "--broker_address", "nats://u:p@a", "--broker_prefix", "app.events"}},
		{env: map[string]string{"MICRO_BROKER": "nats", "MICRO_BROKER_ADDRESS": "nats://10.0.0.1:4222"}},
		{args: []string{"--broker", "kafka"}, wantErr: "--broker"},
		{args: []string{"--broker", "nats", "--broker_address", "http://a:4222"}, wantErr: "--broker_address"},
		{args: []string{"--broker", "nats", "--broker_address", "nats://a:99999"}, wantErr: "--broker_address"},
		{args: []string{"--broker", "nats", "--broker_address", "nats://a:4222/path"}, wantErr: "--broker_address"},
		{args: []string{"--broker", "nats", "--broker_address", ","}, wantErr: "--broker_address"},
		{args: []string{"--broker", "nats", "--broker_prefix", "a..b"}, wantErr: "--broker_prefix"},
		{args: []string{"--broker", "nats", "--broker_prefix", "a.*"}, wantErr: "--broker_prefix"},
		{args: []string{"--broker", "nats", "--broker_buffer_bytes", "0"}, wantErr: "--broker_buffer_bytes"},
		{args: []string{"--broker", "nats", "--broker_ping_interval", "0s"}, wantErr: "--broker_ping_interval"},
		{args: []string{"--broker", "nats", "--broker_user", "a", "--broker_token", "t"}, wantErr: "--broker_token"},
		{args: []string{"--broker", "nats", "--broker_password", "p"}, wantErr: "--broker_password"},
		{args: []string{"--broker", "nats", "--broker_nkey_file", "f", "--broker_user", "u"}, wantErr: "--broker_nkey_file"},
		{args: []string{"--broker", "nats", "--broker_tls_cert_file", "c"}, wantErr: "--broker_tls_key_file"},
		{args: []string{"--broker_user", "u"}, wantErr: "--broker_user needs --broker nats"},
		{args: []string{"--broker_tls"}, wantErr: "--broker_tls needs --broker nats"},
		{args: []string{"--broker_address", "nats://a:4222"}, wantErr: "--broker_address"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			t.Parallel()
			cfg, err := parseConfig(tt.args, func(k string) string { return tt.env[k] }, io.Discard)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("parseConfig(%q) = %v", tt.args, err)
				}
				if cfg.Broker != "nats" {
					t.Errorf("Broker = %q, want nats", cfg.Broker)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("parseConfig(%q) error = %v, want one line naming %q", tt.args, err, tt.wantErr)
			}
		})
	}
	// Files are read when the server is built: a missing or bad one stops
	// start-up with one line naming the flag.
	bad := filepath.Join(t.TempDir(), "bad.nk")
	os.WriteFile(bad, []byte("SUAAAAAAAA\n"), 0o600)
	for _, tt := range []struct {
		args []string
		flag string
	}{
		{[]string{"--broker_nkey_file", "/nonexistent/seed"}, "--broker_nkey_file"},
		{[]string{"--broker_nkey_file", bad}, "--broker_nkey_file"},
		{[]string{"--broker_tls_ca_file", "/nonexistent/ca.pem"}, "--broker_tls_ca_file"},
		{[]string{"--broker_tls_cert_file", "/nonexistent/c.pem", "--broker_tls_key_file", "/nonexistent/k.pem"}, "--broker_tls_cert_file"},
	} {
		args := append([]string{"--address", "127.0.0.1:0", "--broker", "nats"}, tt.args...)
		err := run(context.Background(), args, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tt.flag) || strings.Contains(err.Error(), "\n") {
			t.Errorf("run(%q) = %v, want one line naming %s", args, err, tt.flag)
		}
	}
}

// TestNKeySeed pins the nkey encoding to the NATS documentation's example
// user and a signature made by the nkeys library.
func TestNKeySeed(t *testing.T) {
	t.Parallel()
	const seed = "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY"
	key, pub, err := decodeNKeySeed(seed)
	if err != nil || pub != "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4" {
		t.Fatalf("decodeNKeySeed = %q, %v; want the documented public key", pub, err)
	}
	want, _ := base64.StdEncoding.DecodeString("WosANJXgeyxerXFo0twRiMG+/ZjYp1K/46bFeFax705yFTCTjM18jWl01gGYk4KKbadiHd+hP3WgUQ2iLZUAAA==")
	if got := ed25519.Sign(key, []byte("DhXdTMAeiHhLDig")); !bytes.Equal(got, want) {
		t.Errorf("signature of the nonce = %x, want %x", got, want)
	}
	if encodeNKeySeed(key.Seed()) != seed {
		t.Errorf("encodeNKeySeed does not invert decodeNKeySeed")
	}
	if crc16([]byte("123456789")) != 0x31c3 {
		t.Errorf("crc16(123456789) = %#x, want 0x31c3 (CRC-16/XMODEM)", crc16([]byte("123456789")))
	}
	for _, bad := range []string{
		"SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3XX", // checksum
		"SUACSSL3UAHUD0KF1NVUZRF5UHPMWZ6BFDTJ7M6USDXIED8PPQYYYCU3VY", // not base32
		"SUACSS",
		"UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4", // a public key
	} {
		if _, _, err := decodeNKeySeed(bad); err == nil {
			t.Errorf("decodeNKeySeed(%q) succeeded, want an error", bad)
		}
	}
	// An account seed (SA...) is not a user's.
	raw := []byte{nkeyPrefixSeed, 0}
	raw = append(raw, make([]byte, 32)...)
	sum := crc16(raw)
	if _, _, err := decodeNKeySeed(nkeyBase32.EncodeToString(append(raw, byte(sum), byte(sum>>8)))); err == nil || !strings.Contains(err.Error(), "user") {
		t.Errorf("account seed: err = %v, want not a user seed", err)
	}
}

// TestNATSReader pins the parser's reading of the server's operations.
func TestNATSReader(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, in string
		kind     natsOpKind
		subject  string
		sid      uint64
		reply    string
		header   string
		payload  string
		err      bool
	}{
		{name: "MSG", in: "MSG a.b 7 5\r\nhello\r\n", kind: natsOpMsg, subject: "a.b", sid: 7, payload: "hello"},
		{name: "MSG with reply", in: "MSG a.b 7 _INBOX.x 5\r\nhello\r\n", kind: natsOpMsg, subject: "a.b", sid: 7, reply: "_INBOX.x", payload: "hello"},
		{name: "lower case, tabs and extra spaces", in: "msg\ta.b  7\t 0\r\n\r\n", kind: natsOpMsg, subject: "a.b", sid: 7},
		{name: "payload with CRLF inside", in: "MSG a 1 4\r\n\r\n\r\n\r\n", kind: natsOpMsg, subject: "a", sid: 1, payload: "\r\n\r\n"},
		{name: "HMSG", in: "HMSG a 2 22 27\r\nNATS/1.0\r\nFoo: bar\r\n\r\nhello\r\n", kind: natsOpMsg, subject: "a", sid: 2, header: "NATS/1.0\r\nFoo: bar\r\n\r\n", payload: "hello"},
		{name: "HMSG with reply", in: "HMSG a 2 r 12 12\r\nNATS/1.0\r\n\r\n\r\n", kind: natsOpMsg, subject: "a", sid: 2, reply: "r", header: "NATS/1.0\r\n\r\n"},
		{name: "PING", in: "PING\r\n", kind: natsOpPing},
		{name: "pong", in: "pong\r\n", kind: natsOpPong},
		{name: "+OK", in: "+OK\r\n", kind: natsOpOK},
		{name: "-ERR", in: "-ERR 'Authorization Violation'\r\n", kind: natsOpErr},
		{name: "INFO", in: `INFO {"server_id":"x","max_payload":1024,"headers":true,"connect_urls":["10.0.0.1:4222"]}` + "\r\n", kind: natsOpInfo},
		{name: "bare LF", in: "PING\n", kind: natsOpPing},
		{name: "payload longer than announced", in: "MSG a 1 3\r\nhello\r\n", err: true},
		{name: "payload cut short", in: "MSG a 1 10\r\nhello\r\n", err: true},
		{name: "negative size", in: "MSG a 1 -1\r\n\r\n", err: true},
		{name: "size over max_payload", in: "MSG a 1 2000000\r\n", err: true},
		{name: "no size", in: "MSG a 1\r\n", err: true},
		{name: "sid not a number", in: "MSG a b 1\r\nx\r\n", err: true},
		{name: "too many arguments", in: "MSG a 1 r s 1\r\nx\r\n", err: true},
		{name: "header larger than total", in: "HMSG a 1 30 20\r\n", err: true},
		{name: "header too small for NATS/1.0", in: "HMSG a 1 2 5\r\nabcde\r\n", err: true},
		{name: "INFO not JSON", in: "INFO {\r\n", err: true},
		{name: "unknown operation", in: "HELLO\r\n", err: true},
		{name: "PING with arguments", in: "PING x\r\n", err: true},
		{name: "line too long", in: strings.Repeat("x", natsReadBuffer+1) + "\r\n", err: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newNATSReader(bufio.NewReaderSize(strings.NewReader(tt.in), natsReadBuffer))
			op, err := r.next()
			if tt.err {
				if err == nil {
					t.Fatalf("next(%q) = %+v, want an error", tt.in, op)
				}
				return
			}
			if err != nil || op.kind != tt.kind || string(op.subject) != tt.subject || op.sid != tt.sid || string(op.reply) != tt.reply ||
				string(op.header) != tt.header || string(op.payload) != tt.payload {
				t.Fatalf("next(%q) = %v %q %d %q %q %q, %v; want %v %q %d %q %q %q", tt.in, op.kind, op.subject, op.sid, op.reply, op.header, op.payload, err,
					tt.kind, tt.subject, tt.sid, tt.reply, tt.header, tt.payload)
			}
			if tt.kind == natsOpMsg && tt.header == "" && op.header != nil {
				t.Errorf("MSG has a header block %q, want nil", op.header)
			}
			if tt.kind == natsOpInfo && (op.info.MaxPayload != 1024 || !op.info.Headers || op.info.ConnectURLs[0] != "10.0.0.1:4222") {
				t.Errorf("INFO = %+v", op.info)
			}
			if tt.kind == natsOpErr && op.text != "'Authorization Violation'" {
				t.Errorf("-ERR text = %q", op.text)
			}
			if _, err := r.next(); !errors.Is(err, io.EOF) {
				t.Errorf("after the operation: %v, want EOF (all of it consumed)", err)
			}
		})
	}
}

// TestNATSEncoding: what Publish writes reads back through the reader and
// the header parser as the same message; compactOut keeps publishes only.
func TestNATSEncoding(t *testing.T) {
	t.Parallel()
	m := &Message{Header: map[string]string{"Timestamp": "1", "X-Empty": "", "X-List": "a, b", "X-Tab": "a\tb"}, Body: []byte("hi\r\nthere")}
	hlen, err := natsHeaderLen(m.Header)
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	out = appendPub(out, "micro", "t", m, hlen)
	out = append(out, "PING\r\nUNSUB 3\r\n"...)
	out = appendPub(out, "micro", "t", &Message{Body: bytes.Repeat([]byte("x"), 100)}, 0)
	out = appendSub(out, "micro", &natsSub{sid: 4, topic: "t", queue: "q"})
	first := len(appendPub(nil, "micro", "t", m, hlen))

	// A publish becomes the HMSG the server would send: add the sid.
	line, rest, _ := bytes.Cut(out[:first], []byte("\r\n"))
	f := strings.Fields(string(line)) // HPUB micro.t <header bytes> <total bytes>
	if len(f) != 4 || f[0] != "HPUB" || f[1] != "micro.t" {
		t.Fatalf("publish line %q, want HPUB micro.t with two sizes", line)
	}
	msg := append(fmt.Appendf(nil, "HMSG %s 9 %s %s\r\n", f[1], f[2], f[3]), rest...)
	r := newNATSReader(bufio.NewReader(bytes.NewReader(msg)))
	op, err := r.next()
	if err != nil {
		t.Fatalf("read %q: %v", msg, err)
	}
	h, err := parseNATSHeaders(op.header)
	if err != nil || !maps.Equal(h, m.Header) || string(op.payload) != string(m.Body) {
		t.Errorf("round trip = %v %q, %v; want %v %q", h, op.payload, err, m.Header, m.Body)
	}

	kept, msgs, pubBytes, dropped := compactOut(bytes.Clone(out), 90) // the first is 73 bytes, the second 100
	if msgs != 1 || dropped != 1 || string(kept) != string(out[:first]) || pubBytes != int64(first) {
		t.Errorf("compactOut(max 90) = %q, %d msgs, %d bytes, %d dropped; want the first publish only", kept, msgs, pubBytes, dropped)
	}
	if _, msgs, _, dropped := compactOut(bytes.Clone(out), natsHardMaxPayload); msgs != 2 || dropped != 0 {
		t.Errorf("compactOut = %d msgs, %d dropped; want 2, 0", msgs, dropped)
	}
	for _, bad := range []map[string]string{{"A:B": "x"}, {"A B": "x"}, {"": "x"}, {"A": "x\r\ny"}} {
		if _, err := natsHeaderLen(bad); err == nil {
			t.Errorf("natsHeaderLen(%q) accepted it", bad)
		}
	}
}

// FuzzNATSReader feeds arbitrary server output to the parser: it must
// never panic, never return a payload larger than max_payload, and the
// header block of an HMSG must parse or fail cleanly.
func FuzzNATSReader(f *testing.F) {
	for _, s := range []string{
		"MSG a.b 1 5\r\nhello\r\n",
		"MSG a.b 1 reply.x 0\r\n\r\n",
		"HMSG a 2 22 27\r\nNATS/1.0\r\nFoo: bar\r\n\r\nhello\r\n",
		"HMSG a 2 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
		`INFO {"server_id":"x","max_payload":1048576,"headers":true,"nonce":"abc","connect_urls":["127.0.0.1:4222"]}` + "\r\n",
		"PING\r\nPONG\r\n+OK\r\n-ERR 'Slow Consumer'\r\n",
		"msg\ta\t1\t1\r\nx\r\n",
		"HMSG a 1 10 5\r\n",
		"MSG a 1 999999999\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r := newNATSReader(bufio.NewReaderSize(bytes.NewReader(data), 4096))
		r.maxPayload = 1 << 16
		for range 100 {
			op, err := r.next()
			if err != nil {
				return
			}
			if op.kind == natsOpMsg {
				if len(op.payload)+len(op.header) > r.maxPayload {
					t.Fatalf("MSG of %d bytes over max_payload %d", len(op.payload)+len(op.header), r.maxPayload)
				}
				if h, err := parseNATSHeaders(op.header); err == nil && op.header == nil && h != nil {
					t.Fatalf("MSG without headers parsed to %v", h)
				}
			}
		}
	})
}

// BenchmarkNATSAcrossSidecars publishes on A to one subscriber on B
// through nats-server: the delivery path between sidecars with --broker
// nats, to compare with BenchmarkPubSubAcrossSidecars.
func BenchmarkNATSAcrossSidecars(b *testing.B) {
	ns := startNATS(b, "")
	logger := discardLogger()
	start := func() *server {
		s, err := newServer(natsTestConfig(ns.url), logger)
		if err != nil {
			b.Fatal(err)
		}
		s.start(context.Background())
		b.Cleanup(func() { s.streams.Close(); s.Close() })
		return s
	}
	a, bs := start(), start()
	ts := httptest.NewServer(bs.handler)
	defer ts.Close()
	for !a.nats.connected.Load() || !bs.nats.connected.Load() {
		time.Sleep(time.Millisecond)
	}
	var received atomic.Int64
	countFrames(b, ts, "/broker?topic=bench", &received)
	m := &Message{Header: map[string]string{"Timestamp": "1"}, Body: []byte("0123456789abcdef")}
	const window = 2000
	publishWindowed(b, window, 1, &received, "msgs/s", func() error { return a.broker.publish("bench", m) })
}
