package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// client.go is how the sidecar calls other HTTP servers: the transport to
// backends, retry pacing and backoff, and small helpers shared by the
// registry backends, the peer broker, the CLI and the app checker.

// newBackendTransport is the HTTP transport to service nodes that the RPC
// handler and the reverse proxy each own: direct (whatever HTTP_PROXY
// says), bounded dial and header times, many idle connections per node, and
// clientTLS for nodes called over https.
func newBackendTransport(cfg *Config, clientTLS *tls.Config) *http.Transport {
	dialer := &net.Dialer{Timeout: min(cfg.ClientRequestTimeout, maxDialTimeout), KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy:                  nil, // backends are reached directly, whatever HTTP_PROXY says
		DialContext:            dialer.DialContext,
		MaxIdleConns:           maxIdleConns,
		MaxIdleConnsPerHost:    idleConnsPerHost,
		IdleConnTimeout:        90 * time.Second,
		ResponseHeaderTimeout:  cfg.ClientRequestTimeout + time.Second, // a safety net: each call's deadline ends first
		MaxResponseHeaderBytes: backendHeaderSize,
		TLSClientConfig:        clientTLS,
		TLSHandshakeTimeout:    min(cfg.ClientRequestTimeout, maxDialTimeout),
	}
}

// retryBackoff is the jittered wait before retry number try+1, of an
// exponentially growing step.
func retryBackoff(try int) time.Duration {
	return jitter(min(retryBackoffBase<<min(try, 10), retryBackoffMax))
}

// jitter returns a random duration in [d/2, d], so clients that failed
// together do not retry together.
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

// sleepCtx waits d or until ctx ends, reporting whether d passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// backoff is a jittered exponential backoff: each delay is drawn from
// [d/2, d) where d doubles from min up to max. Not safe for concurrent use.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max} }

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else if b.cur *= 2; b.cur > b.max {
		b.cur = b.max
	}
	return jitter(b.cur)
}

func (b *backoff) reset() { b.cur = 0 }

// snippet is the start of a response body for error messages.
func snippet(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// httpBaseURL parses addr as host:port or an http(s) URL without a path.
func httpBaseURL(addr string) (*url.URL, error) {
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil {
		return nil, err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("scheme %q is not http or https", u.Scheme)
	}
	if u.Host == "" {
		return nil, errors.New("no host")
	}
	if u.Path != "" && u.Path != "/" || u.RawQuery != "" {
		return nil, errors.New("want host:port or scheme://host:port, without a path")
	}
	u.Path = ""
	return u, nil
}
