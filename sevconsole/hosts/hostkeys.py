"""Host keys: the system known_hosts files read-only, plus the console's own file it may append to.

Unknown key -> `UnknownHostKey` (accepted only when the operator gave its fingerprint);
changed key -> `HostKeyChanged`, always refused, whatever the operator passed.
Files are read line by line: a malformed line is skipped with a warning naming file and line
(`HostKeyStore.warnings`, and the `logging` module once per process), the other lines still count.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import paramiko
from paramiko.pkey import UnknownKeyType

from sevconsole.boundedio import KNOWN_HOSTS_LIMIT, BoundedReadError, read_bounded
from sevconsole.hosts.errors import HostKeyChanged, UnknownHostKey
from sevconsole.textsafe import escape_controls


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: SHA256:<base64 without padding> of the public key blob."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_id(address: str, port: int) -> str:
    """The name known_hosts files use: bare for port 22, `[addr]:port` otherwise."""
    return address if port == 22 else f"[{address}]:{port}"


def system_known_hosts() -> tuple[Path, ...]:
    return (Path.home() / ".ssh" / "known_hosts", Path("/etc/ssh/ssh_known_hosts"))


_log = logging.getLogger(__name__)
_warned: set[str] = set()  # each bad line is said once per process, however many stores read it
_warned_lock = threading.Lock()
MARKERS = ("@cert-authority", "@revoked")


def _warn(message: str, into: list[str]) -> None:
    into.append(message)
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    _log.warning("%s", message)


def _hashed_name_ok(name: str) -> bool:
    """`|1|salt|hash`, both base64 SHA-1 sized: paramiko asserts on anything else at lookup time."""
    if not name.startswith("|1|"):
        return True
    parts = name.split("|")
    if len(parts) != 4:
        return False
    try:
        return all(len(base64.b64decode(p, validate=True)) == 20 for p in parts[2:])
    except (binascii.Error, ValueError):
        return False


def _parse_line(line: str) -> tuple[list[str], paramiko.PKey | None, str]:
    """(host names, key, why skipped). A key of a type paramiko does not know is skipped quietly."""
    fields = line.split()
    if fields[0] in MARKERS:
        return [], None, f"{fields[0]} lines are not supported by the console"
    if len(fields) < 3:
        return [], None, "expected `hosts key-type base64-key`"
    names, key_type, blob = fields[0].split(","), fields[1], fields[2]
    bad = next((n for n in names if not n or not _hashed_name_ok(n)), None)
    if bad is not None:
        return [], None, f"the host name {escape_controls(bad)[:60]!r} is malformed"
    try:
        data = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return [], None, "the key is not valid base64"
    try:
        key = paramiko.PKey.from_type_string(key_type, data)
    except UnknownKeyType:
        return [], None, ""
    except Exception as exc:  # noqa: BLE001 - key parsers raise many types on bad bytes
        return [], None, f"the {escape_controls(key_type)[:40]} key cannot be decoded ({type(exc).__name__})"
    return names, key, ""


class KnownHosts:
    """The keys of one known_hosts file by host name (plain or hashed `|1|salt|hash`)."""

    def __init__(self) -> None:
        self._plain: dict[str, list[paramiko.PKey]] = {}
        self._hashed: list[tuple[bytes, bytes, paramiko.PKey]] = []

    def add(self, name: str, key: paramiko.PKey) -> None:
        if name.startswith("|1|"):
            salt, digest = (base64.b64decode(p) for p in name.split("|")[2:4])
            self._hashed.append((salt, digest, key))
        else:
            self._plain.setdefault(name, []).append(key)

    def lookup(self, name: str) -> list[paramiko.PKey]:
        found = list(self._plain.get(name, ()))
        for salt, digest, key in self._hashed:
            if hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest):
                found.append(key)
        return found


def _load(path: Path, warnings: list[str]) -> KnownHosts:
    """Line by line, so one bad line costs that line only (paramiko's own `load` drops the rest of
    the file on some errors and lets others escape at lookup time)."""
    keys = KnownHosts()
    try:
        data = read_bounded(path, KNOWN_HOSTS_LIMIT, "known_hosts file")
    except BoundedReadError as exc:
        if not exc.missing:
            # An unreadable or odd file must not stop discovery; it just knows nothing.
            _warn(f"{exc}; its keys are not used", warnings)
        return keys
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.decode("utf-8", "replace").strip()
        if not line or line.startswith("#"):
            continue
        names, key, why = _parse_line(line)
        if key is None:
            if why:
                _warn(f"{path}:{number}: {why}; line skipped", warnings)
            continue
        for name in names:
            keys.add(name, key)
    return keys


class HostKeyStore:
    """Thread-safe: discovery checks many hosts at once and may append accepted keys."""

    def __init__(self, own_file: Path, *, system_files: Iterable[Path] | None = None,
                 accept: Iterable[str] = ()) -> None:
        self.own_file = Path(own_file)
        self.system_files = tuple(system_known_hosts() if system_files is None else system_files)
        self.accepted = frozenset(accept)  # fingerprints the operator accepted up front
        self._lock = threading.Lock()
        # Sentences about skipped lines ("FILE:LINE: why; line skipped"); also logged once each.
        self.warnings: list[str] = []
        self._system = [_load(p, self.warnings) for p in self.system_files]
        self._own = _load(self.own_file, self.warnings)

    def _entries(self, name: str) -> dict[str, list[paramiko.PKey]]:
        """Known keys by type, the system files first (a host may have several of one type)."""
        found: dict[str, list[paramiko.PKey]] = {}
        for keys in (*self._system, self._own):
            for key in keys.lookup(name):
                found.setdefault(key.get_name(), []).append(key)
        return found

    def known_types(self, address: str, port: int) -> list[str]:
        with self._lock:
            return list(self._entries(host_id(address, port)))

    def check(self, host: str, address: str, port: int, key: paramiko.PKey) -> None:
        """Return when the key is known (or accepted now); raise otherwise."""
        name = host_id(address, port)
        offered = fingerprint(key)
        info = {"host_id": name, "key_type": key.get_name(), "fingerprint": offered,
                "key_base64": key.get_base64()}
        with self._lock:
            known = self._entries(name)
            same_type = known.get(key.get_name(), [])
            if same_type:
                if any(k.asbytes() == key.asbytes() for k in same_type):
                    return
                old = fingerprint(same_type[0])
                raise HostKeyChanged(
                    host,
                    f"{host} ({name}): the host key CHANGED: known {key.get_name()} {old}, now offered "
                    f"{offered}. Refused. If the host was really reinstalled, remove its line from "
                    f"{self.own_file} or ~/.ssh/known_hosts after checking the new key out of band.",
                    known_fingerprint=old, **info)
            if offered in self.accepted:
                self._add(name, key)
                return
        others = f" (known keys of other types: {', '.join(sorted(known))})" if known else ""
        raise UnknownHostKey(
            host,
            f"{host} ({name}): unknown host key {key.get_name()} {offered}{others}. Check it "
            f"out of band (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub on the host) and accept "
            f"it with --accept-host-key {offered}.",
            **info)

    def accept(self, host_id_: str, key_type: str, key_base64: str) -> None:
        """The operator accepted this key (the console's modal): remember it in the own file."""
        key = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_base64))
        with self._lock:
            self._add(host_id_, key)

    def _add(self, name: str, key: paramiko.PKey) -> None:
        # Append one line rather than rewrite: the file may hold entries paramiko cannot parse.
        self.own_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.own_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write(f"{name} {key.get_name()} {key.get_base64()}\n")
        self._own.add(name, key)
