"""The console on a real lab: hosts over SSH, QMP, a real SEV migration through the engine, the
guide's demos, and the installed command driven through tmux. Slow: a lab takes seconds."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.live_backend import LiveBackend, open_backend
from sevconsole.tui.screens.guide import GuideScreen
from sevconsole.tui.screens.live import LiveScreen
from sevconsole.tui.screens.migrate import MigrateScreen
from sevconsole.tui.screens.result import ResultScreen
from sevconsole.tui.widgets.migration_view import MigrationView
from sevconsole.tui.widgets.page_map import PageMap
from sevconsole.tui.widgets.replay_view import ReplayView
from tests.conftest import ROOT

try:
    from sevconsole.lab.control import Lab
    from sevconsole.lab.layout import default_layout
except ImportError as exc:  # the lab is a teammate's part; skip only when it cannot be imported
    pytest.skip(f"the lab cannot be imported: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow


GUEST_MIB = 8  # the guide's PSP demo cancels after a first pass at ~400 pages/s: 5 s, not 40 s at 64 MiB


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    hosts = default_layout(4, mem_mib=GUEST_MIB)
    layout = (*hosts[:3], replace(hosts[3], realistic_psp=True))
    with Lab.start(tmp_path / "lab", len(layout), layout=layout) as running:
        yield running


@pytest.fixture
def backend(lab: Lab) -> Iterator[LiveBackend]:
    live = open_backend(inventory=None, lab_dir=Path(lab.paths.root))
    yield live
    live.close()


async def wait_for(pilot, condition, timeout: float = 60.0, what=lambda: "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in {timeout} s {what()}"
        await pilot.pause(0.05)


async def test_migrate_on_the_lab_by_keys(backend: LiveBackend) -> None:
    app = SevConsoleApp(backend)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(app.reports) == 4)
        assert all(r.reachable and r.capabilities.chain_report.ok for r in app.reports.values())
        await pilot.press("m")  # lab-1's first VM: web
        await wait_for(pilot, lambda: isinstance(app.screen, MigrateScreen) and len(app.screen.results) == 3)
        screen = app.screen
        assert screen.results["lab-3"][0].status in ("pass", "warn")
        assert any(c.key == "domain" and c.status == "fail" for c in screen.results["lab-3"])
        assert screen.selected_target() == "lab-2"  # compatible targets come first
        await pilot.press("enter", "y")
        await wait_for(pilot, lambda: isinstance(app.screen, LiveScreen))
        live = app.screen
        await wait_for(pilot, lambda: live.query_one(PageMap).grid.total_pages > 0 or isinstance(app.screen, ResultScreen))
        await wait_for(pilot, lambda: isinstance(app.screen, ResultScreen) and app.screen.query("#result"),
                       timeout=120)
        result = app.screen.result
        assert result.result == "done", result.message
        assert result.runnable == ("lab-2",) and result.source_guest_state == 6
        assert "exactly one runnable copy: on lab-2" in str(app.screen.query_one("#result").render())
        # the replay reads what the runner recorded: from before the first page to the end
        result_screen = app.screen
        await pilot.press("r")
        await wait_for(pilot, lambda: result_screen.tape is not None, timeout=30)
        tape = result_screen.tape
        assert len(tape) >= 3 and tape.frames[-1].phase.value == "done"
        assert tape.frames[0].bytes_transferred == 0 < tape.frames[-1].bytes_transferred
        view = result_screen.query_one(ReplayView)
        await pilot.press("home")
        assert view.index == 0 and view.query_one(MigrationView).latest.phase.value != "done"
        await pilot.press("end")
        assert view.index == len(tape) - 1
        await pilot.pause()  # let the new screen finish mounting before the app exits


async def test_guide_runs_its_demos_on_the_lab(backend: LiveBackend) -> None:
    app = SevConsoleApp(backend, guide=True)
    async with app.run_test(size=(100, 36)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, GuideScreen))
        guide = app.screen
        for _ in range(len(guide.steps) - 1):
            await wait_for(pilot, lambda: not guide.busy, timeout=180,
                           what=lambda: f"in step {guide.index}: {guide.narration[-3:]}")
            await pilot.press("space")
            await pilot.pause()
        await wait_for(pilot, lambda: not guide.busy, timeout=180)
        # preflight web, migrate web, NOSEND, other domain, no consent, tampered packet, PSP too slow
        assert guide.outcomes == ["allowed", "done", "refused", "refused", "refused", "failed", "cancelled"]


def test_sevconsole_in_tmux(tmp_path: Path) -> None:
    """The real command: embedded lab, hosts table, a migration by keys, result read from the pane."""
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed")
    session = f"sevconsole-test-{os.getpid()}"
    env = {**os.environ, "SEVCONSOLE_CONFIG_DIR": str(tmp_path / "config"),
           "SEVCONSOLE_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    # a tmux server that already runs gives new sessions its own environment: name ours explicitly
    names = ("PYTHONPATH", "SEVCONSOLE_STATE_DIR", "SEVCONSOLE_RUNTIME_DIR", "SEVCONSOLE_DATA_DIR",
             "SEVCONSOLE_CONFIG_DIR")
    assigned = " ".join(f"{k}={shlex.quote(env[k])}" for k in names if k in env)
    command = f"env {assigned} {sys.executable} -m sevconsole"
    subprocess.run([tmux, "new-session", "-d", "-s", session, "-x", "100", "-y", "30", command],
                   check=True, env=env, cwd=tmp_path)

    def pane() -> str:
        return subprocess.run([tmux, "capture-pane", "-p", "-t", session], capture_output=True,
                              text=True).stdout

    def wait_text(text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = pane()
            if text in screen:
                return screen
            time.sleep(0.2)  # polling the pane for a condition, with a deadline
        raise AssertionError(f"{text!r} never appeared; the pane shows:\n{pane()}")

    def keys(*names: str) -> None:
        subprocess.run([tmux, "send-keys", "-t", session, *names], check=True)

    try:
        wait_text("4/4 hosts probed", 90)
        keys("m")
        wait_text("All checks allow it", 30)
        keys("Enter")
        wait_text("Migrate web to lab-2?", 10)
        keys("y")
        screen = wait_text("exactly one runnable copy", 120)
        assert "Migrated" in screen and "on lab-2" in screen
        keys("C-q")
        deadline = time.monotonic() + 30
        while subprocess.run([tmux, "has-session", "-t", session], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "sevconsole did not quit"
            time.sleep(0.2)
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True)


async def test_unknown_host_key_on_the_lab_is_asked_then_remembered(lab: Lab, tmp_path: Path) -> None:
    """A console that has never seen the lab's keys: each host asks, accepting records the key."""
    from sevconsole.hosts.labdir import load_lab
    from sevconsole.tui.screens.modals import HostKeyScreen

    state = load_lab(lab.paths.root)
    own = tmp_path / "own_known_hosts"
    backend = LiveBackend(list(state.inventory.hosts)[:1], known_hosts=own, lab_root=state.lab_root, lab=True)
    app = SevConsoleApp(backend)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            # the modal is pushed, then composed: wait until its fingerprint line is on screen
            await wait_for(pilot, lambda: isinstance(app.screen, HostKeyScreen)
                           and bool(app.screen.query("#fingerprint")))
            question = app.screen.question
            assert question.host == "lab-1" and question.fingerprint.startswith("SHA256:")
            assert question.fingerprint in str(app.screen.query_one("#fingerprint").render())
            await pilot.press("a")
            await wait_for(pilot, lambda: "lab-1" in app.reports)
            assert app.reports["lab-1"].reachable and app.reports["lab-1"].vms
    finally:
        backend.close()
    assert "lab-1" in own.read_text() or "127.0.0.1" in own.read_text()
