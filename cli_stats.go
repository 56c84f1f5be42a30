package main

// cli_stats.go is the client's stats command: the sidecar's /stats JSON
// when it serves the page (--enable_stats), else the same summary read
// from the Prometheus text of /metrics, printed as tables.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// stats prints /stats JSON when the sidecar serves it, else /metrics.
func (c *cli) stats(ctx context.Context, _ []string) error {
	code, b, err := c.send(ctx, http.MethodGet, "/stats", nil, nil, http.Header{"Accept": {"application/json"}})
	if err != nil {
		return fmt.Errorf("stats: %w", err)
	}
	switch {
	case code == http.StatusOK:
		if c.opts.json {
			return c.printJSON(b)
		}
		var st statsJSON
		if err := json.Unmarshal(b, &st); err != nil {
			return fmt.Errorf("stats: unexpected answer from the sidecar: %v", err)
		}
		var out bytes.Buffer
		printStats(&out, &st)
		_, err = c.stdout.Write(out.Bytes())
		return err
	case code != http.StatusNotFound:
		return fmt.Errorf("stats: %w", responseError(code, b))
	}
	// Without --enable_stats: the same summary, from the Prometheus
	// metrics, always served (no per-interval history there).
	b, err = c.do(ctx, http.MethodGet, "/metrics", nil, nil, nil)
	if err != nil {
		return fmt.Errorf("stats: %w", err)
	}
	if c.opts.json {
		out, err := json.Marshal(parseMetricLines(b))
		if err != nil {
			return err
		}
		return c.printJSON(out)
	}
	var out bytes.Buffer
	printStats(&out, statsFromMetrics(b))
	_, err = c.stdout.Write(out.Bytes())
	return err
}

// statsFromMetrics reads the summary that printStats prints from the
// Prometheus text of /metrics: process state, requests by status class,
// latency estimated from the histogram buckets (when they are this
// build's, latencyBounds), a row per route, and the components' samples.
func statsFromMetrics(b []byte) *statsJSON {
	type routeSums struct {
		classes map[string]int64
		cum     [numBuckets]int64 // cumulative, as /metrics writes them
		known   bool              // every bucket bound is one of latencyBounds
		sum     float64           // seconds
		n       int64
	}
	bucket := map[string]int{"+Inf": len(latencyBounds)}
	for i, bound := range latencyBounds {
		bucket[formatFloat(float64(bound)/1e9)] = i
	}
	st := &statsJSON{StatusCodes: map[string]int64{}, Routes: []routeJSON{}}
	var order []string
	routes := map[string]*routeSums{}
	// Calls by upstream service (stats_upstream.go), by handler.
	type upstreamSums struct {
		j       upstreamJSON
		classes [numClasses]int64
		cum     [numBuckets]int64
		known   bool
		sum     float64
	}
	var upOrder []string
	ups := map[string]*upstreamSums{}
	upstream := func(handler, service string) *upstreamSums {
		key := handler + " " + service
		u := ups[key]
		if u == nil {
			u = &upstreamSums{j: upstreamJSON{Handler: handler, Service: service}, known: true}
			ups[key] = u
			upOrder = append(upOrder, key)
		}
		return u
	}
	route := func(name string) *routeSums {
		r := routes[name]
		if r == nil {
			r = &routeSums{classes: map[string]int64{}, known: true}
			routes[name] = r
			order = append(order, name)
		}
		return r
	}
	for _, line := range strings.Split(string(b), "\n") {
		name, labels, v, ok := parseSample(line)
		if !ok {
			continue
		}
		if handler, family, ok := upstreamFamily(name); ok && labels["service"] != "" {
			u := upstream(handler, labels["service"])
			switch family {
			case "calls_total":
				for i, c := range classNames {
					if c == labels["class"] {
						u.classes[i] += int64(v)
					}
				}
			case "call_duration_seconds_bucket":
				if i, ok := bucket[labels["le"]]; ok {
					u.cum[i] = int64(v)
				} else {
					u.known = false
				}
			case "call_duration_seconds_sum":
				u.sum = v
			case "retries_total":
				u.j.Retries = int64(v)
			case "timeouts_total":
				u.j.Timeouts = int64(v)
			case "node_failures_total":
				u.j.NodeFailures = int64(v)
			case "ejections_total":
				u.j.Ejections = int64(v)
			case "nodes":
				u.j.NodesTotal = int(v)
			case "nodes_ejected":
				u.j.NodesEjected = int(v)
			}
			continue // the per-node series are not in the summary
		}
		switch name {
		case "sidecar_http_requests_total":
			route(labels["route"]).classes[labels["class"]] += int64(v)
			st.StatusCodes[labels["class"]] += int64(v)
			st.TotalReqs += int64(v)
		case "sidecar_http_request_duration_seconds_bucket":
			r := route(labels["route"])
			if i, ok := bucket[labels["le"]]; ok {
				r.cum[i] = int64(v)
			} else {
				r.known = false
			}
		case "sidecar_http_request_duration_seconds_sum":
			route(labels["route"]).sum = v
		case "sidecar_http_request_duration_seconds_count":
			route(labels["route"]).n = int64(v)
		case "sidecar_http_requests_in_flight":
			st.InFlight = int64(v)
		case "sidecar_uptime_seconds":
			st.UptimeSeconds = v
		case "go_goroutines":
			st.Threads = int(v)
		case "go_memstats_heap_alloc_bytes":
			st.MemoryBytes, st.Memory = uint64(v), formatBytes(uint64(v))
		case "sidecar_http_response_bytes_total", "process_start_time_seconds", "go_memstats_sys_bytes",
			"go_gc_cycles_total", "go_gc_pause_seconds_total", "go_gc_last_pause_seconds":
			// Not in the summary.
		default:
			st.Metrics = append(st.Metrics, metric{Name: name, Labels: labels, Value: v})
		}
	}
	var all [numBuckets]int64
	var allN int64
	var allSum float64
	allKnown := true
	for _, name := range order {
		r := routes[name]
		var counts [numBuckets]int64
		for i := range counts {
			counts[i] = r.cum[i]
			if i > 0 {
				counts[i] -= r.cum[i-1]
			}
			all[i] += counts[i]
		}
		allN, allSum, allKnown = allN+r.n, allSum+r.sum, allKnown && r.known
		rj := routeJSON{Route: name, StatusCodes: r.classes}
		for _, v := range r.classes {
			rj.TotalReqs += v
		}
		if r.known {
			rj.LatencyMs = summarize(counts, r.n, int64(r.sum*1e9))
		}
		st.Routes = append(st.Routes, rj)
	}
	if allKnown {
		st.LatencyMs = summarize(all, allN, int64(allSum*1e9))
	}
	for _, key := range upOrder {
		u := ups[key]
		u.j.StatusCodes, u.j.TotalReqs = classMap(u.classes)
		u.j.SuccessRate, _ = successRate(u.classes)
		if u.known {
			var counts [numBuckets]int64
			for i := range counts {
				counts[i] = u.cum[i]
				if i > 0 {
					counts[i] -= u.cum[i-1]
				}
			}
			u.j.LatencyMs = summarize(counts, u.j.TotalReqs, int64(u.sum*1e9))
		}
		st.Services = append(st.Services, u.j)
	}
	return st
}

// upstreamFamily splits a metric name of stats_upstream.go's families,
// sidecar_rpc_calls_total, into its handler (rpc) and family (calls_total).
func upstreamFamily(name string) (handler, family string, ok bool) {
	for _, h := range []string{"rpc", "proxy"} {
		if f, ok := strings.CutPrefix(name, "sidecar_"+h+"_"); ok {
			switch f {
			case "calls_total", "call_duration_seconds_bucket", "call_duration_seconds_sum", "call_duration_seconds_count",
				"retries_total", "timeouts_total", "node_failures_total", "ejections_total", "nodes", "nodes_ejected",
				"node_in_flight", "node_latency_seconds", "node_ejected_until_seconds":
				return h, f, true
			}
		}
	}
	return "", "", false
}

// parseSample reads one sample line of the Prometheus text format:
// name{label="value",...} value. Comments and malformed lines are not ok.
func parseSample(line string) (name string, labels map[string]string, v float64, ok bool) {
	line = strings.TrimSpace(line)
	if line == "" || line[0] == '#' {
		return "", nil, 0, false
	}
	i := strings.IndexAny(line, "{ ")
	if i <= 0 {
		return "", nil, 0, false
	}
	name, rest := line[:i], line[i:]
	if rest[0] == '{' {
		labels = map[string]string{}
		rest = rest[1:]
		for {
			rest = strings.TrimLeft(rest, " ,")
			if strings.HasPrefix(rest, "}") {
				rest = rest[1:]
				break
			}
			key, after, found := strings.Cut(rest, "=")
			if !found || !strings.HasPrefix(after, `"`) {
				return "", nil, 0, false
			}
			var val strings.Builder
			j := 1
			for ; j < len(after) && after[j] != '"'; j++ {
				if after[j] == '\\' && j+1 < len(after) {
					j++
					if after[j] == 'n' {
						val.WriteByte('\n')
						continue
					}
				}
				val.WriteByte(after[j])
			}
			if j >= len(after) {
				return "", nil, 0, false
			}
			labels[strings.TrimSpace(key)] = val.String()
			rest = after[j+1:]
		}
	}
	fields := strings.Fields(rest)
	if len(fields) == 0 {
		return "", nil, 0, false
	}
	v, err := strconv.ParseFloat(fields[0], 64)
	return name, labels, v, err == nil
}

// metricSample is one line of /metrics, histogram buckets left out.
type metricSample struct {
	Name  string  `json:"name"` // with its labels, as /metrics writes it
	Value float64 `json:"value"`
}

// parseMetricLines reads the samples of the Prometheus text format, leaving
// out comments and histogram buckets.
func parseMetricLines(b []byte) []metricSample {
	var out []metricSample
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		name, value := line[:i], line[i+1:]
		if strings.Contains(name, "_bucket{") {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			continue
		}
		out = append(out, metricSample{Name: name, Value: v})
	}
	return out
}

// section writes a blank line, then the table rows writes, aligned.
func section(w io.Writer, rows func(tw io.Writer)) {
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	rows(tw)
	tw.Flush()
}

// printStats writes the /stats JSON as text.
func printStats(w io.Writer, st *statsJSON) {
	ms := func(v *float64) string {
		if v == nil {
			return "-"
		}
		return strconv.FormatFloat(*v, 'f', -1, 64) + "ms"
	}
	classes := func(m map[string]int64) string {
		var parts []string
		for _, k := range classNames {
			if m[k] > 0 {
				parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
			}
		}
		return strings.Join(parts, ", ")
	}
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintf(tw, "uptime\t%s\n", (time.Duration(st.UptimeSeconds) * time.Second).String())
	fmt.Fprintf(tw, "memory\t%s\n", st.Memory)
	fmt.Fprintf(tw, "goroutines\t%d\n", st.Threads)
	if by := classes(st.StatusCodes); by != "" {
		fmt.Fprintf(tw, "requests\t%d (%s), %d in flight\n", st.TotalReqs, by, st.InFlight)
	} else {
		fmt.Fprintf(tw, "requests\t%d, %d in flight\n", st.TotalReqs, st.InFlight)
	}
	l := st.LatencyMs
	fmt.Fprintf(tw, "latency\tavg %s  p50 %s  p95 %s  p99 %s\n", ms(l.Avg), ms(l.P50), ms(l.P95), ms(l.P99))
	tw.Flush()
	if len(st.Routes) > 0 {
		section(w, func(tw io.Writer) {
			fmt.Fprintln(tw, "Route\tRequests\tStatus\tp50\tp95")
			for _, r := range st.Routes {
				fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", r.Route, r.TotalReqs, classes(r.StatusCodes), ms(r.LatencyMs.P50), ms(r.LatencyMs.P95))
			}
		})
	}
	if len(st.Services) > 0 {
		section(w, func(tw io.Writer) {
			fmt.Fprintln(tw, "Service\tVia\tCalls\tSuccess\tp50\tp95\tp99\tRetries\tTimeouts\tNodes")
			for _, sv := range st.Services {
				success := "-"
				if sv.SuccessRate != nil {
					success = strconv.FormatFloat(100**sv.SuccessRate, 'f', -1, 64) + "%"
				}
				nodes := strconv.Itoa(sv.NodesTotal)
				if sv.NodesEjected > 0 {
					nodes += fmt.Sprintf(" (%d ejected)", sv.NodesEjected)
				}
				if sv.Service == otherService {
					nodes = "-"
				}
				l := sv.LatencyMs
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", sv.Service, sv.Handler, sv.TotalReqs, success,
					ms(l.P50), ms(l.P95), ms(l.P99), sv.Retries, sv.Timeouts, nodes)
			}
		})
	}
	if len(st.Topics) > 0 {
		section(w, func(tw io.Writer) {
			fmt.Fprintln(tw, "Topic\tSubscribers\tGroups\tPublished\tDelivered\tDropped\tSlow")
			for _, tp := range st.Topics {
				topic := tp.Topic
				if tp.Other {
					topic = "(other topics)"
				}
				fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\n", topic, tp.Subscribers, tp.QueueGroups, tp.Published, tp.Delivered, tp.Dropped, tp.SlowDisconnects)
			}
		})
	}
	// The components' samples that are not zero: most counters of a
	// sidecar are, and --json prints every one.
	var nonzero []metric
	for _, m := range st.Metrics {
		if m.Value != 0 {
			nonzero = append(nonzero, m)
		}
	}
	if len(nonzero) > 0 {
		section(w, func(tw io.Writer) {
			for _, m := range nonzero {
				fmt.Fprintf(tw, "%s%s\t%s\n", m.Name, formatLabels(m.Labels), formatFloat(m.Value))
			}
		})
	}
}

func formatLabels(m map[string]string) string {
	if len(m) == 0 {
		return ""
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + strconv.Quote(m[k])
	}
	return "{" + strings.Join(parts, ",") + "}"
}
