"""QMP over SSH: an exec channel runs a byte bridge to the UNIX socket on the host, and a local
socketpair joins that channel to qemu.qmp's `QMPClient.connect(sock)`.

    async with open_qmp(conn, "/run/vm.qmp") as qmp:
        status = await qmp.execute("query-status")

The bridge is the helper's `qmp PATH`; where the helper cannot run (no python3) it falls back
to `socat - UNIX-CONNECT:PATH`, then `nc -U PATH`. Two daemon threads pump bytes between the
channel and the socketpair; when either side closes, the other is closed, so a dropped link
reaches the client as EOF and surfaces here as `QmpLinkError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import socket
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

import paramiko
from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.protocol import ConnectError, StateError

from sevconsole.hosts.errors import QmpCommandError, QmpLinkError
from sevconsole.hosts.remote import helper_command
from sevconsole.hosts.ssh import SshConnection

GREETING_TIMEOUT = 10.0


class QmpSocketGone(QmpLinkError):
    """Nothing listens on the socket (or it does not exist): its QEMU has exited."""


class Bridge:
    """A channel running a byte bridge on the host, joined to one end of a local socketpair."""

    def __init__(self, channel: paramiko.Channel, first: bytes, how: str) -> None:
        self.channel = channel
        self.how = how  # which bridge command ran: helper, socat or nc
        self.local, self._inner = socket.socketpair()
        self._inner.sendall(first)  # the greeting bytes already read from the channel
        self.dropped = threading.Event()  # the remote side ended (not a close we asked for)
        self._closing = threading.Event()
        self._ended = 0  # pump threads finished; the last one closes the inner socket
        self._ended_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._down, daemon=True, name="qmp-down"),
                         threading.Thread(target=self._up, daemon=True, name="qmp-up")]
        for thread in self._threads:
            thread.start()

    def _down(self) -> None:  # host -> client
        try:
            while True:
                data = self.channel.recv(65536)
                if not data:
                    break
                self._inner.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        if not self._closing.is_set():
            self.dropped.set()
        with contextlib.suppress(OSError):
            self._inner.shutdown(socket.SHUT_WR)
        self._end()

    def _up(self) -> None:  # client -> host
        try:
            while True:
                data = self._inner.recv(65536)
                if not data:
                    break
                self.channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        # The client hung up: end the remote bridge (stdin EOF makes it exit), then the channel.
        self._closing.set()
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.channel.shutdown_write()
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.channel.close()  # on a dead transport, close() itself raises EOFError
        self._end()

    def _end(self) -> None:
        with self._ended_lock:
            self._ended += 1
            last = self._ended == 2
        if last:
            with contextlib.suppress(OSError):
                self._inner.close()

    def close(self) -> None:
        """Close both ends now (the pumps then finish on their own)."""
        self._closing.set()
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.channel.close()
        for sock in (self.local, self._inner):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.local.close()


def _bridge_commands(path: str) -> list[tuple[str, str]]:
    quoted = shlex.quote(path)
    return [("helper", helper_command("qmp", path)),
            ("socat", f"socat - UNIX-CONNECT:{quoted}"),
            ("nc", f"nc -U {quoted}")]


def _read_first(channel: paramiko.Channel, timeout: float) -> bytes | None:
    """The first bytes from the bridge (b"" when it ended at once), or None on timeout."""
    channel.settimeout(timeout)
    try:
        return channel.recv(65536)
    except TimeoutError:
        return None
    finally:
        channel.settimeout(None)


def open_bridge(conn: SshConnection, path: str, *, greeting_timeout: float = GREETING_TIMEOUT) -> Bridge:
    """Blocking: start a bridge to `path` and wait for QEMU's greeting. Typed errors only."""
    where = conn.endpoint.where()
    tried: list[str] = []
    for how, command in _bridge_commands(path):
        channel = conn.open_exec(command)
        first = _read_first(channel, greeting_timeout)
        if first is None:
            channel.close()
            raise QmpLinkError(conn.name, f"{where}: QMP socket {path} sent no greeting within "
                               f"{greeting_timeout:g} s; another client may hold it (QEMU serves one "
                               "QMP client at a time).", path=path)
        if first.startswith(b'{"error"'):  # the helper ran but could not reach the socket
            channel.close()
            try:
                answer = json.loads(first.decode())
                reason, gone = str(answer["error"])[:300], answer.get("gone") is True
                held = answer.get("held") is True
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
                reason, gone, held = first[:200].decode("utf-8", "replace"), False, False
            if gone:
                raise QmpSocketGone(conn.name, f"{where}: {reason}.", path=path)
            if held:  # the bridge has already left: nothing stays behind on the host
                raise QmpLinkError(conn.name, f"{where}: {reason}.", path=path)
            raise QmpLinkError(conn.name, f"{where}: {reason}. Is the VM running?", path=path)
        if first:
            if not first.lstrip().startswith(b"{"):
                channel.close()
                raise QmpLinkError(conn.name, f"{where}: {path} did not answer like QMP "
                                   f"({first[:60]!r}).", path=path)
            return Bridge(channel, first, how)
        # The bridge ended before any byte: find out why, and try the next one if it is missing.
        rc = channel.recv_exit_status()
        err = b""
        with contextlib.suppress(OSError, paramiko.SSHException):
            while chunk := channel.recv_stderr(65536):
                err += chunk
        channel.close()
        text = err.decode("utf-8", "replace").strip()
        if rc in (126, 127):
            tried.append(f"{how} not available")
            continue
        raise QmpLinkError(conn.name, f"{where}: cannot open QMP socket {path} ({how} bridge, exit "
                           f"{rc}{': ' + text.splitlines()[-1] if text else ''}). Is the VM running?",
                           path=path)
    raise QmpLinkError(conn.name, f"{where}: no way to reach QMP socket {path}: {'; '.join(tried)}. "
                       "Install python3 or socat on the host.", path=path)


class QmpLink:
    """A negotiated QMP session over SSH. `execute` raises QmpCommandError or QmpLinkError."""

    def __init__(self, conn: SshConnection, path: str, client: QMPClient, bridge: Bridge) -> None:
        self.conn = conn
        self.path = path
        self.client = client
        self.bridge = bridge

    @property
    def host(self) -> str:
        return self.conn.name

    def _dropped(self, what: str, exc: BaseException | None = None) -> QmpLinkError:
        cause = f" ({type(exc).__name__}: {exc})" if exc and str(exc) else ""
        return QmpLinkError(self.host, f"{self.conn.endpoint.where()}: the QMP link to {self.path} "
                            f"dropped during {what}{cause}; the SSH connection or QEMU went away.",
                            path=self.path)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None, *,
                      timeout: float | None = 30.0) -> Any:
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QmpCommandError(self.host, f"{self.host}: {command} on {self.path}: {exc.error_class}: "
                                  f"{exc}", command=command, error_class=exc.error_class,
                                  desc=str(exc)) from None
        except TimeoutError:
            raise QmpLinkError(self.host, f"{self.host}: {command} on {self.path} got no answer within "
                               f"{timeout:g} s.", path=self.path) from None
        except (ExecInterruptedError, StateError, EOFError, OSError) as exc:
            raise self._dropped(command, exc) from None

    def listener(self, names: str | list[str] | None = None) -> contextlib.AbstractContextManager[EventListener]:
        """qemu.qmp's event listener (use as `with qmp.listener("MIGRATION") as events:`)."""
        return self.client.listener(names)

    @property
    def dropped(self) -> bool:
        return self.bridge.dropped.is_set()

    async def close(self) -> None:
        with contextlib.suppress(QMPError, EOFError, OSError):
            await self.client.disconnect()
        self.bridge.close()


async def connect_qmp(conn: SshConnection, path: str, *, greeting_timeout: float = GREETING_TIMEOUT,
                      name: str | None = None) -> QmpLink:
    bridge = await asyncio.to_thread(open_bridge, conn, path, greeting_timeout=greeting_timeout)
    client = QMPClient(name or f"{conn.name}:{path}")
    try:
        await asyncio.wait_for(client.connect(bridge.local), greeting_timeout + conn.timeouts.channel)
    except (ConnectError, QMPError, TimeoutError, OSError, EOFError, AssertionError) as exc:
        # AssertionError: qemu.qmp asserts it is running once the session is set up; a link that
        # breaks in that instant (its reader already hung up) fails that assert instead of raising
        exc = exc if not isinstance(exc, AssertionError) else EOFError("the link closed during the handshake")
        bridge.close()
        with contextlib.suppress(QMPError, EOFError, OSError):
            await client.disconnect()
        raise QmpLinkError(conn.name, f"{conn.endpoint.where()}: QMP negotiation on {path} failed: "
                           f"{exc}", path=path) from None
    return QmpLink(conn, path, client, bridge)


@contextlib.asynccontextmanager
async def open_qmp(conn: SshConnection, path: str, **kw: Any) -> AsyncIterator[QmpLink]:
    link = await connect_qmp(conn, path, **kw)
    try:
        yield link
    finally:
        await link.close()


__all__ = ["Bridge", "QmpLink", "QmpSocketGone", "connect_qmp", "open_bridge", "open_qmp"]
