"""Guide mode on the scripted backend: every step, its narration, the lab commands, the outcomes."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from sevconsole.engine.progress import Phase
from sevconsole.engine.run import Outcome
from sevconsole.hosts.report import Capabilities
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.guide_steps import PHASE_NOTES, STEPS
from sevconsole.tui.screens.guide import GuideScreen
from sevconsole.tui.screens.hosts import HostsScreen
from tests.tui.scripted import (
    POLICY_RECOMMENDED,
    ScriptedBackend,
    sample_progress,
    sample_reports,
    sample_vm,
)


def guide_backend(rome: Capabilities, naples: Capabilities) -> ScriptedBackend:
    reports = sample_reports(rome, other_caps=naples)
    working = reports["lab-1"].sev  # a host running a guest has a WORKING platform
    reports["lab-2"] = replace(reports["lab-2"], sev=working, vms=(sample_vm("db", 1024, POLICY_RECOMMENDED),))
    reports["lab-4"] = replace(reports["lab-2"], name="lab-4", vms=(sample_vm("db-4", 1024, POLICY_RECOMMENDED),))
    tampered = Outcome(result="failed", message="lab-1: RECEIVE_UPDATE_DATA: BAD_MEASUREMENT (packet MAC)",
                      runnable=("lab-2",), source_guest_state=3)
    return ScriptedBackend(
        reports, step=asyncio.Event(),
        scripts={"db-4": sample_progress("db-4", "lab-4", "lab-2", frames=12, converging=False),
                 "db": sample_progress("db", "lab-2", "lab-1", frames=3)[:2]},
        results={"db": tampered})


async def test_guide_walks_every_step(rome_caps: Capabilities, naples_caps: Capabilities) -> None:
    backend = guide_backend(rome_caps, naples_caps)
    app = SevConsoleApp(backend, guide=True)
    async with app.run_test(size=(100, 36)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        guide = app.screen
        assert isinstance(guide, GuideScreen)
        assert "1. The lab" in str(guide.query_one("#guide-text").render())
        seen_notes: set[str] = set()
        for _ in range(len(STEPS) - 1):
            await pilot.press("space")
            while guide.busy:  # feed the scripted migration one snapshot at a time
                backend.step.set()  # type: ignore[union-attr]
                await pilot.pause(0.01)
                seen_notes.update(line for line in guide.narration if line.startswith("▸"))
        assert guide.outcomes == ["allowed", "done", "refused", "refused", "failed", "cancelled"]
        assert backend.lab_commands == [("lab-1", "web", "x-lab-set"), ("lab-2", "db", "x-lab-inject-fault"),
                                        ("lab-4", "db-4", "x-lab-set")]
        assert any(PHASE_NOTES[Phase.PRECOPY][:40] in note for note in seen_notes)
        cancelled = backend.started[-1]
        assert cancelled.cancelled == "cancelled by the guide: the migration could not converge"
        assert "End of the tour" in str(guide.query_one("#guide-text").render())
        await pilot.press("space")  # past the end: stays, says so
        assert app.screen is guide
        await pilot.press("escape")
        assert isinstance(app.screen, HostsScreen)


async def test_guide_busy_step_waits_and_can_be_cancelled(rome_caps: Capabilities, naples_caps: Capabilities) -> None:
    backend = guide_backend(rome_caps, naples_caps)
    app = SevConsoleApp(backend, guide=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        guide = app.screen
        assert isinstance(guide, GuideScreen)
        await pilot.press("space")
        while guide.busy:
            await pilot.pause(0.01)
        await pilot.press("space")  # step 3: the migration starts and waits for snapshots
        while guide.handle is None:
            await pilot.pause(0.01)
        await pilot.press("space")  # ignored while busy
        assert guide.index == 2
        await pilot.press("c")
        while guide.busy:
            backend.step.set()  # type: ignore[union-attr]
            await pilot.pause(0.01)
        assert guide.outcomes == ["allowed", "cancelled"]
