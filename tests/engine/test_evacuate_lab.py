"""`sevconsole evacuate` as a real process on a lab: the plan's blockers and targets, cordons,
exit codes, a --skip-blocked run and a target killed mid-evacuation. After each run an
independent census (tests/reliability/rig.py: every copy's firmware state and digest over its
own QMP socket) must find each guest with exactly one runnable copy, its memory unchanged."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import replace

import pytest

from sevconsole.lab import Lab
from sevconsole.lab.layout import DB_POLICY, RECENT_API, HostSpec, VmSpec, default_layout
from tests.reliability.rig import Console, census, settle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MEM_MIB = 8  # with the realistic PSP: about 5 s a guest


def sev_vm(name: str) -> VmSpec:
    """An idle SEV guest: its digest before and after the evacuation must be the same."""
    return VmSpec(name, True, DB_POLICY, mem_mib=MEM_MIB)


def mixed_layout() -> tuple[HostSpec, ...]:
    """lab-1: the default lab's guests (web: SEV, DOMAIN, API >= 0.24; vault: NOSEND; plain: no SEV;
    and any guest that never enabled migration) plus sev-a and sev-b; lab-2 and lab-4 take SEV
    guests; lab-3 (another OCA domain, API 0.17) takes only the plain one."""
    specs = list(default_layout(4, mem_mib=MEM_MIB))
    specs[0] = replace(specs[0], vms=specs[0].vms + (sev_vm("sev-a"), sev_vm("sev-b")))
    return tuple(specs)


LAB1 = mixed_layout()[0].vms
# what the plan must say cannot move: NOSEND, and QEMU's blocker of a guest that never enabled migration
BLOCKED = {"vault": "nosend", **{v.name: "blocked" for v in LAB1 if not getattr(v, "migration_ready", True)}}
MOVABLE = [v.name for v in LAB1 if v.name not in BLOCKED]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab.start(tmp_path_factory.mktemp("evac") / "lab", layout=mixed_layout())
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    made = Console.make(tmp_path_factory.mktemp("evac-console"))
    yield made
    made.close()


def events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def digests(lab: Lab, vms: list[str]) -> dict[str, str]:
    out = {}
    for vm in vms:
        now = asyncio.run(census(lab, vm))
        assert len(now.runnable) == 1, now.describe()
        out[vm] = str(now.runnable[0].digest)
    return out


def one_copy_each(lab: Lab, before: dict[str, str], hosts: tuple[str, ...]) -> dict[str, str]:
    """The promise after an evacuation: each guest exactly one runnable copy, memory unchanged.
    Returns where each guest runs."""
    where = {}
    for vm, digest in before.items():
        now = asyncio.run(settle(lab, vm, hosts))
        assert len(now.runnable) == 1, now.describe()
        assert now.runnable[0].digest == digest, now.describe()
        where[vm] = now.runnable[0].host
    return where


def test_plan_cordons_skip_blocked_and_exit_codes(mixed: Lab, console: Console) -> None:
    lab = str(mixed.paths.root)
    guests = [v.name for v in LAB1]
    assert {"web", "vault", "plain", "sev-a", "sev-b"} <= set(guests)
    before = digests(mixed, guests)

    # unknown host, bad usage: 3
    assert console.run("evacuate", "lab-9", "--lab", lab, "--yes").returncode == 3
    assert console.run("evacuate", "lab-1", "--to", "lab-9", "--lab", lab, "--yes").returncode == 3
    assert console.run("evacuate", "lab-1", "--parallel", "0", "--lab", lab).returncode == 3

    # the plan: vault is a blocker (NOSEND), so nothing starts without --skip-blocked: 2
    out = console.run("evacuate", "lab-1", "--lab", lab, "--yes", "--json")
    assert out.returncode == 2, out.stderr
    lines = events(out.stdout)
    plan = lines[0]
    assert plan["event"] == "plan" and plan["host"] == "lab-1"
    assert {b["vm"]: b["kind"] for b in plan["blockers"]} == BLOCKED
    sentences = {b["vm"]: b["sentence"] for b in plan["blockers"]}
    assert "NOSEND" in sentences["vault"]
    moves = {m["vm"]: m for m in plan["moves"]}
    assert set(moves) == set(MOVABLE)
    for vm in ("web", "sev-a", "sev-b"):  # lab-3 is another OCA domain: DOMAIN refuses it
        assert moves[vm]["allowed"] == ["lab-2", "lab-4"] and moves[vm]["target"] in ("lab-2", "lab-4")
        assert [r["target"] for r in moves[vm]["refusals"]] == ["lab-3"]
        assert "DOMAIN" in moves[vm]["refusals"][0]["why"]
    assert moves["plain"]["allowed"] == ["lab-2", "lab-3", "lab-4"]
    assert lines[-1]["event"] == "end" and lines[-1]["exit"] == 2
    assert "uncordoned again" in out.stderr  # a run that starts nothing lifts its own cordon
    listed = console.run("cordon", "--json")
    assert json.loads(listed.stdout) == [], listed.stdout

    # a cordoned host is offered nowhere
    assert console.run("cordon", "lab-4", "--reason", "firmware update", "--lab", lab).returncode == 0
    out = console.run("evacuate", "lab-1", "--lab", lab, "--yes", "--json", "--skip-blocked", timeout=180)
    assert out.returncode == 0, out.stderr
    lines = events(out.stdout)
    moves = {m["vm"]: m for m in lines[0]["moves"]}
    for vm in ("web", "sev-a", "sev-b"):
        assert moves[vm]["target"] == "lab-2"
        why = dict((r["target"], r["why"]) for r in moves[vm]["refusals"])
        assert "lab-4 is cordoned since" in why["lab-4"] and "sevconsole uncordon lab-4" in why["lab-4"]
    final = {e["vm"]: e for e in lines if e["event"] == "guest"}
    assert {vm: final[vm]["status"] for vm in guests} == {vm: "blocked" if vm in BLOCKED else "moved" for vm in guests}
    end = lines[-1]
    assert end["event"] == "end" and end["exit"] == 0
    summary = end["summary"]
    assert (summary["moved"], summary["blocked"], summary["failed"]) == (len(MOVABLE), len(BLOCKED), 0)

    where = one_copy_each(mixed, before, ("lab-1", "lab-2", "lab-3", "lab-4"))
    assert {vm for vm, host in where.items() if host == "lab-1"} == set(BLOCKED)
    assert "lab-4" not in where.values()
    assert {where[vm] for vm in ("web", "sev-a", "sev-b")} == {"lab-2"}

    # the evacuated host stays cordoned; discover says so
    found = {h["name"]: h for h in json.loads(console.run("discover", "--lab", lab, "--json").stdout)}
    assert (found["lab-1"]["cordoned"], found["lab-2"]["cordoned"], found["lab-4"]["cordoned"]) == (True, False, True)
    assert "lab-1 (lab) cordoned" in console.run("discover", "--lab", lab).stdout

    # again: only the blocked guests are left: refused, even with --skip-blocked
    again = console.run("evacuate", "lab-1", "--lab", lab, "--yes", "--skip-blocked")
    assert again.returncode == 2 and "no guest on lab-1 can move" in again.stdout

    # uncordon: 0, then 1 (not cordoned); the cordon list as JSON
    assert console.run("uncordon", "lab-4").returncode == 0
    assert console.run("uncordon", "lab-4").returncode == 1
    assert [c["host"] for c in json.loads(console.run("cordon", "--json").stdout)] == ["lab-1"]
    assert console.run("uncordon", "lab-1").returncode == 0


PSP_MIB = 4  # with the realistic PSP: about 3 s a guest


@pytest.fixture(scope="module")
def psp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A realistic PSP everywhere; lab-1 runs three idle SEV guests; lab-2..4 all take them."""
    hosts = tuple(HostSpec(f"lab-{i}", RECENT_API, "a", realistic_psp=True) for i in (1, 2, 3, 4))
    guests = tuple(VmSpec(f"g{i}", True, DB_POLICY, mem_mib=PSP_MIB) for i in (1, 2, 3))
    lab = Lab.start(tmp_path_factory.mktemp("evac-psp") / "lab", layout=(replace(hosts[0], vms=guests), *hosts[1:]))
    try:
        yield lab
    finally:
        lab.stop()


GUESTS = ["g1", "g2", "g3"]


def kill_host(lab: Lab, name: str) -> None:
    os.kill(lab.host(name).pid, signal.SIGKILL)
    lab.host(name).process.wait(timeout=10)


def in_pre_copy(e: dict) -> bool:
    return e.get("event") == "guest" and e.get("phase") == "pre-copy" and (e.get("percent") or 0) > 10


def test_a_re_run_continues_an_evacuation_whose_command_died(psp: Lab, console: Console) -> None:
    """`evacuate` SIGKILLed mid pre-copy: the runner finishes that guest and `evacuate` again
    follows it (never started twice). That run SIGKILLed in turn, with the runner of its guest in
    pre-copy: the next run reconciles that migration first (`recover`: back to one copy), then
    moves what is left. One evacuation (same id), every guest on the target, memory unchanged."""
    before = digests(psp, GUESTS)
    argv = ("evacuate", "lab-1", "--to", "lab-4", "--lab", str(psp.paths.root), "--yes", "--json")
    client = console.start(*argv)
    try:
        plan = client.until(lambda e: e.get("event") == "plan", timeout=60)
        assert plan is not None
        first = client.until(in_pre_copy, timeout=60)
        assert first is not None
        client.kill(signal.SIGKILL)
        client.proc.wait(10)
    finally:
        client.close()

    client = console.start(*argv)
    try:
        again = client.until(lambda e: e.get("event") == "plan", timeout=60)
        assert again is not None and again["id"] == plan["id"]
        assert first["vm"] not in {m["vm"] for m in again["moves"]}  # followed or moved: never planned twice
        second = client.until(lambda e: in_pre_copy(e) and e["vm"] != first["vm"], timeout=60)
        assert second is not None
        runner = Console.runner_pid(console.migrations / second["migration_id"])
        client.kill(signal.SIGKILL)
        os.kill(runner, signal.SIGKILL)
        client.proc.wait(10)
    finally:
        client.close()
    Console.wait_runner_gone(console.migrations / second["migration_id"], timeout=10)

    out = console.run(*argv, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "recovering the unfinished migrations of lab-1" in out.stderr
    lines = events(out.stdout)
    assert lines[0]["event"] == "plan" and lines[0]["id"] == plan["id"]
    assert lines[-1]["summary"]["moved"] == 3, lines[-1]
    final = {e["vm"]: e for e in lines if e.get("event") == "guest"}
    assert {vm: final[vm]["status"] for vm in GUESTS} == {vm: "moved" for vm in GUESTS}
    assert one_copy_each(psp, before, ("lab-1", "lab-4")) == {vm: "lab-4" for vm in GUESTS}


def test_a_target_killed_mid_evacuation_is_planned_around(psp: Lab, console: Console) -> None:
    before = digests(psp, GUESTS)  # on lab-4 now
    client = console.start("evacuate", "lab-4", "--to", "lab-2", "lab-3", "--lab", str(psp.paths.root), "--yes",
                           "--json")
    try:
        plan = client.until(lambda e: e.get("event") == "plan", timeout=60)
        assert plan is not None and not plan["blockers"]
        assert {m["target"] for m in plan["moves"]} == {"lab-2", "lab-3"}
        hit = client.until(in_pre_copy, timeout=60)  # the first guest in pre-copy: its target dies
        assert hit is not None
        victim, dead = hit["vm"], hit["target"]
        alive = "lab-2" if dead == "lab-3" else "lab-3"
        kill_host(psp, dead)
        lines = client.rest(timeout=150)
    finally:
        client.close()
    assert client.proc.returncode == 0, client.stderr()[-2000:]
    final = {e["vm"]: e for e in lines if e.get("event") == "guest"}
    assert {vm: (final[vm]["status"], final[vm]["target"]) for vm in GUESTS} == {vm: ("moved", alive) for vm in GUESTS}
    assert final[victim]["attempts"] == 2
    notes = [e["text"] for e in lines if e.get("event") == "note"]
    assert any(f"{dead} dropped from the plan" in n for n in notes), notes
    assert any("PSP measured at" in n for n in notes), notes
    assert one_copy_each(psp, before, ("lab-2", "lab-3", "lab-4")) == {vm: alive for vm in GUESTS}

    # the other way round, with no target left: the guests stay (exit 1), one copy each
    client = console.start("evacuate", alive, "--to", "lab-1", "--lab", str(psp.paths.root), "--yes", "--json")
    try:
        plan = client.until(lambda e: e.get("event") == "plan", timeout=60)
        assert plan is not None and plan["moves"] == [] and plan["blockers"], plan  # lab-1 is still cordoned
        client.rest(timeout=30)
    finally:
        client.close()
    assert client.proc.returncode == 2
    assert console.run("uncordon", "lab-1").returncode == 0
    client = console.start("evacuate", alive, "--to", "lab-1", "--lab", str(psp.paths.root), "--yes", "--json")
    try:
        hit = client.until(in_pre_copy, timeout=60)
        assert hit is not None and hit["target"] == "lab-1"
        kill_host(psp, "lab-1")
        lines = client.rest(timeout=120)
    finally:
        client.close()
    assert client.proc.returncode == 1, client.stderr()[-2000:]
    final = {e["vm"]: e for e in lines if e.get("event") == "guest"}
    assert {final[vm]["status"] for vm in GUESTS} == {"failed"}
    assert all(f"stays on {alive}" in final[vm]["note"] for vm in GUESTS)
    assert one_copy_each(psp, before, (alive,)) == {vm: alive for vm in GUESTS}
