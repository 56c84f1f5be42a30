package main

// rpc_json.go reads the JSON of RPC in place, without encoding/json's
// reflection and copies: it checks a text is JSON (validJSON) and walks
// the members of an object (jsonMembers), for the JSON form of POST /rpc
// and the backends' replies. Written by hand, so fenced:
//
//   - validJSON accepts exactly what json.Valid accepts: RFC 8259 JSON,
//     strings checked for escapes and control bytes but not for UTF-8,
//     nesting up to json.Valid's own limit (deeper than 64 it asks
//     json.Valid). FuzzValidJSON checks it against json.Valid.
//   - jsonMembers and the skip functions assume a text validJSON accepted:
//     they do not check as they go. FuzzJSONMembers checks that the
//     members they find are those encoding/json decodes, for names
//     without escapes.
//   - A member name is compared as written; one with an escape or a
//     non-ASCII byte (which encoding/json unescapes and folds by Unicode
//     rules) is plainKey false, and the callers then decode the whole
//     text with encoding/json.

import "encoding/json"

// validJSON reports whether b is one JSON value, as json.Valid does, a
// few times faster and without allocating.
func validJSON(b []byte) bool {
	var stack [64]byte // the open containers, '{' or '['
	depth := 0
	i := skipSpace(b, 0)
	for {
		// A value starts at i.
		if i >= len(b) {
			return false
		}
		switch c := b[i]; c {
		case '{', '[':
			if depth == len(stack) {
				return json.Valid(b)
			}
			stack[depth] = c
			depth++
			if i = skipSpace(b, i+1); i < len(b) && b[i] == c+2 { // '}' is '{'+2, ']' is '['+2
				depth--
				i++
				break
			}
			if c == '{' {
				if i = scanKey(b, i); i < 0 {
					return false
				}
			}
			continue
		case '"':
			if i = scanString(b, i); i < 0 {
				return false
			}
		case 't':
			if i = scanLiteral(b, i, "true"); i < 0 {
				return false
			}
		case 'f':
			if i = scanLiteral(b, i, "false"); i < 0 {
				return false
			}
		case 'n':
			if i = scanLiteral(b, i, "null"); i < 0 {
				return false
			}
		default:
			if i = scanNumber(b, i); i < 0 {
				return false
			}
		}
		// After a value: a comma and the next value, or the ends of
		// containers, or the end of the text.
		for {
			i = skipSpace(b, i)
			if depth == 0 {
				return i == len(b)
			}
			if i >= len(b) {
				return false
			}
			if b[i] == ',' {
				i = skipSpace(b, i+1)
				if stack[depth-1] == '{' {
					if i = scanKey(b, i); i < 0 {
						return false
					}
				}
				break
			}
			if b[i] != stack[depth-1]+2 {
				return false
			}
			depth--
			i++
		}
	}
}

// scanKey reads a member name and its colon at b[i:], returning where the
// value starts (after spaces), or -1.
func scanKey(b []byte, i int) int {
	if i >= len(b) || b[i] != '"' {
		return -1
	}
	if i = scanString(b, i); i < 0 {
		return -1
	}
	if i = skipSpace(b, i); i >= len(b) || b[i] != ':' {
		return -1
	}
	return skipSpace(b, i+1)
}

// scanString reads the string that opens at b[i], returning the index
// after it, or -1.
func scanString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			return i + 1
		case c < 0x20:
			return -1
		case c == '\\':
			if i++; i >= len(b) {
				return -1
			}
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(b) {
					return -1
				}
				for _, h := range b[i+1 : i+5] {
					if !('0' <= h && h <= '9' || 'a' <= h && h <= 'f' || 'A' <= h && h <= 'F') {
						return -1
					}
				}
				i += 4
			default:
				return -1
			}
		}
	}
	return -1
}

// scanNumber reads the number at b[i:] (RFC 8259 section 6), returning
// the index after it, or -1.
func scanNumber(b []byte, i int) int {
	digits := func(i int) int {
		for i < len(b) && '0' <= b[i] && b[i] <= '9' {
			i++
		}
		return i
	}
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && '1' <= b[i] && b[i] <= '9':
		i = digits(i)
	default:
		return -1
	}
	if i < len(b) && b[i] == '.' {
		if j := digits(i + 1); j > i+1 {
			i = j
		} else {
			return -1
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if j := digits(i); j > i {
			i = j
		} else {
			return -1
		}
	}
	return i
}

// scanLiteral reads lit (true, false, null) at b[i:], returning the index
// after it, or -1.
func scanLiteral(b []byte, i int, lit string) int {
	if len(b)-i < len(lit) || string(b[i:i+len(lit)]) != lit {
		return -1
	}
	return i + len(lit)
}

// jsonMembers iterates over the members of a JSON object text without
// decoding or copying them: each member's name as written between the
// quotes (escapes not decoded) and its value's text. The text must be
// valid JSON (json.Valid). It does not allocate.
type jsonMembers struct {
	b []byte
	i int // where the next member's name starts; -1 after the last
}

// members starts iterating over the object b; false when b is not an
// object.
func members(b []byte) (jsonMembers, bool) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return jsonMembers{i: -1}, false
	}
	if i = skipSpace(b, i+1); b[i] == '}' {
		i = -1
	}
	return jsonMembers{b: b, i: i}, true
}

// next returns the next member; ok is false after the last.
func (m *jsonMembers) next() (key, value []byte, ok bool) {
	b, i := m.b, m.i
	if i < 0 {
		return nil, nil, false
	}
	end := skipString(b, i)
	key = b[i+1 : end-1]
	i = skipSpace(b, skipSpace(b, end)+1) // past the colon
	end = skipValue(b, i)
	value = b[i:end]
	if i = skipSpace(b, end); b[i] == '}' {
		m.i = -1
	} else {
		m.i = skipSpace(b, i+1) // past the comma
	}
	return key, value, true
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index after the string that opens at b[i].
func skipString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(b)
}

// skipValue returns the index after the value that starts at b[i].
func skipValue(b []byte, i int) int {
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		depth := 0
		for ; i < len(b); i++ {
			switch b[i] {
			case '"':
				i = skipString(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
		return len(b)
	}
	for ; i < len(b); i++ {
		switch b[i] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			return i
		}
	}
	return i
}

// plainKey reports whether a member name as written is ASCII without
// escapes, which compares with a field name as encoding/json compares
// it, by ASCII case folding.
func plainKey(key []byte) bool {
	for _, c := range key {
		if c == '\\' || c >= 0x80 {
			return false
		}
	}
	return true
}
