package main

// registry.go owns service discovery: the data model of the seeds, the
// Registry interface that backends implement, the in-memory backend with
// TTL expiry and watches, the /registry HTTP API, and which registry runs
// (newRegistry: memory, or a remote backend behind registry_cache.go).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Service is a named service and its nodes, in the JSON shape of the seeds.
// Field names decode case-insensitively ("Name", "Nodes", "Id", "Port").
// Services returned by a Registry are shared snapshots: do not modify them.
type Service struct {
	Name      string            `json:"name"`
	Version   string            `json:"version"`
	Metadata  map[string]string `json:"metadata"`
	Endpoints []*Endpoint       `json:"endpoints"`
	Nodes     []*Node           `json:"nodes"`
}

// Endpoint describes one method of a service. Request and response
// descriptions pass through as the registering app wrote them.
type Endpoint struct {
	Name     string            `json:"name"`
	Request  json.RawMessage   `json:"request,omitempty"`
	Response json.RawMessage   `json:"response,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// Node is one instance of a service. Version is the version of the service
// it was registered with: one service name can hold nodes of several
// versions at once (a canary), and each node says which it runs.
type Node struct {
	ID       string            `json:"id"`
	Address  string            `json:"address"`
	Port     int               `json:"port"`
	Metadata map[string]string `json:"metadata"`
	Version  string            `json:"version"`
}

// Event is one change seen by a watcher: "create" when a service gets its
// first node, "update" when nodes are added to or changed in a service,
// "delete" when nodes leave (deregistered or expired). Service holds only
// the nodes the event is about. Index increases by one with each event of
// the registry (registry_watch.go).
type Event struct {
	Action  string   `json:"action"`
	Index   uint64   `json:"index"`
	Service *Service `json:"service"`
}

// Registry is where services are registered and found. Implementations are
// safe for concurrent use; building one starts nothing, start begins its
// background work until ctx ends or Close, and Close (idempotent) stops it,
// waiting for its goroutines.
type Registry interface {
	// Register adds or renews the nodes of s. A positive ttl makes them
	// expire unless registered again within ttl; zero means never.
	Register(ctx context.Context, s *Service, ttl time.Duration) error
	// Deregister removes the nodes of s, by ID.
	Deregister(ctx context.Context, s *Service) error
	// GetService returns the service with all its nodes, or errNotFound.
	GetService(ctx context.Context, name string) (*Service, error)
	// ListServices returns the names of services that have nodes, sorted.
	ListServices(ctx context.Context) ([]string, error)
	// Watch opens a watch of the registry's events (of one service, and
	// from a resume point, as opts say) until ctx ends, the registry
	// closes, or the watch falls too far behind: it never blocks the
	// registry.
	Watch(ctx context.Context, opts watchOptions) (*watcher, error)
	// index returns the index of the latest event.
	index() uint64
	// setHistory sets how many recent events are kept for watches that
	// resume; call it before start.
	setHistory(events int)
	// size counts the services and nodes known here, for metrics.
	size() (services, nodes int)
	start(ctx context.Context)
	Close() error
}

var (
	errNotFound     = errors.New("registry: service not found")
	errRegistryFull = errors.New("registry: node limit reached")
)

const (
	maxNodes       = 100_000 // across all services: a bound on memory
	wsPingInterval = 30 * time.Second
	wsWriteTimeout = 10 * time.Second
)

// parseTTL reads the ?ttl= of a registration: empty or zero means no
// expiry; otherwise a positive Go duration such as 10s or 500ms.
func parseTTL(s string) (time.Duration, error) {
	if s == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("ttl %q is not a duration such as 10s or 500ms", s)
	}
	if d < 0 {
		return 0, fmt.Errorf("ttl %q is negative", s)
	}
	return d, nil
}

// memoryRegistry is the in-process Registry. Lookups return a snapshot that
// is rebuilt only after a change, so the RPC path pays no copy per call.
// Expired nodes are swept every sweep interval. Safe for concurrent use.
type memoryRegistry struct {
	sweep time.Duration
	now   func() time.Time
	log   *slog.Logger

	mu       sync.Mutex // guards services, watchers, nodes
	services map[string]*memService
	watchers watchers
	nodes    int

	stop      chan struct{}
	done      chan struct{}
	startOnce sync.Once
	closeOnce sync.Once
}

// memService is one service's state; its fields are guarded by
// memoryRegistry.mu.
type memService struct {
	version   string
	metadata  map[string]string
	endpoints []*Endpoint
	nodes     []*memNode     // in registration order
	index     map[string]int // node ID -> position in nodes
	snapshot  *Service       // nil after a change
}

// lookup finds node id; svc may be nil.
func (svc *memService) lookup(id string) (int, bool) {
	if svc == nil {
		return 0, false
	}
	i, ok := svc.index[id]
	return i, ok
}

type memNode struct {
	node    *Node     // immutable; replaced on change
	expires time.Time // zero: never
}

func newMemoryRegistry(sweep time.Duration, now func() time.Time, logger *slog.Logger) *memoryRegistry {
	if sweep <= 0 {
		sweep = 250 * time.Millisecond
	}
	return &memoryRegistry{
		sweep:    sweep,
		now:      now,
		log:      logger,
		services: map[string]*memService{},
		watchers: newWatchers(logger),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
}

// start runs the sweeper of expired nodes until ctx ends or Close.
func (m *memoryRegistry) start(ctx context.Context) {
	m.startOnce.Do(func() { go m.sweepLoop(ctx) })
}

// Close stops the sweeper and closes every watcher. Idempotent.
func (m *memoryRegistry) Close() error {
	m.closeOnce.Do(func() {
		close(m.stop)
		started := true
		m.startOnce.Do(func() { started = false })
		if started {
			<-m.done
		}
		m.mu.Lock()
		m.watchers.closeAll()
		m.mu.Unlock()
	})
	return nil
}

func (m *memoryRegistry) sweepLoop(ctx context.Context) {
	defer close(m.done)
	t := time.NewTicker(m.sweep)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-ctx.Done():
			return
		case <-t.C:
			m.expire()
		}
	}
}

// expire removes the nodes whose TTL has passed and tells watchers.
func (m *memoryRegistry) expire() {
	now := m.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	for name, svc := range m.services {
		var gone []*Node
		for _, n := range svc.nodes {
			if !n.expires.IsZero() && now.After(n.expires) {
				gone = append(gone, n.node)
			}
		}
		for _, n := range gone {
			m.removeLocked(name, svc, n.ID)
		}
		if len(gone) > 0 {
			m.log.Debug("nodes expired", "service", name, "nodes", len(gone))
			m.notifyLocked("delete", name, svc, gone)
		}
	}
}

func (m *memoryRegistry) Register(ctx context.Context, s *Service, ttl time.Duration) error {
	if err := s.validate(true); err != nil {
		return err
	}
	var expires time.Time
	if ttl > 0 {
		expires = m.now().Add(ttl)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	svc := m.services[s.Name]
	created := svc == nil || len(svc.nodes) == 0
	fresh := 0
	for _, n := range s.Nodes {
		if _, ok := svc.lookup(n.ID); !ok {
			fresh++
		}
	}
	if m.nodes+fresh > maxNodes {
		return fmt.Errorf("%w (%d nodes)", errRegistryFull, maxNodes)
	}
	if svc == nil {
		svc = &memService{index: map[string]int{}}
		m.services[s.Name] = svc
	}
	if svc.version != s.Version || !maps.Equal(svc.metadata, s.Metadata) || !endpointsEqual(svc.endpoints, s.Endpoints) {
		svc.version, svc.metadata, svc.endpoints = s.Version, cloneMap(s.Metadata), cloneEndpoints(s.Endpoints)
		svc.snapshot = nil
	}
	var changed []*Node
	for _, in := range s.Nodes {
		i, ok := svc.index[in.ID]
		if ok {
			cur := svc.nodes[i]
			cur.expires = expires // a renewal: the heartbeat
			if sameNode(cur.node, in, s.Version) {
				continue
			}
		}
		n := &Node{ID: in.ID, Address: in.Address, Port: in.Port, Metadata: cloneMap(in.Metadata), Version: s.Version}
		changed = append(changed, n)
		if ok {
			svc.nodes[i].node = n
			continue
		}
		svc.index[n.ID] = len(svc.nodes)
		svc.nodes = append(svc.nodes, &memNode{node: n, expires: expires})
		m.nodes++
	}
	if len(changed) > 0 {
		svc.snapshot = nil
		action := "update"
		if created {
			action = "create"
		}
		m.notifyLocked(action, s.Name, svc, changed)
	}
	return nil
}

func (m *memoryRegistry) Deregister(ctx context.Context, s *Service) error {
	if err := s.validate(false); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	svc := m.services[s.Name]
	if svc == nil {
		return errNotFound
	}
	var gone []*Node
	for _, n := range s.Nodes {
		if i, ok := svc.index[n.ID]; ok {
			gone = append(gone, svc.nodes[i].node)
			m.removeLocked(s.Name, svc, n.ID)
		}
	}
	if len(gone) == 0 {
		return fmt.Errorf("%w: no node of %s has those ids", errNotFound, s.Name)
	}
	m.notifyLocked("delete", s.Name, svc, gone)
	return nil
}

// removeLocked drops node id from svc, and svc once it is empty.
func (m *memoryRegistry) removeLocked(name string, svc *memService, id string) {
	i := svc.index[id]
	last := len(svc.nodes) - 1
	svc.nodes[i] = svc.nodes[last]
	svc.index[svc.nodes[i].node.ID] = i
	svc.nodes[last] = nil
	svc.nodes = svc.nodes[:last]
	delete(svc.index, id)
	svc.snapshot = nil
	m.nodes--
	if len(svc.nodes) == 0 {
		delete(m.services, name)
	}
}

func (m *memoryRegistry) GetService(ctx context.Context, name string) (*Service, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	svc := m.services[name]
	if svc == nil {
		return nil, errNotFound
	}
	return svc.current(name), nil
}

// current returns the snapshot of svc, rebuilt if it changed.
// memoryRegistry.mu is held.
func (svc *memService) current(name string) *Service {
	if svc.snapshot == nil {
		nodes := make([]*Node, len(svc.nodes))
		for i, n := range svc.nodes {
			nodes[i] = n.node
		}
		svc.snapshot = svc.view(name, nodes)
	}
	return svc.snapshot
}

// view is the Service of svc with the given nodes.
func (svc *memService) view(name string, nodes []*Node) *Service {
	return &Service{
		Name:      name,
		Version:   svc.version,
		Metadata:  orEmpty(svc.metadata),
		Endpoints: orEmptySlice(svc.endpoints),
		Nodes:     nodes,
	}
}

func (m *memoryRegistry) ListServices(ctx context.Context) ([]string, error) {
	m.mu.Lock()
	names := make([]string, 0, len(m.services))
	for name := range m.services {
		names = append(names, name)
	}
	m.mu.Unlock()
	sort.Strings(names)
	return names, nil
}

func (m *memoryRegistry) Watch(ctx context.Context, opts watchOptions) (*watcher, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.stop:
		return nil, errors.New("registry: closed")
	default:
	}
	return m.watchers.add(ctx, &m.mu, opts, m.snapshotLocked), nil
}

// snapshotLocked returns every service, sorted by name, or the one named
// service (none if it has no nodes). m.mu is held.
func (m *memoryRegistry) snapshotLocked(service string) []*Service {
	if service != "" {
		if svc := m.services[service]; svc != nil {
			return []*Service{svc.current(service)}
		}
		return nil
	}
	names := make([]string, 0, len(m.services))
	for name := range m.services {
		names = append(names, name)
	}
	sort.Strings(names)
	out := make([]*Service, len(names))
	for i, name := range names {
		out[i] = m.services[name].current(name)
	}
	return out
}

func (m *memoryRegistry) index() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.watchers.index()
}

func (m *memoryRegistry) setHistory(events int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.watchers.setHistory(events)
}

// notifyLocked tells watchers that nodes of a service changed.
func (m *memoryRegistry) notifyLocked(action, name string, svc *memService, nodes []*Node) {
	if m.watchers.empty() {
		return
	}
	m.watchers.send(Event{Action: action, Service: svc.view(name, nodes)})
}

// size returns the number of services and nodes.
func (m *memoryRegistry) size() (services, nodes int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.services), m.nodes
}

// sameNode reports whether registering in with version changes nothing.
func sameNode(cur, in *Node, version string) bool {
	return cur.Address == in.Address && cur.Port == in.Port && cur.Version == version && maps.Equal(cur.Metadata, in.Metadata)
}

// nodesEqual reports whether a and b describe the same node.
func nodesEqual(a, b *Node) bool { return sameNode(a, b, b.Version) }

func endpointsEqual(a, b []*Endpoint) bool {
	return slices.EqualFunc(a, b, func(x, y *Endpoint) bool {
		return x != nil && y != nil && x.Name == y.Name && string(x.Request) == string(y.Request) &&
			string(x.Response) == string(y.Response) && maps.Equal(x.Metadata, y.Metadata)
	})
}

func cloneMap(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func cloneEndpoints(eps []*Endpoint) []*Endpoint {
	out := make([]*Endpoint, 0, len(eps))
	for _, e := range eps {
		if e != nil {
			c := *e
			c.Metadata = cloneMap(e.Metadata)
			out = append(out, &c)
		}
	}
	return out
}

func orEmpty(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

func orEmptySlice(e []*Endpoint) []*Endpoint {
	if e == nil {
		return []*Endpoint{}
	}
	return e
}

// registryAPI serves /registry over any Registry. Safe for concurrent use;
// its counters are read by /metrics.
type registryAPI struct {
	reg         Registry
	streams     *streams
	limit       int64 // bytes of a registration body (--max_body_bytes)
	maxNodes    int   // nodes of one registration (--registry_max_nodes)
	maxWatchers int   // open watches (--registry_max_watchers)
	// pingInterval is the time between a watch's pings (wsPingInterval);
	// a watch whose client sends nothing for twice as long is closed.
	pingInterval time.Duration
	writeTimeout time.Duration // of a write to a watch, and of its pings (wsWriteTimeout)
	self         selfAddrs
	log          *slog.Logger

	watching  atomic.Int64 // open watches, and those being opened
	refused   atomic.Int64 // watches refused beyond maxWatchers
	slow      atomic.Int64 // watches closed for falling behind
	resumes   atomic.Int64 // watches resumed from the history
	snapshots atomic.Int64 // watches that resumed with a snapshot
	selfRegs  atomic.Int64 // registrations refused at the sidecar's own address
}

func newRegistryAPI(reg Registry, st *streams, cfg *Config, logger *slog.Logger) *registryAPI {
	reg.setHistory(cfg.RegistryHistory)
	return &registryAPI{
		reg:          reg,
		streams:      st,
		limit:        cfg.MaxBodyBytes,
		maxNodes:     cfg.RegistryMaxNodes,
		maxWatchers:  cfg.RegistryMaxWatchers,
		pingInterval: wsPingInterval,
		writeTimeout: wsWriteTimeout,
		log:          logger,
	}
}

// setSelf records where this sidecar listens (bound) and where others
// reach it (advertised, --broker_address: optional), so that no node is
// registered there. Call it once the listener is bound (setAdvertise does).
func (a *registryAPI) setSelf(bound net.Addr, advertised string) {
	if t, ok := bound.(*net.TCPAddr); ok {
		a.self.add(t.IP, t.Port)
	}
	if host, port, err := splitHostPort(advertised); err == nil {
		a.self.addHostPort(host, port)
	}
}

// serviceName is one row of GET /registry.
type serviceName struct {
	Name string `json:"name"`
}

// handleGet lists services, returns one with ?service=NAME, or streams
// watch events over a websocket upgrade (of one service with ?service=,
// resumed after an index with ?since=). Each answer carries the index of
// the latest event in X-Registry-Index, read before the registry: the
// answer holds at least every change up to it, so a watch resumed from it
// misses nothing.
func (a *registryAPI) handleGet(w http.ResponseWriter, r *http.Request) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		writeError(w, http.StatusBadRequest, "invalid query %q: %v", r.URL.RawQuery, err)
		return
	}
	name, one := "", false
	if v, ok := q["service"]; ok {
		name, one = v[0], true
		if err := checkName("service", name); err != nil {
			writeError(w, http.StatusBadRequest, "invalid query: %v", err)
			return
		}
	}
	if isWebsocket(r) {
		opts, err := parseWatch(name, q)
		if err != nil {
			writeError(w, http.StatusBadRequest, "invalid query: %v", err)
			return
		}
		a.watch(w, r, opts)
		return
	}
	if q.Has("since") {
		writeError(w, http.StatusBadRequest, "since is for watches: GET /registry?since=N with a websocket upgrade")
		return
	}
	w.Header().Set(indexHeader, strconv.FormatUint(a.reg.index(), 10))
	if one {
		svc, err := a.reg.GetService(r.Context(), name)
		if errors.Is(err, errNotFound) {
			writeError(w, http.StatusNotFound, "service %q not found", name)
			return
		}
		if err != nil {
			writeError(w, http.StatusServiceUnavailable, "lookup %s: %v", name, err)
			return
		}
		writeJSON(w, http.StatusOK, svc)
		return
	}
	names, err := a.reg.ListServices(r.Context())
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, "list services: %v", err)
		return
	}
	out := make([]serviceName, len(names))
	for i, n := range names {
		out[i] = serviceName{Name: n}
	}
	writeJSON(w, http.StatusOK, out)
}

// readService reads and validates the Service in the request body: a
// registration (needAddr) or a deregistration.
func (a *registryAPI) readService(w http.ResponseWriter, r *http.Request, needAddr bool) (*Service, error) {
	body, err := readBody(w, r, a.limit)
	if err != nil {
		var he *httpError
		if errors.As(err, &he) && he.code == http.StatusRequestEntityTooLarge {
			return nil, errorf(he.code, "registration body exceeds %d bytes (--max_body_bytes)", a.limit)
		}
		return nil, err
	}
	var s Service
	if err := decodeJSON(body, &s); err != nil {
		return nil, err
	}
	if len(s.Nodes) > a.maxNodes {
		return nil, errorf(http.StatusRequestEntityTooLarge, "%d nodes in one request; at most %d (--registry_max_nodes): register them in several requests", len(s.Nodes), a.maxNodes)
	}
	if err := s.validate(needAddr); err != nil {
		return nil, errorf(http.StatusBadRequest, "invalid service: %v", err)
	}
	if !needAddr {
		return &s, nil
	}
	if err := a.self.check(&s); err != nil {
		a.selfRegs.Add(1)
		return nil, errorf(http.StatusBadRequest, "invalid service: %v", err)
	}
	for _, n := range s.Nodes {
		normalizeAddress(n)
	}
	return &s, nil
}

func (a *registryAPI) handleRegister(w http.ResponseWriter, r *http.Request) {
	ttl, err := parseTTL(r.URL.Query().Get("ttl"))
	if err != nil {
		writeError(w, http.StatusBadRequest, "%v", err)
		return
	}
	s, err := a.readService(w, r, true)
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	if err := a.reg.Register(r.Context(), s, ttl); err != nil {
		code := http.StatusServiceUnavailable
		if errors.Is(err, errRegistryFull) {
			code = http.StatusInsufficientStorage
		}
		writeError(w, code, "register %s: %v", s.Name, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

func (a *registryAPI) handleDeregister(w http.ResponseWriter, r *http.Request) {
	s, err := a.readService(w, r, false)
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	if err := a.reg.Deregister(r.Context(), s); err != nil {
		code := http.StatusServiceUnavailable
		if errors.Is(err, errNotFound) {
			code = http.StatusNotFound
		}
		writeError(w, code, "deregister %s: %v", s.Name, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

// metrics emits the watch counters and the registry's index.
func (a *registryAPI) metrics(emit emitFunc) {
	emit("sidecar_registry_index", "Index of the latest registry event.", "gauge", float64(a.reg.index()))
	emit("sidecar_registry_watchers", "Open registry watches.", "gauge", float64(a.watching.Load()))
	emit("sidecar_registry_watchers_refused_total", "Registry watches refused beyond --registry_max_watchers.", "counter", float64(a.refused.Load()))
	emit("sidecar_registry_watchers_slow_total", "Registry watches closed for falling behind (1013) or a write timing out.", "counter", float64(a.slow.Load()))
	const resumed = "Registry watches resumed with ?since=, by how: replayed from the history, or a snapshot."
	emit("sidecar_registry_watch_resumes_total", resumed, "counter", float64(a.resumes.Load()), "from", "history")
	emit("sidecar_registry_watch_resumes_total", resumed, "counter", float64(a.snapshots.Load()), "from", "snapshot")
	emit("sidecar_registry_self_refused_total", "Registrations refused for a node at the sidecar's own address.", "counter", float64(a.selfRegs.Load()))
	if c, ok := a.reg.(interface{ invalidRemoteNodes() int64 }); ok {
		emit("sidecar_registry_remote_invalid_total", "Nodes (or services) from the remote registry dropped because they fail validation.", "counter", float64(c.invalidRemoteNodes()))
	}
}

// validateRegistry checks --registry and --registry_address; Config.validate
// calls it.
func validateRegistry(c *Config) error {
	switch c.Registry {
	case "memory":
		return nil
	case "consul":
		if c.RegistryAddress == "" {
			return nil // CONSUL_HTTP_ADDR or 127.0.0.1:8500
		}
	case "sidecar":
		if c.RegistryAddress == "" {
			return errors.New("flag --registry sidecar needs --registry_address http://host:port of another sidecar")
		}
	default:
		return fmt.Errorf("invalid value %q for flag --registry: want memory, consul or sidecar", c.Registry)
	}
	if _, err := httpBaseURL(c.RegistryAddress); err != nil {
		return fmt.Errorf("invalid value %q for flag --registry_address: %v", c.RegistryAddress, err)
	}
	return nil
}

// newRegistry builds the backend named by cfg.Registry. Remote backends come
// wrapped in a cachedRegistry.
func newRegistry(cfg *Config, logger *slog.Logger) (Registry, error) {
	t := remoteTimingOf(cfg)
	switch cfg.Registry {
	case "", "memory":
		return newMemoryRegistry(cfg.RegistrySweep, cfg.clock(), logger), nil
	case "consul":
		addr := cfg.RegistryAddress
		if addr == "" {
			addr = os.Getenv("CONSUL_HTTP_ADDR")
		}
		if addr == "" {
			addr = "127.0.0.1:8500"
		}
		b, err := newConsulBackend(addr, os.Getenv("CONSUL_HTTP_TOKEN"), t, logger.With("backend", "consul"))
		if err != nil {
			return nil, err
		}
		return newCachedRegistry(b, t, cfg.RegistrySweep, cfg.clock(), logger), nil
	case "sidecar":
		b, err := newSidecarBackend(cfg.RegistryAddress, cfg.AuthToken, t, logger.With("backend", "sidecar"))
		if err != nil {
			return nil, err
		}
		return newCachedRegistry(b, t, cfg.RegistrySweep, cfg.clock(), logger), nil
	}
	return nil, fmt.Errorf("registry: unknown backend %q", cfg.Registry)
}
