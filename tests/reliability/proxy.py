"""A TCP proxy that injects faults into a byte stream: cut the link, flip bits, record, or run a
callback (kill a host) when a chosen byte passes.

Faults are placed either at an absolute byte offset of one direction, or inside a frame of the
lab's migration stream (`sevconsole.lab.stream`: MAGIC, then `type:u8 length:be32 payload`),
e.g. "the 3rd byte of the session in SEV_START" or "the first byte of the FINISHED frame".
The proxy tracks the framing as bytes pass, so placing a fault costs no copy of the stream.
The lab is never told: the source simply migrates to the proxy's port.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sevconsole.lab.stream import MAGIC, Frame

OUT, BACK = "out", "back"  # source -> target, target -> source
CHUNK = 1 << 20


@dataclass(frozen=True)
class Fault:
    """What to do, and where.

    action: "cut" (both sockets closed before the byte), "flip" (XOR `mask` into the byte),
    "call" (run `call` before forwarding the byte; the stream goes on unless it raises).
    Where: `at` (absolute offset in `direction`), or `frame` + `nth` (0-based occurrence of that
    frame kind) + `offset` (into its payload; -5 is its 5-byte frame header's first byte).
    """

    action: str
    direction: str = OUT
    at: int | None = None
    frame: Frame | None = None
    nth: int = 0
    offset: int = 0
    mask: int = 0x01
    call: Callable[[], None] | None = field(default=None, compare=False)

    def describe(self) -> str:
        where = f"byte {self.at}" if self.at is not None else \
            f"{self.frame.name}#{self.nth}+{self.offset}" if self.frame is not None else "?"
        return f"{self.action} {self.direction} at {where}"


class _Tracker:
    """Follows the frames of one direction and turns frame-relative faults into offsets."""

    def __init__(self, magic: bool, faults: list[Fault]) -> None:
        self.pos = 0
        self.skip = len(MAGIC) if magic else 0  # bytes before the first frame header
        self.head = bytearray()
        self.left = 0  # payload bytes still to pass in the current frame
        self.seen: dict[int, int] = {}
        self.frames: list[tuple[int, int, int]] = []  # (kind, start offset, length)
        self.pending = [f for f in faults if f.frame is not None]
        self.resolved: list[tuple[int, Fault]] = [(f.at, f) for f in faults if f.at is not None]

    def feed(self, data: memoryview) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.skip:
                k = min(self.skip, n - i)
                self.skip -= k
                i += k
            elif self.left:
                k = min(self.left, n - i)
                self.left -= k
                i += k
            else:
                need = 5 - len(self.head)
                take = bytes(data[i:i + need])
                self.head += take
                i += len(take)
                if len(self.head) == 5:
                    kind, length = struct.unpack(">BI", self.head)
                    start = self.pos + i - 5
                    self.head.clear()
                    self.left = length
                    nth = self.seen.get(kind, 0)
                    self.seen[kind] = nth + 1
                    self.frames.append((kind, start, length))
                    for f in list(self.pending):
                        if f.frame is not None and int(f.frame) == kind and f.nth == nth:
                            self.pending.remove(f)
                            self.resolved.append((start + 5 + f.offset, f))
        self.pos += n


class StreamProxy:
    """Listens on 127.0.0.1:<port>; each accepted connection is joined to `upstream`.

    Faults apply to the first connection only. `fired` is set (with `fired_at`, a monotonic
    time) when the first fault acted; `finished` when both directions of the first connection
    ended. `recorded[OUT]` holds the source's bytes when `record=True` (for replays).
    """

    def __init__(self, upstream: tuple[str, int], faults: list[Fault] | tuple[Fault, ...] = (), *,
                 record: bool = False, magic: bool = True) -> None:
        self.upstream = upstream
        self.faults = list(faults)
        self.record = record
        self.magic = magic
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.fired = threading.Event()
        self.fired_at: float | None = None
        self.acted: list[str] = []
        self.finished = threading.Event()
        self.forwarded = {OUT: 0, BACK: 0}
        self.recorded = {OUT: bytearray(), BACK: bytearray()}
        self.trackers: dict[str, _Tracker] = {}
        self._socks: list[socket.socket] = []
        self._first = True
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                first, self._first = self._first, False
                self._socks += [client, upstream]
            faults = self.faults if first else []
            done = [threading.Event(), threading.Event()]
            out = _Tracker(self.magic, [f for f in faults if f.direction == OUT])
            back = _Tracker(False, [f for f in faults if f.direction == BACK])
            if first:
                self.trackers = {OUT: out, BACK: back}
            for src, dst, tracker, name, ev, other in ((client, upstream, out, OUT, done[0], done[1]),
                                                       (upstream, client, back, BACK, done[1], done[0])):
                threading.Thread(target=self._pump, daemon=True,
                                 args=(src, dst, tracker, name if first else None, ev, other, (client, upstream))).start()
            if first:
                threading.Thread(target=lambda d=done: (d[0].wait(), d[1].wait(), self.finished.set()),
                                 daemon=True).start()

    def _fire(self, what: str) -> None:
        if self.fired_at is None:
            self.fired_at = time.monotonic()
        self.acted.append(what)
        self.fired.set()

    def _pump(self, src: socket.socket, dst: socket.socket, tracker: _Tracker, name: str | None,
              done: threading.Event, other_done: threading.Event,
              pair: tuple[socket.socket, socket.socket]) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            while True:
                try:
                    n = src.recv_into(buf)
                except OSError:
                    break
                if not n:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    break
                chunk = view[:n]
                start = tracker.pos
                tracker.feed(chunk)
                cut_at = None
                calls: list[tuple[int, Fault]] = []
                for at, f in list(tracker.resolved):
                    if at >= start + n:
                        continue
                    tracker.resolved.remove((at, f))
                    at = max(at, start)  # a place already passed (header split over reads): now
                    if f.action == "flip":
                        buf[at - start] ^= f.mask
                        self._fire(f.describe())
                    elif f.action == "cut":
                        cut_at = at if cut_at is None else min(cut_at, at)
                    elif f.action == "call":
                        calls.append((at, f))
                sent = 0
                for at, f in sorted(calls, key=lambda c: c[0]):
                    if cut_at is not None and at >= cut_at:
                        break
                    dst.sendall(chunk[sent:at - start])
                    sent = at - start
                    self._fire(f.describe())
                    assert f.call is not None
                    f.call()
                end = n if cut_at is None else cut_at - start
                if end > sent:
                    dst.sendall(chunk[sent:end])
                if name is not None:
                    self.forwarded[name] += end
                    if self.record:
                        self.recorded[name] += chunk[:end]
                if cut_at is not None:
                    self._fire(f"cut {name} at byte {cut_at}")
                    for s in pair:
                        _abort(s)
                    break
        except OSError:
            # The far side went away: like a router, keep taking this side's bytes (dropping
            # them) until the other direction has delivered what the far side said last.
            with contextlib.suppress(OSError):
                src.settimeout(0.2)
                while not other_done.is_set():
                    try:
                        if not src.recv_into(buf):
                            break
                    except TimeoutError:
                        continue
            for s in pair:
                with contextlib.suppress(OSError):
                    s.close()
        finally:
            done.set()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            socks = list(self._socks)
        _abort(self.listener)
        for s in socks:
            _abort(s)


def _abort(sock: socket.socket) -> None:
    """Close like a cable pulled out: RST, no orderly FIN handshake left pending."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def replay(address: tuple[str, int], data: bytes, timeout: float = 30.0) -> bytes:
    """Sends a recorded source stream to a listener as fast as it takes it; returns what the
    listener answered before it closed."""
    answer = bytearray()
    with socket.create_connection(address, timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                answer += chunk
    return bytes(answer)
