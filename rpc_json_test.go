package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// jsonSeeds are texts at the edges of JSON's grammar.
var jsonSeeds = []string{
	``, ` `, `{}`, `[]`, `{"a":1}`, ` {"a" : [1, 2.5e-3, -0, true, false, null, "x"]} `,
	`{"id":1,"result":{"msg":"hi"},"error":null}`, `"\u00e9\n\"\\/"`, `"\u12"`, `"\x"`, "\"\x01\"",
	`01`, `-`, `-0.`, `1.e5`, `1e`, `1e+`, `1E-7`, `.5`, `+1`, `tru`, `truex`, `nul`, `[1,]`, `{"a":}`,
	`{"a" 1}`, `{,}`, `[1 2]`, `{"a":1,}`, `{1:2}`, `[`, `]`, `{"a":[}`, `"abc`, "\"\xff\xfe\"",
	strings.Repeat("[", 64) + strings.Repeat("]", 64), strings.Repeat("[", 65) + strings.Repeat("]", 65),
	strings.Repeat(`{"a":`, 100) + "1" + strings.Repeat("}", 100), strings.Repeat("[", 10001) + strings.Repeat("]", 10001),
	`{"Result":1,"ID":"7","ERROR":"x"}`, `{"id":1,"id":2}`, `{"re\u0073ult":1}`,
}

// FuzzValidJSON: validJSON accepts exactly what json.Valid accepts.
func FuzzValidJSON(f *testing.F) {
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := validJSON(b), json.Valid(b); got != want {
			t.Fatalf("validJSON(%q) = %v, json.Valid = %v", b, got, want)
		}
	})
}

// FuzzJSONMembers: for an object whose member names are plain, the
// members jsonMembers finds are the ones encoding/json decodes (the last
// of duplicates), with the same raw values; and parseReply reads a reply
// as json.Unmarshal into an rpcReply does, whatever the names.
func FuzzJSONMembers(f *testing.F) {
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var want rpcReply
		wantOK := json.Unmarshal(b, &want) == nil
		got, ok := parseReply(b)
		if ok != wantOK || !bytes.Equal(got.ID, want.ID) || !bytes.Equal(got.Result, want.Result) || !bytes.Equal(got.Error, want.Error) ||
			(got.ID == nil) != (want.ID == nil) || (got.Result == nil) != (want.Result == nil) || (got.Error == nil) != (want.Error == nil) {
			t.Fatalf("parseReply(%q) = %+v, %v; json.Unmarshal = %+v, %v", b, got, ok, want, wantOK)
		}
		if !validJSON(b) {
			return
		}
		m, isObject := members(b)
		var all map[string]json.RawMessage
		if err := json.Unmarshal(b, &all); (err == nil) != isObject {
			t.Fatalf("members(%q) object = %v, json.Unmarshal into a map: %v", b, isObject, err)
		}
		if !isObject {
			return
		}
		seen := map[string][]byte{}
		for key, value, ok := m.next(); ok; key, value, ok = m.next() {
			if !plainKey(key) {
				return
			}
			seen[string(key)] = value
		}
		if len(seen) != len(all) {
			t.Fatalf("members(%q) found %d names, encoding/json %d", b, len(seen), len(all))
		}
		for k, v := range all {
			if !bytes.Equal(seen[k], v) {
				t.Fatalf("members(%q)[%q] = %q, encoding/json %q", b, k, seen[k], v)
			}
		}
	})
}

// FuzzDecodeRPCForm: the JSON form of POST /rpc decodes as decodeJSON
// (encoding/json) decodes it: the same fields, or an error for the same
// bodies.
func FuzzDecodeRPCForm(f *testing.F) {
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	for _, s := range []string{
		`{"service":"go.micro.srv.a","method":"A.B","request":{"x":1}}`, `{"Service":"s","ENDPOINT":"e","request":"{\"a\":1}"}`,
		`{"service":5}`, `{"service":null,"method":"m"}`, `{"service":"s","service":"t"}`, `{"service":"\u0073"}`, `{"address":"h:1","request":null}`,
		`{"service":"é"}`, `[1]`, `null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var want rpcForm
		wantErr := decodeJSON(b, &want)
		got, err := decodeRPCForm(b)
		if (err == nil) != (wantErr == nil) {
			t.Fatalf("decodeRPCForm(%q) error %v; decodeJSON %v", b, err, wantErr)
		}
		if err != nil {
			if err.Error() != wantErr.Error() {
				t.Fatalf("decodeRPCForm(%q) error %q; decodeJSON %q", b, err, wantErr)
			}
			return
		}
		if got.Service != want.Service || got.Method != want.Method || got.Endpoint != want.Endpoint || got.Address != want.Address || !bytes.Equal(got.Request, want.Request) {
			t.Fatalf("decodeRPCForm(%q) = %+v; decodeJSON %+v", b, got, want)
		}
	})
}

// BenchmarkValidJSON compares validJSON with json.Valid on a JSON-RPC
// reply.
func BenchmarkValidJSON(b *testing.B) {
	reply := []byte(`{"jsonrpc":"2.0","id":12345,"result":{"msg":"hello from the rpc benchmark backend","n":[1,2,3]}}`)
	b.Run("validJSON", func(b *testing.B) {
		b.SetBytes(int64(len(reply)))
		for b.Loop() {
			validJSON(reply)
		}
	})
	b.Run("json.Valid", func(b *testing.B) {
		b.SetBytes(int64(len(reply)))
		for b.Loop() {
			json.Valid(reply)
		}
	})
}
