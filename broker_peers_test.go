package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// startSharing starts a sidecar on a loopback port and advertises its bound
// address to other sidecars, as run does once it has listened.
func startSharing(t *testing.T, cfg *Config) (*server, string) {
	t.Helper()
	s, base, _ := startSidecarAt(t, cfg, "127.0.0.1:0")
	addr, err := net.ResolveTCPAddr("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	s.setAdvertise(addr)
	return s, base
}

// inbox records what one websocket subscriber receives, by body.
type inbox struct {
	conn *websocket.Conn

	mu     sync.Mutex // guards the fields below
	counts map[string]int
	header map[string]map[string]string
	total  int
}

// subscribe opens a websocket subscriber at base+path and records its
// messages until the test ends or the subscriber is closed.
func subscribe(t *testing.T, base, path string) *inbox {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+path, nil)
	if err != nil {
		t.Fatalf("dial %s%s: %v", base, path, err)
	}
	in := &inbox{conn: conn, counts: map[string]int{}, header: map[string]map[string]string{}}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			_, data, err := conn.Read(context.Background())
			if err != nil {
				return
			}
			var m Message
			if err := json.Unmarshal(data, &m); err != nil {
				t.Errorf("frame %q is not a message: %v", data, err)
				return
			}
			in.mu.Lock()
			in.counts[string(m.Body)]++
			in.header[string(m.Body)] = m.Header
			in.total++
			in.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		conn.CloseNow()
		wg.Wait()
	})
	return in
}

// has reports whether every body in want arrived.
func (in *inbox) has(want []string) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, b := range want {
		if in.counts[b] == 0 {
			return false
		}
	}
	return true
}

func (in *inbox) snapshot() (counts map[string]int, total int) {
	in.mu.Lock()
	defer in.mu.Unlock()
	return maps.Clone(in.counts), in.total
}

// wantEachOnce fails t unless the subscriber received every body of want
// once, and nothing else.
func (in *inbox) wantEachOnce(t *testing.T, name string, want []string) {
	t.Helper()
	counts, total := in.snapshot()
	if total != len(want) {
		t.Errorf("%s received %d messages, want %d", name, total, len(want))
	}
	for _, w := range want {
		if counts[w] != 1 {
			t.Errorf("%s received %q %d times, want once", name, w, counts[w])
		}
	}
}

// topicNodes returns the node IDs of topic's registry entry as seen at base.
func topicNodes(t *testing.T, base, topic string) []string {
	t.Helper()
	return lookup(t, base, topicServicePrefix+topic)
}

// peerBacklog is the number of deliveries s has queued for other
// sidecars.
func peerBacklog(s *server) int {
	s.peers.pmu.Lock()
	defer s.peers.pmu.Unlock()
	n := 0
	for _, pe := range s.peers.peers {
		n += len(pe.queue)
	}
	return n
}

// peersIdle reports whether s has no delivery queued or in flight to other
// sidecars.
func peersIdle(s *server) bool {
	s.peers.pmu.Lock()
	defer s.peers.pmu.Unlock()
	return len(s.peers.peers) == 0
}

func publishN(t *testing.T, base, topic, prefix string, n int) {
	t.Helper()
	for i := range n {
		body := fmt.Sprintf("%s-%d", prefix, i)
		code, resp := do(t, "POST", base+"/broker?topic="+topic, body, "Timestamp", fmt.Sprint(1499951537+i), "X-From", prefix)
		if code != http.StatusOK {
			t.Fatalf("POST %s/broker?topic=%s = %d %s", base, topic, code, resp)
		}
	}
}

// peersState describes the peer brokers of sidecars A, B, ... for a
// failure message: what each forwarded, received, refused and dropped.
func peersState(servers ...*server) string {
	var sb strings.Builder
	for i, s := range servers {
		p := s.peers
		fmt.Fprintf(&sb, "%c: forwarded %d forward errors %d remote dropped %d received %d missed %d full %d rerouted %d refused %d idle %v; broker delivered %d dropped %d\n",
			'A'+i, p.forwarded.Load(), p.forwardErrors.Load(), p.remoteDropped.Load(), p.received.Load(), p.missed.Load(), p.full.Load(),
			p.rerouted.Load(), p.refused.Load(), peersIdle(s), s.broker.delivered.Load(), s.broker.dropped.Load())
	}
	return sb.String()
}

func bodies(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%d", prefix, i)
	}
	return out
}

// TestPubSubAcrossSidecars: B uses A's registry (--registry sidecar); A,
// with the memory registry, starts sharing when B appears. Messages
// published on either reach every plain subscriber on both exactly once,
// and a queue group spread over both exactly once in total.
func TestPubSubAcrossSidecars(t *testing.T) {
	a, urlA := startSharing(t, testConfig())
	b, urlB := startSharing(t, remoteConfig("sidecar", urlA))
	exchange(t, a, urlA, b, urlB)
}

// TestPubSubConsul is TestPubSubAcrossSidecars with both sidecars on a
// real Consul agent (skipped without a consul binary).
func TestPubSubConsul(t *testing.T) {
	t.Parallel()
	consul := startConsul(t)
	a, urlA := startSharing(t, remoteConfig("consul", consul.http))
	b, urlB := startSharing(t, remoteConfig("consul", consul.http))
	exchange(t, a, urlA, b, urlB)
}

// exchange subscribes on A and B (plain, and queue group g on each),
// publishes 50 messages on each, checks that every plain subscriber got
// each once and the group each once in total, then unsubscribes and
// checks that the topic entry goes away.
func exchange(t *testing.T, a *server, urlA string, b *server, urlB string) {
	t.Helper()
	const wait = 10 * time.Second
	plainA := subscribe(t, urlA, "/broker?topic=orders")
	plainB := subscribe(t, urlB, "/broker?topic=orders")
	groupA := subscribe(t, urlA, "/broker?topic=orders&queue=g")
	groupB := subscribe(t, urlB, "/broker?topic=orders&queue=g")
	// Two nodes per sidecar: plain, and group g; seen from both.
	eventually(t, wait, "orders entry with 4 nodes on A and B", func() bool {
		return len(topicNodes(t, urlA, "orders")) == 4 && len(topicNodes(t, urlB, "orders")) == 4
	})

	const n = 50
	publishN(t, urlA, "orders", "A", n)
	publishN(t, urlB, "orders", "B", n)
	want := append(bodies("A", n), bodies("B", n)...)

	// missing lists, per subscriber, what has not arrived yet.
	missing := func() map[string][]string {
		out := map[string][]string{}
		ca, _ := groupA.snapshot()
		cb, _ := groupB.snapshot()
		for _, w := range want {
			if !plainA.has([]string{w}) {
				out["plain on A"] = append(out["plain on A"], w)
			}
			if !plainB.has([]string{w}) {
				out["plain on B"] = append(out["plain on B"], w)
			}
			if ca[w]+cb[w] == 0 {
				out["group g"] = append(out["group g"], w)
			}
		}
		return out
	}
	deadline := time.Now().Add(wait)
	for len(missing()) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: missing %v\n%s", wait, missing(), peersState(a, b))
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Quiet: nothing queued for another sidecar, and every frame written
	// to a subscriber has been read. Then no duplicate can still come.
	readAll := func() int {
		_, t1 := plainA.snapshot()
		_, t2 := plainB.snapshot()
		_, t3 := groupA.snapshot()
		_, t4 := groupB.snapshot()
		return t1 + t2 + t3 + t4
	}
	eventually(t, wait, "deliveries finished", func() bool {
		return peersIdle(a) && peersIdle(b) && a.broker.delivered.Load()+b.broker.delivered.Load() == int64(readAll())
	})

	plainA.wantEachOnce(t, "plain on A", want)
	plainB.wantEachOnce(t, "plain on B", want)
	ca, ta := groupA.snapshot()
	cb, tb := groupB.snapshot()
	if ta+tb != len(want) || ta == 0 || tb == 0 {
		t.Errorf("group g received %d on A + %d on B, want %d in total, some on each", ta, tb, len(want))
	}
	for _, w := range want {
		if ca[w]+cb[w] != 1 {
			t.Errorf("group g received %q %d times on A and %d on B, want once in total", w, ca[w], cb[w])
		}
	}
	t.Logf("group g: %d on A, %d on B; A forwarded %d, B forwarded %d", ta, tb, a.peers.forwarded.Load(), b.peers.forwarded.Load())

	// Headers arrive as published, on the publisher's sidecar and the other.
	for _, body := range []string{"A-7", "B-7"} {
		plainA.mu.Lock()
		ha := plainA.header[body]
		plainA.mu.Unlock()
		plainB.mu.Lock()
		hb := plainB.header[body]
		plainB.mu.Unlock()
		if !maps.Equal(ha, hb) || ha["Timestamp"] != "1499951544" || ha["X-From"] != body[:1] {
			t.Errorf("headers of %q: on A %v, on B %v; want the same, with Timestamp 1499951544 and X-From %s", body, ha, hb, body[:1])
		}
	}
	if a.peers.forwardErrors.Load()+b.peers.forwardErrors.Load()+a.peers.remoteDropped.Load()+b.peers.remoteDropped.Load() != 0 {
		t.Errorf("forward errors %d/%d, dropped %d/%d, want none", a.peers.forwardErrors.Load(), b.peers.forwardErrors.Load(),
			a.peers.remoteDropped.Load(), b.peers.remoteDropped.Load())
	}

	t.Run("unsubscribing removes the topic entry", func(t *testing.T) {
		plainB.conn.Close(websocket.StatusNormalClosure, "")
		groupB.conn.Close(websocket.StatusNormalClosure, "")
		eventually(t, wait, "B's nodes gone from orders on A and B", func() bool {
			return len(topicNodes(t, urlA, "orders")) == 2 && len(topicNodes(t, urlB, "orders")) == 2
		})
		plainA.conn.Close(websocket.StatusNormalClosure, "")
		groupA.conn.Close(websocket.StatusNormalClosure, "")
		eventually(t, wait, "orders entry gone on A and B", func() bool {
			return topicNodes(t, urlA, "orders") == nil && topicNodes(t, urlB, "orders") == nil
		})
	})
}

// TestPubSubThreeSidecars: B and C share A's registry; a queue group with a
// member on each of the three gets each message once in total.
func TestPubSubThreeSidecars(t *testing.T) {
	_, urlA := startSharing(t, testConfig())
	_, urlB := startSharing(t, remoteConfig("sidecar", urlA))
	_, urlC := startSharing(t, remoteConfig("sidecar", urlA))
	const wait = 10 * time.Second
	members := []*inbox{
		subscribe(t, urlA, "/broker?topic=jobs&queue=w"),
		subscribe(t, urlB, "/broker?topic=jobs&queue=w"),
		subscribe(t, urlC, "/broker?topic=jobs&queue=w"),
	}
	plainC := subscribe(t, urlC, "/broker?topic=jobs")
	eventually(t, wait, "jobs entry with 4 nodes everywhere", func() bool {
		return len(topicNodes(t, urlA, "jobs")) == 4 && len(topicNodes(t, urlB, "jobs")) == 4 && len(topicNodes(t, urlC, "jobs")) == 4
	})
	const n = 60
	publishN(t, urlB, "jobs", "B", n)
	want := bodies("B", n)
	eventually(t, wait, "every job at C's plain subscriber and at group w", func() bool {
		if !plainC.has(want) {
			return false
		}
		for _, w := range want {
			got := 0
			for _, m := range members {
				c, _ := m.snapshot()
				got += c[w]
			}
			if got == 0 {
				return false
			}
		}
		return true
	})
	for _, w := range want {
		got := 0
		for _, m := range members {
			c, _ := m.snapshot()
			got += c[w]
		}
		if got != 1 {
			t.Errorf("group w received %q %d times, want once", w, got)
		}
	}
}

// TestPubSubDeliverRefused: /broker/deliver answers only sidecars.
func TestPubSubDeliverRefused(t *testing.T) {
	const valid = `{"messages":[{"topic":"t","plain":true,"header":{"A":"1"},"body":"aGk="}]}`
	// A client on another loopback address than the sidecars' 127.0.0.1.
	stranger := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 9)}}).DialContext,
	}}
	post := func(t *testing.T, client *http.Client, url, body string, header ...string) (int, []byte) {
		t.Helper()
		req, _ := http.NewRequest("POST", url, strings.NewReader(body))
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("POST %s: %v", url, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}

	t.Run("without a secret: addresses of registered sidecars", func(t *testing.T) {
		a, urlA := startSharing(t, testConfig())
		startSharing(t, remoteConfig("sidecar", urlA))
		eventually(t, 10*time.Second, "A and B registered as broker members", func() bool {
			return len(lookup(t, urlA, brokerService)) == 2
		})
		code, body := post(t, stranger, urlA+deliverPath, valid)
		wantError(t, "POST /broker/deliver from 127.0.0.9", code, body, http.StatusForbidden)
		if a.peers.refused.Load() != 1 {
			t.Fatalf("refused = %d, want 1", a.peers.refused.Load())
		}
		// From the address B registered (any process there: see README).
		if code, body := post(t, http.DefaultClient, urlA+deliverPath, valid); code != http.StatusOK {
			t.Fatalf("POST /broker/deliver from 127.0.0.1 = %d %s, want 200", code, body)
		}
	})

	t.Run("with --broker_secret", func(t *testing.T) {
		cfgA := testConfig()
		cfgA.BrokerSecret = "s3cret"
		_, urlA := startSharing(t, cfgA)
		cfgB := remoteConfig("sidecar", urlA)
		cfgB.BrokerSecret = "s3cret"
		_, urlB := startSharing(t, cfgB)
		hostB := strings.TrimPrefix(urlB, "http://")
		sub := subscribe(t, urlB, "/broker?topic=t")
		eventually(t, 10*time.Second, "B's node of t seen on A", func() bool { return len(topicNodes(t, urlA, "t")) == 1 })
		publishN(t, urlA, "t", "A", 3)
		eventually(t, 10*time.Second, "messages from A on B", func() bool { return sub.has(bodies("A", 3)) })

		now := time.Now()
		tests := []struct {
			name   string
			body   string
			header []string
			code   int
		}{
			{"no signature", valid, nil, http.StatusForbidden},
			{"the raw secret, as before", valid, []string{"Micro-Broker-Secret", "s3cret"}, http.StatusForbidden},
			{"the bearer token", valid, []string{"Authorization", "Bearer s3cret"}, http.StatusForbidden},
			{"signed with another key", valid, signed("guess", hostB, now, valid), http.StatusForbidden},
			{"signature of another body", valid, signed("s3cret", hostB, now, `{"messages":[]}`), http.StatusForbidden},
			{"timestamp changed", valid, append(signed("s3cret", hostB, now, valid), deliverTimeHeader, fmt.Sprint(now.Unix()+1)), http.StatusForbidden},
			{"signed 2 minutes ago", valid, signed("s3cret", hostB, now.Add(-2*time.Minute), valid), http.StatusForbidden},
			{"signed 2 minutes ahead", valid, signed("s3cret", hostB, now.Add(2*time.Minute), valid), http.StatusForbidden},
			{"timestamp not a number", valid, append(signed("s3cret", hostB, now, valid), deliverTimeHeader, "soon"), http.StatusForbidden},
			{"signature not hex", valid, append(signed("s3cret", hostB, now, valid), deliverSigHeader, strings.Repeat("z", 64)), http.StatusForbidden},
			{"bad JSON", `{"messages":[`, signed("s3cret", hostB, now, `{"messages":[`), http.StatusBadRequest},
			{"bad topic", `{"messages":[{"topic":"a b","plain":true}]}`, signed("s3cret", hostB, now, `{"messages":[{"topic":"a b","plain":true}]}`), http.StatusBadRequest},
			{"null message", `{"messages":[null]}`, signed("s3cret", hostB, now, `{"messages":[null]}`), http.StatusBadRequest},
		}
		for _, tt := range tests {
			code, body := post(t, http.DefaultClient, urlB+deliverPath, tt.body, tt.header...)
			wantError(t, "POST /broker/deliver "+tt.name, code, body, tt.code)
		}
		for _, at := range []time.Time{now, now.Add(-50 * time.Second), now.Add(50 * time.Second)} {
			code, body := post(t, http.DefaultClient, urlB+deliverPath, valid, signed("s3cret", hostB, at, valid)...)
			if code != http.StatusOK || !strings.Contains(string(body), `"delivered":1`) {
				t.Fatalf("POST /broker/deliver signed with the secret at now%+ds = %d %s, want 200 delivered 1", int(at.Sub(now).Seconds()), code, body)
			}
		}
		// The same signed delivery again (a replay), and one signed for
		// another sidecar, are refused.
		code, body := post(t, http.DefaultClient, urlB+deliverPath, valid, signed("s3cret", hostB, now, valid)...)
		wantError(t, "POST /broker/deliver replayed", code, body, http.StatusForbidden)
		code, body = post(t, http.DefaultClient, urlB+deliverPath, valid, signed("s3cret", "127.0.0.1:1", time.Now(), valid)...)
		wantError(t, "POST /broker/deliver signed for another sidecar", code, body, http.StatusForbidden)
	})

	t.Run("with --auth_token", func(t *testing.T) {
		cfgA := testConfig()
		cfgA.AuthToken = "tok"
		_, urlA := startSharing(t, cfgA)
		cfgB := remoteConfig("sidecar", urlA)
		cfgB.AuthToken = "tok"
		_, urlB := startSharing(t, cfgB)
		hostB := strings.TrimPrefix(urlB, "http://")
		// The token keys the signature; on its own it is no proof, since
		// senders never send it.
		for _, tt := range []struct {
			name   string
			header []string
		}{
			{"without anything", nil},
			{"with the bearer token alone", []string{"Authorization", "Bearer tok"}},
			{"signed with another key", signed("guess", hostB, time.Now(), valid)},
		} {
			code, body := post(t, http.DefaultClient, urlB+deliverPath, valid, tt.header...)
			wantError(t, "POST /broker/deliver "+tt.name, code, body, http.StatusForbidden)
		}
		if code, body := post(t, http.DefaultClient, urlB+deliverPath, valid, signed("tok", hostB, time.Now(), valid)...); code != http.StatusOK {
			t.Fatalf("POST /broker/deliver signed with the token, without a bearer token = %d %s, want 200", code, body)
		}
		if code, body := do(t, "GET", urlB+"/registry", ""); code != http.StatusUnauthorized {
			t.Fatalf("GET /registry without the token = %d %s, want 401: only %s skips the bearer check", code, body, deliverPath)
		}

		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(urlB, "http")+"/broker?topic=t",
			&websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer tok"}}})
		if err != nil {
			t.Fatalf("dial B: %v", err)
		}
		defer conn.CloseNow()
		eventually(t, 10*time.Second, "B's node of t seen on A", func() bool {
			code, body := do(t, "GET", urlA+"/registry?service="+topicServicePrefix+"t", "", "Authorization", "Bearer tok")
			return code == http.StatusOK && strings.Contains(string(body), `"id"`)
		})
		if code, body := do(t, "POST", urlA+"/broker?topic=t", "hello", "Authorization", "Bearer tok"); code != http.StatusOK {
			t.Fatalf("POST /broker on A = %d %s", code, body)
		}
		_, data, err := conn.Read(ctx)
		var m Message
		if err != nil || json.Unmarshal(data, &m) != nil || string(m.Body) != "hello" {
			t.Fatalf("B's subscriber read %q, %v; want the message hello published on A", data, err)
		}
	})
}

// signed returns the headers of a delivery of body to host signed with key
// at at, computed here from the documented format rather than with
// signDelivery.
func signed(key, host string, at time.Time, body string) []string {
	ts := fmt.Sprint(at.Unix())
	m := hmac.New(sha256.New, []byte(key))
	m.Write([]byte("sidecar broker delivery\n" + ts + "\n" + host + "\n" + body))
	return []string{deliverTimeHeader, ts, deliverSigHeader, hex.EncodeToString(m.Sum(nil))}
}

// TestPubSubDeliverSendsNoCredential: the addresses a delivery goes to come
// from the registry, which anyone who can write to it fills. A fake peer
// registered under the topic records what arrives: no Authorization, nor
// the secret or the token anywhere in headers or body; a signature that
// checks out with the expected key instead.
func TestPubSubDeliverSendsNoCredential(t *testing.T) {
	tests := []struct {
		name          string
		secret, token string
		key           string // what signs deliveries; "" none
	}{
		{"secret and token", "s3cret-value", "token-value", "s3cret-value"},
		{"token only", "", "token-value", "token-value"},
		{"secret only", "s3cret-value", "", "s3cret-value"},
		{"neither", "", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			type arrival struct {
				header http.Header
				body   []byte
			}
			got := make(chan arrival, 16)
			fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
				select {
				case got <- arrival{r.Header.Clone(), body}:
				default:
				}
				w.Write([]byte(`{"delivered":1}`))
			}))
			t.Cleanup(fake.Close)

			cfg := testConfig()
			cfg.BrokerSecret, cfg.AuthToken = tt.secret, tt.token
			_, urlA := startSharing(t, cfg)
			auth := []string{"Authorization", "Bearer " + tt.token}
			reg := fmt.Sprintf(`{"name":"%st","nodes":[{"id":"fake","address":"127.0.0.1","port":%d,"metadata":{"sidecar":"fake"}}]}`,
				topicServicePrefix, fake.Listener.Addr().(*net.TCPAddr).Port)
			if code, resp := do(t, "POST", urlA+"/registry", reg, auth...); code != http.StatusOK {
				t.Fatalf("register the fake peer: %d %s", code, resp)
			}
			if code, resp := do(t, "POST", urlA+"/broker?topic=t", "hello", auth...); code != http.StatusOK {
				t.Fatalf("POST /broker?topic=t = %d %s", code, resp)
			}
			var a arrival
			select {
			case a = <-got:
			case <-time.After(10 * time.Second):
				t.Fatal("no delivery reached the fake peer in 10s")
			}
			if v := a.header.Get("Authorization"); v != "" {
				t.Errorf("delivery carried Authorization %q, want none", v)
			}
			for _, cred := range []string{tt.secret, tt.token} {
				if cred == "" {
					continue
				}
				for k, vs := range a.header {
					for _, v := range vs {
						if strings.Contains(v, cred) {
							t.Errorf("delivery header %s: %q carries the credential %q", k, v, cred)
						}
					}
				}
				if strings.Contains(string(a.body), cred) {
					t.Errorf("delivery body %s carries the credential %q", a.body, cred)
				}
			}
			if !strings.Contains(string(a.body), `"topic":"t"`) {
				t.Errorf("delivery body = %s, want the message on topic t", a.body)
			}
			ts, sig := a.header.Get(deliverTimeHeader), a.header.Get(deliverSigHeader)
			if tt.key == "" {
				if ts != "" || sig != "" {
					t.Errorf("unsigned delivery carried %s %q, %s %q; want neither", deliverTimeHeader, ts, deliverSigHeader, sig)
				}
				return
			}
			sec, err := strconv.ParseInt(ts, 10, 64)
			if err != nil || time.Since(time.Unix(sec, 0)).Abs() > time.Minute {
				t.Errorf("%s = %q, want the current unix time", deliverTimeHeader, ts)
			}
			want := signed(tt.key, fake.Listener.Addr().String(), time.Unix(sec, 0), string(a.body))[3]
			if sig != want {
				t.Errorf("%s = %q, want HMAC-SHA256 keyed by %q: %q", deliverSigHeader, sig, tt.key, want)
			}
		})
	}
}

// TestPubSubPeerDown: a sidecar in the topic entry that refuses
// connections, and one that never answers, do not hold up publishing on
// A: local subscribers get everything, the lost deliveries are counted.
func TestPubSubPeerDown(t *testing.T) {
	cfg := testConfig()
	cfg.ClientRequestTimeout = time.Second
	a, urlA := startSharing(t, cfg)
	a.peers.pmu.Lock()
	a.peers.queueLen = 4
	a.peers.pmu.Unlock()

	hung := hungServer(t)
	hungPort := hung.Listener.Addr().(*net.TCPAddr).Port
	for id, port := range map[string]int{"refused": freePort(t), "hung": hungPort} {
		body := fmt.Sprintf(`{"name":"%st","nodes":[{"id":%q,"address":"127.0.0.1","port":%d,"metadata":{"sidecar":%q}}]}`,
			topicServicePrefix, id, port, id)
		if code, resp := do(t, "POST", urlA+"/registry", body); code != http.StatusOK {
			t.Fatalf("register %s: %d %s", id, code, resp)
		}
	}
	local := subscribe(t, urlA, "/broker?topic=t")
	waitSubscribers(t, a, 1)

	const n = 50
	start := time.Now()
	publishN(t, urlA, "t", "A", n) // each call returns: publishing never waits on the dead sidecars
	t.Logf("%d publishes with two dead sidecars in the entry took %s", n, time.Since(start))
	eventually(t, 10*time.Second, "local subscriber got everything", func() bool { return local.has(bodies("A", n)) })
	eventually(t, 10*time.Second, "failures and drops counted", func() bool {
		return a.peers.forwardErrors.Load() > 0 && a.peers.remoteDropped.Load() > 0
	})
	t.Logf("forward errors %d, dropped %d", a.peers.forwardErrors.Load(), a.peers.remoteDropped.Load())
	code, body := do(t, "GET", urlA+"/metrics", "")
	for _, m := range []string{"sidecar_broker_forward_errors_total", "sidecar_broker_remote_dropped_total", "sidecar_broker_forwarded_total"} {
		if code != http.StatusOK || !strings.Contains(string(body), m) {
			t.Fatalf("GET /metrics = %d, want %s in\n%s", code, m, body)
		}
	}
}

// BenchmarkPubSubAcrossSidecars publishes on A to one subscriber on B (B
// uses A's registry): the throughput of the delivery path between
// sidecars, batching included.
func BenchmarkPubSubAcrossSidecars(b *testing.B) {
	const window = peerQueueLen / 2 // the queue to B never fills
	logger := discardLogger()
	start := func(cfg *Config) (*server, *httptest.Server) {
		s, err := newServer(cfg, logger)
		if err != nil {
			b.Fatal(err)
		}
		s.start(context.Background())
		ts := httptest.NewServer(s.handler)
		s.setAdvertise(ts.Listener.Addr())
		b.Cleanup(func() { s.streams.Close(); ts.CloseClientConnections(); ts.Close(); s.Close() })
		return s, ts
	}
	a, tsA := start(testConfig())
	bs, tsB := start(remoteConfig("sidecar", tsA.URL))

	var received atomic.Int64
	countFrames(b, tsB, "/broker?topic=bench", &received)
	for len(lookupNodes(a, topicServicePrefix+"bench")) != 1 || len(lookupNodes(bs, brokerService)) != 2 {
		time.Sleep(time.Millisecond)
	}
	m := &Message{Header: map[string]string{"Timestamp": "1"}, Body: []byte("0123456789abcdef")}
	publishWindowed(b, window, 1, &received, "msgs/s", func() error { return a.broker.publish("bench", m) })
	if d := a.peers.remoteDropped.Load(); d != 0 {
		b.Fatalf("%d dropped", d)
	}
}

func lookupNodes(s *server, name string) []*Node {
	svc, err := s.registry.reg.GetService(context.Background(), name)
	if err != nil {
		return nil
	}
	return svc.Nodes
}

func TestAdvertiseHost(t *testing.T) {
	if got := advertiseHost(net.ParseIP("10.1.2.3")); got != "10.1.2.3" {
		t.Fatalf("advertiseHost(10.1.2.3) = %q, want 10.1.2.3", got)
	}
	for _, ip := range []net.IP{net.IPv4zero, net.IPv6unspecified, nil} {
		got := net.ParseIP(advertiseHost(ip))
		if got == nil || got.IsUnspecified() {
			t.Fatalf("advertiseHost(%v) = %v, want an address other hosts can dial", ip, got)
		}
	}
}

// TestPubSubPeerQueueBytes: the queue for a hung sidecar is bounded in
// bytes too, not only in messages (4096 x 1 MiB would be 4 GiB).
func TestPubSubPeerQueueBytes(t *testing.T) {
	cfg := testConfig()
	a, urlA := startSharing(t, cfg)
	hung := hungServer(t)
	port := hung.Listener.Addr().(*net.TCPAddr).Port
	body := fmt.Sprintf(`{"name":"%st","nodes":[{"id":"hung","address":"127.0.0.1","port":%d,"metadata":{"sidecar":"hung"}}]}`, topicServicePrefix, port)
	if code, resp := do(t, "POST", urlA+"/registry", body); code != http.StatusOK {
		t.Fatalf("register: %d %s", code, resp)
	}
	msg := make([]byte, 512<<10)
	for range 300 {
		a.broker.publish("t", &Message{Header: map[string]string{}, Body: msg[:len(msg):len(msg)]})
	}
	a.peers.pmu.Lock()
	queued := 0
	for _, pe := range a.peers.peers {
		for _, d := range pe.queue {
			queued += len(d.Body)
		}
	}
	a.peers.pmu.Unlock()
	t.Logf("queued for the hung sidecar: %d MiB, dropped %d", queued>>20, a.peers.remoteDropped.Load())
	if queued > peerQueueBytes {
		t.Errorf("%d MiB queued for one hung peer, want at most %d MiB", queued>>20, peerQueueBytes>>20)
	}
	if a.peers.remoteDropped.Load() == 0 {
		t.Error("no message counted as dropped for the hung peer")
	}
}

// TestPubSubStuckMemberAcrossSidecars: a queue group spans two sidecars
// that share a registry, its member on B stops reading and its member on
// A reads, and messages are published on both. Once B's member is full, B
// refuses the group's deliveries and A gives them to its own member, and
// B's own publishes go to A: the healthy member receives every message
// published after the stuck one is found too slow, the stuck one gets
// close status 1008, no message reaches both, and every message is
// received or counted as dropped on one of the sidecars.
func TestPubSubStuckMemberAcrossSidecars(t *testing.T) {
	a, urlA := startSharing(t, testConfig())
	b, urlB := startSharing(t, remoteConfig("sidecar", urlA))
	for _, s := range []*server{a, b} {
		s.broker.queueLen = 512
		s.broker.stuckAfter = 20 * time.Millisecond
		s.broker.writeTimeout = 2 * time.Minute // the stuck member reads again at the end
		s.broker.pingInterval = time.Hour       // and, not reading, answers no ping
	}
	const path = "/broker?topic=jobs&queue=workers"
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hc, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(urlA, "http")+path, nil)
	if err != nil {
		t.Fatalf("dial healthy member: %v", err)
	}
	hc.SetReadLimit(1 << 20)
	healthy := record(t, hc)
	waitSubscribers(t, a, 1)
	hsub := onlySubscriber(t, a)
	stuck := dialStuck(t, "ws"+strings.TrimPrefix(urlB, "http")+path)
	eventually(t, 10*time.Second, "jobs entry with a node of A and of B, seen from both", func() bool {
		return len(topicNodes(t, urlA, "jobs")) == 2 && len(topicNodes(t, urlB, "jobs")) == 2
	})

	const window, limit = 256, 200_000
	pad := strings.Repeat("x", 1024)
	client := &http.Client{Timeout: 10 * time.Second}
	publish := func(i int) {
		base := urlA
		if i%2 == 1 {
			base = urlB
		}
		resp, err := client.Post(base+"/broker?topic=jobs", "text/plain", strings.NewReader(fmt.Sprintf("%d %s", i, pad)))
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("publish %d = %d", i, resp.StatusCode)
		}
	}
	// The publisher keeps the healthy member's queue and the queues
	// between the sidecars short, so that none fills even on a loaded
	// machine: then nothing need be lost.
	room := func() bool { return queuedFor(hsub) < window && peerBacklog(a) < window && peerBacklog(b) < window }
	i := 0
	for ; i < limit && b.broker.slowDisconnects.Load() == 0; i++ {
		healthy.waitFor(t, time.Minute, "room in the healthy member's queue and between the sidecars", room)
		publish(i)
	}
	if i == limit {
		t.Fatalf("after %d messages the stuck member was never found too slow", i)
	}
	found := i
	n := found + 2000 // messages in all: 2,000 after the stuck member is found out
	t.Logf("stuck member found too slow after %d messages", found)
	settled := func() bool { return peersIdle(a) && peersIdle(b) && queuesDrained(a) && queuesDrained(b) }
	for ; i < n; i++ {
		healthy.waitFor(t, time.Minute, "room in the healthy member's queue and between the sidecars", room)
		publish(i)
	}
	healthy.waitFor(t, time.Minute, "deliveries settled", settled)

	fromStuck := readToClose(t, stuck, websocket.StatusPolicyViolation)
	lost := func() int {
		n := 0
		for _, s := range []*server{a, b} {
			n += int(s.broker.dropped.Load() + s.peers.forwardErrors.Load() + s.peers.remoteDropped.Load())
		}
		return n
	}
	healthy.waitFor(t, time.Minute, "every message received or counted as lost", func() bool {
		return settled() && healthy.count()+len(fromStuck)+lost() >= n
	})
	got := healthy.messages()
	if total := len(got) + len(fromStuck) + lost(); total != n {
		t.Errorf("healthy member got %d, stuck one %d, counted as lost %d: %d, want %d", len(got), len(fromStuck), lost(), total, n)
	}
	seen := make([]int, n)
	for _, k := range append(got, fromStuck...) {
		seen[k]++
	}
	missing, twice := 0, 0
	for k, c := range seen {
		if c > 1 {
			twice++
		}
		if k >= found && c == 0 {
			missing++
		}
	}
	if missing > 0 {
		t.Errorf("healthy member lacks %d of the %d messages published after the stuck one was found too slow", missing, n-found)
	}
	if twice > 0 {
		t.Errorf("%d messages reached a member twice, or both members", twice)
	}
	if l := lost(); l != 0 {
		t.Errorf("the queue group lost %d messages (counted)", l)
	}

	mA, mB := getMetrics(t, urlA), getMetrics(t, urlB)
	if mB["sidecar_broker_slow_disconnects_total"] != 1 {
		t.Errorf("B's /metrics slow disconnects = %v, want 1", mB["sidecar_broker_slow_disconnects_total"])
	}
	if mB["sidecar_broker_remote_full_total"] == 0 || mA["sidecar_broker_rerouted_total"] == 0 || mB["sidecar_broker_rerouted_total"] == 0 {
		t.Errorf("/metrics: B refused %v deliveries of A as full, A rerouted %v, B rerouted %v; want some of each",
			mB["sidecar_broker_remote_full_total"], mA["sidecar_broker_rerouted_total"], mB["sidecar_broker_rerouted_total"])
	}
	t.Logf("healthy %d, stuck %d, lost %d (dropped on A %v, on B %v); B refused %v, A rerouted %v, B rerouted %v",
		len(got), len(fromStuck), lost(), mA["sidecar_broker_dropped_total"], mB["sidecar_broker_dropped_total"],
		mB["sidecar_broker_remote_full_total"], mA["sidecar_broker_rerouted_total"], mB["sidecar_broker_rerouted_total"])
}

// TestFirstSeen: a signature is refused the second time until it expires,
// and past maxSeen live signatures a delivery is a 503 until the oldest
// expire, which frees room without a scan.
func TestFirstSeen(t *testing.T) {
	p := &peerBroker{}
	t0 := time.Unix(1_700_000_000, 0)
	if err := p.firstSeen("a", t0); err != nil {
		t.Fatalf("firstSeen(a) = %v, want nil", err)
	}
	if err := p.firstSeen("a", t0.Add(time.Second)); err == nil || !strings.Contains(err.Error(), "replay") {
		t.Fatalf("firstSeen(a) again = %v, want a replay error", err)
	}
	for i := 1; i < maxSeen; i++ {
		if err := p.firstSeen(strconv.Itoa(i), t0.Add(time.Second)); err != nil {
			t.Fatalf("firstSeen(%d) = %v", i, err)
		}
	}
	var he *httpError
	if err := p.firstSeen("full", t0.Add(2*time.Second)); !errors.As(err, &he) || he.code != http.StatusServiceUnavailable {
		t.Fatalf("firstSeen past maxSeen = %v, want a 503", err)
	}
	// "a" expires first, alone: room for one.
	later := t0.Add(2*deliverMaxSkew + time.Millisecond)
	if err := p.firstSeen("next", later); err != nil {
		t.Fatalf("firstSeen once the oldest expired = %v, want nil", err)
	}
	if err := p.firstSeen("a", later); err == nil {
		t.Fatalf("firstSeen(a) after its expiry took a full memory's room: want a 503 (others still live)")
	}
	// Everything but "next" expires: "a" is new again.
	if err := p.firstSeen("a", later.Add(time.Second)); err != nil {
		t.Fatalf("firstSeen(a) once all expired = %v, want nil", err)
	}
	if len(p.seen) != 2 || len(p.seenList)-p.seenHead != 2 {
		t.Fatalf("seen holds %d, list %d: want 2 and 2", len(p.seen), len(p.seenList)-p.seenHead)
	}
}

// BenchmarkFirstSeenFull: a delivery when the memory is full costs about
// what one when it is empty does.
func BenchmarkFirstSeenFull(b *testing.B) {
	p := &peerBroker{}
	t0 := time.Unix(1_700_000_000, 0)
	for i := range maxSeen {
		p.firstSeen(strconv.Itoa(i), t0)
	}
	b.ResetTimer()
	for i := range b.N {
		p.firstSeen("x"+strconv.Itoa(i), t0.Add(time.Second))
	}
}
