"""The fleet overview (the start screen) and the attention list: what they show, filter, sort and
open, on a scripted fleet; the engine's fleet-wide attention items; the migrations list's sources."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sevconsole.engine import attention, journal
from sevconsole.engine.machine import Step
from sevconsole.hosts.report import Capabilities, HostKeyInfo, HostReport
from sevconsole.tui import fleet
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.screens.attention import AttentionScreen
from sevconsole.tui.screens.host import HostScreen
from sevconsole.tui.screens.hosts import HostsScreen
from sevconsole.tui.screens.migrate import MigrateScreen
from sevconsole.tui.screens.overview import HistoryListed, OverviewScreen
from sevconsole.tui.screens.replay import ReplayScreen
from sevconsole.tui.widgets.line_table import LineTable
from sevconsole.tui.widgets.replay_view import ReplayView
from tests.tui.scripted import (
    POLICY_NOSEND,
    POLICY_RECOMMENDED,
    ScriptedBackend,
    sample_progress,
    sample_reports,
    sample_vm,
)

SIZE = (80, 24)


def rows(app: SevConsoleApp, selector: str) -> list[list[str]]:
    table: Any = app.screen.query_one(selector)  # a DataTable, or the VM list's LineTable
    return [[str(getattr(c, "plain", c)) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def settle(app: SevConsoleApp, pilot) -> None:  # type: ignore[no-untyped-def]
    """Probes, attention and the journal read done, and their messages handled."""
    await app.workers.wait_for_complete()
    await pilot.pause()
    screen = app.screen
    while isinstance(screen, OverviewScreen) and not screen.history_loaded:
        await pilot.pause(0.01)
    await app.workers.wait_for_complete()
    await pilot.pause()


DONE_OUTCOME = {"result": "done", "message": "moved"}


def journal_entry(mid: str, vm: str, source: str, target: str, started: float, *,
                  step: Step | None = Step.DONE, runner_alive: bool = False,
                  outcome: dict[str, Any] | None = DONE_OUTCOME) -> journal.Entry:
    """A real engine.journal.Entry, its journal one record (`step` at `started`, with `outcome`)."""
    records = () if step is None else (
        journal.Record(1, started, step, {"outcome": dict(outcome)} if outcome is not None else {}),)
    return journal.Entry(mid, Path("/nonexistent") / mid, {"vm": vm, "source": source, "target": target,
                                                           "created": started},
                         journal.JournalRead(records), runner_alive)


def fleet_backend(rome: Capabilities, naples: Capabilities) -> ScriptedBackend:
    """lab-1: web (4 GiB) and vault (NOSEND, 2 GiB); lab-2: db (8 GiB) and a paused cache (1 GiB)."""
    reports = sample_reports(rome, other_caps=naples)
    reports["lab-2"] = replace(reports["lab-2"], vms=(
        replace(sample_vm("db", 8192, POLICY_RECOMMENDED), pid=7001),
        replace(sample_vm("cache", 1024, None, status="paused"), pid=7002)))
    return ScriptedBackend(reports)


@pytest.fixture
def backend(rome_caps: Capabilities, naples_caps: Capabilities) -> ScriptedBackend:
    return fleet_backend(rome_caps, naples_caps)


async def test_every_vm_of_the_fleet_sorted_and_filtered(backend: ScriptedBackend) -> None:
    app = SevConsoleApp(backend)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, OverviewScreen)
        assert [(r[0], r[1]) for r in rows(app, "#ov-vms")] == [
            ("web", "lab-1"), ("vault", "lab-1"), ("db", "lab-2"), ("cache", "lab-2")]
        migratable = {r[0]: r[3] for r in rows(app, "#ov-vms")}
        assert migratable == {"web": "yes", "vault": "no: NOSEND", "db": "yes", "cache": "yes (plain)"}
        await pilot.press("2")  # the VM panel
        order = []
        for _ in fleet.SORTS:
            await pilot.press("s")
            order.append((app.screen.sort_key, [r[0] for r in rows(app, "#ov-vms")]))
        assert order == [("state", ["db", "vault", "web", "cache"]),  # running before paused
                         ("policy", ["vault", "db", "web", "cache"]),  # 0x0B, 0x33, 0x33, then plain
                         ("memory", ["db", "web", "vault", "cache"]),
                         ("host", ["web", "vault", "db", "cache"])]
        await pilot.press("slash", *"lab-2")
        assert [r[0] for r in rows(app, "#ov-vms")] == ["db", "cache"]
        assert [r[0] for r in rows(app, "#hosts")] == ["lab-2"]
        assert "2 of 4" in str(app.screen.query_one("#ov-vms-box").border_subtitle)
        await pilot.press("enter", "2", "escape")  # keep the filter, back to the VMs, clear it
        assert len(rows(app, "#ov-vms")) == 4
        await pilot.press("slash", *"nothing-like-this")
        assert not app.screen.query_one("#ov-vms").display
        assert "No VM matches" in str(app.screen.query_one("#ov-vms-empty").render())


async def test_enter_and_m_follow_the_focused_panel(backend: ScriptedBackend) -> None:
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("enter")  # the hosts panel has the focus first: lab-1, as the hosts list did
        assert isinstance(app.screen, HostScreen) and app.screen.host_name == "lab-1"
        await pilot.press("escape", "2", "down", "down", "enter")  # db on lab-2
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, HostScreen) and screen.host_name == "lab-2"
        assert screen.selected_vm() is not None and screen.selected_vm().name == "db"
        await pilot.press("escape", "m")
        await app.workers.wait_for_complete()
        assert isinstance(app.screen, MigrateScreen) and app.screen.vm_name == "db"
        assert app.screen.source_name == "lab-2"
        await pilot.press("escape", "H")
        assert type(app.screen) is HostsScreen
        assert app.screen.query_one("#hosts-detail-box").border_title == "lab-1"  # its first row, in full
        assert "vault running" in str(app.screen.query_one("#hosts-detail").render())
        await pilot.press("escape")
        assert isinstance(app.screen, OverviewScreen)


async def test_layout_follows_the_rows_not_the_screen(backend: ScriptedBackend) -> None:
    """The issue's hosts list at 120x40 was four rows and thirty empty lines."""
    app = SevConsoleApp(backend)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        screen = app.screen
        hosts_box = screen.query_one("#ov-hosts-box").region
        vms_box = screen.query_one("#ov-vms-box").region
        assert hosts_box.height == 3 + 3  # three hosts, the header, the border
        assert vms_box.y == hosts_box.bottom and vms_box.bottom >= 40 - 2  # the VMs take the rest
        assert screen.query_one("#ov-vm-detail").display  # tall: the highlighted VM's policy
        right = screen.query_one("#ov-migrations-box").region
        assert right.x >= vms_box.right  # wide: attention and migrations in a column beside
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        await pilot.pause()
        for box in ("#ov-hosts-box", "#ov-vms-box", "#ov-attention-box", "#ov-migrations-box"):
            region = screen.query_one(box).region
            assert region.height >= 3 and region.bottom <= 23, (box, region)


async def test_attention_panel_and_list(backend: ScriptedBackend) -> None:
    stale = attention.Attention("web", "a stale copy stays on lab-2 (postmigrate) beside the copy running on lab-1",
                                (attention.CopySeen("lab-2", 4016, "postmigrate", 6),),
                                attention.SafeAction(attention.Fix.STOP, "stop the stale copy on lab-2 (pid 4016)",
                                                     host="lab-2", pid=4016), kind="stale-copy", host="lab-2")
    down = attention.Attention("", "lab-3 cannot be reached: connection refused", (), kind="host-down", host="lab-3")
    backend.attention_items = [down, stale]
    app = SevConsoleApp(backend)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        panel = rows(app, "#ov-attention")
        assert [r[0] for r in panel] == ["lab-3 (host down)", "web (stale copy)"]
        assert "2 need attention" in str(app.screen.query_one("#ov-summary").render())
        await pilot.press("3", "down", "enter")
        screen = app.screen
        assert isinstance(screen, AttentionScreen)
        assert screen.query_one(LineTable).cursor_row == 1
        detail = str(screen.query_one("#attention-detail").render())
        assert "copy on lab-2: pid 4016, postmigrate" in detail and "Enter: stop the stale copy" in detail
        await pilot.press("up")
        assert "No safe action" in str(screen.query_one("#attention-detail").render())


async def test_nothing_needs_attention_is_said(backend: ScriptedBackend) -> None:
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert "Nothing needs attention" in str(app.screen.query_one("#ov-attention-empty").render())
        assert "No migration yet" in str(app.screen.query_one("#ov-migrations-empty").render())
        await pilot.press("A")
        assert "Nothing needs attention" in str(app.screen.query_one("#attention-empty").render())


@pytest.mark.parametrize("gone", ["#ov-summary", "#ov-attention-box", "#ov-migrations", "#ov-vm-detail"])
async def test_answers_arriving_as_the_panels_are_taken_down_are_dropped(backend: ScriptedBackend, gone: str) -> None:
    """An answer (a probe, the attention list, the journal) may arrive while the app exits and its
    panels are removed, in whatever order: the overview drops it instead of failing on a lookup."""
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, OverviewScreen) and screen.ready
        await screen.query_one(gone).remove()
        assert not screen.ready
        screen.attention_updated()
        screen.report_updated(app.reports["lab-1"])
        screen.refresh_cells()
        screen.apply_heights()
        screen.on_history_listed(HistoryListed((), ({"vm": "web", "source": "lab-1", "target": "lab-2",
                                                     "outcome": "done", "time": "2026-01-01T00:00:00+00:00"},)))
        await pilot.pause()
        assert screen.migration_rows == []  # dropped, not drawn half


async def test_migrations_in_flight_recent_and_older_from_the_audit_log(backend: ScriptedBackend) -> None:
    now = time.time()
    backend.entries = [
        journal_entry("m-3", "db", "lab-2", "lab-1", now - 10, step=Step.STREAMING, runner_alive=True, outcome=None),
        journal_entry("m-2", "web", "lab-1", "lab-2", now - 600),
        journal_entry("m-1", "vault", "lab-1", "lab-3", now - 900, step=Step.REFUSED,
                  outcome={"result": "refused", "message": "NOSEND"}),
    ]
    backend.audit = [
        {"time": "2020-01-02T03:04:05+00:00", "vm": "old", "source": "lab-1", "target": "lab-2", "outcome": "done"},
        {"time": "2020-01-03T03:04:05+00:00", "event": "recover", "vm": "x"},  # not a migration
    ]
    backend.tapes["m-2"] = sample_progress(frames=6)
    app = SevConsoleApp(backend)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        shown = [(r[1], r[3]) for r in rows(app, "#ov-migrations")]
        assert shown == [("db", "in flight"), ("web", "done"), ("vault", "refused"), ("old", "done")]
        assert "1 migrating" in str(app.screen.query_one("#ov-summary").render())
        await pilot.press("4", "down", "enter")  # web: finished, its snapshots replay
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ReplayScreen)
        view = screen.query_one(ReplayView)
        assert view.tape is not None and len(view.tape) == 8 and view.index == 7
        await pilot.press("escape", "down", "down", "enter")  # old: the audit log only
        assert isinstance(app.screen, OverviewScreen)
        assert any("audit log only" in str(n.message) for n in app._notifications)


# -- the engine's fleet-wide items

def _report(name: str, *vms: Any, reachable: bool = True, **kw: Any) -> HostReport:
    return HostReport(name=name, address="127.0.0.1", port=1, reachable=reachable, vms=vms, **kw)


def test_fleet_items_hosts_keys_monitors_and_stale_copies() -> None:
    running = sample_vm("web", 4096, POLICY_RECOMMENDED)
    sent = replace(sample_vm("web", 4096, POLICY_RECOMMENDED, state=6, status="postmigrate"), pid=9)
    held = replace(sample_vm("db", 1024, POLICY_RECOMMENDED), status=None, firmware_guest_state=None,
                   errors=("lab-2: QMP socket /run/db.qmp sent no greeting within 10 s; another client may "
                           "hold it (QEMU serves one QMP client at a time).",))
    reports = [
        _report("lab-1", running),
        _report("lab-2", sent, held),
        _report("lab-3", reachable=False, errors=("lab-3: connection refused",)),
        _report("lab-4", reachable=False, errors=("changed",), host_key=HostKeyInfo(
            "[127.0.0.1]:4", "ssh-ed25519", "SHA256:new", "changed", "SHA256:old")),
    ]
    plain = attention.find(reports)
    assert plain == []  # without fleet=True nothing new: discover's list is unchanged, and a held
    # monitor is not taken for a copy that cannot run
    items = {(i.kind, i.host): i for i in attention.find(reports, fleet=True)}
    assert set(items) == {("host-down", "lab-3"), ("host-key-changed", "lab-4"), ("monitor-held", "lab-2"),
                          ("stale-copy", "lab-2")}
    assert "SHA256:new" in items[("host-key-changed", "lab-4")].problem
    stop = items[("stale-copy", "lab-2")].action
    assert stop is not None and stop.fix == attention.Fix.STOP and stop.pid == 9 and stop.host == "lab-2"
    assert items[("monitor-held", "lab-2")].vm == "db" and items[("monitor-held", "lab-2")].action is None


def test_a_migration_in_flight_owns_its_copies() -> None:
    sent = replace(sample_vm("web", 4096, POLICY_RECOMMENDED, state=6, status="postmigrate"), pid=9)
    reports = [_report("lab-1", sent), _report("lab-2", sample_vm("web", 4096, POLICY_RECOMMENDED))]
    flying = journal_entry("m-1", "web", "lab-1", "lab-2", 0.0, step=Step.STREAMING, runner_alive=True)
    assert [i.kind for i in attention.find(reports, fleet=True)] == ["stale-copy"]
    assert attention.find(reports, [flying], fleet=True) == []


def test_migratable_in_words() -> None:
    web = sample_vm("web", 4096, POLICY_RECOMMENDED)
    assert fleet.migratable(web) == ("yes", "$success")
    assert fleet.migratable(sample_vm("vault", 1, POLICY_NOSEND))[0] == "no: NOSEND"
    assert fleet.migratable(replace(web, migration_blocker="SEV: Migration is not implemented"))[0] == "no: blocked"
    assert fleet.migratable(sample_vm("plain", 1, None))[0] == "yes (plain)"
    assert fleet.migratable(replace(web, stale="stale copy of VM web"))[0] == "no: stale copy"


def test_audit_tail_reads_the_last_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    lines = [f'{{"seq": {i}, "vm": "vm-{i}", "time": "2026-01-01T00:00:00+00:00"}}' for i in range(5000)]
    log.write_text("\n".join(lines) + "\nnot json\n")
    tail = fleet.read_audit_tail(log, 3)
    assert [r["seq"] for r in tail] == [4997, 4998, 4999]
    assert fleet.read_audit_tail(tmp_path / "missing.jsonl", 3) == []


async def test_migrations_list_replays_a_finished_one(backend: ScriptedBackend) -> None:
    backend.entries = [journal_entry("m-2", "web", "lab-1", "lab-2", time.time() - 60)]
    backend.tapes["m-2"] = sample_progress(frames=3)
    app = SevConsoleApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("M")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, ReplayScreen) and screen.migration_id == "m-2"
        assert screen.query_one(ReplayView).tape is not None
