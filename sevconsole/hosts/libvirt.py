"""libvirt-managed hosts as the console sees them: the helper's libvirt part of a probe read into
VmInfo and the host's libvirt facts, and QMP that goes through `virsh qemu-monitor-command`.

libvirt holds each domain's QMP monitor, so a domain's QMP "socket" is the pseudo path
`libvirt:<uuid>`: discovery reads the answers the probe already gathered through libvirt, and a
link opens such a path with `LibvirtQmp` (one helper call per command), never a bridge. Everything
here comes from the host: types are checked and strings bounded before they become a report.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sevconsole.hosts.errors import HelperError, QmpCommandError
from sevconsole.hosts.remote import run_helper
from sevconsole.hosts.report import VmInfo
from sevconsole.hosts.ssh import SshConnection

PREFIX = "libvirt:"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# libvirt's domain states (virsh domstate) as QEMU run states, for a domain QMP did not answer for
STATES = {"running": "running", "paused": "paused", "shut off": "shut off", "crashed": "guest-panicked",
          "in shutdown": "shutdown", "pmsuspended": "suspended", "idle": "running", "blocked": "running"}


def domain_of(path: str | None) -> str | None:
    """The domain UUID of a `libvirt:<uuid>` QMP path; None for a real socket path."""
    if path is None or not path.startswith(PREFIX):
        return None
    uuid = path[len(PREFIX):]
    return uuid if _UUID.match(uuid) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any, limit: int = 256) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _answer(qmp: dict[str, Any], command: str) -> tuple[dict[str, Any], str | None]:
    """(QEMU's `return` object, or {}; the error sentence, if it answered one)."""
    raw = qmp.get(command)
    if not isinstance(raw, dict):
        return {}, None
    if isinstance(raw.get("return"), dict):
        return raw["return"], None
    error = raw.get("error")
    desc = error.get("desc") if isinstance(error, dict) else None
    return {}, _text(desc, 400) or f"{command} failed"


def vm_from_entry(host: str, entry: dict[str, Any]) -> VmInfo | None:
    """A probe's libvirt domain as a VmInfo; None when the entry is not a well-formed domain."""
    dom = entry.get("libvirt")
    if not isinstance(dom, dict) or not isinstance(dom.get("uuid"), str) or not _UUID.match(dom["uuid"]):
        return None
    uuid = dom["uuid"].lower()
    name = _text(dom.get("name")) or _text(entry.get("name")) or uuid
    qmp = _dict(dom.get("qmp"))
    status, status_error = _answer(qmp, "query-status")
    sev, _ = _answer(qmp, "query-sev")  # an error here means a QEMU without SEV: not an SEV guest
    migrate, _ = _answer(qmp, "query-migrate")
    state = _text(dom.get("state"), 40) or "unknown"
    run_state = _text(status.get("status"), 40) or STATES.get(state, state)
    launch = _text(dom.get("launch_security"), 20)
    sev_on = bool(sev.get("enabled")) or launch is not None
    reasons = _list(migrate.get("blocked-reasons"))
    errors: tuple[str, ...] = ()
    if status_error and state not in ("shut off",):
        errors = (f"{host}: libvirt domain {name}: qemu-monitor-command query-status: {status_error}",)
    memory = _int(dom.get("memory_kib"))
    argv = _list(entry.get("argv"))
    return VmInfo(name=name, pid=_int(entry.get("pid")), qmp_path=PREFIX + uuid,
                  argv=tuple(str(a)[:4096] for a in argv[:4096]), status=run_state,
                  memory_mib=None if memory is None else memory // 1024, sev_enabled=sev_on,
                  policy=_int(sev.get("policy")) if sev.get("enabled") else _int(dom.get("policy")),
                  sev_state=_text(sev.get("state"), 40) if sev.get("enabled") else None,
                  migration_support=False if sev_on else None,
                  migration_blocker="; ".join(str(r)[:300] for r in reasons[:8]) or None,
                  errors=errors, libvirt=uuid)


def host_facts(data: dict[str, Any]) -> dict[str, Any] | None:
    """The probe's "libvirt" object, typed: uri, version, error, and SEV as libvirt sees it."""
    raw = data.get("libvirt")
    if not isinstance(raw, dict):
        return None
    sev = _dict(raw.get("sev"))
    return {"uri": _text(raw.get("uri")), "version": _text(raw.get("version"), 80),
            "error": _text(raw.get("error"), 600), "domains": _int(raw.get("domains")),
            "sev_supported": sev.get("supported") if isinstance(sev.get("supported"), bool) else None,
            "sev_refusal": _text(sev.get("nodesevinfo"), 600)}


class LibvirtQmp:
    """QMP to a libvirt domain through `virsh qemu-monitor-command` (blocking; one helper call a
    command). `execute` returns QEMU's `return` value or raises QmpCommandError / HelperError."""

    def __init__(self, conn: SshConnection, uuid: str) -> None:
        self.conn = conn
        self.uuid = uuid

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        answer = run_helper(self.conn, "libvirt-qmp", self.uuid, stdin=json.dumps(request).encode())
        qmp = answer.get("qmp")
        if not isinstance(qmp, dict):
            raise HelperError(self.conn.name, f"{self.conn.endpoint.where()}: libvirt-qmp answered without "
                              "QEMU's answer")
        if "return" in qmp:
            return qmp["return"]
        error = _dict(qmp.get("error"))
        klass, desc = str(error.get("class", "GenericError"))[:80], str(error.get("desc", "no reason"))[:400]
        raise QmpCommandError(self.conn.name, f"{self.conn.name}: {command} through libvirt: {klass}: {desc}",
                              command=command, error_class=klass, desc=desc)
