"""VM names are not paths: a lab host whose VMs are named `../../x`, `a/b` or `vault[/]` starts,
keeps every socket in its run folder, launches incoming VMs of those names there, survives, and
migrates such a VM with the engine (discovery, preflight, SshHost) like any other."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevconsole.engine.argv_policy import require_target_argv
from sevconsole.engine.checks import preflight, refused
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.run import Migration
from sevconsole.lab.argv import build_argv, parse_argv
from sevconsole.lab.host import file_stem
from sevconsole.lab.layout import DB_POLICY, VmSpec, default_layout
from sevconsole.lab.qmp import QmpServer
from tests.engine.conftest import LabSession, open_lab_session

from .conftest import helper

HOSTILE = ("../../x", "a/b", "vault[/]", "..", ".hidden", "x,helper=y", "")


@pytest.mark.parametrize("name", HOSTILE + ("web", "é/ü" * 40))
def test_file_stem_is_one_plain_file_name(name: str) -> None:
    stem = file_stem(name)
    assert stem and "/" not in stem and not stem.startswith(".") and len(stem) <= 48
    assert stem.isascii() and os.path.basename(stem) == stem
    if name == "web":
        assert stem == "web"


@pytest.mark.parametrize("name", [n for n in HOSTILE if n] + ["g=h", "a,,b"])
def test_names_survive_the_lab_argv_and_the_allow_list(name: str) -> None:
    argv = build_argv(name, 64, True, DB_POLICY, "/run/x.qmp")
    assert parse_argv(argv).name == name
    assert parse_argv(list(require_target_argv(argv).argv)).name == name


async def test_a_stale_path_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.qmp"
    path.write_text("not ours")
    with pytest.raises(OSError):
        await QmpServer(str(path), {}).start()
    assert path.read_text() == "not ours"
    stale = tmp_path / "stale.qmp"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    server = QmpServer(str(stale), {})
    await server.start()  # a socket left behind is ours to replace
    await server.close()


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSession]:
    """lab-1 holds SEV guests with hostile names; lab-2 is the default target."""
    hosts = default_layout(2, mem_mib=8)
    vms = tuple(VmSpec(name=n, sev=True, policy=DB_POLICY, mem_mib=8) for n in ("../../x", "a/b", "vault[/]"))
    layout = (dataclasses.replace(hosts[0], vms=vms), hosts[1])
    yield from open_lab_session(tmp_path_factory.mktemp("named"), tmp_path_factory.mktemp("amd"), layout=layout)


def _sockets_inside_run_dirs(session: LabSession) -> None:
    lab = session.lab
    run_dirs = {h.sockets.resolve() for h in lab.hosts}
    state = lab.paths.root.resolve()
    for found in [*state.rglob("*.qmp"), *run_dirs.pop().parent.rglob("*.qmp")]:
        assert found.resolve().parent in {h.sockets.resolve() for h in lab.hosts}, found
    for h in lab.hosts:
        for path in h.qmp.values():
            assert Path(path).resolve().parent == h.sockets.resolve(), path


@pytest.mark.slow
def test_hostile_names_start_and_launch_inside_the_run_folder(named: LabSession) -> None:
    lab = named.lab
    _sockets_inside_run_dirs(named)
    probe = helper(lab, "lab-1", "probe")
    assert sorted(v["name"] for v in probe["vms"]) == ["../../x", "a/b", "vault[/]"]  # names kept for display
    for vm in probe["vms"]:
        argv = list(require_target_argv(vm["argv"], "lab-2").argv)  # as the console hands it over
        answer = helper(lab, "lab-2", "launch-incoming", {"argv": argv})
        assert Path(answer["qmp"]).parent == lab.host("lab-2").sockets, answer
        assert Path(answer["qmp"]).name == f"{file_stem(vm['name'])}-{answer['pid']}.qmp"
        assert helper(lab, "lab-2", f"stop {answer['pid']}") == {"stopped": True}
    _sockets_inside_run_dirs(named)
    assert all(h.alive for h in lab.hosts)
    assert helper(lab, "lab-2", "probe")["hostname"] == "lab-2"  # still serving


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_vm_named_dot_dot_slash_x_migrates(named: LabSession) -> None:
    reports = named.reports("lab-1", "lab-2", need=("../../x",))
    vm = reports["lab-1"].vm("../../x")
    assert vm is not None
    plan = MigrationPlan(vm=vm, source=reports["lab-1"], target=reports["lab-2"])
    checks = preflight(plan, named.trust)
    assert not refused(checks), [c for c in checks if c.status.value == "fail"]
    src, dst = named.link(plan.source), named.link(plan.target)
    try:
        outcome = await asyncio.wait_for(Migration(plan, src, dst, checks=checks, audit_log=False,
                                                   poll_interval_s=0.05).run(), 90)
    finally:
        await src.close()
        await dst.close()
    assert outcome.result == "done", outcome
    assert outcome.runnable == ("lab-2",)
    assert outcome.target_qmp is not None
    assert Path(outcome.target_qmp).parent == named.lab.host("lab-2").sockets
    after = named.reports("lab-1", "lab-2", need=("../../x",))
    moved = after["lab-2"].vm("../../x")
    assert moved is not None and moved.status == "running" and moved.qmp_path == outcome.target_qmp
    _sockets_inside_run_dirs(named)
    assert all(h.alive for h in named.lab.hosts)
