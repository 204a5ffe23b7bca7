"""A migration seen through QMP is QEMU 7.2's on the lab: events, their order, run states and
query-migrate's shapes on both ends.

The same chain runs on real QEMUs (TCG, 16 MiB) and on lab VMs: A (running) -> B, started
without -S, over TCP; B paused -> C, started without -S, over a UNIX socket (a paused source
arrives paused: QEMU's global state, whatever the target's -S); then C's migration to a sink
that never reads is cancelled, at 4 KiB/s so that it is still active (sleeping between two
rate-limited sends) whenever the cancel comes: at 1 MB/s QEMU had sent all of a small guest's
few hundred KiB, and completed, when the test came 0.3 s late. Before its migration B meets the
incoming errors. Last, a migration blocker: lab-1's `legacy` (an SEV guest that never enabled
migration: QEMU's SEV blocker) against a QEMU whose ivshmem device blocks migration, the two
sentences aside.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from sevconsole.lab import Lab

from .conftest import helper
from .qmp_diff import Raw, Step, diff, event, normal, qemu

pytestmark = [pytest.mark.needs_qemu, pytest.mark.slow]

EVENTS_ON = {"execute": "migrate-set-capabilities",
             "arguments": {"capabilities": [{"capability": "events", "state": True}]}}
BAD_INCOMING = ["foo:bar", "tcp:nohostport", "unix:", "vsock:x", "fd:", "fd:x", "tcp:256.0.0.1:0",
                "unix:/nonexistent/dir/x", "tcp:[::1]"]


def command(name: str, args: dict | None = None) -> dict:
    return {"execute": name} if args is None else {"execute": name, "arguments": args}


class Side:
    """One side of the comparison: three monitors A, B, C and a folder for UNIX sockets."""

    def __init__(self, a: str, b: str, c: str, folder: Path) -> None:
        self.a, self.b, self.c = Raw(a), Raw(b), Raw(c)
        self.folder = folder
        for client in (self.a, self.b, self.c):
            client.request(command("qmp_capabilities"))

    blocked: Raw  # a VM whose migration QEMU blocks

    def port(self, client: Raw) -> int:
        [info] = client.request(command("query-migrate"))
        return int(info["return"]["socket-address"][0]["port"])


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    folder = tmp_path_factory.mktemp("conformance-migration")
    with ExitStack() as stack:
        a = stack.enter_context(qemu(folder, "a"))
        b = stack.enter_context(qemu(folder, "b", "-incoming", "defer"))
        c = stack.enter_context(qemu(folder, "c", "-incoming", "defer"))
        lab = stack.enter_context(Lab.start(folder / "lab", hosts=2, mem_mib=16))
        argv = next(v["argv"] for v in helper(lab, "lab-1", "probe")["vms"] if v["name"] == "plain")
        assert "-S" not in argv
        lab_b = helper(lab, "lab-2", "launch-incoming", {"argv": argv})["qmp"]
        lab_c = helper(lab, "lab-1", "launch-incoming", {"argv": argv})["qmp"]
        (folder / "q").mkdir()
        (folder / "l").mkdir()
        blocked = stack.enter_context(qemu(folder, "blocked", "-object", "memory-backend-ram,id=m,size=1M,share=on",
                                           "-device", "ivshmem-plain,memdev=m"))
        sides = (Side(a, b, c, folder / "q"), Side(lab.qmp_path("lab-1", "plain"), lab_b, lab_c, folder / "l"))
        sides[0].blocked, sides[1].blocked = Raw(blocked), Raw(lab.qmp_path("lab-1", "legacy"))
        yield sides


@pytest.fixture(scope="module")
def steps(sides: tuple[Side, Side]) -> list[Step]:
    out: list[Step] = []
    busy = socket.create_server(("127.0.0.1", 0))  # a port in use, for migrate-incoming's bind error
    sink = socket.create_server(("127.0.0.1", 0))  # accepts (in its backlog) and never reads
    try:
        for label, act in _script(busy.getsockname()[1], sink.getsockname()[1]):
            out.append(Step(label, act(sides[0]), act(sides[1])))
    finally:
        busy.close()
        sink.close()
    return out


def _script(busy: int, sink: int) -> Iterator[tuple[str, object]]:
    def req(who: str, data: dict):  # noqa: ANN202 - a step's action
        return lambda s: getattr(s, who).request(data)

    for uri in [*BAD_INCOMING, f"tcp:127.0.0.1:{busy}"]:
        yield f"B migrate-incoming {uri!r}", req("b", command("migrate-incoming", {"uri": uri}))
        yield f"B query-migrate after {uri!r}", req("b", command("query-migrate"))
    for name, args in (("query-status", None), ("query-migrate", None), ("stop", None), ("cont", None),
                       ("migrate", {"uri": "tcp:127.0.0.1:1"}), ("migrate-incoming", {"uri": "x"})):
        yield f"B (incoming) {name}", req("b", command(name, args))
    for who in "abc":
        yield f"{who.upper()} events on", req(who, EVENTS_ON)
    yield "B listens", req("b", command("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))
    yield "B query-migrate listening", req("b", command("query-migrate"))
    yield "B migrate-incoming again", req("b", command("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))

    def a_to_b(s: Side) -> list:
        s.a.send(command("migrate", {"uri": f"tcp:127.0.0.1:{s.port(s.b)}"}))
        return s.a.until(event("MIGRATION", "completed"))

    yield "A migrates to B (A's events)", a_to_b
    yield "B's events (RESUME before completed, no MIGRATION_PASS)", \
        lambda s: s.b.until(event("MIGRATION", "completed"))
    for who in "ab":
        for name in ("query-migrate", "query-status"):
            yield f"{who.upper()} {name} after", req(who, command(name))
    yield "A migrates again", req("a", command("migrate", {"uri": "tcp:127.0.0.1:1"}))
    yield "A cont after completing (plain guest)", req("a", command("cont"))
    yield "B stops", req("b", command("stop"))
    yield "C listens on a UNIX socket", \
        lambda s: s.c.request(command("migrate-incoming", {"uri": f"unix:{s.folder / 'c.sock'}"}))
    yield "C query-migrate listening", req("c", command("query-migrate"))

    def b_to_c(s: Side) -> list:
        s.b.send(command("migrate", {"uri": f"unix:{s.folder / 'c.sock'}"}))
        return s.b.until(event("MIGRATION", "completed"))

    yield "B (paused) migrates to C (B's events: no STOP)", b_to_c
    yield "C's events (no RESUME: it arrives paused)", lambda s: s.c.until(event("MIGRATION", "completed"))
    for who in "bc":
        for name in ("query-migrate", "query-status"):
            yield f"{who.upper()} {name} after", req(who, command(name))
    yield "C max-bandwidth 4 KiB/s", req("c", command("migrate-set-parameters", {"max-bandwidth": 4096}))

    def c_to_sink(s: Side) -> list:
        s.c.send(command("migrate", {"uri": f"tcp:127.0.0.1:{sink}"}))
        return s.c.until(event("MIGRATION", "active"))

    yield "C migrates to a sink (until active)", c_to_sink
    yield "C migrate-set-capabilities while active", req("c", EVENTS_ON)
    yield "C migrate while active", req("c", command("migrate", {"uri": "tcp:127.0.0.1:1"}))
    yield "C migrate_cancel (cancelling before the answer)", req("c", command("migrate_cancel"))
    yield "C cancelled", lambda s: s.c.until(event("MIGRATION", "cancelled"))
    for name in ("query-migrate", "query-status", "migrate_cancel"):
        yield f"C {name} after the cancel", req("c", command(name))


def test_a_migration_looks_the_same(steps: list[Step]) -> None:
    problems = diff(steps)
    assert not problems, f"{len(problems)} of {len(steps)} steps differ:\n" + "\n".join(problems)


def test_the_chain_did_what_it_says(steps: list[Step]) -> None:
    """The comparison means something only if QEMU itself went through every state."""
    by = {step.label: [normal(m) for m in step.qemu] for step in steps}
    names = [m.get("event") for m in by["B's events (RESUME before completed, no MIGRATION_PASS)"]]
    assert names == ["MIGRATION", "RESUME", "MIGRATION"]
    assert "RESUME" not in [m.get("event") for m in by["C's events (no RESUME: it arrives paused)"]]
    assert by["C query-status after"] == [{"return": {"status": "paused", "singlestep": False, "running": False}}]
    assert by["C query-migrate after the cancel"] == [{"return": {"status": "cancelled"}}]


def test_a_blocked_migration_is_refused_as_qemu_refuses_it(sides: tuple[Side, Side]) -> None:
    """blocked-reasons with no status; `migrate` refused with the blocker before its URI is read,
    no event, nothing recorded; `resume` is checked first."""
    transcripts = []
    for side in sides:
        client = side.blocked
        client.request(command("qmp_capabilities"))
        [reasons] = client.request(command("query-migrate"))
        blocker = reasons["return"]["blocked-reasons"][0]
        steps = [client.request(data) for data in (
            EVENTS_ON, command("migrate", {"uri": "tcp:127.0.0.1:1"}), command("migrate", {"uri": "foo:bar"}),
            command("migrate", {"uri": "tcp:127.0.0.1:1", "resume": True}), command("query-migrate"))]
        transcripts.append(json.loads(json.dumps(normal(steps)).replace(json.dumps(blocker)[1:-1], "<blocker>")))
    assert transcripts[0] == transcripts[1]
    assert transcripts[1][1] == [{"error": {"class": "GenericError", "desc": "<blocker>"}}]
    assert transcripts[1][4] == [{"return": {"blocked-reasons": ["<blocker>"]}}]
    lab_blocker = sides[1].blocked.request(command("query-migrate"))[0]["return"]["blocked-reasons"]
    assert lab_blocker == ["SEV: Migration is not implemented"]
