package main

// auth.go answers who may call the sidecar: the bearer tokens of
// --auth_token or --auth_token_file, re-read when the file changes so that
// tokens rotate without a restart.

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
)

// maxAuthTokens bounds the tokens of --auth_token_file. Every request is
// compared with each of them; rotation needs two.
const maxAuthTokens = 64

// auth owns the bearer tokens the sidecar accepts and counts the requests
// it refuses. With --auth_token_file the tokens are the file's lines,
// re-read when it changes (fileReloader, at most every
// --tls_reload_interval), so a token is rotated by adding the new one,
// moving clients over, then removing the old one; with --auth_token there
// is one, fixed; with neither every request is allowed. Safe for
// concurrent use; it owns no goroutine.
type auth struct {
	static *tokenSet               // --auth_token; nil otherwise
	file   *fileReloader[tokenSet] // --auth_token_file; nil otherwise

	// Requests refused: without an Authorization: Bearer header, and with
	// one whose token is not accepted.
	refusedMissing atomic.Int64
	refusedWrong   atomic.Int64
}

// tokenSet holds the SHA-256 digests of the accepted tokens, never the
// tokens themselves. Comparing fixed-size digests keeps the length of
// each token out of the comparison's timing.
type tokenSet struct {
	digests [][sha256.Size]byte
}

// newAuth reads --auth_token_file (a file without a token stops start-up)
// or takes --auth_token.
func newAuth(cfg *Config, logger *slog.Logger) (*auth, error) {
	a := &auth{}
	switch {
	case cfg.AuthTokenFile != "":
		r, err := newFileReloader("auth tokens", []watchedFile{{"auth_token_file", cfg.AuthTokenFile}}, cfg.TLSReloadInterval,
			func(contents [][]byte) (*tokenSet, error) {
				tokens, err := parseTokens(contents[0])
				if err != nil {
					return nil, fmt.Errorf("flag --auth_token_file: %s: %w", cfg.AuthTokenFile, err)
				}
				return newTokenSet(tokens), nil
			}, logger)
		if err != nil {
			return nil, err
		}
		r.describe = func(ts *tokenSet) []any { return []any{"tokens", len(ts.digests)} }
		a.file = r
	case cfg.AuthToken != "":
		a.static = newTokenSet([]string{cfg.AuthToken})
	}
	return a, nil
}

func newTokenSet(tokens []string) *tokenSet {
	ts := &tokenSet{digests: make([][sha256.Size]byte, len(tokens))}
	for i, t := range tokens {
		ts.digests[i] = sha256.Sum256([]byte(t))
	}
	return ts
}

// parseTokens reads a token file: one token a line; surrounding spaces,
// blank lines and lines starting with '#' (comments; RFC 6750's b64token
// has no '#', so no bearer token starts with one) are ignored. A file with
// no token, or more than maxAuthTokens, is an error.
func parseTokens(b []byte) ([]string, error) {
	var tokens []string
	for line := range bytes.Lines(b) {
		t := strings.TrimSpace(string(line))
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		tokens = append(tokens, t)
	}
	switch {
	case len(tokens) == 0:
		return nil, errors.New("no token (one a line; blank lines and # comments are ignored)")
	case len(tokens) > maxAuthTokens:
		return nil, fmt.Errorf("%d tokens, more than %d", len(tokens), maxAuthTokens)
	}
	return tokens, nil
}

// enabled reports whether requests need a token.
func (a *auth) enabled() bool { return a.static != nil || a.file != nil }

// allow reports whether r may go on: auth is off, or r carries
// "Authorization: Bearer T" with an accepted T. A refusal is counted.
//
// T is compared with every accepted token, in constant time, whichever
// matches: the time taken tells neither whether nor which token matched,
// only (unavoidably) how many are accepted, and the length of T.
func (a *auth) allow(r *http.Request) bool {
	ts := a.static
	if a.file != nil {
		ts = a.file.get()
	}
	if ts == nil {
		return true
	}
	got, ok := bearerToken(r.Header)
	if !ok {
		a.refusedMissing.Add(1)
		return false
	}
	d := sha256.Sum256([]byte(got))
	match := 0
	for i := range ts.digests {
		match |= subtle.ConstantTimeCompare(d[:], ts.digests[i][:])
	}
	if match != 1 {
		a.refusedWrong.Add(1)
		return false
	}
	return true
}

// bearerToken is the token of "Authorization: Bearer T" in h (the scheme
// in any case, RFC 6750); false without one.
func bearerToken(h http.Header) (string, bool) {
	scheme, token, ok := strings.Cut(h.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	return strings.TrimSpace(token), true
}

// metrics emits the refusals and, with a token file, its reloads.
func (a *auth) metrics(emit emitFunc) {
	if !a.enabled() {
		return
	}
	const help = "Requests refused with 401, by reason: no bearer token, or one not accepted."
	emit("sidecar_auth_refused_total", help, "counter", float64(a.refusedMissing.Load()), "reason", "missing_token")
	emit("sidecar_auth_refused_total", help, "counter", float64(a.refusedWrong.Load()), "reason", "wrong_token")
	if a.file != nil {
		a.file.metrics(emit)
	}
}
