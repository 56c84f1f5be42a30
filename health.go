package main

// health.go owns app mode: the app named by --server_name and
// --server_address is registered with a TTL the sidecar heartbeats, checked
// at --healthcheck_url, deregistered while it fails and on shutdown; and
// GET /health, which reports the sidecar's and the app's state.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"time"
)

const (
	// healthFailures consecutive failed checks deregister the app.
	healthFailures = 3
	// healthRises consecutive passed checks register it again.
	healthRises = 2
)

// appState is the app's health as /health reports it.
type appState struct {
	Name                string    `json:"name"`
	Address             string    `json:"address"`
	NodeID              string    `json:"node_id"`
	Healthy             bool      `json:"healthy"`
	Registered          bool      `json:"registered"`
	HealthcheckURL      string    `json:"healthcheck_url,omitempty"`
	LastCheck           time.Time `json:"last_check,omitzero"`
	LastError           string    `json:"last_error,omitempty"`
	ConsecutiveFailures int       `json:"consecutive_failures"`
}

// appChecker registers the app, heartbeats its registration and checks its
// health, in two goroutines so that a slow check never delays the
// heartbeat (a check may take longer than the TTL: --healthcheck_timeout
// is not bounded by the other durations). Safe for concurrent use; Close
// stops both loops and waits for them.
type appChecker struct {
	cfg    *Config
	reg    Registry
	log    *slog.Logger
	client *http.Client
	svc    *Service // the app's registration; never modified

	mu    sync.Mutex // guards st and rises
	st    appState
	rises int

	// regMu serializes the app's registry writes and is held across the
	// call, by design: the heartbeat's renewal and the checks' deregister
	// must not cross, or a renewal that began before a failed check
	// would register an unhealthy app after its deregistration.
	regMu sync.Mutex

	cancel    context.CancelFunc
	wg        sync.WaitGroup // the heartbeat and check loops
	startOnce sync.Once
	closeOnce sync.Once
}

func newAppChecker(cfg *Config, reg Registry, logger *slog.Logger) (*appChecker, error) {
	host, port, err := splitHostPort(cfg.ServerAddress)
	if err != nil {
		return nil, fmt.Errorf("flag --server_address: %w", err)
	}
	id := make([]byte, 8)
	rand.Read(id)
	node := &Node{ID: cfg.ServerName + "-" + hex.EncodeToString(id), Address: host, Port: port}
	a := &appChecker{
		cfg:    cfg,
		reg:    reg,
		log:    logger,
		client: &http.Client{Timeout: cfg.HealthcheckTimeout},
		svc:    &Service{Name: cfg.ServerName, Nodes: []*Node{node}},
	}
	a.st = appState{
		Name:           cfg.ServerName,
		Address:        cfg.ServerAddress,
		NodeID:         node.ID,
		HealthcheckURL: cfg.HealthcheckURL,
		Healthy:        cfg.HealthcheckURL == "", // no check: assumed healthy
	}
	a.client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return a, nil
}

// start registers the app (at once without a health URL, after its first
// passed check with one) and runs the heartbeat and the checks.
func (a *appChecker) start(ctx context.Context) {
	a.startOnce.Do(func() {
		ctx, a.cancel = context.WithCancel(ctx)
		a.wg.Add(1)
		go a.loop(ctx)
		if a.cfg.HealthcheckURL != "" {
			a.wg.Add(1)
			go a.checkLoop(ctx)
		}
	})
}

// loop is the heartbeat: it renews the registration of a healthy app, or
// retries one the registry refused.
func (a *appChecker) loop(ctx context.Context) {
	defer a.wg.Done()
	heartbeat := time.NewTicker(a.cfg.RegisterInterval)
	defer heartbeat.Stop()
	if a.cfg.HealthcheckURL == "" {
		a.sync(ctx)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-heartbeat.C:
			a.sync(ctx)
		}
	}
}

// checkLoop checks the app, one check at a time: the next check begins
// --healthcheck_interval after the previous one began, or as soon as it
// ends if it took longer. Checks never overlap, so a slow app is not sent
// a pile of them, as Docker, Kubernetes and Consul also do.
func (a *appChecker) checkLoop(ctx context.Context) {
	defer a.wg.Done()
	next := time.NewTimer(0)
	defer next.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-next.C:
		}
		began := time.Now()
		a.check(ctx)
		next.Reset(max(0, a.cfg.HealthcheckInterval-time.Since(began)))
	}
}

// check probes the health URL once and moves the app between registered
// and deregistered after enough consecutive results.
func (a *appChecker) check(ctx context.Context) {
	err := a.probe(ctx)
	if ctx.Err() != nil {
		return // shutting down; the result means nothing
	}
	a.mu.Lock()
	a.st.LastCheck = time.Now()
	first := a.st.LastError == "" && a.st.ConsecutiveFailures == 0 && !a.st.Registered
	var changed bool
	if err != nil {
		a.st.LastError = err.Error()
		a.st.ConsecutiveFailures++
		a.rises = 0
		if a.st.ConsecutiveFailures >= healthFailures && a.st.Healthy {
			a.st.Healthy = false
			changed = true
		}
	} else {
		a.st.LastError = ""
		a.st.ConsecutiveFailures = 0
		a.rises++
		if !a.st.Healthy && (first || a.rises >= healthRises) {
			a.st.Healthy = true
		}
		changed = a.st.Healthy && !a.st.Registered
	}
	a.mu.Unlock()

	if err != nil {
		a.log.Warn("app health check failed", "url", a.cfg.HealthcheckURL, "err", err)
	}
	if changed {
		a.sync(ctx)
	}
}

// sync makes the registry agree with the app's health: a healthy app is
// registered (or its TTL renewed), an unhealthy one deregistered. The
// health is read under regMu, so writes happen in the order of the
// health changes.
func (a *appChecker) sync(ctx context.Context) {
	a.regMu.Lock()
	defer a.regMu.Unlock()
	st := a.state()
	switch {
	case st.Healthy:
		a.register(ctx)
	case st.Registered:
		a.log.Warn("app unhealthy; deregistering", "service", a.svc.Name, "failures", healthFailures)
		a.deregisterLocked(ctx)
	}
}

// probe GETs the health URL; any answer but 2xx, or none in time, fails.
func (a *appChecker) probe(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.cfg.HealthcheckURL, nil)
	if err != nil {
		return err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return fmt.Errorf("health: check %s: %w", a.cfg.HealthcheckURL, err)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("health: check %s: status %d", a.cfg.HealthcheckURL, resp.StatusCode)
	}
	return nil
}

// register registers (or renews) the app's node with the TTL. The caller
// holds regMu.
func (a *appChecker) register(ctx context.Context) {
	err := a.reg.Register(ctx, a.svc, a.cfg.RegisterTTL)
	a.mu.Lock()
	was := a.st.Registered
	a.st.Registered = err == nil
	a.mu.Unlock()
	switch {
	case err != nil:
		a.log.Error("register app", "service", a.svc.Name, "err", err)
	case !was:
		a.log.Info("app registered", "service", a.svc.Name, "node", a.svc.Nodes[0].ID, "ttl", a.cfg.RegisterTTL)
	}
}

// deregister removes the app's node. The server calls it on shutdown
// before draining, so no new traffic is routed to a stopping app.
func (a *appChecker) deregister(ctx context.Context) {
	a.regMu.Lock()
	defer a.regMu.Unlock()
	a.deregisterLocked(ctx)
}

// deregisterLocked is deregister with regMu held.
func (a *appChecker) deregisterLocked(ctx context.Context) {
	a.mu.Lock()
	was := a.st.Registered
	a.st.Registered = false
	a.mu.Unlock()
	if !was {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), remoteTimingOf(a.cfg).timeout)
	defer cancel()
	if err := a.reg.Deregister(ctx, a.svc); err != nil {
		a.log.Warn("deregister app", "service", a.svc.Name, "err", err)
		return
	}
	a.log.Info("app deregistered", "service", a.svc.Name)
}

// state returns a copy of the app's health.
func (a *appChecker) state() appState {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.st
}

// Close stops the loop and waits for it. It does not deregister: shutdown
// does that first, while the registry is still up. Idempotent.
func (a *appChecker) Close() error {
	a.closeOnce.Do(func() {
		started := true
		a.startOnce.Do(func() { started = false })
		if started {
			a.cancel()
			a.wg.Wait()
		}
	})
	return nil
}

// handleHealth reports the sidecar's and the app's state (and with
// --broker nats the NATS connection). It answers 503 while the sidecar
// drains, while the app fails its checks, or while NATS is out of reach
// beyond --broker_health_grace, so a load balancer or orchestrator stops
// sending traffic.
func (s *server) handleHealth(w http.ResponseWriter, r *http.Request) {
	status, code := "ok", http.StatusOK
	if s.draining.Load() {
		status, code = "draining", http.StatusServiceUnavailable
	}
	resp := map[string]any{
		"status": status,
		"sidecar": map[string]any{
			"status":  status,
			"started": s.started.UTC().Format(time.RFC3339),
			"uptime":  time.Since(s.started).Round(time.Second).String(),
		},
	}
	if s.app != nil {
		st := s.app.state()
		resp["app"] = st
		switch {
		case !st.Healthy && code == http.StatusOK:
			resp["status"], code = "unhealthy", http.StatusServiceUnavailable
		case !st.Registered && code == http.StatusOK:
			// Healthy but not in the registry (it refused; retried on each
			// heartbeat): callers cannot find the app, yet restarting it
			// would not help, so the answer stays 200.
			resp["status"] = "degraded"
		}
	}
	if s.nats != nil {
		// Disconnected from NATS past the grace period: this sidecar's
		// pub/sub is cut off from the others, so it answers 503.
		st, ok := s.nats.health()
		resp["broker"] = st
		if !ok && code == http.StatusOK {
			resp["status"], code = "degraded", http.StatusServiceUnavailable
		}
	}
	writeJSON(w, code, resp)
}
