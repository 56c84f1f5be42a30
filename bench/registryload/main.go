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
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sidecar/bench/internal/load"
	"slices"
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
	rss0, _ := load.StatusKB(pid, "VmRSS")
	var frames atomic.Int64 // data frames received by all watchers
	var target atomic.Int64 // when frames reaches it, the arrival time goes to arrived
	arrived := make(chan time.Time, 1)
	onFrame := func() {
		if frames.Add(1) == target.Load() {
			arrived <- time.Now()
		}
	}
	conns, err := load.DialAll(nwatch, func() (*load.Conn, error) { return dialWatch(ctx, base, onFrame) })
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err != nil {
		return fmt.Errorf("dial %d watchers: %w", nwatch, err)
	}
	rssWatch, _ := load.StatusKB(pid, "VmRSS")

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
	rssReg, _ := load.StatusKB(pid, "VmRSS")

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
	cpu0, _ := load.CPUTicks(pid)
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
	cpu1, _ := load.CPUTicks(pid)
	stopRenew()
	rwg.Wait()
	if renewErr != nil {
		return fmt.Errorf("renewal: %w", renewErr)
	}
	rssEnd, _ := load.StatusKB(pid, "VmRSS")
	hwm, _ := load.StatusKB(pid, "VmHWM")
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

// dialWatch opens one websocket watch of /registry that counts the
// messages it receives, skipping their payloads (a registration of many
// nodes is one large event, for every watcher).
func dialWatch(ctx context.Context, base string, onMessage func()) (*load.Conn, error) {
	c, err := load.Dial(ctx, base, "/registry", 4<<10)
	if err != nil {
		return nil, err
	}
	c.Count(func(fin bool) {
		if fin {
			onMessage()
		}
	})
	return c, nil
}
