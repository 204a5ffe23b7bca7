"""Preflight: pure checks of a MigrationPlan (two HostReports and the VM); no I/O.

Each check passes, warns or fails with a sentence naming the host, certificate or policy bit.
Any failure means nothing starts. The console verifies the target chain itself even where the
guest policy would let the firmware skip it (neither DOMAIN nor SEV set).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sevconsole.engine.argv_policy import Refusal, target_argv
from sevconsole.engine.plan import MigrationPlan
from sevconsole.hosts.report import HostReport, VmInfo

# QEMU's upstream blocker for SEV guests, shown to the operator word for word.
UPSTREAM_SEV_BLOCKER = "SEV: Migration is not implemented"
PLATFORM_STATE_NAMES = {0: "UNINIT", 1: "INIT", 2: "WORKING"}


class CheckStatus(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    key: str  # stable id: argv, nosend, domain, chain, api, es, cbitpos, memory, qemu-source, ...
    title: str
    status: CheckStatus
    sentence: str

    def to_json(self) -> dict[str, str]:
        return {"key": self.key, "title": self.title, "status": self.status.value,
                "sentence": self.sentence}


def refused(checks: Iterable[Check]) -> bool:
    return any(c.status is CheckStatus.FAIL for c in checks)


def _c(key: str, title: str, status: CheckStatus, sentence: str) -> Check:
    return Check(key, title, status, sentence)


def preflight(plan: MigrationPlan, trust: Any = None) -> list[Check]:
    """All checks for `plan`. `trust` is a sev.trust.TrustStore (pinned AMD roots, plus the lab
    root when the console runs on a lab); None means the pinned AMD roots only."""
    vm, src, dst = plan.vm, plan.source, plan.target
    checks: list[Check] = []
    checks.append(_reachable(src, "source"))
    checks.append(_reachable(dst, "target"))
    if src.name == dst.name:
        checks.append(_c("hosts", "Distinct hosts", CheckStatus.FAIL,
                         f"{vm.name} already runs on {src.name}; pick another target host."))
    checks += _one_machine(src, dst)
    checks.append(_vm_state(vm, src))
    checks += _libvirt(vm, src, dst)
    argv = _argv(vm, src, dst)
    if argv is not None:
        checks.append(argv)
    checks += _disks(vm, dst)
    checks += _qemu_support(vm, src, dst)
    checks.append(_memory(vm, dst))
    checks += _cordon(dst)
    checks += _guest_consent(vm, src, dst)
    if not vm.sev_enabled:
        checks.append(_c("sev", "Guest kind", CheckStatus.PASS,
                         f"{vm.name} is not an SEV guest: plain QEMU migration, no firmware involved."))
        return checks
    checks += _sev_checks(plan, trust)
    return checks


def _reachable(host: HostReport, role: str) -> Check:
    key = getattr(host, "host_key", None)
    if key is not None:
        return _c(f"reach-{role}", f"{role.title()} reachable", CheckStatus.FAIL,
                  f"{host.name}: its SSH host key is {key.status} ({key.fingerprint}); "
                  + (f"check it and accept it with --accept-host-key {key.fingerprint}."
                     if key.status == "unknown" else "refused: a changed host key is never accepted."))
    if host.reachable and (host.hostname is not None or not host.errors):
        return _c(f"reach-{role}", f"{role.title()} reachable", CheckStatus.PASS,
                  f"{host.name} answered its probe.")
    why = "; ".join(host.errors) or "no answer"
    return _c(f"reach-{role}", f"{role.title()} reachable", CheckStatus.FAIL,
              f"{host.name} ({host.address}:{host.port}) cannot be reached: {why}.")


def _vm_state(vm: VmInfo, src: HostReport) -> Check:
    if vm.status is None and vm.errors:
        return _c("vm", "Guest state", CheckStatus.FAIL,
                  f"{vm.name} on {src.name} could not be queried ({'; '.join(vm.errors)}); probe again.")
    if not vm.sev_enabled and any("sev-guest" in a or "sev-snp-guest" in a for a in vm.argv):
        # never let a guest whose SEV state is unknown be sent in plain
        return _c("vm", "Guest state", CheckStatus.FAIL,
                  f"{vm.name} on {src.name} is started as an SEV guest (sev-guest object) but its SEV "
                  "state was not read; probe again.")
    if vm.status in (None, "running", "paused"):
        detail = vm.status or "state unknown"
        status = CheckStatus.PASS if vm.status else CheckStatus.WARN
        return _c("vm", "Guest state", status, f"{vm.name} on {src.name}: {detail}.")
    return _c("vm", "Guest state", CheckStatus.FAIL,
              f"{vm.name} on {src.name} is '{vm.status}'; only a running or paused guest can be sent.")


def _argv(vm: VmInfo, src: HostReport, dst: HostReport) -> Check | None:
    """The target's command line is the allow-list's (engine/argv_policy.py), as the links build
    it; a refusal names the option. None when it passes unchanged: a line that says nothing the
    operator acts on is left out."""
    title = "Target command line"
    if vm.libvirt is not None:
        return None  # libvirt builds the target's command line from the domain's XML, not from ours
    if not vm.argv:
        return _c("argv", title, CheckStatus.FAIL,
                  f"the command line of {vm.name} on {src.name} is unknown (no QEMU process owns its "
                  f"QMP socket), so {dst.name} cannot start its twin; probe again.")
    verdict = target_argv(vm.argv, storage=target_storage(dst))
    if isinstance(verdict, Refusal):
        return _c("argv", title, CheckStatus.FAIL, verdict.sentence(dst.name) + ".")
    if verdict.rewritten:
        return _c("argv", title, CheckStatus.WARN, f"{dst.name}: " + "; ".join(verdict.rewritten) + ".")
    return None


def _one_machine(src: HostReport, dst: HostReport) -> list[Check]:
    """Two inventory names for one machine (same host key or machine id) are never each other's
    target: the guest would stay where it is. No line when they are two machines."""
    from sevconsole.hosts.identity import same_machine

    why = same_machine(src, dst)
    if why is None:
        return []
    return [_c("hosts", "Distinct hosts", CheckStatus.FAIL,
               f"{src.name} and {dst.name} are one machine ({why}); pick a target on another machine.")]


def _libvirt(vm: VmInfo, src: HostReport, dst: HostReport) -> list[Check]:
    """A libvirt domain moves by libvirt's own migration: the target must run libvirt too, and what
    libvirt refuses (an SEV domain, any QEMU migration blocker) is said in libvirt's words. No line
    for a bare QEMU."""
    if vm.libvirt is None:
        return []
    title = "libvirt migration"
    facts = dst.libvirt
    if facts is None or facts.get("error"):
        why = facts.get("error") if facts is not None else "virsh -c qemu:///system is not there"
        return [_c("libvirt", title, CheckStatus.FAIL,
                   f"{vm.name} is a libvirt domain on {src.name}, but {dst.name} has no working libvirt ({why}); "
                   "a libvirt domain moves only to another libvirt host.")]
    if vm.sev_enabled or vm.migration_blocker:
        # libvirt asks QEMU for its migration blockers and refuses with them (an SEV guest's is QEMU's
        # "SEV: Migration is not implemented"): say it as libvirt does
        reasons = vm.migration_blocker or UPSTREAM_SEV_BLOCKER
        return [_c("libvirt", title, CheckStatus.FAIL,
                   f"libvirt on {src.name} refuses to migrate {vm.name}: Requested operation is not valid: "
                   f"cannot migrate domain: {reasons}.")]
    version = src.libvirt.get("version") if src.libvirt is not None else None
    return [_c("libvirt", title, CheckStatus.PASS,
               f"libvirt migrates {vm.name} itself, {src.name} to {dst.name}"
               + (f" ({version})." if version else "."))]


def target_storage(dst: HostReport) -> tuple[str, ...]:
    """The target's shared storage folders (the inventory's, carried by discovery)."""
    return dst.shared_storage


def _disks(vm: VmInfo, dst: HostReport) -> list[Check]:
    """Each disk image the guest uses must be there on the target (shared storage); no line for a
    guest without disks. The answers come from discovery's look on the target (hosts/storage.py)."""
    from sevconsole.hosts.diskpaths import disk_paths, under_storage

    title = "Disks on target"
    paths = disk_paths(vm.argv)
    storage = target_storage(dst)
    if not paths or not all(under_storage(p, storage) for p in paths):
        return []  # none, or the argv check already refused them
    seen = dst.storage_files
    missing = [f"{p} {seen[p]}" for p in paths if p in seen and seen[p] != "present"]
    unknown = [p for p in paths if p not in seen]
    if missing:
        return [_c("disks", title, CheckStatus.FAIL, f"{dst.name}: the disk image " + "; the disk image ".join(missing)
                   + f": {vm.name} cannot start there.")]
    if unknown:
        return [_c("disks", title, CheckStatus.WARN, f"{dst.name} was not asked whether it sees "
                   f"{', '.join(unknown)}; its QEMU checks them when the incoming VM starts.")]
    return [_c("disks", title, CheckStatus.PASS, f"{dst.name} sees {', '.join(paths)} on its shared storage.")]


def _qemu_support(vm: VmInfo, src: HostReport, dst: HostReport) -> list[Check]:
    out: list[Check] = []
    if not vm.qmp_path:
        out.append(_c("qmp", "QMP socket", CheckStatus.FAIL,
                      f"{vm.name} on {src.name} has no QMP socket on its command line; "
                      "start it with -qmp unix:PATH,server=on,wait=off."))
    if not vm.sev_enabled:
        return out
    # An SEV guest is never migrated in plain: both QEMUs must carry the SEV migration commands.
    if _qemu_blockers(vm):
        out.append(_c("qemu-source", "Source QEMU supports SEV migration", CheckStatus.FAIL,
                      f"{src.name}: QEMU blocks the migration of {vm.name}: {'; '.join(_qemu_blockers(vm))}"))
    elif vm.migration_support is True:
        out.append(_c("qemu-source", "Source QEMU supports SEV migration", CheckStatus.PASS,
                      f"{src.name}: QEMU offers the SEV migration parameters or migrate-set-sev-info."))
    elif vm.migration_support is False:
        out.append(_c("qemu-source", "Source QEMU supports SEV migration", CheckStatus.FAIL,
                      f"{src.name}: QEMU has neither the sev-pdh migration parameters nor "
                      f"migrate-set-sev-info: {UPSTREAM_SEV_BLOCKER}."))
    else:
        out.append(_c("qemu-source", "Source QEMU supports SEV migration", CheckStatus.FAIL,
                      f"{src.name}: could not learn whether QEMU supports SEV migration for {vm.name} "
                      "(query-commands / query-migrate-parameters unanswered); probe again."))
    tgt = _target_qemu_support(dst)
    if tgt is True:
        out.append(_c("qemu-target", "Target QEMU supports SEV migration", CheckStatus.PASS,
                      f"{dst.name}: its QEMU offers the SEV migration commands."))
    elif tgt is False:
        out.append(_c("qemu-target", "Target QEMU supports SEV migration", CheckStatus.FAIL,
                      f"{dst.name}: its QEMU lacks the SEV migration commands: {UPSTREAM_SEV_BLOCKER}."))
    else:
        out.append(_c("qemu-target", "Target QEMU supports SEV migration", CheckStatus.WARN,
                      f"{dst.name}: no running QEMU to ask; the incoming VM's QEMU is checked "
                      "before any page is sent."))
    return out


def _target_qemu_support(dst: HostReport) -> bool | None:
    if dst.qemu_sev_migration is not None:
        return dst.qemu_sev_migration
    if any(_qemu_blockers(v) for v in dst.vms):
        return False
    known = [v.migration_support for v in dst.vms if v.migration_support is not None]
    if known:
        return all(known)
    return True if dst.lab else None  # the lab's QMP servers implement the series' commands


def _consent_missing(vm: VmInfo) -> bool:
    """The guest's own refusal: QEMU offers the SEV migration series' commands yet keeps
    upstream's SEV blocker, which the series lifts only when the guest enables migration."""
    return bool(vm.sev_enabled and vm.migration_support and vm.migration_blocker
                and UPSTREAM_SEV_BLOCKER in vm.migration_blocker.split("; "))


def _qemu_blockers(vm: VmInfo) -> list[str]:
    """QEMU's blocked-reasons, less the one that is the guest's (the consent check's)."""
    reasons = vm.migration_blocker.split("; ") if vm.migration_blocker else []
    return [r for r in reasons if not (r == UPSTREAM_SEV_BLOCKER and _consent_missing(vm))]


def _guest_consent(vm: VmInfo, src: HostReport, dst: HostReport) -> list[Check]:
    """No line when the guest enabled migration (or is not an SEV guest)."""
    if not _consent_missing(vm):
        return []
    return [_c("consent", "Guest enabled migration", CheckStatus.FAIL,
               f"{vm.name}'s guest never enabled migration itself (its firmware and kernel set the "
               "KVM migration control MSR; its dmesg would say \"live migration enabled in EFI\"), "
               f"so QEMU on {src.name} keeps blocking it: {UPSTREAM_SEV_BLOCKER}. Forced through, "
               f"{dst.name} would only reboot the guest from its firmware; update the guest's OVMF "
               "and kernel, reboot it, then probe again.")]


def _memory(vm: VmInfo, dst: HostReport) -> Check:
    free = dst.mem_available_mib
    if vm.memory_mib is None:
        return _c("memory", "Memory on target", CheckStatus.WARN,
                  f"the memory size of {vm.name} is unknown; {dst.name} may not fit it.")
    if free is None:
        return _c("memory", "Memory on target", CheckStatus.WARN,
                  f"{dst.name} did not report its free memory; {vm.name} needs {vm.memory_mib} MiB.")
    if free < vm.memory_mib:
        return _c("memory", "Memory on target", CheckStatus.FAIL,
                  f"{dst.name} has {int(free)} MiB available, {vm.name} needs {vm.memory_mib} MiB.")
    return _c("memory", "Memory on target", CheckStatus.PASS,
              f"{dst.name} has {int(free)} MiB available for the {vm.memory_mib} MiB of {vm.name}.")


def _cordon(dst: HostReport) -> list[Check]:
    """A cordoned target (engine/cordon.py, the operator's list in the state folder) is refused;
    no line when it is not cordoned. The one check that reads a file, so a cordon set after a
    plan was made still stops the runner's own preflight."""
    from sevconsole.engine.cordon import CordonError, lookup

    try:
        entry = lookup(dst.name)
    except CordonError as exc:
        return [_c("cordon", "Target not cordoned", CheckStatus.FAIL, f"{exc}.")]
    return [] if entry is None else [_c("cordon", "Target not cordoned", CheckStatus.FAIL, entry.sentence() + ".")]


def _sev_checks(plan: MigrationPlan, trust: Any) -> list[Check]:
    from sevconsole.sev.policy import GuestPolicy, PolicyFlag

    vm, src, dst = plan.vm, plan.source, plan.target
    out: list[Check] = []
    if vm.policy is None:
        return [_c("policy", "Guest policy", CheckStatus.FAIL,
                   f"the policy of {vm.name} on {src.name} is unknown (query-sev unanswered); probe again.")]
    try:
        policy = GuestPolicy.from_u32(vm.policy)
    except (ValueError, TypeError) as exc:  # PolicyError is a ValueError
        return [_c("policy", "Guest policy", CheckStatus.FAIL,
                   f"the policy of {vm.name} on {src.name} ({vm.policy!r}) is not a 32-bit SEV policy: {exc}")]
    names = policy.flag_names() or "none"
    out.append(_c("policy", "Guest policy", CheckStatus.PASS,
                  f"{vm.name} policy 0x{vm.policy:08x} ({names}), minimum API "
                  f"{policy.api_major}.{policy.api_minor}."))
    if policy.flags & PolicyFlag.NOSEND:
        out.append(_c("nosend", "NOSEND", CheckStatus.FAIL,
                      f"{vm.name}'s policy sets NOSEND (bit 3): the firmware refuses SEND_START, "
                      "this guest may never leave its host."))
    else:
        out.append(_c("nosend", "NOSEND", CheckStatus.PASS, "NOSEND (bit 3) is clear: the guest may be sent."))
    if policy.reserved:
        out.append(_c("reserved", "Reserved policy bits", CheckStatus.FAIL,
                      f"{vm.name}'s policy sets reserved bits 6-15 (0x{policy.reserved:x}); "
                      f"RECEIVE_START on {dst.name} would fail with POLICY_FAILURE."))
    out += _platform(src, dst)
    src_caps, dst_caps = src.capabilities, dst.capabilities
    if dst_caps is None:
        out.append(_c("chain", "Target certificate chain", CheckStatus.FAIL,
                      f"{dst.name} gave no PDH or certificate chain (query-sev-capabilities); "
                      "the guest's keys cannot be wrapped for it."))
        return out
    parts = _split(dst)
    if isinstance(parts, Check):
        out.append(parts)
        return out
    pdh, pek, oca, cek = parts
    out.append(_chain(plan, policy, trust, pdh, pek, oca, cek))
    out.append(_domain(plan, policy, oca))
    out.append(_api(plan, policy, pek))
    out.append(_es(plan, policy))
    out.append(_cbit(src, dst, src_caps, dst_caps))
    return out


def _platform(src: HostReport, dst: HostReport) -> list[Check]:
    out = []
    for host, role, ok_states in ((src, "source", (2,)), (dst, "target", (1, 2))):
        sev = host.sev
        state = None if sev is None else sev.platform_state
        key, title = f"platform-{role}", f"{role.title()} platform state"
        if sev is None or (not sev.dev_sev and not host.lab):
            out.append(_c(key, title, CheckStatus.FAIL,
                          f"{host.name} has no SEV firmware ( /dev/sev absent or kvm_amd sev=N)."))
        elif state is None:
            out.append(_c(key, title, CheckStatus.WARN,
                          f"{host.name} did not report its platform state (PLATFORM_STATUS)."))
        elif state in ok_states:
            out.append(_c(key, title, CheckStatus.PASS,
                          f"{host.name} firmware is {PLATFORM_STATE_NAMES.get(state, state)}."))
        else:
            need = " or ".join(PLATFORM_STATE_NAMES[s] for s in ok_states)
            out.append(_c(key, title, CheckStatus.FAIL,
                          f"{host.name} firmware is {PLATFORM_STATE_NAMES.get(state, state)}, "
                          f"the {role} must be {need}."))
    return out


def _split(host: HostReport) -> tuple[Any, Any, Any, Any] | Check:
    from sevconsole.sev.certs import SevCert, split_platform_chain
    from sevconsole.sev.errors import SevFormatError

    caps = host.capabilities
    assert caps is not None
    try:
        pdh = SevCert.from_bytes(caps.pdh, name=f"{host.name} pdh.cert")
        pek, oca, cek = split_platform_chain(caps.cert_chain)
    except (SevFormatError, ValueError) as exc:
        return _c("chain", "Target certificate chain", CheckStatus.FAIL,
                  f"{host.name}: its certificates cannot be read: {exc}")
    return pdh, pek, oca, cek


def _chain(plan: MigrationPlan, policy: Any, trust: Any, pdh: Any, pek: Any, oca: Any, cek: Any) -> Check:
    from sevconsole.sev.policy import PolicyFlag

    dst = plan.target
    report = _verify(dst, trust, pdh, pek, oca, cek)
    firmware_checks = bool(policy.flags & (PolicyFlag.DOMAIN | PolicyFlag.SEV))
    title = "Target certificate chain"
    if isinstance(report, str):
        return _c("chain", title, CheckStatus.FAIL, report)
    if not report.ok:
        bad = [f"{link.name}: {link.detail or (link.reason.name if link.reason else 'failed')}"
               for link in report.links if not link.ok]
        return _c("chain", title, CheckStatus.FAIL,
                  f"{dst.name}'s certificate chain does not verify ({'; '.join(bad)}); "
                  "the guest's keys would be wrapped for an untrusted platform.")
    root = report.root
    if root is not None and root.is_lab and not dst.lab:
        return _c("chain", title, CheckStatus.FAIL,
                  f"{dst.name} chains to the lab root, which is trusted only for lab hosts.")
    root_name = f"{root.name} ({root.generation})" if root is not None else "a pinned root"
    if not firmware_checks:
        return _c("chain", title, CheckStatus.WARN,
                  f"{dst.name}'s chain verifies to {root_name} (checked by the console), but "
                  f"{plan.vm.name}'s policy sets neither DOMAIN nor SEV: the firmware itself would "
                  "wrap the guest's keys for any PDH.")
    return _c("chain", title, CheckStatus.PASS,
              f"{dst.name}'s PDH <- PEK <- CEK <- ASK <- ARK chain verifies to {root_name}.")


def _verify(dst: HostReport, trust: Any, pdh: Any, pek: Any, oca: Any, cek: Any) -> Any:
    """A ChainReport, or a sentence saying why the chain could not be checked."""
    from sevconsole.hosts.chains import trust_store, verify_platform
    from sevconsole.sev.certs import split_amd_chain
    from sevconsole.sev.errors import SevFormatError

    caps = dst.capabilities
    assert caps is not None
    if caps.amd_chain is None:
        if caps.chain_report is not None:
            return caps.chain_report  # discovery checked it against the operator's imported roots
        why = caps.chain_error or "no ASK/ARK for its generation"
        return (f"{dst.name}'s chain cannot be checked to an AMD root ({why}); "
                "import the AMD chain of its generation.")
    try:
        ask, ark = split_amd_chain(caps.amd_chain)
    except (SevFormatError, ValueError) as exc:
        return f"{dst.name}: its AMD chain (ASK || ARK) cannot be read: {exc}"
    store = trust if trust is not None else trust_store()
    return verify_platform(pdh, pek, oca, cek, ask=ask, ark=ark, trust=store)


def _domain(plan: MigrationPlan, policy: Any, oca: Any) -> Check:
    """The verdict is the firmware's own DOMAIN rule (sev.firmware.check_target), run on the
    target's certificates against the source's OCA; only the sentences are the console's."""
    from sevconsole.sev.certs import split_platform_chain
    from sevconsole.sev.firmware import check_target
    from sevconsole.sev.policy import GuestPolicy, PolicyFlag
    from sevconsole.sev.status import Status

    src, dst = plan.source, plan.target
    title = "DOMAIN (same owner)"
    if not policy.flags & PolicyFlag.DOMAIN:
        return _c("domain", title, CheckStatus.PASS, "DOMAIN (bit 4) is clear: any owner may receive.")
    if src.capabilities is None:
        return _c("domain", title, CheckStatus.FAIL,
                  f"{plan.vm.name}'s policy sets DOMAIN (bit 4) but {src.name} gave no certificate "
                  "chain, so its OCA cannot be compared.")
    try:
        _, src_oca, _ = split_platform_chain(src.capabilities.cert_chain)
    except ValueError as exc:
        return _c("domain", title, CheckStatus.FAIL, f"{src.name}: its certificate chain cannot be read: {exc}")
    caps = dst.capabilities
    assert caps is not None  # _sev_checks returns before the DOMAIN check without them
    verdict = check_target(GuestPolicy(PolicyFlag.DOMAIN), caps.pdh, caps.cert_chain, b"",
                           own_oca=src_oca, own_ark=None)
    # The owner is the OCA key: each platform signs its own copy, so the bytes may differ.
    if verdict.status is Status.SUCCESS:
        return _c("domain", title, CheckStatus.PASS,
                  f"DOMAIN (bit 4): {dst.name}'s OCA key equals {src.name}'s (fingerprint {oca.fingerprint()[:16]}).")
    if verdict.detail.startswith("DOMAIN:") and src_oca.fingerprint() != oca.fingerprint():
        return _c("domain", title, CheckStatus.FAIL,
                  f"{plan.vm.name}'s policy sets DOMAIN (bit 4): {dst.name}'s OCA key "
                  f"({oca.fingerprint()[:16]}) differs from {src.name}'s ({src_oca.fingerprint()[:16]}); "
                  "SEND_START would fail with POLICY_FAILURE.")
    return _c("domain", title, CheckStatus.FAIL,
              f"{plan.vm.name}'s policy sets DOMAIN (bit 4) and {dst.name}'s certificates fail the "
              f"firmware's check ({verdict.detail}); SEND_START would fail with {verdict.status.name}.")


def _api(plan: MigrationPlan, policy: Any, pek: Any) -> Check:
    dst = plan.target
    want = (policy.api_major, policy.api_minor)
    have = dst.sev.api if dst.sev is not None else None
    origin = "firmware"
    if have is None:
        have, origin = (pek.api_major, pek.api_minor), "PEK certificate"
    title = "Target firmware API"
    text = f"{dst.name} {origin} API {have[0]}.{have[1]}, policy needs at least {want[0]}.{want[1]}"
    if tuple(have) >= want:
        return _c("api", title, CheckStatus.PASS, text + ".")
    return _c("api", title, CheckStatus.FAIL,
              text + f": RECEIVE_START would fail with POLICY_FAILURE; update {dst.name}'s SEV firmware.")


def _es(plan: MigrationPlan, policy: Any) -> Check:
    from sevconsole.sev.policy import PolicyFlag

    dst = plan.target
    title = "SEV-ES"
    if not policy.flags & PolicyFlag.ES:
        return _c("es", title, CheckStatus.PASS, "ES (bit 2) is clear: no VMSA to move.")
    sev = dst.sev
    ok = sev is not None and (sev.kernel_sev_es is True or sev.es_configured is True)
    if ok:
        return _c("es", title, CheckStatus.PASS, f"{plan.vm.name} is SEV-ES and {dst.name} supports SEV-ES.")
    return _c("es", title, CheckStatus.FAIL,
              f"{plan.vm.name}'s policy sets ES (bit 2) but {dst.name} does not offer SEV-ES "
              "(kvm_amd sev_es=N or firmware ES not configured).")


def _cbit(src: HostReport, dst: HostReport, a: Any, b: Any) -> Check:
    title = "C-bit position"
    if a is None:
        return _c("cbitpos", title, CheckStatus.WARN, f"{src.name} did not report cbitpos.")
    pairs = (("cbitpos", a.cbitpos, b.cbitpos), ("reduced-phys-bits", a.reduced_phys_bits, b.reduced_phys_bits))
    unknown = [n for n, x, y in pairs if x is None or y is None]
    bad = [f"{n} {x} on {src.name} but {y} on {dst.name}" for n, x, y in pairs
           if x is not None and y is not None and x != y]
    if bad:
        return _c("cbitpos", title, CheckStatus.FAIL, "; ".join(bad) + ": the guest's page tables would not fit.")
    if unknown:
        return _c("cbitpos", title, CheckStatus.WARN, f"{', '.join(unknown)} not reported by both hosts.")
    return _c("cbitpos", title, CheckStatus.PASS, f"cbitpos {a.cbitpos} and reduced-phys-bits "
              f"{a.reduced_phys_bits} on both hosts.")
