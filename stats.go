package main

// stats.go owns observability: request counters by route template and
// status class with latency histograms, the access log, the /stats page and
// its JSON (--enable_stats), and /metrics in the Prometheus text format.
// Other components own their counters and offer them through metric
// sources (see addSource); the RPC handler's and the proxy's calls by
// upstream service (stats_upstream.go) and the broker's topics
// (broker_stats.go) have sections of their own.

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

//go:embed stats.html
var statsPage []byte

// emitFunc receives one metric sample for /metrics and /stats: its name,
// help text, kind ("counter" or "gauge"), value and label pairs
// ("service", "foo", ...). Components that own counters offer a method
// `metrics(emit emitFunc)` that calls it once per sample.
type emitFunc func(name, help, kind string, value float64, labels ...string)

const (
	// numClasses counts status classes 1xx..5xx; index = status/100 - 1.
	numClasses = 5
	// maxRoutes bounds the route labels. Labels are mux patterns, so the
	// route table bounds them already; this is a second fence.
	maxRoutes = 64
	// overflowRoute is the label of requests past maxRoutes.
	overflowRoute = "other"
	// unmatchedRoute labels requests no mux pattern served (the mux's own
	// redirects of unclean paths).
	unmatchedRoute = "unmatched"
	// ringSize is how many per-interval samples /stats keeps: 5 minutes
	// at the default one-second interval.
	ringSize = 300
)

// classNames are the status class labels, by class index.
var classNames = [numClasses]string{"1xx", "2xx", "3xx", "4xx", "5xx"}

// latencyBounds are the upper bounds of the latency histogram buckets, in
// nanoseconds; a last, implicit bucket is +Inf. Read-only.
var latencyBounds = [...]int64{
	int64(100 * time.Microsecond), int64(250 * time.Microsecond), int64(500 * time.Microsecond),
	int64(time.Millisecond), int64(2500 * time.Microsecond), int64(5 * time.Millisecond),
	int64(10 * time.Millisecond), int64(25 * time.Millisecond), int64(50 * time.Millisecond),
	int64(100 * time.Millisecond), int64(250 * time.Millisecond), int64(500 * time.Millisecond),
	int64(time.Second), int64(2500 * time.Millisecond), int64(5 * time.Second), int64(10 * time.Second),
}

const numBuckets = len(latencyBounds) + 1

// histogram counts latencies in the fixed buckets of latencyBounds. Safe
// for concurrent use; the zero value is empty.
type histogram struct {
	counts [numBuckets]atomic.Int64 // not cumulative; the last is +Inf
	sumNs  atomic.Int64
}

func (h *histogram) observe(d time.Duration) {
	ns := int64(d)
	i := 0
	for i < len(latencyBounds) && ns > latencyBounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sumNs.Add(ns)
}

// load copies the histogram: per-bucket counts, their total and the sum.
func (h *histogram) load() (counts [numBuckets]int64, count, sumNs int64) {
	for i := range h.counts {
		counts[i] = h.counts[i].Load()
		count += counts[i]
	}
	return counts, count, h.sumNs.Load()
}

// quantile estimates the q-quantile (0..1) of the non-cumulative bucket
// counts by linear interpolation inside the bucket that holds it, as
// Prometheus's histogram_quantile does. It returns false for no data.
func quantile(counts [numBuckets]int64, q float64) (time.Duration, bool) {
	var total int64
	for _, c := range counts {
		total += c
	}
	if total == 0 {
		return 0, false
	}
	rank := q * float64(total)
	var cum int64
	for i, c := range counts {
		if c == 0 || float64(cum+c) < rank {
			cum += c
			continue
		}
		if i == len(latencyBounds) {
			return time.Duration(latencyBounds[i-1]), true // +Inf: the highest bound
		}
		lower := int64(0)
		if i > 0 {
			lower = latencyBounds[i-1]
		}
		frac := (rank - float64(cum)) / float64(c)
		return time.Duration(float64(lower) + frac*float64(latencyBounds[i]-lower)), true
	}
	return time.Duration(latencyBounds[len(latencyBounds)-1]), true
}

// routeStats counts the requests of one route template.
type routeStats struct {
	route   string
	classes [numClasses]atomic.Int64
	bytes   atomic.Int64
	latency histogram // all but websocket upgrades, whose duration is the session's
}

// sample is one interval of the /stats ring: what happened since the
// previous sample, and the process state at its end.
type sample struct {
	at         time.Time
	classes    [numClasses]int64
	buckets    [numBuckets]int64
	latencyN   int64
	latencyNs  int64
	heapBytes  uint64
	goroutines int
}

// stats counts the requests the sidecar serves and renders them. Counters
// are atomic and safe for concurrent use; start runs the sampler that fills
// the /stats ring (only with --enable_stats), and Close waits for it.
type stats struct {
	cfg       *Config
	log       *slog.Logger
	started   time.Time
	interval  time.Duration
	accessLog bool
	writers   sync.Pool // of *statusWriter

	inFlight atomic.Int64
	classes  [numClasses]atomic.Int64 // all routes
	latency  histogram                // all routes

	// routes maps a route template to its counters. It is copied on
	// write, so the request path reads it without a lock.
	routes   atomic.Pointer[map[string]*routeStats]
	routesMu sync.Mutex // serializes writers of routes

	sourcesMu sync.Mutex // guards sources, upstreams, topics
	sources   []func(emit emitFunc)
	upstreams []*upstreams       // calls by upstream service, per handler
	topics    func() []topicJSON // the broker's busiest topics; nil: none
	nodeLabel bool               // --metrics_node_labels

	ringMu   sync.Mutex // guards ring, ringNext, ringLen
	ring     [ringSize]sample
	ringNext int
	ringLen  int

	stop      chan struct{}
	done      chan struct{}
	startOnce sync.Once
	closeOnce sync.Once
}

func newStats(cfg *Config, logger *slog.Logger) *stats {
	st := &stats{
		cfg:       cfg,
		log:       logger,
		started:   time.Now(),
		interval:  cfg.StatsInterval,
		accessLog: cfg.AccessLog,
		nodeLabel: cfg.MetricsNodeLabels,
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
	}
	if st.interval <= 0 {
		st.interval = time.Second
	}
	st.writers.New = func() any { return new(statusWriter) }
	st.routes.Store(&map[string]*routeStats{})
	return st
}

// addSource registers fn, called on every /metrics and /stats request to
// emit a component's samples. fn must be cheap, must not block, and must
// label by service names or other bounded values only.
func (st *stats) addSource(fn func(emit emitFunc)) {
	st.sourcesMu.Lock()
	st.sources = append(st.sources, fn)
	st.sourcesMu.Unlock()
}

// addUpstreams adds tables of calls by upstream service to /metrics, to
// /stats and to the sampler's recent window.
func (st *stats) addUpstreams(ts ...*upstreams) {
	st.sourcesMu.Lock()
	st.upstreams = append(st.upstreams, ts...)
	st.sourcesMu.Unlock()
}

// setTopics makes fn the source of the Topics section of /stats: the
// busiest topics, bounded in number. fn must be cheap and must not block.
func (st *stats) setTopics(fn func() []topicJSON) {
	st.sourcesMu.Lock()
	st.topics = fn
	st.sourcesMu.Unlock()
}

// upstreamTables returns the tables of addUpstreams.
func (st *stats) upstreamTables() []*upstreams {
	st.sourcesMu.Lock()
	defer st.sourcesMu.Unlock()
	return slices.Clone(st.upstreams)
}

// registrySizeSource reports the size of the registry and, for a remote
// one, what it holds, watches and costs the backend (cachedRegistry.metrics).
func registrySizeSource(reg Registry) func(emit emitFunc) {
	return func(emit emitFunc) {
		services, nodes := reg.size()
		emit("sidecar_registry_services", "Services in the registry (for a remote registry: every service it lists).", "gauge", float64(services))
		emit("sidecar_registry_nodes", "Nodes of all services in the registry (for a remote registry: of the services held).", "gauge", float64(nodes))
		if r, ok := reg.(interface{ metrics(emitFunc) }); ok {
			r.metrics(emit)
		}
	}
}

// start begins sampling the counters into the /stats ring, one sample per
// interval, when --enable_stats is on.
func (st *stats) start(ctx context.Context) {
	if !st.cfg.EnableStats {
		return
	}
	st.startOnce.Do(func() { go st.sampleLoop(ctx) })
}

// Close stops the sampler and waits for it. Idempotent.
func (st *stats) Close() error {
	st.closeOnce.Do(func() {
		close(st.stop)
		started := true
		st.startOnce.Do(func() { started = false })
		if started {
			<-st.done
		}
	})
	return nil
}

func (st *stats) sampleLoop(ctx context.Context) {
	defer close(st.done)
	t := time.NewTicker(st.interval)
	defer t.Stop()
	var prevClasses [numClasses]int64
	var prevBuckets [numBuckets]int64
	var prevN, prevNs int64
	for {
		select {
		case <-st.stop:
			return
		case <-ctx.Done():
			return
		case now := <-t.C:
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			s := sample{at: now, heapBytes: ms.HeapAlloc, goroutines: runtime.NumGoroutine()}
			for i := range st.classes {
				c := st.classes[i].Load()
				s.classes[i], prevClasses[i] = c-prevClasses[i], c
			}
			buckets, n, ns := st.latency.load()
			for i := range buckets {
				s.buckets[i] = buckets[i] - prevBuckets[i]
			}
			prevBuckets = buckets
			s.latencyN, s.latencyNs, prevN, prevNs = n-prevN, ns-prevNs, n, ns
			for _, t := range st.upstreamTables() {
				for _, u := range t.list() {
					u.sample(now)
				}
			}
			st.ringMu.Lock()
			st.ring[st.ringNext] = s
			st.ringNext = (st.ringNext + 1) % ringSize
			st.ringLen = min(st.ringLen+1, ringSize)
			st.ringMu.Unlock()
		}
	}
}

// samples returns the ring, oldest first.
func (st *stats) samples() []sample {
	st.ringMu.Lock()
	defer st.ringMu.Unlock()
	out := make([]sample, 0, st.ringLen)
	for i := st.ringLen; i > 0; i-- {
		out = append(out, st.ring[(st.ringNext-i+ringSize)%ringSize])
	}
	return out
}

// route returns the counters of route template pattern, adding them on
// first use. Past maxRoutes, new templates share overflowRoute.
func (st *stats) route(pattern string) *routeStats {
	if pattern == "" {
		pattern = unmatchedRoute
	}
	if rs := (*st.routes.Load())[pattern]; rs != nil {
		return rs
	}
	st.routesMu.Lock()
	defer st.routesMu.Unlock()
	old := *st.routes.Load()
	if rs := old[pattern]; rs != nil {
		return rs
	}
	if len(old) >= maxRoutes {
		pattern = overflowRoute
		if rs := old[pattern]; rs != nil {
			return rs
		}
	}
	rs := &routeStats{route: pattern}
	m := maps.Clone(old)
	m[pattern] = rs
	st.routes.Store(&m)
	return rs
}

// routeList returns the counters of every route, sorted by template.
func (st *stats) routeList() []*routeStats {
	m := *st.routes.Load()
	out := slices.Collect(maps.Values(m))
	slices.SortFunc(out, func(a, b *routeStats) int { return strings.Compare(a.route, b.route) })
	return out
}

// classIndex maps a status code to its class index; codes past 5xx count
// as 5xx.
func classIndex(code int) int {
	return min(max(code/100, 1), numClasses) - 1
}

// wrap counts every request that next serves by the route template the
// mux matched (r.Pattern, never the raw path), status class and latency,
// and writes the access log line. Its ResponseWriter passes Flush and
// Hijack through and unwraps for http.ResponseController, so streams and
// websocket upgrades keep working.
func (st *stats) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		st.inFlight.Add(1)
		sw := st.writers.Get().(*statusWriter)
		sw.ResponseWriter = w
		returned := false
		defer func() {
			st.inFlight.Add(-1)
			if !returned && sw.status == 0 {
				sw.status = http.StatusInternalServerError // the handler panicked
			}
			st.record(r, sw, time.Since(start))
			if returned {
				*sw = statusWriter{}
				st.writers.Put(sw)
			}
		}()
		next.ServeHTTP(sw, r)
		returned = true
	})
}

// record counts one finished request.
func (st *stats) record(r *http.Request, sw *statusWriter, d time.Duration) {
	code := sw.status
	if code == 0 {
		code = http.StatusOK // net/http's implicit status
	}
	rs := st.route(r.Pattern)
	ci := classIndex(code)
	st.classes[ci].Add(1)
	rs.classes[ci].Add(1)
	rs.bytes.Add(sw.bytes)
	if code != http.StatusSwitchingProtocols {
		st.latency.observe(d)
		rs.latency.observe(d)
	}
	if st.accessLog {
		st.log.LogAttrs(r.Context(), slog.LevelInfo, "request",
			slog.String("method", r.Method),
			slog.String("route", rs.route),
			slog.String("path", r.URL.Path),
			slog.Int("status", code),
			slog.Duration("duration", d),
			slog.Int64("bytes", sw.bytes),
			slog.String("remote", r.RemoteAddr),
		)
	}
}

// statusWriter records the status and size of a response. It keeps the
// optional interfaces of the writer it wraps: Flush and Hijack pass
// through, and Unwrap lets http.ResponseController reach the rest.
type statusWriter struct {
	http.ResponseWriter
	status int // first final status written (or 101); 0 before
	bytes  int64
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

// Flush sends buffered data to the client (server-sent events, streamed
// proxy responses).
func (w *statusWriter) Flush() {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	http.NewResponseController(w.ResponseWriter).Flush()
}

// Hijack hands the connection to a websocket library. A hijacked request
// without a status counts as 101 Switching Protocols.
func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, rw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err == nil && w.status == 0 {
		w.status = http.StatusSwitchingProtocols
	}
	return conn, rw, err
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// metric is one sample a source emitted.
type metric struct {
	Name   string            `json:"name"`
	Kind   string            `json:"kind"`
	Labels map[string]string `json:"labels,omitempty"`
	Value  float64           `json:"value"`

	help   string
	labels []string // pairs, as emitted
}

// collect calls every source and returns their valid samples, in order.
// Invalid ones (bad name, odd label list, unknown kind) are dropped.
func (st *stats) collect() []metric {
	st.sourcesMu.Lock()
	sources := slices.Clone(st.sources)
	st.sourcesMu.Unlock()
	var out []metric
	emit := func(name, help, kind string, value float64, labels ...string) {
		if !validMetricName(name) || len(labels)%2 != 0 || (kind != "counter" && kind != "gauge") {
			return
		}
		m := metric{Name: name, Kind: kind, Value: value, help: help, labels: slices.Clone(labels)}
		for i := 0; i < len(labels); i += 2 {
			if !validLabelName(labels[i]) {
				return
			}
			if m.Labels == nil {
				m.Labels = map[string]string{}
			}
			m.Labels[labels[i]] = labels[i+1]
		}
		out = append(out, m)
	}
	for _, src := range sources {
		src(emit)
	}
	return out
}

func validMetricName(s string) bool {
	for i, c := range s {
		ok := c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || i > 0 && c >= '0' && c <= '9'
		if !ok {
			return false
		}
	}
	return s != ""
}

func validLabelName(s string) bool {
	return validMetricName(s) && !strings.Contains(s, ":") && !strings.HasPrefix(s, "__")
}

// handleMetrics serves GET /metrics in the Prometheus text exposition
// format 0.0.4. It is always on: it reads counters and needs no sampler.
func (st *stats) handleMetrics(w http.ResponseWriter, r *http.Request) {
	var b bytes.Buffer
	pw := promWriter{b: &b}
	routes := st.routeList()

	pw.family("sidecar_http_requests_total", "Requests served, by route template and status class.", "counter")
	for _, rs := range routes {
		for ci := range rs.classes {
			pw.sample("sidecar_http_requests_total", float64(rs.classes[ci].Load()), "route", rs.route, "class", classNames[ci])
		}
	}
	pw.family("sidecar_http_response_bytes_total", "Response body bytes written, by route template.", "counter")
	for _, rs := range routes {
		pw.sample("sidecar_http_response_bytes_total", float64(rs.bytes.Load()), "route", rs.route)
	}
	pw.family("sidecar_http_request_duration_seconds", "Time to serve a request, by route template (websocket sessions excluded).", "histogram")
	for _, rs := range routes {
		counts, n, sum := rs.latency.load()
		var cum int64
		for i, bound := range latencyBounds {
			cum += counts[i]
			pw.sample("sidecar_http_request_duration_seconds_bucket", float64(cum), "route", rs.route, "le", formatFloat(float64(bound)/1e9))
		}
		pw.sample("sidecar_http_request_duration_seconds_bucket", float64(n), "route", rs.route, "le", "+Inf")
		pw.sample("sidecar_http_request_duration_seconds_sum", float64(sum)/1e9, "route", rs.route)
		pw.sample("sidecar_http_request_duration_seconds_count", float64(n), "route", rs.route)
	}
	pw.family("sidecar_http_requests_in_flight", "Requests being served now, websocket sessions included.", "gauge")
	pw.sample("sidecar_http_requests_in_flight", float64(st.inFlight.Load()))
	now := time.Now()
	for _, t := range st.upstreamTables() {
		t.writeMetrics(&pw, st.nodeLabel, now)
	}

	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	process := []struct {
		name, help, kind string
		value            float64
	}{
		{"sidecar_uptime_seconds", "Seconds since the sidecar started.", "gauge", time.Since(st.started).Seconds()},
		{"process_start_time_seconds", "Start time of the process since the Unix epoch, in seconds.", "gauge", float64(st.started.UnixNano()) / 1e9},
		{"go_goroutines", "Goroutines that currently exist.", "gauge", float64(runtime.NumGoroutine())},
		{"go_memstats_heap_alloc_bytes", "Bytes of allocated heap objects.", "gauge", float64(ms.HeapAlloc)},
		{"go_memstats_sys_bytes", "Bytes of memory obtained from the OS.", "gauge", float64(ms.Sys)},
		{"go_gc_cycles_total", "Completed GC cycles.", "counter", float64(ms.NumGC)},
		{"go_gc_pause_seconds_total", "Total stop-the-world GC pause time.", "counter", float64(ms.PauseTotalNs) / 1e9},
		{"go_gc_last_pause_seconds", "Duration of the last GC pause.", "gauge", float64(lastPause(&ms)) / 1e9},
	}
	for _, p := range process {
		pw.family(p.name, p.help, p.kind)
		pw.sample(p.name, p.value)
	}

	// Component samples, grouped by family in first-seen order.
	metrics := st.collect()
	var order []string
	byName := map[string][]metric{}
	for _, m := range metrics {
		if pw.seen[m.Name] && byName[m.Name] == nil {
			continue // a family name of ours
		}
		if byName[m.Name] == nil {
			order = append(order, m.Name)
		}
		byName[m.Name] = append(byName[m.Name], m)
	}
	for _, name := range order {
		ms := byName[name]
		pw.family(name, ms[0].help, ms[0].Kind)
		for _, m := range ms {
			pw.sample(name, m.Value, m.labels...)
		}
	}

	h := w.Header()
	h.Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Length", strconv.Itoa(b.Len()))
	w.WriteHeader(http.StatusOK)
	w.Write(b.Bytes())
}

// lastPause is the duration of the most recent GC pause.
func lastPause(ms *runtime.MemStats) uint64 {
	if ms.NumGC == 0 {
		return 0
	}
	return ms.PauseNs[(ms.NumGC+255)%256]
}

// promWriter writes the Prometheus text format.
type promWriter struct {
	b    *bytes.Buffer
	seen map[string]bool // families written
}

func (p *promWriter) family(name, help, kind string) {
	if p.seen == nil {
		p.seen = map[string]bool{}
	}
	p.seen[name] = true
	p.b.WriteString("# HELP " + name + " ")
	escapeProm(p.b, help, false)
	p.b.WriteString("\n# TYPE " + name + " " + kind + "\n")
}

func (p *promWriter) sample(name string, v float64, labels ...string) {
	p.b.WriteString(name)
	for i := 0; i+1 < len(labels); i += 2 {
		if i == 0 {
			p.b.WriteByte('{')
		} else {
			p.b.WriteByte(',')
		}
		p.b.WriteString(labels[i] + `="`)
		escapeProm(p.b, labels[i+1], true)
		p.b.WriteByte('"')
	}
	if len(labels) >= 2 {
		p.b.WriteByte('}')
	}
	p.b.WriteByte(' ')
	p.b.WriteString(formatFloat(v))
	p.b.WriteByte('\n')
}

// escapeProm escapes a HELP text (backslash, newline) or a label value
// (also the double quote).
func escapeProm(b *bytes.Buffer, s string, quote bool) {
	for _, c := range s {
		switch {
		case c == '\\':
			b.WriteString(`\\`)
		case c == '\n':
			b.WriteString(`\n`)
		case c == '"' && quote:
			b.WriteString(`\"`)
		default:
			b.WriteRune(c)
		}
	}
}

func formatFloat(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	case math.IsNaN(v):
		return "NaN"
	}
	return strconv.FormatFloat(v, 'f', -1, 64)
}

// statsJSON is the JSON of /stats. The first five fields are the original
// sidecar's; the rest add what its page could not show.
type statsJSON struct {
	Started  int64         `json:"started"`  // Unix seconds
	Memory   string        `json:"memory"`   // heap in use, human-readable
	Threads  int           `json:"threads"`  // goroutines
	GCPause  string        `json:"gc_pause"` // last GC pause, human-readable
	Counters []counterJSON `json:"counters"` // one per interval, oldest first

	UptimeSeconds float64          `json:"uptime_seconds"`
	IntervalMs    int64            `json:"interval_ms"`
	MemoryBytes   uint64           `json:"memory_bytes"`
	SysBytes      uint64           `json:"sys_bytes"`
	GCPauseNs     uint64           `json:"gc_pause_ns"`
	GCCycles      uint32           `json:"gc_cycles"`
	InFlight      int64            `json:"in_flight"`
	TotalReqs     int64            `json:"total_reqs"` // since start
	StatusCodes   map[string]int64 `json:"status_codes"`
	LatencyMs     latencyJSON      `json:"latency_ms"` // since start
	Routes        []routeJSON      `json:"routes"`
	Services      []upstreamJSON   `json:"services"` // calls by upstream service, per handler (stats_upstream.go)
	Topics        []topicJSON      `json:"topics"`   // the busiest topics (broker_stats.go)
	Metrics       []metric         `json:"metrics"`  // the components' samples
}

// topicJSON is one topic of the broker's on this sidecar. Topics are
// chosen by callers, so /stats shows only the busiest (by messages
// published and delivered) and /metrics none by name; the row with Other
// set adds up the rest.
type topicJSON struct {
	Topic           string `json:"topic"`
	Other           bool   `json:"other,omitempty"` // the topics without a row of their own
	Subscribers     int64  `json:"subscribers"`     // connected here now
	QueueGroups     int    `json:"queue_groups"`    // with members here now
	Published       int64  `json:"published"`       // accepted here
	Delivered       int64  `json:"delivered"`       // written to subscribers here
	Dropped         int64  `json:"dropped"`         // lost to a subscriber here
	SlowDisconnects int64  `json:"slow_disconnects"`
}

// counterJSON is one interval's requests, as the original's counters with
// its field names, plus latency and process state.
type counterJSON struct {
	Timestamp   int64            `json:"timestamp"` // Unix seconds, end of the interval
	TimestampMs int64            `json:"timestamp_ms"`
	StatusCodes map[string]int64 `json:"status_codes"`
	TotalReqs   int64            `json:"total_reqs"`
	LatencyMs   latencyJSON      `json:"latency_ms"`
	MemoryBytes uint64           `json:"memory_bytes"`
	Threads     int              `json:"threads"`
}

// latencyJSON summarizes latencies in milliseconds; nil without requests.
// Quantiles are estimated from the histogram buckets.
type latencyJSON struct {
	Avg *float64 `json:"avg"`
	P50 *float64 `json:"p50"`
	P95 *float64 `json:"p95"`
	P99 *float64 `json:"p99"`
}

type routeJSON struct {
	Route       string           `json:"route"`
	TotalReqs   int64            `json:"total_reqs"`
	StatusCodes map[string]int64 `json:"status_codes"`
	LatencyMs   latencyJSON      `json:"latency_ms"`
}

func summarize(counts [numBuckets]int64, n, sumNs int64) latencyJSON {
	if n == 0 {
		return latencyJSON{}
	}
	ms := func(d time.Duration) *float64 {
		v := math.Round(float64(d)/1e3) / 1e3 // µs precision
		return &v
	}
	var l latencyJSON
	l.Avg = ms(time.Duration(sumNs / n))
	if d, ok := quantile(counts, 0.5); ok {
		l.P50 = ms(d)
	}
	if d, ok := quantile(counts, 0.95); ok {
		l.P95 = ms(d)
	}
	if d, ok := quantile(counts, 0.99); ok {
		l.P99 = ms(d)
	}
	return l
}

func classMap(c [numClasses]int64) (map[string]int64, int64) {
	m := make(map[string]int64, numClasses)
	var total int64
	for i, v := range c {
		m[classNames[i]] = v
		total += v
	}
	return m, total
}

// snapshot builds the /stats JSON.
func (st *stats) snapshot() statsJSON {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	out := statsJSON{
		Started:       st.started.Unix(),
		Memory:        formatBytes(ms.HeapAlloc),
		Threads:       runtime.NumGoroutine(),
		GCPause:       time.Duration(lastPause(&ms)).String(),
		Counters:      []counterJSON{},
		UptimeSeconds: math.Round(time.Since(st.started).Seconds()*1000) / 1000,
		IntervalMs:    st.interval.Milliseconds(),
		MemoryBytes:   ms.HeapAlloc,
		SysBytes:      ms.Sys,
		GCPauseNs:     lastPause(&ms),
		GCCycles:      ms.NumGC,
		InFlight:      st.inFlight.Load(),
		Routes:        []routeJSON{},
		Services:      []upstreamJSON{},
		Topics:        []topicJSON{},
		Metrics:       st.collect(),
	}
	now := time.Now()
	for _, t := range st.upstreamTables() {
		out.Services = append(out.Services, t.json(now, st.interval)...)
	}
	st.sourcesMu.Lock()
	topics := st.topics
	st.sourcesMu.Unlock()
	if topics != nil {
		out.Topics = append(out.Topics, topics()...)
	}
	for _, s := range st.samples() {
		c := counterJSON{
			Timestamp:   s.at.Unix(),
			TimestampMs: s.at.UnixMilli(),
			LatencyMs:   summarize(s.buckets, s.latencyN, s.latencyNs),
			MemoryBytes: s.heapBytes,
			Threads:     s.goroutines,
		}
		c.StatusCodes, c.TotalReqs = classMap(s.classes)
		out.Counters = append(out.Counters, c)
	}
	var all [numClasses]int64
	for i := range st.classes {
		all[i] = st.classes[i].Load()
	}
	out.StatusCodes, out.TotalReqs = classMap(all)
	out.LatencyMs = summarize(st.latency.load())
	for _, rs := range st.routeList() {
		var c [numClasses]int64
		for i := range rs.classes {
			c[i] = rs.classes[i].Load()
		}
		rj := routeJSON{Route: rs.route, LatencyMs: summarize(rs.latency.load())}
		rj.StatusCodes, rj.TotalReqs = classMap(c)
		out.Routes = append(out.Routes, rj)
	}
	if out.Metrics == nil {
		out.Metrics = []metric{}
	}
	return out
}

func formatBytes(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// wantsJSON reports whether the client asked for JSON rather than the page.
func wantsJSON(r *http.Request) bool {
	return strings.Contains(r.Header.Get("Accept"), "application/json") || r.URL.Query().Get("format") == "json"
}

// handleStats serves GET /stats: the page, or its data as JSON for
// "Accept: application/json" (or ?format=json). Off without --enable_stats.
func (st *stats) handleStats(w http.ResponseWriter, r *http.Request) {
	if !st.cfg.EnableStats {
		writeError(w, http.StatusNotFound, "stats: start the sidecar with --enable_stats")
		return
	}
	h := w.Header()
	h.Set("Vary", "Accept")
	h.Set("Cache-Control", "no-store")
	if wantsJSON(r) {
		writeJSON(w, http.StatusOK, st.snapshot())
		return
	}
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(len(statsPage)))
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:")
	w.WriteHeader(http.StatusOK)
	w.Write(statsPage)
}
