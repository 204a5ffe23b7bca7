"""Faults of hosts and links while the engine migrates a lab guest: the target or source host
process killed at a random byte of the stream, the source's QMP link dropped, the SSH transport
to the source dropped, and a guest whose policy turned NOSEND after the preflight. Each fault
fires from the stream proxy when its byte passes, so it lands mid-migration by construction."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import numpy as np
import pytest

from sevconsole.engine.checks import CheckStatus, preflight, refused
from sevconsole.engine.run import Migration
from sevconsole.hosts.discovery import endpoint_for
from sevconsole.sev.policy import PolicyFlag

from .proxy import Fault
from .rig import (
    KeepSource,
    ProxiedTarget,
    Rig,
    census,
    cleanup_vm,
    plain_proxy,
    qmp_once,
    rebind,
    run_with_fault,
    settle,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

STREAM = 16 << 20  # about the bytes of one 16 MiB guest's stream


def offsets(seed: int, k: int) -> list[int]:
    return sorted(np.random.default_rng(seed).integers(64 << 10, STREAM - (64 << 10), k).tolist())


@pytest.mark.parametrize("at", offsets(11, 2))
async def test_target_host_killed_mid_stream(rig2: Rig, at: int) -> None:
    killed: list[str] = []

    def kill() -> None:
        rig2.kill_host("lab-2")
        killed.append("lab-2")

    att, target = await run_with_fault(rig2, "web", "lab-1", "lab-2", [Fault("call", at=at, call=kill)],
                                       kind="kill-target", host_killed=lambda: killed[0] if killed else None)
    assert killed and target.proxy.fired.is_set()
    assert not att.violations and not att.mismatches, att.to_json()
    assert att.outcome.result == "failed" and [c.host for c in att.census.runnable] == ["lab-1"]
    assert att.census.runnable[0].status == "running"
    assert "lab-1" in att.outcome.message
    assert att.safe_after_s is not None and att.safe_after_s < 20


@pytest.mark.parametrize("at", offsets(12, 2))
async def test_source_host_killed_mid_stream_never_clones(rig2: Rig, at: int) -> None:
    """The guest dies with its host; the target must not run a copy it never got whole."""
    killed: list[str] = []

    def kill() -> None:
        rig2.kill_host("lab-1")
        killed.append("lab-1")

    att, target = await run_with_fault(rig2, "web", "lab-1", "lab-2", [Fault("call", at=at, call=kill)],
                                       kind="kill-source", host_killed=lambda: killed[0] if killed else None)
    assert killed and not att.violations, att.to_json()
    assert att.outcome.result == "failed"
    assert att.census.runnable == () and "lab-1" in att.census.dead_hosts
    assert "lab-1" in att.outcome.message


@pytest.mark.parametrize("how", ["qmp-link", "ssh-transport"])
async def test_source_link_dropped_mid_stream(rig2: Rig, how: str) -> None:
    """The engine loses its QMP link to the source (the bridge channel, or the whole SSH transport
    under it) mid-stream: it reconnects and ends in a verified state either way."""
    holder: dict[str, KeepSource] = {}

    def drop() -> None:
        source = holder["source"]
        if how == "qmp-link":
            for link in list(source.inner._links):
                link.bridge.channel.close()
        else:
            conn = rig2.pool.get(endpoint_for(rig2.spec("lab-1"), rig2.inventory.hosts))
            conn.transport.sock.shutdown(socket.SHUT_RDWR)

    def keep(mig: Migration, source: KeepSource, target: ProxiedTarget) -> None:
        holder["source"] = source

    att, target = await run_with_fault(rig2, "web", "lab-1", "lab-2", [Fault("call", at=4 << 20, call=drop)],
                                       kind=how, before_run=keep,
                                       plan_kw={"bandwidth_bps": 16 << 20})  # the drop lands mid-stream
    assert target.proxy.fired.is_set()
    assert not att.violations and not att.mismatches, att.to_json()
    assert any("QMP link lost" in e or "dropped" in e for e in att.outcome.errors), att.outcome.errors


async def test_policy_turned_nosend_after_preflight(rig2: Rig) -> None:
    """The plan was made on a picture of `vault` without NOSEND (stale); the firmware refuses at
    SEND_START, not one page leaves, and the sentence names NOSEND."""
    plan = rig2.plan("vault", "lab-1", "lab-2")
    stale = rebind(plan, policy=int(plan.vm.policy or 0) & ~int(PolicyFlag.NOSEND))
    checks = preflight(stale, rig2.trust)
    assert not refused(checks), [c for c in checks if c.status is CheckStatus.FAIL]
    before = (await qmp_once(plan.vm.qmp_path, "x-query-guest-digest"))["sha256"]
    source, target = KeepSource(rig2.link("lab-1")), ProxiedTarget(rig2.link("lab-2"), plain_proxy)
    outcome = await Migration(stale, source, target, checks=checks, audit_log=False).run()
    await source.close()
    await target.close()
    assert outcome.result == "failed" and "NOSEND" in outcome.message, outcome.message
    assert "POLICY_FAILURE" in outcome.message
    assert target.proxy is not None and target.proxy.trackers["out"].seen.get(3, 0) == 0  # no PRIVATE frame
    after = await settle(rig2.lab, "vault", ("lab-1", "lab-2"))
    assert [(c.host, c.digest) for c in after.runnable] == [("lab-1", before)]
    assert outcome.runnable == ("lab-1",)


async def test_guest_moves_on_after_a_rollback(rig2: Rig) -> None:
    """After a fault the source is RUNNING again (SEND_CANCEL), so the same guest migrates."""
    att, _ = await run_with_fault(rig2, "web", "lab-1", "lab-2", [Fault("cut", at=3 << 20)], kind="cut")
    assert att.outcome.result == "failed" and not att.violations
    assert await cleanup_vm(rig2, "web") == "lab-1"
    att, _ = await run_with_fault(rig2, "web", "lab-1", "lab-2", [], kind="none")
    assert att.outcome.result == "done" and not att.violations and not att.mismatches, att.to_json()
    assert [c.host for c in (await census(rig2.lab, "web")).runnable] == ["lab-2"]


async def test_console_backend_ssh_drop_ends_in_a_confirmed_state(rig2: Rig) -> None:
    """The console's own backend migrates; the source's SSH transport dies mid-stream."""
    from sevconsole.tui.live_backend import open_backend

    backend = open_backend(inventory=None, lab_dir=Path(rig2.lab.paths.root))
    try:
        src, dst = backend.probe("lab-1"), backend.probe("lab-2")
        vm = src.vm("web")
        assert vm is not None
        before = (await qmp_once(vm.qmp_path, "x-query-guest-digest"))["sha256"]
        dropped: list[bool] = []

        def watch(progress) -> None:  # type: ignore[no-untyped-def]
            if not dropped and progress.bytes_transferred > 4 << 20:
                dropped.append(True)
                backend.connection("lab-1").transport.sock.shutdown(socket.SHUT_RDWR)

        checks = backend.preflight(vm, src, dst, 300)
        result = await backend.migration(vm, src, dst, 300, checks, watch, bandwidth_bps=16 << 20).run()
    finally:
        backend.close()
    assert dropped
    after = await settle(rig2.lab, "web", ("lab-1", "lab-2"))
    assert len(after.runnable) == 1 and after.runnable[0].digest == before, after.describe()
    assert list(result.runnable) == [after.runnable[0].host], (result.runnable, after.describe())
    assert "not confirmed" not in result.message and "could not be confirmed" not in result.message, result.message


async def test_lab_workload_survives_a_huge_dirty_rate(rig2: Rig) -> None:
    path = rig2.lab.qmp_path("lab-1", "web")

    async def memory_moves(within: float) -> bool:
        first = (await qmp_once(path, "x-query-guest-digest"))["sha256"]
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # the workload ticks every 10 ms: re-read until it wrote
            if (await qmp_once(path, "x-query-guest-digest"))["sha256"] != first:
                return True
        return False

    with contextlib.suppress(Exception):  # refusing the value is a fine answer too
        await qmp_once(path, "x-lab-set", {"dirty-rate": 10**20})
    if not await memory_moves(1.0):  # the huge rate did nothing: a sane one must work again
        await qmp_once(path, "x-lab-set", {"dirty-rate": 2000})
        assert await memory_moves(5.0), "the guest stopped writing to its memory"
