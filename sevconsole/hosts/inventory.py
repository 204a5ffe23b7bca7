"""The TOML inventory (`[[host]]` tables) and hosts taken from `~/.ssh/config`.

A bad inventory raises `InventoryError` with one `InventoryProblem` per problem (file, line,
key, what is wrong), all of them at once, so the operator fixes the file in one pass.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from sevconsole import paths
from sevconsole.boundedio import CONFIG_LIMIT, INVENTORY_LIMIT, BoundedReadError, read_text_bounded
from sevconsole.hosts.errors import InventoryError, InventoryProblem

HOST_KEYS = ("name", "address", "port", "user", "identity", "jump", "qmp_sockets", "labels", "lab",
             "shared_storage", "libvirt_uri", "libvirt_migration")
LIBVIRT_MODES = ("p2p", "client")
# Top level: the hosts, and optionally the known_hosts file and lab root this inventory goes with
# (a lab writes both; relative paths are relative to the inventory file).
TOP_LEVEL_KEYS = ("host", "known_hosts", "lab_root")


@dataclass(frozen=True)
class HostSpec:
    """One host as the operator wrote it. None means "not given": ~/.ssh/config or defaults fill it."""

    name: str
    address: str
    port: int | None = None
    user: str | None = None
    identity: tuple[Path, ...] = ()
    jump: str | None = None  # another inventory host's name, or ProxyJump syntax [user@]host[:port],...
    qmp_sockets: tuple[str, ...] = ()  # globs on the host, for QEMUs whose argv does not show them
    labels: tuple[str, ...] = ()
    lab: bool = False  # trust the lab root for this host's chain
    origin: str = ""  # "file:line" or "ssh-config", for messages
    # folders on the host holding disk images every host that may receive its VMs also sees: the
    # only place a migrated VM's -drive/-blockdev may name (engine/argv_policy.py)
    shared_storage: tuple[str, ...] = ()
    # libvirt: how another host's libvirt reaches this one's (a migration's destination; default
    # qemu+ssh://user@address:port/system), and how migrations from this host run: "p2p" (libvirt
    # to libvirt) or "client" (virsh on this host manages both ends)
    libvirt_uri: str | None = None
    libvirt_migration: str = "p2p"


@dataclass(frozen=True)
class Inventory:
    path: Path | None
    hosts: tuple[HostSpec, ...]
    known_hosts: Path | None = None  # the console's own known_hosts to use with these hosts
    lab_root: Path | None = None  # the lab ARK (file or folder) trusted for `lab = true` hosts

    def by_name(self) -> dict[str, HostSpec]:
        return {h.name: h for h in self.hosts}


class _Locator:
    """Line numbers for keys of the n-th [[host]] table (tomllib keeps none)."""

    HEADER = re.compile(r"^\s*\[\[\s*host\s*\]\]")
    TABLE = re.compile(r"^\s*\[")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.starts = [i for i, line in enumerate(self.lines) if self.HEADER.match(line)]

    def line(self, index: int | None, key: str | None = None) -> int | None:
        if index is None:
            if key is None:
                return None
            pattern = re.compile(rf"^\s*(\[+\s*)?\"?{re.escape(key)}\"?\s*[=\]]")
            return next((n + 1 for n, line in enumerate(self.lines) if pattern.match(line)), None)
        if index >= len(self.starts):
            return None
        start = self.starts[index]
        if key is None:
            return start + 1
        pattern = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        for n in range(start + 1, len(self.lines)):
            if self.TABLE.match(self.lines[n]):
                break
            if pattern.match(self.lines[n]):
                return n + 1
        return start + 1


def load_inventory(path: Path | str | None = None) -> Inventory:
    """Read an inventory file (default: paths.default_inventory())."""
    path = Path(path) if path is not None else paths.default_inventory()
    try:
        text = read_text_bounded(path, INVENTORY_LIMIT, "inventory")
    except BoundedReadError as exc:
        raise InventoryError([InventoryProblem(str(path), None, None, exc.reason)]) from None
    return parse_inventory(text, path)


def parse_inventory(text: str, path: Path) -> Inventory:
    fname = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else None
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise InventoryError([InventoryProblem(fname, line, None, f"not valid TOML: {reason}")]) from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise InventoryError([InventoryProblem(fname, None, None, "nested too deeply to be an inventory "
                                               "(arrays or tables inside each other thousands deep)")]) from None
    loc = _Locator(text)
    problems: list[InventoryProblem] = []

    def bad(index: int | None, key: str | None, message: str) -> None:
        problems.append(InventoryProblem(fname, loc.line(index, key), key, message))

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            bad(None, key, "unknown top-level key (expected [[host]] tables)")
    extras: dict[str, Path] = {}
    for key in ("known_hosts", "lab_root"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            bad(None, key, f"must be a path (a string), not {value!r}")
        elif not _relative(path.parent, value).exists():
            bad(None, key, f"no such file: {_relative(path.parent, value)}")
        else:
            extras[key] = _relative(path.parent, value)
    tables = data.get("host", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        bad(None, "host", "must be an array of tables: write each host as [[host]]")
        tables = []
    if not tables and not problems:
        bad(None, None, "no hosts: add a [[host]] table with at least name and address")
    base = path.parent
    hosts: list[HostSpec] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(tables):
        spec = _host(index, table, base, fname, loc, bad)
        name = table.get("name")
        if isinstance(name, str) and name.strip():
            name = name.strip()
            if name in seen:
                bad(index, "name", f"duplicate host name {name!r} (first at line {loc.line(seen[name], 'name')})")
                continue
            seen[name] = index
        if spec is not None:
            hosts.append(spec)
    names = {h.name for h in hosts}
    for spec in hosts:
        if spec.jump and spec.jump == spec.name:
            bad(seen[spec.name], "jump", "a host cannot be its own jump host")
        elif spec.jump and "@" not in spec.jump and ":" not in spec.jump and "," not in spec.jump \
                and spec.jump not in names and not _plausible_address(spec.jump):
            bad(seen[spec.name], "jump", f"{spec.jump!r} is neither a host of this inventory nor an address")
    if problems:
        raise InventoryError(problems)
    return Inventory(path, tuple(hosts), extras.get("known_hosts"), extras.get("lab_root"))


def _plausible_address(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9._-]+", text))


def _host(index: int, table: dict[str, Any], base: Path, fname: str, loc: _Locator, bad: Any) -> HostSpec | None:
    for key in table:
        if key not in HOST_KEYS:
            hint = next((k for k in HOST_KEYS if _close(k, key)), None)
            bad(index, key, "unknown key" + (f" (did you mean {hint!r}?)" if hint else
                                                   f"; known: {', '.join(HOST_KEYS)}"))

    def text(key: str, required: bool = False) -> str | None:
        value = table.get(key)
        if value is None:
            if required:
                bad(index, key, f"missing (every [[host]] needs {key})")
            return None
        if not isinstance(value, str) or not value.strip():
            bad(index, key, f"must be a non-empty string, not {value!r}")
            return None
        return value.strip()

    def strings(key: str) -> tuple[str, ...]:
        value = table.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            bad(index, key, f"must be a string or a list of strings, not {value!r}")
            return ()
        return tuple(value)

    name = text("name", required=True)
    address = text("address", required=True)
    user = text("user")
    jump = text("jump")
    port = table.get("port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
        bad(index, "port", f"must be a whole number from 1 to 65535, not {port!r}")
        port = None
    lab = table.get("lab", False)
    if not isinstance(lab, bool):
        bad(index, "lab", f"must be true or false, not {lab!r}")
        lab = False
    identity = tuple(_relative(base, p) for p in strings("identity"))
    for path in identity:
        if not path.is_file():
            bad(index, "identity", f"no such key file: {path}")
    qmp_sockets = strings("qmp_sockets")
    for pattern in qmp_sockets:
        if not pattern.startswith("/"):
            bad(index, "qmp_sockets", f"{pattern!r} must be an absolute path (a glob on the host)")
    labels = strings("labels")
    shared_storage = strings("shared_storage")
    for folder in shared_storage:
        if not folder.startswith("/") or not folder.strip("/") or ".." in folder.split("/") \
                or "," in folder or "//" in folder:
            bad(index, "shared_storage", f"{folder!r} must be an absolute folder on the host "
                "other than / itself (no '..', no ',')")
    shared_storage = tuple(f.rstrip("/") or "/" for f in shared_storage)
    libvirt_uri = text("libvirt_uri")
    if libvirt_uri is not None and not re.fullmatch(r"[a-z0-9+]+://[^\s'\"]*", libvirt_uri):
        bad(index, "libvirt_uri", f"{libvirt_uri!r} is not a libvirt URI (such as qemu+ssh://root@hv-b/system)")
        libvirt_uri = None
    libvirt_migration = text("libvirt_migration") or "p2p"
    if libvirt_migration not in LIBVIRT_MODES:
        bad(index, "libvirt_migration", f"must be one of {', '.join(LIBVIRT_MODES)}, not {libvirt_migration!r}")
        libvirt_migration = "p2p"
    if name is None or address is None:
        return None
    if not re.fullmatch(r"[A-Za-z0-9._@:+-]+", name):
        bad(index, "name", f"{name!r}: use letters, digits and . _ - only (it is typed on command lines)")
        return None
    return HostSpec(name=name, address=address, port=port, user=user, identity=identity, jump=jump,
                    qmp_sockets=qmp_sockets, labels=labels, lab=lab,
                    origin=f"{fname}:{loc.line(index)}", shared_storage=shared_storage,
                    libvirt_uri=libvirt_uri, libvirt_migration=libvirt_migration)


def _close(a: str, b: str) -> bool:
    """A one-edit typo (adress, usr, qmp_socket)."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) == 1
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def _relative(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


# ---------------------------------------------------------------- ~/.ssh/config


def ssh_config_path() -> Path:
    return Path.home() / ".ssh" / "config"


def load_ssh_config(path: Path | None = None) -> paramiko.SSHConfig | None:
    """~/.ssh/config (or `path`); None when there is none. A bad one raises InventoryError."""
    path = path or ssh_config_path()
    try:
        text = read_text_bounded(path, CONFIG_LIMIT, "ssh config")
    except BoundedReadError as exc:
        if exc.missing:
            return None
        raise InventoryError([InventoryProblem(str(path), None, None, exc.reason)]) from None
    try:
        return paramiko.SSHConfig.from_text(text)
    except paramiko.ssh_exception.ConfigParseError as exc:
        raise InventoryError([InventoryProblem(str(path), None, None, f"not a valid ssh config: {exc}")]) from None


def hosts_from_ssh_config(pattern: str | None = None, path: Path | None = None) -> tuple[HostSpec, ...]:
    """Concrete `Host` names of ~/.ssh/config (no wildcards or negations), filtered by a glob."""
    config = load_ssh_config(path)
    if config is None:
        where = path or ssh_config_path()
        raise InventoryError([InventoryProblem(str(where), None, None, "no such file (--ssh-config)")])
    names = sorted(n for n in config.get_hostnames() if not any(c in n for c in "*?!"))
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if not names:
        where = path or ssh_config_path()
        what = f"no Host entry matches {pattern!r}" if pattern else "no concrete Host entries"
        raise InventoryError([InventoryProblem(str(where), None, None, what)])
    return tuple(HostSpec(name=n, address=n, origin="ssh-config") for n in names)
