"""Strings that came from a host, made safe to show: control characters escaped, secrets redacted.

Everything a host sends is hostile until checked. A VM name may carry terminal escapes
(`\\x1b]0;...`), and an argv may carry `-object secret,data=...`. Stdlib only: every layer uses it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# C0 controls (tab and newline included: one field is one line), DEL, C1 controls, and the
# Unicode line/paragraph separators and bidi overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: object) -> str:
    """`text` as one printable line: every control character becomes a visible `\\xNN`."""
    return _CONTROL.sub(_escape_one, str(text))


def escape_lines(text: object) -> str:
    """Like escape_controls, but newlines stay (a multi-line message from a host)."""
    return "\n".join(escape_controls(line) for line in str(text).split("\n"))


# option keys whose values are secrets (QEMU's secret object, passwords, keys such as rbd's `key=`)
SECRET_KEYS = ("data", "password", "passwd", "passphrase", "key-secret", "secret", "token", "key")
_KEYS = "|".join(re.escape(k) for k in SECRET_KEYS)
# `key=value` in QEMU's option syntax (`,,` is an escaped comma), after a comma, or a colon as in
# `rbd:pool/img:key=...`, with an optional dotted prefix (`file.password=`)
_SECRET = re.compile(rf"(?i)(^|[,:])((?:[\w-]+\.)*(?:{_KEYS}))=((?:[^,]|,,)*)")
# the same keys in QEMU's JSON option syntax: `-object {"qom-type":"secret","data":"..."}`
_SECRET_JSON = re.compile(rf'(?i)("(?:[\w-]+\.)*(?:{_KEYS})"\s*:\s*)"(?:[^"\\]|\\.)*"')
REDACTED = "<redacted>"


def redact_arg(arg: str) -> str:
    """One argv word with secret values replaced: `secret,id=s0,data=hunter2` -> `...data=<redacted>`."""
    arg = _SECRET_JSON.sub(lambda m: f'{m.group(1)}"{REDACTED}"', arg)
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}", arg)


def redact_argv(argv: Iterable[str]) -> tuple[str, ...]:
    """What may be shown or written of a command line; the real one stays with whoever launches it."""
    return tuple(redact_arg(a) for a in argv)
