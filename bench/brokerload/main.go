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
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
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
			c.conn.CloseNow()
			c.wg.Wait()
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
	cpu0, _ := cpuTicks(pid)
	start := time.Now()
	for i := range msgs {
		for received.Load() < int64(i-window)*int64(nsubs) {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("after %d of %d deliveries: %w", received.Load(), want, err)
			}
			time.Sleep(20 * time.Microsecond)
		}
		if err := pub.publish(ctx, body); err != nil {
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
	cpu1, _ := cpuTicks(pid)
	cpuSec := float64(cpu1-cpu0) / 100 // USER_HZ is 100 on Linux
	fmt.Printf("%s fanout: subscribers=%d size=%dB messages=%d deliveries=%d time=%.2fs rate=%.0f deliveries/s cpu=%.2fs cpu_per_delivery=%.3fus\n",
		target, nsubs, size, msgs, want, elapsed.Seconds(), float64(want)/elapsed.Seconds(), cpuSec, cpuSec/float64(want)*1e6)
	return nil
}

func idle(ctx context.Context, target, url string, pid, nsubs int) error {
	rss0, err := rssKB(pid)
	if err != nil {
		return err
	}
	var mu sync.Mutex
	var conns []*client
	defer func() {
		for _, c := range conns {
			c.conn.CloseNow()
			c.wg.Wait()
		}
	}()
	var firstErr error
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for range nsubs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := dial(ctx, target, url, "idle", func() {})
			mu.Lock()
			defer mu.Unlock()
			if err != nil && firstErr == nil {
				firstErr = err
			}
			if c != nil {
				conns = append(conns, c)
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return fmt.Errorf("dial %d subscribers: %w", nsubs, firstErr)
	}
	time.Sleep(3 * time.Second) // let the server settle
	rss1, err := rssKB(pid)
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
	target string
	topic  string
	conn   *websocket.Conn
	wg     sync.WaitGroup // the reader
}

func dial(ctx context.Context, target, base, topic string, onMsg func()) (*client, error) {
	url := base + "/broker?topic=" + topic
	if target == "nats" {
		url = base
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(dctx, url, nil)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", url, err)
	}
	conn.SetReadLimit(1 << 20)
	c := &client{target: target, topic: topic, conn: conn}
	if target == "nats" {
		if err := c.natsHandshake(dctx, onMsg); err != nil {
			conn.CloseNow()
			return nil, err
		}
		return c, nil
	}
	c.wg.Go(func() { c.readSidecar(ctx, onMsg) })
	return c, nil
}

// readSidecar counts frames: each is one message.
func (c *client) readSidecar(ctx context.Context, onMsg func()) {
	buf := make([]byte, 4096)
	for {
		_, r, err := c.conn.Reader(ctx)
		if err != nil {
			return
		}
		for {
			_, err := r.Read(buf)
			if err == io.EOF {
				break
			}
			if err != nil {
				return
			}
		}
		onMsg()
	}
}

func (c *client) publish(ctx context.Context, body []byte) error {
	if c.target == "nats" {
		msg := make([]byte, 0, 32+len(body))
		msg = fmt.Appendf(msg, "PUB %s %d\r\n", c.topic, len(body))
		msg = append(msg, body...)
		msg = append(msg, "\r\n"...)
		return c.conn.Write(ctx, websocket.MessageBinary, msg)
	}
	return c.conn.Write(ctx, websocket.MessageText, body)
}

// natsHandshake speaks the NATS text protocol inside websocket frames:
// it reads INFO, sends CONNECT, SUB and PING, and returns once PONG shows
// the subscription is in place. A reader goroutine then counts MSGs and
// answers the server's PINGs.
func (c *client) natsHandshake(ctx context.Context, onMsg func()) error {
	_, info, err := c.conn.Read(ctx)
	if err != nil || !bytes.HasPrefix(info, []byte("INFO ")) {
		return fmt.Errorf("nats: want INFO, got %q: %v", info, err)
	}
	hello := fmt.Sprintf("CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":true}\r\nSUB %s 1\r\nPING\r\n", c.topic)
	if err := c.conn.Write(ctx, websocket.MessageBinary, []byte(hello)); err != nil {
		return err
	}
	ready := make(chan struct{})
	c.wg.Go(func() { c.readNATS(context.WithoutCancel(ctx), onMsg, ready) })
	select {
	case <-ready:
		return nil
	case <-ctx.Done():
		return errors.New("nats: no PONG after SUB")
	}
}

func (c *client) readNATS(ctx context.Context, onMsg func(), ready chan struct{}) {
	var pending []byte
	need := 0 // payload bytes (with CRLF) still to skip
	buf := make([]byte, 32<<10)
	for {
		_, r, err := c.conn.Reader(ctx)
		if err != nil {
			return
		}
		for {
			n, err := r.Read(buf)
			pending = append(pending, buf[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				return
			}
		}
		for len(pending) > 0 {
			if need > 0 {
				k := min(need, len(pending))
				pending, need = pending[k:], need-k
				continue
			}
			i := bytes.Index(pending, []byte("\r\n"))
			if i < 0 {
				break
			}
			line := string(pending[:i])
			pending = pending[i+2:]
			switch {
			case strings.HasPrefix(line, "MSG "):
				f := strings.Fields(line)
				size, _ := strconv.Atoi(f[len(f)-1])
				need = size + 2
				onMsg()
			case line == "PING":
				c.conn.Write(ctx, websocket.MessageBinary, []byte("PONG\r\n"))
			case line == "PONG" && ready != nil:
				close(ready)
				ready = nil
			case strings.HasPrefix(line, "-ERR"):
				fmt.Fprintln(os.Stderr, "brokerload: nats:", line)
			}
		}
		pending = append(pending[:0:0], pending...) // do not pin the old buffer
	}
}

// cpuTicks returns utime+stime of pid in clock ticks.
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the ")" closing the command name: state is field 3.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return ut + st, nil
}

// rssKB returns VmRSS of pid in KB.
func rssKB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}
