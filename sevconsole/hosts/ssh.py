"""SSH with paramiko: one transport per host, reused for every channel.

`resolve()` turns a `HostSpec` into an `Endpoint` with ~/.ssh/config applied (HostName, User,
Port, IdentityFile, ProxyJump, recursively). `SshConnection.open()` connects with explicit
connect, banner, key-exchange, auth and channel timeouts, checks the host key against a
`HostKeyStore`, and authenticates with identity files and the ssh-agent. `SshPool` keeps one
connection per endpoint (jump hosts included) and is safe to share between threads.
"""

from __future__ import annotations

import getpass
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from sevconsole.hosts import passphrases
from sevconsole.hosts.errors import (
    HelperError,
    HostUnreachable,
    SshAuthError,
    SshError,
    SshTimeout,
)
from sevconsole.hosts.hostkeys import HostKeyStore, host_id
from sevconsole.hosts.inventory import HostSpec

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
MAX_JUMPS = 8
# What one command may print (stdout and stderr together). A probe answer is some KiB, a few
# hundred with many VMs; a host sending more is broken or hostile and must not fill our memory.
MAX_OUTPUT = 4 * 1024 * 1024


@dataclass(frozen=True)
class Timeouts:
    """Seconds. A dead host costs at most connect (or banner+handshake+auth) of these."""

    connect: float = 5.0
    banner: float = 5.0
    handshake: float = 10.0
    auth: float = 10.0
    channel: float = 10.0
    command: float = 30.0


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to connect, after ~/.ssh/config; `jump` lists hops outermost first."""

    name: str
    address: str
    port: int
    user: str
    identities: tuple[Path, ...] = ()
    jump: tuple[Endpoint, ...] = ()

    @property
    def key(self) -> tuple[str, str, int, tuple[tuple[str, str, int], ...]]:
        return (self.user, self.address, self.port, tuple((j.user, j.address, j.port) for j in self.jump))

    @property
    def host_id(self) -> str:
        return host_id(self.address, self.port)

    def where(self) -> str:
        return f"{self.name} ({self.user}@{self.address}:{self.port})"


def resolve(spec: HostSpec, *, config: paramiko.SSHConfig | None = None,
            inventory: dict[str, HostSpec] | None = None, _depth: int = 0) -> Endpoint:
    """Apply ~/.ssh/config under what the inventory says (inventory values win)."""
    if _depth > MAX_JUMPS:
        raise SshError(spec.name, f"{spec.name}: more than {MAX_JUMPS} jump hosts; is there a ProxyJump loop?")
    cfg = config.lookup(spec.address) if config is not None else {}
    address = cfg.get("hostname", spec.address)
    port = spec.port or int(cfg.get("port", 22))
    user = spec.user or cfg.get("user") or getpass.getuser()
    identities = spec.identity or tuple(Path(p).expanduser() for p in cfg.get("identityfile", []))
    jump_text = spec.jump or cfg.get("proxyjump")
    hops: list[Endpoint] = []
    if jump_text and jump_text.lower() != "none":
        for token in jump_text.split(","):
            token = token.strip()
            hop_spec = inventory[token] if inventory and token in inventory else _parse_jump(token)
            hop = resolve(hop_spec, config=config, inventory=inventory, _depth=_depth + 1)
            # A hop's own hops come first: x -> a -> b -> target.
            hops.extend(hop.jump)
            hops.append(Endpoint(hop.name, hop.address, hop.port, hop.user, hop.identities))
    return Endpoint(spec.name, address, port, user, identities, tuple(hops))


def _parse_jump(token: str) -> HostSpec:
    user, _, rest = token.rpartition("@")
    host, port = rest, None
    if rest.startswith("["):  # [ipv6]:port
        host, _, tail = rest[1:].partition("]")
        port = int(tail[1:]) if tail.startswith(":") and tail[1:].isdigit() else None
    elif rest.count(":") == 1:
        host, _, text = rest.partition(":")
        port = int(text) if text.isdigit() else None
    return HostSpec(name=token, address=host, port=port, user=user or None)


@dataclass
class CommandResult:
    rc: int
    stdout: bytes
    stderr: bytes
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()


@dataclass
class SshConnection:
    """One authenticated transport to one host. Channels are opened on demand and never pooled."""

    endpoint: Endpoint
    transport: paramiko.Transport
    timeouts: Timeouts
    connect_ms: float = 0.0
    via: SshConnection | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def alive(self) -> bool:
        return self.transport.is_active() and self.transport.is_authenticated()

    @classmethod
    def open(cls, endpoint: Endpoint, keys: HostKeyStore, timeouts: Timeouts | None = None, *,
             via: SshConnection | None = None, use_agent: bool = True) -> SshConnection:
        timeouts = timeouts or Timeouts()
        where = endpoint.where()
        started = time.monotonic()
        sock = _open_socket(endpoint, timeouts, via)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = timeouts.banner
        transport.handshake_timeout = timeouts.handshake
        transport.auth_timeout = timeouts.auth
        transport.channel_timeout = timeouts.channel
        known = keys.known_types(endpoint.address, endpoint.port)
        if known:
            # Ask for a key type we know first, so a known host is checked, not "unknown".
            opts = transport.get_security_options()
            offered = list(opts.key_types)
            wanted = [t for t in offered if _base_type(t) in known]
            opts.key_types = wanted + [t for t in offered if t not in wanted]
        try:
            try:
                transport.start_client(timeout=timeouts.banner + timeouts.handshake)
            except paramiko.SSHException as exc:
                text = str(exc)
                if "banner" in text.lower() or "timeout" in text.lower() or "timed out" in text.lower():
                    raise SshTimeout(endpoint.name, f"{where}: no SSH banner or key exchange within "
                                     f"{timeouts.banner + timeouts.handshake:g} s ({text}); is sshd "
                                     f"running there, and is it the SSH port?") from None
                raise SshError(endpoint.name, f"{where}: SSH negotiation failed: {text}") from None
            except (EOFError, OSError) as exc:
                raise SshError(endpoint.name, f"{where}: the server closed the connection during the "
                               f"SSH handshake ({exc or type(exc).__name__}).") from None
            keys.check(endpoint.name, endpoint.address, endpoint.port, transport.get_remote_server_key())
            _authenticate(transport, endpoint, timeouts, use_agent)
        except BaseException:
            transport.close()
            raise
        return cls(endpoint, transport, timeouts, (time.monotonic() - started) * 1000, via)

    def ping(self) -> float:
        """Round trip of one SSH global request, in ms (the server answers 'unsupported')."""
        started = time.monotonic()
        done = threading.Event()

        def keepalive() -> None:
            self.transport.global_request("keepalive@openssh.com", wait=True)
            done.set()

        worker = threading.Thread(target=keepalive, daemon=True)
        worker.start()
        if not done.wait(self.timeouts.channel):
            raise SshTimeout(self.name, f"{self.endpoint.where()}: no answer to a keepalive within "
                             f"{self.timeouts.channel:g} s")
        return (time.monotonic() - started) * 1000

    def open_exec(self, command: str) -> paramiko.Channel:
        """A session channel running `command` (no pty). Raises typed errors."""
        if not self.transport.is_active():
            raise SshError(self.name, f"{self.endpoint.where()}: the SSH connection is closed.")
        # One channel set-up at a time per transport: a server that holds an opened channel only
        # weakly until its exec request arrives (paramiko servers, like the lab's) would lose it
        # if a second channel opened in between. It costs one round trip per channel.
        with self._lock:
            return self._open_exec(command)

    def _open_exec(self, command: str) -> paramiko.Channel:
        try:
            channel = self.transport.open_session(timeout=self.timeouts.channel)
        except paramiko.ChannelException as exc:
            raise SshError(self.name, f"{self.endpoint.where()}: the server refused a new channel "
                           f"({exc.text}); MaxSessions reached?") from None
        except paramiko.SSHException as exc:
            if "timeout" in str(exc).lower():
                raise SshTimeout(self.name, f"{self.endpoint.where()}: no channel within "
                                 f"{self.timeouts.channel:g} s") from None
            raise SshError(self.name, f"{self.endpoint.where()}: cannot open a channel: {exc}") from None
        # exec_command waits for the server's answer with no timeout of its own: guard it.
        guard = threading.Timer(self.timeouts.channel, channel.close)
        guard.start()
        try:
            channel.exec_command(command)
        # paramiko's _wait_for_event asserts its event is still set, which a transport dying in
        # another thread can falsify: that AssertionError is a dropped channel like the others.
        except (paramiko.SSHException, EOFError, AssertionError) as exc:
            channel.close()
            raise SshError(self.name, f"{self.endpoint.where()}: the server refused to run a "
                           f"command ({exc or 'channel closed'}).") from None
        finally:
            guard.cancel()
        return channel

    def run(self, command: str, stdin: bytes | None = None, timeout: float | None = None,
            max_output: int = MAX_OUTPUT) -> CommandResult:
        """Run a command to completion; output is read concurrently so neither pipe can stall.

        More than `max_output` bytes of output close the channel and raise HelperError."""
        timeout = self.timeouts.command if timeout is None else timeout
        started = time.monotonic()
        channel = self.open_exec(command)
        out: list[bytes] = []
        err: list[bytes] = []
        budget = _Budget(max_output, channel)
        readers = [threading.Thread(target=_drain, args=(channel.recv, out, budget), daemon=True),
                   threading.Thread(target=_drain, args=(channel.recv_stderr, err, budget), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
        except (OSError, paramiko.SSHException):
            pass  # the command may exit without reading its input; its status says what happened
        finished = channel.status_event.wait(timeout)
        if budget.exceeded:
            channel.close()
            raise self._too_much(max_output)
        if not finished:
            channel.close()
            raise SshTimeout(self.name, f"{self.endpoint.where()}: a remote command did not finish "
                             f"within {timeout:g} s")
        for reader in readers:
            reader.join(self.timeouts.channel)
        if budget.exceeded:  # the last bytes came with the exit status
            channel.close()
            raise self._too_much(max_output)
        rc = channel.recv_exit_status()
        channel.close()
        if rc == -1 and not self.transport.is_active():
            raise SshError(self.name, f"{self.endpoint.where()}: the SSH connection dropped during a command")
        return CommandResult(rc, b"".join(out), b"".join(err), time.monotonic() - started)

    def _too_much(self, limit: int) -> HelperError:
        return HelperError(self.name, f"{self.endpoint.where()}: a remote command printed more than "
                           f"{limit / (1024 * 1024):g} MiB, far more than the helper ever does; stopped "
                           "reading. Check what runs as python3 for that user on the host.")

    def close(self) -> None:
        self.transport.close()


class _Budget:
    """Bytes one command may still send; overdrawn, it closes the channel (which wakes `run`)."""

    def __init__(self, limit: int, channel: paramiko.Channel) -> None:
        self.left = limit
        self.channel = channel
        self.exceeded = False
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            self.left -= n
            if self.left >= 0:
                return True
            self.exceeded = True
        self.channel.close()
        return False


def _drain(recv: object, into: list[bytes], budget: _Budget) -> None:
    while True:
        try:
            data = recv(65536)  # type: ignore[operator]
        except (OSError, EOFError, paramiko.SSHException):
            return
        if not data or not budget.take(len(data)):
            return
        into.append(data)


def _base_type(key_type: str) -> str:
    # rsa-sha2-* signatures use an ssh-rsa key; certificates are not pinned here.
    return "ssh-rsa" if key_type.startswith("rsa-sha2") else key_type


def _open_socket(endpoint: Endpoint, timeouts: Timeouts, via: SshConnection | None) -> socket.socket | paramiko.Channel:
    where = endpoint.where()
    if via is not None:
        try:
            return via.transport.open_channel("direct-tcpip", (endpoint.address, endpoint.port),
                                              ("127.0.0.1", 0), timeout=timeouts.connect)
        except paramiko.ChannelException as exc:
            raise HostUnreachable(endpoint.name, f"{where}: the jump host {via.endpoint.where()} could not "
                                  f"reach it ({exc.text}).") from None
        except paramiko.SSHException as exc:
            raise HostUnreachable(endpoint.name, f"{where}: no connection through the jump host "
                                  f"{via.endpoint.where()} within {timeouts.connect:g} s ({exc}).") from None
    try:
        sock = socket.create_connection((endpoint.address, endpoint.port), timeout=timeouts.connect)
    except TimeoutError:
        raise HostUnreachable(endpoint.name, f"{where}: no TCP connection within {timeouts.connect:g} s; "
                              "is the host up and the port open?") from None
    except ConnectionRefusedError:
        raise HostUnreachable(endpoint.name, f"{where}: connection refused; is sshd listening on port "
                              f"{endpoint.port}?") from None
    except socket.gaierror as exc:
        raise HostUnreachable(endpoint.name, f"{where}: the name {endpoint.address!r} does not resolve "
                              f"({exc.strerror}).") from None
    except OSError as exc:
        raise HostUnreachable(endpoint.name, f"{where}: cannot connect: {exc.strerror or exc}.") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _identity_keys(endpoint: Endpoint) -> tuple[list[tuple[str, paramiko.PKey]], list[Path], list[str]]:
    """Keys from the endpoint's identity files, or the default ~/.ssh ones when none are named;
    the passphrase-protected ones apart (unlocked only if nothing else gets in)."""
    paths = list(endpoint.identities)
    explicit = bool(paths)
    if not paths:
        paths = [Path.home() / ".ssh" / n for n in DEFAULT_IDENTITIES]
    keys, locked, notes = [], [], []
    for path in paths:
        if not path.is_file():
            if explicit:
                notes.append(f"identity {path} does not exist")
            continue
        try:
            keys.append((str(path), paramiko.PKey.from_path(str(path))))
        except (paramiko.PasswordRequiredException, TypeError):  # paramiko 3 raises TypeError for these
            locked.append(path)
        except (paramiko.SSHException, OSError, ValueError) as exc:
            notes.append(f"identity {path} cannot be read: {exc}")
    return keys, locked, notes


def _authenticate(transport: paramiko.Transport, endpoint: Endpoint, timeouts: Timeouts,
                  use_agent: bool) -> None:
    """Plain identity files, then the agent's keys, then the passphrase-protected identities
    (hosts/passphrases.py: a known passphrase, else asked), so nobody is asked for a passphrase
    when the agent holds the key."""
    where = endpoint.where()
    keys, locked, notes = _identity_keys(endpoint)
    tried: list[str] = []
    agent = None
    if use_agent:
        try:
            agent = paramiko.Agent()
            keys += [(f"agent key {k.fingerprint}", k) for k in agent.get_keys()]
        except paramiko.SSHException as exc:
            notes.append(f"ssh-agent unusable: {exc}")
    deadline = [time.monotonic() + timeouts.auth]

    def accepted(label: str, key: paramiko.PKey) -> bool:
        if time.monotonic() > deadline[0]:
            raise SshTimeout(endpoint.name, f"{where}: authentication took more than {timeouts.auth:g} s")
        tried.append(label)
        try:
            transport.auth_publickey(endpoint.user, key)
        except paramiko.BadAuthenticationType as exc:
            raise SshAuthError(endpoint.name, f"{where}: the server does not accept public keys for "
                               f"{endpoint.user!r} (it allows: {', '.join(exc.allowed_types)}).") from None
        except paramiko.AuthenticationException as exc:
            if "timeout" in str(exc).lower():
                raise SshTimeout(endpoint.name, f"{where}: authentication took more than "
                                 f"{timeouts.auth:g} s") from None
            return False
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SshError(endpoint.name, f"{where}: the connection failed during authentication: "
                           f"{exc or type(exc).__name__}") from None
        return transport.is_authenticated()

    try:
        if any(accepted(label, key) for label, key in keys):
            return
        for path in locked:
            key = passphrases.unlock(path, notes)
            deadline[0] = time.monotonic() + timeouts.auth  # a person may have taken a while
            if key is not None and accepted(f"{path} (unlocked)", key):
                return
    finally:
        if agent is not None:
            agent.close()
    offered = ", ".join(tried) if tried else "no keys at all"
    extra = f" ({'; '.join(notes)})" if notes else ""
    raise SshAuthError(endpoint.name, f"{where}: authentication refused for user {endpoint.user!r}; "
                       f"offered {offered}{extra}. Check `user` and `identity` in the inventory, "
                       "or that the key is in the host's authorized_keys.")


class SshPool:
    """One connection per endpoint, opened on first use; jump hosts are shared like any other."""

    def __init__(self, keys: HostKeyStore, timeouts: Timeouts | None = None, *, use_agent: bool = True) -> None:
        self.keys = keys
        self.timeouts = timeouts or Timeouts()
        self.use_agent = use_agent
        self._conns: dict[tuple, SshConnection] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, endpoint: Endpoint) -> SshConnection:
        key = endpoint.key
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # two workers asking for one host share one transport
            conn = self._conns.get(key)
            if conn is not None and conn.alive:
                return conn
            via = None
            for depth, hop in enumerate(endpoint.jump):
                hop_ep = Endpoint(hop.name, hop.address, hop.port, hop.user, hop.identities,
                                  endpoint.jump[:depth])
                via = self.get(hop_ep)  # its errors name the jump host, which is what to fix
            conn = SshConnection.open(endpoint, self.keys, self.timeouts, via=via, use_agent=self.use_agent)
            self._conns[key] = conn
            return conn

    def drop(self, endpoint: Endpoint) -> None:
        with self._guard:
            conn = self._conns.pop(endpoint.key, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._guard:
            conns, self._conns = list(self._conns.values()), {}
        for conn in reversed(conns):  # inner hops after the hosts that ride on them
            conn.close()

    def __enter__(self) -> SshPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
