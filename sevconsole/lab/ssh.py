"""The lab host's SSH server (paramiko): public-key auth with the lab client key, helper commands only.

A lab host serves the remote helper protocol natively (docs/internals.md): an exec request
must be `python3 -c SCRIPT BLOB COMMAND ARGS...`; the BLOB is ignored and COMMAND is answered
with the same outputs as hosts/helper.py would give (JSON with sorted keys, one line; failures
`{"error": ...}` with exit 1; an unknown command exits 127 with a message on stderr). Anything
else exits 127. No shell, no port forwarding, no subsystems.

Like sshd's LoginGraceTime and MaxStartups: a connection must be authenticated within
`login_grace_s` of its accept (banner, key exchange and authentication together) or it is closed,
and beyond `max_unauthenticated` connections still authenticating, new ones are closed at once.
"""

from __future__ import annotations

import base64
import contextlib
import json
import select
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    MSG_CHANNEL_REQUEST,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

if TYPE_CHECKING:
    from .host import LabHost

PYTHONS = ("python3", "python", "/usr/bin/python3", "/usr/local/bin/python3")
COMMANDS = ("launch-incoming", "probe", "qmp", "stop")
GREETING_WAIT_S = 2.0  # as hosts/helper.py: a QMP socket silent this long is held by another client
LOGIN_GRACE_S = 15.0  # accept -> authenticated; the console's own client allows 5+10+10 s in all
MAX_UNAUTHENTICATED = 16  # connections still authenticating; more are closed at once
REAP_INTERVAL_S = 0.25


class _Transport(paramiko.Transport):
    """Tells the server the moment authentication succeeds (it stops counting as pending)."""

    on_authenticated: Callable[[], None] | None = None

    def _auth_trigger(self) -> None:
        # paramiko's private hook (its AuthHandler calls it on success): not in types-paramiko
        super()._auth_trigger()  # type: ignore[misc]
        if self.on_authenticated is not None:
            self.on_authenticated()


@dataclass
class _Pending:
    deadline: float
    sock: socket.socket
    transport: paramiko.Transport | None = None


class _Failure(Exception):
    pass


def _emit(chan: paramiko.Channel, obj: dict[str, Any]) -> None:
    chan.sendall((json.dumps(obj, sort_keys=True) + "\n").encode())


class _Server(paramiko.ServerInterface):
    def __init__(self, lab: LabSshServer) -> None:
        self.lab = lab

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_none(self, username: str) -> int:
        return AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        return AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        # The key is the credential; any user name is accepted (the inventory says "lab").
        ok = key.get_name() == self.lab.client_key.get_name() and key.asbytes() == self.lab.client_key.asbytes()
        return AUTH_SUCCESSFUL if ok else AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        # Run it only once paramiko has sent the request's SUCCESS reply (see _after_request):
        # a fast command's exit status and close must not overtake that reply.
        channel.__dict__["_lab_command"] = command.decode("utf-8", errors="replace")  # popped there
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        return False

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        return False

    def check_port_forward_request(self, address: str, port: int) -> int:
        return False

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple[str, int],
                                           destination: tuple[str, int]) -> int:
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


class LabSshServer:
    def __init__(self, host: LabHost, *, host_key: str, client_pub: str, user: str = "lab",
                 login_grace_s: float = LOGIN_GRACE_S, max_unauthenticated: int = MAX_UNAUTHENTICATED) -> None:
        self.host = host
        self.login_grace_s = login_grace_s
        self.max_unauthenticated = max_unauthenticated
        self.host_key = paramiko.Ed25519Key.from_private_key_file(host_key)
        kind, data = Path(client_pub).read_text().split()[:2]
        self.client_key = paramiko.PKey.from_type_string(kind, base64.b64decode(data))
        self.user = user
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._transports: set[paramiko.Transport] = set()
        self._held: set[paramiko.Channel] = set()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}  # connections not yet authenticated, by a serial
        self._serial = 0
        self._has_pending = threading.Event()

    @property
    def unauthenticated(self) -> int:
        with self._lock:
            return len(self._pending)

    def start(self) -> None:
        threading.Thread(target=self._accept, name="ssh-accept", daemon=True).start()
        threading.Thread(target=self._reap, name="ssh-reaper", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            transports = list(self._transports)
        for t in transports:
            with contextlib.suppress(Exception):
                t.close()
        self._has_pending.set()  # let the reaper see the stop

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                full = len(self._pending) >= self.max_unauthenticated
                if not full:
                    self._serial += 1
                    serial = self._serial
                    self._pending[serial] = _Pending(time.monotonic() + self.login_grace_s, sock)
                    self._has_pending.set()
            if full:  # no thread, no banner: a flood of idle connections costs nothing
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            threading.Thread(target=self._session, args=(sock, serial), name="ssh-session", daemon=True).start()

    def _authenticated(self, serial: int) -> None:
        with self._lock:
            self._pending.pop(serial, None)

    def _reap(self) -> None:
        """Close connections that did not authenticate within the grace time."""
        while not self._stopped.is_set():
            self._has_pending.wait()
            if self._stopped.wait(REAP_INTERVAL_S):
                return
            now = time.monotonic()
            with self._lock:
                late = [(k, p) for k, p in self._pending.items() if p.deadline <= now]
                for serial, _ in late:
                    del self._pending[serial]
                if not self._pending:
                    self._has_pending.clear()
            for _, pending in late:
                with contextlib.suppress(Exception):
                    if pending.transport is not None:
                        pending.transport.close()
                    else:
                        pending.sock.close()

    def _session(self, sock: socket.socket, serial: int) -> None:
        try:
            self._serve(sock, serial)
        finally:
            with self._lock:
                self._pending.pop(serial, None)

    def _serve(self, sock: socket.socket, serial: int) -> None:
        try:
            t = _Transport(sock)
        except OSError:  # reaped (its socket closed) before it started
            return
        t.banner_timeout = self.login_grace_s + 5  # the reaper is the one clock (it uncounts, then closes)
        t.on_authenticated = lambda: self._authenticated(serial)
        with self._lock:
            pending = self._pending.get(serial)
            if pending is not None:
                pending.transport = t
        if pending is None:  # reaped before it started
            t.close()
            return
        t.add_server_key(self.host_key)
        # Channel requests are answered in the transport thread after the ServerInterface hook
        # returns; this per-transport handler starts the command after that answer is out.
        # _channel_handler_table: private to paramiko's Transport and absent from types-paramiko.
        table = dict(t._channel_handler_table)  # type: ignore[attr-defined]
        plain = table[MSG_CHANNEL_REQUEST]

        def _after_request(chan: paramiko.Channel, m: paramiko.Message) -> None:
            plain(chan, m)
            command = chan.__dict__.pop("_lab_command", None)
            if command is not None:
                threading.Thread(target=self.run_command, args=(chan, command), name="ssh-exec", daemon=True).start()

        table[MSG_CHANNEL_REQUEST] = _after_request
        t._channel_handler_table = table  # type: ignore[attr-defined]  # as above
        with self._lock:
            self._transports.add(t)
        try:
            t.start_server(server=_Server(self))
            while t.is_active() and not self._stopped.is_set():
                chan = t.accept(timeout=1.0)
                # paramiko keeps channels by weak reference: hold each one until its command
                # has run, or a second channel opened on the same connection can vanish.
                with self._lock:
                    self._held = {c for c in self._held if not c.closed}
                    if chan is not None:
                        self._held.add(chan)
        except (paramiko.SSHException, EOFError, OSError):
            pass
        finally:
            with self._lock:
                self._transports.discard(t)
            with contextlib.suppress(Exception):
                t.close()

    # --- the helper's commands --------------------------------------------------------------

    def run_command(self, chan: paramiko.Channel, command: str) -> None:
        code = 1
        try:
            code = self._dispatch(chan, command)
        except Exception as exc:  # never let one request take the host down
            with contextlib.suppress(Exception):
                _emit(chan, {"error": f"helper command failed: {type(exc).__name__}: {exc}"})
            code = 1
        finally:
            with contextlib.suppress(Exception):
                chan.send_exit_status(code)
                chan.shutdown_write()
                chan.close()
            with self._lock:
                self._held.discard(chan)

    def _dispatch(self, chan: paramiko.Channel, command: str) -> int:
        try:
            words = shlex.split(command)
        except ValueError:
            words = []
        if len(words) < 4 or words[0] not in PYTHONS or words[1] != "-c":
            chan.sendall_stderr(
                f"sevconsole lab: this host runs only the sevconsole remote helper; refused: {command[:200]!r}\n".encode())
            return 127
        argv = words[4:]
        if not argv or argv[0] not in COMMANDS:
            chan.sendall_stderr("sevconsole helper: unknown command {!r}; known: {}\n".format(
                argv[0] if argv else "", ", ".join(COMMANDS)).encode())
            return 127
        name, args = argv[0], argv[1:]
        try:
            if name == "probe":
                return self._probe(chan, args)
            if name == "qmp":
                return self._qmp(chan, args)
            if name == "launch-incoming":
                return self._launch_incoming(chan)
            return self._stop(chan, args)
        except _Failure as exc:
            _emit(chan, {"error": str(exc)})
            return 1

    def _probe(self, chan: paramiko.Channel, args: list[str]) -> int:
        i = 0
        while i < len(args):  # --qmp-glob is accepted: the lab knows its own sockets
            if args[i] == "--qmp-glob" and i + 1 < len(args):
                i += 2
            else:
                raise _Failure(f"probe: unexpected argument {args[i]!r}")
        result = self.host.probe()
        result["python"] = "{}.{}".format(*sys.version_info[:2])
        _emit(chan, result)
        return 0

    def _qmp(self, chan: paramiko.Channel, args: list[str]) -> int:
        if len(args) != 1:
            raise _Failure("qmp: expected one socket path")
        path = args[0]
        # the helper's answers (hosts/helper.py cmd_qmp), word for word: a VM that is gone, and a
        # monitor held by another client (QEMU, and the lab, greet one client at a time)
        if not self.host.qmp_path_known(path):
            _emit(chan, {"error": f"nothing listens on the QMP socket {path}: its QEMU is not running",
                         "gone": True})
            return 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            raise _Failure(f"cannot connect to the QMP socket {path}: {exc.strerror or exc}") from None
        ready, _, _ = select.select([sock], [], [], GREETING_WAIT_S)
        if not ready:
            sock.close()
            _emit(chan, {"error": f"the QMP socket {path} sent no greeting within {GREETING_WAIT_S:g} s: it is held "
                                  "by another client, probably libvirt (QEMU serves one QMP client at a time)",
                         "held": True})
            return 1
        done = threading.Event()

        def pump_in() -> None:  # channel -> socket
            with contextlib.suppress(Exception):
                while True:
                    data = chan.recv(65536)
                    if not data:
                        break
                    sock.sendall(data)
            done.set()

        def pump_out() -> None:  # socket -> channel
            with contextlib.suppress(Exception):
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    chan.sendall(data)
            done.set()

        for fn in (pump_in, pump_out):
            threading.Thread(target=fn, name="ssh-qmp", daemon=True).start()
        while not done.wait(1.0):  # either side closing ends the bridge
            if self._stopped.is_set():
                break
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        return 0

    def _launch_incoming(self, chan: paramiko.Channel) -> int:
        data = bytearray()
        while len(data) < (1 << 20):
            chunk = chan.recv(65536)
            if not chunk:
                break
            data += chunk
        try:
            request = json.loads(data)
            argv = [str(a) for a in request["argv"]]
        except (ValueError, KeyError, TypeError):
            raise _Failure('launch-incoming expects {"argv": [...]} on stdin') from None
        from .host import LabHostError

        try:
            answer = self.host.launch_incoming({"argv": argv})
        except LabHostError as exc:
            raise _Failure(str(exc)) from None
        vm = self.host.vms.get(answer["pid"])
        answer["log"] = self.host.config.get("log", "")
        answer["argv"] = list(vm.argv) if vm else argv
        _emit(chan, answer)
        return 0

    def _stop(self, chan: paramiko.Channel, args: list[str]) -> int:
        if len(args) != 1 or not args[0].isdigit():
            raise _Failure("stop: expected one process id")
        if self.host.stop_pid(int(args[0])):
            _emit(chan, {"stopped": True})
        else:
            _emit(chan, {"stopped": False, "reason": "no such process"})
        return 0
