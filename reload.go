package main

// reload.go answers how the sidecar picks up files that change under it
// without a restart: the certificate pair (--tls_cert_file,
// --tls_key_file), the client CA (--tls_client_ca_file) and the bearer
// tokens (--auth_token_file) all go through one fileReloader.

import (
	"bytes"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"
)

// watchedFile is one file of a fileReloader and the flag that names it.
type watchedFile struct {
	flag string // without dashes: "tls_cert_file"
	path string
}

// fileReloader serves the value parsed from a set of files and parses
// them again when their content changes. The files are looked at by the
// caller of get that finds the last look older than the interval (a
// handshake, a request), so a fileReloader owns no goroutine and a
// sidecar nobody calls reads no files; callers never wait for another's
// file I/O, they use the value in service. Contents are compared rather
// than mtimes: mtime ticks are coarse, and a renewed certificate or a
// rotated token often has the same size as the old one. A changed set
// that fails to read or parse (half written, emptied, removed, a key not
// matching) is logged once and the previous value stays in use. Safe for
// concurrent use.
type fileReloader[T any] struct {
	files    []watchedFile
	what     string // names the value in logs: "tls certificate"
	interval time.Duration
	parse    func(contents [][]byte) (*T, error)
	describe func(*T) []any // optional: log attributes of a new value
	log      *slog.Logger

	cur       atomic.Pointer[T] // the value in service
	lastCheck atomic.Int64      // unix nanoseconds of the last look at the files
	checking  atomic.Bool       // held by the one caller looking at the files

	// Guarded by checking (used only by its holder):
	contents [][]byte // of the files in service, in the order of files
	lastBad  string   // contents and error of the last failure, logged once

	reloads      atomic.Int64 // values loaded after the first
	reloadErrors atomic.Int64 // changed files that failed to load
}

// newFileReloader reads and parses the files once; a failure names the
// flag at fault and stops start-up. parse gets the contents in the order
// of files and must not keep them.
func newFileReloader[T any](what string, files []watchedFile, interval time.Duration, parse func([][]byte) (*T, error), logger *slog.Logger) (*fileReloader[T], error) {
	r := &fileReloader[T]{files: files, what: what, interval: interval, parse: parse, log: logger}
	contents, err := r.read()
	if err != nil {
		return nil, err
	}
	v, err := parse(contents)
	if err != nil {
		return nil, err
	}
	r.contents = contents
	r.cur.Store(v)
	r.lastCheck.Store(time.Now().UnixNano())
	return r, nil
}

// get returns the value in service, after looking at the files if the
// last look is older than the interval and no other caller is looking.
func (r *fileReloader[T]) get() *T {
	r.maybeReload(time.Now())
	return r.cur.Load()
}

// maybeReload looks at the files when the last look is older than the
// interval and no other caller is looking.
func (r *fileReloader[T]) maybeReload(now time.Time) {
	if now.UnixNano()-r.lastCheck.Load() < int64(r.interval) || !r.checking.CompareAndSwap(false, true) {
		return
	}
	defer r.checking.Store(false)
	r.lastCheck.Store(now.UnixNano())
	contents, err := r.read()
	if err != nil {
		r.fail(contents, err)
		return
	}
	same := true
	for i := range contents {
		same = same && bytes.Equal(contents[i], r.contents[i])
	}
	if same {
		r.lastBad = "" // back to the files in service: a new failure is news
		return
	}
	v, err := r.parse(contents)
	if err != nil {
		r.fail(contents, err)
		return
	}
	r.contents, r.lastBad = contents, ""
	r.cur.Store(v)
	r.reloads.Add(1)
	attrs := []any{"file", r.files[0].path}
	if r.describe != nil {
		attrs = append(attrs, r.describe(v)...)
	}
	r.log.Info(r.what+" reloaded", attrs...)
}

// read reads every file, naming the flag of the first that fails. The
// contents read so far are returned with the error.
func (r *fileReloader[T]) read() ([][]byte, error) {
	contents := make([][]byte, len(r.files))
	for i, f := range r.files {
		b, err := readLimited(f.path)
		if err != nil {
			return contents, fmt.Errorf("flag --%s: %w", f.flag, err)
		}
		contents[i] = b
	}
	return contents, nil
}

// fail logs a failed reload once per distinct content and error, so a
// broken file left on disk does not log at every look.
func (r *fileReloader[T]) fail(contents [][]byte, err error) {
	bad := string(bytes.Join(contents, []byte{0})) + "\x00" + err.Error()
	if bad == r.lastBad {
		return
	}
	r.lastBad = bad
	r.reloadErrors.Add(1)
	r.log.Error(r.what+" reload failed; still using the previous one", "file", r.files[0].path, "err", err)
}

// metrics emits the reload counters, labelled by the flag of the first
// file.
func (r *fileReloader[T]) metrics(emit emitFunc) {
	emit("sidecar_file_reloads_total", "Watched files loaded again after a change, by flag.", "counter", float64(r.reloads.Load()), "flag", r.files[0].flag)
	emit("sidecar_file_reload_errors_total", "Changed watched files that failed to load (the previous content stays in use), by flag.", "counter", float64(r.reloadErrors.Load()), "flag", r.files[0].flag)
}
