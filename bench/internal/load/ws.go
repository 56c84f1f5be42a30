// Package load holds what the load programs under bench/ share: a
// websocket client that costs little next to the server it measures, and
// the server process's CPU time and memory from /proc.
package load

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Websocket opcodes (RFC 6455, section 5.2).
const (
	OpText   = 0x1
	OpBinary = 0x2
	opClose  = 0x8
	opPing   = 0x9
	opPong   = 0xA
)

// Conn is one websocket client connection. It speaks RFC 6455 itself,
// reading frames straight from a buffered connection, so that the load
// program spends as little CPU per message as it can and the server, not
// the client, is measured. It assumes a well-behaved server: frames are
// unmasked and no payload is larger than the program can hold. Write is
// safe for concurrent use; Close waits for the reader.
type Conn struct {
	nc  net.Conn
	br  *bufio.Reader
	wmu sync.Mutex // serializes frames written
	wg  sync.WaitGroup
}

// Dial opens a websocket to path (with its query) on the host of base, a
// ws:// or http:// URL, reading through a buffer of bufSize bytes. The
// handshake must end within 10 s.
func Dial(ctx context.Context, base, path string, bufSize int) (*Conn, error) {
	u, err := neturl.Parse(base)
	if err != nil {
		return nil, err
	}
	d := net.Dialer{Timeout: 10 * time.Second}
	nc, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(nc, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", path, u.Host)
	c := &Conn{nc: nc, br: bufio.NewReaderSize(nc, bufSize)}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		nc.Close()
		return nil, fmt.Errorf("handshake %s%s: %v %v", u.Host, path, resp, err)
	}
	nc.SetDeadline(time.Time{})
	return c, nil
}

// Read starts the reader: it calls onData with each data frame's payload
// (a fragment, if the server fragments; fin is set on the last one of a
// message) and answers pings, until the connection ends. The payload is
// valid only during the call. A close frame from the server is reported
// on stderr.
func (c *Conn) Read(onData func(fin bool, payload []byte)) {
	c.wg.Go(func() { c.readFrames(true, onData) })
}

// Count starts a reader that calls onFrame for each data frame and
// discards the payloads unread, so that large frames cost the program no
// memory.
func (c *Conn) Count(onFrame func(fin bool)) {
	c.wg.Go(func() { c.readFrames(false, func(fin bool, _ []byte) { onFrame(fin) }) })
}

func (c *Conn) readFrames(keep bool, onData func(fin bool, payload []byte)) {
	var payload []byte
	for {
		h0, err := c.br.ReadByte()
		if err != nil {
			return
		}
		h1, err := c.br.ReadByte()
		if err != nil {
			return
		}
		n := int(h1 & 0x7f)
		switch n {
		case 126:
			b, err := c.br.Peek(2)
			if err != nil {
				return
			}
			n = int(binary.BigEndian.Uint16(b))
			c.br.Discard(2)
		case 127:
			b, err := c.br.Peek(8)
			if err != nil {
				return
			}
			n = int(binary.BigEndian.Uint64(b))
			c.br.Discard(8)
		}
		fin, op := h0&0x80 != 0, h0&0xf
		if !keep && op <= OpBinary {
			if _, err := c.br.Discard(n); err != nil {
				return
			}
			onData(fin, nil)
			continue
		}
		if cap(payload) < n {
			payload = make([]byte, n)
		}
		payload = payload[:n]
		if _, err := io.ReadFull(c.br, payload); err != nil {
			return
		}
		switch op {
		case 0x0, OpText, OpBinary:
			onData(fin, payload)
		case opClose:
			if len(payload) >= 2 {
				fmt.Fprintf(os.Stderr, "%s: closed by the server: %d %s\n", filepath.Base(os.Args[0]), binary.BigEndian.Uint16(payload), payload[2:])
			}
			return
		case opPing:
			c.Write(opPong, payload)
		}
	}
}

// Write sends one masked frame with opcode op. The mask key is zero, which
// RFC 6455 allows a client that needs no protection from proxies.
func (c *Conn) Write(op byte, p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	hdr := make([]byte, 0, 14+len(p))
	hdr = append(hdr, 0x80|op)
	switch {
	case len(p) < 126:
		hdr = append(hdr, 0x80|byte(len(p)))
	case len(p) <= 0xffff:
		hdr = append(hdr, 0x80|126, byte(len(p)>>8), byte(len(p)))
	default:
		hdr = append(hdr, 0x80|127)
		hdr = binary.BigEndian.AppendUint64(hdr, uint64(len(p)))
	}
	hdr = append(hdr, 0, 0, 0, 0)
	_, err := c.nc.Write(append(hdr, p...))
	return err
}

// Close closes the connection and waits for the reader.
func (c *Conn) Close() {
	c.nc.Close()
	c.wg.Wait()
}

// DialAll opens n connections with dial, 32 at a time, and returns those
// it opened (the caller closes them) with the first error, if any.
func DialAll[C any](n int, dial func() (C, error)) ([]C, error) {
	var mu sync.Mutex // guards conns, firstErr
	var conns []C
	var firstErr error
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := dial()
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil && firstErr == nil:
				firstErr = err
			case err == nil:
				conns = append(conns, c)
			}
		})
	}
	wg.Wait()
	return conns, firstErr
}
