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
	"slices"
	"strings"
	"sync"
	"sync/atomic"
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
	var ln net.Listener
	var err error
	for i := 0; ; i++ { // the old listener's port may take a moment to free
		ln, err = net.Listen("tcp", addr)
		if err == nil || i == 50 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	var (
		s  *server
		ts *httptest.Server
	)
	ctx, cancel := context.WithCancel(context.Background())
	leaks := trackGoroutines(t, func() {
		s, err = newServer(cfg, logger)
		if err != nil {
			ln.Close()
			t.Fatalf("newServer: %v", err)
		}
		s.start(ctx)
		ts = httptest.NewUnstartedServer(s.handler)
		ts.Listener.Close()
		ts.Listener = ln
		ts.Config.ReadHeaderTimeout = 5 * time.Second
		ts.Start()
	})
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			s.streams.Close() // ends websocket watches, as serve does
			ts.CloseClientConnections()
			ts.Close()
			s.Close()
			leaks()
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

func registerNode(t *testing.T, base, ttl, name, node string) {
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

func deregisterNode(t *testing.T, base, name, node string) {
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
	// A's registry runs on the test's clock: its TTLs end when the test
	// moves it, not while a loaded machine is slow.
	clock := newTestClock()
	cfgA := testConfig()
	cfgA.now = clock.now
	_, urlA, stopA := startSidecarAt(t, cfgA, "127.0.0.1:0")
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
		registerNode(t, urlB, "", "foo", "b1")
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
		registerNode(t, urlA, "", "bar", "a1")
		eventually(t, wait, "bar visible on B", func() bool { return hasNodes(t, urlB, "bar", "a1") })
		// B lists bar before anything looks it up: a "create" without
		// nodes; the lookup above holds it, and its node follows.
		var got []string
		for len(got) < 2 {
			_, data, err := ws.Read(ctx)
			if err != nil {
				t.Fatalf("watch on B: %v", err)
			}
			var ev Event
			json.Unmarshal(data, &ev)
			if ev.Service != nil && ev.Service.Name == "bar" {
				var ids []string
				for _, n := range ev.Service.Nodes {
					ids = append(ids, n.ID)
				}
				got = append(got, ev.Action+fmt.Sprint(ids))
			}
		}
		if want := "create[] update[a1]"; strings.Join(got, " ") != want {
			t.Fatalf("watch events of bar on B = %q, want %q", got, want)
		}
	})

	t.Run("TTL expiry propagates", func(t *testing.T) {
		registerNode(t, urlB, "300ms", "ttl", "b2")
		if !hasNodes(t, urlA, "ttl", "b2") {
			t.Fatalf("A: ttl = %v, want [b2]", lookup(t, urlA, "ttl"))
		}
		// No heartbeat: once the TTL has passed, gone from both.
		clock.advance(300*time.Millisecond + time.Millisecond)
		eventually(t, wait, "ttl expired on A", func() bool { return lookup(t, urlA, "ttl") == nil })
		eventually(t, wait, "ttl expired on B", func() bool { return lookup(t, urlB, "ttl") == nil })
	})

	t.Run("deregister propagates", func(t *testing.T) {
		registerNode(t, urlB, "", "gone", "b3")
		deregisterNode(t, urlB, "gone", "b3")
		if got := lookup(t, urlA, "gone"); got != nil {
			t.Fatalf("A: gone = %v after DELETE on B, want 404", got)
		}
		eventually(t, wait, "gone removed on B", func() bool { return lookup(t, urlB, "gone") == nil })
		deregisterNode(t, urlA, "bar", "a1")
		eventually(t, wait, "bar removed on B", func() bool { return lookup(t, urlB, "bar") == nil })
		code, body := do(t, "DELETE", urlB+"/registry", `{"name":"nope","nodes":[{"id":"x"}]}`)
		wantError(t, "DELETE unknown on B", code, body, http.StatusNotFound)
	})

	t.Run("A down: B serves its cache; A back: B re-sends", func(t *testing.T) {
		registerNode(t, urlA, "", "other", "a2")
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
		registerNode(t, urlB, "10s", "during", "b4") // accepted and queued
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

// badConsul is a real HTTP server that answers like a broken Consul agent:
// 500s, garbage JSON or hung requests, until it is told to behave. It notes
// when each request arrived so a test can show that the sidecar backs off.
type badConsul struct {
	mode    atomic.Value  // "500", "garbage", "hang" or "ok"
	release chan struct{} // closed at cleanup: hung requests return

	mu         sync.Mutex // guards registered, arrivals
	registered map[string]consulRegistration
	arrivals   map[string][]time.Time // "METHOD /path" -> arrival of each request
}

func newBadConsul(t *testing.T, mode string) (*badConsul, *httptest.Server) {
	t.Helper()
	f := &badConsul{release: make(chan struct{}), registered: map[string]consulRegistration{}, arrivals: map[string][]time.Time{}}
	f.mode.Store(mode)
	ts := httptest.NewServer(f)
	t.Cleanup(func() {
		close(f.release)
		ts.Close()
	})
	return f, ts
}

func (f *badConsul) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	route := r.Method + " " + r.URL.Path
	f.arrivals[route] = append(f.arrivals[route], time.Now())
	f.mu.Unlock()
	switch f.mode.Load().(string) {
	case "500":
		http.Error(w, "rpc error: No cluster leader", http.StatusInternalServerError)
	case "garbage":
		w.Header().Set("X-Consul-Index", "7")
		w.Write([]byte(`{"services": [1, 2, {`))
	case "hang":
		select {
		case <-r.Context().Done():
		case <-f.release:
		}
	case "ok": // just enough of Consul for the catalog watch and registrations
		switch {
		case r.Method == "GET" && r.URL.Path == "/v1/catalog/services":
			if r.URL.Query().Get("index") != "" { // a blocking query with nothing new
				select {
				case <-r.Context().Done():
				case <-f.release:
				case <-time.After(100 * time.Millisecond):
				}
			}
			w.Header().Set("X-Consul-Index", "3")
			w.Write([]byte(`{}`))
		case r.Method == "PUT" && r.URL.Path == "/v1/agent/service/register":
			var reg consulRegistration
			if err := json.NewDecoder(r.Body).Decode(&reg); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			f.mu.Lock()
			f.registered[reg.ID] = reg
			f.mu.Unlock()
		default:
			http.Error(w, "not found", http.StatusNotFound)
		}
	}
}

// requests returns when each request arrived, by "METHOD /path".
func (f *badConsul) requests() map[string][]time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string][]time.Time, len(f.arrivals))
	for route, at := range f.arrivals {
		out[route] = slices.Clone(at)
	}
	return out
}

func (f *badConsul) registration(id string) (consulRegistration, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	r, ok := f.registered[id]
	return r, ok
}

// TestConsulBadResponses points the sidecar at a Consul that fails in each
// way: the sidecar keeps serving, answers registrations and lookups of its
// own nodes, backs off instead of spinning, and re-sends its registrations
// once Consul answers again.
func TestConsulBadResponses(t *testing.T) {
	// Backoff waits at least half of remoteMinBackoff (jitter) before any
	// retry, so no route is asked twice within that, however slow the
	// machine; a spinning client asks thousands of times.
	const catalog, minGap, calls = "GET /v1/catalog/services", remoteMinBackoff / 2, 5
	for _, mode := range []string{"500", "garbage", "hang"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			fake, ts := newBadConsul(t, mode)
			cfg := remoteConfig("consul", ts.URL)
			cfg.RegistryTimeout = 100 * time.Millisecond
			cfg.RegistryWait = 200 * time.Millisecond
			_, base := newTestServer(t, cfg)
			url := base.URL

			if code, body := do(t, "GET", url+"/health", ""); code != http.StatusOK {
				t.Fatalf("GET /health = %d %s, want 200", code, body)
			}
			registerNode(t, url, "10s", "app", "app-1") // accepted, queued
			if !hasNodes(t, url, "app", "app-1") {
				t.Fatalf("GET app = %v, want its own registration [app-1]", lookup(t, url, "app"))
			}
			code, body := do(t, "GET", url+"/registry?service=unknown", "")
			wantError(t, "GET unknown with Consul broken", code, body, http.StatusServiceUnavailable)

			eventually(t, 10*time.Second, fmt.Sprintf("%d catalog requests", calls), func() bool {
				return len(fake.requests()[catalog]) >= calls
			})
			seen := fake.requests()
			cat := seen[catalog]
			from, to := cat[0], cat[len(cat)-1]
			for route, at := range seen {
				n := 0
				for i, a := range at {
					if i > 0 && a.Sub(at[i-1]) < minGap {
						t.Errorf("%s asked again %s after a failure, want at least %s (backoff)", route, a.Sub(at[i-1]), minGap)
					}
					if !a.Before(from) && !a.After(to) {
						n++
					}
				}
				t.Logf("%s: %d requests to the broken Consul in %s", route, n, to.Sub(from))
			}
			if code, _ := do(t, "GET", url+"/registry?service=app", ""); code != http.StatusOK {
				t.Fatalf("GET app = %d after %d failed catalog requests, want 200", code, len(cat))
			}

			fake.mode.Store("ok")
			eventually(t, 5*time.Second, "registration re-sent to Consul", func() bool {
				_, ok := fake.registration("app-1")
				return ok
			})
			reg, _ := fake.registration("app-1")
			if reg.Name != "app" || reg.Port != 9090 || reg.Meta["version"] != "1.2" || reg.Meta["zone"] != "a" ||
				reg.Check == nil || reg.Check.CheckID != "sidecar:app-1" || reg.Check.DeregisterCriticalServiceAfter != "1m0s" {
				t.Fatalf("registration sent = %+v (check %+v), want app:9090 version 1.2 zone a with a TTL check", reg, reg.Check)
			}
			ttl, err := time.ParseDuration(reg.Check.TTL)
			if err != nil || ttl <= 0 || ttl > 10*time.Second {
				t.Fatalf("re-sent check TTL = %q, want what is left of 10s", reg.Check.TTL)
			}
		})
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestHostileRegistryPeer points a sidecar at a "sidecar registry" that
// answers with null, nameless and out-of-range nodes: the sidecar keeps
// the valid node, drops the rest, and keeps serving.
func TestHostileRegistryPeer(t *testing.T) {
	t.Parallel()
	const evil = `[null,{"id":"ok","address":"10.0.0.1","port":1},{"id":"","address":"x"},` +
		`{"id":"port","address":"h","port":99999},{"id":"noaddr","port":1},{"id":"ok","address":"dup","port":2}]`
	peer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/registry" && isWebsocket(r):
			c, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer c.CloseNow()
			c.Write(r.Context(), websocket.MessageText, []byte(`{"action":"update","service":{"name":"go.micro.srv.evil","nodes":[null]}}`))
			c.Read(r.Context()) // until the sidecar leaves
		case r.URL.Path == "/registry" && r.URL.Query().Has("service"):
			fmt.Fprintf(w, `{"name":%q,"endpoints":[null],"nodes":%s}`, r.URL.Query().Get("service"), evil)
		case r.URL.Path == "/registry" && r.Method == "GET":
			fmt.Fprint(w, `[{"name":"go.micro.srv.evil"},{"name":"go.micro.http.broker"},{"name":"bad name"}]`)
		default:
			fmt.Fprint(w, `{}`)
		}
	}))
	t.Cleanup(peer.Close)
	cfg := remoteConfig("sidecar", peer.URL)
	_, ts := newTestServer(t, cfg)
	eventually(t, 5*time.Second, "the peer's service to sync", func() bool {
		return len(lookup(t, ts.URL, "go.micro.srv.evil")) > 0
	})
	if got := lookup(t, ts.URL, "go.micro.srv.evil"); len(got) != 1 || got[0] != "ok" {
		t.Fatalf("nodes of the hostile service = %v, want only [ok]", got)
	}
	// Subscribing makes the broker read go.micro.http.broker's nodes too.
	sub := dialBroker(t, ts, "/broker?topic=t")
	do(t, "POST", ts.URL+"/broker?topic=t", "x")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	readMessage(t, ctx, sub)
	if code, _ := do(t, "GET", ts.URL+"/health", ""); code != 200 {
		t.Errorf("/health = %d after hostile registry data, want 200", code)
	}
}

// TestConsulSentBounded: the fingerprints the Consul backend keeps of
// registrations it sent go when the registrations expire, so that anyone
// who can POST /registry cannot grow them with fresh node IDs and short
// TTLs.
func TestConsulSentBounded(t *testing.T) {
	const nodes, perPost = 500, 50
	fake, ts := newBadConsul(t, "ok")
	cfg := remoteConfig("consul", ts.URL)
	cfg.RegistryTimeout = 5 * time.Second
	s, base := newTestServer(t, cfg)
	c := s.registry.reg.(*cachedRegistry)
	b := c.backend.(*consulBackend)
	sent := func() int {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.sent)
	}
	eventually(t, 5*time.Second, "cache reaches the fake Consul", func() bool { return cacheUp(s) })

	for i := 0; i < nodes; i += perPost {
		var ns []string
		for j := i; j < i+perPost; j++ {
			ns = append(ns, fmt.Sprintf(`{"id":"n-%d","address":"127.0.0.1","port":9090}`, j))
		}
		body := `{"name":"app","nodes":[` + strings.Join(ns, ",") + `]}`
		if code, resp := do(t, "POST", base.URL+"/registry?ttl=30ms", body); code != http.StatusOK {
			t.Fatalf("POST /registry?ttl=30ms (nodes %d..%d) = %d %s", i, i+perPost-1, code, resp)
		}
	}
	if _, ok := fake.registration(fmt.Sprintf("n-%d", nodes-1)); !ok {
		t.Fatalf("node n-%d never reached the fake Consul", nodes-1)
	}
	eventually(t, 5*time.Second, "every fingerprint forgotten once the registrations expired", func() bool { return sent() == 0 })

	// Deregistering forgets too, also while the registration lives.
	registerNode(t, base.URL, "1h", "app", "kept")
	if got := sent(); got != 1 {
		t.Fatalf("len(sent) = %d after one registration with a TTL, want 1", got)
	}
	deregisterNode(t, base.URL, "app", "kept")
	if got := sent(); got != 0 {
		t.Fatalf("len(sent) = %d after deregistering, want 0", got)
	}
}

// registryGets is the number of GET /registry that base answered with a
// 2xx: lists and lookups, not websocket watches.
func registryGets(t *testing.T, base string) float64 {
	t.Helper()
	return getMetrics(t, base)[`sidecar_http_requests_total{route="GET /registry",class="2xx"}`]
}

// TestSidecarRegistryAtScale is the Consul audit applied to --registry
// sidecar: with 1,000 services in the other sidecar, this one lists them
// all after one request, fetches a service only when it is looked up, and
// its calls share a bounded pool (4 connections here) however many run
// at once.
func TestSidecarRegistryAtScale(t *testing.T) {
	t.Parallel()
	const services, conns, concurrent = 1000, 4, 50
	_, upstream := newTestServer(t, testConfig())
	jobs := make(chan int)
	var wg sync.WaitGroup
	var failed atomic.Int64
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				body := fmt.Sprintf(`{"name":"svc-%04d","nodes":[{"id":"svc-%04d-1","address":"127.0.0.1","port":9090}]}`, i, i)
				resp, err := http.Post(upstream.URL+"/registry", "application/json", strings.NewReader(body))
				if err == nil {
					resp.Body.Close()
				}
				if err != nil || resp.StatusCode != http.StatusOK {
					failed.Add(1)
				}
			}
		}()
	}
	for i := range services {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d registrations on the upstream sidecar failed", n, services)
	}

	before := registryGets(t, upstream.URL)
	cfg := remoteConfig("sidecar", upstream.URL)
	cfg.RegistryConnections = conns
	s, ts := newTestServer(t, cfg)
	code, body := do(t, "GET", ts.URL+"/registry", "")
	var list []serviceName
	json.Unmarshal(body, &list)
	if code != http.StatusOK || len(list) != services {
		t.Fatalf("GET /registry = %d with %d services, want 200 with %d", code, len(list), services)
	}
	if got := lookup(t, ts.URL, "svc-0500"); fmt.Sprint(got) != "[svc-0500-1]" {
		t.Fatalf("GET /registry?service=svc-0500 = %v, want [svc-0500-1]", got)
	}
	if n := registryGets(t, upstream.URL) - before; n > 2 {
		t.Errorf("the upstream answered %v GET /registry for a list and one lookup, want 2 (nothing fetched per service ahead of use)", n)
	}

	errs := make(chan error, concurrent)
	for i := range concurrent {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := fmt.Sprintf(`{"name":"new-%d","nodes":[{"id":"new-%d-1","address":"127.0.0.1","port":9090}]}`, i, i)
			resp, err := http.Post(ts.URL+"/registry", "application/json", strings.NewReader(body))
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
			}
			if err != nil {
				errs <- fmt.Errorf("register new-%d through the sidecar: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	eventually(t, 5*time.Second, "every registration on the upstream", func() bool {
		code, body := do(t, "GET", upstream.URL+"/registry", "")
		return code == http.StatusOK && strings.Count(string(body), `"new-`) == concurrent
	})
	rc := s.registry.reg.(*cachedRegistry).backend.(*sidecarBackend).rc
	if peak := rc.peak.Load(); peak > conns || peak == 0 {
		t.Errorf("most connections to the upstream = %d, want 1 to %d", peak, conns)
	}
}

// TestSidecarRegistryLargeEvent: a registration as large as the other
// sidecar accepts (here 8,000 nodes, about 2 MB of event) reaches a
// sidecar using it as its registry through the watch, without the watch
// being closed for a too-large message (1009) and started over: one request
// to the other sidecar (the held service fetched again, as for any event),
// not a new watch, list and fetch.
func TestSidecarRegistryLargeEvent(t *testing.T) {
	t.Parallel()
	_, upstream := newTestServer(t, testConfig())
	post := func(nodes int, from int) {
		t.Helper()
		var b strings.Builder
		b.WriteString(`{"name":"big","nodes":[`)
		for i := range nodes {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"id":"big-%05d","address":"127.0.0.1","port":%d,"metadata":{"zone":"zone-a","rack":"rack-%05d","owner":"team-payments-eu-west-1-production"}}`, from+i, 1000+(from+i)%60000, from+i)
		}
		b.WriteString(`]}`)
		if code, body := do(t, "POST", upstream.URL+"/registry", b.String()); code != http.StatusOK {
			t.Fatalf("POST /registry with %d nodes (%d bytes) = %d %s", nodes, b.Len(), code, body)
		}
	}
	post(1, 0)
	_, ts := newTestServer(t, remoteConfig("sidecar", upstream.URL))
	if got := lookup(t, ts.URL, "big"); len(got) != 1 {
		t.Fatalf("lookup(big) = %v, want one node", got)
	}
	requests := func() float64 {
		_, body := do(t, "GET", ts.URL+"/metrics", "")
		return parseMetrics(t, body)["sidecar_registry_requests_total"]
	}
	before := requests()
	post(8000, 1)
	eventually(t, 10*time.Second, "8,001 nodes of big seen through the watch", func() bool {
		return len(lookup(t, ts.URL, "big")) == 8001
	})
	if n := requests() - before; n != 1 {
		t.Errorf("%v requests to the other sidecar while the large event arrived, want 1 (more: the watch was closed and started again)", n)
	}
}
