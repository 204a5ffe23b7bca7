"""Replay: the runner's snapshot file read back (bounded, cut short, thinned), the scrubber's keys,
the result screen's replay tab, `sevconsole migrations show`, and the panels' empty states."""

from __future__ import annotations

import asyncio
import gzip
import html
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from sevconsole.engine import journal, replay
from sevconsole.engine.machine import Step
from sevconsole.engine.progress import Phase, SevLogEntry
from sevconsole.engine.replay import ReplayError, Tape
from sevconsole.hosts.report import Capabilities
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.screens.live import LiveScreen
from sevconsole.tui.screens.replay import ReplayApp
from sevconsole.tui.screens.result import ResultScreen
from sevconsole.tui.widgets.firmware import log_line
from sevconsole.tui.widgets.migration_view import MigrationView
from sevconsole.tui.widgets.rate_chart import RateChart
from sevconsole.tui.widgets.replay_view import ReplayView, Scrubber, default_speed
from tests.tui.scripted import ScriptedBackend, sample_progress, sample_reports


def write_tape(path: Path, snapshots: list, *, cut: int = 0) -> None:
    data = gzip.compress(replay.to_lines(snapshots))
    path.write_bytes(data[: len(data) - cut] if cut else data)


# -- the file

def test_tape_reads_back_every_snapshot(tmp_path: Path) -> None:
    snaps = sample_progress(frames=6)
    write_tape(tmp_path / "s.gz", snaps)
    tape = Tape.read(tmp_path / "s.gz", "m-1")
    assert len(tape) == len(snaps) and tape.problems == ()
    assert [f.phase for f in tape.frames] == [p.phase for p in snaps]
    middle = tape.progress(3)
    assert (middle.page_states == snaps[3].page_states).all() and middle.sev_log == snaps[3].sev_log
    assert tape.index_at(snaps[3].elapsed_s + 0.01) == 3 and tape.index_at(-1) == 0
    summary = tape.summary()
    assert summary["frames"] == 8 and summary["final_phase"] == "done" and summary["passes"] == 2
    assert [p["phase"] for p in summary["phases"]] == ["pre-copy", "stop-and-copy", "done"]
    assert summary["sev_commands"]["lab-1"]["SEND_FINISH"] == 1
    json.dumps(summary)  # JSON-safe


def test_a_file_cut_short_keeps_what_was_written(tmp_path: Path) -> None:
    """A runner killed mid-write leaves a gzip stream without its end."""
    snaps = sample_progress(frames=6)
    write_tape(tmp_path / "s.gz", snaps, cut=40)
    tape = Tape.read(tmp_path / "s.gz")
    assert 1 <= len(tape) < len(snaps) + 2
    assert tape.problems and "ends early" in tape.problems[0]


def test_no_file_bad_lines_and_nothing_to_replay(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no snapshots were recorded"):
        Tape.read(tmp_path / "missing.gz")
    lines = b'{"type": "progress", "progress": {"phase": "nonsense"}}\nnot json\n' + replay.to_lines(
        sample_progress(frames=3)[:1])
    (tmp_path / "s.gz").write_bytes(gzip.compress(lines))
    tape = Tape.read(tmp_path / "s.gz")
    assert len(tape) == 1 and len(tape.problems) == 2
    (tmp_path / "empty.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(ReplayError, match="holds no snapshot"):
        Tape.read(tmp_path / "empty.gz")
    (tmp_path / "fifo").mkdir()
    with pytest.raises(ReplayError, match="not a regular file|a folder"):
        Tape.read(tmp_path / "fifo")


def test_a_long_migration_is_thinned_not_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snaps = sample_progress(frames=24)
    monkeypatch.setattr(replay, "MEMORY_BUDGET", len(replay.to_lines(snaps)) // 3)
    write_tape(tmp_path / "s.gz", snaps)
    tape = Tape.read(tmp_path / "s.gz")
    assert tape.thinned > 0 and len(tape) + tape.thinned == len(snaps)
    phases = [f.phase for f in tape.frames]
    assert phases[0] == snaps[0].phase and phases[-1] == Phase.DONE and Phase.STOP_AND_COPY in phases


# -- the screen

async def test_scrubber_keys(tmp_path: Path) -> None:
    snaps = sample_progress(frames=6)
    app = ReplayApp("m-1", tape=Tape.from_progress(snaps, "m-1"))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        view = app.screen.query_one(ReplayView)
        await pilot.press("p")  # it opened playing: pause it
        assert not view.playing
        await pilot.press("home")
        latest = view.query_one(MigrationView).latest
        assert view.index == 0 and latest is not None and latest.elapsed_s == snaps[0].elapsed_s
        await pilot.press("right", "right")
        assert view.index == 2
        await pilot.press("left")
        assert view.index == 1
        await pilot.press("end")
        assert view.index == len(snaps) - 1 and view.query_one(MigrationView).latest.phase is Phase.DONE
        await pilot.press("shift+left")
        assert view.position == pytest.approx(snaps[-1].elapsed_s - 1.0)
        assert view.tape.times[view.index] <= view.position
        scrubber = view.query_one(Scrubber)
        speed = scrubber.speed
        await pilot.press("plus")
        assert scrubber.speed > speed
        await pilot.press("minus", "minus")
        assert scrubber.speed < speed
        # play: from where it is to the end, then it stops by itself
        for _ in range(3):
            await pilot.press("plus")
        await pilot.press("p")
        assert view.playing
        deadline = asyncio.get_running_loop().time() + 20
        while view.playing:
            assert asyncio.get_running_loop().time() < deadline, "the replay never reached its end"
            await pilot.pause(0.05)
        assert view.index == len(snaps) - 1
        assert f"{len(snaps)}/{len(snaps)}" in str(scrubber.render())


def test_a_one_second_migration_plays_for_about_ten() -> None:
    assert default_speed(1.2) == 0.1 and default_speed(40) == 4.0 and default_speed(0) == 1.0


async def test_result_screen_replays_the_migration(rome_caps: Capabilities, naples_caps: Capabilities) -> None:
    backend = ScriptedBackend(sample_reports(rome_caps, other_caps=naples_caps))
    app = SevConsoleApp(backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("m")
        while not (getattr(app.screen, "results", None) and len(app.screen.results) == 2):
            await pilot.pause(0.01)
        await pilot.press("enter", "y")
        while not (isinstance(app.screen, ResultScreen) and app.screen.tape is not None):
            await pilot.pause(0.01)
        screen = app.screen
        assert len(screen.tape) == len(backend.started[0].posted) == 14
        await pilot.press("r")
        view = screen.query_one(ReplayView)
        assert app.focused is view
        await pilot.press("home")
        assert view.query_one(MigrationView).latest.pass_number == 1
        await pilot.press("escape")  # done: back to the overview
        assert type(app.screen).__name__ == "OverviewScreen"


async def test_result_without_snapshots_says_so(rome_caps: Capabilities, naples_caps: Capabilities) -> None:
    backend = ScriptedBackend(sample_reports(rome_caps, other_caps=naples_caps))
    app = SevConsoleApp(backend, probe_on_start=False)
    last = sample_progress()[-1]
    async with app.run_test(size=(80, 24)) as pilot:
        from tests.tui.scripted import sample_result

        await app.push_screen(ResultScreen(replace(sample_result(last), migration_id="gone"), last))
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("r")
        scrubber = app.screen.query_one(Scrubber)
        assert "no replay: no snapshots were recorded for migration gone" in str(scrubber.render())
        assert app.screen.query_one(MigrationView).latest is last  # the last moment is still shown


# -- `sevconsole migrations show`

def _finished_migration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, snapshots: bool = True) -> str:
    monkeypatch.setenv("SEVCONSOLE_STATE_DIR", str(tmp_path / "state"))
    migration_id, where = journal.create({"vm": "web", "source": "lab-1", "target": "lab-2"})
    journal.Journal(where / "journal.jsonl").append(Step.PLANNED, vm="web")
    journal.Journal(where / "journal.jsonl").append(Step.DONE, outcome={"result": "done", "message": "moved"})
    if snapshots:
        write_tape(where / replay.SNAPSHOTS, sample_progress(frames=4))
    return migration_id


def test_migrations_show_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from sevconsole.cli import main

    migration_id = _finished_migration(tmp_path, monkeypatch)
    assert main(["migrations", "show", migration_id, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["id"] == migration_id and out["frames"] == 6 and out["final_phase"] == "done"
    assert out["outcome"] == {"result": "done", "message": "moved"} and out["state"] == "done"
    assert main(["migrations", "show", migration_id]) == 0  # not a terminal: the summary as text
    text = capsys.readouterr().out
    assert f"{migration_id}: web lab-1 -> lab-2, done" in text and "6 snapshots over" in text
    assert main(["migrations", "show", "no-such-id", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_migrations_show_without_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from sevconsole.cli import main

    migration_id = _finished_migration(tmp_path, monkeypatch, snapshots=False)
    assert main(["migrations", "show", migration_id]) == 1
    assert "no snapshots were recorded" in capsys.readouterr().err


# -- the first-use findings

def test_commands_known_from_counts_read_as_ran() -> None:
    line = log_line(SevLogEntry("lab-1", "PDH_CERT_EXPORT", -1)).plain
    assert line == "lab-1 PDH_CERT_EXPORT ran (status not logged)" and "0x-1" not in line


async def test_empty_states_before_the_first_bytes(rome_caps: Capabilities, naples_caps: Capabilities) -> None:
    backend = ScriptedBackend(sample_reports(rome_caps, other_caps=naples_caps))
    app = SevConsoleApp(backend, probe_on_start=False)
    async with app.run_test(size=(80, 24)) as pilot:
        reports = backend.reports
        screen = LiveScreen(reports["lab-1"].vms[0], reports["lab-1"], reports["lab-2"], (), 300, start=False)
        await app.push_screen(screen)
        first = replace(sample_progress(frames=3)[0], phase=Phase.CONNECTING, page_states=None, total_pages=0,
                        bytes_transferred=0, bytes_total=0, bytes_remaining=0, rate_history=(), events=(),
                        sev_log=(), source_fw=None, target_fw=None)
        screen.apply(first)
        await pilot.pause()
        chart = screen.query_one(RateChart)
        assert "no bytes moved yet" in str(chart.render()) and "█" not in str(chart.render())
        assert "no bytes sent yet" in str(screen.query_one("#numbers").render())
        assert "no page map yet" in "".join(s.text for s in screen.query_one("PageMap").render_lines(
            screen.query_one("PageMap").region.reset_offset))
        assert screen.query_one("#events-empty").display
        assert "firmware not read yet" in str(screen.query_one("#machines").render())
        screen.apply(sample_progress(frames=3)[1])
        await pilot.pause()
        assert "█" in str(screen.query_one(RateChart).render()) and not screen.query_one("#events-empty").display


def svg_lines(svg: str) -> list[str]:
    """The screenshot's text as a reader takes it apart: each run of one style on its own, trimmed,
    joined per line (a style change beside a space then loses the space)."""
    lines: dict[str, list[str]] = {}
    for y, text in re.findall(r'<text[^>]* y="([0-9.]+)"[^>]*>([^<]*)</text>', svg):
        lines.setdefault(y, []).append(html.unescape(text).replace("\xa0", " ").strip())
    return ["".join(parts) for _, parts in sorted(lines.items(), key=lambda kv: float(kv[0]))]


async def test_no_space_is_lost_between_styles(rome_caps: Capabilities, naples_caps: Capabilities) -> None:
    """The issue read `weblab-1 → lab-2`, `sourcelab-1 handle 1` and `sevconsole— migrating web`."""
    backend = ScriptedBackend(sample_reports(rome_caps, other_caps=naples_caps))
    app = SevConsoleApp(backend, probe_on_start=False)
    async with app.run_test(size=(100, 40)) as pilot:
        reports = backend.reports
        screen = LiveScreen(reports["lab-1"].vms[0], reports["lab-1"], reports["lab-2"], (), 300, start=False)
        await app.push_screen(screen)
        screen.apply(sample_progress(frames=6)[3])
        await pilot.pause()
        text = "\n".join(svg_lines(app.export_screenshot()))
    assert "sevconsole — migrating web" in text
    assert "web: lab-1 → lab-2, pre-copy" in text
    assert "source: lab-1, handle 1" in text and "target: lab-2, handle 1" in text
