// Proxybackend is the node of bench/compare.sh and bench/instructions.sh: an HTTP
// server answering every request with the same small body, so a benchmark
// measures the proxy in front of it. A POST to / is a JSON-RPC call (what
// the sidecar's /rpc sends): the answer is a JSON-RPC 2.0 reply with the
// request's id and a small result.
//
//	proxybackend -address 127.0.0.1:0
//
// It prints "listening on HOST:PORT" once bound.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"time"
)

func main() {
	addr := flag.String("address", "127.0.0.1:0", "listen `host:port`")
	flag.Parse()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("listening on", ln.Addr())
	body := []byte("hello from the proxy benchmark backend\n")
	length := strconv.Itoa(len(body))
	srv := &http.Server{
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			h := w.Header()
			if r.Method == http.MethodPost && r.URL.Path == "/" {
				rpc(w, r)
				return
			}
			h["Content-Type"] = []string{"text/plain"}
			h["Content-Length"] = []string{length}
			w.Write(body)
		}),
	}
	log.Fatal(srv.Serve(ln))
}

// rpc answers a JSON-RPC request with {"jsonrpc":"2.0","id":ID,"result":
// {"msg":"hello"}}, ID copied from the request (an integer).
func rpc(w http.ResponseWriter, r *http.Request) {
	var buf [512]byte
	n, _ := io.ReadFull(io.LimitReader(r.Body, int64(len(buf))), buf[:])
	req := buf[:n]
	id := []byte("null")
	if i := bytes.Index(req, []byte(`"id":`)); i >= 0 {
		rest := req[i+5:]
		j := 0
		for j < len(rest) && rest[j] >= '0' && rest[j] <= '9' {
			j++
		}
		if j > 0 {
			id = rest[:j]
		}
	}
	out := make([]byte, 0, 96)
	out = append(out, `{"jsonrpc":"2.0","id":`...)
	out = append(out, id...)
	out = append(out, `,"result":{"msg":"hello from the rpc benchmark backend"}}`...)
	h := w.Header()
	h["Content-Type"] = []string{"application/json"}
	h["Content-Length"] = []string{strconv.Itoa(len(out))}
	w.Write(out)
}
