package main

// broker_stats.go counts the broker's traffic by topic, for the Topics
// section of /stats: messages published, delivered and dropped and slow
// subscribers disconnected, with the subscribers and queue groups each
// topic has here. Callers choose topics, so memory is bounded: at most
// maxTopicStats topics have counters of their own, kept by traffic (a new
// topic takes the place of the quietest one without subscribers, whose
// counts go to the "other" row), /stats shows the busiest topTopics, and
// /metrics has no topic label at all (its broker counters are totals).
//
// The broker calls in at five places only: countPublished when it accepts
// a message, countDropped when a queue group loses one (no member had
// room), and a subscriber's countDelivered, countDropped and
// countSlowDisconnect; subscribing holds the topic's counters
// (topicStats.subscribe) until the subscriber's writer has ended.

import (
	"cmp"
	"slices"
	"sync"
	"sync/atomic"
)

const (
	maxTopicStats = 256 // topics with counters of their own
	topTopics     = 20  // topics /stats shows, the busiest first
)

// topicCounters counts one topic's traffic on this sidecar (or, as
// topicStats.other, that of topics without counters of their own).
type topicCounters struct {
	topic           string
	subscribers     atomic.Int64 // connected subscribers counting here; while > 0 the entry stays
	published       atomic.Int64 // messages accepted for delivery
	delivered       atomic.Int64 // frames written to subscribers
	dropped         atomic.Int64 // messages lost because a subscriber was too slow
	slowDisconnects atomic.Int64 // subscribers dropped for lagging
}

// traffic is what ranks topics: messages in and out.
func (c *topicCounters) traffic() int64 { return c.published.Load() + c.delivered.Load() }

// topicStats holds the counters of at most max topics. Safe for concurrent
// use. A publish to a topic with counters takes the read lock; adding a
// topic (and evicting one) takes the write lock, so no count is lost to an
// eviction. Subscribers count without a lock: their entry cannot be evicted
// while they hold it.
type topicStats struct {
	max   int
	mu    sync.RWMutex // guards m and the move of an evicted entry's counts into other
	m     map[string]*topicCounters
	other topicCounters // topics evicted, or without room
}

// newTopicStats returns an empty table with room for max topics.
func newTopicStats(max int) *topicStats {
	return &topicStats{max: max, m: map[string]*topicCounters{}}
}

// countPublished counts one message accepted for topic.
func (t *topicStats) countPublished(topic string) {
	t.count(topic, func(c *topicCounters) { c.published.Add(1) })
}

// countDropped counts n messages for topic lost by the broker rather than
// by one subscriber (a queue group with no member that had room).
func (t *topicStats) countDropped(topic string, n int) {
	t.count(topic, func(c *topicCounters) { c.dropped.Add(int64(n)) })
}

// count applies add to topic's counters, adding them if need be.
func (t *topicStats) count(topic string, add func(*topicCounters)) {
	t.mu.RLock()
	c := t.m[topic]
	if c != nil {
		add(c)
	}
	t.mu.RUnlock()
	if c != nil {
		return
	}
	t.mu.Lock()
	add(t.entry(topic))
	t.mu.Unlock()
}

// subscribe returns the counters a new subscriber of topic counts in, held
// until release.
func (t *topicStats) subscribe(topic string) *topicCounters {
	t.mu.Lock()
	defer t.mu.Unlock()
	c := t.entry(topic)
	c.subscribers.Add(1)
	return c
}

// release lets go of counters subscribe returned, once nothing more is
// counted in them.
func (t *topicStats) release(c *topicCounters) { c.subscribers.Add(-1) }

// entry returns the counters of topic, adding them if there is room or a
// quieter topic without subscribers to evict; else other. t.mu is held for
// writing.
func (t *topicStats) entry(topic string) *topicCounters {
	if c := t.m[topic]; c != nil {
		return c
	}
	if len(t.m) >= t.max && !t.evict() {
		return &t.other
	}
	c := &topicCounters{topic: topic}
	t.m[topic] = c
	return c
}

// evict removes the quietest topic without subscribers, adding its counts
// to other; false when every topic has subscribers. t.mu is held for
// writing. A newcomer starts at zero, so a stream of new topics replaces
// one another and leaves the busy ones alone.
func (t *topicStats) evict() bool {
	var victim *topicCounters
	for _, c := range t.m {
		if c.subscribers.Load() == 0 && (victim == nil || c.traffic() < victim.traffic()) {
			victim = c
		}
	}
	if victim == nil {
		return false
	}
	delete(t.m, victim.topic)
	t.other.published.Add(victim.published.Load())
	t.other.delivered.Add(victim.delivered.Load())
	t.other.dropped.Add(victim.dropped.Load())
	t.other.slowDisconnects.Add(victim.slowDisconnects.Load())
	return true
}

// top returns the busiest n topics, busiest first, then a row (Other set)
// adding up every other topic when there is any. groups says how many
// queue groups a topic has here.
func (t *topicStats) top(n int, groups func(topic string) int) []topicJSON {
	t.mu.RLock()
	all := make([]*topicCounters, 0, len(t.m))
	for _, c := range t.m {
		all = append(all, c)
	}
	rest := topicJSON{
		Other:           true,
		Subscribers:     t.other.subscribers.Load(),
		Published:       t.other.published.Load(),
		Delivered:       t.other.delivered.Load(),
		Dropped:         t.other.dropped.Load(),
		SlowDisconnects: t.other.slowDisconnects.Load(),
	}
	t.mu.RUnlock()
	slices.SortFunc(all, func(a, b *topicCounters) int {
		if c := cmp.Compare(b.traffic(), a.traffic()); c != 0 {
			return c
		}
		return cmp.Compare(a.topic, b.topic)
	})
	out := []topicJSON{}
	for i, c := range all {
		row := topicJSON{
			Topic:           c.topic,
			Subscribers:     c.subscribers.Load(),
			QueueGroups:     groups(c.topic),
			Published:       c.published.Load(),
			Delivered:       c.delivered.Load(),
			Dropped:         c.dropped.Load(),
			SlowDisconnects: c.slowDisconnects.Load(),
		}
		if i < n {
			out = append(out, row)
			continue
		}
		rest.Subscribers += row.Subscribers
		rest.QueueGroups += row.QueueGroups
		rest.Published += row.Published
		rest.Delivered += row.Delivered
		rest.Dropped += row.Dropped
		rest.SlowDisconnects += row.SlowDisconnects
	}
	if rest != (topicJSON{Other: true}) {
		out = append(out, rest)
	}
	return out
}

// topicsJSON is the Topics section of /stats (stats.setTopics).
func (b *broker) topicsJSON() []topicJSON {
	return b.topicStats.top(topTopics, func(topic string) int { return len(b.topics.get(topic).groupNames()) })
}

// countPublished counts a message accepted for topic.
func (b *broker) countPublished(topic string) {
	b.published.Add(1)
	b.topicStats.countPublished(topic)
}

// countDropped counts n messages for topic lost to a queue group and
// returns the broker's total.
func (b *broker) countDropped(topic string, n int) int64 {
	b.topicStats.countDropped(topic, n)
	return b.dropped.Add(int64(n))
}

// countDelivered counts n frames written to s.
func (s *subscriber) countDelivered(n int) {
	s.b.delivered.Add(int64(n))
	s.stats.delivered.Add(int64(n))
}

// countDropped counts n messages lost to s.
func (s *subscriber) countDropped(n int) {
	s.b.dropped.Add(int64(n))
	s.stats.dropped.Add(int64(n))
}

// countSlowDisconnect counts s dropped for lagging.
func (s *subscriber) countSlowDisconnect() {
	s.b.slowDisconnects.Add(1)
	s.stats.slowDisconnects.Add(1)
}
