"""Bad input never crashes the firmware model: every call answers with a status (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevconsole.sev.certs import LabRoot
from sevconsole.sev.firmware import SevFirmware
from sevconsole.sev.status import GuestState, Status
from tests.sev.test_firmware import PAGE, lab_root, launch, make_fw, random_memory

__all__ = ["lab_root"]

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

anything = st.one_of(
    st.none(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.integers(min_value=-64, max_value=3 * PAGE),
    st.binary(max_size=300),
    st.text(max_size=8),
    st.floats(allow_nan=True),
    st.lists(st.integers(0, 255), max_size=4),
)


@pytest.fixture(scope="module")
def ends(lab_root: LabRoot) -> tuple[SevFirmware, int, SevFirmware, int, np.ndarray]:
    """A source guest in SUPDATE and its target guest in RUPDATE."""
    src, dst = make_fw(lab_root), make_fw(lab_root)
    mem = random_memory(4)
    handle = launch(src, mem)
    target = dst.pdh_cert_export()
    sent = src.send_start(handle, target.pdh, target.cert_chain, dst.amd_chain)
    dst_mem = np.zeros_like(mem)
    got = dst.receive_start(sent.policy, src.pdh_cert_export().pdh, sent.session, dst_mem)
    assert sent.ok and got.ok
    return src, handle, dst, got.handle, dst_mem


COMMANDS = {
    "launch_start": 3,
    "launch_update_data": 3,
    "launch_measure": 1,
    "launch_finish": 1,
    "activate": 2,
    "deactivate": 1,
    "guest_status": 1,
    "send_start": 5,
    "send_update_data": 5,
    "send_pages": 4,
    "receive_start": 7,
    "receive_update_data": 5,
    "receive_pages": 5,
    "pdh_cert_export": 2,
    "pek_csr": 1,
    "launch_update_vmsa": 3,
    "send_update_vmsa": 5,
    "receive_update_vmsa": 5,
    "pek_cert_import": 2,
}


@FUZZ
@given(name=st.sampled_from(sorted(COMMANDS)), args=st.lists(anything, min_size=7, max_size=7))
def test_any_arguments_give_a_status(ends, name: str, args: list) -> None:
    src, handle, dst, target, dst_mem = ends
    before = dst_mem.copy()
    for fw in (src, dst):
        result = getattr(fw, name)(*args[: COMMANDS[name]])
        assert isinstance(result.status, Status)
        assert result.ok or result.detail  # a refusal always says why
    # No listed command can move the two guests on, and forged input never reaches memory.
    assert src.guest_state(handle) is GuestState.SUPDATE
    assert dst.guest_state(target) is GuestState.RUPDATE
    assert np.array_equal(dst_mem, before)


@FUZZ
@given(
    header=st.binary(min_size=52, max_size=52),
    trans=st.binary(min_size=16, max_size=64).map(lambda b: b[: len(b) // 16 * 16]),
    page=st.integers(0, 3),
)
def test_forged_packets_never_reach_guest_memory(
    ends, header: bytes, trans: bytes, page: int
) -> None:
    src, handle, dst, target, dst_mem = ends
    before = dst_mem.copy()
    got = dst.receive_update_data(target, page * PAGE, header, trans)
    assert got.status in (Status.BAD_MEASUREMENT, Status.UNSUPPORTED, Status.INVALID_PARAM)
    assert np.array_equal(dst_mem, before)
