"""A driver that dies after each journaled decision, then reconciliation and the attention list:
the engine runs in this process on a real lab and "dies" (a BaseException from its journal hook,
right after the record is durable); recover then brings the guest to exactly one runnable copy,
by an independent census, with its memory digest unchanged."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sevconsole.engine import attention, journal
from sevconsole.engine.checks import preflight
from sevconsole.engine.machine import Step
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.recover import apply_fix, reconcile
from sevconsole.engine.run import Migration
from sevconsole.engine.ssh import SshHost
from sevconsole.hosts.chains import trust_with_lab_root
from sevconsole.hosts.discovery import discover
from sevconsole.hosts.fleet import Fleet, open_fleet, pick_vm
from tests.conftest import ROOT
from tests.reliability.rig import census, settle

try:
    from sevconsole.lab.control import Lab
except ImportError as exc:
    pytest.skip(f"the lab cannot be imported: {exc}", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class Died(BaseException):
    """The driver process is gone (nothing after this point runs)."""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab.start(tmp_path / "lab", 2, mem_mib=16, realistic_psp=True) as running:
        yield running


def reports(fleet: Fleet, pool: Any) -> list[Any]:
    return discover(list(fleet.hosts), fleet.options, pool=pool)


async def die_at(lab: Lab, step: Step) -> tuple[Fleet, str]:
    """Migrate web lab-1 -> lab-2 and die right after `step` is journaled."""
    fleet = open_fleet(lab=Path(lab.paths.root))
    pool = fleet.options.pool()
    try:
        found = await asyncio.to_thread(reports, fleet, pool)
        source, target = found
        plan = MigrationPlan(vm=pick_vm([source], "web"), source=source, target=target)
        migration_id, where = journal.create({"vm": "web", "source": "lab-1", "target": "lab-2",
                                              "where": fleet.where()})
        log = journal.Journal(where / "journal.jsonl")

        def record(recorded: Step, data: dict[str, Any]) -> None:
            log.append(recorded, **data)
            if recorded == step:
                raise Died(step)

        links = [SshHost(r.name, r.address, fleet.connection(pool, r.name)) for r in (source, target)]
        migration = Migration(plan, *links, checks=preflight(plan, trust_with_lab_root(fleet.lab_root)),
                              on_step=record, audit_log=False)
        with pytest.raises(Died):
            await migration.run()
        for link in links:
            await link.close()
    finally:
        pool.close()
    return fleet, migration_id


@pytest.mark.parametrize(("step", "ends_on"), [(Step.TARGET_LAUNCHED, "lab-1"), (Step.STREAMING, "lab-1"),
                                               (Step.SEND_FINISHED, "lab-2")])
async def test_recover_after_the_driver_died(lab: Lab, step: Step, ends_on: str) -> None:
    before = await census(lab, "web")
    digest = before.runnable[0].digest
    fleet, migration_id = await die_at(lab, step)
    entry = journal.entry(migration_id)
    assert entry.unfinished and entry.step == step
    result = await reconcile(entry, fleet)
    assert result.result == "reconciled", result.sentence
    assert result.runnable == (ends_on,)
    after = await settle(lab, "web", ("lab-1", "lab-2"))
    assert [c.host for c in after.runnable] == [ends_on], after.describe()
    assert after.runnable[0].digest == digest
    assert journal.entry(migration_id).finished


async def test_attention_offers_recover_then_cont(lab: Lab) -> None:
    """The issue's picture: web SENT (postmigrate) on lab-1 and paused on lab-2, no migration in
    flight. With its journal, the safe action is recover; without one, `cont` on lab-2."""
    fleet, migration_id = await die_at(lab, Step.SEND_FINISHED)
    pool = fleet.options.pool()
    try:
        found = await asyncio.to_thread(reports, fleet, pool)
    finally:
        pool.close()
    entries = journal.entries()
    items = attention.find(found, [e for e in entries if e.in_flight], [e for e in entries if e.unfinished])
    (item,) = [i for i in items if i.vm == "web"]
    assert item.action is not None and item.action.fix == attention.Fix.RECOVER
    assert item.action.migration_id == migration_id

    # discover says the same, as text and as JSON on each copy of web
    out = subprocess.run([sys.executable, "-m", "sevconsole", "discover", "--lab", str(lab.paths.root), "--json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    copies = [vm for host in json.loads(out.stdout) for vm in host["vms"] if vm["name"] == "web"]
    assert copies and all(vm["attention"]["action"]["migration"] == migration_id for vm in copies)
    text = subprocess.run([sys.executable, "-m", "sevconsole", "discover", "--lab", str(lab.paths.root)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT).stdout
    assert "attention (1):" in text and f"reconcile migration {migration_id}" in text

    (blind,) = [i for i in attention.find(found) if i.vm == "web"]  # no journal: what the hosts show
    assert blind.action is not None and blind.action.fix == attention.Fix.CONT
    assert blind.action.host == "lab-2" and "paused" in blind.problem
    sentence = await apply_fix(blind.action, fleet)
    assert "resumed" in sentence
    after = await settle(lab, "web", ("lab-1", "lab-2"))
    assert [c.host for c in after.runnable] == ["lab-2"], after.describe()
    # and now nothing needs attention for web
    pool = fleet.options.pool()
    try:
        again = await asyncio.to_thread(reports, fleet, pool)
    finally:
        pool.close()
    assert not [i for i in attention.find(again) if i.vm == "web"]
