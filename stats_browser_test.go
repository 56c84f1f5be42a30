package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"image/color"
	"image/png"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// pageState is what the test reads back from the rendered page.
type pageState struct {
	polls      int // JSON refreshes the page made while loaded
	total      int // the "Requests" card
	errors     int // 4xx + 5xx, the "Errors" card
	ratePoints int // points of the 2xx line in the rate chart
	latPoints  int // points of the p95 line in the latency chart
	axisLabels int // tick labels in the rate chart
}

func readPage(t *testing.T, dom []byte) pageState {
	t.Helper()
	html := string(dom)
	intOf := func(re string) int {
		t.Helper()
		m := regexp.MustCompile(re).FindStringSubmatch(html)
		if m == nil {
			t.Fatalf("rendered page lacks %s; DOM:\n%.3000s", re, html)
		}
		n, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			t.Fatalf("rendered page: %s = %q: %v", re, m[1], err)
		}
		return int(n)
	}
	chart := func(id string) string {
		t.Helper()
		start := strings.Index(html, `id="`+id+`"`)
		end := strings.Index(html[max(start, 0):], "</svg>")
		if start < 0 || end < 0 {
			t.Fatalf("rendered page lacks the chart %s", id)
		}
		return html[start : start+end]
	}
	var p pageState
	p.polls = intOf(`<body data-polls="(\d+)"`)
	p.total = intOf(`id="total-reqs"[^>]*data-value="([\d.]+)"`)
	p.errors = intOf(`id="errors"[^>]*data-value="([\d.]+)"`)
	rate, latency := chart("chart-rate"), chart("chart-latency")
	html = rate
	p.ratePoints = intOf(`data-series="2xx" data-points="(\d+)"`)
	p.axisLabels = strings.Count(rate, "<text")
	html = latency
	p.latPoints = intOf(`data-series="p95" data-points="(\d+)"`)
	return p
}

// TestStatsBrowser opens /stats in headless Chromium, over the DevTools
// protocol, after some traffic, then makes more: the numbers and charts
// follow it while the page stays open, refreshing itself. It saves a
// screenshot in $SIDECAR_SCREENSHOT_DIR (or a temporary directory) for a
// person to see.
//
// The test waits for what the page shows, in real time. It used to load
// the page twice with chromium --dump-dom (--screenshot the second time)
// and --virtual-time-budget, and a loaded machine's Chromium sometimes
// stopped there for good, silent, until the test's 60 s ran out (2 of 13
// full runs; 0 of 12 alone).
func TestStatsBrowser(t *testing.T) {
	t.Parallel()
	chromium := devtoolsChromium(t)
	cfg := statsConfig()
	cfg.StatsInterval = 100 * time.Millisecond
	_, ts := newTestServer(t, cfg)
	failed := 0
	traffic := func(ok, bad int) {
		t.Helper()
		for range ok {
			if code, body := do(t, "GET", ts.URL+"/health", ""); code != http.StatusOK {
				t.Fatalf("GET /health = %d %s", code, body)
			}
		}
		for range bad {
			code, body := do(t, "POST", ts.URL+"/registry", "{")
			wantError(t, "POST /registry {", code, body, http.StatusBadRequest)
		}
		failed += bad
		eventually(t, 5*time.Second, "the sampler records the traffic", func() bool {
			var n int64
			for _, c := range getStats(t, ts.URL).Counters {
				n += c.StatusCodes["4xx"]
			}
			return n == int64(failed)
		})
	}

	traffic(10, 5)
	d := startDevtools(t, chromium, ts.URL+"/stats", 1200, 900)
	// The viewport is the whole window (headless keeps some of it for
	// the browser's own frame), so the screenshot is 1200 x 900.
	d.call("Emulation.setDeviceMetricsOverride", map[string]any{"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": false}, nil)
	read := func() pageState {
		t.Helper()
		var html string
		d.eval("document.documentElement.outerHTML", &html)
		return readPage(t, []byte(html))
	}
	const errorsCard = `+document.getElementById("errors").dataset.value`
	d.waitFor(60*time.Second, "the page showing the first traffic", `+document.body.dataset.polls >= 2 && `+errorsCard+` === 5`)
	first := read()
	traffic(60, 10)
	d.waitFor(60*time.Second, "the open page following the new traffic",
		fmt.Sprintf(`+document.body.dataset.polls >= %d && %s === 15`, first.polls+2, errorsCard))
	second := read()
	t.Logf("first %+v; second %+v", first, second)

	for _, p := range []pageState{first, second} {
		if p.axisLabels < 6 {
			t.Errorf("rate chart has %d tick labels, want axes with labels", p.axisLabels)
		}
	}
	if first.errors != 5 || second.errors != 15 {
		t.Errorf("Errors card = %d then %d, want 5 then 15", first.errors, second.errors)
	}
	if first.total < 15 || second.total < first.total+70 {
		t.Errorf("Requests card = %d then %d, want >= 15 then >= %d", first.total, second.total, first.total+70)
	}
	if first.ratePoints < 1 || second.ratePoints <= first.ratePoints || second.latPoints < 1 {
		t.Errorf("chart points: rate %d then %d, latency %d; want the charts to grow", first.ratePoints, second.ratePoints, second.latPoints)
	}

	dir := os.Getenv("SIDECAR_SCREENSHOT_DIR")
	if dir == "" {
		dir = t.TempDir()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	shot := filepath.Join(dir, "stats.png")
	var res struct {
		Data []byte `json:"data"` // base64 in JSON
	}
	d.call("Page.captureScreenshot", map[string]any{"format": "png"}, &res) // the window
	if err := os.WriteFile(shot, res.Data, 0o644); err != nil {
		t.Fatal(err)
	}
	checkScreenshot(t, shot)
	t.Logf("screenshot: %s", shot)
}

// checkScreenshot checks that the PNG shows a drawn page: the window size,
// and the chart colours of 2xx and 4xx lines.
func checkScreenshot(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("screenshot %s: %v", path, err)
	}
	if b := img.Bounds(); b.Dx() != 1200 || b.Dy() != 900 {
		t.Errorf("screenshot is %dx%d, want 1200x900", b.Dx(), b.Dy())
	}
	want := map[string]color.RGBA{"2xx green": {0x2e, 0x9e, 0x44, 0xff}, "4xx amber": {0xe0, 0x8a, 0x00, 0xff}}
	found := map[string]int{}
	colors := map[color.RGBA]bool{}
	b := img.Bounds()
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			r, g, bl, a := img.At(x, y).RGBA()
			c := color.RGBA{uint8(r >> 8), uint8(g >> 8), uint8(bl >> 8), uint8(a >> 8)}
			colors[c] = true
			for name, w := range want {
				if near(c, w) {
					found[name]++
				}
			}
		}
	}
	for name := range want {
		if found[name] < 20 {
			t.Errorf("screenshot has %d pixels of the %s line, want a drawn chart", found[name], name)
		}
	}
	if len(colors) < 50 {
		t.Errorf("screenshot has %d colours, want a rendered page", len(colors))
	}
}

func near(a, b color.RGBA) bool {
	d := func(x, y uint8) int { return max(int(x)-int(y), int(y)-int(x)) }
	return d(a.R, b.R) < 12 && d(a.G, b.G) < 12 && d(a.B, b.B) < 12
}

// devtools is a headless Chromium driven over the DevTools protocol, for
// what --dump-dom cannot tell: layout measured at a given window size,
// clicks, and the page's state while it runs in real time. Close (a
// t.Cleanup) ends the browser and waits for it.
type devtools struct {
	t      *testing.T
	conn   *websocket.Conn
	nextID int
}

// devtoolsChromium is the Chromium the browser tests drive: Debian's
// package chromium (scripts/install-debian.sh installs it), or the names
// Ubuntu and Google give it (requireTool: the tests skip without one, or
// fail in CI).
func devtoolsChromium(t *testing.T) string {
	t.Helper()
	return requireTool(t, "chromium", "chromium-browser", "google-chrome")
}

// startDevtools starts chromium on url in a window of width x height and
// attaches to its page.
func startDevtools(t *testing.T, chromium, url string, width, height int) *devtools {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, chromium,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
		"--no-first-run", "--disable-component-update", "--disable-sync", "--disable-quic",
		"--disable-extensions", "--mute-audio", "--hide-scrollbars",
		"--user-data-dir="+t.TempDir(),
		"--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
		fmt.Sprintf("--window-size=%d,%d", width, height),
		url)
	cmd.Dir = t.TempDir()
	cmd.WaitDelay = 5 * time.Second
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("chromium: %v", err)
	}
	exited := make(chan struct{})
	t.Cleanup(func() {
		cancel()
		<-exited
	})
	// Chromium says where its DevTools endpoint listens on stderr; the
	// rest of stderr is kept for a failure message.
	endpoint := make(chan string, 1)
	var logs syncBuffer
	go func() {
		defer close(exited)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			if ws, ok := strings.CutPrefix(line, "DevTools listening on "); ok {
				endpoint <- ws
			}
			logs.Write([]byte(line + "\n"))
		}
		cmd.Wait()
	}()
	var browserWS string
	select {
	case browserWS = <-endpoint:
	case <-exited:
		t.Fatalf("chromium exited before listening:\n%s", logs.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("chromium did not listen within 60s:\n%s", logs.String())
	}
	// The page Chromium opened on url is a target of /json/list.
	host := strings.TrimPrefix(browserWS, "ws://")
	host, _, _ = strings.Cut(host, "/")
	var targets []struct {
		Type  string `json:"type"`
		URL   string `json:"url"`
		WSURL string `json:"webSocketDebuggerUrl"`
	}
	eventually(t, 30*time.Second, "chromium lists its page", func() bool {
		resp, err := http.Get("http://" + host + "/json/list")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		targets = nil
		if json.NewDecoder(resp.Body).Decode(&targets) != nil {
			return false
		}
		for _, tg := range targets {
			if tg.Type == "page" && tg.WSURL != "" {
				return true
			}
		}
		return false
	})
	var pageWS string
	for _, tg := range targets {
		if tg.Type == "page" && tg.WSURL != "" {
			pageWS = tg.WSURL
			break
		}
	}
	dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer dcancel()
	conn, _, err := websocket.Dial(dctx, pageWS, nil)
	if err != nil {
		t.Fatalf("devtools: dial %s: %v", pageWS, err)
	}
	conn.SetReadLimit(64 << 20)
	t.Cleanup(func() { conn.CloseNow() })
	return &devtools{t: t, conn: conn}
}

// call sends the DevTools method with params and decodes its result into
// out, skipping the events that arrive meanwhile.
func (d *devtools) call(method string, params, out any) {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d.nextID++
	id := d.nextID
	req, _ := json.Marshal(map[string]any{"id": id, "method": method, "params": params})
	if err := d.conn.Write(ctx, websocket.MessageText, req); err != nil {
		d.t.Fatalf("devtools: send %s: %v", method, err)
	}
	for {
		_, msg, err := d.conn.Read(ctx)
		if err != nil {
			d.t.Fatalf("devtools: %s: %v", method, err)
		}
		var resp struct {
			ID     int             `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		if json.Unmarshal(msg, &resp) != nil || resp.ID != id {
			continue // an event, or not ours
		}
		if resp.Error != nil {
			d.t.Fatalf("devtools: %s: %s", method, resp.Error.Message)
		}
		if out != nil {
			if err := json.Unmarshal(resp.Result, out); err != nil {
				d.t.Fatalf("devtools: %s = %.200s: %v", method, resp.Result, err)
			}
		}
		return
	}
}

// eval evaluates the JavaScript expression expr in the page (awaiting it if
// it is a promise) and decodes its value into out.
func (d *devtools) eval(expr string, out any) {
	d.t.Helper()
	var res struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		Exception *struct {
			Text      string `json:"text"`
			Exception struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	d.call("Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true, "awaitPromise": true}, &res)
	if res.Exception != nil {
		d.t.Fatalf("devtools: evaluate %.80q: %s %s", expr, res.Exception.Text, res.Exception.Exception.Description)
	}
	if out != nil {
		if err := json.Unmarshal(res.Result.Value, out); err != nil {
			d.t.Fatalf("devtools: evaluate %.80q = %s: %v", expr, res.Result.Value, err)
		}
	}
}

// screenshot saves the whole page, beyond the window, as a PNG named name
// in $SIDECAR_SCREENSHOT_DIR (or a temporary directory), for a person to see.
func (d *devtools) screenshot(name string) {
	d.t.Helper()
	dir := os.Getenv("SIDECAR_SCREENSHOT_DIR")
	if dir == "" {
		dir = d.t.TempDir()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		d.t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	defer d.t.Logf("screenshot: %s", path)
	var res struct {
		Data []byte `json:"data"` // base64 in JSON
	}
	d.call("Page.captureScreenshot", map[string]any{"format": "png", "captureBeyondViewport": true}, &res)
	if err := os.WriteFile(path, res.Data, 0o644); err != nil {
		d.t.Fatal(err)
	}
}

// waitFor evaluates the boolean expression expr until it holds.
func (d *devtools) waitFor(within time.Duration, what, expr string) {
	d.t.Helper()
	// Until the page has loaded, the expression may throw: that is false.
	guarded := "(() => { try { return !!(" + expr + "); } catch (e) { return false; } })()"
	eventually(d.t, within, what, func() bool {
		var ok bool
		d.eval(guarded, &ok)
		return ok
	})
}

// overflowJS measures horizontal overflow: the document's, and that of
// every card and panel (content wider than the box, which a reader would
// have to scroll or would not see).
const overflowJS = `(() => {
  const de = document.documentElement;
  const out = { width: window.innerWidth, doc_scroll: de.scrollWidth, doc_client: de.clientWidth, over: [] };
  for (const el of document.querySelectorAll(".card, .panel")) {
    if (el.scrollWidth > el.clientWidth) {
      const h = el.querySelector("h2, .label");
      out.over.push((h ? h.textContent : el.className) + ": " + el.scrollWidth + " > " + el.clientWidth);
    }
  }
  return out;
})()`

// layout is what overflowJS returns.
type layout struct {
	Width     int      `json:"width"`
	DocScroll int      `json:"doc_scroll"`
	DocClient int      `json:"doc_client"`
	Over      []string `json:"over"`
}

// checkNoOverflow fails the test when the page scrolls sideways or a card's
// content is wider than the card.
func checkNoOverflow(t *testing.T, d *devtools, width int) {
	t.Helper()
	var l layout
	d.eval(overflowJS, &l)
	if l.Width != width {
		t.Fatalf("window.innerWidth = %d, want %d: the measurement needs the window size", l.Width, width)
	}
	if l.DocScroll > l.DocClient {
		t.Errorf("at %d px the page scrolls sideways: document scrollWidth %d > clientWidth %d", width, l.DocScroll, l.DocClient)
	}
	for _, o := range l.Over {
		t.Errorf("at %d px a card overflows: %s", width, o)
	}
}

// trafficUntilDone calls each URL in turn until the test ends, so rates
// over the page's recent window are never zero while it is looked at.
func trafficUntilDone(t *testing.T, urls ...string) {
	t.Helper()
	stop := make(chan struct{})
	done := make(chan struct{})
	t.Cleanup(func() { close(stop); <-done })
	client := &http.Client{Timeout: 5 * time.Second}
	go func() {
		defer close(done)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			resp, err := client.Post(urls[i%len(urls)], "application/json", strings.NewReader(`{}`))
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}
	}()
}

// TestStatsBrowserServices opens /stats at 1280 px in Chromium, over the
// DevTools protocol, while two RPC services take calls (one with a failing
// node, one slow) and two topics have subscribers: the Services table
// shows both with their rates and their nodes on expand, the Topics table
// both topics, and nothing is wider than its card or the window.
func TestStatsBrowserServices(t *testing.T) {
	t.Parallel()
	chromium := devtoolsChromium(t)
	cfg := statsConfig()
	cfg.StatsInterval = 100 * time.Millisecond
	cfg.Balancer = strategyRoundRobin
	s, ts := newTestServer(t, cfg, func(s *server) { s.rpc.bal.ejectBase, s.rpc.bal.ejectMax = time.Hour, time.Hour })
	good, bad := newRPCBackend(t, "alpha-good"), newRPCBackend(t, "alpha-bad")
	bad.mode.Store(mode503)
	register(t, ts.URL, "go.micro.srv.alpha", good, bad)
	slow := slowRPCBackend(t, 30*time.Millisecond)
	registerURLs(t, ts.URL, "go.micro.srv.beta-with-a-rather-long-service-name", slow.URL)
	for range 6 {
		if code, body := do(t, "POST", ts.URL+"/alpha/call", `{}`); code != http.StatusOK {
			t.Fatalf("POST /alpha/call = %d %s", code, body)
		}
	}
	orders := subscribe(t, ts.URL, "/broker?topic=orders&queue=workers")
	events := subscribe(t, ts.URL, "/broker?topic=events")
	waitSubscribers(t, s, 2)
	for i := range 5 {
		for _, topic := range []string{"orders", "events"} {
			if code, body := do(t, "POST", ts.URL+"/broker?topic="+topic, fmt.Sprint(i)); code != http.StatusOK {
				t.Fatalf("publish %s = %d %s", topic, code, body)
			}
		}
	}
	eventually(t, 5*time.Second, "the subscribers get the messages", func() bool {
		_, no := orders.snapshot()
		_, ne := events.snapshot()
		return no == 5 && ne == 5
	})
	trafficUntilDone(t, ts.URL+"/alpha/call", ts.URL+"/beta-with-a-rather-long-service-name/call")

	const width = 1280
	d := startDevtools(t, chromium, ts.URL+"/stats", width, 900)
	d.waitFor(30*time.Second, "the page shows two services with recent calls", `(() => {
	  const rows = document.querySelectorAll("#services tr.svc");
	  return rows.length >= 2 && Array.from(rows).every((r) => Number(r.dataset.rps) > 0);
	})()`)

	var services []map[string]string
	d.eval(`Array.from(document.querySelectorAll("#services tr.svc")).map((r) => Object.assign({text: r.textContent}, r.dataset))`, &services)
	byName := map[string]map[string]string{}
	for _, sv := range services {
		byName[sv["service"]] = sv
	}
	alpha, beta := byName["go.micro.srv.alpha"], byName["go.micro.srv.beta-with-a-rather-long-service-name"]
	if alpha == nil || beta == nil {
		t.Fatalf("Services table rows %v, want alpha and beta", services)
	}
	if alpha["handler"] != "rpc" || alpha["nodes"] != "2" || alpha["ejected"] != "1" || alpha["retries"] == "0" {
		t.Errorf("alpha row %v, want rpc with 2 nodes, 1 ejected, retries", alpha)
	}
	if beta["success"] != "1" || beta["p50"] == "" {
		t.Errorf("beta row %v, want success 1 and a p50", beta)
	}

	// Expanding alpha shows its nodes, and they stay through refreshes.
	d.eval(`document.querySelector('#services tr.svc[data-service="go.micro.srv.alpha"] button.expand').click()`, nil)
	var polls int
	d.eval(`Number(document.body.dataset.polls)`, &polls)
	d.waitFor(10*time.Second, "two more refreshes", fmt.Sprintf(`Number(document.body.dataset.polls) >= %d`, polls+2))
	var nodes []map[string]string
	d.eval(`Array.from(document.querySelectorAll("#services tr.node")).map((r) => Object.assign({text: r.textContent}, r.dataset))`, &nodes)
	if len(nodes) != 2 {
		t.Fatalf("node rows after expanding alpha: %v, want 2", nodes)
	}
	for _, n := range nodes {
		switch n["node"] {
		case "alpha-bad":
			if n["ejected"] != "true" || !strings.Contains(n["text"], "ejected") {
				t.Errorf("alpha-bad row %v, want ejected", n)
			}
		case "alpha-good":
			if n["ejected"] != "false" || n["latency"] == "" {
				t.Errorf("alpha-good row %v, want not ejected, with a latency estimate", n)
			}
		default:
			t.Errorf("node row %v, want alpha-good or alpha-bad", n)
		}
	}

	var topics []map[string]string
	d.eval(`Array.from(document.querySelectorAll("#topics tr.topic")).map((r) => Object.assign({text: r.textContent}, r.dataset))`, &topics)
	byTopic := map[string]map[string]string{}
	for _, tp := range topics {
		byTopic[tp["topic"]] = tp
	}
	if o := byTopic["orders"]; o == nil || o["subscribers"] != "1" || o["groups"] != "1" || o["published"] != "5" || o["delivered"] != "5" {
		t.Errorf("orders row %v (all: %v), want 1 subscriber in 1 group, 5 published and delivered", o, topics)
	}
	if e := byTopic["events"]; e == nil || e["subscribers"] != "1" || e["groups"] != "0" || e["published"] != "5" {
		t.Errorf("events row %v, want 1 subscriber, no group, 5 published", e)
	}

	checkNoOverflow(t, d, width)
	d.screenshot("stats-services.png")
}

// TestStatsBrowserOverflow is the page at 1280 px with the component
// metrics a sidecar with a token and traffic has: no card is wider than
// the window, and no table wider than its card.
func TestStatsBrowserOverflow(t *testing.T) {
	t.Parallel()
	chromium := devtoolsChromium(t)
	cfg := statsConfig()
	cfg.StatsInterval = 100 * time.Millisecond
	cfg.AuthToken = "s3cret"
	s, ts := newTestServer(t, cfg)
	auth := []string{"Authorization", "Bearer s3cret"}
	do(t, "GET", ts.URL+"/registry", "")
	do(t, "GET", ts.URL+"/registry", "", "Authorization", "Bearer nope")
	// One service called: its labels made the Components table overflow.
	b := newRPCBackend(t, "greeter-1")
	reg := fmt.Sprintf(`{"Name":"go.micro.srv.greeter","Nodes":[{"Id":"greeter-1","Address":"127.0.0.1","Port":%d}]}`, b.port)
	if code, body := do(t, "POST", ts.URL+"/registry", reg, auth...); code != http.StatusOK {
		t.Fatalf("POST /registry = %d %s", code, body)
	}
	if code, body := do(t, "POST", ts.URL+"/greeter/say", `{}`, auth...); code != http.StatusOK {
		t.Fatalf("POST /greeter/say = %d %s", code, body)
	}
	// Names as long as the sidecar takes, without a place to break.
	long := strings.Repeat("x", maxNameLen-len("go.micro.srv."))
	reg = fmt.Sprintf(`{"Name":"go.micro.srv.%s","Nodes":[{"Id":"%s","Address":"127.0.0.1","Port":%d}]}`, long, strings.Repeat("n", 200), b.port)
	if code, body := do(t, "POST", ts.URL+"/registry", reg, auth...); code != http.StatusOK {
		t.Fatalf("POST /registry = %d %s", code, body)
	}
	do(t, "POST", ts.URL+"/rpc", fmt.Sprintf(`{"service":"go.micro.srv.%s","method":"X.Y"}`, long), auth...)
	topic := strings.Repeat("t", maxTopicLen)
	sub, _, err := websocket.Dial(context.Background(), wsURL(ts, "/broker?topic="+topic), &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer s3cret"}}})
	if err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	defer sub.CloseNow()
	waitSubscribers(t, s, 1)
	do(t, "POST", ts.URL+"/broker?topic="+topic, "m", auth...)
	const width = 1280
	d := startDevtools(t, chromium, ts.URL+"/stats#token=s3cret", width, 900)
	d.waitFor(30*time.Second, "the page refreshes twice", `Number(document.body.dataset.polls) >= 2`)
	d.eval(`document.querySelector("#services button.expand").click()`, nil) // the long node id too
	d.waitFor(10*time.Second, "the nodes shown", `document.querySelectorAll("#services tr.node").length > 0`)
	checkNoOverflow(t, d, width)
	d.screenshot("stats-long-names.png")

	// The figures of a sidecar that has run long and busy: the page gets
	// /stats as the sidecar sends it, with the counters grown. Each card's
	// value fits its card (a 147 MiB heap overflowed at 1280 px).
	d.eval(`(() => {
	  const real = window.fetch;
	  window.fetch = async (...args) => {
	    const d = await (await real(...args)).json();
	    Object.assign(d, {
	      uptime_seconds: 999 * 86400 + 23 * 3600, total_reqs: 987654321098,
	      memory_bytes: 1023.9 * 1048576, sys_bytes: 1023.9 * 1048576,
	      threads: 1234567, in_flight: 123456, gc_pause_ns: 999.9e6, gc_cycles: 987654321,
	    });
	    d.status_codes["4xx"] = 98765432109; d.status_codes["5xx"] = 98765432109;
	    for (const c of d.counters || []) c.total_reqs = 987654321 * d.interval_ms / 1000;
	    return new Response(JSON.stringify(d), { status: 200, headers: { "Content-Type": "application/json" } });
	  };
	  window.grownFrom = Number(document.body.dataset.polls);
	})()`, nil)
	d.waitFor(30*time.Second, "the page shows the grown figures", `Number(document.body.dataset.polls) >= window.grownFrom + 2`)
	var mem string
	d.eval(`document.getElementById("memory").textContent`, &mem)
	if mem != "1 GiB" {
		t.Errorf("heap card shows %q, want the grown figure, 1 GiB", mem)
	}
	checkNoOverflow(t, d, width)
	d.screenshot("stats-large-figures.png")
}

// TestStatsBrowserWrongToken: a token the sidecar refuses is reported as
// refused, not as missing, and the page stops asking with it.
func TestStatsBrowserWrongToken(t *testing.T) {
	t.Parallel()
	chromium := devtoolsChromium(t)
	cfg := statsConfig()
	cfg.AuthToken = "s3cret"
	_, ts := newTestServer(t, cfg)
	d := startDevtools(t, chromium, ts.URL+"/stats#token=wrong", 1280, 900)
	d.waitFor(30*time.Second, "the page reports the refusal", `document.getElementById("status-text").textContent.includes("refused")`)
	var text string
	d.eval(`document.getElementById("status-text").textContent`, &text)
	if strings.Contains(text, "retrying") || strings.Contains(text, "needs a token") {
		t.Errorf("status %q: want the token refused, without retrying", text)
	}
	refusals := func() float64 {
		code, body := do(t, "GET", ts.URL+"/metrics", "", "Authorization", "Bearer s3cret")
		if code != http.StatusOK {
			t.Fatalf("GET /metrics = %d %s", code, body)
		}
		return parseMetrics(t, body)[`sidecar_auth_refused_total{reason="wrong_token"}`]
	}
	if n := refusals(); n != 1 {
		t.Errorf("wrong-token refusals after the page loaded = %v, want 1", n)
	}
	// The page polls every second while it retries: after three seconds
	// of the page's own time, no further request has come.
	d.eval(`new Promise((resolve) => setTimeout(resolve, 3000))`, nil)
	if n := refusals(); n != 1 {
		t.Errorf("wrong-token refusals 3 s later = %v, want still 1 (no retries)", n)
	}

	// The right token in the address starts it again.
	d.eval(`location.hash = "#token=s3cret"`, nil)
	d.waitFor(30*time.Second, "the page shows data with the right token", `document.body.dataset.state === "live" && Number(document.body.dataset.polls) >= 1`)

	// With no token at all, the page says one is needed.
	d2 := startDevtools(t, chromium, ts.URL+"/stats", 1280, 900)
	d2.waitFor(30*time.Second, "the page asks for a token", `document.getElementById("status-text").textContent.includes("needs a token")`)
}
