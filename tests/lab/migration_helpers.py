"""Driving a lab migration through QMP (qemu.qmp) and the SSH helper, as the console does."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from qemu.qmp import EventListener, QMPClient

from sevconsole.lab import Lab

from .conftest import helper

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Pair:
    src: QMPClient
    tgt: QMPClient
    src_events: EventListener
    tgt_events: EventListener
    port: int
    incoming: dict[str, Any]

    async def close(self) -> None:
        for client in (self.src, self.tgt):
            with contextlib.suppress(Exception):
                await client.disconnect()


async def connect(path: str, name: str = "test") -> QMPClient:
    client = QMPClient(name)
    await client.connect(path)
    return client


async def prepare(lab: Lab, vm: str, src_host: str = "lab-1", dst_host: str = "lab-2", *,
                  params: dict[str, Any] | None = None, pause_target: bool = True, events: bool = True) -> Pair:
    """Starts the incoming VM on dst over SSH, hands the target's PDH and chains to the source,
    and opens the target's listener, exactly in the console's order."""
    probe = helper(lab, src_host, "probe")
    source = next(v for v in probe["vms"] if v["name"] == vm)
    incoming = helper(lab, dst_host, "launch-incoming", {"argv": source["argv"]})
    src = await connect(source["qmp"], "src")
    tgt = await connect(incoming["qmp"], "tgt")
    src_events = EventListener()
    tgt_events = EventListener()
    src.register_listener(src_events)
    tgt.register_listener(tgt_events)
    if events:
        events_on = {"capabilities": [{"capability": "events", "state": True}]}
        await src.execute("migrate-set-capabilities", events_on)  # as with QEMU: no events without it
        await tgt.execute("migrate-set-capabilities", events_on)
    if pause_target:
        await tgt.execute("stop")  # like QEMU: stays paused after the incoming migration
    dst_probe = helper(lab, dst_host, "probe")
    if any(arg.startswith("sev-guest") for arg in source["argv"]):
        await src.execute("migrate-set-parameters", {
            "sev-pdh": dst_probe["pdh"], "sev-plat-cert": dst_probe["cert_chain"],
            "sev-amd-cert": dst_probe["amd_chain"]})
    if params:
        await src.execute("migrate-set-parameters", params)
    await tgt.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    info = await tgt.execute("query-migrate")
    port = int(info["socket-address"][0]["port"])
    return Pair(src, tgt, src_events, tgt_events, port, incoming)


async def wait_status(events: EventListener, statuses: tuple[str, ...] = TERMINAL,
                      timeout: float = 60.0) -> tuple[str, list[dict]]:
    """Waits for a MIGRATION event with one of `statuses`; returns it and every event seen."""
    seen: list[dict] = []

    async def _wait() -> str:
        while True:
            ev = await events.get()
            seen.append(dict(ev))
            if ev["event"] == "MIGRATION" and ev["data"]["status"] in statuses:
                return ev["data"]["status"]

    status = await asyncio.wait_for(_wait(), timeout)
    return status, seen


async def migrate(pair: Pair, timeout: float = 60.0) -> tuple[str, list[dict]]:
    await pair.src.execute("migrate", {"uri": f"tcp:127.0.0.1:{pair.port}"})
    return await wait_status(pair.src_events, timeout=timeout)


async def wait_disconnected(client: QMPClient, timeout: float = 10.0) -> None:
    """The target VM is discarded: its monitor closes."""
    async def _wait() -> None:
        while client.runstate.name == "RUNNING":
            try:
                await client.execute("query-status")
            except Exception:
                return
            # The monitor is still up; wait for the next event instead of sleeping blindly.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(client.runstate_changed(), 0.2)
    await asyncio.wait_for(_wait(), timeout)
