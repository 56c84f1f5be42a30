package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// gateBackend is a backend that holds every request until release is
// called (or the test ends), and tells on entered when one arrives: a
// request in flight, for as long as the test wants.
func gateBackend(t *testing.T) (srv *httptest.Server, entered <-chan struct{}, release func()) {
	t.Helper()
	in := make(chan struct{}, 16)
	gate := make(chan struct{})
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		in <- struct{}{}
		select {
		case <-gate:
			io.WriteString(w, "finally")
		case <-r.Context().Done():
		}
	}))
	var released bool
	release = func() {
		if !released {
			released = true
			close(gate)
		}
	}
	t.Cleanup(func() { release(); srv.Close() })
	return srv, in, release
}

// waitEntered waits until the backend holds the request sent by inFlight,
// or fails the test if the request ends first.
func waitEntered(t *testing.T, entered <-chan struct{}, result <-chan string) {
	t.Helper()
	select {
	case <-entered:
	case got := <-result:
		t.Fatalf("request meant to stay in flight ended: %s", got)
	}
}

// inFlight sends req with client in the background and returns the
// status and body on the channel when it completes.
func inFlight(t *testing.T, client *http.Client, req *http.Request) <-chan string {
	t.Helper()
	out := make(chan string, 1)
	go func() {
		resp, err := client.Do(req)
		if err != nil {
			out <- err.Error()
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		out <- fmt.Sprintf("%d %s", resp.StatusCode, b)
	}()
	return out
}

// TestAuthTokenFileRotation rotates the token file under a running
// sidecar, with a proxied request and a subscription in flight: the old
// token works, the new one once added works, both work, and the old one
// is refused once removed, while what it let in goes on. A file that
// becomes empty or unreadable keeps the last good set.
func TestAuthTokenFileRotation(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "tokens")
	writeFile(t, path, []byte("old-token\n"))
	cfg, err := parseConfig([]string{"--address", "127.0.0.1:0", "--handler", "proxy", "--auth_token_file", path,
		"--tls_reload_interval", "1ms", "--client_request_timeout", "60s"}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatalf("parseConfig: %v", err)
	}
	_, ts := newTestServer(t, cfg)
	status := func(token string) int {
		t.Helper()
		code, _ := do(t, "GET", ts.URL+"/registry", "", "Authorization", "Bearer "+token)
		return code
	}
	metric := func(token, key string) float64 {
		t.Helper()
		code, body := do(t, "GET", ts.URL+"/metrics", "", "Authorization", "Bearer "+token)
		if code != http.StatusOK {
			t.Fatalf("GET /metrics with %s = %d %s", token, code, body)
		}
		return parseMetrics(t, body)[key]
	}

	slow, entered, release := gateBackend(t)
	port := slow.URL[strings.LastIndex(slow.URL, ":")+1:]
	if code, b := do(t, "POST", ts.URL+"/registry", `{"name":"go.micro.srv.slow","nodes":[{"id":"s1","address":"127.0.0.1","port":`+port+`}]}`,
		"Authorization", "Bearer old-token"); code != http.StatusOK {
		t.Fatalf("register with the old token = %d %s", code, b)
	}
	if got := status("old-token"); got != http.StatusOK {
		t.Fatalf("GET /registry with the old token = %d, want 200", got)
	}
	if got := status("new-token"); got != http.StatusUnauthorized {
		t.Fatalf("GET /registry with the new token before it is in the file = %d, want 401", got)
	}

	// In flight with the old token: a proxied request held by the backend,
	// and a broker subscription.
	req, _ := http.NewRequest("GET", ts.URL+"/slow/long", nil)
	req.Header.Set("Authorization", "Bearer old-token")
	long := inFlight(t, http.DefaultClient, req)
	waitEntered(t, entered, long)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sub, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.URL, "http")+"/broker?topic=rotation",
		&websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer old-token"}}})
	if err != nil {
		t.Fatalf("subscribe with the old token: %v", err)
	}
	defer sub.CloseNow()

	// Step 1: the new token is added; both work.
	writeFile(t, path, []byte("old-token\nnew-token\n"))
	eventually(t, 10*time.Second, "the added token accepted", func() bool { return status("new-token") == http.StatusOK })
	if got := status("old-token"); got != http.StatusOK {
		t.Fatalf("GET /registry with the old token while both are in the file = %d, want 200", got)
	}

	// Step 2: the old token is removed; it is refused, the new one works.
	writeFile(t, path, []byte("new-token\n"))
	eventually(t, 10*time.Second, "the removed token refused", func() bool { return status("old-token") == http.StatusUnauthorized })
	resp, err := http.DefaultClient.Do(func() *http.Request {
		r, _ := http.NewRequest("GET", ts.URL+"/registry", nil)
		r.Header.Set("Authorization", "Bearer old-token")
		return r
	}())
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	wantError(t, "GET /registry with the removed token", resp.StatusCode, body, http.StatusUnauthorized)
	if got := resp.Header.Get("WWW-Authenticate"); got != `Bearer realm="sidecar", error="invalid_token"` {
		t.Errorf("WWW-Authenticate = %q, want the Bearer challenge with invalid_token", got)
	}
	if got := status("new-token"); got != http.StatusOK {
		t.Fatalf("GET /registry with the new token = %d, want 200", got)
	}

	// What the old token let in goes on.
	release()
	if got := <-long; got != "200 finally" {
		t.Errorf("proxied request in flight across the rotation = %q, want 200 finally", got)
	}
	if code, b := do(t, "POST", ts.URL+"/broker?topic=rotation", "after the rotation", "Authorization", "Bearer new-token"); code != http.StatusOK {
		t.Fatalf("publish with the new token = %d %s", code, b)
	}
	if m := readMessage(t, ctx, sub); string(m.Body) != "after the rotation" {
		t.Errorf("subscriber let in by the old token read %q, want the message", m.Body)
	}

	// Refusals are counted, by reason.
	wrong, missing := `sidecar_auth_refused_total{reason="wrong_token"}`, `sidecar_auth_refused_total{reason="missing_token"}`
	wrongBefore, missingBefore := metric("new-token", wrong), metric("new-token", missing)
	status("old-token")
	status("nope")
	do(t, "GET", ts.URL+"/registry", "")
	if got := metric("new-token", wrong); got != wrongBefore+2 {
		t.Errorf("%s = %v after two wrong tokens, want %v", wrong, got, wrongBefore+2)
	}
	if got := metric("new-token", missing); got != missingBefore+1 {
		t.Errorf("%s = %v after a request without a token, want %v", missing, got, missingBefore+1)
	}

	// A file that becomes empty, then unreadable, keeps the last good set.
	errorsKey := `sidecar_file_reload_errors_total{flag="auth_token_file"}`
	errorsBefore := metric("new-token", errorsKey)
	writeFile(t, path, []byte("\n  \n# only a comment\n"))
	eventually(t, 10*time.Second, "the empty file reported", func() bool { return metric("new-token", errorsKey) > errorsBefore })
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the missing file reported", func() bool { return metric("new-token", errorsKey) > errorsBefore+1 })
	if got := status("new-token"); got != http.StatusOK {
		t.Fatalf("GET /registry with the last good token after the file went away = %d, want 200", got)
	}

	// Comments, blank lines, surrounding spaces and CRLF line ends.
	writeFile(t, path, []byte("# rotated by ops\r\n\r\n   third-token  \r\n\tfourth-token\r\n"))
	eventually(t, 10*time.Second, "the tokens of the rewritten file accepted", func() bool { return status("third-token") == http.StatusOK })
	for token, want := range map[string]int{"fourth-token": 200, "new-token": 401, "# rotated by ops": 401} {
		if got := status(token); got != want {
			t.Errorf("GET /registry with %q = %d, want %d", token, got, want)
		}
	}
	if got := metric("third-token", `sidecar_file_reloads_total{flag="auth_token_file"}`); got < 3 {
		t.Errorf("auth_token_file reloads = %v, want at least 3", got)
	}
}

func TestParseTokens(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name, file string
		want       []string
		err        string // in the error; empty: no error
	}{
		{"one token", "s3cret\n", []string{"s3cret"}, ""},
		{"no final newline", "s3cret", []string{"s3cret"}, ""},
		{"two tokens in order", "new\nold\n", []string{"new", "old"}, ""},
		{"spaces, blank lines, CRLF", "\r\n  new  \r\n\t\r\n\told\t\r\n", []string{"new", "old"}, ""},
		{"comments", "# rotated 2026-11-26\nnew\n  # old one below\nold\n", []string{"new", "old"}, ""},
		{"inner space kept", "a b\n", []string{"a b"}, ""},
		{"hash inside a token", "a#b\n", []string{"a#b"}, ""},
		{"empty", "", nil, "no token"},
		{"only blanks and comments", "\n \n# none\n", nil, "no token"},
		{"too many", strings.Repeat("t\n", maxAuthTokens+1), nil, "more than"},
		{"as many as allowed", strings.Repeat("t\n", maxAuthTokens), slices.Repeat([]string{"t"}, maxAuthTokens), ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseTokens([]byte(tt.file))
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("parseTokens(%q) = %q, %v; want an error containing %q", tt.file, got, err, tt.err)
				}
				return
			}
			if err != nil || strings.Join(got, "\x00") != strings.Join(tt.want, "\x00") {
				t.Fatalf("parseTokens(%q) = %q, %v; want %q", tt.file, got, err, tt.want)
			}
		})
	}
}

func FuzzParseTokens(f *testing.F) {
	for _, s := range []string{"s3cret\n", "new\nold\n", "# c\n\n  t  \r\n", "", "\n", "#", "a\rb", "\xff\n", "a b"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		tokens, err := parseTokens(b)
		if err != nil {
			return
		}
		if len(tokens) == 0 || len(tokens) > maxAuthTokens {
			t.Fatalf("parseTokens(%q) = %d tokens", b, len(tokens))
		}
		for _, tok := range tokens {
			if tok == "" || tok != strings.TrimSpace(tok) || strings.HasPrefix(tok, "#") || strings.Contains(tok, "\n") {
				t.Fatalf("parseTokens(%q) gave token %q", b, tok)
			}
		}
	})
}

// TestAuthTokenFileStartup: a token file that cannot be used stops
// start-up with one line naming the flag.
func TestAuthTokenFileStartup(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	files := map[string]string{"empty": "# tokens go here\n\n", "many": strings.Repeat("t\n", maxAuthTokens+1), "good": "  # c\nfirst\nsecond\n"}
	for name, b := range files {
		writeFile(t, filepath.Join(dir, name), []byte(b))
	}
	for _, tt := range []struct {
		name, file, want string // want: in the error; empty: start-up succeeds
	}{
		{"good", "good", ""},
		{"missing", "nope", "flag --auth_token_file: open"},
		{"empty", "empty", "flag --auth_token_file: " + filepath.Join(dir, "empty") + ": no token"},
		{"too many", "many", "more than 64"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := startUp(t, "--address", "127.0.0.1:0", "--auth_token_file", filepath.Join(dir, tt.file))
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("start-up with %s: %v, want success", tt.file, err)
			case tt.want == "" && cfg.AuthToken != "first":
				t.Fatalf("start-up with %s: AuthToken = %q, want the first token", tt.file, cfg.AuthToken)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("start-up with %s: error %v, want one containing %q", tt.file, err, tt.want)
			case err != nil && strings.Contains(err.Error(), "\n"):
				t.Fatalf("start-up error %q is not one line", err)
			}
		})
	}
}

// BenchmarkAuthAllow measures the token check of every request: a digest
// of the presented token compared with each accepted one, with the file
// looked at every second (most calls read two atomics).
func BenchmarkAuthAllow(b *testing.B) {
	for _, n := range []int{1, 2, maxAuthTokens} {
		b.Run(fmt.Sprintf("tokens=%d", n), func(b *testing.B) {
			var file strings.Builder
			for i := range n {
				fmt.Fprintf(&file, "token-%032d\n", i)
			}
			path := filepath.Join(b.TempDir(), "tokens")
			writeFile(b, path, []byte(file.String()))
			cfg := testConfig()
			cfg.AuthTokenFile = path
			a, err := newAuth(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
			if err != nil {
				b.Fatal(err)
			}
			r := httptest.NewRequest("GET", "/registry", nil)
			r.Header.Set("Authorization", fmt.Sprintf("Bearer token-%032d", n-1)) // the last one
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if !a.allow(r) {
						b.Fatal("refused")
					}
				}
			})
		})
	}
}
