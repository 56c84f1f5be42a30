package main

// faults_test.go is the fault battery of issue 13: the sidecar knocked
// about as an attacker or a careless operator would, through the real
// server on real loopback ports (and, for SIGTERM, the built binary as a
// child process), each scenario reporting its figures.
//
// Every scenario runs at two sizes. By default it is small and runs beside
// the other tests, so that every go test runs the battery; with
// SIDECAR_FAULTS=1 it runs at the size (1,000 slowloris
// connections, Consul stopped for 30 s, 20,000 messages), one scenario at
// a time so that its figures are its own. CI runs the full battery under
// -race as a step of its own (.ci/run):
//
//	SIDECAR_FAULTS=1 go test -race -count=1 -v -run '^TestFault' .
//
// Figures are log lines in one format, "fault: <test> | <figure> | <value>",
// and the same lines end the run as a table (faultSummary). They are
// reported, not asserted: a shared 2-core machine makes any latency figure
// wander. What is asserted is what a loaded machine cannot break: no
// failed request where none may fail, JSON errors where errors are due,
// generous bounds on time and memory, and every goroutine of the sidecar
// gone once it is closed.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
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

// faultsFull reports whether SIDECAR_FAULTS=1 asks for the scenarios at
// full size.
func faultsFull() bool { return os.Getenv("SIDECAR_FAULTS") == "1" }

// faultSize is small by default and full under SIDECAR_FAULTS=1.
func faultSize[T any](small, full T) T {
	if faultsFull() {
		return full
	}
	return small
}

// faultScenario begins a scenario: beside the other tests when small,
// alone at full size.
func faultScenario(t *testing.T) {
	t.Helper()
	if !faultsFull() {
		t.Parallel()
	}
}

// faultFigures holds the figures reported so far, in order, for the
// summary TestMain prints.
var faultFigures struct {
	mu    sync.Mutex
	lines [][3]string // test, figure, value
}

// figure reports one figure of the running scenario in the fixed format.
func figure(t *testing.T, name, format string, args ...any) {
	t.Helper()
	value := fmt.Sprintf(format, args...)
	t.Logf("fault: %s | %s | %s", t.Name(), name, value)
	faultFigures.mu.Lock()
	defer faultFigures.mu.Unlock()
	faultFigures.lines = append(faultFigures.lines, [3]string{t.Name(), name, value})
}

// TestMain runs the tests, then prints the fault figures as a table. go
// test shows it with -v, or when a package's tests fail.
func TestMain(m *testing.M) {
	code := m.Run()
	faultSummary(os.Stdout)
	if binPath != "" {
		os.RemoveAll(filepath.Dir(binPath)) // sidecarBinary's build, 13 MB a run
	}
	os.Exit(code)
}

// faultSummary writes the figures reported as a Markdown table, headed by
// the size, the date and the machine.
func faultSummary(w io.Writer) {
	faultFigures.mu.Lock()
	defer faultFigures.mu.Unlock()
	if len(faultFigures.lines) == 0 {
		return
	}
	size := "small (default; SIDECAR_FAULTS=1 for full size)"
	if faultsFull() {
		size = "full (SIDECAR_FAULTS=1)"
	}
	race := "off"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "-race" && s.Value == "true" {
				race = "on"
			}
		}
	}
	fmt.Fprintf(w, "\nfault summary: %s; %s; %s; %s %s/%s, -race %s\n\n",
		size, time.Now().UTC().Format("2006-01-02 15:04 MST"), faultMachine(), runtime.Version(), runtime.GOOS, runtime.GOARCH, race)
	fmt.Fprintln(w, "| scenario | figure | value |")
	fmt.Fprintln(w, "|---|---|---|")
	for _, l := range faultFigures.lines {
		fmt.Fprintf(w, "| %s | %s | %s |\n", strings.TrimPrefix(l[0], "TestFault"), l[1], l[2])
	}
}

// faultMachine says what the figures were measured on: CPUs, their model,
// the kernel and the load average, from /proc where there is one.
func faultMachine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	load := "unknown"
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		f := strings.Fields(string(b))
		load = strings.Join(f[:min(3, len(f))], " ")
	}
	return fmt.Sprintf("%d CPUs (%s), Linux %s, load average %s", runtime.NumCPU(), model, strings.TrimSpace(string(kernel)), load)
}

// faultConfig is what an operator runs with, the defaults, on a free
// loopback port.
func faultConfig() *Config {
	cfg := defaultConfig()
	cfg.Address = "127.0.0.1:0"
	return cfg
}

// faultSidecar is the sidecar of a scenario, run as run runs it: built by
// newServer, listening on a loopback port and served by serve, with the
// binary's http.Server (header timeout, limits) and shutdown. Its
// goroutines carry a pprof label of their own, the goroutine-leak check's
// (leak_test.go), so that the scenario counts them exactly while other
// tests run, and stop checks that none outlives it.
type faultSidecar struct {
	s      *server
	url    string
	port   int
	label  string      // value of leakLabel on its goroutines
	logs   *syncBuffer // what it logged, shown when the scenario fails
	cancel context.CancelFunc
	done   chan error // serve's result
	once   sync.Once
}

// startFaultSidecar starts a sidecar with cfg (faultConfig when nil),
// tweaks applied to it before it serves. It is stopped at cleanup.
func startFaultSidecar(t *testing.T, cfg *Config, tweaks ...func(*server)) *faultSidecar {
	t.Helper()
	if cfg == nil {
		cfg = faultConfig()
	}
	f := &faultSidecar{label: fmt.Sprintf("%s#%x", t.Name(), rand.Uint64()), logs: &syncBuffer{}, done: make(chan error, 1)}
	logger := slog.New(slog.NewTextHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	var err error
	pprof.Do(context.Background(), pprof.Labels(leakLabel, f.label), func(context.Context) {
		if f.s, err = newServer(cfg, logger); err != nil {
			return
		}
		for _, tweak := range tweaks {
			tweak(f.s)
		}
		var ln net.Listener
		if ln, err = f.s.tls.listen(cfg.Address); err != nil {
			f.s.Close()
			return
		}
		if err = f.s.setAdvertise(ln.Addr()); err != nil {
			ln.Close()
			f.s.Close()
			return
		}
		f.port = ln.Addr().(*net.TCPAddr).Port
		var ctx context.Context
		ctx, f.cancel = context.WithCancel(context.Background())
		go func() { f.done <- f.s.serve(ctx, ln) }()
	})
	if err != nil {
		t.Fatalf("start the sidecar: %v", err)
	}
	f.url = "http://127.0.0.1:" + strconv.Itoa(f.port)
	t.Cleanup(func() { f.stop(t) })
	return f
}

// stop shuts the sidecar down as SIGTERM does, waits for serve to return
// and checks that every goroutine it started has ended. Idempotent.
func (f *faultSidecar) stop(t *testing.T) {
	t.Helper()
	f.once.Do(func() {
		f.cancel()
		wait := f.s.cfg.ShutdownDelay + f.s.cfg.ShutdownTimeout + 30*time.Second
		select {
		case err := <-f.done:
			if err != nil {
				t.Errorf("serve returned %v", err)
			}
		case <-time.After(wait):
			t.Errorf("serve did not return within %s of the shutdown", wait)
		}
		awaitLabelled(t, f.label, leakWait)
		if t.Failed() {
			logs := f.logs.String()
			t.Logf("sidecar log (the last 4 kB):\n%s", logs[max(0, len(logs)-4096):])
		}
	})
}

// goroutines counts the sidecar's goroutines.
func (f *faultSidecar) goroutines() int {
	n := 0
	for _, rec := range strings.Split(labelledGoroutines(leakLabel, f.label), "\n\n") {
		var c int
		if _, err := fmt.Sscanf(rec, "%d @", &c); err == nil {
			n += c
		}
	}
	return n
}

// faultUsage is what a sidecar holds at one moment.
type faultUsage struct {
	goroutines int   // the sidecar's own
	conns      int   // connections it accepted and has not closed
	heapKB     int64 // live heap of the test process after a collection
	rssKB      int64 // resident memory of the test process
}

func (u faultUsage) String() string {
	return fmt.Sprintf("%d goroutines, %d connections, heap %.1f MB, RSS %.1f MB (test process)",
		u.goroutines, u.conns, float64(u.heapKB)/1024, float64(u.rssKB)/1024)
}

// usage measures what the sidecar holds now. Heap and RSS are the whole
// test process's: its own figures when the scenario runs alone
// (SIDECAR_FAULTS=1), noisy beside other tests.
func (f *faultSidecar) usage(t *testing.T) faultUsage {
	t.Helper()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return faultUsage{
		goroutines: f.goroutines(),
		conns:      socketsOn(f.port),
		heapKB:     int64(ms.HeapAlloc >> 10),
		rssKB:      int64(procRSS(t, os.Getpid())),
	}
}

// peak samples the sidecar's goroutines and connections every 100 ms (a
// goroutine profile stops the world: more often would slow what it
// measures) until the returned function is called, which gives the most
// of each seen. The sampling also ends when the test does.
func (f *faultSidecar) peak(t *testing.T) func() (goroutines, conns int) {
	var g, c atomic.Int64
	sample := func() {
		if n := int64(f.goroutines()); n > g.Load() {
			g.Store(n)
		}
		if n := int64(socketsOn(f.port)); n > c.Load() {
			c.Store(n)
		}
	}
	stop := sampleEvery(100*time.Millisecond, sample)
	t.Cleanup(stop)
	return func() (int, int) {
		stop()
		return int(g.Load()), int(c.Load())
	}
}

// sampleEvery calls sample at once and then every interval until the
// returned function is called, which waits for the last call. Idempotent.
func sampleEvery(interval time.Duration, sample func()) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			sample()
			select {
			case <-quit:
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(quit); <-done }) }
}

// Bounds of settle: how far above its baseline a sidecar may stay once a
// fault is over. Idle connections in its pools and the callers' come and
// go with the load; the heap bound is asserted at full size only, where
// nothing else runs.
const (
	settleGoroutines = 16
	settleConns      = 4
	settleHeapKB     = 16 << 10
	settleWithin     = 30 * time.Second
)

// settle waits until the sidecar is back within the bounds above its
// baseline base, with every client's idle connection closed, and reports
// where it ended.
func (f *faultSidecar) settle(t *testing.T, base faultUsage, clients ...*http.Client) faultUsage {
	t.Helper()
	deadline := time.Now().Add(settleWithin)
	var u faultUsage
	for {
		for _, c := range append(clients, http.DefaultClient) {
			c.CloseIdleConnections()
		}
		u = f.usage(t)
		back := u.goroutines <= base.goroutines+settleGoroutines && u.conns <= base.conns+settleConns &&
			(!faultsFull() || u.heapKB <= base.heapKB+settleHeapKB)
		if back {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("%s after the fault: %v, want within %d goroutines, %d connections and %d MB of the baseline %v",
				settleWithin, u, settleGoroutines, settleConns, settleHeapKB>>10, base)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	figure(t, "baseline", "%v", base)
	figure(t, "after", "%v", u)
	return u
}

// faultBackend is a node of a scenario: a real HTTP server that answers a
// JSON-RPC call (POST /) as the RPC handler's nodes do and any other
// request with 200 "node NAME", as a proxied app does.
type faultBackend struct {
	name string
	srv  *httptest.Server
	port int
	hits atomic.Int64
}

func newFaultBackend(t *testing.T, name string) *faultBackend {
	t.Helper()
	b := &faultBackend{name: name}
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.hits.Add(1)
		body, _ := io.ReadAll(r.Body)
		if r.Method == http.MethodPost && r.URL.Path == "/" {
			var req struct {
				ID json.RawMessage `json:"id"`
			}
			if err := json.Unmarshal(body, &req); err != nil {
				http.Error(w, "bad json-rpc request: "+err.Error(), http.StatusBadRequest)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"id":%s,"result":{"node":%q},"error":null}`, req.ID, name)
			return
		}
		io.WriteString(w, "node "+name)
	}))
	t.Cleanup(b.kill)
	b.port = b.srv.Listener.Addr().(*net.TCPAddr).Port
	return b
}

// kill stops the node as a crash would: connections cut, port closed.
// Idempotent.
func (b *faultBackend) kill() {
	b.srv.CloseClientConnections()
	b.srv.Close()
}

// registerPorts registers the loopback ports as nodes of service.
func registerPorts(t *testing.T, base, service string, ports ...int) {
	t.Helper()
	var urls []string
	for _, p := range ports {
		urls = append(urls, "http://127.0.0.1:"+strconv.Itoa(p))
	}
	registerURLs(t, base, service, urls...)
}

// faultLoad is continuous load: workers send requests until stopped, each
// outcome counted under the phase in which the request began, so that a
// scenario can say how many failed before a fault (phase 0), during it (1)
// and after (2); a request in flight when the fault began counts with the
// fault.
type faultLoad struct {
	phase        atomic.Int32
	ok           [3]atomic.Int64
	failed       [3]atomic.Int64
	refused      [3]atomic.Int64 // connections refused (send said refusedOutcome): the worker stopped
	firstRefused atomic.Int64    // unix ns of the first refusal
	latency      [3]latencies
	stopc        chan struct{}
	wg           sync.WaitGroup

	mu    sync.Mutex // guards first
	first [3]string  // the first failure of each phase
}

// latencies collects durations; safe for concurrent use.
type latencies struct {
	mu sync.Mutex // guards d
	d  []time.Duration
}

func (l *latencies) add(d time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d)
	l.mu.Unlock()
}

// quantile returns the q-quantile (nearest rank) of what was added.
func (l *latencies) quantile(q float64) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.d) == 0 {
		return 0
	}
	s := slices.Clone(l.d)
	slices.Sort(s)
	return s[int(q*float64(len(s)-1)+0.5)]
}

// refusedOutcome is what send returns when the sidecar refused the
// connection: its listener is closed. The worker stops there.
const refusedOutcome = "connection refused"

// startLoad runs workers, each calling send with its own client (keeping
// connections alive, as services do) until stop. send returns "" for a
// success, refusedOutcome for a refused connection, else what went wrong.
func startLoad(t *testing.T, workers int, send func(c *http.Client) string) *faultLoad {
	t.Helper()
	l := &faultLoad{stopc: make(chan struct{})}
	for range workers {
		c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer c.CloseIdleConnections()
			for {
				select {
				case <-l.stopc:
					return
				default:
				}
				p := l.phase.Load()
				start := time.Now()
				msg := send(c)
				if p == 0 && l.phase.Load() > 0 {
					p = 1
				}
				if msg == refusedOutcome {
					l.refused[p].Add(1)
					l.firstRefused.CompareAndSwap(0, time.Now().UnixNano())
					return
				}
				if msg != "" {
					l.failed[p].Add(1)
					l.mu.Lock()
					if l.first[p] == "" {
						l.first[p] = msg
					}
					l.mu.Unlock()
					continue
				}
				l.latency[p].add(time.Since(start))
				l.ok[p].Add(1)
			}
		}()
	}
	t.Cleanup(l.stop)
	return l
}

// stop ends the load and waits for the workers. Idempotent.
func (l *faultLoad) stop() {
	select {
	case <-l.stopc:
	default:
		close(l.stopc)
	}
	l.wg.Wait()
}

// waitOK waits until n requests of the current phase have succeeded.
func (l *faultLoad) waitOK(t *testing.T, n int64, what string) {
	t.Helper()
	p := l.phase.Load()
	eventually(t, time.Minute, what, func() bool { return l.ok[p].Load() >= n })
}

// sendOutcome is what send returns for a finished request: "" for a 200.
func sendOutcome(resp *http.Response, err error) string {
	if err != nil {
		return err.Error()
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Sprintf("%d %s", resp.StatusCode, body)
	}
	return ""
}

// callFor returns the request a scenario sends to service foo through the
// handler: an RPC call by path, or a proxied GET.
func callFor(base, handler string) func(c *http.Client) string {
	if handler == "proxy" {
		return func(c *http.Client) string { return sendOutcome(c.Get(base + "/foo/load")) }
	}
	return func(c *http.Client) string {
		return sendOutcome(c.Post(base+"/foo/bar", "application/json", strings.NewReader(`{"n":1}`)))
	}
}

// readMetric reads one sample of the sidecar's /metrics (0 when absent).
func readMetric(t *testing.T, base, key string) float64 {
	t.Helper()
	return getMetrics(t, base)[key]
}

// TestFaultKillBackend: one of three nodes dies under continuous load. The
// requests it had in flight may fail (a call sent is not sent again);
// refused connections are retried on the others; once the node is
// ejected, no request fails.
func TestFaultKillBackend(t *testing.T) {
	faultScenario(t)
	for _, handler := range []string{"rpc", "proxy"} {
		t.Run(handler, func(t *testing.T) {
			cfg := faultConfig()
			cfg.Handler = handler
			f := startFaultSidecar(t, cfg)
			nodes := []*faultBackend{newFaultBackend(t, "n1"), newFaultBackend(t, "n2"), newFaultBackend(t, "n3")}
			registerPorts(t, f.url, "go.micro.srv.foo", nodes[0].port, nodes[1].port, nodes[2].port)
			workers := faultSize(4, 8)
			before, after := int64(faultSize(100, 2000)), int64(faultSize(200, 4000))

			load := startLoad(t, workers, callFor(f.url, handler))
			load.waitOK(t, before, fmt.Sprintf("%d requests before the kill", before))
			base := f.usage(t)
			load.phase.Store(1)
			killed := time.Now()
			nodes[2].kill()
			ejections := "sidecar_" + handler + `_ejections_total{service="go.micro.srv.foo"}`
			eventually(t, time.Minute, "the dead node ejected", func() bool { return readMetric(t, f.url, ejections) >= 1 })
			ejected := time.Since(killed)
			load.phase.Store(2)
			load.waitOK(t, after, fmt.Sprintf("%d requests after the ejection", after))
			load.stop()

			figure(t, "load", "%d workers, keep-alive; %d requests before the kill", workers, load.ok[0].Load()+load.failed[0].Load())
			figure(t, "kill to ejection", "%s, %d requests (%d failed)", ejected.Round(time.Millisecond),
				load.ok[1].Load()+load.failed[1].Load(), load.failed[1].Load())
			figure(t, "failed after the ejection", "%d of %d", load.failed[2].Load(), load.ok[2].Load()+load.failed[2].Load())
			figure(t, "latency p50 / p99 after the ejection", "%s / %s", load.latency[2].quantile(0.5).Round(time.Microsecond),
				load.latency[2].quantile(0.99).Round(time.Microsecond))
			m := getMetrics(t, f.url)
			figure(t, "retries, node failures", "%v, %v", m["sidecar_"+handler+`_retries_total{service="go.micro.srv.foo"}`],
				m["sidecar_"+handler+`_node_failures_total{service="go.micro.srv.foo"}`])
			if n := load.failed[0].Load(); n > 0 {
				t.Errorf("%d requests failed before the kill; first: %s", n, load.first[0])
			}
			if n := load.failed[2].Load(); n > 0 {
				t.Errorf("%d requests failed after the dead node was ejected, want 0; first: %s", n, load.first[2])
			}
			if n, most := load.failed[1].Load(), int64(workers); n > most {
				t.Errorf("%d requests failed between the kill and the ejection, want at most %d (one in flight per worker); first: %s", n, most, load.first[1])
			}
			f.settle(t, base)
			f.stop(t)
		})
	}
}

// hangingBackend is a node that reads requests and never answers them,
// counting the requests it holds: each ends when its caller goes away
// (net/http sees that only once the body is read).
func hangingBackend(t *testing.T) (port int, held *atomic.Int64) {
	t.Helper()
	held = new(atomic.Int64)
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		held.Add(1)
		defer held.Add(-1)
		io.Copy(io.Discard, r.Body)
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	t.Cleanup(func() { close(release); srv.Close() })
	return srv.Listener.Addr().(*net.TCPAddr).Port, held
}

// TestFaultHungBackend: calls to a node that never answers end with a JSON
// 504 once --client_request_timeout has passed, all of them at once, and
// the sidecar lets go of the node's connections: nothing of the calls
// stays behind while the node goes on hanging.
func TestFaultHungBackend(t *testing.T) {
	faultScenario(t)
	for _, handler := range []string{"rpc", "proxy"} {
		t.Run(handler, func(t *testing.T) {
			cfg := faultConfig()
			cfg.Handler = handler
			cfg.ClientRequestTimeout = faultSize(200*time.Millisecond, time.Second)
			f := startFaultSidecar(t, cfg)
			port, held := hangingBackend(t)
			registerPorts(t, f.url, "go.micro.srv.foo", port)
			calls := faultSize(8, 200)
			client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: calls}}
			base := f.usage(t)
			peak := f.peak(t)

			var over latencies
			var wg sync.WaitGroup
			errs := make(chan string, calls)
			for range calls {
				wg.Add(1)
				go func() {
					defer wg.Done()
					req, _ := http.NewRequest("POST", f.url+"/foo/bar", strings.NewReader(`{}`))
					if handler == "proxy" {
						req, _ = http.NewRequest("GET", f.url+"/foo/hang", nil)
					}
					// From the moment the request is sent: a connection
					// waiting to be accepted among 200 is not the sidecar's
					// time to answer.
					var mu sync.Mutex
					var start time.Time
					req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
						WroteRequest: func(httptrace.WroteRequestInfo) { mu.Lock(); start = time.Now(); mu.Unlock() },
					}))
					resp, err := client.Do(req)
					if err != nil {
						errs <- err.Error()
						return
					}
					body, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					mu.Lock()
					took := time.Since(start)
					mu.Unlock()
					over.add(took - cfg.ClientRequestTimeout)
					var e apiError
					if json.Unmarshal(body, &e) != nil || resp.StatusCode != http.StatusGatewayTimeout || e.Code != http.StatusGatewayTimeout ||
						resp.Header.Get("Content-Type") != "application/json" {
						errs <- fmt.Sprintf("%d %s %s", resp.StatusCode, resp.Header.Get("Content-Type"), body)
						return
					}
					if bound := cfg.ClientRequestTimeout + 2*time.Second; took > bound {
						errs <- fmt.Sprintf("504 after %s, want within %s", took, bound)
					}
				}()
			}
			wg.Wait()
			close(errs)
			peakG, peakC := peak()
			failed := 0
			for e := range errs {
				if failed++; failed == 1 {
					t.Errorf("a call to the hung node: %s; want a JSON 504 within the timeout + 2 s", e)
				}
			}
			figure(t, "calls at once, timeout", "%d, %s", calls, cfg.ClientRequestTimeout)
			figure(t, "504 past the timeout (from the request sent) p50 / p99 / max", "%s / %s / %s", over.quantile(0.5).Round(time.Millisecond),
				over.quantile(0.99).Round(time.Millisecond), over.quantile(1).Round(time.Millisecond))
			figure(t, "not a JSON 504 in time", "%d of %d", failed, calls)
			figure(t, "peak", "%d goroutines, %d connections", peakG, peakC)
			eventually(t, settleWithin, "the hung node's requests released", func() bool { return held.Load() == 0 })
			f.settle(t, base, client)
			f.stop(t)
		})
	}
}

// slowHeaderTimeout is serve's ReadHeaderTimeout: a connection whose
// request headers have not all arrived by then is closed.
const slowHeaderTimeout = 10 * time.Second

// TestFaultSlowloris: while many connections send part of a request's
// headers and hold on (slowloris), normal requests on new connections are
// all answered, at latencies reported against a baseline without them.
// The sidecar holds a goroutine and a socket for each such connection and
// no more, closes them once the header timeout has passed (at full size
// the test waits for that; small, it closes them itself), and returns to
// its baseline.
func TestFaultSlowloris(t *testing.T) {
	faultScenario(t)
	f := startFaultSidecar(t, nil)
	node := newFaultBackend(t, "n1")
	registerPorts(t, f.url, "go.micro.srv.foo", node.port)
	slow, requests := faultSize(100, 1000), faultSize(50, 300)
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	measure := func(l *latencies) (failed int, first string) {
		for range requests {
			start := time.Now()
			msg := sendOutcome(client.Post(f.url+"/foo/bar", "application/json", strings.NewReader(`{"n":1}`)))
			if msg != "" {
				if failed++; failed == 1 {
					first = msg
				}
				continue
			}
			l.add(time.Since(start))
		}
		return failed, first
	}
	var before, during latencies
	if failed, first := measure(&before); failed > 0 {
		t.Fatalf("%d of %d requests failed without slowloris; first: %s", failed, requests, first)
	}
	base := f.usage(t)

	// The slow connections: a request line and part of the headers, then
	// a byte of a header value every second, never the end of the headers.
	peak := f.peak(t)
	opened := time.Now()
	conns := make([]net.Conn, 0, slow)
	cut := make(chan time.Duration, slow) // when the sidecar closed each
	for i := range slow {
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(f.port))
		if err != nil {
			t.Fatalf("slow connection %d: %v", i, err)
		}
		t.Cleanup(func() { c.Close() })
		if _, err := io.WriteString(c, "POST /foo/bar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Slow: "); err != nil {
			t.Fatalf("slow connection %d: write: %v", i, err)
		}
		conns = append(conns, c)
		go func() {
			io.Copy(io.Discard, c) // until the sidecar closes it, or the test
			cut <- time.Since(opened)
		}()
	}
	dribble := make(chan struct{})
	dribbled := make(chan struct{})
	go func() {
		defer close(dribbled)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-dribble:
				return
			case <-tick.C:
			}
			for _, c := range conns {
				c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
				c.Write([]byte("x"))
			}
		}
	}()
	defer func() { close(dribble); <-dribbled }()
	eventually(t, time.Minute, fmt.Sprintf("the sidecar holding %d slow connections", slow), func() bool { return socketsOn(f.port) >= slow })
	held := f.usage(t)

	failed, first := measure(&during)
	cutEarly := len(cut)
	if failed > 0 {
		t.Errorf("%d of %d requests failed with %d slow connections open; first: %s", failed, requests, slow, first)
	}
	figure(t, "slow connections, requests measured", "%d, %d sequential (a new connection each)", slow, requests)
	figure(t, "latency p50 / p99 without slowloris", "%s / %s", before.quantile(0.5).Round(time.Microsecond), before.quantile(0.99).Round(time.Microsecond))
	figure(t, "latency p50 / p99 with slowloris", "%s / %s", during.quantile(0.5).Round(time.Microsecond), during.quantile(0.99).Round(time.Microsecond))
	figure(t, "failed with slowloris", "%d of %d (slow connections cut meanwhile: %d)", failed, requests, cutEarly)
	figure(t, "held with slowloris", "%v", held)
	if limit := base.goroutines + slow + 64; held.goroutines > limit {
		t.Errorf("the sidecar runs %d goroutines with %d slow connections, want at most %d (baseline %d, one each)", held.goroutines, slow, limit, base.goroutines)
	}

	if faultsFull() {
		// The sidecar closes them once the header timeout has passed.
		var last time.Duration
		for range slow {
			select {
			case d := <-cut:
				last = max(last, d)
			case <-time.After(slowHeaderTimeout + time.Minute):
				t.Fatalf("slow connections open %s after they began, want them closed after the header timeout (%s)", time.Since(opened), slowHeaderTimeout)
			}
		}
		figure(t, "slow connections closed by the sidecar", "all %d, the last %s after they opened (header timeout %s)", slow, last.Round(time.Millisecond), slowHeaderTimeout)
	} else {
		for _, c := range conns {
			c.Close()
		}
	}
	peakG, peakC := peak()
	figure(t, "peak", "%d goroutines, %d connections", peakG, peakC)
	if limit := base.conns + slow + 64; peakC > limit {
		t.Errorf("the sidecar held %d connections at most with %d slow ones, want at most %d", peakC, slow, limit)
	}
	f.settle(t, base, client)
	f.stop(t)
}

// TestFaultLoop: a service whose node leads back to the sidecar, behind a
// relay (as behind a load balancer) or registered at the sidecar's own
// address in Consul, where no check at registration sees it. Before Via,
// one request went round about 6,000 times (12k descriptors, 687 MB);
// now each is one JSON 508, and the sidecar holds nothing more after them.
func TestFaultLoop(t *testing.T) {
	faultScenario(t)
	for _, route := range []string{"relay", "consul"} {
		t.Run(route, func(t *testing.T) { testFaultLoop(t, route) })
	}
}

func testFaultLoop(t *testing.T, route string) {
	var consul *consulAgent
	if route == "consul" {
		consul = startConsul(t)
	}
	for _, handler := range []string{"rpc", "proxy"} {
		t.Run(handler, func(t *testing.T) {
			cfg := faultConfig()
			cfg.Handler = handler
			if consul != nil {
				cfg.Registry, cfg.RegistryAddress = "consul", consul.http
			}
			f := startFaultSidecar(t, cfg)
			requests, workers := faultSize(20, 1000), faultSize(2, 8)
			service := "loop" + handler
			var relayed *atomic.Int64
			if route == "relay" {
				var relay string
				relay, relayed = loopRelay(t, "127.0.0.1:"+strconv.Itoa(f.port), int64(requests+10))
				registerURLs(t, f.url, "go.micro.srv."+service, relay)
			} else {
				reg := map[string]any{"ID": service + "-self", "Name": "go.micro.srv." + service, "Address": "127.0.0.1", "Port": f.port}
				if code := consul.api("PUT", "/v1/agent/service/register", reg, nil); code != http.StatusOK {
					t.Fatalf("consul register %v = %d", reg, code)
				}
				t.Cleanup(func() { consul.api("PUT", "/v1/agent/service/deregister/"+service+"-self", nil, nil) })
				eventually(t, time.Minute, "the sidecar sees its own address in Consul", func() bool {
					return hasNodes(t, f.url, "go.micro.srv."+service, service+"-self")
				})
			}
			url, method := f.url+"/"+service+"/call", "POST"
			if handler == "proxy" {
				method = "GET"
			}
			client := &http.Client{Timeout: 30 * time.Second}
			// send makes n requests, workers at a time, and returns how
			// many were not a JSON 508, and the first of those.
			send := func(n int, took *latencies) (failed int, first string) {
				var next atomic.Int64
				var mu sync.Mutex
				var wg sync.WaitGroup
				for range workers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for next.Add(1) <= int64(n) {
							var payload io.Reader
							if method == "POST" {
								payload = strings.NewReader(`{}`)
							}
							req, _ := http.NewRequest(method, url, payload)
							start := time.Now()
							msg := ""
							if resp, err := client.Do(req); err != nil {
								msg = err.Error()
							} else {
								body, _ := io.ReadAll(resp.Body)
								resp.Body.Close()
								took.add(time.Since(start))
								var e apiError
								if json.Unmarshal(body, &e) != nil || resp.StatusCode != http.StatusLoopDetected || e.Code != http.StatusLoopDetected {
									msg = fmt.Sprintf("%d %s", resp.StatusCode, body)
								}
							}
							if msg != "" {
								mu.Lock()
								if failed++; failed == 1 {
									first = msg
								}
								mu.Unlock()
							}
						}
					}()
				}
				wg.Wait()
				return failed, first
			}
			// The baseline is taken once the connections a loop keeps
			// alive are open: the sidecar's to the relay or to itself.
			if failed, first := send(2*workers, &latencies{}); failed > 0 {
				t.Fatalf("%s %s through a loop = %s, want a JSON 508", method, url, first)
			}
			base := f.usage(t)
			peak := f.peak(t)
			var took latencies
			failed, first := send(requests, &took)
			peakG, peakC := peak()
			if failed > 0 {
				t.Errorf("%d of %d requests through a loop failed; first: %s %s = %s, want a JSON 508", failed, requests, method, url, first)
			}
			refused := readMetric(t, f.url, "sidecar_loops_refused_total")
			figure(t, "requests through the loop", "%d, %d at a time (and %d before the baseline)", requests, workers, 2*workers)
			figure(t, "not a JSON 508", "%d of %d", failed, requests)
			figure(t, "508 latency p50 / p99 / max", "%s / %s / %s", took.quantile(0.5).Round(time.Microsecond),
				took.quantile(0.99).Round(time.Microsecond), took.quantile(1).Round(time.Microsecond))
			figure(t, "loops refused (metrics)", "%v", refused)
			if relayed != nil {
				figure(t, "connections through the relay", "%d", relayed.Load())
			}
			figure(t, "peak", "%d goroutines, %d connections", peakG, peakC)
			if refused != float64(requests+2*workers) {
				t.Errorf("sidecar_loops_refused_total = %v after %d looping requests, want one refusal each", refused, requests)
			}
			f.settle(t, base, client)
			f.stop(t)
		})
	}
}

// TestFaultSIGTERM: the built binary gets SIGTERM while its app calls
// another service through it (the app's calls go out through its sidecar;
// calls to the app reach it directly). No call in flight fails: those the
// service holds are answered after the listener has closed, keep-alive
// calls are answered or, once the listener is closed, refused at connect,
// never cut. The app is deregistered first: a registry watcher sees it
// leave before the sidecar ends the watch; and the listener stays open for
// --shutdown_delay after the signal, calls served meanwhile.
func TestFaultSIGTERM(t *testing.T) {
	faultScenario(t)
	for _, delay := range []time.Duration{0, faultSize(200*time.Millisecond, 2*time.Second)} {
		t.Run("shutdown_delay="+delay.String(), func(t *testing.T) { testFaultSIGTERM(t, delay) })
	}
}

func testFaultSIGTERM(t *testing.T, delay time.Duration) {
	workers, holds := faultSize(4, 16), faultSize(4, 32)
	app := newFaultBackend(t, "app") // registered by the sidecar; no calls reach it here
	entered := make(chan struct{}, holds)
	release := make(chan struct{})
	foo := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/foo/hold" {
			entered <- struct{}{}
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
			io.WriteString(w, "held")
			return
		}
		time.Sleep(time.Millisecond) // the service's work: calls overlap
		io.WriteString(w, "foo")
	}))
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(func() { unblock(); foo.Close() })
	cmd, base, stderr := startBinary(t, "--handler", "proxy", "--shutdown_delay", delay.String(),
		"--server_name", "go.micro.srv.app", "--server_address", "127.0.0.1:"+strconv.Itoa(app.port))
	eventually(t, 10*time.Second, "the app registered", func() bool {
		code, _ := getService(t, base, "go.micro.srv.app")
		return code == http.StatusOK
	})

	// The watcher is live once it has seen an event; from then on it
	// notes when the app leaves, and how the watch ends.
	watch := dialWatch(t, base)
	registerURLs(t, base, "go.micro.srv.foo", foo.URL)
	readEvent(t, watch)
	type watchEnd struct {
		deleted time.Time // when the app's delete event arrived; zero: never
		err     error     // how the watch ended
	}
	ended := make(chan watchEnd, 1)
	go func() {
		var we watchEnd
		for {
			_, b, err := watch.Read(context.Background())
			if err != nil {
				we.err = err
				ended <- we
				return
			}
			var ev Event
			if json.Unmarshal(b, &ev) == nil && ev.Action == "delete" && ev.Service != nil && ev.Service.Name == "go.micro.srv.app" && we.deleted.IsZero() {
				we.deleted = time.Now()
			}
		}
	}()

	load := startLoad(t, workers, func(c *http.Client) string {
		resp, err := c.Get(base + "/foo/load")
		if errors.Is(err, syscall.ECONNREFUSED) {
			return refusedOutcome
		}
		return sendOutcome(resp, err)
	})
	load.waitOK(t, 50, "50 calls served before SIGTERM")
	holdClient := &http.Client{Timeout: time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}
	var results []<-chan string
	for range holds {
		req, _ := http.NewRequest("GET", base+"/foo/hold", nil)
		results = append(results, inFlight(t, holdClient, req))
	}
	for range holds {
		select {
		case <-entered:
		case <-time.After(time.Minute):
			t.Fatalf("the service holds %d calls of %d after a minute", len(entered), holds)
		}
	}

	pid := cmd.Process.Pid
	figure(t, "sidecar process under load", "%d descriptors, RSS %.1f MB", procFDs(t, pid), float64(procRSS(t, pid))/1024)
	signalled := time.Now()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	load.phase.Store(1)
	eventually(t, time.Minute, "every load worker refused at connect (the listener closed)", func() bool {
		return load.refused[1].Load()+load.refused[0].Load() == int64(workers)
	})
	closedAfter := time.Duration(load.firstRefused.Load() - signalled.UnixNano())
	unblock()
	heldFailed := 0
	for i, r := range results {
		if got := <-r; got != "200 held" {
			if heldFailed++; heldFailed == 1 {
				t.Errorf("call %d held by the service across SIGTERM = %q, want 200 held", i, got)
			}
		}
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("exit after SIGTERM: %v; stderr: %s", err, stderr)
		}
	case <-time.After(time.Minute):
		t.Fatalf("the sidecar did not exit within a minute of SIGTERM; stderr: %s", stderr)
	}
	exitedAfter := time.Since(signalled)
	load.stop()
	var we watchEnd
	select {
	case we = <-ended:
	case <-time.After(time.Minute):
		t.Fatal("the registry watch did not end")
	}

	failed := load.failed[0].Load() + load.failed[1].Load()
	figure(t, "load", "%d workers (keep-alive) through the proxy, %d calls held by the service at SIGTERM", workers, holds)
	figure(t, "served before / after SIGTERM", "%d / %d", load.ok[0].Load(), load.ok[1].Load())
	figure(t, "failed (in flight, cut)", "%d load, %d held of %d", failed, heldFailed, holds)
	if !we.deleted.IsZero() {
		figure(t, "SIGTERM to the app's delete event", "%s", we.deleted.Sub(signalled).Round(100*time.Microsecond))
	}
	figure(t, "SIGTERM to the listener closed (first refusal)", "%s", closedAfter.Round(100*time.Microsecond))
	figure(t, "SIGTERM to exit", "%s", exitedAfter.Round(100*time.Microsecond))
	if failed > 0 {
		t.Errorf("%d requests failed across SIGTERM, want 0; first: %s %s", failed, load.first[0], load.first[1])
	}
	if we.deleted.IsZero() {
		t.Errorf("the watch ended (%v) without the app's delete event: the app was not deregistered before the sidecar closed", we.err)
	}
	if code := websocket.CloseStatus(we.err); code != websocket.StatusGoingAway {
		t.Errorf("the watch ended with %v, want going away (1001) after the app's delete event", we.err)
	}
	if closedAfter < delay {
		t.Errorf("a connection was refused %s after SIGTERM, within --shutdown_delay %s", closedAfter, delay)
	}
}

// faultConsulOutage is how long TestFaultConsulOutage keeps Consul
// stopped: SIDECAR_CONSUL_OUTAGE when set (a Go duration), else the
// issue's 30 s at full size and 1 s by default.
func faultConsulOutage(t *testing.T) time.Duration {
	t.Helper()
	if v := os.Getenv("SIDECAR_CONSUL_OUTAGE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("SIDECAR_CONSUL_OUTAGE=%q: want a positive duration such as 30s", v)
		}
		return d
	}
	return faultSize(time.Second, 30*time.Second)
}

// TestFaultConsulOutage: a real Consul agent stops for a while (the outage
// length is a setting, see faultConsulOutage) and comes back empty, as a
// -dev agent does, while the app calls a service through its sidecar and
// looks it up. Every call and lookup is served from the sidecar's cache
// meanwhile, and once Consul is back the sidecar registers again what it
// had registered there, the service registered through it and the app,
// within a minute: the backoff between attempts is at most 5 s. The
// blocking queries wait as long as Consul allows (10 minutes), so that a
// sidecar which reaches Consul again only when one of them ends shows.
// Before, each query went on with the index of the agent that had
// stopped; the new agent's index is lower, so the query blocked for the
// whole wait (30 s by default) before the sidecar saw Consul was back.
func TestFaultConsulOutage(t *testing.T) {
	faultScenario(t)
	outage := faultConsulOutage(t)
	consul := startConsul(t)
	foo, app := newFaultBackend(t, "foo"), newFaultBackend(t, "app")
	cfg := faultConfig()
	cfg.Registry, cfg.RegistryAddress = "consul", consul.http
	cfg.RegistryWait = 10 * time.Minute
	cfg.ServerName, cfg.ServerAddress = "go.micro.srv.app", "127.0.0.1:"+strconv.Itoa(app.port)
	f := startFaultSidecar(t, cfg)
	registerPorts(t, f.url, "go.micro.srv.foo", foo.port)
	inConsul := func(name string) func() bool {
		return func() bool { return len(consul.passing(name)) == 1 }
	}
	eventually(t, time.Minute, "foo in Consul", inConsul("go.micro.srv.foo"))
	eventually(t, time.Minute, "the app in Consul", inConsul("go.micro.srv.app"))

	calls := startLoad(t, faultSize(2, 4), callFor(f.url, "rpc"))
	lookups := startLoad(t, 1, func(c *http.Client) string {
		resp, err := c.Get(f.url + "/registry?service=go.micro.srv.foo")
		if err != nil {
			return err.Error()
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var svc Service
		if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &svc) != nil || len(svc.Nodes) != 1 {
			return fmt.Sprintf("%d %s", resp.StatusCode, body)
		}
		return ""
	})
	calls.waitOK(t, 50, "50 calls before the outage")
	lookups.waitOK(t, 10, "10 lookups before the outage")
	base := f.usage(t)

	calls.phase.Store(1)
	lookups.phase.Store(1)
	stopped := time.Now()
	consul.stop()
	eventually(t, time.Minute, "the sidecar noticing Consul is down", func() bool { return !cacheUp(f.s) })
	noticed := time.Since(stopped)
	time.Sleep(time.Until(stopped.Add(outage))) // the outage itself: nothing to wait for
	calls.phase.Store(2)
	lookups.phase.Store(2)
	restarted := time.Now()
	consul.start() // -dev: an empty agent
	eventually(t, time.Minute, "the sidecar reaching Consul again", func() bool { return cacheUp(f.s) })
	reached := time.Since(restarted)
	eventually(t, time.Minute, "foo registered in Consul again", inConsul("go.micro.srv.foo"))
	fooBack := time.Since(restarted)
	eventually(t, time.Minute, "the app registered in Consul again", inConsul("go.micro.srv.app"))
	appBack := time.Since(restarted)
	calls.waitOK(t, 50, "50 calls after the outage")
	calls.stop()
	lookups.stop()

	figure(t, "Consul stopped for", "%s (noticed after %s)", outage, noticed.Round(time.Millisecond))
	for i, phase := range []string{"before", "during", "after"} {
		figure(t, "calls / lookups "+phase+" the outage", "%d / %d, failed %d / %d", calls.ok[i].Load(), lookups.ok[i].Load(),
			calls.failed[i].Load(), lookups.failed[i].Load())
		if n := calls.failed[i].Load() + lookups.failed[i].Load(); n > 0 {
			t.Errorf("%d calls or lookups failed %s the outage, want 0; first: %s %s", n, phase, calls.first[i], lookups.first[i])
		}
	}
	figure(t, "Consul back to: reached, foo registered, app registered", "%s, %s, %s", reached.Round(time.Millisecond),
		fooBack.Round(time.Millisecond), appBack.Round(time.Millisecond))
	f.settle(t, base)
	f.stop(t)
}

// shortestQueue is the shortest queue of the broker's subscribers still
// served: the publisher of TestFaultStuckSubscriber waits on it so that
// the healthy subscriber, not the test's reader of it, is what the
// scenario measures.
func shortestQueue(b *broker) int {
	b.mu.Lock()
	subs := make([]*subscriber, 0, len(b.all))
	for sub := range b.all {
		subs = append(subs, sub)
	}
	b.mu.Unlock()
	shortest := -1
	for _, sub := range subs {
		sub.mu.Lock()
		if !sub.slow && !sub.closed && (shortest < 0 || len(sub.queue) < shortest) {
			shortest = len(sub.queue)
		}
		sub.mu.Unlock()
	}
	return max(shortest, 0)
}

// readStuck reads what the stuck subscriber was sent, once it reads again,
// to the end of its connection: closed with 1008 (policy violation), or
// cut without a close frame when the sidecar's write to it timed out
// first (the close frame is then stuck behind the frames it did not
// read). Any other end fails the test.
func readStuck(t *testing.T, conn *websocket.Conn) (got []int, end string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		_, p, err := conn.Read(ctx)
		if err != nil {
			switch code := websocket.CloseStatus(err); {
			case code == websocket.StatusPolicyViolation:
				return got, "closed with 1008"
			case code == -1 && ctx.Err() == nil && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)):
				return got, "cut (its write timed out)"
			}
			t.Fatalf("stuck subscriber: read after %d messages: %v, want close status 1008 or a cut connection", len(got), err)
		}
		k, err := messageNumber(p)
		if err != nil {
			t.Fatalf("stuck subscriber: %v", err)
		}
		got = append(got, k)
	}
}

// TestFaultStuckSubscriber: one subscriber of a topic stops reading while
// another reads, as messages are published: a plain subscriber (each
// message for both), and a member of a queue group (each message for one
// of them). The healthy one receives every message meant for it: all of
// them, or in the group every message the stuck member did not take
// before it was found full. Nothing is lost without being counted (in the
// group, nothing is lost), the stuck one is closed (with 1008 when it
// reads again before the write to it times out, else cut), and the
// sidecar's memory stays bounded by the stuck one's queue.
func TestFaultStuckSubscriber(t *testing.T) {
	faultScenario(t)
	for _, mode := range []string{"plain", "queue"} {
		t.Run(mode, func(t *testing.T) { testFaultStuckSubscriber(t, mode) })
	}
}

func testFaultStuckSubscriber(t *testing.T, mode string) {
	// Small, a subscriber's queue holds 256 messages and a group member
	// full for 100 ms is too slow; at full size the defaults (4096
	// messages or 8 MiB; 5 s).
	f := startFaultSidecar(t, nil, func(s *server) {
		if !faultsFull() {
			s.broker.queueLen, s.broker.stuckAfter = 256, 100*time.Millisecond
		}
	})
	path := "/broker?topic=jobs"
	if mode == "queue" {
		path += "&queue=workers"
	}
	ws := "ws" + strings.TrimPrefix(f.url, "http") + path
	stuck := dialStuck(t, ws)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	conn, _, err := websocket.Dial(ctx, ws, nil)
	cancel()
	if err != nil {
		t.Fatalf("dial %s: %v", ws, err)
	}
	conn.SetReadLimit(8 << 20)
	healthy := record(t, conn)
	eventually(t, 10*time.Second, "2 subscribers", func() bool { return f.s.broker.subscribers.Load() == 2 })

	n, after := faultSize(600, 20_000), faultSize(300, 2000) // at least, and at least after the stuck one is found
	pad := strings.Repeat("x", faultSize(4<<10, 1<<10))
	const window = 128
	limit := faultSize(20_000, 200_000) // messages before giving up on finding the stuck one
	client := &http.Client{Timeout: 30 * time.Second}
	publish := func(i int) {
		resp, err := client.Post(f.url+"/broker?topic=jobs", "text/plain", strings.NewReader(strconv.Itoa(i)+" "+pad))
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("publish %d = %d", i, resp.StatusCode)
		}
	}
	base := f.usage(t)
	var heapPeak atomic.Uint64
	stopHeap := sampleEvery(50*time.Millisecond, func() {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		heapPeak.Store(max(heapPeak.Load(), ms.HeapInuse))
	})
	t.Cleanup(stopHeap)
	start := time.Now()
	// found: messages published when the stuck one was found too slow;
	// stayed: when it was no longer subscribed (its connection cut).
	i, found, stayed := 0, 0, 0
	for ; i < limit && (found == 0 || i < max(n, found+after)); i++ {
		healthy.waitFor(t, time.Minute, fmt.Sprintf("the healthy subscriber's queue under %d before message %d", window, i),
			func() bool { return shortestQueue(f.s.broker) <= window })
		publish(i)
		if found == 0 && f.s.broker.slowDisconnects.Load() > 0 {
			found = i + 1
		}
		if stayed == 0 && f.s.broker.subscribers.Load() < 2 {
			stayed = i + 1
		}
	}
	n = i
	published := time.Since(start)
	if found == 0 {
		t.Fatalf("after %d messages the stuck subscriber was never found too slow", n)
	}
	if stayed == 0 {
		stayed = n
	}
	// Once its connection has ended, the counts are final.
	fromStuck, end := readStuck(t, stuck)
	m := getMetrics(t, f.url)
	dropped := int(m["sidecar_broker_dropped_total"])
	due := n // to the healthy one
	if mode == "queue" {
		due = n - len(fromStuck) - dropped
	}
	healthy.waitFor(t, time.Minute, fmt.Sprintf("the healthy subscriber receiving the %d messages due to it", due), func() bool { return healthy.count() >= due })
	stopHeap()

	got := healthy.messages()
	seen := make([]int, n)
	for _, k := range got {
		seen[k]++
	}
	if mode == "queue" {
		for _, k := range fromStuck {
			seen[k]++
		}
	}
	missing, twice := 0, 0
	for _, c := range seen {
		missing += max(0, 1-c)
		twice += max(0, c-1)
	}
	if mode == "queue" {
		missing -= dropped // counted, not missing
	}
	figure(t, "messages", "%d of %d B, published one at a time (the healthy queue under %d) in %s (%.0f a second)", n, len(pad)+6, window, published.Round(time.Millisecond), float64(n)/published.Seconds())
	figure(t, "stuck subscriber found too slow", "after %d messages; it then read %d before it was %s (after %d)", found, len(fromStuck), end, stayed)
	figure(t, "healthy subscriber received", "%d (missing %d, twice %d)", len(got), missing, twice)
	figure(t, "dropped (counted), slow disconnects", "%d, %v", dropped, m["sidecar_broker_slow_disconnects_total"])
	figure(t, "heap in use at most (test process)", "%.1f MB (baseline %.1f MB)", float64(heapPeak.Load())/(1<<20), float64(base.heapKB)/1024)
	if missing != 0 || twice > 0 {
		t.Errorf("of %d messages, %d due to the healthy subscriber did not reach it uncounted, %d arrived twice", n, missing, twice)
	}
	if got := m["sidecar_broker_slow_disconnects_total"]; got != 1 {
		t.Errorf("slow disconnects = %v, want 1", got)
	}
	if got := m["sidecar_broker_published_total"]; got != float64(n) {
		t.Errorf("published = %v, want %d", got, n)
	}
	if delivered := int(m["sidecar_broker_delivered_total"]); mode == "queue" && delivered+dropped != n {
		t.Errorf("the group's messages: %d delivered and %d dropped of %d: some neither written nor counted", delivered, dropped, n)
	}
	cut := end != "closed with 1008"
	switch counted := len(fromStuck) + dropped; {
	case mode == "queue" && dropped > 0 && !cut:
		t.Errorf("%d messages of the group dropped, want 0: the healthy member had room for each", dropped)
	case mode == "queue" && dropped > 1:
		t.Errorf("%d messages of the group dropped, want at most the one frame its write cut", dropped)
	case mode == "plain" && !cut && counted != n:
		t.Errorf("the stuck subscriber read %d and %d were counted dropped, want the %d published", len(fromStuck), dropped, n)
	case mode == "plain" && cut && (counted < stayed-2 || counted > stayed):
		// A publish between its removal and the subscriber gauge's
		// decrement is counted in stayed but was not for it.
		t.Errorf("the stuck subscriber read %d and %d were counted dropped, want the %d published while it was subscribed (less up to 2)", len(fromStuck), dropped, stayed)
	}
	if bound := uint64(base.heapKB)<<10 + 256<<20; faultsFull() && heapPeak.Load() > bound {
		t.Errorf("heap in use reached %d MB with a stuck subscriber, want under %d MB", heapPeak.Load()>>20, bound>>20)
	}
	conn.CloseNow()
	f.settle(t, base, client)
	f.stop(t)
}
