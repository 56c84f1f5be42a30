package main

import (
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"time"
)

// testClock is a clock that moves only when a test moves it.
type testClock struct{ ns atomic.Int64 }

func (c *testClock) now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *testClock) advance(d time.Duration) { c.ns.Add(int64(d)) }

// skewClock is the wall clock moved on by what the test added: durations
// measured on it are real, and the test ends a long period (an ejection)
// at once by moving it.
type skewClock struct{ skew atomic.Int64 }

func (c *skewClock) now() time.Time          { return time.Now().Add(time.Duration(c.skew.Load())) }
func (c *skewClock) advance(d time.Duration) { c.skew.Add(int64(d)) }

// testBalancer is a balancer of strategy on a test clock.
func testBalancer(strategy string) (*balancer, *testClock) {
	clk := &testClock{}
	clk.ns.Store(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return newBalancer(strategy, clk.now, slog.New(slog.NewTextHandler(io.Discard, nil))), clk
}

// call runs one call through b on the test clock: pick (avoiding avoid),
// latency d, outcome ok. It returns the node picked.
func call(b *balancer, clk *testClock, st *svcState, avoid []*nodeState, d time.Duration, ok bool) *nodeState {
	start := clk.now()
	n := b.pick(st, avoid, start)
	clk.advance(d)
	b.done(n, start, d, ok)
	return n
}

// callNode runs one call on n, chosen by the test, as call does.
func callNode(b *balancer, clk *testClock, n *nodeState, d time.Duration, ok bool) {
	start := clk.now()
	n.inflight.Add(1)
	clk.advance(d)
	b.done(n, start, d, ok)
}

// isEjected reports whether n is ejected by b's clock.
func (b *balancer) isEjected(n *nodeState) bool {
	return n.ejectUntil.Load() > b.now().UnixNano()
}

// testService is a service of n nodes at distinct ports.
func testService(name string, n int) *Service {
	svc := &Service{Name: name}
	for i := range n {
		svc.Nodes = append(svc.Nodes, &Node{ID: fmt.Sprintf("%s-%d", name, i), Address: "10.0.0.1", Port: 1000 + i})
	}
	return svc
}

func TestBalancerSpread(t *testing.T) {
	t.Parallel()
	for _, strategy := range []string{strategyP2C, strategyRandom, strategyRoundRobin} {
		t.Run(strategy, func(t *testing.T) {
			b, clk := testBalancer(strategy)
			st := b.service(testService("s", 3))
			got := map[string]int{}
			for range 3000 {
				got[call(b, clk, st, nil, time.Millisecond, true).id]++
			}
			for id, c := range got {
				if c < 600 {
					t.Errorf("%s: node %s got %d of 3000 picks, want about 1000 (%v)", strategy, id, c, got)
				}
			}
			if len(got) != 3 {
				t.Errorf("%s: picks reached %d nodes, want 3 (%v)", strategy, len(got), got)
			}
		})
	}
}

func TestBalancerP2CPrefersFastAndIdle(t *testing.T) {
	t.Parallel()
	b, clk := testBalancer(strategyP2C)
	st := b.service(testService("s", 2))
	fast, slow := st.view.Load().nodes[0], st.view.Load().nodes[1]
	for range 2 { // the first call opens a connection and is not a sample
		callNode(b, clk, fast, time.Millisecond, true)
		callNode(b, clk, slow, 20*time.Millisecond, true)
	}
	for range 100 {
		if n := call(b, clk, st, nil, time.Millisecond, true); n != fast {
			t.Fatalf("p2c picked the 20ms node over the idle 1ms node")
		}
	}
	// A queue on the fast node makes the slow one cheaper.
	fast.inflight.Add(100)
	if n := b.pick(st, nil, clk.now()); n != slow {
		t.Errorf("p2c picked the node with 100 calls in flight")
	}
}

// simPick is one call of a simulation: the node (its index in the
// service's node list) and when the call started, since the simulation
// began.
type simPick struct {
	node int
	at   time.Duration
}

// simulate drives b on its test clock as conc callers would, each calling
// again gap after its call returns (gap only with one caller), until calls
// calls have started or the clock reaches until. latency is how long a
// call to node i started at at takes; first is true for the node's first
// call, which opens a connection. Every call succeeds.
func simulate(t *testing.T, b *balancer, clk *testClock, st *svcState, conc, calls int, gap, until time.Duration,
	latency func(i int, first bool, at time.Duration) time.Duration) []simPick {
	t.Helper()
	if conc > 1 && gap > 0 {
		t.Fatal("simulate: a gap between calls needs a single caller")
	}
	nodes := st.view.Load().nodes
	index := make(map[*nodeState]int, len(nodes))
	for i, n := range nodes {
		index[n] = i
	}
	seen := make([]bool, len(nodes))
	type simCall struct {
		n          *nodeState
		start, end time.Time
	}
	var inflight []simCall
	var picks []simPick
	begin := clk.now()
	startCall := func() {
		now := clk.now()
		n := b.pick(st, nil, now)
		i := index[n]
		d := latency(i, !seen[i], now.Sub(begin))
		seen[i] = true
		inflight = append(inflight, simCall{n, now, now.Add(d)})
		picks = append(picks, simPick{i, now.Sub(begin)})
	}
	for range conc {
		startCall()
	}
	for len(inflight) > 0 {
		k := 0
		for j := range inflight {
			if inflight[j].end.Before(inflight[k].end) {
				k = j
			}
		}
		c := inflight[k]
		inflight = append(inflight[:k], inflight[k+1:]...)
		if c.end.Sub(begin) >= until {
			break
		}
		if c.end.After(clk.now()) {
			clk.ns.Store(c.end.UnixNano())
		}
		b.done(c.n, c.start, c.end.Sub(c.start), true)
		clk.advance(gap)
		if len(picks) < calls && clk.now().Sub(begin) < until {
			startCall()
		}
	}
	return picks
}

// countPicks counts the picks of each of n nodes that started in [from, to).
func countPicks(picks []simPick, n int, from, to time.Duration) (counts []int, total int) {
	counts = make([]int, n)
	for _, p := range picks {
		if p.at >= from && p.at < to {
			counts[p.node]++
			total++
		}
	}
	return counts, total
}

// connecting is the latency of identical nodes whose first call opens a
// connection and takes five times as long.
func connecting(base time.Duration) func(int, bool, time.Duration) time.Duration {
	return func(_ int, first bool, _ time.Duration) time.Duration {
		if first {
			return 5 * base
		}
		return base
	}
}

// TestBalancerSequentialNoStarvation: one caller at a time, 300 calls to
// three identical nodes whose first call is slower (it opens a
// connection): each node gets at least a fifth. Before the latency
// estimate decayed, the first node to answer a second call fast won every
// later comparison and the others were never measured again.
func TestBalancerSequentialNoStarvation(t *testing.T) {
	t.Parallel()
	jitter := rand.New(rand.NewPCG(1, 2))
	tests := []struct {
		name    string
		gap     time.Duration
		latency func(int, bool, time.Duration) time.Duration
	}{
		{"back to back", 0, connecting(time.Millisecond)},
		{"a call every 100ms", 100 * time.Millisecond, connecting(time.Millisecond)},
		{"a call a second, latency 1ms to 3ms", time.Second, func(_ int, first bool, _ time.Duration) time.Duration {
			d := time.Millisecond + time.Duration(jitter.Int64N(int64(2*time.Millisecond)))
			if first {
				d *= 5
			}
			return d
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, clk := testBalancer(strategyP2C)
			st := b.service(testService("s", 3))
			picks := simulate(t, b, clk, st, 1, 300, tt.gap, time.Hour, tt.latency)
			counts, total := countPicks(picks, 3, 0, time.Hour)
			for i, c := range counts {
				if c < total/5 {
					t.Errorf("node %d got %d of %d calls, want at least a fifth (%v)", i, c, total, counts)
				}
			}
		})
	}
}

// TestBalancerSlowNodeRecovers: a node ten times slower than the others
// for a minute, then as fast, has its share back within 30 s, one caller
// or eight.
func TestBalancerSlowNodeRecovers(t *testing.T) {
	t.Parallel()
	const recovered = time.Minute
	for _, conc := range []int{1, 8} {
		t.Run(fmt.Sprintf("concurrency %d", conc), func(t *testing.T) {
			t.Parallel()
			b, clk := testBalancer(strategyP2C)
			st := b.service(testService("s", 3))
			base := connecting(10 * time.Millisecond)
			picks := simulate(t, b, clk, st, conc, 1<<30, 0, recovered+30*time.Second, func(i int, first bool, at time.Duration) time.Duration {
				if i == 0 && at < recovered {
					return 10 * base(i, first, at)
				}
				return base(i, first, at)
			})
			before, n := countPicks(picks, 3, recovered-30*time.Second, recovered)
			counts, total := countPicks(picks, 3, recovered+25*time.Second, recovered+30*time.Second)
			t.Logf("node 0: %d of %d calls in the 30 s before it recovered, %d of %d from 25 s to 30 s after", before[0], n, counts[0], total)
			if counts[0] < total/5 {
				t.Errorf("recovered node got %d of %d calls 25 s to 30 s after it recovered, want at least a fifth (%v)", counts[0], total, counts)
			}
		})
	}
}

// TestBalancerSlowNodeShare: a node that stays ten times slower gets under
// a tenth of the calls, yet is still measured now and then (at least once
// in any 30 s), so that it would be seen to recover.
func TestBalancerSlowNodeShare(t *testing.T) {
	t.Parallel()
	for _, conc := range []int{1, 8} {
		t.Run(fmt.Sprintf("concurrency %d", conc), func(t *testing.T) {
			t.Parallel()
			b, clk := testBalancer(strategyP2C)
			st := b.service(testService("s", 3))
			base := connecting(10 * time.Millisecond)
			const run = 2 * time.Minute
			picks := simulate(t, b, clk, st, conc, 1<<30, 0, run, func(i int, first bool, at time.Duration) time.Duration {
				if i == 0 {
					return 10 * base(i, first, at)
				}
				return base(i, first, at)
			})
			counts, total := countPicks(picks, 3, 0, run)
			if counts[0]*10 >= total {
				t.Errorf("node ten times slower got %d of %d calls, want under a tenth (%v)", counts[0], total, counts)
			}
			for from := time.Duration(0); from+30*time.Second <= run; from += 30 * time.Second {
				if c, _ := countPicks(picks, 3, from, from+30*time.Second); c[0] == 0 {
					t.Errorf("slow node not called from %s to %s: starved (%v of %d calls in all)", from, from+30*time.Second, counts, total)
				}
			}
		})
	}
}

// TestBalancerUnansweredFirstCall: a node of a new service that never
// answers holds at most the share of callers that the start, when nothing
// is known of any node, spread over it; not every caller in turn.
func TestBalancerUnansweredFirstCall(t *testing.T) {
	t.Parallel()
	const conc = 8
	b, clk := testBalancer(strategyP2C)
	st := b.service(testService("s", 3))
	picks := simulate(t, b, clk, st, conc, 1<<30, 0, 10*time.Second, func(i int, first bool, at time.Duration) time.Duration {
		if i == 0 {
			return time.Hour
		}
		return connecting(10*time.Millisecond)(i, first, at)
	})
	counts, total := countPicks(picks, 3, 0, time.Hour)
	if counts[0] > conc/2 {
		t.Errorf("the node that never answers holds %d of %d callers, want at most half (%d calls in all: %v)", counts[0], conc, total, counts)
	}
}

// TestBalancerFirstCallNotASample: a node's first successful call opens
// its connection, so its latency is not taken as the node's; the second
// is.
func TestBalancerFirstCallNotASample(t *testing.T) {
	t.Parallel()
	b, clk := testBalancer(strategyP2C)
	n := b.service(testService("s", 1)).view.Load().nodes[0]
	callNode(b, clk, n, 50*time.Millisecond, true)
	if n.at.Load() != 0 {
		t.Fatalf("after the first call (50ms): estimate %s, want none yet", time.Duration(n.estimate(clk.now().UnixNano(), float64(b.decay))))
	}
	callNode(b, clk, n, time.Millisecond, true)
	if got := time.Duration(n.estimate(clk.now().UnixNano(), float64(b.decay))); got != time.Millisecond {
		t.Errorf("after a second call of 1ms: estimate %s, want 1ms", got)
	}
}

// TestBalancerPeakEWMA: the estimate takes a slower answer at once, sinks
// toward zero while the node is idle (halving in decay x ln 2), and
// follows faster answers over a few time constants, not a few calls.
func TestBalancerPeakEWMA(t *testing.T) {
	t.Parallel()
	b, clk := testBalancer(strategyP2C)
	n := b.service(testService("s", 1)).view.Load().nodes[0]
	est := func() time.Duration { return time.Duration(n.estimate(clk.now().UnixNano(), float64(b.decay))) }
	callNode(b, clk, n, time.Millisecond, true) // opens the connection
	callNode(b, clk, n, 8*time.Millisecond, true)
	if got := est(); got != 8*time.Millisecond {
		t.Fatalf("after one sample of 8ms: estimate %s, want 8ms", got)
	}
	clk.advance(time.Duration(float64(b.decay) * math.Ln2))
	if got, want := est(), 4*time.Millisecond; got < want-want/100 || got > want+want/100 {
		t.Fatalf("idle for decay x ln 2 after 8ms: estimate %s, want about %s", got, want)
	}
	callNode(b, clk, n, 20*time.Millisecond, true)
	if got := est(); got != 20*time.Millisecond {
		t.Fatalf("after a 20ms peak: estimate %s, want 20ms at once", got)
	}
	callNode(b, clk, n, time.Millisecond, true)
	if got := est(); got < 19*time.Millisecond {
		t.Fatalf("one 1ms call after the 20ms peak: estimate %s, want still about 20ms", got)
	}
	for range 50_000 { // 50 s (5 time constants) of back-to-back 1ms calls
		callNode(b, clk, n, time.Millisecond, true)
	}
	if got := est(); got > 1200*time.Microsecond {
		t.Errorf("after 50 s of 1ms calls following a 20ms peak: estimate %s, want about 1ms", got)
	}
}

// TestBalancerNewNodeStartsAtMedian: a node that joins a service whose
// nodes are measured starts at their median estimate, neither at zero
// (which would send it every call until its first answer) nor at infinity
// (which would starve it).
func TestBalancerNewNodeStartsAtMedian(t *testing.T) {
	t.Parallel()
	b, clk := testBalancer(strategyP2C)
	svc := testService("s", 3)
	st := b.service(svc)
	for i, n := range st.view.Load().nodes {
		callNode(b, clk, n, 5*time.Millisecond, true) // opens a connection: not a sample
		callNode(b, clk, n, time.Duration(i+1)*time.Millisecond, true)
	}
	next := &Service{Name: "s", Nodes: append(append([]*Node{}, svc.Nodes...), &Node{ID: "s-new", Address: "10.0.0.2", Port: 1000})}
	nodes := b.service(next).view.Load().nodes
	got := time.Duration(nodes[3].estimate(clk.now().UnixNano(), float64(b.decay)))
	if want := 2 * time.Millisecond; got < want*99/100 || got > want {
		t.Errorf("new node's estimate = %s, want the median of 1ms, 2ms, 3ms: about %s", got, want)
	}
}

func TestBalancerAvoid(t *testing.T) {
	t.Parallel()
	for _, strategy := range []string{strategyP2C, strategyRandom, strategyRoundRobin} {
		b, clk := testBalancer(strategy)
		st := b.service(testService("s", 3))
		nodes := st.view.Load().nodes
		for range 100 {
			if n := call(b, clk, st, nodes[:2], time.Millisecond, true); n != nodes[2] {
				t.Fatalf("%s: pick avoiding nodes 0 and 1 = %s", strategy, n.id)
			}
		}
		// Every node avoided: a retry still gets one.
		if n := b.pick(st, nodes, clk.now()); n == nil {
			t.Fatalf("%s: pick with every node avoided = nil", strategy)
		}
	}
}

func TestBalancerEjection(t *testing.T) {
	t.Parallel()
	b, clk := testBalancer(strategyP2C)
	b.ejectBase, b.ejectMax = time.Hour, 10*time.Hour
	st := b.service(testService("s", 4))
	nodes := st.view.Load().nodes
	bad := nodes[0]
	for range defaultEjectAfter - 1 {
		callNode(b, clk, bad, time.Millisecond, false)
	}
	if b.isEjected(bad) {
		t.Fatalf("ejected after %d failures, want %d", defaultEjectAfter-1, defaultEjectAfter)
	}
	callNode(b, clk, bad, time.Millisecond, false)
	if !b.isEjected(bad) || st.up.ejections.Load() != 1 {
		t.Fatalf("not ejected after %d failures in a row", defaultEjectAfter)
	}
	first := time.Duration(bad.ejectUntil.Load() - clk.now().UnixNano())
	for range 1000 {
		if n := call(b, clk, st, nil, time.Millisecond, true); n == bad {
			t.Fatal("picked an ejected node while others are usable")
		}
	}
	// The ejection ends; failing again ejects it for twice as long.
	clk.advance(first)
	for range defaultEjectAfter {
		callNode(b, clk, bad, 0, false)
	}
	second := time.Duration(bad.ejectUntil.Load() - clk.now().UnixNano())
	if first != time.Hour || second != 2*time.Hour {
		t.Errorf("ejection periods %s then %s, want 1h then 2h", first, second)
	}
	// A success brings it back and shortens the next ejection.
	callNode(b, clk, bad, time.Millisecond, true)
	if b.isEjected(bad) || bad.level.Load() != 1 {
		t.Errorf("after a success: ejected %v level %d, want false 1", b.isEjected(bad), bad.level.Load())
	}
}

func TestBalancerNeverEjectsAll(t *testing.T) {
	t.Parallel()
	tests := []struct{ nodes, maxEjected int }{{1, 0}, {2, 1}, {3, 1}, {4, 2}, {10, 5}}
	for _, tt := range tests {
		b, clk := testBalancer(strategyP2C)
		b.ejectBase = time.Hour
		st := b.service(testService("s", tt.nodes))
		for _, n := range st.view.Load().nodes {
			for range defaultEjectAfter * 3 {
				callNode(b, clk, n, time.Millisecond, false)
			}
		}
		ejected := 0
		for _, n := range st.view.Load().nodes {
			if b.isEjected(n) {
				ejected++
			}
		}
		if ejected != tt.maxEjected {
			t.Errorf("%d nodes all failing: %d ejected, want %d", tt.nodes, ejected, tt.maxEjected)
		}
		if n := b.pick(st, nil, clk.now()); n == nil {
			t.Errorf("%d nodes: pick = nil", tt.nodes)
		}
	}
}

func TestBalancerAllEjectedStillPicks(t *testing.T) {
	t.Parallel()
	for _, strategy := range []string{strategyP2C, strategyRandom, strategyRoundRobin} {
		b, clk := testBalancer(strategy)
		st := b.service(testService("s", 3))
		for _, n := range st.view.Load().nodes {
			n.ejectUntil.Store(clk.now().Add(time.Hour).UnixNano())
		}
		if n := b.pick(st, nil, clk.now()); n == nil {
			t.Errorf("%s: pick with every node ejected = nil, want some node", strategy)
		}
	}
}

// TestBalancerState: node state survives a new snapshot that keeps the
// node, is dropped for nodes that left or moved, and forget drops the
// service.
func TestBalancerState(t *testing.T) {
	t.Parallel()
	b, _ := testBalancer(strategyP2C)
	svc := testService("s", 3)
	st := b.service(svc)
	if b.service(svc) != st {
		t.Fatal("same snapshot: state rebuilt")
	}
	old := st.view.Load().nodes

	next := &Service{Name: "s", Nodes: []*Node{
		svc.Nodes[0], // stays
		{ID: svc.Nodes[1].ID, Address: "10.0.0.2", Port: 1001}, // moved
	}}
	if b.service(next) != st {
		t.Fatal("new snapshot: service state (counters) not kept")
	}
	nodes := st.view.Load().nodes
	if len(nodes) != 2 || nodes[0] != old[0] || nodes[1] == old[1] || nodes[1].url != "http://10.0.0.2:1001/" {
		t.Fatalf("after a snapshot keeping node 0 and moving node 1: %d nodes, kept %v, fresh %v, url %s",
			len(nodes), nodes[0] == old[0], nodes[1] != old[1], nodes[1].url)
	}
	b.forget("s")
	if _, ok := (*b.services.Load())["s"]; ok {
		t.Fatal("forget kept the service")
	}
}

func TestNodeHostPort(t *testing.T) {
	t.Parallel()
	tests := []struct {
		addr string
		port int
		want string
	}{
		{"127.0.0.1", 8080, "127.0.0.1:8080"},
		{"127.0.0.1:9090", 0, "127.0.0.1:9090"},
		{"[::]", 60728, "[::]:60728"},
		{"::1", 80, "[::1]:80"},
		{"example.com", 443, "example.com:443"},
	}
	for _, tt := range tests {
		if got := nodeHostPort(&Node{Address: tt.addr, Port: tt.port}); got != tt.want {
			t.Errorf("nodeHostPort(%q, %d) = %q, want %q", tt.addr, tt.port, got, tt.want)
		}
	}
}

func TestRetryBudget(t *testing.T) {
	t.Parallel()
	now := time.Now()
	var rb retryBudget
	rb.init(now)
	allowed := 0
	for rb.withdraw(now) {
		allowed++
	}
	if allowed != budgetPerSecond {
		t.Fatalf("fresh budget allowed %d retries, want the minimum %d", allowed, budgetPerSecond)
	}
	for range 100 {
		rb.deposit()
	}
	allowed = 0
	for rb.withdraw(now) {
		allowed++
	}
	if allowed != 20 {
		t.Fatalf("after 100 calls the budget allowed %d retries, want 20 (20%%)", allowed)
	}
	if !rb.withdraw(now.Add(200 * time.Millisecond)) {
		t.Fatal("no retry allowed after 200ms at 10 per second")
	}
	for range 1_000_000 {
		rb.deposit()
	}
	allowed = 0
	for rb.withdraw(now.Add(200 * time.Millisecond)) {
		allowed++
	}
	if allowed != budgetMax/budgetRetry {
		t.Fatalf("budget after a million calls allowed %d retries in a burst, want the cap %d", allowed, budgetMax/budgetRetry)
	}
}

// benchBalancer is a balancer of strategy on the wall clock, as in the
// server.
func benchBalancer(strategy string) *balancer {
	return newBalancer(strategy, time.Now, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

// BenchmarkPick is node selection (service lookup, pick, done) at 10,000
// nodes for each strategy.
func BenchmarkPick(b *testing.B) {
	for _, strategy := range []string{strategyP2C, strategyRandom, strategyRoundRobin} {
		b.Run(strategy+"/10000", func(b *testing.B) {
			bal := benchBalancer(strategy)
			svc := testService("go.micro.srv.bench", 10_000)
			bal.service(svc)
			now := time.Now()
			b.ReportAllocs()
			for b.Loop() {
				st := bal.service(svc)
				n := bal.pick(st, nil, now)
				bal.done(n, now, time.Since(now), true) // as the callers time a call
			}
		})
	}
	b.Run("p2c/10000/half-ejected", func(b *testing.B) {
		bal := benchBalancer(strategyP2C)
		svc := testService("go.micro.srv.bench", 10_000)
		st := bal.service(svc)
		for i, n := range st.view.Load().nodes {
			if i%2 == 0 {
				n.ejectUntil.Store(time.Now().Add(time.Hour).UnixNano())
			}
		}
		now := time.Now()
		b.ReportAllocs()
		for b.Loop() {
			st := bal.service(svc)
			n := bal.pick(st, nil, now)
			n.inflight.Add(-1) // done would end the ejection on success
		}
	})
	b.Run("p2c/10000/parallel", func(b *testing.B) {
		bal := benchBalancer(strategyP2C)
		svc := testService("go.micro.srv.bench", 10_000)
		bal.service(svc)
		now := time.Now()
		b.ReportAllocs()
		b.ResetTimer() // the setup's allocations are not the pick's
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				st := bal.service(svc)
				n := bal.pick(st, nil, now)
				bal.done(n, now, time.Since(now), true) // as the callers time a call
			}
		})
	})
}
