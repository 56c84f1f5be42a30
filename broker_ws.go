package main

// broker_ws.go is the one place where the sidecar writes websocket frames
// itself. For a broker subscriber, coder/websocket does the handshake,
// reads the client's frames and writes the control frames (pong, close),
// while the subscriber's writer (subscriber.write in broker.go) writes
// data frames encoded once per message (encodeFrame) straight on the
// hijacked connection, a whole batch per write call, bypassing the
// library's one-message-at-a-time writer. A registry watch (the handler
// in registry_watch.go) writes its events the same way: each event is
// encoded once as a whole frame (textFrame) that every watch writes.
//
// Two writers on one connection are safe only while these facts about
// github.com/coder/websocket hold (read in v1.8.15: accept.go, conn.go,
// read.go, write.go, close.go). broker_ws_test.go pins each of them
// against the library in go.mod, so an upgrade that breaks one fails a
// test rather than corrupting subscribers' streams.
//
//  1. Accept hijacks through the ResponseWriter it is given (the first
//     http.Hijacker on its Unwrap chain: wsHijacker) and then does all its
//     I/O on what Hijack returned: it reads through the bufio.Reader
//     (which it resets over the returned net.Conn), writes through the
//     bufio.Writer, and closes the net.Conn. It sets no deadline on the
//     connection (it bounds its waits with contexts and closes), so
//     wsConn owns the deadlines. Pinned by TestWSLibraryIOThroughWSConn.
//  2. Each frame the library writes reaches wsConn.Write whole, in one
//     call, starting at a frame boundary: writeFrame puts header and
//     payload into the bufio.Writer and flushes after every final frame,
//     and a server's control frame (unmasked, at most 2+125 bytes) fits
//     the 256-byte buffer Hijack hands out. This holds for ping, pong and
//     close; it would not for data messages longer than the buffer, which
//     is why neither the broker nor a registry watch writes a data message
//     through the library.
//     Pinned by TestWSLibraryControlFramesWhole.
//  3. A close frame is thus recognised by the opcode in the low four bits
//     of the first byte of a Write; wsConn.Write then sets noData (and a
//     pong, which waits for a data write in progress: wsConn.pong). Pinned
//     by TestWSLibraryNothingAfterClose, for each way the library closes:
//     Close, the echo of the client's close, a protocol error.
//  4. Once the library has written a close frame it writes no other frame
//     (writeFrame refuses after closeSentErr): no pong, no message. With
//     noData, which the close frame's Write sets under the write lock,
//     nothing follows a close frame on the wire (RFC 6455 section 5.5.1).
//     Pinned on the wire by TestWSLibraryNothingAfterClose and, with the
//     writer busy, by TestBrokerNoDataAfterClose.
//  5. The library reads and ignores a pong that answers none of its own
//     pings: the client's answer to a ping of the writer's (pingFrame).
//     The broker's liveness check needs only that it is read, since every
//     wsConn.Read extends the read deadline. Pinned by
//     TestWSLibraryControlFramesWhole.

import (
	"bufio"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// brokerWriteBatch is the largest write of a subscriber's writer: frames
// smaller than this are copied into one buffer and written together.
const brokerWriteBatch = 64 << 10

// encodeFrame encodes m once as a complete unmasked websocket text frame
// (RFC 6455 section 5.2) that every subscriber's writer copies as is.
func encodeFrame(m *Message) []byte {
	buf := make([]byte, maxFrameHeader, maxFrameHeader+32+base64.StdEncoding.EncodedLen(len(m.Body))+64*len(m.Header))
	buf = append(buf, `{"Header":`...)
	if len(m.Header) == 0 {
		buf = append(buf, "{}"...)
	} else {
		h, err := json.Marshal(m.Header) // strings only: cannot fail
		if err != nil {
			h = []byte("{}")
		}
		buf = append(buf, h...)
	}
	buf = append(buf, `,"Body":"`...)
	buf = base64.StdEncoding.AppendEncode(buf, m.Body)
	buf = append(buf, `"}`...)

	return buf[putTextHeader(buf):]
}

// textFrame returns payload as a complete unmasked websocket text frame.
func textFrame(payload []byte) []byte {
	buf := make([]byte, maxFrameHeader+len(payload))
	copy(buf[maxFrameHeader:], payload)
	return buf[putTextHeader(buf):]
}

// maxFrameHeader is the longest header of a server's frame: no mask.
const maxFrameHeader = 10

// putTextHeader writes the header of an unmasked, final text frame whose
// payload is buf[maxFrameHeader:] at the end of buf[:maxFrameHeader] and
// returns where the frame starts.
func putTextHeader(buf []byte) (start int) {
	n := len(buf) - maxFrameHeader
	switch {
	case n < 126:
		start = maxFrameHeader - 2
		buf[start+1] = byte(n)
	case n <= 0xFFFF:
		start = maxFrameHeader - 4
		buf[start+1] = 126
		binary.BigEndian.PutUint16(buf[start+2:], uint16(n))
	default:
		start = 0
		buf[1] = 127
		binary.BigEndian.PutUint64(buf[2:], uint64(n))
	}
	buf[start] = 0x80 | 0x1 // FIN, text
	return start
}

// decodeFrame is the inverse of encodeFrame, for the rare frame that must
// leave this sidecar again (broker.rehome).
func decodeFrame(frame []byte) (*Message, error) {
	if len(frame) < 2 {
		return nil, errors.New("broker: frame too short")
	}
	start := 2
	switch frame[1] {
	case 126:
		start = 4
	case 127:
		start = 10
	}
	if len(frame) < start {
		return nil, errors.New("broker: frame too short")
	}
	m := &Message{}
	if err := json.Unmarshal(frame[start:], m); err != nil {
		return nil, fmt.Errorf("broker: decode frame: %w", err)
	}
	return m, nil
}

// pingFrame is an unmasked ping without payload.
var pingFrame = []byte{0x80 | 0x9, 0}

// wsHijacker lets streams.accept hijack through it, so that the websocket
// library reads and writes through a wsConn with small buffers: the
// subscriber's writer writes batches of encoded frames on the same wsConn.
type wsHijacker struct {
	http.ResponseWriter
	readTimeout  time.Duration
	writeTimeout time.Duration
	conn         *wsConn // set by Hijack
}

// Hijack hands out a wsConn instead of the raw connection. The buffers
// are small because they carry only control frames and client frames; the
// subscriber's writer bypasses them.
func (h *wsHijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	nc, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	c := &wsConn{Conn: nc, readTimeout: h.readTimeout, writeTimeout: h.writeTimeout}
	if n := brw.Reader.Buffered(); n > 0 {
		b, _ := brw.Reader.Peek(n)
		c.unread = append([]byte(nil), b...)
	}
	if n := brw.Writer.Buffered(); n > 0 {
		if err := brw.Writer.Flush(); err != nil {
			nc.Close()
			return nil, nil, err
		}
	}
	h.conn = c
	// 256 bytes hold any control frame whole (RFC 6455 section 5.5), so
	// each of the library's frames reaches wsConn.Write in one call.
	return c, bufio.NewReadWriter(bufio.NewReaderSize(c, 512), bufio.NewWriterSize(c, 256)), nil
}

// Unwrap lets http.ResponseController find the underlying writer.
func (h *wsHijacker) Unwrap() http.ResponseWriter { return h.ResponseWriter }

// wsConn is a subscriber's connection. Every read extends the read
// deadline (a client that answers no ping for readTimeout is dead); every
// write is whole frames under wmu with a deadline, so the library's control
// frames and the writer's data frames never interleave inside a frame.
type wsConn struct {
	net.Conn
	readTimeout  time.Duration
	writeTimeout time.Duration
	unread       []byte // bytes the HTTP server read past the handshake; reader only

	// noData is set once a close frame is coming or went out (RFC 6455
	// 5.5.1: no data after Close); writeFrames checks it between writes.
	noData atomic.Bool

	wmu    sync.Mutex // serializes writes; guards broken
	broken bool       // a write failed midway: the stream may end inside a frame

	// While writeFrames runs, a pong (the library's answer to a ping of
	// the client, written from its reader) waits in pong and writeFrames
	// writes it after its data (RFC 6455 section 5.5.3: a pong for the
	// latest ping is enough). Waiting for wmu instead, behind a write to
	// a client that stopped reading, the library gives up on the pong
	// after 5 s (its bound on a control frame) and closes the connection
	// under the write, which then fails as if the client had left, not
	// as a write that timed out. Lock order: pmu, then wmu.
	pmu         sync.Mutex // guards dataWriting and pong
	dataWriting bool       // writeFrames runs (one at a time) or is about to take wmu
	pong        []byte
}

var errDataStopped = errors.New("broker: connection closing")

func (c *wsConn) Read(p []byte) (int, error) {
	if len(c.unread) > 0 {
		n := copy(p, c.unread)
		c.unread = c.unread[n:]
		if len(c.unread) == 0 {
			c.unread = nil
		}
		return n, nil
	}
	if err := c.Conn.SetReadDeadline(time.Now().Add(c.readTimeout)); err != nil {
		return 0, err
	}
	return c.Conn.Read(p)
}

// Write is the websocket library's path: control frames, each whole in
// one call (its write buffer is larger than any control frame).
func (c *wsConn) Write(p []byte) (int, error) {
	if len(p) > 0 && p[0]&0x0f == 0xA {
		c.pmu.Lock()
		if c.dataWriting {
			c.pong = append(c.pong[:0], p...)
			c.pmu.Unlock()
			return len(p), nil
		}
		// No writeFrames holds wmu, and none takes it while pmu is held.
		c.wmu.Lock()
		c.pmu.Unlock()
		defer c.wmu.Unlock()
		return c.writeLocked(p, time.Now().Add(c.writeTimeout), false)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if len(p) > 0 && p[0]&0x0f == 0x8 {
		c.noData.Store(true) // the library closes on its own (a protocol error, an echo)
	}
	return c.writeLocked(p, time.Now().Add(c.writeTimeout), false)
}

// writeLocked writes p by deadline. After a failed write nothing more is
// written: the stream may end inside a frame, and a control frame written
// after it would land in the middle.
//
// A data frame's write (data) looks at noData after setting its deadline,
// so it either sees noData or meets the past deadline interruptData sets
// after it.
func (c *wsConn) writeLocked(p []byte, deadline time.Time, data bool) (int, error) {
	if c.broken {
		return 0, net.ErrClosed
	}
	err := c.Conn.SetWriteDeadline(deadline)
	if err == nil && data && c.noData.Load() {
		return 0, errDataStopped
	}
	n := 0
	if err == nil {
		n, err = c.Conn.Write(p)
	}
	if err != nil {
		c.broken = true
	}
	return n, err
}

// interruptData makes writeFrames stop now: a write in progress fails on
// a deadline in the past, and no data write starts after it. It does not
// wait for the lock; control frames written later set their own deadline.
func (c *wsConn) interruptData() {
	c.noData.Store(true)
	c.Conn.SetWriteDeadline(time.Unix(1, 0))
}

// stopData makes writeFrames stop at its next write; it returns after a
// write in progress ends (within that batch's deadline).
func (c *wsConn) stopData() {
	c.noData.Store(true)
	c.wmu.Lock()
	//lint:ignore SA2001 taking the lock waits for the write in progress
	c.wmu.Unlock()
}

// endData ends writeFrames, whose error is *err: it writes the pong that
// waited meanwhile by the batch's deadline, unless the stream is broken
// or a close frame is coming; a pong that fails is the error of
// writeFrames.
func (c *wsConn) endData(err *error, deadline time.Time) {
	c.pmu.Lock()
	c.dataWriting = false
	p := c.pong
	c.pong = nil
	c.wmu.Lock()
	c.pmu.Unlock()
	defer c.wmu.Unlock()
	if p == nil || *err != nil || c.noData.Load() {
		return
	}
	if _, werr := c.writeLocked(p, deadline, false); werr != nil {
		*err = werr
	}
}

// writeBufs recycles the writer's batch buffers, so an idle subscriber
// holds none.
var writeBufs = sync.Pool{New: func() any { b := make([]byte, 0, brokerWriteBatch); return &b }}

// writeFrames writes a ping (if ping) and frames, copying small frames into
// one buffer so a batch costs one write call per brokerWriteBatch bytes.
// frames[:sent] were written whole. After an error, frames[sent:tried] (at
// most one frame) were written in part, and frames[tried:] surely not at
// all: the connection took none of their bytes (a net.Conn's Write reports
// the bytes it took; a tls.Conn's, those of the records it wrote whole,
// and the client can read nothing of a record cut short). So the broker
// may give frames[tried:] to another member of a queue group without any
// frame reaching two members.
func (c *wsConn) writeFrames(frames [][]byte, ping bool) (sent, tried int, err error) {
	// The batch buffer is taken only when frames are copied together: a
	// frame written alone (the last one, or a large one) goes as it is,
	// so a watch's one large event costs no buffer per watcher.
	var bp *[]byte
	var buf []byte
	defer func() {
		if bp != nil {
			*bp = buf[:0]
			writeBufs.Put(bp)
		}
	}()
	take := func() {
		if bp == nil {
			bp = writeBufs.Get().(*[]byte)
			buf = (*bp)[:0]
		}
	}
	c.pmu.Lock()
	c.dataWriting = true
	c.pmu.Unlock()
	var deadline time.Time
	defer func() { c.endData(&err, deadline) }()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	// One deadline for the whole batch (and the pong that waits for it):
	// a client reading just fast enough to beat a per-write deadline must
	// not hold the writer (and a shutdown waiting in stopData) for the
	// length of an 8 MiB queue.
	deadline = time.Now().Add(c.writeTimeout)
	if c.noData.Load() {
		return 0, 0, errDataStopped
	}
	// write writes p: lead bytes (a ping), then frames[sent:upto].
	write := func(p []byte, lead, upto int) error {
		if c.noData.Load() {
			return errDataStopped
		}
		n, err := c.writeLocked(p, deadline, true)
		if err == nil {
			sent, tried = upto, upto
			return nil
		}
		for n -= lead; sent < upto && n >= len(frames[sent]); sent++ {
			n -= len(frames[sent])
		}
		tried = sent
		if sent < upto && n > 0 {
			tried++ // cut inside this frame
		}
		return err
	}
	lead := 0
	if ping {
		take()
		buf = append(buf, pingFrame...)
		lead = len(pingFrame)
	}
	for i, f := range frames {
		if len(buf)+len(f) > brokerWriteBatch && len(buf) > 0 {
			if err := write(buf, lead, i); err != nil {
				return sent, tried, err
			}
			buf, lead = buf[:0], 0
		}
		if len(f) > brokerWriteBatch || (len(buf) == 0 && i == len(frames)-1) {
			if err := write(f, 0, i+1); err != nil {
				return sent, tried, err
			}
			continue
		}
		take()
		buf = append(buf, f...)
	}
	if len(buf) > 0 {
		if err := write(buf, lead, len(frames)); err != nil {
			return sent, tried, err
		}
	}
	return sent, tried, nil
}
