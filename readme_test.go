package main

import (
	"os"
	"os/exec"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// readmeFlag is one flag named in a README code block.
type readmeFlag struct {
	name    string // without dashes or value: "registry_address"
	command string // the client command it is given to ("list"), or "" for the sidecar itself
	line    int    // 1-based line of the README
}

// readmeFlags returns the flags that README's code blocks give the sidecar:
// the flags of every shell line that runs it (sidecar ..., go run . ...,
// continued by a trailing backslash, up to a |, &, ;, redirection or
// comment) and the MICRO_ variables set before it; and every --flag and
// MICRO_ variable of a YAML block (a Kubernetes manifest, a Compose file),
// which name the sidecar's flags only. Code blocks are fenced (```) or
// indented by four spaces or a tab after a blank line.
func readmeFlags(markdown string) []readmeFlag {
	var out []readmeFlag
	for _, b := range codeBlocks(markdown) {
		if yamlBlock.MatchString(b.lines[0]) {
			for i, l := range b.lines {
				for _, m := range yamlFlag.FindAllStringSubmatch(l, -1) {
					out = append(out, readmeFlag{name: m[1], line: b.start + i})
				}
				for _, m := range microVar.FindAllStringSubmatch(l, -1) {
					out = append(out, readmeFlag{name: strings.ToLower(m[1]), line: b.start + i})
				}
			}
			continue
		}
		for i := 0; i < len(b.lines); i++ {
			start, line := i, b.lines[i]
			for strings.HasSuffix(line, "\\") && i+1 < len(b.lines) {
				i++
				line = strings.TrimSuffix(line, "\\") + " " + b.lines[i]
			}
			out = append(out, shellFlags(line, b.start+start)...)
		}
	}
	return out
}

var (
	yamlBlock = regexp.MustCompile(`^\s*[A-Za-z][\w.-]*:(\s|$)`) // a block that opens with a mapping key
	yamlFlag  = regexp.MustCompile(`(?:^|[\s"'\[,])--([a-z][a-z0-9_]*)`)
	microVar  = regexp.MustCompile(`\bMICRO_([A-Z0-9_]+)\b`)
	envAssign = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)
)

// codeBlock is a code block of a Markdown file.
type codeBlock struct {
	start int // 1-based line of its first line
	lines []string
}

func codeBlocks(markdown string) []codeBlock {
	var blocks []codeBlock
	lines := strings.Split(markdown, "\n")
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		switch {
		case strings.HasPrefix(strings.TrimSpace(l), "```"):
			b := codeBlock{start: i + 2}
			for i++; i < len(lines) && !strings.HasPrefix(strings.TrimSpace(lines[i]), "```"); i++ {
				b.lines = append(b.lines, lines[i])
			}
			if len(b.lines) > 0 {
				blocks = append(blocks, b)
			}
		case (strings.HasPrefix(l, "    ") || strings.HasPrefix(l, "\t")) && strings.TrimSpace(l) != "" && (i == 0 || strings.TrimSpace(lines[i-1]) == ""):
			b := codeBlock{start: i + 1}
			for ; i < len(lines) && (strings.HasPrefix(lines[i], "    ") || strings.HasPrefix(lines[i], "\t") || strings.TrimSpace(lines[i]) == ""); i++ {
				b.lines = append(b.lines, strings.TrimPrefix(strings.TrimPrefix(lines[i], "\t"), "    "))
			}
			i--
			for len(b.lines) > 0 && strings.TrimSpace(b.lines[len(b.lines)-1]) == "" {
				b.lines = b.lines[:len(b.lines)-1]
			}
			blocks = append(blocks, b)
		}
	}
	return blocks
}

// shellFlags returns the flags of every sidecar run on one shell line.
func shellFlags(line string, lineNo int) []readmeFlag {
	var out []readmeFlag
	words := shellWords(line)
	for i := 0; i < len(words); {
		// A command starts here: variables, then the program.
		var env []string
		for ; i < len(words) && !words[i].op && envAssign.MatchString(words[i].text); i++ {
			env = append(env, words[i].text)
		}
		var args []string
		isSidecar := false
		switch {
		case i < len(words) && !words[i].op && (words[i].text == "sidecar" || strings.HasSuffix(words[i].text, "/sidecar")):
			isSidecar, i = true, i+1
		case i+2 < len(words) && words[i].text == "go" && words[i+1].text == "run" && words[i+2].text == ".":
			isSidecar, i = true, i+3
		}
		for ; i < len(words) && !words[i].op; i++ {
			args = append(args, words[i].text)
		}
		for ; i < len(words) && words[i].op; i++ {
			if words[i].text == "<" || words[i].text == ">" {
				i++ // the file name
			}
		}
		if !isSidecar {
			continue
		}
		command := ""
		if c := cliCommandIndex(args); c >= 0 {
			command = args[c]
		}
		for _, kv := range env {
			if m := microVar.FindStringSubmatch(kv); m != nil && strings.HasPrefix(kv, "MICRO_") {
				out = append(out, readmeFlag{name: strings.ToLower(m[1]), command: command, line: lineNo})
			}
		}
		for _, a := range args {
			if len(a) < 2 || a[0] != '-' || a == "--" {
				continue
			}
			name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
			out = append(out, readmeFlag{name: name, command: command, line: lineNo})
		}
	}
	return out
}

// shellWord is a word of a shell line, or an operator (| & ; < > and their
// doubles).
type shellWord struct {
	text string
	op   bool
}

// shellWords splits a shell line into words and operators, with quotes
// and backslashes as sh reads them, up to a comment.
func shellWords(line string) []shellWord {
	var words []shellWord
	var cur strings.Builder
	inWord := false
	flush := func() {
		if inWord {
			words = append(words, shellWord{text: cur.String()})
			cur.Reset()
			inWord = false
		}
	}
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == '\'':
			j := strings.IndexByte(line[i+1:], '\'')
			if j < 0 {
				j = len(line) - i - 1
			}
			cur.WriteString(line[i+1 : i+1+j])
			inWord, i = true, i+1+j
		case c == '"':
			for i++; i < len(line) && line[i] != '"'; i++ {
				if line[i] == '\\' && i+1 < len(line) {
					i++
				}
				cur.WriteByte(line[i])
			}
			inWord = true
		case c == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
			inWord = true
		case c == '#' && !inWord:
			flush()
			return words
		case c == ' ' || c == '\t':
			flush()
		case strings.IndexByte("|&;<>", c) >= 0:
			flush()
			op := string(c)
			if i+1 < len(line) && line[i+1] == c {
				op, i = op+op, i+1
			}
			words = append(words, shellWord{text: op, op: true})
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	flush()
	return words
}

func TestReadmeFlagsParsed(t *testing.T) {
	t.Parallel()
	md := strings.Join([]string{
		"Text with `--not_code`.",
		"",
		"    curl --cacert ca.pem http://x # --nor_this",
		"    MICRO_ADDRESS=:8081 sidecar --registry consul \\",
		"      --registry_address=h:8500 & sidecar --proxy_address h:1 list services --json",
		"    echo '{}' | sidecar call s M - < in.json # --comment",
		"    go run . -enable_stats",
		"",
		"```yaml",
		"spec:",
		"  args: [\"--auth_token_file=/t\", --shutdown_delay=5s]",
		"  env:",
		"    - name: MICRO_BROKER",
		"```",
		"",
		"```sh",
		"sidecar subscribe 'a --quoted' --queue q",
		"```",
	}, "\n")
	got := readmeFlags(md)
	want := []readmeFlag{
		{"address", "", 4}, {"registry", "", 4}, {"registry_address", "", 4},
		{"proxy_address", "list", 4}, {"json", "list", 4},
		{"enable_stats", "", 7},
		{"auth_token_file", "", 11}, {"shutdown_delay", "", 11}, {"broker", "", 13},
		{"queue", "subscribe", 17},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("readmeFlags =\n%v\nwant\n%v", got, want)
	}
}

// TestReadmeFlagsExist holds every flag that README's code blocks give the
// sidecar (its own, and each client command's) to what the built binary's
// --help lists. Nothing is exempt: a flag in README that the binary does
// not have fails.
func TestReadmeFlagsExist(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	flags := readmeFlags(string(b))
	helps := map[string]map[string]bool{} // command ("" for the sidecar) -> flag names
	known := func(command string) map[string]bool {
		if h, ok := helps[command]; ok {
			return h
		}
		args := []string{"--help"}
		if command != "" {
			args = []string{command, "--help"}
		}
		out, _ := exec.Command(sidecarBinary(t), args...).CombinedOutput() // help exits 0 or 2 by command
		h := map[string]bool{"h": true, "help": true}
		for _, m := range regexp.MustCompile(`(?m)^\s+-([a-z][a-z0-9_]*)\b`).FindAllStringSubmatch(string(out), -1) {
			h[m[1]] = true
		}
		if len(h) < 3 {
			t.Fatalf("sidecar %q lists no flags:\n%s", args, out)
		}
		helps[command] = h
		return h
	}
	sidecarFlags := 0
	for _, f := range flags {
		if f.command == "help" {
			continue
		}
		if f.command == "" {
			sidecarFlags++
		}
		if !known(f.command)[f.name] {
			where := "sidecar --help"
			if f.command != "" {
				where = "sidecar " + f.command + " --help"
			}
			t.Errorf("README.md:%d names --%s, which %s does not list", f.line, f.name, where)
		}
	}
	t.Logf("%d flags in README code blocks, %d of them the sidecar's own", len(flags), sidecarFlags)
	// The parser must find the examples it is meant to hold: the TLS,
	// Consul and Deploy sections alone name more than this.
	if sidecarFlags < 40 {
		t.Errorf("found only %d sidecar flags in README code blocks; is the parser broken?", sidecarFlags)
	}
}
