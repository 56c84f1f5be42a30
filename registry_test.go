package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// The seed's register and deregister bodies, verbatim.
const seedService = `
{
	"Name": "foo.bar",
	"Nodes": [{
		"Port": 9091,
		"Address": "127.0.0.1",
		"Id": "foo.bar-017da09a-734f-11e5-8136-68a86d0d36b6"
	}]
}`

func getService(t *testing.T, base, name string) (int, *Service) {
	t.Helper()
	code, body := do(t, "GET", base+"/registry?service="+name, "")
	if code != http.StatusOK {
		return code, nil
	}
	var s Service
	if err := json.Unmarshal(body, &s); err != nil {
		t.Fatalf("GET /registry?service=%s: %v in %s", name, err, body)
	}
	return code, &s
}

func TestRegistrySeedExamples(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)

	// The seed's curl sends Content-Type: application/json; curl's default
	// form type must work the same.
	for _, ct := range []string{"application/json", "application/x-www-form-urlencoded"} {
		code, body := do(t, "POST", ts.URL+"/registry", seedService, "Content-Type", ct)
		if code != http.StatusOK {
			t.Fatalf("POST /registry (%s) = %d %s, want 200", ct, code, body)
		}
	}
	code, svc := getService(t, ts.URL, "foo.bar")
	if code != http.StatusOK || svc.Name != "foo.bar" || len(svc.Nodes) != 1 {
		t.Fatalf("GET service = %d %+v, want foo.bar with one node", code, svc)
	}
	n := svc.Nodes[0]
	if n.ID != "foo.bar-017da09a-734f-11e5-8136-68a86d0d36b6" || n.Address != "127.0.0.1" || n.Port != 9091 {
		t.Errorf("node = %+v, want the seed's node", n)
	}
	_, raw := do(t, "GET", ts.URL+"/registry?service=foo.bar", "")
	for _, field := range []string{`"name"`, `"version"`, `"metadata"`, `"endpoints"`, `"nodes"`, `"id"`, `"address"`, `"port"`} {
		if !strings.Contains(string(raw), field) {
			t.Errorf("GET service body %s lacks %s", raw, field)
		}
	}

	code, body := do(t, "GET", ts.URL+"/registry", "")
	if code != http.StatusOK || strings.TrimSpace(string(body)) != `[{"name":"foo.bar"}]` {
		t.Errorf("GET /registry = %d %s, want [{\"name\":\"foo.bar\"}]", code, body)
	}

	code, body = do(t, "DELETE", ts.URL+"/registry", seedService, "Content-Type", "application/json")
	if code != http.StatusOK {
		t.Fatalf("DELETE /registry = %d %s", code, body)
	}
	code, body = do(t, "GET", ts.URL+"/registry?service=foo.bar", "")
	wantError(t, "GET deregistered service", code, body, http.StatusNotFound)
	code, body = do(t, "GET", ts.URL+"/registry", "")
	if code != http.StatusOK || strings.TrimSpace(string(body)) != `[]` {
		t.Errorf("GET /registry after delete = %d %s, want []", code, body)
	}
}

func TestRegistryBadInput(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.MaxBodyBytes = 4096
	_, ts := newTestServer(t, cfg)
	if code, body := do(t, "POST", ts.URL+"/registry", seedService); code != http.StatusOK {
		t.Fatalf("register seed: %d %s", code, body)
	}
	huge := `{"name":"x","nodes":[{"id":"a","address":"h","port":1,"metadata":{"k":"` + strings.Repeat("v", 5000) + `"}}]}`
	tests := []struct {
		name, method, query, body string
		code                      int
	}{
		{"unknown service", "GET", "?service=nope", "", 404},
		{"malformed JSON", "POST", "", `{"name":`, 400},
		{"wrong type", "POST", "", `{"name":"x","nodes":[{"id":"a","address":"h","port":"80"}]}`, 400},
		{"empty body", "POST", "", "", 400},
		{"JSON array", "POST", "", `[]`, 400},
		{"no name", "POST", "", `{"nodes":[{"id":"a","address":"h","port":1}]}`, 400},
		{"no nodes", "POST", "", `{"name":"x"}`, 400},
		{"null node", "POST", "", `{"name":"x","nodes":[null]}`, 400},
		{"missing node id", "POST", "", `{"name":"x","nodes":[{"address":"h","port":1}]}`, 400},
		{"duplicate node id", "POST", "", `{"name":"x","nodes":[{"id":"a","address":"h","port":1},{"id":"a","address":"h","port":2}]}`, 400},
		{"missing address", "POST", "", `{"name":"x","nodes":[{"id":"a","port":1}]}`, 400},
		{"port out of range", "POST", "", `{"name":"x","nodes":[{"id":"a","address":"h","port":70000}]}`, 400},
		{"space in name", "POST", "", `{"name":"x y","nodes":[{"id":"a","address":"h","port":1}]}`, 400},
		{"invalid ttl", "POST", "?ttl=ten", seedService, 400},
		{"negative ttl", "POST", "?ttl=-1s", seedService, 400},
		{"ttl without unit", "POST", "?ttl=10", seedService, 400},
		{"oversized body", "POST", "", huge, 413},
		{"wrong method", "PUT", "", seedService, 405},
		{"deregister unknown service", "DELETE", "", `{"name":"nope","nodes":[{"id":"a"}]}`, 404},
		{"deregister unknown node", "DELETE", "", `{"name":"foo.bar","nodes":[{"id":"other"}]}`, 404},
		{"deregister without nodes", "DELETE", "", `{"name":"foo.bar"}`, 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body := do(t, tt.method, ts.URL+"/registry"+tt.query, tt.body)
			wantError(t, tt.method+" /registry"+tt.query, code, body, tt.code)
		})
	}
	// Nothing changed: the seed's service is there, alone, untouched.
	code, body := do(t, "GET", ts.URL+"/registry", "")
	if code != 200 || strings.TrimSpace(string(body)) != `[{"name":"foo.bar"}]` {
		t.Errorf("after bad input GET /registry = %d %s, want only foo.bar", code, body)
	}
	if _, svc := getService(t, ts.URL, "foo.bar"); svc == nil || len(svc.Nodes) != 1 || svc.Nodes[0].Port != 9091 {
		t.Errorf("after bad input foo.bar = %+v, want the seed's one node", svc)
	}
}

// TestRegistryTTL drives the registry's clock (Config.now): heartbeats
// keep a node past several TTLs, a node is there until its TTL has passed
// since the last heartbeat, and the sweeper removes it after that, telling
// watchers. No step depends on how fast the machine is.
func TestRegistryTTL(t *testing.T) {
	t.Parallel()
	clock := newTestClock()
	cfg := testConfig()
	cfg.now = clock.now
	s, ts := newTestServer(t, cfg)
	mem := s.registry.reg.(*memoryRegistry)
	watch := dialWatch(t, ts.URL)
	register := func(ttl string) {
		t.Helper()
		if code, body := do(t, "POST", ts.URL+"/registry?ttl="+ttl, seedService); code != 200 {
			t.Fatalf("POST ?ttl=%s = %d %s", ttl, code, body)
		}
	}
	present := func(when string) {
		t.Helper()
		mem.expire() // a sweep at this instant of the clock
		if code, body := do(t, "GET", ts.URL+"/registry?service=foo.bar", ""); code != 200 {
			t.Fatalf("%s: GET foo.bar = %d %s, want the node", when, code, body)
		}
	}
	register("1s")
	if ev := readEvent(t, watch); ev.Action != "create" {
		t.Fatalf("watch event %+v, want the create", ev)
	}
	// Heartbeats every 500 ms keep the node past several TTLs.
	for i := range 6 {
		clock.advance(500 * time.Millisecond)
		present(fmt.Sprintf("%dms after registering with heartbeats every 500ms", (i+1)*500))
		register("1s")
	}
	clock.advance(999 * time.Millisecond)
	present("999ms after the last heartbeat (ttl 1s)")

	// Past the TTL the sweeper, on its own, removes the node and the
	// watchers hear of it.
	clock.advance(2 * time.Millisecond)
	if ev := readEvent(t, watch); ev.Action != "delete" || ev.Service == nil || ev.Service.Name != "foo.bar" {
		t.Fatalf("watch event %+v, want the delete of foo.bar by expiry", ev)
	}
	if code, body := do(t, "GET", ts.URL+"/registry?service=foo.bar", ""); code != http.StatusNotFound {
		t.Fatalf("GET foo.bar past its TTL = %d %s, want 404", code, body)
	}

	// Zero TTL means no expiry.
	register("0s")
	clock.advance(1000 * time.Hour)
	present("1000h after registering with ttl 0s")
}

func TestRegistryMemoryTTLClock(t *testing.T) {
	t.Parallel()
	now := time.Unix(1000, 0)
	clock := func() time.Time { return now }
	m := newMemoryRegistry(time.Hour, clock, slog.New(slog.NewTextHandler(io.Discard, nil)))
	defer m.Close()
	ctx := context.Background()
	svc := &Service{Name: "a", Nodes: []*Node{{ID: "1", Address: "h", Port: 1}}}
	if err := m.Register(ctx, svc, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	now = now.Add(9 * time.Second)
	m.Register(ctx, svc, 10*time.Second) // renew
	now = now.Add(9 * time.Second)
	m.expire()
	if _, err := m.GetService(ctx, "a"); err != nil {
		t.Fatalf("GetService after renewal = %v, want the node", err)
	}
	now = now.Add(2 * time.Second)
	m.expire()
	if _, err := m.GetService(ctx, "a"); err != errNotFound {
		t.Fatalf("GetService past TTL = %v, want errNotFound", err)
	}
	if s, n := m.size(); s != 0 || n != 0 {
		t.Errorf("size = %d services %d nodes, want 0 0", s, n)
	}
}

// nodeExpiry returns when node id of service name expires in m: zero when
// it never does or is not there.
func nodeExpiry(m *memoryRegistry, name, id string) time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	svc := m.services[name]
	if i, ok := svc.lookup(id); ok {
		return svc.nodes[i].expires
	}
	return time.Time{}
}

func dialWatch(t *testing.T, base string) *websocket.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+"/registry", nil)
	if err != nil {
		t.Fatalf("dial watch: %v", err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c
}

func readEvent(t *testing.T, c *websocket.Conn) Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	typ, b, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("read watch event: %v", err)
	}
	if typ != websocket.MessageText {
		t.Fatalf("watch frame type = %v, want text", typ)
	}
	var ev Event
	if err := json.Unmarshal(b, &ev); err != nil {
		t.Fatalf("watch frame %s: %v", b, err)
	}
	return ev
}

func TestRegistryWatch(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	c := dialWatch(t, ts.URL)
	// A watcher that never reads must not block registration.
	stuck := dialWatch(t, ts.URL)
	_ = stuck

	node := func(id string, port int) string {
		return fmt.Sprintf(`{"name":"w","nodes":[{"id":%q,"address":"127.0.0.1","port":%d}]}`, id, port)
	}
	steps := []struct {
		method, query, body string
		action, id          string
	}{
		{"POST", "", node("n1", 1), "create", "n1"},
		{"POST", "", node("n2", 2), "update", "n2"},
		{"POST", "", node("n1", 3), "update", "n1"}, // changed port
		{"DELETE", "", node("n2", 2), "delete", "n2"},
		{"POST", "?ttl=50ms", node("n3", 4), "update", "n3"},
		{"", "", "", "delete", "n3"}, // expiry
	}
	for i, st := range steps {
		if st.method != "" {
			if code, body := do(t, st.method, ts.URL+"/registry"+st.query, st.body); code != 200 {
				t.Fatalf("step %d: %s = %d %s", i, st.method, code, body)
			}
		}
		ev := readEvent(t, c)
		if ev.Action != st.action || ev.Service == nil || ev.Service.Name != "w" || len(ev.Service.Nodes) != 1 || ev.Service.Nodes[0].ID != st.id {
			t.Fatalf("step %d: event %+v, want %s of node %s", i, ev, st.action, st.id)
		}
	}
	// A renewal with the same data is a heartbeat, not an event.
	do(t, "POST", ts.URL+"/registry", node("n1", 3))
	do(t, "DELETE", ts.URL+"/registry", node("n1", 3))
	if ev := readEvent(t, c); ev.Action != "delete" {
		t.Fatalf("after a renewal and a delete got %+v, want only the delete", ev)
	}

	// Flood past the stuck watcher's buffer: registration never blocks.
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 2 * watchBuffer {
			do(t, "POST", ts.URL+"/registry", node(fmt.Sprint("f", i), 1))
		}
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("registrations blocked behind a watcher that does not read")
	}
}

// TestRegistryWatchQueueBounds: a watch whose reader takes nothing is
// dropped once it lags watchBuffer events or watchBufferBytes, whichever
// comes first, and its queue is freed; a reader that keeps taking is never
// dropped.
func TestRegistryWatchQueueBounds(t *testing.T) {
	t.Parallel()
	big := map[string]string{}
	for i := range maxMetadataEntries {
		big[fmt.Sprint("k", i)] = strings.Repeat("v", maxMetadataValueLen)
	}
	tests := []struct {
		name     string
		metadata map[string]string
		fits     int // events queued before the watch is dropped
	}{
		{"events", nil, watchBuffer},
		{"bytes", big, 15}, // 15 events of 266 KB fit in 4 MiB
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			m := newMemoryRegistry(time.Hour, time.Now, slog.New(slog.NewTextHandler(io.Discard, nil)))
			defer m.Close()
			x, err := m.Watch(context.Background(), watchOptions{})
			if err != nil {
				t.Fatal(err)
			}
			register := func(i int) {
				t.Helper()
				s := &Service{Name: "s", Nodes: []*Node{{ID: fmt.Sprint(i), Address: "h", Port: 1, Metadata: tt.metadata}}}
				if err := m.Register(context.Background(), s, 0); err != nil {
					t.Fatal(err)
				}
			}
			for i := range tt.fits {
				register(i)
			}
			if x.fellBehind() || x.ctx.Err() != nil {
				t.Fatalf("watch dropped after %d events, want it to hold them", tt.fits)
			}
			x.mu.Lock()
			queued := len(x.queue)
			x.mu.Unlock()
			if queued != tt.fits {
				t.Fatalf("%d events queued, want %d", queued, tt.fits)
			}
			register(tt.fits)
			evs, ok := x.take(nil)
			if ok || len(evs) != 0 || !x.fellBehind() {
				t.Fatalf("after %d events: take = %d events, open %v, behind %v; want the watch dropped with its queue freed", tt.fits+1, len(evs), ok, x.fellBehind())
			}
		})
	}
	t.Run("reader keeps up", func(t *testing.T) {
		t.Parallel()
		m := newMemoryRegistry(time.Hour, time.Now, slog.New(slog.NewTextHandler(io.Discard, nil)))
		defer m.Close()
		x, _ := m.Watch(context.Background(), watchOptions{})
		var buf []*watchEvent
		last := m.index()
		for i := range 3 * watchBuffer {
			m.Register(context.Background(), &Service{Name: "s", Nodes: []*Node{{ID: fmt.Sprint(i), Address: "h", Port: 1}}}, 0)
			if i%100 != 99 {
				continue
			}
			evs, ok := x.take(buf)
			if !ok || len(evs) != 100 {
				t.Fatalf("take after %d events = %d events, open %v; want 100, open", i+1, len(evs), ok)
			}
			for _, e := range evs {
				if e.Index != last+1 {
					t.Fatalf("event index %d after %d, want consecutive", e.Index, last)
				}
				last = e.Index
			}
			clear(evs)
			buf = evs
		}
	})
}

// TestRegistryWatchHistoryBounds: the history keeps at most
// --registry_history events and watchHistoryBytes, and a resume point it
// no longer covers gets a snapshot.
func TestRegistryWatchHistoryBounds(t *testing.T) {
	t.Parallel()
	var h history
	h.max = 3
	ev := func(i uint64, size int) *watchEvent {
		return &watchEvent{Event: Event{Index: i, Service: &Service{Name: fmt.Sprint("s", i%2)}}, size: size}
	}
	for i := uint64(1); i <= 5; i++ {
		h.push(ev(i, 10))
	}
	if h.n != 3 || h.at(0).Index != 3 || h.bytes != 30 {
		t.Fatalf("history of 3 after 5 events: n=%d oldest=%d bytes=%d, want 3, 3, 30", h.n, h.at(0).Index, h.bytes)
	}
	tests := []struct {
		since   uint64
		service string
		want    []uint64
		ok      bool
	}{
		{5, "", nil, true},
		{2, "", []uint64{3, 4, 5}, true},
		{3, "", []uint64{4, 5}, true},
		{2, "s1", []uint64{3, 5}, true},
		{1, "", nil, false},
		{6, "", nil, false},
	}
	for _, tt := range tests {
		evs, ok := h.after(tt.since, 5, tt.service)
		var got []uint64
		for _, e := range evs {
			got = append(got, e.Index)
		}
		if ok != tt.ok || !slices.Equal(got, tt.want) {
			t.Errorf("after(%d, %q) = %v, %v; want %v, %v", tt.since, tt.service, got, ok, tt.want, tt.ok)
		}
	}
	h.push(ev(6, watchHistoryBytes))
	if h.n != 1 || h.at(0).Index != 6 {
		t.Errorf("after an event of watchHistoryBytes: n=%d oldest=%d, want only it", h.n, h.at(0).Index)
	}
	var none history
	none.push(ev(1, 10))
	if _, ok := none.after(0, 1, ""); ok || none.n != 0 {
		t.Errorf("history of 0 events holds %d and covers index 0", none.n)
	}
}

func TestRegistryWatchClosedOnShutdown(t *testing.T) {
	t.Parallel()
	s, ts := newTestServer(t, nil)
	c := dialWatch(t, ts.URL)
	// The handler has registered its watcher once an event arrives.
	do(t, "POST", ts.URL+"/registry", seedService)
	readEvent(t, c)
	// The client reads while the sidecar closes, as a real client does,
	// so that it answers the close frame and the handshake completes
	// without waiting out the library's close timeout.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	read := make(chan error, 1)
	go func() {
		_, _, err := c.Read(ctx)
		read <- err
	}()
	s.Close()
	err := <-read
	if got := websocket.CloseStatus(err); got != websocket.StatusGoingAway {
		t.Fatalf("watch read after shutdown: %v (status %v), want going away", err, got)
	}
}

func TestRegistryVersions(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	do(t, "POST", ts.URL+"/registry", `{"name":"v","version":"1.0","nodes":[{"id":"a","address":"h","port":1}]}`)
	do(t, "POST", ts.URL+"/registry", `{"name":"v","version":"2.0","nodes":[{"id":"b","address":"h","port":2}]}`)
	_, svc := getService(t, ts.URL, "v")
	if svc == nil || svc.Version != "2.0" || len(svc.Nodes) != 2 {
		t.Fatalf("service = %+v, want version 2.0 with both nodes", svc)
	}
	versions := map[string]string{}
	for _, n := range svc.Nodes {
		versions[n.ID] = n.Version
	}
	if versions["a"] != "1.0" || versions["b"] != "2.0" {
		t.Errorf("node versions = %v, want a:1.0 b:2.0", versions)
	}
}

func FuzzRegistryJSON(f *testing.F) {
	f.Add([]byte(seedService), "10s")
	f.Add([]byte(`{"name":"x","nodes":[{"id":"a","address":"h","port":1,"metadata":{"k":"v"}}],"endpoints":[{"name":"E","request":{}}]}`), "")
	f.Add([]byte(`{"name":"x","nodes":[null]}`), "-1s")
	f.Add([]byte(`[]`), "1h")
	m := newMemoryRegistry(time.Hour, time.Now, slog.New(slog.NewTextHandler(io.Discard, nil)))
	f.Cleanup(func() { m.Close() })
	f.Fuzz(func(t *testing.T, body []byte, ttl string) {
		d, err := parseTTL(ttl)
		if err == nil && d < 0 {
			t.Fatalf("parseTTL(%q) = %s, want no negative TTL", ttl, d)
		}
		var s Service
		if decodeJSON(body, &s) != nil || s.validate(true) != nil {
			return
		}
		// A valid node is callable: the address the balancer dials splits
		// back into a host and the node's port, and its strings survive a
		// JSON round trip unchanged (no two ids collapse into one).
		for _, n := range s.Nodes {
			normalizeAddress(n)
			host, port, err := nodeTarget(n)
			if err != nil {
				t.Fatalf("node %+v valid, then nodeTarget: %v", n, err)
			}
			h, p, err := net.SplitHostPort(nodeHostPort(n))
			if err != nil || h != host || p != strconv.Itoa(port) || port < 1 || port > 65535 {
				t.Fatalf("node %+v dials %q (%v), want host %q port %d", n, nodeHostPort(n), err, host, port)
			}
			b, _ := json.Marshal(n.ID)
			var id string
			if json.Unmarshal(b, &id); id != n.ID {
				t.Fatalf("id %q round-trips to %q", n.ID, id)
			}
		}
		ctx := context.Background()
		if err := m.Register(ctx, &s, d); err != nil {
			return
		}
		got, err := m.GetService(ctx, s.Name)
		if err != nil {
			t.Fatalf("GetService(%q) after Register = %v", s.Name, err)
		}
		if _, err := json.Marshal(got); err != nil {
			t.Fatalf("marshal %+v: %v", got, err)
		}
		if err := m.Deregister(ctx, &s); err != nil {
			t.Fatalf("Deregister after Register = %v", err)
		}
	})
}

// BenchmarkRegistry measures a registry holding 10,000 nodes of one
// service: renewing one node (the heartbeat) and looking the service up.
func BenchmarkRegistry(b *testing.B) {
	const nodes = 10_000
	newFull := func(b *testing.B) *memoryRegistry {
		m := newMemoryRegistry(time.Hour, time.Now, slog.New(slog.NewTextHandler(io.Discard, nil)))
		b.Cleanup(func() { m.Close() })
		for i := range nodes {
			s := &Service{Name: "bench", Nodes: []*Node{{ID: fmt.Sprint("node-", i), Address: "10.0.0.1", Port: 8080, Metadata: map[string]string{"zone": "a"}}}}
			if err := m.Register(context.Background(), s, time.Minute); err != nil {
				b.Fatal(err)
			}
		}
		return m
	}
	b.Run("register-new/10k", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			b.StopTimer()
			m := newMemoryRegistry(time.Hour, time.Now, slog.New(slog.NewTextHandler(io.Discard, nil)))
			svcs := make([]*Service, nodes)
			for i := range svcs {
				svcs[i] = &Service{Name: "bench", Nodes: []*Node{{ID: fmt.Sprint("node-", i), Address: "10.0.0.1", Port: 8080}}}
			}
			b.StartTimer()
			for _, s := range svcs {
				m.Register(context.Background(), s, time.Minute)
			}
			b.StopTimer()
			m.Close()
			b.StartTimer()
		}
	})
	b.Run("memory/10k", func(b *testing.B) {
		var before, after runtime.MemStats
		for b.Loop() {
			runtime.GC()
			runtime.ReadMemStats(&before)
			m := newFull(b)
			runtime.GC()
			runtime.ReadMemStats(&after)
			b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc), "heap-bytes/10k-nodes")
			runtime.KeepAlive(m)
		}
	})
	b.Run("renew/10k", func(b *testing.B) {
		m := newFull(b)
		s := &Service{Name: "bench", Nodes: []*Node{{ID: "node-42", Address: "10.0.0.1", Port: 8080, Metadata: map[string]string{"zone": "a"}}}}
		b.ReportAllocs()
		for b.Loop() {
			m.Register(context.Background(), s, time.Minute)
		}
	})
	b.Run("lookup/10k", func(b *testing.B) {
		m := newFull(b)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := m.GetService(context.Background(), "bench"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("lookup-after-change/10k", func(b *testing.B) {
		m := newFull(b)
		s := &Service{Name: "bench", Nodes: []*Node{{ID: "node-42", Address: "10.0.0.1", Port: 8080}}}
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			s.Nodes[0].Port = 8000 + i%2
			m.Register(context.Background(), s, time.Minute)
			m.GetService(context.Background(), "bench")
		}
	})
}
