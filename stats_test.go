package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
)

// statsConfig is testConfig with the stats page on and a fast sampler.
func statsConfig() *Config {
	cfg := testConfig()
	cfg.EnableStats = true
	cfg.StatsInterval = 20 * time.Millisecond
	return cfg
}

// getStats fetches the /stats JSON.
func getStats(t *testing.T, base string) statsJSON {
	t.Helper()
	code, body := do(t, "GET", base+"/stats", "", "Accept", "application/json")
	if code != http.StatusOK {
		t.Fatalf("GET /stats (JSON) = %d %s, want 200", code, body)
	}
	var st statsJSON
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("GET /stats: decode %q: %v", body, err)
	}
	return st
}

// parseMetrics checks body against the Prometheus text exposition format
// 0.0.4 as strictly as promtool would (which is not installed here) and
// returns the samples keyed by `name{labels}` as written. It checks: HELP
// and TYPE at most once a family, before its samples, with a known type and
// valid escapes; every sample's family declared, its samples in one block;
// metric and label names valid, label values quoted with only \\, \" and
// \n escapes, no label twice; values that parse (an optional integer
// timestamp); no series twice; counters not negative; and per histogram
// series: buckets in increasing le order, cumulative, ending at +Inf equal
// to _count, with a _sum.
func parseMetrics(t *testing.T, body []byte) map[string]float64 {
	t.Helper()
	out, problems := parseExposition(body)
	for _, p := range problems {
		t.Error(p)
	}
	if len(problems) > 0 {
		t.FailNow()
	}
	return out
}

// parseExposition is parseMetrics, returning what is wrong.
func parseExposition(body []byte) (map[string]float64, []string) {
	var problems []string
	bad := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	text := string(body)
	if text != "" && !strings.HasSuffix(text, "\n") {
		bad("exposition does not end with a newline")
	}
	out := map[string]float64{}
	typed := map[string]string{}
	helped := map[string]bool{}
	done := map[string]bool{} // families whose block of samples has ended
	current := ""             // the family of the block being read
	type histSeries struct {
		les     []float64
		counts  []float64
		count   float64
		hasSum  bool
		hasCnt  bool
		context string
	}
	hists := map[string]*histSeries{} // by family and labels without le
	for i, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		at := fmt.Sprintf("line %d %q", i+1, line)
		if line == "" {
			bad("%s: empty line", at)
			continue
		}
		if f, ok := strings.CutPrefix(line, "# HELP "); ok {
			name, help, _ := strings.Cut(f, " ")
			if !validMetricName(name) {
				bad("%s: HELP of an invalid metric name", at)
			}
			if helped[name] {
				bad("%s: second HELP for %s", at, name)
			}
			if done[name] || current == name {
				bad("%s: HELP of %s after its samples", at, name)
			}
			for j := 0; j < len(help); j++ {
				if help[j] == '\\' && (j+1 == len(help) || (help[j+1] != '\\' && help[j+1] != 'n')) {
					bad("%s: HELP escape other than \\\\ or \\n", at)
				}
				if help[j] == '\\' {
					j++
				}
			}
			helped[name] = true
			continue
		}
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, kind, _ := strings.Cut(f, " ")
			if !helped[name] {
				bad("%s: TYPE of %s before its HELP", at, name)
			}
			if _, dup := typed[name]; dup {
				bad("%s: family %s declared twice", at, name)
			}
			switch kind {
			case "counter", "gauge", "histogram", "summary", "untyped":
			default:
				bad("%s: unknown type %q", at, kind)
			}
			typed[name] = kind
			continue
		}
		if strings.HasPrefix(line, "#") {
			continue // a comment
		}
		name, labels, rest, err := splitSample(line)
		if err != nil {
			bad("%s: %v", at, err)
			continue
		}
		family := name
		if typed[family] == "" {
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if base, ok := strings.CutSuffix(name, suffix); ok && typed[base] == "histogram" {
					family = base
				}
			}
		}
		if typed[family] == "" {
			bad("%s: sample %s without a TYPE line", at, name)
		}
		if family != current {
			if done[family] {
				bad("%s: samples of %s are not in one block", at, family)
			}
			if current != "" {
				done[current] = true
			}
			current = family
		}
		fields := strings.Fields(rest)
		if len(fields) < 1 || len(fields) > 2 || rest != strings.Join(fields, " ") {
			bad("%s: want a value and at most a timestamp after the labels", at)
			continue
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			bad("%s: value %q: %v", at, fields[0], err)
		}
		if len(fields) == 2 {
			if _, err := strconv.ParseInt(fields[1], 10, 64); err != nil {
				bad("%s: timestamp %q: %v", at, fields[1], err)
			}
		}
		if typed[family] == "counter" && v < 0 {
			bad("%s: counter below zero", at)
		}
		raw := line[len(name) : len(line)-len(rest)-1]
		key := name + raw
		if _, dup := out[key]; dup {
			bad("%s: series %s written twice", at, key)
		}
		out[key] = v
		if typed[family] != "histogram" {
			continue
		}
		var le string
		var others []string
		for _, l := range labels {
			if l[0] == "le" {
				le = l[1]
				continue
			}
			others = append(others, l[0]+"="+strconv.Quote(l[1]))
		}
		hk := family + "{" + strings.Join(others, ",") + "}"
		h := hists[hk]
		if h == nil {
			h = &histSeries{context: at}
			hists[hk] = h
		}
		switch {
		case strings.HasSuffix(name, "_bucket"):
			bound, err := strconv.ParseFloat(le, 64)
			if le == "" || err != nil {
				bad("%s: bucket without a valid le", at)
				continue
			}
			if n := len(h.les); n > 0 && (bound <= h.les[n-1] || v < h.counts[n-1]) {
				bad("%s: bucket le=%s after le=%v with %v: not increasing or not cumulative", at, le, h.les[n-1], h.counts[n-1])
			}
			h.les, h.counts = append(h.les, bound), append(h.counts, v)
		case strings.HasSuffix(name, "_sum"):
			h.hasSum = true
		case strings.HasSuffix(name, "_count"):
			h.hasCnt, h.count = true, v
		}
	}
	for hk, h := range hists {
		n := len(h.les)
		switch {
		case n == 0 || !math.IsInf(h.les[n-1], 1):
			bad("histogram %s (from %s): no le=\"+Inf\" bucket", hk, h.context)
		case !h.hasSum || !h.hasCnt:
			bad("histogram %s: _sum or _count missing", hk)
		case h.counts[n-1] != h.count:
			bad("histogram %s: +Inf bucket %v != _count %v", hk, h.counts[n-1], h.count)
		}
	}
	return out, problems
}

// splitSample splits a sample line into its metric name, its labels (name,
// unescaped value) and what follows the labels, checking the label syntax.
func splitSample(line string) (name string, labels [][2]string, rest string, err error) {
	i := strings.IndexAny(line, "{ ")
	if i <= 0 {
		return "", nil, "", errors.New("not a sample line")
	}
	name = line[:i]
	if !validMetricName(name) {
		return "", nil, "", fmt.Errorf("invalid metric name %q", name)
	}
	if line[i] == ' ' {
		return name, nil, line[i+1:], nil
	}
	p := line[i+1:]
	seen := map[string]bool{}
	for {
		if strings.HasPrefix(p, "}") {
			p = p[1:]
			break
		}
		eq := strings.IndexByte(p, '=')
		if eq <= 0 || eq+1 >= len(p) || p[eq+1] != '"' {
			return "", nil, "", fmt.Errorf("label at %q: want name=\"value\"", p)
		}
		ln := p[:eq]
		if !validLabelName(ln) || seen[ln] {
			return "", nil, "", fmt.Errorf("label name %q invalid or repeated", ln)
		}
		seen[ln] = true
		p = p[eq+2:]
		var val strings.Builder
		closed := false
		for j := 0; j < len(p); j++ {
			c := p[j]
			if c == '"' {
				p, closed = p[j+1:], true
				break
			}
			if c == '\n' {
				return "", nil, "", errors.New("raw newline in a label value")
			}
			if c == '\\' {
				if j+1 == len(p) {
					return "", nil, "", errors.New("label value ends in a backslash")
				}
				switch p[j+1] {
				case '\\':
					val.WriteByte('\\')
				case '"':
					val.WriteByte('"')
				case 'n':
					val.WriteByte('\n')
				default:
					return "", nil, "", fmt.Errorf("label value escape \\%c", p[j+1])
				}
				j++
				continue
			}
			val.WriteByte(c)
		}
		if !closed {
			return "", nil, "", errors.New("unterminated label value")
		}
		if !utf8.ValidString(val.String()) {
			return "", nil, "", errors.New("label value is not UTF-8")
		}
		labels = append(labels, [2]string{ln, val.String()})
		switch {
		case strings.HasPrefix(p, ","):
			p = p[1:]
		case strings.HasPrefix(p, "}"):
		default:
			return "", nil, "", fmt.Errorf("after a label value: %q", p)
		}
	}
	if !strings.HasPrefix(p, " ") {
		return "", nil, "", errors.New("no space before the value")
	}
	return name, labels, p[1:], nil
}

func getMetrics(t *testing.T, base string) map[string]float64 {
	t.Helper()
	req, _ := http.NewRequest("GET", base+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("GET /metrics = %d %q, want 200 text/plain; version=0.0.4", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	return parseMetrics(t, body)
}

func TestStatsStatusClasses(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, statsConfig())
	for range 10 {
		if code, body := do(t, "GET", ts.URL+"/health", ""); code != http.StatusOK {
			t.Fatalf("GET /health = %d %s, want 200", code, body)
		}
	}
	for range 3 {
		code, body := do(t, "POST", ts.URL+"/registry", "{")
		wantError(t, "POST /registry {", code, body, http.StatusBadRequest)
	}
	for range 2 {
		code, body := do(t, "PUT", ts.URL+"/health", "")
		wantError(t, "PUT /health", code, body, http.StatusMethodNotAllowed)
	}

	m := getMetrics(t, ts.URL)
	for _, tt := range []struct {
		series string
		want   float64
	}{
		{`sidecar_http_requests_total{route="GET /health",class="2xx"}`, 10},
		{`sidecar_http_requests_total{route="GET /health",class="4xx"}`, 0},
		{`sidecar_http_requests_total{route="GET /health",class="5xx"}`, 0},
		{`sidecar_http_requests_total{route="POST /registry",class="4xx"}`, 3},
		{`sidecar_http_requests_total{route="POST /registry",class="2xx"}`, 0},
		{`sidecar_http_requests_total{route="/health",class="4xx"}`, 2},
		{`sidecar_http_request_duration_seconds_count{route="GET /health"}`, 10},
		{`sidecar_http_request_duration_seconds_bucket{route="GET /health",le="+Inf"}`, 10},
		{`sidecar_registry_services`, 0},
	} {
		if got, ok := m[tt.series]; !ok || got != tt.want {
			t.Errorf("/metrics %s = %v (present %v), want %v", tt.series, got, ok, tt.want)
		}
	}
	if m[`go_goroutines`] < 1 || m[`go_memstats_heap_alloc_bytes`] <= 0 || m[`sidecar_uptime_seconds`] <= 0 {
		t.Errorf("/metrics process metrics missing: goroutines %v heap %v uptime %v",
			m[`go_goroutines`], m[`go_memstats_heap_alloc_bytes`], m[`sidecar_uptime_seconds`])
	}

	// The JSON: the totals at once, the per-interval ring once sampled.
	st := getStats(t, ts.URL)
	if got := st.StatusCodes["4xx"]; got != 5 {
		t.Errorf("/stats status_codes[4xx] = %d, want 5", got)
	}
	if got := st.StatusCodes["2xx"]; got != 11 { // and the GET /metrics
		t.Errorf("/stats status_codes[2xx] = %d, want 11 (10 /health + 1 /metrics)", got)
	}
	if st.Started == 0 || st.Memory == "" || st.Threads < 1 || st.GCPause == "" {
		t.Errorf("/stats original fields: started %d memory %q threads %d gc_pause %q", st.Started, st.Memory, st.Threads, st.GCPause)
	}
	routes := map[string]routeJSON{}
	for _, r := range st.Routes {
		routes[r.Route] = r
	}
	if r := routes["GET /health"]; r.StatusCodes["2xx"] != 10 || r.TotalReqs != 10 || r.LatencyMs.Avg == nil {
		t.Errorf("/stats route GET /health = %+v, want 10 2xx with latency", r)
	}
	eventually(t, 2*time.Second, "the ring counts the 5 failures and 10 successes", func() bool {
		var ok, failed int64
		for _, c := range getStats(t, ts.URL).Counters {
			ok += c.StatusCodes["2xx"]
			failed += c.StatusCodes["4xx"] + c.StatusCodes["5xx"]
			if c.Timestamp == 0 || c.TotalReqs != c.StatusCodes["1xx"]+c.StatusCodes["2xx"]+c.StatusCodes["3xx"]+c.StatusCodes["4xx"]+c.StatusCodes["5xx"] {
				t.Fatalf("counter %+v: total_reqs is not the sum of status_codes", c)
			}
		}
		return failed == 5 && ok >= 10
	})
}

func TestStatsDisabled(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	code, body := do(t, "GET", ts.URL+"/stats", "")
	wantError(t, "GET /stats without --enable_stats", code, body, http.StatusNotFound)
	code, body = do(t, "GET", ts.URL+"/stats", "", "Accept", "application/json")
	wantError(t, "GET /stats (JSON) without --enable_stats", code, body, http.StatusNotFound)
	m := getMetrics(t, ts.URL) // always on
	if got := m[`sidecar_http_requests_total{route="GET /stats",class="4xx"}`]; got != 2 {
		t.Errorf("/metrics GET /stats 4xx = %v, want 2", got)
	}
}

func TestStatsPage(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, statsConfig())
	resp, err := http.Get(ts.URL + "/stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/html; charset=utf-8" {
		t.Fatalf("GET /stats = %d %q, want 200 text/html", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if resp.Header.Get("Content-Security-Policy") == "" {
		t.Errorf("GET /stats: no Content-Security-Policy")
	}
	for _, want := range []string{`id="chart-rate"`, `id="chart-latency"`, `id="total-reqs"`, "<script>"} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("GET /stats page lacks %s", want)
		}
	}
	// Self-contained: nothing loaded from elsewhere.
	if loc := regexp.MustCompile(`(?i)(src|href)\s*=\s*["']?(https?:)?//`).Find(body); loc != nil {
		t.Errorf("GET /stats page loads %q from another origin", loc)
	}
	// ?format=json is the JSON too.
	code, b := do(t, "GET", ts.URL+"/stats?format=json", "")
	if code != http.StatusOK || !json.Valid(b) {
		t.Errorf("GET /stats?format=json = %d %.80s, want 200 JSON", code, b)
	}
}

// TestStatsWebsocket upgrades through the counting wrapper: the registry
// watch still streams, and the session counts as one 1xx.
func TestStatsWebsocket(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, statsConfig())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+"/registry", nil)
	if err != nil {
		t.Fatalf("websocket GET /registry: %v", err)
	}
	defer conn.CloseNow()
	if m := getMetrics(t, ts.URL); m[`sidecar_http_requests_in_flight`] < 1 {
		t.Errorf("in flight during a websocket session = %v, want >= 1", m[`sidecar_http_requests_in_flight`])
	}
	svc := `{"name":"foo","nodes":[{"id":"foo-1","address":"127.0.0.1","port":9090}]}`
	if code, body := do(t, "POST", ts.URL+"/registry", svc); code != http.StatusOK {
		t.Fatalf("POST /registry = %d %s", code, body)
	}
	_, msg, err := conn.Read(ctx)
	if err != nil {
		t.Fatalf("read watch event: %v", err)
	}
	var ev struct {
		Action string `json:"action"`
	}
	if err := json.Unmarshal(msg, &ev); err != nil || ev.Action != "create" {
		t.Fatalf("watch event %s, want action create", msg)
	}
	conn.Close(websocket.StatusNormalClosure, "")

	eventually(t, 2*time.Second, "the websocket session counted as 1xx", func() bool {
		m := getMetrics(t, ts.URL)
		return m[`sidecar_http_requests_total{route="GET /registry",class="1xx"}`] == 1 &&
			m[`sidecar_http_request_duration_seconds_count{route="GET /registry"}`] == 0 &&
			m[`sidecar_registry_services`] == 1 && m[`sidecar_registry_nodes`] == 1
	})
}

// TestStatsWrapStreams checks that Flush reaches the client before the
// handler returns, through ResponseController and the Flusher interface,
// and that statuses and panics land in the right class.
func TestStatsWrapStreams(t *testing.T) {
	t.Parallel()
	st := newStats(statsConfig(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("GET /sse", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: one\n\n")
		if err := http.NewResponseController(w).Flush(); err != nil {
			t.Errorf("ResponseController.Flush: %v", err)
		}
		<-release
		io.WriteString(w, "data: two\n\n")
		w.(http.Flusher).Flush()
	})
	mux.HandleFunc("GET /hijack", func(w http.ResponseWriter, r *http.Request) {
		conn, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("ResponseController.Hijack: %v", err)
			return
		}
		defer conn.Close()
		rw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
		rw.Flush()
	})
	mux.HandleFunc("GET /unavailable", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusServiceUnavailable, "down")
	})
	mux.HandleFunc("GET /panic", func(w http.ResponseWriter, r *http.Request) {
		panic(http.ErrAbortHandler)
	})
	srv := httptest.NewServer(st.wrap(mux))
	t.Cleanup(srv.Close)

	resp, err := http.Get(srv.URL + "/sse")
	if err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || line != "data: one\n" {
		t.Fatalf("first event = %q, %v; want it flushed before the handler returns", line, err)
	}
	close(release)
	rest, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(rest), "data: two") {
		t.Errorf("rest of stream = %q, want data: two", rest)
	}

	if code, body := do(t, "GET", srv.URL+"/hijack", ""); code != http.StatusOK || string(body) != "hi" {
		t.Errorf("GET /hijack = %d %q, want 200 hi", code, body)
	}
	code, body := do(t, "GET", srv.URL+"/unavailable", "")
	wantError(t, "GET /unavailable", code, body, http.StatusServiceUnavailable)
	// A fresh connection: the transport retries a GET that broke a reused one.
	fresh := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	if _, err := fresh.Get(srv.URL + "/panic"); err == nil {
		t.Errorf("GET /panic: want a broken response")
	}

	for _, tt := range []struct {
		route string
		class int
	}{
		{"GET /sse", 1}, {"GET /hijack", 0}, {"GET /unavailable", 4}, {"GET /panic", 4},
	} {
		eventually(t, 2*time.Second, "counting "+tt.route, func() bool {
			return st.route(tt.route).classes[tt.class].Load() == 1
		})
	}
	if n := st.inFlight.Load(); n != 0 {
		t.Errorf("in flight after all requests = %d, want 0", n)
	}
}

func TestStatsCardinality(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, statsConfig())
	methods := []string{"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PURGE", "X-RANDOM"}
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_.~"
	randPath := func(r *rand.Rand) string {
		var b strings.Builder
		for range 1 + r.IntN(5) {
			b.WriteByte('/')
			for range 1 + r.IntN(12) {
				b.WriteByte(alphabet[r.IntN(len(alphabet))])
			}
		}
		if r.IntN(8) == 0 {
			b.WriteString("%41%2F")
		}
		if r.IntN(8) == 0 {
			return "/registry" + b.String()
		}
		return b.String()
	}
	const total, workers = 10000, 4
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: workers}, Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			for range total / workers {
				req, err := http.NewRequest(methods[r.IntN(len(methods))], ts.URL+randPath(r), nil)
				if err != nil {
					errs <- err
					return
				}
				resp, err := client.Do(req)
				if err != nil {
					errs <- err
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("request: %v", err)
	}

	m := getMetrics(t, ts.URL)
	routes := map[string]bool{}
	var served float64
	for key, v := range m {
		if rest, ok := strings.CutPrefix(key, `sidecar_http_requests_total{route="`); ok {
			route, _, _ := strings.Cut(rest, `"`)
			routes[route] = true
			served += v
		}
	}
	if served < total {
		t.Errorf("requests counted = %v, want >= %d", served, total)
	}
	// Labels are the route table's templates: a handful, none of them a
	// random path (which would carry digits, '~' or '%').
	if len(routes) > 32 {
		t.Errorf("%d route labels after %d random paths, want at most 32", len(routes), total)
	}
	for r := range routes {
		if strings.ContainsAny(r, "0123456789~%") {
			t.Errorf("route label %q is a raw path, not a template", r)
		}
	}
	if len(m) > 400 {
		t.Errorf("/metrics has %d series after %d random paths, want a bounded few hundred", len(m), total)
	}
	t.Logf("%d series, %d route labels after %d random requests", len(m), len(routes), total)
}

func TestStatsRouteOverflow(t *testing.T) {
	t.Parallel()
	st := newStats(testConfig(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	for i := range 1000 {
		st.route(fmt.Sprintf("GET /p%d", i))
	}
	if n := len(*st.routes.Load()); n != maxRoutes+1 {
		t.Errorf("routes after 1000 templates = %d, want %d (maxRoutes + %q)", n, maxRoutes+1, overflowRoute)
	}
	if rs := st.route("GET /p999"); rs.route != overflowRoute {
		t.Errorf("route past the limit = %q, want %q", rs.route, overflowRoute)
	}
}

func TestStatsAccessLog(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name string
		on   bool
	}{{"off", false}, {"on", true}} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := testConfig()
			cfg.AccessLog = tt.on
			var logs syncBuffer
			s, err := newServer(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			ts := httptest.NewServer(s.handler)
			t.Cleanup(func() { ts.Close(); s.Close() })
			do(t, "GET", ts.URL+"/health?probe=1", "")
			do(t, "POST", ts.URL+"/registry", "{")
			got := logs.String()
			if !tt.on {
				if strings.Contains(got, "msg=request") {
					t.Errorf("access log off, but logged:\n%s", got)
				}
				return
			}
			for _, want := range []string{
				`method=GET route="GET /health" path=/health status=200 duration=`,
				`method=POST route="POST /registry" path=/registry status=400 duration=`,
			} {
				if !strings.Contains(got, want) {
					t.Errorf("access log lacks %q:\n%s", want, got)
				}
			}
			if !regexp.MustCompile(`status=200 duration=\S+ bytes=[1-9]\d* remote=127\.0\.0\.1:\d+`).MatchString(got) {
				t.Errorf("access log line lacks bytes or remote:\n%s", got)
			}
		})
	}
}

func TestStatsSources(t *testing.T) {
	t.Parallel()
	s, ts := newTestServer(t, statsConfig())
	s.stats.addSource(func(emit emitFunc) {
		emit("test_deliveries_total", "Messages \\ delivered\nby topic.", "counter", 3, "topic", `a"b\c`+"\n")
		emit("test_deliveries_total", "", "counter", 4, "topic", "plain")
		emit("bad name", "", "gauge", 1)               // invalid name
		emit("test_odd", "", "gauge", 1, "only-a-key") // odd labels
		emit("test_badlabel", "", "gauge", 1, "bad-label", "x")
		emit("test_kind", "", "summary", 1)                                     // unknown kind
		emit("sidecar_http_requests_in_flight", "clash", "gauge", 99, "x", "y") // our family
	})
	resp, err := http.Get(ts.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := parseMetrics(t, body)
	for _, want := range []string{
		"# HELP test_deliveries_total Messages \\\\ delivered\\nby topic.\n# TYPE test_deliveries_total counter\n",
		`test_deliveries_total{topic="a\"b\\c\n"} 3` + "\n",
		`test_deliveries_total{topic="plain"} 4` + "\n",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	for key := range m {
		if strings.HasPrefix(key, "test_odd") || strings.HasPrefix(key, "test_badlabel") || strings.HasPrefix(key, "test_kind") || strings.Contains(key, `x="y"`) {
			t.Errorf("/metrics has invalid sample %s", key)
		}
	}
	st := getStats(t, ts.URL)
	found := false
	for _, mt := range st.Metrics {
		if mt.Name == "test_deliveries_total" && mt.Labels["topic"] == "plain" && mt.Value == 4 {
			found = true
		}
	}
	if !found {
		t.Errorf("/stats metrics = %+v, want test_deliveries_total{topic=plain} 4", st.Metrics)
	}
}

func TestQuantile(t *testing.T) {
	t.Parallel()
	bucket := func(bound time.Duration) int {
		for i, b := range latencyBounds {
			if int64(bound) == b {
				return i
			}
		}
		t.Fatalf("no bucket bound %s", bound)
		return 0
	}
	tests := []struct {
		name   string
		counts map[int]int64
		q      float64
		want   time.Duration
		ok     bool
	}{
		{"empty", nil, 0.5, 0, false},
		{"all in first bucket", map[int]int64{0: 10}, 0.5, 50 * time.Microsecond, true},
		{"interpolated", map[int]int64{bucket(time.Millisecond): 4}, 0.5, 750 * time.Microsecond, true},
		{"p95 in the upper bucket", map[int]int64{0: 90, bucket(10 * time.Millisecond): 10}, 0.95, 7500 * time.Microsecond, true},
		{"+Inf bucket", map[int]int64{len(latencyBounds): 1}, 0.99, 10 * time.Second, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var c [numBuckets]int64
			for i, n := range tt.counts {
				c[i] = n
			}
			got, ok := quantile(c, tt.q)
			if got != tt.want || ok != tt.ok {
				t.Errorf("quantile(%v, %v) = %s, %v; want %s, %v", tt.counts, tt.q, got, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestHistogramObserve(t *testing.T) {
	t.Parallel()
	var h histogram
	for _, d := range []time.Duration{0, 100 * time.Microsecond, 101 * time.Microsecond, time.Hour} {
		h.observe(d)
	}
	counts, n, sum := h.load()
	if n != 4 || counts[0] != 2 || counts[1] != 1 || counts[numBuckets-1] != 1 {
		t.Errorf("buckets %v (n %d), want 2 in the first (le 100µs), 1 in the second, 1 in +Inf", counts, n)
	}
	if want := int64(time.Hour + 201*time.Microsecond); sum != want {
		t.Errorf("sum = %d, want %d", sum, want)
	}
}

func TestStatsCloseIdempotent(t *testing.T) {
	t.Parallel()
	st := newStats(statsConfig(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	st.Close() // never started
	st.Close()
	st2 := newStats(statsConfig(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	st2.start(context.Background())
	st2.start(context.Background())
	st2.Close()
	st2.Close()
	if err := errors.Join(st.Close(), st2.Close()); err != nil {
		t.Fatal(err)
	}
}

// discardWriter is a ResponseWriter that keeps nothing, for benchmarks.
type discardWriter struct{ h http.Header }

func (w *discardWriter) Header() http.Header         { return w.h }
func (w *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *discardWriter) WriteHeader(int)             {}

// BenchmarkStatsWrap measures what counting adds to a request through the
// mux: compare the wrapped and bare sub-benchmarks.
func BenchmarkStatsWrap(b *testing.B) {
	mux := http.NewServeMux()
	body := []byte("ok\n")
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) { w.Write(body) })
	st := newStats(testConfig(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	for _, bb := range []struct {
		name string
		h    http.Handler
	}{{"bare", mux}, {"wrapped", st.wrap(mux)}} {
		b.Run(bb.name, func(b *testing.B) {
			req := httptest.NewRequest("GET", "/health", nil)
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			for b.Loop() {
				bb.h.ServeHTTP(w, req)
			}
		})
	}
}

// TestStatsRefusedByAuth: a request refused with 401 counts under the
// route it asked for, not as unmatched, and the refusal says whether the
// token was missing or refused (RFC 6750's invalid_token).
func TestStatsRefusedByAuth(t *testing.T) {
	t.Parallel()
	cfg := statsConfig()
	cfg.AuthToken = "s3cret"
	_, ts := newTestServer(t, cfg)
	send := func(method, path, auth string) (*http.Response, apiError) {
		t.Helper()
		req, _ := http.NewRequest(method, ts.URL+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, wantError(t, method+" "+path+" with "+auth, resp.StatusCode, body, http.StatusUnauthorized)
	}
	resp, missing := send("GET", "/registry", "")
	if h := resp.Header.Get("WWW-Authenticate"); h != `Bearer realm="sidecar"` {
		t.Errorf("no token: WWW-Authenticate %q, want a bare challenge", h)
	}
	resp, wrong := send("GET", "/registry", "Bearer nope")
	if h := resp.Header.Get("WWW-Authenticate"); !strings.Contains(h, `error="invalid_token"`) {
		t.Errorf("wrong token: WWW-Authenticate %q, want error=\"invalid_token\"", h)
	}
	if !strings.Contains(missing.Detail, "no bearer token") || !strings.Contains(wrong.Detail, "refused") || missing.Detail == wrong.Detail {
		t.Errorf("details: no token %q, wrong token %q; want them to say which", missing.Detail, wrong.Detail)
	}
	send("GET", "/stats?format=json", "Bearer nope")
	// A foreign Host (DNS rebinding) is refused before the token is looked at.
	req, _ := http.NewRequest("GET", ts.URL+"/registry", nil)
	req.Host = "rebound.example"
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusForbidden {
		t.Fatalf("GET /registry with Host rebound.example = %v %v, want 403", resp, err)
	} else {
		resp.Body.Close()
	}
	send("POST", "/foo/bar", "")
	send("PUT", "/registry", "")

	code, body := do(t, "GET", ts.URL+"/metrics", "", "Authorization", "Bearer s3cret")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics = %d %s", code, body)
	}
	m := parseMetrics(t, body)
	for _, tt := range []struct {
		series string
		want   float64
	}{
		{`sidecar_http_requests_total{route="GET /registry",class="4xx"}`, 3},
		{`sidecar_http_requests_total{route="GET /stats",class="4xx"}`, 1},
		{`sidecar_http_requests_total{route="/",class="4xx"}`, 1},
		{`sidecar_http_requests_total{route="/registry",class="4xx"}`, 1}, // the 405 row
		{`sidecar_auth_refused_total{reason="missing_token"}`, 3},
		{`sidecar_auth_refused_total{reason="wrong_token"}`, 2},
	} {
		if got, ok := m[tt.series]; !ok || got != tt.want {
			t.Errorf("/metrics %s = %v (present %v), want %v", tt.series, got, ok, tt.want)
		}
	}
	for key, v := range m {
		if strings.HasPrefix(key, `sidecar_http_requests_total{route="`+unmatchedRoute+`"`) && v != 0 {
			t.Errorf("/metrics %s = %v: refused requests counted as unmatched", key, v)
		}
	}
}

// TestParseExposition: the strict parser the metrics tests rely on refuses
// each way the text format can be broken, and takes what the sidecar writes.
func TestParseExposition(t *testing.T) {
	t.Parallel()
	const good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 2\n" +
		"# HELP h H.\n# TYPE h histogram\nh_bucket{s=\"a\",le=\"0.1\"} 1\nh_bucket{s=\"a\",le=\"+Inf\"} 3\nh_sum{s=\"a\"} 0.5\nh_count{s=\"a\"} 3\n"
	if _, problems := parseExposition([]byte(good)); len(problems) > 0 {
		t.Fatalf("a valid exposition: %v", problems)
	}
	for _, tt := range []struct{ name, text string }{
		{"no final newline", strings.TrimSuffix(good, "\n")},
		{"empty line", "# HELP a A.\n# TYPE a gauge\n\na 1\n"},
		{"no TYPE", "a 1\n"},
		{"TYPE before HELP", "# TYPE a gauge\n# HELP a A.\na 1\n"},
		{"declared twice", "# HELP a A.\n# TYPE a gauge\n# TYPE a gauge\na 1\n"},
		{"unknown type", "# HELP a A.\n# TYPE a meter\na 1\n"},
		{"bad HELP escape", "# HELP a A\\t.\n# TYPE a gauge\na 1\n"},
		{"bad metric name", "# HELP a A.\n# TYPE a gauge\n1a 1\n"},
		{"bad label name", "# HELP a A.\n# TYPE a gauge\na{1x=\"v\"} 1\n"},
		{"label twice", "# HELP a A.\n# TYPE a gauge\na{x=\"v\",x=\"w\"} 1\n"},
		{"unquoted label value", "# HELP a A.\n# TYPE a gauge\na{x=v} 1\n"},
		{"bad label escape", "# HELP a A.\n# TYPE a gauge\na{x=\"\\t\"} 1\n"},
		{"unterminated label value", "# HELP a A.\n# TYPE a gauge\na{x=\"v} 1\n"},
		{"bad value", "# HELP a A.\n# TYPE a gauge\na one\n"},
		{"series twice", "# HELP a A.\n# TYPE a gauge\na 1\na 2\n"},
		{"negative counter", "# HELP a A.\n# TYPE a counter\na -1\n"},
		{"family split", "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\na{x=\"1\"} 1\nb 1\na{x=\"2\"} 1\n"},
		{"no +Inf bucket", "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_sum 1\nh_count 1\n"},
		{"buckets not cumulative", "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n"},
		{"+Inf is not _count", "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n"},
		{"no _sum", "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, problems := parseExposition([]byte(tt.text)); len(problems) == 0 {
				t.Errorf("parseExposition(%q): no problem found", tt.text)
			}
		})
	}
}
