"""QEMU's JSON dialect for QMP: its lexer, streamer and parser, and its writer.

A client tested on the lab must meet the same answers as on QEMU 7.2, malformed input included,
so this follows QEMU's three stages (qobject/json-lexer.c, json-streamer.c, json-parser.c):

- the lexer cuts bytes into tokens. Beyond RFC 8259 it takes single-quoted strings (`'a"b'`,
  with `\\'`), and it rejects what RFC 8259 rejects: control characters and the bytes 0xFE/0xFF
  in strings, leading zeros, `NaN`. A bad byte ends its token as an error token; the lexer then
  skips input up to a structural character or a control character (QEMU's recovery), so one
  bad text yields the same number of error answers as on QEMU;
- the streamer counts braces and brackets and hands a complete value to the parser, or an error
  when nesting passes 1024 or the text grows too long;
- the parser reports the first error only, in QEMU's words ("JSON parse error, expecting value").

Integers become Python ints when they fit int64 or uint64, like QEMU's QNum; others are floats.
`dumps` writes as QEMU does: `", "` and `": "` separators, `\\uXXXX` in upper case for anything
outside printable ASCII, doubles as `%.17g`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

MAX_TOKEN_SIZE = 1 << 20  # QEMU allows 64 MiB; a lab host keeps its memory small (docs/internals.md)
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10
INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1
# The parser and writer recurse once per level (a few frames each); QEMU takes 1024 levels, so
# Python's default limit of 1000 frames must grow. Python-to-Python calls use no C stack (3.11+).
sys.setrecursionlimit(max(sys.getrecursionlimit(), 8 * MAX_NESTING))


class Tok(Enum):
    LCURLY = "{"
    RCURLY = "}"
    LSQUARE = "["
    RSQUARE = "]"
    COLON = ":"
    COMMA = ","
    INTEGER = "integer"
    FLOAT = "float"
    KEYWORD = "keyword"
    STRING = "string"
    ERROR = "error"


@dataclass(frozen=True)
class Token:
    kind: Tok
    text: bytes


STRUCTURAL = {ord(c): Tok(c) for c in "{}[]:,"}
_STRUCT_TOKENS = {c: Token(kind, bytes([c])) for c, kind in STRUCTURAL.items()}  # shared, immutable
WHITESPACE = b" \t\r\n"
DIGITS = b"0123456789"
KEYWORD = re.compile(rb"[a-z]+")
# A run of string characters QEMU's lexer passes without a decision (not the quote, not a backslash).
_PLAIN = {q: re.compile(rb"[^\x00-\x1f\xfe\xff\\" + q + rb"]+") for q in (b'"', b"'")}


class Lexer:
    """Bytes in, tokens out, across any chunking. A token that may still grow waits for more."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.recovering = False

    def feed(self, data: bytes) -> Iterator[Token]:
        self.buf += data
        buf = self.buf
        pos = 0
        n = len(buf)
        while pos < n:
            if self.recovering:
                # skip up to a structural character, a control character other than tab, or 0xFE/0xFF
                c = buf[pos]
                if c in STRUCTURAL or (c < 0x20 and c != 0x09) or c >= 0xFE:
                    self.recovering = False
                else:
                    pos += 1
                continue
            c = buf[pos]
            if c in WHITESPACE:
                pos += 1
                continue
            token = _STRUCT_TOKENS.get(c)
            if token is not None:
                yield token
                pos += 1
                continue
            end, kind = self._token(buf, pos)
            if end is None:
                break  # incomplete: wait for more bytes
            if kind is Tok.ERROR:
                self.recovering = True
            yield Token(kind, bytes(buf[pos:end]))
            pos = end
        del buf[:pos]
        if len(buf) > MAX_TOKEN_SIZE:  # one unfinished token beyond the limit: give up on it
            text = bytes(buf[:40])
            buf.clear()
            self.recovering = True
            yield Token(Tok.ERROR, text)

    def _token(self, buf: bytearray, pos: int) -> tuple[int | None, Tok]:
        """(end, kind) of the token at pos, or (None, _) when more bytes are needed."""
        c = buf[pos]
        if c in b"\"'":
            return self._string(buf, pos)
        if c == 0x2D or c in DIGITS:  # '-' or a digit
            return self._number(buf, pos)
        if 0x61 <= c <= 0x7A:
            m = KEYWORD.match(buf, pos)
            assert m is not None
            return self._terminal(buf, m.end(), Tok.KEYWORD)
        return pos + 1, Tok.ERROR  # anything else cannot start a token

    @staticmethod
    def _terminal(buf: bytearray, end: int, kind: Tok) -> tuple[int | None, Tok]:
        """A token that ends at `end` if the next byte is ASCII (looked at, not consumed)."""
        if end == len(buf):
            return None, kind
        return (end, kind) if buf[end] < 0x80 else (end + 1, Tok.ERROR)

    def _string(self, buf: bytearray, pos: int) -> tuple[int | None, Tok]:
        quote = buf[pos]
        plain = _PLAIN[bytes([quote])]
        i = pos + 1
        n = len(buf)
        while True:
            m = plain.match(buf, i)
            if m:
                i = m.end()
            if i >= n:
                return None, Tok.STRING
            c = buf[i]
            if c == quote:
                return i + 1, Tok.STRING
            if c == 0x5C:  # backslash: any byte 0x20..0xFD may follow (the parser judges it)
                if i + 1 >= n:
                    return None, Tok.STRING
                if not 0x20 <= buf[i + 1] <= 0xFD:
                    return i + 2, Tok.ERROR
                i += 2
                continue
            return i + 1, Tok.ERROR  # a control character or 0xFE/0xFF

    def _number(self, buf: bytearray, pos: int) -> tuple[int | None, Tok]:
        n = len(buf)
        i = pos
        if buf[i] == 0x2D:
            i += 1
            if i >= n:
                return None, Tok.INTEGER
            if buf[i] not in DIGITS:
                return i + 1, Tok.ERROR
        if buf[i] == 0x30:  # zero: no digit may follow
            i += 1
            if i >= n:
                return None, Tok.INTEGER
            if buf[i] in DIGITS:
                return i + 1, Tok.ERROR
            if buf[i] != 0x2E:
                return self._terminal(buf, i, Tok.INTEGER)
        else:
            while i < n and buf[i] in DIGITS:
                i += 1
            if i >= n:
                return None, Tok.INTEGER
            if buf[i] not in b".eE":
                return self._terminal(buf, i, Tok.INTEGER)
        if buf[i] == 0x2E:  # a fraction needs a digit
            i += 1
            if i >= n:
                return None, Tok.FLOAT
            if buf[i] not in DIGITS:
                return i + 1, Tok.ERROR
            while i < n and buf[i] in DIGITS:
                i += 1
            if i >= n:
                return None, Tok.FLOAT
            if buf[i] not in b"eE":
                return self._terminal(buf, i, Tok.FLOAT)
        i += 1  # the exponent's e/E
        if i >= n:
            return None, Tok.FLOAT
        if buf[i] in b"+-":
            i += 1
            if i >= n:
                return None, Tok.FLOAT
        if buf[i] not in DIGITS:
            return i + 1, Tok.ERROR
        while i < n and buf[i] in DIGITS:
            i += 1
        return self._terminal(buf, i, Tok.FLOAT)


class ParseError(Exception):
    """A sentence QEMU would answer with (class GenericError)."""


@dataclass
class Parsed:
    value: Any = None
    error: str | None = None


class Streamer:
    """Tokens to complete values, as QEMU's json-streamer groups them."""

    def __init__(self) -> None:
        self.lexer = Lexer()
        self._reset()

    def _reset(self) -> None:
        self.tokens: list[Token] = []
        self.braces = self.brackets = 0
        self.size = 0

    def feed(self, data: bytes) -> Iterator[Parsed]:
        for token in self.lexer.feed(data):
            out = self._token(token)
            if out is not None:
                yield out

    def _token(self, token: Token) -> Parsed | None:
        kind = token.kind
        if kind is Tok.ERROR:
            self._reset()
            return Parsed(error=f"JSON parse error, stray '{_text(token.text)}'")
        braces, brackets = _DEPTH.get(kind, (0, 0))
        self.braces += braces
        self.brackets += brackets
        error = None
        if self.size + len(token.text) + 1 > MAX_TOKEN_SIZE:
            error = "JSON token size limit exceeded"
        elif len(self.tokens) + 1 > MAX_TOKEN_COUNT:
            error = "JSON token count limit exceeded"
        elif self.braces + self.brackets > MAX_NESTING:
            error = "JSON nesting depth limit exceeded"
        if error is not None:
            self._reset()
            return Parsed(error=error)
        self.tokens.append(token)
        self.size += len(token.text)
        if (self.braces > 0 or self.brackets > 0) and self.braces >= 0 and self.brackets >= 0:
            return None
        tokens = self.tokens
        self._reset()
        try:
            return Parsed(value=Parser(tokens).parse())
        except ParseError as exc:
            return Parsed(error=f"JSON parse error, {exc}")


_DEPTH = {Tok.LCURLY: (1, 0), Tok.RCURLY: (-1, 0), Tok.LSQUARE: (0, 1), Tok.RSQUARE: (0, -1)}


def _text(raw: bytes) -> str:
    """A token as QEMU prints it: up to a NUL byte, invalid UTF-8 replaced."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class Parser:
    """One value from its tokens; the first error wins, as in QEMU's parse_error()."""

    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def parse(self) -> Any:
        return self._value()

    def _peek(self) -> Token:
        if self.pos >= len(self.tokens):
            raise ParseError("premature EOI")
        return self.tokens[self.pos]

    def _pop(self) -> Token:
        token = self._peek()
        self.pos += 1
        return token

    def _value(self) -> Any:
        token = self._peek()
        kind = token.kind
        if kind is Tok.LCURLY:
            return self._object()
        if kind is Tok.LSQUARE:
            return self._array()
        if kind is Tok.STRING:
            self.pos += 1
            return parse_string(token.text)
        if kind in (Tok.INTEGER, Tok.FLOAT):
            self.pos += 1
            return _number(token)
        if kind is Tok.KEYWORD:
            self.pos += 1
            word = token.text.decode("ascii")
            if word in ("true", "false", "null"):
                return {"true": True, "false": False, "null": None}[word]
            raise ParseError(f"invalid keyword '{word}'")
        raise ParseError("expecting value")

    def _object(self) -> dict[str, Any]:
        self._pop()
        out: dict[str, Any] = {}
        if self._peek().kind is Tok.RCURLY:
            self._pop()
            return out
        self._pair(out)
        token = self._pop()
        while token.kind is not Tok.RCURLY:
            if token.kind is not Tok.COMMA:
                raise ParseError("expected separator in dict")
            self._pair(out)
            token = self._pop()
        return out

    def _pair(self, out: dict[str, Any]) -> None:
        self._peek()
        key = self._value()
        if not isinstance(key, str):
            raise ParseError("key is not a string in object")
        if self._pop().kind is not Tok.COLON:
            raise ParseError("missing : in object pair")
        value = self._value()
        if key in out:
            raise ParseError("duplicate key")
        out[key] = value

    def _array(self) -> list[Any]:
        self._pop()
        out: list[Any] = []
        if self._peek().kind is Tok.RSQUARE:
            self._pop()
            return out
        out.append(self._value())
        token = self._pop()
        while token.kind is not Tok.RSQUARE:
            if token.kind is not Tok.COMMA:
                raise ParseError("expected separator in list")
            out.append(self._value())
            token = self._pop()
        return out


def _number(token: Token) -> int | float:
    text = token.text.decode("ascii")
    if token.kind is Tok.INTEGER:
        whole = int(text)
        if INT64_MIN <= whole <= UINT64_MAX:
            return whole
    value = float(text)  # beyond 64 bits QEMU keeps a double, as strtod reads it
    if value in (float("inf"), float("-inf")):
        # QEMU would echo such an id as `inf`, which no JSON reader takes: refused instead
        raise ParseError(f"number {text} is out of range")
    return value


_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
            ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}


def parse_string(raw: bytes) -> str:
    """A string token's value (raw includes its quotes), with QEMU's checks of escapes and UTF-8."""
    body = raw[1:-1]
    if b"\\" not in body:
        return _utf8(body)
    out: list[str] = []
    i = 0
    n = len(body)
    while i < n:
        j = body.find(b"\\", i)
        if j < 0:
            out.append(_utf8(body[i:]))
            break
        out.append(_utf8(body[i:j]))
        esc = body[j + 1]
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            i = j + 2
            continue
        if esc != ord("u"):
            raise ParseError("invalid escape sequence in string")
        cp = _hex4(body, j + 2)
        end = j + 6
        if 0xD800 <= cp <= 0xDBFF and body[end:end + 2] == b"\\u":
            trailing = _hex4(body, end + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
                end += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            shown = (body[j:end] + raw[-1:])[:end - j]  # as QEMU prints it: the closing quote may show
            raise ParseError(f"{_text(shown)} is not a valid Unicode character")
        out.append(chr(cp))
        i = end
    return "".join(out)


def _hex4(body: bytes, at: int) -> int:
    digits = body[at:at + 4]
    if len(digits) < 4 or not all(chr(d) in "0123456789abcdefABCDEF" for d in digits):
        return -1
    return int(digits, 16)


def _valid_codepoint(cp: int) -> bool:
    """QEMU's is_valid_codepoint(): no surrogates, no noncharacters, nothing beyond U+10FFFF."""
    return (0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF and not 0xFDD0 <= cp <= 0xFDEF
            and cp & 0xFFFE != 0xFFFE)


_NONCHARACTER = re.compile("[\ufdd0-\ufdef\ufffe\uffff\U0001fffe\U0001ffff\U0002fffe\U0002ffff"
                           "\U0003fffe\U0003ffff\U0004fffe\U0004ffff\U0005fffe\U0005ffff\U0006fffe"
                           "\U0006ffff\U0007fffe\U0007ffff\U0008fffe\U0008ffff\U0009fffe\U0009ffff"
                           "\U000afffe\U000affff\U000bfffe\U000bffff\U000cfffe\U000cffff\U000dfffe"
                           "\U000dffff\U000efffe\U000effff\U000ffffe\U000fffff\U0010fffe\U0010ffff]")


def _utf8(raw: bytes) -> str:
    try:
        text = raw.replace(b"\xc0\x80", b"\0").decode("utf-8")  # modified UTF-8 spells U+0000 so
    except UnicodeDecodeError:
        raise ParseError("invalid UTF-8 sequence in string") from None
    if _NONCHARACTER.search(text):
        raise ParseError("invalid UTF-8 sequence in string")
    return text


# --- the writer ---------------------------------------------------------------------------------

_SAFE = re.compile(r'[ !#-\[\]-~]*')  # printable ASCII without '"' and '\'
_WRITE_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _string_out(text: str) -> str:
    if _SAFE.fullmatch(text):
        return f'"{text}"'
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch in _WRITE_ESCAPES:
            out.append(_WRITE_ESCAPES[ch])
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def dumps(obj: Any) -> str:
    """JSON as QEMU's json-writer writes it."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        return f"{obj:.17g}"  # C printf %.17g, as QEMU writes a double
    if isinstance(obj, str):
        return _string_out(obj)
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{_string_out(str(k))}: {dumps(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(dumps(v) for v in obj) + "]"
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
