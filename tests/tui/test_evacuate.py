"""Evacuating a host from the console: E on the hosts list opens the plan, Enter and a
confirmation run it, the fleet view fills; on a real lab, with a census of every guest after."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevconsole.hosts.report import Capabilities
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.live_backend import LiveBackend, open_backend
from sevconsole.tui.screens.evacuate import EvacuateScreen
from sevconsole.tui.screens.hosts import HostsScreen
from sevconsole.tui.screens.modals import ConfirmScreen
from tests.tui.scripted import ScriptedBackend, sample_reports

try:
    from sevconsole.lab.control import Lab
    from sevconsole.lab.layout import default_layout
    from tests.reliability.rig import census, settle
except ImportError as exc:  # the lab is a teammate's part; skip only when it cannot be imported
    pytest.skip(f"the lab cannot be imported: {exc}", allow_module_level=True)


async def wait_for(pilot, condition, timeout: float = 60.0, what=lambda: "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in {timeout} s {what()}"
        await pilot.pause(0.05)


async def test_without_a_fleet_it_says_so(rome_caps: Capabilities, naples_caps: Capabilities) -> None:
    app = SevConsoleApp(ScriptedBackend(sample_reports(rome_caps, other_caps=naples_caps)))
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, HostsScreen)
        await pilot.press("E")
        await pilot.pause()
        assert isinstance(app.screen, HostsScreen)
        assert any("without a fleet" in str(n.message) for n in app._notifications)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """lab-1: web (SEV), vault (NOSEND), plain; lab-2 takes web; lab-3 (another OCA domain) only plain."""
    with Lab.start(tmp_path / "lab", 3, mem_mib=8) as running:
        yield running


@pytest.fixture
def backend(lab: Lab) -> Iterator[LiveBackend]:
    live = open_backend(inventory=None, lab_dir=Path(lab.paths.root))
    yield live
    live.close()


@pytest.mark.slow
async def test_evacuate_a_host_by_keys(lab: Lab, backend: LiveBackend) -> None:
    guests = [v.name for v in default_layout(3)[0].vms]
    # NOSEND, and a guest that never enabled migration (QEMU's blocker) where the layout has one
    blocked = ["vault", *(v.name for v in default_layout(3)[0].vms if not getattr(v, "migration_ready", True))]
    before = {vm: (await census(lab, vm)).runnable[0].digest for vm in guests}
    app = SevConsoleApp(backend)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: {"lab-1", "lab-2", "lab-3"} <= set(app.reports))
        await pilot.pause()
        assert app.screen.selected_host() == "lab-1"  # type: ignore[attr-defined]
        await pilot.press("E")
        await wait_for(pilot, lambda: isinstance(app.screen, EvacuateScreen))
        screen = app.screen
        assert isinstance(screen, EvacuateScreen)
        await wait_for(pilot, lambda: screen.state in ("ready", "refused", "failed"), 60,
                       lambda: str(screen.log_lines[-3:]))
        assert screen.state == "ready"
        plan = screen.prepared.plan
        assert {m.vm: m.target for m in plan.moves}["web"] == "lab-2"
        assert [b.vm for b in plan.blockers] == blocked
        text = str(screen.query_one("#evac-plan-text").render())
        assert "vault" in text and "NOSEND" in text and "not lab-3" in text
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.state in ("done", "failed"), 90)
        assert screen.state == "done" and screen.view is not None and screen.view.exit_code == 0
        rows = {r.vm: r.status for r in screen.view.rows}
        assert rows == {vm: "blocked" if vm in blocked else "moved" for vm in guests}
        table = screen.query_one("#evac-fleet")
        assert table.row_count == len(guests)
        assert "moved 2" in str(screen.query_one("#evac-summary").render())
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, HostsScreen))
    for vm, digest in before.items():
        now = await settle(lab, vm, ("lab-1", "lab-2", "lab-3"))
        assert len(now.runnable) == 1 and now.runnable[0].digest == digest, now.describe()
        assert (now.runnable[0].host == "lab-1") == (vm in blocked), now.describe()
    await asyncio.sleep(0)
