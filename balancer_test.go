package main

import (
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"
)

func testBalancer(strategy string) *balancer {
	return newBalancer(strategy, slog.New(slog.NewTextHandler(io.Discard, nil)))
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
			b := testBalancer(strategy)
			st := b.service(testService("s", 3))
			got := map[string]int{}
			for range 3000 {
				n := b.pick(st, nil, time.Now())
				got[n.id]++
				b.done(n, time.Millisecond, true)
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
	b := testBalancer(strategyP2C)
	st := b.service(testService("s", 2))
	fast, slow := st.view.Load().nodes[0], st.view.Load().nodes[1]
	fast.observe(time.Millisecond)
	slow.observe(20 * time.Millisecond)
	for range 100 {
		if n := b.pick(st, nil, time.Now()); n != fast {
			t.Fatalf("p2c picked the 20ms node over the idle 1ms node")
		} else {
			b.done(n, time.Millisecond, true)
		}
	}
	// A queue on the fast node makes the slow one cheaper.
	fast.inflight.Add(100)
	if n := b.pick(st, nil, time.Now()); n != slow {
		t.Errorf("p2c picked the node with 100 calls in flight")
	}
}

func TestBalancerAvoid(t *testing.T) {
	t.Parallel()
	for _, strategy := range []string{strategyP2C, strategyRandom, strategyRoundRobin} {
		b := testBalancer(strategy)
		st := b.service(testService("s", 3))
		nodes := st.view.Load().nodes
		for range 100 {
			if n := b.pick(st, nodes[:2], time.Now()); n != nodes[2] {
				t.Fatalf("%s: pick avoiding nodes 0 and 1 = %s", strategy, n.id)
			}
			b.done(nodes[2], time.Millisecond, true)
		}
		// Every node avoided: a retry still gets one.
		if n := b.pick(st, nodes, time.Now()); n == nil {
			t.Fatalf("%s: pick with every node avoided = nil", strategy)
		}
	}
}

func TestBalancerEjection(t *testing.T) {
	t.Parallel()
	b := testBalancer(strategyP2C)
	b.ejectBase, b.ejectMax = time.Hour, 10*time.Hour
	st := b.service(testService("s", 4))
	nodes := st.view.Load().nodes
	bad := nodes[0]
	for range defaultEjectAfter - 1 {
		b.done(b.pickNode(bad), time.Millisecond, false)
	}
	if bad.ejected() {
		t.Fatalf("ejected after %d failures, want %d", defaultEjectAfter-1, defaultEjectAfter)
	}
	b.done(b.pickNode(bad), time.Millisecond, false)
	if !bad.ejected() || st.ejections.Load() != 1 {
		t.Fatalf("not ejected after %d failures in a row", defaultEjectAfter)
	}
	first := time.Duration(bad.ejectUntil.Load() - time.Now().UnixNano())
	for range 1000 {
		n := b.pick(st, nil, time.Now())
		if n == bad {
			t.Fatal("picked an ejected node while others are usable")
		}
		b.done(n, time.Millisecond, true)
	}
	// The ejection ends; failing again ejects it for twice as long.
	bad.ejectUntil.Store(1)
	for range defaultEjectAfter {
		b.done(b.pickNode(bad), time.Millisecond, false)
	}
	second := time.Duration(bad.ejectUntil.Load() - time.Now().UnixNano())
	if first > time.Hour || first < 59*time.Minute || second < 119*time.Minute || second > 2*time.Hour {
		t.Errorf("ejection periods %s then %s, want 1h then 2h", first, second)
	}
	// A success brings it back and shortens the next ejection.
	b.done(b.pickNode(bad), time.Millisecond, true)
	if bad.ejected() || bad.level.Load() != 1 {
		t.Errorf("after a success: ejected %v level %d, want false 1", bad.ejected(), bad.level.Load())
	}
}

// pickNode marks n as picked, as pick does, for tests that choose the node.
func (b *balancer) pickNode(n *nodeState) *nodeState {
	n.inflight.Add(1)
	return n
}

func TestBalancerNeverEjectsAll(t *testing.T) {
	t.Parallel()
	tests := []struct{ nodes, maxEjected int }{{1, 0}, {2, 1}, {3, 1}, {4, 2}, {10, 5}}
	for _, tt := range tests {
		b := testBalancer(strategyP2C)
		b.ejectBase = time.Hour
		st := b.service(testService("s", tt.nodes))
		for _, n := range st.view.Load().nodes {
			for range defaultEjectAfter * 3 {
				b.done(b.pickNode(n), time.Millisecond, false)
			}
		}
		ejected := 0
		for _, n := range st.view.Load().nodes {
			if n.ejected() {
				ejected++
			}
		}
		if ejected != tt.maxEjected {
			t.Errorf("%d nodes all failing: %d ejected, want %d", tt.nodes, ejected, tt.maxEjected)
		}
		if n := b.pick(st, nil, time.Now()); n == nil {
			t.Errorf("%d nodes: pick = nil", tt.nodes)
		}
	}
}

func TestBalancerAllEjectedStillPicks(t *testing.T) {
	t.Parallel()
	for _, strategy := range []string{strategyP2C, strategyRandom, strategyRoundRobin} {
		b := testBalancer(strategy)
		st := b.service(testService("s", 3))
		for _, n := range st.view.Load().nodes {
			n.ejectUntil.Store(time.Now().Add(time.Hour).UnixNano())
		}
		if n := b.pick(st, nil, time.Now()); n == nil {
			t.Errorf("%s: pick with every node ejected = nil, want some node", strategy)
		}
	}
}

// TestBalancerState: node state survives a new snapshot that keeps the
// node, is dropped for nodes that left or moved, and forget drops the
// service.
func TestBalancerState(t *testing.T) {
	t.Parallel()
	b := testBalancer(strategyP2C)
	svc := testService("s", 3)
	st := b.service(svc)
	if b.service(svc) != st {
		t.Fatal("same snapshot: state rebuilt")
	}
	old := st.view.Load().nodes
	old[0].observe(time.Millisecond)

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

// BenchmarkPick is node selection (service lookup, pick, done) at 10,000
// nodes for each strategy.
func BenchmarkPick(b *testing.B) {
	for _, strategy := range []string{strategyP2C, strategyRandom, strategyRoundRobin} {
		b.Run(strategy+"/10000", func(b *testing.B) {
			bal := testBalancer(strategy)
			svc := testService("go.micro.srv.bench", 10_000)
			bal.service(svc)
			now := time.Now()
			b.ReportAllocs()
			for b.Loop() {
				st := bal.service(svc)
				n := bal.pick(st, nil, now)
				bal.done(n, time.Millisecond, true)
			}
		})
	}
	b.Run("p2c/10000/half-ejected", func(b *testing.B) {
		bal := testBalancer(strategyP2C)
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
		bal := testBalancer(strategyP2C)
		svc := testService("go.micro.srv.bench", 10_000)
		bal.service(svc)
		now := time.Now()
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				st := bal.service(svc)
				n := bal.pick(st, nil, now)
				bal.done(n, time.Millisecond, true)
			}
		})
	})
}
