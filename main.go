// Sidecar is a language-agnostic service sidecar. One binary runs next to an
// application written in any language and gives it, over a small HTTP API,
// service discovery, RPC with load balancing, retries and timeouts, pub/sub
// over websockets, health checking, stats and metrics, and TLS.
//
// Routes (see routes for the table):
//
//	GET    /health                  the sidecar's and the app's health
//	GET    /registry                all services; ?service=NAME one service;
//	                                a websocket upgrade streams watch events
//	POST   /registry[?ttl=10s]      register (re-POST renews the TTL)
//	DELETE /registry                deregister the nodes in the body
//	POST   /rpc                     call service/method (form or JSON)
//	POST   /broker?topic=T          publish the raw body
//	GET    /broker?topic=T[&queue=Q] websocket subscribe (and publish)
//	POST   /broker/deliver          messages from other sidecars (sidecars only)
//	GET    /stats                   the stats page (--enable_stats); its data
//	                                as JSON with Accept: application/json
//	GET    /metrics                 counters in the Prometheus text format
//	/[service]/[method]             RPC by path (--handler=rpc) or a reverse
//	                                proxy by service name (--handler=proxy)
//
// Usage:
//
//	sidecar [flags]                 serve
//	sidecar COMMAND [ARGS] [flags]  the client of a running sidecar
//	                                (list services, get service, register,
//	                                deregister, call, publish, subscribe,
//	                                health, stats; see sidecar help and cli.go)
//
// Every flag also reads the environment variable MICRO_ + its upper-case
// name (MICRO_ADDRESS for --address); a flag on the command line wins.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sidecar:", err)
		os.Exit(1)
	}
}

// run parses args, binds the listener, prints the bound address on one line
// of stdout and serves until ctx is cancelled, then shuts down gracefully.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if isCLI(args) {
		return runCLI(ctx, args, stdout, stderr) // sidecar COMMAND: the client (cli.go)
	}
	cfg, err := parseConfig(args, os.Getenv, stderr)
	if errors.Is(err, errShowVersion) {
		_, err = fmt.Fprintln(stdout, readBuildVersion()) // as sidecar version (cli.go)
		return err
	}
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))
	s, err := newServer(cfg, logger)
	if err != nil {
		return err
	}
	ln, err := s.tls.listen(cfg.Address)
	if err != nil {
		s.Close()
		return err
	}
	if err := s.setAdvertise(ln.Addr()); err != nil {
		ln.Close()
		s.Close()
		return err
	}
	fmt.Fprintf(stdout, "sidecar listening on %s://%s\n", s.tls.scheme(), ln.Addr())
	warnIfExposed(cfg, ln.Addr(), logger)
	return s.serve(ctx, ln)
}

// warnIfExposed logs one warning when the sidecar listens beyond loopback
// and nothing authenticates its callers: then anyone who can reach the
// port can register nodes (and so take over other services' calls),
// publish, and call every service through it. Mutual TLS authenticates
// callers too.
func warnIfExposed(cfg *Config, bound net.Addr, logger *slog.Logger) {
	if cfg.AuthToken != "" || cfg.TLSClientCAFile != "" {
		return
	}
	if a, ok := bound.(*net.TCPAddr); ok && a.IP.IsLoopback() {
		return
	}
	logger.Warn("no auth token: anyone who can reach this address can change the registry and call services through the sidecar",
		"address", bound.String(),
		"fix", "set --auth_token_file FILE or --auth_token TOKEN (MICRO_AUTH_TOKEN_FILE, MICRO_AUTH_TOKEN); clients then send Authorization: Bearer TOKEN")
}

// Config is the sidecar's whole configuration, parsed once by parseConfig
// and read-only afterwards.
type Config struct {
	Address   string   // listen address; default loopback only
	Handler   string   // "rpc" or "proxy": what serves paths not owned by the sidecar
	Namespace string   // prefix of service names derived from paths
	CORS      []string // allowed browser origins; "*" allows any, without credentials

	ServerName          string        // the app's service name (app mode)
	ServerAddress       string        // the app's host:port (app mode)
	HealthcheckURL      string        // the app's health URL; empty means assume healthy
	HealthcheckInterval time.Duration // between two checks of the app
	HealthcheckTimeout  time.Duration // for one check of the app
	RegisterTTL         time.Duration // TTL of the app's registration
	RegisterInterval    time.Duration // heartbeat of the app's registration

	Registry        string        // "memory" (default) or another backend
	RegistryAddress string        // address of a remote registry
	RegistrySweep   time.Duration // how often expired nodes are removed
	RegistryTimeout time.Duration // one call to a remote registry; zero: 5s
	RegistryWait    time.Duration // longest blocking query of a remote registry; zero: 30s
	// Remote registries at scale (registry_cache.go): the connection bound
	// (blocking queries take at most 7/8 of it), the age past which an
	// unwatched service is fetched again on lookup, and how long a service
	// may go without lookups before its watch is dropped.
	RegistryConnections int
	RegistryStale       time.Duration
	RegistryWatchIdle   time.Duration

	RegistryHistory     int // recent watch events kept for ?since= (registry_watch.go)
	RegistryMaxWatchers int // open registry watches; beyond it a watch is a 503
	RegistryMaxNodes    int // nodes in one registration request; beyond it a 413

	Broker        string      // "memory" (default: here, and across sidecars sharing the registry) or "nats"
	BrokerAddress string      // memory: host:port other sidecars deliver to, empty: the bound address; nats: the servers
	BrokerSecret  string      // required of sidecars delivering messages here (broker_peers.go)
	NATS          natsOptions // --broker nats: prefix, credentials, TLS, buffer (broker_nats.go)

	ClientRetries        int           // extra attempts for safe-to-retry failures
	ClientRequestTimeout time.Duration // budget of one call, all attempts included
	RPCAllowAddress      bool          // lets /rpc name an explicit backend address
	ProxyIdleTimeout     time.Duration // a proxied stream with no bytes either way for this long ends
	Balancer             string        // node selection: p2c (default), random or roundrobin

	EnableStats bool

	AccessLog     bool          // one log line per request
	StatsInterval time.Duration // between two samples of the /stats page's counters
	// Upstream services with counters of their own, per handler (later
	// ones count as "other"), and per-node series in /metrics
	// (stats_upstream.go).
	StatsMaxServices  int
	MetricsNodeLabels bool

	EnableTLS       bool
	TLSCertFile     string
	TLSKeyFile      string
	TLSClientCAFile string
	EnableACME      bool
	ACMEHosts       []string

	TLSReloadInterval time.Duration // how often changed certificate, client CA and token files are looked for
	ACMECacheDir      string
	ACMEDirectoryURL  string
	ACMECAFile        string // CA roots of the ACME server's own HTTPS (private CAs)
	ACMEHTTPAddress   string // HTTP-01 challenge listener; empty: TLS-ALPN-01 only
	ACMEEmail         string
	ClientTLS         bool   // call every backend over TLS
	ClientCAFile      string // CA roots for backends; empty: system roots

	// AuthToken is the required bearer token (--auth_token), or the first
	// token of AuthTokenFile at start-up. Besides the check (auth.go) it is
	// what says auth is on, what a --registry sidecar client sends, and
	// the default delivery key (broker_peers.go).
	AuthToken     string
	AuthTokenFile string // accepted tokens, one a line, re-read when it changes (auth.go)

	MaxBodyBytes    int64         // limit of a request body the sidecar reads
	ShutdownDelay   time.Duration // on SIGTERM, serve this long with /health at 503 before closing the listener; zero: none
	ShutdownTimeout time.Duration // drain budget on SIGTERM, after the delay
	LogLevel        slog.Level

	// now is the registry's clock: registration TTLs, and the ages of what
	// a remote registry's cache holds. nil means time.Now. Not a flag:
	// tests set it to move time past a TTL without sleeping.
	now func() time.Time
}

// clock returns the registry's clock.
func (c *Config) clock() func() time.Time {
	if c.now != nil {
		return c.now
	}
	return time.Now
}

// defaultConfig returns the defaults that the flags document.
func defaultConfig() *Config {
	return &Config{
		Address:              "127.0.0.1:8081",
		Handler:              "rpc",
		Namespace:            "go.micro.srv",
		HealthcheckInterval:  10 * time.Second,
		HealthcheckTimeout:   2 * time.Second,
		RegisterTTL:          30 * time.Second,
		RegisterInterval:     10 * time.Second,
		Registry:             "memory",
		Broker:               "memory",
		NATS:                 natsDefaults(),
		RegistrySweep:        250 * time.Millisecond,
		RegistryConnections:  defaultRegistryConns,
		RegistryStale:        defaultRegistryStale,
		RegistryWatchIdle:    defaultRegistryIdle,
		RegistryHistory:      defaultWatchHistory,
		RegistryMaxWatchers:  10_000,
		RegistryMaxNodes:     10_000,
		StatsInterval:        time.Second,
		StatsMaxServices:     defaultStatsMaxServices,
		ClientRetries:        1,
		ClientRequestTimeout: 5 * time.Second,
		ProxyIdleTimeout:     defaultProxyIdleTimeout,
		Balancer:             "p2c",
		MaxBodyBytes:         4 << 20,
		ShutdownTimeout:      10 * time.Second,
		TLSReloadInterval:    time.Second,
	}
}

// errShowVersion is what parseConfig returns for --version: run prints
// the version instead of serving.
var errShowVersion = errors.New("show version")

// parseConfig reads flags from args, then MICRO_* environment variables for
// the flags not given, and validates the result in one place.
// Every error is one line that ends saying where help is.
func parseConfig(args []string, getenv func(string) string, stderr io.Writer) (_ *Config, err error) {
	defer func() {
		if err != nil && !errors.Is(err, flag.ErrHelp) && !errors.Is(err, errShowVersion) && !strings.HasSuffix(err.Error(), "; see sidecar help") {
			err = fmt.Errorf("%w; see sidecar --help", err)
		}
	}()
	cfg := defaultConfig()
	fs := flag.NewFlagSet("sidecar", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are returned as one line; --help prints below
	var cors, acmeHosts, authTokenFile, logLevel string
	var version bool
	fs.StringVar(&cfg.Address, "address", cfg.Address, "listen `host:port` (\":8081\" to listen on every interface)")
	fs.StringVar(&cfg.Handler, "handler", cfg.Handler, "handler of other paths: rpc or proxy")
	fs.StringVar(&cfg.Namespace, "namespace", cfg.Namespace, "namespace of services named by paths")
	fs.StringVar(&cors, "cors", "", "comma-separated allowed browser `origins` (\"*\" for any, without credentials)")
	fs.StringVar(&cfg.ServerName, "server_name", "", "service `name` of the app to register")
	fs.StringVar(&cfg.ServerAddress, "server_address", "", "`host:port` of the app to register")
	fs.StringVar(&cfg.HealthcheckURL, "healthcheck_url", "", "`URL` of the app's health check (non-2xx is a failure)")
	fs.DurationVar(&cfg.HealthcheckInterval, "healthcheck_interval", cfg.HealthcheckInterval, "interval between health checks of the app")
	fs.DurationVar(&cfg.HealthcheckTimeout, "healthcheck_timeout", cfg.HealthcheckTimeout, "timeout of one health check of the app")
	fs.DurationVar(&cfg.RegisterTTL, "register_ttl", cfg.RegisterTTL, "TTL of the app's registration")
	fs.DurationVar(&cfg.RegisterInterval, "register_interval", cfg.RegisterInterval, "interval of the app's registration heartbeat")
	fs.StringVar(&cfg.Registry, "registry", cfg.Registry, "registry backend: memory, consul or sidecar (another sidecar's /registry)")
	fs.StringVar(&cfg.RegistryAddress, "registry_address", "", "`address` of the registry backend (consul: host:port, default $CONSUL_HTTP_ADDR or 127.0.0.1:8500; sidecar: http://host:port)")
	fs.IntVar(&cfg.RegistryHistory, "registry_history", cfg.RegistryHistory, "recent registry events kept so a watch can resume with ?since= (0: none)")
	fs.IntVar(&cfg.RegistryMaxWatchers, "registry_max_watchers", cfg.RegistryMaxWatchers, "most registry watches open at once")
	fs.IntVar(&cfg.RegistryMaxNodes, "registry_max_nodes", cfg.RegistryMaxNodes, "most nodes in one registration request")
	fs.IntVar(&cfg.RegistryConnections, "registry_connections", cfg.RegistryConnections, "connections to a remote registry, every call included; blocking queries (watches) use at most 7/8 of them (Consul allows 200 per client address)")
	fs.DurationVar(&cfg.RegistryStale, "registry_stale", cfg.RegistryStale, "a remote service looked up but not watched is fetched again on lookup once its copy is this old")
	fs.DurationVar(&cfg.RegistryWatchIdle, "registry_watch_idle", cfg.RegistryWatchIdle, "a remote service not looked up for this long is no longer watched")
	fs.StringVar(&cfg.Broker, "broker", cfg.Broker, "pub/sub engine: memory (across sidecars sharing a registry too) or nats")
	fs.StringVar(&cfg.BrokerAddress, "broker_address", "", "`address`: with --broker memory, host:port where other sidecars deliver pub/sub messages (default: the bound --address); with --broker nats, nats://host:4222[,nats://host2:4222] (tls:// for TLS, user:password@ or token@ allowed; default nats://127.0.0.1:4222)")
	fs.StringVar(&cfg.BrokerSecret, "broker_secret", "", "`secret` that keys the signature of deliveries between sidecars sharing a registry (default: --auth_token)")
	fs.StringVar(&cfg.NATS.Prefix, "broker_prefix", cfg.NATS.Prefix, "NATS subject `prefix`: topic T is subject PREFIX.T")
	fs.StringVar(&cfg.NATS.User, "broker_user", "", "NATS `user`, unless the server URL has one")
	fs.StringVar(&cfg.NATS.Password, "broker_password", "", "NATS `password` of --broker_user")
	fs.StringVar(&cfg.NATS.Token, "broker_token", "", "NATS authorization `token`, unless the server URL has one")
	fs.StringVar(&cfg.NATS.NKeyFile, "broker_nkey_file", "", "`file` holding the NATS user's nkey seed (SU...)")
	fs.BoolVar(&cfg.NATS.TLS, "broker_tls", false, "connect to NATS over TLS (as tls:// does)")
	fs.StringVar(&cfg.NATS.TLSCAFile, "broker_tls_ca_file", "", "CA `file` (PEM) of the NATS servers' certificates (default system roots)")
	fs.StringVar(&cfg.NATS.TLSCertFile, "broker_tls_cert_file", "", "client certificate `file` (PEM) for NATS mutual TLS")
	fs.StringVar(&cfg.NATS.TLSKeyFile, "broker_tls_key_file", "", "client key `file` (PEM) for NATS mutual TLS")
	fs.Int64Var(&cfg.NATS.BufferBytes, "broker_buffer_bytes", cfg.NATS.BufferBytes, "`bytes` of publishes held while NATS is unreachable or slow; beyond, publishing answers 503")
	fs.DurationVar(&cfg.NATS.PingInterval, "broker_ping_interval", cfg.NATS.PingInterval, "NATS keepalive: two intervals without PONG mean a dead server")
	fs.DurationVar(&cfg.NATS.HealthGrace, "broker_health_grace", cfg.NATS.HealthGrace, "/health answers 503 once disconnected from NATS this long")
	fs.IntVar(&cfg.ClientRetries, "client_retries", cfg.ClientRetries, "retries of a call where retrying is safe")
	fs.DurationVar(&cfg.ClientRequestTimeout, "client_request_timeout", cfg.ClientRequestTimeout, "timeout of a call, all attempts included")
	fs.DurationVar(&cfg.ProxyIdleTimeout, "proxy_idle_timeout", cfg.ProxyIdleTimeout, "end a proxied stream (events, chunks, websocket) with no bytes either way for this long")
	fs.StringVar(&cfg.Balancer, "balancer", cfg.Balancer, "node selection: p2c (latency- and failure-aware), random or roundrobin")
	fs.BoolVar(&cfg.RPCAllowAddress, "rpc_allow_address", false, "let /rpc call an explicit address (makes the sidecar an open proxy)")
	fs.BoolVar(&cfg.EnableStats, "enable_stats", false, "serve the stats page at /stats")
	fs.BoolVar(&cfg.AccessLog, "access_log", false, "log one line per request")
	fs.IntVar(&cfg.StatsMaxServices, "stats_max_services", cfg.StatsMaxServices, "upstream services with metrics of their own, per handler; later ones are counted as \"other\"")
	fs.BoolVar(&cfg.MetricsNodeLabels, "metrics_node_labels", false, "add per-node series (calls in flight, latency estimate, ejection) to /metrics, labelled by node id, at most 50 nodes a service")
	fs.BoolVar(&cfg.EnableTLS, "enable_tls", false, "serve TLS with --tls_cert_file and --tls_key_file")
	fs.StringVar(&cfg.TLSCertFile, "tls_cert_file", "", "TLS certificate `file` (PEM)")
	fs.StringVar(&cfg.TLSKeyFile, "tls_key_file", "", "TLS key `file` (PEM)")
	fs.StringVar(&cfg.TLSClientCAFile, "tls_client_ca_file", "", "CA `file` that client certificates must chain to (mutual TLS)")
	fs.BoolVar(&cfg.EnableACME, "enable_acme", false, "get certificates from an ACME CA")
	fs.StringVar(&acmeHosts, "acme_hosts", "", "comma-separated `hosts` allowed to get ACME certificates")
	fs.DurationVar(&cfg.TLSReloadInterval, "tls_reload_interval", cfg.TLSReloadInterval, "how often to look for changed --tls_cert_file, --tls_key_file, --tls_client_ca_file and --auth_token_file")
	fs.StringVar(&cfg.ACMECacheDir, "acme_cache_dir", "", "`dir` that keeps ACME account and certificates across restarts")
	fs.StringVar(&cfg.ACMEDirectoryURL, "acme_directory_url", defaultACMEDirectory, "ACME directory `URL` (Let's Encrypt by default)")
	fs.StringVar(&cfg.ACMECAFile, "acme_ca_file", "", "CA `file` (PEM) to trust for the ACME server's HTTPS (private CAs)")
	fs.StringVar(&cfg.ACMEHTTPAddress, "acme_http_address", "", "`host:port` of an HTTP-01 challenge listener (e.g. :80)")
	fs.StringVar(&cfg.ACMEEmail, "acme_email", "", "contact `email` of the ACME account")
	fs.BoolVar(&cfg.ClientTLS, "client_tls", false, "call every backend over TLS (else only nodes with metadata https=true)")
	fs.StringVar(&cfg.ClientCAFile, "client_ca_file", "", "CA `file` (PEM) to verify backends' certificates (default system roots)")
	fs.StringVar(&cfg.AuthToken, "auth_token", "", "require Authorization: Bearer `TOKEN` on every request but /health")
	fs.StringVar(&authTokenFile, "auth_token_file", "", "read the accepted auth tokens from `file`, one a line, re-read when it changes")
	fs.Int64Var(&cfg.MaxBodyBytes, "max_body_bytes", cfg.MaxBodyBytes, "largest request body the sidecar reads")
	fs.DurationVar(&cfg.ShutdownDelay, "shutdown_delay", cfg.ShutdownDelay, "on SIGTERM, keep serving this long with /health at 503 and the app deregistered before closing the listener (5s for Kubernetes)")
	fs.DurationVar(&cfg.ShutdownTimeout, "shutdown_timeout", cfg.ShutdownTimeout, "time to drain requests on SIGTERM (after --shutdown_delay)")
	fs.StringVar(&logLevel, "log_level", "info", "log level: debug, info, warn or error")
	fs.BoolVar(&version, "version", false, "print the version and exit (sidecar version --json prints it as JSON)")
	// The flag package prints the usage after every error; a mistyped
	// value gets one line (flagError) and only --help the whole usage.
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stderr)
			fmt.Fprintf(fs.Output(), "Usage: sidecar [flags]\n       sidecar COMMAND [ARGS] (commands of the client: sidecar help)\n\nEvery flag also reads MICRO_<NAME> from the environment (MICRO_ADDRESS for --address).\n\nFlags:\n")
			fs.PrintDefaults()
			return nil, err
		}
		return nil, flagError(fs, err)
	}
	if version {
		return nil, errShowVersion // before the environment: MICRO_* settings cannot stop it
	}
	if fs.NArg() > 0 {
		return nil, strayArgument(fs)
	}
	if err := applyEnv(fs, getenv); err != nil {
		return nil, err
	}

	cfg.CORS = splitList(cors)
	cfg.ACMEHosts = splitList(acmeHosts)
	if err := cfg.LogLevel.UnmarshalText([]byte(logLevel)); err != nil {
		return nil, fmt.Errorf("invalid value %q for flag --log_level: want debug, info, warn or error", logLevel)
	}
	if authTokenFile != "" {
		if cfg.AuthToken != "" {
			return nil, errors.New("flags --auth_token and --auth_token_file exclude each other")
		}
		b, err := readLimited(authTokenFile)
		if err != nil {
			return nil, fmt.Errorf("flag --auth_token_file: %w", err)
		}
		tokens, err := parseTokens(b)
		if err != nil {
			return nil, fmt.Errorf("flag --auth_token_file: %s: %w", authTokenFile, err)
		}
		cfg.AuthToken, cfg.AuthTokenFile = tokens[0], authTokenFile
	}
	return cfg, cfg.validate()
}

// applyEnv sets every flag not given on the command line from MICRO_<NAME>.
func applyEnv(fs *flag.FlagSet, getenv func(string) string) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		env := "MICRO_" + strings.ToUpper(f.Name)
		v := getenv(env)
		if given[f.Name] || v == "" || err != nil || f.Name == "version" {
			return // MICRO_VERSION often names an app's version, not this flag
		}
		if e := fs.Set(f.Name, v); e != nil {
			err = fmt.Errorf("invalid value %q for flag --%s (from %s): %s", v, f.Name, env, valueHint(f, e))
		}
	})
	return err
}

// flagError rewrites an error of flag.FlagSet.Parse as one line that names
// the flag as users type it (--name) and says what value it wants. It
// reads the flag package's messages by their fixed formats (the failf
// calls of flag.go); TestBinaryBadFlagOneLine pins each of them.
func flagError(fs *flag.FlagSet, err error) error {
	msg := err.Error()
	if name, ok := strings.CutPrefix(msg, "flag provided but not defined: -"); ok {
		return fmt.Errorf("unknown flag --%s", name)
	}
	if name, ok := strings.CutPrefix(msg, "flag needs an argument: -"); ok {
		return fmt.Errorf("flag --%s needs a value", name)
	}
	// invalid value "V" for flag -NAME: ERR, and for booleans
	// invalid boolean value "V" for -NAME: ERR.
	rest, ok := strings.CutPrefix(msg, "invalid value ")
	if !ok {
		rest, ok = strings.CutPrefix(msg, "invalid boolean value ")
	}
	if !ok {
		return err
	}
	quoted, qerr := strconv.QuotedPrefix(rest)
	if qerr != nil {
		return err
	}
	rest = strings.TrimPrefix(strings.TrimPrefix(rest[len(quoted):], " for flag -"), " for -")
	name, cause, ok := strings.Cut(rest, ": ")
	f := fs.Lookup(name)
	if !ok || f == nil {
		return err
	}
	return fmt.Errorf("invalid value %s for flag --%s: %s", quoted, name, valueHint(f, errors.New(cause)))
}

// valueHint says what value flag f wants, given the error of its Set: the
// flag package's own errors say only "parse error".
func valueHint(f *flag.Flag, err error) string {
	if err.Error() == "value out of range" {
		return "out of range"
	}
	g, ok := f.Value.(flag.Getter)
	if !ok {
		return err.Error()
	}
	switch g.Get().(type) {
	case time.Duration:
		return "want a duration such as 10s, 1m30s or 500ms"
	case bool:
		return "want true or false"
	case int, int64, uint, uint64:
		return "want an integer"
	}
	return err.Error()
}

// strayArgument explains the first argument that is not a flag. A client
// command there means client and sidecar flags were mixed up, most often
// --address (where a sidecar listens) for --proxy_address (the sidecar a
// command talks to).
func strayArgument(fs *flag.FlagSet) error {
	arg := fs.Arg(0)
	if findCommand(arg) == nil && arg != "help" {
		return fmt.Errorf("unexpected argument %q", arg)
	}
	if f := fs.Lookup("address"); f != nil && isFlagSet(fs, "address") {
		v := f.Value.String()
		return fmt.Errorf("%q is a command of the client: to talk to the sidecar at %s, use --proxy_address %s (--address is where a sidecar listens); see sidecar help", arg, v, v)
	}
	var server string
	fs.Visit(func(f *flag.Flag) {
		if server == "" && f.Name != "auth_token" && f.Name != "auth_token_file" { // the client's too
			server = f.Name
		}
	})
	if server == "" {
		return fmt.Errorf("unexpected argument %q", arg)
	}
	return fmt.Errorf("%q is a command of the client, and --%s is a flag of the sidecar, not of the client; see sidecar help", arg, server)
}

// isFlagSet reports whether flag name was given on the command line.
func isFlagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// validate checks values that parse but make no sense together.
func (c *Config) validate() error {
	positive := []struct {
		name string
		d    time.Duration
	}{
		{"healthcheck_interval", c.HealthcheckInterval},
		{"healthcheck_timeout", c.HealthcheckTimeout},
		{"register_ttl", c.RegisterTTL},
		{"register_interval", c.RegisterInterval},
		{"client_request_timeout", c.ClientRequestTimeout},
		{"proxy_idle_timeout", c.ProxyIdleTimeout},
		{"shutdown_timeout", c.ShutdownTimeout},
		{"registry_stale", c.RegistryStale},
		{"registry_watch_idle", c.RegistryWatchIdle},
	}
	for _, p := range positive {
		if p.d <= 0 {
			return fmt.Errorf("invalid value %s for flag --%s: must be positive", p.d, p.name)
		}
	}
	switch {
	case c.Handler != "rpc" && c.Handler != "proxy":
		return fmt.Errorf("invalid value %q for flag --handler: want rpc or proxy", c.Handler)
	case c.ClientRetries < 0 || c.ClientRetries > 10:
		return fmt.Errorf("invalid value %d for flag --client_retries: want 0 to 10", c.ClientRetries)
	case !validStrategy(c.Balancer):
		return fmt.Errorf("invalid value %q for flag --balancer: want p2c, random or roundrobin", c.Balancer)
	case c.RegistryHistory < 0:
		return fmt.Errorf("invalid value %d for flag --registry_history: must not be negative", c.RegistryHistory)
	case c.RegistryMaxWatchers <= 0:
		return fmt.Errorf("invalid value %d for flag --registry_max_watchers: must be positive", c.RegistryMaxWatchers)
	case c.RegistryMaxNodes <= 0:
		return fmt.Errorf("invalid value %d for flag --registry_max_nodes: must be positive", c.RegistryMaxNodes)
	case c.RegistryConnections < 4 || c.RegistryConnections > 10_000:
		return fmt.Errorf("invalid value %d for flag --registry_connections: want 4 to 10000", c.RegistryConnections)
	case c.ShutdownDelay < 0:
		return fmt.Errorf("invalid value %s for flag --shutdown_delay: must not be negative", c.ShutdownDelay)
	case c.StatsMaxServices < 1 || c.StatsMaxServices > 10_000:
		return fmt.Errorf("invalid value %d for flag --stats_max_services: want 1 to 10000", c.StatsMaxServices)
	case c.MaxBodyBytes <= 0:
		return fmt.Errorf("invalid value %d for flag --max_body_bytes: must be positive", c.MaxBodyBytes)
	case c.RegisterInterval >= c.RegisterTTL:
		return fmt.Errorf("invalid value %s for flag --register_interval: must be shorter than --register_ttl (%s)", c.RegisterInterval, c.RegisterTTL)
	case (c.ServerName == "") != (c.ServerAddress == ""):
		return errors.New("flags --server_name and --server_address go together")
	case c.HealthcheckURL != "" && c.ServerName == "":
		return errors.New("flag --healthcheck_url needs --server_name and --server_address")
	}
	if err := validateRegistry(c); err != nil {
		return err
	}
	switch c.Broker {
	case "memory":
		if c.BrokerAddress != "" {
			if _, port, err := splitHostPort(c.BrokerAddress); err != nil || port == 0 {
				return fmt.Errorf("invalid value %q for flag --broker_address: want host:port with a port", c.BrokerAddress)
			}
		}
	case "nats":
	default:
		return fmt.Errorf("invalid value %q for flag --broker: want memory or nats", c.Broker)
	}
	if err := c.validateNATS(); err != nil {
		return err
	}
	if c.ServerAddress != "" {
		if _, _, err := splitHostPort(c.ServerAddress); err != nil {
			return fmt.Errorf("invalid value %q for flag --server_address: %v", c.ServerAddress, err)
		}
	}
	if c.HealthcheckURL != "" {
		if err := checkHTTPURL(c.HealthcheckURL); err != nil {
			return fmt.Errorf("invalid value %q for flag --healthcheck_url: %v", c.HealthcheckURL, err)
		}
	}
	for _, o := range c.CORS {
		if o != "*" && !strings.Contains(o, "://") {
			return fmt.Errorf("invalid value %q for flag --cors: an origin is scheme://host[:port] or *", o)
		}
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// server wires the components together and owns the route table. Build it
// with newServer, run it with serve; Close releases what newServer built.
type server struct {
	cfg      *Config
	log      *slog.Logger
	started  time.Time
	registry *registryAPI
	rpc      *rpcHandler
	proxy    *proxyHandler
	broker   *broker
	peers    *peerBroker // pub/sub across sidecars sharing the registry
	nats     *natsBroker // pub/sub through NATS; nil unless --broker nats
	stats    *stats
	app      *appChecker // nil without --server_name
	tls      *tlsManager
	auth     *auth
	streams  *streams
	cors     corsPolicy
	via      *via           // this sidecar in the Via of what it forwards (client.go)
	mux      *http.ServeMux // the route table's (routes), for routePattern
	handler  http.Handler

	// draining is set when shutdown begins: /health fails readiness.
	draining atomic.Bool
}

func newServer(cfg *Config, logger *slog.Logger) (*server, error) {
	s := &server{
		cfg:     cfg,
		log:     logger,
		started: time.Now(),
		cors:    newCORSPolicy(cfg.CORS),
		via:     newVia(),
	}
	tlsm, err := newTLSManager(cfg, logger.With("component", "tls"))
	if err != nil {
		return nil, err
	}
	s.tls = tlsm
	if s.auth, err = newAuth(cfg, logger.With("component", "auth")); err != nil {
		return nil, err
	}
	s.streams = newStreams(s.cors)
	reg, err := newRegistry(cfg, logger.With("component", "registry"))
	if err != nil {
		return nil, err
	}
	s.registry = newRegistryAPI(reg, s.streams, cfg, logger.With("component", "registry"))
	clientTLS, err := clientTLSConfig(cfg)
	if err != nil {
		return nil, err
	}
	s.rpc = newRPCHandler(cfg, reg, clientTLS, s.via, logger.With("component", "rpc"))
	s.proxy = newProxyHandler(cfg, reg, s.streams, clientTLS, s.via, logger.With("component", "proxy"))
	s.broker = newBroker(cfg, s.streams, logger.With("component", "broker"))
	s.peers = newPeerBroker(cfg, reg, s.broker, clientTLS, logger.With("component", "broker"))
	if cfg.Broker == "nats" {
		s.nats, err = newNATSBroker(cfg, s.broker, logger.With("component", "nats"))
		if err != nil {
			reg.Close()
			return nil, err
		}
		s.broker.setRelay(s.nats)
	} else {
		s.broker.setForwarder(s.peers)
	}
	s.stats = newStats(cfg, logger.With("component", "stats"))
	s.stats.addSource(registrySizeSource(reg))
	s.stats.addSource(s.registry.metrics)
	s.stats.addSource(s.broker.metrics)
	s.stats.setTopics(s.broker.topicsJSON)
	s.stats.addSource(s.peers.metrics)
	if s.nats != nil {
		s.stats.addSource(s.nats.metrics)
	}
	s.stats.addSource(s.rpc.metrics)
	s.stats.addSource(s.proxy.metrics)
	s.stats.addUpstreams(s.rpc.upstreams, s.proxy.upstreams)
	s.stats.addSource(s.via.metrics)
	s.stats.addSource(s.auth.metrics)
	s.stats.addSource(s.tls.metrics)
	if cfg.ServerName != "" {
		app, err := newAppChecker(cfg, reg, logger.With("component", "health"))
		if err != nil {
			reg.Close()
			return nil, err
		}
		s.app = app
	}
	// Outermost first: the TLS guard, then counting (so refused requests
	// count too), then CORS and auth, then the route table.
	s.handler = s.tls.guard(s.stats.wrap(s.middleware(s.routes())))
	return s, nil
}

// route is one row of the route table.
type route struct {
	pattern string // "METHOD /path", as http.ServeMux reads it
	handler http.HandlerFunc
}

// routes is the route table: every endpoint of the sidecar, in one place.
// Its rows match only clean paths: a path that is not (//x, /./x, /a/../b)
// goes to the row "/", the handler of the paths the sidecar does not own,
// which forwards it as it came or refuses it (see cleanFront). No other
// pattern may end in a slash: the mux would redirect /x to /x/.
func (s *server) routes() http.Handler {
	table := []route{
		{"GET /health", s.handleHealth},
		{"GET /registry", s.registry.handleGet},
		{"POST /registry", s.registry.handleRegister},
		{"DELETE /registry", s.registry.handleDeregister},
		{"POST /rpc", s.rpc.handleRPC},
		{"POST /broker", s.broker.handlePublish},
		{"GET /broker", s.broker.handleSubscribe},
		{"POST /broker/deliver", s.peers.handleDeliver},
		{"GET /stats", s.stats.handleStats},
		{"GET /metrics", s.stats.handleMetrics},
		{"/", s.handleRoot},
	}
	mux := http.NewServeMux()
	s.mux = mux
	allow := map[string][]string{} // path -> its methods; the paths the sidecar owns
	var root route
	for _, rt := range table {
		mux.HandleFunc(rt.pattern, rt.handler)
		if rt.pattern == "/" {
			root = rt
		}
		if method, path, ok := strings.Cut(rt.pattern, " "); ok {
			allow[path] = append(allow[path], method)
		}
	}
	// A known path with another method is a JSON 405, not the root handler.
	for path, methods := range allow {
		if path == "/" {
			continue
		}
		allowed := strings.Join(methods, ", ")
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allowed)
			writeError(w, http.StatusMethodNotAllowed, "method %s not allowed on %s; allowed: %s", r.Method, path, allowed)
		})
	}
	return cleanFront(mux, root, allow)
}

// cleanFront keeps the mux from redirecting. http.ServeMux answers a path
// that is not in canonical form with a text/html redirect to the cleaned
// path, which the sidecar never sends: a proxied path must reach the node
// byte for byte, and an error must be JSON. So a path the mux would clean
// goes to root (the route "/") without the mux, with root's pattern for
// the stats. CONNECT paths the mux does not clean either. So does a path
// that is none of owned (the paths of the table's other rows), which the
// mux would give root anyway: every proxied request or RPC by path, which
// the mux's lookup would cost a few allocations (it tries the path with a
// slash added). A path with an escape goes through the mux, which
// unescapes segments before it matches them (/heal%74h is /health).
func cleanFront(mux *http.ServeMux, root route, owned map[string][]string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.EscapedPath()
		if r.Method != http.MethodConnect && (canonicalPath(p) != p || owned[p] == nil && strings.IndexByte(p, '%') < 0) {
			r.Pattern = root.pattern
			root.handler(w, r)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// routePattern is the route template the route table serves r with (as
// cleanFront and the mux choose it), for the stats of a request the
// middleware answers itself: it counts under the route it asked for.
func (s *server) routePattern(r *http.Request) string {
	if p := r.URL.EscapedPath(); r.Method != http.MethodConnect && canonicalPath(p) != p {
		return "/"
	}
	_, pattern := s.mux.Handler(r)
	return pattern
}

// canonicalPath is the path http.ServeMux matches in place of p: without
// empty, "." and ".." segments, a trailing slash kept. It allocates only
// when p is not canonical.
func canonicalPath(p string) string {
	if p == "" {
		return "/"
	}
	if p[0] != '/' {
		p = "/" + p
	}
	np := path.Clean(p)
	if p[len(p)-1] == '/' && np != "/" {
		if len(p) == len(np)+1 && strings.HasPrefix(p, np) {
			return p
		}
		np += "/"
	}
	return np
}

// handleRoot serves every path the sidecar does not own: RPC by path, or
// the reverse proxy with --handler=proxy.
func (s *server) handleRoot(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Handler == "proxy" {
		s.proxy.handle(w, r)
		return
	}
	s.rpc.handlePath(w, r)
}

// middleware applies what every request goes through: CORS and auth.
func (s *server) middleware(next http.Handler) http.Handler {
	// A sidecar on loopback answers only to loopback names: a page whose
	// DNS name rebinds to 127.0.0.1 is then refused, as is its origin.
	// Over TLS the certificate already refuses a rebound name.
	loopback := listensOnLoopback(s.cfg.Address) && !s.cfg.EnableTLS && !s.cfg.EnableACME
	// What it answers itself is counted under the route asked for
	// (routePattern), not as unmatched.
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if loopback && !loopbackHost(r.Host) {
			r.Pattern = s.routePattern(r)
			writeError(w, http.StatusForbidden, "host %q is not this sidecar's: it listens on loopback (see --address)", r.Host)
			return
		}
		if s.cors.handle(w, r) {
			r.Pattern = s.routePattern(r)
			return // preflight answered, or a foreign page refused
		}
		if !strings.HasPrefix(r.URL.Path, "/") {
			// CONNECT host:port names no path: the mux would answer in
			// plain text. The sidecar is not a forward proxy.
			writeError(w, http.StatusMethodNotAllowed, "%s %s is not served: the sidecar is not a forward proxy", r.Method, r.RequestURI)
			return
		}
		if !publicPath(r) && !s.auth.allow(r) {
			r.Pattern = s.routePattern(r)
			if _, ok := bearerToken(r.Header); ok {
				w.Header().Set("WWW-Authenticate", `Bearer realm="sidecar", error="invalid_token"`) // RFC 6750, section 3.1
				writeError(w, http.StatusUnauthorized, "bearer token refused: it is not one the sidecar accepts")
				return
			}
			w.Header().Set("WWW-Authenticate", `Bearer realm="sidecar"`)
			writeError(w, http.StatusUnauthorized, "no bearer token: send Authorization: Bearer TOKEN")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// listensOnLoopback reports whether address binds a loopback host only.
func listensOnLoopback(address string) bool {
	host, _, err := net.SplitHostPort(address)
	return err == nil && host != "" && loopbackHost(host)
}

// publicPath reports whether r needs no token: /health, for probes, and
// the /stats page itself, a static shell whose data requests need the
// token (the page sends the one in its URL fragment, /stats#token=T).
func publicPath(r *http.Request) bool {
	return r.URL.Path == "/health" || (r.URL.Path == "/stats" && r.Method == http.MethodGet && !wantsJSON(r)) ||
		r.URL.Path == deliverPath // sidecars sign deliveries with a key instead (broker_peers.go)
}

// start begins the components' background work, until ctx ends or Close.
func (s *server) start(ctx context.Context) {
	s.tls.start(ctx)
	s.registry.reg.start(ctx)
	s.broker.start(ctx)
	s.peers.start(ctx)
	s.stats.start(ctx)
	if s.nats != nil {
		s.nats.start(ctx)
	}
	if s.app != nil {
		s.app.start(ctx)
	}
}

// serve runs the HTTP server on ln until ctx is cancelled, then shuts down:
// fail readiness, deregister the app, go on serving for --shutdown_delay
// (load balancers and orchestrators take a while to see /health fail and
// stop sending; requests they send meanwhile are served, not refused),
// stop accepting and drain requests, close streams, close components.
func (s *server) serve(ctx context.Context, ln net.Listener) error {
	// The components outlive ctx: the drain still looks services up,
	// deregisters the app and this sidecar's topics, and answers HTTP-01
	// challenges. Close ends them.
	s.start(context.WithoutCancel(ctx))
	hs := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	// Streams end as the drain begins: Shutdown would wait for proxied
	// event streams until the drain timeout. Close is idempotent.
	hs.RegisterOnShutdown(s.streams.Close)
	ln = jsonServerErrors(hs, ln) // net/http's own answers too (api.go)
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()

	var err error
	select {
	case err = <-errc:
		err = fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
		s.log.Info("shutting down", "delay", s.cfg.ShutdownDelay)
	}
	s.draining.Store(true)
	if s.app != nil {
		s.app.Close()                                // no heartbeat may register it again
		s.app.deregister(context.WithoutCancel(ctx)) // bounded by its own timeout
	}
	if err == nil && s.cfg.ShutdownDelay > 0 {
		t := time.NewTimer(s.cfg.ShutdownDelay)
		select {
		case <-t.C:
		case e := <-errc:
			err = fmt.Errorf("serve: %w", e)
		}
		t.Stop()
	}
	drain, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.ShutdownTimeout)
	defer cancel()
	if e := hs.Shutdown(drain); e != nil {
		s.log.Warn("drain incomplete", "err", e)
		hs.Close()
	}
	s.Close()
	return err
}

// Close ends the streams first (websockets use every component), then
// closes the components in reverse order of construction, each before
// what it uses: the app checker and the peers deregister before the
// registry closes. It waits for their goroutines and is idempotent.
func (s *server) Close() error {
	s.streams.Close()
	if s.app != nil {
		s.app.Close()
	}
	s.stats.Close()
	if s.nats != nil {
		s.nats.Close() // after the subscribers (streams): flushes their last publishes
	}
	s.peers.Close()
	s.broker.Close()
	s.proxy.Close()
	s.rpc.Close()
	err := s.registry.reg.Close()
	s.tls.Close()
	return err
}

// setAdvertise makes this sidecar reachable by the others at
// --broker_address, or at the address its listener is bound to; the peer
// broker registers it from start on. The registry refuses nodes at those
// addresses from then on. Call it once the listener is bound (run does,
// before serve starts the components). It fails, changing nothing, when
// --server_address is one of them: the app would be the sidecar itself,
// and every call to it a loop.
func (s *server) setAdvertise(bound net.Addr) error {
	advertised := s.cfg.BrokerAddress
	if s.nats != nil {
		advertised = "" // the NATS servers, not this sidecar
	}
	s.registry.setSelf(bound, advertised)
	if h, p, err := splitHostPort(s.cfg.ServerAddress); err == nil && s.registry.self.holds(h, p) {
		return fmt.Errorf("flag --server_address %s is this sidecar's own address (bound to %s): the app would be the sidecar, and calls to it would loop", s.cfg.ServerAddress, bound)
	}
	if s.nats != nil {
		return nil // NATS carries messages between sidecars
	}
	host, port := "", 0
	if s.cfg.BrokerAddress != "" {
		host, port, _ = splitHostPort(s.cfg.BrokerAddress) // validated by parseConfig
	} else if a, ok := bound.(*net.TCPAddr); ok {
		host, port = advertiseHost(a.IP), a.Port
	}
	s.peers.setAdvertise(host, port, s.tls.scheme() == "https")
	return nil
}
