"""A QMP server on a UNIX socket that answers like QEMU 7.2 does.

Where clients look, it is QEMU's: the greeting, `qmp_capabilities` negotiation (oob offered),
`{"return": ..., "id": ...}` / `{"id": ..., "error": {"class", "desc"}}` with the id echoed,
events with a `timestamp`, each message ended by CRLF, and QEMU's JSON dialect and error
answers (`qjson`). Requests are checked as qmp_dispatch() checks them, arguments as the QAPI
visitor does (`qapi`).

One client at a time, as QEMU's monitor chardev: a second client is accepted by the kernel but
gets no greeting until the first leaves (then the next in line is served).

Events keep their order across threads: an event emitted on the loop (by a command) is written
at once, so it precedes the command's answer as in QEMU; events from other threads (a migration)
are queued in order and written before anything that follows them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import qjson
from .qapi import Enum, List, QapiError, Struct, check, qdict_order, struct

QEMU_VERSION = {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "sevconsole-lab"}
NEGOTIATE = "Expecting capabilities negotiation with 'qmp_capabilities'"
OUTPUT_BUFFER = 16 << 20  # answers held for a client before the monitor stops reading it


class QmpError(Exception):
    """A command failure, answered as {"error": {"class": cls, "desc": desc}}."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]


@dataclass
class CommandSpec:
    name: str
    handler: Handler
    args: Struct = field(default_factory=Struct)
    allow_oob: bool = False


CAPABILITIES_ARGS = struct(("enable", List(Enum(("oob",)))))


def timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}


def encode(obj: dict[str, Any]) -> bytes:
    return qjson.dumps(obj).encode() + b"\r\n"


class QmpServer:
    """One VM's monitor: listens on `path`, serves one client at a time."""

    def __init__(self, path: str, commands: dict[str, CommandSpec]) -> None:
        self.path = path
        self.commands = commands
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[_Client] = set()
        self._active: _Client | None = None
        self._turn = asyncio.Lock()  # FIFO: waiting clients are greeted in the order they came
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_lock = threading.Lock()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
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

    # --- events ---------------------------------------------------------------------------

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """From any thread; in order with every other event and answer."""
        msg: dict[str, Any] = {"timestamp": timestamp(), "event": event}
        if data is not None:
            msg["data"] = data
        raw = encode(msg)
        if threading.get_ident() == self._loop_thread:
            self._flush_pending()
            self._send_event(raw)
            return
        loop = self._loop
        with self._pending_lock:
            self._pending.append(raw)
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing at shutdown
                loop.call_soon_threadsafe(self._flush_pending)

    emit_threadsafe = emit

    def _flush_pending(self) -> None:
        while True:
            with self._pending_lock:
                if not self._pending:
                    return
                raw = self._pending.popleft()
            self._send_event(raw)

    def _send_event(self, raw: bytes) -> None:
        client = self._active
        if client is not None and client.negotiated:
            client.write(raw)

    # --- clients --------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # QEMU keeps reading while its answers wait for a client that does not read them; a
        # high mark keeps that (no deadlock on a flood of bad input) within a bound
        writer.transport.set_write_buffer_limits(high=OUTPUT_BUFFER)
        client = _Client(writer)
        self._clients.add(client)
        try:
            async with self._turn:
                if client.closed:
                    return
                self._active = client
                try:
                    await self._session(client, reader)
                finally:
                    self._active = None
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(client)
            client.close()

    async def _session(self, client: _Client, reader: asyncio.StreamReader) -> None:
        client.write(encode({"QMP": {"version": QEMU_VERSION, "capabilities": ["oob"]}}))
        streamer = qjson.Streamer()
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for parsed in streamer.feed(data):
                reply = await self._answer(client, parsed)
                self._flush_pending()  # events of other threads that came first go first
                client.write(encode(reply))
                await client.drain()
                if client.closing:
                    return

    async def _answer(self, client: _Client, parsed: qjson.Parsed) -> dict[str, Any]:
        if parsed.error is not None:
            return _error(parsed.error)
        msg = parsed.value
        if not isinstance(msg, dict):
            return _error("QMP input must be a JSON object")
        reply = await self._dispatch(client, msg)
        if not client.negotiated and "error" in reply and reply["error"]["class"] == "CommandNotFound":
            reply["error"]["desc"] = NEGOTIATE  # QEMU's hint while capabilities are not negotiated
        if "id" in msg:
            reply = {"return": reply["return"], "id": msg["id"]} if "return" in reply \
                else {"id": msg["id"], "error": reply["error"]}
        return reply

    async def _dispatch(self, client: _Client, msg: dict[str, Any]) -> dict[str, Any]:
        problem = _check_request(msg, client.oob)
        if problem is not None:
            return _error(problem)
        oob = "execute" not in msg
        name = msg["execute"] if not oob else msg["exec-oob"]
        spec = self._find(client, name)
        if spec is None:
            return _error(f"The command {name} has not been found", "CommandNotFound")
        if oob and not spec.allow_oob:
            return _error(f"The command {name} does not support OOB")
        try:
            args = check(spec.args, msg.get("arguments", {}))
            result = spec.handler(args)
            if inspect.isawaitable(result):
                result = await result
        except QapiError as exc:
            return _error(str(exc))
        except QmpError as exc:
            return _error(exc.desc, exc.cls)
        except Exception as exc:  # a bug in a handler must not take the monitor down
            return _error(f"internal error in {name}: {exc}")
        if name == "quit":
            client.closing = True
        return {"return": {} if result is None else result}

    def _find(self, client: _Client, name: str) -> CommandSpec | None:
        if name == "qmp_capabilities":
            return CommandSpec(name, lambda args: self._negotiate(client, args), CAPABILITIES_ARGS)
        return self.commands.get(name) if client.negotiated else None

    @staticmethod
    def _negotiate(client: _Client, args: dict[str, Any]) -> dict[str, Any]:
        if client.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        client.negotiated = True
        client.oob = "oob" in args.get("enable", [])
        return {}


def _check_request(msg: dict[str, Any], oob: bool) -> str | None:
    """qmp_dispatch_check_obj: members walked in QEMU's QDict order, so the first bad one it
    would meet is the one named."""
    exec_key = None
    for key in qdict_order(msg):
        value = msg[key]
        if key == "execute" or (key == "exec-oob" and oob):
            if not isinstance(value, str):
                return f"QMP input member '{key}' must be a string"
            if exec_key is not None:
                return f"QMP input member '{key}' clashes with '{exec_key}'"
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                return "QMP input member 'arguments' must be an object"
        elif key != "id":
            return f"QMP input member '{key}' is unexpected"
    if exec_key is None:
        return "QMP input lacks member 'execute'"
    return None


def _error(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


class _Client:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False
        self.oob = False
        self.closing = False

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def write(self, raw: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(raw)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.drain()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
