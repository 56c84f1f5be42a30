package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestCLICommandIndex(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args []string
		want int
	}{
		{nil, -1},
		{[]string{"--address", ":0"}, -1},
		{[]string{"--address=:0", "list", "services"}, -1}, // a sidecar flag: the sidecar reports the stray argument
		{[]string{"--server_name", "health", "--server_address", "127.0.0.1:1"}, -1},
		{[]string{"--enable_stats"}, -1},
		{[]string{"--auth_token", "list"}, -1}, // "list" is the token
		{[]string{"list", "services"}, 0},
		{[]string{"--proxy_address", "127.0.0.1:1", "list", "services"}, 2},
		{[]string{"-proxy_address=127.0.0.1:1", "list", "services"}, 1},
		{[]string{"--json", "get", "service", "x"}, 1},
		{[]string{"--json=true", "--timeout", "1s", "stats"}, 3},
		{[]string{"--help", "call"}, 1},
		{[]string{"frobnicate"}, 0},
		{[]string{"--", "list"}, 1},
	}
	for _, tt := range tests {
		if got := cliCommandIndex(tt.args); got != tt.want {
			t.Errorf("cliCommandIndex(%q) = %d, want %d", tt.args, got, tt.want)
		}
	}
}

func TestIsCLI(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args []string
		want bool
	}{
		{nil, false},
		{[]string{"--address", ":0", "--enable_stats"}, false},
		{[]string{"--auth_token", "t"}, false}, // the sidecar's flag too
		{[]string{"--proxy_address", "h:1"}, true},
		{[]string{"--json"}, true},
		{[]string{"stats"}, true},
		{[]string{"--help"}, false},
	}
	for _, tt := range tests {
		if got := isCLI(tt.args); got != tt.want {
			t.Errorf("isCLI(%q) = %v, want %v", tt.args, got, tt.want)
		}
	}
}

func TestParseProxyAddress(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in, want string // want "" means an error
	}{
		{"http://127.0.0.1:8081", "http://127.0.0.1:8081"},
		{"127.0.0.1:8081", "http://127.0.0.1:8081"},
		{":8081", "http://127.0.0.1:8081"},
		{"localhost:8081", "http://localhost:8081"},
		{"https://sidecar.example/", "https://sidecar.example"},
		{"https://sidecar.example/prefix/", "https://sidecar.example/prefix"},
		{"ws://[::1]:8081", "http://[::1]:8081"},
		{"wss://h:1", "https://h:1"},
		{"", ""},
		{"ftp://h:1", ""},
		{"http://", ""},
		{"http://user:pw@h:1", ""},
		{"http://h:1/?q=1", ""},
		{"http://h:port", ""},
	}
	for _, tt := range tests {
		u, err := parseProxyAddress(tt.in)
		switch {
		case tt.want == "" && err == nil:
			t.Errorf("parseProxyAddress(%q) = %s, want an error", tt.in, u)
		case tt.want == "" && !strings.Contains(err.Error(), "--proxy_address"):
			t.Errorf("parseProxyAddress(%q) error %q does not name the flag", tt.in, err)
		case tt.want != "" && err != nil:
			t.Errorf("parseProxyAddress(%q) = %v, want %s", tt.in, err, tt.want)
		case tt.want != "" && u.String() != tt.want:
			t.Errorf("parseProxyAddress(%q) = %s, want %s", tt.in, u, tt.want)
		}
	}
}

func TestCLIHelp(t *testing.T) {
	t.Parallel()
	var out, errOut bytes.Buffer
	if err := run(context.Background(), []string{"help"}, &out, &errOut); err != nil {
		t.Fatalf("run(help) = %v", err)
	}
	for _, want := range []string{"list services", "get service NAME", "register service", "deregister service",
		"call SERVICE METHOD", "publish TOPIC", "subscribe TOPIC", "health SERVICE", "stats", "-proxy_address", "Examples:"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("sidecar help lacks %q:\n%s", want, out.String())
		}
	}
	for _, args := range [][]string{{"call", "--help"}, {"query", "-h"}, {"help", "call"}} {
		out.Reset()
		err := run(context.Background(), args, &out, &errOut)
		if err != nil && !errors.Is(err, flag.ErrHelp) {
			t.Fatalf("run(%q) = %v, want help", args, err)
		}
		for _, want := range []string{"Usage: sidecar call SERVICE METHOD", "Examples:", "sidecar call go.micro.srv.greeter Say.Hello", "-timeout"} {
			if !strings.Contains(out.String(), want) {
				t.Errorf("run(%q) output lacks %q:\n%s", args, want, out.String())
			}
		}
	}
	out.Reset()
	if err := run(context.Background(), []string{"subscribe", "--help"}, &out, &errOut); !errors.Is(err, flag.ErrHelp) || !strings.Contains(out.String(), "-queue") {
		t.Errorf("subscribe --help = %v, output lacks -queue:\n%s", err, out.String())
	}
	if errOut.Len() > 0 {
		t.Errorf("help wrote to stderr: %s", errOut.String())
	}
}

// cliResult is what one run of the client binary did.
type cliResult struct {
	stdout, stderr string
	code           int
}

// cliEnv is the environment of client processes: the test's without any
// MICRO_ variable, plus env.
func cliEnv(env ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MICRO_") {
			out = append(out, kv)
		}
	}
	return append(out, env...)
}

// runClient runs the built binary with args and stdin, and the extra
// environment env ("K=V").
func runClient(t *testing.T, stdin string, env []string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, sidecarBinary(t), args...)
	cmd.Env = cliEnv(env...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := cliResult{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		t.Fatalf("sidecar %q: %v", args, err)
	}
	return r
}

// wantOK checks that the client succeeded and wrote nothing to stderr.
func wantOK(t *testing.T, r cliResult, args ...string) {
	t.Helper()
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("sidecar %q: exit %d, stderr %q, stdout %q; want success", args, r.code, r.stderr, r.stdout)
	}
}

// wantFailure checks that the client failed with exactly one line on
// stderr that contains want, and no stack trace.
func wantFailure(t *testing.T, r cliResult, want string, args ...string) {
	t.Helper()
	lines := strings.Split(strings.TrimRight(r.stderr, "\n"), "\n")
	switch {
	case r.code == 0:
		t.Errorf("sidecar %q: exit 0, stdout %q; want failure", args, r.stdout)
	case len(lines) != 1 || lines[0] == "":
		t.Errorf("sidecar %q: stderr %q, want exactly one line", args, r.stderr)
	case strings.Contains(r.stderr, "goroutine") || strings.Contains(r.stderr, "panic"):
		t.Errorf("sidecar %q: stderr holds a stack trace: %q", args, r.stderr)
	case !strings.Contains(r.stderr, want):
		t.Errorf("sidecar %q: stderr %q, want it to contain %q", args, r.stderr, want)
	}
}

// newGreeter starts a JSON-RPC backend speaking the wire protocol of the
// spec: POST / with {"method","params":[req],"id"}, reply {"id","result",
// "error"}. Say.Hello answers {"msg":"Hello NAME"}; other methods fail.
func newGreeter(t *testing.T) (host string, port int) {
	t.Helper()
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Method string            `json:"method"`
			Params []json.RawMessage `json:"params"`
			ID     any               `json:"id"`
		}
		if r.Method != http.MethodPost || r.URL.Path != "/" || json.NewDecoder(r.Body).Decode(&req) != nil || len(req.Params) != 1 {
			http.Error(w, "want a JSON-RPC POST /", http.StatusBadRequest)
			return
		}
		rep := map[string]any{"id": req.ID, "result": nil, "error": nil}
		var in struct{ Name string }
		switch {
		case req.Method != "Say.Hello":
			rep["error"] = "unknown method " + req.Method
		case json.Unmarshal(req.Params[0], &in) != nil:
			rep["error"] = "bad request"
		default:
			rep["result"] = map[string]string{"msg": "Hello " + in.Name}
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(rep)
	}))
	t.Cleanup(ts.Close)
	h, p, err := splitHostPort(strings.TrimPrefix(ts.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	return h, p
}

func serviceJSON(name, id, host string, port int) string {
	return fmt.Sprintf(`{"name":%q,"version":"1.0.0","nodes":[{"id":%q,"address":%q,"port":%d,"metadata":{"protocol":"json-rpc"}}],"endpoints":[{"name":"Say.Hello"}]}`,
		name, id, host, port)
}

// closedPort returns a loopback port with no listener.
func closedPort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return port
}

func TestCLIRegistry(t *testing.T) {
	t.Parallel()
	_, url, _ := startBinary(t)
	host, port := newGreeter(t)
	const name = "go.micro.srv.greeter"
	svc := serviceJSON(name, "greeter-1", host, port)

	args := []string{"register", "service", svc, "--proxy_address", url}
	r := runClient(t, "", nil, args...)
	wantOK(t, r, args...)
	if r.stdout != "registered go.micro.srv.greeter (1 node)\n" {
		t.Errorf("register output = %q", r.stdout)
	}

	// Flags before the command, after it, and from the environment (a
	// bare host:port).
	for _, tt := range []struct {
		env  []string
		args []string
	}{
		{nil, []string{"--proxy_address", url, "list", "services"}},
		{nil, []string{"list", "services", "--proxy_address=" + url}},
		{[]string{"MICRO_PROXY_ADDRESS=" + strings.TrimPrefix(url, "http://")}, []string{"list", "services"}},
	} {
		r := runClient(t, "", tt.env, tt.args...)
		wantOK(t, r, tt.args...)
		if r.stdout != name+"\n" {
			t.Errorf("sidecar %q (env %q) = %q, want %q", tt.args, tt.env, r.stdout, name+"\n")
		}
	}
	r = runClient(t, "", nil, "list", "services", "--json", "--proxy_address", url)
	if r.code != 0 || strings.TrimSpace(r.stdout) != `[{"name":"go.micro.srv.greeter"}]` {
		t.Errorf("list services --json = %d %q", r.code, r.stdout)
	}

	args = []string{"get", "service", name, "--proxy_address", url}
	r = runClient(t, "", nil, args...)
	wantOK(t, r, args...)
	lines := strings.Split(r.stdout, "\n")
	var header, row string
	for i, l := range lines {
		if strings.HasPrefix(l, "ID ") && i+1 < len(lines) {
			header, row = l, lines[i+1]
		}
	}
	wantRow := []string{"greeter-1", host, strconv.Itoa(port), "protocol=json-rpc"}
	switch {
	case lines[0] != "service  "+name || !strings.Contains(r.stdout, "\nversion  1.0.0\n") || !strings.Contains(r.stdout, "Endpoint: Say.Hello"):
		t.Errorf("get service output lacks the name, version or endpoint:\n%s", r.stdout)
	case strings.Join(strings.Fields(header), " ") != "ID Address Port Metadata" || strings.Join(strings.Fields(row), " ") != strings.Join(wantRow, " "):
		t.Errorf("get service table = %q / %q, want ID Address Port Metadata / %q", header, row, wantRow)
	case strings.Index(header, "Address") != strings.Index(row, host) || strings.Index(header, "Metadata") != strings.Index(row, "protocol="):
		t.Errorf("get service columns are not aligned:\n%s\n%s", header, row)
	}

	r = runClient(t, "", nil, "get", "service", name, "--json", "--proxy_address", url)
	var got Service
	if err := json.Unmarshal([]byte(r.stdout), &got); r.code != 0 || err != nil || got.Name != name || len(got.Nodes) != 1 || got.Nodes[0].Port != port {
		t.Errorf("get service --json = %d %q (%v), want the service", r.code, r.stdout, err)
	}

	// health: the one node answers.
	args = []string{"health", name, "--proxy_address", url}
	r = runClient(t, "", nil, args...)
	wantOK(t, r, args...)
	if !strings.Contains(r.stdout, "sidecar  "+url+"  ok") || !regexpLine(r.stdout, "greeter-1", "up") {
		t.Errorf("health output:\n%s\nwant the sidecar ok and greeter-1 up", r.stdout)
	}

	// A second node, from stdin with a TTL, on a port nobody listens on.
	dead := serviceJSON(name, "greeter-dead", "127.0.0.1", closedPort(t))
	args = []string{"register", "service", "-", "--ttl", "1m", "--proxy_address", url}
	wantOK(t, runClient(t, dead, nil, args...), args...)
	args = []string{"health", name, "--proxy_address", url}
	r = runClient(t, "", nil, args...)
	wantFailure(t, r, "1 of 2 nodes do not answer", args...)
	if !regexpLine(r.stdout, "greeter-1", "up") || !regexpLine(r.stdout, "greeter-dead", "down") {
		t.Errorf("health output:\n%s\nwant greeter-1 up and greeter-dead down", r.stdout)
	}
	r = runClient(t, "", nil, "health", name, "--json", "--proxy_address", url)
	var hj struct {
		Sidecar struct{ Status string }
		Nodes   []nodeHealth
	}
	if err := json.Unmarshal([]byte(r.stdout), &hj); err != nil || hj.Sidecar.Status != "ok" || len(hj.Nodes) != 2 || r.code == 0 {
		t.Errorf("health --json = %d %q (%v), want 2 nodes and failure", r.code, r.stdout, err)
	}

	for _, id := range []string{"greeter-1", "greeter-dead"} {
		args = []string{"deregister", "service", fmt.Sprintf(`{"name":%q,"nodes":[{"id":%q}]}`, name, id), "--proxy_address", url}
		r = runClient(t, "", nil, args...)
		wantOK(t, r, args...)
		if r.stdout != "deregistered go.micro.srv.greeter (1 node)\n" {
			t.Errorf("deregister output = %q", r.stdout)
		}
	}
	args = []string{"get", "service", name, "--proxy_address", url}
	wantFailure(t, runClient(t, "", nil, args...), `service "go.micro.srv.greeter" not found (404 Not Found)`, args...)
	r = runClient(t, "", nil, "list", "services", "--proxy_address", url)
	if r.code != 0 || r.stdout != "" {
		t.Errorf("list services after deregistering = %d %q, want nothing", r.code, r.stdout)
	}
}

// regexpLine reports whether some line of out holds every word, in order.
func regexpLine(out string, words ...string) bool {
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		i := 0
		for _, w := range f {
			if i < len(words) && w == words[i] {
				i++
			}
		}
		if i == len(words) {
			return true
		}
	}
	return false
}

func TestCLICall(t *testing.T) {
	t.Parallel()
	_, url, _ := startBinary(t)
	host, port := newGreeter(t)
	const name = "go.micro.srv.greeter"
	args := []string{"register", "service", serviceJSON(name, "greeter-1", host, port), "--proxy_address", url}
	wantOK(t, runClient(t, "", nil, args...), args...)

	tests := []struct {
		stdin string
		args  []string
		want  string
	}{
		{"", []string{"call", name, "Say.Hello", `{"name": "John"}`}, "{\n  \"msg\": \"Hello John\"\n}\n"},
		{`{"name": "Jane"}`, []string{"query", name, "Say.Hello", "-"}, "{\n  \"msg\": \"Hello Jane\"\n}\n"},
		{"", []string{"call", name, "Say.Hello", `{"name": "Raw"}`, "--json"}, `{"msg":"Hello Raw"}` + "\n"},
		{"", []string{"call", name, "Say.Hello"}, "{\n  \"msg\": \"Hello \"\n}\n"},
	}
	for _, tt := range tests {
		args := append(tt.args, "--proxy_address", url)
		r := runClient(t, tt.stdin, nil, args...)
		wantOK(t, r, args...)
		if r.stdout != tt.want {
			t.Errorf("sidecar %q = %q, want %q", args, r.stdout, tt.want)
		}
	}

	failures := []struct {
		args []string
		want string
	}{
		{[]string{"call", "go.micro.srv.nope", "Say.Hello", "{}"}, "go.micro.srv.nope"},
		{[]string{"call", name, "Say.Goodbye", "{}"}, "unknown method Say.Goodbye"},
		{[]string{"call", name, "Say.Hello", `{"name": `}, "the request argument is not valid JSON"},
	}
	for _, tt := range failures {
		args := append(tt.args, "--proxy_address", url)
		wantFailure(t, runClient(t, "", nil, args...), tt.want, args...)
	}
}

// subProcess is a running `sidecar subscribe` process.
type subProcess struct {
	cmd        *exec.Cmd
	lines      chan string // stdout, line by line; closed at EOF
	stderr     syncBuffer  // what followed the "subscribed" line
	stderrDone chan struct{}
}

// startSubscriber runs `sidecar subscribe args...` and waits until it says
// on stderr that it is subscribed.
func startSubscriber(t *testing.T, env []string, args ...string) *subProcess {
	t.Helper()
	cmd := exec.Command(sidecarBinary(t), append([]string{"subscribe"}, args...)...)
	cmd.Env = cliEnv(env...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	s := &subProcess{cmd: cmd, lines: make(chan string, 16), stderrDone: make(chan struct{})}
	go func() { // ends when the process's stdout closes
		defer close(s.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
	}()
	first := make(chan string, 1)
	go func() { // ends when the process's stderr closes
		defer close(s.stderrDone)
		br := bufio.NewReader(stderr)
		line, _ := br.ReadString('\n')
		first <- line
		io.Copy(&s.stderr, br)
	}()
	select {
	case line := <-first:
		if !strings.HasPrefix(line, "subscribed to ") {
			t.Fatalf("sidecar subscribe %q: first stderr line %q, want \"subscribed to ...\"", args, line)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("sidecar subscribe %q: not subscribed after 10s", args)
	}
	return s
}

// next returns the next line the subscriber printed.
func (s *subProcess) next(t *testing.T) string {
	t.Helper()
	select {
	case line, ok := <-s.lines:
		if !ok {
			t.Fatal("subscriber's stdout closed before the message")
		}
		return line
	case <-time.After(10 * time.Second):
		t.Fatal("no message on the subscriber's stdout after 10s")
	}
	return ""
}

// interrupt sends SIGINT and wants exit status 0.
func (s *subProcess) interrupt(t *testing.T) {
	t.Helper()
	if err := s.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	if err := s.wait(t); err != nil {
		t.Errorf("subscribe after SIGINT: %v (stderr %q), want exit status 0", err, s.stderr.String())
	}
	if s.stderr.String() != "" {
		t.Errorf("subscribe wrote %q to stderr after SIGINT", s.stderr.String())
	}
}

// wait waits for the process to exit, reading its output to the end.
func (s *subProcess) wait(t *testing.T) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		for range s.lines {
		}
		<-s.stderrDone
		done <- s.cmd.Wait() // after every read of the pipes, as exec wants
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("subscribe did not exit within 10s")
	}
	return nil
}

// waitMetricSubscribers waits until the sidecar at url counts n subscribers: the
// websocket handshake completes just before the broker adds one.
func waitMetricSubscribers(t *testing.T, url string, n int, header ...string) {
	t.Helper()
	want := fmt.Sprintf("\nsidecar_broker_subscribers %d\n", n)
	eventually(t, 10*time.Second, want[1:len(want)-1], func() bool {
		_, body := do(t, "GET", url+"/metrics", "", header...)
		return strings.Contains(string(body), want)
	})
}

func TestCLIPublishSubscribe(t *testing.T) {
	t.Parallel()
	_, url, _ := startBinary(t)
	plain := startSubscriber(t, nil, "events", "--proxy_address", url)
	queued := startSubscriber(t, []string{"MICRO_PROXY_ADDRESS=" + url}, "events", "--queue", "workers", "--json")
	waitMetricSubscribers(t, url, 2)

	args := []string{"publish", "events", "hello world", "--proxy_address", url}
	r := runClient(t, "", nil, args...)
	wantOK(t, r, args...)
	if r.stdout != "published 11 bytes to events\n" {
		t.Errorf("publish output = %q", r.stdout)
	}
	if got := plain.next(t); got != "hello world" {
		t.Errorf("subscriber printed %q, want %q", got, "hello world")
	}
	var frame struct {
		Header map[string]string
		Body   []byte
	}
	if line := queued.next(t); json.Unmarshal([]byte(line), &frame) != nil || string(frame.Body) != "hello world" {
		t.Errorf("--json subscriber printed %q, want the message frame", line)
	}

	// The message from stdin, as is.
	args = []string{"--proxy_address", url, "publish", "events"}
	wantOK(t, runClient(t, "from stdin\n", nil, args...), args...)
	if got := plain.next(t); got != "from stdin" {
		t.Errorf("subscriber printed %q, want %q", got, "from stdin")
	}
	queued.next(t)

	plain.interrupt(t)
	queued.interrupt(t)
	waitMetricSubscribers(t, url, 0)
}

func TestCLIFailures(t *testing.T) {
	t.Parallel()
	_, url, _ := startBinary(t)
	unreachable := fmt.Sprintf("127.0.0.1:%d", closedPort(t))
	// A service whose node is the sidecar itself, behind a relay.
	relay, _ := loopRelay(t, strings.TrimPrefix(url, "http://"), loopLimit)
	registerURLs(t, url, "go.micro.srv.loop", relay)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"unreachable sidecar", []string{"list", "services", "--proxy_address", unreachable}, "cannot reach the sidecar at http://" + unreachable},
		{"unreachable sidecar, subscribe", []string{"subscribe", "t", "--proxy_address", unreachable}, "cannot reach the sidecar"},
		{"unreachable sidecar, health", []string{"health", "x", "--proxy_address", unreachable}, "cannot reach the sidecar"},
		{"unknown service", []string{"get", "service", "go.micro.srv.nope", "--proxy_address", url}, `get service: service "go.micro.srv.nope" not found (404 Not Found)`},
		{"unknown service, health", []string{"health", "go.micro.srv.nope", "--proxy_address", url}, "not found"},
		{"call into a loop", []string{"call", "go.micro.srv.loop", "Loop.Call", "--proxy_address", url}, "loop detected"},
		{"malformed JSON", []string{"register", "service", `{"name": "x", nodes}`, "--proxy_address", url}, "the service argument is not valid JSON"},
		{"malformed JSON, deregister", []string{"deregister", "service", `[`, "--proxy_address", url}, "not valid JSON"},
		{"service the sidecar refuses", []string{"register", "service", `{"name":"x"}`, "--proxy_address", url}, `"nodes" must list at least one node (400 Bad Request)`},
		{"bad topic", []string{"subscribe", "bad topic", "--proxy_address", url}, "400 Bad Request"},
		{"bad ttl", []string{"register", "service", serviceJSON("x", "x-1", "127.0.0.1", 1), "--ttl", "-1s", "--proxy_address", url}, "400 Bad Request"},
		{"unknown command", []string{"frobnicate"}, `unknown command "frobnicate"`},
		{"unknown help topic", []string{"help", "frobnicate"}, `unknown command "frobnicate"`},
		{"missing argument", []string{"get", "service"}, "usage: sidecar get service NAME"},
		{"wrong noun", []string{"list", "topics"}, "usage: sidecar list services"},
		{"extra argument", []string{"stats", "now"}, "usage: sidecar stats"},
		{"unknown flag", []string{"list", "services", "--bogus"}, "-bogus"},
		{"flag of another command", []string{"list", "services", "--queue", "q"}, "-queue"},
		{"bad proxy address", []string{"list", "services", "--proxy_address", "ftp://x"}, "--proxy_address"},
		{"bad timeout", []string{"list", "services", "--timeout", "0s"}, "--timeout"},
		{"unparsable timeout", []string{"list", "services", "--timeout", "soon"}, `list: invalid value "soon" for flag --timeout: want a duration such as 10s`},
		{"client flag without a command", []string{"--proxy_address", url}, "client flags without a command"},
		{"missing token file", []string{"list", "services", "--auth_token_file", "/nonexistent/token"}, "--auth_token_file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := runClient(t, "", nil, tt.args...)
			wantFailure(t, r, tt.want, tt.args...)
			if r.stdout != "" {
				t.Errorf("sidecar %q wrote %q to stdout on failure", tt.args, r.stdout)
			}
		})
	}
}

func TestCLIStats(t *testing.T) {
	t.Parallel()
	_, plainURL, _ := startBinary(t)
	_, statsURL, _ := startBinary(t, "--enable_stats")
	// Without --enable_stats: the same summary, read from /metrics, not
	// its raw series. Traffic on several routes first, as a sidecar in
	// use has.
	for _, args := range [][]string{{"list", "services"}, {"publish", "events", "x"}, {"get", "service", "nope"}, {"call", "go.micro.srv.nope", "X.Y"}} {
		runClient(t, "", nil, append(args, "--proxy_address", plainURL)...)
	}
	r := runClient(t, "", nil, "stats", "--proxy_address", plainURL)
	wantOK(t, r, "stats")
	// Five requests: the four, and the GET /stats that found stats off.
	if !regexpLine(r.stdout, "uptime") || !regexpLine(r.stdout, "requests", "5", "(2xx", "2,", "4xx", "3),", "1", "in", "flight") ||
		!regexpLine(r.stdout, "POST", "/broker", "1", "2xx", "1") || !regexpLine(r.stdout, "GET", "/registry", "2", "2xx", "1,", "4xx", "1") ||
		!regexpLine(r.stdout, "sidecar_broker_published_total", "1") {
		t.Errorf("stats from /metrics, want the summary table:\n%s", r.stdout)
	}
	if strings.Contains(r.stdout, "sidecar_http_") || strings.Contains(r.stdout, "sidecar_broker_dropped_total") {
		t.Errorf("stats from /metrics prints raw request series or zero counters:\n%s", r.stdout)
	}
	if n := strings.Count(r.stdout, "\n"); n > 20 {
		t.Errorf("stats from /metrics prints %d lines, want a summary:\n%s", n, r.stdout)
	}
	r = runClient(t, "", nil, "stats", "--json", "--proxy_address", plainURL)
	var samples []metricSample
	if err := json.Unmarshal([]byte(r.stdout), &samples); r.code != 0 || err != nil || len(samples) == 0 {
		t.Errorf("stats --json from /metrics = %d %q (%v), want every sample", r.code, r.stdout, err)
	}

	if r := runClient(t, "", nil, "list", "services", "--proxy_address", statsURL); r.code != 0 {
		t.Fatalf("list services: exit %d, stderr %q", r.code, r.stderr)
	}
	r = runClient(t, "", nil, "stats", "--proxy_address", statsURL)
	wantOK(t, r, "stats")
	if !regexpLine(r.stdout, "requests", "1", "(2xx", "1),") || !regexpLine(r.stdout, "uptime") || !regexpLine(r.stdout, "GET", "/registry", "1", "2xx", "1") {
		t.Errorf("stats from /stats:\n%s", r.stdout)
	}
	r = runClient(t, "", nil, "stats", "--json", "--proxy_address", statsURL)
	var st statsJSON
	if err := json.Unmarshal([]byte(r.stdout), &st); r.code != 0 || err != nil || st.Started == 0 {
		t.Errorf("stats --json = %d %q (%v), want the /stats JSON", r.code, r.stdout, err)
	}
}

// TestCLIListNoServices: an empty registry is said so, on stderr, so that
// a script reading the names from stdout reads none.
func TestCLIListNoServices(t *testing.T) {
	t.Parallel()
	_, url, _ := startBinary(t)
	r := runClient(t, "", nil, "list", "services", "--proxy_address", url)
	if r.code != 0 || r.stdout != "" || r.stderr != "no services are registered at "+url+"\n" {
		t.Errorf("list services on an empty registry: exit %d, stdout %q, stderr %q; want status 0, nothing on stdout and one line saying so", r.code, r.stdout, r.stderr)
	}
	r = runClient(t, "", nil, "list", "services", "--json", "--proxy_address", url)
	if r.code != 0 || r.stdout != "[]\n" || r.stderr != "" {
		t.Errorf("list services --json on an empty registry: exit %d, stdout %q, stderr %q; want []", r.code, r.stdout, r.stderr)
	}
}

// TestCLISubscribeQuotes: a message that is not one line of printable
// text is printed as a quoted string, so a message with a newline cannot
// pass for two messages.
func TestCLISubscribeQuotes(t *testing.T) {
	t.Parallel()
	_, url, _ := startBinary(t)
	sub := startSubscriber(t, nil, "events", "--proxy_address", url)
	waitMetricSubscribers(t, url, 1)
	tests := []struct{ msg, want string }{
		{"one line", "one line"},
		{"two\nlines", `"two\nlines"`},
		{"ends in a newline\n", "ends in a newline"}, // the line's own end, as echo sends it
		{"two\nlines\n", `"two\nlines\n"`},
		{"\n", `"\n"`},
		{`"quoted"`, `"\"quoted\""`}, // else it would read as a quoted message
		{"tab\tseparated", "tab\tseparated"},
		{"carriage\rreturn", `"carriage\rreturn"`},
		{"bell\a", `"bell\a"`},
		{"caf\xc3\xa9", "caf\u00e9"},
		{"\xff\xfe", `"\xff\xfe"`},
	}
	for _, tt := range tests {
		args := []string{"publish", "events", "-", "--proxy_address", url}
		wantOK(t, runClient(t, tt.msg, nil, args...), args...)
		if got := sub.next(t); got != tt.want {
			t.Errorf("message %q printed as %q, want %q", tt.msg, got, tt.want)
		}
	}
	sub.interrupt(t)
}

func TestParseSample(t *testing.T) {
	t.Parallel()
	tests := []struct {
		line   string
		name   string
		labels map[string]string
		v      float64
		ok     bool
	}{
		{"go_goroutines 10", "go_goroutines", nil, 10, true},
		{`sidecar_http_requests_total{route="GET /registry",class="2xx"} 3`, "sidecar_http_requests_total", map[string]string{"route": "GET /registry", "class": "2xx"}, 3, true},
		{`m{a="x\"y\\z\nw"} 1.5`, "m", map[string]string{"a": "x\"y\\z\nw"}, 1.5, true},
		{`m{le="+Inf"} 2`, "m", map[string]string{"le": "+Inf"}, 2, true},
		{"# HELP m help", "", nil, 0, false},
		{"", "", nil, 0, false},
		{`m{a="unterminated} 1`, "", nil, 0, false},
		{"m notanumber", "", nil, 0, false},
	}
	for _, tt := range tests {
		name, labels, v, ok := parseSample(tt.line)
		if ok != tt.ok || (ok && (name != tt.name || v != tt.v || fmt.Sprint(labels) != fmt.Sprint(tt.labels))) {
			t.Errorf("parseSample(%q) = %q %v %v %v, want %q %v %v %v", tt.line, name, labels, v, ok, tt.name, tt.labels, tt.v, tt.ok)
		}
	}
}

func TestCLIAuthToken(t *testing.T) {
	t.Parallel()
	_, url, _ := startBinary(t, "--auth_token", "s3cret")
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// --json: an empty registry prints [] and nothing on stderr.
	args := []string{"list", "services", "--json", "--proxy_address", url}
	wantFailure(t, runClient(t, "", nil, args...), "no bearer token: send Authorization: Bearer TOKEN (401 Unauthorized; pass --auth_token", args...)
	wantFailure(t, runClient(t, "", nil, append(args, "--auth_token", "wrong")...), "bearer token refused", args...)
	wantOK(t, runClient(t, "", nil, append(args, "--auth_token", "s3cret")...), args...)
	wantOK(t, runClient(t, "", nil, append(args, "--auth_token_file", tokenFile)...), args...)
	wantOK(t, runClient(t, "", []string{"MICRO_AUTH_TOKEN=s3cret"}, args...), args...)
	// A rotation file, as the sidecar reads it: the client sends the first token.
	rotation := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(rotation, []byte("# current first\n\n  s3cret  \r\nprevious\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wantOK(t, runClient(t, "", nil, append(args, "--auth_token_file", rotation)...), append(args, "--auth_token_file", rotation)...)
	empty := filepath.Join(t.TempDir(), "empty")
	if err := os.WriteFile(empty, []byte("# no token yet\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wantFailure(t, runClient(t, "", nil, append(args, "--auth_token_file", empty)...), "flag --auth_token_file: "+empty+": no token", args...)

	sub := startSubscriber(t, nil, "t", "--proxy_address", url, "--auth_token", "s3cret")
	waitMetricSubscribers(t, url, 1, "Authorization", "Bearer s3cret")
	wantOK(t, runClient(t, "", nil, "publish", "t", "secret message", "--proxy_address", url, "--auth_token_file", tokenFile), "publish")
	if got := sub.next(t); got != "secret message" {
		t.Errorf("subscriber printed %q, want %q", got, "secret message")
	}
	sub.interrupt(t)
}

func TestCLIMutualTLS(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "server ca")
	clientCA := newTestCA(t, "client ca")
	cfg := tlsTestConfig(t, ca, "sidecar")
	dir := t.TempDir()
	cfg.TLSClientCAFile = filepath.Join(dir, "clients.pem")
	writeFile(t, cfg.TLSClientCAFile, clientCA.pem)
	_, addr := serveTestServer(t, cfg)

	caFile := filepath.Join(dir, "ca.pem")
	writeFile(t, caFile, ca.pem)
	certPEM, keyPEM := clientCA.issue(t, "cli", true)
	certFile, keyFile := filepath.Join(dir, "cli.pem"), filepath.Join(dir, "cli-key.pem")
	writeFile(t, certFile, certPEM)
	writeFile(t, keyFile, keyPEM)

	url := "https://" + addr
	full := []string{"--proxy_address", url, "--tls_ca_file", caFile, "--tls_client_cert_file", certFile, "--tls_client_key_file", keyFile}
	args := append([]string{"list", "services", "--json"}, full...)
	wantOK(t, runClient(t, "", nil, args...), args...)

	args = []string{"list", "services", "--proxy_address", url, "--tls_client_cert_file", certFile, "--tls_client_key_file", keyFile}
	wantFailure(t, runClient(t, "", nil, args...), "trust its CA with --tls_ca_file", args...)
	args = []string{"list", "services", "--proxy_address", url, "--tls_ca_file", caFile}
	wantFailure(t, runClient(t, "", nil, args...), "cannot reach the sidecar at "+url, args...)
	args = []string{"list", "services", "--proxy_address", url, "--tls_ca_file", caFile, "--tls_client_cert_file", certFile}
	wantFailure(t, runClient(t, "", nil, args...), "go together", args...)

	// Websockets over TLS with the client certificate.
	sub := startSubscriber(t, nil, append([]string{"t"}, full...)...)
	pool := ca.pool()
	c := httpsClient(t, pool, false, clientCA.keyPair(t, "test"))
	eventually(t, 10*time.Second, "one subscriber", func() bool {
		resp, err := c.Get(url + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return strings.Contains(string(b), "\nsidecar_broker_subscribers 1\n")
	})
	args = append([]string{"publish", "t", "over tls"}, full...)
	wantOK(t, runClient(t, "", nil, args...), args...)
	if got := sub.next(t); got != "over tls" {
		t.Errorf("subscriber printed %q, want %q", got, "over tls")
	}
	sub.interrupt(t)
}

func TestCLISubscribeEndsWithSidecar(t *testing.T) {
	t.Parallel()
	cmd, url, _ := startBinary(t)
	sub := startSubscriber(t, nil, "t", "--proxy_address", url)
	waitMetricSubscribers(t, url, 1)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	err := sub.wait(t)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() == 0 {
		t.Fatalf("subscribe after the sidecar stopped: %v, want a failure", err)
	}
	wantFailure(t, cliResult{stderr: sub.stderr.String(), code: ee.ExitCode()}, "the sidecar ended the subscription (websocket close 1001", "subscribe")
}

// TestCLINullNodes: a server at --proxy_address that answers null nodes
// (a sidecar never does) gets no panic from health or get service.
func TestCLINullNodes(t *testing.T) {
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" {
			io.WriteString(w, `{"status":"ok"}`)
			return
		}
		io.WriteString(w, `{"name":"x","nodes":[null]}`)
	}))
	defer ts.Close()
	var out, errb bytes.Buffer
	defer func() {
		if p := recover(); p != nil {
			t.Errorf("sidecar health panicked on a null node: %v", p)
		}
	}()
	for _, cmd := range [][]string{{"health", "x"}, {"get", "service", "x"}} {
		err := runCLI(context.Background(), append([]string{"--proxy_address", ts.URL}, cmd...), &out, &errb)
		t.Logf("%v: err %v", cmd, err)
	}
}

// TestCLIVersion runs sidecar version, --json and --version, and holds
// them to what the Go toolchain says of the same binary (go version -m).
func TestCLIVersion(t *testing.T) {
	t.Parallel()
	bin := sidecarBinary(t)
	out, err := exec.Command("go", "version", "-m", bin).Output()
	if err != nil {
		t.Fatalf("go version -m: %v", err)
	}
	want := buildVersion{Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[0] == "mod":
			want.Version = f[2]
		case len(f) == 2 && f[0] == "build" && strings.HasPrefix(f[1], "vcs.revision="):
			want.Revision = strings.TrimPrefix(f[1], "vcs.revision=")
		case len(f) == 2 && f[0] == "build" && strings.HasPrefix(f[1], "vcs.time="):
			want.Time = strings.TrimPrefix(f[1], "vcs.time=")
		case len(f) == 2 && f[0] == "build" && f[1] == "vcs.modified=true":
			want.Modified = true
		}
	}
	if want.Version == "" {
		t.Fatalf("go version -m %s names no main module:\n%s", bin, out)
	}

	r := runClient(t, "", []string{"MICRO_VERSION=1.2.3"}, "version", "--json")
	wantOK(t, r, "version", "--json")
	var got buildVersion
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil || strings.Count(r.stdout, "\n") != 1 {
		t.Fatalf("sidecar version --json = %q (%v), want one line of JSON", r.stdout, err)
	}
	if got != want {
		t.Errorf("sidecar version --json = %+v, want %+v (go version -m)", got, want)
	}

	line := want.String() + "\n"
	if !strings.HasPrefix(line, "sidecar "+want.Version+" ") || !strings.Contains(line, " "+runtime.Version()+" ") {
		t.Errorf("one-line form %q lacks the version or the Go version", line)
	}
	for _, args := range [][]string{{"version"}, {"--version"}, {"-version"}} {
		r := runClient(t, "", []string{"MICRO_VERSION=1.2.3"}, args...)
		wantOK(t, r, args...)
		if r.stdout != line {
			t.Errorf("sidecar %q = %q, want %q", args, r.stdout, line)
		}
	}
	// It needs no sidecar and ignores where one would be.
	r = runClient(t, "", []string{"MICRO_PROXY_ADDRESS=ftp://nowhere"}, "version")
	wantOK(t, r, "version")
	wantFailure(t, runClient(t, "", nil, "version", "now"), "usage: sidecar version", "version", "now")
	wantFailure(t, runClient(t, "", nil, "version", "--proxy_address", "h:1"), "proxy_address", "version", "--proxy_address")
}

// TestVersionFromGit builds the sidecar from a git checkout of its sources
// with a known commit and an uncommitted change, and checks that sidecar
// version reports that commit, its time, and the change. (The test binary
// of the other tests may carry no VCS information: Go stamps none in a git
// worktree or with -buildvcs=false.)
func TestVersionFromGit(t *testing.T) {
	t.Parallel()
	requireTool(t, "git")
	src := t.TempDir()
	entries, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		// Not .git: in a worktree it is a file naming the shared git
		// directory, which the git commands below must never touch.
		if !e.Type().IsRegular() || strings.HasPrefix(e.Name(), ".") || strings.HasSuffix(e.Name(), "_test.go") {
			continue
		}
		b, err := os.ReadFile(e.Name())
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	git := func(args ...string) string {
		t.Helper()
		cmd := exec.Command("git", args...)
		cmd.Dir = src
		cmd.Env = append(os.Environ(), "GIT_DIR="+filepath.Join(src, ".git"), "GIT_WORK_TREE="+src,
			"GIT_CONFIG_GLOBAL=/dev/null", "GIT_CONFIG_NOSYSTEM=1",
			"GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.com", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.com",
			"GIT_AUTHOR_DATE=2026-01-02T03:04:05Z", "GIT_COMMITTER_DATE=2026-01-02T03:04:05Z")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("git %q: %v\n%s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	git("init", "-q")
	git("add", ".")
	git("commit", "-q", "-m", "test")
	rev := git("rev-parse", "HEAD")
	if err := os.WriteFile(filepath.Join(src, "uncommitted.txt"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "sidecar")
	build := exec.Command("go", "build", "-buildvcs=true", "-o", bin, ".")
	build.Dir = src
	build.Env = append(os.Environ(), "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build in a git checkout: %v\n%s", err, out)
	}

	out, err := exec.Command(bin, "version", "--json").Output()
	if err != nil {
		t.Fatalf("sidecar version --json: %v", err)
	}
	var got buildVersion
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("sidecar version --json = %q: %v", out, err)
	}
	want := buildVersion{Version: got.Version, Revision: rev, Time: "2026-01-02T03:04:05Z", Modified: true,
		Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if got != want {
		t.Errorf("sidecar version --json = %+v, want %+v", got, want)
	}
	if !strings.Contains(got.Version, rev[:12]) {
		t.Errorf("version %q does not name the commit %s (a pseudo-version)", got.Version, rev[:12])
	}
	out, err = exec.Command(bin, "--version").Output()
	if wantLine := "sidecar " + got.Version + " (revision " + rev + ", 2026-01-02T03:04:05Z, modified) " + runtime.Version() + " " + want.Platform + "\n"; err != nil || string(out) != wantLine {
		t.Errorf("sidecar --version = %q, %v; want %q", out, err, wantLine)
	}
}
