package main

// stats_upstream.go counts the calls the sidecar makes to upstream
// services, per handler (rpc, proxy) and service: the golden metrics an
// operator needs to tell which service is slow or failing (calls by status
// class, so the rate and the success rate; a latency histogram, so p50,
// p95 and p99; retries and timeouts), and shows each service's nodes as
// the balancer sees them. /metrics labels them by service name only (node
// ids only with --metrics_node_labels); /stats adds a recent window.
//
// Recording costs no lookup and no allocation: the balancer resolves a
// service's upstreamStats once, when it first holds the service
// (svcState.up), and a call's outcome is a few atomic adds (record).

import (
	"cmp"
	"maps"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// defaultStatsMaxServices is the default of --stats_max_services:
	// services with counters of their own, per handler; the calls of
	// later ones are counted under otherService.
	defaultStatsMaxServices = 100
	// otherService labels the calls of services past the cap.
	otherService = "other"
	// upstreamWindow is how many of the sampler's samples the recent
	// window of /stats reaches back: 10 s at the default one-second
	// interval. Each service keeps them: about 2 KiB a service.
	upstreamWindow = 10
	// maxNodesShown bounds the nodes of one service in /stats and, with
	// --metrics_node_labels, in /metrics.
	maxNodesShown = 50
)

// upstreamStats counts the calls of one handler to one upstream service
// (or to every service past the cap: otherService). Counters are atomic;
// record does not allocate. The ring of samples is the sampler's (stats,
// with --enable_stats), and gives /stats its recent window.
type upstreamStats struct {
	service string
	created time.Time

	classes      [numClasses]atomic.Int64 // calls by status class of their answer
	latency      histogram                // time to the answer (proxy: to the response headers), retries included
	retries      atomic.Int64             // extra attempts made
	timeouts     atomic.Int64             // calls answered 504: out of time
	nodeFailures atomic.Int64             // attempts counted against a node (balancer.done)
	ejections    atomic.Int64             // nodes ejected after failures in a row (balancer.eject)

	mu       sync.Mutex // guards ring, ringNext, ringLen
	ring     [upstreamWindow]upstreamSample
	ringNext int
	ringLen  int
}

// upstreamSample is a copy of an upstreamStats' counters at one time.
type upstreamSample struct {
	at       time.Time
	classes  [numClasses]int64
	buckets  [numBuckets]int64
	sumNs    int64
	retries  int64
	timeouts int64
}

// record counts one call answered with status code after d: the one point
// where the RPC handler and the proxy count a call's outcome. A 504 is a
// timeout.
func (u *upstreamStats) record(code int, d time.Duration) {
	u.classes[classIndex(code)].Add(1)
	u.latency.observe(d)
	if code == http.StatusGatewayTimeout {
		u.timeouts.Add(1)
	}
}

// load copies the counters as of at.
func (u *upstreamStats) load(at time.Time) upstreamSample {
	s := upstreamSample{at: at, retries: u.retries.Load(), timeouts: u.timeouts.Load()}
	for i := range u.classes {
		s.classes[i] = u.classes[i].Load()
	}
	s.buckets, _, s.sumNs = u.latency.load()
	return s
}

// sample adds the counters as of now to the ring (the sampler's tick).
func (u *upstreamStats) sample(now time.Time) {
	s := u.load(now)
	u.mu.Lock()
	u.ring[u.ringNext] = s
	u.ringNext = (u.ringNext + 1) % upstreamWindow
	u.ringLen = min(u.ringLen+1, upstreamWindow)
	u.mu.Unlock()
}

// base is the start of the recent window: the oldest sample of the ring,
// or all zero at the creation of u when there is none yet.
func (u *upstreamStats) base() upstreamSample {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.ringLen == 0 {
		return upstreamSample{at: u.created}
	}
	return u.ring[(u.ringNext-u.ringLen+upstreamWindow)%upstreamWindow]
}

// upstreams holds the upstreamStats of one handler's services: at most max
// services of their own, the rest under otherService. Safe for concurrent
// use; get reads a copy-on-write map without a lock, and is called once per
// service by the balancer, not per call.
type upstreams struct {
	handler string // "rpc" or "proxy": the metric prefix and the JSON's handler
	max     int    // services with their own counters (--stats_max_services)
	// nodes returns what the balancer knows of a service's nodes at now
	// (balancer.nodes); set by the owner before serving, nil: none.
	nodes func(service string, now time.Time) []nodeSnapshot

	m  atomic.Pointer[map[string]*upstreamStats] // copy-on-write
	mu sync.Mutex                                // serializes writers of m
}

// newUpstreams returns the empty table of handler ("rpc" or "proxy") with
// room for max services (defaultStatsMaxServices when max is not positive).
func newUpstreams(handler string, max int) *upstreams {
	if max <= 0 {
		max = defaultStatsMaxServices
	}
	t := &upstreams{handler: handler, max: max}
	t.m.Store(&map[string]*upstreamStats{})
	return t
}

// get returns the counters of service, adding them on first use; past max
// services, those of otherService. On a nil table (a balancer of its own, in
// tests) it returns counters that belong to no table.
func (t *upstreams) get(service string) *upstreamStats {
	if t == nil {
		return &upstreamStats{service: service, created: time.Now()}
	}
	if u := (*t.m.Load())[service]; u != nil {
		return u
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	old := *t.m.Load()
	if u := old[service]; u != nil {
		return u
	}
	if len(old) >= t.max {
		service = otherService
		if u := old[service]; u != nil {
			return u
		}
	}
	u := &upstreamStats{service: service, created: time.Now()}
	m := maps.Clone(old)
	m[service] = u
	t.m.Store(&m)
	return u
}

// list returns the counters of every service, sorted by name with
// otherService last.
func (t *upstreams) list() []*upstreamStats {
	out := slices.Collect(maps.Values(*t.m.Load()))
	slices.SortFunc(out, func(a, b *upstreamStats) int {
		if (a.service == otherService) != (b.service == otherService) {
			if a.service == otherService {
				return 1
			}
			return -1
		}
		return strings.Compare(a.service, b.service)
	})
	return out
}

// nodesOf is t.nodes(service, now), or nil when there is no source or the
// service is the fold of others.
func (t *upstreams) nodesOf(service string, now time.Time) []nodeSnapshot {
	if t.nodes == nil || service == otherService {
		return nil
	}
	return t.nodes(service, now)
}

// writeMetrics writes t's families to /metrics, prefixed sidecar_<handler>,
// labelled by service (and, with nodeLabels, by node id: at most
// maxNodesShown nodes a service, in the registry's order). A table
// without services writes nothing.
func (t *upstreams) writeMetrics(pw *promWriter, nodeLabels bool, now time.Time) {
	list := t.list()
	if len(list) == 0 {
		return
	}
	p := "sidecar_" + t.handler
	nodes := make([][]nodeSnapshot, len(list))
	for i, u := range list {
		nodes[i] = t.nodesOf(u.service, now)
	}
	pw.family(p+"_calls_total", "Calls to upstream services, by service and status class of the answer (services past --stats_max_services as \"other\"); success rate = 1 - 5xx / all.", "counter")
	for _, u := range list {
		for ci := range u.classes {
			pw.sample(p+"_calls_total", float64(u.classes[ci].Load()), "service", u.service, "class", classNames[ci])
		}
	}
	pw.family(p+"_call_duration_seconds", "Time to the answer of a call (proxy: to the response headers), retries included, by service.", "histogram")
	for _, u := range list {
		counts, n, sum := u.latency.load()
		var cum int64
		for i, bound := range latencyBounds {
			cum += counts[i]
			pw.sample(p+"_call_duration_seconds_bucket", float64(cum), "service", u.service, "le", formatFloat(float64(bound)/1e9))
		}
		pw.sample(p+"_call_duration_seconds_bucket", float64(n), "service", u.service, "le", "+Inf")
		pw.sample(p+"_call_duration_seconds_sum", float64(sum)/1e9, "service", u.service)
		pw.sample(p+"_call_duration_seconds_count", float64(n), "service", u.service)
	}
	counters := []struct {
		name, help string
		v          func(*upstreamStats) int64
	}{
		{"_retries_total", "Extra attempts made, by service.", func(u *upstreamStats) int64 { return u.retries.Load() }},
		{"_timeouts_total", "Calls that ran out of time (answered 504), by service.", func(u *upstreamStats) int64 { return u.timeouts.Load() }},
		{"_node_failures_total", "Attempts counted as a node failure, by service.", func(u *upstreamStats) int64 { return u.nodeFailures.Load() }},
		{"_ejections_total", "Nodes ejected after failures in a row, by service.", func(u *upstreamStats) int64 { return u.ejections.Load() }},
	}
	for _, c := range counters {
		pw.family(p+c.name, c.help, "counter")
		for _, u := range list {
			pw.sample(p+c.name, float64(c.v(u)), "service", u.service)
		}
	}
	pw.family(p+"_nodes", "Nodes of the service the balancer holds (the registry's latest snapshot), by service.", "gauge")
	for i, u := range list {
		if u.service != otherService {
			pw.sample(p+"_nodes", float64(len(nodes[i])), "service", u.service)
		}
	}
	pw.family(p+"_nodes_ejected", "Nodes currently ejected, by service.", "gauge")
	for i, u := range list {
		if u.service != otherService {
			pw.sample(p+"_nodes_ejected", float64(ejectedCount(nodes[i])), "service", u.service)
		}
	}
	if !nodeLabels {
		return
	}
	perNode := []struct {
		name, help string
		v          func(*nodeSnapshot) float64
	}{
		{"_node_in_flight", "Calls in flight on a node, by service and node id (--metrics_node_labels).", func(n *nodeSnapshot) float64 { return float64(n.inFlight) }},
		{"_node_latency_seconds", "The balancer's latency estimate of a node (peak-EWMA; 0 before it is measured), by service and node id (--metrics_node_labels).", func(n *nodeSnapshot) float64 { return n.latency.Seconds() }},
		{"_node_ejected_until_seconds", "Unix time a node's ejection ends; 0 when it is not ejected. By service and node id (--metrics_node_labels).", func(n *nodeSnapshot) float64 {
			if n.ejectedUntil.IsZero() {
				return 0
			}
			return float64(n.ejectedUntil.UnixNano()) / 1e9
		}},
	}
	for _, f := range perNode {
		pw.family(p+f.name, f.help, "gauge")
		for i, u := range list {
			for j := range nodes[i][:min(len(nodes[i]), maxNodesShown)] {
				n := &nodes[i][j]
				pw.sample(p+f.name, f.v(n), "service", u.service, "node", n.id)
			}
		}
	}
}

// ejectedCount is how many of nodes are ejected.
func ejectedCount(nodes []nodeSnapshot) int {
	n := 0
	for i := range nodes {
		if !nodes[i].ejectedUntil.IsZero() {
			n++
		}
	}
	return n
}

// upstreamJSON is one service in /stats: since start, over the recent
// window, and its nodes.
type upstreamJSON struct {
	Handler      string           `json:"handler"`      // "rpc" or "proxy"
	Service      string           `json:"service"`      // "other": services past --stats_max_services
	TotalReqs    int64            `json:"total_reqs"`   // calls since start
	StatusCodes  map[string]int64 `json:"status_codes"` // by class of the answer
	SuccessRate  *float64         `json:"success_rate"` // share of calls not answered 5xx; null without calls
	LatencyMs    latencyJSON      `json:"latency_ms"`
	Retries      int64            `json:"retries"`
	Timeouts     int64            `json:"timeouts"`
	NodeFailures int64            `json:"node_failures"`
	Ejections    int64            `json:"ejections"`
	Recent       windowJSON       `json:"recent"`
	NodesTotal   int              `json:"nodes_total"`
	NodesEjected int              `json:"nodes_ejected"`
	Nodes        []nodeJSON       `json:"nodes"` // ejected first, then by id; of more than maxNodesShown, the busiest and slowest
}

// windowJSON is a service's calls over the recent window: the last
// upstreamWindow sampler intervals (10 s by default).
type windowJSON struct {
	Seconds     float64     `json:"seconds"` // the window's length
	RPS         float64     `json:"rps"`     // calls per second
	TotalReqs   int64       `json:"total_reqs"`
	SuccessRate *float64    `json:"success_rate"` // null without calls in the window
	LatencyMs   latencyJSON `json:"latency_ms"`
	Retries     int64       `json:"retries"`
	Timeouts    int64       `json:"timeouts"`
}

// nodeJSON is one node as the balancer sees it.
type nodeJSON struct {
	ID             string   `json:"id"`
	Address        string   `json:"address"` // host:port
	InFlight       int64    `json:"in_flight"`
	LatencyMs      *float64 `json:"latency_ms"` // the balancer's estimate (peak-EWMA); null before the node is measured
	Failures       int32    `json:"failures"`   // failures in a row since its last success
	Ejected        bool     `json:"ejected"`
	EjectedUntilMs *int64   `json:"ejected_until_ms"` // Unix ms the ejection ends; null when not ejected
}

// successRate is the share of calls of classes not answered 5xx; nil for
// no calls.
func successRate(classes [numClasses]int64) (*float64, int64) {
	var total int64
	for _, c := range classes {
		total += c
	}
	if total == 0 {
		return nil, 0
	}
	r := float64(total-classes[classIndex(500)]) / float64(total)
	r = math.Round(r*1e4) / 1e4
	return &r, total
}

// json renders t's services for /stats at now; minWindow is the shortest
// window a rate is computed over (the sampler's interval).
func (t *upstreams) json(now time.Time, minWindow time.Duration) []upstreamJSON {
	var out []upstreamJSON
	for _, u := range t.list() {
		cur := u.load(now)
		sj := upstreamJSON{
			Handler:      t.handler,
			Service:      u.service,
			LatencyMs:    summarize(cur.buckets, bucketTotal(cur.buckets), cur.sumNs),
			Retries:      cur.retries,
			Timeouts:     cur.timeouts,
			NodeFailures: u.nodeFailures.Load(),
			Ejections:    u.ejections.Load(),
			Nodes:        []nodeJSON{},
		}
		sj.StatusCodes, sj.TotalReqs = classMap(cur.classes)
		sj.SuccessRate, _ = successRate(cur.classes)

		base := u.base()
		var d upstreamSample
		for i := range d.classes {
			d.classes[i] = cur.classes[i] - base.classes[i]
		}
		for i := range d.buckets {
			d.buckets[i] = cur.buckets[i] - base.buckets[i]
		}
		w := windowJSON{
			Seconds:  math.Round(max(now.Sub(base.at), minWindow).Seconds()*1000) / 1000,
			Retries:  cur.retries - base.retries,
			Timeouts: cur.timeouts - base.timeouts,
		}
		w.SuccessRate, w.TotalReqs = successRate(d.classes)
		w.RPS = math.Round(float64(w.TotalReqs)/max(w.Seconds, 1e-3)*1000) / 1000
		w.LatencyMs = summarize(d.buckets, w.TotalReqs, cur.sumNs-base.sumNs)
		sj.Recent = w

		nodes := t.nodesOf(u.service, now)
		sj.NodesTotal, sj.NodesEjected = len(nodes), ejectedCount(nodes)
		if len(nodes) > maxNodesShown {
			// The most telling nodes: the ejected, the busiest, the slowest.
			slices.SortStableFunc(nodes, func(a, b nodeSnapshot) int {
				if c := ejectedFirst(a, b); c != 0 {
					return c
				}
				if c := cmp.Compare(b.inFlight, a.inFlight); c != 0 {
					return c
				}
				return cmp.Compare(b.latency, a.latency)
			})
			nodes = nodes[:maxNodesShown]
		}
		// Ejected first, then by id: rows that keep their place from one
		// refresh to the next.
		slices.SortStableFunc(nodes, func(a, b nodeSnapshot) int {
			if c := ejectedFirst(a, b); c != 0 {
				return c
			}
			return strings.Compare(a.id, b.id)
		})
		for _, n := range nodes {
			nj := nodeJSON{ID: n.id, Address: n.addr, InFlight: n.inFlight, Failures: n.failures, Ejected: !n.ejectedUntil.IsZero()}
			if n.measured {
				ms := math.Round(float64(n.latency)/1e3) / 1e3
				nj.LatencyMs = &ms
			}
			if nj.Ejected {
				until := n.ejectedUntil.UnixMilli()
				nj.EjectedUntilMs = &until
			}
			sj.Nodes = append(sj.Nodes, nj)
		}
		out = append(out, sj)
	}
	return out
}

// ejectedFirst orders an ejected node before one that is not.
func ejectedFirst(a, b nodeSnapshot) int {
	switch ae, be := !a.ejectedUntil.IsZero(), !b.ejectedUntil.IsZero(); {
	case ae && !be:
		return -1
	case be && !ae:
		return 1
	}
	return 0
}

// bucketTotal is the number of samples in the non-cumulative buckets b.
func bucketTotal(b [numBuckets]int64) int64 {
	var n int64
	for _, c := range b {
		n += c
	}
	return n
}
