package main

import (
	"bytes"
	"context"
	"image/color"
	"image/png"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// runChromium loads url in a fresh headless Chromium with virtual time, so
// the page's timers run (and poll /stats) for budget, then runs modes
// ("--dump-dom", "--screenshot=FILE", or both) and returns its stdout.
func runChromium(t *testing.T, chromium, url string, budget time.Duration, mode ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args := []string{
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
		"--no-first-run", "--disable-component-update", "--disable-sync", "--disable-quic",
		"--disable-extensions", "--mute-audio", "--hide-scrollbars",
		"--user-data-dir=" + t.TempDir(),
		"--virtual-time-budget=" + strconv.FormatInt(budget.Milliseconds(), 10),
		"--window-size=1200,900",
	}
	args = append(append(args, mode...), url)
	cmd := exec.CommandContext(ctx, chromium, args...)
	cmd.Dir = t.TempDir()
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("chromium %s: %v\nstderr:\n%s", strings.Join(mode, " "), err, stderr.Bytes())
	}
	return stdout.Bytes()
}

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

// TestStatsBrowser loads /stats in headless Chromium twice, with traffic
// before each load, and checks that the numbers and charts follow it and
// that the page refreshes itself while open. It saves a screenshot in
// $SIDECAR_SCREENSHOT_DIR (or a temporary directory) for a person to see.
func TestStatsBrowser(t *testing.T) {
	t.Parallel()
	// Debian's package chromium (scripts/install-chromium.sh installs it),
	// or the names Ubuntu and Google give it.
	chromium := requireTool(t, "chromium", "chromium-browser", "google-chrome")
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
	url := ts.URL + "/stats"

	dir := os.Getenv("SIDECAR_SCREENSHOT_DIR")
	if dir == "" {
		dir = t.TempDir()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	shot := filepath.Join(dir, "stats.png")

	traffic(10, 5)
	first := readPage(t, runChromium(t, chromium, url, 3*time.Second, "--dump-dom"))
	traffic(60, 10)
	// One browser run both dumps the page and takes its picture.
	second := readPage(t, runChromium(t, chromium, url, 3*time.Second, "--dump-dom", "--screenshot="+shot))
	t.Logf("first load %+v; second load %+v", first, second)

	for _, p := range []pageState{first, second} {
		if p.polls < 2 {
			t.Errorf("page refreshed %d times while open, want >= 2 (live updates)", p.polls)
		}
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
