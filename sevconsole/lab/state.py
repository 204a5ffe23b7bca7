"""The lab's state folder: keys and roots made once, inventory and known_hosts written per start.

    DIR/inventory.toml         [[host]] entries the console reads (lab = true)
    DIR/known_hosts            OpenSSH format: [127.0.0.1]:PORT ssh-ed25519 ...
    DIR/client_key(.pub)       the one key the lab hosts accept (ed25519, OpenSSH format)
    DIR/lab-root/              the lab's own AMD-format root: lab-ark.cert, lab-ask.cert (and the
                               ASK's private key, which only lab hosts read to sign their CEKs)
    DIR/keys/oca-<domain>.pem  one OCA key per owner domain (hosts of a domain share it)
    DIR/hosts/<name>/          a host's SSH host key, its config and its log
    DIR/run/                   QMP sockets (or a short temporary folder if DIR is too deep
                               for a UNIX socket path)
    DIR/.sevconsole-lab        the marker that says the folder is a lab's (see check_state_dir)

The folder is the user's own and private: a new one is made 0700; an existing one must belong to
the user, not be writable by group or others, and be empty or already a lab's, so that
`--state-dir ~/.ssh` never overwrites a real known_hosts.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sevconsole.sev.certs import generate_lab_root

SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "<vm>-<pid>.qmp"
MARKER = ".sevconsole-lab"


class StateDirError(ValueError):
    """A state folder the lab must not write into; `str()` is the sentence for the operator."""


def is_lab_dir(root: Path) -> bool:
    """The lab's marker, or (folders made before the marker existed) its root and client key."""
    return (root / MARKER).is_file() or (
        (root / "lab-root" / "lab-ark.cert").is_file() and (root / "client_key").is_file())


def check_state_dir(root: Path) -> None:
    """Refuse a folder the lab would write into unsafely: someone else's, group/world writable,
    or holding files of something that is not a lab. A missing folder is fine (it is made 0700)."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateDirError(f"state folder {root} cannot be used: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state folder {root} is not a folder; give a new or empty folder")
    if st.st_uid != os.getuid():
        raise StateDirError(f"state folder {root} belongs to uid {st.st_uid}, not to you; give a folder "
                            "of your own (the lab keeps private keys there)")
    if st.st_mode & 0o022:
        raise StateDirError(f"state folder {root} is writable by group or others (mode "
                            f"{stat.S_IMODE(st.st_mode):o}); run `chmod go-w {root}` or give a private folder")
    try:
        empty = next(os.scandir(root), None) is None
    except OSError as exc:
        raise StateDirError(f"state folder {root} cannot be read: {exc.strerror or exc}") from None
    if not empty and not is_lab_dir(root):
        raise StateDirError(f"state folder {root} is not empty and is not a lab's (no {MARKER} in it); "
                            "the lab would overwrite its inventory.toml and known_hosts: give a new or "
                            "empty folder")


@dataclass(frozen=True)
class LabPaths:
    root: Path

    @property
    def inventory(self) -> Path:
        return self.root / "inventory.toml"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def client_key(self) -> Path:
        return self.root / "client_key"

    @property
    def client_pub(self) -> Path:
        return self.root / "client_key.pub"

    @property
    def lab_root(self) -> Path:
        return self.root / "lab-root"

    @property
    def ark(self) -> Path:
        return self.lab_root / "lab-ark.cert"

    @property
    def ask(self) -> Path:
        return self.lab_root / "lab-ask.cert"

    @property
    def ask_key(self) -> Path:
        return self.lab_root / "lab-ask-key.pem"

    def oca_key(self, domain: str) -> Path:
        return self.root / "keys" / f"oca-{domain}.pem"

    def host_dir(self, name: str) -> Path:
        return self.root / "hosts" / name

    def host_key(self, name: str) -> Path:
        return self.host_dir(name) / "ssh_host_ed25519_key"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _ed25519_files(key_path: Path, comment: str) -> None:
    if key_path.exists():
        return
    key = ed25519.Ed25519PrivateKey.generate()
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    Path(str(key_path) + ".pub").write_bytes(pub + b" " + comment.encode() + b"\n")


def prepare(root: Path, hosts: list[str], domains: set[str]) -> LabPaths:
    """Creates what must persist across starts: keys and the lab root (made once per folder)."""
    paths = LabPaths(Path(root).resolve())
    check_state_dir(paths.root)
    paths.root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        paths.root.mkdir(mode=0o700)
    check_state_dir(paths.root)  # made just now by someone else: same rules
    marker = paths.root / MARKER
    if not marker.is_file():
        marker.write_text("A sevconsole lab's state folder: `sevconsole lab --state-dir` may reuse it.\n")
    _ed25519_files(paths.client_key, "sevconsole-lab-client")
    if not (paths.ark.exists() and paths.ask.exists() and paths.ask_key.exists()):
        lab = generate_lab_root()
        paths.lab_root.mkdir(parents=True, exist_ok=True)
        _write_private(paths.ask_key, lab.ask_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        paths.ask.write_bytes(lab.ask.to_bytes())
        paths.ark.write_bytes(lab.ark.to_bytes())
        (paths.lab_root / "README").write_text(
            "The sevconsole LAB ROOT: an AMD-format ARK/ASK made for this lab only.\n"
            "Trust it only for lab hosts; it is not an AMD key.\n")
    for domain in sorted(domains):
        key_path = paths.oca_key(domain)
        if not key_path.exists():
            key = ec.generate_private_key(ec.SECP384R1())
            _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    for name in hosts:
        _ed25519_files(paths.host_key(name), f"sevconsole-lab-{name}")
    return paths


def run_dir(paths: LabPaths) -> tuple[Path, bool]:
    """Where the QMP sockets go, and whether it is a temporary folder to remove at stop."""
    preferred = paths.root / "run"
    if len(str(preferred)) + 40 <= SOCKET_PATH_MAX:
        preferred.mkdir(exist_ok=True)
        return preferred, False
    return Path(tempfile.mkdtemp(prefix="sevlab-")), True


def host_public_key(paths: LabPaths, name: str) -> str:
    """`ssh-ed25519 AAAA...` of a host."""
    kind, data = Path(str(paths.host_key(name)) + ".pub").read_text().split()[:2]
    return f"{kind} {data}"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_inventory(paths: LabPaths, hosts: list[tuple[str, int, str]], user: str = "lab") -> None:
    """hosts: (name, ssh port, QMP socket folder). Written atomically."""
    lines = [
        "# Written by `sevconsole lab`: the lab's hosts, reached over SSH like any host.",
        f"lab_root = {_toml_str(str(paths.ark))}",
        f"known_hosts = {_toml_str(str(paths.known_hosts))}",
        "",
    ]
    for name, port, sockets in hosts:
        lines += [
            "[[host]]",
            f"name = {_toml_str(name)}",
            'address = "127.0.0.1"',
            f"port = {port}",
            f"user = {_toml_str(user)}",
            f"identity = {_toml_str(str(paths.client_key))}",
            "lab = true",
            f"qmp_sockets = [{_toml_str(str(Path(sockets) / '*.qmp'))}]",
            "",
        ]
    _atomic_text(paths.inventory, "\n".join(lines))


def write_known_hosts(paths: LabPaths, hosts: list[tuple[str, int]]) -> None:
    lines = [f"[127.0.0.1]:{port} {host_public_key(paths, name)}" for name, port in hosts]
    _atomic_text(paths.known_hosts, "\n".join(lines) + "\n")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
