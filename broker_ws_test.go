package main

// Tests that pin the facts about coder/websocket that broker_ws.go relies
// on (see the list at the top of that file). Each serves a websocket the
// way the broker serves a subscriber (streams.accept through a wsHijacker)
// over a connection that records every write, and talks to it from a raw
// TCP client that writes and parses frames by hand.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// wsTestTimeout is what wsHijacker gets as its read and write timeout in
// these tests: long, so that a deadline the library set would stand out.
const wsTestTimeout = time.Hour

// recordConn is a net.Conn that records its writes, reads, deadlines and
// closes.
type recordConn struct {
	net.Conn

	mu        sync.Mutex // guards the fields below
	writes    [][]byte   // one copy per Write call
	reads     int
	deadlines []time.Time
	closes    int
}

func (c *recordConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes = append(c.writes, bytes.Clone(p))
	c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *recordConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	c.reads++
	c.mu.Unlock()
	return c.Conn.Read(p)
}

func (c *recordConn) Close() error {
	c.mu.Lock()
	c.closes++
	c.mu.Unlock()
	return c.Conn.Close()
}

func (c *recordConn) deadline(t time.Time) {
	c.mu.Lock()
	c.deadlines = append(c.deadlines, t)
	c.mu.Unlock()
}

func (c *recordConn) SetDeadline(t time.Time) error { c.deadline(t); return c.Conn.SetDeadline(t) }
func (c *recordConn) SetReadDeadline(t time.Time) error {
	c.deadline(t)
	return c.Conn.SetReadDeadline(t)
}
func (c *recordConn) SetWriteDeadline(t time.Time) error {
	c.deadline(t)
	return c.Conn.SetWriteDeadline(t)
}

// written returns a copy of the writes so far.
func (c *recordConn) written() [][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([][]byte(nil), c.writes...)
}

// recordingWriter hijacks to a recordConn.
type recordingWriter struct {
	http.ResponseWriter
	conn *recordConn // set by Hijack
}

func (w *recordingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	w.conn = &recordConn{Conn: nc}
	return w.conn, brw, nil
}

// wsPair is one websocket served as the broker serves a subscriber, and
// its raw client.
type wsPair struct {
	conn *websocket.Conn // the library's side
	wc   *wsConn         // the subscriber writer's side
	rec  *recordConn     // under wc: what reached the network
	nc   net.Conn        // the client
	br   *bufio.Reader   // the client's reader, at the next frame
}

// newWSPair starts a server whose handler accepts a websocket through a
// wsHijacker as broker.handleSubscribe does, and connects a raw client.
func newWSPair(t *testing.T) *wsPair {
	t.Helper()
	st := newStreams(corsPolicy{})
	type accepted struct {
		p    *wsPair
		done func()
	}
	ch := make(chan accepted, 1)
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rw := &recordingWriter{ResponseWriter: w}
		hj := &wsHijacker{ResponseWriter: rw, readTimeout: wsTestTimeout, writeTimeout: wsTestTimeout}
		conn, _, done := st.accept(hj, r, 1<<20)
		if conn == nil {
			ch <- accepted{}
			return
		}
		ch <- accepted{&wsPair{conn: conn, wc: hj.conn, rec: rw.conn}, done}
	}))
	t.Cleanup(ts.Close)
	t.Cleanup(st.Close)
	nc, br := rawHandshake(t, ts, "/")
	t.Cleanup(func() { nc.Close() })
	a := <-ch
	if a.p == nil || a.p.wc == nil || a.p.rec == nil {
		t.Fatalf("the handshake did not hijack through wsHijacker: %+v", a.p)
	}
	t.Cleanup(func() {
		a.p.conn.CloseNow()
		a.done()
	})
	a.p.nc, a.p.br = nc, br
	// A broken test must not hang: every wait on the client is bounded.
	nc.SetDeadline(time.Now().Add(time.Minute))
	return a.p
}

// readLoop reads from the library as broker.readLoop does, so that it
// answers control frames; messages go to msgs, and the final error to the
// returned channel.
func (p *wsPair) readLoop(msgs chan<- string) <-chan error {
	errc := make(chan error, 1)
	go func() {
		for {
			_, b, err := p.conn.Read(context.Background())
			if err != nil {
				errc <- err
				return
			}
			if msgs != nil {
				msgs <- string(b)
			}
		}
	}()
	return errc
}

// clientFrame writes one masked frame with FIN set from the client.
func (p *wsPair) clientFrame(t *testing.T, opcode byte, payload []byte) {
	t.Helper()
	key := [4]byte{0x12, 0x34, 0x56, 0x78}
	if len(payload) > 125 {
		t.Fatalf("clientFrame: payload of %d bytes", len(payload))
	}
	b := append([]byte{0x80 | opcode, 0x80 | byte(len(payload))}, key[:]...)
	for i, c := range payload {
		b = append(b, c^key[i%4])
	}
	if _, err := p.nc.Write(b); err != nil {
		t.Fatalf("client write: %v", err)
	}
}

// wsFrame is one server frame as it came off the wire.
type wsFrame struct {
	b0      byte // FIN, RSV1-3 and the opcode
	payload []byte
}

func (f wsFrame) opcode() byte { return f.b0 & 0x0f }

// parseServerFrame parses one unmasked frame at the start of b; n is 0
// when b holds no complete frame.
func parseServerFrame(b []byte) (f wsFrame, n int) {
	if len(b) < 2 || b[1]&0x80 != 0 {
		return f, 0
	}
	size, hdr := uint64(b[1]&0x7f), 2
	switch size {
	case 126:
		if len(b) < 4 {
			return f, 0
		}
		size, hdr = uint64(binary.BigEndian.Uint16(b[2:])), 4
	case 127:
		if len(b) < 10 {
			return f, 0
		}
		size, hdr = binary.BigEndian.Uint64(b[2:]), 10
	}
	if uint64(len(b)-hdr) < size {
		return f, 0
	}
	return wsFrame{b0: b[0], payload: b[hdr : hdr+int(size)]}, hdr + int(size)
}

// next reads the next frame the server sent; io.EOF once the server closed
// the connection.
func (p *wsPair) next() (wsFrame, error) {
	return readWireFrame(p.br)
}

// readWireFrame reads one unmasked server frame from br.
func readWireFrame(br *bufio.Reader) (wsFrame, error) {
	var h [10]byte
	if _, err := io.ReadFull(br, h[:2]); err != nil {
		return wsFrame{}, err
	}
	if h[1]&0x80 != 0 {
		return wsFrame{}, errors.New("masked server frame")
	}
	n := 2
	switch h[1] & 0x7f {
	case 126:
		n = 4
	case 127:
		n = 10
	}
	if _, err := io.ReadFull(br, h[2:n]); err != nil {
		return wsFrame{}, err
	}
	size := uint64(h[1] & 0x7f)
	switch n {
	case 4:
		size = uint64(binary.BigEndian.Uint16(h[2:]))
	case 10:
		size = binary.BigEndian.Uint64(h[2:])
	}
	if size > 16<<20 {
		return wsFrame{}, errors.New("server frame over 16 MiB")
	}
	f := wsFrame{b0: h[0], payload: make([]byte, size)}
	_, err := io.ReadFull(br, f.payload)
	return f, err
}

// closeCode returns the status code of a close frame's payload.
func closeCode(f wsFrame) websocket.StatusCode {
	if len(f.payload) < 2 {
		return websocket.StatusNoStatusRcvd
	}
	return websocket.StatusCode(binary.BigEndian.Uint16(f.payload))
}

// closePayload is a close frame's payload: code and reason.
func closePayload(code websocket.StatusCode, reason string) []byte {
	return append(binary.BigEndian.AppendUint16(nil, uint16(code)), reason...)
}

const (
	opText  = 0x1
	opClose = 0x8
	opPing  = 0x9
	opPong  = 0xA
)

// TestWSLibraryControlFramesWhole pins assumptions 2 and 5 of broker_ws.go:
// the library's ping, pong and close frames, at their largest, each reach
// wsConn.Write whole in one call; and a pong that answers no ping of the
// library's (the writer's pings) is ignored.
func TestWSLibraryControlFramesWhole(t *testing.T) {
	t.Parallel()
	p := newWSPair(t)
	msgs := make(chan string, 1)
	readErr := p.readLoop(msgs)

	// The library's ping, answered.
	pinged := make(chan error, 1)
	go func() { pinged <- p.conn.Ping(context.Background()) }()
	f, err := p.next()
	if err != nil || f.b0 != 0x80|opPing {
		t.Fatalf("waiting for the library's ping: frame %x %q, %v", f.b0, f.payload, err)
	}
	p.clientFrame(t, opPong, f.payload)
	if err := <-pinged; err != nil {
		t.Fatalf("Ping: %v", err)
	}

	// A pong nobody asked for, as the client answers the writer's pings,
	// then a message: the library takes the pong and delivers the message.
	if _, _, err := p.wc.writeFrames(nil, true); err != nil {
		t.Fatalf("writer's ping: %v", err)
	}
	if f, err := p.next(); err != nil || f.b0 != 0x80|opPing || len(f.payload) != 0 {
		t.Fatalf("waiting for the writer's ping: frame %x %q, %v", f.b0, f.payload, err)
	}
	p.clientFrame(t, opPong, nil)
	p.clientFrame(t, opText, []byte("after the pong"))
	select {
	case m := <-msgs:
		if m != "after the pong" {
			t.Fatalf("message %q, want %q", m, "after the pong")
		}
	case err := <-readErr:
		t.Fatalf("read after an unsolicited pong: %v", err)
	}

	// The library's pong to a ping of the largest payload.
	big := bytes.Repeat([]byte("p"), 125)
	p.clientFrame(t, opPing, big)
	if f, err := p.next(); err != nil || f.b0 != 0x80|opPong || !bytes.Equal(f.payload, big) {
		t.Fatalf("waiting for the pong: frame %x %q, %v", f.b0, f.payload, err)
	}

	// The library's close with the longest reason, answered.
	reason := strings.Repeat("r", 123)
	closed := make(chan error, 1)
	go func() { closed <- p.conn.Close(websocket.StatusGoingAway, reason) }()
	f, err = p.next()
	if err != nil || f.b0 != 0x80|opClose || !bytes.Equal(f.payload, closePayload(websocket.StatusGoingAway, reason)) {
		t.Fatalf("waiting for the close frame: frame %x %q, %v", f.b0, f.payload, err)
	}
	p.clientFrame(t, opClose, f.payload)
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}

	// Every write is one whole frame: the library's ping, the writer's
	// ping, the library's pong and close.
	want := []struct {
		b0   byte
		size int
	}{{0x80 | opPing, 1}, {0x80 | opPing, 0}, {0x80 | opPong, 125}, {0x80 | opClose, 125}}
	writes := p.rec.written()
	if len(writes) != len(want) {
		t.Fatalf("%d writes on the connection, want %d: %q", len(writes), len(want), writes)
	}
	for i, w := range writes {
		f, n := parseServerFrame(w)
		if n != len(w) || f.b0 != want[i].b0 || len(f.payload) != want[i].size {
			t.Errorf("write %d = %q (one frame of %d bytes: %v), want one frame %x with %d bytes of payload",
				i, w, n, n == len(w), want[i].b0, want[i].size)
		}
	}
}

// TestWSLibraryIOThroughWSConn pins assumption 1 of broker_ws.go: the
// library reads, writes and closes through the connection Hijack returned,
// and sets no deadline of its own on it.
func TestWSLibraryIOThroughWSConn(t *testing.T) {
	t.Parallel()
	start := time.Now()
	p := newWSPair(t)
	msgs := make(chan string, 1)
	readErr := p.readLoop(msgs)
	p.clientFrame(t, opText, []byte("hello"))
	if m := <-msgs; m != "hello" {
		t.Fatalf("message %q, want hello", m)
	}
	closed := make(chan error, 1)
	go func() { closed <- p.conn.Close(websocket.StatusNormalClosure, "") }()
	if f, err := p.next(); err != nil || f.opcode() != opClose {
		t.Fatalf("waiting for the close frame: frame %x, %v", f.b0, err)
	}
	p.clientFrame(t, opClose, closePayload(websocket.StatusNormalClosure, ""))
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	// The reader sees the close frame, or, when Close took the read lock
	// between two of its reads and read the close frame itself, the
	// connection Close then closed.
	if err := <-readErr; websocket.CloseStatus(err) != websocket.StatusNormalClosure && !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after close: %v, want a normal closure or the closed connection", err)
	}

	rec := p.rec
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.reads == 0 || len(rec.writes) == 0 || rec.closes == 0 {
		t.Errorf("through wsConn: %d reads, %d writes, %d closes; want each at least once", rec.reads, len(rec.writes), rec.closes)
	}
	// wsConn sets each deadline wsTestTimeout ahead; anything else is the
	// library's.
	for _, d := range rec.deadlines {
		if d.Before(start.Add(wsTestTimeout)) {
			t.Errorf("a deadline of %v was set on the connection, not by wsConn", d)
		}
	}
}

// TestWSLibraryNothingAfterClose pins assumptions 3 and 4 of broker_ws.go,
// on the wire: whichever way the library closes, the close frame stops the
// writer (noData), and after it nothing follows: no pong, no message from
// the library, no data frame from the writer.
func TestWSLibraryNothingAfterClose(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name string
		// close makes the library write a close frame.
		close func(t *testing.T, p *wsPair)
		code  websocket.StatusCode
		// answered: the client answers the close frame, first with a ping
		// that must go unanswered.
		answered bool
	}{{
		name: "Close",
		close: func(t *testing.T, p *wsPair) {
			closed := make(chan struct{})
			go func() {
				defer close(closed)
				p.conn.Close(websocket.StatusGoingAway, "bye")
			}()
			t.Cleanup(func() { <-closed })
		},
		code:     websocket.StatusGoingAway,
		answered: true,
	}, {
		name: "echo of the client's close",
		close: func(t *testing.T, p *wsPair) {
			p.clientFrame(t, opClose, closePayload(websocket.StatusNormalClosure, ""))
		},
		code: websocket.StatusNormalClosure,
	}, {
		name: "protocol error",
		close: func(t *testing.T, p *wsPair) {
			p.clientFrame(t, 0x0, nil) // a continuation with no message
		},
		code: websocket.StatusProtocolError,
	}} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := newWSPair(t)
			readErr := p.readLoop(nil)
			tt.close(t, p)
			f, err := p.next()
			if err != nil || f.b0 != 0x80|opClose || closeCode(f) != tt.code {
				t.Fatalf("waiting for the close frame: frame %x %q, %v; want a close with %v", f.b0, f.payload, err, tt.code)
			}
			if !p.wc.noData.Load() {
				t.Errorf("the library's close frame did not stop the writer (noData unset)")
			}
			frame := encodeFrame(&Message{Body: []byte("late")})
			if _, _, err := p.wc.writeFrames([][]byte{frame}, true); !errors.Is(err, errDataStopped) {
				t.Errorf("writer after the close frame: %v, want errDataStopped", err)
			}
			if err := p.conn.Write(context.Background(), websocket.MessageText, []byte("late")); err == nil {
				t.Errorf("the library wrote a message after its close frame")
			}
			if tt.answered {
				p.clientFrame(t, opPing, []byte("unanswered"))
				p.clientFrame(t, opClose, f.payload)
			}
			<-readErr         // the library's reader has stopped
			p.conn.CloseNow() // as broker.serve ends
			if f, err := p.next(); err != io.EOF {
				t.Errorf("after the close frame: frame %x %q, %v; want the end of the stream", f.b0, f.payload, err)
			}
		})
	}
}

// TestWSWriteFramesCounts pins what writeFrames reports when a write
// times out against a client that does not read: frames[:sent] arrived
// whole, at most the one frame at sent arrived in part (then tried is
// sent+1), and nothing of frames[tried:] arrived. The broker rehomes
// frames[tried:] to another queue group member on that promise.
func TestWSWriteFramesCounts(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	client.(*net.TCPConn).SetReadBuffer(4096)
	server := <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	server.(*net.TCPConn).SetWriteBuffer(16 << 10)

	// 300 frames of 10 KB, more than the socket buffers hold; frames of
	// 100 KB, larger than brokerWriteBatch, are written alone.
	var frames [][]byte
	for i := range 300 {
		size := 10 << 10
		if i%50 == 49 {
			size = 100 << 10
		}
		frames = append(frames, encodeFrame(&Message{Body: bytes.Repeat([]byte{byte('a' + i%26)}, size)}))
	}
	wc := &wsConn{Conn: server, writeTimeout: 50 * time.Millisecond}
	sent, tried, err := wc.writeFrames(frames, true)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("writeFrames to a client that does not read: %v, want a timeout", err)
	}
	if sent == len(frames) || tried < sent || tried > sent+1 {
		t.Fatalf("writeFrames = sent %d, tried %d of %d frames", sent, tried, len(frames))
	}
	server.Close()

	client.SetReadDeadline(time.Now().Add(time.Minute))
	got, err := io.ReadAll(client)
	if err != nil {
		t.Fatalf("client read: %v", err)
	}
	want := append([]byte(nil), pingFrame...)
	for _, f := range frames[:sent] {
		want = append(want, f...)
	}
	if !bytes.HasPrefix(got, want) {
		t.Fatalf("client got %d bytes, not the ping and the %d frames reported sent (%d bytes)", len(got), sent, len(want))
	}
	rest := len(got) - len(want)
	switch {
	case tried == sent && rest != 0:
		t.Errorf("%d bytes arrived after the %d frames sent, but no frame was reported cut (tried %d)", rest, sent, tried)
	case tried == sent+1 && (rest == 0 || rest >= len(frames[sent])):
		t.Errorf("frame %d reported cut, but %d of its %d bytes arrived", sent, rest, len(frames[sent]))
	case tried == sent+1 && !bytes.Equal(got[len(want):], frames[sent][:rest]):
		t.Errorf("the %d bytes after the frames sent are not the start of frame %d", rest, sent)
	}
	t.Logf("sent %d, tried %d of %d frames; %d bytes of frame %d arrived", sent, tried, len(frames), rest, sent)
}
