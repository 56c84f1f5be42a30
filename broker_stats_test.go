package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// topicRow returns the /stats row of topic.
func topicRow(st statsJSON, topic string) (topicJSON, bool) {
	for _, tp := range st.Topics {
		if tp.Topic == topic && !tp.Other {
			return tp, true
		}
	}
	return topicJSON{}, false
}

// TestStatsTopics: /stats shows each topic's subscribers, queue groups,
// messages published and delivered, and what a slow subscriber lost, busiest
// first; /metrics has no topic label.
func TestStatsTopics(t *testing.T) {
	t.Parallel()
	s, ts := newTestServer(t, statsConfig(), func(s *server) {
		s.broker.queueLen = 4
		s.broker.queueBytes = 256 << 10
		s.broker.writeTimeout = 5 * time.Second
	})
	w1 := subscribe(t, ts.URL, "/broker?topic=orders&queue=workers")
	w2 := subscribe(t, ts.URL, "/broker?topic=orders&queue=workers")
	ev := subscribe(t, ts.URL, "/broker?topic=events")
	// A subscriber that never reads, with a small receive buffer: the
	// sidecar's writes to it block soon, and it falls behind.
	dialer := &net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
		var err error
		c.Control(func(fd uintptr) { err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return err
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stuck, _, err := websocket.Dial(ctx, wsURL(ts, "/broker?topic=bulk"), &websocket.DialOptions{
		HTTPClient: &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}},
	})
	if err != nil {
		t.Fatalf("dial the stuck subscriber: %v", err)
	}
	t.Cleanup(func() { stuck.CloseNow() })
	waitSubscribers(t, s, 4)

	publish := func(topic, body string) {
		t.Helper()
		if code, resp := do(t, "POST", ts.URL+"/broker?topic="+topic, body); code != http.StatusOK {
			t.Fatalf("publish to %s = %d %s", topic, code, resp)
		}
	}
	for i := range 6 {
		publish("orders", fmt.Sprint(i))
	}
	for i := range 3 {
		publish("events", fmt.Sprint(i))
	}
	publish("nobody", "x")
	big := strings.Repeat("b", 64<<10)
	bulk := 0
	for s.broker.slowDisconnects.Load() == 0 {
		if bulk == 5000 {
			t.Fatalf("the stuck subscriber never fell behind after %d messages", bulk)
		}
		publish("bulk", big)
		bulk++
	}
	// The stuck subscriber may fall behind after as few as 5 messages; the
	// topic with no subscriber left then takes more, so that it is the
	// busiest whatever the kernel's buffers took.
	for bulk < 20 {
		publish("bulk", "x")
		bulk++
	}
	eventually(t, 5*time.Second, "the subscribers get their messages", func() bool {
		_, n1 := w1.snapshot()
		_, n2 := w2.snapshot()
		_, ne := ev.snapshot()
		return n1+n2 == 6 && ne == 3
	})

	eventually(t, 5*time.Second, "/stats counts every delivery", func() bool {
		st := getStats(t, ts.URL)
		o, _ := topicRow(st, "orders")
		e, _ := topicRow(st, "events")
		return o.Delivered == 6 && e.Delivered == 3
	})
	st := getStats(t, ts.URL)
	for _, want := range []topicJSON{
		{Topic: "orders", Subscribers: 2, QueueGroups: 1, Published: 6, Delivered: 6},
		{Topic: "events", Subscribers: 1, Published: 3, Delivered: 3},
		{Topic: "nobody", Published: 1},
	} {
		if got, ok := topicRow(st, want.Topic); !ok || got != want {
			t.Errorf("/stats topic %s = %+v (present %v), want %+v", want.Topic, got, ok, want)
		}
	}
	b, _ := topicRow(st, "bulk")
	if b.Published != int64(bulk) || b.SlowDisconnects != 1 || b.Dropped == 0 || b.Delivered+b.Dropped > b.Published {
		t.Errorf("/stats topic bulk = %+v after %d published, want 1 slow disconnect and drops", b, bulk)
	}
	if st.Topics[0].Topic != "bulk" || st.Topics[1].Topic != "orders" {
		t.Errorf("/stats topics %+v, want the busiest (bulk, orders) first", st.Topics)
	}
	// Totals agree with /metrics, which names no topic.
	m := getMetrics(t, ts.URL)
	var published, dropped int64
	for _, tp := range st.Topics {
		published += tp.Published
		dropped += tp.Dropped
	}
	if float64(published) != m["sidecar_broker_published_total"] || float64(dropped) != m["sidecar_broker_dropped_total"] {
		t.Errorf("topics add up to %d published, %d dropped; /metrics says %v, %v", published, dropped,
			m["sidecar_broker_published_total"], m["sidecar_broker_dropped_total"])
	}
	for key := range m {
		if strings.Contains(key, "orders") || strings.Contains(key, "topic=") {
			t.Errorf("/metrics %s: labelled by topic", key)
		}
	}
}

// TestStatsTopicsBounded: topics are chosen by callers. Publishing to
// thousands of them keeps at most maxTopicStats counters, /stats at most
// topTopics rows plus one for the rest, and the busy topics and those with
// subscribers keep theirs; nothing is lost from the totals.
func TestStatsTopicsBounded(t *testing.T) {
	t.Parallel()
	s, ts := newTestServer(t, statsConfig())
	sub := subscribe(t, ts.URL, "/broker?topic=quiet-but-subscribed")
	waitSubscribers(t, s, 1)
	for range 50 {
		if code, body := do(t, "POST", ts.URL+"/broker?topic=busy", "m"); code != http.StatusOK {
			t.Fatalf("publish = %d %s", code, body)
		}
	}
	const random = 2000
	for i := range random {
		s.broker.publish(fmt.Sprintf("random-%d", i), &Message{Header: map[string]string{}, Body: []byte("x")})
	}
	if code, body := do(t, "POST", ts.URL+"/broker?topic=quiet-but-subscribed", "m"); code != http.StatusOK {
		t.Fatalf("publish = %d %s", code, body)
	}
	eventually(t, 5*time.Second, "the subscriber gets its message", func() bool { _, n := sub.snapshot(); return n == 1 })

	ts2 := s.broker.topicStats
	ts2.mu.RLock()
	held := len(ts2.m)
	ts2.mu.RUnlock()
	if held > maxTopicStats {
		t.Errorf("%d topics with counters after %d random ones, want at most %d", held, random, maxTopicStats)
	}
	st := getStats(t, ts.URL)
	if len(st.Topics) != topTopics+1 || !st.Topics[topTopics].Other {
		t.Fatalf("/stats has %d topic rows, want %d and the rest", len(st.Topics), topTopics+1)
	}
	if st.Topics[0].Topic != "busy" || st.Topics[0].Published != 50 {
		t.Errorf("busiest topic %+v, want busy with 50", st.Topics[0])
	}
	var published int64
	for _, tp := range st.Topics {
		published += tp.Published
	}
	if want := int64(50 + random + 1); published != want {
		t.Errorf("topics add up to %d published, want %d", published, want)
	}
	ts2.mu.RLock()
	q := ts2.m["quiet-but-subscribed"]
	ts2.mu.RUnlock()
	if q == nil || q.subscribers.Load() != 1 || q.delivered.Load() != 1 {
		t.Errorf("the subscribed topic lost its counters: %+v", q)
	}
	sub.conn.Close(websocket.StatusNormalClosure, "")
	waitSubscribers(t, s, 0)
	if q.subscribers.Load() != 0 {
		t.Errorf("subscribers after the subscriber left = %d, want 0", q.subscribers.Load())
	}
}

// TestTopicStatsEvict: a full table gives a new topic the place of the
// quietest one without subscribers, adding the latter's counts to other;
// with every topic subscribed, the new one counts as other.
func TestTopicStatsEvict(t *testing.T) {
	t.Parallel()
	ts := newTopicStats(3)
	a := ts.subscribe("a")
	for range 5 {
		ts.countPublished("b")
	}
	ts.countPublished("c")
	ts.countPublished("d") // evicts c, the quietest without subscribers
	if ts.m["c"] != nil || ts.m["d"] == nil || ts.other.published.Load() != 1 {
		t.Fatalf("after d: topics %v, other published %d; want c evicted into other", keys(ts.m), ts.other.published.Load())
	}
	ts.subscribe("b")
	ts.subscribe("d")
	ts.countPublished("e") // all subscribed: e counts as other
	if ts.m["e"] != nil || ts.other.published.Load() != 2 {
		t.Errorf("after e: topics %v, other published %d; want e in other", keys(ts.m), ts.other.published.Load())
	}
	ts.release(a)
	ts.countPublished("f") // a has no subscriber now and the least traffic
	if ts.m["a"] != nil || ts.m["f"] == nil {
		t.Errorf("after f: topics %v, want a evicted", keys(ts.m))
	}
	rows := ts.top(1, func(string) int { return 0 })
	if len(rows) != 2 || rows[0].Topic != "b" || !rows[1].Other || rows[1].Published != 4 {
		t.Errorf("top(1) = %+v, want b, then the rest (c and e in other, d, f: 4 published)", rows)
	}
}

func keys(m map[string]*topicCounters) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
