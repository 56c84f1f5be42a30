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
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// wireEvent is a watch frame as a client decodes it: an event, or a
// snapshot of the registry.
type wireEvent struct {
	Action   string     `json:"action"`
	Index    uint64     `json:"index"`
	Service  *Service   `json:"service"`
	Services []*Service `json:"services"`
}

func dialWatchURL(ctx context.Context, url string) (*websocket.Conn, *http.Response, error) {
	return websocket.Dial(ctx, "ws"+strings.TrimPrefix(url, "http"), nil)
}

// dialWatchRaw opens a watch of /registry with query q ("" or "?...").
func dialWatchRaw(t *testing.T, base, q string) (*websocket.Conn, *http.Response) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, resp, err := dialWatchURL(ctx, base+"/registry"+q)
	if err != nil {
		t.Fatalf("dial watch /registry%s: %v", q, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	c.SetReadLimit(64 << 20)
	return c, resp
}

// dialWatchQuery is dialWatchRaw that also returns the index of the
// handshake's X-Registry-Index.
func dialWatchQuery(t *testing.T, base, q string) (*websocket.Conn, uint64) {
	t.Helper()
	c, resp := dialWatchRaw(t, base, q)
	idx, err := strconv.ParseUint(resp.Header.Get("X-Registry-Index"), 10, 64)
	if err != nil {
		t.Fatalf("watch /registry%s: X-Registry-Index %q: %v", q, resp.Header.Get("X-Registry-Index"), err)
	}
	return c, idx
}

// readWire reads one watch frame.
func readWire(t *testing.T, c *websocket.Conn) wireEvent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, b, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("read watch frame: %v", err)
	}
	var ev wireEvent
	if err := json.Unmarshal(b, &ev); err != nil {
		t.Fatalf("watch frame %s: %v", b, err)
	}
	return ev
}

// registryIndex is the X-Registry-Index of GET /registry[q].
func registryIndex(t *testing.T, base, q string) uint64 {
	t.Helper()
	resp, err := http.Get(base + "/registry" + q)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	idx, err := strconv.ParseUint(resp.Header.Get("X-Registry-Index"), 10, 64)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /registry%s = %d, X-Registry-Index %q: %v", q, resp.StatusCode, resp.Header.Get("X-Registry-Index"), err)
	}
	return idx
}

func nodeBody(service, id string, port int) string {
	return fmt.Sprintf(`{"name":%q,"nodes":[{"id":%q,"address":"127.0.0.1","port":%d}]}`, service, id, port)
}

func mustDo(t *testing.T, method, url, body string) {
	t.Helper()
	if code, resp := do(t, method, url, body); code != http.StatusOK {
		t.Fatalf("%s %s %s = %d %s", method, url, body, code, resp)
	}
}

// wantEvent checks ev against action, service and node id, and that its
// index follows after.
func wantEvent(t *testing.T, ev wireEvent, action, service, id string, after uint64) {
	t.Helper()
	if ev.Action != action || ev.Service == nil || ev.Service.Name != service || len(ev.Service.Nodes) != 1 || ev.Service.Nodes[0].ID != id {
		t.Fatalf("event %+v (service %+v), want %s of %s node %s", ev, ev.Service, action, service, id)
	}
	if ev.Index <= after {
		t.Fatalf("event %s %s/%s has index %d, want > %d", action, service, id, ev.Index, after)
	}
}

// TestRegistryWatchResume: a watcher that reconnects with ?since=N gets
// exactly the events it missed, in order, then the live ones.
func TestRegistryWatchResume(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	reg := ts.URL + "/registry"
	mustDo(t, "POST", reg, nodeBody("w", "x1", 1))
	before := registryIndex(t, ts.URL, "")
	if i := registryIndex(t, ts.URL, "?service=w"); i != before {
		t.Fatalf("X-Registry-Index of ?service=w = %d, of the list %d: want the same", i, before)
	}

	c, start := dialWatchQuery(t, ts.URL, "")
	if start != before {
		t.Fatalf("watch handshake X-Registry-Index = %d, want %d", start, before)
	}
	mustDo(t, "POST", reg, nodeBody("w", "x2", 2))
	seen := readWire(t, c)
	wantEvent(t, seen, "update", "w", "x2", before)
	c.Close(websocket.StatusNormalClosure, "")

	// Away: three changes.
	mustDo(t, "POST", reg, nodeBody("w", "x3", 3))
	mustDo(t, "POST", reg, nodeBody("w", "x1", 11)) // x1 moves
	mustDo(t, "DELETE", reg, nodeBody("w", "x2", 2))

	c, _ = dialWatchQuery(t, ts.URL, fmt.Sprintf("?since=%d", seen.Index))
	last := seen.Index
	for _, want := range []struct{ action, id string }{{"update", "x3"}, {"update", "x1"}, {"delete", "x2"}} {
		ev := readWire(t, c)
		wantEvent(t, ev, want.action, "w", want.id, last)
		last = ev.Index
	}
	if got := registryIndex(t, ts.URL, ""); got != last {
		t.Fatalf("X-Registry-Index = %d after the replay ended at %d", got, last)
	}
	// Nothing else was queued: the next frame is the next change.
	mustDo(t, "POST", reg, nodeBody("w", "x4", 4))
	wantEvent(t, readWire(t, c), "update", "w", "x4", last)

	// Resuming at the current index replays nothing.
	now := registryIndex(t, ts.URL, "")
	c, _ = dialWatchQuery(t, ts.URL, fmt.Sprintf("?since=%d", now))
	mustDo(t, "POST", reg, nodeBody("w", "x5", 5))
	wantEvent(t, readWire(t, c), "update", "w", "x5", now)
}

// TestRegistryWatchSnapshot: an index older than the history (or one from
// another run of the sidecar) starts the watch with a snapshot of the
// registry at the current index, then live events.
func TestRegistryWatchSnapshot(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.RegistryHistory = 2
	_, ts := newTestServer(t, cfg)
	reg := ts.URL + "/registry"
	mustDo(t, "POST", reg, nodeBody("a", "a1", 1))
	mustDo(t, "POST", reg, nodeBody("b", "b1", 1))
	old := registryIndex(t, ts.URL, "")
	for i := range 3 { // three changes: one more than the history holds
		mustDo(t, "POST", reg, nodeBody("a", fmt.Sprint("a", i+2), i+2))
	}
	now := registryIndex(t, ts.URL, "")

	for _, since := range []uint64{old, 1, now + 1000} {
		c, _ := dialWatchQuery(t, ts.URL, fmt.Sprintf("?since=%d", since))
		snap := readWire(t, c)
		if snap.Action != "snapshot" || snap.Index != now || len(snap.Services) != 2 {
			t.Fatalf("since=%d: first frame %+v, want a snapshot of 2 services at index %d", since, snap, now)
		}
		nodes := map[string]int{}
		for _, s := range snap.Services {
			nodes[s.Name] = len(s.Nodes)
		}
		if nodes["a"] != 4 || nodes["b"] != 1 {
			t.Fatalf("since=%d: snapshot nodes per service %v, want a:4 b:1", since, nodes)
		}
		c.CloseNow()
	}

	// One event after old is gone, but since=now-2 is still covered.
	c, _ := dialWatchQuery(t, ts.URL, fmt.Sprintf("?since=%d", now-2))
	wantEvent(t, readWire(t, c), "update", "a", "a3", now-2)
	wantEvent(t, readWire(t, c), "update", "a", "a4", now-1)
}

// TestRegistryWatchService: ?service=NAME watches one service: its live
// events only, its missed events only, and a snapshot of it alone.
func TestRegistryWatchService(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.RegistryHistory = 4
	_, ts := newTestServer(t, cfg)
	reg := ts.URL + "/registry"
	mustDo(t, "POST", reg, nodeBody("w", "w1", 1))
	c, start := dialWatchQuery(t, ts.URL, "?service=w")
	mustDo(t, "POST", reg, nodeBody("other", "o1", 1))
	mustDo(t, "POST", reg, nodeBody("w", "w2", 2))
	seen := readWire(t, c)
	wantEvent(t, seen, "update", "w", "w2", start)
	c.CloseNow()

	mustDo(t, "POST", reg, nodeBody("other", "o2", 2))
	mustDo(t, "POST", reg, nodeBody("w", "w3", 3))
	mustDo(t, "POST", reg, nodeBody("other", "o3", 3))
	mustDo(t, "DELETE", reg, nodeBody("w", "w1", 1))
	c, _ = dialWatchQuery(t, ts.URL, fmt.Sprintf("?service=w&since=%d", seen.Index))
	ev := readWire(t, c)
	wantEvent(t, ev, "update", "w", "w3", seen.Index)
	wantEvent(t, readWire(t, c), "delete", "w", "w1", ev.Index)
	mustDo(t, "POST", reg, nodeBody("other", "o4", 4))
	mustDo(t, "POST", reg, nodeBody("w", "w4", 4))
	wantEvent(t, readWire(t, c), "update", "w", "w4", ev.Index)

	// Too old: a snapshot of w alone.
	now := registryIndex(t, ts.URL, "")
	c, _ = dialWatchQuery(t, ts.URL, "?service=w&since=1")
	snap := readWire(t, c)
	if snap.Action != "snapshot" || snap.Index != now || len(snap.Services) != 1 || snap.Services[0].Name != "w" || len(snap.Services[0].Nodes) != 3 {
		t.Fatalf("?service=w&since=1: first frame %+v, want a snapshot of w (3 nodes) at %d", snap, now)
	}
	// A service that has no nodes: an empty snapshot.
	c, _ = dialWatchQuery(t, ts.URL, "?service=nobody&since=1")
	if snap := readWire(t, c); snap.Action != "snapshot" || snap.Services == nil || len(snap.Services) != 0 {
		t.Fatalf("?service=nobody&since=1: first frame %+v, want an empty snapshot", snap)
	}
}

// TestRegistryWatcherCap: beyond --registry_max_watchers a watch is a JSON
// 503 (counted); a watcher that leaves frees its place.
func TestRegistryWatcherCap(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.RegistryMaxWatchers = 3
	_, ts := newTestServer(t, cfg)
	var open []*websocket.Conn
	for range 3 {
		c, _ := dialWatchQuery(t, ts.URL, "")
		open = append(open, c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, resp, err := dialWatchURL(ctx, ts.URL+"/registry")
	if err == nil {
		c.CloseNow()
		t.Fatal("4th watch upgraded; want a 503 beyond --registry_max_watchers 3")
	}
	if resp == nil {
		t.Fatalf("4th watch: %v, want a 503", err)
	}
	body, _ := io.ReadAll(resp.Body)
	wantError(t, "4th watch", resp.StatusCode, body, http.StatusServiceUnavailable)
	m := getMetrics(t, ts.URL)
	if m["sidecar_registry_watchers"] != 3 || m["sidecar_registry_watchers_refused_total"] != 1 {
		t.Errorf("metrics watchers=%v refused=%v, want 3 and 1", m["sidecar_registry_watchers"], m["sidecar_registry_watchers_refused_total"])
	}
	open[0].Close(websocket.StatusNormalClosure, "")
	eventually(t, 5*time.Second, "a watch accepted after one left", func() bool {
		c, _, err := dialWatchURL(ctx, ts.URL+"/registry")
		if err == nil {
			c.CloseNow()
		}
		return err == nil
	})
}

// TestRegistrySlowWatcherDroppedAndCounted: a watcher that stops reading
// is closed once it falls a bounded number of bytes or events behind,
// counted in /metrics, and never slows registration.
func TestRegistrySlowWatcherDroppedAndCounted(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	stuck, _ := dialWatchRaw(t, ts.URL, "")
	// Events of 1,000 nodes (about 60 KB) fill the socket buffers, then the
	// watcher's queue.
	var b strings.Builder
	for i := range 1000 {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"id":"n%d","address":"10.0.0.1","port":PORT}`, i)
	}
	nodes := b.String()
	dropped := false
	for i := 0; i < 600 && !dropped; i++ {
		body := `{"name":"slow","nodes":[` + strings.ReplaceAll(nodes, "PORT", strconv.Itoa(1+i%2)) + `]}`
		mustDo(t, "POST", ts.URL+"/registry", body)
		if i%10 == 9 {
			dropped = getMetrics(t, ts.URL)["sidecar_registry_watchers_slow_total"] == 1
		}
	}
	if !dropped {
		t.Fatal("a watcher that never reads was not dropped after 600 events of 60 KB (sidecar_registry_watchers_slow_total != 1)")
	}
	// The stuck client finds the end of its stream after what was buffered.
	frames := 0
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, _, err := stuck.Read(ctx)
		timedOut := ctx.Err() != nil
		cancel()
		if err != nil {
			if timedOut {
				t.Fatalf("stuck watcher still open after %d frames: %v", frames, err)
			}
			break
		}
		frames++
	}
	t.Logf("stuck watcher read %d frames before its stream ended", frames)
	if m := getMetrics(t, ts.URL); m["sidecar_registry_watchers"] != 0 {
		t.Errorf("sidecar_registry_watchers = %v after the slow watcher left, want 0", m["sidecar_registry_watchers"])
	}
}

// TestRegistryWatchFanoutMemory: one event is encoded once, however many
// watchers receive it. A registration of 8,000 nodes (about 900 KB as
// JSON) is measured with runtime.ReadMemStats twice: with no watcher, then
// with 200 watchers that read it. Each watcher used to encode the event
// itself (the second registration allocated about 200 encodings more than
// the first); the difference must now stay under 10 times the event.
func TestRegistryWatchFanoutMemory(t *testing.T) {
	// Not parallel: it measures the allocations of the whole process.
	_, ts := newTestServer(t, nil)
	body := func(name string) string {
		var b strings.Builder
		fmt.Fprintf(&b, `{"name":%q,"nodes":[`, name)
		for i := range 8000 {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"id":"node-%05d","address":"10.0.%d.%d","port":8080,"metadata":{"zone":"zone-%d","rack":"rack-%d"}}`, i, i/256, i%256, i%3, i%40)
		}
		b.WriteString("]}")
		return b.String()
	}
	// allocated returns the bytes allocated while fn runs.
	allocated := func(fn func()) uint64 {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		fn()
		runtime.ReadMemStats(&after)
		return after.TotalAlloc - before.TotalAlloc
	}
	alone := allocated(func() { mustDo(t, "POST", ts.URL+"/registry", body("big-a")) })

	const watchers = 200
	var wg sync.WaitGroup
	sizes := make([]int64, watchers)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := range watchers {
		c, _ := dialWatchRaw(t, ts.URL, "")
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, r, err := c.Reader(ctx)
			if err == nil {
				sizes[i], err = io.Copy(io.Discard, r)
			}
			if err != nil {
				t.Errorf("watcher %d: %v", i, err)
			}
		}()
	}
	body200 := body("big-b")
	fanned := allocated(func() {
		mustDo(t, "POST", ts.URL+"/registry", body200)
		wg.Wait()
	})
	if t.Failed() {
		return
	}
	size := uint64(sizes[0])
	t.Logf("event of %d bytes: registration alone allocated %d bytes (%.1fx), with %d watchers %d bytes (%.1fx)",
		size, alone, float64(alone)/float64(size), watchers, fanned, float64(fanned)/float64(size))
	if fanned > alone+10*size {
		t.Errorf("fan-out of a %d-byte event to %d watchers allocated %d bytes beyond the registration's own %d (%.0fx the event), want < 10x",
			size, watchers, fanned-alone, alone, float64(fanned-alone)/float64(size))
	}
}

// BenchmarkRegistryWatchFanout: 1,000 watchers (websocket clients in this
// process) of a registry holding a 10,000-node service, renewed in the
// background; one op is one change (a node added, or removed) and lasts
// until the 1,000th watcher has read its event. Reports the latency
// quantiles of the ops and the heap in use with every watcher connected.
// bench/registry.sh measures the same with the clients in another process.
func BenchmarkRegistryWatchFanout(b *testing.B) {
	const watchers, nodes = 1000, 10_000
	_, ts := newTestServer(b, nil)
	var frames atomic.Int64
	var target atomic.Int64
	arrived := make(chan time.Time, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for range watchers {
		dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
		c, _, err := dialWatchURL(dctx, ts.URL+"/registry")
		dcancel()
		if err != nil {
			b.Fatal(err)
		}
		c.SetReadLimit(-1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.CloseNow()
			for {
				_, r, err := c.Reader(ctx)
				if err != nil {
					return
				}
				if _, err := io.Copy(io.Discard, r); err != nil {
					return
				}
				if frames.Add(1) == target.Load() {
					arrived <- time.Now()
				}
			}
		}()
	}
	all := make([]string, nodes)
	for i := range all {
		all[i] = fmt.Sprintf(`{"id":"node-%05d","address":"10.%d.%d.%d","port":8080,"metadata":{"zone":"zone-%d"}}`, i, i>>16&255, i>>8&255, i&255, i%3)
	}
	post := func(method, body string) {
		req, _ := http.NewRequest(method, ts.URL+"/registry?ttl=1m", strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			b.Error(err)
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Errorf("%s /registry = %d", method, resp.StatusCode)
		}
	}
	target.Store(watchers)
	post("POST", `{"name":"bench","nodes":[`+strings.Join(all, ",")+`]}`)
	<-arrived
	var heap runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&heap)

	// Renewals: 100 nodes every 100 ms, every node once per 10 s.
	renewing := make(chan struct{})
	go func() {
		defer close(renewing)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for i := 0; ctx.Err() == nil; i = (i + 1) % (nodes / 100) {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			post("POST", `{"name":"bench","nodes":[`+strings.Join(all[i*100:(i+1)*100], ",")+`]}`)
		}
	}()
	probe := `{"name":"bench","nodes":[{"id":"probe","address":"10.255.255.1","port":8080,"metadata":{"zone":"zone-0"}}]}`
	lat := make([]time.Duration, 0, b.N)
	want := int64(watchers)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		want += watchers
		target.Store(want)
		method := "POST"
		if i%2 == 1 {
			method = "DELETE"
		}
		t0 := time.Now()
		post(method, probe)
		lat = append(lat, (<-arrived).Sub(t0))
	}
	b.StopTimer()
	cancel()
	<-renewing
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))]) }
	b.ReportMetric(q(0.5), "p50-ns")
	b.ReportMetric(q(0.99), "p99-ns")
	b.ReportMetric(float64(heap.HeapInuse), "heap-bytes")
}

// BenchmarkLoopbackFanoutFloor is the floor under
// BenchmarkRegistryWatchFanout on this machine: 1,000 loopback TCP
// connections, one goroutine writing each (woken as a watch handler is),
// one reading each; an op writes 230 bytes to every connection and lasts
// until every reader has them. No websocket, no registry: what one
// connection per watcher costs in the kernel and the scheduler.
func BenchmarkLoopbackFanoutFloor(b *testing.B) {
	const conns, size = 1000, 230
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	var got sync.WaitGroup
	wake := make([]chan struct{}, conns)
	var wg sync.WaitGroup
	defer wg.Wait()
	frame := make([]byte, size)
	for i := range conns {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		defer s.Close()
		wake[i] = make(chan struct{}, 1)
		wg.Add(2)
		go func() { // the reader: a watcher
			defer wg.Done()
			buf := make([]byte, 4096)
			n := 0
			for {
				k, err := c.Read(buf)
				if err != nil {
					return
				}
				for n += k; n >= size; n -= size {
					got.Done()
				}
			}
		}()
		go func() { // the writer: a watch handler
			defer wg.Done()
			for range wake[i] {
				if _, err := s.Write(frame); err != nil {
					return
				}
			}
		}()
	}
	defer func() {
		for _, w := range wake {
			close(w)
		}
	}()
	lat := make([]time.Duration, 0, b.N)
	for b.Loop() {
		got.Add(conns)
		t0 := time.Now()
		for _, w := range wake {
			w <- struct{}{}
		}
		got.Wait()
		lat = append(lat, time.Since(t0))
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2]), "p50-ns")
	b.ReportMetric(float64(lat[(len(lat)-1)*99/100]), "p99-ns")
}

// TestWatchShutdownSendsQueuedEvents: what the registry queued for a
// watcher before the streams close reaches it before the going-away close.
// Shutdown deregisters the app and closes the streams right after; the
// watch handler, finding both ready, used to pick one at random, and a
// SIGTERM sometimes lost the app's "delete" (TestBinarySIGTERM... failed
// 1 run in 60; this test, 1 round in 30 or so). Each round is one shutdown: a deregistration, then at once
// the close.
func TestWatchShutdownSendsQueuedEvents(t *testing.T) {
	t.Parallel()
	const rounds = 100
	lost := 0
	for range rounds {
		s, ts := newTestServer(t, nil)
		c := dialWatch(t, ts.URL)
		do(t, "POST", ts.URL+"/registry", seedService)
		if ev := readEvent(t, c); ev.Action != "create" {
			t.Fatalf("first event = %q, want create", ev.Action)
		}
		// The client reads on while the sidecar closes, as a client
		// does: the close handshake waits for its answer.
		actions := make(chan string, 4)
		go func() {
			defer close(actions)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			for {
				_, b, err := c.Read(ctx)
				if err != nil {
					actions <- fmt.Sprintf("end %d", websocket.CloseStatus(err))
					return
				}
				var ev Event
				json.Unmarshal(b, &ev)
				actions <- ev.Action
			}
		}()
		if code, body := do(t, "DELETE", ts.URL+"/registry", seedService); code != http.StatusOK {
			t.Fatalf("DELETE /registry = %d %s", code, body)
		}
		s.streams.Close()
		var got []string
		for a := range actions {
			got = append(got, a)
		}
		switch want := fmt.Sprintf("end %d", websocket.StatusGoingAway); {
		case slices.Equal(got, []string{"delete", want}):
		case slices.Equal(got, []string{want}):
			lost++
		default:
			t.Fatalf("watch after the deregistration: %q, want delete, then %s", got, want)
		}
	}
	if lost > 0 {
		t.Errorf("the delete queued before the streams closed was lost in %d of %d shutdowns, want none", lost, rounds)
	}
}

// clientPing is a masked ping without payload, as a client writes it.
var clientPing = []byte{0x80 | opPing, 0x80, 1, 2, 3, 4}

// rawStuckHandshake opens a websocket to path by hand, with a small
// receive buffer so the sidecar's writes to it block soon, and returns
// the connection: the test writes client frames on it and never reads.
func rawStuckHandshake(t *testing.T, ts *httptest.Server, path string) net.Conn {
	t.Helper()
	dialer := &net.Dialer{Timeout: 5 * time.Second, Control: func(network, address string, c syscall.RawConn) error {
		var err error
		c.Control(func(fd uintptr) { err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return err
	}}
	nc, err := dialer.Dial("tcp", ts.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(nc, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", path, ts.Listener.Addr())
	resp, err := http.ReadResponse(bufio.NewReader(nc), nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake %s: %v %v", path, resp, err)
	}
	nc.SetDeadline(time.Time{})
	return nc
}

// fillUntilBlocked publishes (events of about 20 KB) until the writer
// for a client that does not read has taken nothing for 50 publishes in
// a row (queued grew each time) over at least half a second: its write is
// blocked, the socket buffers full. What the queue then holds is far below
// its bounds. The buffers can take megabytes (the sender's grows to 3 MB
// on loopback here), so a few queued events are no sign of a blocked
// write; nor are 50 made in a burst while the writer waited for a core
// (then it wrote them all, found nothing more, and the stream never
// closed: 1 full run in 6), hence the half second, at 10 ms a publish.
func fillUntilBlocked(t *testing.T, publish func(i int), queued func() int) {
	t.Helper()
	run, last := 0, queued()
	var since time.Time // when the queue began to grow with every publish
	for i := 0; run < 50 || time.Since(since) < 500*time.Millisecond; i++ {
		if i == 2000 {
			t.Fatal("the writer still takes what is published after 2,000 publishes of 20 KB that its client does not read")
		}
		publish(i)
		q := queued()
		if q > last {
			if run == 0 {
				since = time.Now()
			}
			run++
			time.Sleep(10 * time.Millisecond)
		} else {
			run = 0
		}
		last = q
	}
}

// queuedEvents is the number of events the registry of s has queued for
// its watches and their handlers have not taken yet.
func queuedEvents(t *testing.T, s *server) int {
	t.Helper()
	m, ok := s.registry.reg.(*memoryRegistry)
	if !ok {
		t.Fatalf("registry is a %T, want the memory registry", s.registry.reg)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for x := range m.watchers.set {
		x.mu.Lock()
		n += len(x.queue)
		x.mu.Unlock()
	}
	return n
}

// TestRegistryWatchStuckClientPings: a watcher that stops reading but
// still sends pings (a keepalive on its own goroutine) is closed and
// counted in sidecar_registry_watchers_slow_total, as one that sends
// nothing is when its write times out. The pong, written by the library
// from its reader, waited behind the event write that could not finish;
// after 5 s the library gave up and closed the connection under it, and
// the failed write (not a timeout) went uncounted.
func TestRegistryWatchStuckClientPings(t *testing.T) {
	t.Parallel()
	// Longer than the library's 5 s for a control frame, so that the
	// defect shows; shorter than the 10 s default, for the suite's time.
	s, ts := newTestServer(t, nil, func(s *server) { s.registry.writeTimeout = 7 * time.Second })
	nc := rawStuckHandshake(t, ts, "/registry")
	eventually(t, 5*time.Second, "the watch is open", func() bool {
		return getMetrics(t, ts.URL)["sidecar_registry_watchers"] == 1
	})
	var b strings.Builder
	for i := range 300 {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"id":"n%d","address":"10.0.0.1","port":PORT}`, i)
	}
	fillUntilBlocked(t, func(i int) {
		body := `{"name":"stuck","nodes":[` + strings.ReplaceAll(b.String(), "PORT", strconv.Itoa(1+i%2)) + `]}`
		mustDo(t, "POST", ts.URL+"/registry", body)
	}, func() int { return queuedEvents(t, s) })
	if _, err := nc.Write(clientPing); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the stuck watch closed", func() bool {
		return getMetrics(t, ts.URL)["sidecar_registry_watchers"] == 0
	})
	if got := getMetrics(t, ts.URL)["sidecar_registry_watchers_slow_total"]; got != 1 {
		t.Errorf("sidecar_registry_watchers_slow_total = %v after a watcher that reads nothing was closed, want 1", got)
	}
}

// maskedFrame is a client's frame: FIN, opcode, masked payload (at most
// 125 bytes).
func maskedFrame(opcode byte, payload []byte) []byte {
	key := [4]byte{0x12, 0x34, 0x56, 0x78}
	b := append([]byte{0x80 | opcode, 0x80 | byte(len(payload))}, key[:]...)
	for i, c := range payload {
		b = append(b, c^key[i%4])
	}
	return b
}

// TestRegistryWatchDroppedDuringPing: a watch the registry drops for
// falling behind while its handler waits for the answer to a ping is
// closed with 1013 and counted, as one dropped at any other time. The
// handler took the failed ping for a dead client and dropped the
// connection without a close frame, uncounted.
func TestRegistryWatchDroppedDuringPing(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil, func(s *server) { s.registry.pingInterval = time.Second })
	nc, br := rawHandshake(t, ts, "/registry")
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(time.Minute)) // a broken test must not hang
	if f, err := readWireFrame(br); err != nil || f.opcode() != opPing {
		t.Fatalf("first frame %x %q, %v; want the sidecar's ping", f.b0, f.payload, err)
	}
	// The handler now waits for the pong, which never comes. Pongs that
	// answer nothing keep the connection's reader alive meanwhile.
	stop := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				nc.Write(maskedFrame(opPong, []byte("keepalive")))
			}
		}
	}()
	defer func() { close(stop); <-stopped }()
	for i := range watchBuffer + 1 {
		mustDo(t, "POST", ts.URL+"/registry", nodeBody("behind", fmt.Sprint("n", i), 1))
	}
	for data := 0; ; data++ {
		f, err := readWireFrame(br)
		if err != nil {
			t.Fatalf("after %d events: %v, and no close frame; want %v", data, err, websocket.StatusTryAgainLater)
		}
		if f.opcode() == opText {
			continue
		}
		if f.b0 != 0x80|opClose || closeCode(f) != websocket.StatusTryAgainLater {
			t.Fatalf("frame %x %q, want a close frame with %v", f.b0, f.payload, websocket.StatusTryAgainLater)
		}
		break
	}
	if got := getMetrics(t, ts.URL)["sidecar_registry_watchers_slow_total"]; got != 1 {
		t.Errorf("sidecar_registry_watchers_slow_total = %v after the watch fell behind, want 1", got)
	}
}

// TestRegistryWatchDeadClient: a watch whose client answers no ping (it
// sends nothing at all) is closed after twice the ping interval, by the
// read deadline, rather than held open.
func TestRegistryWatchDeadClient(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil, func(s *server) { s.registry.pingInterval = 200 * time.Millisecond })
	nc, br := rawHandshake(t, ts, "/registry")
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(time.Minute)) // a broken test must not hang
	for {
		f, err := readWireFrame(br)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("watch of a client that answers no ping: %v, want the end of the stream", err)
		}
		if f.opcode() != opPing {
			t.Fatalf("frame %x %q, want only pings", f.b0, f.payload)
		}
	}
	eventually(t, 5*time.Second, "the dead watch gone", func() bool {
		return getMetrics(t, ts.URL)["sidecar_registry_watchers"] == 0
	})
}
