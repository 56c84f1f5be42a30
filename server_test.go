package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

func TestParseConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		check   func(*Config) bool
		wantErr string // substring; empty means success
	}{
		{name: "defaults", check: func(c *Config) bool {
			return c.Address == "127.0.0.1:8081" && c.Handler == "rpc" && c.Namespace == "go.micro.srv" && c.Registry == "memory" && c.ClientRequestTimeout == 5*time.Second && c.ShutdownDelay == 0
		}},
		{name: "flags", args: []string{"--address", ":9000", "--cors", "http://a.example, https://b.example", "--register_ttl=1m"}, check: func(c *Config) bool {
			return c.Address == ":9000" && len(c.CORS) == 2 && c.CORS[1] == "https://b.example" && c.RegisterTTL == time.Minute
		}},
		{name: "env", env: map[string]string{"MICRO_ADDRESS": ":7000", "MICRO_ENABLE_STATS": "true"}, check: func(c *Config) bool {
			return c.Address == ":7000" && c.EnableStats
		}},
		{name: "flag wins over env", args: []string{"-address=:1"}, env: map[string]string{"MICRO_ADDRESS": ":7000"}, check: func(c *Config) bool {
			return c.Address == ":1"
		}},
		{name: "bad duration", args: []string{"--register_ttl", "soon"}, wantErr: "register_ttl"},
		{name: "bad env", env: map[string]string{"MICRO_CLIENT_RETRIES": "many"}, wantErr: "--client_retries (from MICRO_CLIENT_RETRIES)"},
		{name: "negative duration", args: []string{"--healthcheck_interval=-1s"}, wantErr: "--healthcheck_interval"},
		{name: "bad handler", args: []string{"--handler=grpc"}, wantErr: "--handler"},
		{name: "bad registry", args: []string{"--registry=zookeeper"}, wantErr: "--registry"},
		{name: "interval not below ttl", args: []string{"--register_ttl=5s", "--register_interval=5s"}, wantErr: "--register_interval"},
		{name: "name without address", args: []string{"--server_name=foo"}, wantErr: "--server_address"},
		{name: "bad server address", args: []string{"--server_name=foo", "--server_address=nohost"}, wantErr: "--server_address"},
		{name: "bad healthcheck url", args: []string{"--server_name=foo", "--server_address=127.0.0.1:1", "--healthcheck_url=ftp://x"}, wantErr: "--healthcheck_url"},
		{name: "bad cors origin", args: []string{"--cors=example.com"}, wantErr: "--cors"},
		{name: "unknown flag", args: []string{"--nope"}, wantErr: "nope"},
		{name: "stray argument", args: []string{"--address=:1", "extra"}, wantErr: "extra"},
		{name: "both tokens", args: []string{"--auth_token=a", "--auth_token_file=/dev/null"}, wantErr: "--auth_token_file"},
		{name: "missing token file", args: []string{"--auth_token_file=/nonexistent/token"}, wantErr: "--auth_token_file"},
		{name: "--registry memory", args: []string{"--registry", "memory"}},
		{name: "--registry consul", args: []string{"--registry", "consul"}},
		{name: "--registry consul --registry_address 127.0.0.1:8500", args: []string{"--registry", "consul", "--registry_address", "127.0.0.1:8500"}},
		{name: "--registry consul --registry_address https://consul.internal:8501", args: []string{"--registry", "consul", "--registry_address", "https://consul.internal:8501"}},
		{name: "--registry consul --registry_address ftp://x", args: []string{"--registry", "consul", "--registry_address", "ftp://x"}, wantErr: "--registry_address"},
		{name: "--registry sidecar --registry_address http://127.0.0.1:8081", args: []string{"--registry", "sidecar", "--registry_address", "http://127.0.0.1:8081"}},
		{name: "--registry sidecar", args: []string{"--registry", "sidecar"}, wantErr: "--registry_address"},
		{name: "--registry sidecar --registry_address http://h:1/path", args: []string{"--registry", "sidecar", "--registry_address", "http://h:1/path"}, wantErr: "--registry_address"},
		{name: "--registry_connections 200 --registry_stale 500ms --registry_watch_idle 1h", args: []string{"--registry_connections", "200", "--registry_stale", "500ms", "--registry_watch_idle", "1h"},
			check: func(c *Config) bool {
				return c.RegistryConnections == 200 && c.RegistryStale == 500*time.Millisecond && c.RegistryWatchIdle == time.Hour
			}},
		{name: "--registry_connections 3", args: []string{"--registry_connections", "3"}, wantErr: "--registry_connections"},
		{name: "--registry_stale 0s", args: []string{"--registry_stale", "0s"}, wantErr: "--registry_stale"},
		{name: "--registry_watch_idle -1m", args: []string{"--registry_watch_idle", "-1m"}, wantErr: "--registry_watch_idle"},
		{name: "--registry_history 0 --registry_max_watchers 5 --registry_max_nodes 100", args: []string{"--registry_history", "0", "--registry_max_watchers", "5", "--registry_max_nodes", "100"},
			check: func(c *Config) bool {
				return c.RegistryHistory == 0 && c.RegistryMaxWatchers == 5 && c.RegistryMaxNodes == 100
			}},
		{name: "registry limits' defaults", check: func(c *Config) bool {
			return c.RegistryHistory == 1000 && c.RegistryMaxWatchers == 10_000 && c.RegistryMaxNodes == 10_000
		}},
		{name: "--registry_history -1", args: []string{"--registry_history", "-1"}, wantErr: "--registry_history"},
		{name: "--registry_max_watchers 0", args: []string{"--registry_max_watchers", "0"}, wantErr: "--registry_max_watchers"},
		{name: "--registry_max_nodes 0", args: []string{"--registry_max_nodes", "0"}, wantErr: "--registry_max_nodes"},
		{name: "--broker_address 10.0.0.5:8081", args: []string{"--broker_address", "10.0.0.5:8081"}},
		{name: "--broker_address sidecar-a.internal:8081 --broker_secret s", args: []string{"--broker_address", "sidecar-a.internal:8081", "--broker_secret", "s"}},
		{name: "--shutdown_delay 5s", args: []string{"--shutdown_delay", "5s"}, check: func(c *Config) bool { return c.ShutdownDelay == 5*time.Second }},
		{name: "--shutdown_delay -1s", args: []string{"--shutdown_delay", "-1s"}, wantErr: "--shutdown_delay"},
		{name: "--stats_max_services 500 --metrics_node_labels", args: []string{"--stats_max_services", "500", "--metrics_node_labels"},
			check: func(c *Config) bool { return c.StatsMaxServices == 500 && c.MetricsNodeLabels }},
		{name: "--stats_max_services 0", args: []string{"--stats_max_services", "0"}, wantErr: "--stats_max_services"},
		{name: "--broker_address 10.0.0.5", args: []string{"--broker_address", "10.0.0.5"}, wantErr: "--broker_address"},
		{name: "--broker_address 10.0.0.5:0", args: []string{"--broker_address", "10.0.0.5:0"}, wantErr: "--broker_address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var stderr bytes.Buffer
			cfg, err := parseConfig(tt.args, func(k string) string { return tt.env[k] }, &stderr)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("parseConfig(%q) error = %v, want one naming %q", tt.args, err, tt.wantErr)
				}
				if strings.Contains(err.Error(), "\n") {
					t.Errorf("error %q spans lines, want one line", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseConfig(%q) = %v", tt.args, err)
			}
			if tt.check != nil && !tt.check(cfg) {
				t.Errorf("parseConfig(%q, env %v) = %+v, not what the test wants", tt.args, tt.env, cfg)
			}
		})
	}
}

func TestParseConfigTokenFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "token")
	os.WriteFile(path, []byte("s3cret\n"), 0o600)
	cfg, err := parseConfig([]string{"--auth_token_file", path}, func(string) string { return "" }, &bytes.Buffer{})
	if err != nil || cfg.AuthToken != "s3cret" {
		t.Fatalf("parseConfig(--auth_token_file) = %+v, %v; want token s3cret", cfg, err)
	}
}

func TestHelpListsFlags(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	err := run(context.Background(), []string{"--help"}, &out, &out)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("run(--help) = %v, want flag.ErrHelp", err)
	}
	for _, f := range []string{"-address", "-cors", "-server_name", "-server_address", "-healthcheck_url", "-healthcheck_interval",
		"-healthcheck_timeout", "-register_ttl", "-register_interval", "-registry", "-auth_token", "MICRO_"} {
		if !strings.Contains(out.String(), f) {
			t.Errorf("--help output lacks %s", f)
		}
	}
}

func TestErrorsAreJSON(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	tests := []struct{ method, path string }{
		{"POST", "/health"},
		{"PUT", "/registry"},
		{"PATCH", "/rpc"},
		{"DELETE", "/broker"},
	}
	for _, tt := range tests {
		code, body := do(t, tt.method, ts.URL+tt.path, "")
		wantError(t, tt.method+" "+tt.path, code, body, http.StatusMethodNotAllowed)
	}
	// CONNECT in authority form has no path for the mux to match (on a
	// sidecar that answers to any Host).
	cfg := testConfig()
	cfg.Address = ":0"
	_, all := newTestServer(t, cfg)
	c, err := net.Dial("tcp", all.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "CONNECT example.com:443 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("CONNECT: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	wantError(t, "CONNECT example.com:443", resp.StatusCode, body, http.StatusMethodNotAllowed)
}

// TestRawRequestErrorsAreJSON sends requests that fail before any
// handler of the sidecar runs (websocket handshakes that the library would
// refuse in plain text, and requests net/http refuses itself while reading
// them) on a raw connection to the server as run serves it: every answer
// is the JSON error, with the status net/http chose.
func TestRawRequestErrorsAreJSON(t *testing.T) {
	t.Parallel()
	_, addr := serveTestServer(t, testConfig())
	const ws = "Host: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
	const key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
	tests := []struct {
		name   string
		req    string
		code   int
		detail string      // substring of the JSON detail
		header http.Header // headers the answer must carry
	}{
		{"registry watch without a key", "GET /registry HTTP/1.1\r\n" + ws + "Sec-WebSocket-Version: 13\r\n\r\n",
			400, "Sec-WebSocket-Key", nil},
		{"registry watch with version 8", "GET /registry HTTP/1.1\r\n" + ws + key + "Sec-WebSocket-Version: 8\r\n\r\n",
			400, "Sec-WebSocket-Version", http.Header{"Sec-Websocket-Version": {"13"}}},
		{"registry watch with a short key", "GET /registry HTTP/1.1\r\n" + ws + "Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n",
			400, "16 bytes", nil},
		{"registry watch with two keys", "GET /registry HTTP/1.1\r\n" + ws + key + key + "Sec-WebSocket-Version: 13\r\n\r\n",
			400, "Sec-WebSocket-Key", nil},
		{"registry watch over HTTP/1.0", "GET /registry HTTP/1.0\r\n" + ws + key + "Sec-WebSocket-Version: 13\r\n\r\n",
			426, "HTTP/1.1", http.Header{"Upgrade": {"websocket"}}},
		{"broker subscription without a key", "GET /broker?topic=t HTTP/1.1\r\n" + ws + "Sec-WebSocket-Version: 13\r\n\r\n",
			400, "Sec-WebSocket-Key", nil},
		{"broker subscription without a version", "GET /broker?topic=t HTTP/1.1\r\n" + ws + key + "\r\n",
			400, "Sec-WebSocket-Version", http.Header{"Sec-Websocket-Version": {"13"}}},
		{"broker subscription without Upgrade in Connection", "GET /broker?topic=t HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\nUpgrade: websocket\r\n" + key + "Sec-WebSocket-Version: 13\r\n\r\n",
			426, "websocket", http.Header{"Upgrade": {"websocket"}}},
		// net/http's own answers, written before any handler.
		{"malformed request line", "GARBAGE\r\n\r\n", 400, "malformed", nil},
		{"malformed header line", "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n", 400, "malformed", nil},
		{"malformed Host", "GET /health HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "malformed Host header", nil},
		{"missing Host", "GET /health HTTP/1.1\r\n\r\n", 400, "missing required Host header", nil},
		{"two Hosts", "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "malformed", nil},
		{"invalid header value", "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x01b\r\n\r\n", 400, "malformed", nil},
		{"unsupported protocol", "GET /health HTTP/3.0\r\nHost: 127.0.0.1\r\n\r\n", 505, "unsupported protocol version", nil},
		{"unsupported transfer encoding", "POST /registry HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "Transfer-Encoding", nil},
		{"unsupported Expect", "POST /registry HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n{}", 417, "Expect", nil},
		{"headers too large", "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + strings.Repeat("a", 80<<10) + "\r\n\r\n", 431, "64 KiB", nil},
		{"malformed second request on a kept-alive connection", "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGARBAGE\r\n\r\n", 400, "malformed", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			// The server may answer and close before it has read all
			// (431): write on the side, read the answer here.
			go io.WriteString(c, tt.req)
			br := bufio.NewReader(c)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("%q: no answer: %v", tt.name, err)
			}
			if strings.HasPrefix(tt.name, "malformed second") { // the first answer is /health's
				io.Copy(io.Discard, resp.Body)
				if resp, err = http.ReadResponse(br, nil); err != nil {
					t.Fatalf("%q: no second answer: %v", tt.name, err)
				}
			}
			body, _ := io.ReadAll(resp.Body)
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("%q: Content-Type %q, body %q; want application/json", tt.name, ct, body)
			}
			e := wantError(t, tt.name, resp.StatusCode, body, tt.code)
			if !strings.Contains(e.Detail, tt.detail) {
				t.Errorf("%q: detail %q, want it to contain %q", tt.name, e.Detail, tt.detail)
			}
			for k, v := range tt.header {
				if got := resp.Header.Values(k); strings.Join(got, ",") != strings.Join(v, ",") {
					t.Errorf("%q: header %s = %q, want %q", tt.name, k, got, v)
				}
			}
		})
	}
}

// TestServerAnswerLookalikePasses: bytes a backend sends through an
// upgraded (hijacked) connection pass untouched, even when they read
// exactly like one of net/http's own answers, which the server rewrites
// into JSON only before a handler runs.
func TestServerAnswerLookalikePasses(t *testing.T) {
	t.Parallel()
	const lookalike = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request"
	node := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: Upgrade\r\n\r\n")
		if _, err := brw.ReadByte(); err != nil { // the client's go-ahead: the lookalike is a write of its own
			return
		}
		io.WriteString(c, lookalike)
		brw.ReadByte() // until the client leaves
	}))
	t.Cleanup(node.Close)
	_, addr := serveTestServer(t, proxyTestConfig())
	registerURLs(t, "http://"+addr, "go.micro.srv.raw", node.URL)

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "GET /raw/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: raw\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade through the proxy: %v, %v; want 101", resp, err)
	}
	io.WriteString(c, "g")
	got := make([]byte, len(lookalike))
	if _, err := io.ReadFull(br, got); err != nil || string(got) != lookalike {
		t.Errorf("the backend's bytes arrived as %q (%v), want %q", got, err, lookalike)
	}
}

func TestAuthToken(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.AuthToken = "s3cret"
	cfg.EnableStats = true
	_, ts := newTestServer(t, cfg)
	tests := []struct {
		name, path, auth string
		code             int
	}{
		{"no token", "/registry", "", 401},
		{"wrong token", "/registry", "Bearer nope", 401},
		{"wrong scheme", "/registry", "Basic s3cret", 401},
		{"prefix of token", "/registry", "Bearer s3cre", 401},
		{"right token", "/registry", "Bearer s3cret", 200},
		{"lower-case scheme", "/registry", "bearer s3cret", 200},
		{"health needs none", "/health", "", 200},
		{"unknown path needs token too", "/foo/bar", "", 401},
		{"stats page shell needs none", "/stats", "", 200},
		{"stats data needs the token", "/stats?format=json", "", 401},
		{"stats data with the token", "/stats?format=json", "Bearer s3cret", 200},
		{"metrics need the token", "/metrics", "", 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body := do(t, "GET", ts.URL+tt.path, "", "Authorization", tt.auth)
			if tt.code == 401 {
				wantError(t, "GET "+tt.path+" with "+tt.auth, code, body, 401)
				return
			}
			if code != tt.code {
				t.Errorf("GET %s with %q = %d %s, want %d", tt.path, tt.auth, code, body, tt.code)
			}
		})
	}
}

func TestCORS(t *testing.T) {
	t.Parallel()
	preflight := func(t *testing.T, url, origin string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest("OPTIONS", url+"/registry", nil)
		req.Header.Set("Origin", origin)
		req.Header.Set("Access-Control-Request-Method", "POST")
		req.Header.Set("Access-Control-Request-Headers", "content-type, authorization")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}

	cfg := testConfig()
	cfg.CORS = []string{"https://app.example"}
	cfg.AuthToken = "t" // preflights carry no token and must still pass
	_, ts := newTestServer(t, cfg)
	resp := preflight(t, ts.URL, "https://app.example")
	if resp.StatusCode != 204 || resp.Header.Get("Access-Control-Allow-Origin") != "https://app.example" ||
		resp.Header.Get("Access-Control-Allow-Credentials") != "true" || !strings.Contains(resp.Header.Get("Access-Control-Allow-Headers"), "authorization") {
		t.Errorf("allowed preflight = %d %v", resp.StatusCode, resp.Header)
	}
	if resp := preflight(t, ts.URL, "https://evil.example"); resp.StatusCode != 403 || resp.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("disallowed preflight = %d %v, want 403 without allow-origin", resp.StatusCode, resp.Header)
	}
	// Browsers send "simple" requests without a preflight: a foreign page
	// must not get to change anything, even without a token.
	for _, method := range []string{"GET", "POST", "DELETE"} {
		code, body := do(t, method, ts.URL+"/registry", seedService, "Origin", "https://evil.example", "Authorization", "Bearer t", "Content-Type", "text/plain")
		wantError(t, method+" /registry from another origin", code, body, http.StatusForbidden)
	}
	if code, body := do(t, "GET", ts.URL+"/registry", "", "Origin", "https://app.example", "Authorization", "Bearer t"); code != 200 {
		t.Errorf("GET from an allowed origin = %d %s, want 200", code, body)
	}
	if code, body := do(t, "GET", ts.URL+"/registry", "", "Origin", ts.URL, "Authorization", "Bearer t"); code != 200 {
		t.Errorf("GET from the sidecar's own origin = %d %s, want 200", code, body)
	}
	if _, svc := getService(t, ts.URL, "foo.bar"); svc != nil {
		t.Errorf("a foreign page registered %+v", svc)
	}

	star := testConfig()
	star.CORS = []string{"*"}
	_, ts2 := newTestServer(t, star)
	resp = preflight(t, ts2.URL, "https://any.example")
	if resp.Header.Get("Access-Control-Allow-Origin") != "*" || resp.Header.Get("Access-Control-Allow-Credentials") != "" {
		t.Errorf("wildcard preflight headers = %v, want * without credentials", resp.Header)
	}

	_, ts3 := newTestServer(t, nil)
	if resp := preflight(t, ts3.URL, "https://app.example"); resp.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("without --cors preflight allowed origin: %v", resp.Header)
	}
}

func TestLoopbackHostOnly(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil) // testConfig listens on 127.0.0.1
	for _, tt := range []struct {
		host string
		code int
	}{
		{"127.0.0.1:8081", 200},
		{"localhost:8081", 200},
		{"[::1]:8081", 200},
		{"app.localhost", 200},
		{"rebound.evil.example:8081", 403},
		{"10.0.0.1", 403},
	} {
		req, _ := http.NewRequest("GET", ts.URL+"/registry", nil)
		req.Host = tt.host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.code {
			t.Errorf("GET /registry with Host %s = %d, want %d", tt.host, resp.StatusCode, tt.code)
		}
	}
	// Listening on every interface, any Host is served.
	cfg := testConfig()
	cfg.Address = ":0"
	_, all := newTestServer(t, cfg)
	req, _ := http.NewRequest("GET", all.URL+"/registry", nil)
	req.Host = "sidecar.internal:8081"
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Errorf("GET with Host sidecar.internal on :0 = %v %v, want 200", resp, err)
	}
}

func TestWebsocketOriginChecked(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.CORS = []string{"https://app.example"}
	_, ts := newTestServer(t, cfg)
	ws := "ws" + strings.TrimPrefix(ts.URL, "http") + "/registry"
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, resp, err := websocket.Dial(ctx, ws, &websocket.DialOptions{HTTPHeader: http.Header{"Origin": {"https://evil.example"}}})
	if err == nil || resp == nil || resp.StatusCode != 403 {
		t.Fatalf("dial from disallowed origin: resp %v err %v, want 403", resp, err)
	}
	c, _, err := websocket.Dial(ctx, ws, &websocket.DialOptions{HTTPHeader: http.Header{"Origin": {"https://app.example"}}})
	if err != nil {
		t.Fatalf("dial from allowed origin: %v", err)
	}
	c.CloseNow()
}

// flakyApp is a test app whose health endpoint answers with status, or
// hangs while hang is set.
type flakyApp struct {
	status atomic.Int32
	hang   atomic.Bool
	checks atomic.Int32
}

func (a *flakyApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.checks.Add(1)
	if a.hang.Load() {
		<-r.Context().Done()
		return
	}
	w.WriteHeader(int(a.status.Load()))
}

func TestAppHealthCheck(t *testing.T) {
	t.Parallel()
	app := &flakyApp{}
	app.status.Store(200)
	backend := httptest.NewServer(app)
	t.Cleanup(backend.Close)

	cfg := testConfig()
	cfg.ServerName = "go.micro.srv.app"
	cfg.ServerAddress = strings.TrimPrefix(backend.URL, "http://")
	cfg.HealthcheckURL = backend.URL + "/health"
	_, ts := newTestServer(t, cfg)

	registered := func() bool {
		code, _ := getService(t, ts.URL, "go.micro.srv.app")
		return code == http.StatusOK
	}
	health := func() int {
		code, _ := do(t, "GET", ts.URL+"/health", "")
		return code
	}
	eventually(t, 5*time.Second, "registration of the healthy app", registered)
	if code, svc := getService(t, ts.URL, "go.micro.srv.app"); code != 200 || svc.Nodes[0].Address != "127.0.0.1" {
		t.Fatalf("app node = %+v, want address 127.0.0.1", svc)
	}
	if c := health(); c != 200 {
		t.Errorf("/health with a healthy app = %d, want 200", c)
	}

	app.status.Store(500)
	eventually(t, 5*time.Second, "deregistration of the failing app", func() bool { return !registered() })
	if c := health(); c != 503 {
		t.Errorf("/health with a failing app = %d, want 503", c)
	}

	app.status.Store(200)
	eventually(t, 5*time.Second, "re-registration of the recovered app", registered)

	// A check that hangs fails after the timeout.
	app.hang.Store(true)
	eventually(t, 5*time.Second, "deregistration of the hung app", func() bool { return !registered() })
	app.hang.Store(false)
	eventually(t, 5*time.Second, "re-registration after the hang", registered)
}

// slowApp is a health endpoint whose checks after the first take hold,
// as an app under load answers. It records when each check began and
// ended (on its own clock: causality orders a check's end before the next
// one's beginning), and the most checks it ever served at once.
type slowApp struct {
	hold  time.Duration
	check func() // runs at the end of every slow check, before the answer

	mu       sync.Mutex // guards the fields below
	inFlight int
	most     int
	starts   []time.Time
	ends     []time.Time
	done     chan int // receives the number of checks ended so far
}

func (a *slowApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	a.inFlight++
	a.most = max(a.most, a.inFlight)
	a.starts = append(a.starts, time.Now())
	first := len(a.starts) == 1
	a.mu.Unlock()
	if !first {
		select {
		case <-time.After(a.hold): // the app is slow, not the test waiting
			a.check()
		case <-r.Context().Done():
		}
	}
	a.mu.Lock()
	a.inFlight--
	a.ends = append(a.ends, time.Now())
	n := len(a.ends)
	a.mu.Unlock()
	w.WriteHeader(http.StatusOK)
	select {
	case a.done <- n:
	default:
	}
}

// TestAppSlowHealthCheck: a --healthcheck_timeout longer than
// --healthcheck_interval is accepted (as Docker, Kubernetes and Consul
// accept it). Checks never overlap: the next begins when the previous
// ended or an interval after it began, whichever is later; and a slow
// check does not hold up the registration's heartbeat.
func TestAppSlowHealthCheck(t *testing.T) {
	t.Parallel()
	const name = "go.micro.srv.slow"
	app := &slowApp{hold: 1500 * time.Millisecond, done: make(chan int, 1)}
	backend := httptest.NewServer(app)
	t.Cleanup(backend.Close)
	cfg, err := parseConfig([]string{
		"--server_name", name, "--server_address", strings.TrimPrefix(backend.URL, "http://"),
		"--healthcheck_url", backend.URL + "/health",
		"--healthcheck_interval", "20ms", "--healthcheck_timeout", "10s",
		"--register_ttl", "500ms", "--register_interval", "50ms",
	}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatalf("parseConfig with --healthcheck_timeout above --healthcheck_interval: %v", err)
	}
	cfg.RegistrySweep = 20 * time.Millisecond
	var expired atomic.Int32
	var reg atomic.Pointer[registryAPI]
	app.check = func() {
		// Three TTLs into a slow check: the heartbeat kept the app registered.
		if _, err := reg.Load().reg.GetService(context.Background(), name); err != nil {
			expired.Add(1)
		}
	}
	newTestServer(t, cfg, func(s *server) { reg.Store(s.registry) })

	for n := 0; n < 3; {
		select {
		case n = <-app.done:
		case <-time.After(30 * time.Second):
			t.Fatalf("%d health checks ended after 30s, want 3", n)
		}
	}
	app.mu.Lock()
	defer app.mu.Unlock()
	if app.most != 1 {
		t.Errorf("the app served %d health checks at once, want 1", app.most)
	}
	for i := 1; i < len(app.starts) && i < len(app.ends); i++ {
		if app.starts[i].Before(app.ends[i-1]) {
			t.Errorf("check %d began %s before check %d ended", i+1, app.ends[i-1].Sub(app.starts[i]), i)
		}
	}
	if n := expired.Load(); n > 0 {
		t.Errorf("the app's registration expired during %d slow checks: the heartbeat waited for the check", n)
	}
}

// TestAppWithoutHealthcheckHeartbeats: without a health check the app is
// re-registered every --register_interval, which keeps it registered past
// several TTLs, and only the heartbeat does. The registry's clock is the
// test's: each step moves it by less than the TTL and waits for the next
// heartbeat to renew the node.
func TestAppWithoutHealthcheckHeartbeats(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	cfg := testConfig()
	cfg.ServerName = "go.micro.srv.plain"
	cfg.ServerAddress = "127.0.0.1:9"
	cfg.RegisterTTL = 300 * time.Millisecond
	cfg.RegisterInterval = 20 * time.Millisecond
	cfg.now = clock.now
	s, ts := newTestServer(t, cfg)
	mem := s.registry.reg.(*memoryRegistry)
	var id string
	eventually(t, 5*time.Second, "registration", func() bool {
		code, svc := getService(t, ts.URL, cfg.ServerName)
		if code == 200 && len(svc.Nodes) == 1 {
			id = svc.Nodes[0].ID
		}
		return id != ""
	})
	for i := range 5 {
		clock.advance(200 * time.Millisecond)
		renewed := clock.now().Add(cfg.RegisterTTL)
		eventually(t, 5*time.Second, "a heartbeat", func() bool {
			return !nodeExpiry(mem, cfg.ServerName, id).Before(renewed)
		})
		mem.expire()
		if code, body := do(t, "GET", ts.URL+"/registry?service="+cfg.ServerName, ""); code != 200 {
			t.Fatalf("%dms (ttl 300ms) into heartbeats: GET %s = %d %s, want the app", (i+1)*200, cfg.ServerName, code, body)
		}
	}
	// Without the heartbeat the registration ends with its TTL.
	s.app.Close()
	clock.advance(cfg.RegisterTTL + time.Millisecond)
	mem.expire()
	if code, body := do(t, "GET", ts.URL+"/registry?service="+cfg.ServerName, ""); code != http.StatusNotFound {
		t.Fatalf("GET %s a TTL after the heartbeat stopped = %d %s, want 404", cfg.ServerName, code, body)
	}
}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// sidecarBinary builds the sidecar once per test run.
func sidecarBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sidecar-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "sidecar")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = errors.New(string(out))
		}
	})
	if buildErr != nil {
		t.Fatalf("go build: %v", buildErr)
	}
	return binPath
}

// startBinary runs the built sidecar with args and returns its base URL,
// read from the one line it prints.
func startBinary(t *testing.T, args ...string) (*exec.Cmd, string, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(sidecarBinary(t), args...)
	cmd.Env = append(os.Environ(), "MICRO_ADDRESS=127.0.0.1:0")
	stdout, _ := cmd.StdoutPipe()
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the address line: %v; stderr: %s", err, stderr)
	}
	fields := strings.Fields(line)
	url := fields[len(fields)-1]
	if !strings.HasPrefix(url, "http://127.0.0.1:") {
		t.Fatalf("address line %q does not end in the bound URL", line)
	}
	return cmd, url, stderr
}

func TestBinarySIGTERMDeregistersAndExits(t *testing.T) {
	t.Parallel()
	cmd, url, stderr := startBinary(t, "--server_name", "go.micro.srv.app", "--server_address", "127.0.0.1:9")
	c := dialWatch(t, url)
	// Once the watcher sees this, it is live and will see the app leave.
	do(t, "POST", url+"/registry", seedService)
	readEvent(t, c)
	eventually(t, 5*time.Second, "app registration", func() bool {
		code, _ := getService(t, url, "go.micro.srv.app")
		return code == 200
	})

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// The watcher sees the app leave, then the sidecar says goodbye.
	sawDelete := false
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, b, err := c.Read(ctx)
		cancel()
		if err != nil {
			if websocket.CloseStatus(err) != websocket.StatusGoingAway {
				t.Errorf("watch ended with %v, want going away", err)
			}
			break
		}
		if strings.Contains(string(b), `"delete"`) && strings.Contains(string(b), "go.micro.srv.app") {
			sawDelete = true
		}
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("exit after SIGTERM: %v; stderr: %s", err, stderr)
		}
		if !sawDelete {
			t.Errorf("no delete event for the app before shutdown; stderr: %s", stderr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("sidecar did not exit within 10s of SIGTERM")
	}
}

// TestBinaryBadFlagOneLine: a flag the sidecar cannot use stops it with
// one line on stderr that names the flag and says where help is, not the
// flag package's usage dump; --help still prints the whole usage.
func TestBinaryBadFlagOneLine(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		env  []string
		args []string
		want []string // substrings of the one line
	}{
		{"bad duration", nil, []string{"--register_ttl=soon"}, []string{`sidecar: invalid value "soon" for flag --register_ttl: want a duration such as 10s, 1m30s or 500ms; see sidecar --help`}},
		{"bad integer", nil, []string{"--client_retries", "many"}, []string{`invalid value "many" for flag --client_retries: want an integer`, "see sidecar --help"}},
		{"bad boolean", nil, []string{"--enable_stats=maybe"}, []string{`invalid value "maybe" for flag --enable_stats: want true or false`, "see sidecar --help"}},
		{"integer out of range", nil, []string{"--max_body_bytes", "99999999999999999999"}, []string{"flag --max_body_bytes", "out of range", "see sidecar --help"}},
		{"unknown flag", nil, []string{"--nope"}, []string{"sidecar: unknown flag --nope; see sidecar --help"}},
		{"missing value", nil, []string{"--address"}, []string{"sidecar: flag --address needs a value; see sidecar --help"}},
		{"bad env", []string{"MICRO_REGISTER_TTL=soon"}, nil, []string{`invalid value "soon" for flag --register_ttl (from MICRO_REGISTER_TTL): want a duration`, "see sidecar --help"}},
		{"invalid combination", nil, []string{"--register_ttl=5s", "--register_interval=5s"}, []string{"flag --register_interval", "see sidecar --help"}},
		{"stray argument", nil, []string{"--enable_stats", "extra"}, []string{`unexpected argument "extra"`, "see sidecar --help"}},
		// The server's --address used with a client command, in either order.
		{"--address before a command", nil, []string{"--address", "127.0.0.1:9", "list", "services"},
			[]string{`"list" is a command of the client`, "--proxy_address 127.0.0.1:9", "--address is where a sidecar listens"}},
		{"--address after a command", nil, []string{"list", "services", "--address", "127.0.0.1:9"},
			[]string{"list: unknown flag --address", "--proxy_address 127.0.0.1:9", "--address is where a sidecar listens"}},
		{"--address= after a command", nil, []string{"get", "service", "x", "--address=h:1"},
			[]string{"--proxy_address h:1"}},
		{"another server flag before a command", nil, []string{"--enable_stats", "stats"},
			[]string{`"stats" is a command of the client`, "--enable_stats is a flag of the sidecar", "sidecar help"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := runClient(t, "", tt.env, tt.args...)
			lines := strings.Split(strings.TrimRight(r.stderr, "\n"), "\n")
			if r.code == 0 || len(lines) != 1 {
				t.Fatalf("sidecar %q: exit %d, stderr (%d lines) %q; want failure with one line", tt.args, r.code, len(lines), r.stderr)
			}
			for _, w := range tt.want {
				if !strings.Contains(lines[0], w) {
					t.Errorf("sidecar %q: stderr %q, want it to contain %q", tt.args, lines[0], w)
				}
			}
			if r.stdout != "" {
				t.Errorf("sidecar %q: stdout %q, want nothing", tt.args, r.stdout)
			}
		})
	}
	t.Run("--help", func(t *testing.T) {
		t.Parallel()
		r := runClient(t, "", nil, "--help")
		if r.code != 0 || strings.Count(r.stderr+r.stdout, "\n") < 40 || !strings.Contains(r.stderr+r.stdout, "-healthcheck_timeout") {
			t.Errorf("sidecar --help: exit %d, output %q; want the whole usage and status 0", r.code, r.stderr+r.stdout)
		}
	})
}

// exposedWarning is a phrase of the start-up warning of a sidecar that
// anyone on the network can use.
const exposedWarning = "anyone who can reach"

// TestBinaryWarnsWhenExposedWithoutToken starts the binary on loopback and
// on every interface, with and without a token, and counts the warnings it
// logs before it is stopped.
func TestBinaryWarnsWhenExposedWithoutToken(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	writeFile(t, tokenFile, []byte("s3cret\n"))
	ca := newTestCA(t, "warn-ca")
	certFile, keyFile, caFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "ca.pem")
	c, k := ca.issue(t, "sidecar", false)
	writeFile(t, certFile, c)
	writeFile(t, keyFile, k)
	writeFile(t, caFile, ca.pem)
	tlsFlags := []string{"--enable_tls", "--tls_cert_file", certFile, "--tls_key_file", keyFile}

	tests := []struct {
		name string
		env  []string
		args []string
		want int // warnings
	}{
		{"every interface", nil, []string{"--address", ":0"}, 1},
		{"every IPv4 interface", nil, []string{"--address", "0.0.0.0:0"}, 1},
		{"every interface from MICRO_ADDRESS", []string{"MICRO_ADDRESS=:0"}, nil, 1},
		{"TLS alone authenticates no one", nil, append([]string{"--address", ":0"}, tlsFlags...), 1},
		{"loopback", nil, []string{"--address", "127.0.0.1:0"}, 0},
		{"localhost", nil, []string{"--address", "localhost:0"}, 0},
		{"token", nil, []string{"--address", ":0", "--auth_token", "s3cret"}, 0},
		{"token file", nil, []string{"--address", ":0", "--auth_token_file", tokenFile}, 0},
		{"token from MICRO_AUTH_TOKEN", []string{"MICRO_AUTH_TOKEN=s3cret"}, []string{"--address", ":0"}, 0},
		{"mutual TLS", nil, append([]string{"--address", ":0", "--tls_client_ca_file", caFile}, tlsFlags...), 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			stderr := runBinaryUntilListening(t, tt.env, tt.args...)
			if got := strings.Count(stderr, exposedWarning); got != tt.want {
				t.Errorf("sidecar %q with env %q logged %d warnings, want %d; stderr:\n%s", tt.args, tt.env, got, tt.want, stderr)
			}
			if tt.want == 0 {
				return
			}
			for _, want := range []string{"level=WARN", "--auth_token_file", "MICRO_AUTH_TOKEN", "change the registry", "call services"} {
				if !strings.Contains(stderr, want) {
					t.Errorf("warning lacks %q:\n%s", want, stderr)
				}
			}
		})
	}
}

// runBinaryUntilListening starts the built sidecar with env (and no other
// MICRO_ variable) and args, waits for its address line, stops it with
// SIGTERM, and returns everything it wrote to stderr.
func runBinaryUntilListening(t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command(sidecarBinary(t), args...)
	cmd.Env = cliEnv(env...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "sidecar listening on ") {
		t.Fatalf("sidecar %q: address line %q, %v; stderr: %s", args, line, err, stderr)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil { // Wait returns once stderr is copied whole
		t.Fatalf("sidecar %q: exit after SIGTERM: %v; stderr: %s", args, err, stderr)
	}
	return stderr.String()
}

// TestStalledBodyTimesOut sends a Content-Length and then one byte: the
// read gives up after its timeout with a JSON 408 instead of holding the
// handler forever.
func TestStalledBodyTimesOut(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := readBodyWithin(w, r, 1<<20, 200*time.Millisecond); err != nil {
			writeHTTPError(w, err)
			return
		}
		writeJSON(w, 200, struct{}{})
	}))
	t.Cleanup(srv.Close)
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer to a stalled body: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	wantError(t, "POST with a stalled body", resp.StatusCode, body, http.StatusRequestTimeout)
}

// refuseFirst is the real memory registry with one injected fault: it
// refuses the first registration, as Consul does while ACLs propagate.
type refuseFirst struct {
	Registry
	calls atomic.Int32
}

func (r *refuseFirst) Register(ctx context.Context, s *Service, ttl time.Duration) error {
	if r.calls.Add(1) == 1 {
		return fmt.Errorf("%w: status 403: ACL not found", errRejected)
	}
	return r.Registry.Register(ctx, s, ttl)
}

func TestAppRegistrationRetried(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.ServerName, cfg.ServerAddress = "go.micro.srv.app", "127.0.0.1:9"
	cfg.RegisterInterval, cfg.RegisterTTL = 20*time.Millisecond, 500*time.Millisecond
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	mem := newMemoryRegistry(cfg.RegistrySweep, time.Now, logger)
	reg := &refuseFirst{Registry: mem}
	app, err := newAppChecker(cfg, reg, logger)
	if err != nil {
		t.Fatal(err)
	}
	app.start(context.Background())
	t.Cleanup(func() { app.Close(); mem.Close() })
	eventually(t, 5*time.Second, "the app registered after a refusal", func() bool {
		_, err := mem.GetService(context.Background(), cfg.ServerName)
		return err == nil && app.state().Registered
	})
}

// TestEarlyErrorWithStalledBody: a request refused before its body is read
// gets its JSON error even though the client never sends the body.
func TestEarlyErrorWithStalledBody(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.AuthToken = "t"
	_, ts := newTestServer(t, cfg)
	c, err := net.Dial("tcp", ts.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST /registry HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n{")
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer to an unauthorized request with a stalled body: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	wantError(t, "POST /registry without a token", resp.StatusCode, body, http.StatusUnauthorized)
}

// rawRequest sends one request whose request-target is written exactly as
// given (Go's client would clean it) and reads the answer.
func rawRequest(t *testing.T, addr, method, target string) (*http.Response, []byte) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", method, target)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, target, err)
	}
	return resp, body
}

// TestPathsNeverRedirected: Go's ServeMux answers a path that is not
// clean (//x, /./x, /a/../b) with a text/html 307 to the cleaned one. The
// sidecar never redirects: its own routes match only their clean paths;
// in proxy mode any other path reaches the node byte for byte, the service
// taken from its first non-empty segment (a JSON 404 when that is no
// service); in RPC mode an unclean path is a JSON 400 or 404.
func TestPathsNeverRedirected(t *testing.T) {
	t.Parallel()
	_, proxyTS := newTestServer(t, proxyTestConfig())
	node, last, hits := recordingBackend(t, "node")
	registerURLs(t, proxyTS.URL, "go.micro.srv.foo", node.URL)
	registerURLs(t, proxyTS.URL, "go.micro.srv.health", node.URL)
	_, rpcTS := newTestServer(t, nil)
	rpcNode := newRPCBackend(t, "foo-1")
	register(t, rpcTS.URL, "go.micro.srv.foo", rpcNode)
	proxyAddr, rpcAddr := proxyTS.Listener.Addr().String(), rpcTS.Listener.Addr().String()

	tests := []struct {
		name, addr, method, target string
		code                       int // 200: answered by the node, which got target as it was sent
	}{
		{"proxy: double slash first", proxyAddr, "GET", "//foo/bar", 200},
		{"proxy: double slash inside", proxyAddr, "GET", "/foo//bar", 200},
		{"proxy: dot segment", proxyAddr, "GET", "/foo/./bar", 200},
		{"proxy: dot-dot segment", proxyAddr, "POST", "/foo/../bar", 200},
		{"proxy: dot-dot last", proxyAddr, "GET", "/foo/bar/..", 200},
		{"proxy: dot last", proxyAddr, "GET", "/foo/.", 200},
		{"proxy: dot-dot past the root", proxyAddr, "GET", "/foo/../../../etc/passwd", 200},
		{"proxy: trailing double slash", proxyAddr, "DELETE", "//foo//", 200},
		{"proxy: encoded dots", proxyAddr, "GET", "/foo/%2e%2e/bar", 200},
		{"proxy: encoded slash and dots", proxyAddr, "GET", "/foo/a%2Fb/../c", 200},
		{"proxy: encoded service name", proxyAddr, "GET", "/fo%6F/./x", 200},
		{"proxy: dots in the query", proxyAddr, "GET", "/foo/x/?a=/../b&c=//d", 200},
		{"proxy: a route of the sidecar, unclean", proxyAddr, "GET", "//health", 200},
		{"proxy: a route of the sidecar, dot-dot", proxyAddr, "GET", "/health/../registry", 200},
		{"proxy: unclean path of an unknown service", proxyAddr, "GET", "/registry/../health", 404},
		{"proxy: dot first", proxyAddr, "GET", "/./foo/x", 404},
		{"proxy: dot-dot first", proxyAddr, "GET", "/../foo", 404},
		{"proxy: encoded dot first", proxyAddr, "GET", "/%2e/foo", 404},
		{"proxy: only slashes", proxyAddr, "GET", "//", 404},
		{"proxy: clean route still the sidecar's", proxyAddr, "GET", "/health", -200},
		{"rpc: double slash first", rpcAddr, "GET", "//foo/bar", 400},
		{"rpc: double slash inside", rpcAddr, "POST", "/foo//bar", 400},
		{"rpc: dot segment", rpcAddr, "GET", "/foo/./bar", 400},
		{"rpc: dot-dot segment", rpcAddr, "POST", "/foo/../bar", 400},
		{"rpc: dot-dot last", rpcAddr, "GET", "/foo/bar/..", 400},
		{"rpc: dot first", rpcAddr, "GET", "/./foo/bar", 400},
		{"rpc: a route of the sidecar, unclean", rpcAddr, "GET", "//health", 400},
		{"rpc: dot-dot to a route of the sidecar", rpcAddr, "GET", "/foo/../registry", 400},
		{"rpc: only slashes", rpcAddr, "GET", "//", 404},
		{"rpc: clean route still the sidecar's", rpcAddr, "GET", "/health", -200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			call := tt.method + " " + tt.target
			before, rpcBefore := hits.Load(), rpcNode.hits.Load()
			resp, body := rawRequest(t, tt.addr, tt.method, tt.target)
			if loc := resp.Header.Get("Location"); loc != "" || (resp.StatusCode >= 300 && resp.StatusCode < 400) {
				t.Fatalf("%s = %d to %q, want no redirect", call, resp.StatusCode, loc)
			}
			switch {
			case tt.code == 200:
				if resp.StatusCode != 200 || string(body) != "node node" {
					t.Fatalf("%s = %d %q, want the node's answer", call, resp.StatusCode, body)
				}
				if got := last(); got.uri != tt.target || got.method != tt.method {
					t.Errorf("%s reached the node as %s %s, want it byte for byte", call, got.method, got.uri)
				}
			case tt.code == -200:
				if resp.StatusCode != 200 || resp.Header.Get("X-Backend") != "" {
					t.Errorf("%s = %d (node %q), want the sidecar's own 200", call, resp.StatusCode, resp.Header.Get("X-Backend"))
				}
			default:
				wantError(t, call, resp.StatusCode, body, tt.code)
				if hits.Load() != before || rpcNode.hits.Load() != rpcBefore {
					t.Errorf("%s reached a node", call)
				}
			}
		})
	}
}

// healthCode is GET /health's status on a new connection (so a test sees
// the listener, not a kept-alive connection); 0 when it cannot connect.
func healthCode(base string) int {
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	resp, err := c.Get(base + "/health")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestBinaryShutdownDelay: with --shutdown_delay, SIGTERM makes /health
// answer 503 and deregisters the app at once, while the sidecar goes on
// serving (proxied requests on new connections succeed) for the delay,
// which here outlasts the test.
func TestBinaryShutdownDelay(t *testing.T) {
	t.Parallel()
	node, _, hits := recordingBackend(t, "node")
	nodeAddr := strings.TrimPrefix(node.URL, "http://")
	cmd, base, stderr := startBinary(t, "--handler", "proxy", "--shutdown_delay", "10m",
		"--server_name", "go.micro.srv.app", "--server_address", nodeAddr)
	registerURLs(t, base, "go.micro.srv.foo", node.URL)
	eventually(t, 5*time.Second, "app registration", func() bool {
		code, _ := getService(t, base, "go.micro.srv.app")
		return code == http.StatusOK
	})
	if code := healthCode(base); code != http.StatusOK {
		t.Fatalf("GET /health before SIGTERM = %d, want 200", code)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "/health answering 503", func() bool { return healthCode(base) == http.StatusServiceUnavailable })
	eventually(t, 5*time.Second, "the app deregistered", func() bool {
		code, _ := getService(t, base, "go.micro.srv.app")
		return code == http.StatusNotFound
	})
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	for i := range 3 {
		resp, err := c.Get(base + "/foo/during-delay")
		if err != nil {
			t.Fatalf("request %d during the delay: %v; stderr: %s", i, err, stderr)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(b) != "node node" {
			t.Fatalf("request %d during the delay = %d %s, want the node's 200", i, resp.StatusCode, b)
		}
	}
	if hits.Load() < 3 {
		t.Errorf("node got %d requests, want 3", hits.Load())
	}
	if cmd.ProcessState != nil {
		t.Errorf("sidecar exited during the delay")
	}
}

// TestShutdownDelayEnds: once --shutdown_delay has passed, the listener
// closes and a request in flight drains; run returns without error.
func TestShutdownDelayEnds(t *testing.T) {
	t.Parallel()
	gate, entered, release := gateBackend(t)
	pr, pw := io.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--address", "127.0.0.1:0", "--handler", "proxy", "--shutdown_delay", "50ms", "--log_level", "error"}, pw, io.Discard)
		pw.Close()
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	go io.Copy(io.Discard, pr)
	if err != nil {
		t.Fatalf("read the address line: %v", err)
	}
	fields := strings.Fields(line)
	base := fields[len(fields)-1]
	registerURLs(t, base, "go.micro.srv.gate", gate.URL)
	req, _ := http.NewRequest("GET", base+"/gate/x", nil)
	result := inFlight(t, http.DefaultClient, req)
	waitEntered(t, entered, result)

	cancel()
	eventually(t, 10*time.Second, "the listener closing after the delay", func() bool { return healthCode(base) == 0 })
	select {
	case err := <-done:
		t.Fatalf("run returned %v with a request in flight", err)
	default:
	}
	release()
	if got := <-result; got != "200 finally" {
		t.Errorf("request in flight across the delay = %q, want 200 finally", got)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after the drain")
	}
}

// TestLoopbackHostPrefix: the shortcut for the usual loopback Host gives
// the answer of the parse it skips, at its edges.
func TestLoopbackHostPrefix(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		host string
		want bool
	}{
		{"127.0.0.1:8081", true}, {"localhost:8081", true}, {"localhost:", true}, {"127.0.0.1:x", true},
		{"127.0.0.1:80:90", false}, {"localhost:1:2", false}, {"127.0.0.10:80", true}, {"127.0.0.1.evil.com:80", false},
		{"localhost.evil.com:80", false}, {"[::1]:80", true}, {"example.com:80", false}, {"127.0.0.1", true},
	} {
		if got := loopbackHost(tt.host); got != tt.want {
			t.Errorf("loopbackHost(%q) = %v, want %v", tt.host, got, tt.want)
		}
	}
}

// TestCallerGoneEndsBackendCall: a caller that hangs up while its call
// waits on a node that never answers ends the backend request at once,
// not at the call's timeout (a minute here), for RPC and the proxy, on
// the connections serve accepts (whose errorConn tells the handler, see
// watchCaller) and on those of a server without that listener (where the
// request's context does); the node is not blamed for it.
func TestCallerGoneEndsBackendCall(t *testing.T) {
	t.Parallel()
	for _, handler := range []string{"rpc", "proxy"} {
		for _, listener := range []string{"serve", "httptest"} {
			t.Run(handler+"/"+listener, func(t *testing.T) {
				t.Parallel()
				cfg := testConfig()
				cfg.Handler = handler
				cfg.ClientRequestTimeout = time.Minute
				var held, arrived atomic.Int64
				node := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					held.Add(1)
					defer held.Add(-1)
					arrived.Add(1)
					io.Copy(io.Discard, r.Body)
					<-r.Context().Done() // the sidecar closed the request's connection
				}))
				t.Cleanup(node.Close)
				var base string
				var s *server
				if listener == "httptest" {
					var ts *httptest.Server
					s, ts = newTestServer(t, cfg)
					base = ts.URL
				} else {
					ln, err := net.Listen("tcp", "127.0.0.1:0")
					if err != nil {
						t.Fatal(err)
					}
					if s, err = newServer(cfg, testLogger(t)); err != nil {
						t.Fatal(err)
					}
					ctx, cancel := context.WithCancel(context.Background())
					served := make(chan error, 1)
					go func() { served <- s.serve(ctx, ln) }()
					t.Cleanup(func() { cancel(); <-served })
					base = "http://" + ln.Addr().String()
				}
				registerURLs(t, base, "go.micro.srv.hang", node.URL)

				c, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
				if err != nil {
					t.Fatal(err)
				}
				req := "GET /hang/x HTTP/1.1\r\nHost: " + strings.TrimPrefix(base, "http://") + "\r\n\r\n"
				if handler == "rpc" {
					body := `{"service":"go.micro.srv.hang","method":"Hang.X","request":{}}`
					req = "POST /rpc HTTP/1.1\r\nHost: " + strings.TrimPrefix(base, "http://") +
						"\r\nContent-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
				}
				if _, err := io.WriteString(c, req); err != nil {
					t.Fatal(err)
				}
				eventually(t, 10*time.Second, "the call at the node", func() bool { return held.Load() == 1 })
				hungUp := time.Now()
				c.Close()
				eventually(t, 10*time.Second, "the node's request ended by the caller's leaving", func() bool { return held.Load() == 0 })
				if d := time.Since(hungUp); d > cfg.ClientRequestTimeout/2 {
					t.Errorf("the backend request ended %s after the caller left, want well before the %s timeout", d, cfg.ClientRequestTimeout)
				}
				if n := arrived.Load(); n != 1 {
					t.Errorf("the node got %d requests, want 1 (a caller's leaving is not retried)", n)
				}
				up := s.proxy.upstreams
				if handler == "rpc" {
					up = s.rpc.upstreams
				}
				eventually(t, 10*time.Second, "the call counted", func() bool {
					_, calls := upstreamTotals(up, "go.micro.srv.hang")
					return calls == 1
				})
				if failures, _ := upstreamTotals(up, "go.micro.srv.hang"); failures != 0 {
					t.Errorf("node failures = %d after the caller left, want 0", failures)
				}
				if n := up.get("go.micro.srv.hang").classes[classIndex(statusClientClosed)].Load(); n != 1 {
					t.Errorf("calls counted as 4xx (499, the caller closed) = %d, want 1", n)
				}
			})
		}
	}
}

// upstreamTotals is the node failures and the calls counted for service.
func upstreamTotals(up *upstreams, service string) (failures, calls int64) {
	u := up.get(service)
	for i := range u.classes {
		calls += u.classes[i].Load()
	}
	return u.nodeFailures.Load(), calls
}
