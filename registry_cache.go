package main

// registry_cache.go owns cachedRegistry, the local cache that sits in front
// of every remote backend (Consul, another sidecar) so that lookups never
// wait on the network and keep working while the backend is unreachable.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of the remote registry timings; Config fields left zero use them.
const (
	defaultRegistryTimeout = 5 * time.Second  // one call to the backend
	defaultRegistryWait    = 30 * time.Second // one blocking query or watch idle check
	remoteMinBackoff       = 100 * time.Millisecond
	remoteMaxBackoff       = 5 * time.Second
	maxRemoteServices      = 10_000 // services the cache follows: a bound on memory and goroutines
)

// remoteTiming holds the durations of a remote backend.
type remoteTiming struct {
	timeout    time.Duration // one ordinary call
	wait       time.Duration // one blocking query; watch liveness checks
	minBackoff time.Duration
	maxBackoff time.Duration
}

func remoteTimingOf(cfg *Config) remoteTiming {
	t := remoteTiming{
		timeout:    cfg.RegistryTimeout,
		wait:       cfg.RegistryWait,
		minBackoff: remoteMinBackoff,
		maxBackoff: remoteMaxBackoff,
	}
	if t.timeout <= 0 {
		t.timeout = defaultRegistryTimeout
	}
	if t.wait <= 0 {
		t.wait = defaultRegistryWait
	}
	if t.maxBackoff > t.wait {
		t.maxBackoff = max(t.wait, t.minBackoff)
	}
	return t
}

// remoteBackend is a registry held elsewhere. cachedRegistry is its only
// caller: it serializes nothing, so implementations are safe for concurrent
// use. Errors that a retry cannot fix (the backend refused the data) wrap
// errRejected; anything else is retried.
type remoteBackend interface {
	// register adds or renews the nodes of s with ttl (zero: no expiry).
	register(ctx context.Context, s *Service, ttl time.Duration) error
	// deregister removes the nodes of s by ID; errNotFound if none exist.
	deregister(ctx context.Context, s *Service) error
	// forget drops whatever the backend keeps about the nodes of s (by
	// ID): the cache calls it whenever it drops local registrations
	// (expiry, deregistration, rejection), so per-node state stays bounded
	// by the live registrations. It must not call the backend, and
	// forgetting too much is harmless (a registration only costs more).
	forget(s *Service)
	// sync keeps sink up to date with the backend until ctx ends. It
	// calls sink.healthy after every success and failure of its watch.
	sync(ctx context.Context, sink syncSink)
	// close releases idle connections.
	close()
}

// syncSink is what a backend's sync loop feeds: cachedRegistry.
type syncSink interface {
	// replaceAll sets the state of every service at once (a full resync).
	replaceAll(all map[string]*Service)
	// update sets one service's state; nil or no nodes: it is gone.
	update(name string, svc *Service)
	// healthy reports whether the backend answered the last watch call.
	healthy(ok bool, err error)
}

// errRejected marks a backend's refusal that retrying cannot fix.
var errRejected = errors.New("registry: rejected")

// localReg is a registration made through this sidecar, remembered so it
// can be re-sent when the backend comes back.
type localReg struct {
	svc     *Service // one node
	ttl     time.Duration
	expires time.Time // zero: never
	sent    bool      // the backend has it, as far as we know
}

// cachedRegistry is the Registry of a remote backend: lookups and watches
// are answered from memory, which the backend's sync loop keeps fresh and
// which stays (stale) while the backend is unreachable. Registrations made
// through it are remembered until they expire or are deregistered, and
// re-sent whenever the backend comes back (a restarted Consul agent forgets
// its services). A registration that cannot reach the backend is accepted
// and queued. Local registrations are visible in local lookups at once.
// Safe for concurrent use; Close waits for its goroutines.
type cachedRegistry struct {
	backend remoteBackend
	timing  remoteTiming
	sweep   time.Duration
	log     *slog.Logger
	now     func() time.Time

	mu       sync.Mutex                      // guards the fields below
	remote   map[string]*Service             // last known backend state, by service
	local    map[string]map[string]*localReg // service -> node ID -> registration
	deregs   map[string]*Service             // "service\x00node" -> pending deregistration
	view     map[string]*Service             // remote merged with local: what lookups see
	nodes    int                             // nodes in view
	watchers watchers
	up       bool // the backend answered the last sync call
	down     bool // the last sync call failed: calls are queued, not tried
	synced   bool // at least one full state arrived
	closed   bool

	syncedc chan struct{} // closed when synced first becomes true
	kick    chan struct{} // wakes the resend loop; buffered 1

	startOnce sync.Once
	closeOnce sync.Once
	cancel    context.CancelFunc
	wg        sync.WaitGroup

	invalid       atomic.Int64 // nodes and services from the backend that failed validation
	invalidLogged atomic.Int64 // unix time of the last log line about them
}

func newCachedRegistry(b remoteBackend, t remoteTiming, sweep time.Duration, logger *slog.Logger) *cachedRegistry {
	if sweep <= 0 {
		sweep = 250 * time.Millisecond
	}
	return &cachedRegistry{
		backend:  b,
		timing:   t,
		sweep:    sweep,
		log:      logger,
		now:      time.Now,
		remote:   map[string]*Service{},
		local:    map[string]map[string]*localReg{},
		deregs:   map[string]*Service{},
		view:     map[string]*Service{},
		watchers: newWatchers(logger),
		syncedc:  make(chan struct{}),
		kick:     make(chan struct{}, 1),
	}
}

// start runs the backend's sync loop, the resend loop and the sweeper of
// expired local registrations. ctx is not used for their lifetime: Close
// ends them.
func (c *cachedRegistry) start(context.Context) {
	c.startOnce.Do(func() {
		ctx, cancel := context.WithCancel(context.Background())
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			cancel()
			return
		}
		c.cancel = cancel
		c.mu.Unlock()
		c.wg.Add(3)
		go func() { defer c.wg.Done(); c.backend.sync(ctx, c) }()
		go func() { defer c.wg.Done(); c.resendLoop(ctx) }()
		go func() { defer c.wg.Done(); c.sweepLoop(ctx) }()
	})
}

// Close stops the loops, waits for them and closes every watcher. Local
// registrations are not deregistered: their TTLs end them.
func (c *cachedRegistry) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true
		cancel := c.cancel
		c.mu.Unlock()
		if cancel != nil {
			cancel()
		}
		c.wg.Wait()
		c.backend.close()
		c.mu.Lock()
		c.watchers.closeAll()
		c.mu.Unlock()
	})
	return nil
}

func (c *cachedRegistry) Register(ctx context.Context, s *Service, ttl time.Duration) error {
	if err := s.validate(true); err != nil {
		return err
	}
	var expires time.Time
	if ttl > 0 {
		expires = c.now().Add(ttl)
	}
	c.mu.Lock()
	regs := c.local[s.Name]
	fresh := 0
	for _, n := range s.Nodes {
		if regs[n.ID] == nil {
			fresh++
		}
	}
	if c.nodes+fresh > maxNodes {
		c.mu.Unlock()
		return fmt.Errorf("%w (%d nodes)", errRegistryFull, maxNodes)
	}
	if regs == nil {
		regs = map[string]*localReg{}
		c.local[s.Name] = regs
	}
	for _, n := range s.Nodes {
		one := singleNode(s, n)
		regs[n.ID] = &localReg{svc: one, ttl: ttl, expires: expires}
		delete(c.deregs, regKey(s.Name, n.ID))
	}
	down := c.down
	c.refreshLocked(s.Name)
	c.mu.Unlock()

	if down {
		c.log.Debug("backend unreachable; registration queued", "service", s.Name)
		c.signal()
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, c.timing.timeout)
	defer cancel()
	err := c.backend.register(ctx, s, ttl)
	switch {
	case errors.Is(err, errRejected):
		c.forget(s)
		return err
	case err != nil:
		c.log.Warn("register failed; queued for retry", "service", s.Name, "err", err)
		c.signal()
		return nil
	}
	c.markSent(s, ttl)
	return nil
}

// forget drops the local registrations of s's nodes, here and in the
// backend's state.
func (c *cachedRegistry) forget(s *Service) {
	c.mu.Lock()
	regs := c.local[s.Name]
	for _, n := range s.Nodes {
		delete(regs, n.ID)
	}
	if len(regs) == 0 {
		delete(c.local, s.Name)
	}
	c.refreshLocked(s.Name)
	c.mu.Unlock()
	c.backend.forget(s)
}

// markSent records that the backend took the registrations of s (unless a
// newer registration or a deregistration replaced them meanwhile). A node
// whose registration expired or was deregistered while the call was in
// flight is forgotten by the backend again: the sweep's forget may have
// run before the backend stored its state.
func (c *cachedRegistry) markSent(s *Service, ttl time.Duration) {
	var gone []*Node
	c.mu.Lock()
	for _, n := range s.Nodes {
		r := c.local[s.Name][n.ID]
		switch {
		case r == nil:
			gone = append(gone, &Node{ID: n.ID})
		case r.ttl == ttl && nodesEqual(r.svc.Nodes[0], n):
			r.sent = true
		}
	}
	c.mu.Unlock()
	if len(gone) > 0 {
		c.backend.forget(&Service{Name: s.Name, Nodes: gone})
	}
}

func (c *cachedRegistry) Deregister(ctx context.Context, s *Service) error {
	if err := s.validate(false); err != nil {
		return err
	}
	c.mu.Lock()
	known := false
	regs := c.local[s.Name]
	for _, n := range s.Nodes {
		if regs[n.ID] != nil {
			known = true
			delete(regs, n.ID)
		}
		if view := c.view[s.Name]; view != nil && nodeIndex(view.Nodes, n.ID) >= 0 {
			known = true
		}
	}
	if len(regs) == 0 {
		delete(c.local, s.Name)
	}
	down := c.down
	c.refreshLocked(s.Name)
	c.mu.Unlock()
	c.backend.forget(s)

	if down {
		if !known {
			return errNotFound
		}
		c.queueDeregister(s)
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, c.timing.timeout)
	defer cancel()
	err := c.backend.deregister(ctx, s)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, errNotFound) || errors.Is(err, errRejected):
		if known && errors.Is(err, errNotFound) {
			return nil // already gone there (expired, or never sent)
		}
		return err
	}
	c.log.Warn("deregister failed; queued for retry", "service", s.Name, "err", err)
	c.queueDeregister(s)
	return nil
}

func (c *cachedRegistry) queueDeregister(s *Service) {
	c.mu.Lock()
	for _, n := range s.Nodes {
		if len(c.deregs) < maxNodes {
			c.deregs[regKey(s.Name, n.ID)] = &Service{Name: s.Name, Nodes: []*Node{{ID: n.ID}}}
		}
	}
	c.mu.Unlock()
	c.signal()
}

func (c *cachedRegistry) GetService(ctx context.Context, name string) (*Service, error) {
	if err := c.awaitSync(ctx); err != nil {
		c.mu.Lock()
		svc := c.view[name] // local registrations are known even so
		c.mu.Unlock()
		if svc != nil {
			return svc, nil
		}
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if svc := c.view[name]; svc != nil {
		return svc, nil
	}
	return nil, errNotFound
}

func (c *cachedRegistry) ListServices(ctx context.Context) ([]string, error) {
	err := c.awaitSync(ctx)
	c.mu.Lock()
	names := make([]string, 0, len(c.view))
	for name := range c.view {
		names = append(names, name)
	}
	c.mu.Unlock()
	if err != nil && len(names) == 0 {
		return nil, err
	}
	sort.Strings(names)
	return names, nil
}

// awaitSync waits, up to one call timeout, for the first full state from the
// backend, so that a lookup right after start-up does not answer "not
// found" for a service that exists.
func (c *cachedRegistry) awaitSync(ctx context.Context) error {
	select {
	case <-c.syncedc:
		return nil
	default:
	}
	t := time.NewTimer(c.timing.timeout)
	defer t.Stop()
	select {
	case <-c.syncedc:
		return nil
	case <-t.C:
	case <-ctx.Done():
	}
	return errors.New("registry: backend unreachable and nothing cached yet")
}

func (c *cachedRegistry) Watch(ctx context.Context, opts watchOptions) (*watcher, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, errors.New("registry: closed")
	}
	return c.watchers.add(ctx, &c.mu, opts, c.snapshotLocked), nil
}

// snapshotLocked returns what lookups see, sorted by name, or the one
// named service. c.mu is held.
func (c *cachedRegistry) snapshotLocked(service string) []*Service {
	if service != "" {
		if svc := c.view[service]; svc != nil {
			return []*Service{svc}
		}
		return nil
	}
	out := make([]*Service, 0, len(c.view))
	for _, svc := range c.view {
		out = append(out, svc)
	}
	slices.SortFunc(out, func(a, b *Service) int { return strings.Compare(a.Name, b.Name) })
	return out
}

func (c *cachedRegistry) index() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.watchers.index()
}

func (c *cachedRegistry) setHistory(events int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.watchers.setHistory(events)
}

// size returns the number of services and nodes that lookups see.
func (c *cachedRegistry) size() (services, nodes int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.view), c.nodes
}

// replaceAll implements syncSink.
func (c *cachedRegistry) replaceAll(all map[string]*Service) {
	c.mu.Lock()
	defer c.mu.Unlock()
	names := map[string]bool{}
	for name := range c.remote {
		names[name] = true
	}
	for name := range all {
		names[name] = true
	}
	c.remote = map[string]*Service{}
	for name, svc := range all {
		if svc = c.sanitizeRemote(name, svc); svc != nil && len(c.remote) < maxRemoteServices {
			c.remote[name] = svc
		}
	}
	for name := range names {
		c.refreshLocked(name)
	}
	c.markSyncedLocked()
}

// update implements syncSink.
func (c *cachedRegistry) update(name string, svc *Service) {
	svc = c.sanitizeRemote(name, svc)
	c.mu.Lock()
	defer c.mu.Unlock()
	if svc == nil {
		delete(c.remote, name)
	} else if c.remote[name] != nil || len(c.remote) < maxRemoteServices {
		c.remote[name] = svc
	}
	c.refreshLocked(name)
}

// sanitizeRemote is where a backend's data enters the cache, so the rest
// of the sidecar can trust it as it trusts its own registrations: it keeps
// the nodes that pass the validation of a registration (validateNode),
// each ID once, fills empty maps, and returns nil for a bad service or one
// left without nodes. Every node (or service) dropped is counted and
// logged, at most once a minute. A hostile or broken registry then costs
// entries, never a crash or a call to an address that cannot be called.
func (c *cachedRegistry) sanitizeRemote(name string, svc *Service) *Service {
	out, dropped, err := sanitizeService(name, svc)
	if dropped > 0 {
		c.invalid.Add(int64(dropped))
		now := c.now().Unix()
		if last := c.invalidLogged.Load(); now-last >= 60 && c.invalidLogged.CompareAndSwap(last, now) {
			c.log.Warn("registry backend sent invalid data; dropped", "service", name, "dropped", dropped, "err", err)
		}
	}
	return out
}

// sanitizeService returns svc with only its valid nodes, how many it
// dropped (a bad service counts as one) and why the first was dropped.
func sanitizeService(name string, svc *Service) (*Service, int, error) {
	if svc == nil {
		return nil, 0, nil
	}
	if err := checkName("name", name); err != nil {
		return nil, 1, err
	}
	if err := checkVersion("version", svc.Version); err != nil {
		return nil, 1, err
	}
	if err := checkMetadata("metadata", svc.Metadata); err != nil {
		return nil, 1, err
	}
	out := *svc
	out.Name = name
	out.Metadata = orEmpty(svc.Metadata)
	out.Endpoints = orEmptySlice(slices.DeleteFunc(slices.Clone(svc.Endpoints), func(e *Endpoint) bool { return e == nil }))
	if err := checkEndpoints(out.Endpoints); err != nil {
		out.Endpoints = []*Endpoint{} // they describe; the nodes still serve
	}
	out.Nodes = make([]*Node, 0, len(svc.Nodes))
	seen := make(map[string]bool, len(svc.Nodes))
	dropped := 0
	var first error
	for i, n := range svc.Nodes {
		err := validateNode(n, true)
		if err == nil && seen[n.ID] {
			err = bad("id", "%q appears twice", n.ID)
		}
		if err != nil {
			err = under(nodeField(i), err)
		}
		if err != nil {
			dropped++
			if first == nil {
				first = err
			}
			continue
		}
		seen[n.ID] = true
		if n.Metadata == nil {
			c := *n
			c.Metadata = map[string]string{}
			n = &c
		}
		out.Nodes = append(out.Nodes, n)
	}
	if len(out.Nodes) == 0 {
		return nil, dropped, first
	}
	return &out, dropped, first
}

// invalidRemoteNodes counts the nodes (and services) sanitizeRemote
// dropped, for /metrics.
func (c *cachedRegistry) invalidRemoteNodes() int64 { return c.invalid.Load() }

func (c *cachedRegistry) markSyncedLocked() {
	if !c.synced {
		c.synced = true
		close(c.syncedc)
	}
}

// healthy implements syncSink. When the backend comes back, every live
// local registration is re-sent: it may have restarted empty.
func (c *cachedRegistry) healthy(ok bool, err error) {
	c.mu.Lock()
	was, wasDown := c.up, c.down
	c.up, c.down = ok, !ok
	if ok && !was {
		for _, regs := range c.local {
			for _, r := range regs {
				r.sent = false
			}
		}
	}
	c.mu.Unlock()
	switch {
	case ok && !was:
		c.log.Info("registry backend reachable")
		c.signal()
	case !ok && !wasDown:
		c.log.Warn("registry backend unreachable; serving cached data", "err", err)
	}
}

func (c *cachedRegistry) signal() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// resendLoop sends queued registrations and deregistrations to the backend,
// backing off while it fails.
func (c *cachedRegistry) resendLoop(ctx context.Context) {
	bo := newBackoff(c.timing.minBackoff, c.timing.maxBackoff)
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.kick:
		case <-retry:
		}
		retry = nil
		if c.resend(ctx) {
			bo.reset()
			continue
		}
		retry = time.After(bo.next())
	}
}

type pendingReg struct {
	svc *Service
	ttl time.Duration
}

// resend makes one pass over the queue; it reports whether the queue is
// empty afterwards.
func (c *cachedRegistry) resend(ctx context.Context) bool {
	now := c.now()
	c.mu.Lock()
	if !c.up {
		c.mu.Unlock()
		return false
	}
	var regs []pendingReg
	for _, byID := range c.local {
		for _, r := range byID {
			if !r.sent && (r.expires.IsZero() || now.Before(r.expires)) {
				ttl := r.ttl
				if ttl > 0 {
					ttl = r.expires.Sub(now) // what is left of it
				}
				regs = append(regs, pendingReg{r.svc, ttl})
			}
		}
	}
	var deregs []*Service
	for _, s := range c.deregs {
		deregs = append(deregs, s)
	}
	c.mu.Unlock()

	ok := true
	for _, s := range deregs {
		cctx, cancel := context.WithTimeout(ctx, c.timing.timeout)
		err := c.backend.deregister(cctx, s)
		cancel()
		if err != nil && !errors.Is(err, errNotFound) && !errors.Is(err, errRejected) {
			ok = false
			continue
		}
		c.mu.Lock()
		delete(c.deregs, regKey(s.Name, s.Nodes[0].ID))
		c.mu.Unlock()
	}
	for _, p := range regs {
		if ctx.Err() != nil {
			return false
		}
		cctx, cancel := context.WithTimeout(ctx, c.timing.timeout)
		err := c.backend.register(cctx, p.svc, p.ttl)
		cancel()
		switch {
		case errors.Is(err, errRejected):
			c.log.Warn("backend rejected a queued registration; dropped", "service", p.svc.Name, "err", err)
			c.forget(p.svc)
		case err != nil:
			c.log.Debug("resend failed", "service", p.svc.Name, "err", err)
			ok = false
		default:
			c.log.Debug("registration re-sent", "service", p.svc.Name, "node", p.svc.Nodes[0].ID)
			c.mu.Lock()
			r := c.local[p.svc.Name][p.svc.Nodes[0].ID]
			if r != nil && r.svc == p.svc {
				r.sent = true
			}
			c.mu.Unlock()
			if r == nil {
				c.backend.forget(p.svc) // expired or deregistered meanwhile
			}
		}
	}
	return ok
}

// sweepLoop removes expired local registrations, and makes the backend
// forget them.
func (c *cachedRegistry) sweepLoop(ctx context.Context) {
	t := time.NewTicker(c.sweep)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := c.now()
		var expired []*Service
		c.mu.Lock()
		for name, regs := range c.local {
			var gone []*Node
			for id, r := range regs {
				if !r.expires.IsZero() && now.After(r.expires) {
					delete(regs, id)
					gone = append(gone, &Node{ID: id})
				}
			}
			if len(gone) == 0 {
				continue
			}
			if len(regs) == 0 {
				delete(c.local, name)
			}
			c.refreshLocked(name)
			expired = append(expired, &Service{Name: name, Nodes: gone})
		}
		c.mu.Unlock()
		for _, s := range expired {
			c.backend.forget(s)
		}
	}
}

// refreshLocked rebuilds the view of one service from the remote state and
// the live local registrations, and tells watchers what changed.
func (c *cachedRegistry) refreshLocked(name string) {
	old := c.view[name]
	now := c.now()
	rem := c.remote[name]
	var next *Service
	if rem != nil {
		next = &Service{Name: name, Version: rem.Version, Metadata: orEmpty(rem.Metadata), Endpoints: orEmptySlice(rem.Endpoints)}
		next.Nodes = append(next.Nodes, rem.Nodes...)
	}
	if regs := c.local[name]; len(regs) > 0 {
		ids := make([]string, 0, len(regs))
		for id, r := range regs {
			if r.expires.IsZero() || now.Before(r.expires) {
				ids = append(ids, id)
			}
		}
		sort.Strings(ids)
		for _, id := range ids {
			r := regs[id]
			if next == nil {
				next = &Service{Name: name, Version: r.svc.Version, Metadata: orEmpty(r.svc.Metadata), Endpoints: orEmptySlice(r.svc.Endpoints)}
			}
			if i := nodeIndex(next.Nodes, id); i >= 0 {
				next.Nodes[i] = r.svc.Nodes[0]
			} else {
				next.Nodes = append(next.Nodes, r.svc.Nodes[0])
			}
		}
	}
	if next != nil && len(next.Nodes) == 0 {
		next = nil
	}
	if old != nil {
		c.nodes -= len(old.Nodes)
	}
	if next == nil {
		delete(c.view, name)
	} else {
		c.view[name] = next
		c.nodes += len(next.Nodes)
	}
	c.diffLocked(name, old, next)
}

// diffLocked sends watchers the events that turn old into next.
func (c *cachedRegistry) diffLocked(name string, old, next *Service) {
	if c.watchers.empty() {
		return
	}
	before := map[string]*Node{}
	if old != nil {
		for _, n := range old.Nodes {
			before[n.ID] = n
		}
	}
	var changed []*Node
	after := map[string]bool{}
	if next != nil {
		for _, n := range next.Nodes {
			after[n.ID] = true
			if b := before[n.ID]; b == nil || !nodesEqual(b, n) {
				changed = append(changed, n)
			}
		}
	}
	var gone []*Node
	if old != nil {
		for _, n := range old.Nodes {
			if !after[n.ID] {
				gone = append(gone, n)
			}
		}
	}
	if len(gone) > 0 {
		c.watchers.send(Event{Action: "delete", Service: withNodes(old, gone)})
	}
	if len(changed) > 0 {
		action := "update"
		if old == nil {
			action = "create"
		}
		c.watchers.send(Event{Action: action, Service: withNodes(next, changed)})
	}
}

func withNodes(s *Service, nodes []*Node) *Service {
	return &Service{Name: s.Name, Version: s.Version, Metadata: orEmpty(s.Metadata), Endpoints: orEmptySlice(s.Endpoints), Nodes: nodes}
}

// singleNode is s with only node n, as the cache and backends keep it.
func singleNode(s *Service, n *Node) *Service {
	return &Service{
		Name:      s.Name,
		Version:   s.Version,
		Metadata:  cloneMap(s.Metadata),
		Endpoints: cloneEndpoints(s.Endpoints),
		Nodes:     []*Node{{ID: n.ID, Address: n.Address, Port: n.Port, Metadata: cloneMap(n.Metadata), Version: s.Version}},
	}
}

func regKey(service, node string) string { return service + "\x00" + node }

// nodeIndex is the index of the node with id in nodes, or -1.
func nodeIndex(nodes []*Node, id string) int {
	return slices.IndexFunc(nodes, func(n *Node) bool { return n.ID == id })
}
