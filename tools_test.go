package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Integration tests drive real outside tools (Consul, Pebble, Chromium,
// nats-server), which scripts/setup-tests.sh installs. On a developer's
// machine a missing tool skips its tests with a message; in CI it fails
// them, so that a broken install cannot pass as a green run.

// requireIntegrationEnv is the switch: set to 1 (or any true value of
// strconv.ParseBool), a missing tool fails the test. When it is unset, CI=true
// turns it on; set to 0 it keeps missing tools skipping even in CI.
const requireIntegrationEnv = "SIDECAR_REQUIRE_INTEGRATION"

// integrationRequired reports whether a missing integration tool is a
// failure rather than a skip.
func integrationRequired() bool {
	if v, ok := os.LookupEnv(requireIntegrationEnv); ok && v != "" {
		on, err := strconv.ParseBool(v)
		return on || err != nil // a value that is not a boolean asks for it too
	}
	on, _ := strconv.ParseBool(os.Getenv("CI"))
	return on
}

// missingTool ends a test that cannot run for want of an outside tool:
// t.Fatal when integration tests are required, t.Skip otherwise. The
// message says what is missing and how to install it.
func missingTool(t testing.TB, format string, args ...any) {
	t.Helper()
	if integrationRequired() {
		t.Fatalf(format+" (%s is set, or CI=true: integration tools must be installed)", append(args, requireIntegrationEnv)...)
	}
	t.Skipf(format, args...)
}

// requireTool returns the path of the first of names found on PATH, in
// /usr/sbin (where Debian puts daemons such as nats-server, outside a
// user's PATH) or where `go install` puts binaries (GOBIN, or GOPATH/bin),
// and otherwise ends the test with missingTool. Call it first in a test
// that drives the tool: requireTool(t, "nats-server").
func requireTool(t testing.TB, names ...string) string {
	t.Helper()
	for _, name := range names {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	for _, dir := range []string{"/usr/sbin", goBinDir()} {
		if dir == "" {
			continue
		}
		for _, name := range names {
			p := filepath.Join(dir, name)
			if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
				return p
			}
		}
	}
	missingTool(t, "%s not found on PATH: install it with `bash scripts/setup-tests.sh`", strings.Join(names, " or "))
	return ""
}

// toolProcess is an outside tool running as a child process of the test.
type toolProcess struct {
	cmd    *exec.Cmd
	exited chan error // receives cmd.Wait's result, once
}

// startProcess starts cmd, and a goroutine that waits for it to exit.
func startProcess(cmd *exec.Cmd) (*toolProcess, error) {
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &toolProcess{cmd: cmd, exited: make(chan error, 1)}
	go func() { p.exited <- cmd.Wait() }()
	return p, nil
}

// signal sends sig to the process.
func (p *toolProcess) signal(sig os.Signal) { p.cmd.Process.Signal(sig) }

// stop sends sig (os.Kill ends it at once) and waits for the exit; a
// process still running after 10 s is killed. Call it once, and not after
// receiving from exited.
func (p *toolProcess) stop(sig os.Signal) {
	p.cmd.Process.Signal(sig)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
	}
}

// goBinDir is where `go install` puts binaries, or "" if go cannot say.
func goBinDir() string {
	out, err := exec.Command("go", "env", "GOBIN", "GOPATH").Output()
	if err != nil {
		return ""
	}
	gobin, gopath, _ := strings.Cut(string(out), "\n")
	if gobin = strings.TrimSpace(gobin); gobin != "" {
		return gobin
	}
	if first := filepath.SplitList(strings.TrimSpace(gopath)); len(first) > 0 && first[0] != "" {
		return filepath.Join(first[0], "bin")
	}
	return ""
}

func TestIntegrationRequired(t *testing.T) {
	tests := []struct {
		require, ci string // "-" leaves the variable unset
		want        bool
	}{
		{"-", "-", false},
		{"-", "true", true},
		{"-", "false", false},
		{"1", "-", true},
		{"true", "-", true},
		{"0", "true", false},
		{"", "true", true},
		{"yes", "-", true},
	}
	for _, tt := range tests {
		t.Run(tt.require+"/"+tt.ci, func(t *testing.T) {
			for name, v := range map[string]string{requireIntegrationEnv: tt.require, "CI": tt.ci} {
				if v == "-" {
					t.Setenv(name, "") // restored at the end of the test
					os.Unsetenv(name)
				} else {
					t.Setenv(name, v)
				}
			}
			if got := integrationRequired(); got != tt.want {
				t.Errorf("integrationRequired() with %s=%q CI=%q = %v, want %v", requireIntegrationEnv, tt.require, tt.ci, got, tt.want)
			}
		})
	}
}

// TestMissingTool runs a test of a tool that no machine has, in a child
// process of this test binary: it skips with the install hint by default
// and fails with it when SIDECAR_REQUIRE_INTEGRATION=1 or CI=true.
func TestMissingTool(t *testing.T) {
	const child = "SIDECAR_TEST_MISSING_TOOL"
	if os.Getenv(child) == "1" {
		requireTool(t, "sidecar-test-no-such-tool", "sidecar-test-nor-this")
		t.Fatal("requireTool returned for a tool that does not exist")
	}
	t.Parallel()
	tests := []struct {
		env      []string
		wantFail bool
	}{
		{env: []string{requireIntegrationEnv + "=", "CI="}, wantFail: false},
		{env: []string{requireIntegrationEnv + "=1", "CI="}, wantFail: true},
		{env: []string{requireIntegrationEnv + "=", "CI=true"}, wantFail: true},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.env, ","), func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(os.Args[0], "-test.run=^TestMissingTool$", "-test.v")
			cmd.Env = append(os.Environ(), append(tt.env, child+"=1")...)
			out, err := cmd.CombinedOutput()
			const hint = "sidecar-test-no-such-tool or sidecar-test-nor-this not found on PATH: install it with `bash scripts/setup-tests.sh`"
			if !strings.Contains(string(out), hint) {
				t.Errorf("output lacks the install hint %q:\n%s", hint, out)
			}
			failed := err != nil && strings.Contains(string(out), "--- FAIL: TestMissingTool")
			skipped := err == nil && strings.Contains(string(out), "--- SKIP: TestMissingTool")
			switch {
			case tt.wantFail && !failed:
				t.Errorf("with %v a missing tool did not fail the test (err %v):\n%s", tt.env, err, out)
			case !tt.wantFail && !skipped:
				t.Errorf("with %v a missing tool did not skip the test (err %v):\n%s", tt.env, err, out)
			}
		})
	}
}
