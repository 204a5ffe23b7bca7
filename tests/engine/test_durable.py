"""A migration outlives its operator: `sevconsole migrate` as a real process on a lab with a
realistic PSP (every phase lasts), its client and its runner killed by SIGHUP, SIGTERM and
SIGKILL at seeded points in each phase, then (for the runner) `sevconsole recover`; every time an
independent census of the hosts (tests/reliability/rig.py: each copy's firmware state over its
own QMP socket) must find exactly one runnable copy holding the guest's memory as it was."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sevconsole import priority
from sevconsole.engine import journal, runner
from sevconsole.lab import Lab
from tests.reliability.rig import Census, Client, Console, census, outcome_of, reach, settle, tidy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

VM = "web"
HOSTS = ("lab-1", "lab-2")
MEM_MIB = 8  # with the realistic PSP: about 5 s of pre-copy


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    running = Lab.start(tmp_path_factory.mktemp("durable") / "lab", hosts=2, mem_mib=MEM_MIB, realistic_psp=True)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    made = Console.make(tmp_path / "console")
    yield made
    made.close()


@dataclass(frozen=True)
class Start:
    home: str  # the host running the guest now
    other: str
    digest: str  # the guest's memory before the migration


def begin(lab: Lab) -> Start:
    """The guest alone on one host (leftover SENT copies of earlier runs quit), and its digest."""
    home = asyncio.run(tidy(lab, VM))
    now = asyncio.run(settle(lab, VM, HOSTS))
    assert home is not None and len(now.runnable) == 1, now.describe()
    other = HOSTS[1] if home == HOSTS[0] else HOSTS[0]
    return Start(home, other, str(now.runnable[0].digest))


@pytest.fixture
def start(lab: Lab) -> Start:
    return begin(lab)


def migrate(console: Console, lab: Lab, start: Start) -> tuple[Client, Path]:
    known = console.folders()
    client = console.start("migrate", VM, "--to", start.other, "--lab", str(lab.paths.root), "--yes", "--json")
    return client, console.migration(known=known)


@dataclass(frozen=True)
class Killed:
    start: Start
    folder: Path
    where: str  # "phase/journal step" when the signal was sent
    client_exit: int | None
    client_stderr: str


def kill_at(lab: Lab, console: Console, victim: str, sig: int, point: str, fraction: float = 0.0) -> Killed:
    """Starts `migrate` and sends `sig` to its client or its runner once the migration reaches
    `point`. A late point is short (tens of ms): when the migration ended before the signal
    landed (a loaded machine), it is tried again from where the guest is then, at most 3 times."""
    tried = []
    for _ in range(3):
        start = begin(lab)
        client, folder = migrate(console, lab, start)
        try:
            where = reach(client, folder, point, fraction)
            pid = client.proc.pid if victim == "client" else console.runner_pid(folder)
            with contextlib.suppress(ProcessLookupError):  # already gone: the signal came too late
                os.kill(pid, sig)
            if victim == "client":
                client.proc.wait(30)
            else:
                client.rest()
        finally:
            client.close()
        exit_code = client.proc.returncode
        if victim == "client":
            landed = exit_code == -sig
        else:
            read = console.wait_runner_gone(folder, timeout=10 if sig == signal.SIGKILL else 60)
            landed = sig != signal.SIGKILL or (read.step is not None and not read.step.terminal)
        if landed:
            return Killed(start, folder, where, exit_code, client.stderr())
        tried.append(where)
        console.wait_runner_gone(folder)
    raise AssertionError(f"the migration always ended before {signal.Signals(sig).name} reached its {victim}: "
                         f"{tried}")


def one_copy(lab: Lab, start: Start, on: str | None = None) -> Census:
    """The promise, checked on the hosts themselves: exactly one runnable copy, memory unchanged."""
    now = asyncio.run(settle(lab, VM, HOSTS))
    assert len(now.runnable) == 1, now.describe()
    assert now.runnable[0].digest == start.digest, now.describe()
    if on is not None:
        assert now.runnable[0].host == on, now.describe()
    return now


def listed(console: Console, folder: Path) -> dict:
    out = console.run("migrations", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["id"]: row for row in map(json.loads, out.stdout.splitlines())}
    return rows[folder.name]


def recover_json(out: subprocess.CompletedProcess[str]) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines and "summary" in lines[-1], out.stdout + out.stderr
    return lines[:-1], lines[-1]["summary"]


# ------------------------------------------------------------------ the client goes away

@pytest.mark.parametrize(("sig", "point", "seed"), [
    (signal.SIGHUP, "pre-copy", 1),  # a closed terminal or a dropped SSH session; then `watch`
    (signal.SIGTERM, "stop-and-copy", 2),
    (signal.SIGKILL, "send-start", 3),
], ids=["SIGHUP-pre-copy", "SIGTERM-stop-and-copy", "SIGKILL-send-start"])
def test_a_killed_client_never_stops_the_migration(lab: Lab, console: Console, sig: int, point: str,
                                                    seed: int) -> None:
    fraction = random.Random(seed).uniform(0.1, 0.4)
    killed = kill_at(lab, console, "client", sig, point, fraction)
    start, folder = killed.start, killed.folder
    watched = None
    if sig == signal.SIGHUP:  # another terminal re-attaches mid-way and sees the end
        watched = console.run("migrations", "watch", folder.name, "--json", timeout=60)
    read = console.wait_runner_gone(folder)
    assert read.step == journal.Step.DONE, (killed.where, read.records)
    outcome = outcome_of(folder)
    assert outcome is not None and outcome["result"] == "done" and outcome["runnable"] == [start.other]
    one_copy(lab, start, on=start.other)
    row = listed(console, folder)
    assert (row["state"], row["in_flight"], row["unfinished"]) == ("done", False, False), row
    if watched is not None:
        assert watched.returncode == 0, watched.stderr
        lines = [json.loads(line) for line in watched.stdout.splitlines()]
        phases = [line["phase"] for line in lines if "phase" in line]
        assert phases and phases[0] in ("pre-copy", "stop-and-copy", "finishing"), (killed.where, phases)
        assert phases[-1] == "done" and lines[-1]["migration"] == folder.name
        assert lines[-1]["outcome"]["result"] == "done", lines[-1]


# ------------------------------------------------------------------ the runner is signalled

def test_the_runner_ignores_sighup(lab: Lab, console: Console, start: Start) -> None:
    client, folder = migrate(console, lab, start)
    try:
        reach(client, folder, "pre-copy", 0.2)
        pid = console.runner_pid(folder)
        # it yields the CPU to the console beside it, as a process and as its own session's group
        assert os.getpriority(os.PRIO_PROCESS, pid) >= runner.RUNNER_NICE
        assert priority.group_nice(pid) in (None, runner.RUNNER_NICE)
        os.kill(pid, signal.SIGHUP)
        lines = client.rest()
        assert client.proc.returncode == 0, client.stderr()
    finally:
        client.close()
    assert lines[-1]["outcome"]["result"] == "done", lines[-1]
    assert console.wait_runner_gone(folder).step == journal.Step.DONE
    one_copy(lab, start, on=start.other)


@pytest.mark.parametrize("point", ["pre-copy", "send-finished"])
def test_sigterm_to_the_runner_cancels_and_one_copy_runs(lab: Lab, console: Console, start: Start,
                                                         point: str) -> None:
    client, folder = migrate(console, lab, start)
    try:
        where = reach(client, folder, point, 0.3)
        with contextlib.suppress(ProcessLookupError):  # at send-finished it may have ended already
            os.kill(console.runner_pid(folder), signal.SIGTERM)
        lines = client.rest()
    finally:
        client.close()
    read = console.wait_runner_gone(folder)
    # mid pre-copy a cancel rolls back; once SEND_FINISH was seen the guest only goes forward
    expected = journal.Step.ROLLED_BACK if point == "pre-copy" else journal.Step.DONE
    assert read.step == expected, (where, read.records)
    home = start.home if read.step == journal.Step.ROLLED_BACK else start.other
    one_copy(lab, start, on=home)
    outcome = lines[-1]["outcome"]
    assert outcome["runnable"] == [home], outcome
    if read.step == journal.Step.ROLLED_BACK:
        assert client.proc.returncode == 1 and outcome["result"] == "cancelled", outcome
        assert "SIGTERM" in outcome["message"] or "SIGTERM" in client.stderr(), outcome


@pytest.mark.parametrize(("point", "seed"), [
    ("target-launched", 11), ("pre-copy", 12), ("stop-and-copy", 13), ("send-finished", 14)])
def test_a_killed_runner_is_recovered_to_one_copy(lab: Lab, console: Console, point: str, seed: int) -> None:
    fraction = random.Random(seed).uniform(0.05, 0.9)
    killed = kill_at(lab, console, "runner", signal.SIGKILL, point, fraction)
    start, folder, where = killed.start, killed.folder, killed.where
    assert killed.client_exit == 1, killed.client_stderr
    assert "stopped before the end" in killed.client_stderr and "sevconsole recover" in killed.client_stderr
    row = listed(console, folder)
    assert row["unfinished"] and not row["in_flight"] and "run recover" in row["state"], row

    if point == "pre-copy":  # two recovers at once: one waits for the other, one reconciles
        outs = two_recovers(console, lab)
        assert [o.returncode for o in outs] == [0, 0], [o.stderr for o in outs]
        results = [r for o in outs for r in recover_json(o)[0]]
        assert sum(s["reconciled"] for s in (recover_json(o)[1] for o in outs)) == 1, results
    else:
        outs = [console.run("recover", "--lab", str(lab.paths.root), "--json")]
        assert outs[0].returncode == 0, outs[0].stdout + outs[0].stderr
        results = recover_json(outs[0])[0]
    assert [r["id"] for r in results] == [folder.name] and results[0]["result"] == "reconciled", results
    now = one_copy(lab, start)
    assert results[0]["runnable"] == [now.runnable[0].host], (where, results, now.describe())
    assert results[0]["step"] == ("done" if now.runnable[0].host == start.other else "rolled-back")
    row = listed(console, folder)
    assert row["step"] in ("done", "rolled-back") and not row["unfinished"] and not row["in_flight"], row
    # the list says how recover ended it (not a runner's outcome, which there is none of)
    assert (row["result"], row["message"], row["runnable"]) == (
        results[0]["step"], results[0]["sentence"], results[0]["runnable"]), row
    again = console.run("recover", "--lab", str(lab.paths.root), "--json")
    assert again.returncode == 0 and recover_json(again) == ([], {"reconciled": 0, "needs_operator": 0,
                                                                 "skipped": 0}), again.stdout


def two_recovers(console: Console, lab: Lab) -> list[subprocess.CompletedProcess[str]]:
    """Two recovers started while a third holds the lock, released together: both must end well."""
    console.migrations.mkdir(parents=True, exist_ok=True)
    fd = os.open(console.migrations / "recover.lock", os.O_RDWR | os.O_CREAT, 0o600)
    clients = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        clients = [console.start("recover", "--lab", str(lab.paths.root), "--json", name=f"recover{i}")
                   for i in (1, 2)]
        for c in clients:
            c.until(lambda _: False, 30, also=lambda c=c: "waiting" in c.stderr())
    finally:
        os.close(fd)
    outs = []
    for c in clients:
        c.rest(60)
        outs.append(subprocess.CompletedProcess(c.proc.args, c.proc.returncode,
                                                "".join(json.dumps(line) + "\n" for line in c.lines), c.stderr()))
        c.close()
    assert all("another recover is running: waiting" in o.stderr for o in outs), [o.stderr for o in outs]
    return outs


# ------------------------------------------------------------------ a journal that cannot be trusted

def test_a_corrupt_journal_is_named_and_nothing_is_touched(lab: Lab, console: Console) -> None:
    killed = kill_at(lab, console, "runner", signal.SIGKILL, "pre-copy", 0.2)
    start, folder = killed.start, killed.folder
    before = hosts_view(asyncio.run(settle(lab, VM, HOSTS)))  # the stream ended by itself meanwhile
    path = folder / "journal.jsonl"
    good = path.read_bytes()
    lines = good.split(b"\n")
    assert len(lines) >= 4, good  # planned, target-launched, streaming (and the empty tail)
    bad = bytearray(good)
    bad[len(lines[0]) + 1 + len(lines[1]) // 2] ^= 0x01  # the middle of record 2
    path.write_bytes(bytes(bad))

    out = console.run("recover", "--lab", str(lab.paths.root), "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    results, summary = recover_json(out)
    assert summary["needs_operator"] == 1 and results[0]["result"] == "needs-operator", results
    assert str(path) in results[0]["sentence"] and "record 2" in results[0]["sentence"], results
    assert results[0]["actions"] == [], results
    assert path.read_bytes() == bytes(bad)  # not one record appended to a journal not trusted
    assert hosts_view(asyncio.run(census(lab, VM, HOSTS, digests=False))) == before
    row = listed(console, folder)
    assert row["state"] == "corrupt journal" and any("record 2" in p for p in row["problems"]), row

    path.write_bytes(good)  # the operator restores it: recover then finishes the migration
    out = console.run("recover", "--lab", str(lab.paths.root), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    one_copy(lab, start)


def hosts_view(now: Census) -> set[tuple[str, int, str, int | None]]:
    return {(c.host, c.pid, c.status, c.guest_state) for c in now.copies}


# ------------------------------------------------------------------ the launch window

def test_a_runner_killed_between_launching_the_target_and_its_record_leaves_no_incoming_vm(
        lab: Lab, console: Console) -> None:
    # The runner's state in that window, made exactly: killed right after target-launched was
    # recorded (before streaming), then the journal as it was an instant earlier (planned only).
    for _ in range(3):
        killed = kill_at(lab, console, "runner", signal.SIGKILL, "target-launched")
        read = journal.read(killed.folder / "journal.jsonl")
        if [r.step for r in read.records] == [journal.Step.PLANNED, journal.Step.TARGET_LAUNCHED]:
            break
        assert console.run("recover", "--lab", str(lab.paths.root)).returncode == 0  # streaming: again
    else:
        raise AssertionError("the runner was never caught between target-launched and streaming")
    path = killed.folder / "journal.jsonl"
    path.write_bytes(path.read_bytes().split(b"\n", 1)[0] + b"\n")
    out = console.run("recover", "--lab", str(lab.paths.root), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    now = asyncio.run(census(lab, VM, HOSTS))  # not settle(): a leaked incoming VM waits forever
    assert [(c.host, c.digest) for c in now.runnable] == [(killed.start.home, killed.start.digest)], \
        now.describe()  # the promise itself holds
    assert [c for c in now.copies if c.host == killed.start.other] == [], now.describe()
