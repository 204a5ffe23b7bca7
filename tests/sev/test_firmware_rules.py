"""Every state, length and policy rule of the reference answers with its status code."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevconsole.sev.certs import Algo, LabRoot, SevCert, Usage
from sevconsole.sev.firmware import SevFirmware
from sevconsole.sev.status import Command, GuestState, PlatformState, Status
from sevconsole.sev.transport import build_session, ecdh_z, seal_packet
from tests.sev.test_firmware import PAGE, POLICY, lab_root, launch, make_fw, random_memory

__all__ = ["lab_root"]  # the session fixture, shared with test_firmware

MEM_PAGES = 8


@dataclass
class Pair:
    """A source and a target firmware, and a source guest to move."""

    src: SevFirmware
    dst: SevFirmware
    handle: int
    src_mem: np.ndarray
    dst_mem: np.ndarray

    def target_args(self) -> tuple[bytes, bytes, bytes]:
        export = self.dst.pdh_cert_export()
        return export.pdh, export.cert_chain, self.dst.amd_chain

    def source_pdh(self) -> bytes:
        return self.src.pdh_cert_export().pdh


def _pair(root: LabRoot, policy: int = POLICY, **dst_kwargs) -> Pair:
    src, dst = make_fw(root), make_fw(root, **dst_kwargs)
    mem = random_memory(MEM_PAGES)
    return Pair(src, dst, launch(src, mem, policy), mem, np.zeros_like(mem))


@pytest.fixture
def pair(lab_root: LabRoot) -> Pair:
    return _pair(lab_root)


class ForeignSource:
    """A source made only with sev/transport (no firmware model): sessions for any policy."""

    def __init__(self, target: SevFirmware) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        self.pdh = SevCert.build(
            self.key.public_key(), Usage.PDH, Algo.ECDH_SHA256, 0, 24
        ).to_bytes()
        target_pdh = SevCert.from_bytes(target.pdh_cert_export().pdh)
        self.z = ecdh_z(self.key, target_pdh.public_key())
        self.tek, self.tik = os.urandom(16), os.urandom(16)

    def session(self, policy: int) -> bytes:
        return build_session(self.z, self.tek, self.tik, policy).to_bytes()

    def packet(self, plaintext: bytes) -> tuple[bytes, bytes]:
        return seal_packet(self.tek, self.tik, plaintext)


# --------------------------------------------------------------------------------------------- guest states

STAGE_POLICY = POLICY | 0x4  # SEV-ES, so the *_UPDATE_VMSA commands apply too
STATES = ("LUPDATE", "LSECRET", "RUNNING", "SUPDATE", "RUPDATE", "SENT")


@dataclass
class Staged:
    fw: SevFirmware
    handle: int
    pair: Pair
    packet: tuple[bytes, bytes]  # a packet the staged guest's session accepts (RUPDATE)


def _stage(root: LabRoot, state: str) -> Staged:
    """A firmware holding one guest in `state` (RUPDATE: on the target of a real SEND_START)."""
    src, dst = make_fw(root), make_fw(root)
    mem = random_memory(MEM_PAGES)
    start = src.launch_start(STAGE_POLICY, mem)
    p = Pair(src, dst, start.handle, mem, np.zeros_like(mem))
    h = start.handle
    packet = (b"", b"")
    if state != "LUPDATE":
        assert src.launch_update_data(h, 0, len(mem)).ok and src.launch_measure(h).ok
    if state not in ("LUPDATE", "LSECRET"):
        assert src.launch_finish(h).ok
    if state in ("SUPDATE", "RUPDATE", "SENT"):
        sent = src.send_start(h, *p.target_args())
        assert sent.ok, sent.detail
        if state == "RUPDATE":
            got = dst.receive_start(sent.policy, p.source_pdh(), sent.session, p.dst_mem)
            assert got.ok, got.detail
            out = src.send_update_data(h, 0, PAGE)
            return Staged(dst, got.handle, p, (out.header, out.trans))
        if state == "SENT":
            assert src.send_finish(h).ok
    assert src.guest_state(h) is GuestState[state]
    return Staged(src, h, p, packet)


# command -> (the states it accepts, how to call it on a staged guest)
GUEST_COMMANDS: dict[str, tuple[set[str], Callable[[Staged], object]]] = {
    "LAUNCH_UPDATE_DATA": ({"LUPDATE"}, lambda s: s.fw.launch_update_data(s.handle, 0, PAGE)),
    "LAUNCH_UPDATE_VMSA": ({"LUPDATE"}, lambda s: s.fw.launch_update_vmsa(s.handle, PAGE)),
    "LAUNCH_MEASURE": ({"LUPDATE"}, lambda s: s.fw.launch_measure(s.handle)),
    "LAUNCH_FINISH": ({"LSECRET"}, lambda s: s.fw.launch_finish(s.handle)),
    "SEND_START": ({"RUNNING"}, lambda s: s.fw.send_start(s.handle, *s.pair.target_args())),
    "SEND_UPDATE_DATA": ({"SUPDATE"}, lambda s: s.fw.send_update_data(s.handle, 0, PAGE)),
    "SEND_UPDATE_VMSA": ({"SUPDATE"}, lambda s: s.fw.send_update_vmsa(s.handle, PAGE)),
    "SEND_PAGES": ({"SUPDATE"}, lambda s: s.fw.send_pages(s.handle, 0, 2)),
    "SEND_FINISH": ({"SUPDATE"}, lambda s: s.fw.send_finish(s.handle)),
    "SEND_CANCEL": ({"SUPDATE"}, lambda s: s.fw.send_cancel(s.handle)),
    "RECEIVE_UPDATE_DATA": (
        {"RUPDATE"},
        lambda s: s.fw.receive_update_data(s.handle, 0, *s.packet),
    ),
    "RECEIVE_UPDATE_VMSA": (
        {"RUPDATE"},
        lambda s: s.fw.receive_update_vmsa(s.handle, 0, *s.packet),
    ),
    "RECEIVE_FINISH": ({"RUPDATE"}, lambda s: s.fw.receive_finish(s.handle)),
    "ACTIVATE": (set(STATES) - {"SENT"}, lambda s: s.fw.activate(s.handle, 3)),
    "DEACTIVATE": (set(STATES), lambda s: s.fw.deactivate(s.handle)),
    "GUEST_STATUS": (set(STATES), lambda s: s.fw.guest_status(s.handle)),
    "DECOMMISSION": (set(STATES), lambda s: s.fw.decommission(s.handle)),
}

# The state a guest is in after a successful command (None: unchanged; UNINIT: gone).
NEXT_STATE = {
    "LAUNCH_MEASURE": "LSECRET",
    "LAUNCH_FINISH": "RUNNING",
    "SEND_START": "SUPDATE",
    "SEND_FINISH": "SENT",
    "SEND_CANCEL": "RUNNING",
    "RECEIVE_FINISH": "RUNNING",
    "DECOMMISSION": "UNINIT",
}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("command", sorted(GUEST_COMMANDS))
def test_guest_command_in_each_state(lab_root: LabRoot, command: str, state: str) -> None:
    allowed, call = GUEST_COMMANDS[command]
    staged = _stage(lab_root, state)
    result = call(staged)
    if state in allowed:
        assert result.status is Status.SUCCESS, result.detail
        after = NEXT_STATE.get(command, state)
    else:
        assert result.status is Status.INVALID_GUEST_STATE
        assert state in result.detail
        after = state  # a refused command changes nothing
    assert staged.fw.guest_state(staged.handle) is GuestState[after]


@pytest.mark.parametrize("command", sorted(GUEST_COMMANDS))
def test_guest_command_with_an_unknown_handle(lab_root: LabRoot, command: str) -> None:
    staged = _stage(lab_root, "RUNNING")
    staged.handle = 999
    assert GUEST_COMMANDS[command][1](staged).status is Status.INVALID_GUEST


@pytest.mark.parametrize("command", sorted(GUEST_COMMANDS))
def test_guest_command_with_no_guest_on_the_platform(lab_root: LabRoot, command: str) -> None:
    """INIT (no guest yet) and UNINIT (after SHUTDOWN): guest commands need WORKING."""
    staged = _stage(lab_root, "RUNNING")
    assert staged.fw.shutdown().ok
    assert GUEST_COMMANDS[command][1](staged).status is Status.INVALID_PLATFORM_STATE
    assert staged.fw.init().ok
    assert staged.fw.platform_status().state is PlatformState.INIT
    assert GUEST_COMMANDS[command][1](staged).status is Status.INVALID_PLATFORM_STATE


# --------------------------------------------------------------------------------------------- platform states

PLATFORM_COMMANDS: dict[str, tuple[set[str], Callable[[SevFirmware, LabRoot], object]]] = {
    "INIT": ({"UNINIT"}, lambda fw, r: fw.init()),
    "SHUTDOWN": ({"UNINIT", "INIT", "WORKING"}, lambda fw, r: fw.shutdown()),
    "PLATFORM_STATUS": ({"UNINIT", "INIT", "WORKING"}, lambda fw, r: fw.platform_status()),
    "PEK_GEN": ({"INIT"}, lambda fw, r: fw.pek_gen()),
    "PEK_CSR": ({"INIT"}, lambda fw, r: fw.pek_csr()),
    "PDH_GEN": ({"INIT", "WORKING"}, lambda fw, r: fw.pdh_gen()),
    "PDH_CERT_EXPORT": ({"INIT", "WORKING"}, lambda fw, r: fw.pdh_cert_export()),
    "LAUNCH_START": ({"INIT", "WORKING"}, lambda fw, r: fw.launch_start(POLICY, bytearray(PAGE))),
    "RECEIVE_START": ({"INIT", "WORKING"}, lambda fw, r: _foreign_receive(fw)),
}


def _foreign_receive(fw: SevFirmware):
    if fw.platform_state is PlatformState.UNINIT:  # its PDH is still exportable without a command
        src = ec.generate_private_key(ec.SECP384R1())
        pdh = SevCert.build(src.public_key(), Usage.PDH, Algo.ECDH_SHA256, 0, 24).to_bytes()
        return fw.receive_start(POLICY, pdh, bytes(128), bytearray(PAGE))
    source = ForeignSource(fw)
    return fw.receive_start(POLICY, source.pdh, source.session(POLICY), bytearray(PAGE))


def _platform_in(root: LabRoot, state: str) -> SevFirmware:
    fw = SevFirmware(ask_key=root.ask_key, ask=root.ask, ark=root.ark)
    if state != "UNINIT":
        assert fw.init().ok
    if state == "WORKING":
        assert fw.launch_start(POLICY, bytearray(PAGE)).ok
    assert fw.platform_state is PlatformState[state]
    return fw


@pytest.mark.parametrize("state", ("UNINIT", "INIT", "WORKING"))
@pytest.mark.parametrize("command", sorted(PLATFORM_COMMANDS))
def test_platform_command_in_each_state(lab_root: LabRoot, command: str, state: str) -> None:
    allowed, call = PLATFORM_COMMANDS[command]
    fw = _platform_in(lab_root, state)
    result = call(fw, lab_root)
    expected = Status.SUCCESS if state in allowed else Status.INVALID_PLATFORM_STATE
    assert result.status is expected, result.detail
    assert fw.log[-1].command is Command[command] and fw.log[-1].status is expected


def test_platform_transitions(lab_root: LabRoot) -> None:
    fw = SevFirmware(
        ask_key=lab_root.ask_key, ask=lab_root.ask, ark=lab_root.ark, api=(0, 22), build=7
    )
    status = fw.platform_status()
    assert (status.state, status.api_major, status.api_minor, status.build) == (
        PlatformState.UNINIT,
        0,
        22,
        7,
    )
    assert status.flags == 0x100  # ES configured, self-owned
    assert fw.init().ok and fw.platform_state is PlatformState.INIT
    a = fw.launch_start(POLICY, bytearray(PAGE)).handle
    b = fw.launch_start(POLICY, bytearray(PAGE)).handle
    assert fw.platform_state is PlatformState.WORKING and fw.platform_status().guest_count == 2
    assert fw.decommission(a).ok and fw.platform_state is PlatformState.WORKING
    assert fw.decommission(b).ok and fw.platform_state is PlatformState.INIT
    c = fw.launch_start(POLICY, bytearray(PAGE)).handle
    assert c not in (a, b)
    assert fw.shutdown().ok and fw.platform_state is PlatformState.UNINIT
    assert fw.guest_state(c) is GuestState.UNINIT and fw.platform_status().guest_count == 0
    assert (
        SevFirmware(ask_key=lab_root.ask_key, ask=lab_root.ask, ark=lab_root.ark, es=False)
        .platform_status()
        .flags
        == 0
    )


def test_activate_rules(lab_root: LabRoot) -> None:
    fw = make_fw(lab_root, max_asid=15)
    a = fw.launch_start(POLICY, bytearray(PAGE)).handle
    b = fw.launch_start(POLICY, bytearray(PAGE)).handle
    assert fw.activate(a, 0).status is Status.INVALID_ASID
    assert fw.activate(a, 16).status is Status.INVALID_ASID
    assert fw.activate(a, 15).ok and fw.guest_status(a).asid == 15
    assert fw.activate(b, 15).status is Status.ASID_OWNED
    assert fw.deactivate(a).ok and fw.guest_status(a).asid == 0
    assert fw.activate(b, 15).ok


# --------------------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("session_len", [0, 64, 127, 129, 4096])
def test_send_start_session_len_writes_back_128(pair: Pair, session_len: int) -> None:
    out = pair.src.send_start(pair.handle, *pair.target_args(), session_len=session_len)
    assert (out.status, out.session_len, out.session) == (Status.INVALID_LENGTH, 128, b"")
    assert pair.src.guest_state(pair.handle) is GuestState.RUNNING
    # The length-query idiom: ask again with what the firmware wrote back.
    assert pair.src.send_start(pair.handle, *pair.target_args(), session_len=out.session_len).ok


def test_send_start_wrong_pdh_length(pair: Pair) -> None:
    pdh, chain, amd = pair.target_args()
    assert pair.src.send_start(pair.handle, pdh[:-4], chain, amd).status is Status.INVALID_LENGTH


@pytest.fixture
def sending(pair: Pair) -> Pair:
    sent = pair.src.send_start(pair.handle, *pair.target_args())
    assert sent.ok
    return pair


@pytest.mark.parametrize("hdr_len", [0, 1, 32, 51])
def test_send_update_hdr_len_below_52_writes_back_52(sending: Pair, hdr_len: int) -> None:
    out = sending.src.send_update_data(sending.handle, 0, PAGE, hdr_len=hdr_len)
    assert (out.status, out.hdr_len, out.header, out.trans) == (Status.INVALID_LENGTH, 52, b"", b"")
    assert sending.src.send_update_data(sending.handle, 0, PAGE, hdr_len=out.hdr_len).ok


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, Status.INVALID_LENGTH),
        (8, Status.INVALID_LENGTH),
        (4095, Status.INVALID_LENGTH),
        (4100, Status.INVALID_LENGTH),
        (0x5010, Status.INVALID_LENGTH),
        (0x10000, Status.INVALID_LENGTH),
        (-16, Status.INVALID_LENGTH),
        (16, Status.SUCCESS),
        (PAGE, Status.SUCCESS),
        (0x5000, Status.SUCCESS),  # the firmware allows up to 0x5000 (KVM asks for one page)
    ],
)
def test_send_update_guest_len(sending: Pair, length: int, expected: Status) -> None:
    out = sending.src.send_update_data(sending.handle, 0, length)
    assert out.status is expected, out.detail
    if expected is Status.SUCCESS:
        assert len(out.trans) == length and out.trans_len == length and len(out.header) == 52


@pytest.mark.parametrize("trans_len", [0, 16, PAGE - 16])
def test_send_update_trans_len_below_guest_len_writes_back_guest_len(
    sending: Pair, trans_len: int
) -> None:
    out = sending.src.send_update_data(sending.handle, 0, PAGE, trans_len=trans_len)
    assert (out.status, out.trans_len) == (Status.INVALID_LENGTH, PAGE)
    assert sending.src.send_update_data(sending.handle, 0, PAGE, trans_len=2 * PAGE).ok


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (8, PAGE),
        (PAGE + 1, 16),
        (-16, 16),
        (MEM_PAGES * PAGE, 16),
        (MEM_PAGES * PAGE - 16, 32),
        (1 << 70, 16),
    ],
)
def test_send_update_bad_address(sending: Pair, gpa: int, length: int) -> None:
    out = sending.src.send_update_data(sending.handle, gpa, length)
    assert out.status is Status.INVALID_ADDRESS
    assert out.header == b""


@pytest.mark.parametrize(
    ("gpa", "npages", "size", "expected"),
    [
        (0, 0, PAGE, Status.INVALID_LENGTH),
        (0, -1, PAGE, Status.INVALID_LENGTH),
        (0, 2, 100, Status.INVALID_LENGTH),
        (0, 1, 0x5010, Status.INVALID_LENGTH),
        (8, 2, PAGE, Status.INVALID_ADDRESS),
        (PAGE, MEM_PAGES, PAGE, Status.INVALID_ADDRESS),
        (0, MEM_PAGES, PAGE, Status.SUCCESS),
        (16, 1, 0x5000, Status.SUCCESS),
        (0, 2, 0x5000, Status.INVALID_ADDRESS),
        (0, 5, 16, Status.SUCCESS),
    ],
)
def test_send_pages_rules(
    sending: Pair, gpa: int, npages: int, size: int, expected: Status
) -> None:
    out = sending.src.send_pages(sending.handle, gpa, npages, size)
    assert out.status is expected, out.detail
    if expected is Status.SUCCESS:
        assert len(out.headers) == 52 * npages and len(out.trans) == size * npages


@pytest.fixture
def receiving(pair: Pair) -> tuple[Pair, int]:
    sent = pair.src.send_start(pair.handle, *pair.target_args())
    got = pair.dst.receive_start(sent.policy, pair.source_pdh(), sent.session, pair.dst_mem)
    assert got.ok
    return pair, got.handle


@pytest.mark.parametrize(
    ("session_len", "pdh_len"),
    [(0, 2084), (127, 2084), (256, 2084), (128, 0), (128, 2083), (128, 4096)],
)
def test_receive_start_lengths_write_back(pair: Pair, session_len: int, pdh_len: int) -> None:
    sent = pair.src.send_start(pair.handle, *pair.target_args())
    args = (sent.policy, pair.source_pdh(), sent.session, pair.dst_mem)
    out = pair.dst.receive_start(*args, session_len=session_len, pdh_len=pdh_len)
    assert (out.status, out.session_len, out.pdh_len) == (Status.INVALID_LENGTH, 128, 2084)
    assert pair.dst.platform_status().guest_count == 0
    assert pair.dst.receive_start(*args, session_len=out.session_len, pdh_len=out.pdh_len).ok


def test_receive_start_short_buffers(pair: Pair) -> None:
    sent = pair.src.send_start(pair.handle, *pair.target_args())
    pdh = pair.source_pdh()
    assert (
        pair.dst.receive_start(sent.policy, pdh, sent.session[:-1], pair.dst_mem).status
        is Status.INVALID_LENGTH
    )
    assert (
        pair.dst.receive_start(sent.policy, pdh[:-1], sent.session, pair.dst_mem).status
        is Status.INVALID_LENGTH
    )


@pytest.mark.parametrize("hdr_len", [0, 51])
def test_receive_update_hdr_len_below_52(receiving, hdr_len: int) -> None:
    pair, handle = receiving
    out = pair.src.send_update_data(pair.handle, 0, PAGE)
    got = pair.dst.receive_update_data(handle, 0, out.header, out.trans, hdr_len=hdr_len)
    assert (got.status, got.hdr_len) == (Status.INVALID_LENGTH, 52)
    assert (
        pair.dst.receive_update_data(handle, 0, out.header[:51], out.trans).status
        is Status.INVALID_LENGTH
    )
    assert pair.dst.receive_update_data(handle, 0, out.header, out.trans, hdr_len=got.hdr_len).ok


@pytest.mark.parametrize("trans_len", [0, 8, 100, 0x5010])
def test_receive_update_trans_len(receiving, trans_len: int) -> None:
    pair, handle = receiving
    got = pair.dst.receive_update_data(handle, 0, bytes(52), bytes(trans_len))
    assert got.status is Status.INVALID_LENGTH
    assert not pair.dst_mem.any()


@pytest.mark.parametrize("gpa", [8, PAGE + 4, -PAGE, MEM_PAGES * PAGE])
def test_receive_update_bad_address(receiving, gpa: int) -> None:
    pair, handle = receiving
    out = pair.src.send_update_data(pair.handle, 0, PAGE)
    assert (
        pair.dst.receive_update_data(handle, gpa, out.header, out.trans).status
        is Status.INVALID_ADDRESS
    )
    assert not pair.dst_mem.any()


def test_receive_update_compressed_is_unsupported(receiving) -> None:
    pair, handle = receiving
    out = pair.src.send_update_data(pair.handle, 0, PAGE)
    flagged = bytes([out.header[0] | 1]) + out.header[1:]
    got = pair.dst.receive_update_data(handle, 0, flagged, out.trans)
    assert got.status is Status.UNSUPPORTED and "COMPRESSED" in got.detail
    batch = pair.src.send_pages(pair.handle, 0, 3)
    headers = bytearray(batch.headers)
    headers[52] |= 1
    assert (
        pair.dst.receive_pages(handle, 0, bytes(headers), batch.trans).status is Status.UNSUPPORTED
    )
    assert not pair.dst_mem.any()


@pytest.mark.parametrize(
    ("cut_headers", "cut_trans", "size"), [(1, 0, PAGE), (0, 16, PAGE), (52, 0, PAGE), (0, 0, 100)]
)
def test_receive_pages_lengths(receiving, cut_headers: int, cut_trans: int, size: int) -> None:
    pair, handle = receiving
    batch = pair.src.send_pages(pair.handle, 0, 3)
    headers = batch.headers[: len(batch.headers) - cut_headers]
    trans = batch.trans[: len(batch.trans) - cut_trans]
    assert pair.dst.receive_pages(handle, 0, headers, trans, size).status is Status.INVALID_LENGTH
    assert pair.dst.receive_pages(handle, 0, b"", b"").status is Status.INVALID_LENGTH
    assert not pair.dst_mem.any()


@pytest.mark.parametrize(
    ("pdh_len", "chain_len"), [(0, 0), (2083, 6252), (2084, 6251), (100, 100000)]
)
def test_pdh_cert_export_lengths(lab_root: LabRoot, pdh_len: int, chain_len: int) -> None:
    fw = make_fw(lab_root)
    out = fw.pdh_cert_export(pdh_len, chain_len)
    assert (out.status, out.pdh_len, out.chain_len, out.pdh) == (
        Status.INVALID_LENGTH,
        2084,
        6252,
        b"",
    )
    assert fw.pdh_cert_export(out.pdh_len, out.chain_len).ok


@pytest.mark.parametrize("csr_len", [0, 2083])
def test_pek_csr_length(lab_root: LabRoot, csr_len: int) -> None:
    fw = make_fw(lab_root)
    out = fw.pek_csr(csr_len)
    assert (out.status, out.csr_len) == (Status.INVALID_LENGTH, 2084)
    assert fw.pek_csr(out.csr_len).ok


@pytest.mark.parametrize("length", [0, 8, 100])
def test_launch_update_length_and_address(lab_root: LabRoot, length: int) -> None:
    fw = make_fw(lab_root)
    mem = bytearray(2 * PAGE)
    h = fw.launch_start(POLICY, mem).handle
    assert fw.launch_update_data(h, 0, length).status is Status.INVALID_LENGTH
    assert fw.launch_update_data(h, 8, 16).status is Status.INVALID_ADDRESS
    assert fw.launch_update_data(h, PAGE, 2 * PAGE).status is Status.INVALID_ADDRESS
    assert mem == bytearray(2 * PAGE)  # nothing encrypted


# --------------------------------------------------------------------------------------------- policy


def test_nosend_guest_may_never_leave(lab_root: LabRoot) -> None:
    p = _pair(lab_root, POLICY | 0x8)
    out = p.src.send_start(p.handle, *p.target_args())
    assert out.status is Status.POLICY_FAILURE and "NOSEND" in out.detail
    assert p.src.guest_state(p.handle) is GuestState.RUNNING


@pytest.mark.parametrize("bit", range(6, 16))
def test_reserved_policy_bit_is_refused_at_receive_start(lab_root: LabRoot, bit: int) -> None:
    dst = make_fw(lab_root)
    source = ForeignSource(dst)
    policy = POLICY | (1 << bit)  # the session binds it, so only the reserved-bit rule can refuse
    out = dst.receive_start(policy, source.pdh, source.session(policy), bytearray(PAGE))
    assert out.status is Status.POLICY_FAILURE and "reserved" in out.detail
    assert dst.launch_start(policy, bytearray(PAGE)).status is Status.POLICY_FAILURE
    assert dst.platform_status().guest_count == 0


@pytest.mark.parametrize(
    ("policy_api", "expected"),
    [
        ((0, 23), Status.SUCCESS),
        ((0, 24), Status.SUCCESS),
        ((0, 25), Status.POLICY_FAILURE),
        ((1, 0), Status.POLICY_FAILURE),
    ],
)
def test_policy_api_above_the_firmware_is_refused(
    lab_root: LabRoot, policy_api, expected: Status
) -> None:
    dst = make_fw(lab_root, api=(0, 24))
    source = ForeignSource(dst)
    policy = POLICY | (policy_api[0] << 16) | (policy_api[1] << 24)
    assert (
        dst.receive_start(policy, source.pdh, source.session(policy), bytearray(PAGE)).status
        is expected
    )
    assert dst.launch_start(policy, bytearray(PAGE)).status is expected


def test_es_guest_needs_es_on_the_target(lab_root: LabRoot) -> None:
    es_policy = POLICY | 0x4
    no_es = make_fw(lab_root, es=False)
    source = ForeignSource(no_es)
    out = no_es.receive_start(es_policy, source.pdh, source.session(es_policy), bytearray(PAGE))
    assert out.status is Status.POLICY_FAILURE and "ES" in out.detail
    with_es = make_fw(lab_root)
    source = ForeignSource(with_es)
    assert with_es.receive_start(
        es_policy, source.pdh, source.session(es_policy), bytearray(PAGE)
    ).ok


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (POLICY, POLICY, Status.SUCCESS),
        (POLICY | 0x2, POLICY, Status.POLICY_FAILURE),
        (POLICY, POLICY | 0x2, Status.POLICY_FAILURE),
    ],
)
def test_key_sharing_and_noks(lab_root: LabRoot, first: int, second: int, expected: Status) -> None:
    fw = make_fw(lab_root)
    mem_a = bytearray(PAGE)
    a = fw.launch_start(first, mem_a).handle
    assert fw.launch_update_data(a, 0, PAGE).ok
    source = ForeignSource(fw)
    mem_b = bytearray(PAGE)
    out = fw.receive_start(second, source.pdh, source.session(second), mem_b, handle=a)
    assert out.status is expected, out.detail
    assert fw.launch_start(second, bytearray(PAGE), handle=a).status is expected
    if expected is Status.SUCCESS:
        # Shared VEK: the same page at the same address encrypts alike in both guests.
        header, trans = source.packet(bytes(PAGE))
        assert fw.receive_update_data(out.handle, 0, header, trans).ok
        assert bytes(mem_b) == bytes(mem_a)
    assert (
        fw.receive_start(
            POLICY, source.pdh, source.session(POLICY), bytearray(PAGE), handle=77
        ).status
        is Status.INVALID_GUEST
    )


def test_foreign_source_interoperates(lab_root: LabRoot) -> None:
    """A session and packets made by sev/transport alone are accepted and land encrypted at rest."""
    dst = make_fw(lab_root)
    source = ForeignSource(dst)
    mem = bytearray(4 * PAGE)
    got = dst.receive_start(POLICY, source.pdh, source.session(POLICY), mem)
    assert got.ok
    page = os.urandom(PAGE)
    header, trans = source.packet(page)
    assert dst.receive_update_data(got.handle, 2 * PAGE, header, trans).ok
    assert bytes(mem[2 * PAGE : 3 * PAGE]) not in (page, trans)
    assert dst.receive_finish(got.handle).ok
    assert dst.guest_read(got.handle, 2 * PAGE, PAGE) == page


def test_bad_input_never_raises(lab_root: LabRoot) -> None:
    fw = make_fw(lab_root)
    assert fw.launch_start("x", bytearray(PAGE)).status is Status.INVALID_PARAM  # type: ignore[arg-type]
    assert fw.launch_start(POLICY, b"read-only").status is Status.INVALID_PARAM
    assert fw.launch_start(POLICY, 42).status is Status.INVALID_PARAM
    h = fw.launch_start(POLICY, bytearray(PAGE)).handle
    assert fw.launch_update_data(h, None, 16).status is Status.INVALID_PARAM  # type: ignore[arg-type]
    assert fw.guest_status("1").status is Status.INVALID_GUEST  # type: ignore[arg-type]
    assert (
        fw.receive_start(POLICY, bytes(2084), bytes(128), bytearray(PAGE)).status
        is Status.INVALID_CERTIFICATE
    )
    assert fw.receive_start(-1, bytes(2084), bytes(128), bytearray(PAGE)).status in (
        Status.INVALID_PARAM,
        Status.INVALID_CERTIFICATE,
    )
    fresh = make_fw(lab_root)
    assert fresh.pek_cert_import(None, bytes(2084)).status is Status.INVALID_PARAM  # type: ignore[arg-type]
    assert fresh.log[-1].status is Status.INVALID_PARAM


# --------------------------------------------------------------------------------------------- VMSA


@pytest.mark.parametrize(
    ("policy", "gpa", "length", "expected"),
    [
        (POLICY, PAGE, PAGE, Status.POLICY_FAILURE),  # not an ES guest: no VMSA
        (POLICY | 0x4, PAGE, 2048, Status.INVALID_LENGTH),
        (POLICY | 0x4, PAGE, 2 * PAGE, Status.INVALID_LENGTH),
        (POLICY | 0x4, 16, PAGE, Status.INVALID_ADDRESS),
        (POLICY | 0x4, MEM_PAGES * PAGE, PAGE, Status.INVALID_ADDRESS),
        (POLICY | 0x4, PAGE, PAGE, Status.SUCCESS),
    ],
)
def test_vmsa_commands_rules(
    lab_root: LabRoot, policy: int, gpa: int, length: int, expected: Status
) -> None:
    fw = make_fw(lab_root)
    mem = random_memory(MEM_PAGES)
    before = mem.copy()
    h = fw.launch_start(policy, mem).handle
    assert fw.launch_update_vmsa(h, gpa, length).status is expected
    assert bool(np.array_equal(mem, before)) is (expected is not Status.SUCCESS)  # in place on success

    p = _pair(lab_root, policy)
    sent = p.src.send_start(p.handle, *p.target_args())
    assert p.src.send_update_vmsa(p.handle, gpa, length).status is expected
    got = p.dst.receive_start(sent.policy, p.source_pdh(), sent.session, p.dst_mem)
    out = p.src.send_update_data(p.handle, PAGE, PAGE)  # a genuine packet of this session
    trans = (out.trans * 2)[:length]
    assert p.dst.receive_update_vmsa(got.handle, gpa, out.header, trans).status is expected
    assert bool(p.dst_mem.any()) is (expected is Status.SUCCESS)


def test_es_guest_moves_with_its_vmsa(lab_root: LabRoot) -> None:
    es = POLICY | 0x4
    p = _pair(lab_root, es)
    vmsa_gpa = (MEM_PAGES - 1) * PAGE
    expected = p.src.guest_read(p.handle, 0, MEM_PAGES * PAGE)
    sent = p.src.send_start(p.handle, *p.target_args())
    got = p.dst.receive_start(sent.policy, p.source_pdh(), sent.session, p.dst_mem)
    batch = p.src.send_pages(p.handle, 0, MEM_PAGES - 1)
    assert p.dst.receive_pages(got.handle, 0, batch.headers, batch.trans).ok
    vmsa = p.src.send_update_vmsa(p.handle, vmsa_gpa)
    assert vmsa.ok
    tampered = bytes([vmsa.trans[0] ^ 1]) + vmsa.trans[1:]
    assert p.dst.receive_update_vmsa(got.handle, vmsa_gpa, vmsa.header, tampered).status is (
        Status.BAD_MEASUREMENT
    )
    assert not p.dst_mem[vmsa_gpa:].any()
    assert p.dst.receive_update_vmsa(got.handle, vmsa_gpa, vmsa.header, vmsa.trans).ok
    assert p.src.send_finish(p.handle).ok and p.dst.receive_finish(got.handle).ok
    assert p.dst.guest_read(got.handle, 0, MEM_PAGES * PAGE) == expected
    assert p.src.counts[Command.SEND_UPDATE_VMSA] == 1
    assert p.dst.counts[Command.RECEIVE_UPDATE_VMSA] == 2
