package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// testCA is a certificate authority made in the test with crypto/x509.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randSerial(t),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

func randSerial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// issue returns a PEM certificate and key signed by ca: a server
// certificate for 127.0.0.1 and localhost, or a client certificate.
func (ca *testCA) issue(t testing.TB, cn string, client bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(t),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	if client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		tmpl.DNSNames, tmpl.IPAddresses = nil, nil
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
}

// keyPair is issue as a tls.Certificate for a client.
func (ca *testCA) keyPair(t *testing.T, cn string) tls.Certificate {
	t.Helper()
	c, k := ca.issue(t, cn, true)
	pair, err := tls.X509KeyPair(c, k)
	if err != nil {
		t.Fatal(err)
	}
	return pair
}

func (ca *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// writeFile replaces name atomically (write, then rename), as cert-manager
// and certbot do.
func writeFile(t testing.TB, name string, b []byte) {
	t.Helper()
	tmp := name + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, name); err != nil {
		t.Fatal(err)
	}
}

// tlsTestConfig is testConfig serving the pair cn issued by ca from files
// in a temporary directory.
func tlsTestConfig(t testing.TB, ca *testCA, cn string) *Config {
	t.Helper()
	dir := t.TempDir()
	cfg := testConfig()
	cfg.EnableTLS = true
	cfg.TLSCertFile = filepath.Join(dir, "cert.pem")
	cfg.TLSKeyFile = filepath.Join(dir, "key.pem")
	cfg.TLSReloadInterval = time.Millisecond
	c, k := ca.issue(t, cn, false)
	writeFile(t, cfg.TLSCertFile, c)
	writeFile(t, cfg.TLSKeyFile, k)
	return cfg
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// serveTestServer builds the server with newServer and serves it the way
// run does (tlsManager.listen, then serve) on 127.0.0.1:0. It returns the
// server and its bound address.
func serveTestServer(t *testing.T, cfg *Config) (*server, string) {
	t.Helper()
	var (
		s    *server
		ln   net.Listener
		done = make(chan error, 1)
	)
	ctx, cancel := context.WithCancel(context.Background())
	leaks := trackGoroutines(t, func() {
		var err error
		s, err = newServer(cfg, testLogger(t))
		if err != nil {
			t.Fatalf("newServer: %v", err)
		}
		ln, err = s.tls.listen(cfg.Address)
		if err != nil {
			s.Close()
			t.Fatalf("listen: %v", err)
		}
		go func() { done <- s.serve(ctx, ln) }()
	})
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
		leaks()
	})
	return s, ln.Addr().String()
}

// httpsClient trusts roots, presents certs, and speaks HTTP/2 when h2.
// Its idle connections close at the end of the test, before the server's
// shutdown (which otherwise waits for HTTP/2 clients to go away).
func httpsClient(t *testing.T, roots *x509.CertPool, h2 bool, certs ...tls.Certificate) *http.Client {
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots, Certificates: certs},
		ForceAttemptHTTP2: h2,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

// servedCert does a handshake with addr and returns the leaf certificate.
func servedCert(t *testing.T, addr string, conf *tls.Config) (*x509.Certificate, error) {
	t.Helper()
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: conf}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState().PeerCertificates[0], nil
}

func TestTLSServesHTTPS(t *testing.T) {
	ca := newTestCA(t, "test ca")
	_, addr := serveTestServer(t, tlsTestConfig(t, ca, "sidecar"))
	for _, tt := range []struct {
		name      string
		h2        bool
		wantProto int
	}{
		{"http/1.1", false, 1},
		{"h2", true, 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := httpsClient(t, ca.pool(), tt.h2).Get("https://" + addr + "/health")
			if err != nil {
				t.Fatalf("GET /health over TLS: %v", err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || resp.ProtoMajor != tt.wantProto {
				t.Fatalf("GET /health = %d over HTTP/%d, want 200 over HTTP/%d", resp.StatusCode, resp.ProtoMajor, tt.wantProto)
			}
		})
	}
}

func TestTLSRefusesPlainHTTP(t *testing.T) {
	ca := newTestCA(t, "test ca")
	_, addr := serveTestServer(t, tlsTestConfig(t, ca, "sidecar"))
	code, body := do(t, "GET", "http://"+addr+"/health", "")
	e := wantError(t, "plain GET /health on the TLS port", code, body, http.StatusBadRequest)
	if !strings.Contains(e.Detail, "https") {
		t.Errorf("detail %q does not point to https", e.Detail)
	}
	// The port still serves TLS afterwards.
	if _, err := servedCert(t, addr, &tls.Config{RootCAs: ca.pool()}); err != nil {
		t.Fatalf("handshake after a plain HTTP request: %v", err)
	}
}

func TestTLSMinimumVersion(t *testing.T) {
	ca := newTestCA(t, "test ca")
	_, addr := serveTestServer(t, tlsTestConfig(t, ca, "sidecar"))
	for _, tt := range []struct {
		name    string
		version uint16
		ok      bool
	}{
		{"TLS 1.0", tls.VersionTLS10, false},
		{"TLS 1.1", tls.VersionTLS11, false},
		{"TLS 1.2", tls.VersionTLS12, true},
		{"TLS 1.3", tls.VersionTLS13, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := servedCert(t, addr, &tls.Config{RootCAs: ca.pool(), MinVersion: tt.version, MaxVersion: tt.version})
			if (err == nil) != tt.ok || (err != nil && !strings.Contains(err.Error(), "protocol version not supported")) {
				t.Fatalf("handshake with %s: err = %v, want success %v", tt.name, err, tt.ok)
			}
		})
	}
}

func TestMutualTLS(t *testing.T) {
	ca := newTestCA(t, "server ca")
	clientCA := newTestCA(t, "client ca")
	otherCA := newTestCA(t, "other ca")
	cfg := tlsTestConfig(t, ca, "sidecar")
	cfg.TLSClientCAFile = filepath.Join(t.TempDir(), "clients.pem")
	writeFile(t, cfg.TLSClientCAFile, clientCA.pem)
	_, addr := serveTestServer(t, cfg)

	for _, tt := range []struct {
		name  string
		certs []tls.Certificate
		ok    bool
	}{
		{"no client certificate", nil, false},
		{"certificate from another CA", []tls.Certificate{otherCA.keyPair(t, "mallory")}, false},
		{"certificate from the client CA", []tls.Certificate{clientCA.keyPair(t, "app")}, true},
	} {
		for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
			t.Run(tt.name+"/"+tls.VersionName(version), func(t *testing.T) {
				c := httpsClient(t, ca.pool(), false, tt.certs...)
				c.Transport.(*http.Transport).TLSClientConfig.MaxVersion = version
				resp, err := c.Get("https://" + addr + "/health")
				if resp != nil {
					resp.Body.Close()
				}
				if !tt.ok {
					if err == nil {
						t.Fatalf("GET /health with %s = %d, want the handshake refused", tt.name, resp.StatusCode)
					}
					return
				}
				if err != nil || resp.StatusCode != http.StatusOK {
					t.Fatalf("GET /health with %s: %v, want 200", tt.name, err)
				}
			})
		}
	}
}

func TestTLSReloadsChangedFiles(t *testing.T) {
	ca := newTestCA(t, "test ca")
	cfg := tlsTestConfig(t, ca, "first")
	s, addr := serveTestServer(t, cfg)
	conf := &tls.Config{RootCAs: ca.pool()}
	servedCN := func() string {
		leaf, err := servedCert(t, addr, conf)
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		return leaf.Subject.CommonName
	}
	if got := servedCN(); got != "first" {
		t.Fatalf("served CN = %q, want first", got)
	}

	c, k := ca.issue(t, "second", false)
	writeFile(t, cfg.TLSKeyFile, k)
	writeFile(t, cfg.TLSCertFile, c)
	eventually(t, 5*time.Second, "the renewed certificate served", func() bool { return servedCN() == "second" })

	// A broken pair (this key does not match the certificate) keeps the
	// last good one in service.
	_, otherKey := ca.issue(t, "third", false)
	errorsBefore := s.tls.files.reloadErrors.Load()
	writeFile(t, cfg.TLSKeyFile, otherKey)
	eventually(t, 5*time.Second, "the broken pair reported", func() bool {
		servedCN()
		return s.tls.files.reloadErrors.Load() > errorsBefore
	})
	if got := servedCN(); got != "second" {
		t.Fatalf("served CN after a broken pair = %q, want second", got)
	}
	if got := s.tls.files.reloadErrors.Load(); got != errorsBefore+1 {
		t.Errorf("reload errors = %d, want %d: a broken pair is reported once", got, errorsBefore+1)
	}
	// The next good pair is taken.
	c, k = ca.issue(t, "third", false)
	writeFile(t, cfg.TLSCertFile, c)
	writeFile(t, cfg.TLSKeyFile, k)
	eventually(t, 5*time.Second, "the next good pair served", func() bool { return servedCN() == "third" })
}

func TestTLSWebsocket(t *testing.T) {
	ca := newTestCA(t, "test ca")
	_, addr := serveTestServer(t, tlsTestConfig(t, ca, "sidecar"))
	// The client offers h2 too: the upgrade must still get HTTP/1.1.
	client := httpsClient(t, ca.pool(), true)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, "wss://"+addr+"/registry", &websocket.DialOptions{HTTPClient: client})
	if err != nil {
		t.Fatalf("websocket dial over TLS: %v", err)
	}
	defer conn.CloseNow()

	req, _ := http.NewRequest("POST", "https://"+addr+"/registry", strings.NewReader(`{"name":"greeter","nodes":[{"id":"g1","address":"127.0.0.1","port":9000}]}`))
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("POST /registry over TLS: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /registry = %d, want 200", resp.StatusCode)
	}
	_, msg, err := conn.Read(ctx)
	if err != nil {
		t.Fatalf("read watch event over TLS: %v", err)
	}
	if !strings.Contains(string(msg), `"greeter"`) || !strings.Contains(string(msg), `"create"`) {
		t.Fatalf("watch event = %s, want the create of greeter", msg)
	}
}

func TestTLSStartupErrors(t *testing.T) {
	ca := newTestCA(t, "test ca")
	dir := t.TempDir()
	cert, key := ca.issue(t, "sidecar", false)
	_, otherKey := ca.issue(t, "other", false)
	files := map[string][]byte{"cert.pem": cert, "key.pem": key, "other.pem": otherKey, "junk.pem": []byte("not pem\n")}
	for name, b := range files {
		writeFile(t, filepath.Join(dir, name), b)
	}
	f := func(name string) string { return filepath.Join(dir, name) }
	tlsArgs := []string{"--enable_tls", "--tls_cert_file", f("cert.pem"), "--tls_key_file", f("key.pem")}

	for _, tt := range []struct {
		name string
		args []string
		want string // in the error; empty: start-up succeeds
	}{
		{"valid pair", tlsArgs, ""},
		{"cert without --enable_tls", []string{"--tls_cert_file", f("cert.pem")}, "flag --tls_cert_file needs --enable_tls"},
		{"client CA without TLS", []string{"--tls_client_ca_file", f("cert.pem")}, "flag --tls_client_ca_file needs --enable_tls"},
		{"enable_tls without files", []string{"--enable_tls"}, "flag --enable_tls needs --tls_cert_file and --tls_key_file"},
		{"missing cert file", []string{"--enable_tls", "--tls_cert_file", f("nope.pem"), "--tls_key_file", f("key.pem")}, "flag --tls_cert_file: open"},
		{"missing key file", []string{"--enable_tls", "--tls_cert_file", f("cert.pem"), "--tls_key_file", f("nope.pem")}, "flag --tls_key_file: open"},
		{"key does not match", []string{"--enable_tls", "--tls_cert_file", f("cert.pem"), "--tls_key_file", f("other.pem")}, "private key does not match public key"},
		{"junk client CA", append(tlsArgs[:len(tlsArgs):len(tlsArgs)], "--tls_client_ca_file", f("junk.pem")), "flag --tls_client_ca_file: no PEM certificates"},
		{"junk backend CA", []string{"--client_ca_file", f("junk.pem")}, "flag --client_ca_file: no PEM certificates"},
		{"acme without hosts", []string{"--enable_acme"}, "flag --enable_acme needs --acme_hosts"},
		{"acme hosts without acme", []string{"--acme_hosts", "a.example"}, "flag --acme_hosts needs --enable_acme"},
		{"acme directory without acme", []string{"--acme_directory_url", "https://ca.example/dir"}, "flag --acme_directory_url needs --enable_acme"},
		{"acme host with port", []string{"--enable_acme", "--acme_hosts", "a.example:443"}, "invalid value \"a.example:443\" for flag --acme_hosts"},
		{"acme wildcard", []string{"--enable_acme", "--acme_hosts", "*.example.com"}, "for flag --acme_hosts"},
		{"acme plain http directory", []string{"--enable_acme", "--acme_hosts", "a.example", "--acme_directory_url", "http://ca.example/dir"}, "flag --acme_directory_url: want an https:// URL"},
		{"tls and acme", append(tlsArgs[:len(tlsArgs):len(tlsArgs)], "--enable_acme", "--acme_hosts", "a.example"), "exclude each other"},
		{"zero reload interval", append(tlsArgs[:len(tlsArgs):len(tlsArgs)], "--tls_reload_interval", "0s"), "flag --tls_reload_interval"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := startUp(t, append([]string{"--address", "127.0.0.1:0"}, tt.args...)...)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("start-up with %q: %v, want success", tt.args, err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("start-up with %q: error %v, want one containing %q", tt.args, err, tt.want)
			case err != nil && strings.Contains(err.Error(), "\n"):
				t.Fatalf("start-up error %q is not one line", err)
			}
		})
	}
}

// TestRunPrintsHTTPS runs the whole program: run prints the https:// line
// and serves TLS on the printed address.
func TestRunPrintsHTTPS(t *testing.T) {
	ca := newTestCA(t, "test ca")
	cfg := tlsTestConfig(t, ca, "sidecar")
	pr, pw := io.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--address", "127.0.0.1:0", "--enable_tls", "--tls_cert_file", cfg.TLSCertFile, "--tls_key_file", cfg.TLSKeyFile}, pw, io.Discard)
		pw.Close()
	}()
	t.Cleanup(func() {
		cancel()
		go io.Copy(io.Discard, pr)
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	line, err := bufio.NewReader(pr).ReadString('\n')
	if err != nil {
		t.Fatalf("read the address line: %v", err)
	}
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "sidecar listening on https://")
	if !ok {
		t.Fatalf("address line = %q, want sidecar listening on https://HOST:PORT", line)
	}
	resp, err := httpsClient(t, ca.pool(), true).Get("https://" + addr + "/health")
	if err != nil {
		t.Fatalf("GET /health at the printed address: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /health = %d, want 200", resp.StatusCode)
	}
}

func TestBackendScheme(t *testing.T) {
	for _, tt := range []struct {
		name      string
		clientTLS bool
		md        map[string]string
		want      string
	}{
		{"no metadata", false, nil, "http"},
		{"https true", false, map[string]string{"https": "true"}, "https"},
		{"https 1", false, map[string]string{"https": "1"}, "https"},
		{"https false", false, map[string]string{"https": "false"}, "http"},
		{"https junk", false, map[string]string{"https": "yes please"}, "http"},
		{"--client_tls", true, nil, "https"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.ClientTLS = tt.clientTLS
			if got := backendScheme(cfg, &Node{ID: "n", Address: "127.0.0.1", Port: 1, Metadata: tt.md}); got != tt.want {
				t.Fatalf("backendScheme(client_tls=%v, %v) = %q, want %q", tt.clientTLS, tt.md, got, tt.want)
			}
		})
	}
}

// TestClientTLSConfig calls a real TLS backend: its CA given by
// --client_ca_file is trusted, and without it the system roots refuse it.
func TestClientTLSConfig(t *testing.T) {
	ca := newTestCA(t, "backend ca")
	c, k := ca.issue(t, "backend", false)
	pair, err := tls.X509KeyPair(c, k)
	if err != nil {
		t.Fatal(err)
	}
	backend := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("hello"))
	}))
	backend.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	backend.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshake
	backend.StartTLS()
	t.Cleanup(backend.Close)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, caFile, ca.pem)

	for _, tt := range []struct {
		name   string
		caFile string
		ok     bool
	}{
		{"with --client_ca_file", caFile, true},
		{"system roots", "", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.ClientCAFile = tt.caFile
			conf, err := clientTLSConfig(cfg)
			if err != nil {
				t.Fatalf("clientTLSConfig: %v", err)
			}
			client := &http.Client{Transport: &http.Transport{TLSClientConfig: conf}, Timeout: 5 * time.Second}
			resp, err := client.Get(backend.URL)
			if resp != nil {
				resp.Body.Close()
			}
			if (err == nil) != tt.ok {
				t.Fatalf("GET %s %s: err = %v, want success %v", backend.URL, tt.name, err, tt.ok)
			}
		})
	}
}

// TestACMEMutualTLSChallenge checks the one door mutual TLS opens for the
// TLS-ALPN-01 check: the CA's handshake needs no client certificate, and
// no HTTP request gets through on such a connection.
func TestACMEMutualTLSChallenge(t *testing.T) {
	clientCA := newTestCA(t, "client ca")
	cfg := testConfig()
	cfg.EnableACME = true
	cfg.ACMEHosts = []string{"a.example"}
	cfg.TLSClientCAFile = filepath.Join(t.TempDir(), "clients.pem")
	writeFile(t, cfg.TLSClientCAFile, clientCA.pem)
	s, err := newServer(cfg, testLogger(t))
	if err != nil {
		t.Fatalf("newServer: %v", err)
	}
	t.Cleanup(func() { s.Close() })

	conf := s.tls.config
	if conf.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Fatalf("ClientAuth = %v, want RequireAndVerifyClientCert", conf.ClientAuth)
	}
	for _, tt := range []struct {
		protos     []string
		wantClient tls.ClientAuthType
	}{
		{[]string{"acme-tls/1"}, tls.NoClientCert},
		{[]string{"h2", "http/1.1"}, tls.RequireAndVerifyClientCert},
		{[]string{"acme-tls/1", "http/1.1"}, tls.RequireAndVerifyClientCert},
	} {
		got, err := conf.GetConfigForClient(&tls.ClientHelloInfo{ServerName: "a.example", SupportedProtos: tt.protos})
		if err != nil {
			t.Fatal(err)
		}
		if got == nil {
			got = conf
		}
		if got.ClientAuth != tt.wantClient {
			t.Errorf("ClientAuth for a hello offering %v = %v, want %v", tt.protos, got.ClientAuth, tt.wantClient)
		}
	}

	// A request on a connection without a verified client certificate
	// (what an acme-tls/1 connection is) is refused by the real handler.
	for _, tt := range []struct {
		name  string
		state *tls.ConnectionState
		code  int
	}{
		{"acme-tls/1 connection", &tls.ConnectionState{HandshakeComplete: true, NegotiatedProtocol: "acme-tls/1"}, http.StatusForbidden},
		{"verified client", &tls.ConnectionState{HandshakeComplete: true, VerifiedChains: [][]*x509.Certificate{{clientCA.cert}}}, http.StatusOK},
	} {
		req := httptest.NewRequest("GET", "https://a.example/health", nil)
		req.TLS = tt.state
		rec := httptest.NewRecorder()
		s.handler.ServeHTTP(rec, req)
		if rec.Code != tt.code {
			t.Errorf("GET /health on a %s = %d, want %d", tt.name, rec.Code, tt.code)
		}
		if tt.code != http.StatusOK {
			wantError(t, "GET /health on a "+tt.name, rec.Code, rec.Body.Bytes(), tt.code)
		}
	}
}

// BenchmarkGetCertificate measures what the reload check adds to a
// handshake: with the default interval most calls only read two atomics;
// with 0 interval every call re-reads and compares both files.
func BenchmarkGetCertificate(b *testing.B) {
	ca := newTestCA(b, "bench ca")
	for _, interval := range []time.Duration{time.Second, time.Nanosecond} {
		b.Run("interval="+interval.String(), func(b *testing.B) {
			cfg := tlsTestConfig(b, ca, "bench")
			r, err := newCertReloader(cfg.TLSCertFile, cfg.TLSKeyFile, interval, slog.New(slog.NewTextHandler(io.Discard, nil)))
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if c := r.get(); c == nil {
						b.Fatal("no certificate")
					}
				}
			})
		})
	}
}

// TestRPCToTLSBackend calls, through /rpc, a JSON-RPC backend registered
// with metadata https=true, verified with --client_ca_file.
func TestRPCToTLSBackend(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "backend ca")
	c, k := ca.issue(t, "127.0.0.1", false)
	pair, err := tls.X509KeyPair(c, k)
	if err != nil {
		t.Fatal(err)
	}
	var sawTLS atomic.Bool
	backend := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sawTLS.Store(r.TLS != nil)
		fmt.Fprint(w, `{"id":1,"result":{"secure":true},"error":null}`)
	}))
	backend.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	backend.StartTLS()
	t.Cleanup(backend.Close)

	cfg := testConfig()
	cfg.ClientCAFile = filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, cfg.ClientCAFile, ca.pem)
	_, ts := newTestServer(t, cfg)
	port := backend.Listener.Addr().(*net.TCPAddr).Port
	body := fmt.Sprintf(`{"name":"go.micro.srv.secure","nodes":[{"id":"s1","address":"127.0.0.1","port":%d,"metadata":{"https":"true"}}]}`, port)
	if code, b := do(t, "POST", ts.URL+"/registry", body); code != 200 {
		t.Fatalf("register: %d %s", code, b)
	}
	code, b := do(t, "POST", ts.URL+"/secure/call", `{}`)
	if code != 200 || !strings.Contains(string(b), `"secure":true`) || !sawTLS.Load() {
		t.Fatalf("POST /secure/call = %d %s (backend saw TLS: %v), want the TLS backend's result", code, b, sawTLS.Load())
	}
}

// TestTLSClientCARotation replaces --tls_client_ca_file under a running
// sidecar: a client certificate from the new CA is then accepted, one
// from the old CA refused (new connections, resumed sessions and the next
// request on a connection made before), and a request in flight across
// the reload completes. A broken CA file keeps the last good one.
func TestTLSClientCARotation(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "server ca")
	oldCA, newCA := newTestCA(t, "old client ca"), newTestCA(t, "new client ca")
	cfg := tlsTestConfig(t, ca, "sidecar")
	cfg.Handler = "proxy"
	cfg.ClientRequestTimeout = time.Minute
	cfg.TLSClientCAFile = filepath.Join(t.TempDir(), "clients.pem")
	writeFile(t, cfg.TLSClientCAFile, oldCA.pem)
	s, addr := serveTestServer(t, cfg)
	base := "https://" + addr
	oldCert, newCert := oldCA.keyPair(t, "old app"), newCA.keyPair(t, "new app")

	// get does GET /health on a new connection and returns the status, or
	// the error of a refused handshake. The client sends cert even when
	// the server names other CAs as acceptable (a Go client would send
	// none), so that the server's verification is what refuses it.
	get := func(cert tls.Certificate) (int, error) {
		t.Helper()
		c := httpsClient(t, ca.pool(), false)
		tr := c.Transport.(*http.Transport)
		tr.DisableKeepAlives = true
		tr.TLSClientConfig.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
		resp, err := c.Get(base + "/health")
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	if code, err := get(oldCert); code != http.StatusOK {
		t.Fatalf("GET /health with the old CA's certificate = %d %v, want 200", code, err)
	}
	if code, err := get(newCert); err == nil {
		t.Fatalf("GET /health with the new CA's certificate before the reload = %d, want the handshake refused", code)
	}

	// In flight with the old CA's certificate: a proxied request held by
	// the backend.
	oldClient := httpsClient(t, ca.pool(), false, oldCert)
	oldClient.Timeout = time.Minute
	slow, entered, release := gateBackend(t)
	port := slow.URL[strings.LastIndex(slow.URL, ":")+1:]
	req, _ := http.NewRequest("POST", base+"/registry", strings.NewReader(`{"name":"go.micro.srv.slow","nodes":[{"id":"s1","address":"127.0.0.1","port":`+port+`}]}`))
	resp, err := oldClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("register with the old CA's certificate: %v %v", resp, err)
	}
	resp.Body.Close()
	req, _ = http.NewRequest("GET", base+"/slow/long", nil)
	long := inFlight(t, oldClient, req)
	waitEntered(t, entered, long)

	// A connection made before the reload, kept open for a second request.
	kept, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.pool(), Certificates: []tls.Certificate{oldCert}, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatalf("dial with the old CA's certificate: %v", err)
	}
	defer kept.Close()
	keptReader := bufio.NewReader(kept)
	keptGet := func() (*http.Response, []byte, error) {
		if _, err := io.WriteString(kept, "GET /health HTTP/1.1\r\nHost: sidecar\r\n\r\n"); err != nil {
			return nil, nil, err
		}
		resp, err := http.ReadResponse(keptReader, nil)
		if err != nil {
			return nil, nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp, b, err
	}
	if resp, _, err := keptGet(); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("first request on the kept connection: %v %v", resp, err)
	}
	// A session to resume after the reload (TLS 1.3 tickets and 1.2 IDs).
	sessions := map[uint16]*tls.Config{}
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		conf := &tls.Config{RootCAs: ca.pool(), Certificates: []tls.Certificate{oldCert}, MaxVersion: v,
			ClientSessionCache: tls.NewLRUClientSessionCache(4), NextProtos: []string{"http/1.1"}}
		if code, err := rawGet(addr, conf); err != nil || code != http.StatusOK {
			t.Fatalf("GET /health to cache a %s session = %d %v", tls.VersionName(v), code, err)
		}
		sessions[v] = conf
	}

	reloadsBefore := s.tls.clientCAs.reloads.Load()
	writeFile(t, cfg.TLSClientCAFile, newCA.pem)
	eventually(t, 10*time.Second, "the new CA's certificate accepted", func() bool {
		code, _ := get(newCert)
		return code == http.StatusOK
	})
	if got := s.tls.clientCAs.reloads.Load(); got != reloadsBefore+1 {
		t.Errorf("client CA reloads = %d, want %d", got, reloadsBefore+1)
	}
	if code, err := get(oldCert); err == nil {
		t.Errorf("GET /health with the old CA's certificate after the reload = %d, want the handshake refused", code)
	}
	for v, conf := range sessions {
		code, err := rawGet(addr, conf)
		if err == nil && code != http.StatusForbidden {
			t.Errorf("GET /health resuming a %s session of the old CA's certificate = %d, want it refused", tls.VersionName(v), code)
		}
		t.Logf("resuming a %s session of the old CA's certificate: %d %v", tls.VersionName(v), code, err)
	}
	resp, body, err := keptGet()
	if err != nil {
		t.Fatalf("second request on the kept connection: %v", err)
	}
	wantError(t, "GET /health on a connection of the old CA's certificate", resp.StatusCode, body, http.StatusForbidden)
	if !resp.Close {
		t.Errorf("refusal on the kept connection does not close it")
	}

	release()
	if got := <-long; got != "200 finally" {
		t.Errorf("request in flight across the CA reload = %q, want 200 finally", got)
	}

	// A broken CA file is reported once and the last good CA kept.
	errorsBefore := s.tls.clientCAs.reloadErrors.Load()
	writeFile(t, cfg.TLSClientCAFile, []byte("not pem\n"))
	eventually(t, 10*time.Second, "the broken CA file reported", func() bool {
		get(newCert)
		return s.tls.clientCAs.reloadErrors.Load() > errorsBefore
	})
	if code, err := get(newCert); code != http.StatusOK {
		t.Errorf("GET /health with the new CA's certificate after a broken CA file = %d %v, want 200", code, err)
	}
	if got := s.tls.clientCAs.reloadErrors.Load(); got != errorsBefore+1 {
		t.Errorf("client CA reload errors = %d, want %d: a broken file is reported once", got, errorsBefore+1)
	}
}

// rawGet does GET /health on a new TLS connection made with conf and
// returns the status.
func rawGet(addr string, conf *tls.Config) (int, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, conf)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /health HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n"); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}
