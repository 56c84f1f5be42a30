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
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"sidecar/bench/internal/load"
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
	c         *load.Conn
	probes    atomic.Int64
	received  atomic.Int64
	mu        sync.Mutex // guards latencies
	latencies []time.Duration
}

// setup connects the subscribers and the publisher, then sends probes
// until every subscriber has one: the subscriptions have reached A (the
// registry for peer delivery, the NATS server otherwise).
func setup(ctx context.Context, pubURL, subURL string, nsubs int, record bool) (*load.Conn, []*sub, error) {
	var subs []*sub
	for range nsubs {
		s := &sub{}
		c, err := load.Dial(ctx, subURL, "/broker?topic=bench", 64<<10)
		if err != nil {
			return nil, nil, err
		}
		c.Read(func(_ bool, p []byte) { s.onFrame(p, record) })
		s.c = c
		subs = append(subs, s)
	}
	pub, err := load.Dial(ctx, pubURL, "/broker?topic=bench", 64<<10)
	if err != nil {
		return nil, nil, err
	}
	pub.Read(func(bool, []byte) {}) // the echo of each publish
	probe := make([]byte, 16)       // time 0: not a measurement
	for {
		if err := pub.Write(load.OpBinary, probe); err != nil {
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

func closeAll(pub *load.Conn, subs []*sub) {
	if pub != nil {
		pub.Close()
	}
	for _, s := range subs {
		s.c.Close()
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
		if err := pub.Write(load.OpBinary, body(size, i+1)); err != nil {
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
			if err := pub.Write(load.OpBinary, body(size, sent+1)); err != nil {
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
