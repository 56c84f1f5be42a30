// Proxybackend is the node of bench/proxy.sh: an HTTP server answering
// every request with the same small body, so a benchmark measures the
// proxy in front of it.
//
//	proxybackend -address 127.0.0.1:0
//
// It prints "listening on HOST:PORT" once bound.
package main

import (
	"flag"
	"fmt"
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
			h["Content-Type"] = []string{"text/plain"}
			h["Content-Length"] = []string{length}
			w.Write(body)
		}),
	}
	log.Fatal(srv.Serve(ln))
}
