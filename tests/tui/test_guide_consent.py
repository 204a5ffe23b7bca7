"""The guide's consent step: a guest that never enabled migration is refused, and the guide says
why in the operator's terms (QEMU's blocker, the guest's own switch, what forcing it would do)."""

from __future__ import annotations

from dataclasses import replace

from sevconsole.hosts.report import Capabilities
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.guide_steps import STEPS
from sevconsole.tui.screens.guide import GuideScreen
from tests.tui.scripted import POLICY_RECOMMENDED, ScriptedBackend, sample_reports, sample_vm

BLOCKER = "SEV: Migration is not implemented"


async def test_the_consent_step_refuses_legacy_and_says_why(rome_caps: Capabilities) -> None:
    index = next(i for i, s in enumerate(STEPS) if s.vm == "legacy")
    step = STEPS[index]
    assert step.action == "preflight" and "live migration enabled in EFI" in step.text
    reports = sample_reports(rome_caps)
    # what discovery reads from QEMU: the series' commands are there, and so is the SEV blocker
    legacy = replace(sample_vm("legacy", 1024, POLICY_RECOMMENDED), migration_blocker=BLOCKER)
    reports["lab-1"] = replace(reports["lab-1"], vms=(*reports["lab-1"].vms, legacy))
    reports["lab-2"] = replace(reports["lab-2"], capabilities=rome_caps)
    app = SevConsoleApp(ScriptedBackend(reports), guide=True)
    async with app.run_test(size=(100, 36)) as pilot:
        await app.workers.wait_for_complete()
        guide = app.screen
        assert isinstance(guide, GuideScreen)
        guide.index = index - 1  # straight to the step before, then on as the operator would
        await pilot.press("space")
        while guide.busy:
            await pilot.pause(0.01)
        assert guide.outcomes == ["refused"]
        shown = "\n".join(str(line) for line in guide.narration)
        # the first failure is the guest's consent, not QEMU's support (the series is there)
        assert "Refused: legacy's guest never enabled migration itself" in shown and BLOCKER in shown
