package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// consulOutage is how long Consul stays stopped in TestConsulAgent. The
// issue's figure is 30 s; set SIDECAR_CONSUL_OUTAGE=30s for that run.
const consulOutage = 3 * time.Second

// consulAgent is a `consul agent -dev` child process on free loopback ports.
type consulAgent struct {
	t     *testing.T
	bin   string
	args  []string
	http  string // host:port of the HTTP API
	cmd   *exec.Cmd
	waitc chan error
}

// startConsul starts a dev agent. Without a consul binary the test skips,
// or fails in CI (requireTool).
func startConsul(t *testing.T) *consulAgent {
	t.Helper()
	bin := requireTool(t, "consul")
	httpPort := freePort(t)
	a := &consulAgent{t: t, bin: bin, http: "127.0.0.1:" + strconv.Itoa(httpPort)}
	a.args = []string{"agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-log-level=warn",
		"-http-port=" + strconv.Itoa(httpPort), "-dns-port=-1", "-grpc-port=-1", "-grpc-tls-port=-1",
		"-serf-lan-port=" + strconv.Itoa(freePort(t)), "-serf-wan-port=" + strconv.Itoa(freePort(t)),
		"-server-port=" + strconv.Itoa(freePort(t))}
	a.start()
	t.Cleanup(a.stop)
	return a
}

func (a *consulAgent) start() {
	a.t.Helper()
	a.cmd = exec.Command(a.bin, a.args...)
	if testing.Verbose() {
		a.cmd.Stdout, a.cmd.Stderr = testWriter{a.t}, testWriter{a.t}
	}
	if err := a.cmd.Start(); err != nil {
		a.t.Fatalf("start consul: %v", err)
	}
	a.waitc = make(chan error, 1)
	go func(cmd *exec.Cmd, c chan error) { c <- cmd.Wait() }(a.cmd, a.waitc)
	eventually(a.t, 30*time.Second, "consul has a leader", func() bool {
		resp, err := http.Get("http://" + a.http + "/v1/status/leader")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var leader string
		return json.NewDecoder(resp.Body).Decode(&leader) == nil && leader != ""
	})
}

// stop ends the agent and waits for it; idempotent.
func (a *consulAgent) stop() {
	if a.cmd == nil {
		return
	}
	a.cmd.Process.Signal(os.Interrupt)
	select {
	case <-a.waitc:
	case <-time.After(10 * time.Second):
		a.cmd.Process.Kill()
		<-a.waitc
	}
	a.cmd = nil
}

// api calls Consul's HTTP API directly and decodes the answer into out.
func (a *consulAgent) api(method, path string, body any, out any) int {
	a.t.Helper()
	var rd bytes.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd.Reset(b)
	}
	req, _ := http.NewRequest(method, "http://"+a.http+path, &rd)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatalf("consul %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	if out != nil && resp.StatusCode == http.StatusOK {
		json.NewDecoder(resp.Body).Decode(out)
	}
	return resp.StatusCode
}

// passing returns the IDs of the passing instances of name in Consul.
func (a *consulAgent) passing(name string) []string {
	var entries []consulEntry
	a.api("GET", "/v1/health/service/"+name+"?passing=true", nil, &entries)
	var ids []string
	for _, e := range entries {
		ids = append(ids, e.Service.ID)
	}
	return ids
}

func TestConsulAgent(t *testing.T) {
	t.Parallel()
	consul := startConsul(t)
	outage := consulOutage
	if v := os.Getenv("SIDECAR_CONSUL_OUTAGE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("SIDECAR_CONSUL_OUTAGE=%q: %v", v, err)
		}
		outage = d
	}
	a, urlA, _ := startSidecarAt(t, remoteConfig("consul", consul.http), "127.0.0.1:0")
	b, urlB, _ := startSidecarAt(t, remoteConfig("consul", consul.http), "127.0.0.1:0")
	const wait = 15 * time.Second

	t.Run("register with TTL is in Consul and on B", func(t *testing.T) {
		registerNode(t, urlA, "5s", "greeter", "greeter-1")
		if got := consul.passing("greeter"); fmt.Sprint(got) != "[greeter-1]" {
			t.Fatalf("consul passing greeter = %v, want [greeter-1]", got)
		}
		eventually(t, wait, "greeter on B", func() bool { return hasNodes(t, urlB, "greeter", "greeter-1") })
		_, body := do(t, "GET", urlB+"/registry?service=greeter", "")
		var s Service
		json.Unmarshal(body, &s)
		if s.Version != "1.2" || s.Metadata["team"] != "x" || s.Nodes[0].Metadata["zone"] != "a" ||
			s.Nodes[0].Port != 9090 || s.Nodes[0].Address != "127.0.0.1" {
			t.Fatalf("B: greeter = %s, want version 1.2, team=x, zone=a, 127.0.0.1:9090", body)
		}
		// A heartbeat is a check pass, and keeps it alive past the TTL.
		registerNode(t, urlA, "5s", "greeter", "greeter-1")
	})

	t.Run("no heartbeat: gone from Consul and B", func(t *testing.T) {
		eventually(t, wait, "greeter not passing in consul", func() bool { return len(consul.passing("greeter")) == 0 })
		eventually(t, wait, "greeter gone on B", func() bool { return lookup(t, urlB, "greeter") == nil })
	})

	t.Run("DELETE removes it from Consul", func(t *testing.T) {
		registerNode(t, urlA, "", "deleted", "deleted-1")
		if code := consul.api("GET", "/v1/agent/service/deleted-1", nil, nil); code != http.StatusOK {
			t.Fatalf("consul agent service deleted-1 = %d, want 200", code)
		}
		deregisterNode(t, urlA, "deleted", "deleted-1")
		if code := consul.api("GET", "/v1/agent/service/deleted-1", nil, nil); code != http.StatusNotFound {
			t.Fatalf("consul agent service deleted-1 = %d after DELETE, want 404", code)
		}
		eventually(t, wait, "deleted gone on B", func() bool { return lookup(t, urlB, "deleted") == nil })
	})

	t.Run("service registered directly in Consul is visible", func(t *testing.T) {
		reg := map[string]any{"ID": "ext-1", "Name": "external", "Address": "127.0.0.2", "Port": 1234, "Meta": map[string]string{"version": "9", "owner": "ops"}}
		if code := consul.api("PUT", "/v1/agent/service/register", reg, nil); code != http.StatusOK {
			t.Fatalf("consul register external = %d", code)
		}
		eventually(t, wait, "external on B", func() bool { return hasNodes(t, urlB, "external", "ext-1") })
		_, body := do(t, "GET", urlB+"/registry?service=external", "")
		var s Service
		json.Unmarshal(body, &s)
		n := s.Nodes[0]
		if s.Version != "9" || n.Address != "127.0.0.2" || n.Port != 1234 || n.Metadata["owner"] != "ops" {
			t.Fatalf("B: external = %s, want version 9, 127.0.0.2:1234, owner=ops", body)
		}
	})

	t.Run("Consul down: cache serves; registrations come back", func(t *testing.T) {
		registerNode(t, urlA, "", "durable", "durable-1")
		eventually(t, wait, "durable on B", func() bool { return hasNodes(t, urlB, "durable", "durable-1") })
		consul.stop()
		eventually(t, wait, "A and B notice Consul is down", func() bool { return !cacheUp(a) && !cacheUp(b) })
		deadline := time.Now().Add(outage)
		for time.Now().Before(deadline) {
			for _, url := range []string{urlA, urlB} {
				for _, name := range []string{"durable", "external"} {
					if lookup(t, url, name) == nil {
						t.Fatalf("%s: %s not served from cache while Consul is down", url, name)
					}
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
		consul.start() // -dev: an empty agent
		eventually(t, wait, "durable re-sent to Consul", func() bool { return fmt.Sprint(consul.passing("durable")) == "[durable-1]" })
		eventually(t, wait, "external gone with the old agent", func() bool { return lookup(t, urlB, "external") == nil })
		eventually(t, wait, "durable back on B", func() bool { return hasNodes(t, urlB, "durable", "durable-1") })
	})
}

// TestConsulMapping checks what goes into Consul's Meta (within its limits)
// and that the sidecar tag brings everything back exactly.
func TestConsulMapping(t *testing.T) {
	t.Parallel()
	meta := map[string]string{
		"az":                                   "a",
		"bad key":                              "spaces are not allowed in Meta keys",
		"consul-reserved":                      "reserved prefix",
		"long":                                 string(bytes.Repeat([]byte("v"), 513)),
		"version":                              "a node key that collides with the version",
		string(bytes.Repeat([]byte("k"), 129)): "key too long",
	}
	for i := range 70 {
		meta[fmt.Sprintf("k%02d", i)] = "x"
	}
	svc := &Service{Name: "greeter", Version: "2.0", Metadata: map[string]string{"team": "x"},
		Endpoints: []*Endpoint{{Name: "Say.Hello", Request: json.RawMessage(`{"name":"string"}`)}}}
	node := &Node{ID: "g1", Address: "127.0.0.1", Port: 8080, Metadata: meta}
	b, err := newConsulBackend("127.0.0.1:1", "", remoteTiming{}, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	reg := b.consulBody(svc, node, 10*time.Second)

	if len(reg.Meta) > consulMaxMeta {
		t.Errorf("Meta has %d keys, want at most %d", len(reg.Meta), consulMaxMeta)
	}
	for k, v := range reg.Meta {
		if !consulMetaKeyOK(k) || len(v) > consulMaxMetaValue {
			t.Errorf("Meta[%q] = %d bytes: Consul refuses it", k, len(v))
		}
	}
	if reg.Meta["version"] != "2.0" || reg.Meta["az"] != "a" {
		t.Errorf("Meta version, az = %q, %q; want 2.0, a", reg.Meta["version"], reg.Meta["az"])
	}
	if reg.Check == nil || reg.Check.TTL != "10s" || reg.Check.DeregisterCriticalServiceAfter != "1m0s" || reg.Check.Status != "passing" {
		t.Errorf("Check = %+v, want TTL 10s, reap after 1m0s, passing", reg.Check)
	}
	if r := b.consulBody(svc, node, 0); r.Check != nil {
		t.Errorf("Check without TTL = %+v, want none", r.Check)
	}

	var e consulEntry
	e.Node.Address = "10.1.1.1"
	e.Service.ID, e.Service.Service, e.Service.Tags, e.Service.Meta = reg.ID, reg.Name, reg.Tags, reg.Meta
	e.Service.Address, e.Service.Port = reg.Address, reg.Port
	got := consulService("greeter", []consulEntry{e})
	n := got.Nodes[0]
	if got.Version != "2.0" || got.Metadata["team"] != "x" || len(got.Endpoints) != 1 || got.Endpoints[0].Name != "Say.Hello" ||
		string(got.Endpoints[0].Request) != `{"name":"string"}` || n.Address != "127.0.0.1" || n.Port != 8080 || n.Version != "2.0" || !mapsEqual(n.Metadata, meta) {
		t.Errorf("round trip = %+v node %+v, want the registration back", got, n)
	}

	// A service another tool registered: Meta is the node metadata, and the
	// Consul node's address stands in for an empty service address.
	var ext consulEntry
	ext.Node.Address = "10.1.1.1"
	ext.Service.ID, ext.Service.Port, ext.Service.Meta = "web-1", 80, map[string]string{"version": "7", "owner": "ops"}
	got = consulService("web", []consulEntry{ext})
	if n := got.Nodes[0]; got.Version != "7" || n.Address != "10.1.1.1" || n.Port != 80 || n.Metadata["owner"] != "ops" {
		t.Errorf("external = %+v node %+v, want version 7 at 10.1.1.1:80 with owner=ops", got, n)
	}
	if got := consulService("none", nil); got != nil {
		t.Errorf("no entries = %+v, want nil", got)
	}
}
