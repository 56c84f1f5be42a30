package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// regBody is a registration of one node of service "bad" at addr:port.
func regBody(addr string, port int) string {
	a, _ := json.Marshal(addr)
	return fmt.Sprintf(`{"name":"bad","nodes":[{"id":"n1","address":%s,"port":%d}]}`, a, port)
}

// wantRegistryEmpty fails unless GET /registry lists no service.
func wantRegistryEmpty(t *testing.T, base string) {
	t.Helper()
	code, body := do(t, "GET", base+"/registry", "")
	if code != http.StatusOK || strings.TrimSpace(string(body)) != `[]` {
		t.Fatalf("GET /registry = %d %s, want [] (nothing registered)", code, body)
	}
}

// TestRegistryRefusesUncallableNodes: a node the sidecar could never call,
// or whose strings are not what was sent, is a JSON 400 that names the
// field, and nothing is registered.
func TestRegistryRefusesUncallableNodes(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	meta := func(k, v string) string {
		return `{"name":"bad","nodes":[{"id":"n1","address":"h","port":1,"metadata":{` + k + `:` + v + `}}]}`
	}
	many := map[string]string{}
	for i := range 65 {
		many[fmt.Sprint("k", i)] = "v"
	}
	manyJSON, _ := json.Marshal(many)
	tests := []struct {
		name, body, field string
	}{
		{"URL", regBody("http://evil/", 80), "nodes[0].address"},
		{"host with port", regBody("127.0.0.1:19001", 19001), "nodes[0].address"},
		{"header injection", regBody("127.0.0.1\r\nX: y", 80), "nodes[0].address"},
		{"userinfo", regBody("user@127.0.0.1", 80), "nodes[0].address"},
		{"path", regBody("127.0.0.1/x", 80), "nodes[0].address"},
		{"query", regBody("h?x=1", 80), "nodes[0].address"},
		{"trailing space", regBody("127.0.0.1 ", 80), "nodes[0].address"},
		{"non-ASCII host", regBody("höst", 80), "nodes[0].address"},
		{"not an IPv4 address", regBody("999.1.1.1", 80), "nodes[0].address"},
		{"empty label", regBody("a..b", 80), "nodes[0].address"},
		{"label starting with a dash", regBody("-a.b", 80), "nodes[0].address"},
		{"unclosed bracket", regBody("[::1", 80), "nodes[0].address"},
		{"bracketed IPv4", regBody("[127.0.0.1]", 80), "nodes[0].address"},
		{"bad IPv6", regBody("::g", 80), "nodes[0].address"},
		{"port zero, no port in address", regBody("127.0.0.1", 0), "nodes[0].port"},
		{"port zero, port zero in address", regBody("127.0.0.1:0", 0), "nodes[0].address"},
		{"port zero, URL in address", regBody("http://h:80", 0), "nodes[0].address"},
		{"negative port", regBody("127.0.0.1", -1), "nodes[0].port"},
		{"port above 65535", regBody("127.0.0.1", 70000), "nodes[0].port"},
		{"invalid UTF-8 id", "{\"name\":\"bad\",\"nodes\":[{\"id\":\"a\xff\",\"address\":\"h\",\"port\":1}]}", "nodes[0].id"},
		{"invalid UTF-8 name", "{\"name\":\"bad\xfe\",\"nodes\":[{\"id\":\"a\",\"address\":\"h\",\"port\":1}]}", "name"},
		{"lone surrogate in id", `{"name":"bad","nodes":[{"id":"a\ud800","address":"h","port":1}]}`, "nodes[0].id"},
		{"invalid UTF-8 version", "{\"name\":\"bad\",\"version\":\"1\xff\",\"nodes\":[{\"id\":\"a\",\"address\":\"h\",\"port\":1}]}", "version"},
		{"control character in version", `{"name":"bad","version":"1\n2","nodes":[{"id":"a","address":"h","port":1}]}`, "version"},
		{"long version", `{"name":"bad","version":"` + strings.Repeat("v", 256) + `","nodes":[{"id":"a","address":"h","port":1}]}`, "version"},
		{"invalid UTF-8 metadata value", meta(`"k"`, "\"v\xff\""), "nodes[0].metadata"},
		{"invalid UTF-8 metadata key", meta("\"k\xff\"", `"v"`), "nodes[0].metadata"},
		{"empty metadata key", meta(`""`, `"v"`), "nodes[0].metadata"},
		{"long metadata value", meta(`"k"`, `"`+strings.Repeat("v", 4097)+`"`), "nodes[0].metadata"},
		{"too many metadata entries", `{"name":"bad","metadata":` + string(manyJSON) + `,"nodes":[{"id":"a","address":"h","port":1}]}`, "metadata"},
		{"invalid UTF-8 endpoint", "{\"name\":\"bad\",\"endpoints\":[{\"name\":\"E\",\"request\":\"\xff\"}],\"nodes\":[{\"id\":\"a\",\"address\":\"h\",\"port\":1}]}", "endpoints[0]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body := do(t, "POST", ts.URL+"/registry", tt.body)
			e := wantError(t, "POST /registry "+tt.body, code, body, http.StatusBadRequest)
			if !strings.Contains(e.Detail, tt.field) {
				t.Errorf("POST /registry %s: detail %q does not name the field %s", tt.body, e.Detail, tt.field)
			}
		})
	}
	wantRegistryEmpty(t, ts.URL)
}

// TestRegistryInvalidUTF8IDsDoNotCollide: two ids that differ only in
// invalid bytes used to decode to the same string (each bad byte becomes
// U+FFFD), so the second registration silently replaced the first node.
func TestRegistryInvalidUTF8IDsDoNotCollide(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	for i, id := range []string{"node-\xff", "node-\xfe"} {
		body := fmt.Sprintf("{\"name\":\"utf\",\"nodes\":[{\"id\":\"%s\",\"address\":\"10.0.0.%d\",\"port\":80}]}", id, i+1)
		code, resp := do(t, "POST", ts.URL+"/registry", body)
		wantError(t, fmt.Sprintf("POST /registry id %q", id), code, resp, http.StatusBadRequest)
	}
	wantRegistryEmpty(t, ts.URL)
}

// TestRegistryAcceptsAddressForms: the forms a caller may use, and how
// they are stored (an IPv6 literal loses its brackets, since the port is
// a field of its own).
func TestRegistryAcceptsAddressForms(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	tests := []struct {
		addr string
		port int
		want string
	}{
		{"10.0.0.1", 80, "10.0.0.1"},
		{"2001:db8::1", 80, "2001:db8::1"},
		{"[2001:db8::2]", 80, "2001:db8::2"},
		{"fe80::1%eth0", 80, "fe80::1%eth0"},
		{"node-1.example.com", 80, "node-1.example.com"},
		{"example.com.", 80, "example.com."},
		{"my_host", 65535, "my_host"},
		{"10.0.0.2:8080", 0, "10.0.0.2:8080"}, // port 0: the address carries the port
		{"[2001:db8::3]:8080", 0, "[2001:db8::3]:8080"},
	}
	for i, tt := range tests {
		body := strings.Replace(regBody(tt.addr, tt.port), `"id":"n1"`, fmt.Sprintf(`"id":"n%d"`, i), 1)
		body = strings.Replace(body, `"name":"bad"`, `"name":"forms"`, 1)
		if code, resp := do(t, "POST", ts.URL+"/registry", body); code != http.StatusOK {
			t.Errorf("POST %s = %d %s, want 200", body, code, resp)
		}
	}
	_, svc := getService(t, ts.URL, "forms")
	if svc == nil {
		t.Fatal("service forms not registered")
	}
	got := map[string]string{}
	for _, n := range svc.Nodes {
		got[n.ID] = n.Address
	}
	for i, tt := range tests {
		if id := fmt.Sprint("n", i); got[id] != tt.want {
			t.Errorf("node %s registered with %q: stored %q, want %q", id, tt.addr, got[id], tt.want)
		}
	}
}

// TestRegistryUndecodableQuery: a query that cannot be decoded, or that
// names no valid service, is a 400 rather than the list of every service.
func TestRegistryUndecodableQuery(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	do(t, "POST", ts.URL+"/registry", seedService)
	for _, q := range []string{"?service=%zz", "?service=", "?service=a%20b", "?since=1", "?since=x"} {
		code, body := do(t, "GET", ts.URL+"/registry"+q, "")
		wantError(t, "GET /registry"+q, code, body, http.StatusBadRequest)
	}
	for _, q := range []string{"?service=%zz", "?since=-1", "?since=x"} {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, resp, err := dialWatchURL(ctx, ts.URL+"/registry"+q)
		cancel()
		if err == nil {
			c.CloseNow()
			t.Errorf("watch /registry%s: upgraded, want a 400", q)
			continue
		}
		if resp == nil || resp.StatusCode != http.StatusBadRequest {
			t.Errorf("watch /registry%s: %v (response %v), want a 400", q, err, resp)
		}
	}
}

// TestRegistryNodeVersionAlwaysPresent: README promises each node reports
// its version; one registered without a version says so with "".
func TestRegistryNodeVersionAlwaysPresent(t *testing.T) {
	t.Parallel()
	_, ts := newTestServer(t, nil)
	do(t, "POST", ts.URL+"/registry", seedService)
	_, body := do(t, "GET", ts.URL+"/registry?service=foo.bar", "")
	var raw struct {
		Nodes []map[string]json.RawMessage `json:"nodes"`
	}
	if err := json.Unmarshal(body, &raw); err != nil || len(raw.Nodes) != 1 {
		t.Fatalf("GET service = %s (%v), want one node", body, err)
	}
	if v, ok := raw.Nodes[0]["version"]; !ok || string(v) != `""` {
		t.Errorf("node %s: version = %s (present %v), want \"\"", body, v, ok)
	}
}

// TestRegistryRefusesOwnAddress: a node at the sidecar's own listen
// address would make every call to it come back here (a request loop).
func TestRegistryRefusesOwnAddress(t *testing.T) {
	t.Parallel()
	s, ts := newTestServer(t, nil)
	s.setAdvertise(ts.Listener.Addr())
	port := ts.Listener.Addr().(*net.TCPAddr).Port
	refused := []struct {
		addr string
		port int
	}{
		{"127.0.0.1", port},
		{"localhost", port},
		{"LocalHost.", port},
		{"0.0.0.0", port},
		{"::1", port},
		{"[::1]", port},
		{"::", port},
		{"::ffff:127.0.0.1", port},
		{fmt.Sprintf("127.0.0.1:%d", port), 0},
		{fmt.Sprintf("localhost:%d", port), 0},
	}
	for _, r := range refused {
		code, body := do(t, "POST", ts.URL+"/registry", regBody(r.addr, r.port))
		e := wantError(t, fmt.Sprintf("register %s port %d", r.addr, r.port), code, body, http.StatusBadRequest)
		if !strings.Contains(e.Detail, "own") || !strings.Contains(e.Detail, "nodes[0]") {
			t.Errorf("register %s port %d: detail %q, want it to say the node is the sidecar's own address", r.addr, r.port, e.Detail)
		}
	}
	wantRegistryEmpty(t, ts.URL)
	other := port + 1
	if other > 65535 {
		other = port - 1
	}
	if code, body := do(t, "POST", ts.URL+"/registry", regBody("127.0.0.1", other)); code != http.StatusOK {
		t.Errorf("register 127.0.0.1 port %d (not the sidecar's) = %d %s, want 200", other, code, body)
	}
}

// TestRunRefusesOwnServerAddress: --server_address at the sidecar's own
// --address registers the sidecar as the app; it stops at start-up with
// one line that says why.
func TestRunRefusesOwnServerAddress(t *testing.T) {
	t.Parallel()
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	err := run(ctx, []string{"--address", addr, "--server_name", "go.micro.srv.self", "--server_address", addr}, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "--server_address") || !strings.Contains(err.Error(), "own") {
		t.Fatalf("run with --server_address = --address = %s: %v, want an error about --server_address being its own address", addr, err)
	}
}

// TestRegistryRegistrationCaps: one registration holds at most
// --registry_max_nodes nodes (a 413 beyond it); nothing is registered.
func TestRegistryRegistrationCaps(t *testing.T) {
	t.Parallel()
	nodes := func(name string, n int) string {
		var b strings.Builder
		fmt.Fprintf(&b, `{"name":%q,"nodes":[`, name)
		for i := range n {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"id":"n%d","address":"10.0.0.1","port":80}`, i)
		}
		b.WriteString("]}")
		return b.String()
	}
	t.Run("default", func(t *testing.T) {
		_, ts := newTestServer(t, nil)
		code, body := do(t, "POST", ts.URL+"/registry", nodes("big", 10_001))
		e := wantError(t, "POST 10,001 nodes", code, body, http.StatusRequestEntityTooLarge)
		if !strings.Contains(e.Detail, "--registry_max_nodes") {
			t.Errorf("detail %q does not name --registry_max_nodes", e.Detail)
		}
		wantRegistryEmpty(t, ts.URL)
		if code, body := do(t, "POST", ts.URL+"/registry", nodes("big", 10_000)); code != http.StatusOK {
			t.Errorf("POST 10,000 nodes = %d %s, want 200", code, body)
		}
	})
	t.Run("flag", func(t *testing.T) {
		cfg := testConfig()
		cfg.RegistryMaxNodes = 3
		_, ts := newTestServer(t, cfg)
		code, body := do(t, "POST", ts.URL+"/registry", nodes("small", 4))
		wantError(t, "POST 4 nodes", code, body, http.StatusRequestEntityTooLarge)
		if code, body := do(t, "POST", ts.URL+"/registry", nodes("small", 3)); code != http.StatusOK {
			t.Errorf("POST 3 nodes = %d %s, want 200", code, body)
		}
	})
}

// TestRemoteInvalidNodesDropped: nodes from Consul pass the validation of
// a registration: the ones the sidecar could not call are dropped and
// counted, the others served.
func TestRemoteInvalidNodesDropped(t *testing.T) {
	consul := startConsul(t)
	instances := []struct {
		id, addr string
		port     int
	}{
		{"good", "10.0.0.1", 80},
		{"url", "http://evil/", 80},
		{"hostport", "127.0.0.1:19001", 19001},
		{"crlf", "127.0.0.1\r\nX: y", 80},
		{"userinfo", "user@127.0.0.1", 80},
		{"port0", "10.0.0.2", 0},
	}
	for _, in := range instances {
		reg := map[string]any{"ID": in.id, "Name": "mixed", "Address": in.addr, "Port": in.port}
		if code := consul.api("PUT", "/v1/agent/service/register", reg, nil); code != http.StatusOK {
			t.Fatalf("consul register %s = %d", in.id, code)
		}
	}
	_, base, _ := startSidecarAt(t, remoteConfig("consul", consul.http), "127.0.0.1:0")
	eventually(t, 15*time.Second, "mixed served with its valid node only", func() bool { return hasNodes(t, base, "mixed", "good") })
	if got := getMetrics(t, base)["sidecar_registry_remote_invalid_total"]; got < float64(len(instances)-1) {
		t.Errorf("sidecar_registry_remote_invalid_total = %v, want at least %d", got, len(instances)-1)
	}
}
