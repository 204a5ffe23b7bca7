"""Lab SEV migration vs real QEMU plain migration, side by side in one run; prints JSON.

    python -m benchmarks.migration [--mem 1024] [--repeat 1] [--psp-mem 8] [--skip-qemu]

Measured, each the same way (wall clock from `migrate` to `completed`, polled by QMP):
- lab: an SEV guest of MEM MiB of random memory, all private, no dirtying, between two lab
  host processes over loopback TCP (SEND/RECEIVE_UPDATE_DATA through the firmware model);
- QEMU: `qemu-system-x86_64 -machine q35,accel=tcg` with MEM MiB backed by a file of random
  bytes (memory-backend-file, share=on), the target started with `-incoming defer` then
  `migrate-incoming`, `migrate` over QMP on loopback (plain migration, no SEV);
- their throughput ratio (lab / QEMU; the target is >= 1.0);
- the lab's realistic-PSP mode: pages per second of a small SEV guest (AMD measured 350-450).
Both sides' max-bandwidth are raised so neither is throttled. Noisy on a shared machine:
compare only the figures of one run, and use --repeat for medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

from sevconsole.lab import Lab
from sevconsole.lab.layout import DB_POLICY, HostSpec, VmSpec

UNLIMITED = 1 << 40  # bytes/s: no rate limit on either side
MB = 1_000_000


async def _connect(path: str) -> QMPClient:
    client = QMPClient("bench")
    await client.connect(path)
    return client


async def _wait_completed(client: QMPClient, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = await client.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            if info["status"] != "completed":
                raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
            return info
        if time.monotonic() > deadline:
            raise RuntimeError("migration did not finish in time")
        await asyncio.sleep(0.01)  # QMP reports status only when asked; 10 ms resolution


# --- the lab -----------------------------------------------------------------------------

def _layout(mem_mib: int, realistic: bool) -> tuple[HostSpec, ...]:
    vm = VmSpec(name="bench", sev=True, policy=DB_POLICY, mem_mib=mem_mib, shared=(), dirty_rate=0.0)
    extra = {"digest-on-send": False}
    return (HostSpec(name="lab-1", api=(1, 55), oca_domain="a", vms=(vm,), realistic_psp=realistic, extra=extra),
            HostSpec(name="lab-2", api=(1, 55), oca_domain="a", realistic_psp=realistic, extra=extra))


async def _lab_once(state_dir: Path, mem_mib: int, realistic: bool) -> dict:
    import paramiko

    helper = "python3 -c 'import base64,sys,zlib;exec(zlib.decompress(base64.b64decode(sys.argv.pop(1))))' B "
    with Lab.start(state_dir, layout=_layout(mem_mib, realistic), timeout=600) as lab:
        def run(host: str, cmd: str, stdin: bytes | None = None) -> dict:
            c = paramiko.SSHClient()
            c.load_host_keys(str(lab.known_hosts))
            c.connect("127.0.0.1", port=lab.host(host).port, username="lab", key_filename=str(lab.client_key),
                      look_for_keys=False, allow_agent=False)
            try:
                i, o, _ = c.exec_command(helper + cmd)
                if stdin is not None:
                    i.write(stdin)
                i.channel.shutdown_write()
                return json.loads(o.read())
            finally:
                c.close()

        src_vm = next(v for v in run("lab-1", "probe")["vms"] if v["name"] == "bench")
        incoming = run("lab-2", "launch-incoming", json.dumps({"argv": src_vm["argv"]}).encode())
        dst = run("lab-2", "probe")
        src, tgt = await _connect(src_vm["qmp"]), await _connect(incoming["qmp"])
        try:
            await src.execute("migrate-set-parameters", {
                "sev-pdh": dst["pdh"], "sev-plat-cert": dst["cert_chain"], "sev-amd-cert": dst["amd_chain"],
                "max-bandwidth": UNLIMITED})
            await tgt.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            port = (await tgt.execute("query-migrate"))["socket-address"][0]["port"]
            pids = (lab.host("lab-1").pid, lab.host("lab-2").pid)
            cpu0 = [_cpu_seconds(p) for p in pids]
            sys0 = [_cpu_seconds(p, "system") for p in pids]
            t0 = time.monotonic()
            await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            info = await _wait_completed(src)
            seconds = time.monotonic() - t0
            cpu = [round(_cpu_seconds(p) - c, 3) for p, c in zip(pids, cpu0, strict=True)]
            system = [round(_cpu_seconds(p, "system") - c, 3) for p, c in zip(pids, sys0, strict=True)]
            pages = info["ram"]["normal"]
        finally:
            for c in (src, tgt):
                await c.disconnect()
    return {"seconds": round(seconds, 3), "mb_per_s": round(mem_mib * 1024 * 1024 / seconds / MB, 1),
            "pages": pages, "pages_per_s": round(pages / seconds, 1), "downtime_ms": info.get("downtime"),
            "total_time_ms": info.get("total-time"), "transferred": info["ram"]["transferred"],
            "cpu_s_source": cpu[0], "cpu_s_target": cpu[1], "sys_s_source": system[0], "sys_s_target": system[1]}


def _cpu_seconds(pid: int, which: str = "both") -> float:
    """User + system CPU time of a process (Linux /proc), to show both sides work."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    user, system = int(fields[11]), int(fields[12])
    ticks = {"user": user, "system": system}.get(which, user + system)
    return ticks / os.sysconf("SC_CLK_TCK")


# --- real QEMU ---------------------------------------------------------------------------

def _random_file(path: Path, mem_mib: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mem_mib):
            # a fresh MiB every 16 keeps it incompressible without paying urandom for all of it
            if i % 16 == 0:
                chunk = os.urandom(1 << 20)
            f.write(chunk)


async def _wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"qemu exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"qemu did not open {path}")
        await asyncio.sleep(0.02)  # another process creates it; nothing to wait on


async def _qemu_once(work: Path, mem_mib: int, qemu: str) -> dict:
    src_mem, dst_mem = work / "src.mem", work / "dst.mem"
    if not src_mem.exists():
        _random_file(src_mem, mem_mib)
    with open(dst_mem, "wb") as f:
        f.truncate(mem_mib << 20)

    def argv(mem: Path, qmp: Path, incoming: bool) -> list[str]:
        a = [qemu, "-machine", "q35,accel=tcg,memory-backend=mem0", "-m", str(mem_mib),
             "-object", f"memory-backend-file,id=mem0,size={mem_mib}M,mem-path={mem},share=on",
             "-display", "none", "-nodefaults", "-S", "-qmp", f"unix:{qmp},server=on,wait=off"]
        return a + (["-incoming", "defer"] if incoming else [])

    sq, tq = work / "src.qmp", work / "dst.qmp"
    for p in (sq, tq):
        p.unlink(missing_ok=True)
    procs = [subprocess.Popen(argv(src_mem, sq, False), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
             subprocess.Popen(argv(dst_mem, tq, True), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    try:
        await _wait_socket(sq, procs[0])
        await _wait_socket(tq, procs[1])
        src, tgt = await _connect(str(sq)), await _connect(str(tq))
        try:
            await src.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED})
            await tgt.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            port = (await tgt.execute("query-migrate"))["socket-address"][0]["port"]
            t0 = time.monotonic()
            await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            info = await _wait_completed(src)
            seconds = time.monotonic() - t0
            await src.execute("quit")
            await tgt.execute("quit")
        finally:
            for c in (src, tgt):
                with contextlib.suppress(Exception):  # quit closed it first
                    await c.disconnect()
    finally:
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        dst_mem.unlink(missing_ok=True)
    return {"seconds": round(seconds, 3), "mb_per_s": round(mem_mib * 1024 * 1024 / seconds / MB, 1),
            "pages": info["ram"]["normal"], "downtime_ms": info.get("downtime"),
            "total_time_ms": info.get("total-time"), "transferred": info["ram"]["transferred"]}


# --- main --------------------------------------------------------------------------------

def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


async def main(args: argparse.Namespace) -> dict:
    qemu = shutil.which("qemu-system-x86_64")
    work = Path(tempfile.mkdtemp(prefix="sevbench-"))
    try:
        lab_runs, qemu_runs = [], []
        for i in range(args.repeat):  # interleaved, so both see the same machine
            lab_runs.append(await _lab_once(work / f"lab-{i}", args.mem, realistic=False))
            if qemu and not args.skip_qemu:
                qemu_runs.append(await _qemu_once(work, args.mem, qemu))
        psp = await _lab_once(work / "psp", args.psp_mem, realistic=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out: dict = {
        "guest_mib": args.mem, "repeat": args.repeat, "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "lab_sev": {"seconds": _median(lab_runs, "seconds"), "mb_per_s": _median(lab_runs, "mb_per_s"),
                    "runs": lab_runs},
    }
    if qemu_runs:
        out["qemu_plain"] = {"seconds": _median(qemu_runs, "seconds"), "mb_per_s": _median(qemu_runs, "mb_per_s"),
                             "runs": qemu_runs}
        out["ratio_lab_to_qemu"] = round(out["lab_sev"]["mb_per_s"] / out["qemu_plain"]["mb_per_s"], 3)
        out["ratio_target"] = 1.0
    else:
        out["qemu_plain"] = None
        out["ratio_lab_to_qemu"] = None
    out["realistic_psp"] = {"guest_mib": args.psp_mem, "pages": psp["pages"], "seconds": psp["seconds"],
                            "pages_per_s": psp["pages_per_s"], "expected_pages_per_s": [350, 450]}
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mem", type=int, default=1024, help="guest MiB for the throughput runs (default 1024)")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs of each (medians reported)")
    parser.add_argument("--psp-mem", type=int, default=8, help="guest MiB for the realistic-PSP run (default 8)")
    parser.add_argument("--skip-qemu", action="store_true", help="lab only (no qemu-system-x86_64 here)")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
