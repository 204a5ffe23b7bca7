"""Typed errors of the hosts layer. Each `str()` is one sentence naming the host and what to do."""

from __future__ import annotations

from dataclasses import dataclass


class HostError(Exception):
    """Something about one host went wrong. `.host` is the inventory name."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(message)
        self.host = host
        self.message = message

    def __str__(self) -> str:
        return self.message


class HostUnreachable(HostError):
    """TCP connection refused, timed out, or the name does not resolve."""


class SshTimeout(HostError):
    """The SSH banner, key exchange, authentication, a channel or a command took too long."""


class SshError(HostError):
    """The SSH protocol failed in some other way (dropped transport, channel refused)."""


class SshAuthError(HostError):
    """The server refused every credential offered."""


class HostKeyError(HostError):
    """Base of the host key problems; carries what the operator needs to decide."""

    def __init__(self, host: str, message: str, *, host_id: str, key_type: str,
                 fingerprint: str, key_base64: str) -> None:
        super().__init__(host, message)
        self.host_id = host_id  # known_hosts name: "addr" or "[addr]:port"
        self.key_type = key_type
        self.fingerprint = fingerprint  # OpenSSH form: SHA256:base64-no-padding
        self.key_base64 = key_base64


class UnknownHostKey(HostKeyError):
    """The host offered a key no known_hosts file has: accept only by an operator's decision."""


class HostKeyChanged(HostKeyError):
    """The host offered a key that differs from the known one: refused, always."""

    def __init__(self, host: str, message: str, *, known_fingerprint: str, **kw: str) -> None:
        super().__init__(host, message, **kw)
        self.known_fingerprint = known_fingerprint


class NoPython(HostError):
    """The host has no python3 on the SSH user's PATH, so the helper cannot run."""


class HelperError(HostError):
    """The remote helper reported an error or answered something that is not its protocol."""


class QmpLinkError(HostError):
    """A QMP link over SSH could not open, or dropped."""

    def __init__(self, host: str, message: str, *, path: str) -> None:
        super().__init__(host, message)
        self.path = path


class QmpCommandError(HostError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, host: str, message: str, *, command: str, error_class: str, desc: str) -> None:
        super().__init__(host, message)
        self.command = command
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class InventoryProblem:
    file: str
    line: int | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class InventoryError(ValueError):
    """A bad inventory: one problem per line (file, line, key, what is wrong)."""

    def __init__(self, problems: list[InventoryProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = tuple(problems)
