package main

// registry_watch.go owns the watches of a registry: the index of its
// events, the history of recent events that lets a watch resume
// (?since=N), the fan-out of each event to the open watches as one
// websocket frame shared by all of them (written straight to each
// connection, as the broker writes its messages: broker_ws.go), the bound
// of each watch's queue, and the websocket handler of GET /registry.
//
// Memory: an event is encoded once, by the first watch that writes it (a
// registration nobody watches encodes nothing), and every watch queue and
// the history hold a pointer to it and its bytes. Each queue is bounded in
// events and in bytes, and since all queues are suffixes of the same
// stream, what the watches hold together is at most what the slowest one
// holds, whatever their number.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/coder/websocket"
)

const (
	watchBuffer         = 256      // events a watch may lag before it is dropped
	watchBufferBytes    = 4 << 20  // bytes a watch may lag (one event of any size fits an empty queue)
	defaultWatchHistory = 1000     // events kept for ?since= (--registry_history)
	watchHistoryBytes   = 16 << 20 // bytes kept for ?since=, however many events that is
	maxSnapshotsShared  = 1024     // snapshots kept for watches that start at the same index
	indexHeader         = "X-Registry-Index"
)

// watchOptions selects what a watch delivers.
type watchOptions struct {
	service string // only this service's events; "" for every service
	since   uint64 // with resume: the index of the last event the client has
	resume  bool   // replay the events after since, or start with a snapshot
}

// snapshotFrame is the first frame of a watch that resumes from an index
// the history no longer covers (or from another run of the sidecar): the
// whole registry, or the one watched service, at Index. The client
// replaces what it knew with it.
type snapshotFrame struct {
	Action   string     `json:"action"` // "snapshot"
	Index    uint64     `json:"index"`
	Services []*Service `json:"services"`
}

// watchEvent is an event as watches receive it. Once sent it is immutable
// and shared by every watch and the history; its JSON frame is encoded on
// first use, by whichever watch writes it first, outside the registry's
// lock.
type watchEvent struct {
	Event
	services []*Service // a snapshot's services (Action "snapshot")
	size     int        // about the bytes of its frame, for the bounds; 0 for a snapshot
	once     sync.Once
	data     []byte
	err      error
}

// frame returns e as a complete websocket text frame of its JSON, which
// every watch writes as is (wsConn.writeFrames).
func (e *watchEvent) frame() ([]byte, error) {
	e.once.Do(func() {
		var payload []byte
		if e.Action == "snapshot" {
			payload, e.err = json.Marshal(snapshotFrame{Action: e.Action, Index: e.Index, Services: e.services})
		} else {
			payload, e.err = json.Marshal(e.Event)
		}
		if e.err == nil {
			e.data = textFrame(payload)
		}
	})
	return e.data, e.err
}

// eventSize is about the size of the JSON of an event of s, counted
// without encoding it: the bounds of queues and the history need a size
// before anyone writes the event.
func eventSize(s *Service) int {
	n := 96 + len(s.Name) + len(s.Version) + mapSize(s.Metadata)
	for _, e := range s.Endpoints {
		if e != nil {
			n += 48 + len(e.Name) + len(e.Request) + len(e.Response) + mapSize(e.Metadata)
		}
	}
	for _, nd := range s.Nodes {
		n += 64 + len(nd.ID) + len(nd.Address) + len(nd.Version) + mapSize(nd.Metadata)
	}
	return n
}

func mapSize(m map[string]string) int {
	n := 2
	for k, v := range m {
		n += len(k) + len(v) + 6
	}
	return n
}

// watchers is a registry's side of its watches: the index of the latest
// event, the history of recent events and the open watches. The
// registry's mutex guards it: it is held for every method, and add is
// given it for the removal when a watch's context ends. Sending under that
// lock keeps events, and their indexes, in the order the changes happened.
type watchers struct {
	log     *slog.Logger
	set     map[*watcher]struct{}
	last    uint64 // index of the latest event
	history history
	snaps   map[string]*watchEvent // snapshots at index last, by service ("" for all)
}

func newWatchers(logger *slog.Logger) watchers {
	return watchers{
		log: logger,
		set: map[*watcher]struct{}{},
		// Indexes start at the start-up time in microseconds. An index
		// from an earlier run of the sidecar is then older than its
		// history, and a watch resuming from it starts with a snapshot
		// rather than replaying events that are not the ones it missed.
		last:    uint64(time.Now().UnixMicro()),
		history: history{max: defaultWatchHistory},
	}
}

// setHistory sets how many recent events are kept for watches that resume
// (--registry_history); 0 keeps none. Call it before the first event.
func (w *watchers) setHistory(events int) {
	w.history = history{max: max(events, 0)}
}

// empty reports whether an event sent now would reach no one: no watch is
// open and no history is kept for one that resumes later.
func (w *watchers) empty() bool { return len(w.set) == 0 && w.history.max == 0 }

// index returns the index of the latest event.
func (w *watchers) index() uint64 { return w.last }

// add opens a watch until ctx ends; mu is the owner's lock, held by the
// caller now and taken again for the removal. snapshot returns the
// registry's services (one, for a service watch) under that lock, for a
// watch whose resume point the history does not cover.
func (w *watchers) add(ctx context.Context, mu *sync.Mutex, opts watchOptions, snapshot func(service string) []*Service) *watcher {
	x := newWatcher(opts.service, w.last)
	if opts.resume {
		if evs, ok := w.history.after(opts.since, w.last, opts.service); ok {
			x.preload(evs)
		} else {
			x.preload([]*watchEvent{w.snapshot(opts.service, snapshot)})
			x.snapshot = true
		}
	}
	w.set[x] = struct{}{}
	context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		w.remove(x, false)
	})
	return x
}

// snapshot returns the snapshot of service at the current index, shared
// with the other watches that start before the next event.
func (w *watchers) snapshot(service string, build func(string) []*Service) *watchEvent {
	if e := w.snaps[service]; e != nil {
		return e
	}
	svcs := build(service)
	if svcs == nil {
		svcs = []*Service{}
	}
	e := &watchEvent{Event: Event{Action: "snapshot", Index: w.last}, services: svcs}
	if w.snaps == nil {
		w.snaps = map[string]*watchEvent{}
	}
	if len(w.snaps) < maxSnapshotsShared {
		w.snaps[service] = e
	}
	return e
}

// send gives the next index to ev, keeps it in the history and queues it
// for every watch of its service without blocking; a watch whose queue is
// full is dropped.
func (w *watchers) send(ev Event) {
	ev.Index = w.last + 1
	e := &watchEvent{Event: ev, size: eventSize(ev.Service)}
	w.last = ev.Index
	w.history.push(e)
	clear(w.snaps)
	for x := range w.set {
		if x.service != "" && x.service != ev.Service.Name {
			continue
		}
		if !x.push(e) {
			w.remove(x, true)
			w.log.Warn("watcher fell behind; dropped", "service", x.service, "index", ev.Index)
		}
	}
}

// remove ends watch x; behind says it fell behind.
func (w *watchers) remove(x *watcher, behind bool) {
	if _, ok := w.set[x]; ok {
		delete(w.set, x)
		x.end(behind)
	}
}

// closeAll ends every watch.
func (w *watchers) closeAll() {
	for x := range w.set {
		w.remove(x, false)
	}
}

// history holds the latest events, oldest first, at most max of them and
// at most watchHistoryBytes (always the latest one). Their indexes follow
// each other without a gap. Guarded by the registry's mutex.
type history struct {
	max   int           // most events kept
	ring  []*watchEvent // allocated at the first event
	start int           // position of the oldest event in ring
	n     int           // events held
	bytes int           // bytes of the events held
}

func (h *history) push(e *watchEvent) {
	if h.max == 0 {
		return
	}
	if h.ring == nil {
		h.ring = make([]*watchEvent, h.max)
	}
	for h.n > 0 && (h.n == h.max || h.bytes+e.size > watchHistoryBytes) {
		old := h.ring[h.start]
		h.ring[h.start] = nil
		h.start = (h.start + 1) % h.max
		h.n--
		h.bytes -= old.size
	}
	h.ring[(h.start+h.n)%h.max] = e
	h.n++
	h.bytes += e.size
}

func (h *history) at(i int) *watchEvent { return h.ring[(h.start+i)%h.max] }

// after returns the events of service ("" for all) after index since,
// where last is the latest index. ok is false when the history does not
// hold every event after since: since is older than the history, or newer
// than last (an index of another run of the sidecar).
func (h *history) after(since, last uint64, service string) (evs []*watchEvent, ok bool) {
	if since == last {
		return nil, true
	}
	if since > last || h.n == 0 || since+1 < h.at(0).Index {
		return nil, false
	}
	for i := int(since + 1 - h.at(0).Index); i < h.n; i++ {
		if e := h.at(i); service == "" || e.Service.Name == service {
			evs = append(evs, e)
		}
	}
	return evs, true
}

// watcher is one open watch: the events its reader has not taken yet,
// bounded in number and in bytes. The events are shared with the other
// watches and the history: the queue holds pointers, never copies. Safe
// for concurrent use: the registry pushes, one reader takes.
type watcher struct {
	service  string             // only this service's events; "" for all
	start    uint64             // the registry's index when the watch began
	snapshot bool               // the watch starts with a snapshot
	ready    chan struct{}      // signalled (buffer 1) when events are queued or the watch ends
	ctx      context.Context    // ends when the watch does: a write in progress stops
	cancel   context.CancelFunc // called by end

	mu        sync.Mutex // guards the fields below
	queue     []*watchEvent
	bytes     int  // of the events in queue
	maxEvents int  // watchBuffer, plus what a resume preloaded, until taken
	maxBytes  int  // watchBufferBytes, likewise
	ended     bool // no more events: the registry dropped or closed the watch
	behind    bool // it ended because it fell behind
}

func newWatcher(service string, start uint64) *watcher {
	ctx, cancel := context.WithCancel(context.Background())
	return &watcher{
		service:   service,
		start:     start,
		ready:     make(chan struct{}, 1),
		ctx:       ctx,
		cancel:    cancel,
		maxEvents: watchBuffer,
		maxBytes:  watchBufferBytes,
	}
}

func (x *watcher) signal() {
	select {
	case x.ready <- struct{}{}:
	default:
	}
}

// preload queues the events a resume replays (or its snapshot), beyond
// the usual bounds: they are what the client asked for.
func (x *watcher) preload(evs []*watchEvent) {
	x.mu.Lock()
	for _, e := range evs {
		x.bytes += e.size
	}
	x.queue = append(x.queue, evs...)
	x.maxEvents += len(evs)
	x.maxBytes += x.bytes
	x.mu.Unlock()
	x.signal()
}

// push queues e, reporting false when the queue is full (the registry
// then drops the watch).
func (x *watcher) push(e *watchEvent) bool {
	x.mu.Lock()
	if len(x.queue) >= x.maxEvents || len(x.queue) > 0 && x.bytes+e.size > x.maxBytes {
		x.mu.Unlock()
		return false
	}
	x.queue = append(x.queue, e)
	x.bytes += e.size
	x.mu.Unlock()
	x.signal()
	return true
}

// take returns the queued events, giving buf (emptied) to the queue in
// their place so that a reader allocates nothing in the steady state. ok
// is false once the watch has ended; its queue is then empty.
func (x *watcher) take(buf []*watchEvent) (evs []*watchEvent, ok bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	evs, x.queue = x.queue, buf[:0]
	x.bytes, x.maxEvents, x.maxBytes = 0, watchBuffer, watchBufferBytes
	return evs, !x.ended
}

// end closes the watch, dropping what it had queued so the memory goes at
// once.
func (x *watcher) end(behind bool) {
	x.mu.Lock()
	x.ended, x.behind = true, behind
	clear(x.queue)
	x.queue, x.bytes = nil, 0
	x.mu.Unlock()
	x.cancel()
	x.signal()
}

// fellBehind reports whether the registry dropped the watch for falling
// behind.
func (x *watcher) fellBehind() bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.behind
}

// events yields the watch's events until it ends, for a reader that waits
// for nothing else.
func (x *watcher) events() iter.Seq[*watchEvent] {
	return func(yield func(*watchEvent) bool) {
		var buf []*watchEvent
		for range x.ready {
			evs, ok := x.take(buf)
			for _, e := range evs {
				if !yield(e) {
					return
				}
			}
			clear(evs)
			buf = evs
			if !ok {
				return
			}
		}
	}
}

// parseWatch reads the watch options of a GET /registry query: ?service=
// (already checked by the caller) and ?since=N.
func parseWatch(service string, q map[string][]string) (watchOptions, error) {
	opts := watchOptions{service: service}
	if v, ok := q["since"]; ok {
		n, err := strconv.ParseUint(v[0], 10, 64)
		if err != nil {
			return opts, fmt.Errorf("since %q is not an index (a non-negative integer, from X-Registry-Index or an event's index)", v[0])
		}
		opts.since, opts.resume = n, true
	}
	return opts, nil
}

// watch streams registry events to a websocket client, one text frame
// each, until the client leaves, falls behind, or the sidecar shuts down.
func (a *registryAPI) watch(w http.ResponseWriter, r *http.Request, opts watchOptions) {
	if n := a.watching.Add(1); n > int64(a.maxWatchers) {
		a.watching.Add(-1)
		a.refused.Add(1)
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, "registry: %d watches are open, the most --registry_max_watchers allows; try again later", a.maxWatchers)
		return
	}
	defer a.watching.Add(-1)
	// Watch before the handshake completes, so a client that is connected
	// sees every change made after that.
	wctx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	x, err := a.reg.Watch(wctx, opts)
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, "watch: %v", err)
		return
	}
	switch {
	case x.snapshot:
		a.snapshots.Add(1)
	case opts.resume:
		a.resumes.Add(1)
	}
	w.Header().Set(indexHeader, strconv.FormatUint(x.start, 10))
	// The library does the handshake, reads, and writes the control
	// frames; the events, encoded once as whole frames, go straight to
	// the connection (broker_ws.go says why that is safe), a batch per
	// write, without the library's per-message writer.
	hj := &wsHijacker{ResponseWriter: w, readTimeout: 2 * a.pingInterval, writeTimeout: a.writeTimeout}
	conn, ctx, done := a.streams.accept(hj, r, 1024)
	if conn == nil {
		return
	}
	defer done()
	wc := hj.conn
	// A watch the registry drops (it fell behind) stops writing at once:
	// the write in progress fails on a deadline in the past. The close
	// frame that follows waits until that is done (quiet), so the past
	// deadline cannot land on it.
	interrupted := make(chan struct{})
	stopWrites := context.AfterFunc(x.ctx, func() {
		wc.interruptData()
		close(interrupted)
	})
	quiet := func() {
		if !stopWrites() {
			<-interrupted
		}
	}
	defer stopWrites()
	// Watchers only listen: CloseRead answers control frames, closes the
	// connection on any data frame, and its context ends when the client
	// leaves. It gets its own context because cancelling the one it is
	// given drops the connection without a close frame.
	gone := conn.CloseRead(context.Background())
	ping := time.NewTicker(a.pingInterval)
	defer ping.Stop()
	var (
		batch  []*watchEvent
		frames [][]byte
	)
	// send writes the events queued for x; false when the connection is
	// done with (closed, or to be closed as behind).
	send := func() bool {
		evs, _ := x.take(batch)
		var err error
		frames, err = a.writeEvents(wc, x, evs, frames)
		clear(evs)
		batch = evs[:0]
		clear(frames)
		if errors.Is(err, errDataStopped) && x.ctx.Err() != nil {
			return true // dropped before a byte went out: the caller closes saying why
		}
		if err != nil {
			if x.fellBehind() || (x.ctx.Err() == nil && errors.Is(err, os.ErrDeadlineExceeded)) {
				a.slow.Add(1)
			}
			conn.CloseNow()
			return false
		}
		return true
	}
	for {
		select {
		case <-x.ready:
			if !send() {
				return
			}
			if x.ctx.Err() != nil {
				code, reason := a.streams.closeStatus()
				if x.fellBehind() {
					a.slow.Add(1)
					code, reason = websocket.StatusTryAgainLater, "watcher fell behind"
				}
				quiet()
				conn.Close(code, reason)
				return
			}
		case <-ping.C:
			pctx, cancel := context.WithTimeout(x.ctx, a.writeTimeout)
			err := conn.Ping(pctx)
			cancel()
			// A ping cut short because the registry dropped the watch
			// is no sign of a dead client: the x.ready case, which the
			// drop signalled, says why it closes.
			if err != nil && x.ctx.Err() == nil {
				conn.CloseNow()
				return
			}
		case <-gone.Done():
			conn.CloseNow()
			return
		case <-ctx.Done():
			// select picks at random among ready cases, so events may
			// still wait here: shutdown deregisters the app and closes
			// the streams right after. What was queued before goes out
			// first, then the goodbye.
			if !send() {
				return
			}
			code, reason := a.streams.closeStatus()
			if x.ctx.Err() != nil {
				quiet()
			}
			conn.Close(code, reason)
			return
		}
	}
}

// writeEvents writes the frames of evs to c in as few writes as fit,
// within the write timeout, so a client that stopped reading cannot hold a
// handler forever; nothing is written once the registry has dropped watch
// x. frames is reused for the frames and returned.
func (a *registryAPI) writeEvents(c *wsConn, x *watcher, evs []*watchEvent, frames [][]byte) ([][]byte, error) {
	frames = frames[:0]
	for _, e := range evs {
		f, err := e.frame()
		if err != nil {
			a.log.Error("registry snapshot cannot be encoded", "err", err)
			return frames, err
		}
		frames = append(frames, f)
	}
	if len(frames) == 0 {
		return frames, nil
	}
	if err := x.ctx.Err(); err != nil {
		return frames, nil // the watch ended meanwhile: the caller says why
	}
	_, _, err := c.writeFrames(frames, false)
	return frames, err
}
