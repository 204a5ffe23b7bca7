"""The realistic PSP (one command at a time, about 2.5 ms a page) against a guest dirtying 400
pages/s or more: the engine must predict that the migration will not converge, and say so, rather than
wait; the operator (here the test) then cancels and the guest stays on the source."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sevconsole.engine.checks import preflight, refused
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.progress import Phase, Progress
from sevconsole.engine.run import Migration
from sevconsole.sev.status import GuestState
from tests.engine.conftest import LabSession, open_lab_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120), pytest.mark.alone]  # the PSP's measured rate


@pytest.fixture(scope="module")
def slow_psp_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSession]:
    yield from open_lab_session(tmp_path_factory.mktemp("lab"), tmp_path_factory.mktemp("amd"), hosts=2,
                                realistic_psp=True, dirty_rate=800.0, mem_mib=8)


async def test_non_convergence_is_predicted(slow_psp_lab: LabSession) -> None:
    reports = slow_psp_lab.reports("lab-1", "lab-2", need=("web",))
    plan = MigrationPlan(vm=reports["lab-1"].vm("web"), source=reports["lab-1"], target=reports["lab-2"],
                         downtime_limit_ms=300)
    checks = preflight(plan, slow_psp_lab.trust)
    assert not refused(checks)
    seen: list[Progress] = []
    mig: Migration

    def watch(p: Progress) -> None:
        seen.append(p)
        # three passes that each left as much as they took: the prediction has had its chance
        if p.phase is Phase.PRECOPY and p.pass_number >= 4 and p.converging is False:
            mig.cancel("does not converge at this downtime limit")

    src, dst = slow_psp_lab.link(plan.source), slow_psp_lab.link(plan.target)
    mig = Migration(plan, src, dst, checks=checks, on_progress=watch, poll_interval_s=0.1)
    outcome = await mig.run()
    await src.close()
    await dst.close()
    assert outcome.result == "cancelled", (outcome, [(p.pass_number, p.pages_per_s, p.dirty_pages_per_s) for p in seen[-5:]])
    verdicts = [p for p in seen if p.pass_number >= 3 and p.phase is Phase.PRECOPY]
    assert verdicts and all(p.converging is not True for p in verdicts[-5:])
    last = verdicts[-1]
    assert last.expected_downtime_ms is not None and last.expected_downtime_ms > plan.downtime_limit_ms
    assert last.eta_s is None
    # the PSP is the bottleneck: about 400 pages/s (2.5 ms a page), no faster than the guest dirties
    # (asked for 800/s: above the PSP even when a loaded machine slows the guest's workload down)
    assert 250 < last.pages_per_s < 600 and last.dirty_pages_per_s > 0.9 * last.pages_per_s
    assert outcome.runnable == ("lab-1",) and outcome.source_guest_state == GuestState.RUNNING
