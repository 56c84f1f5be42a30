package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// pebbleVersion is the Pebble that scripts/install-pebble.sh installs.
const pebbleVersion = "v2.10.1"

// pebble is a running Pebble ACME test CA.
type pebble struct {
	dirURL string         // ACME directory
	caFile string         // CA of Pebble's own HTTPS, for --acme_ca_file
	roots  *x509.CertPool // root that signs the certificates Pebble issues
	log    *syncBuffer
}

// startPebble runs Pebble on loopback ports, validating every challenge
// without DNS (PEBBLE_VA_ALWAYS_VALID), and waits until it answers. It
// skips the test when Pebble is not installed.
func startPebble(t *testing.T) *pebble {
	t.Helper()
	bin := requireTool(t, "pebble")
	out, err := exec.Command("go", "env", "GOMODCACHE").Output()
	if err != nil {
		t.Fatalf("go env GOMODCACHE: %v", err)
	}
	src := filepath.Join(strings.TrimSpace(string(out)), "github.com/letsencrypt/pebble/v2@"+pebbleVersion, "test/certs")
	if _, err := os.Stat(filepath.Join(src, "localhost/cert.pem")); err != nil {
		missingTool(t, "pebble %s test certificates not in the module cache: install them with `bash scripts/setup-tests.sh`: %v", pebbleVersion, err)
	}

	apiPort, mgmtPort := freePort(t), freePort(t)
	conf := map[string]any{"pebble": map[string]any{
		"listenAddress":           fmt.Sprintf("127.0.0.1:%d", apiPort),
		"managementListenAddress": fmt.Sprintf("127.0.0.1:%d", mgmtPort),
		"certificate":             filepath.Join(src, "localhost/cert.pem"),
		"privateKey":              filepath.Join(src, "localhost/key.pem"),
		"httpPort":                freePort(t),
		"tlsPort":                 freePort(t),
		"ocspResponderURL":        "",
		"retryAfter":              map[string]int{"authz": 0, "order": 0},
	}}
	b, _ := json.Marshal(conf)
	confFile := filepath.Join(t.TempDir(), "pebble.json")
	if err := os.WriteFile(confFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	p := &pebble{
		dirURL: fmt.Sprintf("https://127.0.0.1:%d/dir", apiPort),
		caFile: filepath.Join(src, "pebble.minica.pem"),
		log:    &syncBuffer{},
	}
	cmd := exec.Command(bin, "-config", confFile)
	cmd.Env = append(os.Environ(), "PEBBLE_VA_NOSLEEP=1", "PEBBLE_VA_ALWAYS_VALID=1", "PEBBLE_WFE_NONCEREJECT=0")
	cmd.Stdout, cmd.Stderr = p.log, p.log
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pebble: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("pebble log:\n%s", p.log)
		}
	})

	pool, err := loadCertPool(p.caFile)
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 2 * time.Second}
	t.Cleanup(client.CloseIdleConnections)
	get := func(url string) ([]byte, error) {
		resp, err := client.Get(url)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		return io.ReadAll(resp.Body)
	}
	eventually(t, 10*time.Second, "pebble answering "+p.dirURL, func() bool {
		_, err := get(p.dirURL)
		return err == nil
	})
	root, err := get(fmt.Sprintf("https://127.0.0.1:%d/roots/0", mgmtPort))
	if err != nil {
		t.Fatalf("pebble root: %v", err)
	}
	p.roots = x509.NewCertPool()
	if !p.roots.AppendCertsFromPEM(root) {
		t.Fatalf("pebble root is not PEM: %q", root)
	}
	return p
}

// acmeConfig is testConfig getting certificates for hosts from p.
func acmeConfig(p *pebble, cacheDir string, hosts ...string) *Config {
	cfg := testConfig()
	cfg.EnableACME = true
	cfg.ACMEHosts = hosts
	cfg.ACMEDirectoryURL = p.dirURL
	cfg.ACMECAFile = p.caFile
	cfg.ACMECacheDir = cacheDir
	cfg.ACMEHTTPAddress = "127.0.0.1:0"
	return cfg
}

// acmeHandshake connects to addr asking for serverName and verifies the
// served chain against roots. Issuing a certificate happens during the
// handshake, hence the long timeout.
func acmeHandshake(addr, serverName string, roots *x509.CertPool) (*x509.Certificate, error) {
	d := &tls.Dialer{Config: &tls.Config{ServerName: serverName, RootCAs: roots}}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState().PeerCertificates[0], nil
}

func TestACMEWithPebble(t *testing.T) {
	p := startPebble(t)
	cache := t.TempDir()
	s, addr := serveTestServer(t, acmeConfig(p, cache, "a.example"))

	// A whitelisted host gets a certificate from Pebble and is served.
	leaf, err := acmeHandshake(addr, "a.example", p.roots)
	if err != nil {
		t.Fatalf("handshake for a.example: %v", err)
	}
	if !slices.Equal(leaf.DNSNames, []string{"a.example"}) || !strings.Contains(leaf.Issuer.CommonName, "Pebble") {
		t.Fatalf("served certificate for %v issued by %q, want a.example by Pebble", leaf.DNSNames, leaf.Issuer.CommonName)
	}
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: p.roots},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
		ForceAttemptHTTP2: true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("https://a.example/health")
	if err != nil {
		t.Fatalf("GET https://a.example/health: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET https://a.example/health = %d, want 200", resp.StatusCode)
	}

	// A host outside the whitelist gets no certificate, and the CA is not
	// asked anything for it.
	requests, denied := s.tls.acmeRequests.Load(), s.tls.acmeDenied.Load()
	if _, err := acmeHandshake(addr, "b.example", nil); err == nil {
		t.Fatal("handshake for b.example (not in --acme_hosts) succeeded, want it refused")
	}
	if got := s.tls.acmeRequests.Load(); got != requests {
		t.Errorf("requests to the CA after the b.example handshake = %d, want %d (none)", got, requests)
	}
	if got := s.tls.acmeDenied.Load(); got != denied+1 {
		t.Errorf("denied hosts = %d, want %d", got, denied+1)
	}
	if log := p.log.String(); strings.Count(log, "Added order") != 1 || strings.Contains(log, "b.example") {
		t.Errorf("pebble saw %d orders (want 1, for a.example), log mentions b.example: %v", strings.Count(log, "Added order"), strings.Contains(log, "b.example"))
	}

	// The HTTP-01 listener redirects whitelisted hosts to HTTPS and
	// refuses the rest with a JSON error.
	httpAddr := s.tls.http01Addr().String()
	_, port, _ := net.SplitHostPort(addr)
	noRedirect := &http.Client{Timeout: 5 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for _, tt := range []struct {
		host     string
		code     int
		location string
	}{
		{"a.example", http.StatusFound, "https://a.example:" + port + "/health?x=1"},
		{"b.example", http.StatusNotFound, ""},
	} {
		req, _ := http.NewRequest("GET", "http://"+httpAddr+"/health?x=1", nil)
		req.Host = tt.host
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatalf("GET http://%s/health on the HTTP-01 listener: %v", tt.host, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.code || resp.Header.Get("Location") != tt.location {
			t.Errorf("GET http://%s/health = %d Location %q, want %d %q", tt.host, resp.StatusCode, resp.Header.Get("Location"), tt.code, tt.location)
		}
		if tt.code != http.StatusFound {
			wantError(t, "GET http://"+tt.host+"/health", resp.StatusCode, body, tt.code)
		}
	}

	// A restarted sidecar serves the cached certificate without asking
	// the CA.
	s2, addr2 := serveTestServer(t, acmeConfig(p, cache, "a.example"))
	leaf2, err := acmeHandshake(addr2, "a.example", p.roots)
	if err != nil {
		t.Fatalf("handshake with the restarted sidecar: %v", err)
	}
	if !leaf2.Equal(leaf) || s2.tls.acmeRequests.Load() != 0 {
		t.Errorf("restarted sidecar: same certificate %v, %d requests to the CA; want the cached one and none", leaf2.Equal(leaf), s2.tls.acmeRequests.Load())
	}
}
