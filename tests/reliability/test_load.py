"""Load: 8 SEV migrations at once across 6 lab hosts, each verified by the guest's digest, while
discovery probes all 64 hosts of the lab; and the console answering a key in under 100 ms while
it runs a full-speed lab migration itself."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sevconsole.engine.checks import CheckStatus, preflight, refused
from sevconsole.engine.run import Migration
from sevconsole.hosts.discovery import discover
from sevconsole.lab.layout import DB_POLICY, RECENT_API, HostSpec, VmSpec, default_layout

from .rig import Rig, census, qmp_once

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MOVERS = 6  # hosts whose guests migrate
HOSTS = 64


def load_layout() -> tuple[HostSpec, ...]:
    """6 hosts with two 16 MiB SEV guests each, then 58 small hosts (one 1 MiB guest) to discover.
    One OCA domain: every DOMAIN guest may move between any two of them."""
    specs = []
    for i in range(1, HOSTS + 1):
        if i <= MOVERS:
            vms = tuple(VmSpec(f"m-{i}-{k}", True, DB_POLICY, mem_mib=16) for k in (1, 2))
        else:
            vms = (VmSpec(f"s-{i}", True, DB_POLICY, mem_mib=1),)
        specs.append(HostSpec(f"lab-{i}", RECENT_API, "a", vms))
    return tuple(specs)


@pytest.fixture(scope="module")
def big_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig.start(tmp_path_factory.mktemp("rig64"), layout=load_layout(), timeout=240)
    try:
        yield rig
    finally:
        rig.close()


async def test_eight_concurrent_migrations_while_64_hosts_are_discovered(big_rig: Rig) -> None:
    rig = big_rig
    # host i sends its first guest to host i+1, and hosts 1 and 2 their second to hosts 4 and 5
    moves = [(f"m-{i}-1", f"lab-{i}", f"lab-{i % MOVERS + 1}") for i in range(1, MOVERS + 1)]
    moves += [("m-1-2", "lab-1", "lab-4"), ("m-2-2", "lab-2", "lab-5")]
    assert len(moves) == 8
    plans, before = [], {}
    for vm, src, dst in moves:
        plan = rig.plan(vm, src, dst)
        checks = preflight(plan, rig.trust)
        assert not refused(checks), [c for c in checks if c.status is CheckStatus.FAIL]
        plans.append((plan, checks))
        before[vm] = (await qmp_once(plan.vm.qmp_path, "x-query-guest-digest"))["sha256"]

    async def one(plan, checks):  # type: ignore[no-untyped-def]
        src, dst = rig.link(plan.source.name), rig.link(plan.target.name)
        try:
            return await Migration(plan, src, dst, checks=checks, audit_log=False, poll_interval_s=0.1).run()
        finally:
            await src.close()
            await dst.close()

    specs = list(rig.inventory.hosts)
    assert len(specs) == HOSTS
    t0 = time.monotonic()
    # discovery runs in its own threads (a fresh pool), as the console's worker would
    discovery = asyncio.create_task(asyncio.to_thread(_discover_all, rig, specs))
    outcomes = await asyncio.gather(*(one(p, c) for p, c in plans))
    migrations_s = time.monotonic() - t0
    reports, discovery_s = await discovery
    for (vm, _src, dst), outcome in zip(moves, outcomes, strict=True):
        assert outcome.result == "done", (vm, outcome.message, outcome.errors)
        assert outcome.runnable == (dst,)
    for vm, src, dst in moves:
        c = await census(rig.lab, vm, (src, dst))
        assert [(x.host, x.digest) for x in c.runnable] == [(dst, before[vm])], c.describe()
    assert len(reports) == HOSTS
    bad = [(r.name, r.error) for r in reports if not r.reachable]
    assert not bad, bad
    assert all(r.capabilities is not None and r.capabilities.chain_report.ok for r in reports)
    print(f"\n8 migrations in {migrations_s:.1f} s; discovery of {HOSTS} hosts in {discovery_s:.1f} s")


def _discover_all(rig: Rig, specs: list) -> tuple[list, float]:  # type: ignore[type-arg]
    t0 = time.monotonic()
    with rig.options.pool() as pool:
        reports = discover(specs, rig.options, pool=pool)
    return reports, time.monotonic() - t0


@pytest.mark.alone  # key latencies, with both cores on this test's migration
async def test_console_answers_keys_during_a_full_speed_migration(tmp_path: Path) -> None:
    """The console itself migrates `web` (256 MiB, no bandwidth cap) on a lab; meanwhile the
    Firmware/Events tab keys are pressed and each answer (the tab switched) is timed. The lab's
    other guests only sit there: 8 MiB each (filling 256 MiB for each of them took 4 s)."""
    from textual import events
    from textual.widgets import TabbedContent

    from sevconsole.lab import Lab
    from sevconsole.tui.app import SevConsoleApp
    from sevconsole.tui.live_backend import open_backend
    from sevconsole.tui.screens.live import LiveScreen
    from sevconsole.tui.screens.migrate import MigrateScreen
    from sevconsole.tui.screens.result import ResultScreen

    specs = default_layout(3, mem_mib=8)
    web = replace(specs[0].vms[0], mem_mib=256)
    assert web.name == "web"
    layout = (replace(specs[0], vms=(web, *specs[0].vms[1:])), *specs[1:])
    with Lab.start(tmp_path / "lab", layout=layout) as lab:
        backend = open_backend(inventory=None, lab_dir=Path(lab.paths.root))
        try:
            app = SevConsoleApp(backend)
            async with app.run_test(size=(100, 30)) as pilot:
                async def until(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
                    deadline = time.monotonic() + timeout
                    while not cond():
                        assert time.monotonic() < deadline, "condition not met"
                        await pilot.pause(0.005)

                await until(lambda: len(app.reports) == 3)
                await pilot.press("m")
                await until(lambda: isinstance(app.screen, MigrateScreen) and len(app.screen.results) == 2)
                await pilot.press("enter", "y")
                await until(lambda: isinstance(app.screen, LiveScreen))
                live = app.screen
                await until(lambda: live.snapshots > 0 or not isinstance(app.screen, LiveScreen))
                latencies: list[float] = []
                keys = ("f", "e")
                while isinstance(app.screen, LiveScreen) and len(latencies) < 40:
                    key = keys[len(latencies) % 2]
                    want = "tab-firmware" if key == "f" else "tab-events"
                    tabs = live.query_one(TabbedContent)
                    # The key arrives as a terminal's would (the driver's queue); Pilot.press would
                    # also wait for every widget to go idle, which is not what a user waits for.
                    t0 = time.monotonic()
                    event = events.Key(key, key)
                    event.set_sender(app)
                    app._driver.send_message(event)  # type: ignore[union-attr]
                    while tabs.active != want and isinstance(app.screen, LiveScreen):
                        assert time.monotonic() - t0 < 5, f"key {key!r} not answered in 5 s"
                        await asyncio.sleep(0.001)
                    if isinstance(app.screen, LiveScreen):
                        latencies.append(time.monotonic() - t0)
                    await asyncio.sleep(0.15)  # a fast typist's pace: each tab switch gets drawn before the next key
                during = live.snapshots
                await until(lambda: isinstance(app.screen, ResultScreen), 120)
                result = app.screen.result
                await pilot.pause()
        finally:
            backend.close()
    assert result.result == "done", result.message
    assert len(latencies) >= 5, f"the migration ended before keys could be timed ({latencies})"
    assert during > 0
    p95 = sorted(latencies)[int(len(latencies) * 0.95) - 1]
    print(f"\nkey latency during migration: n={len(latencies)} median "
          f"{statistics.median(latencies) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    # 95% of keys within 100 ms while both cores carry a full-speed migration; the worst key is
    # printed above (on a 2-core machine it can reach ~130 ms when a GC or an SSH pump thread
    # holds the interpreter), and is not hidden behind an expected failure.
    assert statistics.median(latencies) < 0.100, latencies
    assert p95 < 0.100, latencies
