"""Fault campaign: K lab migrations through the engine (real SSH, QMP, TCP), each with one random
fault (seeded), and the promises checked after every one by an independent census of the hosts.

Fault kinds: the stream cut at a random byte, a reply (READY/DONE) cut, one bit flipped in the
session, a packet header or the ciphertext, the target or the source host process killed at a
random byte, the source's QMP link or its whole SSH transport dropped mid-stream, a guest whose
policy turned NOSEND after the preflight, a recorded stream replayed to a second incoming VM, a
plan carrying another generation's chain (a real AMD Rome machine's) for the target.

Durable kinds run `sevconsole migrate` as a real process on a second lab with a realistic PSP
(every phase lasts): client-killed kills the migrate client with a seeded signal (SIGHUP, SIGTERM,
SIGKILL) at a seeded point, and sets the migration's own duration beside an unkilled baseline run
just before it (the ratio should be about 1: a client is not the migration); runner-killed
SIGKILLs the runner at a seeded point (target launched, pre-copy at a seeded fraction,
stop-and-copy, finishing), then times `sevconsole recover` from its start to one runnable copy
(the goal: a median under 5 s).

Prints JSON: faults by kind, outcomes, invariant violations (must be 0), digest mismatches (must be
0), the same per kind, the longest time from a fault to the engine's verified end, and every
violation with its fault so it can be replayed (same seed, same K).

    python -m benchmarks.faults [--k 40] [--seed 1] [--mem 16] [--kinds cut-stream,flip-header]
                                [--durable-mem 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from sevconsole.hosts.discovery import endpoint_for
from sevconsole.lab.stream import Frame
from sevconsole.sev.policy import PolicyFlag
from tests.reliability.proxy import Fault, StreamProxy
from tests.reliability.rig import (
    RUNNER_POINTS,
    Attempt,
    Console,
    KeepSource,
    ProxiedTarget,
    Rig,
    census,
    check_promises,
    cleanup_vm,
    fault_plan,
    helper,
    journal_step,
    outcome_of,
    plain_proxy,
    qmp_once,
    reach,
    rebind,
    replay_to,
    run_with_fault,
    settle,
)

KINDS = ("cut-stream", "cut-reply", "flip-session", "flip-header", "flip-ciphertext", "kill-target",
         "kill-source", "drop-qmp", "drop-ssh", "nosend", "replay", "other-chain", "client-killed",
         "runner-killed")
DURABLE = ("client-killed", "runner-killed")  # migrate as a process, on the realistic-PSP lab
CLIENT_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGKILL)
CLIENT_POINTS = ("send-start", "pre-copy", "stop-and-copy", "finishing")
RECOVER_GOAL_S = 5.0  # the median from `recover` start to one runnable copy
CERTS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sev-certs"  # real AMD certificates


async def nosend_attempt(rig: Rig) -> Attempt:
    from sevconsole.engine.checks import preflight
    from sevconsole.engine.run import Migration

    home = await cleanup_vm(rig, "vault")
    other = "lab-2" if home == "lab-1" else "lab-1"
    plan = rig.plan("vault", home, other)
    stale = rebind(plan, policy=int(plan.vm.policy or 0) & ~int(PolicyFlag.NOSEND))
    before = (await qmp_once(plan.vm.qmp_path or "", "x-query-guest-digest"))["sha256"]
    source = KeepSource(rig.link(home))
    target = ProxiedTarget(rig.link(other), lambda port: StreamProxy(("127.0.0.1", port)))
    t0 = time.monotonic()
    outcome = await Migration(stale, source, target, checks=preflight(stale, rig.trust), audit_log=False,
                              poll_interval_s=0.05).run()
    await source.close()
    await target.close()
    c = await settle(rig.lab, "vault", (home, other))
    att = Attempt("nosend", "policy NOSEND set after preflight", outcome, c, before, True,
                  round(time.monotonic() - t0, 3), source=home, target=other)
    check_promises(att, home, other, None)
    if "NOSEND" not in outcome.message:
        att.violations.append(f"refusal does not name NOSEND: {outcome.message}")
    return att


async def replay_attempt(rig: Rig, rng: np.random.Generator) -> Attempt:
    """A clean migration recorded, then its stream replayed to a second incoming VM: on the host
    the guest left, or on the host it went to (same PDH). Either must refuse it."""
    home = await cleanup_vm(rig, "web")
    assert home is not None
    other = "lab-2" if home == "lab-1" else "lab-1"
    att, target = await run_with_fault(rig, "web", home, other, [], kind="replay", record=True)
    assert target.proxy is not None
    if att.violations or att.mismatches or not att.outcome or att.outcome.result != "done":
        return att
    second = home if rng.integers(0, 2) == 0 else other
    t0 = time.monotonic()
    answer, _ = await replay_to(rig, second, "web", bytes(target.proxy.recorded["out"]))
    c = await settle(rig.lab, "web", (home, other))
    out = Attempt("replay", f"recorded stream replayed to {second}", att.outcome, c, att.digest_before, True,
                  round(time.monotonic() - t0, 3), source=home, target=other)
    if answer[:1] != bytes([Frame.ERROR]):
        out.violations.append(f"replayed stream accepted by {second}")
    if len(c.runnable) > 1:
        out.violations.append(f"cloned: {c.describe()}")
        keep = (att.census.runnable[0].host, att.census.runnable[0].pid)  # the migrated copy
        for extra in c.runnable:  # the campaign goes on with one copy
            if (extra.host, extra.pid) != keep:
                await asyncio.to_thread(helper, rig.lab, extra.host, f"stop {extra.pid}")
    for copy in c.runnable:
        if copy.digest != att.digest_before:
            out.mismatches.append(f"{copy.host}: digest differs from before")
    return out


async def other_chain_attempt(rig: Rig) -> Attempt:
    """The plan carries a real Rome machine's chain for the target (another generation, another
    root than the lab's): the engine must stop before the source gets a PDH, even without a
    preflight, and leave the guest where it was."""
    from dataclasses import replace

    from sevconsole.engine.run import Migration
    from tests.reliability.test_trust_faults import rome_capabilities

    home = await cleanup_vm(rig, "web")
    assert home is not None
    other = "lab-2" if home == "lab-1" else "lab-1"
    plan = rig.plan("web", home, other)
    rome = replace(plan, target=replace(plan.target, capabilities=rome_capabilities(CERTS)))
    before = (await qmp_once(plan.vm.qmp_path or "", "x-query-guest-digest"))["sha256"]
    source, target = KeepSource(rig.link(home)), ProxiedTarget(rig.link(other), plain_proxy)
    t0 = time.monotonic()
    outcome = await Migration(rome, source, target, checks=(), audit_log=False).run()
    await source.close()
    await target.close()
    c = await settle(rig.lab, "web", (home, other))
    att = Attempt("other-chain", "target chain of a real Rome machine in the plan", outcome, c, before, True,
                  round(time.monotonic() - t0, 3), source=home, target=other)
    check_promises(att, home, other, None)
    if target.proxy is not None and target.proxy.forwarded["out"]:
        att.violations.append(f"{target.proxy.forwarded['out']} stream bytes left for a target never verified")
    if outcome.result == "done":
        att.violations.append("migrated to a target whose PDH was never verified")
    return att


async def one(rig: Rig, kind: str, rng: np.random.Generator, total: int) -> tuple[Attempt, bool]:
    """Runs one attempt; returns it and whether a host was killed (the rig must restart)."""
    if kind == "nosend":
        return await nosend_attempt(rig), False
    if kind == "replay":
        return await replay_attempt(rig, rng), False
    if kind == "other-chain":
        return await other_chain_attempt(rig), False
    home = await cleanup_vm(rig, "web")
    assert home is not None, "web has no runnable copy left"
    other = "lab-2" if home == "lab-1" else "lab-1"
    killed: list[str] = []
    holder: dict[str, KeepSource] = {}
    at = int(rng.integers(64 << 10, total - (64 << 10)))
    if kind in ("kill-target", "kill-source"):
        victim = other if kind == "kill-target" else home

        def kill() -> None:
            rig.kill_host(victim)
            killed.append(victim)

        faults = [Fault("call", at=at, call=kill)]
    elif kind == "drop-qmp":
        def drop() -> None:
            for link in list(holder["source"].inner._links):
                link.bridge.channel.close()

        faults = [Fault("call", at=at, call=drop)]
    elif kind == "drop-ssh":
        def drop_ssh() -> None:  # the TCP connection under the source's SSH transport dies
            conn = rig.pool.get(endpoint_for(rig.spec(home), rig.inventory.hosts))
            conn.transport.sock.shutdown(socket.SHUT_RDWR)

        faults = [Fault("call", at=at, call=drop_ssh)]
    else:
        faults = fault_plan(rng, kind, total)

    def keep(mig, source, target) -> None:  # type: ignore[no-untyped-def]
        holder["source"] = source

    att, _ = await run_with_fault(rig, "web", home, other, faults, kind=kind, before_run=keep,
                                  host_killed=lambda: killed[0] if killed else None)
    return att, bool(killed)


# ------------------------------------------------------------------ durable migrations: processes

def _run_migrate(drig: Rig, console: Console, other: str) -> tuple[Any, Path]:
    client = console.start("migrate", "web", "--to", other, "--lab", str(drig.lab.paths.root), "--yes", "--json")
    return client, console.migration()


def _baseline(drig: Rig, console: Console, other: str) -> dict:
    """One unkilled migration; its own duration as the runner measured it."""
    client, folder = _run_migrate(drig, console, other)
    try:
        client.rest(120)
    finally:
        client.close()
    console.wait_runner_gone(folder)
    return outcome_of(folder) or {}


def _client_killed(drig: Rig, console: Console, other: str, sig: int, point: str,
                   fraction: float) -> tuple[dict, str, float, bool]:
    client, folder = _run_migrate(drig, console, other)
    try:
        where = reach(client, folder, point, fraction)
        with contextlib.suppress(ProcessLookupError):
            client.kill(sig)
        landed = client.proc.wait(30) == -sig  # not when the client had already seen the end
        killed = time.monotonic()
    finally:
        client.close()
    console.wait_runner_gone(folder, timeout=120)
    return outcome_of(folder) or {}, where, time.monotonic() - killed, landed


def _runner_killed(drig: Rig, console: Console, other: str, point: str,
                   fraction: float) -> tuple[str, str | None, Any, float, Path]:
    client, folder = _run_migrate(drig, console, other)
    try:
        where = reach(client, folder, point, fraction)
        with contextlib.suppress(ProcessLookupError):  # the runner had already ended
            os.kill(console.runner_pid(folder), signal.SIGKILL)
        client.rest(60)
    finally:
        client.close()
    console.wait_runner_gone(folder, timeout=10)
    step = journal_step(folder)
    t0 = time.monotonic()
    out = console.run("recover", "--lab", str(drig.lab.paths.root), "--json")
    return where, step, out, time.monotonic() - t0, folder


async def durable_attempt(drig: Rig, kind: str, rng: np.random.Generator, workdir: Path) -> Attempt:
    from sevconsole.engine.run import Outcome

    home = await cleanup_vm(drig, "web")
    assert home is not None, "web has no runnable copy left"
    other = "lab-2" if home == "lab-1" else "lab-1"
    fraction = float(rng.uniform(0.05, 0.9))
    if kind == "client-killed":
        sig = CLIENT_SIGNALS[int(rng.integers(0, len(CLIENT_SIGNALS)))]
        point = CLIENT_POINTS[int(rng.integers(0, len(CLIENT_POINTS)))]
        base = Console.make(workdir / "baseline")
        try:
            baseline = await asyncio.to_thread(_baseline, drig, base, other)
        finally:
            base.close()
        if baseline.get("result") != "done":
            raise RuntimeError(f"the unkilled baseline did not end done: {baseline.get('message')}")
        home, other = other, home  # the killed run takes the guest back
        await cleanup_vm(drig, "web")
    else:
        sig, point = signal.SIGKILL, RUNNER_POINTS[int(rng.integers(0, len(RUNNER_POINTS)))]
    before = (await census(drig.lab, "web", (home,))).runnable[0].digest or ""
    fault = f"{signal.Signals(sig).name} to the {kind.split('-')[0]} at {point}" + (
        f" {fraction:.0%}" if point == "pre-copy" else "")
    console = Console.make(workdir / "killed")
    results: list[dict[str, Any]] = []
    try:
        if kind == "client-killed":
            wire, where, ended_after, landed = await asyncio.to_thread(_client_killed, drig, console, other, sig,
                                                                       point, fraction)
            outcome = Outcome.from_wire(wire) if wire else None
            duration = float(wire.get("duration_s") or 0.0)
            base_s = float(baseline.get("duration_s") or 0.0)
            extra = {"signal": signal.Signals(sig).name, "at": where, "landed": landed,
                     "baseline_s": round(base_s, 3), "duration_s": round(duration, 3),
                     "ratio": round(duration / base_s, 3) if base_s else None}
            safe: float | None = round(ended_after, 3)
        else:
            where, step, out, recover_s, folder = await asyncio.to_thread(_runner_killed, drig, console, other,
                                                                          point, fraction)
            results = [r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))
                       if "id" in r]
            landed = step not in ("done", "rolled-back", "refused")  # else the runner ended first
            if results:
                outcome = Outcome(f"recover: {results[0]['step']}", results[0]["sentence"],
                                  runnable=tuple(results[0]["runnable"]))
            else:
                wire = outcome_of(folder)
                outcome = Outcome.from_wire(wire) if wire else None
            extra = {"at": where, "journal_step": step, "landed": landed, "recover_exit": out.returncode,
                     "recover_s": round(recover_s, 3)}
            safe = round(recover_s, 3) if landed else None
    finally:
        console.close()
    c = await settle(drig.lab, "web", (home, other))
    att = Attempt(kind, fault, outcome, c, before, True, safe if len(c.runnable) == 1 else None,
                  source=home, target=other, extra=extra)
    check_promises(att, home, other, None)
    if kind == "runner-killed":
        if landed and not results:
            att.violations.append("recover did not take the migration whose runner was killed")
        if extra["recover_exit"] != 0:
            att.violations.append(f"recover exited {extra['recover_exit']}: {outcome.message if outcome else ''}")
    if kind == "client-killed" and (outcome is None or outcome.result != "done"):
        att.violations.append(f"the migration did not go on to done without its client: {extra}")
    return att


def durable_figures(attempts: list[Attempt]) -> dict:
    """The durable kinds' own figures: the killed client's migration time beside its baseline,
    and the time from recover start to one runnable copy after a killed runner. A signal that
    came after the migration's own end (a short late point) is counted apart ("landed")."""
    out: dict[str, Any] = {}
    clients = [a for a in attempts if a.kind == "client-killed"]
    if clients:
        ratios = [a.extra["ratio"] for a in clients if a.extra.get("ratio") and a.extra.get("landed")]
        out["client_killed"] = {
            "runs": [{k: a.extra.get(k) for k in ("signal", "at", "landed", "baseline_s", "duration_s", "ratio")}
                     for a in clients],
            "median_ratio_to_baseline": float(np.median(ratios)) if ratios else None,
        }
    runners = [a for a in attempts if a.kind == "runner-killed"]
    if runners:
        times = [a.safe_after_s for a in runners if a.safe_after_s is not None]
        landed = [a for a in runners if a.extra.get("landed")]
        median = float(np.median(times)) if times else None
        out["runner_killed"] = {
            "killed_at": dict(Counter(str(a.extra.get("journal_step")) for a in runners)),
            "kills_landed": len(landed),
            "median_recover_to_one_copy_s": median,
            "longest_recover_to_one_copy_s": max(times) if times else None,
            "goal_s": RECOVER_GOAL_S,
            "goal_met": median is not None and median < RECOVER_GOAL_S and len(times) == len(landed),
        }
    return out


def by_kind(attempts: list[Attempt]) -> dict:
    out = {}
    for kind in sorted({a.kind for a in attempts}):
        mine = [a for a in attempts if a.kind == kind]
        safe = [a.safe_after_s for a in mine if a.safe_after_s is not None]
        out[kind] = {"attempts": len(mine), "invariant_violations": sum(len(a.violations) for a in mine),
                     "digest_mismatches": sum(len(a.mismatches) for a in mine),
                     "median_time_to_safe_state_s": float(np.median(safe)) if safe else None}
    return out


async def campaign(k: int, seed: int, mem: int, kinds: tuple[str, ...], workdir: Path,
                   durable_mem: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    plan = [kinds[int(i)] for i in rng.integers(0, len(kinds), k)]
    attempts: list[Attempt] = []
    errors: list[str] = []
    restarts = 0
    total = None
    rig = drig = None
    try:
        if any(kind not in DURABLE for kind in plan):
            rig = Rig.start(workdir / "rig0", hosts=2, mem_mib=mem)
            clean, target = await run_with_fault(rig, "web", "lab-1", "lab-2", [], kind="none")
            assert clean.outcome is not None and clean.outcome.result == "done", clean.to_json()
            assert target.proxy is not None
            total = target.proxy.forwarded["out"]
        if any(kind in DURABLE for kind in plan):
            drig = Rig.start(workdir / "durable0", hosts=2, mem_mib=durable_mem, realistic_psp=True)
        for i, kind in enumerate(plan):
            durable = kind in DURABLE
            try:
                if durable:
                    att, killed = await durable_attempt(drig, kind, rng, workdir / f"attempt{i}"), False
                else:
                    att, killed = await one(rig, kind, rng, total)
                attempts.append(att)
                line = {"attempt": i, **att.to_json()}
            except Exception as exc:  # the campaign goes on; the error is part of the figures
                errors.append(f"#{i} {kind}: {type(exc).__name__}: {exc}")
                killed = True
                line = {"attempt": i, "kind": kind, "error": errors[-1]}
            print(json.dumps(line), file=sys.stderr)
            used = drig if durable else rig
            lost = not killed and not (await census(used.lab, "web", digests=False)).runnable
            if killed or lost:
                used.close()
                restarts += 1
                if durable:
                    drig = Rig.start(workdir / f"durable{restarts}", hosts=2, mem_mib=durable_mem,
                                     realistic_psp=True)
                else:
                    rig = Rig.start(workdir / f"rig{restarts}", hosts=2, mem_mib=mem)
    finally:
        for running in (rig, drig):
            if running is not None:
                running.close()
    safe = [a.safe_after_s for a in attempts if a.safe_after_s is not None]
    violations = [{"kind": a.kind, "fault": a.fault, "violations": a.violations} for a in attempts if a.violations]
    mismatches = [{"kind": a.kind, "fault": a.fault, "mismatches": a.mismatches} for a in attempts if a.mismatches]
    return {
        "k": k, "seed": seed, "guest_mib": mem if total is not None else None, "stream_bytes": total,
        "faults_by_kind": dict(Counter(a.kind for a in attempts)),
        "faults_fired": sum(a.fired for a in attempts),
        "outcomes": dict(Counter(a.outcome.result if a.outcome else "none" for a in attempts)),
        "guest_ends_on": dict(Counter(a.ends_on for a in attempts)),
        "invariant_violations": sum(len(a.violations) for a in attempts),
        "digest_mismatches": sum(len(a.mismatches) for a in attempts),
        "longest_time_to_safe_state_s": max(safe) if safe else None,
        "median_time_to_safe_state_s": float(np.median(safe)) if safe else None,
        "by_kind": by_kind(attempts),
        **durable_figures(attempts),
        **({"durable_guest_mib": durable_mem} if drig is not None else {}),
        "lab_restarts": restarts,
        "harness_errors": errors,
        "violation_details": violations,
        "mismatch_details": mismatches,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mem", type=int, default=16, help="guest MiB")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--durable-mem", type=int, default=8, help="guest MiB on the realistic-PSP lab (durable kinds)")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if "other-chain" in kinds and not CERTS.is_dir():
        print(f"faults.py: no real certificates at {CERTS}; other-chain left out", file=sys.stderr)
        kinds = tuple(k for k in kinds if k != "other-chain")
    unknown = set(kinds) - set(KINDS)
    if unknown or args.k < 1:
        print(f"faults.py: unknown kinds {sorted(unknown)} (known: {', '.join(KINDS)}) or k < 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sev-faults-") as tmp:
        os.environ.setdefault("SEVCONSOLE_DATA_DIR", str(Path(tmp) / "data"))
        started = time.monotonic()
        report = asyncio.run(campaign(args.k, args.seed, args.mem, kinds, Path(tmp), args.durable_mem))
        report["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
