package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// slowRPCBackend is a JSON-RPC node that answers after delay, or, to a
// request with the header X-Test-Hang (the sidecar passes the caller's
// headers on), never: its caller's deadline ends the call whatever the
// machine's load.
func slowRPCBackend(t *testing.T, delay time.Duration) *httptest.Server {
	t.Helper()
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			ID json.RawMessage `json:"id"`
		}
		json.NewDecoder(r.Body).Decode(&req)
		wait := time.After(delay) // the node's latency, which the tests measure
		if r.Header.Get("X-Test-Hang") != "" {
			wait = nil
		}
		select {
		case <-wait:
		case <-r.Context().Done():
			return
		case <-release:
			return
		}
		if len(req.ID) == 0 {
			req.ID = []byte("null")
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":%s,"result":{"slow":true},"error":null}`, req.ID)
	}))
	t.Cleanup(func() { close(release); srv.Close() })
	return srv
}

// findService returns the /stats entry of handler's service.
func findService(t *testing.T, st statsJSON, handler, service string) upstreamJSON {
	t.Helper()
	for _, sv := range st.Services {
		if sv.Handler == handler && sv.Service == service {
			return sv
		}
	}
	t.Fatalf("/stats services %+v: no %s %s", st.Services, handler, service)
	return upstreamJSON{}
}

// wantSeries checks samples of m: each series with its value.
func wantSeries(t *testing.T, m map[string]float64, want map[string]float64) {
	t.Helper()
	for series, v := range want {
		if got, ok := m[series]; !ok || got != v {
			t.Errorf("/metrics %s = %v (present %v), want %v", series, got, ok, v)
		}
	}
}

// TestStatsServices calls two RPC services through the real server, one
// with a failing node (503: retried on the other, then ejected) and one
// slow (some callers give up first: 504), then two more past
// --stats_max_services: /metrics and /stats count each call once, with
// the right classes, success rates, histogram buckets, retries, timeouts
// and nodes, and the last two only as "other".
func TestStatsServices(t *testing.T) {
	t.Parallel()
	cfg := statsConfig()
	cfg.Balancer = strategyRoundRobin // the failing node is tried first until ejected
	cfg.StatsMaxServices = 2
	cfg.MetricsNodeLabels = true
	s, ts := newTestServer(t, cfg, func(s *server) { s.rpc.bal.ejectBase, s.rpc.bal.ejectMax = time.Hour, time.Hour })
	good, bad := newRPCBackend(t, "alpha-good"), newRPCBackend(t, "alpha-bad")
	bad.mode.Store(mode503)
	register(t, ts.URL, "go.micro.srv.alpha", good, bad)
	const slowness = 150 * time.Millisecond
	slow := slowRPCBackend(t, slowness)
	registerURLs(t, ts.URL, "go.micro.srv.beta", slow.URL)

	for i := range 10 {
		if code, body := do(t, "POST", ts.URL+"/alpha/call", `{}`); code != http.StatusOK {
			t.Fatalf("alpha call %d = %d %s, want 200 (retried on the good node)", i, code, body)
		}
	}
	for range 3 {
		if code, body := do(t, "POST", ts.URL+"/beta/call", `{}`); code != http.StatusOK {
			t.Fatalf("beta call = %d %s, want 200", code, body)
		}
	}
	for range 2 {
		code, body := do(t, "POST", ts.URL+"/beta/call", `{}`, "Timeout", "30ms", "X-Test-Hang", "1")
		wantError(t, "beta call with Timeout: 30ms", code, body, http.StatusGatewayTimeout)
	}
	for _, name := range []string{"gamma", "delta"} { // past the cap of 2
		b := newRPCBackend(t, name+"-1")
		register(t, ts.URL, "go.micro.srv."+name, b)
		if code, body := do(t, "POST", ts.URL+"/"+name+"/call", `{}`); code != http.StatusOK {
			t.Fatalf("%s call = %d %s", name, code, body)
		}
	}
	if bad.hits.Load() != 3 {
		t.Fatalf("the failing node got %d calls, want 3 (then ejected)", bad.hits.Load())
	}

	before := time.Now()
	m := getMetrics(t, ts.URL)
	const a, b = `service="go.micro.srv.alpha"`, `service="go.micro.srv.beta"`
	wantSeries(t, m, map[string]float64{
		`sidecar_rpc_calls_total{` + a + `,class="2xx"}`:                      10,
		`sidecar_rpc_calls_total{` + a + `,class="5xx"}`:                      0,
		`sidecar_rpc_retries_total{` + a + `}`:                                3,
		`sidecar_rpc_node_failures_total{` + a + `}`:                          3,
		`sidecar_rpc_ejections_total{` + a + `}`:                              1,
		`sidecar_rpc_timeouts_total{` + a + `}`:                               0,
		`sidecar_rpc_nodes{` + a + `}`:                                        2,
		`sidecar_rpc_nodes_ejected{` + a + `}`:                                1,
		`sidecar_rpc_call_duration_seconds_count{` + a + `}`:                  10,
		`sidecar_rpc_call_duration_seconds_bucket{` + a + `,le="+Inf"}`:       10,
		`sidecar_rpc_node_in_flight{` + a + `,node="alpha-good"}`:             0,
		`sidecar_rpc_node_ejected_until_seconds{` + a + `,node="alpha-good"}`: 0,
		`sidecar_rpc_calls_total{` + b + `,class="2xx"}`:                      3,
		`sidecar_rpc_calls_total{` + b + `,class="5xx"}`:                      2,
		`sidecar_rpc_timeouts_total{` + b + `}`:                               2,
		`sidecar_rpc_retries_total{` + b + `}`:                                0,
		`sidecar_rpc_node_failures_total{` + b + `}`:                          0, // the callers' own deadline
		`sidecar_rpc_call_duration_seconds_count{` + b + `}`:                  5,
		`sidecar_rpc_call_duration_seconds_bucket{` + b + `,le="0.025"}`:      0, // every call took 30 ms or more
		`sidecar_rpc_calls_total{service="other",class="2xx"}`:                2,
		`sidecar_rpc_call_duration_seconds_count{service="other"}`:            2,
		`sidecar_proxy_unknown_service_total`:                                 0,
		`sidecar_http_requests_total{route="POST /registry",class="2xx"}`:     4,
		`sidecar_http_request_duration_seconds_count{route="POST /registry"}`: 4,
		`sidecar_rpc_call_duration_seconds_bucket{service="other",le="+Inf"}`: 2,
		`sidecar_rpc_calls_total{service="other",class="5xx"}`:                0,
		`sidecar_rpc_ejections_total{service="other"}`:                        0,
		`sidecar_rpc_node_failures_total{service="other"}`:                    0,
		`sidecar_rpc_retries_total{service="other"}`:                          0,
		`sidecar_rpc_timeouts_total{service="other"}`:                         0,
	})
	// The three answered calls took the node's 150 ms: at most the two
	// timeouts are at or below 100 ms.
	if n := m[`sidecar_rpc_call_duration_seconds_bucket{`+b+`,le="0.1"}`]; n > 2 {
		t.Errorf("beta calls at or below 100 ms = %v, want at most the 2 timeouts", n)
	}
	if until := m[`sidecar_rpc_node_ejected_until_seconds{`+a+`,node="alpha-bad"}`]; until < float64(before.Add(50*time.Minute).Unix()) {
		t.Errorf("alpha-bad ejected until %v, want about an hour from now (%d)", until, before.Unix())
	}
	if l := m[`sidecar_rpc_node_latency_seconds{`+a+`,node="alpha-good"}`]; l <= 0 {
		t.Errorf("alpha-good latency estimate = %v, want measured", l)
	}
	for key := range m {
		if strings.Contains(key, "gamma") || strings.Contains(key, "delta") {
			t.Errorf("/metrics %s: a service past the cap has a series of its own", key)
		}
		if strings.Contains(key, `_nodes{service="other"}`) || strings.Contains(key, `service="other",node=`) {
			t.Errorf("/metrics %s: \"other\" has no nodes", key)
		}
	}

	st := getStats(t, ts.URL)
	alpha := findService(t, st, "rpc", "go.micro.srv.alpha")
	if alpha.TotalReqs != 10 || alpha.StatusCodes["2xx"] != 10 || alpha.SuccessRate == nil || *alpha.SuccessRate != 1 ||
		alpha.Retries != 3 || alpha.Timeouts != 0 || alpha.NodeFailures != 3 || alpha.Ejections != 1 {
		t.Errorf("/stats alpha = %+v, want 10 calls, all successful, 3 retries, 3 node failures, 1 ejection", alpha)
	}
	if alpha.NodesTotal != 2 || alpha.NodesEjected != 1 || len(alpha.Nodes) != 2 {
		t.Fatalf("/stats alpha nodes = %d (%d ejected) %+v, want 2 with 1 ejected", alpha.NodesTotal, alpha.NodesEjected, alpha.Nodes)
	}
	if n := alpha.Nodes[0]; n.ID != "alpha-bad" || !n.Ejected || n.EjectedUntilMs == nil || *n.EjectedUntilMs < before.Add(50*time.Minute).UnixMilli() ||
		n.Address != fmt.Sprintf("127.0.0.1:%d", bad.port) {
		t.Errorf("/stats alpha first node = %+v, want alpha-bad, ejected for about an hour", n)
	}
	if n := alpha.Nodes[1]; n.ID != "alpha-good" || n.Ejected || n.EjectedUntilMs != nil || n.LatencyMs == nil || *n.LatencyMs <= 0 || n.InFlight != 0 || n.Failures != 0 {
		t.Errorf("/stats alpha second node = %+v, want alpha-good, not ejected, measured, idle", n)
	}
	beta := findService(t, st, "rpc", "go.micro.srv.beta")
	if beta.TotalReqs != 5 || beta.StatusCodes["5xx"] != 2 || beta.SuccessRate == nil || *beta.SuccessRate != 0.6 || beta.Timeouts != 2 || beta.Retries != 0 {
		t.Errorf("/stats beta = %+v, want 5 calls, success rate 0.6, 2 timeouts", beta)
	}
	// p50 falls among the answered calls, which took 150 ms: the
	// estimate lies in a bucket above 100 ms.
	if beta.LatencyMs.P50 == nil || *beta.LatencyMs.P50 < 100 || beta.LatencyMs.P99 == nil || *beta.LatencyMs.P99 < *beta.LatencyMs.P50 {
		t.Errorf("/stats beta latency = %+v, want p50 >= 100 ms and p99 >= p50", beta.LatencyMs)
	}
	if beta.Recent.Seconds <= 0 {
		t.Errorf("/stats beta recent window = %+v, want a length", beta.Recent)
	}
	other := findService(t, st, "rpc", "other")
	if other.TotalReqs != 2 || other.NodesTotal != 0 || len(other.Nodes) != 0 {
		t.Errorf("/stats other = %+v, want the 2 calls of the services past the cap, no nodes", other)
	}
	if len(st.Services) != 3 {
		t.Errorf("/stats has %d services, want alpha, beta and other", len(st.Services))
	}
	// Nothing left in flight.
	for _, n := range s.rpc.bal.nodes("go.micro.srv.beta", time.Now()) {
		if n.inFlight != 0 {
			t.Errorf("beta node %s in flight %d after every call ended", n.id, n.inFlight)
		}
	}
}

// TestStatsServicesProxy is TestStatsServices through the reverse proxy:
// a service with a dead node (connection refused: retried, then ejected),
// one whose node answers 500 to half the requests, and a slow one.
func TestStatsServicesProxy(t *testing.T) {
	t.Parallel()
	cfg := statsConfig()
	cfg.Handler = "proxy"
	cfg.Balancer = strategyRoundRobin
	_, ts := newTestServer(t, cfg, func(s *server) { s.proxy.bal.ejectBase, s.proxy.bal.ejectMax = time.Hour, time.Hour })
	live, _, _ := recordingBackend(t, "live")
	registerURLs(t, ts.URL, "go.micro.srv.web", deadURL(t), live.URL)
	flaky := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/fail") {
			http.Error(w, "broken", http.StatusInternalServerError)
			return
		}
		w.Write([]byte("fine"))
	}))
	t.Cleanup(flaky.Close)
	registerURLs(t, ts.URL, "go.micro.srv.flaky", flaky.URL)
	slow := slowRPCBackend(t, 150*time.Millisecond)
	registerURLs(t, ts.URL, "go.micro.srv.slow", slow.URL)

	for i := range 6 {
		if code, body := do(t, "GET", ts.URL+"/web/x", ""); code != http.StatusOK {
			t.Fatalf("GET /web/x #%d = %d %s, want 200 from the live node", i, code, body)
		}
	}
	for _, path := range []string{"/flaky/ok", "/flaky/fail", "/flaky/ok", "/flaky/fail"} {
		do(t, "GET", ts.URL+path, "")
	}
	for range 2 {
		code, body := do(t, "GET", ts.URL+"/slow/x", "", "Timeout", "30ms", "X-Test-Hang", "1")
		wantError(t, "GET /slow/x with Timeout: 30ms", code, body, http.StatusGatewayTimeout)
	}

	m := getMetrics(t, ts.URL)
	wantSeries(t, m, map[string]float64{
		`sidecar_proxy_calls_total{service="go.micro.srv.web",class="2xx"}`:                  6,
		`sidecar_proxy_retries_total{service="go.micro.srv.web"}`:                            3,
		`sidecar_proxy_ejections_total{service="go.micro.srv.web"}`:                          1,
		`sidecar_proxy_nodes_ejected{service="go.micro.srv.web"}`:                            1,
		`sidecar_proxy_calls_total{service="go.micro.srv.flaky",class="2xx"}`:                2,
		`sidecar_proxy_calls_total{service="go.micro.srv.flaky",class="5xx"}`:                2,
		`sidecar_proxy_calls_total{service="go.micro.srv.slow",class="5xx"}`:                 2,
		`sidecar_proxy_timeouts_total{service="go.micro.srv.slow"}`:                          2,
		`sidecar_proxy_call_duration_seconds_count{service="go.micro.srv.web"}`:              6,
		`sidecar_proxy_call_duration_seconds_bucket{service="go.micro.srv.slow",le="0.025"}`: 0,
	})
	for key := range m {
		perNode := strings.HasPrefix(key, "sidecar_proxy_node_in_flight") || strings.HasPrefix(key, "sidecar_proxy_node_latency_seconds") || strings.HasPrefix(key, "sidecar_proxy_node_ejected_until_seconds")
		if perNode || strings.HasPrefix(key, "sidecar_rpc_calls_total") {
			t.Errorf("/metrics %s: per-node series without --metrics_node_labels, or RPC series without RPC calls", key)
		}
	}
	st := getStats(t, ts.URL)
	if fl := findService(t, st, "proxy", "go.micro.srv.flaky"); fl.SuccessRate == nil || *fl.SuccessRate != 0.5 {
		t.Errorf("/stats flaky = %+v, want success rate 0.5", fl)
	}
	web := findService(t, st, "proxy", "go.micro.srv.web")
	if web.Retries != 3 || web.NodesEjected != 1 || len(web.Nodes) != 2 || !web.Nodes[0].Ejected {
		t.Errorf("/stats web = %+v, want 3 retries and the dead node ejected, listed first", web)
	}
}

// TestUpstreamWindow: the recent window of /stats is the calls since the
// oldest of the sampler's last upstreamWindow samples.
func TestUpstreamWindow(t *testing.T) {
	t.Parallel()
	tbl := newUpstreams("rpc", 10)
	u := tbl.get("svc")
	t0 := u.created
	for range 5 {
		u.record(http.StatusOK, time.Millisecond)
	}
	check := func(now time.Time, total int64, rps float64, success *float64) {
		t.Helper()
		w := tbl.json(now, 0)[0].Recent
		if w.TotalReqs != total || w.RPS != rps || (success == nil) != (w.SuccessRate == nil) || success != nil && *success != *w.SuccessRate {
			t.Errorf("window at %s = %+v, want %d calls, %v/s, success %v", now.Sub(t0), w, total, rps, success)
		}
	}
	ratio := func(f float64) *float64 { return &f }
	check(t0.Add(time.Second), 5, 5, ratio(1)) // no sample yet: since the counters were made
	u.sample(t0.Add(time.Second))
	check(t0.Add(time.Second), 0, 0, nil)
	u.record(http.StatusOK, time.Millisecond)
	u.record(http.StatusBadGateway, time.Millisecond)
	u.record(http.StatusNotFound, time.Millisecond) // a 4xx is an answer, not a failure
	u.retries.Add(1)
	check(t0.Add(3*time.Second), 3, 1.5, ratio(0.6667))
	// upstreamWindow more samples push the first out.
	for i := range upstreamWindow {
		u.sample(t0.Add(time.Duration(2+i) * time.Second))
	}
	check(t0.Add(time.Duration(2+upstreamWindow)*time.Second), 0, 0, nil)
	if w := tbl.json(t0.Add(time.Second), 0)[0]; w.TotalReqs != 8 || w.Retries != 1 {
		t.Errorf("since start = %+v, want 8 calls, 1 retry", w)
	}
}

// TestUpstreamsCap: past max services, counters are shared as "other".
func TestUpstreamsCap(t *testing.T) {
	t.Parallel()
	tbl := newUpstreams("proxy", 3)
	for i := range 1000 {
		tbl.get(fmt.Sprintf("svc-%d", i)).record(http.StatusOK, time.Millisecond)
	}
	list := tbl.list()
	if len(list) != 4 || list[3].service != otherService {
		t.Fatalf("services after 1000 = %d, last %q; want 3 and %q", len(list), list[len(list)-1].service, otherService)
	}
	if n := list[3].classes[1].Load(); n != 997 {
		t.Errorf("other counted %d calls, want 997", n)
	}
	if tbl.get("svc-1") != list[1] || tbl.get("svc-999") != list[3] {
		t.Errorf("a service keeps its counters, a late one gets other's")
	}
}

// BenchmarkUpstreamRecord is what counting a call costs on the hot path:
// a status class, a histogram bucket, the sum; no lookup, no allocation.
func BenchmarkUpstreamRecord(b *testing.B) {
	u := newUpstreams("rpc", 10).get("svc")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			u.record(http.StatusOK, 3*time.Millisecond)
		}
	})
}
