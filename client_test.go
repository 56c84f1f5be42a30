package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
)

// TestHopByHop is the table of the one hop-by-hop policy (RFC 9110
// section 7.6.1), run through every place that applies it: RPC's backend
// header, the proxy's request head and response header, and the broker's
// message header. Each row lists the fields of a message and the names
// that must survive; the fields are ones no place drops for its own
// reasons.
func TestHopByHop(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		fields []string // name, value, name, value, ...
		want   []string // canonical names that are passed on
	}{
		{
			name: "the fields of the RFC and the ones proxies used",
			fields: []string{"Connection", "keep-alive", "Keep-Alive", "timeout=5", "Proxy-Connection", "keep-alive",
				"Proxy-Authenticate", "Basic", "Proxy-Authorization", "Basic eA==", "Te", "gzip", "Trailer", "X-Sum",
				"Transfer-Encoding", "chunked", "Upgrade", "h2c", "X-End", "1"},
			want: []string{"X-End"},
		},
		{
			name:   "fields named by Connection",
			fields: []string{"Connection", "X-Hop, x-other", "X-Hop", "1", "X-Other", "2", "X-End", "3"},
			want:   []string{"X-End"},
		},
		{
			name:   "Connection over two lines, with spaces and tabs",
			fields: []string{"Connection", "close", "Connection", " X-A ,\tX-B\t", "X-A", "1", "X-B", "2", "X-C", "3"},
			want:   []string{"X-C"},
		},
		{
			name:   "an end-to-end field named by Connection",
			fields: []string{"Connection", "Cache-Control", "Cache-Control", "no-cache", "Accept", "*/*"},
			want:   []string{"Accept"},
		},
		{
			name:   "options compared without regard to case",
			fields: []string{"Connection", "X-HOP", "X-Hop", "1", "X-End", "2"},
			want:   []string{"X-End"},
		},
		{
			name:   "empty options name nothing",
			fields: []string{"Connection", " , ,", "X-A", "1"},
			want:   []string{"X-A"},
		},
		{
			name:   "a name that only contains an option stays",
			fields: []string{"Connection", "X-Ho", "X-Hop", "1", "X-H", "2"},
			want:   []string{"X-H", "X-Hop"},
		},
		{
			name:   "no hop-by-hop field",
			fields: []string{"Accept", "*/*", "X-A", "1", "Cache-Control", "no-cache"},
			want:   []string{"Accept", "Cache-Control", "X-A"},
		},
	}
	// Each place, given the fields, returns the canonical names it passes on
	// among them.
	places := []struct {
		name string
		pass func(t *testing.T, h http.Header) http.Header
	}{
		{"rpc backendHeader", func(t *testing.T, h http.Header) http.Header {
			return backendHeader(h, false)
		}},
		{"removeHopByHop", func(t *testing.T, h http.Header) http.Header {
			removeHopByHop(h)
			return h
		}},
		{"proxy request head", func(t *testing.T, h http.Header) http.Header {
			r, err := http.NewRequest(http.MethodGet, "http://sidecar/svc/x", nil)
			if err != nil {
				t.Fatal(err)
			}
			r.Header = h
			r.RemoteAddr = "127.0.0.1:5000"
			var buf bytes.Buffer
			bw := bufio.NewWriter(&buf)
			writeRequestHead(bw, r, "node:80", 0, false)
			bw.Flush()
			out, err := http.ReadRequest(bufio.NewReader(&buf))
			if err != nil {
				t.Fatalf("writeRequestHead wrote %q: %v", buf.String(), err)
			}
			return out.Header
		}},
		{"proxy response header", func(t *testing.T, h http.Header) http.Header {
			var raw strings.Builder
			raw.WriteString("HTTP/1.1 200 OK\r\n")
			for k, vv := range h {
				for _, v := range vv {
					raw.WriteString(k + ": " + v + "\r\n")
				}
			}
			raw.WriteString("\r\n")
			c := &backendConn{br: bufio.NewReader(strings.NewReader(raw.String()))}
			head, _, err := c.readResponseHead(backendHeaderSize)
			if err != nil {
				t.Fatalf("readResponseHead(%q): %v", raw.String(), err)
			}
			out := http.Header{}
			c.header(out, head.chunked)
			return out
		}},
		{"broker messageHeader", func(t *testing.T, h http.Header) http.Header {
			out := http.Header{}
			for k, v := range messageHeader(h) {
				out[k] = []string{v}
			}
			return out
		}},
	}
	for _, tt := range tests {
		for _, pl := range places {
			t.Run(tt.name+"/"+pl.name, func(t *testing.T) {
				in := http.Header{}
				for i := 0; i < len(tt.fields); i += 2 {
					in.Add(tt.fields[i], tt.fields[i+1])
				}
				out := pl.pass(t, in.Clone())
				var got []string
				for k := range in {
					if _, ok := out[k]; ok {
						got = append(got, k)
					}
				}
				slices.Sort(got)
				if !slices.Equal(got, tt.want) {
					t.Errorf("%s passes on %v of %v, want %v", pl.name, got, in, tt.want)
				}
			})
		}
	}
}

// TestHopByHopNoAlloc: the proxy applies the policy on its hot path
// without allocating: writing a request head with hop-by-hop fields and
// Connection options allocates nothing.
func TestHopByHopNoAlloc(t *testing.T) {
	r, err := http.NewRequest(http.MethodGet, "http://sidecar/svc/x?y=1", nil)
	if err != nil {
		t.Fatal(err)
	}
	r.RequestURI = "/svc/x?y=1" // as the server sets it
	r.RemoteAddr = "127.0.0.1:5000"
	r.Header = http.Header{
		"Accept":     {"*/*"},
		"User-Agent": {"test"},
		"Connection": {"keep-alive, X-Hop"},
		"Keep-Alive": {"timeout=5"},
		"X-Hop":      {"1"},
		"Te":         {"trailers"},
	}
	bw := bufio.NewWriterSize(&bytes.Buffer{}, 4<<10)
	if n := testing.AllocsPerRun(100, func() {
		writeRequestHead(bw, r, "node:80", 0, true)
		bw.Reset(nil)
	}); n != 0 {
		t.Errorf("writeRequestHead allocates %v times per request, want 0", n)
	}
	if n := testing.AllocsPerRun(100, func() {
		if !hopByHop("X-Hop", r.Header["Connection"]) || hopByHop("Accept", r.Header["Connection"]) {
			t.Fatal("hopByHop is wrong about X-Hop or Accept")
		}
	}); n != 0 {
		t.Errorf("hopByHop allocates %v times, want 0", n)
	}
}

// TestCallJSON: the one way the sidecar calls a JSON API, against a real
// server: a 2xx answer is decoded, any other status is a *statusError with
// the sidecar's error detail or the start of the body, and the answer is
// read within the limit.
func TestCallJSON(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
			io.WriteString(w, `{"name":"a"}`)
		case "/sidecar-error":
			writeError(w, http.StatusNotFound, "service %q not found", "x")
		case "/text-error":
			http.Error(w, "  unknown service  ", http.StatusBadRequest)
		case "/big":
			io.WriteString(w, `{"name":"`+strings.Repeat("x", 100)+`"}`)
		case "/big-error":
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, strings.Repeat("y", 100))
		case "/bad-json":
			io.WriteString(w, `{"name":`)
		case "/echo":
			w.Header().Set("X-Got-Type", r.Header.Get("Content-Type"))
			io.Copy(w, r.Body)
		}
	}))
	t.Cleanup(srv.Close)
	type named struct{ Name string }
	tests := []struct {
		path     string
		limit    int64
		wantName string
		wantCode int    // of a *statusError
		wantText string // in the error
	}{
		{path: "/ok", limit: 64, wantName: "a"},
		{path: "/sidecar-error", limit: 1024, wantCode: 404, wantText: `status 404: service "x" not found`},
		{path: "/text-error", limit: 64, wantCode: 400, wantText: "status 400: unknown service"},
		{path: "/big", limit: 64, wantText: "exceeds 64 bytes"},
		{path: "/big-error", limit: 64, wantCode: 503, wantText: "status 503: " + strings.Repeat("y", 64)},
		{path: "/bad-json", limit: 64, wantText: "bad JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			req, err := newJSONRequest(context.Background(), http.MethodGet, srv.URL+tt.path, nil)
			if err != nil {
				t.Fatal(err)
			}
			var out named
			_, _, err = callJSON(srv.Client(), req, tt.limit, &out)
			var se *statusError
			switch {
			case tt.wantText == "" && err != nil:
				t.Fatalf("callJSON(%s) = %v, want no error", tt.path, err)
			case tt.wantText != "" && (err == nil || !strings.Contains(err.Error(), tt.wantText)):
				t.Fatalf("callJSON(%s) = %v, want an error with %q", tt.path, err, tt.wantText)
			case tt.wantCode != 0 && (!errors.As(err, &se) || se.code != tt.wantCode):
				t.Fatalf("callJSON(%s) = %#v, want a *statusError with code %d", tt.path, err, tt.wantCode)
			case tt.wantCode == 0 && errors.As(err, &se):
				t.Fatalf("callJSON(%s) = %v, a *statusError for a 2xx answer", tt.path, err)
			}
			if out.Name != tt.wantName {
				t.Errorf("callJSON(%s) decoded name %q, want %q", tt.path, out.Name, tt.wantName)
			}
		})
	}

	t.Run("JSON body", func(t *testing.T) {
		req, err := newJSONRequest(context.Background(), http.MethodPost, srv.URL+"/echo", named{"b"})
		if err != nil {
			t.Fatal(err)
		}
		var out named
		resp, _, err := callJSON(srv.Client(), req, 64, &out)
		if err != nil || out.Name != "b" || resp.Header.Get("X-Got-Type") != "application/json" {
			t.Fatalf("callJSON(POST /echo) = %v, %+v, Content-Type %q; want the body back as JSON", err, out, resp.Header.Get("X-Got-Type"))
		}
	})

	t.Run("refused", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		req, _ := newJSONRequest(context.Background(), http.MethodGet, "http://"+addr+"/", nil)
		resp, _, err := callJSON(http.DefaultClient, req, 64, nil)
		var op *net.OpError
		if resp != nil || !errors.As(err, &op) || op.Op != "dial" {
			t.Fatalf("callJSON to a closed port = %v, %v; want a dial error and no response", resp, err)
		}
	})
}
