// Openloop is the fixed-rate load of bench/compare.sh: it sends requests
// on a timetable, whatever the server's answers, and measures each
// request's latency from the time it was scheduled, not from the time it
// went out, so a server that stalls is charged for every request that had
// to wait (no coordinated omission, as wrk2 does it).
//
//	openloop -url http://127.0.0.1:8081/bench/hello -rate 2000 -duration 10s
//
// Each of -conns keep-alive connections has its own timetable, rate/conns
// requests per second, offset from the others so the requests are evenly
// spread; a connection whose answer is late sends its next request late,
// and that lateness is in the next latency. The client is a few lines of
// HTTP/1.1 over a buffered connection (no net/http), so it costs the
// shared machine little. It prints one line:
//
//	rate=2000 achieved=1999.8 requests=20000 errors=0 p50=0.210ms p90=0.320ms p99=0.850ms max=4.1ms
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	target := flag.String("url", "", "`URL` to request")
	rate := flag.Float64("rate", 2000, "requests per second, all connections together")
	duration := flag.Duration("duration", 10*time.Second, "how long to send")
	conns := flag.Int("conns", 32, "keep-alive connections")
	method := flag.String("method", "GET", "request method")
	body := flag.String("body", "", "request body")
	ctype := flag.String("content-type", "application/json", "Content-Type of a request with a body")
	timeout := flag.Duration("timeout", 5*time.Second, "per-request timeout")
	flag.Parse()
	if err := run(*target, *rate, *duration, *conns, *method, *body, *ctype, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "openloop:", err)
		os.Exit(1)
	}
}

func run(target string, rate float64, duration time.Duration, conns int, method, body, ctype string, timeout time.Duration) error {
	u, err := url.Parse(target)
	if err != nil || u.Scheme != "http" || u.Host == "" {
		return fmt.Errorf("-url %q: want http://host:port/path", target)
	}
	if rate <= 0 || conns <= 0 || duration <= 0 {
		return errors.New("-rate, -conns and -duration must be positive")
	}
	var req bytes.Buffer
	fmt.Fprintf(&req, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: openloop\r\n", method, u.RequestURI(), u.Host)
	if body != "" || method == "POST" || method == "PUT" {
		fmt.Fprintf(&req, "Content-Type: %s\r\nContent-Length: %d\r\n", ctype, len(body))
	}
	req.WriteString("\r\n")
	req.WriteString(body)

	interval := time.Duration(float64(time.Second) * float64(conns) / rate)
	perConn := int(float64(duration) / float64(interval))
	start := time.Now().Add(50 * time.Millisecond) // every connection dialled first
	results := make([][]time.Duration, conns)
	errs := make([]int, conns)
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lat := make([]time.Duration, 0, perConn)
			offset := interval * time.Duration(i) / time.Duration(conns)
			var c *client
			for k := range perConn {
				due := start.Add(offset + time.Duration(k)*interval)
				if d := time.Until(due); d > 0 {
					time.Sleep(d)
				}
				var err error
				if c == nil {
					c, err = dial(u.Host)
				}
				keep := false
				if err == nil {
					keep, err = c.do(req.Bytes(), method == "HEAD", due.Add(timeout))
				}
				if err != nil {
					errs[i]++
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					if c != nil {
						c.conn.Close()
						c = nil
					}
					continue
				}
				lat = append(lat, time.Since(due))
				if !keep {
					c.conn.Close()
					c = nil
				}
			}
			if c != nil {
				c.conn.Close()
			}
			results[i] = lat
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []time.Duration
	nerr := 0
	for i := range results {
		all = append(all, results[i]...)
		nerr += errs[i]
	}
	slices.Sort(all)
	q := func(p float64) string {
		if len(all) == 0 {
			return "-"
		}
		return ms(all[min(len(all)-1, int(p*float64(len(all))))])
	}
	maxLat := "-"
	if len(all) > 0 {
		maxLat = ms(all[len(all)-1])
	}
	fmt.Printf("rate=%.0f achieved=%.1f requests=%d errors=%d p50=%s p90=%s p99=%s max=%s\n",
		rate, float64(len(all)+nerr)/elapsed.Seconds(), len(all), nerr, q(0.50), q(0.90), q(0.99), maxLat)
	if firstErr != nil {
		fmt.Fprintln(os.Stderr, "openloop: first error:", firstErr)
	}
	return nil
}

func ms(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 3, 64) + "ms"
}

// client is one keep-alive HTTP/1.1 connection.
type client struct {
	conn net.Conn
	br   *bufio.Reader
}

func dial(host string) (*client, error) {
	c, err := net.DialTimeout("tcp", host, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return &client{conn: c, br: bufio.NewReaderSize(c, 16<<10)}, nil
}

// do sends req and reads the whole response; a status other than 2xx is
// an error. keep says whether the connection may serve another request.
func (c *client) do(req []byte, head bool, deadline time.Time) (keep bool, err error) {
	c.conn.SetDeadline(deadline)
	if _, err := c.conn.Write(req); err != nil {
		return false, err
	}
	line, err := c.br.ReadSlice('\n')
	if err != nil {
		return false, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return false, fmt.Errorf("bad status line %q", line)
	}
	code, _ := strconv.Atoi(string(line[9:12]))
	length, chunked, closing := int64(-1), false, false
	for {
		l, err := c.br.ReadSlice('\n')
		if err != nil {
			return false, err
		}
		s := strings.TrimSpace(string(l))
		if s == "" {
			break
		}
		k, v, _ := strings.Cut(s, ":")
		v = strings.TrimSpace(v)
		switch strings.ToLower(k) {
		case "content-length":
			length, _ = strconv.ParseInt(v, 10, 64)
		case "transfer-encoding":
			chunked = strings.EqualFold(v, "chunked")
		case "connection":
			closing = strings.EqualFold(v, "close")
		}
	}
	switch {
	case head || code == 204 || code == 304:
	case chunked:
		for {
			l, err := c.br.ReadSlice('\n')
			if err != nil {
				return false, err
			}
			n, err := strconv.ParseInt(strings.TrimSpace(strings.SplitN(string(l), ";", 2)[0]), 16, 64)
			if err != nil {
				return false, err
			}
			if _, err := c.br.Discard(int(n) + 2); err != nil {
				return false, err
			}
			if n == 0 {
				break
			}
		}
	case length >= 0:
		if _, err := c.br.Discard(int(length)); err != nil {
			return false, err
		}
	default:
		io.Copy(io.Discard, c.br)
		closing = true
	}
	if code < 200 || code > 299 {
		return !closing, fmt.Errorf("status %d", code)
	}
	return !closing, nil
}
