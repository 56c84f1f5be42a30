package main

// registry_sidecar.go is the "sidecar" registry backend: another sidecar's
// /registry HTTP API used as a shared registry. Two sidecars share services
// this way without Consul (the project's CI does): one runs the memory
// registry, the others run --registry sidecar --registry_address pointing
// at it. Changes arrive over its websocket watch: one connection, whatever
// the number of services. Like Consul's, the other sidecar's services are
// fetched when first looked up here; the watch stream keeps the held ones
// fresh and the list of names current. Every call shares one bounded pool
// of connections (remoteClient).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/coder/websocket"
)

const (
	sidecarRegLimit   = 16 << 20        // largest response read from the other sidecar
	sidecarEventLimit = sidecarRegLimit // largest watch event: one registration, as large as a list
)

// sidecarBackend talks to another sidecar's /registry. Safe for
// concurrent use.
type sidecarBackend struct {
	base   string // scheme://host:port
	token  string // sent as a bearer token when set
	timing remoteTiming
	rc     *remoteClient // the one connection pool to the other sidecar, counted
	log    *slog.Logger
}

// newSidecarBackend builds the backend of the sidecar at addr (host:port
// or an http(s) URL); t comes from remoteTimingOf.
func newSidecarBackend(addr, token string, t remoteTiming, logger *slog.Logger) (*sidecarBackend, error) {
	u, err := httpBaseURL(addr)
	if err != nil {
		return nil, fmt.Errorf("registry: sidecar address %q: %w", addr, err)
	}
	return &sidecarBackend{
		base:   u.String(),
		token:  token,
		timing: t,
		rc:     newRemoteClient("sidecar registry", t, 1, logger), // 1: the watch stream
		log:    logger,
	}, nil
}

func (b *sidecarBackend) close() { b.rc.close() }

// watchBudget implements remoteBackend: the one watch stream refreshes
// every held service, so watches cost nothing and every held service has one.
func (b *sidecarBackend) watchBudget() int { return maxRemoteServices }

// metrics implements remoteBackend.
func (b *sidecarBackend) metrics(emit emitFunc) { b.rc.metrics(emit) }

func (b *sidecarBackend) header() http.Header {
	h := http.Header{}
	if b.token != "" {
		h.Set("Authorization", "Bearer "+b.token)
	}
	return h
}

// call sends one request to the other sidecar and decodes its JSON answer.
// Its 404 is errNotFound; a 400, 413 or 507 is errRejected (retrying
// cannot help); any other failure is retried by the cache.
func (b *sidecarBackend) call(ctx context.Context, method, pathQuery string, body any, out any) error {
	ctx, cancel := context.WithTimeout(ctx, b.timing.timeout)
	defer cancel()
	req, err := newJSONRequest(ctx, method, b.base+pathQuery, body)
	if err != nil {
		return fmt.Errorf("%w: %v", errRejected, err)
	}
	maps.Copy(req.Header, b.header())
	_, _, err = callJSON(b.rc.client, req, sidecarRegLimit, out)
	var se *statusError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &se) && se.code == http.StatusNotFound:
		return fmt.Errorf("%w: sidecar registry: %v", errNotFound, se)
	case errors.As(err, &se) && (se.code == http.StatusBadRequest || se.code == http.StatusRequestEntityTooLarge ||
		se.code == http.StatusInsufficientStorage):
		return fmt.Errorf("%w: sidecar registry: %v", errRejected, se)
	case se != nil:
		return fmt.Errorf("sidecar registry: %w", se)
	}
	return fmt.Errorf("sidecar registry: %s %s: %w", method, pathQuery, err)
}

func (b *sidecarBackend) register(ctx context.Context, s *Service, ttl time.Duration) error {
	path := "/registry"
	if ttl > 0 {
		path += "?ttl=" + url.QueryEscape(ttl.String())
	}
	err := b.call(ctx, http.MethodPost, path, s, nil)
	if errors.Is(err, errNotFound) {
		// A 404 on POST means the other end is not a sidecar.
		return fmt.Errorf("%w: %v", errRejected, err)
	}
	return err
}

// forget implements remoteBackend: the other sidecar's registry expires
// its nodes itself, and this backend keeps nothing per node.
func (b *sidecarBackend) forget(*Service) {}

func (b *sidecarBackend) deregister(ctx context.Context, s *Service) error {
	ids := &Service{Name: s.Name}
	for _, n := range s.Nodes {
		ids.Nodes = append(ids.Nodes, &Node{ID: n.ID})
	}
	return b.call(ctx, http.MethodDelete, "/registry", ids, nil)
}

// get returns one service; nil when the other sidecar does not know it.
func (b *sidecarBackend) get(ctx context.Context, name string) (*Service, error) {
	var s Service
	err := b.call(ctx, http.MethodGet, "/registry?service="+url.QueryEscape(name), nil, &s)
	if errors.Is(err, errNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if s.Name != name {
		return nil, fmt.Errorf("sidecar registry: asked for %q, got %q", name, s.Name)
	}
	return &s, nil
}

// fetch implements remoteBackend. The index is unused: the watch stream
// carries every change.
func (b *sidecarBackend) fetch(ctx context.Context, name string) (*Service, uint64, error) {
	svc, err := b.get(ctx, name)
	return svc, 0, err
}

// watch implements remoteBackend: the session's stream already refreshes
// every held service, so there is nothing to do per service.
func (b *sidecarBackend) watch(context.Context, string, uint64, func(*Service, error)) {}

// names reads the names of the other sidecar's services.
func (b *sidecarBackend) names(ctx context.Context) (map[string]struct{}, error) {
	var list []serviceName
	if err := b.call(ctx, http.MethodGet, "/registry", nil, &list); err != nil {
		return nil, err
	}
	names := make(map[string]struct{}, min(len(list), maxRemoteServices))
	for _, n := range list {
		if len(names) >= maxRemoteServices {
			break
		}
		if checkName("name", n.Name) == nil {
			names[n.Name] = struct{}{}
		}
	}
	return names, nil
}

// sync subscribes to the other sidecar's watch, reads the names of its
// services and refreshes the held ones, then follows each event: a held
// service is fetched again, and the list of names is kept current (an
// event of a service not held costs a request only for a "delete", to see
// whether nodes are left). Whenever the stream breaks it reconnects with
// backoff and reads again.
func (b *sidecarBackend) sync(ctx context.Context, sink syncSink) {
	bo := newBackoff(b.timing.minBackoff, b.timing.maxBackoff)
	for {
		err := b.session(ctx, sink, bo)
		if ctx.Err() != nil {
			return
		}
		sink.healthy(false, err)
		d := bo.next()
		b.log.Debug("sidecar registry watch ended", "err", err, "retry_in", d)
		if !sleepCtx(ctx, d) {
			return
		}
	}
}

// session is one connection of the watch; it returns why it ended.
func (b *sidecarBackend) session(ctx context.Context, sink syncSink, bo *backoff) error {
	wsURL := b.base + "/registry"
	dctx, cancel := context.WithTimeout(ctx, b.timing.timeout)
	conn, resp, err := websocket.Dial(dctx, wsURL, &websocket.DialOptions{HTTPClient: b.rc.client, HTTPHeader: b.header()})
	cancel()
	if err != nil {
		if resp != nil && resp.Body != nil {
			resp.Body.Close()
		}
		return fmt.Errorf("sidecar registry: watch %s: %w", wsURL, err)
	}
	conn.SetReadLimit(sidecarEventLimit)
	sctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		stop()
		conn.CloseNow()
		wg.Wait()
	}()
	wg.Add(1)
	go func() { // a hung peer is noticed by a failed ping
		defer wg.Done()
		t := time.NewTicker(b.timing.wait)
		defer t.Stop()
		for {
			select {
			case <-sctx.Done():
				return
			case <-t.C:
			}
			pctx, cancel := context.WithTimeout(sctx, b.timing.timeout)
			err := conn.Ping(pctx)
			cancel()
			if err != nil && sctx.Err() == nil {
				b.log.Debug("sidecar registry ping failed", "err", err)
				conn.CloseNow()
				return
			}
		}
	}()

	// The reader runs while the full load happens, so no event is missed
	// and pongs are read.
	type msg struct {
		data []byte
		err  error
	}
	msgs := make(chan msg, 64)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			_, data, err := conn.Read(sctx)
			select {
			case msgs <- msg{data, err}:
			case <-sctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()

	names, err := b.names(sctx)
	if err != nil {
		return err
	}
	sink.listed(maps.Clone(names))
	for _, name := range sink.heldNames() {
		svc, err := b.get(sctx, name)
		if err != nil {
			return err
		}
		sink.update(name, svc)
	}
	sink.healthy(true, nil)
	bo.reset()
	for {
		var m msg
		select {
		case <-sctx.Done():
			return sctx.Err()
		case m = <-msgs:
		}
		if m.err != nil {
			return fmt.Errorf("sidecar registry: watch: %w", m.err)
		}
		var ev Event
		if err := json.Unmarshal(m.data, &ev); err != nil || ev.Service == nil || ev.Service.Name == "" {
			b.log.Warn("sidecar registry: bad watch event; ignored", "event", snippet(m.data))
			continue
		}
		name := ev.Service.Name
		_, listed := names[name]
		present := ev.Action != "delete"
		if ev.Action == "delete" || sink.holds(name) {
			svc, err := b.get(sctx, name)
			if err != nil {
				return err
			}
			sink.update(name, svc)
			present = svc != nil
		}
		if present != listed && checkName("name", name) == nil && (!present || len(names) < maxRemoteServices) {
			if present {
				names[name] = struct{}{}
			} else {
				delete(names, name)
			}
			sink.listed(maps.Clone(names))
		}
	}
}
