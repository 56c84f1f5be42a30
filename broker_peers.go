package main

// broker_peers.go carries pub/sub across sidecars that share a registry, as the
// original go-micro HTTP broker did. A sidecar with subscribers on topic T
// registers itself under the service go.micro.topic.T, one node per queue
// group (version = the group, or "*" for plain subscribers); a publish on
// any sidecar delivers locally and POSTs the message to /broker/deliver of
// each other sidecar with plain subscribers, and of one sidecar per queue
// group (this one or another), so that every subscriber gets it once and
// every group once in total. A sidecar none of whose members of a group
// can take a message (all full, or gone) refuses that group's delivery in
// its answer, and the sender tries another sidecar with members (redirect),
// so a stuck member on one sidecar costs the group nothing. Every sharing
// sidecar also registers one node under go.micro.http.broker, which tells
// the others who may deliver.
//
// The addresses of other sidecars come from the registry, which anyone who
// can write to it can fill, so nothing secret is ever sent to them: not the
// bearer token of --auth_token, and not --broker_secret itself. A delivery
// is signed instead: an HMAC-SHA256 of its timestamp and body, keyed by
// --broker_secret (else by --auth_token), which proves the key without
// revealing it; the receiver checks it in constant time and refuses
// timestamps more than a minute away from its clock, which bounds replays.

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	topicServicePrefix = "go.micro.topic."      // + topic: the sidecars with subscribers of a topic
	brokerService      = "go.micro.http.broker" // every sidecar that shares pub/sub, one node each
	deliverPath        = "/broker/deliver"
	broadcastMarker    = "*"                      // version of a node for plain subscribers
	deliverTimeHeader  = "Micro-Broker-Timestamp" // unix seconds when a delivery was signed
	deliverSigHeader   = "Micro-Broker-Signature" // hex HMAC-SHA256 of a delivery (signDelivery)
	deliverMaxSkew     = time.Minute              // signed deliveries older (or newer) than this are refused

	peerQueueLen    = 4096     // messages waiting for one other sidecar before new ones are dropped
	peerQueueBytes  = 16 << 20 // and their bytes, as estimated by size
	peerBatchLen    = 256      // messages in one POST
	peerBatchBytes  = 1 << 20  // estimated bytes of one POST, unless one message is larger
	peerRetries     = 3        // extra attempts of a POST that surely did not arrive
	peerAnswerLimit = 4 << 20  // bytes of another sidecar's answer read: peerAnswer, or its error
	maxPeers        = 1024     // other sidecars with deliveries in flight
	maxTopicRoutes  = 10_000   // topics whose registry entry is parsed and kept
)

// peerDelivery is one message for another sidecar: which of its local
// subscribers get it (plain ones, and one member of each group in Queues)
// and the message itself, headers exactly as published.
type peerDelivery struct {
	Topic  string            `json:"topic"`
	Plain  bool              `json:"plain,omitempty"`
	Queues []string          `json:"queues,omitempty"`
	Header map[string]string `json:"header"`
	Body   []byte            `json:"body"` // base64 in JSON

	tried []string // sidecars that refused this queue delivery ("": this one); not sent
}

// peerBatch is the body of POST /broker/deliver.
type peerBatch struct {
	Messages []*peerDelivery `json:"messages"`
}

// peerAnswer is the body of a 200 answer to POST /broker/deliver.
// Refused lists the queue deliveries the receiver did not make, as pairs
// of indexes (message in the batch, queue in its Queues): the group has no
// member there (it left), or none with room. The sender may give each to
// another sidecar: it surely reached no member. A sidecar that predates
// Refused never refuses.
type peerAnswer struct {
	Delivered int      `json:"delivered"`
	Refused   [][2]int `json:"refused,omitempty"`
}

// entryKey names one registry node of this sidecar: a topic and a queue
// group ("" for plain subscribers).
type entryKey struct{ topic, queue string }

// peerBroker is the broker's Forwarder when pub/sub spans sidecars. It
// registers this sidecar's topics, routes each publish to the other
// sidecars, and serves their deliveries. Deliveries to one other sidecar
// go through a bounded queue drained by one sender goroutine, started when
// the queue fills and ended when it is empty, so publishers never wait on
// the network. newPeerBroker starts nothing; the registrar runs from start
// (once setAdvertise has given the address) until start's context ends or
// Close. Safe for concurrent use; Close deregisters and waits for every
// goroutine it started.
type peerBroker struct {
	cfg       *Config
	log       *slog.Logger
	reg       Registry
	b         *broker
	instance  string // random: tells this sidecar's nodes from others'
	key       []byte // signs and checks deliveries (deliveryKey); nil: the address check
	transport *http.Transport
	client    *http.Client
	nowait    context.Context // already cancelled: lookups answer from memory at once
	ctx       context.Context // ends with Close, or when start's context ends
	cancel    context.CancelFunc
	kick      chan struct{} // wakes the registrar; buffered 1
	wg        sync.WaitGroup
	queueLen  int // messages one other sidecar may lag; tests lower it before serving

	forwarded     atomic.Int64 // messages another sidecar accepted
	forwardErrors atomic.Int64 // messages whose POST failed after retries
	remoteDropped atomic.Int64 // messages dropped: another sidecar's queue was full, or shutdown
	received      atomic.Int64 // messages delivered here by other sidecars
	missed        atomic.Int64 // queue deliveries that found no member here (it left): refused
	full          atomic.Int64 // queue deliveries refused: no member here had room
	rerouted      atomic.Int64 // queue deliveries given to another sidecar (or this one) after a refusal
	refused       atomic.Int64 // POST /broker/deliver refused: caller is not a sidecar
	lastWarn      atomic.Int64 // unix ns of the last delivery failure logged at warn

	mu         sync.Mutex       // guards the fields below
	subs       map[entryKey]int // local subscribers per registry node
	registered map[entryKey]bool
	member     bool   // the go.micro.http.broker node is registered
	shared     bool   // this sidecar registers its topics
	host       string // where other sidecars reach this one; "" until setAdvertise
	port       int
	https      bool
	self       string // scheme://host:port of this sidecar
	advertised bool   // setAdvertise has run
	started    bool   // start has run; the registrar runs once both have
	closed     bool
	unwatch    func() bool // stops start's context from cancelling ctx

	rmu    sync.RWMutex // guards routes
	routes map[string]*topicRoute

	pmu     sync.Mutex // guards peers and pclosed
	peers   map[string]*peer
	pclosed bool

	smu      sync.Mutex          // guards seen, seenList and seenHead
	seen     map[string]struct{} // signatures accepted and not yet expired: no replay
	seenList []seenSig           // seenList[seenHead:] holds the keys of seen, oldest first
	seenHead int
}

// topicRoute is the parsed registry entry of one topic: the other
// sidecars with plain subscribers, and those with members of each group.
// Immutable; rebuilt when the registry returns another snapshot.
type topicRoute struct {
	name   string              // the entry's service name
	svc    *Service            // the snapshot parsed; nil: no entry
	plain  []string            // scheme://host:port
	groups map[string][]string // queue -> scheme://host:port
	names  []string            // keys of groups, in the registry's order
}

// peer is another sidecar's delivery queue; guarded by peerBroker.pmu.
type peer struct {
	url        string // scheme://host:port
	queue      []*peerDelivery
	queueBytes int  // the size of queue's deliveries
	sending    bool // a sender goroutine runs
}

func newPeerBroker(cfg *Config, reg Registry, b *broker, clientTLS *tls.Config, logger *slog.Logger) *peerBroker {
	var id [8]byte
	rand.Read(id[:])
	ctx, cancel := context.WithCancel(context.Background())
	nowait, stop := context.WithCancel(context.Background())
	stop()
	t := newBackendTransport(cfg, clientTLS)
	return &peerBroker{
		cfg:        cfg,
		log:        logger,
		reg:        reg,
		b:          b,
		instance:   hex.EncodeToString(id[:]),
		key:        deliveryKey(cfg),
		transport:  t,
		client:     &http.Client{Transport: t, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
		nowait:     nowait,
		ctx:        ctx,
		cancel:     cancel,
		kick:       make(chan struct{}, 1),
		queueLen:   peerQueueLen,
		subs:       map[entryKey]int{},
		registered: map[entryKey]bool{},
		routes:     map[string]*topicRoute{},
		peers:      map[string]*peer{},
	}
}

// topicService is the registry name of topic's entry; ok is false when it
// is too long for a service name (such a topic stays on this sidecar).
func topicService(topic string) (string, bool) {
	name := topicServicePrefix + topic
	return name, checkName("name", name) == nil
}

// advertiseHost is the address other hosts use for a listener bound to ip:
// ip itself, or for an unspecified ip (":8081") the first private address
// of this host's interfaces, as go-micro's addr.Extract chose.
func advertiseHost(ip net.IP) string {
	if ip != nil && !ip.IsUnspecified() {
		return ip.String()
	}
	addrs, _ := net.InterfaceAddrs()
	fallback := ""
	for _, a := range addrs {
		n, ok := a.(*net.IPNet)
		if !ok || n.IP.IsLoopback() || n.IP.IsLinkLocalUnicast() || n.IP.IsMulticast() {
			continue
		}
		if n.IP.IsPrivate() {
			return n.IP.String()
		}
		if fallback == "" {
			fallback = n.IP.String()
		}
	}
	if fallback != "" {
		return fallback
	}
	return "127.0.0.1"
}

// start begins registering this sidecar's topics and following the other
// sidecars, once setAdvertise has said where they reach this one (before or
// after start), until ctx ends or Close.
func (p *peerBroker) start(ctx context.Context) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started || p.closed {
		return
	}
	p.started = true
	p.unwatch = afterFunc(ctx, p.cancel)
	p.runLocked()
}

// setAdvertise says where other sidecars reach this one; the first call
// with an address counts.
func (p *peerBroker) setAdvertise(host string, port int, https bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.advertised || p.closed || host == "" || port <= 0 {
		return
	}
	p.advertised = true
	p.host, p.port, p.https = host, port, https
	scheme := "http"
	if https {
		scheme = "https"
	}
	p.self = scheme + "://" + net.JoinHostPort(host, strconv.Itoa(port))
	// A remote registry is shared by definition. The memory registry is
	// shared when other sidecars use it (--registry sidecar): with
	// --broker_address, or once another sidecar's node appears in it.
	p.shared = p.cfg.Registry != "memory" || p.cfg.BrokerAddress != ""
	p.runLocked()
}

// runLocked starts the registrar (and the watch for other sidecars) when
// the second of start and setAdvertise runs (each runs once). p.mu is held.
func (p *peerBroker) runLocked() {
	if !p.started || !p.advertised {
		return
	}
	p.wg.Add(1)
	go p.registrar()
	p.wake() // register the membership node now
	if !p.shared {
		p.wg.Add(1)
		go p.watchPeers()
	}
	p.log.Debug("broker advertised", "address", p.self, "instance", p.instance, "shared", p.shared)
}

// Subscribed implements Forwarder: the first subscriber of (topic, queue)
// makes the registrar register it.
func (p *peerBroker) Subscribed(topic, queue string) {
	k := entryKey{topic, queue}
	p.mu.Lock()
	p.subs[k]++
	first := p.subs[k] == 1
	p.mu.Unlock()
	if first {
		if _, ok := topicService(topic); !ok {
			p.log.Warn("topic too long for a registry entry; its subscribers get messages published on this sidecar only", "topic", topic)
		}
		p.wake()
	}
}

// Unsubscribed implements Forwarder: the last subscriber of (topic, queue)
// leaving makes the registrar deregister it.
func (p *peerBroker) Unsubscribed(topic, queue string) {
	k := entryKey{topic, queue}
	p.mu.Lock()
	p.subs[k]--
	last := p.subs[k] <= 0
	if last {
		delete(p.subs, k)
	}
	p.mu.Unlock()
	if last {
		p.wake()
	}
}

func (p *peerBroker) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// registrar keeps this sidecar's nodes in the registry: registers new
// entries when woken, renews all of them every --register_interval with
// --register_ttl, deregisters the ones without subscribers, and
// deregisters everything on Close.
func (p *peerBroker) registrar() {
	defer p.wg.Done()
	t := time.NewTicker(p.cfg.RegisterInterval)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			p.deregisterAll()
			return
		case <-p.kick:
			p.sync(false)
		case <-t.C:
			p.sync(true)
		}
	}
}

// node is this sidecar's node for k (or, with nil k, its membership node).
// p.mu is held.
func (p *peerBroker) nodeLocked(k *entryKey) *Node {
	md := map[string]string{"broker": "http", "path": deliverPath, "sidecar": p.instance}
	if p.https {
		md["https"] = "true"
	}
	id := p.instance
	if k != nil {
		sum := sha256.Sum256([]byte(k.topic + "\x00" + k.queue))
		id += "-" + hex.EncodeToString(sum[:8])
		if k.queue != "" {
			md["queue"] = k.queue
		}
	}
	return &Node{ID: id, Address: p.host, Port: p.port, Metadata: md}
}

// entryLocked is the registration of k. p.mu is held.
func (p *peerBroker) entryLocked(k entryKey) *Service {
	name, _ := topicService(k.topic)
	version := broadcastMarker
	if k.queue != "" {
		version = k.queue
	}
	return &Service{Name: name, Version: version, Nodes: []*Node{p.nodeLocked(&k)}}
}

// sync registers what is missing (everything, on a heartbeat) and
// deregisters entries whose last subscriber left.
func (p *peerBroker) sync(heartbeat bool) {
	type reg struct {
		k   *entryKey // nil: the membership node
		svc *Service
	}
	var regs, deregs []reg
	p.mu.Lock()
	if !p.shared || p.closed {
		p.mu.Unlock()
		return
	}
	if heartbeat || !p.member {
		regs = append(regs, reg{nil, &Service{Name: brokerService, Nodes: []*Node{p.nodeLocked(nil)}}})
	}
	for k := range p.subs {
		if _, ok := topicService(k.topic); ok && (heartbeat || !p.registered[k]) {
			regs = append(regs, reg{&k, p.entryLocked(k)})
		}
	}
	for k := range p.registered {
		if p.subs[k] == 0 {
			delete(p.registered, k) // before the call: a new subscriber registers it again
			deregs = append(deregs, reg{&k, p.entryLocked(k)})
		}
	}
	p.mu.Unlock()

	for _, r := range deregs {
		// Not p.ctx: a deregistration must finish even as Close begins.
		ctx, cancel := context.WithTimeout(context.Background(), p.registryTimeout())
		if err := p.reg.Deregister(ctx, r.svc); err != nil && !errors.Is(err, errNotFound) {
			p.log.Warn("deregister topic failed", "service", r.svc.Name, "err", err)
		}
		cancel()
	}
	for _, r := range regs {
		ctx, cancel := context.WithTimeout(p.ctx, p.registryTimeout())
		err := p.reg.Register(ctx, r.svc, p.cfg.RegisterTTL)
		cancel()
		if err != nil {
			p.log.Warn("register topic failed; retried at the next heartbeat", "service", r.svc.Name, "err", err)
			continue
		}
		p.mu.Lock()
		if r.k == nil {
			p.member = true
		} else {
			p.registered[*r.k] = true
			if p.subs[*r.k] == 0 {
				p.wake() // left meanwhile: deregister it again
			}
		}
		p.mu.Unlock()
	}
}

// registryTimeout bounds one registry call, as a remote registry's own
// calls are bounded (remoteTimingOf).
func (p *peerBroker) registryTimeout() time.Duration { return remoteTimingOf(p.cfg).timeout }

// deregisterAll removes every node of this sidecar, on Close.
func (p *peerBroker) deregisterAll() {
	p.mu.Lock()
	var svcs []*Service
	if p.member {
		svcs = append(svcs, &Service{Name: brokerService, Nodes: []*Node{p.nodeLocked(nil)}})
	}
	for k := range p.registered {
		svcs = append(svcs, p.entryLocked(k))
	}
	clear(p.registered)
	p.member = false
	p.mu.Unlock()
	for _, svc := range svcs {
		ctx, cancel := context.WithTimeout(context.Background(), p.registryTimeout())
		if err := p.reg.Deregister(ctx, svc); err != nil && !errors.Is(err, errNotFound) {
			p.log.Warn("deregister on close failed", "service", svc.Name, "err", err)
		}
		cancel()
	}
}

// watchPeers, for a memory registry without --broker_address, waits for
// another sidecar's membership node to appear in it (that sidecar uses
// this one's registry), then makes this sidecar share its topics too.
func (p *peerBroker) watchPeers() {
	defer p.wg.Done()
	ctx, cancel := context.WithCancel(p.ctx)
	defer cancel() // unregisters the watch once shared
	for ctx.Err() == nil {
		events, err := p.reg.Watch(ctx, watchOptions{})
		if err != nil {
			return
		}
		if svc, err := p.reg.GetService(p.nowait, brokerService); err == nil && p.hasOther(svc.Nodes) {
			p.setShared()
			return
		}
		for ev := range events.events() {
			if ev.Service != nil && ev.Service.Name == brokerService && ev.Action != "delete" && p.hasOther(ev.Service.Nodes) {
				p.setShared()
				return
			}
		}
		// The watch fell behind and was dropped: watch again.
	}
}

func (p *peerBroker) hasOther(nodes []*Node) bool {
	for _, n := range nodes {
		if n.Metadata["sidecar"] != p.instance {
			return true
		}
	}
	return false
}

func (p *peerBroker) setShared() {
	p.mu.Lock()
	p.shared = true
	p.mu.Unlock()
	p.log.Info("another sidecar uses this registry; sharing topics")
	p.wake()
}

// route returns the other sidecars that have subscribers of topic, from
// the registry's snapshot of its entry, parsed once per snapshot (and
// cached, absent entries too, so a publish allocates nothing here). It
// never waits on the network.
func (p *peerBroker) route(topic string) *topicRoute {
	p.rmu.RLock()
	rt := p.routes[topic]
	p.rmu.RUnlock()
	name := ""
	if rt != nil {
		name = rt.name
	} else {
		var ok bool
		if name, ok = topicService(topic); !ok {
			return nil
		}
	}
	svc, err := p.reg.GetService(p.nowait, name)
	if err != nil {
		svc = nil
	}
	if rt != nil && rt.svc == svc {
		return rt
	}
	rt = p.parseRoute(name, svc)
	p.rmu.Lock()
	if len(p.routes) >= maxTopicRoutes {
		clear(p.routes)
	}
	p.routes[topic] = rt
	p.rmu.Unlock()
	return rt
}

// parseRoute lists the other sidecars in svc, a topic's entry (nil: none).
func (p *peerBroker) parseRoute(name string, svc *Service) *topicRoute {
	p.mu.Lock()
	self := p.self
	p.mu.Unlock()
	rt := &topicRoute{name: name, svc: svc, groups: map[string][]string{}}
	if svc == nil {
		return rt
	}
	seenPlain := map[string]bool{}
	for _, n := range svc.Nodes {
		if n == nil || n.Metadata["sidecar"] == p.instance || n.Address == "" || n.Port <= 0 {
			continue
		}
		url := backendScheme(p.cfg, n) + "://" + net.JoinHostPort(n.Address, strconv.Itoa(n.Port))
		if url == self {
			continue // a node left by an earlier run of this sidecar
		}
		// One delivery per address: an earlier run's node may linger
		// beside the new one until its TTL ends.
		q := n.Metadata["queue"]
		if q == "" {
			if !seenPlain[url] {
				seenPlain[url] = true
				rt.plain = append(rt.plain, url)
			}
			continue
		}
		if _, ok := rt.groups[q]; !ok {
			rt.names = append(rt.names, q)
		}
		if !slices.Contains(rt.groups[q], url) {
			rt.groups[q] = append(rt.groups[q], url)
		}
	}
	return rt
}

// Forward implements Forwarder: one delivery to each other sidecar with
// plain subscribers, and for each queue group one sidecar chosen at random
// among those with members, this one included.
func (p *peerBroker) Forward(topic string, m *Message, groups []string) (sent []string) {
	rt := p.route(topic)
	if rt == nil || (len(rt.plain) == 0 && len(rt.names) == 0) {
		return nil
	}
	var out []*peerDelivery
	var urls []string
	get := func(url string) *peerDelivery {
		for i, u := range urls {
			if u == url {
				return out[i]
			}
		}
		d := &peerDelivery{Topic: topic, Header: m.Header, Body: m.Body}
		urls, out = append(urls, url), append(out, d)
		return d
	}
	for _, url := range rt.plain {
		get(url).Plain = true
	}
	for _, q := range rt.names {
		cands := rt.groups[q]
		here := slices.Contains(groups, q)
		n := len(cands)
		if here {
			n++
		}
		i := mrand.IntN(n)
		if i == len(cands) {
			continue // this sidecar's members take it
		}
		d := get(cands[i])
		d.Queues = append(d.Queues, q)
		if here {
			sent = append(sent, q)
		}
	}
	for i, d := range out {
		p.enqueue(urls[i], d)
	}
	return sent
}

// Reroute implements Forwarder: no member of queue here had room for m, a
// message published here, so it goes to another sidecar with members.
func (p *peerBroker) Reroute(topic string, m *Message, queue string) bool {
	return p.redirect(topic, m, queue, []string{""})
}

// redirect gives m's delivery to queue group q to a sidecar with members
// that is not in tried ("" is this one), chosen at random: this sidecar's
// members take it at once if one has room, another sidecar gets it queued
// (and, should it refuse too, the next one: see send). It reports false
// when no sidecar is left to try. Each sidecar is tried once per message,
// and a sidecar that refused a delivery surely gave it to no member, so
// the message reaches at most one member of the group.
func (p *peerBroker) redirect(topic string, m *Message, q string, tried []string) bool {
	tried = slices.Clip(tried)
	rt := p.route(topic)
	for {
		var cands []string
		if rt != nil {
			for _, url := range rt.groups[q] {
				if !slices.Contains(tried, url) {
					cands = append(cands, url)
				}
			}
		}
		here := !slices.Contains(tried, "") && p.b.topics.get(topic).group(q) != nil
		n := len(cands)
		if here {
			n++
		}
		if n == 0 {
			return false
		}
		i := mrand.IntN(n)
		if i == len(cands) {
			if p.b.deliverGroup(topic, q, m) {
				p.rerouted.Add(1)
				return true
			}
			tried = append(tried, "")
			continue
		}
		p.rerouted.Add(1)
		p.enqueue(cands[i], &peerDelivery{Topic: topic, Queues: []string{q}, Header: m.Header, Body: m.Body, tried: tried})
		return true
	}
}

// rerouteRefused gives the queue deliveries that the sidecar at url
// refused (ans.Refused, indexes into batch) to other sidecars, or counts
// them as dropped when none is left.
func (p *peerBroker) rerouteRefused(url string, batch []*peerDelivery, ans *peerAnswer) {
	var done map[[2]int]bool // a pair listed twice is rerouted once
	for _, r := range ans.Refused {
		i, j := r[0], r[1]
		if i < 0 || i >= len(batch) || j < 0 || j >= len(batch[i].Queues) || done[r] {
			continue
		}
		if done == nil {
			done = map[[2]int]bool{}
		}
		done[r] = true
		d := batch[i]
		q := d.Queues[j]
		if !p.redirect(d.Topic, &Message{Header: d.Header, Body: d.Body}, q, append(slices.Clip(d.tried), url)) {
			p.b.lose(1, d.Topic, q, "no member of the queue group on any sidecar has room")
		}
	}
}

// enqueue queues d for the sidecar at url, starting its sender if none
// runs; a full queue drops d and counts it.
func (p *peerBroker) enqueue(url string, d *peerDelivery) {
	p.pmu.Lock()
	defer p.pmu.Unlock()
	pe := p.peers[url]
	switch {
	case p.pclosed:
		p.remoteDropped.Add(1)
		return
	case pe == nil && len(p.peers) >= maxPeers:
		p.remoteDropped.Add(1)
		return
	case pe == nil:
		pe = &peer{url: url}
		p.peers[url] = pe
	case len(pe.queue) >= p.queueLen || pe.queueBytes+d.size() > peerQueueBytes:
		p.remoteDropped.Add(1)
		return
	}
	pe.queue = append(pe.queue, d)
	pe.queueBytes += d.size()
	if !pe.sending {
		pe.sending = true
		p.wg.Add(1)
		go p.send(pe)
	}
}

// send POSTs pe's queue in batches until it is empty, then exits.
func (p *peerBroker) send(pe *peer) {
	defer p.wg.Done()
	for {
		p.pmu.Lock()
		if len(pe.queue) == 0 || p.pclosed {
			p.remoteDropped.Add(int64(len(pe.queue)))
			pe.queue, pe.queueBytes, pe.sending = nil, 0, false
			if p.peers[pe.url] == pe {
				delete(p.peers, pe.url) // an idle peer holds nothing
			}
			p.pmu.Unlock()
			return
		}
		n, size := 0, 0
		for n < len(pe.queue) && n < peerBatchLen {
			sz := pe.queue[n].size()
			if n > 0 && size+sz > peerBatchBytes {
				break
			}
			size += sz
			n++
		}
		batch := pe.queue[:n:n]
		pe.queue = pe.queue[n:]
		pe.queueBytes -= size
		if len(pe.queue) == 0 {
			pe.queue = nil // let the backing array go
		}
		p.pmu.Unlock()

		ans, err := p.post(pe.url, batch)
		if err != nil {
			p.forwardErrors.Add(int64(len(batch)))
			p.warnf("delivery to sidecar failed", "sidecar", pe.url, "messages", len(batch), "err", err)
			continue
		}
		p.forwarded.Add(int64(len(batch)))
		if len(ans.Refused) > 0 {
			p.rerouteRefused(pe.url, batch, ans)
		}
	}
}

// warnf logs a failed delivery at most once a second; the counters keep
// the full count.
func (p *peerBroker) warnf(msg string, args ...any) {
	now := time.Now().UnixNano()
	last := p.lastWarn.Load()
	if now-last < int64(time.Second) || !p.lastWarn.CompareAndSwap(last, now) {
		p.log.Debug(msg, args...)
		return
	}
	p.log.Warn(msg, args...)
}

// size estimates the bytes of d in a delivery's JSON body.
func (d *peerDelivery) size() int {
	n := 64 + len(d.Topic) + len(d.Body)*4/3
	for k, v := range d.Header {
		n += 8 + len(k) + len(v)
	}
	for _, q := range d.Queues {
		n += 4 + len(q)
	}
	return n
}

// post sends one batch, retrying only when it surely did not arrive, so
// that no message is delivered twice: the connection was refused, the
// sidecar answered 503 (shutting down), or 403 (its copy of the registry
// does not list this sidecar yet: it just started). It returns the
// receiver's answer.
func (p *peerBroker) post(url string, batch []*peerDelivery) (*peerAnswer, error) {
	body, err := json.Marshal(peerBatch{Messages: batch})
	if err != nil {
		return nil, fmt.Errorf("broker: encode delivery: %w", err)
	}
	for try := 0; ; try++ {
		ans, retry, err := p.postOnce(url, body)
		if err == nil || !retry || try == peerRetries {
			return ans, err
		}
		if !sleepCtx(p.ctx, retryBackoff(try)) {
			return nil, err
		}
	}
}

// postOnce sends one delivery. The URL comes from the registry, so the
// request carries no credential: only a signature (see signDelivery),
// made anew for each attempt.
func (p *peerBroker) postOnce(url string, body []byte) (ans *peerAnswer, retry bool, err error) {
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.ClientRequestTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+deliverPath, bytes.NewReader(body))
	if err != nil {
		return nil, false, fmt.Errorf("broker: deliver to %s: %w", url, err)
	}
	req.Header.Set("Content-Type", "application/json")
	if p.key != nil {
		ts := strconv.FormatInt(time.Now().Unix(), 10)
		req.Header.Set(deliverTimeHeader, ts)
		req.Header.Set(deliverSigHeader, signDelivery(p.key, ts, req.URL.Host, body))
	}
	ans = &peerAnswer{}
	resp, _, err := callJSON(p.client, req, peerAnswerLimit, ans)
	var se *statusError
	switch {
	case errors.As(err, &se):
		retry := se.code == http.StatusServiceUnavailable || se.code == http.StatusForbidden
		return nil, retry, fmt.Errorf("broker: deliver to %s: %w", url, err)
	case resp != nil && err != nil:
		// A 2xx status says delivered, whatever its body; refusals in a
		// body that cannot be read are lost (the receiver counts them).
		p.warnf("answer of sidecar unreadable", "sidecar", url, "err", err)
		return &peerAnswer{}, false, nil
	case resp != nil:
		return ans, false, nil
	case err != nil:
		var op *net.OpError
		return nil, errors.As(err, &op) && op.Op == "dial", fmt.Errorf("broker: deliver to %s: %w", url, err)
	}
	return &peerAnswer{}, false, nil
}

// handleDeliver serves POST /broker/deliver: messages from another
// sidecar for this one's subscribers. Only sidecars may call it: with
// --broker_secret or --auth_token, the request must be signed with it
// (signDelivery: senders never send the secret or the token, so the
// middleware lets this path through without a bearer token); with
// neither, the caller's IP must be the address of a sidecar registered
// under go.micro.http.broker.
func (p *peerBroker) handleDeliver(w http.ResponseWriter, r *http.Request) {
	if err := p.authorize(r); err != nil {
		p.refused.Add(1)
		writeHTTPError(w, err)
		return
	}
	// What a sender's batch may hold: base64 bodies, escaped headers.
	limit := int64(peerBatchBytes)*2 + p.b.maxMessage*2 + 1<<20
	body, err := readBody(w, r, limit)
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	if err := p.verify(r, body); err != nil {
		p.refused.Add(1)
		writeHTTPError(w, err)
		return
	}
	var batch peerBatch
	if err := decodeJSON(body, &batch); err != nil {
		writeHTTPError(w, err)
		return
	}
	if len(batch.Messages) > peerBatchLen {
		writeError(w, http.StatusBadRequest, "broker: %d messages in one delivery; at most %d", len(batch.Messages), peerBatchLen)
		return
	}
	for i, d := range batch.Messages {
		if err := checkDelivery(d, p.b.maxMessage); err != nil {
			writeError(w, http.StatusBadRequest, "broker: messages[%d]: %v", i, err)
			return
		}
	}
	var ans peerAnswer
	for i, d := range batch.Messages {
		n, missed, full := p.b.deliverRemote(d.Topic, &Message{Header: d.Header, Body: d.Body}, d.Plain, d.Queues)
		ans.Delivered += n
		p.missed.Add(int64(len(missed)))
		p.full.Add(int64(len(full)))
		for _, j := range missed {
			ans.Refused = append(ans.Refused, [2]int{i, j})
		}
		for _, j := range full {
			ans.Refused = append(ans.Refused, [2]int{i, j})
		}
	}
	p.received.Add(int64(len(batch.Messages)))
	writeJSON(w, http.StatusOK, ans)
}

// checkDelivery validates one delivered message as a publish would be.
func checkDelivery(d *peerDelivery, maxBody int64) error {
	if d == nil {
		return errors.New("null message")
	}
	if _, err := parseTopic(d.Topic); err != nil {
		return err
	}
	if len(d.Queues) > 1024 {
		return errors.New("too many queues")
	}
	for _, q := range d.Queues {
		if err := checkTopicChars("queue", q); err != nil {
			return err
		}
	}
	if int64(len(d.Body)) > maxBody {
		return fmt.Errorf("body of %d bytes is larger than %d", len(d.Body), maxBody)
	}
	return nil
}

// deliveryKey is the key that signs deliveries between sidecars:
// --broker_secret, else --auth_token (every sharing sidecar has the same),
// else nil (deliveries are checked by the caller's address).
func deliveryKey(cfg *Config) []byte {
	switch {
	case cfg.BrokerSecret != "":
		return []byte(cfg.BrokerSecret)
	case cfg.AuthToken != "":
		return []byte(cfg.AuthToken)
	}
	return nil
}

// signDelivery is the hex HMAC-SHA256, keyed by key, of a delivery's
// timestamp ts (unix seconds, the deliverTimeHeader), the host:port it is
// sent to (its Host header) and its body. It proves that the sender holds
// the key without revealing it, so it can go to any address the registry
// lists, even over plain HTTP. The host ties it to one sidecar, and the
// timestamp and the receiver's memory of accepted signatures (verify) keep
// a captured delivery from being played again.
func signDelivery(key []byte, ts, host string, body []byte) string {
	m := hmac.New(sha256.New, key)
	io.WriteString(m, "sidecar broker delivery\n")
	io.WriteString(m, ts)
	io.WriteString(m, "\n")
	io.WriteString(m, strings.ToLower(host))
	io.WriteString(m, "\n")
	m.Write(body)
	return hex.EncodeToString(m.Sum(nil))
}

// authorize decides, before the body is read, whether r may come from a
// sidecar (see handleDeliver): with a key, the signature headers are
// present and the timestamp recent (verify checks the signature); without
// one, the caller's address is a sidecar's.
func (p *peerBroker) authorize(r *http.Request) error {
	if p.key != nil {
		sec, err := strconv.ParseInt(r.Header.Get(deliverTimeHeader), 10, 64)
		if err != nil || len(r.Header.Get(deliverSigHeader)) != 2*sha256.Size {
			return errorf(http.StatusForbidden, "broker: %s is for sidecars only: missing or malformed %s and %s headers (signed with --broker_secret, else --auth_token)",
				deliverPath, deliverTimeHeader, deliverSigHeader)
		}
		if d := time.Since(time.Unix(sec, 0)); d > deliverMaxSkew || d < -deliverMaxSkew {
			return errorf(http.StatusForbidden, "broker: %s: %s %d is more than %s away from this sidecar's clock",
				deliverPath, deliverTimeHeader, sec, deliverMaxSkew)
		}
		return nil
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	ip := net.ParseIP(host)
	if err == nil && ip != nil {
		if svc, err := p.reg.GetService(p.nowait, brokerService); err == nil {
			for _, n := range svc.Nodes {
				if n.Metadata["sidecar"] != p.instance && ip.Equal(net.ParseIP(n.Address)) {
					return nil
				}
			}
		}
	}
	return errorf(http.StatusForbidden, "broker: %s is for sidecars only: %s is not the address of a sidecar in the registry (%s)", deliverPath, host, brokerService)
}

// verify checks, in constant time, the signature of a delivery that
// authorize let through; without a key there is none to check.
func (p *peerBroker) verify(r *http.Request, body []byte) error {
	if p.key == nil {
		return nil
	}
	sig := r.Header.Get(deliverSigHeader)
	got, err := hex.DecodeString(sig)
	want, _ := hex.DecodeString(signDelivery(p.key, r.Header.Get(deliverTimeHeader), r.Host, body))
	if err != nil || !hmac.Equal(got, want) {
		return errorf(http.StatusForbidden, "broker: %s is for sidecars only: wrong %s (signed with another key than --broker_secret, else --auth_token, for another sidecar, or the body changed)",
			deliverPath, deliverSigHeader)
	}
	return p.firstSeen(sig, time.Now())
}

// maxSeen bounds the memory of accepted signatures; past it, deliveries
// get a 503 (which their sender retries) until old ones expire.
const maxSeen = 1 << 17

// seenSig is one accepted signature and when it may be forgotten.
type seenSig struct {
	sig string
	exp time.Time
}

// firstSeen records sig, refusing one accepted before (a replay).
// Signatures are kept for twice deliverMaxSkew, longer than authorize
// accepts their timestamp. They expire in the order they came, so
// forgetting the expired ones costs what they cost to record, never a
// scan of all of them under the lock.
func (p *peerBroker) firstSeen(sig string, now time.Time) error {
	p.smu.Lock()
	defer p.smu.Unlock()
	if _, ok := p.seen[sig]; ok {
		return errorf(http.StatusForbidden, "broker: %s: this signed delivery was accepted before (a replay)", deliverPath)
	}
	for p.seenHead < len(p.seenList) && now.After(p.seenList[p.seenHead].exp) {
		delete(p.seen, p.seenList[p.seenHead].sig)
		p.seenList[p.seenHead] = seenSig{}
		p.seenHead++
	}
	if p.seenHead > len(p.seenList)/2 { // compact: amortised O(1) a delivery
		p.seenList = append(p.seenList[:0], p.seenList[p.seenHead:]...)
		p.seenHead = 0
	}
	if len(p.seen) >= maxSeen {
		return errorf(http.StatusServiceUnavailable, "broker: %s: too many deliveries in the last %s; retry", deliverPath, 2*deliverMaxSkew)
	}
	if p.seen == nil {
		p.seen = map[string]struct{}{}
	}
	p.seen[sig] = struct{}{}
	p.seenList = append(p.seenList, seenSig{sig, now.Add(2 * deliverMaxSkew)})
	return nil
}

// Close stops registering and deregisters this sidecar's nodes, ends
// deliveries in flight and drops queued ones (counted), and waits for
// every goroutine. Idempotent.
func (p *peerBroker) Close() error {
	p.mu.Lock()
	p.closed = true
	unwatch := p.unwatch
	p.mu.Unlock()
	p.pmu.Lock()
	p.pclosed = true
	p.pmu.Unlock()
	if unwatch != nil {
		unwatch()
	}
	p.cancel()
	p.wg.Wait()
	p.transport.CloseIdleConnections()
	return nil
}

// metrics emits the counters of cross-sidecar delivery.
func (p *peerBroker) metrics(emit emitFunc) {
	emit("sidecar_broker_forwarded_total", "Messages delivered to other sidecars.", "counter", float64(p.forwarded.Load()))
	emit("sidecar_broker_forward_errors_total", "Messages whose delivery to another sidecar failed after retries.", "counter", float64(p.forwardErrors.Load()))
	emit("sidecar_broker_remote_dropped_total", "Messages for other sidecars dropped because their queue was full.", "counter", float64(p.remoteDropped.Load()))
	emit("sidecar_broker_remote_received_total", "Messages delivered here by other sidecars.", "counter", float64(p.received.Load()))
	emit("sidecar_broker_remote_missed_total", "Queue group deliveries from other sidecars refused: no member here (the sender tries another sidecar).", "counter", float64(p.missed.Load()))
	emit("sidecar_broker_remote_full_total", "Queue group deliveries from other sidecars refused: no member here had room (the sender tries another sidecar).", "counter", float64(p.full.Load()))
	emit("sidecar_broker_rerouted_total", "Queue group deliveries given to another sidecar, or taken here, after the sidecar chosen could not take them.", "counter", float64(p.rerouted.Load()))
	emit("sidecar_broker_remote_refused_total", "Deliveries refused because the caller is not a sidecar.", "counter", float64(p.refused.Load()))
}
