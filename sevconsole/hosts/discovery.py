"""Discovery: for each host, one SSH transport, the helper's probe, QMP queries of each VM,
and the chain verified, folded into a `HostReport`.

Blocking API for thread workers (the console calls it from threads):

    reports = discover(hosts, options, on_report=callback)   # input order; callback as each ends
    for report in iter_discover(hosts, options): ...          # completion order

Hosts are probed concurrently, at most `options.max_workers` at once (default 16). An error on
one host is a sentence in that host's report and never stops the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paramiko

from sevconsole import paths
from sevconsole.hosts import identity, libvirt, storage
from sevconsole.hosts.chains import Roots, check_host_chain, load_roots, roots_from_blob
from sevconsole.hosts.errors import HostError, HostKeyChanged, HostKeyError, QmpCommandError
from sevconsole.hosts.hostkeys import HostKeyStore, fingerprint
from sevconsole.hosts.inventory import HostSpec, load_ssh_config
from sevconsole.hosts.qmp import QmpLink, open_qmp
from sevconsole.hosts.remote import probe
from sevconsole.hosts.report import Capabilities, HostKeyInfo, HostReport, SevSupport, VmInfo
from sevconsole.hosts.ssh import Endpoint, SshConnection, SshPool, Timeouts, resolve
from sevconsole.sev.certs import AmdCert
from sevconsole.sev.status import GuestState

VM_CONCURRENCY = 4  # QMP links per host at once; each is one SSH channel
MIB = 1024 * 1024


@dataclass(frozen=True)
class DiscoveryOptions:
    known_hosts: Path | None = None  # the console's own file; None: paths.known_hosts_file()
    system_known_hosts: tuple[Path, ...] | None = None  # None: ~/.ssh/known_hosts, /etc/ssh/...
    accept_fingerprints: frozenset[str] = frozenset()  # the operator's --accept-host-key
    lab_root: Path | None = None  # folder holding the lab's ark.cert (trusted for `lab` hosts)
    amd_roots: Path | None = None  # None: paths.amd_roots_dir()
    ssh_config: Path | None = None  # None: ~/.ssh/config when it exists
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_workers: int = 16
    query_vms: bool = True
    use_agent: bool = True

    def key_store(self) -> HostKeyStore:
        return HostKeyStore(self.known_hosts or paths.known_hosts_file(),
                            system_files=self.system_known_hosts, accept=self.accept_fingerprints)

    def pool(self) -> SshPool:
        return SshPool(self.key_store(), self.timeouts, use_agent=self.use_agent)


@dataclass(frozen=True)
class _Context:
    options: DiscoveryOptions
    pool: SshPool
    inventory: dict[str, HostSpec]
    ssh_config: Any
    amd_roots: Roots
    lab_ark: AmdCert | None
    lab_roots: Roots


def _context(hosts: Sequence[HostSpec], options: DiscoveryOptions, pool: SshPool) -> _Context:
    lab_roots = load_roots(options.lab_root)
    lab_ark = lab_roots.arks[0] if lab_roots.arks else None
    return _Context(options, pool, {h.name: h for h in hosts}, load_ssh_config(options.ssh_config),
                    load_roots(options.amd_roots or paths.amd_roots_dir()), lab_ark, lab_roots)


def iter_discover(hosts: Iterable[HostSpec], options: DiscoveryOptions | None = None, *,
                  pool: SshPool | None = None) -> Iterator[HostReport]:
    """Yield each host's report as it finishes. A pool passed in stays open (the caller's)."""
    hosts = list(hosts)
    options = options or DiscoveryOptions()
    own_pool = pool is None
    pool = pool or options.pool()
    try:
        ctx = _context(hosts, options, pool)
        workers = max(1, min(options.max_workers, len(hosts)))
        with ThreadPoolExecutor(workers, thread_name_prefix="discover") as executor:
            futures = {executor.submit(discover_host, spec, ctx): spec for spec in hosts}
            for future in as_completed(futures):
                yield future.result()  # discover_host never raises
    finally:
        if own_pool:
            pool.close()


def discover(hosts: Iterable[HostSpec], options: DiscoveryOptions | None = None, *,
             on_report: Callable[[HostReport], None] | None = None,
             pool: SshPool | None = None) -> list[HostReport]:
    """Blocking: every host's report, in the order given. `on_report` runs in the calling
    thread as each host finishes."""
    hosts = list(hosts)
    options = options or DiscoveryOptions()
    done: dict[str, HostReport] = {}
    own_pool = pool is None
    pool = pool or options.pool()
    try:
        for report in iter_discover(hosts, options, pool=pool):
            done[report.name] = report
            if on_report is not None:
                on_report(report)
        reports = identity.mark_aliases(mark_stale([done[h.name] for h in hosts]))
        return storage.seen_disks(reports, hosts, lambda spec: pool.get(endpoint_for(spec, hosts, options.ssh_config)))
    finally:
        if own_pool:
            pool.close()


def discover_host(spec: HostSpec, ctx: _Context) -> HostReport:
    """One host, never raising; `extra["duration_ms"]` is what this host cost."""
    clock = time.monotonic()
    report = _discover_host(spec, ctx)
    return replace(report, extra={**report.extra, "duration_ms": round((time.monotonic() - clock) * 1000, 2)})


def _discover_host(spec: HostSpec, ctx: _Context) -> HostReport:
    started = time.time()
    base = HostReport(name=spec.name, address=spec.address, port=spec.port or 22, reachable=False,
                      lab=spec.lab, labels=spec.labels, probed_at=started)
    last = [base]  # what is known so far, so an error keeps reachability and latency
    try:
        return _discover(spec, ctx, last)
    except HostKeyError as exc:
        changed = isinstance(exc, HostKeyChanged)
        info = HostKeyInfo(exc.host_id, exc.key_type, exc.fingerprint, "changed" if changed else "unknown",
                           getattr(exc, "known_fingerprint", None), exc.key_base64)
        # a changed key is refused, always: that host is not up, whatever answered on its port
        return replace(last[0], reachable=not changed, errors=(str(exc),), host_key=info)
    except HostError as exc:
        return replace(last[0], errors=(str(exc),))
    except Exception as exc:  # a bug must cost one host, not the whole discovery
        return replace(last[0], errors=(f"{spec.name}: discovery failed unexpectedly: "
                                     f"{type(exc).__name__}: {exc}",))


def _discover(spec: HostSpec, ctx: _Context, last: list[HostReport]) -> HostReport:
    endpoint = resolve(spec, config=ctx.ssh_config, inventory=ctx.inventory)
    last[0] = base = replace(last[0], address=endpoint.address, port=endpoint.port)
    conn = ctx.pool.get(endpoint)
    last[0] = base = replace(base, reachable=True, latency_ms=round(conn.ping(), 2))
    data = probe(conn, spec.qmp_sockets)
    raw_errors = data.get("errors")
    errors = [f"{spec.name}: {e}" for e in (raw_errors if isinstance(raw_errors, list) else [])]
    sev = _sev_support(data)
    entries = [v for v in data.get("vms", []) if isinstance(v, dict)]
    # libvirt's domains come with the answers the probe got through libvirt: no bridge to them
    domains = [vm for vm in (libvirt.vm_from_entry(spec.name, v) for v in entries if "libvirt" in v) if vm]
    vm_entries = [v for v in entries if "libvirt" not in v]
    vms: list[VmInfo] = []
    qmp_caps: dict[str, Any] | None = None
    if ctx.options.query_vms and vm_entries:
        vms, qmp_caps = asyncio.run(_query_vms(conn, vm_entries, lab=spec.lab, ctx=ctx))
    else:
        vms = [_vm_from_probe(v) for v in vm_entries]
    vms += domains
    caps = _capabilities(spec, data, qmp_caps, ctx, errors, sev)
    extra = {"helper": data.get("helper"), "python": data.get("python"), "endpoint": endpoint.where(),
             "host_claims_lab": bool(data.get("lab"))}
    facts = libvirt.host_facts(data)
    # who this machine is, whatever name reached it (hosts/identity.py)
    # a transport that died after the probe answered (or a stand-in with none) gives no identity
    with contextlib.suppress(paramiko.SSHException, OSError, AttributeError):
        extra["host_key_fingerprint"] = fingerprint(conn.transport.get_remote_server_key())
    for key in ("machine_id", "boot_id"):
        if isinstance(data.get(key), str):
            extra[key] = data[key][:64]
    memory = _dict(data.get("memory"))
    mem = {key: value for key in ("total_mib", "available_mib")
           if isinstance(value := memory.get(key), int) and not isinstance(value, bool) and value >= 0}
    text = {k: str(data[k]) if data.get(k) is not None else None for k in ("hostname", "kernel", "cpu")}
    return replace(base, hostname=text["hostname"] or "?", kernel=text["kernel"], cpu=text["cpu"],
                   sev=sev, capabilities=caps, vms=tuple(vms), errors=tuple(errors), extra=extra,
                   mem_total_mib=mem.get("total_mib"), mem_available_mib=mem.get("available_mib"),
                   shared_storage=tuple(spec.shared_storage), libvirt=facts)


def _flag(value: Any) -> bool | None:
    return None if value is None else value in ("Y", "y", "1", True)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sev_support(data: dict[str, Any]) -> SevSupport:
    # The probe's JSON comes from another machine: take only what has the expected type.
    kvm = _dict(data.get("kvm_amd"))
    status = {k: _int(v) for k, v in _dict(data.get("platform_status")).items()}
    flags = status.get("flags")
    return SevSupport(
        kernel_sev=_flag(kvm.get("sev")), kernel_sev_es=_flag(kvm.get("sev_es")),
        dev_sev=data.get("dev_sev") is True, api_major=status.get("api_major"),
        api_minor=status.get("api_minor"), build=status.get("build"), platform_state=status.get("state"),
        owner_external=None if flags is None else bool(flags & 0x1),
        es_configured=None if flags is None else bool(flags & 0x100),
        guest_count=status.get("guest_count"))


def _b64(value: Any) -> bytes | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _capabilities(spec: HostSpec, data: dict[str, Any], qmp_caps: dict[str, Any] | None, ctx: _Context,
                  errors: list[str], sev: SevSupport) -> Capabilities | None:
    pdh, chain = _b64(data.get("pdh")), _b64(data.get("cert_chain"))
    cbitpos = reduced = cpu0 = None
    if qmp_caps:
        pdh = pdh or _b64(qmp_caps.get("pdh"))
        chain = chain or _b64(qmp_caps.get("cert-chain"))
        cpu0 = _b64(qmp_caps.get("cpu0-id"))
        cbitpos, reduced = _int(qmp_caps.get("cbitpos")), _int(qmp_caps.get("reduced-phys-bits"))
    if pdh is None or chain is None:
        if sev.kernel_sev or sev.dev_sev or spec.lab:
            errors.append(f"{spec.name}: no PDH and certificate chain: neither PDH_CERT_EXPORT through "
                          "/dev/sev nor query-sev-capabilities of a VM gave them")
        return None
    roots = ctx.amd_roots + roots_from_blob(_b64(data.get("amd_chain")), f"{spec.name} AMD chain")
    lab_ark = None
    if spec.lab:
        roots = ctx.lab_roots + roots
        lab_ark = ctx.lab_ark
        if lab_ark is None:
            errors.append(f"{spec.name}: marked lab = true but no lab root was given (use --lab DIR)")
    check = check_host_chain(spec.name, pdh, chain, roots, lab_ark=lab_ark)
    return Capabilities(pdh=pdh, cert_chain=chain, cbitpos=cbitpos, reduced_phys_bits=reduced, cpu0_id=cpu0,
                        amd_chain=check.amd_chain, chain_report=check.report, chain_error=check.error)


def _vm_from_probe(entry: dict[str, Any], errors: tuple[str, ...] = ()) -> VmInfo:
    raw_argv = entry.get("argv")
    argv = raw_argv if isinstance(raw_argv, list) else []
    qmp = entry.get("qmp") if isinstance(entry.get("qmp"), str) and entry.get("qmp") else None
    pid = _int(entry.get("pid"))
    return VmInfo(name=str(entry.get("name") or f"pid-{pid}"), pid=pid, qmp_path=qmp,
                  argv=tuple(str(a) for a in argv), errors=errors)


async def _query_vms(conn: SshConnection, entries: list[dict[str, Any]], *, lab: bool,
                     ctx: _Context) -> tuple[list[VmInfo], dict[str, Any] | None]:
    gate = asyncio.Semaphore(VM_CONCURRENCY)
    caps: list[dict[str, Any]] = []

    async def one(entry: dict[str, Any]) -> VmInfo:
        async with gate:
            return await _query_vm(conn, entry, lab=lab, caps_out=caps, timeouts=ctx.options.timeouts)

    vms = await asyncio.gather(*(one(e) for e in entries))
    return list(vms), (caps[0] if caps else None)


async def _query_vm(conn: SshConnection, entry: dict[str, Any], *, lab: bool, caps_out: list[dict[str, Any]],
                    timeouts: Timeouts) -> VmInfo:
    vm = _vm_from_probe(entry)
    if not vm.qmp_path:
        return replace(vm, errors=(f"{conn.name}: VM {vm.name} (pid {vm.pid}): no QMP socket in its command "
                                   "line; add a qmp_sockets glob for this host to the inventory",))
    try:
        async with open_qmp(conn, vm.qmp_path, greeting_timeout=timeouts.channel) as qmp:
            return await _ask_vm(qmp, vm, lab=lab, caps_out=caps_out, timeout=timeouts.channel)
    except HostError as exc:
        return replace(vm, errors=(str(exc),))
    except (EOFError, OSError, paramiko.SSHException) as exc:  # the link died under the QMP client
        return replace(vm, errors=(f"{conn.name}: VM {vm.name}: the QMP link broke while it was asked "
                                   f"({type(exc).__name__}: {exc}); probe the host again",))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # an answer of the wrong shape
        return replace(vm, errors=(f"{conn.name}: VM {vm.name}: QEMU answered something unexpected "
                                   f"({type(exc).__name__}: {exc})",))


async def _optional(qmp: QmpLink, command: str, commands: set[str], timeout: float) -> Any:
    """A query that a QEMU may lack or refuse (non-SEV guest): None then."""
    if commands and command not in commands:
        return None
    try:
        return await qmp.execute(command, timeout=timeout)
    except QmpCommandError:
        return None


async def _ask_vm(qmp: QmpLink, vm: VmInfo, *, lab: bool, caps_out: list[dict[str, Any]],
                  timeout: float) -> VmInfo:
    commands = {c["name"] for c in await qmp.execute("query-commands", timeout=timeout)}
    status = await qmp.execute("query-status", timeout=timeout)
    name = (await _optional(qmp, "query-name", commands, timeout) or {}).get("name") or vm.name
    memory = await _optional(qmp, "query-memory-size-summary", commands, timeout) or {}
    sev = await _optional(qmp, "query-sev", commands, timeout) or {}
    params = await _optional(qmp, "query-migrate-parameters", commands, timeout) or {}
    migrate = await _optional(qmp, "query-migrate", commands, timeout) or {}
    firmware = await _optional(qmp, "x-query-sev-firmware", commands, timeout) if lab else None
    if sev.get("enabled") and not caps_out:
        caps = await _optional(qmp, "query-sev-capabilities", commands, timeout)
        if caps and not caps_out:
            caps_out.append(caps)
    support = (any(k in params for k in ("sev-pdh", "sev-plat-cert", "sev-amd-cert"))
               or bool({"migrate-set-sev-info", "migrate-sev-set-info"} & commands))
    reasons = migrate.get("blocked-reasons") or []
    base_memory = memory.get("base-memory")
    guest_state = (firmware or {}).get("guest-state")
    stale = status.get("status") == "postmigrate" or guest_state == GuestState.SENT
    return replace(
        vm, name=name, status=status.get("status"), stale=f"stale copy of VM {name}" if stale else None,
        memory_mib=memory_from_argv(vm.argv) if base_memory is None else int(base_memory) // MIB,
        sev_enabled=bool(sev.get("enabled")), policy=sev.get("policy"), sev_state=sev.get("state"),
        handle=sev.get("handle"),
        firmware_guest_state=(firmware or {}).get("guest-state"),
        migration_support=support if sev.get("enabled") else None,
        migration_blocker="; ".join(str(r) for r in reasons) or None)


def mark_stale(reports: list[HostReport]) -> list[HostReport]:
    """A stale copy (a migration's leftover: postmigrate, or SENT) says where its guest went: the host
    whose copy of that name runs or is paused."""
    live: dict[str, str] = {}
    for report in reports:
        for vm in report.vms:
            if vm.stale is None and vm.status in ("running", "paused"):
                live.setdefault(vm.name, report.name)
    out = []
    for report in reports:
        # a libvirt domain kept defined on the source after a migration (shut off) is one too
        vms = tuple(replace(vm, stale=f"stale copy of VM {vm.name} (now on {live[vm.name]})")
                    if (vm.stale is not None or (vm.libvirt and vm.status == "shut off"))
                    and live.get(vm.name, report.name) != report.name else vm for vm in report.vms)
        out.append(replace(report, vms=vms) if vms != report.vms else report)
    return out


def memory_from_argv(argv: Sequence[str]) -> int | None:
    """MiB from QEMU's `-m 512`, `-m 4G`, `-m size=2048M,slots=...` (QEMU's default unit is MiB)."""
    for i, arg in enumerate(argv[:-1]):
        if arg not in ("-m", "--m"):
            continue
        value = argv[i + 1].split(",")[0].removeprefix("size=").strip()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)[Bb]?", value, re.IGNORECASE)
        if match:
            scale = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[match.group(2).upper()]
            return int(float(match.group(1)) * scale)
    return None


def endpoint_for(spec: HostSpec, hosts: Sequence[HostSpec] = (), ssh_config: Path | None = None) -> Endpoint:
    """The endpoint discovery would use for `spec` (for the console and engine to reuse a pool)."""
    return resolve(spec, config=load_ssh_config(ssh_config), inventory={h.name: h for h in hosts})


__all__ = ["DiscoveryOptions", "discover", "discover_host", "endpoint_for", "iter_discover"]
