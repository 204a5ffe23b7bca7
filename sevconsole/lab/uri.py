"""Migration URIs read, connected and listened on as QEMU 7.2 does, with its sentences.

`parse` is what `migrate` and `migrate-incoming` check before they answer (QEMU's socket_parse
and inet_parse): a bad URI is refused at once. Connecting happens later, in the migration's
thread, and its failures are QEMU's too:

    tcp:HOST:PORT   tcp:[IPv6]:PORT   unix:PATH     (served)
    fd:NAME         "File descriptor named 'NAME' has not been found" (no getfd in the lab)
    vsock:, rdma:, exec:                              (read like QEMU, then refused: not modelled)
"""

from __future__ import annotations

import contextlib
import re
import socket
from dataclasses import dataclass

CONNECT_TIMEOUT_S = 120.0
LISTEN_BACKLOG = 1


class UriError(Exception):
    """A URI QEMU refuses before answering; `recorded` says whether QEMU keeps the sentence as
    the failed migration's error-desc (it does not for an unknown protocol)."""

    def __init__(self, sentence: str, *, recorded: bool = True) -> None:
        super().__init__(sentence)
        self.recorded = recorded


class ConnectError(Exception):
    """Connecting or listening failed; the sentence is QEMU's."""


@dataclass(frozen=True)
class Address:
    kind: str  # inet | unix | vsock
    host: str = ""
    port: str = ""
    path: str = ""

    def describe(self) -> str:
        return self.path if self.kind == "unix" else f"{self.host}:{self.port}"


_HOST_PORT = re.compile(r"([^:]{1,64}):([^,]{1,32})")
_V6 = re.compile(r"\[([^\]]{1,64})\]:([^,]{1,32})")
_NO_HOST = re.compile(r":([^,]{1,32})")
_VSOCK = re.compile(r"([^:]{1,32}):([^,]{1,32})")


def inet_parse(text: str) -> Address:
    """QEMU's inet_parse (its sscanf patterns); options after the port are accepted and ignored."""
    if text.startswith(":"):
        m = _NO_HOST.match(text)
        if not m:
            raise UriError(f"error parsing port in address '{text}'")
        return Address("inet", "", m.group(1))
    if text.startswith("["):
        m = _V6.match(text)
        if not m:
            raise UriError(f"error parsing IPv6 address '{text}'")
        return Address("inet", m.group(1), m.group(2))
    m = _HOST_PORT.match(text)
    if not m:
        raise UriError(f"error parsing address '{text}'")
    return Address("inet", m.group(1), m.group(2))


def socket_parse(text: str) -> Address:
    if text.startswith("unix:"):
        if not text[5:]:
            raise UriError("invalid Unix socket address")
        return Address("unix", path=text[5:])
    if text.startswith("fd:"):
        if not text[3:]:
            raise UriError("invalid file descriptor address")
        raise UriError(f"File descriptor named '{text[3:]}' has not been found")
    if text.startswith("vsock:"):
        rest = text[6:]
        m = _VSOCK.match(rest)
        if not m:
            raise UriError(f"error parsing address '{rest}'")
        if m.end() != len(rest):
            raise UriError(f"trailing characters in address '{rest}'")
        return Address("vsock", m.group(1), m.group(2))
    return inet_parse(text[4:] if text.startswith("tcp:") else text)


def parse(uri: str, *, incoming: bool) -> Address:
    """The address of a `migrate` / `migrate-incoming` URI, or UriError with QEMU's sentence."""
    if uri.startswith("tcp:"):
        return socket_parse(uri[4:])
    if uri.startswith(("unix:", "vsock:")):
        return socket_parse(uri)
    if uri.startswith("rdma:"):
        try:
            inet_parse(uri[5:])
        except UriError:
            raise UriError(f"RDMA ERROR: bad RDMA migration address '{uri[5:]}'") from None
        raise UriError("the lab does not model RDMA migration; use tcp: or unix:")
    if uri.startswith("exec:"):
        raise UriError("the lab does not run exec: migration commands; use tcp: or unix:")
    if uri.startswith("fd:"):
        raise UriError(f"File descriptor named '{uri[3:]}' has not been found")
    if incoming:
        raise UriError(f"unknown migration protocol: {uri}")
    raise UriError("Parameter 'uri' expects a valid migration protocol", recorded=False)


def connect(addr: Address) -> socket.socket:
    """A connected stream socket, or ConnectError in QEMU's words."""
    if addr.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(addr.path)
        except OSError as exc:
            sock.close()
            raise ConnectError(f"Failed to connect to '{addr.path}': {exc.strerror or exc}") from None
        return sock
    if addr.kind == "vsock":  # QEMU reads the numbers only now
        for what, text in (("cid", addr.host), ("port", addr.port)):
            if not text.isdigit() or int(text) > 0xFFFFFFFF:
                raise ConnectError(f"Failed to parse {what} '{text}'")
        raise ConnectError(f"Failed to connect to '{addr.describe()}': the lab does not model vsock")
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_CANONNAME | socket.AI_ADDRCONFIG)
    except socket.gaierror as exc:
        raise ConnectError(f"address resolution failed for {addr.host}:{addr.port}: {exc.strerror}") from None
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    why = (last.strerror or str(last)) if last is not None else "no address"
    raise ConnectError(f"Failed to connect to '{addr.host}:{addr.port}': {why}")


def listen(addr: Address) -> list[socket.socket]:
    """Listening sockets for an incoming migration (one per resolved address, as QEMU's
    QIONetListener opens them), or ConnectError in QEMU's words."""
    if addr.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(addr.path)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ConnectError(f"Failed to bind socket to {addr.path}: {exc.strerror or exc}") from None
        return [sock]
    if addr.kind == "vsock":
        raise ConnectError("the lab does not model vsock; use tcp: or unix:")
    try:
        infos = socket.getaddrinfo(addr.host or None, addr.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConnectError(f"address resolution failed for {addr.host}:{addr.port}: {exc.strerror}") from None
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == 98:  # EADDRINUSE: QEMU tried its whole (one-port) range
                    raise ConnectError(f"Failed to find an available port: {exc.strerror}") from None
                raise ConnectError(f"Failed to bind socket: {exc.strerror or exc}") from None
            sock.listen(LISTEN_BACKLOG)
    except ConnectError:
        for sock in out:
            sock.close()
        raise
    return out


def describe_listeners(socks: list[socket.socket]) -> list[dict[str, object]]:
    """query-migrate's socket-address on a target, newest first as QEMU lists them."""
    out: list[dict[str, object]] = []
    for sock in socks:
        if sock.family == socket.AF_UNIX:
            out.insert(0, {"path": sock.getsockname(), "type": "unix"})
            continue
        host, port = sock.getsockname()[:2]
        flag = "ipv6" if sock.family == socket.AF_INET6 else "ipv4"
        out.insert(0, {"port": str(port), flag: True, "host": host, "type": "inet"})
    return out
