"""SVG snapshots of the main screens with deterministic data (real certificates, built Progress).

Update after an intended change: pytest tests/tui/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

import pytest

from sevconsole.hosts.report import Capabilities
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.screens.live import LiveScreen
from sevconsole.tui.screens.migrate import MigrateScreen
from sevconsole.tui.screens.overview import OverviewScreen
from sevconsole.tui.screens.replay import ReplayScreen
from sevconsole.tui.screens.result import ResultScreen
from tests.tui.scripted import ScriptedBackend, sample_progress, sample_reports, sample_result
from tests.tui.test_overview import fleet_backend, journal_entry


def make_app(rome: Capabilities, naples: Capabilities, theme: str | None = None) -> SevConsoleApp:
    return SevConsoleApp(ScriptedBackend(sample_reports(rome, other_caps=naples)), theme=theme)


async def idle(pilot) -> None:  # type: ignore[no-untyped-def]
    """Workers done, their messages handled, and the screen's own data complete."""
    app = pilot.app
    await app.workers.wait_for_complete()

    def pending() -> bool:
        screen = app.screen
        if isinstance(screen, MigrateScreen):
            return len(screen.results) < len(screen.targets())
        if isinstance(screen, OverviewScreen) and not screen.history_loaded:
            return True
        return len(app.reports) < 3 or getattr(screen, "busy", False)

    while pending():
        await pilot.pause(0.01)
        await app.workers.wait_for_complete()
    await app.workers.wait_for_complete()
    await pilot.pause()
    app.clear_notifications()  # the toasts a start raises (migrations in flight, attention) cover the panels
    await pilot.pause()


@pytest.mark.parametrize("theme", ["dark", "light", "high-contrast"])
def test_hosts(snap_compare, rome_caps, naples_caps, theme) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(make_app(rome_caps, naples_caps, theme), terminal_size=(80, 24), run_before=idle)


@pytest.mark.parametrize("size", [(110, 34), (80, 24)])
def test_host_with_chain(snap_compare, rome_caps, naples_caps, size) -> None:  # type: ignore[no-untyped-def]
    async def before(pilot) -> None:  # type: ignore[no-untyped-def]
        await idle(pilot)
        await pilot.press("enter")
        await pilot.pause()

    assert snap_compare(make_app(rome_caps, naples_caps), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", [(100, 30), (80, 24)])
def test_preflight_compatible(snap_compare, rome_caps, naples_caps, size) -> None:  # type: ignore[no-untyped-def]
    async def before(pilot) -> None:  # type: ignore[no-untyped-def]
        await idle(pilot)
        await pilot.press("m")
        await idle(pilot)

    assert snap_compare(make_app(rome_caps, naples_caps), terminal_size=size, run_before=before)


def test_preflight_refused_nosend(snap_compare, rome_caps, naples_caps) -> None:  # type: ignore[no-untyped-def]
    async def before(pilot) -> None:  # type: ignore[no-untyped-def]
        await idle(pilot)
        await pilot.press("enter", "down", "m")  # lab-1, the vault VM (NOSEND)
        await idle(pilot)

    assert snap_compare(make_app(rome_caps, naples_caps), terminal_size=(100, 30), run_before=before)


def _live(size: tuple[int, int], frame: int, rome, naples, *, converging: bool = True):  # type: ignore[no-untyped-def]
    app = make_app(rome, naples)

    async def before(pilot) -> None:  # type: ignore[no-untyped-def]
        await idle(pilot)
        reports = app.reports
        screen = LiveScreen(reports["lab-1"].vms[0], reports["lab-1"], reports["lab-2"], (), 300, start=False)
        await app.push_screen(screen)
        screen.apply(sample_progress(frames=12, converging=converging)[frame])
        await pilot.pause()

    return app, before


def test_live_midway_80x24(snap_compare, rome_caps, naples_caps) -> None:  # type: ignore[no-untyped-def]
    app, before = _live((80, 24), 4, rome_caps, naples_caps)
    assert snap_compare(app, terminal_size=(80, 24), run_before=before)


def test_live_wide_not_converging(snap_compare, rome_caps, naples_caps) -> None:  # type: ignore[no-untyped-def]
    app, before = _live((160, 45), 10, rome_caps, naples_caps, converging=False)
    assert snap_compare(app, terminal_size=(160, 45), run_before=before)


def test_result(snap_compare, rome_caps, naples_caps) -> None:  # type: ignore[no-untyped-def]
    app = make_app(rome_caps, naples_caps)

    async def before(pilot) -> None:  # type: ignore[no-untyped-def]
        await idle(pilot)
        last = sample_progress()[-1]
        audit = ('{"seq": 7, "time": "2026-11-26T12:00:00.000+00:00", "operator": "ops", "vm": "web", '
                 '"source": "lab-1", "target": "lab-2", "outcome": "done", "checks": [], "prev": "3b1f9c0d2e4a"}')
        await app.push_screen(ResultScreen(sample_result(last, audit), last))
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=before)


def test_help(snap_compare, rome_caps, naples_caps) -> None:  # type: ignore[no-untyped-def]
    async def before(pilot) -> None:  # type: ignore[no-untyped-def]
        await idle(pilot)
        await pilot.press("question_mark")
        await idle(pilot)

    assert snap_compare(make_app(rome_caps, naples_caps), terminal_size=(80, 24), run_before=before)


def test_guide_preflight_step(snap_compare, rome_caps, naples_caps) -> None:  # type: ignore[no-untyped-def]
    app = SevConsoleApp(ScriptedBackend(sample_reports(rome_caps, other_caps=naples_caps)), guide=True)

    async def before(pilot) -> None:  # type: ignore[no-untyped-def]
        await idle(pilot)
        await pilot.press("space")  # step 2: the PDH exchange, then the preflight of web -> lab-2
        await idle(pilot)

    assert snap_compare(app, terminal_size=(100, 36), run_before=before)


def _busy_fleet(rome: Capabilities, naples: Capabilities) -> SevConsoleApp:
    """Four VMs on two hosts, a host out of reach, a stale copy, two migrations (one in flight) and an
    older one from the audit log: every panel of the overview has something to show."""
    from dataclasses import replace

    from sevconsole.engine import attention
    from sevconsole.engine.machine import Step

    backend = fleet_backend(rome, naples)
    backend.reports["lab-3"] = replace(backend.reports["lab-3"], reachable=False, capabilities=None, sev=None,
                                       latency_ms=None, errors=("lab-3 (127.0.0.1:42203): connection refused",))
    backend.attention_items = [
        attention.Attention("", "lab-3 cannot be reached: lab-3 (127.0.0.1:42203): connection refused", (),
                            kind="host-down", host="lab-3"),
        attention.Attention("web", "a stale copy stays on lab-2 (postmigrate, guest SENT) beside the copy running "
                            "on lab-1", (attention.CopySeen("lab-2", 4016, "postmigrate", 6),),
                            attention.SafeAction(attention.Fix.STOP, "stop the stale copy on lab-2 (pid 4016); "
                                                 "web keeps running on lab-1", host="lab-2", pid=4016),
                            kind="stale-copy", host="lab-2")]
    base = 1_796_000_000.0  # fixed times: the snapshot must not change with the clock
    backend.entries = [
        journal_entry("20261130-140501-a1b2", "db", "lab-2", "lab-1", base + 300, step=Step.STREAMING,
                  runner_alive=True, outcome=None),
        journal_entry("20261130-140002-c3d4", "web", "lab-2", "lab-1", base),
        journal_entry("20261130-135502-e5f6", "vault", "lab-1", "lab-2", base - 300, step=Step.REFUSED,
                  outcome={"result": "refused", "message": "NOSEND"})]
    backend.audit = [{"time": "2026-11-29T09:12:00+00:00", "vm": "web", "source": "lab-1", "target": "lab-2",
                      "outcome": "done"}]
    return SevConsoleApp(backend)


@pytest.fixture
def utc_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Migration times in UTC, as if today: the snapshot must not change with the clock or the zone."""
    import datetime

    from sevconsole.tui import fleet

    monkeypatch.setattr(fleet, "when", lambda started, now=None: datetime.datetime.fromtimestamp(
        started, datetime.UTC).strftime("%H:%M:%S"))


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_overview(snap_compare, rome_caps, naples_caps, size, utc_times) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(_busy_fleet(rome_caps, naples_caps), terminal_size=size, run_before=idle)


def test_attention_list(snap_compare, rome_caps, naples_caps, utc_times) -> None:  # type: ignore[no-untyped-def]
    async def before(pilot) -> None:  # type: ignore[no-untyped-def]
        await idle(pilot)
        await pilot.press("A", "down")
        await idle(pilot)

    assert snap_compare(_busy_fleet(rome_caps, naples_caps), terminal_size=(100, 30), run_before=before)


@pytest.mark.parametrize("size", [(80, 24), (160, 45)])
def test_replay(snap_compare, rome_caps, naples_caps, size) -> None:  # type: ignore[no-untyped-def]
    """A migration played back: the scrubber half way, the page map and rate as they were then."""
    app = make_app(rome_caps, naples_caps)

    async def before(pilot) -> None:  # type: ignore[no-untyped-def]
        await idle(pilot)
        from sevconsole.engine.replay import Tape
        from sevconsole.tui.widgets.replay_view import ReplayView

        tape = Tape.from_progress(sample_progress(frames=12), "20261130-140002-c3d4")
        await app.push_screen(ReplayScreen("20261130-140002-c3d4", tape=tape, title="web lab-1 → lab-2"))
        await pilot.pause()
        view = app.screen.query_one(ReplayView)
        view.show(6)
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=before)
