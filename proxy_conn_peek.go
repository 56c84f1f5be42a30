//go:build linux || darwin || dragonfly || freebsd || netbsd || openbsd

package main

// proxy_conn_peek.go tells, without waiting, whether a node has closed an
// idle pooled connection (or sent bytes on it, which make it unusable
// too): a recv with MSG_PEEK and MSG_DONTWAIT on its socket, one syscall.
// net/http's Transport learns the same from a read it keeps pending on
// every idle connection; the proxy's client has no goroutine per
// connection, so it asks before a request that cannot be sent twice.

import (
	"net"
	"syscall"
)

// peeker peeks at the socket of one connection; made once per
// backendConn, reused with it, so that a peek does not allocate.
type peeker struct {
	rc  syscall.RawConn       // the TCP socket (under TLS too); nil when there is none
	fn  func(fd uintptr) bool // the peek, made once: a closure per peek would allocate
	buf [1]byte
	n   int
	err error
}

// init aims the peeker at raw, the connection as dialled.
func (p *peeker) init(raw net.Conn) {
	p.rc = nil
	if sc, ok := raw.(syscall.Conn); ok {
		p.rc, _ = sc.SyscallConn()
	}
	if p.fn == nil {
		p.fn = func(fd uintptr) bool {
			p.n, _, p.err = syscall.Recvfrom(int(fd), p.buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			return true // done: never wait for the socket to be readable
		}
	}
}

// idle reports whether the idle connection is still open and quiet:
// known is false when the peek cannot tell. The connection's read
// deadline must not have passed.
func (p *peeker) idle() (open, known bool) {
	if p.rc == nil {
		return false, false
	}
	if err := p.rc.Read(p.fn); err != nil {
		return false, true
	}
	// Nothing to read: open. A byte, the node's close (0 bytes, no
	// error) or a reset: not usable.
	return p.err == syscall.EAGAIN || p.err == syscall.EWOULDBLOCK, true
}
