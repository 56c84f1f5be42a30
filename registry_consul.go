package main

// registry_consul.go is the Consul registry backend, written against Consul's HTTP
// API (no client library): registrations become agent services with a TTL
// check, lookups read passing instances from the health endpoint, and the
// cache in front of it is kept fresh with blocking queries: one on the
// catalog's list of services, and one per watched service (registry_cache.go
// decides which, within the connection bound). A first lookup reads the
// agent's cache (?cached), which the agent keeps fresh itself.
//
// Mapping between the seeds' model and Consul:
//
//	Node.ID        Consul service ID (unique per agent: two services of the
//	               sidecar must not share a node ID on one agent)
//	Service.Name   Consul service name
//	Node.Address   Service.Address, or the Consul node's address when empty
//	Node.Port      Service.Port
//	Version        Service.Meta["version"]
//	Node.Metadata  Service.Meta, for the keys Consul accepts (at most 63,
//	               [A-Za-z0-9_-], up to 128 bytes, not "consul-"..., values up
//	               to 512 bytes); the full metadata, the service metadata and
//	               the endpoints also travel in one tag "sidecar=<base64 JSON>"
//	               so that they round-trip exactly between sidecars.
//
// A service registered by another tool has no such tag: its Meta becomes
// the node metadata and its Meta["version"] the version.

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	consulTag          = "sidecar="
	consulMaxMeta      = 64
	consulMaxMetaKey   = 128
	consulMaxMetaValue = 512
	consulMaxTag       = 32 << 10 // past this, endpoints are left out of the tag
	consulMinReap      = time.Minute
	consulMinInterval  = 50 * time.Millisecond // between two blocking queries of one watch
	consulCatalogLimit = 16 << 20              // the list of services carries each service's tags (the sidecar tag is per node)
	consulHealthLimit  = 16 << 20
	consulSmallLimit   = 64 << 10
)

// consulBackend talks to one Consul agent. Safe for concurrent use.
type consulBackend struct {
	base   string // scheme://host:port
	token  string
	timing remoteTiming
	rc     *remoteClient // the one connection pool to the agent, counted
	log    *slog.Logger

	blockingOpen atomic.Int64 // blocking queries in flight

	// mu guards sent: the body each node was last registered with, so that
	// a renewal with the same data only passes the TTL check. Entries go
	// when the cache forgets the node (expiry, deregistration), so sent
	// holds at most the live local registrations.
	mu   sync.Mutex
	sent map[string]string // service ID -> body last registered with a TTL check
}

// newConsulBackend builds the backend of the agent at addr (host:port or
// an http(s) URL); t comes from remoteTimingOf.
func newConsulBackend(addr, token string, t remoteTiming, logger *slog.Logger) (*consulBackend, error) {
	u, err := httpBaseURL(addr)
	if err != nil {
		return nil, fmt.Errorf("registry: consul address %q: %w", addr, err)
	}
	return &consulBackend{
		base:   u.String(),
		token:  token,
		timing: t,
		rc:     newRemoteClient("consul", t, 0, logger),
		log:    logger,
		sent:   map[string]string{},
	}, nil
}

func (b *consulBackend) close() { b.rc.close() }

// watchBudget implements remoteBackend: each watch holds a connection.
func (b *consulBackend) watchBudget() int { return b.timing.blockingBudget() }

// metrics implements remoteBackend.
func (b *consulBackend) metrics(emit emitFunc) {
	emit("sidecar_registry_blocking_queries", "Blocking queries open on Consul (the list of services and each watched service).", "gauge", float64(b.blockingOpen.Load()))
	b.rc.metrics(emit)
}

// call sends one request and decodes a JSON answer into out (when not nil),
// reading at most limit bytes. It returns the X-Consul-Index header. A
// non-2xx answer is a *statusError.
func (b *consulBackend) call(ctx context.Context, method, path string, q url.Values, body any, out any, limit int64) (string, error) {
	u := b.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := newJSONRequest(ctx, method, u, body)
	if err != nil {
		return "", fmt.Errorf("%w: %v", errRejected, err)
	}
	if b.token != "" {
		req.Header.Set("X-Consul-Token", b.token)
	}
	resp, _, err := callJSON(b.rc.client, req, limit, out)
	if err != nil {
		return "", fmt.Errorf("consul: %s %s: %w", method, path, err)
	}
	return resp.Header.Get("X-Consul-Index"), nil
}

// blocking runs one blocking query: it returns when the data behind path
// changes past index, or after the wait. The index it returns is valid for
// the next call (it resets to 0 when Consul's index went backwards).
func (b *consulBackend) blocking(ctx context.Context, path string, q url.Values, index uint64, limit int64, out any) (uint64, error) {
	if q == nil {
		q = url.Values{}
	}
	timeout := b.timing.timeout
	if index > 0 {
		q.Set("index", strconv.FormatUint(index, 10))
		q.Set("wait", b.timing.wait.String())
		timeout += b.timing.wait + b.timing.wait/16 // Consul adds up to wait/16 of jitter
		b.blockingOpen.Add(1)
		defer b.blockingOpen.Add(-1)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	h, err := b.call(ctx, http.MethodGet, path, q, nil, out, limit)
	if err != nil {
		return index, err
	}
	next, err := strconv.ParseUint(h, 10, 64)
	if err != nil {
		return index, fmt.Errorf("consul: GET %s: bad X-Consul-Index %q", path, h)
	}
	switch {
	case next < index:
		return 0, nil // Consul restarted or the raft index was reset
	case next == 0:
		return 1, nil // index 0 would not block
	}
	return next, nil
}

// consulRegistration is the body of PUT /v1/agent/service/register.
type consulRegistration struct {
	ID      string
	Name    string
	Tags    []string          `json:",omitempty"`
	Address string            `json:",omitempty"`
	Port    int               `json:",omitempty"`
	Meta    map[string]string `json:",omitempty"`
	Check   *consulCheck      `json:",omitempty"`
}

type consulCheck struct {
	CheckID                        string
	Name                           string
	TTL                            string
	Status                         string
	DeregisterCriticalServiceAfter string
}

// consulExtra is what the sidecar tag carries: what Meta cannot hold.
type consulExtra struct {
	Metadata  map[string]string `json:"m,omitempty"`
	Endpoints []*Endpoint       `json:"e,omitempty"`
	NodeMeta  map[string]string `json:"n,omitempty"`
}

func consulCheckID(nodeID string) string { return "sidecar:" + nodeID }

// consulMetaKeyOK reports whether Consul accepts k as a Meta key.
func consulMetaKeyOK(k string) bool {
	if k == "" || len(k) > consulMaxMetaKey || strings.HasPrefix(strings.ToLower(k), "consul-") {
		return false
	}
	for _, r := range k {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// consulBody maps one node of s to an agent service registration.
func (b *consulBackend) consulBody(s *Service, n *Node, ttl time.Duration) *consulRegistration {
	reg := &consulRegistration{ID: n.ID, Name: s.Name, Address: n.Address, Port: n.Port, Meta: map[string]string{}}
	if s.Version != "" && len(s.Version) <= consulMaxMetaValue {
		reg.Meta["version"] = s.Version
	}
	keys := make([]string, 0, len(n.Metadata))
	for k := range n.Metadata {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := n.Metadata[k]
		if len(reg.Meta) >= consulMaxMeta || k == "version" || !consulMetaKeyOK(k) || len(v) > consulMaxMetaValue {
			continue
		}
		reg.Meta[k] = v
	}
	extra := consulExtra{Metadata: s.Metadata, Endpoints: s.Endpoints, NodeMeta: n.Metadata}
	tag := encodeConsulExtra(extra)
	if len(tag) > consulMaxTag {
		extra.Endpoints = nil
		tag = encodeConsulExtra(extra)
		b.log.Warn("endpoints too large for consul; left out", "service", s.Name)
	}
	if len(tag) <= consulMaxTag {
		reg.Tags = []string{tag}
	}
	if ttl > 0 {
		reg.Check = &consulCheck{
			CheckID:                        consulCheckID(n.ID),
			Name:                           "sidecar TTL of " + n.ID,
			TTL:                            ttl.String(),
			Status:                         "passing",
			DeregisterCriticalServiceAfter: max(3*ttl, consulMinReap).String(),
		}
	}
	return reg
}

func encodeConsulExtra(e consulExtra) string {
	buf, _ := json.Marshal(e)
	return consulTag + base64.RawURLEncoding.EncodeToString(buf)
}

func decodeConsulExtra(tags []string) (consulExtra, bool) {
	for _, t := range tags {
		if rest, ok := strings.CutPrefix(t, consulTag); ok {
			buf, err := base64.RawURLEncoding.DecodeString(rest)
			var e consulExtra
			if err == nil && json.Unmarshal(buf, &e) == nil {
				return e, true
			}
		}
	}
	return consulExtra{}, false
}

// register sends each node of s. A node already registered with the same
// data and TTL is only renewed through its check's pass endpoint; when the
// agent no longer knows the check (restarted, or reaped after being
// critical), the node is registered again.
func (b *consulBackend) register(ctx context.Context, s *Service, ttl time.Duration) error {
	for _, n := range s.Nodes {
		body := b.consulBody(s, n, ttl)
		buf, _ := json.Marshal(body)
		fp := string(buf)
		b.mu.Lock()
		prev := b.sent[n.ID]
		b.mu.Unlock()
		if ttl > 0 && prev == fp {
			_, err := b.call(ctx, http.MethodPut, "/v1/agent/check/pass/"+url.PathEscape(consulCheckID(n.ID)), nil, nil, nil, consulSmallLimit)
			var se *statusError
			if err == nil {
				continue
			}
			if !errors.As(err, &se) {
				return err
			}
			b.log.Info("consul forgot a check; registering again", "service", s.Name, "node", n.ID, "err", err)
		}
		q := url.Values{"replace-existing-checks": {"true"}}
		_, err := b.call(ctx, http.MethodPut, "/v1/agent/service/register", q, body, nil, consulSmallLimit)
		var se *statusError
		if errors.As(err, &se) && se.code >= 400 && se.code < 500 && se.code != http.StatusTooManyRequests {
			return fmt.Errorf("%w: %v", errRejected, err)
		}
		if err != nil {
			return err
		}
		b.mu.Lock()
		if ttl > 0 {
			b.sent[n.ID] = fp
		} else {
			delete(b.sent, n.ID)
		}
		b.mu.Unlock()
	}
	return nil
}

// forget implements remoteBackend: the next registration of these nodes
// is a full one.
func (b *consulBackend) forget(s *Service) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, n := range s.Nodes {
		delete(b.sent, n.ID)
	}
}

func (b *consulBackend) deregister(ctx context.Context, s *Service) error {
	missing := 0
	for _, n := range s.Nodes {
		b.mu.Lock()
		delete(b.sent, n.ID)
		b.mu.Unlock()
		_, err := b.call(ctx, http.MethodPut, "/v1/agent/service/deregister/"+url.PathEscape(n.ID), nil, nil, nil, consulSmallLimit)
		var se *statusError
		switch {
		case err == nil:
		case errors.As(err, &se) && (se.code == http.StatusNotFound || strings.Contains(strings.ToLower(string(se.body)), "unknown service")):
			missing++
		case errors.As(err, &se) && se.code >= 400 && se.code < 500 && se.code != http.StatusTooManyRequests:
			return fmt.Errorf("%w: %v", errRejected, err)
		default:
			return err
		}
	}
	if missing == len(s.Nodes) {
		return fmt.Errorf("%w: no node of %s has those ids in consul", errNotFound, s.Name)
	}
	return nil
}

// consulEntry is one row of /v1/health/service/NAME.
type consulEntry struct {
	Node struct {
		Node    string
		Address string
	}
	Service struct {
		ID      string
		Service string
		Tags    []string
		Address string
		Meta    map[string]string
		Port    int
	}
}

// fetch implements remoteBackend: the passing instances of name, from the
// agent's cache (?cached: a client agent answers without asking the
// servers, and keeps the entry fresh in the background).
func (b *consulBackend) fetch(ctx context.Context, name string) (*Service, uint64, error) {
	return b.health(ctx, name, url.Values{"passing": {"true"}, "cached": {""}}, 0)
}

// health reads the passing instances of name, blocking past index when it
// is not zero.
func (b *consulBackend) health(ctx context.Context, name string, q url.Values, index uint64) (*Service, uint64, error) {
	var entries []consulEntry
	index, err := b.blocking(ctx, "/v1/health/service/"+url.PathEscape(name), q, index, consulHealthLimit, &entries)
	if err != nil {
		return nil, index, err
	}
	return consulService(name, entries), index, nil
}

// consulService maps health entries to a Service; nil when none pass.
func consulService(name string, entries []consulEntry) *Service {
	sort.Slice(entries, func(i, j int) bool { return entries[i].Service.ID < entries[j].Service.ID })
	svc := &Service{Name: name, Metadata: map[string]string{}, Endpoints: []*Endpoint{}}
	first, tagged := true, false
	for _, e := range entries {
		if e.Service.ID == "" {
			continue
		}
		n := &Node{ID: e.Service.ID, Address: e.Service.Address, Port: e.Service.Port, Version: e.Service.Meta["version"]}
		if n.Address == "" {
			n.Address = e.Node.Address
		}
		extra, ok := decodeConsulExtra(e.Service.Tags)
		if ok {
			n.Metadata = orEmpty(extra.NodeMeta)
		} else {
			n.Metadata = orEmpty(e.Service.Meta)
		}
		if first {
			svc.Version = n.Version
			first = false
		}
		if ok && !tagged {
			svc.Metadata, svc.Endpoints = orEmpty(extra.Metadata), orEmptySlice(extra.Endpoints)
			tagged = true
		}
		svc.Nodes = append(svc.Nodes, n)
	}
	if len(svc.Nodes) == 0 {
		return nil
	}
	return svc
}

// sync implements remoteBackend: one blocking query on the catalog's list
// of services, whatever the number of services.
func (b *consulBackend) sync(ctx context.Context, sink syncSink) {
	bo := newBackoff(b.timing.minBackoff, b.timing.maxBackoff)
	var index uint64
	first, truncated := true, false
	for {
		start := time.Now()
		var catalog map[string]json.RawMessage // name -> tags, which are not needed
		next, err := b.blocking(ctx, "/v1/catalog/services", nil, index, consulCatalogLimit, &catalog)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			sink.healthy(false, err)
			index = 0 // see watch
			d := bo.next()
			b.log.Debug("consul catalog watch failed", "err", err, "retry_in", d)
			if !sleepCtx(ctx, d) {
				return
			}
			continue
		}
		bo.reset()
		sink.healthy(true, nil)
		if first || next != index || index == 0 {
			names := consulNames(catalog)
			if len(names) == maxRemoteServices && len(catalog) > maxRemoteServices && !truncated {
				b.log.Warn("consul lists more services than the sidecar follows; the rest are left out", "services", len(catalog), "followed", maxRemoteServices)
				truncated = true
			}
			sink.listed(names)
			first = false
		}
		index = next
		if !sleepCtx(ctx, consulMinInterval-time.Since(start)) {
			return
		}
	}
}

// consulNames is the set of valid service names of a catalog listing, the
// first maxRemoteServices in sorted order.
func consulNames(catalog map[string]json.RawMessage) map[string]struct{} {
	sorted := make([]string, 0, len(catalog))
	for name := range catalog {
		if checkName("name", name) == nil {
			sorted = append(sorted, name)
		}
	}
	sort.Strings(sorted)
	names := make(map[string]struct{}, min(len(sorted), maxRemoteServices))
	for _, name := range sorted[:min(len(sorted), maxRemoteServices)] {
		names[name] = struct{}{}
	}
	return names
}

// watch implements remoteBackend with one blocking query at a time on the
// service's passing instances. It reports a state only when Consul's index
// moved (or after a failure), so an idle service costs one request per
// wait. On errors the cache keeps the last known instances and the watch
// backs off with jitter.
func (b *consulBackend) watch(ctx context.Context, name string, index uint64, report func(*Service, error)) {
	bo := newBackoff(b.timing.minBackoff, b.timing.maxBackoff)
	failing := false
	for {
		start := time.Now()
		svc, next, err := b.health(ctx, name, url.Values{"passing": {"true"}}, max(index, 1))
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			report(nil, err)
			failing = true
			// The next query does not block: Consul may be back with a
			// lower index (a restarted agent), and a query at the old one
			// would wait the whole wait before the sidecar saw it back.
			index = 0
			d := bo.next()
			b.log.Debug("consul service watch failed", "service", name, "err", err, "retry_in", d)
			if !sleepCtx(ctx, d) {
				return
			}
			continue
		}
		bo.reset()
		if next != index || failing {
			report(svc, nil)
		}
		failing = false
		index = next
		if !sleepCtx(ctx, consulMinInterval-time.Since(start)) {
			return
		}
	}
}
