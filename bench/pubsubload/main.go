// Pubsubload measures pub/sub between two sidecars: one publisher on
// sidecar A, -subs subscribers on sidecar B, all websockets of one topic.
//
//	pubsubload -label nats -pub ws://A -sub ws://B -mode max  -msgs 100000
//	pubsubload -label nats -pub ws://A -sub ws://B -mode rate -rate 5000 -duration 10s
//
// Mode max: the publisher sends -msgs messages as fast as the subscribers
// take them (at most -window ahead of the slowest, so no queue overflows)
// and it prints messages/s: messages delivered to every subscriber per
// second. Mode rate: it publishes -rate messages/s for -duration and
// prints the latency from publish to delivery, p50/p99/max over every
// subscriber's every message. Each body starts with the send time (unix
// ns) and a sequence number; the publisher and the subscribers share the
// process, so one clock measures both ends. The publisher's websocket
// also receives each message (a sidecar websocket subscribes its topic);
// that echo is read and not counted.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	label := flag.String("label", "sidecar", "name printed with the results")
	pubURL := flag.String("pub", "ws://127.0.0.1:8081", "websocket base URL of sidecar A (publisher)")
	subURL := flag.String("sub", "ws://127.0.0.1:8082", "websocket base URL of sidecar B (subscribers)")
	nsubs := flag.Int("subs", 4, "subscribers on B")
	mode := flag.String("mode", "max", "max or rate")
	msgs := flag.Int("msgs", 100_000, "messages to publish (max)")
	rate := flag.Int("rate", 5000, "messages per second (rate)")
	duration := flag.Duration("duration", 10*time.Second, "how long to publish (rate)")
	size := flag.Int("size", 64, "message body bytes (at least 16)")
	window := flag.Int("window", 1000, "messages the publisher may be ahead of the slowest subscriber (max)")
	flag.Parse()
	if *size < 16 {
		*size = 16
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var err error
	switch *mode {
	case "max":
		err = maxRate(ctx, *label, *pubURL, *subURL, *nsubs, *msgs, *size, *window)
	case "rate":
		err = fixedRate(ctx, *label, *pubURL, *subURL, *nsubs, *rate, *duration, *size)
	default:
		err = fmt.Errorf("-mode %q: want max or rate", *mode)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "pubsubload:", err)
		os.Exit(1)
	}
}

// sub is one subscriber: how many messages it got and, in rate mode, the
// latency of each.
type sub struct {
	c         *client
	probes    atomic.Int64
	received  atomic.Int64
	mu        sync.Mutex // guards latencies
	latencies []time.Duration
}

// setup connects the subscribers and the publisher, then sends probes
// until every subscriber has one: the subscriptions have reached A (the
// registry for peer delivery, the NATS server otherwise).
func setup(ctx context.Context, pubURL, subURL string, nsubs int, record bool) (*client, []*sub, error) {
	var subs []*sub
	for range nsubs {
		s := &sub{}
		c, err := dial(ctx, subURL, "bench", func(p []byte) { s.onFrame(p, record) })
		if err != nil {
			return nil, nil, err
		}
		s.c = c
		subs = append(subs, s)
	}
	pub, err := dial(ctx, pubURL, "bench", func([]byte) {})
	if err != nil {
		return nil, nil, err
	}
	probe := make([]byte, 16) // time 0: not a measurement
	for {
		if err := pub.write(0x2, probe); err != nil {
			return nil, nil, err
		}
		ready := true
		for _, s := range subs {
			ready = ready && s.probes.Load() > 0
		}
		if ready {
			break
		}
		if ctx.Err() != nil {
			return nil, nil, fmt.Errorf("subscribers got no probe: %w", ctx.Err())
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // let the last probes drain
	for _, s := range subs {
		s.received.Store(0)
		s.mu.Lock()
		s.latencies = s.latencies[:0]
		s.mu.Unlock()
	}
	return pub, subs, nil
}

// onFrame counts a message and, with record, notes its latency.
func (s *sub) onFrame(p []byte, record bool) {
	sent := sendTime(p)
	if sent == 0 {
		s.probes.Add(1)
		return
	}
	s.received.Add(1)
	if record {
		d := time.Since(time.Unix(0, sent))
		s.mu.Lock()
		s.latencies = append(s.latencies, d)
		s.mu.Unlock()
	}
}

// sendTime reads the send time from a frame {"Header":{...},"Body":"<base64>"}.
func sendTime(p []byte) int64 {
	i := bytes.Index(p, []byte(`"Body":"`))
	if i < 0 || len(p) < i+8+12 {
		return 0
	}
	var b [9]byte
	if _, err := base64.StdEncoding.Decode(b[:], p[i+8:i+8+12]); err != nil {
		return 0
	}
	return int64(binary.BigEndian.Uint64(b[:8]))
}

func body(size int, seq int) []byte {
	b := make([]byte, size)
	binary.BigEndian.PutUint64(b, uint64(time.Now().UnixNano()))
	binary.BigEndian.PutUint64(b[8:], uint64(seq))
	return b
}

func closeAll(pub *client, subs []*sub) {
	if pub != nil {
		pub.close()
	}
	for _, s := range subs {
		s.c.close()
	}
}

func minReceived(subs []*sub) int64 {
	m := int64(-1)
	for _, s := range subs {
		if n := s.received.Load(); m < 0 || n < m {
			m = n
		}
	}
	return m
}

func maxRate(ctx context.Context, label, pubURL, subURL string, nsubs, msgs, size, window int) error {
	pub, subs, err := setup(ctx, pubURL, subURL, nsubs, false)
	if err != nil {
		return err
	}
	defer closeAll(pub, subs)
	start := time.Now()
	for i := range msgs {
		for minReceived(subs) < int64(i-window) {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("after %d of %d messages: %w", minReceived(subs), msgs, err)
			}
			time.Sleep(20 * time.Microsecond)
		}
		if err := pub.write(0x2, body(size, i+1)); err != nil {
			return err
		}
	}
	for minReceived(subs) < int64(msgs) {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("after %d of %d messages (some lost?): %w", minReceived(subs), msgs, err)
		}
		time.Sleep(100 * time.Microsecond)
	}
	elapsed := time.Since(start)
	fmt.Printf("%s max: subscribers=%d size=%dB messages=%d time=%.2fs rate=%.0f msgs/s deliveries=%.0f/s\n",
		label, nsubs, size, msgs, elapsed.Seconds(), float64(msgs)/elapsed.Seconds(), float64(msgs*nsubs)/elapsed.Seconds())
	return nil
}

func fixedRate(ctx context.Context, label, pubURL, subURL string, nsubs, rate int, duration time.Duration, size int) error {
	pub, subs, err := setup(ctx, pubURL, subURL, nsubs, true)
	if err != nil {
		return err
	}
	defer closeAll(pub, subs)
	total := int(float64(rate) * duration.Seconds())
	start := time.Now()
	sent := 0
	for sent < total {
		due := min(total, int(float64(rate)*time.Since(start).Seconds())+1)
		for ; sent < due; sent++ {
			if err := pub.write(0x2, body(size, sent+1)); err != nil {
				return err
			}
		}
		time.Sleep(100 * time.Microsecond)
	}
	sendTime := time.Since(start)
	deadline := time.Now().Add(10 * time.Second)
	for minReceived(subs) < int64(total) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	var all []time.Duration
	for _, s := range subs {
		s.mu.Lock()
		all = append(all, s.latencies...)
		s.mu.Unlock()
	}
	lost := total*nsubs - len(all)
	if len(all) == 0 {
		return fmt.Errorf("nothing delivered")
	}
	slices.Sort(all)
	q := func(p float64) float64 { return float64(all[int(p*float64(len(all)-1))]) / 1e6 }
	fmt.Printf("%s rate: subscribers=%d size=%dB rate=%d msgs/s (achieved %.0f) duration=%s deliveries=%d lost=%d latency p50=%.2fms p99=%.2fms max=%.2fms\n",
		label, nsubs, size, rate, float64(total)/sendTime.Seconds(), duration, len(all), lost, q(0.5), q(0.99), q(1))
	return nil
}

// client is one websocket connection subscribed to a topic of a sidecar
// (GET /broker?topic=T); write publishes a frame to it. It speaks RFC 6455
// itself, reading frames from a buffered connection, so that the load
// program costs little next to the sidecars it measures.
type client struct {
	nc  net.Conn
	br  *bufio.Reader
	wmu sync.Mutex // serializes frames written
	wg  sync.WaitGroup
}

func dial(ctx context.Context, base, topic string, onData func([]byte)) (*client, error) {
	u, err := neturl.Parse(base)
	if err != nil {
		return nil, err
	}
	path := "/broker?topic=" + topic
	d := net.Dialer{Timeout: 10 * time.Second}
	nc, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(nc, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", path, u.Host)
	c := &client{nc: nc, br: bufio.NewReaderSize(nc, 64<<10)}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		nc.Close()
		return nil, fmt.Errorf("handshake %s%s: %v %v", u.Host, path, resp, err)
	}
	nc.SetDeadline(time.Time{})
	c.wg.Go(func() { c.readFrames(onData) })
	return c, nil
}

func (c *client) close() {
	c.nc.Close()
	c.wg.Wait()
}

// readFrames calls onData with each data frame's payload (valid during
// the call) and answers pings, until the connection ends.
func (c *client) readFrames(onData func([]byte)) {
	var payload []byte
	for {
		h0, err := c.br.ReadByte()
		if err != nil {
			return
		}
		h1, err := c.br.ReadByte()
		if err != nil {
			return
		}
		n := int(h1 & 0x7f)
		switch n {
		case 126:
			b, err := c.br.Peek(2)
			if err != nil {
				return
			}
			n = int(binary.BigEndian.Uint16(b))
			c.br.Discard(2)
		case 127:
			b, err := c.br.Peek(8)
			if err != nil {
				return
			}
			n = int(binary.BigEndian.Uint64(b))
			c.br.Discard(8)
		}
		if cap(payload) < n {
			payload = make([]byte, n)
		}
		payload = payload[:n]
		if _, err := io.ReadFull(c.br, payload); err != nil {
			return
		}
		switch h0 & 0xf {
		case 0x0, 0x1, 0x2:
			onData(payload)
		case 0x8:
			if len(payload) >= 2 {
				fmt.Fprintf(os.Stderr, "pubsubload: closed by the sidecar: %d %s\n", binary.BigEndian.Uint16(payload), payload[2:])
			}
			return
		case 0x9:
			c.write(0xA, payload)
		}
	}
}

// write sends one masked frame with opcode op (mask key zero, which RFC
// 6455 allows a client that needs no protection from proxies).
func (c *client) write(op byte, p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	hdr := make([]byte, 0, 14+len(p))
	hdr = append(hdr, 0x80|op)
	switch {
	case len(p) < 126:
		hdr = append(hdr, 0x80|byte(len(p)))
	case len(p) <= 0xffff:
		hdr = append(hdr, 0x80|126, byte(len(p)>>8), byte(len(p)))
	default:
		hdr = append(hdr, 0x80|127)
		hdr = binary.BigEndian.AppendUint64(hdr, uint64(len(p)))
	}
	hdr = append(hdr, 0, 0, 0, 0)
	_, err := c.nc.Write(append(hdr, p...))
	return err
}
