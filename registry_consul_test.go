package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// consulOutage is how long Consul stays stopped in TestConsulAgent. The
// issue's figure is 30 s; set SIDECAR_CONSUL_OUTAGE=30s for that run.
const consulOutage = 3 * time.Second

// consulAgent is a `consul agent -dev` child process on free loopback ports.
type consulAgent struct {
	t    *testing.T
	bin  string
	args []string
	http string       // host:port of the HTTP API
	port int          // its port
	hc   *http.Client // the test's own calls: one connection each, closed after, so they never count as the sidecar's
	proc *toolProcess // nil while stopped
}

// startConsul starts a dev agent. Without a consul binary the test skips,
// or fails in CI (requireTool). freePort cannot reserve the agent's ports:
// a test running in parallel may bind one first, and the agent then exits
// at start; it is started again on other ports.
func startConsul(t *testing.T) *consulAgent {
	t.Helper()
	bin := requireTool(t, "consul")
	for attempt := 1; ; attempt++ {
		httpPort := freePort(t)
		a := &consulAgent{t: t, bin: bin, http: "127.0.0.1:" + strconv.Itoa(httpPort), port: httpPort,
			hc: &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}}
		a.args = []string{"agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-log-level=warn",
			"-http-port=" + strconv.Itoa(httpPort), "-dns-port=-1", "-grpc-port=-1", "-grpc-tls-port=-1",
			"-serf-lan-port=" + strconv.Itoa(freePort(t)), "-serf-wan-port=" + strconv.Itoa(freePort(t)),
			"-server-port=" + strconv.Itoa(freePort(t))}
		t.Cleanup(a.stop)
		err := a.tryStart()
		if err == nil {
			return a
		}
		if attempt == 3 {
			t.Fatalf("consul did not start in %d attempts: %v", attempt, err)
		}
		t.Logf("consul did not start, again on other ports: %v", err)
	}
}

// start runs the agent again on the same ports (after stop).
func (a *consulAgent) start() {
	a.t.Helper()
	if err := a.tryStart(); err != nil {
		a.t.Fatal(err)
	}
}

// tryStart runs the agent and waits until it has a leader. If the agent
// exits first, it returns an error with what the agent wrote.
func (a *consulAgent) tryStart() error {
	a.t.Helper()
	out := &syncBuffer{}
	cmd := exec.Command(a.bin, a.args...)
	cmd.Stdout, cmd.Stderr = out, out
	if testing.Verbose() {
		w := io.MultiWriter(out, testWriter{a.t})
		cmd.Stdout, cmd.Stderr = w, w
	}
	proc, err := startProcess(cmd)
	if err != nil {
		return fmt.Errorf("start consul: %w", err)
	}
	a.proc = proc
	var exited error
	eventually(a.t, 30*time.Second, "consul has a leader", func() bool {
		select {
		case err := <-proc.exited:
			exited = fmt.Errorf("consul exited at start: %v\n%s", err, out)
			return true
		default:
		}
		resp, err := a.hc.Get("http://" + a.http + "/v1/status/leader")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var leader string
		return json.NewDecoder(resp.Body).Decode(&leader) == nil && leader != ""
	})
	if exited != nil {
		a.proc = nil
	}
	return exited
}

// stop ends the agent and waits for it; idempotent.
func (a *consulAgent) stop() {
	if a.proc != nil {
		a.proc.stop(os.Interrupt)
		a.proc = nil
	}
}

// api calls Consul's HTTP API directly and decodes the answer into out.
func (a *consulAgent) api(method, path string, body any, out any) int {
	a.t.Helper()
	var rd bytes.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd.Reset(b)
	}
	req, _ := http.NewRequest(method, "http://"+a.http+path, &rd)
	resp, err := a.hc.Do(req)
	if err != nil {
		a.t.Fatalf("consul %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	if out != nil && resp.StatusCode == http.StatusOK {
		json.NewDecoder(resp.Body).Decode(out)
	}
	return resp.StatusCode
}

// passing returns the IDs of the passing instances of name in Consul.
func (a *consulAgent) passing(name string) []string {
	var entries []consulEntry
	a.api("GET", "/v1/health/service/"+name+"?passing=true", nil, &entries)
	var ids []string
	for _, e := range entries {
		ids = append(ids, e.Service.ID)
	}
	return ids
}

func TestConsulAgent(t *testing.T) {
	t.Parallel()
	consul := startConsul(t)
	outage := consulOutage
	if v := os.Getenv("SIDECAR_CONSUL_OUTAGE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("SIDECAR_CONSUL_OUTAGE=%q: %v", v, err)
		}
		outage = d
	}
	a, urlA, _ := startSidecarAt(t, remoteConfig("consul", consul.http), "127.0.0.1:0")
	b, urlB, _ := startSidecarAt(t, remoteConfig("consul", consul.http), "127.0.0.1:0")
	const wait = 15 * time.Second

	t.Run("register with TTL is in Consul and on B", func(t *testing.T) {
		registerNode(t, urlA, "5s", "greeter", "greeter-1")
		if got := consul.passing("greeter"); fmt.Sprint(got) != "[greeter-1]" {
			t.Fatalf("consul passing greeter = %v, want [greeter-1]", got)
		}
		eventually(t, wait, "greeter on B", func() bool { return hasNodes(t, urlB, "greeter", "greeter-1") })
		_, body := do(t, "GET", urlB+"/registry?service=greeter", "")
		var s Service
		json.Unmarshal(body, &s)
		if s.Version != "1.2" || s.Metadata["team"] != "x" || s.Nodes[0].Metadata["zone"] != "a" ||
			s.Nodes[0].Port != 9090 || s.Nodes[0].Address != "127.0.0.1" {
			t.Fatalf("B: greeter = %s, want version 1.2, team=x, zone=a, 127.0.0.1:9090", body)
		}
		// A heartbeat is a check pass, and keeps it alive past the TTL.
		registerNode(t, urlA, "5s", "greeter", "greeter-1")
	})

	t.Run("no heartbeat: gone from Consul and B", func(t *testing.T) {
		eventually(t, wait, "greeter not passing in consul", func() bool { return len(consul.passing("greeter")) == 0 })
		eventually(t, wait, "greeter gone on B", func() bool { return lookup(t, urlB, "greeter") == nil })
	})

	t.Run("DELETE removes it from Consul", func(t *testing.T) {
		registerNode(t, urlA, "", "deleted", "deleted-1")
		if code := consul.api("GET", "/v1/agent/service/deleted-1", nil, nil); code != http.StatusOK {
			t.Fatalf("consul agent service deleted-1 = %d, want 200", code)
		}
		deregisterNode(t, urlA, "deleted", "deleted-1")
		if code := consul.api("GET", "/v1/agent/service/deleted-1", nil, nil); code != http.StatusNotFound {
			t.Fatalf("consul agent service deleted-1 = %d after DELETE, want 404", code)
		}
		eventually(t, wait, "deleted gone on B", func() bool { return lookup(t, urlB, "deleted") == nil })
	})

	t.Run("service registered directly in Consul is visible", func(t *testing.T) {
		reg := map[string]any{"ID": "ext-1", "Name": "external", "Address": "127.0.0.2", "Port": 1234, "Meta": map[string]string{"version": "9", "owner": "ops"}}
		if code := consul.api("PUT", "/v1/agent/service/register", reg, nil); code != http.StatusOK {
			t.Fatalf("consul register external = %d", code)
		}
		eventually(t, wait, "external on B", func() bool { return hasNodes(t, urlB, "external", "ext-1") })
		_, body := do(t, "GET", urlB+"/registry?service=external", "")
		var s Service
		json.Unmarshal(body, &s)
		n := s.Nodes[0]
		if s.Version != "9" || n.Address != "127.0.0.2" || n.Port != 1234 || n.Metadata["owner"] != "ops" {
			t.Fatalf("B: external = %s, want version 9, 127.0.0.2:1234, owner=ops", body)
		}
	})

	t.Run("Consul down: cache serves; registrations come back", func(t *testing.T) {
		registerNode(t, urlA, "", "durable", "durable-1")
		eventually(t, wait, "durable on B", func() bool { return hasNodes(t, urlB, "durable", "durable-1") })
		// A sidecar holds the services it uses: A uses external too. A
		// service listed but never used cannot be served from memory, and
		// is then unavailable, not unknown.
		if !hasNodes(t, urlA, "external", "ext-1") {
			t.Fatalf("A: external = %v, want [ext-1]", lookup(t, urlA, "external"))
		}
		cold := map[string]any{"ID": "cold-1", "Name": "cold", "Address": "127.0.0.2", "Port": 1234}
		if code := consul.api("PUT", "/v1/agent/service/register", cold, nil); code != http.StatusOK {
			t.Fatalf("consul register cold = %d", code)
		}
		eventually(t, wait, "cold listed on A", func() bool {
			_, body := do(t, "GET", urlA+"/registry", "")
			return strings.Contains(string(body), `"cold"`)
		})
		consul.stop()
		eventually(t, wait, "A and B notice Consul is down", func() bool { return !cacheUp(a) && !cacheUp(b) })
		deadline := time.Now().Add(outage)
		for time.Now().Before(deadline) {
			for _, url := range []string{urlA, urlB} {
				for _, name := range []string{"durable", "external"} {
					if lookup(t, url, name) == nil {
						t.Fatalf("%s: %s not served from cache while Consul is down", url, name)
					}
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
		code, body := do(t, "GET", urlA+"/registry?service=cold", "")
		wantError(t, "A: GET cold, listed but never used, while Consul is down", code, body, http.StatusServiceUnavailable)
		consul.start() // -dev: an empty agent
		eventually(t, wait, "durable re-sent to Consul", func() bool { return fmt.Sprint(consul.passing("durable")) == "[durable-1]" })
		eventually(t, wait, "external gone with the old agent", func() bool { return lookup(t, urlB, "external") == nil })
		eventually(t, wait, "durable back on B", func() bool { return hasNodes(t, urlB, "durable", "durable-1") })
	})
}

// TestConsulMapping checks what goes into Consul's Meta (within its limits)
// and that the sidecar tag brings everything back exactly.
func TestConsulMapping(t *testing.T) {
	t.Parallel()
	meta := map[string]string{
		"az":                                   "a",
		"bad key":                              "spaces are not allowed in Meta keys",
		"consul-reserved":                      "reserved prefix",
		"long":                                 string(bytes.Repeat([]byte("v"), 513)),
		"version":                              "a node key that collides with the version",
		string(bytes.Repeat([]byte("k"), 129)): "key too long",
	}
	for i := range 70 {
		meta[fmt.Sprintf("k%02d", i)] = "x"
	}
	svc := &Service{Name: "greeter", Version: "2.0", Metadata: map[string]string{"team": "x"},
		Endpoints: []*Endpoint{{Name: "Say.Hello", Request: json.RawMessage(`{"name":"string"}`)}}}
	node := &Node{ID: "g1", Address: "127.0.0.1", Port: 8080, Metadata: meta}
	b, err := newConsulBackend("127.0.0.1:1", "", remoteTiming{}, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	reg := b.consulBody(svc, node, 10*time.Second)

	if len(reg.Meta) > consulMaxMeta {
		t.Errorf("Meta has %d keys, want at most %d", len(reg.Meta), consulMaxMeta)
	}
	for k, v := range reg.Meta {
		if !consulMetaKeyOK(k) || len(v) > consulMaxMetaValue {
			t.Errorf("Meta[%q] = %d bytes: Consul refuses it", k, len(v))
		}
	}
	if reg.Meta["version"] != "2.0" || reg.Meta["az"] != "a" {
		t.Errorf("Meta version, az = %q, %q; want 2.0, a", reg.Meta["version"], reg.Meta["az"])
	}
	if reg.Check == nil || reg.Check.TTL != "10s" || reg.Check.DeregisterCriticalServiceAfter != "1m0s" || reg.Check.Status != "passing" {
		t.Errorf("Check = %+v, want TTL 10s, reap after 1m0s, passing", reg.Check)
	}
	if r := b.consulBody(svc, node, 0); r.Check != nil {
		t.Errorf("Check without TTL = %+v, want none", r.Check)
	}

	var e consulEntry
	e.Node.Address = "10.1.1.1"
	e.Service.ID, e.Service.Service, e.Service.Tags, e.Service.Meta = reg.ID, reg.Name, reg.Tags, reg.Meta
	e.Service.Address, e.Service.Port = reg.Address, reg.Port
	got := consulService("greeter", []consulEntry{e})
	n := got.Nodes[0]
	if got.Version != "2.0" || got.Metadata["team"] != "x" || len(got.Endpoints) != 1 || got.Endpoints[0].Name != "Say.Hello" ||
		string(got.Endpoints[0].Request) != `{"name":"string"}` || n.Address != "127.0.0.1" || n.Port != 8080 || n.Version != "2.0" || !maps.Equal(n.Metadata, meta) {
		t.Errorf("round trip = %+v node %+v, want the registration back", got, n)
	}

	// A service another tool registered: Meta is the node metadata, and the
	// Consul node's address stands in for an empty service address.
	var ext consulEntry
	ext.Node.Address = "10.1.1.1"
	ext.Service.ID, ext.Service.Port, ext.Service.Meta = "web-1", 80, map[string]string{"version": "7", "owner": "ops"}
	got = consulService("web", []consulEntry{ext})
	if n := got.Nodes[0]; got.Version != "7" || n.Address != "10.1.1.1" || n.Port != 80 || n.Metadata["owner"] != "ops" {
		t.Errorf("external = %+v node %+v, want version 7 at 10.1.1.1:80 with owner=ops", got, n)
	}
	if got := consulService("none", nil); got != nil {
		t.Errorf("no entries = %+v, want nil", got)
	}
}

// registerMany registers n services in Consul through its own API, from
// workers goroutines at once; reg(i) is the body of registration i.
func (a *consulAgent) registerMany(t *testing.T, n, workers int, reg func(i int) map[string]any) {
	t.Helper()
	tr := &http.Transport{MaxConnsPerHost: workers, MaxIdleConnsPerHost: workers}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	jobs := make(chan int)
	errs := make(chan error, 1)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				body, _ := json.Marshal(reg(i))
				req, _ := http.NewRequest("PUT", "http://"+a.http+"/v1/agent/service/register", bytes.NewReader(body))
				resp, err := client.Do(req)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					select {
					case errs <- fmt.Errorf("register %s: %w", body, err):
					default:
					}
				}
			}
		}()
	}
	for i := range n {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
}

// catalogSize is the number of services in Consul's catalog.
func (a *consulAgent) catalogSize() int {
	var m map[string]any
	a.api("GET", "/v1/catalog/services", nil, &m)
	return len(m)
}

// sampleConns samples connsTo(port) every 20 ms (as often as a loaded
// machine lets it) until stop is called or the test ends, and once more
// at stop. most reports the most held over two samples in a row (the
// smaller of each pair), peak the most in one sample. A connection the
// sidecar has closed stays in /proc until a read pending on it returns,
// which on a loaded machine can be later than the dial of the connection
// that replaces it: one sample then counts both (76 against 58 counted
// by the sidecar, once in CI). A sidecar that holds too many holds them
// for their blocking queries' 30 s, over every sample.
func sampleConns(t *testing.T, port int) (most, peak func() int, stop func()) {
	t.Helper()
	var held, top atomic.Int64
	prev := int64(-1)
	sample := func() {
		n := int64(connsTo(port))
		if n > top.Load() {
			top.Store(n)
		}
		if m := min(n, prev); m > held.Load() {
			held.Store(m)
		}
		prev = n
	}
	stopSampling := sampleEvery(20*time.Millisecond, sample)
	var once sync.Once
	stop = func() {
		once.Do(func() {
			stopSampling()
			sample()
		})
	}
	t.Cleanup(stop)
	return func() int { return int(held.Load()) }, func() int { return int(top.Load()) }, stop
}

// postRPC calls /rpc from any goroutine: it returns what went wrong
// instead of failing the test.
func postRPC(base, service string, i int) error {
	body := fmt.Sprintf(`{"service":%q,"endpoint":"Scale.Call","request":{"i":%d}}`, service, i)
	resp, err := http.Post(base+"/rpc", "application/json", strings.NewReader(body))
	if err != nil {
		return fmt.Errorf("rpc %s: %w", service, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), `"method":"Scale.Call"`) {
		return fmt.Errorf("rpc %s = %d %s, want 200 from its backend", service, resp.StatusCode, b)
	}
	return nil
}

// TestConsulAtScale is the acceptance: a real Consul agent at its
// default limits (200 connections per client address) with 1,000
// services registered through Consul's own API, and a sidecar with its
// default limits. The sidecar lists every service, calls 50 of them at
// once through /rpc without a failure, finds a service on its first
// lookup, sees a node join and leave a service in use within 1 s, holds
// at most 64 connections to Consul (seen in /proc and counted by the
// sidecar), and once calls stop sends Consul only its blocking queries'
// renewals.
func TestConsulAtScale(t *testing.T) {
	if testing.Short() {
		t.Skip("registers 1,000 services in Consul")
	}
	consul := startConsul(t)
	const services, called, maxConns = 1000, 50, 64
	back := newRPCBackend(t, "scale-1")
	other := newRPCBackend(t, "scale-2")
	name := func(i int) string { return fmt.Sprintf("svc-%04d", i) }
	start := time.Now()
	consul.registerMany(t, services, 32, func(i int) map[string]any {
		return map[string]any{"ID": name(i) + "-1", "Name": name(i), "Address": "127.0.0.1", "Port": back.port}
	})
	eventually(t, time.Minute, "every service in Consul's catalog", func() bool { return consul.catalogSize() == services+1 }) // and "consul"
	t.Logf("registered %d services in Consul in %s", services, time.Since(start).Round(time.Millisecond))
	most, peak, stopSampling := sampleConns(t, consul.port)

	cfg := testConfig()
	cfg.Registry, cfg.RegistryAddress = "consul", consul.http // every other registry setting at its default
	_, ts := newTestServer(t, cfg)

	t.Run("lists every service", func(t *testing.T) {
		code, body := do(t, "GET", ts.URL+"/registry", "")
		var list []serviceName
		json.Unmarshal(body, &list)
		if code != http.StatusOK || len(list) != services+1 {
			t.Fatalf("GET /registry = %d with %d services, want 200 with %d (every service in Consul, and consul)", code, len(list), services+1)
		}
	})

	t.Run("50 services called at once, each on its first try", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, called)
		for i := range called {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := postRPC(ts.URL, name(i*7), i); err != nil {
					errs <- err
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})

	t.Run("a service never looked up is found on its first call", func(t *testing.T) {
		if err := postRPC(ts.URL, name(services-1), 0); err != nil {
			t.Fatal(err)
		}
		if got := lookup(t, ts.URL, name(services-2)); fmt.Sprint(got) != "["+name(services-2)+"-1]" {
			t.Fatalf("first GET /registry?service=%s = %v, want [%s-1]", name(services-2), got, name(services-2))
		}
	})

	t.Run("a node joining and leaving a service in use is seen within 1s", func(t *testing.T) {
		inUse := name(0)
		reg := map[string]any{"ID": inUse + "-2", "Name": inUse, "Address": "127.0.0.1", "Port": other.port}
		if code := consul.api("PUT", "/v1/agent/service/register", reg, nil); code != http.StatusOK {
			t.Fatalf("consul register %s-2 = %d", inUse, code)
		}
		start := time.Now()
		eventually(t, time.Second, inUse+"-2 seen by the sidecar", func() bool { return hasNodes(t, ts.URL, inUse, inUse+"-1", inUse+"-2") })
		t.Logf("node added: seen after %s", time.Since(start).Round(time.Millisecond))
		if code := consul.api("PUT", "/v1/agent/service/deregister/"+inUse+"-2", nil, nil); code != http.StatusOK {
			t.Fatalf("consul deregister %s-2 = %d", inUse, code)
		}
		start = time.Now()
		eventually(t, time.Second, inUse+"-2 gone from the sidecar", func() bool { return hasNodes(t, ts.URL, inUse, inUse+"-1") })
		t.Logf("node deregistered: seen after %s", time.Since(start).Round(time.Millisecond))
	})

	m := getMetrics(t, ts.URL)
	t.Logf("registry metrics: services %v, held %v, watched %v, blocking %v, connections peak %v, requests %v, errors 429 %v",
		m["sidecar_registry_services"], m["sidecar_registry_services_held"], m["sidecar_registry_services_watched"],
		m["sidecar_registry_blocking_queries"], m["sidecar_registry_connections_peak"], m["sidecar_registry_requests_total"],
		m[`sidecar_registry_errors_total{status="429"}`])
	t.Run("at most 64 connections to Consul", func(t *testing.T) {
		stopSampling()
		seen := most()
		if seen > maxConns || seen == 0 {
			t.Errorf("most connections to Consul held in /proc (two samples in a row) = %d, want 1 to %d", seen, maxConns)
		}
		if peak := m["sidecar_registry_connections_peak"]; peak > maxConns || peak == 0 {
			t.Errorf("sidecar_registry_connections_peak = %v, want 1 to %d", peak, maxConns)
		}
		if got := m[`sidecar_registry_errors_total{status="429"}`]; got != 0 {
			t.Errorf("Consul answered 429 Too Many Requests %v times, want never", got)
		}
		t.Logf("most connections to Consul: %d held in /proc (%d in one sample), %v counted by the sidecar", seen, peak(), m["sidecar_registry_connections_peak"])
	})

	t.Run("idle: no polling", func(t *testing.T) {
		// The measurement is the number of requests over a window with no
		// calls. A watched service renews its blocking query once per
		// wait (30 s by default), so over a window shorter than that each
		// of them and the catalog's make at most one.
		const window = 3 * time.Second
		watched := m["sidecar_registry_services_watched"]
		before := getMetrics(t, ts.URL)["sidecar_registry_requests_total"]
		if before == 0 {
			t.Fatal("sidecar_registry_requests_total = 0 after the calls above: the requests to Consul are not counted")
		}
		var ru0, ru1 syscall.Rusage
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
		time.Sleep(window)
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
		n := getMetrics(t, ts.URL)["sidecar_registry_requests_total"] - before
		cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
		t.Logf("idle for %s: %v requests to Consul (%.1f/s), %s of CPU in the test process", window, n, n/window.Seconds(), cpu.Round(time.Millisecond))
		if n > watched+1 {
			t.Errorf("%v requests to Consul in %s of idleness, want at most %v (one renewal per watch and the catalog's)", n, window, watched+1)
		}
	})
}

// TestConsulWatchBudget runs a real Consul agent behind a sidecar allowed
// 8 connections: 5 services watched at most (8, less the catalog's and a
// reserve of 2), the others refreshed on lookup once older than
// --registry_stale, and every watch dropped after --registry_watch_idle
// without lookups. The cache runs on the test's clock: the ages that
// decide staleness, the least recently used and idleness are the steps the
// test takes, not how long a loaded machine takes between two lookups
// (with the wall clock, ten lookups under -race outlasted the 300 ms idle
// time and the first services were forgotten before they were counted).
func TestConsulWatchBudget(t *testing.T) {
	consul := startConsul(t)
	const services, conns, budget = 10, 8, 5
	const stale, idle = 100 * time.Millisecond, 300 * time.Millisecond
	name := func(i int) string { return fmt.Sprintf("budget-%d", i) }
	consul.registerMany(t, services, 4, func(i int) map[string]any {
		return map[string]any{"ID": name(i) + "-1", "Name": name(i), "Address": "127.0.0.1", "Port": 1000 + i}
	})
	eventually(t, 30*time.Second, "every service in Consul's catalog", func() bool { return consul.catalogSize() == services+1 })
	clock := newTestClock()
	cfg := remoteConfig("consul", consul.http)
	cfg.RegistryConnections = conns
	cfg.RegistryStale = stale
	cfg.RegistryWatchIdle = idle
	cfg.now = clock.now
	s, ts := newTestServer(t, cfg)
	c := s.registry.reg.(*cachedRegistry)
	watched := func(name string) bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.watching[name] != nil
	}

	// One lookup a millisecond: budget-0 is the least recently used.
	for i := range services {
		clock.advance(time.Millisecond)
		if got := lookup(t, ts.URL, name(i)); fmt.Sprint(got) != "["+name(i)+"-1]" {
			t.Fatalf("first GET /registry?service=%s = %v, want [%s-1]", name(i), got, name(i))
		}
	}
	m := getMetrics(t, ts.URL)
	if m["sidecar_registry_services_held"] != services || m["sidecar_registry_services_watched"] != budget {
		t.Fatalf("held %v, watched %v after looking up %d services; want %d held, %d watched",
			m["sidecar_registry_services_held"], m["sidecar_registry_services_watched"], services, services, budget)
	}
	if !watched(name(0)) || watched(name(services-1)) {
		t.Fatalf("%s watched %v, %s watched %v; want the first looked up watched, the last not", name(0), watched(name(0)), name(services-1), watched(name(services-1)))
	}
	if peak := m["sidecar_registry_connections_peak"]; peak > conns {
		t.Fatalf("sidecar_registry_connections_peak = %v, want at most %d", peak, conns)
	}

	// The first five took the watches; budget-9, looked up once, has none.
	last := name(services - 1)
	reg := map[string]any{"ID": last + "-2", "Name": last, "Address": "127.0.0.1", "Port": 2000}
	if code := consul.api("PUT", "/v1/agent/service/register", reg, nil); code != http.StatusOK {
		t.Fatalf("consul register %s-2 = %d", last, code)
	}
	// Past stale (and short of idle), the next lookup of budget-9 fetches
	// it again, and, wanted twice now, it takes the watch of the least
	// recently used, budget-0; the watch brings the new node if the fetch
	// came too early for it.
	clock.advance(stale + 10*time.Millisecond)
	eventually(t, 10*time.Second, "the new node of an unwatched service on lookup", func() bool {
		return hasNodes(t, ts.URL, last, last+"-1", last+"-2")
	})
	if m := getMetrics(t, ts.URL); m["sidecar_registry_services_watched"] != budget || !watched(last) || watched(name(0)) {
		t.Fatalf("watched %v, %s watched %v, %s watched %v after looking %s up again; want %d, true, false",
			m["sidecar_registry_services_watched"], last, watched(last), name(0), watched(name(0)), last, budget)
	}

	clock.advance(idle)
	eventually(t, 10*time.Second, "idle services forgotten", func() bool {
		m := getMetrics(t, ts.URL)
		return m["sidecar_registry_services_watched"] == 0 && m["sidecar_registry_services_held"] == 0
	})
	if got := lookup(t, ts.URL, name(3)); fmt.Sprint(got) != "["+name(3)+"-1]" {
		t.Fatalf("GET /registry?service=%s after it was forgotten = %v, want [%s-1]", name(3), got, name(3))
	}
}

// TestConsulWatchEvents: the watch stream over Consul says "create" and
// "delete" for services that enter and leave the catalog, and carries the
// node-level changes of the services in use.
func TestConsulWatchEvents(t *testing.T) {
	consul := startConsul(t)
	_, ts := newTestServer(t, remoteConfig("consul", consul.http))
	lookup(t, ts.URL, "consul") // the catalog has arrived
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+"/registry", nil)
	if err != nil {
		t.Fatalf("dial watch: %v", err)
	}
	defer ws.CloseNow()
	// next returns the next event of service ev as "action[node ids]".
	next := func() string {
		t.Helper()
		for {
			_, data, err := ws.Read(ctx)
			if err != nil {
				t.Fatalf("watch: %v", err)
			}
			var e Event
			json.Unmarshal(data, &e)
			if e.Service != nil && e.Service.Name == "ev" {
				ids := []string{}
				for _, n := range e.Service.Nodes {
					ids = append(ids, n.ID)
				}
				return e.Action + fmt.Sprint(ids)
			}
		}
	}
	register := func(id string) {
		t.Helper()
		reg := map[string]any{"ID": id, "Name": "ev", "Address": "127.0.0.1", "Port": 3000}
		if code := consul.api("PUT", "/v1/agent/service/register", reg, nil); code != http.StatusOK {
			t.Fatalf("consul register %s = %d", id, code)
		}
	}
	deregister := func(id string) {
		t.Helper()
		if code := consul.api("PUT", "/v1/agent/service/deregister/"+id, nil, nil); code != http.StatusOK {
			t.Fatalf("consul deregister %s = %d", id, code)
		}
	}

	register("ev-1")
	if got := next(); got != "create[]" {
		t.Fatalf("event after ev entered the catalog = %s, want create[] (not in use: no nodes)", got)
	}
	if got := lookup(t, ts.URL, "ev"); fmt.Sprint(got) != "[ev-1]" {
		t.Fatalf("GET /registry?service=ev = %v, want [ev-1]", got)
	}
	if got := next(); got != "update[ev-1]" {
		t.Fatalf("event after ev was looked up = %s, want update[ev-1]", got)
	}
	register("ev-2")
	if got := next(); got != "update[ev-2]" {
		t.Fatalf("event after ev-2 joined = %s, want update[ev-2]", got)
	}
	deregister("ev-2")
	if got := next(); got != "delete[ev-2]" {
		t.Fatalf("event after ev-2 left = %s, want delete[ev-2]", got)
	}
	deregister("ev-1")
	if got := next(); got != "delete[ev-1]" {
		t.Fatalf("event after ev-1, the last node, left = %s, want delete[ev-1]", got)
	}
	eventually(t, 5*time.Second, "ev gone", func() bool { return lookup(t, ts.URL, "ev") == nil })
}

// limitedConsul is a real HTTP server that answers like a Consul agent
// past its limits for the services it is told: the catalog lists "svc"
// and "other", and their health queries answer either one passing node,
// or 429 Too Many Requests. It counts the health queries of each service.
type limitedConsul struct {
	release chan struct{} // closed at cleanup: blocking queries return

	mu      sync.Mutex // guards health, limited
	health  map[string]int
	limited map[string]bool
}

func newLimitedConsul(t *testing.T) (*limitedConsul, *httptest.Server) {
	t.Helper()
	f := &limitedConsul{release: make(chan struct{}), health: map[string]int{}, limited: map[string]bool{}}
	ts := httptest.NewServer(f)
	t.Cleanup(func() {
		close(f.release)
		ts.Close()
	})
	return f, ts
}

func (f *limitedConsul) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	block := func() { // a blocking query with nothing new
		if r.URL.Query().Get("index") != "" {
			select {
			case <-r.Context().Done():
			case <-f.release:
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	switch name, ok := strings.CutPrefix(r.URL.Path, "/v1/health/service/"); {
	case r.URL.Path == "/v1/catalog/services":
		block()
		w.Header().Set("X-Consul-Index", "5")
		w.Write([]byte(`{"svc":[],"other":[]}`))
	case ok:
		f.mu.Lock()
		f.health[name]++
		limited := f.limited[name]
		f.mu.Unlock()
		if limited {
			http.Error(w, "Your IP is issuing too many concurrent connections, please rate limit your calls", http.StatusTooManyRequests)
			return
		}
		block()
		w.Header().Set("X-Consul-Index", "7")
		fmt.Fprintf(w, `[{"Node":{"Node":"n","Address":"127.0.0.1"},"Service":{"ID":"%s-1","Service":%q,"Port":80}}]`, name, name)
	default:
		http.Error(w, "not found", http.StatusNotFound)
	}
}

func (f *limitedConsul) limit(name string, on bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.limited[name] = on
}

func (f *limitedConsul) healthQueries(name string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.health[name]
}

// TestConsulTooManyRequests: 429 is a signal to back off, never "absent".
// A service held keeps being served while Consul answers 429 for it; a
// service looked up for the first time while Consul answers 429 for it
// gets a 503 after a few jittered retries, never a 404; the failures are
// counted by status and logged once per interval.
func TestConsulTooManyRequests(t *testing.T) {
	t.Parallel()
	fake, consul := newLimitedConsul(t)
	fake.limit("other", true)
	cfg := remoteConfig("consul", consul.URL)
	cfg.RegistryStale = 20 * time.Millisecond
	cfg.RegistryWait = 200 * time.Millisecond
	var logs syncBuffer
	s, err := newServer(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatalf("newServer: %v", err)
	}
	s.start(context.Background())
	ts := httptest.NewServer(s.handler)
	t.Cleanup(func() { ts.Close(); s.Close() })

	if got := lookup(t, ts.URL, "svc"); fmt.Sprint(got) != "[svc-1]" {
		t.Fatalf("GET svc = %v, want [svc-1]", got)
	}
	before := fake.healthQueries("svc")
	fake.limit("svc", true)
	eventually(t, 5*time.Second, "the watch of svc answered 429", func() bool { return fake.healthQueries("svc") > before })
	for i := range 10 {
		if got := lookup(t, ts.URL, "svc"); fmt.Sprint(got) != "[svc-1]" {
			t.Fatalf("GET svc #%d while Consul answers 429 = %v, want the cached [svc-1]", i, got)
		}
		time.Sleep(cfg.RegistryStale) // past the staleness bound: each lookup may try Consul again
	}
	others := fake.healthQueries("other")
	code, body := do(t, "GET", ts.URL+"/registry?service=other", "")
	wantError(t, "GET other, never looked up, while Consul answers 429", code, body, http.StatusServiceUnavailable)
	if n := fake.healthQueries("other") - others; n != remoteFetchTries {
		t.Errorf("health queries of other = %d, want %d (retried)", n, remoteFetchTries)
	}
	if n := getMetrics(t, ts.URL)[`sidecar_registry_errors_total{status="429"}`]; n < float64(remoteFetchTries+1) {
		t.Errorf("sidecar_registry_errors_total{status=\"429\"} = %v, want at least %d", n, remoteFetchTries+1)
	}
	if n := strings.Count(logs.String(), "consul call failed"); n != 1 {
		t.Errorf("%d log lines about failed consul calls within %s, want 1:\n%s", n, remoteLogInterval, logs.String())
	}

	fake.limit("other", false)
	eventually(t, 5*time.Second, "other found once Consul answers", func() bool {
		code, _ := do(t, "GET", ts.URL+"/registry?service=other", "")
		return code == http.StatusOK
	})
}
