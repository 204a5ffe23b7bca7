"""Live migration between lab hosts over TCP: the source's pre-copy loop and the target's receiver.

The wire format is in `stream.py`. Source: SEND_START, a first pass over all pages, dirty passes
until what is left fits the downtime limit at the measured rate, stop-and-copy, then the
COMPLETE/READY/FINISHED/DONE handshake around SEND_FINISH and RECEIVE_FINISH. Any failure or
`migrate_cancel` before SEND_FINISH: SEND_CANCEL and the source runs on; the target discards
its incoming VM. Both sides run in plain threads with blocking sockets: big buffers, few
syscalls, and the firmware's crypto in between.

What a client sees is QEMU 7.2's: events in its order (source: setup, MIGRATION_PASS 1, active,
STOP, the last pass, completed; target: setup, active, RESUME, completed, and no passes), the
target's run state taken from the source's (a paused source arrives paused whatever the
target's -S), and query-migrate's shapes (failed and cancelled carry only their status and
error-desc; a target lists its socket-address and has no status until the source connects).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from sevconsole.sev.pagestate import PageState

from . import stream, uri
from .layout import PAGE_SIZE
from .psp import FirmwareError
from .stream import Frame, StreamError
from .vm import LabVm, runs_of

BATCH_PAGES = 250  # ~1 MiB a frame, a whole number of 0x5000 packets; cancel answers within a frame
PSP_BATCH_PAGES = 10  # realistic PSP: ~25 ms a frame, so source and target overlap
PACKET_PAGES = 5  # 5 x 4 KiB = 0x5000, the firmware's largest packet
SOCK_BUF = 4 << 20
FLUSH_BYTES = 1 << 20  # gather frames into one sendmsg of about this much
FLUSH_PARTS = 512  # and never more iovecs than IOV_MAX (1024) allows
GAP_PAGES = 16  # clean pages between dirty ones sent along rather than split into runs
HANDSHAKE_TIMEOUT_S = 120.0

Emit = Callable[[str, dict[str, Any] | None], None]


class MigrationError(Exception):
    """Why a migration failed, as a sentence for `error-desc`."""


@dataclass
class Fault:
    """Lab-only fault injection (x-lab-inject-fault): what to break after `after_pages` pages."""

    kind: str = "none"  # none | tamper-packet | cut-link
    after_pages: int = 0
    fired: bool = False


# Run states a source may hand over (QEMU's global state); anything else in a STATE frame is refused.
HANDED_OVER_STATES = ("paused", "prelaunch", "suspended")


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)


class Stats:
    """query-migrate's MigrationInfo, kept up to date by the migration thread."""

    def __init__(self, total: int, status: str = "setup") -> None:
        self.lock = threading.Lock()
        self.status = status
        self.started = time.monotonic()
        self.setup_time_ms = 0
        self.total_time_ms: int | None = None
        self.downtime_ms: int | None = None
        self.expected_downtime_ms = 0
        self.total = total
        self.remaining = total
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self.normal = 0
        self.dirty_sync_count = 0
        self.dirty_pages_rate = 0
        self.mbps = 0.0
        self.pages_per_second = 0
        self.error_desc: str | None = None

    def info(self) -> dict[str, Any]:
        with self.lock:
            info: dict[str, Any] = {"status": self.status}
            if self.status in ("failed", "cancelled"):  # QEMU keeps no figures of an ended attempt
                if self.error_desc:
                    info["error-desc"] = self.error_desc
                return info
            if self.status == "setup":
                return info
            total_time = self.total_time_ms
            if total_time is None:
                total_time = int((time.monotonic() - self.started) * 1000)
            info["setup-time"] = self.setup_time_ms
            info["total-time"] = total_time
            if self.downtime_ms is not None:
                info["downtime"] = self.downtime_ms
            elif self.status == "active":
                info["expected-downtime"] = self.expected_downtime_ms
            transferred = self.precopy_bytes + self.downtime_bytes
            info["ram"] = {
                "transferred": transferred,
                "remaining": self.remaining,
                "total": self.total,
                "duplicate": 0,
                "skipped": 0,
                "normal": self.normal,
                "normal-bytes": self.normal * PAGE_SIZE,
                "dirty-pages-rate": self.dirty_pages_rate,
                "mbps": self.mbps,
                "dirty-sync-count": self.dirty_sync_count,
                "postcopy-requests": 0,
                "multifd-bytes": 0,
                "page-size": PAGE_SIZE,
                "pages-per-second": self.pages_per_second,
                "precopy-bytes": self.precopy_bytes,
                "downtime-bytes": self.downtime_bytes,
                "postcopy-bytes": 0,
                "dirty-sync-missed-zero-copy": 0,
            }
            return info


def _handle(vm: LabVm) -> int:
    """The SEV guest's firmware handle: set from LAUNCH_START (or RECEIVE_START) until the VM closes."""
    if vm.handle is None:
        raise MigrationError(f"{vm.name}: the guest has no SEV handle on {vm.psp.host} "
                             "(it was never launched or received, or the VM was closed)")
    return vm.handle


def _sev_param(params: dict[str, Any], key: str, vm: str) -> bytes:
    value = params.get(key) or ""
    if not value:
        raise MigrationError(
            f"{vm}: the target's {key} is not set; give it with migrate-set-parameters "
            f"(sev-pdh, sev-plat-cert, sev-amd-cert) before migrate")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise MigrationError(f"{vm}: {key} is not valid base64") from None


class OutgoingMigration:
    """Created by `migrate` in status setup (its event sent at once, before the answer, as QEMU
    does); `start(address)` runs it, `fail_at_once` ends one whose URI was refused."""

    def __init__(self, vm: LabVm, params: dict[str, Any], emit: Emit, fault: Fault | None = None) -> None:
        self.vm = vm
        self.address: uri.Address | None = None
        self.params = params  # the monitor's own: max-bandwidth set mid-way counts from the next pass
        self.emit = emit
        self.fault = fault or Fault()
        self.stats = Stats(vm.mem_bytes)
        self.cancel = threading.Event()
        # QEMU's migrate_cancel shuts the stream down, so a send blocked on a peer that stopped
        # reading ends at once; but never once SEND_FINISH is under way (the guest then goes on)
        self._stage = threading.Lock()
        self._finishing = False
        self.replies: queue.Queue[tuple[Frame | None, bytes]] = queue.Queue()
        self.sock: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, name=f"migrate-out-{vm.name}", daemon=True)
        self._pages_sent = 0

    def announce(self) -> None:
        self.emit("MIGRATION", {"status": "setup"})

    def start(self, address: uri.Address) -> None:
        self.address = address
        self.thread.start()

    def fail_at_once(self, reason: str | None) -> None:
        """The URI was refused before the answer: setup then failed, as QEMU's migrate_fd_error."""
        with self.stats.lock:
            self.stats.error_desc = reason
            self.stats.total_time_ms = 0
        self._set_status("failed")

    def request_cancel(self) -> None:
        if self.mark_cancelling():
            with self._stage:
                self.cancel.set()
                if not self._finishing and self.sock is not None:
                    with contextlib.suppress(OSError):
                        self.sock.shutdown(socket.SHUT_RDWR)

    def mark_cancelling(self) -> bool:
        """migrate_cancel's own part: "cancelling", announced before its answer. The thread is
        told afterwards (`cancel.set()`), as QEMU's migration thread notices it later."""
        with self.stats.lock:
            if self.stats.status in ("completed", "failed", "cancelled"):
                return False
            self.stats.status = "cancelling"
        self.emit("MIGRATION", {"status": "cancelling"})
        return True

    def _set_status(self, status: str) -> None:
        with self.stats.lock:
            if self.stats.status == "cancelling" and status == "active":
                return
            self.stats.status = status
        self.emit("MIGRATION", {"status": status})

    # --- the run ----------------------------------------------------------------------

    def _run(self) -> None:
        vm, psp = self.vm, self.vm.psp
        started = time.monotonic()
        in_send = finished = stopped = False
        try:
            assert self.address is not None
            if vm.sev:
                pdh = _sev_param(self.params, "sev-pdh", vm.name)
                plat = _sev_param(self.params, "sev-plat-cert", vm.name)
                amd = _sev_param(self.params, "sev-amd-cert", vm.name)
            try:
                sock = uri.connect(self.address)
            except uri.ConnectError as exc:
                raise MigrationError(str(exc)) from None
            self.sock = sock
            _tune(sock)
            hello = {"vm": vm.name, "mem": vm.mem_bytes, "page-size": PAGE_SIZE, "sev": vm.sev,
                     "shared": _ranges(vm.shared), "dirty-rate": vm.workload.rate}
            self._send([stream.MAGIC], "setup")
            self._send_frame(Frame.HELLO, json.dumps(hello).encode(), "setup")
            if vm.sev:
                # A refused policy (NOSEND, DOMAIN, SEV, API version) stops here: the target
                # gets ABORT and not a single page leaves.
                started_res = psp.call(psp.fw.send_start, _handle(vm), pdh, plat, amd)
                in_send = True
                own_pdh = psp.call(psp.fw.pdh_cert_export).pdh
                self._send_frame(Frame.SEV_START,
                                 stream.pack_sev_start(started_res.policy, own_pdh, started_res.session), "setup")
            threading.Thread(target=self._read_replies, name=f"migrate-replies-{vm.name}", daemon=True).start()
            with vm.lock:
                vm.dirty[:] = True  # the first pass sends everything
            # QEMU syncs the dirty bitmap (MIGRATION_PASS 1) while still in setup, then goes active
            pass_no = 1
            pages = self._sync(pass_no)
            with self.stats.lock:
                self.stats.setup_time_ms = int((time.monotonic() - started) * 1000)
            self._set_status("active")
            while True:
                limit_s = self.params.get("downtime-limit", 300) / 1000.0
                self._send_frame(Frame.PASS, struct.pack(">I", pass_no), "precopy")
                t0, d0 = time.monotonic(), vm.dirtied_total
                sent = self._send_pages(pages, "precopy")
                dt = max(time.monotonic() - t0, 1e-6)
                left = int(np.count_nonzero(vm.dirty)) * PAGE_SIZE
                bandwidth = sent / dt  # bytes/s
                with self.stats.lock:
                    self.stats.dirty_pages_rate = int((vm.dirtied_total - d0) / dt)
                    self.stats.remaining = left
                    self.stats.expected_downtime_ms = int(left / bandwidth * 1000) if bandwidth else 0
                if left <= bandwidth * limit_s:
                    break
                pass_no += 1
                pages = self._sync(pass_no)
            # stop-and-copy
            stop_at = time.monotonic()
            # QEMU's global state: a guest paused before stays paused after a failure, and the
            # target takes this state over (paused arrives paused)
            before = vm.status
            vm.set_status("finish-migrate")
            stopped = True
            # QEMU sends MIGRATION_PASS at every dirty-bitmap sync, the last one included.
            pages = self._sync(pass_no + 1)
            self._send_pages(pages, "downtime")
            if vm.sev and vm.digest_on_send:
                # While the guest is stopped and still readable (SUPDATE): once SENT its memory
                # never changes again, and x-query-guest-digest answers with this.
                vm.final_digest = vm.digest()
            if before != "running":
                self._send_frame(Frame.STATE, before.encode(), "downtime")
            self._send_frame(Frame.COMPLETE, b"", "downtime")
            self._await(Frame.READY, "to accept every page")
            with self._stage:
                if self.cancel.is_set():
                    raise OSError("migration cancelled before SEND_FINISH")
                self._finishing = True
            if vm.sev:
                psp.call(psp.fw.send_finish, _handle(vm))
            finished = True
            self._send_frame(Frame.FINISHED, b"", "downtime")
            self._await(Frame.DONE, "to run the guest (RECEIVE_FINISH)")
            with self.stats.lock:
                self.stats.downtime_ms = int((time.monotonic() - stop_at) * 1000)
                self.stats.remaining = 0
            vm.set_status("postmigrate")
            self._finish("completed", started)
        except Exception as exc:  # every failure ends this migration only
            reason = _reason(exc)
            cancelled = self.cancel.is_set() and not finished
            if in_send and not finished:
                with contextlib.suppress(Exception):
                    psp.raw(psp.fw.send_cancel, _handle(vm))
            if not finished:
                vm.final_digest = None
                if self.sock is not None:
                    with contextlib.suppress(OSError):
                        stream.send_frame(self.sock, Frame.ABORT, reason.encode()[:4096])
                if stopped:
                    vm.set_status(before)
                with vm.lock:  # pages sent so far count as unsent again
                    vm.states[vm.states == PageState.PRIVATE_SENT] = PageState.PRIVATE_UNSENT
                    vm.states[vm.states == PageState.PRIVATE_DIRTY] = PageState.PRIVATE_UNSENT
                    vm.states[vm.states == PageState.SHARED_SENT] = PageState.SHARED_UNSENT
                    vm.states[vm.states == PageState.SHARED_DIRTY] = PageState.SHARED_UNSENT
            else:
                # SEND_FINISH is done: the guest lives on the target now, even if its last word was lost
                vm.set_status("postmigrate")
            with self.stats.lock:
                self.stats.error_desc = None if cancelled else reason
            self._finish("cancelled" if cancelled else "failed", started)
        finally:
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.close()

    def _sync(self, pass_no: int) -> np.ndarray:
        """KVM's dirty-log sync, announced as QEMU does."""
        pages = self.vm.sync_dirty()
        with self.stats.lock:
            self.stats.dirty_sync_count += 1
        self.emit("MIGRATION_PASS", {"pass": pass_no})
        return pages

    def _finish(self, status: str, started: float) -> None:
        with self.stats.lock:
            self.stats.total_time_ms = int((time.monotonic() - started) * 1000)
        self._set_status(status)

    # --- sending ----------------------------------------------------------------------

    def _check(self) -> None:
        if self.cancel.is_set():
            raise MigrationError("migration cancelled")
        with contextlib.suppress(queue.Empty):
            kind, payload = self.replies.get_nowait()
            self._peer_failed(kind, payload)

    def _peer_failed(self, kind: Frame | None, payload: bytes) -> None:
        if kind is Frame.ERROR:
            raise MigrationError(f"the target refused the migration: {payload.decode(errors='replace')}")
        if kind is None:
            raise MigrationError("the migration link to the target closed (the target is gone or the link was cut)")
        raise MigrationError(f"the target sent {kind.name} out of turn")

    def _send(self, parts: list[bytes | memoryview], phase: str) -> int:
        assert self.sock is not None
        try:
            n = stream.sendall_parts(self.sock, parts)
        except OSError as exc:
            # The target may have said why before it hung up.
            with contextlib.suppress(queue.Empty):
                kind, payload = self.replies.get(timeout=1.0)
                self._peer_failed(kind, payload)
            raise MigrationError(f"the migration link broke: {exc.strerror or exc}") from None
        with self.stats.lock:
            if phase == "downtime":
                self.stats.downtime_bytes += n
            else:
                self.stats.precopy_bytes += n
        return n

    def _send_frame(self, kind: Frame, payload: bytes, phase: str) -> int:
        return self._send([stream.frame_header(kind, len(payload)), payload], phase)

    def _send_pages(self, pages: np.ndarray, phase: str) -> int:
        """Sends `pages` (sorted indices); returns the bytes put on the wire.

        Scattered dirty pages would cost one firmware call and one frame each; small gaps are
        filled (a clean page sent again is harmless and costs microseconds) and frames are
        gathered into one sendmsg of about FLUSH_BYTES, so a dirty pass runs at stream speed.
        """
        vm = self.vm
        sent = 0
        t0 = time.monotonic()
        max_bw = float(self.params.get("max-bandwidth", 0) or 0)
        # With the realistic PSP a page costs milliseconds: small frames keep both ends busy, and
        # a clean page is never worth sending along (it costs what a dirty one does).
        realistic = vm.psp.paced
        batch = PSP_BATCH_PAGES if realistic else BATCH_PAGES
        if not realistic:
            pages = fill_gaps(pages, GAP_PAGES)
        count0 = self.stats.normal
        parts: list[bytes | memoryview] = []
        marks: list[tuple[int, int, bool]] = []
        pending = 0
        for run in runs_of(pages, vm.shared, batch):
            self._check()
            for first, count, packet in _packets(run):
                gpa = first * PAGE_SIZE
                body: list[bytes | memoryview]
                if run.shared:
                    body = [struct.pack(">Q", gpa), vm.memory[gpa:gpa + count * PAGE_SIZE].data]
                    kind = Frame.SHARED
                else:
                    res = vm.psp.call(vm.psp.fw.send_pages, _handle(vm), gpa, count * PAGE_SIZE // packet, packet_size=packet)
                    trans = self._maybe_tamper(res.trans)
                    body = stream.pack_private(gpa, res.headers, trans, packet)
                    kind = Frame.PRIVATE
                size = sum(len(p) for p in body)
                parts += [stream.frame_header(kind, size), *body]
                pending += stream.HDR.size + size
                marks.append((first, count, run.shared))
                self._pages_sent += count
            if pending >= FLUSH_BYTES or len(parts) >= FLUSH_PARTS or batch == PSP_BATCH_PAGES:
                sent += self._flush(parts, marks, phase)
                parts, marks, pending = [], [], 0
                sent = self._throttle(sent, t0, max_bw)
            self._account(pages, count0, run.count, sent, t0)
        if parts:
            sent += self._flush(parts, marks, phase)
        return sent

    def _flush(self, parts: list[bytes | memoryview], marks: list[tuple[int, int, bool]], phase: str) -> int:
        self._maybe_cut()
        n = self._send(parts, phase)
        for first, count, shared in marks:
            self._mark_sent(first, count, shared)
        return n

    def _throttle(self, sent: int, t0: float, max_bw: float) -> int:
        if max_bw > 0:  # QEMU's rate limit: never ahead of max-bandwidth
            ahead = sent / max_bw - (time.monotonic() - t0)
            if ahead > 0 and self.cancel.wait(ahead):
                raise MigrationError("migration cancelled")
        return sent

    def _account(self, pages: np.ndarray, count0: int, count: int, sent: int, t0: float) -> None:
        dt = max(time.monotonic() - t0, 1e-6)
        with self.stats.lock:
            self.stats.normal += count
            done = self.stats.normal - count0
            self.stats.mbps = sent * 8 / dt / 1e6
            self.stats.pages_per_second = int(done / dt)
            self.stats.remaining = max(0, len(pages) - done) * PAGE_SIZE + int(np.count_nonzero(self.vm.dirty)) * PAGE_SIZE

    def _mark_sent(self, first: int, count: int, shared: bool) -> None:
        vm = self.vm
        with vm.lock:
            sl = slice(first, first + count)
            redirty = vm.dirty[sl]
            if shared:
                vm.states[sl] = np.where(redirty, PageState.SHARED_DIRTY, PageState.SHARED_SENT)
            else:
                vm.states[sl] = np.where(redirty, PageState.PRIVATE_DIRTY, PageState.PRIVATE_SENT)

    def _maybe_tamper(self, trans: bytes | bytearray) -> bytes | bytearray:
        f = self.fault
        if f.kind == "tamper-packet" and not f.fired and self._pages_sent >= f.after_pages:
            f.fired = True
            buf = bytearray(trans)
            buf[len(buf) // 2] ^= 0x01  # one bit of ciphertext: the packet MAC must catch it
            return bytes(buf)
        return trans

    def _maybe_cut(self) -> None:
        f = self.fault
        if f.kind == "cut-link" and not f.fired and self._pages_sent >= f.after_pages and self.sock:
            f.fired = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    # --- replies from the target ----------------------------------------------------------

    def _read_replies(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            sock.settimeout(None)
            while True:
                kind, payload = stream.recv_frame(sock)
                self.replies.put((kind, bytes(payload)))
                if kind in (Frame.ERROR, Frame.DONE):
                    return
        except (StreamError, OSError):
            self.replies.put((None, b""))

    def _await(self, want: Frame, what: str) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while True:
            if self.cancel.is_set() and want is Frame.READY:
                raise MigrationError("migration cancelled")
            try:
                kind, payload = self.replies.get(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise MigrationError(f"the target did not answer in {HANDSHAKE_TIMEOUT_S:.0f} s {what}") from None
                continue
            if kind is want:
                return
            self._peer_failed(kind, payload)


def fill_gaps(pages: np.ndarray, gap: int) -> np.ndarray:
    """Sorted pages plus the clean pages of every gap of at most `gap` pages between them."""
    if len(pages) < 2 or gap <= 0:
        return pages
    d = np.diff(pages)
    small = (d > 1) & (d <= gap + 1)
    if not small.any():
        return pages
    extra = [np.arange(a + 1, b) for a, b in zip(pages[:-1][small].tolist(), pages[1:][small].tolist(), strict=True)]
    return np.union1d(pages, np.concatenate(extra))


def _packets(run) -> list[tuple[int, int, int]]:
    """(first page, page count, packet size) pieces of a run: full 0x5000 packets, then 4 KiB ones."""
    if run.shared:
        return [(run.first, run.count, 0)]
    full = run.count // PACKET_PAGES * PACKET_PAGES
    out = []
    if full:
        out.append((run.first, full, PACKET_PAGES * PAGE_SIZE))
    if run.count > full:
        out.append((run.first + full, run.count - full, PAGE_SIZE))
    return out


def _ranges(mask: np.ndarray) -> list[list[int]]:
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(idx)]))
    return [[int(idx[s]), int(e - s)] for s, e in zip(starts, ends, strict=True)]


def _reason(exc: Exception) -> str:
    if isinstance(exc, MigrationError | FirmwareError | StreamError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# --- the target --------------------------------------------------------------------------


class IncomingMigration:
    """Listens (port 0 allowed; tcp: IPv4/IPv6 or unix:), accepts one source, and rebuilds the
    guest through RECEIVE_*. `where` is a URI or the listening sockets `uri.listen` made."""

    def __init__(self, vm: LabVm, where: str | list[socket.socket], emit: Emit,
                 discard: Callable[[LabVm], None]) -> None:
        self.vm = vm
        self.emit = emit
        self.discard = discard
        if isinstance(where, str):
            try:
                where = uri.listen(uri.parse(where, incoming=True))
            except (uri.UriError, uri.ConnectError) as exc:
                raise MigrationError(str(exc)) from None
        self.listeners = where
        self.socket_address = uri.describe_listeners(where)
        self.source_state = "running"  # QEMU's global state of the source, until it says otherwise
        self.stats = Stats(vm.mem_bytes, status="none")
        self.thread = threading.Thread(target=self._run, name=f"migrate-in-{vm.name}", daemon=True)
        # READY sent: every page is in. If the link dies before FINISHED, the source may already be
        # SENT (it got READY) or may have cancelled (it did not): only someone who can ask the
        # source may decide, so the guest is held, neither runnable nor discarded.
        self.ready_sent = False
        self.held = False

    def start(self) -> None:
        self.thread.start()

    def info(self) -> dict[str, Any]:
        with self.stats.lock:
            status = self.stats.status
            info: dict[str, Any] = {} if status == "none" else {"status": status}
            if status in ("none", "active"):
                info["socket-address"] = [dict(a) for a in self.socket_address]
            if self.stats.error_desc:
                info["error-desc"] = self.stats.error_desc
            return info

    def close(self) -> None:
        for listener in self.listeners:
            with contextlib.suppress(OSError):
                listener.close()

    def _accept(self) -> socket.socket:
        """The first source to connect to any listener (OSError once they are closed)."""
        with selectors.DefaultSelector() as sel:
            for listener in self.listeners:
                sel.register(listener, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select(timeout=1.0):
                    sock, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    return sock
                if all(listener.fileno() < 0 for listener in self.listeners):
                    raise OSError("the incoming migration was closed")

    def _set_status(self, status: str, error: str | None = None) -> None:
        with self.stats.lock:
            self.stats.status = status
            self.stats.error_desc = error
        self.emit("MIGRATION", {"status": status})

    def _run(self) -> None:
        vm = self.vm
        sock = None
        try:
            try:
                sock = self._accept()
            except (OSError, ValueError):
                return  # the VM was closed while waiting
            finally:
                self.close()
            _tune(sock)
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            self._set_status("active")
            self._receive(sock)
        except Exception as exc:
            reason = _reason(exc)
            if sock is not None:
                with contextlib.suppress(OSError):
                    stream.send_frame(sock, Frame.ERROR, reason.encode()[:4096])
            if self.ready_sent and not isinstance(exc, MigrationError):
                self.held = True
                self._set_status("failed", f"{reason}; the guest is held here with every page: "
                                 "x-sev-receive-finish runs it if the source is SENT, quit discards it")
                return
            self._set_status("failed", reason)
            self.discard(vm)  # like QEMU, a failed incoming VM does not stay around
        finally:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    def _receive(self, conn: socket.socket) -> None:
        vm, psp = self.vm, self.vm.psp
        # Buffered: small frames of a dirty pass come out of one recv, big ones bypass the buffer.
        # makefile("rb") with a buffer size is a BufferedReader; typeshed's overloads give a
        # Literal buffering that type, any other int only IOBase.
        sock = cast(io.BufferedReader, conn.makefile("rb", buffering=FLUSH_BYTES))
        magic = stream.recv_exact(sock, len(stream.MAGIC), "stream header")
        if bytes(magic) != stream.MAGIC:
            raise StreamError("this is not a lab migration stream (bad magic)")
        kind, payload = stream.recv_frame(sock)
        if kind is not Frame.HELLO:
            raise StreamError(f"expected HELLO, got {kind.name}")
        try:
            hello = json.loads(payload)
            mem, sev = int(hello["mem"]), bool(hello["sev"])
            shared = [(int(a), int(b)) for a, b in hello["shared"]]
        except (ValueError, KeyError, TypeError):
            raise StreamError("HELLO frame is not the expected JSON") from None
        if mem != vm.mem_bytes:
            raise MigrationError(f"{vm.name}: the source guest has {mem >> 20} MiB, this VM {vm.mem_bytes >> 20} MiB")
        if sev != vm.sev:
            raise MigrationError(f"{vm.name}: the source guest {'is' if sev else 'is not'} an SEV guest, this VM differs")
        with vm.lock:
            vm.shared[:] = not sev
            for first, count in shared:
                if first < 0 or count < 0 or first + count > vm.pages:
                    raise StreamError("HELLO's shared map lies outside guest memory")
                vm.shared[first:first + count] = True
            vm.states[:] = np.where(vm.shared, PageState.SHARED_UNSENT, PageState.PRIVATE_UNSENT)
        vm.workload.rate = float(hello.get("dirty-rate") or 0)
        if sev:
            kind, payload = stream.recv_frame(sock)
            if kind is not Frame.SEV_START:
                raise StreamError(f"expected SEV_START, got {kind.name}")
            policy, pdh, session = stream.unpack_sev_start(payload)
            vm.policy = policy
            handle = psp.call(psp.fw.receive_start, policy, pdh, session, vm.memory).handle
            if not psp.claim_session(bytes(session[:16])):
                psp.raw(psp.fw.decommission, handle)
                raise MigrationError(f"replayed stream refused: {psp.host} already received the session with "
                                     f"nonce {bytes(session[:16]).hex()}; accepting it again would clone the guest")
            vm.handle = handle
        while True:
            kind, payload = stream.recv_frame(sock)
            if kind is Frame.PRIVATE:
                if not sev:
                    raise StreamError("PRIVATE pages for a guest without SEV")
                gpa, headers, trans, packet = stream.unpack_private(payload)
                self._check_range(gpa, len(trans), shared=False)
                psp.call(psp.fw.receive_pages, _handle(vm), gpa, headers, trans, packet_size=packet)
                self._mark(gpa, len(trans), PageState.PRIVATE_SENT)
            elif kind is Frame.SHARED:
                if len(payload) < 8:
                    raise StreamError("SHARED frame is truncated")
                (gpa,) = struct.unpack_from(">Q", payload, 0)
                n = len(payload) - 8
                self._check_range(gpa, n, shared=True)
                vm.memory[gpa:gpa + n] = np.frombuffer(payload, dtype=np.uint8, offset=8)
                self._mark(gpa, n, PageState.SHARED_SENT)
            elif kind is Frame.PASS:
                pass  # a QEMU target announces no passes; the frame only marks the stream
            elif kind is Frame.STATE:
                state = bytes(payload).decode("ascii", "replace")
                if state not in HANDED_OVER_STATES:
                    raise StreamError(f"the source handed over an unknown run state {state[:40]!r}")
                self.source_state = state
            elif kind is Frame.COMPLETE:
                self.ready_sent = True
                stream.send_frame(conn, Frame.READY)
            elif kind is Frame.FINISHED:
                self._complete()
                with contextlib.suppress(OSError):
                    stream.send_frame(conn, Frame.DONE)
                return
            elif kind is Frame.ABORT and self.ready_sent:
                # the source cancelled after READY (it never reached SEND_FINISH): not a hold
                self.ready_sent = False
                raise MigrationError(f"the source aborted: {payload.decode(errors='replace')}")
            elif kind is Frame.ABORT:
                raise MigrationError(f"the source aborted: {payload.decode(errors='replace')}")
            else:
                raise StreamError(f"unexpected {kind.name} frame from the source")

    def _complete(self) -> None:
        vm = self.vm
        if vm.sev:
            vm.psp.call(vm.psp.fw.receive_finish, _handle(vm))
        vm.incoming = False
        # QEMU: a running source means "run if autostart" (-S, stop and cont decide); any other
        # state is taken over as it was. The run state is set (RESUME) before "completed".
        if self.source_state == "running":
            vm.set_status("running" if vm.autostart else "paused")
        else:
            vm.set_status(self.source_state)
        self._set_status("completed")

    def finish_held(self) -> None:
        """x-sev-receive-finish: the caller has seen the source SENT (or stopped, plain)."""
        if not self.held:
            raise MigrationError(f"{self.vm.name}: no held incoming guest to finish")
        self.held = False
        self._complete()

    def _check_range(self, gpa: int, length: int, *, shared: bool) -> None:
        vm = self.vm
        if gpa % PAGE_SIZE or length % PAGE_SIZE or length == 0 or gpa + length > vm.mem_bytes:
            raise StreamError(f"pages at 0x{gpa:x}+0x{length:x} lie outside guest memory or are not page-aligned")
        kinds = vm.shared[gpa // PAGE_SIZE:(gpa + length) // PAGE_SIZE]
        if (kinds != shared).any():
            raise StreamError(f"pages at 0x{gpa:x} arrive as {'shared' if shared else 'private'} but the map says otherwise")

    def _mark(self, gpa: int, length: int, state: PageState) -> None:
        with self.vm.lock:
            self.vm.states[gpa // PAGE_SIZE:(gpa + length) // PAGE_SIZE] = state
