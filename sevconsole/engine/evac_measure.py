"""Each guest's dirty rate, measured by its own QEMU before the evacuation plans.

QEMU 7.2's `calc-dirty-rate` (mode `dirty-bitmap`: KVM's dirty log over `calc-time` seconds;
`dirty-ring` where KVM runs a dirty ring and refuses the bitmap) then `query-dirty-rate`
until `measured`. QEMU answers whole MB/s, so the result is an interval of pages/s
(evac_plan.DirtyRate). All guests are measured at once, over SSH and QMP like everything
else; a guest whose QEMU lacks the command or does not answer is "unknown" (it then gets its
PSP alone), with the reason kept for the plan's notes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from qemu.qmp.error import QMPError

from sevconsole.engine.errors import LinkError
from sevconsole.engine.evac_plan import DirtyRate
from sevconsole.hosts.report import HostReport, VmInfo

MODES = ("dirty-bitmap", "dirty-ring")
POLL_S = 0.1
SLACK_S = 5.0  # past calc-time, how long a QEMU may take to say `measured`


def describe(mbps: int, mode: str, seconds: int) -> str:
    return f"calc-dirty-rate {mode} over {seconds} s: {mbps} MB/s"


async def measure_one(client: Any, *, calc_time_s: int = 1) -> DirtyRate:
    """One guest's rate through its QMP client (raises QMPError/TimeoutError on failure)."""
    last: Exception | None = None
    for mode in MODES:
        try:
            await client.execute("calc-dirty-rate", {"calc-time": calc_time_s, "mode": mode})
            break
        except QMPError as exc:  # "mode ... is not enabled": try the other way KVM logs pages
            last = exc
    else:
        assert last is not None
        raise last
    deadline = asyncio.get_running_loop().time() + calc_time_s + SLACK_S
    while True:
        await asyncio.sleep(POLL_S)
        info = await client.execute("query-dirty-rate")
        if info.get("status") == "measured":
            rate = int(info.get("dirty-rate", -1))
            if rate < 0:
                raise ValueError(f"QEMU measured no dirty rate ({info.get('mode')} mode)")
            return DirtyRate.from_mbps(rate, describe(rate, str(info.get("mode", mode)), calc_time_s))
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no dirty rate {calc_time_s + SLACK_S:.0f} s after calc-dirty-rate")


async def measure(link: Any, source: HostReport, vms: Sequence[VmInfo], *,
                  calc_time_s: int = 1) -> dict[str, DirtyRate | str]:
    """The rate of each VM (by name), or a sentence why it is unknown. `link` is the source's
    HostLink (engine/ssh.SshHost): its QMP bridges are closed by the caller's `link.close()`."""

    async def one(vm: VmInfo) -> tuple[str, DirtyRate | str]:
        if not vm.qmp_path:
            return vm.name, f"{vm.name} has no QMP socket to measure its dirty rate"
        client = None
        try:
            client = await asyncio.wait_for(link.open_qmp(vm.qmp_path), 15)
            return vm.name, await measure_one(client, calc_time_s=calc_time_s)
        except (QMPError, LinkError, OSError, TimeoutError, ValueError) as exc:
            return vm.name, f"{vm.name} on {source.name}: dirty rate not measured ({exc})"
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.disconnect()

    return dict(await asyncio.gather(*(one(vm) for vm in vms)))
