"""The engine end to end on real QEMU (TCG) over loopback: plain migration, cancel, target
killed, source QMP link dropped, stall. Each ends with exactly one runnable copy."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest
from qemu.qmp import QMPClient

from sevconsole.engine import audit
from sevconsole.engine.checks import preflight, refused
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.progress import Phase, Progress
from sevconsole.engine.run import Migration
from sevconsole.paths import audit_log_file
from tests.engine.conftest import QmpRelay, plain_reports

pytestmark = [pytest.mark.needs_qemu, pytest.mark.timeout(60)]


async def _status(path: str) -> str:
    client = QMPClient("check")
    await client.connect(path)
    try:
        return str((await client.execute("query-status"))["status"])
    finally:
        await client.disconnect()


def _plan(vm, **kw) -> MigrationPlan:
    src, dst = plain_reports(vm)
    return MigrationPlan(vm=vm, source=src, target=dst, **kw)


async def test_plain_migration_completes(guests, local_hosts) -> None:
    vm = await guests.start("web")
    plan = _plan(vm, downtime_limit_ms=300)
    checks = preflight(plan)
    assert not refused(checks), checks
    seen: list[Progress] = []
    mig = Migration(plan, *local_hosts, checks=checks, on_progress=seen.append, poll_interval_s=0.05)
    outcome = await mig.run()
    assert outcome.result == "done", outcome
    assert outcome.runnable == ("dst",) and outcome.one_copy
    assert outcome.target_status == "running"
    assert outcome.source_status == "postmigrate"
    # the stopped source QEMU is retired (quit), so no stale copy is left behind
    assert await asyncio.to_thread(guests.procs[-1].wait, 10) == 0 and "QEMU quit" in outcome.message
    assert outcome.bytes_transferred > 0
    phases = [p.phase for p in seen]
    assert phases[0] is Phase.CONNECTING and phases[-1] is Phase.DONE
    sent = [p.bytes_transferred for p in seen]
    assert sent == sorted(sent)
    for p in seen:
        line = json.dumps(p.to_json())
        assert json.loads(line)["vm"] == "web"
    entries = [json.loads(line) for line in audit_log_file().read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["outcome"] == "done" and entries[0]["vm"] == "web"
    assert entries[0]["bytes"] == outcome.bytes_transferred and audit.verify(audit_log_file()).ok
    last = seen[-1]
    assert last.bytes_total >= 64 * 1024 * 1024 and not last.page_map_exact  # RAM plus ROMs
    assert last.page_states is not None and len(last.page_states) == last.total_pages


async def test_cancel_mid_way_leaves_source_running(guests, local_hosts) -> None:
    vm = await guests.start("web")
    plan = _plan(vm, bandwidth_bps=100_000)
    mig: Migration

    def watch(p: Progress) -> None:
        if p.phase is Phase.PRECOPY and p.bytes_transferred > 0:
            mig.cancel()

    mig = Migration(plan, *local_hosts, on_progress=watch, poll_interval_s=0.05)
    outcome = await mig.run()
    assert outcome.result == "cancelled", outcome
    assert outcome.runnable == ("src",) and outcome.one_copy
    assert outcome.progress.phase is Phase.CANCELLED
    assert await _status(vm.qmp_path) == "running"
    assert local_hosts[1].started() == []
    assert 0 < outcome.bytes_transferred < 64 * 1024 * 1024


async def test_target_killed_mid_way(guests, local_hosts) -> None:
    vm = await guests.start("web")
    plan = _plan(vm, bandwidth_bps=100_000)
    killed: list[int] = []

    def watch(p: Progress) -> None:
        if p.phase is Phase.PRECOPY and p.bytes_transferred > 0 and not killed:
            for pid in local_hosts[1].started():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    outcome = await Migration(plan, *local_hosts, on_progress=watch, poll_interval_s=0.05).run()
    assert killed, outcome
    assert outcome.result == "failed", outcome
    assert outcome.runnable == ("src",)
    assert outcome.progress.phase is Phase.FAILED and outcome.errors
    assert await _status(vm.qmp_path) == "running"


@pytest.mark.parametrize("comes_back", [True, False], ids=["reconnects", "stays-down"])
async def test_source_qmp_link_dropped(guests, local_hosts, relay_factory, tmp_path, comes_back) -> None:
    vm = await guests.start("web")
    relay = await QmpRelay(vm.qmp_path, tmp_path / "relay.qmp").start()
    relay_factory.append(relay)
    vm_via_relay = type(vm)(**{**vm.__dict__, "qmp_path": str(relay.path)})
    plan = _plan(vm_via_relay, bandwidth_bps=100_000)

    def watch(p: Progress) -> None:
        if p.phase is Phase.PRECOPY and p.bytes_transferred > 0 and relay.connections == 1:
            relay.refuse = not comes_back
            relay.cut()
            relay.connections += 1  # cut once

    outcome = await Migration(plan, *local_hosts, on_progress=watch, poll_interval_s=0.05).run()
    assert outcome.result == "failed", outcome
    assert any("QMP link lost" in e for e in outcome.errors), outcome
    assert outcome.runnable == ("src",)
    assert local_hosts[1].started() == []
    # With the link back, the engine rolled back itself; without it, the source QEMU kept the
    # guest when the stream broke. Either way it runs on the source.
    deadline = asyncio.get_running_loop().time() + 10
    while (state := await _status(vm.qmp_path)) != "running":
        assert asyncio.get_running_loop().time() < deadline, state
        await asyncio.sleep(0.05)


async def test_stall_warns_then_cancels(guests, local_hosts) -> None:
    """A throttled stream that then freezes (the target stops reading: SIGSTOP) moves no byte:
    the engine warns, then asks the stall callback, which says cancel."""
    vm = await guests.start("web", random_memory=True)
    plan = _plan(vm, bandwidth_bps=20_000_000, stall_warn_s=0.5, stall_timeout_s=1.5)
    asked: list[Progress] = []
    frozen: list[int] = []

    def watch(p: Progress) -> None:
        if p.phase is Phase.PRECOPY and p.bytes_transferred > 0 and not frozen:
            frozen.extend(local_hosts[1].started())
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)

    def on_stall(p: Progress) -> bool:
        asked.append(p)
        for pid in frozen:  # let the target die of the cancelled stream rather than hang
            os.kill(pid, signal.SIGCONT)
        return True

    seen: list[Progress] = []

    def record(p: Progress) -> None:
        seen.append(p)
        watch(p)

    outcome = await Migration(plan, *local_hosts, on_progress=record, on_stall=on_stall,
                              poll_interval_s=0.05).run()
    assert frozen, outcome
    assert len(asked) == 1 and asked[0].extra.get("stalled") is True
    warned = [p for p in seen if p.extra.get("stalled")]
    assert warned and any(e.startswith("stalled: no byte moved") for e in warned[0].events)
    assert warned[-1].extra["stalled_for_s"] >= 1.2
    assert outcome.result == "cancelled", outcome
    assert "stalled" in outcome.message
    assert outcome.runnable == ("src",)
    assert 0 < outcome.bytes_transferred < 64 * 1024 * 1024
    assert await _status(vm.qmp_path) == "running"
    assert local_hosts[1].started() == []


async def test_polls_never_overlap_and_keep_their_cadence(guests, local_hosts) -> None:
    """Every QMP command of the run on the source is timed: never two at once, and the
    query-migrate polls come at the set cadence (events may add one early, never a burst)."""
    vm = await guests.start("web")
    plan = _plan(vm, bandwidth_bps=300_000)
    source, target = local_hosts
    calls: list[tuple[str, float, float]] = []
    in_flight = [0, 0]  # now, most

    class CountingHost(type(source)):  # type: ignore[misc]
        async def open_qmp(self, path: str):
            client = await super().open_qmp(path)
            execute = client.execute
            loop = asyncio.get_running_loop()

            async def timed(cmd, args=None):
                in_flight[0] += 1
                in_flight[1] = max(in_flight[1], in_flight[0])
                t0 = loop.time()
                try:
                    return await execute(cmd, args)
                finally:
                    in_flight[0] -= 1
                    calls.append((cmd, t0, loop.time()))

            client.execute = timed
            return client

    counting = CountingHost("src", run_dir=guests.run_dir)
    outcome = await Migration(plan, counting, target, poll_interval_s=0.1).run()
    assert outcome.result == "done", outcome
    assert in_flight[1] == 1
    polls = [t0 for cmd, t0, _ in calls if cmd == "query-migrate"]
    gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
    assert len(polls) >= 10, polls
    assert sum(1 for g in gaps if g < 0.05) <= 4  # early reads only on the few MIGRATION events
    assert max(gaps) < 1.0  # 0.1 s cadence; slack for a loaded machine


async def test_a_failing_watcher_does_not_strand_the_guest(guests, local_hosts) -> None:
    vm = await guests.start("web")
    calls = []

    def broken(p: Progress) -> None:
        calls.append(p)
        raise RuntimeError("widget gone")

    outcome = await Migration(_plan(vm), *local_hosts, on_progress=broken, poll_interval_s=0.05).run()
    assert outcome.result == "done" and outcome.runnable == ("dst",)
    assert len(calls) > 2 and any("progress watcher failed" in e for e in outcome.progress.events)


async def test_paused_guest_arrives_paused_as_the_one_copy(guests, local_hosts) -> None:
    vm = await guests.start("web")
    client = QMPClient("pause")
    await client.connect(vm.qmp_path)
    await client.execute("stop")
    await client.disconnect()
    outcome = await Migration(_plan(vm), *local_hosts, poll_interval_s=0.05).run()
    assert outcome.result == "done", outcome
    assert outcome.target_status == "paused" and outcome.runnable == ("dst",)
    assert "paused, as it was" in outcome.message
    assert await _status(outcome.target_qmp) == "paused"


async def test_target_dies_right_after_the_stream_ends(guests, local_hosts) -> None:
    """QEMU's source says "completed" once its last bytes are written; if the target dies then,
    the source still holds the whole guest: the engine resumes it there (one copy)."""
    vm = await guests.start("web")
    mig: Migration
    killed: list[int] = []

    def watch(p: Progress) -> None:
        if p.phase is Phase.FINISHING and not killed and mig.incoming is not None:
            killed.append(mig.incoming.pid)
            os.kill(mig.incoming.pid, signal.SIGKILL)

    mig = Migration(_plan(vm), *local_hosts, on_progress=watch, poll_interval_s=0.05)
    outcome = await mig.run()
    assert killed and outcome.result == "failed", outcome
    assert "did not take the guest" in outcome.message
    assert outcome.runnable == ("src",) and outcome.source_status == "running"
    assert await _status(vm.qmp_path) == "running"
