"""Migrations outlive the console: quit and detach, re-attach from a new console, cancel from
there; and a console whose terminal is hung up (tmux session killed) mid-migration. Real lab
over SSH, real runner processes, an independent census at the end."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevconsole.engine import journal
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.live_backend import LiveBackend, open_backend
from sevconsole.tui.screens.live import LiveScreen
from sevconsole.tui.screens.migrate import MigrateScreen
from sevconsole.tui.screens.migrations import MigrationsScreen, QuitScreen
from sevconsole.tui.screens.result import ResultScreen
from tests.conftest import ROOT
from tests.reliability.rig import census, settle

try:
    from sevconsole.lab.control import Lab
except ImportError as exc:
    pytest.skip(f"the lab cannot be imported: {exc}", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def slow_lab(tmp_path: Path) -> Iterator[Lab]:
    """Two hosts with the realistic PSP (about 400 pages/s): a 16 MiB guest takes ~10 s."""
    with Lab.start(tmp_path / "lab", 2, mem_mib=16, realistic_psp=True) as running:
        yield running


def new_backend(lab: Lab) -> LiveBackend:
    return open_backend(inventory=None, lab_dir=Path(lab.paths.root))


async def wait_for(pilot, condition, timeout: float = 60.0, what=lambda: "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in {timeout} s {what()}"
        await pilot.pause(0.05)


def wait_journal_end(migration_id: str, timeout: float = 90.0) -> journal.Entry:
    deadline = time.monotonic() + timeout
    while True:
        entry = journal.entry(migration_id)
        if entry.finished and not entry.runner_alive:
            return entry
        assert time.monotonic() < deadline, f"{migration_id} still at {entry.step} after {timeout} s"
        time.sleep(0.1)  # polling the journal for its terminal record, with a deadline


async def test_quit_detaches_a_new_console_reattaches_and_cancels(slow_lab: Lab) -> None:
    digest_before = (await census(slow_lab, "web")).runnable[0].digest
    backend = new_backend(slow_lab)
    app = SevConsoleApp(backend)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: len(app.reports) == 2)
            await pilot.press("m")
            await wait_for(pilot, lambda: isinstance(app.screen, MigrateScreen) and len(app.screen.results) == 1)
            await pilot.press("enter", "y")
            await wait_for(pilot, lambda: isinstance(app.screen, LiveScreen))
            live = app.screen
            await wait_for(pilot, lambda: live.snapshots > 2 and live.handle.migration_id is not None)
            migration_id = live.handle.migration_id
            await pilot.press("ctrl+q")
            await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen))
            await pilot.press("d")  # leave it running
        assert app.return_code in (0, None)
    finally:
        backend.close()
    entry = journal.entry(migration_id)
    assert entry.in_flight, f"the migration stopped with the console: {entry.step}"

    backend = new_backend(slow_lab)
    app = SevConsoleApp(backend)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: len(app.reports) == 2)
            await pilot.press("M")
            await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen) and app.screen.entries)
            assert app.screen.entries[0].id == migration_id and app.screen.entries[0].in_flight
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, LiveScreen))
            live = app.screen
            await wait_for(pilot, lambda: live.snapshots > 0)  # the re-attached view draws progress
            await pilot.press("c")
            await pilot.press("y")
            await wait_for(pilot, lambda: isinstance(app.screen, ResultScreen), timeout=60)
            assert app.screen.result.result == "cancelled", app.screen.result.message
            await pilot.pause()
    finally:
        backend.close()
    entry = wait_journal_end(migration_id)
    assert entry.step == journal.Step.ROLLED_BACK
    after = await settle(slow_lab, "web", ("lab-1", "lab-2"))
    assert [c.host for c in after.runnable] == ["lab-1"], after.describe()
    assert after.runnable[0].digest == digest_before


def test_console_hung_up_mid_migration_the_runner_finishes(slow_lab: Lab, tmp_path: Path) -> None:
    """The issue's case: a console in tmux migrates, then its tmux session is killed (the console
    gets SIGHUP). The runner goes on; the guest ends on the target with one runnable copy."""
    import asyncio

    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed")
    session = f"sevconsole-hup-{os.getpid()}"
    # a tmux server that already runs gives new sessions its own environment: name ours explicitly
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    names = ("PYTHONPATH", "SEVCONSOLE_STATE_DIR", "SEVCONSOLE_RUNTIME_DIR", "SEVCONSOLE_DATA_DIR",
             "SEVCONSOLE_CONFIG_DIR")
    assigned = " ".join(f"{k}={shlex.quote(env[k])}" for k in names if k in env)
    command = f"env {assigned} {sys.executable} -m sevconsole --lab {slow_lab.paths.root}"
    subprocess.run([tmux, "new-session", "-d", "-s", session, "-x", "100", "-y", "30", command],
                   check=True, env=env, cwd=tmp_path)

    def pane() -> str:
        return subprocess.run([tmux, "capture-pane", "-p", "-t", session], capture_output=True,
                              text=True).stdout

    def wait_text(text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in pane():
            assert time.monotonic() < deadline, f"{text!r} never appeared; the pane shows:\n{pane()}"
            time.sleep(0.2)  # polling the pane for a condition, with a deadline

    try:
        wait_text("2/2 hosts probed", 90)
        subprocess.run([tmux, "send-keys", "-t", session, "m"], check=True)
        wait_text("All checks allow it", 30)
        subprocess.run([tmux, "send-keys", "-t", session, "Enter"], check=True)
        wait_text("Migrate web to lab-2?", 10)
        subprocess.run([tmux, "send-keys", "-t", session, "y"], check=True)
        deadline = time.monotonic() + 30
        while not [e for e in journal.entries() if e.step is not None]:
            assert time.monotonic() < deadline, "no migration was journaled"
            time.sleep(0.1)  # polling the journal, with a deadline
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True)  # the hang-up
    (entry,) = journal.entries()
    assert not entry.finished, "the migration ended before the hang-up; the test proves nothing"
    ended = wait_journal_end(entry.id)
    assert ended.step == journal.Step.DONE, json.dumps(ended.outcome)
    after = asyncio.run(settle(slow_lab, "web", ("lab-1", "lab-2")))
    assert [c.host for c in after.runnable] == ["lab-2"], after.describe()
