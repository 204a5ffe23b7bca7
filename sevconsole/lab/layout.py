"""The default lab: which hosts and VMs exist, with which firmware API, OCA domain and policies.

Docs, screenshots and tests rely on these names, so the layout is fixed:
- lab-1 (API 1.55, OCA domain "a"): `web` (SEV, NODBG|NOKS|DOMAIN|SEV, minimum API 0.24),
  `vault` (SEV, NOSEND: may never leave), `plain` (no SEV) and `legacy` (SEV, but its guest
  never enabled migration itself: QEMU keeps the SEV migration blocker, so it may not leave).
- lab-2 (API 1.55, domain "a"): `db` (SEV). `web` migrates here.
- lab-3 (API 0.17, domain "b"): `web` is refused here for two reasons: another OCA domain
  (DOMAIN) and a firmware older than web's minimum API (SEV).
- lab-4 and up: like lab-2, each with one VM `db-N`, for scale tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PAGE_SIZE = 4096
DEFAULT_MEM_MIB = 64

# Policy u32: flags in bits 0-5, API_MAJOR in bits 16-23, API_MINOR in bits 24-31.
NODBG, NOKS, ES, NOSEND, DOMAIN, SEV = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20


def policy_u32(flags: int, api_major: int = 0, api_minor: int = 0) -> int:
    return flags | (api_major << 16) | (api_minor << 24)


WEB_POLICY = policy_u32(NODBG | NOKS | DOMAIN | SEV, 0, 24)  # 0x18000033: needs API >= 0.24
VAULT_POLICY = policy_u32(NODBG | NOKS | NOSEND | DOMAIN | SEV)  # 0x3b
DB_POLICY = policy_u32(NODBG | NOKS | DOMAIN | SEV)  # 0x33

RECENT_API = (1, 55)
OLD_API = (0, 17)


@dataclass(frozen=True)
class VmSpec:
    name: str
    sev: bool
    policy: int = 0
    mem_mib: int = DEFAULT_MEM_MIB
    # (first page, page count) ranges the guest shares with the hypervisor (DMA buffers).
    shared: tuple[tuple[int, int], ...] | None = None  # None: a default few ranges
    dirty_rate: float = 0.0  # pages/s the guest's workload dirties while it runs
    seed: int | None = None  # memory contents; None: random
    # The guest's consent (SEV migration series): its firmware and kernel enabled migration
    # through the KVM migration control MSR. False: QEMU keeps its SEV migration blocker.
    migration_ready: bool = True


@dataclass(frozen=True)
class HostSpec:
    name: str
    api: tuple[int, int]
    oca_domain: str  # hosts with the same domain share one OCA key
    vms: tuple[VmSpec, ...] = ()
    build: int = 21
    es: bool = True
    realistic_psp: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostSpec:
        vms = tuple(
            VmSpec(**{**v, "shared": None if v.get("shared") is None else tuple(tuple(r) for r in v["shared"])})
            for v in data.get("vms", ())
        )
        return cls(
            name=data["name"], api=tuple(data["api"]), oca_domain=data["oca_domain"], vms=vms,
            build=data.get("build", 21), es=data.get("es", True),
            realistic_psp=data.get("realistic_psp", False), extra=data.get("extra", {}),
        )


def default_shared_ranges(pages: int) -> tuple[tuple[int, int], ...]:
    """A few small shared ranges, like a real guest's virtio/DMA bounce buffers."""
    if pages < 64:
        return ()
    return ((16, 8), (pages // 2, 16), (pages - 32, 4))


def default_layout(hosts: int = 3, *, vms_per_host: int = 0, mem_mib: int = DEFAULT_MEM_MIB,
                   dirty_rate: float = 0.0, realistic_psp: bool = False) -> tuple[HostSpec, ...]:
    """The default lab of `hosts` hosts; `vms_per_host` adds plain SEV VMs up to that many per host."""
    if hosts < 1:
        raise ValueError("a lab needs at least one host (--hosts 1 or more)")
    if mem_mib < 1:
        raise ValueError("guest memory must be at least 1 MiB (--mem)")

    def vm(name: str, sev: bool, policy: int = 0, *, ready: bool = True) -> VmSpec:
        return VmSpec(name=name, sev=sev, policy=policy, mem_mib=mem_mib, dirty_rate=dirty_rate,
                      migration_ready=ready)

    specs = []
    for i in range(1, hosts + 1):
        name = f"lab-{i}"
        if i == 1:
            vms = [vm("web", True, WEB_POLICY), vm("vault", True, VAULT_POLICY), vm("plain", False),
                   vm("legacy", True, DB_POLICY, ready=False)]
            api, domain = RECENT_API, "a"
        elif i == 2:
            vms, api, domain = [vm("db", True, DB_POLICY)], RECENT_API, "a"
        elif i == 3:
            vms, api, domain = [], OLD_API, "b"
        else:
            vms, api, domain = [vm(f"db-{i}", True, DB_POLICY)], RECENT_API, "a"
        k = 1
        while len(vms) < vms_per_host:
            vms.append(vm(f"vm-{i}-{k}", True, DB_POLICY))
            k += 1
        specs.append(HostSpec(name=name, api=api, oca_domain=domain, vms=tuple(vms),
                              realistic_psp=realistic_psp))
    return tuple(specs)
