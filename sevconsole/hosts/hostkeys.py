"""Host keys: the system known_hosts files read-only, plus the console's own file it may append to.

Unknown key -> `UnknownHostKey` (accepted only when the operator gave its fingerprint);
changed key -> `HostKeyChanged`, always refused, whatever the operator passed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import paramiko

from sevconsole.hosts.errors import HostKeyChanged, UnknownHostKey


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: SHA256:<base64 without padding> of the public key blob."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_id(address: str, port: int) -> str:
    """The name known_hosts files use: bare for port 22, `[addr]:port` otherwise."""
    return address if port == 22 else f"[{address}]:{port}"


def system_known_hosts() -> tuple[Path, ...]:
    return (Path.home() / ".ssh" / "known_hosts", Path("/etc/ssh/ssh_known_hosts"))


def _load(path: Path) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    if path.is_file():
        # An unreadable or odd system file must not stop discovery; it just knows nothing.
        with contextlib.suppress(OSError, paramiko.SSHException, ValueError):
            keys.load(str(path))
    return keys


class HostKeyStore:
    """Thread-safe: discovery checks many hosts at once and may append accepted keys."""

    def __init__(self, own_file: Path, *, system_files: Iterable[Path] | None = None,
                 accept: Iterable[str] = ()) -> None:
        self.own_file = Path(own_file)
        self.system_files = tuple(system_known_hosts() if system_files is None else system_files)
        self.accepted = frozenset(accept)  # fingerprints the operator accepted up front
        self._lock = threading.Lock()
        self._system = [_load(p) for p in self.system_files]
        self._own = _load(self.own_file)

    def _entries(self, name: str) -> dict[str, paramiko.PKey]:
        found: dict[str, paramiko.PKey] = {}
        for keys in (*self._system, self._own):
            entry = keys.lookup(name)
            if entry:
                for key_type in entry:
                    found.setdefault(key_type, entry[key_type])
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
            same_type = known.get(key.get_name())
            if same_type is not None:
                if same_type.asbytes() == key.asbytes():
                    return
                old = fingerprint(same_type)
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
        self._own.add(name, key.get_name(), key)
