// Brokerload measures a websocket pub/sub server: the sidecar's /broker or
// nats-server's websocket listener (the peer it is compared with).
//
//	brokerload -target sidecar -url ws://127.0.0.1:8081 -pid PID -mode fanout
//	brokerload -target nats    -url ws://127.0.0.1:8082 -pid PID -mode idle
//
// Mode fanout: 1 publisher, -subs subscribers, -msgs messages of -size
// bytes; it prints delivered messages/s and the server's CPU per delivery
// (utime+stime of /proc/PID/stat). The publisher keeps at most -window
// messages ahead of the subscribers, so neither server drops anyone. On
// both servers the publisher's own connection also receives every message
// (a sidecar websocket always subscribes its topic; the NATS publisher
// subscribes too) and that echo is not counted as a delivery.
//
// Mode idle: -subs subscribers that receive nothing; it prints the server's
// RSS growth per subscriber (VmRSS of /proc/PID/status).
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"sidecar/bench/internal/load"
	"strconv"
	"sync/atomic"
	"time"
)

func main() {
	target := flag.String("target", "sidecar", "server kind: sidecar or nats")
	url := flag.String("url", "ws://127.0.0.1:8081", "websocket base URL of the server")
	pid := flag.Int("pid", 0, "server process id, for CPU and RSS")
	mode := flag.String("mode", "fanout", "fanout or idle")
	subs := flag.Int("subs", 100, "subscribers")
	msgs := flag.Int("msgs", 100_000, "messages to publish (fanout)")
	size := flag.Int("size", 16, "message body bytes (fanout)")
	window := flag.Int("window", 500, "messages the publisher may be ahead of the subscribers")
	flag.Parse()
	if *target != "sidecar" && *target != "nats" {
		fatal(fmt.Errorf("-target %q: want sidecar or nats", *target))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var err error
	switch *mode {
	case "fanout":
		err = fanout(ctx, *target, *url, *pid, *subs, *msgs, *size, *window)
	case "idle":
		err = idle(ctx, *target, *url, *pid, *subs)
	default:
		err = fmt.Errorf("-mode %q: want fanout or idle", *mode)
	}
	if err != nil {
		fatal(err)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "brokerload:", err)
	os.Exit(1)
}

func fanout(ctx context.Context, target, url string, pid, nsubs, msgs, size, window int) error {
	var received atomic.Int64
	var conns []*client
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range nsubs {
		c, err := dial(ctx, target, url, "bench", func() { received.Add(1) })
		if err != nil {
			return err
		}
		conns = append(conns, c)
	}
	pub, err := dial(ctx, target, url, "bench", func() {})
	if err != nil {
		return err
	}
	conns = append(conns, pub)
	time.Sleep(500 * time.Millisecond) // let subscriptions settle

	body := bytes.Repeat([]byte("x"), size)
	want := int64(msgs) * int64(nsubs)
	cpu0, _ := load.CPUTicks(pid)
	start := time.Now()
	for i := range msgs {
		for received.Load() < int64(i-window)*int64(nsubs) {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("after %d of %d deliveries: %w", received.Load(), want, err)
			}
			time.Sleep(20 * time.Microsecond)
		}
		if err := pub.publish(body); err != nil {
			return err
		}
	}
	for received.Load() < want {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("after %d of %d deliveries: %w", received.Load(), want, err)
		}
		time.Sleep(100 * time.Microsecond)
	}
	elapsed := time.Since(start)
	cpu1, _ := load.CPUTicks(pid)
	cpuSec := float64(cpu1-cpu0) / 100 // USER_HZ is 100 on Linux
	fmt.Printf("%s fanout: subscribers=%d size=%dB messages=%d deliveries=%d time=%.2fs rate=%.0f deliveries/s cpu=%.2fs cpu_per_delivery=%.3fus\n",
		target, nsubs, size, msgs, want, elapsed.Seconds(), float64(want)/elapsed.Seconds(), cpuSec, cpuSec/float64(want)*1e6)
	return nil
}

func idle(ctx context.Context, target, url string, pid, nsubs int) error {
	rss0, err := load.StatusKB(pid, "VmRSS")
	if err != nil {
		return err
	}
	conns, err := load.DialAll(nsubs, func() (*client, error) { return dial(ctx, target, url, "idle", func() {}) })
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err != nil {
		return fmt.Errorf("dial %d subscribers: %w", nsubs, err)
	}
	time.Sleep(3 * time.Second) // let the server settle
	rss1, err := load.StatusKB(pid, "VmRSS")
	if err != nil {
		return err
	}
	fmt.Printf("%s idle: subscribers=%d rss_before=%dKB rss_after=%dKB per_subscriber=%.1fKB\n",
		target, nsubs, rss0, rss1, float64(rss1-rss0)/float64(nsubs))
	return nil
}

// client is one websocket connection that subscribes topic and counts the
// messages it receives; publish sends one message to topic.
type client struct {
	*load.Conn
	target string
	topic  string
}

func dial(ctx context.Context, target, base, topic string, onMsg func()) (*client, error) {
	path := "/broker?topic=" + topic
	if target == "nats" {
		path = "/"
	}
	conn, err := load.Dial(ctx, base, path, 64<<10)
	if err != nil {
		return nil, err
	}
	c := &client{Conn: conn, target: target, topic: topic}
	if target == "nats" {
		if err := c.natsHandshake(onMsg); err != nil {
			c.Close()
			return nil, err
		}
	} else {
		c.Read(func(bool, []byte) { onMsg() })
	}
	return c, nil
}

func (c *client) publish(body []byte) error {
	if c.target == "nats" {
		msg := make([]byte, 0, 32+len(body))
		msg = fmt.Appendf(msg, "PUB %s %d\r\n", c.topic, len(body))
		msg = append(msg, body...)
		msg = append(msg, "\r\n"...)
		return c.Write(load.OpBinary, msg)
	}
	return c.Write(load.OpText, body)
}

// natsHandshake speaks the NATS text protocol inside websocket frames:
// it sends CONNECT, SUB and PING after the server's INFO, and returns once
// PONG shows the subscription is in place. The reader then counts MSGs and
// answers the server's PINGs.
func (c *client) natsHandshake(onMsg func()) error {
	hello := fmt.Sprintf("CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":true}\r\nSUB %s 1\r\nPING\r\n", c.topic)
	if err := c.Write(load.OpBinary, []byte(hello)); err != nil {
		return err
	}
	ready := make(chan struct{})
	p := &natsParser{c: c, onMsg: onMsg, ready: ready}
	c.Read(func(_ bool, data []byte) { p.feed(data) })
	select {
	case <-ready:
		return nil
	case <-time.After(10 * time.Second):
		return errors.New("nats: no PONG after SUB")
	}
}

// natsParser follows the NATS protocol across frame boundaries.
type natsParser struct {
	c       *client
	onMsg   func()
	ready   chan struct{}
	pending []byte
	need    int // payload bytes (with CRLF) still to skip
}

func (p *natsParser) feed(data []byte) {
	for len(data) > 0 {
		if p.need > 0 {
			k := min(p.need, len(data))
			data, p.need = data[k:], p.need-k
			continue
		}
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			p.pending = append(p.pending, data...)
			return
		}
		line := data[:i+1]
		if len(p.pending) > 0 {
			line = append(p.pending, line...)
			p.pending = p.pending[:0]
		}
		data = data[i+1:]
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case bytes.HasPrefix(line, []byte("MSG ")):
			size, _ := strconv.Atoi(string(line[bytes.LastIndexByte(line, ' ')+1:]))
			p.need = size + 2
			p.onMsg()
		case string(line) == "PING":
			p.c.Write(load.OpBinary, []byte("PONG\r\n"))
		case string(line) == "PONG" && p.ready != nil:
			close(p.ready)
			p.ready = nil
		case bytes.HasPrefix(line, []byte("-ERR")):
			fmt.Fprintf(os.Stderr, "brokerload: nats: %s\n", line)
		}
	}
}
