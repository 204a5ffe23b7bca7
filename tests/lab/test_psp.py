"""The "realistic PSP": one command in flight, about 2.5 ms a page (350-450 pages/s).

The firmware model adds up each command's modelled cost (pure); lab/psp.py holds real time to it.
"""

from __future__ import annotations

import threading
import time

import pytest

from sevconsole.lab.psp import PSP_SLACK_S, Psp, Timeline
from sevconsole.sev.certs import LabRoot
from sevconsole.sev.firmware import PspTiming
from sevconsole.sev.status import Command, Status
from tests.sev.test_firmware import PAGE, lab_root, launch, make_fw, random_memory

__all__ = ["lab_root"]
pytestmark = pytest.mark.alone  # rates of real time: 350-450 pages/s

PAGES = 100


def timed_psp(lab_root: LabRoot, timing: PspTiming, pages: int) -> tuple[Psp, int]:
    """A source PSP with the cost model, its guest already in SUPDATE (set up untimed)."""
    src, dst = make_fw(lab_root, timing=timing), make_fw(lab_root)
    handle = launch(src, random_memory(pages))
    target = dst.pdh_cert_export()
    assert src.send_start(handle, target.pdh, target.cert_chain, dst.amd_chain).ok
    return Psp("lab-1", src), handle


@pytest.fixture
def timed_sender(lab_root: LabRoot) -> tuple[Psp, int]:
    return timed_psp(lab_root, PspTiming(), PAGES)


def test_send_update_data_runs_at_the_measured_psp_rate(timed_sender) -> None:
    psp, handle = timed_sender
    began = time.perf_counter()
    for page in range(PAGES):
        assert psp.call(psp.fw.send_update_data, handle, page * PAGE, PAGE).ok
    rate = PAGES / (time.perf_counter() - began)
    assert 350 <= rate <= 450, f"{rate:.0f} pages/s"


def test_a_batch_costs_the_same_per_page(timed_sender) -> None:
    psp, handle = timed_sender
    began = time.perf_counter()
    assert psp.call(psp.fw.send_pages, handle, 0, PAGES).ok
    rate = PAGES / (time.perf_counter() - began)
    assert 350 <= rate <= 450, f"{rate:.0f} pages/s"
    assert psp.fw.counts[Command.SEND_UPDATE_DATA] == PAGES


def test_one_command_in_flight_across_threads(timed_sender) -> None:
    """Two threads sending at once get no more than one PSP's worth of pages per second."""
    psp, handle = timed_sender
    done: list[Status] = []

    def send(first: int) -> None:
        for page in range(first, PAGES, 2):
            done.append(psp.raw(psp.fw.send_update_data, handle, page * PAGE, PAGE).status)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    elapsed = time.perf_counter() - began
    assert not any(t.is_alive() for t in threads)
    assert done == [Status.SUCCESS] * PAGES
    assert PAGES / elapsed <= 450, f"{PAGES / elapsed:.0f} pages/s with two threads"


def test_introspection_does_not_wait_for_the_psp(lab_root: LabRoot) -> None:
    """A long batch holds the PSP; the lab's firmware query still answers at once."""
    psp, handle = timed_psp(lab_root, PspTiming(per_command_s=0.0005, per_page_s=0.01), 50)
    src = psp.fw
    worker = threading.Thread(target=psp.call, args=(src.send_pages, handle, 0, 50))
    worker.start()
    # The batch records its packets, then holds the PSP for its modelled 0.5 s.
    deadline = time.monotonic() + 5
    while src.counts.get(Command.SEND_UPDATE_DATA, 0) < 50 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert src.counts[Command.SEND_UPDATE_DATA] == 50
    began = time.perf_counter()
    snapshot = (src.log, src.counts, src.last_status, src.guest_state(handle), src.platform_state)
    waited = time.perf_counter() - began
    still_busy = worker.is_alive()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert still_busy, "the batch had already finished: nothing was measured"
    assert snapshot[3].name == "SUPDATE" and snapshot[2] is Status.SUCCESS
    assert waited < 0.1  # the batch itself takes 0.5 s


def test_other_commands_cost_per_command(lab_root: LabRoot) -> None:
    psp = Psp("lab-1", make_fw(lab_root, timing=PspTiming(per_command_s=0.004, per_page_s=0.0025)))
    began = time.perf_counter()
    for _ in range(25):
        assert psp.call(psp.fw.platform_status).ok
    elapsed = time.perf_counter() - began
    # The timeline may start up to PSP_SLACK_S in the past (catch-up credit after idle).
    assert 25 * 0.004 - PSP_SLACK_S <= elapsed < 25 * 0.004 * 2


def test_without_timing_the_model_runs_as_fast_as_the_cpu(lab_root: LabRoot) -> None:
    src, dst = make_fw(lab_root), make_fw(lab_root)
    handle = launch(src, random_memory(PAGES))
    target = dst.pdh_cert_export()
    assert src.send_start(handle, target.pdh, target.cert_chain, dst.amd_chain).ok
    psp = Psp("lab-1", src)
    assert not psp.paced
    began = time.perf_counter()
    assert psp.call(src.send_pages, handle, 0, PAGES).ok
    assert PAGES / (time.perf_counter() - began) > 2000  # far beyond any PSP


def test_the_firmware_itself_only_adds_up_modelled_time(lab_root: LabRoot) -> None:
    """The pure model never sleeps: with a cost model it counts, and returns at CPU speed."""
    psp, handle = timed_psp(lab_root, PspTiming(per_command_s=0.001, per_page_s=0.01), PAGES)
    src = psp.fw
    before = src.busy_s
    began = time.perf_counter()
    assert src.send_pages(handle, 0, PAGES).ok
    assert time.perf_counter() - began < PAGES * 0.01 / 4
    assert src.busy_s - before == pytest.approx(PAGES * 0.01)
    assert src.platform_status().ok and src.busy_s - before == pytest.approx(PAGES * 0.01 + 0.001)
    refused = src.send_pages(handle, 1, PAGES)  # runs past the end of memory
    assert refused.status is Status.INVALID_ADDRESS  # a refused page command costs one command
    assert src.busy_s - before == pytest.approx(PAGES * 0.01 + 0.002)


def test_the_timeline_runs_commands_back_to_back() -> None:
    """Sleep overshoot does not add up; an idle PSP starts again from now (fake clock)."""
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s + 0.001  # every sleep overshoots by 1 ms

    line = Timeline(clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        line.hold(now[0], 0.0025)
    # Ten commands end 25 ms after the start (less the catch-up credit), whatever the overshoot.
    assert line.free_at == pytest.approx(100.0 - PSP_SLACK_S + 10 * 0.0025)
    assert slept and now[0] - line.free_at <= 0.001 + 1e-9
    now[0] += 1.0  # idle
    line.hold(now[0], 0.0025)
    assert line.free_at == pytest.approx(now[0] - PSP_SLACK_S + 0.0025)
