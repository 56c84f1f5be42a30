package main

// broker.go owns pub/sub: POST /broker publishes, a websocket GET /broker
// subscribes (and publishes the frames its client writes). Delivery is in
// memory; a Forwarder, when set, carries each publish to other hosts, and a
// Relay, when set, carries every publish through an external engine (NATS)
// that delivers it back. The subscribers' frame writer, which bypasses the
// websocket library, and the assumptions it makes about that library are in
// broker_ws.go.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/coder/websocket"
)

// Defaults of the broker's limits. Tests lower them on the broker's fields.
const (
	brokerMaxMessage   = 1 << 20            // largest message body, if --max_body_bytes is larger
	brokerQueueLen     = 4096               // messages a subscriber may lag before it is dropped
	brokerQueueBytes   = 8 << 20            // bytes of frames a subscriber may lag before it is dropped
	brokerStuckAfter   = wsWriteTimeout / 2 // a queue group member full this long is dropped
	brokerDropLogEvery = time.Second        // at most one log line about dropped messages per this
	maxTopicLen        = 255
	closeReasonTooSlow = "subscriber too slow"
)

// Message is what a subscriber receives, one JSON text frame per message:
// the seed's broker.Message, {"Header":{...},"Body":"<base64>"}.
type Message struct {
	Header map[string]string
	Body   []byte
}

// Forwarder carries a message published on this sidecar to the sidecars of
// other hosts (broker_peers.go). Forward is called once per publish, before local
// delivery; it must not block (queue and return) and must not modify m, and
// the caller does not modify m afterwards. groups are the queue groups with
// members here; Forward returns those among them whose one delivery it sent
// to another sidecar, and local delivery skips them, so that each message
// reaches one member of a group across all sidecars. Reroute is called when
// none of a group's members here had room for m, a message published here:
// it sends m to another sidecar with members of queue, reporting false if
// there is none (the caller then counts m as dropped); once it has taken m,
// it counts m if m is lost. A message that arrives from another host enters
// through broker.deliverRemote, which does not forward again, so messages
// never loop. Subscribed and Unsubscribed are called for every subscriber
// that joins and leaves. None of them may block.
type Forwarder interface {
	Forward(topic string, m *Message, groups []string) (sent []string)
	Reroute(topic string, m *Message, queue string) bool
	Subscribed(topic, queue string)
	Unsubscribed(topic, queue string)
}

// Relay carries pub/sub through an external engine (broker_nats.go)
// instead of delivering here: every publish goes to Publish, and the
// engine hands each message back to every sidecar with subscribers, this
// one included, which delivers it through broker.deliverRemote (to every
// plain subscriber, or to one member of a queue group). CheckTopic refuses
// a topic the engine cannot carry (a 400). Publish must not block on the
// network; its error is an *httpError (413 too large, 503 cannot take
// more). Subscribed is called for every subscriber that joins, before its
// handshake completes; its channel closes once the engine has the
// subscription (or cannot confirm it soon), and the handshake waits for it
// so that a connected client gets what is published after. Unsubscribed is
// called when one leaves. Neither may block.
type Relay interface {
	CheckTopic(topic string) error
	Publish(topic string, m *Message) error
	Subscribed(topic, queue string) (ready <-chan struct{})
	Unsubscribed(topic, queue string)
}

// broker serves /broker. It owns the topic table, the subscribers' writers
// and the pinger (start); the websocket handlers are tracked by streams,
// which closes them on shutdown and waits for them and their writers. Safe
// for concurrent use; Close waits for the pinger.
//
// The limit fields are set by newBroker and may be lowered by tests before
// start; zero values are not valid.
type broker struct {
	cfg     *Config
	streams *streams
	log     *slog.Logger
	topics  *topicTable
	// topicStats counts traffic by topic (broker_stats.go); the counters
	// below are the totals.
	topicStats *topicStats
	forward    Forwarder // nil: this host only; set before serving
	relay      Relay     // nil: deliver here; else every publish goes through it; set before serving

	maxMessage   int64         // largest body of a published message
	queueLen     int           // messages a subscriber may lag
	queueBytes   int           // frame bytes a subscriber may lag
	pingInterval time.Duration // pings every subscriber; no read for 2x is dead
	writeTimeout time.Duration // bound of one write to a subscriber
	stuckAfter   time.Duration // a group member whose queue stays full this long is too slow

	published       atomic.Int64 // messages accepted for delivery
	delivered       atomic.Int64 // frames written to subscribers
	dropped         atomic.Int64 // messages lost: see lose, and the subscriber's counting
	slowDisconnects atomic.Int64 // subscribers dropped for lagging
	subscribers     atomic.Int64 // connected subscribers (gauge)
	lastDropLog     atomic.Int64 // unix ns of the last log line about dropped messages

	mu      sync.Mutex // guards the fields below
	all     map[*subscriber]struct{}
	pinging bool          // start has run the pinger
	closed  bool          // Close was called
	stop    chan struct{} // closed by Close: stops the pinger
	wg      sync.WaitGroup
}

func newBroker(cfg *Config, st *streams, logger *slog.Logger) *broker {
	return &broker{
		cfg:          cfg,
		streams:      st,
		log:          logger,
		topics:       newTopicTable(),
		topicStats:   newTopicStats(maxTopicStats),
		maxMessage:   min(cfg.MaxBodyBytes, brokerMaxMessage),
		queueLen:     brokerQueueLen,
		queueBytes:   brokerQueueBytes,
		pingInterval: wsPingInterval,
		writeTimeout: wsWriteTimeout,
		stuckAfter:   brokerStuckAfter,
		all:          map[*subscriber]struct{}{},
		stop:         make(chan struct{}),
	}
}

// setForwarder makes every later publish also go to f (cross-host delivery).
// Call it before serving.
func (b *broker) setForwarder(f Forwarder) { b.forward = f }

// setRelay makes every later publish go through r instead of being
// delivered here (see Relay). Call it before serving.
func (b *broker) setRelay(r Relay) { b.relay = r }

// checkTopic validates a topic from ?topic= for publishing and subscribing.
func (b *broker) checkTopic(s string) (string, error) {
	topic, err := parseTopic(s)
	if err == nil && b.relay != nil {
		err = b.relay.CheckTopic(topic)
	}
	if err != nil {
		return "", errorf(http.StatusBadRequest, "broker: %v", err)
	}
	return topic, nil
}

// publish delivers m to this host's subscribers of topic and hands it to
// the forwarder, which may take some queue groups' deliveries elsewhere. It
// never blocks on a subscriber or another host. With a relay, m goes to
// the relay only, and an error is its refusal (an *httpError).
func (b *broker) publish(topic string, m *Message) error {
	if b.relay != nil {
		if err := b.relay.Publish(topic, m); err != nil {
			return err
		}
		b.countPublished(topic)
		return nil
	}
	b.countPublished(topic)
	subs := b.topics.get(topic)
	if b.forward == nil {
		b.deliverTo(topic, subs, m, nil)
		return nil
	}
	sent := b.forward.Forward(topic, m, subs.groupNames())
	b.deliverTo(topic, subs, m, sent)
	return nil
}

// deliverRemote delivers m, sent by another sidecar or the relay, to this
// host's subscribers of topic: every plain subscriber if plain, and one
// member of each group in queues. It never forwards. missed and full are
// the indexes in queues of the groups that did not take m: missed have no
// member here (they left since the sender looked), full none with room (see
// queueGroup.deliver). The caller decides what becomes of those: another
// sidecar's sender tries elsewhere, the relay's caller counts them dropped.
func (b *broker) deliverRemote(topic string, m *Message, plain bool, queues []string) (n int, missed, full []int) {
	subs := b.topics.get(topic)
	if subs == nil {
		for i := range queues {
			missed = append(missed, i)
		}
		return 0, missed, nil
	}
	frame := encodeFrame(m)
	if plain {
		for _, s := range subs.plain {
			if s.enqueue(frame, false) {
				n++
			}
		}
	}
	for i, q := range queues {
		g := subs.group(q)
		switch {
		case g == nil:
			missed = append(missed, i)
		case g.deliver(b, topic, frame):
			n++
		default:
			full = append(full, i)
		}
	}
	return n, missed, full
}

// deliverTo delivers m to subs, topic's subscribers: every plain
// subscriber, and one member of each queue group not in skip. It encodes
// the frame once.
// A group none of whose members here has room goes to the forwarder, which
// may send m to a sidecar with other members; else m is lost to the group,
// and counted.
func (b *broker) deliverTo(topic string, subs *topicSubs, m *Message, skip []string) {
	if subs == nil || len(subs.plain) == 0 && len(subs.groups) == len(skip) {
		return
	}
	frame := encodeFrame(m)
	for _, s := range subs.plain {
		s.enqueue(frame, false)
	}
	for _, g := range subs.groups {
		if slices.Contains(skip, g.name) || g.deliver(b, topic, frame) {
			continue
		}
		if b.forward == nil || !b.forward.Reroute(topic, m, g.name) {
			b.lose(1, topic, g.name, "no member of the queue group has room")
		}
	}
}

// deliverGroup delivers m to one member of topic's queue group here, for
// the forwarder, which tries this sidecar after another refused m. It
// reports whether a member took it; nothing is counted when none did.
func (b *broker) deliverGroup(topic, queue string, m *Message) bool {
	g := b.topics.get(topic).group(queue)
	return g != nil && g.deliver(b, topic, encodeFrame(m))
}

// lose counts n messages lost to topic's subscribers (queue: to that
// group) and logs it, at most once per brokerDropLogEvery; the counter
// keeps the full count.
func (b *broker) lose(n int, topic, queue, why string) {
	if n <= 0 {
		return
	}
	total := b.countDropped(topic, n)
	now := time.Now().UnixNano()
	last := b.lastDropLog.Load()
	if now-last < int64(brokerDropLogEvery) || !b.lastDropLog.CompareAndSwap(last, now) {
		return
	}
	b.log.Warn("messages dropped", "topic", topic, "queue", queue, "messages", n, "why", why, "dropped_total", total)
}

// rehome gives frames, queued for a member of topic's group queue that left
// or fell too far behind and surely not written to it, to the group's other
// members here, else through the forwarder to a sidecar with other members;
// those none can take are lost, and counted. A member here takes them in a
// second allowance as large as its queue (subscriber.handed): they held
// memory already, and they must neither be lost because the member has a
// few frames queued nor take the room of the messages that follow. A
// plain subscriber's frames (queue "") are lost to it, and counted.
func (b *broker) rehome(topic, queue string, frames [][]byte) {
	if len(frames) == 0 {
		return
	}
	if queue == "" {
		b.countDropped(topic, len(frames))
		return
	}
	g := b.topics.get(topic).group(queue)
	lost := 0
	for _, f := range frames {
		if g != nil && g.place(f, nil) {
			continue
		}
		if b.forward != nil {
			if m, err := decodeFrame(f); err == nil && b.forward.Reroute(topic, m, queue) {
				continue
			}
		}
		lost++
	}
	clear(frames)
	b.lose(lost, topic, queue, "queued for a member that left or fell behind, and no other member has room")
}

// handlePublish serves POST /broker?topic=T: the raw body, whatever its
// Content-Type, is the message body and the request headers its headers.
func (b *broker) handlePublish(w http.ResponseWriter, r *http.Request) {
	topic, err := b.checkTopic(r.URL.Query().Get("topic"))
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	// readBody reads r.Body itself, so a form Content-Type is never parsed.
	body, err := readBody(w, r, b.maxMessage)
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	if err := b.publish(topic, &Message{Header: messageHeader(r.Header), Body: body}); err != nil {
		writeHTTPError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

// handleSubscribe serves the websocket GET /broker?topic=T[&queue=Q]. Each
// message is one text frame; each frame the client writes, text or binary,
// is published to T. The handler ends when the client leaves, stops
// answering pings, falls too far behind, or the sidecar shuts down.
func (b *broker) handleSubscribe(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	topic, err := b.checkTopic(q.Get("topic"))
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	queue := q.Get("queue")
	if queue != "" {
		if err := checkTopicChars("queue", queue); err != nil {
			writeHTTPError(w, errorf(http.StatusBadRequest, "broker: %v", err))
			return
		}
	}
	if !isWebsocket(r) {
		w.Header().Set("Connection", "Upgrade")
		w.Header().Set("Upgrade", "websocket")
		writeError(w, http.StatusUpgradeRequired, "broker: GET /broker subscribes over a websocket; publish with POST /broker?topic=T")
		return
	}
	// Subscribe before the handshake completes, so a client that is
	// connected gets every message published after that. Until the
	// connection exists, messages queue and no writer starts (writing).
	s := &subscriber{b: b, topic: topic, group: queue, stats: b.topicStats.subscribe(topic), writing: true}
	ready, ok := b.add(topic, queue, s)
	if !ok {
		b.topicStats.release(s.stats)
		writeError(w, http.StatusServiceUnavailable, "broker: sidecar is shutting down")
		return
	}
	b.awaitRelay(r.Context(), ready)
	hj := &wsHijacker{ResponseWriter: w, readTimeout: 2 * b.pingInterval, writeTimeout: b.writeTimeout}
	// The context accept returns ends with this handler, which returns at
	// once: serve runs on, tracked by streams through done.
	conn, done := b.streams.acceptConn(hj, r, b.maxMessage)
	if conn == nil || hj.conn == nil { // hj.conn: cannot happen, accept hijacks through hj
		b.remove(topic, queue, s)
		b.topicStats.release(s.stats) // no writer started: nothing was queued to write
		if conn != nil {
			conn.Close(websocket.StatusInternalError, "broker: no connection")
			done()
		}
		return
	}
	s.mu.Lock()
	s.conn, s.wc = conn, hj.conn
	s.writing = false
	if len(s.queue) > 0 || s.ping || s.slow {
		s.startWriter()
	}
	s.mu.Unlock()
	b.log.Debug("subscribed", "topic", topic, "queue", queue, "remote", r.RemoteAddr)
	go b.serve(s, topic, queue, done)
}

// serve reads the subscriber's frames until the connection ends, then
// unsubscribes it and waits for its writer. It runs on its own goroutine
// rather than the HTTP handler's so that the handler's stack and the HTTP
// server's per-connection buffers are freed while the subscriber idles;
// streams.Close waits for it (done).
func (b *broker) serve(s *subscriber, topic, queue string, done func()) {
	defer done()
	// Shutdown closes with a going-away status. The read below must not
	// use a cancellable context: the websocket library drops the
	// connection without a close frame when a read's context ends.
	closing := make(chan struct{})
	stopClose := context.AfterFunc(b.streams.ctx, func() {
		defer close(closing)
		code, reason := b.streams.closeStatus()
		s.closeWith(code, reason)
	})
	err := b.readLoop(context.Background(), topic, s)

	b.remove(topic, queue, s)
	if !stopClose() {
		<-closing
	}
	s.wg.Wait() // the writer, if one runs, ends: remove stopped new ones
	b.topicStats.release(s.stats)
	s.conn.CloseNow()
	b.log.Debug("unsubscribed", "topic", topic, "queue", queue, "err", err)
}

// readLoop publishes every message the client writes until reading fails:
// the client left, closed, sent a bad or oversized frame, or went silent.
// A frame the relay refuses closes the connection with 1009 (too large)
// or 1013 (try again later): a websocket has no other answer to a frame.
func (b *broker) readLoop(ctx context.Context, topic string, s *subscriber) error {
	for {
		_, rd, err := s.conn.Reader(ctx)
		if err != nil {
			return err
		}
		body, err := io.ReadAll(rd) // bounded by the connection's read limit
		if err != nil {
			return err
		}
		if err := b.publish(topic, &Message{Header: map[string]string{}, Body: body}); err != nil {
			code := websocket.StatusTryAgainLater
			var he *httpError
			if errors.As(err, &he) && he.code == http.StatusRequestEntityTooLarge {
				code = websocket.StatusMessageTooBig
			}
			reason := err.Error()
			if len(reason) > 120 { // a close frame's reason fits 123 bytes
				reason = strings.ToValidUTF8(reason[:120], "")
			}
			s.closeWith(code, reason)
			return err
		}
	}
}

// awaitRelay waits until the relay has a new subscriber's subscription
// (ready closes), the client leaves, or writeTimeout passes: past it the
// subscriber is kept and the relay subscribes when it can.
func (b *broker) awaitRelay(ctx context.Context, ready <-chan struct{}) {
	if ready == nil {
		return
	}
	t := time.NewTimer(b.writeTimeout)
	defer t.Stop()
	select {
	case <-ready:
	case <-ctx.Done():
	case <-t.C:
	}
}

// add registers s for topic (and queue group); false once Close has begun.
// With a relay, ready closes once the relay has the subscription.
func (b *broker) add(topic, queue string, s *subscriber) (ready <-chan struct{}, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, false
	}
	b.all[s] = struct{}{}
	b.topics.add(topic, queue, s)
	b.subscribers.Add(1)
	if b.forward != nil {
		b.forward.Subscribed(topic, queue)
	}
	if b.relay != nil {
		ready = b.relay.Subscribed(topic, queue)
	}
	return ready, true
}

// remove unregisters s; no message is queued for it afterwards.
func (b *broker) remove(topic, queue string, s *subscriber) {
	b.mu.Lock()
	delete(b.all, s)
	b.topics.remove(topic, queue, s)
	b.mu.Unlock()
	if b.forward != nil {
		b.forward.Unsubscribed(topic, queue)
	}
	if b.relay != nil {
		b.relay.Unsubscribed(topic, queue)
	}
	s.mu.Lock()
	s.closed = true
	left := s.takeQueue()
	s.mu.Unlock()
	b.rehome(topic, queue, left) // to the group's other members, or counted
	b.subscribers.Add(-1)
}

// start runs the pinger until ctx ends or Close.
func (b *broker) start(ctx context.Context) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pinging || b.closed {
		return
	}
	b.pinging = true
	b.wg.Add(1)
	go b.pinger(ctx, b.pingInterval)
}

// pinger pings every subscriber each interval, through its writer, so a
// client that stops answering hits its read deadline.
func (b *broker) pinger(ctx context.Context, interval time.Duration) {
	defer b.wg.Done()
	t := time.NewTicker(interval)
	defer t.Stop()
	var subs []*subscriber
	for {
		select {
		case <-b.stop:
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		b.mu.Lock()
		for s := range b.all {
			subs = append(subs, s)
		}
		b.mu.Unlock()
		for i, s := range subs {
			s.enqueue(nil, true)
			subs[i] = nil
		}
		subs = subs[:0]
	}
}

// Close stops the pinger and waits for it. The subscribers' handlers are
// ended by streams.Close, which the server calls first. Idempotent.
func (b *broker) Close() error {
	b.mu.Lock()
	if !b.closed {
		b.closed = true
		close(b.stop)
	}
	b.mu.Unlock()
	b.wg.Wait()
	return nil
}

// metrics emits the broker's counters.
func (b *broker) metrics(emit emitFunc) {
	emit("sidecar_broker_published_total", "Messages accepted for delivery.", "counter", float64(b.published.Load()))
	emit("sidecar_broker_delivered_total", "Messages written to websocket subscribers.", "counter", float64(b.delivered.Load()))
	emit("sidecar_broker_dropped_total", "Messages lost because a subscriber was too slow.", "counter", float64(b.dropped.Load()))
	emit("sidecar_broker_slow_disconnects_total", "Subscribers disconnected for falling too far behind.", "counter", float64(b.slowDisconnects.Load()))
	emit("sidecar_broker_subscribers", "Connected websocket subscribers.", "gauge", float64(b.subscribers.Load()))
}

// topicTable maps topics to their subscribers. Readers (every publish) take
// a read lock and get an immutable snapshot; subscribe and unsubscribe
// replace the snapshot under the write lock.
type topicTable struct {
	mu     sync.RWMutex // guards topics; the *topicSubs values are immutable
	topics map[string]*topicSubs
}

// topicSubs is the immutable set of subscribers of one topic.
type topicSubs struct {
	plain  []*subscriber
	groups []*queueGroup // sorted by creation; each holds its members
}

// queueGroup hands each message to one member: the next in turn with room
// in its queue (deliver). Immutable but for next.
type queueGroup struct {
	name    string
	members []*subscriber
	next    *atomic.Uint32 // shared by the snapshots of one group
}

// groupNames returns the names of the queue groups; nil for none.
func (t *topicSubs) groupNames() []string {
	if t == nil || len(t.groups) == 0 {
		return nil
	}
	names := make([]string, len(t.groups))
	for i, g := range t.groups {
		names[i] = g.name
	}
	return names
}

// group returns the queue group named q, or nil.
func (t *topicSubs) group(q string) *queueGroup {
	if t == nil {
		return nil
	}
	for _, g := range t.groups {
		if g.name == q {
			return g
		}
	}
	return nil
}

func newTopicTable() *topicTable {
	return &topicTable{topics: map[string]*topicSubs{}}
}

func (t *topicTable) get(topic string) *topicSubs {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.topics[topic]
}

func (t *topicTable) add(topic, queue string, s *subscriber) {
	t.mu.Lock()
	defer t.mu.Unlock()
	old := t.topics[topic]
	n := &topicSubs{}
	if old != nil {
		n.plain = old.plain
		n.groups = old.groups
	}
	if queue == "" {
		n.plain = append(n.plain[:len(n.plain):len(n.plain)], s)
		t.topics[topic] = n
		return
	}
	n.groups = append([]*queueGroup(nil), n.groups...)
	for i, g := range n.groups {
		if g.name == queue {
			members := append(g.members[:len(g.members):len(g.members)], s)
			n.groups[i] = &queueGroup{name: queue, members: members, next: g.next}
			t.topics[topic] = n
			return
		}
	}
	n.groups = append(n.groups, &queueGroup{name: queue, members: []*subscriber{s}, next: new(atomic.Uint32)})
	t.topics[topic] = n
}

func (t *topicTable) remove(topic, queue string, s *subscriber) {
	t.mu.Lock()
	defer t.mu.Unlock()
	old := t.topics[topic]
	if old == nil {
		return
	}
	n := &topicSubs{plain: old.plain, groups: old.groups}
	if queue == "" {
		n.plain = without(old.plain, s)
	} else {
		n.groups = nil
		for _, g := range old.groups {
			if g.name == queue {
				members := without(g.members, s)
				if len(members) == 0 {
					continue
				}
				g = &queueGroup{name: queue, members: members, next: g.next}
			}
			n.groups = append(n.groups, g)
		}
	}
	if len(n.plain) == 0 && len(n.groups) == 0 {
		delete(t.topics, topic)
		return
	}
	t.topics[topic] = n
}

// without returns a new slice of subs without s.
func without(subs []*subscriber, s *subscriber) []*subscriber {
	out := make([]*subscriber, 0, len(subs))
	for _, x := range subs {
		if x != s {
			out = append(out, x)
		}
	}
	return out
}

// deliver queues frame for one member of g, topic's group, and reports
// whether one took it. The members are tried in turn from the next; a
// full member is skipped, so one that reads slowly gets what it can take
// and the others the rest. A member still full stuckAfter after it was
// first found so (its writer took nothing from its queue meanwhile) is too
// slow: its writer closes it with 1008 and it is counted as a slow
// disconnect, and its queued frames, never written, go to the others
// (rehome). When no member has room, frame is not queued: the caller
// counts it as lost, or hands it to another sidecar.
func (g *queueGroup) deliver(b *broker, topic string, frame []byte) bool {
	var orphans [][]byte
	ok := g.place(frame, &orphans)
	if orphans != nil {
		b.rehome(topic, g.name, orphans)
	}
	return ok
}

// place queues frame for the first member in turn with room; members
// found stuck append their queued frames to orphans. With orphans nil, it
// places a frame being rehomed: it counts against a member's second
// allowance (subscriber.handed), and no member is found stuck. It does not
// allocate unless a member is found stuck.
func (g *queueGroup) place(frame []byte, orphans *[][]byte) bool {
	n := uint32(len(g.members))
	start := g.next.Add(1)
	for i := range n {
		if g.members[(start+i)%n].offer(frame, orphans) {
			return true
		}
	}
	return false
}

// subscriber is one websocket client of GET /broker. Publishers append
// encoded frames to its bounded queue and never wait; a writer goroutine,
// started when the queue becomes non-empty and ended when it is drained,
// writes everything queued in one go. An idle subscriber thus holds no
// writer goroutine and no buffer. The handler waits for the writer (wg).
//
// Every frame queued is either written (counted as delivered), or counted
// as dropped, or, for a queue group member, handed back to the group when
// it surely was not written (rehome): nothing queued vanishes.
type subscriber struct {
	b     *broker
	topic string
	group string         // queue group; "" for a plain subscriber
	stats *topicCounters // its topic's, held until its writer has ended (broker_stats.go)
	conn  *websocket.Conn
	wc    *wsConn

	mu         sync.Mutex // guards the fields below
	queue      [][]byte   // encoded frames waiting for the writer
	spare      [][]byte   // the writer's previous batch, reused
	queueBytes int
	// handed and handedBytes are the frames of queue (and their bytes)
	// handed over from another member of the group (rehome): they count
	// against a second allowance as large as the queue's limits, so that
	// a stuck member's queue does not take the room of new messages.
	handed      int
	handedBytes int
	fullSince   time.Time // a group member's queue was found full; zero once the writer takes it
	ping        bool      // a ping is due
	writing     bool      // a writer goroutine runs
	slow        bool      // fell too far behind: the writer closes the connection
	closed      bool      // removed from the broker, or its connection failed: queue nothing more
	wg          sync.WaitGroup
}

// offer queues frame for s, a queue group member, if its queue has room.
// A full queue is skipped; one that has stayed full for stuckAfter makes
// s too slow, and its queued frames are appended to orphans (see
// queueGroup.deliver). With orphans nil, frame is being rehomed (see
// queueGroup.place).
func (s *subscriber) offer(frame []byte, orphans *[][]byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.slow {
		return false
	}
	if orphans == nil { // handed over: the second allowance
		if s.handed >= s.b.queueLen || s.handedBytes+len(frame) > s.b.queueBytes {
			return false
		}
		s.handed++
		s.handedBytes += len(frame)
		s.push(frame)
		return true
	}
	if len(s.queue)-s.handed < s.b.queueLen && s.queueBytes-s.handedBytes+len(frame) <= s.b.queueBytes {
		s.push(frame)
		return true
	}
	now := time.Now()
	if s.fullSince.IsZero() {
		s.fullSince = now
		return false
	}
	if now.Sub(s.fullSince) < s.b.stuckAfter {
		return false
	}
	q := s.takeQueue()
	if *orphans == nil {
		*orphans = q // the queue is given away, not reused
	} else {
		*orphans = append(*orphans, q...)
	}
	s.markSlow()
	return false
}

// takeQueue empties the queue and returns what it held. s.mu is held.
func (s *subscriber) takeQueue() [][]byte {
	q := s.queue
	s.queue, s.spare, s.queueBytes, s.handed, s.handedBytes = nil, nil, 0, 0, 0
	return q
}

// enqueue queues frame (or, with ping, a ping) for s, a plain subscriber
// (or a ping for any). A full queue marks s slow: its queue is discarded
// and counted, and its writer closes it.
func (s *subscriber) enqueue(frame []byte, ping bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return false
	case s.slow:
		if !ping {
			s.countDropped(1)
		}
		return false
	case ping:
		s.ping = true
		s.startWriter()
		return true
	case len(s.queue) >= s.b.queueLen || s.queueBytes+len(frame) > s.b.queueBytes:
		s.countDropped(len(s.queue) + 1)
		clear(s.takeQueue())
		s.markSlow()
		return false
	}
	s.push(frame)
	return true
}

// markSlow marks s too slow, with its queue already emptied: its writer
// writes no more data, not even the rest of a batch in progress, and closes
// the connection with 1008. s.mu is held.
func (s *subscriber) markSlow() {
	s.slow = true
	s.countSlowDisconnect()
	if s.wc != nil {
		// As stopData, without waiting for the write in progress: the
		// writer stops at its next write and sends the close frame.
		s.wc.noData.Store(true)
	}
	s.startWriter()
}

// push appends frame and makes sure a writer runs. s.mu is held.
func (s *subscriber) push(frame []byte) {
	s.queue = append(s.queue, frame)
	s.queueBytes += len(frame)
	s.startWriter()
}

// startWriter starts the writer unless one runs. s.mu is held.
func (s *subscriber) startWriter() {
	if s.writing || s.closed {
		return
	}
	s.writing = true
	s.wg.Add(1)
	go s.write()
}

// write drains the queue until it is empty, writing each batch of frames
// with as few writes as possible, then exits. A slow subscriber is closed
// with a policy-violation status once the write in progress is out.
func (s *subscriber) write() {
	defer s.wg.Done()
	for {
		s.mu.Lock()
		batch, ping, slow, closed := s.queue, s.ping, s.slow, s.closed
		s.queue, s.spare, s.queueBytes, s.ping = s.spare[:0], nil, 0, false
		s.handed, s.handedBytes, s.fullSince = 0, 0, time.Time{}
		if closed || slow || (len(batch) == 0 && !ping) {
			s.writing = false
			clear(batch)
			if !closed && cap(batch) <= 64 {
				s.queue = batch[:0] // an idle subscriber keeps no large slice
			}
			s.mu.Unlock()
			if slow && !closed {
				s.closeSlow()
			}
			return
		}
		s.mu.Unlock()

		sent, tried, err := s.wc.writeFrames(batch, ping)
		s.countDelivered(sent)
		if err != nil {
			s.writeFailed(batch, sent, tried, err)
			return
		}
		clear(batch)
		s.mu.Lock()
		if cap(batch) <= 1024 {
			s.spare = batch[:0]
		}
		s.mu.Unlock()
	}
}

// writeFailed ends the writer after a write of batch failed: frames
// batch[sent:tried] may have reached the client in part and are counted as
// dropped; batch[tried:] and the queue surely did not and are rehomed. A
// write stopped for a close frame (errDataStopped) leaves the connection
// to whoever closes it, or closes it with 1008 if s is too slow; a write
// that failed midway leaves the stream inside a frame, so the connection
// is dropped without a close frame, and one that timed out counts s as a
// slow disconnect.
func (s *subscriber) writeFailed(batch [][]byte, sent, tried int, err error) {
	timedOut := errors.Is(err, os.ErrDeadlineExceeded)
	s.mu.Lock()
	wasSlow := s.slow
	if timedOut && !wasSlow {
		s.slow = true // messages for it are counted as dropped until it is removed
		s.countSlowDisconnect()
	}
	if !s.slow {
		s.closed = true // the connection is gone: nothing more is for it
	}
	s.writing = false
	unsent := append(batch[tried:], s.takeQueue()...)
	s.mu.Unlock()
	s.countDropped(tried - sent)
	s.b.rehome(s.topic, s.group, unsent)
	clear(batch)
	switch {
	case errors.Is(err, errDataStopped):
		if wasSlow {
			s.closeSlow()
		}
		return
	case timedOut && !wasSlow:
		s.b.log.Warn("subscriber too slow: write timed out, disconnecting", "topic", s.topic, "queue", s.group, "remote", s.wc.RemoteAddr())
	}
	s.conn.CloseNow() // a frame may be half written: no close frame
}

// closeSlow closes a subscriber marked slow with 1008.
func (s *subscriber) closeSlow() {
	s.b.log.Warn("subscriber too slow, disconnecting", "topic", s.topic, "queue", s.group, "remote", s.wc.RemoteAddr())
	s.closeWith(websocket.StatusPolicyViolation, closeReasonTooSlow)
}

// closeWith stops data frames and closes the websocket with code. It
// waits for a write in progress, which is bounded by the write timeout.
func (s *subscriber) closeWith(code websocket.StatusCode, reason string) {
	s.wc.stopData()
	s.conn.Close(code, reason)
}

// parseTopic validates a topic from ?topic=.
func parseTopic(s string) (string, error) {
	if s == "" {
		return "", errors.New("query parameter topic is required, as in /broker?topic=foo")
	}
	if err := checkTopicChars("topic", s); err != nil {
		return "", err
	}
	return s, nil
}

// checkTopicChars accepts 1 to 255 bytes of valid UTF-8 printable
// characters without spaces: what fits a log line, a metric label and the
// subject of other brokers.
func checkTopicChars(field, s string) error {
	if len(s) == 0 || len(s) > maxTopicLen {
		return fmt.Errorf("%s must be 1 to %d bytes long", field, maxTopicLen)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%s is not valid UTF-8", field)
	}
	for _, r := range s {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return fmt.Errorf("%s %q holds a space or control character", field, s)
		}
	}
	return nil
}

// messageHeader turns request headers into message headers: one value per
// name (repeated values joined with ", "), without hop-by-hop fields
// (hopByHop, those the Connection field names included), credentials, and
// what describes the HTTP body rather than the message.
func messageHeader(h http.Header) map[string]string {
	out := make(map[string]string, len(h))
	conn := h["Connection"]
	for name, vals := range h {
		if hopByHop(name, conn) {
			continue
		}
		switch name {
		case "Authorization", "Cookie", "Content-Length", "Expect":
			continue
		}
		out[name] = strings.Join(vals, ", ")
	}
	return out
}
