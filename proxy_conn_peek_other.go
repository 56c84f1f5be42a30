//go:build !(linux || darwin || dragonfly || freebsd || netbsd || openbsd)

package main

import "net"

// peeker cannot peek without waiting on this system: alive falls back
// on its timed probe (see proxy_conn_peek.go).
type peeker struct{}

func (p *peeker) init(net.Conn) {}

func (p *peeker) idle() (open, known bool) { return false, false }
