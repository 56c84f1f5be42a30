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

func TestAppWithoutHealthcheckHeartbeats(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.ServerName = "go.micro.srv.plain"
	cfg.ServerAddress = "127.0.0.1:9"
	cfg.RegisterTTL = 300 * time.Millisecond
	cfg.RegisterInterval = 100 * time.Millisecond
	_, ts := newTestServer(t, cfg)
	eventually(t, 5*time.Second, "registration", func() bool {
		code, _ := getService(t, ts.URL, "go.micro.srv.plain")
		return code == 200
	})
	// Well past several TTLs, the heartbeat keeps it registered.
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		if code, _ := getService(t, ts.URL, "go.micro.srv.plain"); code != 200 {
			t.Fatal("app registration expired despite the heartbeat")
		}
		time.Sleep(50 * time.Millisecond)
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

func TestBinaryBadFlagOneLine(t *testing.T) {
	t.Parallel()
	out, err := exec.Command(sidecarBinary(t), "--register_ttl=soon").CombinedOutput()
	if err == nil {
		t.Fatal("bad flag: exit status 0, want failure")
	}
	if !strings.Contains(string(out), "register_ttl") {
		t.Errorf("bad flag output %q does not name the flag", out)
	}
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
