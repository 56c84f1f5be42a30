package main

// tls.go owns certificates: the TLS listener of the sidecar (certificate
// and client CA files reloaded when they change, see reload.go; optional
// mutual TLS), certificates from an ACME CA for whitelisted hosts, and the
// TLS settings of outbound calls.

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// defaultACMEDirectory is the directory URL of --acme_directory_url by
// default: Let's Encrypt production. Staging is
// https://acme-staging-v02.api.letsencrypt.org/directory.
const defaultACMEDirectory = autocert.DefaultACMEDirectory

// maxPEMBytes bounds every certificate, key or CA file the sidecar reads.
const maxPEMBytes = 1 << 20

// tlsManager owns the server side of TLS: the tls.Config of the listener,
// the certificate source behind it (files or ACME) and the optional
// HTTP-01 challenge listener. With neither --enable_tls nor --enable_acme
// it is inert and listen returns a plain TCP listener.
//
// newTLSManager starts nothing; listen binds the listener and the HTTP-01
// one; start serves HTTP-01 challenges until its context ends or Close;
// Close stops that and waits for it. Safe for concurrent use.
type tlsManager struct {
	log    *slog.Logger
	config *tls.Config // nil when TLS is off

	files     *fileReloader[tls.Certificate] // with --enable_tls
	clientCAs *fileReloader[clientCAs]       // with --tls_client_ca_file
	acme      *autocert.Manager              // with --enable_acme
	acmeTr    *http.Transport                // the ACME client's connections to the CA; Close closes the idle ones
	hosts     map[string]bool                // --acme_hosts, lower case
	challenge *tls.Config                    // TLS-ALPN-01 handshakes with mutual TLS; else nil

	// acmeRequests counts HTTP requests sent to the ACME CA; acmeDenied
	// counts handshakes for hosts outside --acme_hosts, refused without
	// asking the CA anything.
	acmeRequests atomic.Int64
	acmeDenied   atomic.Int64

	httpAddr string // --acme_http_address; empty: no HTTP-01 listener

	mu      sync.Mutex   // guards the fields below
	httpSrv *http.Server // the HTTP-01 server, built by listen
	httpLn  net.Listener // its listener, bound by listen
	serving bool         // start serves httpLn: Close shuts httpSrv down
	closed  bool
	stop    chan struct{}  // closed by Close: ends serving
	wg      sync.WaitGroup // the HTTP-01 server and the goroutine that stops it
}

// newTLSManager checks the TLS flags together and loads what they name, so
// that a missing file, a key that does not match its certificate or a
// TLS flag without --enable_tls stops start-up with one clear line.
func newTLSManager(cfg *Config, logger *slog.Logger) (*tlsManager, error) {
	if err := cfg.validateTLS(); err != nil {
		return nil, err
	}
	m := &tlsManager{log: logger, httpAddr: cfg.ACMEHTTPAddress, stop: make(chan struct{})}
	// Outbound settings are checked here too, so a bad --client_ca_file
	// stops start-up rather than the first call.
	if _, err := clientTLSConfig(cfg); err != nil {
		return nil, err
	}
	if !cfg.EnableTLS && !cfg.EnableACME {
		return m, nil
	}
	m.config = &tls.Config{
		MinVersion: tls.VersionTLS12,
		// h2 for clients that offer it; http/1.1 stays on offer because
		// websocket upgrades (RFC 6455) need HTTP/1.1.
		NextProtos: []string{"h2", "http/1.1"},
	}
	if cfg.TLSClientCAFile != "" {
		m.config.ClientAuth = tls.RequireAndVerifyClientCert
	}
	if cfg.EnableTLS {
		r, err := newCertReloader(cfg.TLSCertFile, cfg.TLSKeyFile, cfg.TLSReloadInterval, logger)
		if err != nil {
			return nil, err
		}
		m.files = r
		m.config.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return r.get(), nil }
	} else if err := m.setupACME(cfg); err != nil {
		return nil, err
	}
	// The client CA is read last: each of its contents gets a copy of the
	// listener's config, complete by now.
	if cfg.TLSClientCAFile != "" {
		r, err := newFileReloader("tls client ca", []watchedFile{{"tls_client_ca_file", cfg.TLSClientCAFile}},
			cfg.TLSReloadInterval, m.parseClientCAs, logger)
		if err != nil {
			return nil, err
		}
		m.clientCAs = r
		m.config.ClientCAs = r.get().config.ClientCAs
	}
	if m.clientCAs != nil || m.challenge != nil {
		m.config.GetConfigForClient = m.configForClient
	}
	return m, nil
}

// clientCAs is what one content of --tls_client_ca_file gives: the
// handshake config that asks for certificates of these CAs, and the CA
// certificates themselves, by which guard refuses requests on connections
// verified against CAs since removed from the file.
type clientCAs struct {
	config  *tls.Config
	anchors map[string]bool // DER of each CA certificate
}

// parseClientCAs parses the content of --tls_client_ca_file (the
// fileReloader's parse).
func (m *tlsManager) parseClientCAs(contents [][]byte) (*clientCAs, error) {
	certs, err := parsePEMCertificates(contents[0])
	if err != nil {
		return nil, fmt.Errorf("flag --tls_client_ca_file: %w", err)
	}
	cas := &clientCAs{config: m.config.Clone(), anchors: make(map[string]bool, len(certs))}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
		cas.anchors[string(c.Raw)] = true
	}
	cas.config.ClientCAs = pool
	cas.config.GetConfigForClient = nil // this is what it returns
	return cas, nil
}

// trusts reports whether one of chains, the verified chains of a
// connection, ends at one of these CAs. A connection verified before a
// reload may end at a CA removed since.
func (cas *clientCAs) trusts(chains [][]*x509.Certificate) bool {
	for _, chain := range chains {
		if len(chain) > 0 && cas.anchors[string(chain[len(chain)-1].Raw)] {
			return true
		}
	}
	return false
}

// configForClient is tls.Config.GetConfigForClient: the TLS-ALPN-01
// challenge config for the ACME CA's validation handshake, else the
// config of the current --tls_client_ca_file, else the listener's.
func (m *tlsManager) configForClient(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	if m.challenge != nil && slices.Equal(hello.SupportedProtos, []string{acme.ALPNProto}) {
		return m.challenge, nil
	}
	if m.clientCAs != nil {
		return m.clientCAs.get().config, nil
	}
	return nil, nil
}

// metrics emits the reload counters of the certificate and client CA
// files.
func (m *tlsManager) metrics(emit emitFunc) {
	if m.files != nil {
		m.files.metrics(emit)
	}
	if m.clientCAs != nil {
		m.clientCAs.metrics(emit)
	}
}

// setupACME builds the autocert manager: whitelist policy, cache, CA
// directory and the HTTP client that talks to the CA.
func (m *tlsManager) setupACME(cfg *Config) error {
	var roots *x509.CertPool // nil: the system roots
	if cfg.ACMECAFile != "" {
		pool, err := loadCertPool(cfg.ACMECAFile)
		if err != nil {
			return fmt.Errorf("flag --acme_ca_file: %w", err)
		}
		roots = pool
	}
	client := &acme.Client{
		DirectoryURL: cfg.ACMEDirectoryURL,
		HTTPClient:   m.acmeHTTPClient(roots),
		UserAgent:    "sidecar",
	}
	if client.DirectoryURL == "" {
		client.DirectoryURL = defaultACMEDirectory
	}
	m.hosts = map[string]bool{}
	for _, h := range cfg.ACMEHosts {
		m.hosts[strings.ToLower(h)] = true
	}
	allow := autocert.HostWhitelist(cfg.ACMEHosts...)
	m.acme = &autocert.Manager{
		Prompt: autocert.AcceptTOS,
		Client: client,
		Email:  cfg.ACMEEmail,
		// The whitelist is checked before anything is asked of the CA:
		// a handshake naming another host fails and costs no order.
		HostPolicy: func(ctx context.Context, host string) error {
			if err := allow(ctx, host); err != nil {
				m.acmeDenied.Add(1)
				m.log.Debug("acme host refused", "host", host)
				return fmt.Errorf("tls: host %q is not in --acme_hosts", host)
			}
			return nil
		},
	}
	if cfg.ACMECacheDir != "" {
		if err := os.MkdirAll(cfg.ACMECacheDir, 0o700); err != nil {
			return fmt.Errorf("flag --acme_cache_dir: %w", err)
		}
		m.acme.Cache = autocert.DirCache(cfg.ACMECacheDir)
	} else {
		m.log.Warn("acme without --acme_cache_dir: certificates live in memory and are requested again after each restart")
	}
	m.config.GetCertificate = m.acme.GetCertificate
	// TLS-ALPN-01 (RFC 8737) is answered on the TLS listener itself. The
	// CA's validation handshake carries no client certificate, so with
	// mutual TLS it gets a config that does not ask for one
	// (configForClient); such a connection only gets the challenge
	// certificate, and guard refuses any HTTP request on it.
	m.config.NextProtos = append(m.config.NextProtos, acme.ALPNProto)
	if m.config.ClientAuth != tls.NoClientCert {
		m.challenge = m.config.Clone()
		m.challenge.ClientAuth, m.challenge.ClientCAs = tls.NoClientCert, nil
		m.challenge.NextProtos = []string{acme.ALPNProto}
	}
	return nil
}

// acmeHTTPClient is the client for the ACME CA: bounded in time, counting
// every request so tests and operators can see what was asked of the CA.
// roots verify the CA's own HTTPS (--acme_ca_file); nil means system roots.
func (m *tlsManager) acmeHTTPClient(roots *x509.CertPool) *http.Client {
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots},
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 30 * time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   2,
		ForceAttemptHTTP2:     true,
	}
	m.acmeTr = tr
	return &http.Client{
		Timeout:   60 * time.Second,
		Transport: &acmeTransport{base: tr, n: &m.acmeRequests, orders: map[string]string{}},
	}
}

// acmeTransport counts the requests sent to the ACME CA and supplies the
// order URL that RFC 8555 lets a CA leave out of the finalize response
// (Pebble does; Buypass does). x/crypto/acme before v0.58.0 polls the
// Location of that response, an empty URL without it (golang/go#77704);
// v0.58.0 needs go 1.26. The order URL is known from the new-order
// response, so it is remembered by finalize URL and put back.
type acmeTransport struct {
	base http.RoundTripper
	n    *atomic.Int64

	mu     sync.Mutex        // guards orders
	orders map[string]string // finalize URL -> order URL
}

// maxACMEOrders bounds acmeTransport.orders; one entry lives per pending order.
const maxACMEOrders = 1024

func (t *acmeTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	t.n.Add(1)
	resp, err := t.base.RoundTrip(r)
	if err != nil || r.Method != http.MethodPost {
		return resp, err
	}
	loc := resp.Header.Get("Location")
	switch {
	case resp.StatusCode == http.StatusCreated && loc != "":
		// Maybe a new order: remember its finalize URL.
		b, err := io.ReadAll(io.LimitReader(resp.Body, maxPEMBytes))
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(b))
		if err != nil {
			return resp, nil // acme reports the short body
		}
		var order struct {
			Finalize string `json:"finalize"`
		}
		if json.Unmarshal(b, &order) == nil && order.Finalize != "" {
			t.mu.Lock()
			if len(t.orders) >= maxACMEOrders {
				clear(t.orders)
			}
			t.orders[order.Finalize] = loc
			t.mu.Unlock()
		}
	case resp.StatusCode == http.StatusOK:
		t.mu.Lock()
		orderURL, ok := t.orders[r.URL.String()]
		if ok {
			delete(t.orders, r.URL.String())
		}
		t.mu.Unlock()
		if ok && loc == "" {
			resp.Header.Set("Location", orderURL)
		}
	}
	return resp, nil
}

// guard wraps the sidecar's handler when mutual TLS is on: a request whose
// connection carries no verified client certificate (one that came in
// through the TLS-ALPN-01 challenge config, which cannot ask for one), or
// one verified against a CA no longer in --tls_client_ca_file (a
// connection kept open, or a TLS session resumed, across a reload), is
// refused with a JSON 403 and the connection closed. A request already
// being served when the file changes completes. Otherwise it returns next
// unchanged.
func (m *tlsManager) guard(next http.Handler) http.Handler {
	if !m.enabled() || m.config.ClientAuth == tls.NoClientCert {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
			w.Header().Set("Connection", "close")
			writeError(w, http.StatusForbidden, "a client certificate is required")
			return
		}
		if !m.clientCAs.get().trusts(r.TLS.VerifiedChains) {
			w.Header().Set("Connection", "close")
			writeError(w, http.StatusForbidden, "the client certificate's CA is no longer in --tls_client_ca_file; connect again with a certificate of a current CA")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// enabled reports whether the listener serves TLS.
func (m *tlsManager) enabled() bool { return m.config != nil }

// scheme is the URL scheme of the listener: "https" or "http".
func (m *tlsManager) scheme() string {
	if m.enabled() {
		return "https"
	}
	return "http"
}

// listen binds addr and, with TLS on, returns a TLS listener over it (and
// binds the HTTP-01 listener when --acme_http_address is set, which start
// serves). HTTP/2 is negotiated by ALPN; http.Server.Serve sets it up for
// *tls.Conn.
func (m *tlsManager) listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	if !m.enabled() {
		return ln, nil
	}
	if m.acme != nil && m.httpAddr != "" {
		if err := m.listenHTTP01(ln.Addr()); err != nil {
			ln.Close()
			return nil, err
		}
	}
	return &tlsListener{Listener: ln, config: m.config}, nil
}

// listenHTTP01 binds --acme_http_address and builds the server of HTTP-01
// challenges on it (start serves it); other requests for a whitelisted
// host are redirected to tlsAddr.
func (m *tlsManager) listenHTTP01(tlsAddr net.Addr) error {
	ln, err := net.Listen("tcp", m.httpAddr)
	if err != nil {
		return fmt.Errorf("flag --acme_http_address: listen on %s: %w", m.httpAddr, err)
	}
	port := ""
	if a, ok := tlsAddr.(*net.TCPAddr); ok && a.Port != 443 {
		port = ":" + strconv.Itoa(a.Port)
	}
	fallback := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, err := net.SplitHostPort(r.Host)
		if err != nil {
			host = r.Host
		}
		host = strings.ToLower(host)
		if !m.hosts[host] || (r.Method != http.MethodGet && r.Method != http.MethodHead) {
			writeError(w, http.StatusNotFound, "this port serves ACME HTTP-01 challenges only; use https")
			return
		}
		http.Redirect(w, r, "https://"+host+port+r.URL.RequestURI(), http.StatusFound)
	})
	srv := &http.Server{
		Handler:           m.acme.HTTPHandler(fallback),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(m.log.Handler(), slog.LevelWarn),
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed || m.httpLn != nil {
		ln.Close()
		return errors.New("tls: closed, or the HTTP-01 listener is bound already")
	}
	m.httpSrv, m.httpLn = srv, ln
	return nil
}

// start serves HTTP-01 challenges on the listener listen bound, if any,
// until ctx ends or Close.
func (m *tlsManager) start(ctx context.Context) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.httpSrv == nil || m.serving || m.closed {
		return
	}
	m.serving = true
	srv, ln := m.httpSrv, m.httpLn
	m.wg.Add(2)
	go func() {
		defer m.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			m.log.Error("acme http-01 listener stopped", "err", err)
		}
	}()
	go func() {
		defer m.wg.Done()
		select {
		case <-ctx.Done():
		case <-m.stop:
		}
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			srv.Close()
		}
	}()
	m.log.Info("acme http-01 listening", "address", ln.Addr().String())
}

// http01Addr is the bound address of the HTTP-01 listener, or nil.
func (m *tlsManager) http01Addr() net.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.httpLn == nil {
		return nil
	}
	return m.httpLn.Addr()
}

// Close stops the HTTP-01 server (or closes its listener, never served)
// and waits for it, and closes the ACME client's idle connections to the
// CA, whose read loops would otherwise outlive the sidecar. Idempotent.
// (The autocert manager keeps renewal timers that hold no goroutine until
// they fire; it offers no way to stop them.)
func (m *tlsManager) Close() error {
	m.mu.Lock()
	var unserved net.Listener
	if !m.closed {
		m.closed = true
		close(m.stop)
		if !m.serving {
			unserved = m.httpLn
		}
	}
	m.mu.Unlock()
	if m.acmeTr != nil {
		m.acmeTr.CloseIdleConnections()
	}
	if unserved != nil {
		unserved.Close()
	}
	m.wg.Wait()
	return nil
}

// validateTLS checks the TLS and ACME flags together: each needs the mode
// that uses it, and each mode needs its flags.
func (c *Config) validateTLS() error {
	needs := []struct {
		flag string
		set  bool
		mode bool
		want string
	}{
		{"tls_cert_file", c.TLSCertFile != "", c.EnableTLS, "--enable_tls"},
		{"tls_key_file", c.TLSKeyFile != "", c.EnableTLS, "--enable_tls"},
		{"tls_client_ca_file", c.TLSClientCAFile != "", c.EnableTLS || c.EnableACME, "--enable_tls or --enable_acme"},
		{"acme_hosts", len(c.ACMEHosts) > 0, c.EnableACME, "--enable_acme"},
		{"acme_cache_dir", c.ACMECacheDir != "", c.EnableACME, "--enable_acme"},
		{"acme_directory_url", c.ACMEDirectoryURL != "" && c.ACMEDirectoryURL != defaultACMEDirectory, c.EnableACME, "--enable_acme"},
		{"acme_ca_file", c.ACMECAFile != "", c.EnableACME, "--enable_acme"},
		{"acme_http_address", c.ACMEHTTPAddress != "", c.EnableACME, "--enable_acme"},
		{"acme_email", c.ACMEEmail != "", c.EnableACME, "--enable_acme"},
	}
	for _, n := range needs {
		if n.set && !n.mode {
			return fmt.Errorf("flag --%s needs %s", n.flag, n.want)
		}
	}
	switch {
	case c.EnableTLS && c.EnableACME:
		return errors.New("flags --enable_tls and --enable_acme exclude each other: one serves certificate files, the other gets certificates from an ACME CA")
	case c.EnableTLS && (c.TLSCertFile == "" || c.TLSKeyFile == ""):
		return errors.New("flag --enable_tls needs --tls_cert_file and --tls_key_file")
	case c.EnableACME && len(c.ACMEHosts) == 0:
		return errors.New("flag --enable_acme needs --acme_hosts, the host names allowed to get certificates")
	case c.TLSReloadInterval <= 0:
		return fmt.Errorf("invalid value %s for flag --tls_reload_interval: must be positive", c.TLSReloadInterval)
	}
	for _, h := range c.ACMEHosts {
		if strings.ContainsAny(h, ":/*@ ") || net.ParseIP(h) != nil || !strings.Contains(h, ".") {
			return fmt.Errorf("invalid value %q for flag --acme_hosts: want DNS names like a.example.com (no port, IP or wildcard)", h)
		}
	}
	if c.ACMEDirectoryURL != "" {
		if u, err := url.Parse(c.ACMEDirectoryURL); err != nil || u.Scheme != "https" || u.Host == "" {
			return fmt.Errorf("invalid value %q for flag --acme_directory_url: want an https:// URL", c.ACMEDirectoryURL)
		}
	}
	return nil
}

// newCertReloader serves the pair in certFile and keyFile, re-read when
// the files change (fileReloader). A new pair is logged with its subject
// and expiry; an expired one at start-up is a warning, not an error.
func newCertReloader(certFile, keyFile string, interval time.Duration, logger *slog.Logger) (*fileReloader[tls.Certificate], error) {
	files := []watchedFile{{"tls_cert_file", certFile}, {"tls_key_file", keyFile}}
	r, err := newFileReloader("tls certificate", files, interval, func(contents [][]byte) (*tls.Certificate, error) {
		c, err := tls.X509KeyPair(contents[0], contents[1])
		if err != nil {
			return nil, fmt.Errorf("flags --tls_cert_file %s and --tls_key_file %s: %w", certFile, keyFile, err)
		}
		return &c, nil
	}, logger)
	if err != nil {
		return nil, err
	}
	r.describe = func(c *tls.Certificate) []any {
		if c.Leaf == nil {
			return nil
		}
		return []any{"subject", c.Leaf.Subject.String(), "not_after", c.Leaf.NotAfter}
	}
	if leaf := r.get().Leaf; leaf != nil && time.Now().After(leaf.NotAfter) {
		logger.Warn("tls certificate has expired", "file", certFile, "not_after", leaf.NotAfter)
	}
	return r, nil
}

// readLimited reads a file of at most maxPEMBytes.
func readLimited(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxPEMBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	if len(b) > maxPEMBytes {
		return nil, fmt.Errorf("%s is larger than %d bytes", name, maxPEMBytes)
	}
	return b, nil
}

// parsePEMCertificates parses every CERTIFICATE block of b. Unlike
// x509.CertPool.AppendCertsFromPEM it refuses, rather than skips, a block
// that does not parse and a last block cut short, so that a CA file caught
// half written is not taken for a shorter list of CAs.
func parsePEMCertificates(b []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := b
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	switch {
	case bytes.Contains(rest, []byte("-----BEGIN")):
		return nil, fmt.Errorf("PEM block %d is cut short or malformed", len(certs)+1)
	case len(certs) == 0:
		return nil, errors.New("no PEM certificates")
	}
	return certs, nil
}

// loadCertPool reads PEM CA certificates from name.
func loadCertPool(name string) (*x509.CertPool, error) {
	b, err := readLimited(name)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("no PEM certificates in %s", name)
	}
	return pool, nil
}

// tlsListener is tls.NewListener with one addition: a client that speaks
// plain HTTP to the TLS port gets the sidecar's JSON 400 instead of the
// standard library's plain-text one.
type tlsListener struct {
	net.Listener
	config *tls.Config
}

func (l *tlsListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return tls.Server(&sniffConn{Conn: c}, l.config), nil
}

// errPlainHTTP ends the handshake of a plain HTTP client on the TLS port.
var errPlainHTTP = errors.New("plain HTTP request on the TLS port")

// sniffConn looks at the first bytes a client sends. A TLS client starts
// with a handshake record (0x16); a request line means plain HTTP, which
// is answered with a JSON 400 and closed. It is used by one tls.Conn, whose
// handshake runs under the http.Server's deadlines.
type sniffConn struct {
	net.Conn
	sniffed bool
	head    []byte // bytes read while sniffing, not yet returned
}

func (c *sniffConn) Read(p []byte) (int, error) {
	if !c.sniffed {
		c.sniffed = true
		head := make([]byte, 5)
		n, err := io.ReadFull(c.Conn, head)
		c.head = head[:n]
		if n == len(head) && looksLikeHTTP(head) {
			c.refuseHTTP()
			return 0, errPlainHTTP
		}
		if n == 0 && err != nil {
			return 0, err
		}
	}
	if len(c.head) > 0 {
		n := copy(p, c.head)
		c.head = c.head[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// looksLikeHTTP reports whether a connection's first five bytes start an
// HTTP/1 request line.
func looksLikeHTTP(head []byte) bool {
	for _, m := range []string{"GET /", "HEAD ", "POST ", "PUT /", "DELET", "OPTIO", "PATCH", "CONNE", "TRACE"} {
		if string(head) == m {
			return true
		}
	}
	return false
}

// refuseHTTP writes the JSON 400 for a plain HTTP client, then lets the
// client read it before the connection closes (closing with the request
// unread could reset the connection and lose the answer).
func (c *sniffConn) refuseHTTP() {
	var buf bytes.Buffer
	rec := &rawResponse{header: http.Header{}, body: &buf}
	writeError(rec, http.StatusBadRequest, "this port serves TLS: use https://")
	resp := fmt.Sprintf("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", buf.Len(), buf.Bytes())
	c.Conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := io.WriteString(c.Conn, resp); err != nil {
		return
	}
	if tc, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		tc.CloseWrite()
	}
	io.Copy(io.Discard, io.LimitReader(c.Conn, 64<<10)) // until the client closes or the deadline
}

// rawResponse is the minimal http.ResponseWriter writeError needs to
// render the JSON error body outside an HTTP handler.
type rawResponse struct {
	header http.Header
	body   *bytes.Buffer
}

func (r *rawResponse) Header() http.Header         { return r.header }
func (r *rawResponse) WriteHeader(int)             {}
func (r *rawResponse) Write(b []byte) (int, error) { return r.body.Write(b) }

// clientTLSConfig is the TLS configuration of outbound calls to service
// nodes: TLS 1.2 or later, verified against --client_ca_file or, without
// it, the system roots. The RPC and proxy code call backends over TLS when
// backendScheme says "https".
func clientTLSConfig(cfg *Config) (*tls.Config, error) {
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.ClientCAFile != "" {
		pool, err := loadCertPool(cfg.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("flag --client_ca_file: %w", err)
		}
		c.RootCAs = pool
	}
	return c, nil
}

// nodeUsesTLS reports whether a node asked to be called over TLS, by
// registering with the metadata "https": "true" (any value strconv.ParseBool
// reads as true).
func nodeUsesTLS(n *Node) bool {
	if n == nil {
		return false
	}
	on, err := strconv.ParseBool(n.Metadata["https"])
	return err == nil && on
}

// backendScheme is the URL scheme of calls to n: "https" with --client_tls
// or when the node asks for it, "http" otherwise.
func backendScheme(cfg *Config, n *Node) string {
	if cfg.ClientTLS || nodeUsesTLS(n) {
		return "https"
	}
	return "http"
}
