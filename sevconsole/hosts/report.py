"""HostReport: the one picture of a host that discovery produces and the engine and console read.

Everything is frozen; a new probe gives a new report. Fields a host could not answer are None,
with the reason in `errors`, so one bad part never hides the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SevSupport:
    kernel_sev: bool | None  # kvm_amd sev parameter
    kernel_sev_es: bool | None
    dev_sev: bool  # /dev/sev present
    api_major: int | None = None
    api_minor: int | None = None
    build: int | None = None
    platform_state: int | None = None  # firmware numbering: 0 UNINIT, 1 INIT, 2 WORKING
    owner_external: bool | None = None
    es_configured: bool | None = None
    guest_count: int | None = None

    @property
    def api(self) -> tuple[int, int] | None:
        return None if self.api_major is None else (self.api_major, self.api_minor or 0)


@dataclass(frozen=True)
class Capabilities:
    """query-sev-capabilities (or PDH_CERT_EXPORT), decoded; raw bytes kept for the migration."""

    pdh: bytes  # 2084-byte PDH certificate
    cert_chain: bytes  # PEK || OCA || CEK
    cbitpos: int | None
    reduced_phys_bits: int | None
    cpu0_id: bytes | None = None
    amd_chain: bytes | None = None  # ASK || ARK when the host (or the operator's import) has it
    chain_report: Any = None  # sev.chain.ChainReport, or None when it could not be checked
    chain_error: str | None = None  # why the chain could not be checked


@dataclass(frozen=True)
class VmInfo:
    name: str
    pid: int | None
    qmp_path: str | None
    argv: tuple[str, ...] = ()
    status: str | None = None  # query-status: running, paused, inmigrate, postmigrate, ...
    memory_mib: int | None = None
    sev_enabled: bool = False
    policy: int | None = None  # u32; decode with sev.policy.GuestPolicy
    sev_state: str | None = None  # QEMU's SevState name (no "sent")
    firmware_guest_state: int | None = None  # firmware numbering, SENT included (lab)
    handle: int | None = None
    migration_support: bool | None = None  # QEMU offers the SEV migration parameters or command
    migration_blocker: str | None = None  # e.g. upstream's "SEV: Migration is not implemented"
    errors: tuple[str, ...] = ()
    # "stale copy of VM web (now on hv-b)": a copy a migration left (postmigrate, SENT); never a source
    stale: str | None = None
    libvirt: str | None = None  # the domain's UUID when libvirt manages this QEMU (qmp_path "libvirt:<uuid>")


@dataclass(frozen=True)
class HostKeyInfo:
    """A host key that stopped discovery: `unknown` (the operator may accept it) or `changed`
    (refused, always). Accept with HostKeyStore.accept(host_id, key_type, key_base64)."""

    host_id: str  # known_hosts name: "addr" or "[addr]:port"
    key_type: str
    fingerprint: str  # SHA256:base64-no-padding, as OpenSSH shows it
    status: str  # "unknown" | "changed"
    known_fingerprint: str | None = None  # for "changed"
    key_base64: str = ""


@dataclass(frozen=True)
class HostReport:
    name: str
    address: str
    port: int
    reachable: bool
    latency_ms: float | None = None
    lab: bool = False
    hostname: str | None = None
    kernel: str | None = None
    cpu: str | None = None
    sev: SevSupport | None = None
    capabilities: Capabilities | None = None
    vms: tuple[VmInfo, ...] = ()
    errors: tuple[str, ...] = ()  # sentences a person can act on
    labels: tuple[str, ...] = ()
    probed_at: float = 0.0
    # what preflight and evacuation decide on (typed; `extra` holds diagnostics only)
    mem_total_mib: int | None = None  # the probe's MemTotal
    mem_available_mib: int | None = None  # the probe's MemAvailable: does a guest fit?
    shared_storage: tuple[str, ...] = ()  # the inventory's shared folders on this host
    storage_files: dict[str, str] = field(default_factory=dict)  # {disk path: "present" | why not} (storage.py)
    libvirt: dict[str, Any] | None = None  # libvirt.host_facts: uri and version, or error; None: no virsh
    qemu_sev_migration: bool | None = None  # said outright; None: inferred from its VMs (checks.py)
    extra: dict[str, Any] = field(default_factory=dict)
    host_key: HostKeyInfo | None = None  # set when a host key stopped the probe

    def vm(self, name: str) -> VmInfo | None:
        return next((v for v in self.vms if v.name == name), None)
