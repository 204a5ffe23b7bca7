"""Engine costs, measured side by side in one run; prints JSON.

1. Watching: a plain migration of a 64 MiB guest of random memory (TCG QEMU, loopback), driven
   by bare QMP (migrate, wait for the MIGRATION completed event) and by the engine at two poll
   cadences, interleaved run by run. The ratio engine/bare is the price of watching.
2. Folding: one exact page-map poll (decode + snapshot copy + to_json) for a 64 MiB and a
   64 GiB guest, against decoding alone.

    python -m benchmarks.engine [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from sevconsole.engine.fold import ProgressFolder
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.run import Migration
from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.sev.pagestate import decode_states, encode_states
from tests.engine.local import LocalHost, accepts

MIB = 64


def start_guest(qemu: str, work: Path, name: str) -> tuple[subprocess.Popen[bytes], VmInfo]:
    ram = work / "ram.bin"
    if not ram.exists():
        with open(ram, "wb") as out:
            for _ in range(MIB):
                out.write(os.urandom(1 << 20))
    qmp = work / f"{name}.qmp"
    argv = [qemu, "-machine", "q35,accel=tcg,memory-backend=ram0", "-m", str(MIB), "-display", "none",
            "-nodefaults", "-object", f"memory-backend-file,id=ram0,size={MIB}M,mem-path={ram},share=off",
            "-qmp", f"unix:{qmp},server=on,wait=off", "-name", name]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not accepts(qmp):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("QEMU did not start")
        time.sleep(0.02)
    return proc, VmInfo(name=name, pid=proc.pid, qmp_path=str(qmp), argv=tuple(argv), status="running",
                        memory_mib=MIB)


async def bare(vm: VmInfo, host: LocalHost) -> float:
    """migrate-incoming/migrate with no watching but the completion event; timed like the engine
    run, from opening the source's QMP to the end."""
    t0 = time.perf_counter()
    src = await host.open_qmp(vm.qmp_path or "")
    inc = await host.launch_incoming(vm.argv)
    dst = await host.open_qmp(inc.qmp)
    try:
        caps = {"capabilities": [{"capability": "events", "state": True}]}
        await src.execute("migrate-set-capabilities", caps)
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
        with src.listener("MIGRATION") as events:
            await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            async for ev in events:
                if ev["data"]["status"] in ("completed", "failed", "cancelled"):
                    assert ev["data"]["status"] == "completed", ev
                    break
        return time.perf_counter() - t0
    finally:
        await src.disconnect()
        await dst.disconnect()
        await host.stop(inc.pid)


async def engine(vm: VmInfo, host: LocalHost, poll: float) -> float:
    src_r = HostReport("src", "127.0.0.1", 22, True, vms=(vm,))
    dst_r = HostReport("dst", "127.0.0.1", 22, True)
    plan = MigrationPlan(vm=vm, source=src_r, target=dst_r)
    t0 = time.perf_counter()
    outcome = await Migration(plan, host, host, poll_interval_s=poll, audit_log=False).run()
    elapsed = time.perf_counter() - t0
    assert outcome.result == "done", outcome
    if outcome.target_pid:
        await host.stop(outcome.target_pid)
    return elapsed


def migration_overhead(runs: int) -> dict[str, object]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return {"skipped": "qemu-system-x86_64 not installed"}
    kinds = {"bare": None, "engine_poll_250ms": 0.25, "engine_poll_50ms": 0.05}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        host = LocalHost("local", run_dir=work)
        for i in range(runs):
            for kind, poll in kinds.items():  # interleaved: machine noise hits every kind alike
                proc, vm = start_guest(qemu, work, f"b{i}{kind[:3]}{len(times[kind])}")
                try:
                    coro = bare(vm, host) if poll is None else engine(vm, host, poll)
                    times[kind].append(asyncio.run(coro))
                finally:
                    proc.kill()
                    proc.wait()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"guest_mib": MIB, "runs": runs, "median_s": {k: round(v, 4) for k, v in med.items()},
            "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "ratio_vs_bare": {k: round(v / med["bare"], 3) for k, v in med.items() if k != "bare"}}


def fold_cost() -> dict[str, object]:
    out: dict[str, object] = {}
    for label, pages in (("64MiB", 16384), ("64GiB", 16 * 1024 * 1024)):
        rng = np.random.default_rng(1)
        states = np.zeros(pages, dtype=np.uint8)
        states[: pages // 3] = 1  # a guest a third of the way through its first pass
        states[rng.integers(0, pages, pages // 100)] = 2  # one page in a hundred dirtied since
        answer = {"page-size": 4096, "count": pages, "encoding": "zlib-u8-base64", "data": encode_states(states)}
        vm = VmInfo(name="g", pid=1, qmp_path="/q", sev_enabled=True, policy=0x33)
        plan = MigrationPlan(vm=vm, source=HostReport("a", "x", 22, True), target=HostReport("b", "x", 22, True))
        folder = ProgressFolder(plan)
        n = 20 if pages < 1_000_000 else 5
        t0 = time.perf_counter()
        for _ in range(n):
            decode_states(answer["data"], pages)
        decode = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for _ in range(n):
            folder.fold_page_state(answer)
            folder.snapshot().to_json()
        full = (time.perf_counter() - t0) / n
        out[label] = {"pages": pages, "wire_bytes": len(answer["data"]), "decode_ms": round(decode * 1e3, 3),
                      "fold_snapshot_json_ms": round(full * 1e3, 3), "ratio_vs_decode": round(full / decode, 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({"fold": fold_cost(), "migration": migration_overhead(args.runs)}, indent=2))


if __name__ == "__main__":
    main()
