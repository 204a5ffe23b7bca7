"""Running the remote helper (hosts/helper.py) on a host over an SSH exec channel.

The helper is sent inline on every call: zlib-compressed, base64, as one argument of
`python3 -c ...` (the exact command line is fixed in docs/internals.md). Nothing is installed.
"""

from __future__ import annotations

import base64
import functools
import json
import shlex
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from sevconsole.hosts.errors import HelperError, NoPython
from sevconsole.hosts.ssh import CommandResult, SshConnection

BOOTSTRAP = "import base64,sys,zlib;exec(zlib.decompress(base64.b64decode(sys.argv.pop(1))))"


@functools.cache
def helper_blob() -> str:
    source = resources.files("sevconsole.hosts").joinpath("helper.py").read_bytes()
    return base64.b64encode(zlib.compress(source, 9)).decode()


def helper_command(command: str, *args: str) -> str:
    """The exact shell command line that runs one helper command on a host."""
    words = ["python3", "-c", BOOTSTRAP, helper_blob(), command, *args]
    return " ".join(shlex.quote(w) for w in words)


def lacks_python(result: CommandResult) -> bool:
    err = result.err_text.lower()
    return result.rc in (126, 127) and "python3" in err and (
        "not found" in err or "no such file" in err or "permission denied" in err)


def no_python_error(conn: SshConnection, result: CommandResult) -> NoPython:
    return NoPython(conn.name, f"{conn.endpoint.where()}: no python3 on the PATH of user "
                    f"{conn.endpoint.user!r} ({result.err_text or 'exit ' + str(result.rc)}). The "
                    "console's helper needs Python 3 (standard library only); install it there.")


def run_helper(conn: SshConnection, command: str, *args: str, stdin: bytes | None = None,
               timeout: float | None = None) -> dict[str, Any]:
    """Run one helper command and return its JSON answer; typed errors otherwise."""
    result = conn.run(helper_command(command, *args), stdin=stdin, timeout=timeout)
    if lacks_python(result):
        raise no_python_error(conn, result)
    where = conn.endpoint.where()
    try:
        answer = json.loads(result.text.strip().splitlines()[-1]) if result.text.strip() else None
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        answer = None
    if isinstance(answer, dict) and "error" in answer:
        raise HelperError(conn.name, f"{where}: {command}: {answer['error']}")
    if result.rc != 0 or not isinstance(answer, dict):
        detail = result.err_text.splitlines()[-1] if result.err_text else result.text.strip()[:200]
        raise HelperError(conn.name, f"{where}: the helper's {command} failed (exit {result.rc}): "
                          f"{detail or 'no output'}")
    return answer


def probe(conn: SshConnection, qmp_globs: tuple[str, ...] = ()) -> dict[str, Any]:
    args: list[str] = []
    for pattern in qmp_globs:
        args += ["--qmp-glob", pattern]
    answer = run_helper(conn, "probe", *args)
    if "helper" not in answer or not isinstance(answer.get("vms", []), list):
        raise HelperError(conn.name, f"{conn.endpoint.where()}: probe answered something that is not "
                          "the helper protocol (no 'helper' version or 'vms' list)")
    return answer


@dataclass(frozen=True)
class IncomingVm:
    """A target QEMU started with `-incoming defer`: same fields as the engine's IncomingVm."""

    pid: int
    qmp: str
    log: str | None = None


def launch_incoming(conn: SshConnection, argv: list[str] | tuple[str, ...], *,
                    directory: str | None = None, timeout: float = 20.0,
                    storage: tuple[str, ...] = ()) -> IncomingVm:
    """Start the target QEMU; `storage`: the host's shared storage folders (the inventory's), where
    the disk images `argv` names must be (the helper checks that each exists before starting)."""
    request: dict[str, Any] = {"argv": list(argv), "timeout": timeout}
    if directory:
        request["dir"] = directory
    if storage:
        request["storage"] = list(storage)
    answer = run_helper(conn, "launch-incoming", stdin=json.dumps(request).encode(),
                        timeout=timeout + conn.timeouts.channel)
    try:
        return IncomingVm(int(answer["pid"]), str(answer["qmp"]), answer.get("log"))
    except (KeyError, TypeError, ValueError):
        raise HelperError(conn.name, f"{conn.endpoint.where()}: launch-incoming answered without a "
                          "pid and QMP socket") from None


def stop(conn: SshConnection, pid: int, *, qmp: str | None = None) -> bool:
    """Stop QEMU `pid`; `qmp` (an incoming VM's socket from launch_incoming) is removed with its
    log even when that QEMU already exited by itself."""
    stdin = json.dumps({"qmp": qmp}).encode() if qmp else None
    return bool(run_helper(conn, "stop", str(int(pid)), stdin=stdin).get("stopped"))


def file_states(conn: SshConnection, paths: list[str], storage: tuple[str, ...]) -> dict[str, str]:
    """For each disk image path: "present", or the rest of a sentence saying why this host cannot
    use it (missing, outside its shared storage, a link leading out of it, unreadable)."""
    answer = run_helper(conn, "files", stdin=json.dumps({"paths": paths, "storage": list(storage)}).encode())
    files = answer.get("files")
    if not isinstance(files, dict):
        raise HelperError(conn.name, f"{conn.endpoint.where()}: files answered without a files object")
    return {p: str(files[p])[:300] if isinstance(files.get(p), str) else "was not reported" for p in paths}
