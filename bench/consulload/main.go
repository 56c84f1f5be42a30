// Consulload measures a sidecar running --registry consul against a Consul
// agent with many services (bench/consul.sh starts both).
//
//	consulload -consul 127.0.0.1:8500 -sidecar http://127.0.0.1:8081 -pid PID
//
// It registers -services services through Consul's own API (32 at once),
// each with one node at a JSON-RPC backend it serves itself, waits until
// the sidecar lists them all, then prints:
//
//   - memory: the sidecar's RSS (VmRSS of /proc/PID/status) and Go heap
//     (go_memstats_heap_alloc_bytes of /metrics) with every service known
//     and none held, then with -watch services looked up (held, and
//     watched as far as the sidecar's connection bound allows);
//   - cold: the time of a first /rpc call to each of -cold other services
//     never looked up before (the sidecar fetches the service from Consul,
//     then calls the backend), and of a second call to the same service
//     (warm);
//   - idle: the requests the sidecar sent Consul (sidecar_registry_requests_total)
//     and its CPU (utime+stime of /proc/PID/stat) over -idle with no calls.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sidecar/bench/internal/load"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	consul := flag.String("consul", "127.0.0.1:8500", "`host:port` of the Consul agent's HTTP API")
	sidecar := flag.String("sidecar", "http://127.0.0.1:8081", "base `URL` of the sidecar")
	pid := flag.Int("pid", 0, "sidecar process id, for RSS and CPU")
	services := flag.Int("services", 1000, "services to register in Consul")
	cold := flag.Int("cold", 200, "services called for the first time, one after the other")
	watch := flag.Int("watch", 64, "services looked up twice for the memory figure")
	idle := flag.Duration("idle", 30*time.Second, "window with no calls for the idle figures")
	flag.Parse()
	if *cold+*watch > *services {
		fatal(fmt.Errorf("-cold %d and -watch %d need at least %d services", *cold, *watch, *cold+*watch))
	}
	port, err := backend()
	if err != nil {
		fatal(err)
	}
	name := func(i int) string { return fmt.Sprintf("bench-%05d", i) }

	start := time.Now()
	if err := registerAll(*consul, *services, port, name); err != nil {
		fatal(err)
	}
	registered := time.Since(start)
	if err := waitListed(*sidecar, *services, time.Minute); err != nil {
		fatal(err)
	}
	fmt.Printf("setup: services=%d registered_in=%s listed_after=%s\n", *services, registered.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))

	m := metrics(*sidecar)
	fmt.Printf("memory known: services=%.0f held=%.0f watched=%.0f rss=%dKB heap=%.0fKB\n",
		m["sidecar_registry_services"], m["sidecar_registry_services_held"], m["sidecar_registry_services_watched"], rss(*pid), m["go_memstats_heap_alloc_bytes"]/1024)

	// Held and watched: -watch services looked up (each gets a watch while
	// the sidecar's connection bound has room for one).
	for i := range *watch {
		if _, err := call(*sidecar, name(i)); err != nil {
			fatal(err)
		}
	}
	m = metrics(*sidecar)
	fmt.Printf("memory in use: services=%.0f held=%.0f watched=%.0f blocking=%.0f rss=%dKB heap=%.0fKB connections=%.0f\n",
		m["sidecar_registry_services"], m["sidecar_registry_services_held"], m["sidecar_registry_services_watched"], m["sidecar_registry_blocking_queries"],
		rss(*pid), m["go_memstats_heap_alloc_bytes"]/1024, m["sidecar_registry_connections"])

	var colds, warms []time.Duration
	for i := range *cold {
		d, err := call(*sidecar, name(*watch+i))
		if err != nil {
			fatal(err)
		}
		w, err := call(*sidecar, name(*watch+i))
		if err != nil {
			fatal(err)
		}
		colds, warms = append(colds, d), append(warms, w)
	}
	fmt.Printf("cold first call: n=%d %s\n", len(colds), summary(colds))
	fmt.Printf("warm second call: n=%d %s\n", len(warms), summary(warms))
	m = metrics(*sidecar)
	fmt.Printf("after the calls: held=%.0f watched=%.0f connections=%.0f peak=%.0f requests=%.0f errors_429=%.0f\n",
		m["sidecar_registry_services_held"], m["sidecar_registry_services_watched"], m["sidecar_registry_connections"],
		m["sidecar_registry_connections_peak"], m["sidecar_registry_requests_total"], m[`sidecar_registry_errors_total{status="429"}`])

	before, cpu0 := m["sidecar_registry_requests_total"], ticks(*pid)
	time.Sleep(*idle)
	after, cpu1 := metrics(*sidecar)["sidecar_registry_requests_total"], ticks(*pid)
	hz := 100.0 // CLK_TCK on Linux
	fmt.Printf("idle: window=%s requests=%.0f rate=%.2f req/s cpu=%.2fs (%.2f%% of one core)\n",
		*idle, after-before, (after-before)/idle.Seconds(), float64(cpu1-cpu0)/hz, float64(cpu1-cpu0)/hz/idle.Seconds()*100)
}

// backend serves a JSON-RPC answer to every request and returns its port.
func backend() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			ID json.RawMessage `json:"id"`
		}
		json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req)
		if len(req.ID) == 0 {
			req.ID = json.RawMessage("null")
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":%s,"result":{},"error":null}`, req.ID)
	})}
	go srv.Serve(ln)
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// registerAll registers n services in Consul, 32 at once.
func registerAll(consul string, n, port int, name func(int) string) error {
	const workers = 32
	client := &http.Client{Transport: &http.Transport{MaxConnsPerHost: workers, MaxIdleConnsPerHost: workers}, Timeout: 30 * time.Second}
	defer client.CloseIdleConnections()
	jobs := make(chan int)
	errs := make(chan error, 1)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				body, _ := json.Marshal(map[string]any{"ID": name(i) + "-1", "Name": name(i), "Address": "127.0.0.1", "Port": port})
				req, _ := http.NewRequest("PUT", "http://"+consul+"/v1/agent/service/register", bytes.NewReader(body))
				resp, err := client.Do(req)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					select {
					case errs <- fmt.Errorf("register %s: %w", name(i), err):
					default:
					}
				}
			}
		}()
	}
	for i := range n {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

// waitListed waits until GET /registry on the sidecar lists n services
// besides consul.
func waitListed(sidecar string, n int, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		resp, err := http.Get(sidecar + "/registry")
		if err == nil {
			var list []struct{ Name string }
			json.NewDecoder(resp.Body).Decode(&list)
			resp.Body.Close()
			if len(list) >= n+1 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the sidecar did not list %d services within %s", n, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// call makes one /rpc call to service and returns how long it took.
func call(sidecar, service string) (time.Duration, error) {
	body := fmt.Sprintf(`{"service":%q,"endpoint":"Bench.Call","request":{}}`, service)
	start := time.Now()
	resp, err := http.Post(sidecar+"/rpc", "application/json", strings.NewReader(body))
	if err != nil {
		return 0, err
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	d := time.Since(start)
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("rpc %s = %d %s", service, resp.StatusCode, b)
	}
	return d, nil
}

func summary(ds []time.Duration) string {
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	q := func(p float64) time.Duration { return ds[int(p*float64(len(ds)-1))].Round(time.Microsecond) }
	return fmt.Sprintf("mean=%s p50=%s p90=%s p99=%s max=%s", (sum / time.Duration(len(ds))).Round(time.Microsecond), q(0.5), q(0.9), q(0.99), q(1))
}

// metrics reads the sidecar's /metrics samples without labels (and the
// labelled ones under their full series name).
func metrics(sidecar string) map[string]float64 {
	out := map[string]float64{}
	resp, err := http.Get(sidecar + "/metrics")
	if err != nil {
		fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// rss is the VmRSS of pid in KB; 0 without a pid.
func rss(pid int) int64 {
	kb, _ := load.StatusKB(pid, "VmRSS")
	return kb
}

// ticks is utime+stime of pid, in clock ticks; 0 without a pid.
func ticks(pid int) int64 {
	n, _ := load.CPUTicks(pid)
	return n
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "consulload:", err)
	os.Exit(1)
}
