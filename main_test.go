package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// testConfig returns the defaults with durations short enough for tests.
func testConfig() *Config {
	cfg := defaultConfig()
	cfg.Address = "127.0.0.1:0"
	cfg.RegistrySweep = 20 * time.Millisecond
	cfg.HealthcheckInterval = 50 * time.Millisecond
	cfg.HealthcheckTimeout = 50 * time.Millisecond
	cfg.RegisterTTL = 2 * time.Second
	cfg.RegisterInterval = 500 * time.Millisecond
	cfg.ShutdownTimeout = 2 * time.Second
	return cfg
}

// startUp parses args as run does (with no MICRO_* environment) and
// builds the server, closed at once: what start-up makes of them, and
// its error.
func startUp(t *testing.T, args ...string) (*Config, error) {
	t.Helper()
	cfg, err := parseConfig(args, func(string) string { return "" }, io.Discard)
	if err != nil {
		return cfg, err
	}
	s, err := newServer(cfg, testLogger(t))
	if err == nil {
		s.Close()
	}
	return cfg, err
}

// newTestServer builds the server through the constructor run uses, lets
// tweaks adjust it (balancer timings), starts it and serves its real route
// table on a real port. At cleanup it closes both and checks that every
// goroutine they started has ended (trackGoroutines).
func newTestServer(t testing.TB, cfg *Config, tweaks ...func(*server)) (*server, *httptest.Server) {
	t.Helper()
	if cfg == nil {
		cfg = testConfig()
	}
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	var (
		s      *server
		ts     *httptest.Server
		cancel context.CancelFunc = func() {}
	)
	leaks := trackGoroutines(t, func() {
		var err error
		s, err = newServer(cfg, logger)
		if err != nil {
			t.Fatalf("newServer: %v", err)
		}
		for _, tweak := range tweaks {
			tweak(s)
		}
		var ctx context.Context
		ctx, cancel = context.WithCancel(context.Background())
		s.start(ctx)
		ts = httptest.NewUnstartedServer(s.handler)
		ts.Config.ReadHeaderTimeout = 5 * time.Second
		ts.Start()
	})
	t.Cleanup(func() {
		cancel()
		s.Close()
		ts.Close()
		leaks()
	})
	return s, ts
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader.
type syncBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// do sends a request and returns the status and body.
func do(t *testing.T, method, url, body string, header ...string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	return resp.StatusCode, b
}

// wantError checks that body is the JSON error of status code.
func wantError(t *testing.T, call string, gotCode int, body []byte, code int) apiError {
	t.Helper()
	var e apiError
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatalf("%s: body %q is not a JSON error: %v", call, body, err)
	}
	if gotCode != code || e.Code != code || e.ID == "" || e.Detail == "" || e.Status != http.StatusText(code) {
		t.Fatalf("%s = %d %+v, want a JSON error with code %d", call, gotCode, e, code)
	}
	return e
}

// hungServer is a backend that accepts requests and never answers them,
// until the caller leaves or the test ends.
func hungServer(t testing.TB) *httptest.Server {
	t.Helper()
	release := make(chan struct{})
	hung := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	t.Cleanup(func() { close(release); hung.Close() })
	return hung
}

// freePort returns a loopback port free at the time of the call, for
// servers started outside the test process (Pebble, Consul).
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s never happened", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// newTestClock returns a testClock (balancer_test.go), a clock that moves
// only when the test moves it, set at a fixed instant. Tests give it to TTL
// logic (Config.now) and step it past or short of a TTL: the answer does not
// depend on how loaded the machine is.
func newTestClock() *testClock {
	c := &testClock{}
	c.ns.Store(time.Unix(1_000_000_000, 0).UnixNano())
	return c
}
