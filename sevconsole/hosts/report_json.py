"""HostReport as JSON-safe dicts (for `discover --json` and anything that logs reports).

Secret values in a VM's argv (`-object secret,data=...`) are redacted here: the HostReport keeps
the real argv (the engine launches the target from it), nothing shown or written does."""

from __future__ import annotations

import base64
from typing import Any

from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.textsafe import redact_argv


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def vm_to_dict(vm: VmInfo) -> dict[str, Any]:
    return {"name": vm.name, "pid": vm.pid, "qmp": vm.qmp_path, "status": vm.status,
            "memory_mib": vm.memory_mib, "sev": vm.sev_enabled,
            "policy": None if vm.policy is None else f"0x{vm.policy:08x}", "sev_state": vm.sev_state,
            "firmware_guest_state": vm.firmware_guest_state, "handle": vm.handle,
            "migration_support": vm.migration_support, "migration_blocker": vm.migration_blocker,
            "argv": list(redact_argv(vm.argv)), "errors": list(vm.errors), "stale": vm.stale}


def report_to_dict(report: HostReport) -> dict[str, Any]:
    sev = report.sev
    caps = report.capabilities
    data: dict[str, Any] = {
        "name": report.name, "address": report.address, "port": report.port, "reachable": report.reachable,
        "latency_ms": report.latency_ms, "lab": report.lab, "labels": list(report.labels),
        "hostname": report.hostname, "kernel": report.kernel, "cpu": report.cpu,
        "sev": None if sev is None else {
            "kernel_sev": sev.kernel_sev, "kernel_sev_es": sev.kernel_sev_es, "dev_sev": sev.dev_sev,
            "api": None if sev.api is None else f"{sev.api[0]}.{sev.api[1]}", "build": sev.build,
            "platform_state": sev.platform_state, "owner_external": sev.owner_external,
            "es_configured": sev.es_configured, "guest_count": sev.guest_count},
        "capabilities": None if caps is None else {
            "pdh": _b64(caps.pdh), "cert_chain": _b64(caps.cert_chain), "amd_chain": _b64(caps.amd_chain),
            "cbitpos": caps.cbitpos, "reduced_phys_bits": caps.reduced_phys_bits,
            "cpu0_id": _b64(caps.cpu0_id),
            "chain": caps.chain_report.to_dict() if caps.chain_report is not None else None,
            "chain_error": caps.chain_error},
        "vms": [vm_to_dict(v) for v in report.vms],
        "errors": list(report.errors),
        "host_key": None if report.host_key is None else {
            "host_id": report.host_key.host_id, "key_type": report.host_key.key_type,
            "fingerprint": report.host_key.fingerprint, "status": report.host_key.status,
            "known_fingerprint": report.host_key.known_fingerprint},
        "probed_at": report.probed_at,
        "machine": {k: report.extra.get(k) for k in ("host_key_fingerprint", "machine_id", "same_machine_as",
                                                       "same_machine_note")},
    }
    return data
