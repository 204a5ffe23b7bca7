"""Faults on the migration stream between two lab hosts, driven by the engine over real SSH and
QMP: the link cut at random byte offsets, bit flips in the session, a packet header and the
ciphertext, a stream replayed to a second target. After each fault the census (not the engine)
must find exactly one runnable copy whose memory equals the guest's before the run."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sevconsole.lab.stream import Frame

from .proxy import BACK, Fault
from .rig import Rig, census, cleanup_vm, helper, run_with_fault
from .rig import replay_to as rig_replay_to

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SESSION = 8 + 2084 + 4  # SEV_START payload: policy, pdh_len, PDH, session_len, then the session
PACKET_HDR, PACKET_TRANS = 16, 72  # PRIVATE payload: gpa, n, then hdr_len | hdr | trans_len | trans


async def hop(rig: Rig, faults: list[Fault], kind: str, **kw):  # type: ignore[no-untyped-def]
    """Migrates `web` from wherever it runs to the other of lab-1/lab-2 with `faults`."""
    home = await cleanup_vm(rig, "web")
    assert home in ("lab-1", "lab-2"), home
    other = "lab-2" if home == "lab-1" else "lab-1"
    att, target = await run_with_fault(rig, "web", home, other, faults, kind=kind, **kw)
    assert not att.violations, att.to_json()
    assert not att.mismatches, att.to_json()
    return att, target, home, other


async def test_clean_run_then_cuts_at_random_offsets(rig3: Rig) -> None:
    att, target, _, _ = await hop(rig3, [], "none")
    assert att.outcome.result == "done" and target.proxy is not None
    total = target.proxy.forwarded["out"]
    assert total > 16 << 20  # every page went through the proxy
    rng = np.random.default_rng(7)
    # The stream's first bytes, its middle, and its end: the last 10 bytes are the COMPLETE and
    # FINISHED frames (a cut there may end with the guest on either side, but on one only).
    offsets = sorted({0, 2200, *rng.integers(0, total, 2).tolist(), total - 6, total - 4})
    results = []
    for at in offsets:
        att, target, home, other = await hop(rig3, [Fault("cut", at=int(at))], "cut-stream")
        assert target.proxy.fired.is_set(), f"cut at {at} never reached (stream {total} bytes)"
        if at < total - 10:  # before the handshake: always a rollback to the source
            assert att.outcome.result == "failed" and att.census.runnable[0].host == home, att.to_json()
            assert "link" in att.outcome.message or "closed" in att.outcome.message, att.outcome.message
        results.append(att.safe_after_s)
    assert max(results) < 15, results


@pytest.mark.parametrize("where, words", [
    (Fault("flip", frame=Frame.SEV_START, offset=SESSION + 0x41), "BAD_MEASUREMENT"),  # wrap_mac
    (Fault("flip", frame=Frame.SEV_START, offset=SESSION + 0x61), "BAD_MEASUREMENT"),  # policy_mac
    (Fault("flip", frame=Frame.SEV_START, offset=SESSION + 0x12), "BAD_MEASUREMENT"),  # wrap_tk
    (Fault("flip", frame=Frame.SEV_START, offset=3), "BAD_MEASUREMENT"),  # the policy word itself
    (Fault("flip", frame=Frame.PRIVATE, nth=3, offset=PACKET_HDR + 4 + 7), "BAD_MEASUREMENT"),  # packet IV
    (Fault("flip", frame=Frame.PRIVATE, nth=3, offset=PACKET_HDR + 0x14 + 3), "BAD_MEASUREMENT"),  # packet MAC
    (Fault("flip", frame=Frame.PRIVATE, nth=2, offset=PACKET_HDR, mask=0x01), "UNSUPPORTED"),  # COMPRESSED flag
    (Fault("flip", frame=Frame.PRIVATE, nth=5, offset=PACKET_TRANS + 4000), "BAD_MEASUREMENT"),  # ciphertext
], ids=["wrap_mac", "policy_mac", "wrap_tk", "policy", "iv", "packet_mac", "flags", "ciphertext"])
async def test_bit_flip_is_refused_with_the_reason(rig3: Rig, where: Fault, words: str) -> None:
    att, target, home, _ = await hop(rig3, [where], where.describe())
    assert target.proxy.fired.is_set()
    assert att.outcome.result == "failed", att.to_json()
    assert [c.host for c in att.census.runnable] == [home]
    # the sentence names the target, the firmware command and its status
    assert words in att.outcome.message, att.outcome.message
    assert "RECEIVE" in att.outcome.message, att.outcome.message


async def test_replayed_stream_to_another_host_is_refused(rig3: Rig) -> None:
    """A recorded SEV stream sent to lab-3: its PDH is not the one the session was wrapped for."""
    att, target, _, dst = await hop(rig3, [], "record", record=True)
    assert att.outcome.result == "done"
    recorded = bytes(target.proxy.recorded["out"])
    answer, tgt_census = await replay_to(rig3, "lab-3", recorded)
    assert answer[:1] == bytes([Frame.ERROR]), answer[:80]
    text = answer[5:].decode()
    assert "RECEIVE_START" in text and "BAD_MEASUREMENT" in text, text
    assert not tgt_census.runnable, tgt_census.describe()
    after = await census(rig3.lab, "web")
    assert [c.host for c in after.runnable] == [dst]


async def test_replayed_stream_to_the_same_host_is_refused(rig3: Rig) -> None:
    att, target, _, dst = await hop(rig3, [], "record", record=True)
    recorded = bytes(target.proxy.recorded["out"])
    answer, _ = await replay_to(rig3, dst, recorded)
    after = await census(rig3.lab, "web")
    clones = list(after.runnable)
    await _quit_extra_copies(rig3, dst, after)  # leave one copy for the next tests
    assert answer[:1] == bytes([Frame.ERROR]), f"replay accepted: {answer[:20]!r}; {after.describe()}"
    assert b"replayed stream refused" in answer and b"would clone the guest" in answer, answer[:300]
    assert len(clones) == 1, after.describe()


async def _quit_extra_copies(rig: Rig, host: str, c) -> None:  # type: ignore[no-untyped-def]
    runnable = [x for x in c.runnable if x.host == host]
    for extra in runnable[1:]:
        await asyncio.to_thread(helper, rig.lab, host, f"stop {extra.pid}")


async def replay_to(rig: Rig, host: str, recorded: bytes):  # type: ignore[no-untyped-def]
    return await rig_replay_to(rig, host, "web", recorded)


async def test_reply_cut_before_ready_rolls_back(rig3: Rig) -> None:
    att, target, home, _ = await hop(rig3, [Fault("cut", direction=BACK, frame=Frame.READY, offset=-5)],
                                     "cut-reply-ready")
    assert target.proxy.fired.is_set()
    assert att.outcome.result == "failed" and [c.host for c in att.census.runnable] == [home]


async def test_reply_cut_before_done_leaves_the_target_running(rig3: Rig) -> None:
    """The target ran RECEIVE_FINISH, its DONE never arrives: the source is SENT already, so the
    guest lives on the target only."""
    att, target, _, dst = await hop(rig3, [Fault("cut", direction=BACK, frame=Frame.DONE, offset=-5)],
                                    "cut-reply-done")
    assert target.proxy.fired.is_set()
    assert [c.host for c in att.census.runnable] == [dst], att.to_json()


async def test_cut_between_send_finish_and_finished_keeps_one_copy(rig3: Rig) -> None:
    home = await cleanup_vm(rig3, "web")
    other = "lab-2" if home == "lab-1" else "lab-1"
    att, target = await run_with_fault(rig3, "web", home, other,
                                       [Fault("cut", frame=Frame.FINISHED, offset=-5)], kind="cut-finished")
    assert target.proxy.fired.is_set()
    assert not att.violations, att.to_json()
