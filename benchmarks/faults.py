"""Fault campaign: K lab migrations through the engine (real SSH, QMP, TCP), each with one random
fault (seeded), and the promises checked after every one by an independent census of the hosts.

Fault kinds: the stream cut at a random byte, a reply (READY/DONE) cut, one bit flipped in the
session, a packet header or the ciphertext, the target or the source host process killed at a
random byte, the source's QMP link or its whole SSH transport dropped mid-stream, a guest whose
policy turned NOSEND after the preflight, a recorded stream replayed to a second incoming VM, a
plan carrying another generation's chain (a real AMD Rome machine's) for the target. Prints
JSON: faults by kind, outcomes, invariant violations (must be 0), digest mismatches (must be 0),
the longest time from a fault to the engine's verified end, and every violation with its fault
so it can be replayed (same seed, same K).

    python benchmarks/faults.py [--k 40] [--seed 1] [--mem 16] [--kinds cut-stream,flip-header]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sevconsole.hosts.discovery import endpoint_for  # noqa: E402
from sevconsole.lab.stream import Frame  # noqa: E402
from sevconsole.sev.policy import PolicyFlag  # noqa: E402
from tests.reliability.proxy import Fault, StreamProxy  # noqa: E402
from tests.reliability.rig import (  # noqa: E402
    Attempt,
    KeepSource,
    ProxiedTarget,
    Rig,
    census,
    check_promises,
    cleanup_vm,
    fault_plan,
    helper,
    plain_proxy,
    qmp_once,
    rebind,
    replay_to,
    run_with_fault,
    settle,
)

KINDS = ("cut-stream", "cut-reply", "flip-session", "flip-header", "flip-ciphertext", "kill-target",
         "kill-source", "drop-qmp", "drop-ssh", "nosend", "replay", "other-chain")
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


async def campaign(k: int, seed: int, mem: int, kinds: tuple[str, ...], workdir: Path) -> dict:
    rng = np.random.default_rng(seed)
    plan = [kinds[int(i)] for i in rng.integers(0, len(kinds), k)]
    attempts: list[Attempt] = []
    errors: list[str] = []
    restarts = 0
    rig = Rig.start(workdir / "rig0", hosts=2, mem_mib=mem)
    try:
        clean, target = await run_with_fault(rig, "web", "lab-1", "lab-2", [], kind="none")
        assert clean.outcome is not None and clean.outcome.result == "done", clean.to_json()
        assert target.proxy is not None
        total = target.proxy.forwarded["out"]
        for i, kind in enumerate(plan):
            try:
                att, killed = await one(rig, kind, rng, total)
                attempts.append(att)
                line = {"attempt": i, **att.to_json()}
            except Exception as exc:  # the campaign goes on; the error is part of the figures
                errors.append(f"#{i} {kind}: {type(exc).__name__}: {exc}")
                killed = True
                line = {"attempt": i, "kind": kind, "error": errors[-1]}
            print(json.dumps(line), file=sys.stderr)
            lost = not killed and not (await census(rig.lab, "web", digests=False)).runnable
            if killed or lost:
                rig.close()
                restarts += 1
                rig = Rig.start(workdir / f"rig{restarts}", hosts=2, mem_mib=mem)
    finally:
        rig.close()
    safe = [a.safe_after_s for a in attempts if a.safe_after_s is not None]
    violations = [{"kind": a.kind, "fault": a.fault, "violations": a.violations} for a in attempts if a.violations]
    mismatches = [{"kind": a.kind, "fault": a.fault, "mismatches": a.mismatches} for a in attempts if a.mismatches]
    return {
        "k": k, "seed": seed, "guest_mib": mem, "stream_bytes": total,
        "faults_by_kind": dict(Counter(a.kind for a in attempts)),
        "faults_fired": sum(a.fired for a in attempts),
        "outcomes": dict(Counter(a.outcome.result if a.outcome else "none" for a in attempts)),
        "guest_ends_on": dict(Counter(a.ends_on for a in attempts)),
        "invariant_violations": sum(len(a.violations) for a in attempts),
        "digest_mismatches": sum(len(a.mismatches) for a in attempts),
        "longest_time_to_safe_state_s": max(safe) if safe else None,
        "median_time_to_safe_state_s": float(np.median(safe)) if safe else None,
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
        import os

        os.environ.setdefault("SEVCONSOLE_DATA_DIR", str(Path(tmp) / "data"))
        started = time.monotonic()
        report = asyncio.run(campaign(args.k, args.seed, args.mem, kinds, Path(tmp)))
        report["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=2))
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
