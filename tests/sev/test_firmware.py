"""The firmware model end to end: two platforms, LAUNCH, SEND, RECEIVE, with real crypto and chains.

Helpers here (`lab_root`, `make_fw`, `launch`, `begin_migration`) are shared by the other
test_firmware_* modules.
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevconsole.sev.certs import (
    Algo,
    AmdCert,
    LabRoot,
    SevCert,
    Usage,
    generate_lab_root,
    sign_sev_cert,
    split_amd_chain,
    split_platform_chain,
)
from sevconsole.sev.chain import verify_chain
from sevconsole.sev.firmware import GuestAccessError, SevFirmware
from sevconsole.sev.status import Command, GuestState, PlatformState, Status
from sevconsole.sev.trust import TrustStore

PAGE = 4096
POLICY = 0x1  # NODBG, QEMU's default
DOMAIN_POLICY = 0x11  # NODBG|DOMAIN
SEV_POLICY = 0x21  # NODBG|SEV


@pytest.fixture(scope="session")
def lab_root() -> LabRoot:
    return generate_lab_root()


@pytest.fixture(scope="session")
def other_root() -> LabRoot:
    return generate_lab_root()


def make_fw(root: LabRoot, **kwargs) -> SevFirmware:
    fw = SevFirmware(ask_key=root.ask_key, ask=root.ask, ark=root.ark, **kwargs)
    assert fw.init().status is Status.SUCCESS
    return fw


def random_memory(pages: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, pages * PAGE, dtype=np.uint8)


def launch(fw: SevFirmware, memory, policy: int = POLICY) -> int:
    """LAUNCH a guest whose whole memory is private (encrypted in place by LAUNCH_UPDATE_DATA)."""
    start = fw.launch_start(policy, memory)
    assert start.status is Status.SUCCESS, start.detail
    assert fw.launch_update_data(start.handle, 0, len(memory)).status is Status.SUCCESS
    assert fw.launch_measure(start.handle).status is Status.SUCCESS
    assert fw.launch_finish(start.handle).status is Status.SUCCESS
    return start.handle


@dataclass
class Migration:
    src: SevFirmware
    src_handle: int
    dst: SevFirmware
    dst_handle: int
    dst_memory: np.ndarray
    policy: int
    session: bytes


def begin_migration(
    src: SevFirmware, handle: int, dst: SevFirmware, dst_memory, policy: int = POLICY
) -> Migration:
    """SEND_START with the target's PDH and chains, then RECEIVE_START with the source's PDH."""
    target = dst.pdh_cert_export()
    assert target.status is Status.SUCCESS
    sent = src.send_start(handle, target.pdh, target.cert_chain, dst.amd_chain)
    assert sent.status is Status.SUCCESS, sent.detail
    assert len(sent.session) == 128 and sent.policy == policy
    source_pdh = src.pdh_cert_export().pdh
    got = dst.receive_start(sent.policy, source_pdh, sent.session, dst_memory)
    assert got.status is Status.SUCCESS, got.detail
    return Migration(src, handle, dst, got.handle, dst_memory, policy, sent.session)


def plain_of(fw: SevFirmware, handle: int, memory) -> bytes:
    return fw.guest_read(handle, 0, len(memory))


# ---------------------------------------------------------------------------------------------


def test_migration_moves_random_pages_intact_and_leaves_the_source_sent(lab_root: LabRoot) -> None:
    pages = 96
    src, dst = make_fw(lab_root), make_fw(lab_root)
    src_mem = random_memory(pages)
    original = src_mem.tobytes()
    handle = launch(src, src_mem)
    assert src_mem.tobytes() != original  # LAUNCH_UPDATE_DATA encrypted it in place
    assert src.guest_read(handle, 0, len(src_mem)) == original

    # The guest writes some pages after launch, through its own (encrypted) view.
    rnd = random.Random(7)
    for page in rnd.sample(range(pages), 8):
        src.guest_write(handle, page * PAGE, os.urandom(PAGE))
    expected = src.guest_read(handle, 0, len(src_mem))

    dst_mem = np.zeros_like(src_mem)
    m = begin_migration(src, handle, dst, dst_mem)
    assert src.guest_state(handle) is GuestState.SUPDATE
    assert dst.guest_state(m.dst_handle) is GuestState.RUPDATE

    # First half as single packets in random order, second half as batches of uneven runs.
    singles = list(range(pages // 2))
    rnd.shuffle(singles)
    for page in singles:
        out = src.send_update_data(handle, page * PAGE, PAGE)
        assert out.status is Status.SUCCESS and len(out.header) == 52 and len(out.trans) == PAGE
        assert out.trans != expected[page * PAGE : (page + 1) * PAGE]
        got = dst.receive_update_data(m.dst_handle, page * PAGE, out.header, out.trans)
        assert got.status is Status.SUCCESS, got.detail
    page = pages // 2
    for run in (1, 7, 16, pages // 2 - 24):
        batch = src.send_pages(handle, page * PAGE, run)
        assert batch.status is Status.SUCCESS
        assert len(batch.headers) == 52 * run and len(batch.trans) == PAGE * run
        assert (
            dst.receive_pages(m.dst_handle, page * PAGE, batch.headers, batch.trans).status
            is Status.SUCCESS
        )
        page += run
    assert page == pages

    assert src.send_finish(handle).status is Status.SUCCESS
    assert dst.receive_finish(m.dst_handle).status is Status.SUCCESS
    assert dst.guest_state(m.dst_handle) is GuestState.RUNNING

    # Plaintext equal page for page; ciphertext at rest differs (other VEK on the target).
    arrived = dst.guest_read(m.dst_handle, 0, len(dst_mem))
    for page in rnd.sample(range(pages), 32):
        span = slice(page * PAGE, (page + 1) * PAGE)
        assert arrived[span] == expected[span]
        assert dst_mem[span].tobytes() != src_mem[span].tobytes()
    assert arrived == expected

    # The source is SENT: no second runnable copy. Only DECOMMISSION (and queries) remain.
    assert src.guest_status(handle).state is GuestState.SENT
    target = dst.pdh_cert_export()
    refused = {
        "launch_update_data": src.launch_update_data(handle, 0, PAGE),
        "launch_measure": src.launch_measure(handle),
        "launch_finish": src.launch_finish(handle),
        "activate": src.activate(handle, 5),
        "send_start": src.send_start(handle, target.pdh, target.cert_chain, dst.amd_chain),
        "send_update_data": src.send_update_data(handle, 0, PAGE),
        "send_pages": src.send_pages(handle, 0, 2),
        "send_finish": src.send_finish(handle),
        "send_cancel": src.send_cancel(handle),
        "receive_update_data": src.receive_update_data(handle, 0, bytes(52), bytes(PAGE)),
        "receive_finish": src.receive_finish(handle),
    }
    assert {name: r.status for name, r in refused.items()} == dict.fromkeys(
        refused, Status.INVALID_GUEST_STATE
    )
    with pytest.raises(GuestAccessError, match="SENT"):
        src.guest_read(handle, 0, PAGE)
    with pytest.raises(GuestAccessError, match="SENT"):
        src.guest_write(handle, 0, bytes(PAGE))
    assert src.decommission(handle).status is Status.SUCCESS
    assert src.guest_state(handle) is GuestState.UNINIT
    assert src.platform_status().state is PlatformState.INIT  # last guest gone
    assert src.guest_status(handle).status is Status.INVALID_PLATFORM_STATE


def test_counts_and_log_record_every_packet(lab_root: LabRoot) -> None:
    src, dst = make_fw(lab_root), make_fw(lab_root)
    mem = random_memory(40, seed=2)
    handle = launch(src, mem)
    m = begin_migration(src, handle, dst, np.zeros_like(mem))
    batch = src.send_pages(handle, 0, 40)
    assert dst.receive_pages(m.dst_handle, 0, batch.headers, batch.trans).status is Status.SUCCESS
    assert src.counts[Command.SEND_UPDATE_DATA] == 40
    assert dst.counts[Command.RECEIVE_UPDATE_DATA] == 40
    tail = src.log[-40:]
    assert [r.command for r in tail] == [Command.SEND_UPDATE_DATA] * 40
    assert all(r.handle == handle and r.status is Status.SUCCESS for r in tail)
    assert [r.command for r in src.log[-42:-40]] == [Command.SEND_START, Command.PDH_CERT_EXPORT]
    # A failing command is one record with its status, and becomes the last status.
    assert src.send_pages(handle, 8, 2).status is Status.INVALID_ADDRESS
    assert src.counts[Command.SEND_UPDATE_DATA] == 41
    assert (
        src.log[-1].status is Status.INVALID_ADDRESS and src.last_status is Status.INVALID_ADDRESS
    )
    # The log is bounded.
    for _ in range(30):
        assert src.send_pages(handle, 0, 40).ok
    assert len(src.log) == 1024


def test_send_cancel_returns_the_guest_to_running_and_a_retry_works(lab_root: LabRoot) -> None:
    src, dst = make_fw(lab_root), make_fw(lab_root)
    mem = random_memory(4, seed=3)
    handle = launch(src, mem)
    expected = src.guest_read(handle, 0, len(mem))
    first = begin_migration(src, handle, dst, np.zeros_like(mem))
    assert src.send_cancel(handle).status is Status.SUCCESS
    assert src.guest_state(handle) is GuestState.RUNNING
    src.guest_write(handle, 0, b"after cancel".ljust(PAGE, b"."))  # the guest runs on
    assert dst.decommission(first.dst_handle).status is Status.SUCCESS
    dst_mem = np.zeros_like(mem)
    m = begin_migration(src, handle, dst, dst_mem)
    assert m.session != first.session  # fresh TEK/TIK/nonce
    batch = src.send_pages(handle, 0, 4)
    assert dst.receive_pages(m.dst_handle, 0, batch.headers, batch.trans).ok
    assert src.send_finish(handle).ok and dst.receive_finish(m.dst_handle).ok
    assert (
        dst.guest_read(m.dst_handle, 0, len(mem))
        == b"after cancel".ljust(PAGE, b".") + expected[PAGE:]
    )


def test_generated_chain_verifies_under_the_lab_root_and_only_there(
    lab_root: LabRoot, other_root: LabRoot
) -> None:
    fw = make_fw(lab_root, api=(0, 24))
    export = fw.pdh_cert_export()
    assert export.status is Status.SUCCESS
    assert len(export.pdh) == 2084 and len(export.cert_chain) == 6252
    pek, oca, cek = split_platform_chain(export.cert_chain)
    ask, ark = split_amd_chain(fw.amd_chain)
    pdh = SevCert.from_bytes(export.pdh, "pdh.cert")
    assert (pdh.usage, pek.usage, oca.usage, cek.usage) == (
        Usage.PDH,
        Usage.PEK,
        Usage.OCA,
        Usage.CEK,
    )
    assert (pdh.api_major, pdh.api_minor) == (0, 24)
    report = verify_chain(
        pdh=pdh,
        pek=pek,
        oca=oca,
        cek=cek,
        ask=ask,
        ark=ark,
        trust=TrustStore.amd().with_lab_root(lab_root.ark),
    )
    assert report.ok, report.to_dict()
    assert report.root is not None and report.root.is_lab
    # Not trusted without the lab root, nor under another lab's root.
    assert not verify_chain(
        pdh=pdh, pek=pek, oca=oca, cek=cek, ask=ask, ark=ark, trust=TrustStore.amd()
    ).ok
    assert not verify_chain(
        pdh=pdh,
        pek=pek,
        oca=oca,
        cek=cek,
        ask=ask,
        ark=ark,
        trust=TrustStore.amd().with_lab_root(other_root.ark),
    ).ok
    # PDH_GEN: a new PDH key, still signed by the same PEK.
    assert fw.pdh_gen().status is Status.SUCCESS
    new_pdh = SevCert.from_bytes(fw.pdh_cert_export().pdh, "pdh.cert")
    assert new_pdh.fingerprint() != pdh.fingerprint()
    assert verify_chain(
        pdh=new_pdh,
        pek=pek,
        oca=oca,
        cek=cek,
        ask=ask,
        ark=ark,
        trust=TrustStore.amd().with_lab_root(lab_root.ark),
    ).ok


def test_pek_gen_makes_a_new_self_owned_pek(lab_root: LabRoot) -> None:
    owner = ec.generate_private_key(ec.SECP384R1())
    fw = make_fw(lab_root, oca_key=owner)
    assert fw.platform_status().flags & 1 == 1  # an owner's OCA: externally owned
    before = split_platform_chain(fw.pdh_cert_export().cert_chain)
    assert fw.pek_gen().status is Status.SUCCESS
    pek, oca, cek = split_platform_chain(fw.pdh_cert_export().cert_chain)
    assert fw.platform_status().flags & 1 == 0
    assert (
        pek.fingerprint() != before[0].fingerprint()
        and oca.fingerprint() != before[1].fingerprint()
    )
    assert cek.fingerprint() == before[2].fingerprint()  # the chip key never changes
    ask, ark = split_amd_chain(fw.amd_chain)
    pdh = SevCert.from_bytes(fw.pdh_cert_export().pdh)
    assert verify_chain(
        pdh=pdh,
        pek=pek,
        oca=oca,
        cek=cek,
        ask=ask,
        ark=ark,
        trust=TrustStore.amd().with_lab_root(lab_root.ark),
    ).ok


def _owner_signs(fw: SevFirmware, owner_key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    csr = fw.pek_csr()
    assert csr.status is Status.SUCCESS and len(csr.csr) == 2084
    oca = SevCert.build(owner_key.public_key(), Usage.OCA, Algo.ECDSA_SHA256, 0, 24)
    oca = sign_sev_cert(oca, owner_key, Usage.OCA, 0)
    pek = sign_sev_cert(SevCert.from_bytes(csr.csr, "csr"), owner_key, Usage.OCA, 0)
    return pek.to_bytes(), oca.to_bytes()


def test_pek_cert_import_takes_an_owner_and_two_owned_hosts_share_a_domain(
    lab_root: LabRoot,
) -> None:
    owner = ec.generate_private_key(ec.SECP384R1())
    src, dst = make_fw(lab_root), make_fw(lab_root)
    for fw in (src, dst):
        pek, oca = _owner_signs(fw, owner)
        assert fw.pek_cert_import(pek, oca).status is Status.SUCCESS
        assert fw.platform_status().flags & 1 == 1
        assert fw.pek_cert_import(pek, oca).status is Status.ALREADY_OWNED
        p, o, c = split_platform_chain(fw.pdh_cert_export().cert_chain)
        ask, ark = split_amd_chain(fw.amd_chain)
        pdh = SevCert.from_bytes(fw.pdh_cert_export().pdh)
        assert verify_chain(
            pdh=pdh,
            pek=p,
            oca=o,
            cek=c,
            ask=ask,
            ark=ark,
            trust=TrustStore.amd().with_lab_root(lab_root.ark),
        ).ok
    mem = random_memory(2, seed=4)
    handle = launch(src, mem, DOMAIN_POLICY | 0x20)
    m = begin_migration(src, handle, dst, np.zeros_like(mem), DOMAIN_POLICY | 0x20)
    assert dst.guest_state(m.dst_handle) is GuestState.RUPDATE


def test_pek_cert_import_refuses_what_the_owner_did_not_sign(lab_root: LabRoot) -> None:
    owner = ec.generate_private_key(ec.SECP384R1())
    fw = make_fw(lab_root)
    pek, oca = _owner_signs(fw, owner)
    forged = bytearray(pek)
    forged[0x20] ^= 1  # inside the public key: the OCA signature no longer covers it
    assert fw.pek_cert_import(bytes(forged), oca).status is Status.BAD_SIGNATURE
    assert fw.pek_cert_import(pek[:100], oca).status is Status.INVALID_LENGTH
    assert fw.pek_cert_import(oca, oca).status is Status.INVALID_CERTIFICATE
    other = make_fw(lab_root)
    foreign_pek, foreign_oca = _owner_signs(other, owner)  # signed, but another platform's PEK
    assert fw.pek_cert_import(foreign_pek, foreign_oca).status is Status.INVALID_CERTIFICATE
    assert fw.platform_status().flags & 1 == 0  # still self-owned


# --------------------------------------------------------------------------------------------- DOMAIN, SEV


def test_domain_guest_moves_between_hosts_sharing_an_oca(lab_root: LabRoot) -> None:
    owner = ec.generate_private_key(ec.SECP384R1())
    src, dst = make_fw(lab_root, oca_key=owner), make_fw(lab_root, oca_key=owner)
    mem = random_memory(8, seed=5)
    handle = launch(src, mem, DOMAIN_POLICY)
    expected = src.guest_read(handle, 0, len(mem))
    dst_mem = np.zeros_like(mem)
    m = begin_migration(src, handle, dst, dst_mem, DOMAIN_POLICY)
    batch = src.send_pages(handle, 0, 8)
    assert dst.receive_pages(m.dst_handle, 0, batch.headers, batch.trans).ok
    assert src.send_finish(handle).ok and dst.receive_finish(m.dst_handle).ok
    assert dst.guest_read(m.dst_handle, 0, len(mem)) == expected


def test_domain_guest_refuses_a_target_of_another_owner(lab_root: LabRoot) -> None:
    src = make_fw(lab_root, oca_key=ec.generate_private_key(ec.SECP384R1()))
    dst = make_fw(lab_root, oca_key=ec.generate_private_key(ec.SECP384R1()))
    handle = launch(src, random_memory(1), DOMAIN_POLICY)
    target = dst.pdh_cert_export()
    out = src.send_start(handle, target.pdh, target.cert_chain, dst.amd_chain)
    assert out.status is Status.POLICY_FAILURE
    assert "OCA" in out.detail and "DOMAIN" in out.detail
    assert out.session == b""
    assert src.guest_state(handle) is GuestState.RUNNING
    # Without DOMAIN the same target is fine.
    plain = launch(src, random_memory(1), POLICY)
    assert (
        src.send_start(plain, target.pdh, target.cert_chain, dst.amd_chain).status is Status.SUCCESS
    )


def test_domain_refuses_a_pdh_its_pek_did_not_sign(lab_root: LabRoot) -> None:
    owner = ec.generate_private_key(ec.SECP384R1())
    src, dst, third = (make_fw(lab_root, oca_key=owner) for _ in range(3))
    handle = launch(src, random_memory(1), DOMAIN_POLICY)
    chain = dst.pdh_cert_export().cert_chain
    stranger_pdh = third.pdh_cert_export().pdh  # same owner, other platform's PEK signed it
    out = src.send_start(handle, stranger_pdh, chain, dst.amd_chain)
    assert out.status is Status.POLICY_FAILURE and "PEK" in out.detail


def test_sev_guest_moves_to_a_target_of_the_same_root(lab_root: LabRoot) -> None:
    src, dst = make_fw(lab_root), make_fw(lab_root, api=(0, 24))
    handle = launch(src, random_memory(2), SEV_POLICY | (24 << 24))
    m = begin_migration(src, handle, dst, np.zeros(2 * PAGE, np.uint8), SEV_POLICY | (24 << 24))
    assert dst.guest_state(m.dst_handle) is GuestState.RUPDATE


def test_sev_guest_refuses_a_target_of_another_root(lab_root: LabRoot, other_root: LabRoot) -> None:
    src, dst = make_fw(lab_root), make_fw(other_root)
    handle = launch(src, random_memory(1), SEV_POLICY)
    target = dst.pdh_cert_export()
    # The target's own AMD chain ends at another ARK.
    out = src.send_start(handle, target.pdh, target.cert_chain, dst.amd_chain)
    assert out.status is Status.POLICY_FAILURE and "ARK" in out.detail
    # This platform's AMD chain with the foreign CEK: the ASK did not sign it.
    out = src.send_start(handle, target.pdh, target.cert_chain, src.amd_chain)
    assert out.status is Status.POLICY_FAILURE and "ASK -> CEK" in out.detail
    assert src.guest_state(handle) is GuestState.RUNNING


@pytest.mark.parametrize(
    ("target_api", "policy_api", "expected"),
    [
        ((0, 17), (0, 24), Status.POLICY_FAILURE),
        ((0, 23), (0, 24), Status.POLICY_FAILURE),
        ((0, 24), (0, 24), Status.SUCCESS),
        ((1, 0), (0, 24), Status.SUCCESS),
        ((0, 24), (1, 0), Status.POLICY_FAILURE),
    ],
)
def test_sev_policy_needs_the_target_api(
    lab_root: LabRoot, target_api, policy_api, expected
) -> None:
    src, dst = make_fw(lab_root, api=(1, 2)), make_fw(lab_root, api=target_api)
    policy = SEV_POLICY | (policy_api[0] << 16) | (policy_api[1] << 24)
    handle = launch(src, random_memory(1), policy)
    target = dst.pdh_cert_export()
    out = src.send_start(handle, target.pdh, target.cert_chain, dst.amd_chain)
    assert out.status is expected, out.detail
    if expected is Status.POLICY_FAILURE:
        assert "API" in out.detail


def test_real_rome_platform_is_checked_against_the_policy(
    lab_root: LabRoot, sev_certs: Path
) -> None:
    """A real Rome PDH and chain: any policy without DOMAIN/SEV accepts it; SEV and DOMAIN refuse it."""
    rome = sev_certs / "platforms" / "rome"
    pdh = (rome / "pdh.cert").read_bytes()
    chain = b"".join((rome / f"{n}.cert").read_bytes() for n in ("pek", "oca", "cek"))
    amd = b"".join((sev_certs / "amd" / "rome" / f"{n}.cert").read_bytes() for n in ("ask", "ark"))
    assert AmdCert.from_bytes(amd[1600:]).key_id.hex() == "e6002122fb58419399d15fee7b131351"
    src = make_fw(lab_root)
    open_guest = launch(src, random_memory(1), POLICY)
    out = src.send_start(open_guest, pdh, chain, amd)
    assert out.status is Status.SUCCESS and len(out.session) == 128  # wrapped for the real PDH key
    sev_guest = launch(src, random_memory(1), SEV_POLICY)
    out = src.send_start(sev_guest, pdh, chain, amd)
    assert out.status is Status.POLICY_FAILURE and "e6002122fb58419399d15fee7b131351" in out.detail
    domain_guest = launch(src, random_memory(1), DOMAIN_POLICY)
    assert src.send_start(domain_guest, pdh, chain, amd).status is Status.POLICY_FAILURE
    # A real PEK (or a flipped PDH key) is no PDH.
    pek = (rome / "pek.cert").read_bytes()
    assert (
        src.send_start(launch(src, random_memory(1)), pek, chain, amd).status
        is Status.INVALID_CERTIFICATE
    )
    bad = bytearray(pdh)
    bad[0x20] ^= 0x40
    assert (
        src.send_start(launch(src, random_memory(1)), bytes(bad), chain, amd).status
        is Status.INVALID_CERTIFICATE
    )


# --------------------------------------------------------------------------------------------- threads


def test_concurrent_page_commands_from_several_threads(lab_root: LabRoot) -> None:
    src, dst = make_fw(lab_root), make_fw(lab_root)
    pages = 64
    mem = random_memory(pages, seed=6)
    handle = launch(src, mem)
    expected = src.guest_read(handle, 0, len(mem))
    dst_mem = np.zeros_like(mem)
    m = begin_migration(src, handle, dst, dst_mem)
    errors: list[str] = []

    def worker(part: range) -> None:
        for page in part:
            out = src.send_update_data(handle, page * PAGE, PAGE)
            got = dst.receive_update_data(m.dst_handle, page * PAGE, out.header, out.trans)
            if not (out.ok and got.ok):
                errors.append(f"page {page}: {out.status.name} {got.status.name}")

    threads = [threading.Thread(target=worker, args=(range(i, pages, 4),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert src.counts[Command.SEND_UPDATE_DATA] == pages
    assert src.send_finish(handle).ok and dst.receive_finish(m.dst_handle).ok
    assert dst.guest_read(m.dst_handle, 0, len(mem)) == expected


def test_the_guest_cpu_view_and_its_limits(lab_root: LabRoot) -> None:
    fw = make_fw(lab_root)
    mem = bytearray(2 * PAGE)
    handle = fw.launch_start(POLICY, mem).handle
    fw.guest_write(handle, 16, b"secret".ljust(32, b"\0"))
    assert b"secret" not in mem  # at rest it is ciphertext
    assert fw.guest_read(handle, 16, 32) == b"secret".ljust(32, b"\0")
    for gpa, length, why in (
        (8, 16, "aligned"),
        (0, 24, "multiple of 16"),
        (PAGE, 2 * PAGE, "beyond"),
        (0, -16, "negative"),
        ("0", 16, "integers"),
    ):
        with pytest.raises(GuestAccessError, match=why):
            fw.guest_read(handle, gpa, length)
    with pytest.raises(GuestAccessError, match="does not exist"):
        fw.guest_read(handle + 1, 0, 16)


def test_packets_are_counted_as_packets_whatever_their_size(lab_root: LabRoot) -> None:
    src, dst = make_fw(lab_root), make_fw(lab_root)
    mem = random_memory(8, seed=9)
    handle = launch(src, mem)
    m = begin_migration(src, handle, dst, np.zeros_like(mem))
    batch = src.send_pages(handle, 0, 3, packet_size=0x2000)  # 3 packets of two pages each
    assert batch.ok and len(batch.headers) == 3 * 52
    assert dst.receive_pages(m.dst_handle, 0, batch.headers, batch.trans, packet_size=0x2000).ok
    assert (
        src.counts[Command.SEND_UPDATE_DATA] == 3 and dst.counts[Command.RECEIVE_UPDATE_DATA] == 3
    )
    assert dst.receive_finish(m.dst_handle).ok
    assert dst.guest_read(m.dst_handle, 0, 6 * PAGE) == src.guest_read(handle, 0, 6 * PAGE)
