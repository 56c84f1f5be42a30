package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// What tests read of processes from /proc (Linux): a sidecar's
// descriptors, memory and connections, whatever its counters say.

// procFDs counts the open descriptors of process pid, from /proc.
func procFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	return len(ents)
}

// procRSS is the resident memory of process pid in kB, from /proc.
func procRSS(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	return 0
}

// tcpSockets calls fn for each TCP socket of the host, from
// /proc/net/tcp and /proc/net/tcp6: its local and remote ports, its state
// as the kernel writes it ("01" ESTABLISHED, "0A" LISTEN) and its inode
// ("0" once no process holds it, as in TIME_WAIT). Without /proc it calls
// fn for none.
func tcpSockets(fn func(local, remote int, state, inode string)) {
	port := func(addr string) int {
		_, p, _ := strings.Cut(addr, ":")
		n, err := strconv.ParseUint(p, 16, 16)
		if err != nil {
			return -1
		}
		return int(n)
	}
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		data, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) < 10 || f[0] == "sl" {
				continue
			}
			fn(port(f[1]), port(f[2]), f[3], f[9])
		}
	}
}

// socketsOn counts the open TCP sockets whose local port is port, the
// listener excluded: the connections that the sidecar listening there
// accepted and holds. Sockets no process holds any more (TIME_WAIT) do
// not count.
func socketsOn(port int) int {
	n := 0
	tcpSockets(func(local, _ int, state, inode string) {
		if local == port && state != "0A" && inode != "0" {
			n++
		}
	})
	return n
}

// connsTo counts this process's established TCP connections to port. It
// returns -1 where there is no /proc.
func connsTo(port int) int {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	mine := map[string]bool{}
	for _, fd := range fds {
		link, _ := os.Readlink("/proc/self/fd/" + fd.Name())
		if inode, ok := strings.CutPrefix(link, "socket:["); ok {
			mine[strings.TrimSuffix(inode, "]")] = true
		}
	}
	n := 0
	tcpSockets(func(_, remote int, state, inode string) {
		if remote == port && state == "01" && mine[inode] {
			n++
		}
	})
	return n
}
