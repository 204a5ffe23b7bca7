"""Pilot tests of the console on a scripted backend: press keys, wait until idle, assert."""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path

import numpy as np
import pytest

from sevconsole.engine.progress import Phase
from sevconsole.hosts.report import Capabilities
from sevconsole.sev.pagestate import STATE_COUNT
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.backend import HostKeyQuestion
from sevconsole.tui.config import ConsoleConfig
from sevconsole.tui.screens.help import HelpScreen
from sevconsole.tui.screens.host import HostScreen
from sevconsole.tui.screens.hosts import HostsScreen
from sevconsole.tui.screens.live import LiveScreen
from sevconsole.tui.screens.migrate import MigrateScreen
from sevconsole.tui.screens.modals import ConfirmScreen, HostKeyScreen
from sevconsole.tui.screens.result import ResultScreen
from sevconsole.tui.widgets.page_map import PageMap
from tests.tui.scripted import ScriptedBackend, sample_progress, sample_reports

SIZE = (80, 24)


def table_rows(app: SevConsoleApp, selector: str = "#hosts, DataTable") -> list[list[str]]:
    table = app.screen.query_one(selector)
    return [[str(getattr(c, "plain", c)) for c in table.get_row_at(i)] for i in range(table.row_count)]


def text_of(app: SevConsoleApp, selector: str) -> str:
    return str(app.screen.query_one(selector).render())


async def settle(app: SevConsoleApp, pilot) -> None:  # type: ignore[no-untyped-def]
    """Workers done and their messages handled (a migrate screen has every target's checks)."""
    await app.workers.wait_for_complete()
    await pilot.pause()
    while isinstance(app.screen, MigrateScreen) and len(app.screen.results) < len(app.screen.targets()):
        await pilot.pause(0.01)
        await app.workers.wait_for_complete()


@pytest.fixture
def backend(rome_caps: Capabilities, naples_caps: Capabilities) -> ScriptedBackend:
    return ScriptedBackend(sample_reports(rome_caps, other_caps=naples_caps))


async def test_rows_fill_as_probes_finish(backend: ScriptedBackend) -> None:
    release = threading.Event()

    def gate(name: str) -> None:
        if name == "lab-2":
            assert release.wait(10), "test never released lab-2"

    backend.probe_gate = gate
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        while len(app.reports) < 2:  # lab-1 and lab-3 answer; lab-2 is held back
            await pilot.pause(0.01)
        rows = {r[0]: r for r in table_rows(app)}
        assert rows["lab-1"][1].startswith("up") and rows["lab-1"][4] == "2"
        assert rows["lab-2"][1] == "probing…"
        release.set()
        await settle(app, pilot)
        rows = {r[0]: r for r in table_rows(app)}
        assert rows["lab-2"][1] == "up lab" and rows["lab-2"][3] == "ok rome"
        assert sorted(app.probe_log) == ["lab-1: probed (reachable)", "lab-2: probed (reachable)",
                                         "lab-3: probed (reachable)"]


async def test_filter_reprobe_and_open(backend: ScriptedBackend) -> None:
    probed: list[str] = []
    backend.probe_gate = probed.append
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("slash", *"vault")
        await pilot.pause()
        assert [r[0] for r in table_rows(app, "#hosts")] == ["lab-1"]  # lab-1 runs vault
        await pilot.press("enter")  # keep the filter, back to the table
        await pilot.press("r")
        await settle(app, pilot)
        assert probed.count("lab-1") == 2
        await pilot.press("escape")
        assert len(table_rows(app, "#hosts")) == 3
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, HostScreen) and app.screen.host_name == "lab-1"


async def test_unknown_host_key_is_asked_with_fingerprint(backend: ScriptedBackend) -> None:
    question = HostKeyQuestion("lab-3", "ssh-ed25519", "SHA256:q9b0sA1vT0rKq3JZ4m1d0yq8w1o5uQeLh7bQ3lWq2xE",
                               "lab-3 (127.0.0.1:42203) offered a key this console has never seen.")
    backend.ask_keys = {"lab-3": question}
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, HostKeyScreen)
        assert question.fingerprint in text_of(app, "#fingerprint")
        assert "lab-3" not in app.reports
        await pilot.press("a")
        await settle(app, pilot)
        assert backend.accepted == [question.fingerprint]
        assert app.reports["lab-3"].reachable


async def test_refused_host_key_leaves_a_sentence(backend: ScriptedBackend) -> None:
    backend.ask_keys = {"lab-2": HostKeyQuestion("lab-2", "ssh-rsa", "SHA256:abc", "new key")}
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("n")
        await pilot.pause()
        assert isinstance(app.screen, HostsScreen)
        rows = {r[0]: r for r in table_rows(app)}
        assert rows["lab-2"][1] == "down"
        assert "was refused" in rows["lab-2"][5]
        assert backend.accepted == []


async def test_host_screen_chain_and_clipboard(backend: ScriptedBackend, rome_caps: Capabilities) -> None:
    app = SevConsoleApp(backend)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        await pilot.press("enter")
        await pilot.pause()
        tree = app.screen.query_one("#chain")
        labels = [str(n.label) for n in tree.root.children[0].children]
        assert str(tree.root.label) == "✓ chain verified to AMD Rome ARK"
        assert [label.split(":")[0] for label in labels] == [
            "✓ ARK self", "✓ ARK->ASK", "✓ ASK->CEK", "✓ CEK->PEK", "✓ OCA self", "✓ OCA->PEK", "✓ PEK->PDH"]
        certs = [str(n.label) for n in tree.root.children[1].children]
        assert certs[-1].startswith("ARK  key id e6002122fb58419399d15fee7b131351")
        await pilot.press("c")
        assert app.clipboard == base64.b64encode(rome_caps.pdh).decode()
        await pilot.press("C")
        assert base64.b64decode(app.clipboard) == rome_caps.cert_chain
        policy = text_of(app, "#policy")
        assert "NOSEND" in policy and "DOMAIN" in policy


async def test_migration_end_to_end(backend: ScriptedBackend) -> None:
    backend.step = asyncio.Event()
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("m")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, MigrateScreen)
        targets = table_rows(app, "#targets")
        assert [r[0] for r in targets] == ["lab-2", "lab-3"]  # compatible first
        assert targets[0][1] == "! allowed (warnings)"
        assert targets[1][1].startswith("✗")
        await pilot.press("down")
        assert "Refused" in text_of(app, "#checks")
        await pilot.press("enter")  # refused: stays here
        assert isinstance(app.screen, MigrateScreen)
        await pilot.press("up", "enter")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause()
        live = app.screen
        assert isinstance(live, LiveScreen)
        run = backend.started[0]
        for index in range(4):
            backend.step.set()
            while live.snapshots < index + 1:
                await pilot.pause(0.01)
        latest = run.snapshots[3]
        page_map = live.query_one(PageMap)
        assert page_map.grid.total_pages == latest.total_pages
        np.testing.assert_array_equal(page_map.grid.view(10, 4).totals,
                                      np.bincount(latest.page_states, minlength=STATE_COUNT))
        numbers = text_of(app, "#numbers")
        assert "pre-copy, pass 1" in numbers and "converging" in numbers and "%" not in numbers
        while not (isinstance(app.screen, ResultScreen) and app.screen.query("#result")):
            backend.step.set()
            await pilot.pause(0.01)
        result = text_of(app, "#result")
        assert "Migrated" in result and "exactly one runnable copy: on lab-2" in result
        assert "digests match" in result
        await pilot.press("enter")
        assert isinstance(app.screen, HostsScreen)


async def test_cancel_asks_then_rolls_back(backend: ScriptedBackend) -> None:
    backend.step = asyncio.Event()
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("m")
        await settle(app, pilot)
        await pilot.press("enter", "y")
        await pilot.pause()
        backend.step.set()
        while app.screen.snapshots < 1:  # type: ignore[attr-defined]
            await pilot.pause(0.01)
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # keep going
        assert backend.started[0].cancelled is None
        await pilot.press("c", "y")
        while not (isinstance(app.screen, ResultScreen) and app.screen.query("#result")):
            await pilot.pause(0.01)
        result = text_of(app, "#result")
        assert "Cancelled" in result and "exactly one runnable copy: on lab-1" in result


async def test_help_lists_every_binding(backend: ScriptedBackend) -> None:
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        actions = {r[1] for r in table_rows(app)}
        assert {"Open", "Re-probe", "Re-probe all", "Filter", "Migrate", "Help", "Screenshot", "Quit"} <= actions
        await pilot.press("escape")
        assert isinstance(app.screen, HostsScreen)


async def test_theme_flag_palette_and_saved_config(backend: ScriptedBackend, isolated_user_dirs: Path) -> None:
    app = SevConsoleApp(backend, theme="light")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert app.theme == "sevconsole-light"
        await pilot.press("ctrl+p", *"high-contrast", "enter")
        await pilot.pause()
        assert app.theme == "sevconsole-high-contrast"
    assert ConsoleConfig.load().theme == "high-contrast"
    again = SevConsoleApp(backend)
    async with again.run_test(size=SIZE):
        assert again.theme == "sevconsole-high-contrast"


async def test_key_remap_from_config_and_bad_entries_reported(backend: ScriptedBackend, isolated_user_dirs: Path) -> None:
    path = ConsoleConfig.path()
    path.parent.mkdir(parents=True)
    path.write_text('theme = "nope"\n[keys]\nreprobe = "f5"\nfilter = 3\n')
    probed: list[str] = []
    backend.probe_gate = probed.append
    config = ConsoleConfig.load()
    assert config.keys == {"reprobe": "f5"} and "keys.filter" in config.problems[0]
    app = SevConsoleApp(backend, config=config)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert app.theme == "sevconsole-dark"  # unknown theme: notified, default kept
        await pilot.press("f5")
        await settle(app, pilot)
        assert probed.count("lab-1") == 2


async def test_f8_saves_an_svg(backend: ScriptedBackend, tmp_path: Path) -> None:
    app = SevConsoleApp(backend, screenshot_dir=tmp_path / "shots")
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("f8")
    (svg,) = (tmp_path / "shots").glob("*.svg")
    assert "lab-1" in svg.read_text()


@pytest.mark.parametrize("size", [(80, 24), (200, 60)])
async def test_live_view_uses_the_room(backend: ScriptedBackend, size: tuple[int, int]) -> None:
    app = SevConsoleApp(backend, probe_on_start=False)
    async with app.run_test(size=size) as pilot:
        reports = backend.reports
        vm = reports["lab-1"].vms[0]
        screen = LiveScreen(vm, reports["lab-1"], reports["lab-2"], (), 300, start=False)
        await app.push_screen(screen)
        snap = sample_progress(frames=6)[3]
        screen.apply(snap)
        await pilot.pause()
        page_map = screen.query_one(PageMap)
        assert page_map.size.width >= size[0] - 60 and page_map.size.height >= (3 if size[1] < 36 else size[1] // 2)
        view = page_map.current_view()
        assert view.used == min(view.width * view.height, len(page_map.grid._counts))
        assert snap.phase is Phase.PRECOPY


async def test_theme_switch_recolours_map_and_tables(backend: ScriptedBackend) -> None:
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        dark_cell = app.screen.query_one("#hosts").get_row_at(0)[1]
        reports = backend.reports
        screen = LiveScreen(reports["lab-1"].vms[0], reports["lab-1"], reports["lab-2"], (), 300, start=False)
        await app.push_screen(screen)
        screen.apply(sample_progress(frames=6)[3])
        await pilot.pause()
        page_map = screen.query_one(PageMap)
        dark_palette = page_map._palette_key
        await pilot.press("ctrl+t")  # next theme: high-contrast
        await pilot.pause()
        page_map.render_line(0)
        assert app.theme == "sevconsole-high-contrast"
        assert page_map._palette_key != dark_palette and "#00ff00" in [c.lower() for c in page_map._palette_key]
        app.pop_screen()
        await pilot.pause()
        assert app.screen.query_one("#hosts").get_row_at(0)[1].spans != dark_cell.spans


def test_run_console_with_a_bad_lab_folder_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sevconsole.cli import main

    assert main(["--lab", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and "state folder" in err


async def test_changed_host_key_is_refused_loudly(backend: ScriptedBackend) -> None:
    from dataclasses import replace

    from sevconsole.hosts.report import HostKeyInfo

    sentence = ("lab-2 (127.0.0.1:42202) offered ssh-ed25519 SHA256:new but SHA256:old is known: "
                "refused; if the host was reinstalled, remove its line from known_hosts")
    backend.reports["lab-2"] = replace(
        backend.reports["lab-2"], capabilities=None, vms=(), errors=(sentence,),
        host_key=HostKeyInfo("[127.0.0.1]:42202", "ssh-ed25519", "SHA256:new", "changed", "SHA256:old"))
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, HostsScreen)  # no question is asked
        assert any(n.title == "Host key changed: refused" and n.message == sentence
                   for n in app._notifications)
        rows = {r[0]: r for r in table_rows(app)}
        assert rows["lab-2"][5] == sentence


def test_a_lab_that_cannot_start_is_a_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from sevconsole.tui.main import run_console

    def starter():  # type: ignore[no-untyped-def]
        raise OSError("port 42201 is in use")

    args = argparse.Namespace(inventory=None, lab=None, theme=None, guide=False, lab_starter=starter)
    assert run_console(args) == 2
    err = capsys.readouterr().err
    assert "the built-in lab did not start: port 42201 is in use" in err and "sevconsole --lab DIR" in err


async def test_same_name_twice_after_a_migration(backend: ScriptedBackend) -> None:
    """A host may hold a SENT copy (postmigrate) and a running copy of one VM: both show, the
    running one is what m migrates."""
    from dataclasses import replace

    from tests.tui.scripted import POLICY_RECOMMENDED, sample_vm

    sent = sample_vm("web", 4096, POLICY_RECOMMENDED, state=6, status="postmigrate")
    running = replace(sample_vm("web", 4096, POLICY_RECOMMENDED), pid=5001)
    backend.reports["lab-1"] = replace(backend.reports["lab-1"], vms=(sent, running))
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("m")
        await settle(app, pilot)
        assert isinstance(app.screen, MigrateScreen) and app.screen.vm.pid == 5001
        await pilot.press("escape", "enter")
        await pilot.pause()
        assert [r[:2] for r in table_rows(app, "#vms")] == [["web", "postmigrate"], ["web", "running"]]
        assert "SENT" in table_rows(app, "#vms")[0][4]
        await pilot.press("down", "m")
        await settle(app, pilot)
        assert app.screen.vm is running  # type: ignore[attr-defined]
