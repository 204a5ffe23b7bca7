"""A QMP server on a UNIX socket that answers like QEMU 7.2 does.

Byte-compatible where clients look: the greeting, `qmp_capabilities` negotiation (oob offered),
`{"return": ..., "id": ...}` / `{"id": ..., "error": {"class", "desc"}}` with the id echoed,
events with a `timestamp`, each message ended by CRLF. Input is a JSON stream, not lines (qemu.qmp
sends no newline), so a small brace scanner splits it; malformed input gets QEMU's error answer
and the connection stays up.

Commands are registered with an argument schema so that unknown, missing and mistyped arguments
are refused with QEMU's own sentences. Handlers run on the event loop; events may be emitted
from any thread (`emit_threadsafe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

QEMU_VERSION = {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "sevconsole-lab"}
MAX_MESSAGE = 1 << 20  # QEMU's limit on a single JSON token stream is similar (MAX_TOKEN_SIZE 64M); ours is smaller


class QmpError(Exception):
    """A command failure, answered as {"error": {"class": cls, "desc": desc}}."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


# Argument types: name shown in QEMU's "Parameter 'x' expects TYPE" sentence, and a checker.
_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "str": ("string", lambda v: isinstance(v, str)),
    "int": ("int64", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "uint": ("uint64", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "bool": ("boolean", lambda v: isinstance(v, bool)),
    "list": ("array", lambda v: isinstance(v, list)),
    "dict": ("object", lambda v: isinstance(v, dict)),
    "any": ("any", lambda v: True),
}


@dataclass(frozen=True)
class Arg:
    type: str = "str"
    required: bool = False


Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]


@dataclass
class CommandSpec:
    name: str
    handler: Handler
    args: dict[str, Arg] = field(default_factory=dict)


def check_args(spec: CommandSpec, args: dict[str, Any]) -> None:
    for key in args:
        if key not in spec.args:
            raise QmpError(f"Parameter '{key}' is unexpected")
    for key, arg in spec.args.items():
        if key not in args:
            if arg.required:
                raise QmpError(f"Parameter '{key}' is missing")
            continue
        type_name, ok = _TYPES[arg.type]
        if not ok(args[key]):
            raise QmpError(f"Parameter '{key}' expects {type_name}")


def timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"invalid keyword '{name}'")


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\r\n"


class JsonSplitter:
    """Splits a byte stream into top-level JSON texts, like QEMU's json-streamer.

    Yields ("ok", bytes) for each complete object or array and ("bad", token) for a stray
    top-level token (a keyword or scalar), which QEMU refuses one by one.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.scalar = False  # inside a top-level string
        self.pos = 0  # scan position in buf
        self.start = 0  # start of the current text

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self.buf += data
        out: list[tuple[str, bytes]] = []
        buf = self.buf
        n = len(buf)
        i = self.pos
        while i < n:
            c = buf[i]
            if self.depth == 0:
                if c in b" \t\r\n":
                    i += 1
                    self.start = i
                    continue
                if c in b"{[":
                    self.depth = 1
                    self.start = i
                    i += 1
                    continue
                if c == 0x22:  # a top-level string is one token, as in QEMU's lexer
                    self.depth = 1
                    self.in_str = self.scalar = True
                    self.start = i
                    i += 1
                    continue
                # a stray token: up to the next whitespace or bracket
                j = i
                while j < n and buf[j] not in b" \t\r\n{[":
                    j += 1
                if j == n:
                    break  # maybe more of it comes
                out.append(("bad", bytes(buf[i:j])))
                i = self.start = j
                continue
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == 0x5C:  # backslash
                    self.esc = True
                elif c == 0x22:
                    self.in_str = False
                    if self.scalar:
                        self.scalar = False
                        self.depth = 0
                        out.append(("ok", bytes(buf[self.start:i + 1])))
                        self.start = i + 1
            elif c == 0x22:
                self.in_str = True
            elif c in b"{[":
                self.depth += 1
            elif c in b"}]":
                self.depth -= 1
                if self.depth == 0:
                    out.append(("ok", bytes(buf[self.start:i + 1])))
                    self.start = i + 1
            i += 1
        # drop what was consumed
        del buf[:self.start]
        self.pos = i - self.start
        self.start = 0
        if len(buf) > MAX_MESSAGE:
            out.append(("bad", b"<message too long>"))
            self.reset()
        return out

    def reset(self) -> None:
        self.buf.clear()
        self.depth = 0
        self.in_str = self.esc = self.scalar = False
        self.pos = self.start = 0


class QmpServer:
    """One VM's monitor: listens on `path`, serves any number of clients."""

    def __init__(self, path: str, commands: dict[str, CommandSpec]) -> None:
        self.path = path
        self.commands = commands
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[_Client] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):  # a stale socket of ours; never another file
                os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for client in list(self._clients):
            client.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"timestamp": timestamp(), "event": event}
        if data is not None:
            msg["data"] = data
        raw = encode(msg)
        for client in list(self._clients):
            if client.negotiated:
                client.write(raw)

    def emit_threadsafe(self, event: str, data: dict[str, Any] | None = None) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing at shutdown
                loop.call_soon_threadsafe(self.emit, event, data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        self._clients.add(client)
        try:
            client.write(encode({"QMP": {"version": QEMU_VERSION, "capabilities": ["oob"]}}))
            splitter = JsonSplitter()
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for kind, text in splitter.feed(data):
                    reply = await self._answer(client, kind, text)
                    if reply is not None:
                        client.write(encode(reply))
                        await client.drain()
                    if client.closing:
                        return
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(client)
            client.close()

    async def _answer(self, client: _Client, kind: str, text: bytes) -> dict[str, Any] | None:
        if kind == "bad":
            try:
                json.loads(text)  # a number, true, false or null: valid JSON, but not an object
            except ValueError:
                return _error(None, f"JSON parse error, invalid keyword '{text.decode(errors='replace')}'")
            return _error(None, "QMP input must be a JSON object")
        try:
            msg = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
        except RecursionError:
            return _error(None, "JSON nesting depth limit exceeded")
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(None, f"JSON parse error, {exc}")
        if not isinstance(msg, dict):
            return _error(None, "QMP input must be a JSON object")
        has_id = "id" in msg
        mid = msg.get("id")
        for key in msg:
            if key not in ("execute", "exec-oob", "arguments", "id", "control"):
                return _error(mid, f"QMP input member '{key}' is unexpected", has_id=has_id)
        name = msg.get("execute", msg.get("exec-oob"))
        if name is None:
            return _error(mid, "QMP input lacks member 'execute'", has_id=has_id)
        if not isinstance(name, str):
            return _error(mid, "QMP input member 'execute' must be a string", has_id=has_id)
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            return _error(mid, "QMP input member 'arguments' must be an object", has_id=has_id)
        if not client.negotiated:
            if name != "qmp_capabilities":
                return _error(mid, "Expecting capabilities negotiation with 'qmp_capabilities'",
                              "CommandNotFound", has_id=has_id)
            enable = args.get("enable", [])
            if not isinstance(enable, list) or any(e != "oob" for e in enable):
                return _error(mid, "Parameter 'enable' expects QMPCapability", has_id=has_id)
            client.negotiated = True
            return _ok(mid, {}, has_id)
        if name == "qmp_capabilities":
            return _error(mid, "Capabilities negotiation is already complete, command ignored",
                          "CommandNotFound", has_id=has_id)
        spec = self.commands.get(name)
        if spec is None:
            return _error(mid, f"The command {name} has not been found", "CommandNotFound", has_id=has_id)
        try:
            check_args(spec, args)
            result = spec.handler(args)
            if inspect.isawaitable(result):
                result = await result
        except QmpError as exc:
            return _error(mid, exc.desc, exc.cls, has_id=has_id)
        except Exception as exc:  # a bug in a handler must not take the monitor down
            return _error(mid, f"internal error in {name}: {exc}", has_id=has_id)
        if name == "quit":
            client.closing = True
        return _ok(mid, {} if result is None else result, has_id)


def _ok(mid: Any, result: Any, has_id: bool) -> dict[str, Any]:
    return {"return": result, "id": mid} if has_id else {"return": result}


def _error(mid: Any, desc: str, cls: str = "GenericError", *, has_id: bool = False) -> dict[str, Any]:
    err = {"class": cls, "desc": desc}
    return {"id": mid, "error": err} if has_id else {"error": err}


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False
        self.closing = False

    def write(self, raw: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(raw)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
