package main

import (
	"context"
	"errors"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"
)

// component is what the lifecycle idiom asks of every component: newX
// builds and starts nothing, start(ctx) begins its background work until
// ctx ends or Close, and Close is idempotent and returns once every
// goroutine it owns has exited.
type component interface {
	start(context.Context)
	Close() error
}

// goroutinesIn returns the stacks of the goroutines running any of fns,
// functions of this package as a stack trace names them without the
// package ("(*broker).pinger("); a name without "(" matches as a prefix
// ("(*tlsManager).start.func").
func goroutinesIn(fns []string) []string {
	pkg := runtime.FuncForPC(reflect.ValueOf(newBroker).Pointer()).Name()
	pkg = strings.TrimSuffix(pkg, "newBroker") // "sidecar.": the module's path
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		for _, fn := range fns {
			if strings.Contains(g, "\n"+pkg+fn) {
				out = append(out, g)
				break
			}
		}
	}
	return out
}

// wantNone fails unless no goroutine runs fns now.
func wantNone(t *testing.T, when string, fns []string) {
	t.Helper()
	if gs := goroutinesIn(fns); len(gs) > 0 {
		t.Fatalf("%s: %d goroutines of %v run, want none:\n%s", when, len(gs), fns, strings.Join(gs, "\n\n"))
	}
}

// exited fails unless no goroutine runs fns once a short grace has passed.
// Close's WaitGroup.Wait returns as soon as a goroutine's deferred Done
// runs, a few instructions before that goroutine is gone from the stack
// dump; on a loaded machine it may not run again for a while. The grace is
// far shorter than the loops and waits these goroutines do.
func exited(t *testing.T, when string, fns []string) {
	t.Helper()
	deadline := time.Now().Add(500 * time.Millisecond)
	for len(goroutinesIn(fns)) > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	wantNone(t, when, fns)
}

// awaitGoroutines waits until some goroutine runs fns (running) or none
// does.
func awaitGoroutines(t *testing.T, when string, fns []string, running bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for (len(goroutinesIn(fns)) > 0) != running {
		if time.Now().After(deadline) {
			t.Fatalf("%s: goroutines of %v running = %v after 10s, want %v", when, fns, !running, running)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestLifecycle holds every component with background work to the idiom:
// nothing runs after newX (and what run does before start: listen,
// setAdvertise); start begins it; the end of start's context ends it
// without Close; Close returns only after its goroutines have exited, and
// again at once; a component closed before start never starts. It does not
// run in parallel: it finds a component's goroutines by their functions,
// and no parallel test runs while a sequential one does.
func TestLifecycle(t *testing.T) {
	logger := discardLogger()
	tests := []struct {
		name  string
		fns   []string // the functions its goroutines run
		build func(t *testing.T) component
	}{
		{"memory registry", []string{"(*memoryRegistry).sweepLoop("}, func(t *testing.T) component {
			return newMemoryRegistry(time.Millisecond, time.Now, logger)
		}},
		{"cached registry", []string{"(*cachedRegistry).resendLoop(", "(*cachedRegistry).sweepLoop(", "(*sidecarBackend).sync("},
			func(t *testing.T) component {
				_, ts := newTestServer(t, nil) // the other sidecar whose registry it uses
				reg, err := newRegistry(remoteConfig("sidecar", ts.URL), logger)
				if err != nil {
					t.Fatal(err)
				}
				return reg
			}},
		{"broker", []string{"(*broker).pinger("}, func(t *testing.T) component {
			return newBroker(testConfig(), newStreams(newCORSPolicy(nil)), logger)
		}},
		{"peer broker", []string{"(*peerBroker).registrar(", "(*peerBroker).watchPeers("}, func(t *testing.T) component {
			cfg := testConfig()
			reg := newMemoryRegistry(time.Second, time.Now, logger)
			t.Cleanup(func() { reg.Close() })
			p := newPeerBroker(cfg, reg, newBroker(cfg, newStreams(newCORSPolicy(nil)), logger), nil, logger)
			p.setAdvertise("127.0.0.1", 9, false) // as run does before start
			return p
		}},
		{"stats", []string{"(*stats).sampleLoop("}, func(t *testing.T) component {
			return newStats(statsConfig(), logger)
		}},
		{"app checker", []string{"(*appChecker).loop(", "(*appChecker).checkLoop("}, func(t *testing.T) component {
			cfg := testConfig()
			cfg.ServerName, cfg.ServerAddress = "go.micro.srv.app", "127.0.0.1:9"
			cfg.HealthcheckURL = "http://127.0.0.1:9/health"
			reg := newMemoryRegistry(time.Second, time.Now, logger)
			t.Cleanup(func() { reg.Close() })
			a, err := newAppChecker(cfg, reg, logger)
			if err != nil {
				t.Fatal(err)
			}
			return a
		}},
		{"tls manager, HTTP-01 listener", []string{"(*tlsManager).start.func"}, func(t *testing.T) component {
			cfg := testConfig()
			cfg.EnableACME = true
			cfg.ACMEHosts = []string{"a.example"}
			cfg.ACMECacheDir = t.TempDir()
			cfg.ACMEHTTPAddress = "127.0.0.1:0"
			m, err := newTLSManager(cfg, logger)
			if err != nil {
				t.Fatal(err)
			}
			ln, err := m.listen("127.0.0.1:0") // as run does before start
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			return m
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := tt.build(t)
			t.Cleanup(func() { c.Close() })
			wantNone(t, "after newX", tt.fns)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			c.start(ctx)
			awaitGoroutines(t, "after start", tt.fns, true)
			cancel()
			awaitGoroutines(t, "after start's context ended", tt.fns, false)
			if err := errors.Join(c.Close(), c.Close()); err != nil {
				t.Fatalf("Close after the context ended: %v", err)
			}

			c = tt.build(t)
			t.Cleanup(func() { c.Close() })
			c.start(context.Background())
			awaitGoroutines(t, "after start", tt.fns, true)
			if err := c.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			exited(t, "once Close returned", tt.fns)
			if err := c.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}

			c = tt.build(t)
			if err := c.Close(); err != nil {
				t.Fatalf("Close before start: %v", err)
			}
			c.start(context.Background())
			wantNone(t, "start after Close", tt.fns)
		})
	}
}

// TestPeerBrokerCloseDeregisters: the peer broker's Close returns only
// after its registrar has deregistered this sidecar's nodes, so the
// registry, closed next, no longer lists them.
func TestPeerBrokerCloseDeregisters(t *testing.T) {
	t.Parallel()
	logger := discardLogger()
	cfg := testConfig()
	cfg.BrokerAddress = "127.0.0.1:9" // shares its topics at once
	reg := newMemoryRegistry(time.Second, time.Now, logger)
	t.Cleanup(func() { reg.Close() })
	p := newPeerBroker(cfg, reg, newBroker(cfg, newStreams(newCORSPolicy(nil)), logger), nil, logger)
	p.start(context.Background())
	p.setAdvertise("127.0.0.1", 9, false)
	eventually(t, 5*time.Second, "the broker node registered", func() bool {
		_, err := reg.GetService(context.Background(), brokerService)
		return err == nil
	})
	p.Close()
	if svc, err := reg.GetService(context.Background(), brokerService); !errors.Is(err, errNotFound) {
		t.Fatalf("GetService(%s) once Close returned = %v, %v; want errNotFound", brokerService, svc, err)
	}
}
