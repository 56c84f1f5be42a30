package main

// cli.go is the command line client. The sidecar binary run with a command
// (sidecar list services, sidecar call ...) does not serve: it talks to a
// running, possibly remote, sidecar over its HTTP API, as the original
// `micro --proxy_address=... list services` did. Its stats command, which
// reads the sidecar's metrics, is in cli_stats.go.

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
)

const (
	defaultProxyAddress = "http://127.0.0.1:8081"
	// maxCLIRead bounds every response body, websocket message and stdin
	// message the client reads.
	maxCLIRead = 64 << 20
	// healthDialers bounds the concurrent node dials of the health command.
	healthDialers = 32
)

// cliCommand is one command of the client.
type cliCommand struct {
	name     string // what the user types
	alias    string // another name for it, or ""
	args     string // the positional arguments, as usage shows them
	summary  string // one line for sidecar help
	detail   string // a paragraph for sidecar COMMAND --help
	examples []string
	min, max int    // number of positional arguments accepted
	noun     string // required first argument ("services"), or ""
	local    bool   // needs no sidecar: no connection flags, no connection
	run      func(c *cli, ctx context.Context, args []string) error
}

// cliCommands is the table of commands, in the order help lists them.
func cliCommands() []*cliCommand {
	return []*cliCommand{
		{name: "list", args: "services", noun: "services", min: 1, max: 1, run: (*cli).listServices,
			summary:  "list the registered services",
			detail:   "Prints the name of every service with at least one node, one per line (GET /registry). An empty registry prints nothing on stdout and says so on stderr.",
			examples: []string{"sidecar list services", "sidecar --proxy_address 10.0.0.5:8081 list services"}},
		{name: "get", args: "service NAME", noun: "service", min: 2, max: 2, run: (*cli).getService,
			summary:  "show a service's nodes and endpoints",
			detail:   "Prints the service's version, a table of its nodes (ID, address, port, metadata) and its endpoints (GET /registry?service=NAME).",
			examples: []string{"sidecar get service go.micro.srv.greeter", "sidecar get service go.micro.srv.greeter --json"}},
		{name: "register", args: "service [JSON|-]", noun: "service", min: 1, max: 2, run: (*cli).registerService,
			summary:  "register a service's nodes",
			detail:   "Registers the service in JSON (the argument, or stdin when it is absent or -) with POST /registry. Registering the same node again renews its TTL.",
			examples: []string{`sidecar register service '{"name":"go.micro.srv.greeter","nodes":[{"id":"greeter-1","address":"127.0.0.1","port":9090}]}'`, "sidecar register service --ttl 30s - < greeter.json"}},
		{name: "deregister", args: "service [JSON|-]", noun: "service", min: 1, max: 2, run: (*cli).deregisterService,
			summary:  "deregister a service's nodes",
			detail:   "Removes the nodes named by ID in the JSON (the argument, or stdin when it is absent or -) with DELETE /registry.",
			examples: []string{`sidecar deregister service '{"name":"go.micro.srv.greeter","nodes":[{"id":"greeter-1"}]}'`}},
		{name: "call", alias: "query", args: "SERVICE METHOD [JSON|-]", min: 2, max: 3, run: (*cli).call,
			summary:  "call a service's method (alias: query)",
			detail:   "Calls METHOD of SERVICE with the JSON request (the argument, {} when it is absent, stdin when it is -) through POST /rpc, and prints the result.",
			examples: []string{`sidecar call go.micro.srv.greeter Say.Hello '{"name": "John"}'`, "echo '{\"name\": \"John\"}' | sidecar call go.micro.srv.greeter Say.Hello -"}},
		{name: "publish", args: "TOPIC [MESSAGE|-]", min: 1, max: 2, run: (*cli).publish,
			summary:  "publish a message to a topic",
			detail:   "Publishes MESSAGE (the argument, or stdin when it is absent or -) as the raw body of one message with POST /broker?topic=TOPIC.",
			examples: []string{"sidecar publish events 'hello world'", "sidecar publish events < message.json"}},
		{name: "subscribe", args: "TOPIC", min: 1, max: 1, run: (*cli).subscribe,
			summary:  "print the messages of a topic as they arrive",
			detail:   "Subscribes over a websocket to /broker?topic=TOPIC and prints each message body, one per line, until interrupted (Ctrl-C exits with status 0). A body that is not one line of printable text (a newline inside, a control character, invalid UTF-8, a leading double quote) is printed as a quoted Go string literal, \"two\\nlines\", so one message never looks like two; one trailing newline is the line's own end. With --queue, each message of the topic goes to one subscriber of the queue group. With --json, each line is the message as the sidecar sends it, headers and base64 body.",
			examples: []string{"sidecar subscribe events", "sidecar subscribe events --queue workers --json"}},
		{name: "health", args: "SERVICE", min: 1, max: 1, run: (*cli).health,
			summary:  "check that each node of a service answers",
			detail:   "Prints the sidecar's own health (GET /health), then each node of SERVICE and whether it accepts a TCP connection within --dial_timeout. Exits with status 1 when the sidecar or any node is not healthy.",
			examples: []string{"sidecar health go.micro.srv.greeter"}},
		{name: "stats", args: "", min: 0, max: 0, run: (*cli).stats,
			summary:  "show the sidecar's request counters",
			detail:   "Prints uptime, memory, requests by status class, latency, a row per route and the counters that are not zero, from GET /stats (sidecars started with --enable_stats), or else the same summary from GET /metrics. With --json, the /stats JSON, or every sample of /metrics.",
			examples: []string{"sidecar stats", "sidecar stats --json"}},
		{name: "version", min: 0, max: 0, local: true, run: (*cli).version,
			summary:  "show the version of this binary",
			detail:   "Prints the module version, the VCS revision and commit time the binary was built from, and the Go version, on one line (sidecar --version prints the same line). It needs no running sidecar.",
			examples: []string{"sidecar version", "sidecar version --json"}},
	}
}

// findCommand returns the command named or aliased name, or nil.
func findCommand(name string) *cliCommand {
	for _, cmd := range cliCommands() {
		if cmd.name == name || (cmd.alias != "" && cmd.alias == name) {
			return cmd
		}
	}
	return nil
}

// cliOptions are the client's flags.
type cliOptions struct {
	proxyAddress  string
	authToken     string
	authTokenFile string
	caFile        string
	certFile      string
	keyFile       string
	timeout       time.Duration
	json          bool

	queue       string        // subscribe
	ttl         string        // register
	dialTimeout time.Duration // health
}

// cliFlagSet defines the flags of cmd on a new FlagSet; with cmd nil, the
// flags of every command (to find the command word in the arguments).
func cliFlagSet(o *cliOptions, cmd *cliCommand) *flag.FlagSet {
	fs := flag.NewFlagSet("sidecar", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are returned as one line; help is printed by cli.help
	if cmd == nil || !cmd.local {
		fs.StringVar(&o.proxyAddress, "proxy_address", defaultProxyAddress, "`URL` or host:port of the sidecar (http:// is assumed)")
		fs.StringVar(&o.authToken, "auth_token", "", "send Authorization: Bearer `TOKEN`")
		fs.StringVar(&o.authTokenFile, "auth_token_file", "", "read the bearer token from `file` (its first, in the sidecar's format)")
		fs.StringVar(&o.caFile, "tls_ca_file", "", "CA `file` (PEM) to verify an https sidecar's certificate (default system roots)")
		fs.StringVar(&o.certFile, "tls_client_cert_file", "", "client certificate `file` (PEM) for a sidecar with mutual TLS")
		fs.StringVar(&o.keyFile, "tls_client_key_file", "", "client key `file` (PEM) for a sidecar with mutual TLS")
		fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "timeout of each request to the sidecar")
	}
	fs.BoolVar(&o.json, "json", false, "print the sidecar's JSON instead of text")
	if cmd == nil || cmd.name == "subscribe" {
		fs.StringVar(&o.queue, "queue", "", "join queue group `Q`: each message goes to one of its subscribers")
	}
	if cmd == nil || cmd.name == "register" {
		fs.StringVar(&o.ttl, "ttl", "", "expire the nodes unless registered again within `duration` (e.g. 30s)")
	}
	if cmd == nil || cmd.name == "health" {
		fs.DurationVar(&o.dialTimeout, "dial_timeout", 2*time.Second, "time a node has to accept a TCP connection")
	}
	return fs
}

// cliCommandIndex returns the index in args of the command word: the first
// argument that is neither a client flag nor a client flag's value. It
// returns -1 when there is none, or when a flag only the sidecar knows
// comes first: then args run the sidecar.
func cliCommandIndex(args []string) int {
	i, _ := scanCLIArgs(args)
	return i
}

// scanCLIArgs finds the command word as cliCommandIndex says, and reports
// whether a flag only the client knows (--proxy_address) came before it.
func scanCLIArgs(args []string) (cmd int, clientFlag bool) {
	fs := cliFlagSet(&cliOptions{}, nil)
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			if i+1 < len(args) {
				return i + 1, clientFlag
			}
			return -1, clientFlag
		}
		if a == "-" || !strings.HasPrefix(a, "-") {
			return i, clientFlag
		}
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if name == "h" || name == "help" {
			continue
		}
		f := fs.Lookup(name)
		if f == nil {
			return -1, false
		}
		if name != "auth_token" && name != "auth_token_file" { // the sidecar's too
			clientFlag = true
		}
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); !hasValue && !(ok && b.IsBoolFlag()) {
			i++ // the flag's value
		}
	}
	return -1, clientFlag
}

// isCLI reports whether args name a client command, or give client flags
// without one (an error the client explains), rather than flags of the
// sidecar itself.
func isCLI(args []string) bool {
	i, clientFlag := scanCLIArgs(args)
	return i >= 0 || clientFlag
}

// runCLI runs the client command in args. Output goes to stdout; a failure
// is returned as one line. flag.ErrHelp means help was printed.
func runCLI(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := &cli{stdin: os.Stdin, stdout: stdout, stderr: stderr, getenv: os.Getenv}
	err := c.run(ctx, args)
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return err
	}
	return oneLine(err)
}

// oneLine flattens err's message to one line: main prints it as is, and a
// server's detail or a wrapped error may hold newlines.
func oneLine(err error) error {
	msg := err.Error()
	if !strings.ContainsAny(msg, "\r\n") {
		return err
	}
	return errors.New(strings.Join(strings.Fields(msg), " "))
}

// cli is one run of a client command.
type cli struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string

	opts  cliOptions
	base  *url.URL // the sidecar, without a trailing slash
	token string
	http  *http.Client
}

func (c *cli) run(ctx context.Context, args []string) error {
	i := cliCommandIndex(args)
	if i < 0 {
		return errors.New("client flags without a command (see sidecar help)")
	}
	name := args[i]
	rest := append(append([]string{}, args[:i]...), args[i+1:]...)
	if name == "help" {
		return c.help(rest)
	}
	cmd := findCommand(name)
	if cmd == nil {
		return fmt.Errorf("unknown command %q (see sidecar help)", name)
	}
	fs := cliFlagSet(&c.opts, cmd)
	pos, err := parseInterleaved(fs, rest)
	if errors.Is(err, flag.ErrHelp) {
		c.commandHelp(cmd)
		return flag.ErrHelp
	}
	if err != nil {
		err = flagError(fs, err)
		if strings.HasPrefix(err.Error(), "unknown flag --address") {
			// The sidecar's flag, used where the client's was meant.
			v := flagArg(rest, "address")
			return fmt.Errorf("%s: unknown flag --address: to talk to the sidecar at %s, use --proxy_address %s (--address is where a sidecar listens)", cmd.name, v, v)
		}
		return fmt.Errorf("%s: %v (see sidecar %s --help)", cmd.name, err, cmd.name)
	}
	if err := c.applyEnv(fs); err != nil {
		return err
	}
	usage := strings.TrimSpace(cmd.name + " " + cmd.args)
	if len(pos) < cmd.min || len(pos) > cmd.max || (cmd.noun != "" && strings.TrimSuffix(pos[0], "s") != strings.TrimSuffix(cmd.noun, "s")) {
		return fmt.Errorf("usage: sidecar %s (see sidecar %s --help)", usage, cmd.name)
	}
	if cmd.noun != "" {
		pos = pos[1:]
	}
	if cmd.local {
		return cmd.run(c, ctx, pos)
	}
	if err := c.connect(); err != nil {
		return err
	}
	return cmd.run(c, ctx, pos)
}

// flagArg returns the value given to flag name in args (-name V, --name V
// or --name=V), or "ADDRESS" when there is none.
func flagArg(args []string, name string) string {
	for i, a := range args {
		n, v, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || n != name {
			continue
		}
		if hasValue {
			return v
		}
		if i+1 < len(args) {
			return args[i+1]
		}
	}
	return "ADDRESS"
}

// parseInterleaved parses flags placed before, between and after the
// positional arguments, which it returns. After "--" every argument is
// positional.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// applyEnv sets the connection flags not given from MICRO_<NAME>, as the
// sidecar reads its own flags. Only the flags that say where the sidecar is
// and how to reach it read the environment: MICRO_JSON or MICRO_QUEUE
// would change a script's output behind its back.
func (c *cli) applyEnv(fs *flag.FlagSet) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	for _, name := range []string{"proxy_address", "auth_token", "auth_token_file", "tls_ca_file", "tls_client_cert_file", "tls_client_key_file", "timeout"} {
		env := "MICRO_" + strings.ToUpper(name)
		v := c.getenv(env)
		if given[name] || v == "" || fs.Lookup(name) == nil {
			continue // given, unset, or not a flag of this command (version)
		}
		if err := fs.Set(name, v); err != nil {
			return fmt.Errorf("invalid value %q for flag --%s (from %s): %s", v, name, env, valueHint(fs.Lookup(name), err))
		}
	}
	return nil
}

// connect checks the connection flags and builds the HTTP client.
func (c *cli) connect() error {
	o := &c.opts
	if o.timeout <= 0 {
		return fmt.Errorf("invalid value %s for flag --timeout: must be positive", o.timeout)
	}
	base, err := parseProxyAddress(o.proxyAddress)
	if err != nil {
		return err
	}
	c.base = base
	c.token = o.authToken
	if o.authTokenFile != "" {
		if o.authToken != "" {
			return errors.New("flags --auth_token and --auth_token_file exclude each other")
		}
		b, err := readLimited(o.authTokenFile)
		if err != nil {
			return fmt.Errorf("flag --auth_token_file: %w", err)
		}
		// The sidecar's file format (auth.go); the first token is the
		// current one during a rotation.
		tokens, err := parseTokens(b)
		if err != nil {
			return fmt.Errorf("flag --auth_token_file: %s: %w", o.authTokenFile, err)
		}
		c.token = tokens[0]
	}
	if (o.certFile == "") != (o.keyFile == "") {
		return errors.New("flags --tls_client_cert_file and --tls_client_key_file go together")
	}
	transport := &http.Transport{
		Proxy:                  http.ProxyFromEnvironment,
		DialContext:            (&net.Dialer{Timeout: o.timeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:    o.timeout,
		ResponseHeaderTimeout:  o.timeout,
		MaxResponseHeaderBytes: 64 << 10,
	}
	// Files named by TLS flags are read only for an https sidecar, so that
	// MICRO_TLS_* settings meant for another use do not break plain calls.
	if base.Scheme == "https" {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if o.caFile != "" {
			if cfg.RootCAs, err = loadCertPool(o.caFile); err != nil {
				return fmt.Errorf("flag --tls_ca_file: %w", err)
			}
		}
		if o.certFile != "" {
			cert, err := tls.LoadX509KeyPair(o.certFile, o.keyFile)
			if err != nil {
				return fmt.Errorf("flags --tls_client_cert_file, --tls_client_key_file: %w", err)
			}
			cfg.Certificates = []tls.Certificate{cert}
		}
		transport.TLSClientConfig = cfg
	}
	// No Client.Timeout: each request gets a context deadline instead,
	// which websocket.Dial also accepts.
	c.http = &http.Client{Transport: transport}
	return nil
}

// parseProxyAddress reads --proxy_address: a URL, or host:port for
// http://host:port. An empty host is the loopback address.
func parseProxyAddress(s string) (*url.URL, error) {
	bad := func(why string) error {
		return fmt.Errorf("invalid value %q for flag --proxy_address: %s", s, why)
	}
	raw := strings.TrimSpace(s)
	if raw == "" {
		return nil, bad("want a URL such as http://127.0.0.1:8081 or host:port")
	}
	if !strings.Contains(raw, "://") {
		raw = "http://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil {
		return nil, bad(strings.TrimPrefix(err.Error(), "parse "+strconv.Quote(raw)+": "))
	}
	switch u.Scheme {
	case "http", "https":
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	default:
		return nil, bad("scheme must be http or https")
	}
	if u.Host == "" {
		return nil, bad("no host")
	}
	if u.Hostname() == "" {
		u.Host = net.JoinHostPort("127.0.0.1", u.Port())
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return nil, bad("want scheme://host:port[/path], without user, query or fragment")
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawPath = ""
	return u, nil
}

// url returns the sidecar's URL of path with query q.
func (c *cli) url(path string, q url.Values) string {
	u := *c.base
	u.Path += path
	u.RawQuery = q.Encode()
	return u.String()
}

// send makes one request to the sidecar within --timeout and returns the
// status and body, whatever the status.
func (c *cli) send(ctx context.Context, method, path string, q url.Values, body []byte, header http.Header) (int, []byte, error) {
	rctx, cancel := context.WithTimeout(ctx, c.opts.timeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(rctx, method, c.url(path, q), rd)
	if err != nil {
		return 0, nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, b, err := callJSON(c.http, req, maxCLIRead, nil)
	var se *statusError
	switch {
	case errors.As(err, &se):
		return se.code, se.body, nil // the caller reads the sidecar's error
	case errors.Is(err, errResponseTooLarge):
		return 0, nil, fmt.Errorf("the sidecar's answer exceeds %d bytes", maxCLIRead)
	case err != nil:
		return 0, nil, c.netError(ctx, err)
	}
	return resp.StatusCode, b, nil
}

// do is send that returns a non-2xx answer as an error carrying the
// server's detail.
func (c *cli) do(ctx context.Context, method, path string, q url.Values, body []byte, header http.Header) ([]byte, error) {
	code, b, err := c.send(ctx, method, path, q, body, header)
	if err != nil {
		return nil, err
	}
	if code < 200 || code > 299 {
		return nil, responseError(code, b)
	}
	return b, nil
}

// responseError is the error of a non-2xx answer: the detail of the
// sidecar's JSON error, or the start of whatever else it sent.
func responseError(code int, body []byte) error {
	status := fmt.Sprintf("%d %s", code, http.StatusText(code))
	hint := ""
	if code == http.StatusUnauthorized {
		hint = "; pass --auth_token or --auth_token_file"
	}
	var e apiError
	if json.Unmarshal(body, &e) == nil && e.Detail != "" {
		return fmt.Errorf("%s (%s%s)", e.Detail, status, hint)
	}
	text := strings.Join(strings.Fields(string(body)), " ")
	if len(text) > 200 {
		text = text[:200] + "..."
	}
	if text == "" {
		return fmt.Errorf("the sidecar answered %s%s", status, hint)
	}
	return fmt.Errorf("the sidecar answered %s%s: %s", status, hint, text)
}

// netError explains a failed request: interrupted, timed out, or the
// sidecar unreachable (with a hint for an untrusted certificate).
func (c *cli) netError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return errors.New("interrupted")
	}
	if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
		return fmt.Errorf("no answer from the sidecar at %s within %s (see --timeout)", c.base, c.opts.timeout)
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	var unknownCA x509.UnknownAuthorityError
	var verify *tls.CertificateVerificationError
	if errors.As(err, &unknownCA) || errors.As(err, &verify) {
		return fmt.Errorf("cannot reach the sidecar at %s: %v (trust its CA with --tls_ca_file)", c.base, err)
	}
	return fmt.Errorf("cannot reach the sidecar at %s: %v", c.base, err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// printJSON writes the sidecar's JSON as it came, ending in a newline.
func (c *cli) printJSON(b []byte) error {
	b = bytes.TrimRight(b, "\r\n")
	_, err := c.stdout.Write(append(b, '\n'))
	return err
}

// input returns the argument, or stdin when it is "-" (or absent and
// stdinIfAbsent). Reading stdin ends when ctx does.
func (c *cli) input(ctx context.Context, args []string, i int, stdinIfAbsent bool) ([]byte, error) {
	if i < len(args) && args[i] != "-" {
		return []byte(args[i]), nil
	}
	if i >= len(args) && !stdinIfAbsent {
		return nil, nil
	}
	if f, ok := c.stdin.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			fmt.Fprintln(c.stderr, "reading from stdin; end with Ctrl-D")
		}
	}
	type result struct {
		b   []byte
		err error
	}
	// A blocked read of stdin cannot be cancelled. The reader goroutine
	// belongs to the process: an interrupt returns at once and the process
	// exits, ending it.
	done := make(chan result, 1)
	go func() {
		b, err := io.ReadAll(io.LimitReader(c.stdin, maxCLIRead+1))
		done <- result{b, err}
	}()
	select {
	case <-ctx.Done():
		return nil, errors.New("interrupted")
	case r := <-done:
		if r.err != nil {
			return nil, fmt.Errorf("read stdin: %v", r.err)
		}
		if len(r.b) > maxCLIRead {
			return nil, fmt.Errorf("stdin exceeds %d bytes", maxCLIRead)
		}
		return r.b, nil
	}
}

// checkJSON reports whether b is one JSON value, saying where it is not.
func checkJSON(what string, b []byte) error {
	if len(bytes.TrimSpace(b)) == 0 {
		return fmt.Errorf("%s is empty; want JSON", what)
	}
	var v any
	err := json.Unmarshal(b, &v)
	if err == nil {
		return nil
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("%s is not valid JSON: %v (at byte %d)", what, err, se.Offset)
	}
	return fmt.Errorf("%s is not valid JSON: %v", what, err)
}

func (c *cli) listServices(ctx context.Context, _ []string) error {
	b, err := c.do(ctx, http.MethodGet, "/registry", nil, nil, nil)
	if err != nil {
		return fmt.Errorf("list services: %w", err)
	}
	if c.opts.json {
		return c.printJSON(b)
	}
	var names []serviceName
	if err := json.Unmarshal(b, &names); err != nil {
		return fmt.Errorf("list services: unexpected answer from the sidecar: %v", err)
	}
	if len(names) == 0 {
		// On stderr: a script reading names from stdout reads none.
		_, err = fmt.Fprintf(c.stderr, "no services are registered at %s\n", c.base)
		return err
	}
	var out bytes.Buffer
	for _, n := range names {
		out.WriteString(n.Name + "\n")
	}
	_, err = c.stdout.Write(out.Bytes())
	return err
}

func (c *cli) getService(ctx context.Context, args []string) error {
	b, err := c.do(ctx, http.MethodGet, "/registry", url.Values{"service": {args[0]}}, nil, nil)
	if err != nil {
		return fmt.Errorf("get service: %w", err)
	}
	if c.opts.json {
		return c.printJSON(b)
	}
	svc, err := decodeService(b)
	if err != nil {
		return fmt.Errorf("get service: %v", err)
	}
	var out bytes.Buffer
	printService(&out, svc)
	_, err = c.stdout.Write(out.Bytes())
	return err
}

// decodeService reads a service the sidecar sent, dropping null nodes and
// endpoints, which a sidecar never sends but another server at
// --proxy_address might.
func decodeService(b []byte) (*Service, error) {
	var svc Service
	if err := json.Unmarshal(b, &svc); err != nil {
		return nil, fmt.Errorf("unexpected answer from the sidecar: %v", err)
	}
	svc.Nodes = slices.DeleteFunc(svc.Nodes, func(n *Node) bool { return n == nil })
	svc.Endpoints = slices.DeleteFunc(svc.Endpoints, func(e *Endpoint) bool { return e == nil })
	return &svc, nil
}

// printService writes svc as the original micro CLI's get service did:
// the name, then per version a table of nodes, then the endpoints.
func printService(w io.Writer, svc *Service) {
	fmt.Fprintf(w, "service  %s\n", svc.Name)
	// Nodes carry the version they registered with: one table per version.
	var versions []string
	byVersion := map[string][]*Node{}
	for _, n := range svc.Nodes {
		v := n.Version
		if v == "" {
			v = svc.Version
		}
		if _, ok := byVersion[v]; !ok {
			versions = append(versions, v)
		}
		byVersion[v] = append(byVersion[v], n)
	}
	if len(versions) == 0 {
		versions = []string{svc.Version}
	}
	for _, v := range versions {
		if v != "" {
			fmt.Fprintf(w, "\nversion  %s\n", v)
		}
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tAddress\tPort\tMetadata")
		for _, n := range byVersion[v] {
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", n.ID, n.Address, n.Port, formatMetadata(n.Metadata))
		}
		tw.Flush()
	}
	for _, e := range svc.Endpoints {
		fmt.Fprintf(w, "\nEndpoint: %s\n", e.Name)
		if len(e.Metadata) > 0 {
			fmt.Fprintf(w, "Metadata: %s\n", formatMetadata(e.Metadata))
		}
		if len(e.Request) > 0 {
			fmt.Fprintf(w, "Request:  %s\n", compactJSON(e.Request))
		}
		if len(e.Response) > 0 {
			fmt.Fprintf(w, "Response: %s\n", compactJSON(e.Response))
		}
	}
}

// formatMetadata is k=v pairs sorted by key, comma-separated.
func formatMetadata(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + m[k]
	}
	return strings.Join(parts, ",")
}

func compactJSON(b []byte) string {
	var out bytes.Buffer
	if json.Compact(&out, b) != nil {
		return string(b)
	}
	return out.String()
}

func (c *cli) registerService(ctx context.Context, args []string) error {
	return c.changeRegistry(ctx, args, http.MethodPost, "register service", "registered")
}

func (c *cli) deregisterService(ctx context.Context, args []string) error {
	return c.changeRegistry(ctx, args, http.MethodDelete, "deregister service", "deregistered")
}

// changeRegistry sends the service JSON of args to /registry with method.
func (c *cli) changeRegistry(ctx context.Context, args []string, method, what, done string) error {
	body, err := c.input(ctx, args, 0, true)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if err := checkJSON("the service argument", body); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	var q url.Values
	if c.opts.ttl != "" {
		q = url.Values{"ttl": {c.opts.ttl}}
	}
	b, err := c.do(ctx, method, "/registry", q, body, http.Header{"Content-Type": {"application/json"}})
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if c.opts.json {
		return c.printJSON(b)
	}
	var svc Service
	json.Unmarshal(body, &svc) // the sidecar accepted it; only for the message
	nodes := "nodes"
	if len(svc.Nodes) == 1 {
		nodes = "node"
	}
	_, err = fmt.Fprintf(c.stdout, "%s %s (%d %s)\n", done, svc.Name, len(svc.Nodes), nodes)
	return err
}

func (c *cli) call(ctx context.Context, args []string) error {
	service, method := args[0], args[1]
	what := "call " + service + " " + method
	request, err := c.input(ctx, args, 2, false)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if request == nil {
		request = []byte("{}")
	}
	if err := checkJSON("the request argument", request); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	body, err := json.Marshal(struct {
		Service string          `json:"service"`
		Method  string          `json:"method"`
		Request json.RawMessage `json:"request"`
	}{service, method, json.RawMessage(request)})
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	// The sidecar's budget ends a little before ours, so that a timeout
	// comes back as its error, naming the service, rather than ours.
	budget := c.opts.timeout - c.opts.timeout/10
	header := http.Header{"Content-Type": {"application/json"}, "Timeout": {budget.String()}}
	b, err := c.do(ctx, http.MethodPost, "/rpc", nil, body, header)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if c.opts.json {
		return c.printJSON(b)
	}
	var out bytes.Buffer
	if json.Indent(&out, bytes.TrimSpace(b), "", "  ") != nil {
		out.Reset()
		out.Write(bytes.TrimRight(b, "\r\n"))
	}
	out.WriteByte('\n')
	_, err = c.stdout.Write(out.Bytes())
	return err
}

func (c *cli) publish(ctx context.Context, args []string) error {
	topic := args[0]
	what := "publish " + topic
	msg, err := c.input(ctx, args, 1, true)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	b, err := c.do(ctx, http.MethodPost, "/broker", url.Values{"topic": {topic}}, msg, nil)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if c.opts.json {
		return c.printJSON(b)
	}
	_, err = fmt.Fprintf(c.stdout, "published %d bytes to %s\n", len(msg), topic)
	return err
}

// subscribe prints the messages of a topic until ctx ends (exit status 0)
// or the sidecar ends the subscription (an error).
func (c *cli) subscribe(ctx context.Context, args []string) error {
	topic := args[0]
	what := "subscribe " + topic
	q := url.Values{"topic": {topic}}
	if c.opts.queue != "" {
		q.Set("queue", c.opts.queue)
	}
	header := http.Header{}
	if c.token != "" {
		header.Set("Authorization", "Bearer "+c.token)
	}
	dctx, cancel := context.WithTimeout(ctx, c.opts.timeout)
	conn, resp, err := websocket.Dial(dctx, c.url("/broker", q), &websocket.DialOptions{HTTPClient: c.http, HTTPHeader: header})
	cancel()
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			// The websocket library keeps the first KiB of the body: enough
			// for the sidecar's JSON error.
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
			return fmt.Errorf("%s: %w", what, responseError(resp.StatusCode, b))
		}
		if ctx.Err() != nil {
			return nil // interrupted while connecting
		}
		return fmt.Errorf("%s: %w", what, c.netError(ctx, err))
	}
	defer conn.CloseNow()
	conn.SetReadLimit(maxCLIRead)
	if c.opts.queue != "" {
		fmt.Fprintf(c.stderr, "subscribed to %s (queue %s)\n", topic, c.opts.queue)
	} else {
		fmt.Fprintf(c.stderr, "subscribed to %s\n", topic)
	}

	// An interrupt closes the connection with a close handshake; the read
	// below then fails and the command ends with status 0.
	var closing sync.WaitGroup
	closing.Add(1)
	stop := context.AfterFunc(ctx, func() {
		defer closing.Done()
		conn.Close(websocket.StatusNormalClosure, "")
	})
	defer func() {
		if !stop() {
			closing.Wait()
		}
	}()
	for {
		_, frame, err := conn.Read(context.Background())
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if cs := websocket.CloseStatus(err); cs != -1 {
				var ce websocket.CloseError
				errors.As(err, &ce)
				return fmt.Errorf("%s: the sidecar ended the subscription (websocket close %d: %s)", what, int(cs), strings.TrimSpace(ce.Reason))
			}
			return fmt.Errorf("%s: connection lost: %v", what, err)
		}
		if c.opts.json {
			if err := c.printJSON(frame); err != nil {
				return err
			}
			continue
		}
		var m struct {
			Body []byte
		}
		if err := json.Unmarshal(frame, &m); err != nil {
			return fmt.Errorf("%s: unexpected message from the sidecar: %v", what, err)
		}
		if _, err := io.WriteString(c.stdout, messageLine(m.Body)+"\n"); err != nil {
			return err
		}
	}
}

// messageLine is how subscribe prints a message body: as it is when it is
// one line of printable text (one trailing newline, as echo sends, is the
// line's own end), else as a Go string literal (strconv.Quote: for text it
// is also a JSON string, and it keeps invalid UTF-8 byte for byte), so
// that a message holding a newline cannot pass for two. A body that
// begins with a double quote is quoted too, or it would read as quoted.
func messageLine(body []byte) string {
	line := string(body)
	if l, ok := strings.CutSuffix(line, "\n"); ok && l != "" {
		line = l
	}
	if !utf8.ValidString(line) || strings.HasPrefix(line, `"`) {
		return strconv.Quote(string(body))
	}
	for _, r := range line {
		if r != '\t' && !strconv.IsPrint(r) {
			return strconv.Quote(string(body))
		}
	}
	return line
}

// nodeHealth is one row of the health command.
type nodeHealth struct {
	ID        string  `json:"id"`
	Address   string  `json:"address"`
	Port      int     `json:"port"`
	Up        bool    `json:"up"`
	LatencyMs float64 `json:"latency_ms,omitempty"`
	Error     string  `json:"error,omitempty"`
}

func (c *cli) health(ctx context.Context, args []string) error {
	name := args[0]
	what := "health " + name
	code, hb, err := c.send(ctx, http.MethodGet, "/health", nil, nil, nil)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	var sidecar struct {
		Status string `json:"status"`
	}
	if json.Unmarshal(hb, &sidecar) != nil || sidecar.Status == "" {
		return fmt.Errorf("%s: /health: %w", what, responseError(code, hb))
	}
	b, err := c.do(ctx, http.MethodGet, "/registry", url.Values{"service": {name}}, nil, nil)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	svc, err := decodeService(b)
	if err != nil {
		return fmt.Errorf("%s: %v", what, err)
	}
	nodes := c.dialNodes(ctx, svc.Nodes)
	if ctx.Err() != nil {
		return errors.New("interrupted")
	}
	down := 0
	for _, n := range nodes {
		if !n.Up {
			down++
		}
	}

	if c.opts.json {
		out, err := json.Marshal(struct {
			Sidecar json.RawMessage `json:"sidecar"`
			Service string          `json:"service"`
			Nodes   []nodeHealth    `json:"nodes"`
		}{json.RawMessage(bytes.TrimSpace(hb)), svc.Name, nodes})
		if err != nil {
			return err
		}
		if err := c.printJSON(out); err != nil {
			return err
		}
	} else {
		var out bytes.Buffer
		fmt.Fprintf(&out, "sidecar  %s  %s\n", c.base, sidecar.Status)
		fmt.Fprintf(&out, "service  %s\n\n", svc.Name)
		tw := tabwriter.NewWriter(&out, 0, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tAddress\tPort\tStatus\tDetail")
		for _, n := range nodes {
			if n.Up {
				fmt.Fprintf(tw, "%s\t%s\t%d\tup\t%.1fms\n", n.ID, n.Address, n.Port, n.LatencyMs)
			} else {
				fmt.Fprintf(tw, "%s\t%s\t%d\tdown\t%s\n", n.ID, n.Address, n.Port, n.Error)
			}
		}
		tw.Flush()
		if _, err := c.stdout.Write(out.Bytes()); err != nil {
			return err
		}
	}
	switch {
	case down > 0:
		return fmt.Errorf("%s: %d of %d nodes do not answer", what, down, len(nodes))
	case code != http.StatusOK:
		return fmt.Errorf("%s: the sidecar at %s is %s", what, c.base, sidecar.Status)
	}
	return nil
}

// dialNodes checks, at most healthDialers at a time, that each node
// accepts a TCP connection within --dial_timeout. It returns when every
// dial has ended.
func (c *cli) dialNodes(ctx context.Context, nodes []*Node) []nodeHealth {
	out := make([]nodeHealth, len(nodes))
	sem := make(chan struct{}, healthDialers)
	var wg sync.WaitGroup
	for i, n := range nodes {
		out[i] = nodeHealth{ID: n.ID, Address: n.Address, Port: n.Port}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			addr := n.Address
			if n.Port != 0 {
				addr = net.JoinHostPort(n.Address, strconv.Itoa(n.Port))
			}
			dctx, cancel := context.WithTimeout(ctx, c.opts.dialTimeout)
			defer cancel()
			start := time.Now()
			conn, err := (&net.Dialer{}).DialContext(dctx, "tcp", addr)
			if err != nil {
				out[i].Error = err.Error()
				return
			}
			conn.Close()
			out[i].Up = true
			out[i].LatencyMs = float64(time.Since(start).Microseconds()) / 1000
		}()
	}
	wg.Wait()
	return out
}

// version prints the binary's build information: one line, or JSON.
func (c *cli) version(_ context.Context, _ []string) error {
	v := readBuildVersion()
	if c.opts.json {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		return c.printJSON(b)
	}
	_, err := fmt.Fprintln(c.stdout, v)
	return err
}

// buildVersion is what sidecar version and sidecar --version print, read
// from the build information the Go toolchain embeds in every binary: no
// linker flags or generated files are needed, so go build, go install and
// the container image all report the same way. The VCS fields are empty
// when the binary was built outside a git checkout (or with -buildvcs=false).
type buildVersion struct {
	Version  string `json:"version"`            // module version: a tag, a pseudo-version, or "(devel)"
	Revision string `json:"revision,omitempty"` // VCS commit the binary was built from
	Time     string `json:"time,omitempty"`     // commit time of Revision, RFC 3339
	Modified bool   `json:"modified"`           // the checkout had uncommitted changes
	Go       string `json:"go"`                 // Go toolchain version
	Platform string `json:"platform"`           // GOOS/GOARCH
}

// readBuildVersion returns the running binary's build information.
func readBuildVersion() buildVersion {
	v := buildVersion{Version: "(unknown)", Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if info.Main.Version != "" {
		v.Version = info.Main.Version
	}
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Revision = s.Value
		case "vcs.time":
			v.Time = s.Value
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	return v
}

// String is the one-line form:
// "sidecar VERSION (revision REV, TIME, modified) GO GOOS/GOARCH".
func (v buildVersion) String() string {
	var vcs []string
	if v.Revision != "" {
		vcs = append(vcs, "revision "+v.Revision)
	}
	if v.Time != "" {
		vcs = append(vcs, v.Time)
	}
	if v.Modified {
		vcs = append(vcs, "modified")
	}
	s := "sidecar " + v.Version
	if len(vcs) > 0 {
		s += " (" + strings.Join(vcs, ", ") + ")"
	}
	return s + " " + v.Go + " " + v.Platform
}

// help prints the overview, or one command's help for sidecar help COMMAND.
func (c *cli) help(args []string) error {
	for _, a := range args {
		if strings.HasPrefix(a, "-") {
			continue
		}
		cmd := findCommand(a)
		if cmd == nil {
			return fmt.Errorf("unknown command %q (see sidecar help)", a)
		}
		c.commandHelp(cmd)
		return nil
	}
	var b bytes.Buffer
	b.WriteString(`Usage:
  sidecar [flags]                  run the sidecar (sidecar --help lists its flags)
  sidecar COMMAND [ARGS] [flags]   talk to a running sidecar over its HTTP API

Commands:
`)
	tw := tabwriter.NewWriter(&b, 0, 8, 3, ' ', 0)
	for _, cmd := range cliCommands() {
		fmt.Fprintf(tw, "  %s\t%s\n", strings.TrimSpace(cmd.name+" "+cmd.args), cmd.summary)
	}
	tw.Flush()
	b.WriteString("\nFlags of every command (before or after it; all but --json also read MICRO_<NAME>):\n")
	fs := cliFlagSet(&cliOptions{}, &cliCommand{})
	fs.SetOutput(&b)
	fs.PrintDefaults()
	b.WriteString(`
Examples:
  sidecar list services
  sidecar --proxy_address 10.0.0.5:8081 get service go.micro.srv.greeter
  sidecar call go.micro.srv.greeter Say.Hello '{"name": "John"}'
  sidecar subscribe events          (in one terminal)
  sidecar publish events 'hello'    (in another)

Run "sidecar help COMMAND" or "sidecar COMMAND --help" for a command's details.
`)
	_, err := c.stdout.Write(b.Bytes())
	return err
}

// commandHelp prints the usage, description, examples and flags of cmd.
func (c *cli) commandHelp(cmd *cliCommand) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "Usage: sidecar %s [flags]\n", strings.TrimSpace(cmd.name+" "+cmd.args))
	if cmd.alias != "" {
		fmt.Fprintf(&b, "       sidecar %s %s [flags]\n", cmd.alias, cmd.args)
	}
	fmt.Fprintf(&b, "\n%s\n\nExamples:\n", cmd.detail)
	for _, e := range cmd.examples {
		fmt.Fprintf(&b, "  %s\n", e)
	}
	b.WriteString("\nFlags:\n")
	fs := cliFlagSet(&cliOptions{}, cmd)
	fs.SetOutput(&b)
	fs.PrintDefaults()
	c.stdout.Write(b.Bytes())
}
