package main

// registry_cache.go owns cachedRegistry, the local cache that sits in front
// of every remote backend (Consul, another sidecar) so that lookups rarely
// wait on the network and keep working while the backend is unreachable.
// Every call to the backend goes through its remoteClient
// (registry_remote.go), the one bounded connection pool to it.
//
// What the cache holds, at the size of a real cluster (thousands of
// services, a Consul agent that allows 200 connections per client address):
//
//   - every service name the backend lists, followed with one watch (a
//     blocking query on Consul's catalog): GET /registry lists them all;
//   - the nodes of the services looked up here ("held"): the first lookup
//     fetches them directly and waits for the answer, so a service the
//     backend has is never "not found" because nothing was watched yet;
//   - a watch per held service, at most the backend's watchBudget of them
//     (on Consul, what the connection bound leaves for blocking queries),
//     given to the most recently wanted; the rest are fetched again on
//     lookup once their copy is older than remoteTiming.stale;
//   - a held service not looked up for remoteTiming.idle loses its watch
//     and is forgotten (the broker's entries are kept, see pinned).
//
// Failures of the backend (429, 5xx, network) never make a service absent:
// the cache keeps serving what it had, the failure is counted by status and
// logged at most once per remoteLogInterval, and the call is retried with
// jittered backoff.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of the remote registry settings; Config fields left zero use them.
const (
	defaultRegistryTimeout = 5 * time.Second  // one call to the backend
	defaultRegistryWait    = 30 * time.Second // one blocking query or watch idle check
	defaultRegistryConns   = 64               // well under Consul's 200 per client address
	defaultRegistryStale   = 2 * time.Second  // age past which an unwatched service is fetched again
	defaultRegistryIdle    = 10 * time.Minute // a held service not looked up for this long is dropped
	remoteMinBackoff       = 100 * time.Millisecond
	remoteMaxBackoff       = 5 * time.Second
	remoteFetchTries       = 3                // attempts of one direct fetch that failed with a retryable error
	remoteLogInterval      = 10 * time.Second // at most one failure log line of a backend per interval
	maxRemoteServices      = 10_000           // service names the cache follows: a bound on memory
)

// remoteTiming holds the durations and the connection bound of a remote
// backend.
type remoteTiming struct {
	timeout    time.Duration // one ordinary call
	wait       time.Duration // one blocking query; watch liveness checks
	stale      time.Duration // an unwatched held service older than this is fetched again on lookup
	idle       time.Duration // a held service not looked up for this long loses its watch, then is forgotten
	minBackoff time.Duration
	maxBackoff time.Duration
	conns      int // connections to the backend, every call included
}

func remoteTimingOf(cfg *Config) remoteTiming {
	t := remoteTiming{
		timeout:    cfg.RegistryTimeout,
		wait:       cfg.RegistryWait,
		stale:      cfg.RegistryStale,
		idle:       cfg.RegistryWatchIdle,
		minBackoff: remoteMinBackoff,
		maxBackoff: remoteMaxBackoff,
		conns:      cfg.RegistryConnections,
	}
	if t.timeout <= 0 {
		t.timeout = defaultRegistryTimeout
	}
	if t.wait <= 0 {
		t.wait = defaultRegistryWait
	}
	if t.stale <= 0 {
		t.stale = defaultRegistryStale
	}
	if t.idle <= 0 {
		t.idle = defaultRegistryIdle
	}
	if t.conns <= 0 {
		t.conns = defaultRegistryConns
	}
	if t.maxBackoff > t.wait {
		t.maxBackoff = max(t.wait, t.minBackoff)
	}
	return t
}

// blockingBudget is how many held services may be watched with a blocking
// query each: the connections less one for the list of services and a
// reserve (an eighth, at least two) for lookups, registrations and
// heartbeats, so that those never queue behind blocking queries. 55 of
// the default 64.
func (t remoteTiming) blockingBudget() int {
	return max(t.conns-1-max(2, t.conns/8), 0)
}

// remoteBackend is a registry held elsewhere. cachedRegistry is its only
// caller: it serializes nothing, so implementations are safe for concurrent
// use. Errors that a retry cannot fix (the backend refused the data) wrap
// errRejected; anything else is retried. Every call goes through the
// backend's remoteClient.
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
	// sync follows the backend's list of service names until ctx ends:
	// it calls sink.listed whenever the list changes, and sink.healthy
	// after every success and failure of that watch.
	sync(ctx context.Context, sink syncSink)
	// fetch reads one service now: its nodes (nil when it has none) and
	// the index to watch it from.
	fetch(ctx context.Context, name string) (*Service, uint64, error)
	// watch keeps one held service fresh from index until ctx ends:
	// report gets each new state, or the error of a failed call (the
	// watch then backs off and goes on). A backend whose sync already
	// carries every change of the held services (another sidecar's
	// stream) returns at once: the service stays watched all the same.
	watch(ctx context.Context, name string, index uint64, report func(*Service, error))
	// watchBudget is how many watches may run at once.
	watchBudget() int
	// metrics emits the backend's samples: connections, requests, failures.
	metrics(emit emitFunc)
	// close releases idle connections.
	close()
}

// syncSink is what a backend's sync loop feeds: cachedRegistry.
type syncSink interface {
	// listed sets the names of every service the backend has; the sink
	// owns the map from then on.
	listed(names map[string]struct{})
	// update sets the state of a held service (svc nil: no nodes); it is
	// ignored for a service that is not held.
	update(name string, svc *Service)
	// heldNames returns the names of the held services, for a backend
	// whose sync refreshes them itself.
	heldNames() []string
	// holds reports whether name is held.
	holds(name string) bool
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

// heldService is a service of the backend that was looked up here. Its
// fields are guarded by cachedRegistry.mu.
type heldService struct {
	svc      *Service      // sanitized state from the backend; nil: no nodes
	ok       bool          // svc came from a successful fetch or watch answer
	err      error         // why the last fetch failed; nil after a success
	failures int           // fetches failed in a row, for the backoff
	fresh    time.Time     // until then a lookup fetches nothing (success: +stale; failure: +backoff)
	used     time.Time     // the last lookup, for the LRU and the idle drop
	prevUsed time.Time     // the lookup before it: how recently it was wanted before now
	pinned   bool          // never forgotten for idleness (see pinned)
	fetching chan struct{} // closed when the fetch in flight ends; nil: none in flight
	watch    *heldWatch    // non-nil while watched
}

// heldWatch is the watch of one held service; live is guarded by
// cachedRegistry.mu.
type heldWatch struct {
	cancel context.CancelFunc
	live   bool // the watch's last call succeeded
}

// current reports whether a lookup can answer from h without a fetch.
func (h *heldService) current(now time.Time, up bool) bool {
	if h.ok && up && h.watch != nil && h.watch.live {
		return true
	}
	return now.Before(h.fresh)
}

// pinned reports whether the cache holds name as soon as the backend lists
// it: the broker's membership and topic entries, which the broker reads on
// each publish without waiting for the network (a lookup with a context
// that is already done), so they must be in memory before the first
// message that needs them.
func pinned(name string) bool {
	return name == brokerService || strings.HasPrefix(name, topicServicePrefix)
}

// cachedRegistry is the Registry of a remote backend: lookups and watches
// are answered from memory, which the backend keeps fresh and which stays
// (stale) while the backend is unreachable. Registrations made through it
// are remembered until they expire or are deregistered, and re-sent
// whenever the backend comes back (a restarted Consul agent forgets its
// services). A registration that cannot reach the backend is accepted and
// queued. Local registrations are visible in local lookups at once.
// Safe for concurrent use; Close waits for its goroutines (loops, fetches
// and watches).
type cachedRegistry struct {
	backend remoteBackend
	timing  remoteTiming
	sweep   time.Duration
	log     *slog.Logger
	now     func() time.Time
	ctx     context.Context // ends at Close or with start's context: the lifetime of every goroutine here
	cancel  context.CancelFunc
	unwatch func() bool // stops start's context from ending ctx; guarded by mu

	mu       sync.Mutex                      // guards the fields below
	catalog  map[string]struct{}             // every service name the backend lists
	held     map[string]*heldService         // the services looked up here, at most maxRemoteServices
	watching map[string]*heldService         // the held services with a watch, at most backend.watchBudget()
	local    map[string]map[string]*localReg // service -> node ID -> registration
	deregs   map[string]*Service             // "service\x00node" -> pending deregistration
	view     map[string]*Service             // held merged with local: what lookups see
	nodes    int                             // nodes in view
	watchers watchers
	up       bool // the backend answered the last sync call
	down     bool // the last sync call failed: calls are queued, not tried
	synced   bool // the list of services arrived at least once
	closed   bool

	syncedc chan struct{} // closed when synced first becomes true
	kick    chan struct{} // wakes the resend loop; buffered 1

	startOnce sync.Once
	closeOnce sync.Once
	wg        sync.WaitGroup

	invalid       atomic.Int64 // nodes and services from the backend that failed validation
	invalidLogged atomic.Int64 // unix time of the last log line about them
}

func newCachedRegistry(b remoteBackend, t remoteTiming, sweep time.Duration, now func() time.Time, logger *slog.Logger) *cachedRegistry {
	if sweep <= 0 {
		sweep = 250 * time.Millisecond
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &cachedRegistry{
		backend:  b,
		timing:   t,
		sweep:    sweep,
		log:      logger,
		now:      now,
		ctx:      ctx,
		cancel:   cancel,
		catalog:  map[string]struct{}{},
		held:     map[string]*heldService{},
		watching: map[string]*heldService{},
		local:    map[string]map[string]*localReg{},
		deregs:   map[string]*Service{},
		view:     map[string]*Service{},
		watchers: newWatchers(logger),
		syncedc:  make(chan struct{}),
		kick:     make(chan struct{}, 1),
	}
}

// start runs the backend's sync loop, the resend loop and the sweeper of
// expired local registrations and idle held services, until ctx ends or
// Close. (The server starts its components with a context that outlives
// SIGTERM: the drain still looks services up and deregisters.)
func (c *cachedRegistry) start(ctx context.Context) {
	c.startOnce.Do(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.closed {
			return
		}
		c.unwatch = afterFunc(ctx, c.cancel) // the end of ctx ends c.ctx
		c.wg.Add(3)
		go func() { defer c.wg.Done(); c.backend.sync(c.ctx, c) }()
		go func() { defer c.wg.Done(); c.resendLoop(c.ctx) }()
		go func() { defer c.wg.Done(); c.sweepLoop(c.ctx) }()
	})
}

// Close stops the loops, fetches and watches, waits for them and closes
// every watcher. Local registrations are not deregistered: their TTLs end
// them.
func (c *cachedRegistry) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true // no goroutine starts after this
		unwatch := c.unwatch
		c.mu.Unlock()
		if unwatch != nil {
			unwatch()
		}
		c.cancel()
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

// GetService answers from memory when it can. The first lookup of a
// service the backend lists, and a lookup of an unwatched one whose copy
// is older than the staleness bound, fetch it first and wait for that (or
// for ctx: a context that is already done never waits, and the fetch goes
// on for the next lookup). A failed fetch serves the last copy, or, when
// there is none, returns the failure: never errNotFound for a service the
// backend lists.
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
	wait := c.lookupLocked(name)
	if wait != nil {
		c.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
		}
		c.mu.Lock()
	}
	defer c.mu.Unlock()
	if svc := c.view[name]; svc != nil {
		return svc, nil
	}
	if h := c.held[name]; h != nil && !h.ok {
		if h.err != nil {
			return nil, fmt.Errorf("registry: look up %s: %w", name, h.err)
		}
		return nil, fmt.Errorf("registry: look up %s: no answer from the backend yet", name)
	}
	return nil, errNotFound
}

// lookupLocked marks name as used and returns a channel to wait on when it
// must be fetched first; nil when memory has the answer.
func (c *cachedRegistry) lookupLocked(name string) <-chan struct{} {
	now := c.now()
	h := c.held[name]
	if h == nil {
		if _, listed := c.catalog[name]; !listed || len(c.held) >= maxRemoteServices {
			return nil
		}
		h = &heldService{pinned: pinned(name)}
		c.held[name] = h
	}
	h.prevUsed, h.used = h.used, now
	if h.current(now, c.up) || h.ok && !c.up {
		return nil // fresh; or the backend is down: serve what is held
	}
	wait := c.fetchLocked(name, h)
	if h.ok && h.failures > 0 {
		return nil // failing: refresh in the background, serve what is held
	}
	return wait
}

// fetchLocked starts a fetch of name unless one is in flight, and returns
// the channel closed when it ends.
func (c *cachedRegistry) fetchLocked(name string, h *heldService) <-chan struct{} {
	if h.fetching != nil {
		return h.fetching
	}
	done := make(chan struct{})
	if c.closed {
		h.err = errors.New("registry: closed")
		close(done)
		return done
	}
	h.fetching = done
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		svc, index, err := c.fetchRetry(name)
		c.mu.Lock()
		defer c.mu.Unlock()
		defer close(done)
		h.fetching = nil
		if c.held[name] != h {
			return // dropped meanwhile: gone from the list, or idle
		}
		now := c.now()
		if err != nil {
			h.err = err
			h.failures++
			h.fresh = now.Add(jitter(min(c.timing.minBackoff<<min(h.failures, 10), c.timing.maxBackoff)))
			c.log.Debug("registry fetch failed; serving what is cached", "service", name, "err", err)
			return
		}
		c.setLocked(name, h, svc, now)
		c.watchLocked(name, h, index)
	}()
	return done
}

// fetchRetry fetches name, retrying a failure with jittered backoff up to
// remoteFetchTries times within one call timeout.
func (c *cachedRegistry) fetchRetry(name string) (*Service, uint64, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.timing.timeout)
	defer cancel()
	bo := newBackoff(c.timing.minBackoff, c.timing.maxBackoff)
	for try := 1; ; try++ {
		svc, index, err := c.backend.fetch(ctx, name)
		if err == nil || try == remoteFetchTries || errors.Is(err, errRejected) || !sleepCtx(ctx, bo.next()) {
			return svc, index, err
		}
	}
}

// setLocked stores a fresh state of held service h and tells watchers.
func (c *cachedRegistry) setLocked(name string, h *heldService, svc *Service, now time.Time) {
	h.svc, h.ok, h.err, h.failures = c.sanitizeRemote(name, svc), true, nil, 0
	h.fresh = now.Add(c.timing.stale)
	c.refreshLocked(name)
}

// watchLocked starts the watch of h when it has none. When the budget is
// spent, h takes the slot of the least recently used watched service only
// if h was wanted more recently than that one before the lookup that
// fetched it: services used equally often then keep their watches instead
// of trading them on every lookup (each trade costs a connection), and a
// service looked up once waits for a second lookup.
func (c *cachedRegistry) watchLocked(name string, h *heldService, index uint64) {
	budget := c.backend.watchBudget()
	if h.watch != nil || c.closed || budget == 0 {
		return
	}
	if len(c.watching) >= budget {
		var lru string
		for n, w := range c.watching {
			if lru == "" || w.used.Before(c.watching[lru].used) {
				lru = n
			}
		}
		if !c.watching[lru].used.Before(h.prevUsed) {
			return
		}
		c.unwatchLocked(lru, c.watching[lru])
	}
	ctx, cancel := context.WithCancel(c.ctx)
	w := &heldWatch{cancel: cancel, live: true}
	h.watch = w
	c.watching[name] = h
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.backend.watch(ctx, name, index, func(svc *Service, err error) {
			c.mu.Lock()
			defer c.mu.Unlock()
			if h.watch != w || c.held[name] != h {
				return // an answer of a watch that was stopped meanwhile
			}
			if err != nil {
				w.live = false
				return
			}
			w.live = true
			c.setLocked(name, h, svc, c.now())
		})
	}()
}

// unwatchLocked stops the watch of held service h; its copy stays and is
// fetched again on lookup once stale.
func (c *cachedRegistry) unwatchLocked(name string, h *heldService) {
	if h.watch == nil {
		return
	}
	h.watch.cancel()
	h.watch = nil
	delete(c.watching, name)
	h.fresh = c.now().Add(c.timing.stale) // from now on nothing keeps it fresh
}

// dropLocked forgets held service h. With notify, watchers see its nodes
// leave the view; without (it was only idle), the view changes silently,
// since its nodes did not leave the backend.
func (c *cachedRegistry) dropLocked(name string, h *heldService, notify bool) {
	c.unwatchLocked(name, h)
	delete(c.held, name)
	c.rebuildLocked(name, notify)
}

func (c *cachedRegistry) ListServices(ctx context.Context) ([]string, error) {
	err := c.awaitSync(ctx)
	c.mu.Lock()
	names := make([]string, 0, len(c.catalog)+len(c.local))
	for name := range c.catalog {
		names = append(names, name)
	}
	for name := range c.view {
		if _, ok := c.catalog[name]; !ok {
			names = append(names, name)
		}
	}
	c.mu.Unlock()
	if err != nil && len(names) == 0 {
		return nil, err
	}
	sort.Strings(names)
	return names, nil
}

// awaitSync waits, up to one call timeout, for the first list of services
// from the backend, so that a lookup right after start-up does not answer
// "not found" for a service that exists.
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

// size returns the number of services known (every name the backend lists,
// and local registrations it does not list yet) and of nodes held.
func (c *cachedRegistry) size() (services, nodes int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	services = len(c.catalog)
	for name := range c.view {
		if _, ok := c.catalog[name]; !ok {
			services++
		}
	}
	return services, c.nodes
}

// metrics emits what the cache holds and watches, then the backend's
// samples; registrySizeSource calls it.
func (c *cachedRegistry) metrics(emit emitFunc) {
	c.mu.Lock()
	held, watched := len(c.held), len(c.watching)
	c.mu.Unlock()
	emit("sidecar_registry_services_held", "Services of the remote registry looked up here and kept in memory.", "gauge", float64(held))
	emit("sidecar_registry_services_watched", "Held services kept fresh by a watch (on Consul, one blocking query each).", "gauge", float64(watched))
	c.backend.metrics(emit)
}

// listed implements syncSink. Watchers see a "create" (without nodes) for
// each name that appears after the first list, and a "delete" for each
// that leaves it (with the nodes held, if any). Held services that left
// are dropped; the broker's entries are fetched as soon as they appear.
func (c *cachedRegistry) listed(names map[string]struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.catalog
	c.catalog = names
	for name := range old {
		if _, ok := names[name]; ok {
			continue
		}
		hadView := c.view[name] != nil
		if h := c.held[name]; h != nil {
			c.dropLocked(name, h, true)
		}
		if !hadView && c.view[name] == nil && !c.watchers.empty() {
			c.watchers.send(Event{Action: "delete", Service: &Service{Name: name, Metadata: map[string]string{}, Endpoints: []*Endpoint{}, Nodes: []*Node{}}})
		}
	}
	now := c.now()
	for name := range names {
		if _, ok := old[name]; ok {
			continue
		}
		if c.synced && c.view[name] == nil && !c.watchers.empty() {
			c.watchers.send(Event{Action: "create", Service: &Service{Name: name, Metadata: map[string]string{}, Endpoints: []*Endpoint{}, Nodes: []*Node{}}})
		}
		if pinned(name) && c.held[name] == nil && len(c.held) < maxRemoteServices {
			h := &heldService{pinned: true, used: now}
			c.held[name] = h
			c.fetchLocked(name, h)
		}
	}
	c.markSyncedLocked()
}

// update implements syncSink.
func (c *cachedRegistry) update(name string, svc *Service) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if h := c.held[name]; h != nil {
		c.setLocked(name, h, svc, c.now())
	}
}

// holds implements syncSink.
func (c *cachedRegistry) holds(name string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.held[name] != nil
}

// heldNames implements syncSink.
func (c *cachedRegistry) heldNames() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	names := make([]string, 0, len(c.held))
	for name := range c.held {
		names = append(names, name)
	}
	return names
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

// sweepLoop removes expired local registrations (and makes the backend
// forget them), and idle held services: a service not looked up for
// timing.idle loses its watch and is forgotten, unless pinned.
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
		for name, h := range c.held {
			if h.fetching != nil || now.Sub(h.used) < c.timing.idle {
				continue
			}
			if h.pinned {
				c.unwatchLocked(name, h)
				continue
			}
			c.dropLocked(name, h, false)
		}
		c.mu.Unlock()
		for _, s := range expired {
			c.backend.forget(s)
		}
	}
}

// refreshLocked rebuilds the view of one service from the held state and
// the live local registrations, and tells watchers what changed.
func (c *cachedRegistry) refreshLocked(name string) { c.rebuildLocked(name, true) }

// rebuildLocked is refreshLocked; without notify, watchers are not told.
// A view equal to the one before is kept, so that lookups keep returning
// the same snapshot (the balancer keys its state on it).
func (c *cachedRegistry) rebuildLocked(name string, notify bool) {
	old := c.view[name]
	now := c.now()
	var rem *Service
	if h := c.held[name]; h != nil {
		rem = h.svc
	}
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
	if old != nil && next != nil && servicesEqual(old, next) {
		return
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
	if notify {
		c.diffLocked(name, old, next)
	}
}

// servicesEqual reports whether a and b hold the same data, nodes in the
// same order.
func servicesEqual(a, b *Service) bool {
	return a.Version == b.Version && maps.Equal(a.Metadata, b.Metadata) && endpointsEqual(a.Endpoints, b.Endpoints) &&
		slices.EqualFunc(a.Nodes, b.Nodes, func(x, y *Node) bool { return x.ID == y.ID && nodesEqual(x, y) })
}

// diffLocked sends watchers the events that turn old into next: nodes that
// left in a "delete", new or changed nodes in an "update", or in a "create"
// for a service not listed by the backend (yet) whose first nodes arrive.
// Listed services get their "create" from listed.
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
		if _, listed := c.catalog[name]; old == nil && !listed {
			action = "create" // a listed service had its "create" when listed
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
