package main

// balancer.go owns node selection: which node of a service gets the next
// call, and passive ejection of nodes that keep failing. The RPC handler
// and the reverse proxy each own one balancer.
//
// p2c ranks nodes by peak-EWMA, the load metric of Finagle and Linkerd: a
// node's latency estimate jumps to any slower answer at once, follows
// faster answers over about 10 s, and decays toward zero with a time
// constant of 10 s from the node's last answer; the cost of a node is its
// estimate times its calls in flight plus one. The decay is what keeps
// p2c from starving a node: an estimate that once came out high would
// otherwise lose every comparison and the node would never be measured
// again; with the decay an idle node soon looks cheap, is tried, and is
// measured afresh. A node's first successful call opens its connection and
// is not taken as a sample, and a node that joins a service starts at the
// median estimate of the others.

import (
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Strategies of --balancer.
const (
	strategyP2C        = "p2c"        // power of two choices by latency, load and failures
	strategyRandom     = "random"     // uniform
	strategyRoundRobin = "roundrobin" // in turn
)

func validStrategy(s string) bool {
	return s == strategyP2C || s == strategyRandom || s == strategyRoundRobin
}

// Defaults of passive ejection.
const (
	defaultEjectAfter = 3                // consecutive failures that eject a node
	defaultEjectBase  = 5 * time.Second  // first ejection; doubles on each ejection in a row
	defaultEjectMax   = 5 * time.Minute  // longest ejection
	defaultDecay      = 10 * time.Second // time constant of the latency estimate (Finagle's and Linkerd's)
	maxBalancedSvcs   = 10_000           // services with balancer state; beyond, state is reset
	pickDraws         = 3                // random draws before a linear scan for a usable node
	unmeasuredCost    = 1e200            // cost per call in flight of a node never measured: one call at a time
	maxEjectShift     = 16               // cap of the backoff exponent
	maxEjectedPercent = 50               // at most this share of a service's nodes is ejected
	nodeURLSuffix     = "/"              // the JSON-RPC endpoint of a node
)

// balancer picks nodes of services found in a registry. Its state per
// service (counters, retry budget) and per node (latency, in-flight calls,
// failures, ejection) lives only for services and nodes the registry still
// lists: a new registry snapshot drops the state of nodes that left it, and
// forget drops a service. Safe for concurrent use; pick does not allocate.
type balancer struct {
	strategy   string
	ejectAfter int32            // consecutive failures that eject a node
	ejectBase  time.Duration    // first ejection period
	ejectMax   time.Duration    // cap of the growing ejection period
	decay      time.Duration    // time constant of the latency estimate (defaultDecay)
	useTLS     func(*Node) bool // nodes called over https; nil: none
	upstreams  *upstreams       // the owner's per-service counters (stats_upstream.go); nil: each service its own
	now        func() time.Time // the clock: time.Now, or a test's
	log        *slog.Logger

	mu       sync.Mutex                           // serialises writers of services
	services atomic.Pointer[map[string]*svcState] // copy-on-write: readers never lock
}

// svcState is the balancer's state of one service, stable while the service
// exists so its counters survive node changes.
type svcState struct {
	name   string
	view   atomic.Pointer[svcView] // nodes of the latest registry snapshot
	next   atomic.Uint64           // round-robin position
	budget retryBudget
	// up counts the service's calls, retries, timeouts, node failures and
	// ejections: resolved once, when the state is made, so a call counts
	// without a lookup. It outlives the state (forget) in the owner's
	// upstreams, and past --stats_max_services is shared ("other").
	up *upstreamStats
}

// svcView is the immutable node list of one registry snapshot.
type svcView struct {
	snap  *Service
	nodes []*nodeState // in the order of snap.Nodes
}

// nodeState is what the balancer knows about one node. id, addr and url
// are fixed at creation; the rest is updated atomically by concurrent calls
// (two calls ending at once may lose one latency sample, which is
// harmless). A node that changes address gets a fresh state.
type nodeState struct {
	id   string
	addr string // host:port
	url  string // http://host:port/
	svc  *svcState

	inflight   atomic.Int64 // calls picked and not yet done
	ewma       atomic.Int64 // latency estimate at time at, ns; decays toward zero after at (see estimate)
	at         atomic.Int64 // unix ns of the last sample (or of the seed); 0: never measured
	warm       atomic.Bool  // a call has succeeded: later ones are samples (the first opened a connection)
	fails      atomic.Int32 // consecutive failures since the last success or ejection
	level      atomic.Int32 // ejections in a row: the backoff exponent
	ejectUntil atomic.Int64 // unix ns; 0 or past means not ejected
}

// newBalancer returns a balancer of strategy that reads the time from now
// (time.Now outside tests).
func newBalancer(strategy string, now func() time.Time, logger *slog.Logger) *balancer {
	if !validStrategy(strategy) {
		strategy = strategyP2C
	}
	b := &balancer{
		strategy:   strategy,
		ejectAfter: defaultEjectAfter,
		ejectBase:  defaultEjectBase,
		ejectMax:   defaultEjectMax,
		decay:      defaultDecay,
		now:        now,
		log:        logger,
	}
	m := map[string]*svcState{}
	b.services.Store(&m)
	return b
}

// nodeHostPort is where a node listens: Address:Port, or Address alone when
// Port is 0 (the address then holds host:port).
func nodeHostPort(n *Node) string {
	if n.Port == 0 {
		return n.Address
	}
	host := strings.TrimSuffix(strings.TrimPrefix(n.Address, "["), "]")
	return net.JoinHostPort(host, strconv.Itoa(n.Port))
}

// service returns the state of svc, refreshed to its node list. The fast
// path is one map lookup and one pointer comparison.
func (b *balancer) service(svc *Service) *svcState {
	if st := (*b.services.Load())[svc.Name]; st != nil {
		if v := st.view.Load(); v != nil && v.snap == svc {
			return st
		}
	}
	return b.refresh(svc)
}

// refresh installs svc as the current snapshot of its service, keeping the
// state of nodes that stay (same ID and address) and dropping the others.
func (b *balancer) refresh(svc *Service) *svcState {
	b.mu.Lock()
	defer b.mu.Unlock()
	cur := *b.services.Load()
	st := cur[svc.Name]
	if st == nil {
		st = &svcState{name: svc.Name, up: b.upstreams.get(svc.Name)}
		st.budget.init(b.now())
		next := make(map[string]*svcState, len(cur)+1)
		if len(cur) < maxBalancedSvcs {
			for k, v := range cur {
				next[k] = v
			}
		}
		next[svc.Name] = st
		b.services.Store(&next)
	}
	if v := st.view.Load(); v != nil && v.snap == svc {
		return st
	}
	old := map[string]*nodeState{}
	var prevNodes []*nodeState
	if v := st.view.Load(); v != nil {
		prevNodes = v.nodes
		for _, n := range v.nodes {
			old[n.id] = n
		}
	}
	now := b.now().UnixNano()
	seed := -1.0 // the estimate new nodes start with; computed at the first new node
	nodes := make([]*nodeState, 0, len(svc.Nodes))
	for _, n := range svc.Nodes {
		if n == nil {
			continue
		}
		addr := nodeHostPort(n)
		if prev := old[n.ID]; prev != nil && prev.addr == addr {
			nodes = append(nodes, prev)
			continue
		}
		scheme := "http://"
		if b.useTLS != nil && b.useTLS(n) {
			scheme = "https://"
		}
		ns := &nodeState{id: n.ID, addr: addr, url: scheme + addr + nodeURLSuffix, svc: st}
		if seed < 0 {
			seed = b.median(prevNodes, now)
		}
		if seed > 0 {
			ns.ewma.Store(int64(seed))
			ns.at.Store(now)
		}
		nodes = append(nodes, ns)
	}
	st.view.Store(&svcView{snap: svc, nodes: nodes})
	return st
}

// median is the median latency estimate at now of the measured nodes among
// nodes, in ns, or 0 when none is measured. A node that joins a service
// starts there: at zero it would take every call until it first answered,
// at infinity it would never be tried.
func (b *balancer) median(nodes []*nodeState, now int64) float64 {
	var ests []float64
	for _, n := range nodes {
		if n.at.Load() != 0 {
			ests = append(ests, n.estimate(now, float64(b.decay)))
		}
	}
	if len(ests) == 0 {
		return 0
	}
	slices.Sort(ests)
	m := len(ests) / 2
	if len(ests)%2 == 0 {
		return (ests[m-1] + ests[m]) / 2
	}
	return ests[m]
}

// forget drops the state of a service the registry no longer lists.
func (b *balancer) forget(name string) {
	if (*b.services.Load())[name] == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	cur := *b.services.Load()
	if cur[name] == nil {
		return
	}
	next := make(map[string]*svcState, len(cur))
	for k, v := range cur {
		if k != name {
			next[k] = v
		}
	}
	b.services.Store(&next)
}

// pick chooses a node of st's current snapshot, avoiding the nodes in avoid
// (those a call already tried) when another usable node exists, and
// ejected nodes unless every candidate is ejected. now is the caller's
// clock reading (it times the call anyway; reading the clock costs more
// than a pick on some VMs). pick returns nil only for a service without
// nodes; otherwise the caller must call done with the outcome.
func (b *balancer) pick(st *svcState, avoid []*nodeState, now time.Time) *nodeState {
	nodes := st.view.Load().nodes
	ns := now.UnixNano()
	var n *nodeState
	switch len(nodes) {
	case 0:
		return nil
	case 1:
		n = nodes[0]
	default:
		switch b.strategy {
		case strategyRoundRobin:
			n = pickRoundRobin(nodes, st.next.Add(1), avoid, ns)
		case strategyRandom:
			n = draw(nodes, avoid, ns)
		default:
			n = pickP2C(nodes, avoid, ns, float64(b.decay))
		}
		if n == nil {
			n = scan(nodes, avoid, ns)
		}
	}
	n.inflight.Add(1)
	return n
}

// usable reports whether n may take a call at now: not avoided, not
// ejected.
func (n *nodeState) usable(avoid []*nodeState, now int64) bool {
	for _, a := range avoid {
		if n == a {
			return false
		}
	}
	return now >= n.ejectUntil.Load()
}

// pickP2C draws two distinct nodes and keeps the cheaper usable one;
// decay is the estimate's time constant in ns.
func pickP2C(nodes []*nodeState, avoid []*nodeState, now int64, decay float64) *nodeState {
	// Two indexes from one random word, by multiply-shift (the bias is
	// below 2^-16 for any node count the registry allows).
	u := rand.Uint64()
	i := int((u >> 32) * uint64(len(nodes)) >> 32)
	j := int((u & 0xffffffff) * uint64(len(nodes)-1) >> 32)
	if j >= i {
		j++
	}
	a, c := nodes[i], nodes[j]
	ua, uc := a.usable(avoid, now), c.usable(avoid, now)
	switch {
	case ua && uc:
		if c.cost(now, decay) < a.cost(now, decay) {
			return c
		}
		return a
	case ua:
		return a
	case uc:
		return c
	}
	return draw(nodes, avoid, now)
}

// draw returns a random usable node, or nil after a few unlucky draws.
func draw(nodes []*nodeState, avoid []*nodeState, now int64) *nodeState {
	for range pickDraws {
		if n := nodes[rand.IntN(len(nodes))]; n.usable(avoid, now) {
			return n
		}
	}
	return nil
}

// pickRoundRobin returns the first usable node from position i on, looking
// at a bounded number of nodes.
func pickRoundRobin(nodes []*nodeState, i uint64, avoid []*nodeState, now int64) *nodeState {
	for k := range uint64(min(len(nodes), 8)) {
		if n := nodes[(i+k)%uint64(len(nodes))]; n.usable(avoid, now) {
			return n
		}
	}
	return nil
}

// scan is the slow path when draws found nothing: the first usable node
// from a random start, else a node that is merely avoided, else (every node
// ejected, which ejection itself never causes) any node.
func scan(nodes []*nodeState, avoid []*nodeState, now int64) *nodeState {
	start := rand.IntN(len(nodes))
	var fallback *nodeState
	for k := range nodes {
		n := nodes[(start+k)%len(nodes)]
		if n.usable(avoid, now) {
			return n
		}
		if fallback == nil && n.usable(nil, now) {
			fallback = n
		}
	}
	if fallback != nil {
		return fallback
	}
	return nodes[start]
}

// cost is the expected cost of sending one more call to n at now: its
// latency estimate times its calls in flight counting this one, doubled
// for each recent failure. Lower is better. A node never measured (a node
// of a service seen for the first time, until its second success) costs
// next to nothing while idle, so it is tried at once, and more than any
// measured node while a call is in flight on it, so a node that never
// answers holds one call rather than every caller in turn.
func (n *nodeState) cost(now int64, decay float64) float64 {
	q := float64(n.inflight.Load() + 1)
	var lat float64
	if n.at.Load() == 0 {
		if q > 1 {
			return unmeasuredCost * q
		}
	} else {
		lat = n.estimate(now, decay)
	}
	f := float64(min(n.fails.Load(), 16))
	return (lat + 1) * q * (1 + f)
}

// estimate is n's latency estimate at now (unix ns) in ns: the estimate as
// of the last sample (or the seed), decayed toward zero since then with
// time constant decay (ns). The decay is what gets an idle node tried
// again.
func (n *nodeState) estimate(now int64, decay float64) float64 {
	est, at := float64(n.ewma.Load()), n.at.Load()
	if now > at {
		est *= math.Exp(float64(at-now) / decay)
	}
	return est
}

// done records the outcome of a call picked on n at start (the time given
// to pick) that took latency (time.Since(start), which the caller measures
// anyway: done reads no clock). The latency of a success feeds the
// estimate (but for the node's first success, which paid for opening the
// connection) and clears failures; failures in a row eject the node.
func (b *balancer) done(n *nodeState, start time.Time, latency time.Duration, ok bool) {
	now := start.UnixNano() + int64(latency)
	n.inflight.Add(-1)
	if ok {
		if n.warm.Load() {
			n.observe(start.UnixNano(), now, float64(b.decay))
		} else {
			n.warm.Store(true)
		}
		if n.fails.Load() != 0 {
			n.fails.Store(0)
		}
		if n.ejectUntil.Load() != 0 {
			n.ejectUntil.Store(0)
		}
		if l := n.level.Load(); l > 0 {
			n.level.CompareAndSwap(l, l-1)
		}
		return
	}
	n.svc.up.nodeFailures.Add(1)
	if n.fails.Add(1) >= b.ejectAfter {
		b.eject(n, now)
	}
}

// observe folds the latency s of a call from start to now (unix ns) into
// n's estimate, as Finagle's and Linkerd's peak-EWMA do. The first sample
// sets it. A sample above the estimate decayed to now replaces it (the
// peak: a node that slows down is avoided at once). A lower one is added
// with the weight 1-e^(-t/decay), t the time since the estimate was last
// updated or the call began, whichever is later: the time the call ran
// counts as s and the idle time before it as zero, so the estimate is an
// average over about decay (ns) of time, not of a number of calls.
func (n *nodeState) observe(start, now int64, decay float64) {
	s := float64(max(now-start, 1))
	// A sample at or above the estimate before decay is a peak: no need to
	// decay it.
	if at, est := n.at.Load(), float64(n.ewma.Load()); at != 0 && s < est {
		if now > at {
			est *= math.Exp(float64(at-now) / decay)
		}
		if s < est {
			since := float64(max(now-max(at, start), 0))
			s = est - s*math.Expm1(-since/decay) // est + s(1 - e^(-since/decay))
		}
	}
	n.ewma.Store(int64(s))
	n.at.Store(now)
}

// eject skips n for a period that doubles with each ejection in a row,
// unless that would leave too few nodes: a service never loses every node
// (nor more than maxEjectedPercent of them) to ejection.
func (b *balancer) eject(n *nodeState, now int64) {
	u := n.ejectUntil.Load()
	if u > now {
		return // already ejected
	}
	nodes := n.svc.view.Load().nodes
	limit := min(len(nodes)-1, max(1, len(nodes)*maxEjectedPercent/100))
	ejected := 0
	for _, m := range nodes {
		if m != n && m.ejectUntil.Load() > now {
			ejected++
		}
	}
	if ejected >= limit {
		return
	}
	level := min(n.level.Load(), maxEjectShift)
	d := min(b.ejectBase<<level, b.ejectMax)
	if !n.ejectUntil.CompareAndSwap(u, now+int64(d)) {
		return // a concurrent failure ejected it
	}
	n.level.Add(1)
	n.fails.Store(0)
	n.svc.up.ejections.Add(1)
	b.log.Info("node ejected", "service", n.svc.name, "node", n.id, "for", d)
}

// retryBudget bounds retries to a share of recent calls plus a small
// steady allowance, so that retries cannot multiply load during an outage:
// each call deposits ratio of a token, each retry withdraws one, tokens
// also accrue at minPerSec, and the balance is capped. Safe for concurrent
// use; tokens are counted in thousandths.
type retryBudget struct {
	tokens atomic.Int64 // milli-tokens
	last   atomic.Int64 // unix ns of the last time-based accrual
}

const (
	budgetPerCall   = 200     // milli-tokens a call deposits: retries <= 20% of calls
	budgetPerSecond = 10      // retries per second always allowed
	budgetMax       = 100_000 // cap: at most 100 retries in a burst
	budgetRetry     = 1000    // milli-tokens a retry costs
)

func (rb *retryBudget) init(now time.Time) {
	rb.tokens.Store(budgetPerSecond * budgetRetry)
	rb.last.Store(now.UnixNano())
}

func (rb *retryBudget) add(milli int64) {
	if rb.tokens.Add(milli) > budgetMax {
		rb.tokens.Store(budgetMax)
	}
}

// deposit records one call.
func (rb *retryBudget) deposit() { rb.add(budgetPerCall) }

// withdraw takes the budget of one retry, reporting whether there was one.
func (rb *retryBudget) withdraw(now time.Time) bool {
	ns := now.UnixNano()
	if last := rb.last.Load(); ns > last && rb.last.CompareAndSwap(last, ns) {
		elapsed := min(ns-last, int64(10*time.Second))
		rb.add(elapsed * budgetPerSecond * budgetRetry / int64(time.Second))
	}
	for {
		t := rb.tokens.Load()
		if t < budgetRetry {
			return false
		}
		if rb.tokens.CompareAndSwap(t, t-budgetRetry) {
			return true
		}
	}
}

// nodeSnapshot is a copy of what the balancer knows about one node at one
// time, for /stats and /metrics.
type nodeSnapshot struct {
	id, addr     string
	inFlight     int64         // calls picked and not yet done
	latency      time.Duration // the estimate at the time (see estimate); 0 before the node is measured
	measured     bool          // the node has a latency estimate (measured, or seeded from the others)
	failures     int32         // failures in a row since its last success or ejection
	ejectedUntil time.Time     // when its ejection ends; zero when not ejected at the time
}

// nodes returns a snapshot of the nodes of service at now, in the order of
// the registry's snapshot; nil for a service the balancer does not hold.
// It only reads: no state changes, and a call in progress is not disturbed.
func (b *balancer) nodes(service string, now time.Time) []nodeSnapshot {
	st := (*b.services.Load())[service]
	if st == nil {
		return nil
	}
	ns := now.UnixNano()
	view := st.view.Load().nodes
	out := make([]nodeSnapshot, len(view))
	for i, n := range view {
		s := nodeSnapshot{id: n.id, addr: n.addr, inFlight: n.inflight.Load(), failures: n.fails.Load()}
		if n.at.Load() != 0 {
			s.measured = true
			s.latency = time.Duration(n.estimate(ns, float64(b.decay)))
		}
		if u := n.ejectUntil.Load(); u > ns {
			s.ejectedUntil = time.Unix(0, u)
		}
		out[i] = s
	}
	return out
}
