package main

// broker_nats.go carries pub/sub through NATS (--broker nats): a NATS
// client written against the client protocol directly, in the spirit of
// the Consul client, standard library only.
//
// Mapping. Topic T is the subject <prefix>.T (--broker_prefix, default
// micro); message headers travel as NATS headers (HPUB/HMSG), so a
// subscriber on another sidecar gets them exactly as a local one does.
// Each sidecar holds one NATS subscription per topic with plain
// subscribers, fanned out to them, and one queue subscription per (topic,
// queue group), handed to one local member. A publish goes to NATS only;
// NATS delivers it back to every sidecar with subscribers, this one
// included (echo). So each message reaches every plain subscriber once and
// one member of each queue group across all sidecars: at most once, as
// NATS core promises, no more.
//
// Protocol assumptions (https://docs.nats.io/reference/reference-protocols/nats-protocol),
// each pinned by a test in broker_nats_test.go:
//   - The server speaks first: one INFO line of JSON, in plain text even
//     when TLS follows; the client then starts TLS if either side wants it.
//   - Operations are case-insensitive, arguments are separated by spaces
//     or tabs, and lines end in CRLF.
//   - MSG <subject> <sid> [reply-to] <#bytes> and HMSG <subject> <sid>
//     [reply-to] <#header bytes> <#total bytes> are followed by that many
//     bytes and CRLF. A header block is "NATS/1.0[ status]" CRLF, then
//     "Name: Value" CRLF lines, then CRLF.
//   - A PONG answers the oldest PING not yet answered; the server has
//     processed everything sent before that PING.
//   - max_payload in INFO bounds the header and body of one PUB/HPUB; a
//     larger one makes the server close the connection.
//   - With verbose false nothing is acknowledged; errors are -ERR '<text>'
//     lines, after most of which the server closes the connection.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"encoding/base32"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	natsDefaultPort       = "4222"
	natsDefaultMaxPayload = 1 << 20              // until a server's INFO says otherwise
	natsHardMaxPayload    = 64 << 20             // the most a server may announce (its own limit)
	natsReadBuffer        = 64 << 10             // holds any control line, INFO included
	natsMaxLearned        = 64                   // servers learned from connect_urls
	natsMaxPingsOut       = 2                    // keepalive: PINGs unanswered for this many intervals mean a dead server
	natsMaxLogged         = 64                   // distinct error texts remembered for log-once
	natsShrinkBuffer      = 1 << 20              // an outbound buffer larger than this is let go once drained
	natsConfirmInterval   = 2 * time.Millisecond // at most one PING confirming publishes this often
)

// natsOptions is the --broker nats configuration (Config.NATS). The zero
// value is not valid; natsDefaults gives the documented defaults.
type natsOptions struct {
	Prefix      string // subject prefix: topic T is <Prefix>.T
	User        string // credentials when the server URL has none
	Password    string
	Token       string
	NKeyFile    string // file holding a user nkey seed (SU...); excludes User and Token
	TLS         bool   // TLS with every server, as tls:// does
	TLSCAFile   string // CA roots of the servers' certificates; empty: the system roots
	TLSCertFile string // client certificate (mutual TLS), with TLSKeyFile
	TLSKeyFile  string
	BufferBytes int64 // publishes not yet written to a server, at most; beyond: 503

	PingInterval  time.Duration // keepalive PING; natsMaxPingsOut unanswered intervals: reconnect
	ReconnectWait time.Duration // first backoff after a failed round of the server list
	ReconnectMax  time.Duration // backoff doubles up to this
	Timeout       time.Duration // dial, handshake, and each write
	HealthGrace   time.Duration // /health turns 503 once disconnected this long
}

func natsDefaults() natsOptions {
	return natsOptions{
		Prefix:        "micro",
		BufferBytes:   8 << 20,
		PingInterval:  20 * time.Second,
		ReconnectWait: 100 * time.Millisecond,
		ReconnectMax:  5 * time.Second,
		Timeout:       5 * time.Second,
		HealthGrace:   5 * time.Second,
	}
}

// validateNATS checks the --broker nats flags, and that none is given
// without --broker nats.
func (c *Config) validateNATS() error {
	o := &c.NATS
	if c.Broker != "nats" {
		d := natsDefaults()
		for _, f := range []struct{ name, v, def string }{
			{"broker_prefix", o.Prefix, d.Prefix}, {"broker_user", o.User, ""}, {"broker_password", o.Password, ""},
			{"broker_token", o.Token, ""}, {"broker_nkey_file", o.NKeyFile, ""}, {"broker_tls_ca_file", o.TLSCAFile, ""},
			{"broker_tls_cert_file", o.TLSCertFile, ""}, {"broker_tls_key_file", o.TLSKeyFile, ""},
		} {
			if f.v != f.def {
				return fmt.Errorf("flag --%s needs --broker nats", f.name)
			}
		}
		if o.TLS {
			return errors.New("flag --broker_tls needs --broker nats")
		}
		return nil
	}
	if _, err := parseNATSServers(c.BrokerAddress); err != nil {
		return fmt.Errorf("invalid value %q for flag --broker_address: %v", c.BrokerAddress, err)
	}
	if err := checkSubject(o.Prefix); err != nil {
		return fmt.Errorf("invalid value %q for flag --broker_prefix: %v", o.Prefix, err)
	}
	switch {
	case o.BufferBytes <= 0:
		return fmt.Errorf("invalid value %d for flag --broker_buffer_bytes: must be positive", o.BufferBytes)
	case o.PingInterval <= 0:
		return fmt.Errorf("invalid value %s for flag --broker_ping_interval: must be positive", o.PingInterval)
	case o.HealthGrace < 0:
		return fmt.Errorf("invalid value %s for flag --broker_health_grace: must not be negative", o.HealthGrace)
	case o.ReconnectWait <= 0 || o.ReconnectMax < o.ReconnectWait || o.Timeout <= 0:
		return errors.New("broker: NATS reconnect waits and timeout must be positive")
	case o.Password != "" && o.User == "":
		return errors.New("flag --broker_password needs --broker_user")
	case o.NKeyFile != "" && (o.User != "" || o.Token != ""):
		return errors.New("flag --broker_nkey_file excludes --broker_user and --broker_token")
	case o.User != "" && o.Token != "":
		return errors.New("flags --broker_user and --broker_token exclude each other")
	case (o.TLSCertFile == "") != (o.TLSKeyFile == ""):
		return errors.New("flags --broker_tls_cert_file and --broker_tls_key_file go together")
	}
	return nil
}

// natsServer is one server of the pool: from --broker_address, or learned
// from a server's INFO connect_urls (implicit).
type natsServer struct {
	url      *url.URL // nats:// or tls://, host:port, maybe userinfo
	implicit bool
	tlsName  string // name its certificate must carry
}

// parseNATSServers parses --broker_address: comma-separated
// nats://[user:password@|token@]host[:port] or tls://..., or bare
// host[:port]; empty means nats://127.0.0.1:4222.
func parseNATSServers(s string) ([]*natsServer, error) {
	if strings.TrimSpace(s) == "" {
		s = "nats://127.0.0.1:" + natsDefaultPort
	}
	var out []*natsServer
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if !strings.Contains(f, "://") {
			f = "nats://" + f
		}
		u, err := url.Parse(f)
		if err != nil {
			return nil, errors.New("want nats://host:port[,nats://host2:port]")
		}
		if u.Scheme != "nats" && u.Scheme != "tls" {
			return nil, fmt.Errorf("scheme %q is not nats or tls", u.Scheme)
		}
		if u.Hostname() == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
			return nil, errors.New("want scheme://host:port, without a path")
		}
		if u.Port() == "" {
			u.Host = net.JoinHostPort(u.Hostname(), natsDefaultPort)
		} else if p, err := strconv.Atoi(u.Port()); err != nil || p <= 0 || p > 65535 {
			return nil, fmt.Errorf("port %q is not 1-65535", u.Port())
		}
		u.Path = ""
		out = append(out, &natsServer{url: u, tlsName: u.Hostname()})
	}
	if len(out) == 0 {
		return nil, errors.New("no server")
	}
	return out, nil
}

// redacted is u without credentials, for logs and /health.
func redacted(u *url.URL) string {
	return u.Scheme + "://" + u.Host
}

// checkSubject checks that s is a sequence of subject tokens a publish
// may use: non-empty tokens separated by dots, none a wildcard (* or >),
// no space or control character (the topic rules already refuse those).
func checkSubject(s string) error {
	if s == "" {
		return errors.New("empty")
	}
	for tok := range strings.SplitSeq(s, ".") {
		switch tok {
		case "":
			return errors.New("NATS subjects are dot-separated tokens: no empty token (a leading, trailing or double dot)")
		case "*", ">":
			return fmt.Errorf("NATS wildcard %q is not a topic token", tok)
		}
	}
	if strings.ContainsFunc(s, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return errors.New("holds a space or control character")
	}
	return nil
}

// natsInfo is the part of a server's INFO the client uses.
type natsInfo struct {
	ServerID     string   `json:"server_id"`
	ServerName   string   `json:"server_name"`
	Version      string   `json:"version"`
	Headers      bool     `json:"headers"`
	MaxPayload   int64    `json:"max_payload"`
	Proto        int      `json:"proto"`
	AuthRequired bool     `json:"auth_required"`
	TLSRequired  bool     `json:"tls_required"`
	TLSAvailable bool     `json:"tls_available"`
	ConnectURLs  []string `json:"connect_urls"`
	Nonce        string   `json:"nonce"`
	LameDuck     bool     `json:"ldm"`
}

// natsConnect is the CONNECT the client sends.
type natsConnect struct {
	Verbose      bool   `json:"verbose"`
	Pedantic     bool   `json:"pedantic"`
	TLSRequired  bool   `json:"tls_required"`
	Name         string `json:"name"`
	Lang         string `json:"lang"`
	Version      string `json:"version"`
	Protocol     int    `json:"protocol"` // 1: async INFO with connect_urls
	Echo         bool   `json:"echo"`     // this sidecar's subscribers get its own publishes
	Headers      bool   `json:"headers"`
	NoResponders bool   `json:"no_responders"`
	User         string `json:"user,omitempty"`
	Pass         string `json:"pass,omitempty"`
	Token        string `json:"auth_token,omitempty"`
	NKey         string `json:"nkey,omitempty"`
	Sig          string `json:"sig,omitempty"`
}

// natsSub is one NATS subscription of this sidecar: a topic's plain
// subscribers (queue "") or one queue group's members here.
type natsSub struct {
	sid    uint64
	topic  string
	queue  string
	queues []string // {queue} for deliverRemote; nil for plain
	refs   int      // local subscribers; guarded by natsBroker.smu
	ready  chan struct{}
}

type natsSubKey struct{ topic, queue string }

// natsPing is a PING sent and not yet answered.
type natsPing struct {
	at      time.Time
	mark    int64         // publishes sent before it on this connection
	ready   chan struct{} // closed by its PONG (or a disconnect); may be nil
	confirm bool          // the writer's PING after publishes (natsBroker.confirming)
}

// natsBroker is the broker's Relay with --broker nats. It owns the
// connection to one server of the pool at a time, reconnecting with
// jittered backoff, and the NATS subscriptions of this sidecar's topics,
// sent again after every reconnect. Publishes go to a bounded outbound
// buffer that one writer goroutine per connection drains, so publishers
// never wait on the network; while disconnected the buffer keeps them for
// the next connection. Safe for concurrent use; Close flushes what it can
// and waits for every goroutine it started.
type natsBroker struct {
	opt     natsOptions
	log     *slog.Logger
	b       *broker
	tlsConf *tls.Config        // servers' TLS: roots, client certificate
	nkey    ed25519.PrivateKey // nil without --broker_nkey_file
	nkeyPub string             // its public key, U...
	started time.Time

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	kick   chan struct{} // wakes the writer; buffered 1
	wg     sync.WaitGroup
	once   sync.Once // start
	closed sync.Once // Close

	connected   atomic.Bool
	reconnects  atomic.Int64 // connections made after the first
	published   atomic.Int64 // publishes written to a server
	received    atomic.Int64 // MSG/HMSG received
	refused     atomic.Int64 // publishes answered 503: the buffer was full
	tooLarge    atomic.Int64 // publishes answered 413: over the server's max_payload
	unconfirmed atomic.Int64 // written to a connection that died before the server confirmed them
	discarded   atomic.Int64 // buffered publishes dropped: over a new server's max_payload, or left at Close
	missed      atomic.Int64 // messages for a subscription that had just ended here
	badHeaders  atomic.Int64 // messages dropped for a header block that does not parse
	serverErrs  atomic.Int64 // -ERR lines received

	smu  sync.RWMutex // guards subs and sids; taken before mu
	subs map[natsSubKey]*natsSub
	sids map[uint64]*natsSub
	sid  uint64 // last sid given out

	mu          sync.Mutex // guards the fields below
	servers     []*natsServer
	cur         int      // index in servers of the last server tried
	conn        net.Conn // nil while disconnected
	server      string   // URL (redacted) of the connected or last server
	serverName  string
	maxPayload  int64
	out         []byte // operations for the writer; while disconnected, publishes only
	outMsgs     int64  // publishes in out
	outPub      int64  // bytes of the publishes in out (what BufferBytes bounds)
	outMax      int64  // largest payload in out
	pings       []natsPing
	confirming  bool      // a PING confirming written publishes is unanswered
	confirmAt   time.Time // when the last such PING was queued
	taken       int64     // publishes handed to the writer on this connection
	confirmed   int64     // publishes the server confirmed on this connection
	downSince   time.Time
	lastErr     string
	logged      map[string]bool // error texts logged at warn on this connection
	closing     bool
	everConnect bool
}

// newNATSBroker builds the relay for b from cfg; it reads the nkey seed
// and TLS files, and does not connect (start does).
func newNATSBroker(cfg *Config, b *broker, logger *slog.Logger) (*natsBroker, error) {
	servers, err := parseNATSServers(cfg.BrokerAddress)
	if err != nil {
		return nil, fmt.Errorf("flag --broker_address: %w", err)
	}
	n := &natsBroker{
		opt:        cfg.NATS,
		log:        logger,
		b:          b,
		started:    time.Now(),
		kick:       make(chan struct{}, 1),
		subs:       map[natsSubKey]*natsSub{},
		sids:       map[uint64]*natsSub{},
		servers:    servers,
		cur:        -1,
		server:     redacted(servers[0].url),
		maxPayload: natsDefaultMaxPayload,
		logged:     map[string]bool{},
	}
	n.downSince = n.started
	n.ctx, n.cancel = context.WithCancel(context.Background())
	n.tlsConf = &tls.Config{MinVersion: tls.VersionTLS12}
	if o := cfg.NATS; o.TLSCAFile != "" {
		pool, err := loadCertPool(o.TLSCAFile)
		if err != nil {
			return nil, fmt.Errorf("flag --broker_tls_ca_file: %w", err)
		}
		n.tlsConf.RootCAs = pool
	}
	if o := cfg.NATS; o.TLSCertFile != "" {
		cert, err := tls.LoadX509KeyPair(o.TLSCertFile, o.TLSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("flag --broker_tls_cert_file: %w", err)
		}
		n.tlsConf.Certificates = []tls.Certificate{cert}
	}
	if f := cfg.NATS.NKeyFile; f != "" {
		data, err := readLimited(f)
		if err != nil {
			return nil, fmt.Errorf("flag --broker_nkey_file: %w", err)
		}
		n.nkey, n.nkeyPub, err = parseNKeySeedFile(data)
		if err != nil {
			return nil, fmt.Errorf("flag --broker_nkey_file %s: %w", f, err)
		}
	}
	return n, nil
}

// start connects in the background. Publishes and subscriptions made
// before the connection is up wait in the buffer. The connection outlives
// ctx, the serving context, on purpose: shutdown cancels that first, and
// Close still flushes the last publishes.
func (n *natsBroker) start(context.Context) {
	n.once.Do(func() {
		n.wg.Add(1)
		go n.run()
	})
}

// CheckTopic implements Relay: <prefix>.T must be a subject.
func (n *natsBroker) CheckTopic(topic string) error {
	return checkSubject(topic)
}

// Publish implements Relay: it queues m for the writer, or refuses it
// when it is larger than the server's max_payload (413) or the buffer is
// full (503). It never waits on the network.
func (n *natsBroker) Publish(topic string, m *Message) error {
	hlen, err := natsHeaderLen(m.Header)
	if err != nil {
		return errorf(http.StatusBadRequest, "broker: %v", err)
	}
	size := int64(hlen + len(m.Body))
	n.mu.Lock()
	switch {
	case n.closing:
		n.mu.Unlock()
		n.refused.Add(1)
		return errorf(http.StatusServiceUnavailable, "broker: shutting down")
	case size > n.maxPayload:
		max := n.maxPayload
		n.mu.Unlock()
		n.tooLarge.Add(1)
		return errorf(http.StatusRequestEntityTooLarge, "broker: message of %d bytes (headers included) is larger than the NATS server's max_payload of %d bytes", size, max)
	}
	before := len(n.out)
	n.out = appendPub(n.out, n.opt.Prefix, topic, m, hlen)
	enc := int64(len(n.out) - before)
	if n.outPub+enc > n.opt.BufferBytes && n.outMsgs > 0 {
		n.out = n.out[:before]
		connected := n.conn != nil
		n.mu.Unlock()
		n.refused.Add(1)
		why := "the NATS server is not reading fast enough"
		if !connected {
			why = "not connected to a NATS server"
		}
		return errorf(http.StatusServiceUnavailable, "broker: publish buffer full (--broker_buffer_bytes %d): %s; retry later", n.opt.BufferBytes, why)
	}
	n.outMsgs++
	n.outPub += enc
	n.outMax = max(n.outMax, size)
	connected := n.conn != nil
	n.mu.Unlock()
	if connected {
		n.wakeWriter()
	}
	return nil
}

// Subscribed implements Relay: the first subscriber of (topic, queue)
// makes a NATS subscription. ready closes when the server confirmed it
// (a PONG after the SUB), at once while disconnected (the subscription is
// made on connecting).
func (n *natsBroker) Subscribed(topic, queue string) <-chan struct{} {
	n.smu.Lock()
	defer n.smu.Unlock()
	k := natsSubKey{topic, queue}
	if s := n.subs[k]; s != nil {
		s.refs++
		return s.ready
	}
	n.sid++
	s := &natsSub{sid: n.sid, topic: topic, queue: queue, refs: 1, ready: make(chan struct{})}
	if queue != "" {
		s.queues = []string{queue}
	}
	n.subs[k], n.sids[s.sid] = s, s
	n.mu.Lock()
	if n.conn == nil {
		close(s.ready)
	} else {
		n.out = appendSub(n.out, n.opt.Prefix, s)
		n.appendPingLocked(s.ready)
	}
	connected := n.conn != nil
	n.mu.Unlock()
	if connected {
		n.wakeWriter()
	}
	return s.ready
}

// Unsubscribed implements Relay: the last subscriber of (topic, queue)
// leaving ends the NATS subscription.
func (n *natsBroker) Unsubscribed(topic, queue string) {
	n.smu.Lock()
	defer n.smu.Unlock()
	k := natsSubKey{topic, queue}
	s := n.subs[k]
	if s == nil {
		return
	}
	if s.refs--; s.refs > 0 {
		return
	}
	delete(n.subs, k)
	delete(n.sids, s.sid)
	n.mu.Lock()
	connected := n.conn != nil
	if connected {
		n.out = fmt.Appendf(n.out, "UNSUB %d\r\n", s.sid)
	}
	n.mu.Unlock()
	if connected {
		n.wakeWriter()
	}
}

// appendPingLocked queues a PING whose PONG closes ready. n.mu is held and
// a connection is up.
func (n *natsBroker) appendPingLocked(ready chan struct{}) {
	n.out = append(n.out, "PING\r\n"...)
	n.pings = append(n.pings, natsPing{at: time.Now(), mark: n.taken + n.outMsgs, ready: ready})
}

func (n *natsBroker) wakeWriter() {
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// run connects, serves the connection until it fails, and reconnects,
// until Close. A round over the server list that finds none, or a
// connection that lasted less than ReconnectMax, is followed by a
// jittered, growing wait; a connection that lasted longer reconnects at
// once.
func (n *natsBroker) run() {
	defer n.wg.Done()
	bo := newBackoff(n.opt.ReconnectWait, n.opt.ReconnectMax)
	for n.ctx.Err() == nil {
		c, err := n.connectRound()
		if err != nil {
			if n.ctx.Err() != nil {
				return
			}
			n.noteError("nats connection failed; retrying", err)
			if !sleepCtx(n.ctx, bo.next()) {
				return
			}
			continue
		}
		began := time.Now()
		err = n.serve(c)
		n.disconnected(err)
		if time.Since(began) >= n.opt.ReconnectMax {
			bo.reset()
		} else if !sleepCtx(n.ctx, bo.next()) {
			return
		}
	}
}

// natsConn is one connection: the socket and the reader over it.
type natsConn struct {
	nc  net.Conn
	dr  *deadlineReader
	rd  *natsReader
	srv *natsServer
}

// deadlineReader gives every read after the handshake a deadline (idle):
// a server that sends nothing, not even the PONGs of the keepalive, is
// dead. During the handshake idle is zero and the caller sets deadlines.
type deadlineReader struct {
	conn net.Conn
	idle time.Duration
}

func (d *deadlineReader) Read(p []byte) (int, error) {
	if d.idle > 0 {
		if err := d.conn.SetReadDeadline(time.Now().Add(d.idle)); err != nil {
			return 0, err
		}
	}
	return d.conn.Read(p)
}

// connectRound tries each server once, starting after the last one tried.
func (n *natsBroker) connectRound() (*natsConn, error) {
	n.mu.Lock()
	servers := slices.Clone(n.servers)
	start := n.cur + 1
	n.mu.Unlock()
	var errs []error
	for i := range servers {
		idx := (start + i) % len(servers)
		srv := servers[idx]
		n.mu.Lock()
		n.cur = idx
		n.mu.Unlock()
		c, err := n.dial(srv)
		if err == nil {
			return c, nil
		}
		if n.ctx.Err() != nil {
			return nil, n.ctx.Err()
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

// dial connects to srv and completes the handshake: INFO, TLS if either
// side wants it, CONNECT, and a PING answered by PONG (or an -ERR, such as
// an authorization violation).
func (n *natsBroker) dial(srv *natsServer) (*natsConn, error) {
	name := redacted(srv.url)
	d := net.Dialer{Timeout: n.opt.Timeout, KeepAlive: 30 * time.Second}
	nc, err := d.DialContext(n.ctx, "tcp", srv.url.Host)
	if err != nil {
		return nil, fmt.Errorf("nats: %s: %w", name, err)
	}
	fail := func(err error) (*natsConn, error) {
		nc.Close()
		return nil, fmt.Errorf("nats: %s: %w", name, err)
	}
	raw := nc
	stop := context.AfterFunc(n.ctx, func() { raw.Close() }) // Close ends a handshake
	defer stop()
	nc.SetDeadline(time.Now().Add(n.opt.Timeout))
	dr := &deadlineReader{conn: nc}
	rd := newNATSReader(bufio.NewReaderSize(dr, natsReadBuffer))
	op, err := rd.next()
	if err != nil {
		return fail(fmt.Errorf("read INFO: %w", err))
	}
	if op.kind != natsOpInfo {
		return fail(fmt.Errorf("server spoke %s before INFO", op.kind))
	}
	info := op.info
	wantTLS := srv.url.Scheme == "tls" || n.opt.TLS
	if wantTLS || info.TLSRequired {
		if !info.TLSRequired && !info.TLSAvailable {
			return fail(errors.New("TLS wanted (tls:// or --broker_tls) but the server offers none"))
		}
		if rd.br.Buffered() > 0 {
			return fail(errors.New("server sent data after INFO, before TLS"))
		}
		conf := n.tlsConf.Clone()
		conf.ServerName = srv.tlsName
		tc := tls.Client(nc, conf)
		if err := tc.HandshakeContext(n.ctx); err != nil {
			return fail(fmt.Errorf("TLS handshake: %w", err))
		}
		nc = tc
		dr.conn = tc
	}
	if !info.Headers {
		return fail(errors.New("server does not support headers (NATS 2.2 or later needed)"))
	}
	connect, err := n.connectJSON(srv, info, wantTLS || info.TLSRequired)
	if err != nil {
		return fail(err)
	}
	if _, err := nc.Write(append(append([]byte("CONNECT "), connect...), "\r\nPING\r\n"...)); err != nil {
		return fail(fmt.Errorf("send CONNECT: %w", err))
	}
	for {
		op, err := rd.next()
		if err != nil {
			return fail(fmt.Errorf("handshake: %w", err))
		}
		switch op.kind {
		case natsOpPong:
			nc.SetDeadline(time.Time{})
			dr.idle = n.opt.PingInterval * (natsMaxPingsOut + 1)
			n.learn(srv, info)
			n.mu.Lock()
			if info.MaxPayload > 0 {
				n.maxPayload = min(info.MaxPayload, natsHardMaxPayload)
			}
			n.server, n.serverName = name, info.ServerName
			n.mu.Unlock()
			rd.maxPayload = int(min(max(info.MaxPayload, natsDefaultMaxPayload), natsHardMaxPayload))
			return &natsConn{nc: nc, dr: dr, rd: rd, srv: srv}, nil
		case natsOpErr:
			n.serverErrs.Add(1)
			return fail(fmt.Errorf("-ERR %s", op.text))
		case natsOpInfo:
			info = op.info
		case natsOpPing:
			nc.Write([]byte("PONG\r\n"))
		case natsOpOK:
		default:
			return fail(fmt.Errorf("unexpected %s during the handshake", op.kind))
		}
	}
}

// connectJSON is the CONNECT for srv: credentials from its URL, else from
// the flags; with an nkey, the server's nonce signed.
func (n *natsBroker) connectJSON(srv *natsServer, info natsInfo, secure bool) ([]byte, error) {
	c := natsConnect{
		TLSRequired: secure,
		Name:        "sidecar",
		Lang:        "go",
		Version:     "sidecar",
		Protocol:    1,
		Echo:        true,
		Headers:     true,
	}
	switch u := srv.url.User; {
	case u != nil:
		if pass, ok := u.Password(); ok {
			c.User, c.Pass = u.Username(), pass
		} else {
			c.Token = u.Username()
		}
	case n.nkey != nil:
		if info.Nonce == "" {
			return nil, errors.New("--broker_nkey_file given but the server sent no nonce to sign (is nkey authorization configured?)")
		}
		c.NKey = n.nkeyPub
		c.Sig = base64.RawURLEncoding.EncodeToString(ed25519.Sign(n.nkey, []byte(info.Nonce)))
	case n.opt.User != "":
		c.User, c.Pass = n.opt.User, n.opt.Password
	case n.opt.Token != "":
		c.Token = n.opt.Token
	}
	return json.Marshal(c)
}

// learn adds the servers in info's connect_urls that the pool lacks; they
// inherit the scheme, credentials and TLS name of from.
func (n *natsBroker) learn(from *natsServer, info natsInfo) {
	var added []string
	defer func() {
		for _, a := range added {
			n.log.Debug("nats server learned", "server", a)
		}
	}()
	n.mu.Lock()
	defer n.mu.Unlock()
	learned := 0
	for _, s := range n.servers {
		if s.implicit {
			learned++
		}
	}
	for _, hp := range info.ConnectURLs {
		if learned >= natsMaxLearned {
			return
		}
		host, port, err := net.SplitHostPort(hp)
		if err != nil || host == "" || port == "" {
			continue
		}
		known := slices.ContainsFunc(n.servers, func(s *natsServer) bool { return s.url.Host == hp })
		if known {
			continue
		}
		u := *from.url
		u.Host = hp
		name := host
		if net.ParseIP(host) != nil {
			name = from.tlsName // an address learned by IP is checked against the name configured
		}
		n.servers = append(n.servers, &natsServer{url: &u, implicit: true, tlsName: name})
		learned++
		added = append(added, redacted(&u))
	}
}

// serve runs connection c until it fails or Close: it resubscribes, lets
// the buffered publishes go, and runs the reader, the writer and the
// keepalive. It returns why the connection ended.
func (n *natsBroker) serve(c *natsConn) error {
	n.install(c)
	errc := make(chan error, 2)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); errc <- n.readLoop(c) }()
	go func() { defer wg.Done(); errc <- n.writeLoop(c, done) }()
	t := time.NewTicker(n.opt.PingInterval)
	defer t.Stop()
	var err error
loop:
	for {
		select {
		case err = <-errc:
			break loop
		case <-n.ctx.Done():
			err = n.ctx.Err()
			break loop
		case <-t.C:
			if err = n.keepalive(); err != nil {
				break loop
			}
		}
	}
	close(done)
	c.nc.Close()
	wg.Wait()
	return err
}

// install makes c the connection: every subscription is sent again, then
// the buffered publishes (less those over the new server's max_payload).
func (n *natsBroker) install(c *natsConn) {
	var tooLarge int64
	// smu is held until the connection is in place, so that a subscription
	// made or ended meanwhile is either in subs or sent on the connection.
	n.smu.RLock()
	var subs []byte
	for _, s := range n.subs {
		subs = appendSub(subs, n.opt.Prefix, s)
	}
	n.mu.Lock()
	if n.outMax > n.maxPayload {
		kept, msgs, pubBytes, dropped := compactOut(n.out, n.maxPayload)
		n.out, n.outMsgs, n.outPub, n.outMax = kept, msgs, pubBytes, n.maxPayload
		n.discarded.Add(dropped)
		tooLarge = dropped
	}
	n.out = append(subs, n.out...)
	n.conn = c.nc
	if n.everConnect {
		n.reconnects.Add(1)
	}
	n.everConnect = true
	n.lastErr = ""
	clear(n.logged)
	n.connected.Store(true)
	buffered, server := n.outMsgs, n.server
	n.mu.Unlock()
	n.smu.RUnlock()
	n.wakeWriter()
	if tooLarge > 0 {
		n.log.Warn("buffered publishes larger than the new server's max_payload dropped", "messages", tooLarge)
	}
	n.log.Info("nats connected", "server", server, "server_name", c.rd.info().ServerName, "buffered", buffered)
}

// disconnected records the end of a connection: publishes handed to the
// writer and not confirmed are counted as possibly lost, what the writer
// has not taken waits for the next connection, and subscribe handshakes
// waiting for a PONG go on.
func (n *natsBroker) disconnected(err error) {
	n.mu.Lock()
	n.conn = nil
	n.connected.Store(false)
	n.downSince = time.Now()
	lost := n.taken - n.confirmed
	n.taken, n.confirmed = 0, 0
	n.out, n.outMsgs, n.outPub, _ = compactOut(n.out, natsHardMaxPayload)
	for _, p := range n.pings {
		if p.ready != nil {
			close(p.ready)
		}
	}
	n.pings, n.confirming = nil, false
	server := n.server
	closing := n.closing
	n.mu.Unlock()
	n.unconfirmed.Add(lost)
	if closing || n.ctx.Err() != nil {
		return
	}
	n.log.Warn("nats disconnected; reconnecting", "server", server, "err", err, "unconfirmed", lost)
	n.noteError("nats disconnected", err)
}

// noteError remembers err for /health and logs each distinct text once
// per connection (repeats at debug).
func (n *natsBroker) noteError(what string, err error) {
	if err == nil {
		return
	}
	msg := err.Error()
	n.mu.Lock()
	n.lastErr = msg
	first := !n.logged[msg]
	if first {
		if len(n.logged) >= natsMaxLogged {
			clear(n.logged)
		}
		n.logged[msg] = true
	}
	n.mu.Unlock()
	if first {
		n.log.Warn(what, "err", msg)
	} else {
		n.log.Debug(what, "err", msg)
	}
}

// keepalive sends a PING when none is unanswered, and reports a dead
// server when the oldest PING has gone unanswered for natsMaxPingsOut
// intervals.
func (n *natsBroker) keepalive() error {
	n.mu.Lock()
	if len(n.pings) > 0 {
		age := time.Since(n.pings[0].at)
		n.mu.Unlock()
		if age > natsMaxPingsOut*n.opt.PingInterval {
			return fmt.Errorf("nats: no PONG for %s: stale connection", age.Round(time.Millisecond))
		}
		return nil
	}
	n.appendPingLocked(nil)
	n.mu.Unlock()
	n.wakeWriter()
	return nil
}

// writeLoop writes what is queued, in order, one batch per wake-up, each
// write with a deadline. After a batch with publishes it asks for a PONG
// (unless one is awaited, or one went out within natsConfirmInterval; the
// keepalive's PING confirms too), so that they count as confirmed.
func (n *natsBroker) writeLoop(c *natsConn, done <-chan struct{}) error {
	var batch []byte
	for {
		n.mu.Lock()
		if len(n.out) == 0 {
			if cap(n.out) > natsShrinkBuffer {
				n.out = nil
			}
			n.mu.Unlock()
			select {
			case <-done:
				return nil
			case <-n.kick:
			}
			continue
		}
		batch, n.out = n.out, batch[:0]
		msgs := n.outMsgs
		n.taken += msgs
		n.outMsgs, n.outPub, n.outMax = 0, 0, 0
		if now := time.Now(); msgs > 0 && !n.confirming && now.Sub(n.confirmAt) >= natsConfirmInterval {
			n.confirming, n.confirmAt = true, now
			batch = append(batch, "PING\r\n"...)
			n.pings = append(n.pings, natsPing{at: now, mark: n.taken, confirm: true})
		}
		n.mu.Unlock()

		if err := c.nc.SetWriteDeadline(time.Now().Add(n.opt.Timeout)); err != nil {
			return err
		}
		if _, err := c.nc.Write(batch); err != nil {
			return fmt.Errorf("nats: write: %w", err)
		}
		n.published.Add(msgs)
		if cap(batch) > natsShrinkBuffer {
			batch = nil
		}
	}
}

// readLoop reads the server's operations until the connection fails.
func (n *natsBroker) readLoop(c *natsConn) error {
	for {
		op, err := c.rd.next()
		if err != nil {
			n.mu.Lock()
			last := n.lastErr
			n.mu.Unlock()
			if errors.Is(err, io.EOF) && last != "" {
				return fmt.Errorf("nats: server closed the connection after %s", last)
			}
			return fmt.Errorf("nats: read: %w", err)
		}
		switch op.kind {
		case natsOpMsg:
			n.deliver(op)
		case natsOpPing:
			n.mu.Lock()
			n.out = append(n.out, "PONG\r\n"...)
			n.mu.Unlock()
			n.wakeWriter()
		case natsOpPong:
			n.pong()
		case natsOpInfo:
			info := op.info
			n.learn(c.srv, info)
			if info.LameDuck {
				n.log.Info("nats server entering lame duck mode; it will close the connection", "server", redacted(c.srv.url))
			}
		case natsOpErr:
			n.serverErrs.Add(1)
			n.noteError("nats server error", fmt.Errorf("nats: -ERR %s", op.text))
		case natsOpOK:
		}
	}
}

// pong resolves the oldest PING.
func (n *natsBroker) pong() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.pings) == 0 {
		return
	}
	p := n.pings[0]
	n.pings[0] = natsPing{}
	n.pings = n.pings[1:]
	if len(n.pings) == 0 {
		n.pings = nil
	}
	if p.mark > n.confirmed {
		n.confirmed = p.mark
	}
	if p.ready != nil {
		close(p.ready)
	}
	if p.confirm {
		n.confirming = false
	}
}

// deliver hands a MSG/HMSG to the local subscribers of its subscription.
func (n *natsBroker) deliver(op natsOp) {
	n.received.Add(1)
	n.smu.RLock()
	s := n.sids[op.sid]
	var topic string
	var queues []string
	if s != nil {
		topic, queues = s.topic, s.queues
	}
	n.smu.RUnlock()
	if s == nil {
		n.missed.Add(1) // its last subscriber left; the UNSUB was on its way
		return
	}
	hdr, err := parseNATSHeaders(op.header)
	if err != nil {
		n.badHeaders.Add(1)
		n.log.Debug("nats message with a bad header block dropped", "topic", topic, "err", err)
		return
	}
	_, miss, full := n.b.deliverRemote(topic, &Message{Header: hdr, Body: op.payload}, queues == nil, queues)
	n.missed.Add(int64(len(miss)))
	if len(full) > 0 {
		// NATS handed the message to this sidecar's queue subscription and
		// will not offer it to another: it is lost to the group.
		n.b.lose(len(full), topic, queues[full[0]], "no member of the queue group has room")
	}
}

// Close flushes the buffered publishes (within the timeout, confirmed by a
// PONG), closes the connection and waits for every goroutine. What could
// not be sent is counted as discarded. Idempotent.
func (n *natsBroker) Close() error {
	n.closed.Do(func() {
		n.mu.Lock()
		n.closing = true
		var flushed chan struct{}
		if n.conn != nil && (len(n.out) > 0 || n.taken > n.confirmed) {
			flushed = make(chan struct{})
			n.appendPingLocked(flushed)
		}
		n.mu.Unlock()
		if flushed != nil {
			n.wakeWriter()
			t := time.NewTimer(n.opt.Timeout)
			select {
			case <-flushed:
			case <-t.C:
			}
			t.Stop()
		}
		n.cancel()
		n.wg.Wait()
		n.mu.Lock()
		n.discarded.Add(n.outMsgs)
		n.out, n.outMsgs, n.outPub = nil, 0, 0
		n.mu.Unlock()
	})
	return nil
}

// natsHealth is the broker's part of /health.
type natsHealth struct {
	Status         string    `json:"status"` // ok, connecting (within the grace) or disconnected
	Type           string    `json:"type"`
	Connected      bool      `json:"connected"`
	Server         string    `json:"server"`
	ServerName     string    `json:"server_name,omitempty"`
	Reconnects     int64     `json:"reconnects"`
	BufferedBytes  int64     `json:"buffered_bytes"`
	DisconnectedAt time.Time `json:"disconnected_at,omitzero"`
	LastError      string    `json:"last_error,omitempty"`
}

// health reports the connection; ok is false once disconnected for longer
// than the grace period.
func (n *natsBroker) health() (h natsHealth, ok bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	h = natsHealth{
		Status:        "ok",
		Type:          "nats",
		Connected:     n.conn != nil,
		Server:        n.server,
		ServerName:    n.serverName,
		Reconnects:    n.reconnects.Load(),
		BufferedBytes: n.outPub,
		LastError:     n.lastErr,
	}
	if n.conn != nil {
		return h, true
	}
	h.DisconnectedAt = n.downSince.UTC()
	if time.Since(n.downSince) <= n.opt.HealthGrace {
		h.Status = "connecting"
		return h, true
	}
	h.Status = "disconnected"
	return h, false
}

// metrics emits the NATS connection's state and counters.
func (n *natsBroker) metrics(emit emitFunc) {
	connected := 0.0
	if n.connected.Load() {
		connected = 1
	}
	n.mu.Lock()
	buffered := n.outPub
	n.mu.Unlock()
	emit("sidecar_broker_nats_connected", "1 while connected to a NATS server.", "gauge", connected)
	emit("sidecar_broker_nats_reconnects_total", "Connections to a NATS server after the first.", "counter", float64(n.reconnects.Load()))
	emit("sidecar_broker_nats_buffered_bytes", "Bytes of publishes waiting to be written to NATS (bounded by --broker_buffer_bytes).", "gauge", float64(buffered))
	emit("sidecar_broker_nats_published_total", "Messages written to a NATS server.", "counter", float64(n.published.Load()))
	emit("sidecar_broker_nats_received_total", "Messages received from NATS.", "counter", float64(n.received.Load()))
	const dropped, dropHelp = "sidecar_broker_nats_dropped_total", "Messages NATS delivery lost or refused, by reason."
	emit(dropped, dropHelp, "counter", float64(n.refused.Load()), "reason", "buffer_full")
	emit(dropped, dropHelp, "counter", float64(n.tooLarge.Load()), "reason", "too_large")
	emit(dropped, dropHelp, "counter", float64(n.unconfirmed.Load()), "reason", "unconfirmed")
	emit(dropped, dropHelp, "counter", float64(n.discarded.Load()), "reason", "discarded")
	emit(dropped, dropHelp, "counter", float64(n.missed.Load()), "reason", "no_subscriber")
	emit(dropped, dropHelp, "counter", float64(n.badHeaders.Load()), "reason", "bad_header")
	emit("sidecar_broker_nats_server_errors_total", "-ERR lines from NATS servers.", "counter", float64(n.serverErrs.Load()))
}

// appendPub appends the PUB (or, with headers, HPUB) of m to <prefix>.topic.
// hlen is natsHeaderLen(m.Header).
func appendPub(b []byte, prefix, topic string, m *Message, hlen int) []byte {
	if hlen == 0 {
		b = append(b, "PUB "...)
	} else {
		b = append(b, "HPUB "...)
	}
	b = append(b, prefix...)
	b = append(b, '.')
	b = append(b, topic...)
	b = append(b, ' ')
	if hlen > 0 {
		b = strconv.AppendInt(b, int64(hlen), 10)
		b = append(b, ' ')
	}
	b = strconv.AppendInt(b, int64(hlen+len(m.Body)), 10)
	b = append(b, "\r\n"...)
	if hlen > 0 {
		b = append(b, "NATS/1.0\r\n"...)
		for k, v := range m.Header {
			b = append(b, k...)
			b = append(b, ": "...)
			b = append(b, v...)
			b = append(b, "\r\n"...)
		}
		b = append(b, "\r\n"...)
	}
	b = append(b, m.Body...)
	return append(b, "\r\n"...)
}

// natsHeaderLen is the size of h's NATS header block, 0 without headers.
// A name that is not an HTTP token or a value with CR or LF cannot travel.
func natsHeaderLen(h map[string]string) (int, error) {
	if len(h) == 0 {
		return 0, nil
	}
	n := len("NATS/1.0\r\n") + 2
	for k, v := range h {
		if k == "" || strings.ContainsFunc(k, func(r rune) bool { return r <= ' ' || r == ':' || r >= 0x7f }) {
			return 0, fmt.Errorf("header name %q cannot travel as a NATS header", k)
		}
		if strings.ContainsAny(v, "\r\n") {
			return 0, fmt.Errorf("header %s: value holds CR or LF", k)
		}
		n += len(k) + 2 + len(v) + 2
	}
	return n, nil
}

// parseNATSHeaders decodes a header block ("NATS/1.0[ status]" CRLF,
// "Name: Value" CRLF lines, CRLF). Repeated names are joined with ", ", as
// messageHeader joins repeated request headers. A nil block (MSG) is nil.
func parseNATSHeaders(block []byte) (map[string]string, error) {
	if block == nil {
		return nil, nil
	}
	h := map[string]string{}
	line, rest, ok := bytes.Cut(block, []byte("\r\n"))
	if !ok || !bytes.HasPrefix(line, []byte("NATS/1.0")) {
		return nil, errors.New("header block does not start with NATS/1.0")
	}
	for len(rest) > 0 {
		line, rest, ok = bytes.Cut(rest, []byte("\r\n"))
		if !ok {
			return nil, errors.New("header line without CRLF")
		}
		if len(line) == 0 {
			continue // the blank line that ends the block
		}
		k, v, ok := bytes.Cut(line, []byte(":"))
		if !ok || len(k) == 0 {
			return nil, fmt.Errorf("header line %q has no name", line)
		}
		name := string(k)
		val := string(bytes.TrimSpace(v))
		if old, dup := h[name]; dup {
			val = old + ", " + val
		}
		h[name] = val
	}
	return h, nil
}

// appendSub appends the SUB of s.
func appendSub(b []byte, prefix string, s *natsSub) []byte {
	b = append(b, "SUB "...)
	b = append(b, prefix...)
	b = append(b, '.')
	b = append(b, s.topic...)
	b = append(b, ' ')
	if s.queue != "" {
		b = append(b, s.queue...)
		b = append(b, ' ')
	}
	b = strconv.AppendUint(b, s.sid, 10)
	return append(b, "\r\n"...)
}

// compactOut keeps the publishes of out, which this client wrote, that are
// at most max bytes, dropping control lines (SUB, UNSUB, PING, PONG: the
// next connection sends its own). It returns what it kept and dropped.
func compactOut(out []byte, max int64) (kept []byte, msgs, pubBytes, dropped int64) {
	kept = out[:0]
	for len(out) > 0 {
		i := bytes.Index(out, []byte("\r\n"))
		if i < 0 {
			break // cannot happen: out holds whole operations
		}
		line := out[:i]
		end := i + 2
		pub := bytes.HasPrefix(line, []byte("PUB ")) || bytes.HasPrefix(line, []byte("HPUB "))
		var size int64
		if pub {
			size, _ = strconv.ParseInt(string(line[bytes.LastIndexByte(line, ' ')+1:]), 10, 64)
			end += int(size) + 2
		}
		if end > len(out) {
			break
		}
		op := out[:end]
		out = out[end:]
		if !pub {
			continue
		}
		if size > max {
			dropped++
			continue
		}
		kept = append(kept, op...) // never ahead of the read position: copy is safe
		msgs++
		pubBytes += int64(len(op))
	}
	return kept, msgs, pubBytes, dropped
}

// natsOpKind names a server operation.
type natsOpKind int

const (
	natsOpInfo natsOpKind = iota + 1
	natsOpMsg
	natsOpPing
	natsOpPong
	natsOpOK
	natsOpErr
)

func (k natsOpKind) String() string {
	switch k {
	case natsOpInfo:
		return "INFO"
	case natsOpMsg:
		return "MSG"
	case natsOpPing:
		return "PING"
	case natsOpPong:
		return "PONG"
	case natsOpOK:
		return "+OK"
	case natsOpErr:
		return "-ERR"
	}
	return "unknown"
}

// natsOp is one operation from the server. subject, header and payload
// are valid until the next call of natsReader.next.
type natsOp struct {
	kind    natsOpKind
	subject []byte
	sid     uint64
	reply   []byte
	header  []byte // HMSG: the header block; nil for MSG
	payload []byte
	text    string   // -ERR
	info    natsInfo // INFO
}

// natsReader parses the server's side of the protocol from br.
type natsReader struct {
	br         *bufio.Reader
	maxPayload int // largest MSG/HMSG accepted; a larger one is a protocol error
	buf        []byte
	last       natsInfo
}

func newNATSReader(br *bufio.Reader) *natsReader {
	return &natsReader{br: br, maxPayload: natsDefaultMaxPayload}
}

func (r *natsReader) info() natsInfo { return r.last }

var errNATSProtocol = errors.New("nats: protocol error")

// next reads one operation. A malformed one is an error wrapping
// errNATSProtocol, after which the connection is not usable.
func (r *natsReader) next() (natsOp, error) {
	line, err := r.br.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return natsOp{}, fmt.Errorf("%w: line longer than %d bytes", errNATSProtocol, r.br.Size())
		}
		return natsOp{}, err
	}
	line = bytes.TrimRight(line, "\r\n")
	verb, args, _ := bytes.Cut(line, []byte(" "))
	if i := bytes.IndexByte(verb, '\t'); i >= 0 {
		verb, args = line[:i], line[i+1:]
	}
	args = bytes.TrimLeft(args, " \t")
	switch {
	case asciiEqualFold(verb, "MSG"):
		return r.readMsg(args, false)
	case asciiEqualFold(verb, "HMSG"):
		return r.readMsg(args, true)
	case asciiEqualFold(verb, "PING") && len(args) == 0:
		return natsOp{kind: natsOpPing}, nil
	case asciiEqualFold(verb, "PONG") && len(args) == 0:
		return natsOp{kind: natsOpPong}, nil
	case asciiEqualFold(verb, "+OK") && len(args) == 0:
		return natsOp{kind: natsOpOK}, nil
	case asciiEqualFold(verb, "-ERR"):
		text := strings.TrimSpace(string(args))
		return natsOp{kind: natsOpErr, text: text}, nil
	case asciiEqualFold(verb, "INFO"):
		var info natsInfo
		if err := json.Unmarshal(args, &info); err != nil {
			return natsOp{}, fmt.Errorf("%w: INFO: %v", errNATSProtocol, err)
		}
		r.last = info
		return natsOp{kind: natsOpInfo, info: info}, nil
	}
	return natsOp{}, fmt.Errorf("%w: unknown operation %q", errNATSProtocol, snippet(line))
}

// readMsg parses the arguments of MSG (<subject> <sid> [reply] <#bytes>)
// or HMSG (<subject> <sid> [reply] <#header> <#total>) and reads the
// payload and its CRLF.
func (r *natsReader) readMsg(args []byte, hdr bool) (natsOp, error) {
	var f [5][]byte
	nf := 0
	for len(args) > 0 {
		i := bytes.IndexAny(args, " \t")
		tok := args
		if i >= 0 {
			tok, args = args[:i], bytes.TrimLeft(args[i+1:], " \t")
		} else {
			args = nil
		}
		if nf == len(f) {
			return natsOp{}, fmt.Errorf("%w: too many MSG arguments", errNATSProtocol)
		}
		f[nf] = tok
		nf++
	}
	want := 3
	if hdr {
		want = 4
	}
	if nf != want && nf != want+1 {
		return natsOp{}, fmt.Errorf("%w: MSG with %d arguments", errNATSProtocol, nf)
	}
	op := natsOp{kind: natsOpMsg, subject: f[0]}
	sid, err := parseSize(f[1])
	if err != nil {
		return natsOp{}, fmt.Errorf("%w: MSG sid %q", errNATSProtocol, f[1])
	}
	op.sid = uint64(sid)
	if nf == want+1 {
		op.reply = f[2]
	}
	total, err := parseSize(f[nf-1])
	if err != nil {
		return natsOp{}, fmt.Errorf("%w: MSG size: %v", errNATSProtocol, err)
	}
	hsize := 0
	if hdr {
		if hsize, err = parseSize(f[nf-2]); err != nil || hsize > total || hsize < len("NATS/1.0\r\n\r\n") {
			return natsOp{}, fmt.Errorf("%w: HMSG header size %q of %d", errNATSProtocol, f[nf-2], total)
		}
	}
	if total > r.maxPayload {
		return natsOp{}, fmt.Errorf("%w: MSG of %d bytes, more than max_payload %d", errNATSProtocol, total, r.maxPayload)
	}
	// The subject and reply point into br's buffer, which the reads below
	// may overwrite: copy them (into the same scratch buffer).
	need := len(op.subject) + len(op.reply) + total + 2
	if cap(r.buf) < need {
		r.buf = make([]byte, need)
	}
	buf := r.buf[:need]
	n := copy(buf, op.subject)
	op.subject = buf[:n:n]
	m := copy(buf[n:], op.reply)
	op.reply = buf[n : n+m : n+m]
	body := buf[n+m:]
	if _, err := io.ReadFull(r.br, body); err != nil {
		return natsOp{}, err
	}
	if body[total] != '\r' || body[total+1] != '\n' {
		return natsOp{}, fmt.Errorf("%w: MSG payload not followed by CRLF", errNATSProtocol)
	}
	if hdr {
		op.header = body[:hsize:hsize]
	}
	op.payload = body[hsize:total:total]
	return op, nil
}

// parseSize parses a non-negative decimal of at most 9 digits (sizes, and
// sids, which this client numbers from 1).
func parseSize(b []byte) (int, error) {
	if len(b) == 0 || len(b) > 9 {
		return 0, fmt.Errorf("size %q", b)
	}
	n := 0
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("size %q", b)
		}
		n = n*10 + int(c-'0')
	}
	return n, nil
}

// nkeys: a user's nkey seed is the base32 (no padding) of two prefix bytes
// (seed, user), the 32-byte ed25519 seed and a little-endian CRC-16
// (XMODEM) of what precedes it; the public key U... is the base32 of the
// user prefix byte, the 32-byte public key and its CRC-16.
const (
	nkeyPrefixSeed = 18 << 3 // 'S'
	nkeyPrefixUser = 20 << 3 // 'U'
)

var nkeyBase32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// parseNKeySeedFile finds the user seed (a line starting with SU) in a
// seed or .creds file and returns its key pair.
func parseNKeySeedFile(data []byte) (ed25519.PrivateKey, string, error) {
	for line := range strings.Lines(string(data)) {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "SU") {
			return decodeNKeySeed(line)
		}
	}
	return nil, "", errors.New("no user nkey seed (a line starting with SU) in the file")
}

// decodeNKeySeed decodes a user seed (SU...) into its ed25519 key and the
// encoded public key (U...).
func decodeNKeySeed(seed string) (ed25519.PrivateKey, string, error) {
	raw, err := nkeyBase32.DecodeString(seed)
	if err != nil || len(raw) != 2+ed25519.SeedSize+2 {
		return nil, "", errors.New("not an nkey seed: bad base32 or length")
	}
	body, sum := raw[:len(raw)-2], uint16(raw[len(raw)-2])|uint16(raw[len(raw)-1])<<8
	if crc16(body) != sum {
		return nil, "", errors.New("not an nkey seed: checksum mismatch")
	}
	if raw[0]&0xf8 != nkeyPrefixSeed {
		return nil, "", errors.New("not an nkey seed (does not start with S)")
	}
	if kind := (raw[0]&7)<<5 | (raw[1]&0xf8)>>3; kind != nkeyPrefixUser {
		return nil, "", errors.New("not a user nkey seed (SU...)")
	}
	key := ed25519.NewKeyFromSeed(raw[2 : 2+ed25519.SeedSize])
	return key, encodeNKey(nkeyPrefixUser, key.Public().(ed25519.PublicKey)), nil
}

// encodeNKey encodes a public key with its prefix byte and CRC-16.
func encodeNKey(prefix byte, pub []byte) string {
	raw := append([]byte{prefix}, pub...)
	sum := crc16(raw)
	raw = append(raw, byte(sum), byte(sum>>8))
	return nkeyBase32.EncodeToString(raw)
}

// crc16 is CRC-16/XMODEM: polynomial 0x1021, initial value 0.
func crc16(data []byte) uint16 {
	var crc uint16
	for _, b := range data {
		crc ^= uint16(b) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}
