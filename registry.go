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
	"net/http"
	"os"
	"slices"
	"sort"
	"sync"
	"time"
	"unicode"

	"github.com/coder/websocket"
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
	Version  string            `json:"version,omitempty"`
}

// Event is one change seen by a watcher: "create" when a service gets its
// first node, "update" when nodes are added to or changed in a service,
// "delete" when nodes leave (deregistered or expired). Service holds only
// the nodes the event is about.
type Event struct {
	Action  string   `json:"action"`
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
	// Watch returns events until ctx ends. The channel is closed when ctx
	// ends or when the watcher falls too far behind (it never blocks the
	// registry).
	Watch(ctx context.Context) (<-chan Event, error)
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
	maxNameLen     = 255
	maxNodes       = 100_000 // across all services: a bound on memory
	watchBuffer    = 256     // events a watcher may lag before it is dropped
	wsPingInterval = 30 * time.Second
	wsWriteTimeout = 10 * time.Second
)

// validate checks s as a registration (or, with needAddr false, as a
// deregistration, which only needs node IDs).
func (s *Service) validate(needAddr bool) error {
	if err := checkName("name", s.Name); err != nil {
		return err
	}
	if len(s.Nodes) == 0 {
		return errors.New(`field "nodes" must list at least one node`)
	}
	seen := make(map[string]bool, len(s.Nodes))
	for i, n := range s.Nodes {
		if err := checkNode(i, n, needAddr); err != nil {
			return err
		}
		if seen[n.ID] {
			return fmt.Errorf("nodes[%d].id %q appears twice", i, n.ID)
		}
		seen[n.ID] = true
	}
	return nil
}

// checkNode checks node i of a registration (needAddr) or deregistration.
func checkNode(i int, n *Node, needAddr bool) error {
	if n == nil {
		return fmt.Errorf("nodes[%d] is null", i)
	}
	if err := checkName(fmt.Sprintf("nodes[%d].id", i), n.ID); err != nil {
		return err
	}
	if !needAddr {
		return nil
	}
	if n.Address == "" || len(n.Address) > maxNameLen {
		return fmt.Errorf("nodes[%d].address is required (at most %d bytes)", i, maxNameLen)
	}
	if n.Port < 0 || n.Port > 65535 {
		return fmt.Errorf("nodes[%d].port %d is out of range 0-65535", i, n.Port)
	}
	return nil
}

// checkName accepts 1 to 255 printable characters without spaces.
func checkName(field, v string) error {
	if v == "" {
		return fmt.Errorf("field %q is required", field)
	}
	if len(v) > maxNameLen {
		return fmt.Errorf("field %q is longer than %d bytes", field, maxNameLen)
	}
	for _, r := range v {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return fmt.Errorf("field %q holds a space or control character", field)
		}
	}
	return nil
}

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
	if svc.version != s.Version || !mapsEqual(svc.metadata, s.Metadata) || !endpointsEqual(svc.endpoints, s.Endpoints) {
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
	if svc.snapshot == nil {
		nodes := make([]*Node, len(svc.nodes))
		for i, n := range svc.nodes {
			nodes[i] = n.node
		}
		svc.snapshot = svc.view(name, nodes)
	}
	return svc.snapshot, nil
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

func (m *memoryRegistry) Watch(ctx context.Context) (<-chan Event, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.stop:
		return nil, errors.New("registry: closed")
	default:
	}
	return m.watchers.add(ctx, &m.mu), nil
}

// notifyLocked tells watchers that nodes of a service changed.
func (m *memoryRegistry) notifyLocked(action, name string, svc *memService, nodes []*Node) {
	if m.watchers.empty() {
		return
	}
	m.watchers.send(Event{Action: action, Service: svc.view(name, nodes)})
}

// watchers are the channels of a registry's Watch calls. The registry's
// mutex guards them: it is held for every method, and add is given it for
// the removal when a watch's context ends. Sending under that lock keeps
// events in the order the changes happened.
type watchers struct {
	chans map[chan Event]struct{}
	log   *slog.Logger
}

func newWatchers(logger *slog.Logger) watchers {
	return watchers{chans: map[chan Event]struct{}{}, log: logger}
}

func (w *watchers) empty() bool { return len(w.chans) == 0 }

// add registers a watcher until ctx ends; mu is the owner's lock, held by
// the caller now and taken again for the removal.
func (w *watchers) add(ctx context.Context, mu *sync.Mutex) <-chan Event {
	ch := make(chan Event, watchBuffer)
	w.chans[ch] = struct{}{}
	context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		w.remove(ch)
	})
	return ch
}

// send gives ev to every watcher without blocking; a watcher whose buffer
// is full is dropped and its channel closed.
func (w *watchers) send(ev Event) {
	for ch := range w.chans {
		select {
		case ch <- ev:
		default:
			w.remove(ch)
			w.log.Warn("watcher fell behind; dropped")
		}
	}
}

func (w *watchers) remove(ch chan Event) {
	if _, ok := w.chans[ch]; ok {
		delete(w.chans, ch)
		close(ch)
	}
}

// closeAll ends every watch.
func (w *watchers) closeAll() {
	for ch := range w.chans {
		w.remove(ch)
	}
}

// size returns the number of services and nodes.
func (m *memoryRegistry) size() (services, nodes int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.services), m.nodes
}

// sameNode reports whether registering in with version changes nothing.
func sameNode(cur, in *Node, version string) bool {
	return cur.Address == in.Address && cur.Port == in.Port && cur.Version == version && mapsEqual(cur.Metadata, in.Metadata)
}

// nodesEqual reports whether a and b describe the same node.
func nodesEqual(a, b *Node) bool { return sameNode(a, b, b.Version) }

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func endpointsEqual(a, b []*Endpoint) bool {
	return slices.EqualFunc(a, b, func(x, y *Endpoint) bool {
		return x != nil && y != nil && x.Name == y.Name && string(x.Request) == string(y.Request) &&
			string(x.Response) == string(y.Response) && mapsEqual(x.Metadata, y.Metadata)
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

// registryAPI serves /registry over any Registry.
type registryAPI struct {
	reg     Registry
	streams *streams
	limit   int64
	log     *slog.Logger
}

func newRegistryAPI(reg Registry, st *streams, limit int64, logger *slog.Logger) *registryAPI {
	return &registryAPI{reg: reg, streams: st, limit: limit, log: logger}
}

// serviceName is one row of GET /registry.
type serviceName struct {
	Name string `json:"name"`
}

// handleGet lists services, returns one with ?service=NAME, or streams
// watch events over a websocket upgrade.
func (a *registryAPI) handleGet(w http.ResponseWriter, r *http.Request) {
	if isWebsocket(r) {
		a.watch(w, r)
		return
	}
	q := r.URL.Query()
	if q.Has("service") {
		name := q.Get("service")
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

// readService reads and validates the Service in the request body.
func (a *registryAPI) readService(w http.ResponseWriter, r *http.Request, needAddr bool) (*Service, error) {
	body, err := readBody(w, r, a.limit)
	if err != nil {
		return nil, err
	}
	var s Service
	if err := decodeJSON(body, &s); err != nil {
		return nil, err
	}
	if err := s.validate(needAddr); err != nil {
		return nil, errorf(http.StatusBadRequest, "invalid service: %v", err)
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

// watch streams registry events to a websocket client, one text frame each,
// until the client leaves, falls behind, or the sidecar shuts down.
func (a *registryAPI) watch(w http.ResponseWriter, r *http.Request) {
	// Watch before the handshake completes, so a client that is connected
	// sees every change made after that.
	wctx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	events, err := a.reg.Watch(wctx)
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, "watch: %v", err)
		return
	}
	conn, ctx, done := a.streams.accept(w, r, 1024)
	if conn == nil {
		return
	}
	defer done()
	// Watchers only listen: CloseRead answers control frames, closes the
	// connection on any data frame, and its context ends when the client
	// leaves. It gets its own context because cancelling the one it is
	// given drops the connection without a close frame.
	gone := conn.CloseRead(context.Background())
	ping := time.NewTicker(wsPingInterval)
	defer ping.Stop()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				code, reason := websocket.StatusTryAgainLater, "watcher fell behind"
				if ctx.Err() != nil {
					code, reason = a.streams.closeStatus()
				}
				conn.Close(code, reason)
				return
			}
			b, err := json.Marshal(ev)
			if err == nil {
				err = writeTimeout(conn, b)
			}
			if err != nil {
				conn.CloseNow()
				return
			}
		case <-ping.C:
			pctx, cancel := context.WithTimeout(context.Background(), wsWriteTimeout)
			err := conn.Ping(pctx)
			cancel()
			if err != nil {
				conn.CloseNow()
				return
			}
		case <-gone.Done():
			conn.CloseNow()
			return
		case <-ctx.Done():
			code, reason := a.streams.closeStatus()
			conn.Close(code, reason)
			return
		}
	}
}

// writeTimeout writes one text frame, giving up after wsWriteTimeout so a
// client that stopped reading cannot hold a handler forever. It does not
// take the stream's context: cancelling a write midway drops the
// connection, and shutdown wants to finish the frame, then say goodbye.
func writeTimeout(conn *websocket.Conn, b []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), wsWriteTimeout)
	defer cancel()
	return conn.Write(ctx, websocket.MessageText, b)
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
		if _, err := consulBaseURL(c.RegistryAddress); err != nil {
			return fmt.Errorf("invalid value %q for flag --registry_address: %v", c.RegistryAddress, err)
		}
		return nil
	case "sidecar":
		if c.RegistryAddress == "" {
			return errors.New("flag --registry sidecar needs --registry_address http://host:port of another sidecar")
		}
		if _, err := sidecarBaseURL(c.RegistryAddress); err != nil {
			return fmt.Errorf("invalid value %q for flag --registry_address: %v", c.RegistryAddress, err)
		}
		return nil
	}
	return fmt.Errorf("invalid value %q for flag --registry: want memory, consul or sidecar", c.Registry)
}

// newRegistry builds the backend named by cfg.Registry. Remote backends come
// wrapped in a cachedRegistry.
func newRegistry(cfg *Config, logger *slog.Logger) (Registry, error) {
	t := remoteTimingOf(cfg)
	switch cfg.Registry {
	case "", "memory":
		return newMemoryRegistry(cfg.RegistrySweep, time.Now, logger), nil
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
		return newCachedRegistry(b, t, cfg.RegistrySweep, logger), nil
	case "sidecar":
		b, err := newSidecarBackend(cfg.RegistryAddress, cfg.AuthToken, t, logger.With("backend", "sidecar"))
		if err != nil {
			return nil, err
		}
		return newCachedRegistry(b, t, cfg.RegistrySweep, logger), nil
	}
	return nil, fmt.Errorf("registry: unknown backend %q", cfg.Registry)
}
