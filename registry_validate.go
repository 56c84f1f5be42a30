package main

// registry_validate.go holds what a registration must be: the rules every
// service and node pass before the registry keeps them, whether they come
// from the /registry API or from a remote backend (Consul, another
// sidecar), and the sidecar's own addresses, where no node may point.
//
// A node must be callable as registered: its address is a host name or an
// IP literal, nothing else (no scheme, path, userinfo, port or control
// character), and its port is 1-65535; or its port is 0 and its address is
// host:port (go-micro v2 style). Every string is valid UTF-8 of a bounded
// length. encoding/json turns invalid UTF-8 (and lone surrogate escapes)
// into U+FFFD, so two different ids would become one: U+FFFD is refused.

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"unicode"
	"unicode/utf8"
)

// Limits of the strings and maps of one service.
const (
	maxNameLen          = 255     // service names, node ids, metadata keys, versions, endpoint names
	maxHostLen          = 253     // a DNS name (RFC 1035), without its trailing dot
	maxMetadataEntries  = 64      // per metadata map
	maxMetadataValueLen = 4096    // bytes
	maxEndpoints        = 1024    // per service
	maxEndpointDescLen  = 1 << 16 // bytes of an endpoint's request or response description
)

// fieldError is a validation failure of one field. Checks name the field
// relative to what they check ("address"); callers complete the path on
// the way up ("nodes[2].address"), so a valid service allocates nothing.
type fieldError struct {
	field string
	msg   string // what is wrong, after the field's name
}

func (e *fieldError) Error() string { return e.field + " " + e.msg }

func bad(field, format string, args ...any) error {
	return &fieldError{field: field, msg: fmt.Sprintf(format, args...)}
}

// under prefixes the field of err, a *fieldError, with prefix.
func under(prefix string, err error) error {
	if fe, ok := err.(*fieldError); ok {
		if fe.field == "" {
			prefix = strings.TrimRight(prefix, ". ")
		}
		fe.field = prefix + fe.field
	}
	return err
}

// validate checks s as a registration (needAddr) or as a deregistration,
// which needs only a name and node ids. It is the one check of a service:
// the API and both registries call it, and the sanitizing of remote data
// calls its parts. Errors name the field: `nodes[2].address "x" is ...`.
func (s *Service) validate(needAddr bool) error {
	if err := checkName("name", s.Name); err != nil {
		return err
	}
	if needAddr {
		if err := checkVersion("version", s.Version); err != nil {
			return err
		}
		if err := checkMetadata("metadata", s.Metadata); err != nil {
			return err
		}
		if err := checkEndpoints(s.Endpoints); err != nil {
			return err
		}
	}
	if len(s.Nodes) == 0 {
		return errors.New(`field "nodes" must list at least one node`)
	}
	seen := make(map[string]bool, len(s.Nodes))
	for i, n := range s.Nodes {
		if err := validateNode(n, needAddr); err != nil {
			return under(nodeField(i), err)
		}
		if seen[n.ID] {
			return bad(nodeField(i)+"id", "%q appears twice", n.ID)
		}
		seen[n.ID] = true
	}
	return nil
}

// nodeField is the path of node i's fields: "nodes[i].".
func nodeField(i int) string { return "nodes[" + strconv.Itoa(i) + "]." }

// validateNode checks one node: for a registration (needAddr) all of it,
// for a deregistration its id. Field names are relative to the node.
func validateNode(n *Node, needAddr bool) error {
	if n == nil {
		return bad("", "is null")
	}
	if err := checkName("id", n.ID); err != nil {
		return err
	}
	if !needAddr {
		return nil
	}
	if _, _, err := nodeTarget(n); err != nil {
		return err
	}
	if err := checkVersion("version", n.Version); err != nil {
		return err
	}
	return checkMetadata("metadata", n.Metadata)
}

// nodeTarget returns the host and port a call to n dials, checking both.
func nodeTarget(n *Node) (host string, port int, err error) {
	addr := n.Address
	if err := checkAddressChars(addr); err != nil {
		return "", 0, err
	}
	switch {
	case n.Port < 0 || n.Port > 65535:
		return "", 0, bad("port", "%d is out of range 1-65535", n.Port)
	case n.Port == 0:
		// go-micro v2 style: the address carries the port.
		h, p, err := net.SplitHostPort(addr)
		if err != nil {
			return "", 0, bad("port", "is 0, so address %q must be host:port; or give a port 1-65535", addr)
		}
		port, err := strconv.Atoi(p)
		if err != nil || port < 1 || port > 65535 {
			return "", 0, bad("address", "%q: port %q is not a number from 1 to 65535", addr, p)
		}
		if err := checkHost(addr, h, false); err != nil {
			return "", 0, err
		}
		return h, port, nil
	}
	if err := checkHost(addr, addr, true); err != nil {
		return "", 0, err
	}
	return strings.TrimSuffix(strings.TrimPrefix(addr, "["), "]"), n.Port, nil
}

// checkAddressChars refuses what no host is made of, with the reason a
// caller needs: a URL, userinfo, a path, control characters.
func checkAddressChars(addr string) error {
	switch {
	case addr == "":
		return bad("address", "is required")
	case len(addr) > maxNameLen:
		return bad("address", "is longer than %d bytes", maxNameLen)
	case strings.Contains(addr, "://"):
		return bad("address", "%q is a URL: give the host alone (no scheme or path) and the port in the port field", addr)
	case strings.ContainsRune(addr, '@'):
		return bad("address", "%q holds userinfo (user@): give the host alone", addr)
	case strings.ContainsAny(addr, "/?#\\"):
		return bad("address", "%q holds a path or query: give the host alone", addr)
	}
	for i := 0; i < len(addr); i++ {
		c := addr[i]
		switch {
		case c < 0x20 || c == 0x7f:
			return bad("address", "%q holds a control character", addr)
		case c == ' ':
			return bad("address", "%q holds a space", addr)
		case c >= utf8.RuneSelf:
			return bad("address", "%q is not ASCII: give an IP address, or a host name in its ASCII (punycode) form", addr)
		}
	}
	return nil
}

// checkHost checks host, the host part of addr: an IP literal or a DNS
// name. bracketsOK allows "[v6]", the form with brackets but no port.
func checkHost(addr, host string, bracketsOK bool) error {
	if inner, ok := strings.CutPrefix(host, "["); ok && bracketsOK {
		inner, closed := strings.CutSuffix(inner, "]")
		ip, err := netip.ParseAddr(inner)
		if !closed || err != nil || !ip.Is6() {
			return bad("address", "%q is not an IPv6 address in brackets", addr)
		}
		return nil
	}
	if strings.ContainsAny(host, "[]") {
		return bad("address", "%q is not an IP address or a host name", addr)
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	if strings.Contains(host, ":") {
		if h, p, err := net.SplitHostPort(host); err == nil && h != "" && p != "" {
			return bad("address", "%q holds a port: give the host alone and the port in the port field (or port 0 for host:port)", addr)
		}
		return bad("address", "%q is not a valid IPv6 address", addr)
	}
	return checkDNSName(addr, host)
}

// checkDNSName accepts a host name: dot-separated labels of letters,
// digits, '-' and '_' (1 to 63 bytes, not starting or ending with '-'), at
// most 253 bytes, with an optional trailing dot; all-numeric names are not
// names but broken IPv4 addresses.
func checkDNSName(addr, host string) error {
	name := strings.TrimSuffix(host, ".")
	if name == "" || len(name) > maxHostLen {
		return bad("address", "%q is not a host name (1 to %d bytes)", addr, maxHostLen)
	}
	numeric := true
	for label := range strings.SplitSeq(name, ".") {
		if label == "" || len(label) > 63 {
			return bad("address", "%q is not a host name: each dot-separated label is 1 to 63 bytes", addr)
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return bad("address", "%q is not a host name: a label starts or ends with '-'", addr)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			switch {
			case c >= '0' && c <= '9':
			case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '-', c == '_':
				numeric = false
			default:
				return bad("address", "%q is not a host name: %q is not allowed", addr, c)
			}
		}
	}
	if numeric {
		return bad("address", "%q is not a valid IPv4 address", addr)
	}
	return nil
}

// checkName accepts 1 to 255 bytes of valid UTF-8, printable, without
// spaces or U+FFFD.
func checkName(field, v string) error {
	if v == "" {
		return bad(field, "is required")
	}
	if len(v) <= maxNameLen && visibleASCII(v) {
		return nil // the usual name, checked without decoding runes
	}
	if err := checkText(field, v, maxNameLen); err != nil {
		return err
	}
	for _, r := range v {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return bad(field, "%q holds a space or control character", v)
		}
	}
	return nil
}

// visibleASCII reports whether s holds only printable ASCII other than
// space (0x21 to 0x7e), which checkName accepts.
func visibleASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// checkVersion accepts an empty version, or up to 255 printable bytes.
func checkVersion(field, v string) error {
	if err := checkText(field, v, maxNameLen); err != nil {
		return err
	}
	for _, r := range v {
		if !unicode.IsPrint(r) {
			return bad(field, "%q holds a control character", v)
		}
	}
	return nil
}

// checkText accepts up to max bytes of valid UTF-8 without U+FFFD.
func checkText(field, v string, max int) error {
	if len(v) > max {
		return bad(field, "is longer than %d bytes", max)
	}
	if !utf8.ValidString(v) || strings.ContainsRune(v, utf8.RuneError) {
		return bad(field, "%q is not valid UTF-8 (U+FFFD, which JSON decoding leaves for invalid bytes and lone surrogates, is refused too)", v)
	}
	return nil
}

// checkMetadata accepts up to 64 entries: keys as names, values up to 4 KiB
// of valid UTF-8.
func checkMetadata(field string, md map[string]string) error {
	if len(md) > maxMetadataEntries {
		return bad(field, "has %d entries; at most %d", len(md), maxMetadataEntries)
	}
	for k, v := range md {
		if err := checkName("key", k); err != nil {
			return under(field+" ", err)
		}
		if err := checkText(k, v, maxMetadataValueLen); err != nil {
			return under(field+".", err)
		}
	}
	return nil
}

// checkEndpoints checks the endpoints of a service: a bounded number, names
// as versions are, descriptions of bounded size in valid UTF-8 (they pass
// through as raw JSON, which encoding/json does not check). A null
// endpoint is skipped, as the registries skip it.
func checkEndpoints(eps []*Endpoint) error {
	if len(eps) > maxEndpoints {
		return bad("endpoints", "has %d entries; at most %d", len(eps), maxEndpoints)
	}
	for i, e := range eps {
		if e == nil {
			continue
		}
		if err := checkEndpoint(e); err != nil {
			return under("endpoints["+strconv.Itoa(i)+"].", err)
		}
	}
	return nil
}

func checkEndpoint(e *Endpoint) error {
	if err := checkVersion("name", e.Name); err != nil {
		return err
	}
	for _, d := range []struct {
		name string
		raw  []byte
	}{{"request", e.Request}, {"response", e.Response}} {
		if len(d.raw) > maxEndpointDescLen {
			return bad(d.name, "is longer than %d bytes", maxEndpointDescLen)
		}
		if !utf8.Valid(d.raw) {
			return bad(d.name, "is not valid UTF-8")
		}
	}
	return checkMetadata("metadata", e.Metadata)
}

// normalizeAddress stores an IPv6 literal given in brackets without them:
// the port has a field of its own, and callers join host and port.
func normalizeAddress(n *Node) {
	if n.Port != 0 && strings.HasPrefix(n.Address, "[") {
		n.Address = strings.TrimSuffix(strings.TrimPrefix(n.Address, "["), "]")
	}
}

// selfAddrs are the addresses where this sidecar accepts connections. A
// node registered at one of them would send every call back here, and the
// sidecar would forward it again: a request loop. Built once the listener
// is bound; safe for concurrent use.
type selfAddrs struct {
	set atomic.Pointer[[]selfAddr]
}

// selfAddr is one listener: its port and the hosts that reach it.
type selfAddr struct {
	port     int
	ips      map[netip.Addr]bool // unmapped, without zones
	names    map[string]bool     // lower case, without a trailing dot
	loopback bool                // every loopback address and "localhost" reach it
}

// add records a listener bound to ip:port. An unspecified ip (":8081")
// is reached at every address of the host, by its host name, and over
// loopback; a loopback ip also by "localhost" and the unspecified address
// (which dials the local host).
func (s *selfAddrs) add(ip net.IP, port int) {
	if port <= 0 {
		return
	}
	a := selfAddr{port: port, ips: map[netip.Addr]bool{}, names: map[string]bool{}}
	if addr, ok := netip.AddrFromSlice(ip); ok {
		a.ips[addr.Unmap()] = true
	}
	switch {
	case ip == nil || ip.IsUnspecified():
		a.loopback = true
		a.ips[netip.IPv4Unspecified()] = true
		a.ips[netip.IPv6Unspecified()] = true
		if addrs, err := net.InterfaceAddrs(); err == nil {
			for _, ia := range addrs {
				if n, ok := ia.(*net.IPNet); ok {
					if addr, ok := netip.AddrFromSlice(n.IP); ok {
						a.ips[addr.Unmap()] = true
					}
				}
			}
		}
		if h, err := os.Hostname(); err == nil && h != "" {
			a.names[strings.ToLower(h)] = true
		}
	case ip.IsLoopback():
		a.loopback = true
		a.ips[netip.IPv4Unspecified()] = true
		a.ips[netip.IPv6Unspecified()] = true
	}
	s.addEntry(a)
}

// addHostPort records an address other hosts reach this sidecar at
// (--broker_address: a name or a translated address).
func (s *selfAddrs) addHostPort(host string, port int) {
	a := selfAddr{port: port, ips: map[netip.Addr]bool{}, names: map[string]bool{}}
	if ip, err := netip.ParseAddr(host); err == nil {
		a.ips[ip.Unmap().WithZone("")] = true
	} else {
		a.names[strings.TrimSuffix(strings.ToLower(host), ".")] = true
	}
	s.addEntry(a)
}

func (s *selfAddrs) addEntry(a selfAddr) {
	for {
		old := s.set.Load()
		var next []selfAddr
		if old != nil {
			next = append(next, *old...)
		}
		next = append(next, a)
		if s.set.CompareAndSwap(old, &next) {
			return
		}
	}
}

// holds reports whether host:port reaches this sidecar.
func (s *selfAddrs) holds(host string, port int) bool {
	set := s.set.Load()
	if set == nil {
		return false
	}
	host = strings.TrimSuffix(strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")), ".")
	ip, ipErr := netip.ParseAddr(host)
	if ipErr == nil {
		ip = ip.Unmap().WithZone("")
	}
	for _, a := range *set {
		if a.port != port {
			continue
		}
		if ipErr == nil && (a.ips[ip] || a.loopback && ip.IsLoopback()) {
			return true
		}
		if ipErr != nil && (a.names[host] || a.loopback && (host == "localhost" || strings.HasSuffix(host, ".localhost"))) {
			return true
		}
	}
	return false
}

// check refuses a service (already validated) with a node at one of the
// sidecar's addresses.
func (s *selfAddrs) check(svc *Service) error {
	for i, n := range svc.Nodes {
		host, port, err := nodeTarget(n)
		if err != nil {
			return under(nodeField(i), err)
		}
		if s.holds(host, port) {
			return fmt.Errorf("nodes[%d] at %s is this sidecar's own listen address: calls to it would come back here in a loop", i, net.JoinHostPort(host, strconv.Itoa(port)))
		}
	}
	return nil
}
