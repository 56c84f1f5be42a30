package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// startSidecarAt serves a new sidecar built by newServer on addr
// ("127.0.0.1:0" for any port) and returns its URL and an idempotent stop,
// also run at cleanup. Starting again on the same addr simulates a restart.
func startSidecarAt(t *testing.T, cfg *Config, addr string) (*server, string, func()) {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	s, err := newServer(cfg, logger)
	if err != nil {
		t.Fatalf("newServer: %v", err)
	}
	var ln net.Listener
	for i := 0; ; i++ { // the old listener's port may take a moment to free
		ln, err = net.Listen("tcp", addr)
		if err == nil || i == 50 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		s.Close()
		t.Fatalf("listen %s: %v", addr, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.start(ctx)
	ts := httptest.NewUnstartedServer(s.handler)
	ts.Listener.Close()
	ts.Listener = ln
	ts.Config.ReadHeaderTimeout = 5 * time.Second
	ts.Start()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			s.streams.Close() // ends websocket watches, as serve does
			ts.CloseClientConnections()
			ts.Close()
			s.Close()
		})
	}
	t.Cleanup(stop)
	return s, ts.URL, stop
}

// remoteConfig is testConfig with a remote registry and short timings.
func remoteConfig(kind, addr string) *Config {
	cfg := testConfig()
	cfg.Registry = kind
	cfg.RegistryAddress = addr
	cfg.RegistryTimeout = 500 * time.Millisecond
	cfg.RegistryWait = time.Second
	return cfg
}

// lookup returns the node IDs of service name at base, or nil on 404.
func lookup(t *testing.T, base, name string) []string {
	t.Helper()
	code, body := do(t, "GET", base+"/registry?service="+name, "")
	if code == http.StatusNotFound {
		return nil
	}
	if code != http.StatusOK {
		t.Fatalf("GET %s/registry?service=%s = %d %s", base, name, code, body)
	}
	var s Service
	if err := json.Unmarshal(body, &s); err != nil {
		t.Fatalf("decode %s: %v", body, err)
	}
	ids := make([]string, len(s.Nodes))
	for i, n := range s.Nodes {
		ids[i] = n.ID
	}
	return ids
}

func hasNodes(t *testing.T, base, name string, want ...string) bool {
	t.Helper()
	got := lookup(t, base, name)
	return strings.Join(got, ",") == strings.Join(want, ",")
}

func register(t *testing.T, base, ttl, name, node string) {
	t.Helper()
	q := ""
	if ttl != "" {
		q = "?ttl=" + ttl
	}
	body := fmt.Sprintf(`{"name":%q,"version":"1.2","metadata":{"team":"x"},"nodes":[{"id":%q,"address":"127.0.0.1","port":9090,"metadata":{"zone":"a"}}]}`, name, node)
	if code, b := do(t, "POST", base+"/registry"+q, body); code != http.StatusOK {
		t.Fatalf("POST %s/registry%s = %d %s", base, q, code, b)
	}
}

func deregister(t *testing.T, base, name, node string) {
	t.Helper()
	body := fmt.Sprintf(`{"name":%q,"nodes":[{"id":%q}]}`, name, node)
	if code, b := do(t, "DELETE", base+"/registry", body); code != http.StatusOK {
		t.Fatalf("DELETE %s/registry = %d %s", base, code, b)
	}
}

// cacheUp reports whether s's cached registry last reached its backend.
func cacheUp(s *server) bool {
	c := s.registry.reg.(*cachedRegistry)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.up
}

func TestSidecarRegistryShared(t *testing.T) {
	_, urlA, stopA := startSidecarAt(t, testConfig(), "127.0.0.1:0")
	b, urlB, _ := startSidecarAt(t, remoteConfig("sidecar", urlA), "127.0.0.1:0")
	const wait = 5 * time.Second

	// B's websocket watch shows changes made on A, derived from its cache.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(urlB, "http")+"/registry", nil)
	if err != nil {
		t.Fatalf("dial watch on B: %v", err)
	}
	defer ws.CloseNow()

	t.Run("register on B is visible on A and B", func(t *testing.T) {
		register(t, urlB, "", "foo", "b1")
		if !hasNodes(t, urlA, "foo", "b1") {
			t.Fatalf("A: foo = %v, want [b1]", lookup(t, urlA, "foo"))
		}
		if !hasNodes(t, urlB, "foo", "b1") {
			t.Fatalf("B: foo = %v, want [b1]", lookup(t, urlB, "foo"))
		}
		// Version and metadata round-trip through A.
		_, body := do(t, "GET", urlB+"/registry?service=foo", "")
		var s Service
		json.Unmarshal(body, &s)
		if s.Version != "1.2" || s.Metadata["team"] != "x" || s.Nodes[0].Metadata["zone"] != "a" || s.Nodes[0].Port != 9090 {
			t.Fatalf("B: foo = %s, want version 1.2, metadata team=x, node zone=a port 9090", body)
		}
	})

	t.Run("register on A is visible on B and its watch", func(t *testing.T) {
		register(t, urlA, "", "bar", "a1")
		eventually(t, wait, "bar visible on B", func() bool { return hasNodes(t, urlB, "bar", "a1") })
		for {
			_, data, err := ws.Read(ctx)
			if err != nil {
				t.Fatalf("watch on B: %v", err)
			}
			var ev Event
			json.Unmarshal(data, &ev)
			if ev.Service != nil && ev.Service.Name == "bar" {
				if ev.Action != "create" || len(ev.Service.Nodes) != 1 || ev.Service.Nodes[0].ID != "a1" {
					t.Fatalf("watch event %s, want create of bar a1", data)
				}
				break
			}
		}
	})

	t.Run("TTL expiry propagates", func(t *testing.T) {
		register(t, urlB, "300ms", "ttl", "b2")
		if !hasNodes(t, urlA, "ttl", "b2") {
			t.Fatalf("A: ttl = %v, want [b2]", lookup(t, urlA, "ttl"))
		}
		// No heartbeat: gone from both.
		eventually(t, wait, "ttl expired on A", func() bool { return lookup(t, urlA, "ttl") == nil })
		eventually(t, wait, "ttl expired on B", func() bool { return lookup(t, urlB, "ttl") == nil })
	})

	t.Run("deregister propagates", func(t *testing.T) {
		register(t, urlB, "", "gone", "b3")
		deregister(t, urlB, "gone", "b3")
		if got := lookup(t, urlA, "gone"); got != nil {
			t.Fatalf("A: gone = %v after DELETE on B, want 404", got)
		}
		eventually(t, wait, "gone removed on B", func() bool { return lookup(t, urlB, "gone") == nil })
		deregister(t, urlA, "bar", "a1")
		eventually(t, wait, "bar removed on B", func() bool { return lookup(t, urlB, "bar") == nil })
		code, body := do(t, "DELETE", urlB+"/registry", `{"name":"nope","nodes":[{"id":"x"}]}`)
		wantError(t, "DELETE unknown on B", code, body, http.StatusNotFound)
	})

	t.Run("A down: B serves its cache; A back: B re-sends", func(t *testing.T) {
		register(t, urlA, "", "other", "a2")
		eventually(t, wait, "other visible on B", func() bool { return hasNodes(t, urlB, "other", "a2") })
		addrA := strings.TrimPrefix(urlA, "http://")
		stopA()
		eventually(t, wait, "B notices A is down", func() bool { return !cacheUp(b) })
		for _, name := range []string{"foo", "other"} {
			if lookup(t, urlB, name) == nil {
				t.Fatalf("B: %s not served from cache while A is down", name)
			}
		}
		code, body := do(t, "GET", urlB+"/registry", "")
		if code != http.StatusOK || !strings.Contains(string(body), `"foo"`) {
			t.Fatalf("B: GET /registry = %d %s while A is down, want the cached list", code, body)
		}
		register(t, urlB, "10s", "during", "b4") // accepted and queued
		if !hasNodes(t, urlB, "during", "b4") {
			t.Fatalf("B: during = %v, want its own registration at once", lookup(t, urlB, "during"))
		}

		_, urlA2, _ := startSidecarAt(t, testConfig(), addrA) // empty memory registry
		eventually(t, wait, "foo re-sent to A", func() bool { return hasNodes(t, urlA2, "foo", "b1") })
		eventually(t, wait, "during sent to A", func() bool { return hasNodes(t, urlA2, "during", "b4") })
		// A restarted empty: what only A held is gone from B too.
		eventually(t, wait, "other dropped on B", func() bool { return lookup(t, urlB, "other") == nil })
	})
}
