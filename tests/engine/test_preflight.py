"""Preflight over HostReports built from the real AMD certificates (Naples and Rome machines)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevconsole.engine.checks import Check, CheckStatus, preflight, refused
from sevconsole.engine.plan import MigrationPlan
from sevconsole.hosts.report import Capabilities, HostReport, SevSupport, VmInfo
from sevconsole.sev.certs import AmdCert, join_platform_chain
from sevconsole.sev.policy import GuestPolicy, PolicyFlag
from sevconsole.sev.trust import TrustStore

RECOMMENDED = PolicyFlag.NODBG | PolicyFlag.NOKS | PolicyFlag.DOMAIN | PolicyFlag.SEV
DB_ARGV = ("/usr/bin/qemu-system-x86_64", "-name", "db", "-machine", "q35,confidential-guest-support=sev0",
           "-m", "2048", "-object", "sev-guest,id=sev0,policy=0x33,cbitpos=47,reduced-phys-bits=1",
           "-qmp", "unix:/run/db.qmp,server=on,wait=off", "-display", "none")


def _caps(certs: Path, platform: str, generation: str, *, cbitpos: int = 47,
          amd: bool = True) -> Capabilities:
    p = certs / "platforms" / platform
    a = certs / "amd" / generation
    chain = join_platform_chain(*(p.joinpath(f"{n}.cert").read_bytes() for n in ("pek", "oca", "cek")))
    amd_chain = a.joinpath("ask.cert").read_bytes() + a.joinpath("ark.cert").read_bytes() if amd else None
    return Capabilities(pdh=p.joinpath("pdh.cert").read_bytes(), cert_chain=chain, cbitpos=cbitpos,
                        reduced_phys_bits=1, amd_chain=amd_chain)


def _host(name: str, caps: Capabilities, api: tuple[int, int], *, es: bool = True, state: int = 2,
          vms: tuple[VmInfo, ...] = ()) -> HostReport:
    sev = SevSupport(kernel_sev=True, kernel_sev_es=es, dev_sev=True, api_major=api[0], api_minor=api[1],
                     platform_state=state, es_configured=es)
    return HostReport(name=name, address="10.0.0.1", port=22, reachable=True, sev=sev, capabilities=caps,
                      vms=vms, mem_available_mib=8192, qemu_sev_migration=True)


def _vm(policy: GuestPolicy) -> VmInfo:
    return VmInfo(name="db", pid=10, qmp_path="/run/db.qmp", argv=DB_ARGV, status="running",
                  memory_mib=2048, sev_enabled=True, policy=policy.to_u32(), migration_support=True)


def _plan(certs: Path, policy: GuestPolicy, *, src: tuple[str, str] = ("rome", "rome"),
          dst: tuple[str, str] = ("rome", "rome"), dst_api: tuple[int, int] = (0, 22),
          **kw: object) -> MigrationPlan:
    vm = _vm(policy)
    source = _host("alpha", _caps(certs, *src), (0, 22), vms=(vm,))
    target = _host("beta", _caps(certs, *dst, **{k: v for k, v in kw.items() if k in ("cbitpos", "amd")}),
                   dst_api, **{k: v for k, v in kw.items() if k in ("es",)})  # type: ignore[arg-type]
    return MigrationPlan(vm=vm, source=source, target=target)


def _by_key(checks: list[Check]) -> dict[str, Check]:
    return {c.key: c for c in checks}


def test_recommended_policy_between_two_rome_hosts_passes(sev_certs: Path) -> None:
    checks = preflight(_plan(sev_certs, GuestPolicy(RECOMMENDED, api_major=0, api_minor=17)))
    assert not refused(checks), [c for c in checks if c.status is CheckStatus.FAIL]
    got = _by_key(checks)
    assert got["chain"].status is CheckStatus.PASS and "AMD Rome ARK" in got["chain"].sentence
    assert got["domain"].status is CheckStatus.PASS
    assert got["api"].status is CheckStatus.PASS and "0.22" in got["api"].sentence


def test_nosend_refuses(sev_certs: Path) -> None:
    checks = preflight(_plan(sev_certs, GuestPolicy(RECOMMENDED | PolicyFlag.NOSEND)))
    assert refused(checks)
    nosend = _by_key(checks)["nosend"]
    assert nosend.status is CheckStatus.FAIL and "NOSEND (bit 3)" in nosend.sentence and "db" in nosend.sentence


def test_domain_mismatch_refuses(sev_certs: Path) -> None:
    """A Naples source and a Rome target have different OCAs (different owners)."""
    plan = _plan(sev_certs, GuestPolicy(RECOMMENDED), src=("naples", "naples"))
    checks = preflight(plan)
    domain = _by_key(checks)["domain"]
    assert refused(checks) and domain.status is CheckStatus.FAIL
    assert "DOMAIN (bit 4)" in domain.sentence and "beta" in domain.sentence and "alpha" in domain.sentence


def test_old_firmware_api_refuses(sev_certs: Path) -> None:
    checks = preflight(_plan(sev_certs, GuestPolicy(RECOMMENDED, api_major=0, api_minor=24)))
    api = _by_key(checks)["api"]
    assert refused(checks) and api.status is CheckStatus.FAIL
    assert "0.22" in api.sentence and "0.24" in api.sentence and "beta" in api.sentence


def test_chain_to_wrong_root_refuses(sev_certs: Path) -> None:
    """The Rome platform's CEK is not signed by the Naples ASK."""
    checks = preflight(_plan(sev_certs, GuestPolicy(RECOMMENDED), dst=("rome", "naples")))
    chain = _by_key(checks)["chain"]
    assert refused(checks) and chain.status is CheckStatus.FAIL
    assert "ASK->CEK" in chain.sentence and "beta" in chain.sentence


def test_tampered_pdh_refuses(sev_certs: Path) -> None:
    plan = _plan(sev_certs, GuestPolicy(RECOMMENDED))
    caps = plan.target.capabilities
    assert caps is not None
    pdh = bytearray(caps.pdh)
    pdh[0x20] ^= 1  # inside the public key: the PEK's signature no longer matches
    bad = MigrationPlan(plan.vm, plan.source,
                        _host("beta", Capabilities(bytes(pdh), caps.cert_chain, 47, 1, amd_chain=caps.amd_chain),
                              (0, 22)))
    chain = _by_key(preflight(bad))["chain"]
    assert chain.status is CheckStatus.FAIL and "PEK->PDH" in chain.sentence


def test_no_domain_no_sev_still_verified_and_warned(sev_certs: Path) -> None:
    checks = preflight(_plan(sev_certs, GuestPolicy(PolicyFlag.NODBG)))
    chain = _by_key(checks)["chain"]
    assert not refused(checks)
    assert chain.status is CheckStatus.WARN and "neither DOMAIN nor SEV" in chain.sentence
    # ...and a bad chain with such a policy is still refused by the console
    checks = preflight(_plan(sev_certs, GuestPolicy(PolicyFlag.NODBG), dst=("rome", "naples")))
    assert _by_key(checks)["chain"].status is CheckStatus.FAIL


def test_es_guest_needs_es_target(sev_certs: Path) -> None:
    checks = preflight(_plan(sev_certs, GuestPolicy(RECOMMENDED | PolicyFlag.ES), es=False))
    es = _by_key(checks)["es"]
    assert es.status is CheckStatus.FAIL and "ES (bit 2)" in es.sentence


def test_cbitpos_mismatch_refuses(sev_certs: Path) -> None:
    checks = preflight(_plan(sev_certs, GuestPolicy(RECOMMENDED), cbitpos=51))
    cbit = _by_key(checks)["cbitpos"]
    assert cbit.status is CheckStatus.FAIL and "47" in cbit.sentence and "51" in cbit.sentence


def test_missing_amd_chain_is_a_clear_refusal(sev_certs: Path) -> None:
    checks = preflight(_plan(sev_certs, GuestPolicy(RECOMMENDED), amd=False))
    chain = _by_key(checks)["chain"]
    assert chain.status is CheckStatus.FAIL and "import the AMD chain" in chain.sentence


def test_lab_root_only_for_lab_hosts(sev_certs: Path) -> None:
    """A store that also trusts a lab root still accepts real AMD chains; a lab ARK offered in a
    host's AMD chain is not trusted by the AMD-only store."""
    from sevconsole.sev.certs import generate_lab_root

    lab = generate_lab_root()
    trust = TrustStore.amd().with_lab_root(lab.ark)
    plan = _plan(sev_certs, GuestPolicy(RECOMMENDED))
    assert _by_key(preflight(plan, trust))["chain"].status is CheckStatus.PASS
    caps = plan.target.capabilities
    assert caps is not None
    swapped = Capabilities(caps.pdh, caps.cert_chain, 47, 1, amd_chain=lab.ask.to_bytes() + lab.ark.to_bytes())
    bad = MigrationPlan(plan.vm, plan.source, _host("beta", swapped, (0, 22)))
    chain = _by_key(preflight(bad))["chain"]
    assert chain.status is CheckStatus.FAIL and "lab root" in chain.sentence
    assert AmdCert.from_bytes(lab.ark.to_bytes()).is_lab


def test_upstream_qemu_blocker_shown_verbatim(sev_certs: Path) -> None:
    plan = _plan(sev_certs, GuestPolicy(RECOMMENDED))
    vm = VmInfo(**{**plan.vm.__dict__, "migration_support": False,
                   "migration_blocker": "SEV: Migration is not implemented"})
    checks = preflight(MigrationPlan(vm, plan.source, plan.target))
    qemu = _by_key(checks)["qemu-source"]
    assert qemu.status is CheckStatus.FAIL and qemu.sentence.endswith("SEV: Migration is not implemented")


def test_bad_input_never_crashes(sev_certs: Path) -> None:
    plan = _plan(sev_certs, GuestPolicy(RECOMMENDED))
    junk = Capabilities(pdh=b"\x01" * 100, cert_chain=b"", cbitpos=None, reduced_phys_bits=None)
    checks = preflight(MigrationPlan(plan.vm, plan.source, _host("beta", junk, (0, 22))))
    chain = _by_key(checks)["chain"]
    assert chain.status is CheckStatus.FAIL and "beta" in chain.sentence


def _plain(argv: tuple[str, ...]) -> list[Check]:
    vm = VmInfo(name="web", pid=7, qmp_path="/run/web.qmp", argv=argv, status="running", memory_mib=64)
    src = HostReport(name="alpha", address="10.0.0.1", port=22, reachable=True, vms=(vm,))
    dst = HostReport(name="beta", address="10.0.0.2", port=22, reachable=True, mem_available_mib=4096)
    return preflight(MigrationPlan(vm, src, dst))


def test_target_command_line_refusal_names_the_option_and_the_target() -> None:
    checks = _plain(("qemu-system-x86_64", "-name", "web", "-m", "64", "-qmp", "unix:/run/web.qmp,server=on",
                     "-netdev", "bridge,id=x,br=br0,helper=touch /tmp/PWNED;"))
    argv = _by_key(checks)["argv"]
    assert refused(checks) and argv.status is CheckStatus.FAIL
    assert argv.sentence == ("the source's command line has -netdev bridge with helper=, which would make beta "
                             "run a program the source named; refused.")


def test_target_command_line_unknown_or_rewritten() -> None:
    unknown = _by_key(_plain(()))["argv"]
    assert unknown.status is CheckStatus.FAIL and "unknown" in unknown.sentence and "beta" in unknown.sentence
    rewritten = _by_key(_plain(("qemu-system-x86_64", "-name", "web", "-m", "64", "-object",
                                "memory-backend-file,id=r,size=64M,mem-path=/srv/web.ram")))["argv"]
    assert rewritten.status is CheckStatus.WARN and "mem-path is not opened" in rewritten.sentence
    # an argv that passes unchanged adds no line: the operator has nothing to act on
    clean = _plain(("qemu-system-x86_64", "-name", "web", "-m", "64", "-qmp", "unix:/run/web.qmp,server=on"))
    assert "argv" not in _by_key(clean) and not refused(clean)


@pytest.mark.parametrize("status", ["shutdown", "inmigrate"])
def test_guest_not_running_refused(sev_certs: Path, status: str) -> None:
    plan = _plan(sev_certs, GuestPolicy(RECOMMENDED))
    vm = VmInfo(**{**plan.vm.__dict__, "status": status})
    checks = preflight(MigrationPlan(vm, plan.source, plan.target))
    assert _by_key(checks)["vm"].status is CheckStatus.FAIL

_blob = st.one_of(st.none(), st.binary(max_size=64), st.sampled_from([b"\x00" * 2084, b"\x01" * 6252]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.one_of(st.none(), st.integers(-5, 2**33)), pdh=_blob, chain=_blob, amd=_blob,
       api=st.tuples(st.integers(0, 300), st.integers(0, 300)), state=st.one_of(st.none(), st.integers(-1, 9)),
       cbit=st.one_of(st.none(), st.integers(0, 64)), status=st.one_of(st.none(), st.text(max_size=8)),
       sev=st.booleans(), lab=st.booleans())
def test_preflight_never_crashes_on_garbage(sev_certs: Path, policy, pdh, chain, amd, api, state, cbit, status,
                                            sev, lab) -> None:
    caps = None if pdh is None or chain is None else Capabilities(pdh, chain, cbit, 1, amd_chain=amd)
    vm = VmInfo(name="g", pid=1, qmp_path="/q", status=status, sev_enabled=sev, policy=policy)
    src = _host("alpha", _caps(sev_certs, "rome", "rome"), (0, 22), vms=(vm,))
    dst = HostReport(name="beta", address="x", port=22, reachable=True, lab=lab, capabilities=caps,
                     sev=SevSupport(True, None, True, api_major=api[0], api_minor=api[1], platform_state=state))
    checks = preflight(MigrationPlan(vm, src, dst))
    assert checks and all(c.sentence for c in checks)
    if sev and (caps is None or policy is None):
        assert refused(checks)
