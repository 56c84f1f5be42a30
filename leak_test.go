package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"runtime/pprof"
	"strings"
	"testing"
	"time"
)

// The goroutine-leak check proves that Close waits for every goroutine a
// server started. A server is built and started under a pprof label;
// every goroutine started meanwhile inherits it, and so do the goroutines
// those start in turn (its loops, the HTTP server's connections, their
// handlers, the backend transports they dial with). After Close no
// goroutine may carry the label. Labels rather than a count of all
// goroutines keep the check exact while other tests run in parallel: a
// test's own clients and backends start theirs unlabelled.

// leakLabel is the pprof label key of a tracked server's goroutines.
const leakLabel = "sidecar-test-server"

// leakWait bounds how long goroutines may take to exit once Close has
// returned: they should be gone already, except for ones the runtime has
// not yet scheduled to see their end on a loaded machine.
const leakWait = 10 * time.Second

// trackGoroutines runs start under a fresh label and returns the check to
// call once what start built is closed: it waits up to leakWait for the
// labelled goroutines to end and fails the test with their stacks
// otherwise.
func trackGoroutines(t testing.TB, start func()) (check func()) {
	t.Helper()
	value := fmt.Sprintf("%s#%x", t.Name(), rand.Uint64())
	pprof.Do(context.Background(), pprof.Labels(leakLabel, value), func(context.Context) { start() })
	return func() {
		t.Helper()
		awaitLabelled(t, value, leakWait)
	}
}

// awaitLabelled waits up to within for the goroutines labelled value to
// end, and fails t with their stacks if they do not.
func awaitLabelled(t testing.TB, value string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		left := labelledGoroutines(leakLabel, value)
		if left == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("goroutines of the server still running %s after Close:\n%s", within, left)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// labelledGoroutines returns the stacks of the goroutines labelled key=value,
// as the goroutine profile prints them, or "" when there are none.
func labelledGoroutines(key, value string) string {
	var buf bytes.Buffer
	pprof.Lookup("goroutine").WriteTo(&buf, 1)
	want := fmt.Sprintf("%q:%q", key, value)
	var out strings.Builder
	// Records are separated by blank lines: "N @ pcs", "# labels: {...}",
	// then one "#\tpc\tfunc+off\tfile:line" line per frame.
	for _, rec := range strings.Split(buf.String(), "\n\n") {
		if strings.Contains(rec, "# labels: {") && strings.Contains(rec, want) {
			out.WriteString(strings.TrimSpace(rec))
			out.WriteString("\n\n")
		}
	}
	return out.String()
}

// errorRecorder is a testing.TB that records Errorf instead of failing.
type errorRecorder struct {
	testing.TB
	errs []string
}

func (r *errorRecorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

// TestLeakCheck: the check sees a goroutine started under the label, and
// one started by that one in turn, names them by their stacks, and passes
// once they have ended. A goroutine started outside is not its business.
func TestLeakCheck(t *testing.T) {
	t.Parallel()
	stop := make(chan struct{})
	outside := make(chan struct{})
	defer close(outside)
	go func() { <-outside }()
	var value string
	// probing closes once leakProbe runs: a goroutine created but not yet
	// scheduled has no frames of its own in the profile, and on a loaded
	// machine the check could run before it (it then saw an unnamed
	// goroutine, not leakProbe).
	probing := make(chan struct{})
	pprof.Do(context.Background(), pprof.Labels(leakLabel, t.Name()), func(ctx context.Context) {
		value, _ = pprof.Label(ctx, leakLabel)
		go func() {
			go leakProbe(probing, stop) // a grandchild inherits the label too
			<-stop
		}()
	})
	<-probing
	rec := &errorRecorder{TB: t}
	awaitLabelled(rec, value, 50*time.Millisecond)
	if len(rec.errs) != 1 || !strings.Contains(rec.errs[0], "leakProbe") || strings.Count(rec.errs[0], "labels:") != 2 {
		t.Fatalf("leak check with two goroutines running reported %q, want both, leakProbe among them", rec.errs)
	}
	close(stop)
	rec = &errorRecorder{TB: t}
	awaitLabelled(rec, value, 5*time.Second)
	if len(rec.errs) != 0 {
		t.Fatalf("leak check after the goroutines ended reported %q, want nothing", rec.errs)
	}
}

func leakProbe(running, stop chan struct{}) {
	close(running)
	<-stop
}
