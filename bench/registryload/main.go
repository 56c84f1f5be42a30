// Registryload measures the sidecar's registry watches: the server's
// memory with many watchers while a big service is registered and
// renewed, and the time from a change to the last watcher's event.
//
//	registryload -url http://127.0.0.1:8081 -pid PID -watchers 1000 -nodes 10000 -changes 200
//
// It opens -watchers websocket watches of GET /registry, registers one
// service of -nodes nodes (one request, TTL -ttl), which every watcher
// receives, then renews the nodes in requests of -batch nodes spread over
// -renew, and meanwhile makes -changes changes (a node added to the
// service, then removed), waiting for each to reach every watcher: the
// latency of a change is from just before its request is sent to the
// arrival of its event at the last watcher. It prints the server's RSS
// (VmRSS, and the peak VmHWM, of /proc/PID/status) and the latency
// quantiles.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	url := flag.String("url", "http://127.0.0.1:8081", "base URL of the sidecar")
	pid := flag.Int("pid", 0, "sidecar process id, for RSS")
	watchers := flag.Int("watchers", 1000, "websocket watches of /registry")
	nodes := flag.Int("nodes", 10_000, "nodes of the service")
	changes := flag.Int("changes", 200, "changes measured")
	batch := flag.Int("batch", 100, "nodes per renewal request")
	renew := flag.Duration("renew", 10*time.Second, "every node is renewed once per this interval")
	ttl := flag.Duration("ttl", 30*time.Second, "TTL of the registrations")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := run(ctx, *url, *pid, *watchers, *nodes, *changes, *batch, *renew, *ttl); err != nil {
		fmt.Fprintln(os.Stderr, "registryload:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, base string, pid, nwatch, nnodes, nchanges, batch int, renew, ttl time.Duration) error {
	rss0, _ := rssKB(pid, "VmRSS")
	var frames atomic.Int64 // data frames received by all watchers
	var target atomic.Int64 // when frames reaches it, the arrival time goes to arrived
	arrived := make(chan time.Time, 1)
	onFrame := func() {
		if frames.Add(1) == target.Load() {
			arrived <- time.Now()
		}
	}
	var mu sync.Mutex
	var conns []*watchConn
	defer func() {
		for _, c := range conns {
			c.close()
		}
	}()
	var firstErr error
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for range nwatch {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := dialWatch(ctx, base, onFrame)
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
		return fmt.Errorf("dial %d watchers: %w", nwatch, firstErr)
	}
	rssWatch, _ := rssKB(pid, "VmRSS")

	// The service, registered at once: every watcher gets all of it.
	all := make([]string, nnodes)
	for i := range all {
		all[i] = fmt.Sprintf(`{"id":"node-%05d","address":"10.%d.%d.%d","port":8080,"metadata":{"zone":"zone-%d"}}`, i, i>>16&255, i>>8&255, i&255, i%3)
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8}, Timeout: 30 * time.Second}
	register := func(nodes []string) error {
		body := `{"name":"bench","version":"1.0","nodes":[` + strings.Join(nodes, ",") + `]}`
		return post(ctx, client, "POST", base+"/registry?ttl="+ttl.String(), body)
	}
	start := time.Now()
	target.Store(int64(nwatch))
	if err := register(all); err != nil {
		return err
	}
	if _, err := wait(ctx, arrived, &frames, int64(nwatch)); err != nil {
		return fmt.Errorf("initial registration: %w", err)
	}
	fanout := time.Since(start)
	rssReg, _ := rssKB(pid, "VmRSS")

	// Renewals of every node, batch by batch, once per renew interval.
	rctx, stopRenew := context.WithCancel(ctx)
	var renewals atomic.Int64
	var renewErr error
	var rwg sync.WaitGroup
	rwg.Go(func() {
		batches := (nnodes + batch - 1) / batch
		t := time.NewTicker(renew / time.Duration(batches))
		defer t.Stop()
		for i := 0; ; i = (i + 1) % batches {
			select {
			case <-rctx.Done():
				return
			case <-t.C:
			}
			if err := register(all[i*batch : min((i+1)*batch, nnodes)]); err != nil {
				if rctx.Err() == nil {
					renewErr = err
				}
				return
			}
			renewals.Add(1)
		}
	})

	lat := make([]time.Duration, 0, nchanges)
	cpu0, _ := cpuTicks(pid)
	changing := time.Now()
	probe := `{"name":"bench","version":"1.0","nodes":[{"id":"probe","address":"10.255.255.1","port":8080,"metadata":{"zone":"zone-0"}}]}`
	for i := range nchanges {
		method := "POST"
		if i%2 == 1 {
			method = "DELETE"
		}
		want := int64(nwatch) * int64(i+2)
		target.Store(want)
		t0 := time.Now()
		if err := post(ctx, client, method, base+"/registry", probe); err != nil {
			stopRenew()
			rwg.Wait()
			return fmt.Errorf("change %d: %w", i, err)
		}
		t1, err := wait(ctx, arrived, &frames, want)
		if err != nil {
			stopRenew()
			rwg.Wait()
			return fmt.Errorf("change %d: %w", i, err)
		}
		lat = append(lat, t1.Sub(t0))
		time.Sleep(20 * time.Millisecond) // one change at a time
	}
	changeTime := time.Since(changing)
	cpu1, _ := cpuTicks(pid)
	stopRenew()
	rwg.Wait()
	if renewErr != nil {
		return fmt.Errorf("renewal: %w", renewErr)
	}
	rssEnd, _ := rssKB(pid, "VmRSS")
	hwm, _ := rssKB(pid, "VmHWM")
	if got := frames.Load(); got != int64(nwatch)*int64(nchanges+1) {
		return fmt.Errorf("watchers received %d frames, want %d: an event was lost or a renewal made one", got, int64(nwatch)*int64(nchanges+1))
	}
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))]) / 1e6 }
	fmt.Printf("registry watch: watchers=%d nodes=%d initial_fanout=%.2fs renewals=%d changes=%d latency_ms p50=%.2f p90=%.2f p99=%.2f max=%.2f\n",
		nwatch, nnodes, fanout.Seconds(), renewals.Load(), nchanges, q(0.5), q(0.9), q(0.99), q(1))
	// USER_HZ is 100 on Linux. The CPU includes the renewals made meanwhile.
	cpuSec := float64(cpu1-cpu0) / 100
	fmt.Printf("registry cpu: server %.2fs over %.1fs of changes: %.2fms per change, %.2fus per event and watcher\n",
		cpuSec, changeTime.Seconds(), cpuSec/float64(nchanges)*1e3, cpuSec/float64(nchanges)/float64(nwatch)*1e6)
	fmt.Printf("registry rss: start=%dKB watchers=%dKB registered=%dKB end=%dKB peak=%dKB\n", rss0, rssWatch, rssReg, rssEnd, hwm)
	return nil
}

// wait returns the time frames reached want, sent on arrived.
func wait(ctx context.Context, arrived chan time.Time, frames *atomic.Int64, want int64) (time.Time, error) {
	select {
	case t := <-arrived:
		return t, nil
	case <-ctx.Done():
		return time.Time{}, fmt.Errorf("after %d of %d frames: %w", frames.Load(), want, ctx.Err())
	case <-time.After(time.Minute):
		return time.Time{}, fmt.Errorf("after %d of %d frames: none for a minute", frames.Load(), want)
	}
}

func post(ctx context.Context, client *http.Client, method, url, body string) error {
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %d %s", method, url, resp.StatusCode, b)
	}
	return nil
}

// watchConn is one websocket watch of /registry that counts the data
// frames it receives. It speaks the websocket protocol (RFC 6455) itself,
// reading frames straight from a buffered connection and skipping their
// payloads, so that the load program costs little and the server, not the
// client, is measured.
type watchConn struct {
	nc net.Conn
	br *bufio.Reader
	wg sync.WaitGroup
}

func dialWatch(ctx context.Context, base string, onFrame func()) (*watchConn, error) {
	u, err := neturl.Parse(base)
	if err != nil {
		return nil, err
	}
	d := net.Dialer{Timeout: 10 * time.Second}
	nc, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(nc, "GET /registry HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", u.Host)
	c := &watchConn{nc: nc, br: bufio.NewReaderSize(nc, 4<<10)}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		nc.Close()
		return nil, fmt.Errorf("handshake %s: %v %v", u.Host, resp, err)
	}
	nc.SetDeadline(time.Time{})
	c.wg.Go(func() { c.readFrames(onFrame) })
	return c, nil
}

func (c *watchConn) close() {
	c.nc.Close()
	c.wg.Wait()
}

// readFrames counts each final data frame and answers pings, until the
// connection ends.
func (c *watchConn) readFrames(onFrame func()) {
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
		switch op := h0 & 0xf; {
		case op == 0x9: // ping: answer with the payload
			p := make([]byte, n)
			if _, err := io.ReadFull(c.br, p); err != nil {
				return
			}
			c.pong(p)
			continue
		case op == 0x8:
			return
		}
		if _, err := c.br.Discard(n); err != nil {
			return
		}
		if h0&0x80 != 0 && h0&0xf <= 0x2 {
			onFrame()
		}
	}
}

// pong sends a masked pong frame (mask key zero, which RFC 6455 allows).
func (c *watchConn) pong(p []byte) error {
	if len(p) > 125 {
		return errors.New("ping payload too long")
	}
	frame := append([]byte{0x8A, 0x80 | byte(len(p)), 0, 0, 0, 0}, p...)
	_, err := c.nc.Write(frame)
	return err
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

// rssKB returns a field of /proc/PID/status in KB (VmRSS, VmHWM).
func rssKB(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte(field+":")); ok {
			return strconv.ParseInt(string(bytes.Fields(v)[0]), 10, 64)
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}
