"""Integrity: every MAC is checked before anything is decrypted; failures are BAD_MEASUREMENT
and leave the target's guest memory exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest

from sevconsole.sev.certs import LabRoot
from sevconsole.sev.status import GuestState, Status
from tests.sev.test_firmware import PAGE, POLICY, lab_root, launch, make_fw, random_memory
from tests.sev.test_firmware_rules import ForeignSource

__all__ = ["lab_root"]

PAGES = 8


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


@pytest.fixture
def migration(lab_root: LabRoot):
    src, dst = make_fw(lab_root), make_fw(lab_root)
    mem = random_memory(PAGES, seed=11)
    handle = launch(src, mem)
    target = dst.pdh_cert_export()
    sent = src.send_start(handle, target.pdh, target.cert_chain, dst.amd_chain)
    assert sent.ok
    dst_mem = np.zeros_like(mem)
    got = dst.receive_start(sent.policy, src.pdh_cert_export().pdh, sent.session, dst_mem)
    assert got.ok
    # A first page lands, so "unchanged" is checked against memory that holds data.
    first = src.send_update_data(handle, 0, PAGE)
    assert dst.receive_update_data(got.handle, 0, first.header, first.trans).ok
    return src, handle, dst, got.handle, dst_mem


# Offsets into header || ciphertext: flags are covered by the MAC (but bit 0 is COMPRESSED),
# then IV, MAC, and bytes of the ciphertext.
@pytest.mark.parametrize(
    "where",
    [
        ("header", 4),
        ("header", 19),
        ("header", 0x14),
        ("header", 51),
        ("trans", 0),
        ("trans", 2048),
        ("trans", PAGE - 1),
    ],
)
def test_tampered_packet_is_bad_measurement_and_memory_is_untouched(migration, where) -> None:
    src, handle, dst, target, dst_mem = migration
    out = src.send_update_data(handle, PAGE, PAGE)
    header, trans = out.header, out.trans
    part, offset = where
    if part == "header":
        header = _flip(header, offset, 0x02)
    else:
        trans = _flip(trans, offset)
    before = dst_mem.copy()
    got = dst.receive_update_data(target, PAGE, header, trans)
    assert got.status is Status.BAD_MEASUREMENT
    assert "unchanged" in got.detail
    assert np.array_equal(dst_mem, before)
    assert dst.guest_state(target) is GuestState.RUPDATE
    # The genuine packet still goes in afterwards.
    assert dst.receive_update_data(target, PAGE, out.header, out.trans).ok
    assert not np.array_equal(dst_mem, before)


def test_reserved_header_flags_are_refused_before_decrypting(migration) -> None:
    src, handle, dst, target, dst_mem = migration
    out = src.send_update_data(handle, PAGE, PAGE)
    before = dst_mem.copy()
    got = dst.receive_update_data(target, PAGE, _flip(out.header, 1), out.trans)
    assert got.status is Status.INVALID_PARAM and "reserved" in got.detail
    assert np.array_equal(dst_mem, before)


def test_packet_replayed_at_another_length_or_swapped_is_refused(migration) -> None:
    src, handle, dst, target, dst_mem = migration
    a = src.send_update_data(handle, PAGE, PAGE)
    b = src.send_update_data(handle, 2 * PAGE, PAGE)
    before = dst_mem.copy()
    assert dst.receive_update_data(target, PAGE, a.header, b.trans).status is Status.BAD_MEASUREMENT
    assert (
        dst.receive_update_data(target, PAGE, a.header, a.trans[: PAGE // 2]).status
        is Status.BAD_MEASUREMENT
    )
    assert np.array_equal(dst_mem, before)


@pytest.mark.parametrize("bad_page", [0, 3, PAGES - 2])
def test_tampered_page_in_a_batch_refuses_the_whole_batch(migration, bad_page: int) -> None:
    src, handle, dst, target, dst_mem = migration
    batch = src.send_pages(handle, PAGE, PAGES - 1)
    assert batch.ok
    trans = _flip(batch.trans, bad_page * PAGE + 77)
    before = dst_mem.copy()
    got = dst.receive_pages(target, PAGE, batch.headers, trans)
    assert got.status is Status.BAD_MEASUREMENT
    assert f"packet {bad_page}" in got.detail
    assert np.array_equal(dst_mem, before)  # not even the good pages before it were written
    headers = _flip(batch.headers, bad_page * 52 + 30)
    assert dst.receive_pages(target, PAGE, headers, batch.trans).status is Status.BAD_MEASUREMENT
    assert np.array_equal(dst_mem, before)
    assert dst.receive_pages(target, PAGE, batch.headers, batch.trans).ok


def test_packets_of_another_session_are_refused(lab_root: LabRoot, migration) -> None:
    src, handle, dst, target, dst_mem = migration
    stranger = ForeignSource(dst)  # valid crypto, other TEK/TIK
    header, trans = stranger.packet(bytes(PAGE))
    before = dst_mem.copy()
    assert dst.receive_update_data(target, PAGE, header, trans).status is Status.BAD_MEASUREMENT
    assert np.array_equal(dst_mem, before)


# --------------------------------------------------------------------------------------------- session


@pytest.fixture
def session_parts(lab_root: LabRoot):
    src, dst = make_fw(lab_root), make_fw(lab_root)
    handle = launch(src, random_memory(1), POLICY)
    target = dst.pdh_cert_export()
    sent = src.send_start(handle, target.pdh, target.cert_chain, dst.amd_chain)
    assert sent.ok
    return src, dst, sent


# nonce @0x00, wrap_tk @0x10, wrap_iv @0x30, wrap_mac @0x40, policy_mac @0x60
@pytest.mark.parametrize(
    ("offset", "what"),
    [
        (0x00, "wrap_mac"),
        (0x10, "wrap_mac"),
        (0x2F, "wrap_mac"),
        (0x40, "wrap_mac"),
        (0x5F, "wrap_mac"),
        (0x30, "policy_mac"),
        (0x60, "policy_mac"),
        (0x7F, "policy_mac"),
    ],
)
def test_tampered_session_is_bad_measurement(session_parts, offset: int, what: str) -> None:
    src, dst, sent = session_parts
    session = _flip(sent.session, offset)
    mem = bytearray(PAGE)
    got = dst.receive_start(sent.policy, src.pdh_cert_export().pdh, session, mem)
    assert got.status is Status.BAD_MEASUREMENT
    assert what in got.detail
    assert dst.platform_status().guest_count == 0 and mem == bytearray(PAGE)
    assert dst.receive_start(sent.policy, src.pdh_cert_export().pdh, sent.session, mem).ok


@pytest.mark.parametrize("other_policy", [0x0, 0x3, 0x5, 0x11, POLICY | (24 << 24)])
def test_another_policy_than_at_send_start_is_bad_measurement(
    session_parts, other_policy: int
) -> None:
    src, dst, sent = session_parts
    got = dst.receive_start(other_policy, src.pdh_cert_export().pdh, sent.session, bytearray(PAGE))
    assert got.status is Status.BAD_MEASUREMENT and "policy_mac" in got.detail


def test_session_with_another_source_pdh_is_bad_measurement(
    lab_root: LabRoot, session_parts
) -> None:
    src, dst, sent = session_parts
    impostor = make_fw(lab_root).pdh_cert_export().pdh
    got = dst.receive_start(sent.policy, impostor, sent.session, bytearray(PAGE))
    assert got.status is Status.BAD_MEASUREMENT and "wrap_mac" in got.detail


def test_session_for_another_target_is_bad_measurement(lab_root: LabRoot, session_parts) -> None:
    src, dst, sent = session_parts
    elsewhere = make_fw(lab_root)
    got = elsewhere.receive_start(
        sent.policy, src.pdh_cert_export().pdh, sent.session, bytearray(PAGE)
    )
    assert got.status is Status.BAD_MEASUREMENT
