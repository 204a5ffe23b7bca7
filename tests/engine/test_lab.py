"""The engine on the lab over real SSH and QMP: SEV refusals (the guest's consent among them), a
cancelled SEV migration, a full SEV migration with the guest digest compared, and a paused guest
that arrives paused. Tests run in file order on one lab: `web` goes to lab-2 and back paused."""

from __future__ import annotations

import json
import socket
import time

import pytest

from sevconsole.engine.checks import CheckStatus, preflight, refused
from sevconsole.engine.plan import MigrationPlan
from sevconsole.engine.progress import Phase, Progress
from sevconsole.engine.run import Migration
from sevconsole.hosts.report import VmInfo
from sevconsole.sev.pagestate import PageState
from sevconsole.sev.status import GuestState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _plan(session, vm: str, src: str, dst: str, **kw) -> MigrationPlan:
    reports = session.reports(src, dst, need=(vm,))
    source = reports[src]
    found = source.vm(vm)
    assert found is not None, f"{vm} not on {src}"
    return MigrationPlan(vm=found, source=source, target=reports[dst], **kw)


def test_refusals_on_the_lab(lab_session) -> None:
    """lab-3 has another OCA domain and API 0.17 < web's 0.24; vault is NOSEND."""
    checks = {c.key: c for c in preflight(_plan(lab_session, "web", "lab-1", "lab-3"), lab_session.trust)}
    assert checks["domain"].status is CheckStatus.FAIL and "lab-3" in checks["domain"].sentence
    assert checks["api"].status is CheckStatus.FAIL and "0.17" in checks["api"].sentence
    assert checks["chain"].status is CheckStatus.PASS and "lab root" in checks["chain"].sentence
    # The lab host reports its free memory (64 GiB less its guests) through the probe.
    assert checks["memory"].status is CheckStatus.PASS and "MiB available" in checks["memory"].sentence
    vault = {c.key: c for c in preflight(_plan(lab_session, "vault", "lab-1", "lab-2"), lab_session.trust)}
    assert vault["nosend"].status is CheckStatus.FAIL
    # Without the lab root the same chain is untrusted.
    plain_trust = {c.key: c for c in preflight(_plan(lab_session, "web", "lab-1", "lab-2"))}
    assert plain_trust["chain"].status is CheckStatus.FAIL


async def test_refused_plan_starts_nothing(lab_session, data_dir) -> None:
    plan = _plan(lab_session, "vault", "lab-1", "lab-2")
    checks = preflight(plan, lab_session.trust)
    assert refused(checks)
    src, dst = lab_session.link(plan.source), lab_session.link(plan.target)
    outcome = await Migration(plan, src, dst, checks=checks).run()
    assert outcome.result == "refused" and "NOSEND" in outcome.message
    assert outcome.bytes_transferred == 0
    after = lab_session.reports("lab-1", "lab-2", need=("vault",))
    assert after["lab-1"].vm("vault").status == "running"
    assert [v.name for v in after["lab-2"].vms] == [v.name for v in plan.target.vms]  # no incoming VM
    line = json.loads((data_dir / "audit.jsonl").read_text().splitlines()[-1])
    assert line["outcome"] == "refused" and line["vm"] == "vault"


async def test_sev_guest_is_never_migrated_in_plain(lab_session) -> None:
    """A plan that lost web's SEV state (a half-answered probe) is refused by preflight, and the
    engine itself refuses it too when run without checks: query-sev says SEV."""
    plan = _plan(lab_session, "web", "lab-1", "lab-2")
    blind = VmInfo(**{**plan.vm.__dict__, "sev_enabled": False, "policy": None})
    bad = MigrationPlan(vm=blind, source=plan.source, target=plan.target)
    vm_check = {c.key: c for c in preflight(bad, lab_session.trust)}["vm"]
    assert vm_check.status is CheckStatus.FAIL and "sev-guest" in vm_check.sentence
    src, dst = lab_session.link(plan.source), lab_session.link(plan.target)
    outcome = await Migration(bad, src, dst).run()
    await src.close()
    await dst.close()
    assert outcome.result == "failed" and "never migrated in plain" in outcome.message
    assert outcome.bytes_transferred == 0 and outcome.runnable == ("lab-1",)
    after = lab_session.reports("lab-1", "lab-2", need=("web",))
    assert after["lab-1"].vm("web").status == "running" and after["lab-2"].vm("web") is None


async def test_a_guest_that_never_enabled_migration_is_refused(lab_session) -> None:
    """lab-1's legacy guest never set the KVM migration control MSR, so QEMU keeps the SEV
    blocker: preflight says why (its own check, QEMU's support still passes), and an engine run
    without checks meets QEMU's refusal of `migrate`: nothing moves, the guest runs on."""
    plan = _plan(lab_session, "legacy", "lab-1", "lab-2")
    checks = {c.key: c for c in preflight(plan, lab_session.trust)}
    consent = checks["consent"]
    assert consent.status is CheckStatus.FAIL
    assert "live migration enabled in EFI" in consent.sentence and "SEV: Migration is not implemented" in consent.sentence
    assert checks["qemu-source"].status is CheckStatus.PASS and checks["qemu-target"].status is CheckStatus.PASS
    src, dst = lab_session.link(plan.source), lab_session.link(plan.target)
    outcome = await Migration(plan, src, dst).run()
    await src.close()
    await dst.close()
    assert outcome.result == "failed" and "SEV: Migration is not implemented" in outcome.message
    assert outcome.bytes_transferred == 0 and outcome.runnable == ("lab-1",)
    after = lab_session.reports("lab-1", "lab-2", need=("legacy",))
    assert after["lab-1"].vm("legacy").status == "running" and after["lab-2"].vm("legacy") is None


async def test_a_monitor_held_by_another_client_is_named_within_seconds(lab_session) -> None:
    """QEMU serves one QMP client at a time (libvirt holds every domain's monitor): the engine
    says which monitor is held within a couple of seconds, and nothing starts."""
    plan = _plan(lab_session, "web", "lab-1", "lab-2")
    holder = socket.socket(socket.AF_UNIX)
    holder.settimeout(10)
    holder.connect(lab_session.lab.qmp_path("lab-1", "web"))
    try:
        assert b'"QMP"' in holder.recv(4096)
        src, dst = lab_session.link(plan.source), lab_session.link(plan.target)
        started = time.monotonic()
        outcome = await Migration(plan, src, dst, checks=preflight(plan, lab_session.trust)).run()
        elapsed = time.monotonic() - started
        await src.close()
        await dst.close()
    finally:
        holder.close()
    assert outcome.result == "failed" and outcome.runnable == ("lab-1",) and elapsed < 5
    assert "held by another client" in outcome.message and plan.vm.qmp_path in outcome.message
    after = lab_session.reports("lab-1", "lab-2", need=("web",))
    assert after["lab-1"].vm("web").status == "running" and after["lab-2"].vm("web") is None


async def test_sev_cancel_mid_way_sends_cancel(lab_session) -> None:
    plan = _plan(lab_session, "web", "lab-1", "lab-2", bandwidth_bps=8_000_000)
    checks = preflight(plan, lab_session.trust)
    assert not refused(checks), [c for c in checks if c.status is CheckStatus.FAIL]
    mig: Migration

    def watch(p: Progress) -> None:
        if p.phase is Phase.PRECOPY and p.bytes_transferred > 2_000_000:
            mig.cancel()

    src, dst = lab_session.link(plan.source), lab_session.link(plan.target)
    mig = Migration(plan, src, dst, checks=checks, on_progress=watch, poll_interval_s=0.1)
    outcome = await mig.run()
    await src.close()
    await dst.close()
    assert outcome.result == "cancelled", outcome
    assert outcome.runnable == ("lab-1",) and outcome.source_status == "running"
    assert outcome.source_guest_state == GuestState.RUNNING  # SEND_CANCEL: SUPDATE -> RUNNING
    log = [(e.host, e.command) for e in outcome.progress.sev_log]
    assert ("lab-1", "SEND_START") in log and ("lab-1", "SEND_CANCEL") in log
    after = lab_session.reports("lab-1", "lab-2", need=("web",))
    assert after["lab-1"].vm("web").status == "running"
    assert after["lab-2"].vm("web") is None  # the incoming VM is gone


@pytest.mark.parametrize("what", ["bridge", "transport"])
async def test_sev_source_qmp_link_dropped_rolls_back(lab_session, what: str) -> None:
    """The SSH channel carrying the source's QMP dies mid-way (or the whole SSH transport): the
    engine reconnects over SSH and rolls back (SEND_CANCEL); the guest runs on the source alone."""
    plan = _plan(lab_session, "web", "lab-1", "lab-2", bandwidth_bps=8_000_000)
    checks = preflight(plan, lab_session.trust)
    src, dst = lab_session.link(plan.source), lab_session.link(plan.target)
    cut: list[bool] = []

    def watch(p: Progress) -> None:
        if p.phase is Phase.PRECOPY and p.bytes_transferred > 2_000_000 and not cut:
            cut.append(True)
            if what == "bridge":
                src._links[0].bridge.close()  # the bridge of the engine's one source QMP session
            else:
                src.conn.close()  # the transport under every channel to lab-1

    outcome = await Migration(plan, src, dst, checks=checks, on_progress=watch, poll_interval_s=0.1).run()
    await src.close()
    await dst.close()
    assert cut and outcome.result == "failed", outcome
    assert any("QMP link lost" in e for e in outcome.errors)
    assert "rolled back" in outcome.message
    assert outcome.runnable == ("lab-1",) and outcome.source_guest_state == GuestState.RUNNING
    after = lab_session.reports("lab-1", "lab-2", need=("web",))
    assert after["lab-1"].vm("web").status == "running" and after["lab-2"].vm("web") is None


async def test_stall_on_a_throttled_link(lab_session) -> None:
    """max-bandwidth of 1 kB/s: after the first burst nothing moves. The engine warns after
    stall_warn_s, asks the stall callback after stall_timeout_s, and cancels on its word."""
    plan = _plan(lab_session, "web", "lab-1", "lab-2", bandwidth_bps=1000, stall_warn_s=0.5,
                 stall_timeout_s=1.5)
    checks = preflight(plan, lab_session.trust)
    asked: list[Progress] = []
    seen: list[Progress] = []

    async def on_stall(p: Progress) -> bool:  # the console asks the operator; here: yes, cancel
        asked.append(p)
        return True

    src, dst = lab_session.link(plan.source), lab_session.link(plan.target)
    outcome = await Migration(plan, src, dst, checks=checks, on_progress=seen.append, on_stall=on_stall,
                              poll_interval_s=0.1).run()
    await src.close()
    await dst.close()
    assert len(asked) == 1 and asked[0].extra["stalled"] is True and asked[0].extra["stalled_for_s"] >= 1.5
    assert 0 < asked[0].bytes_transferred < 4 * 1024 * 1024  # one burst, then nothing
    first_warning = next(p for p in seen if p.extra.get("stalled"))
    assert 0.5 <= first_warning.extra["stalled_for_s"] < 1.5  # warned before it was asked
    assert outcome.result == "cancelled" and "stalled" in outcome.message
    assert outcome.runnable == ("lab-1",) and outcome.source_guest_state == GuestState.RUNNING


async def test_sev_migration_end_to_end(lab_session) -> None:
    # QEMU keeps migration parameters per VM: lift the cap the tests above left on web
    plan = _plan(lab_session, "web", "lab-1", "lab-2", bandwidth_bps=10_000_000_000)
    # the lab records the guest's digest while it is stopped for the last copy only on request
    # (once SENT the source's memory can no longer be read): the engine asks a lab source itself
    checks = preflight(plan, lab_session.trust)
    assert not refused(checks), [c for c in checks if c.status is CheckStatus.FAIL]
    seen: list[Progress] = []
    src, dst = lab_session.link(plan.source), lab_session.link(plan.target)
    outcome = await Migration(plan, src, dst, checks=checks, on_progress=seen.append,
                              poll_interval_s=0.05).run()
    await src.close()
    await dst.close()
    assert outcome.result == "done", outcome
    assert outcome.digest_match is True
    assert outcome.source_guest_state == GuestState.SENT and outcome.target_guest_state == GuestState.RUNNING
    assert outcome.runnable == ("lab-2",) and outcome.target_status == "running"
    sent = [p.bytes_transferred for p in seen]
    assert sent == sorted(sent) and sent[-1] >= 64 * 1024 * 1024
    for p in seen:
        assert json.loads(json.dumps(p.to_json()))["vm"] == "web"
    exact = [p for p in seen if p.page_map_exact]
    assert exact, "the lab's page state was never read"
    final = exact[-1].page_states
    assert final is not None and len(final) == 64 * 256
    assert set(final.tolist()) <= {PageState.PRIVATE_SENT, PageState.SHARED_SENT}
    assert {PageState.PRIVATE_SENT, PageState.SHARED_SENT} <= set(final.tolist())
    log = {(e.host, e.command) for e in seen[-1].sev_log}
    assert {("lab-1", "SEND_START"), ("lab-1", "SEND_UPDATE_DATA"), ("lab-1", "SEND_FINISH"),
            ("lab-2", "RECEIVE_START"), ("lab-2", "RECEIVE_UPDATE_DATA"), ("lab-2", "RECEIVE_FINISH")} <= log
    # the phases only move forward (a loaded machine may poll past pre-copy, never back to it)
    order = [Phase.CONNECTING, Phase.SEND_START, Phase.PRECOPY, Phase.STOP_AND_COPY, Phase.FINISHING,
             Phase.DONE]
    phases = [order.index(p.phase) for p in seen]
    assert phases == sorted(phases) and seen[-1].phase is Phase.DONE, [p.phase for p in seen]
    after = lab_session.reports("lab-1", "lab-2", need=("web",))
    assert after["lab-2"].vm("web") is not None and after["lab-2"].vm("web").status == "running"


async def test_a_paused_sev_guest_arrives_paused(lab_session) -> None:
    """QEMU's rule: a guest paused on the source is paused on the target (its run state travels
    with it); the engine leaves it so, and calls that done with one runnable copy."""
    plan = _plan(lab_session, "web", "lab-2", "lab-1")
    src, dst = lab_session.link(plan.source), lab_session.link(plan.target)
    client = await src.open_qmp(plan.vm.qmp_path)
    await client.execute("stop")
    await client.disconnect()  # one QMP client per monitor: the engine opens its own
    plan = _plan(lab_session, "web", "lab-2", "lab-1")
    assert plan.vm.status == "paused"
    checks = preflight(plan, lab_session.trust)
    assert not refused(checks), [c for c in checks if c.status is CheckStatus.FAIL]
    outcome = await Migration(plan, src, dst, checks=checks, poll_interval_s=0.05).run()
    await src.close()
    await dst.close()
    assert outcome.result == "done", outcome
    assert outcome.target_status == "paused" and "paused, as it was" in outcome.message
    assert outcome.runnable == ("lab-1",) and outcome.source_guest_state == GuestState.SENT
    assert outcome.digest_match is True
    after = lab_session.reports("lab-1", "lab-2", need=("web",))
    assert after["lab-1"].vm("web").status == "paused"


async def test_sev_target_host_killed_mid_way(lab_session) -> None:
    """db goes from lab-2 to lab-1, and the whole lab-1 host process dies mid-way: the source
    sends SEND_CANCEL and runs on; the outcome names the failure. (Last: lab-1 stays dead.)"""
    plan = _plan(lab_session, "db", "lab-2", "lab-1", bandwidth_bps=8_000_000)
    checks = preflight(plan, lab_session.trust)
    assert not refused(checks), [c for c in checks if c.status is CheckStatus.FAIL]
    host = lab_session.lab.host("lab-1")
    src, dst = lab_session.link(plan.source), lab_session.link(plan.target)

    def watch(p: Progress) -> None:
        if p.phase is Phase.PRECOPY and p.bytes_transferred > 2_000_000 and host.alive:
            host.process.kill()

    outcome = await Migration(plan, src, dst, checks=checks, on_progress=watch, poll_interval_s=0.1).run()
    await src.close()
    await dst.close()
    assert not host.alive
    assert outcome.result == "failed", outcome
    assert outcome.runnable == ("lab-2",) and outcome.source_status == "running"
    assert outcome.source_guest_state == GuestState.RUNNING
    assert any(e.command == "SEND_CANCEL" for e in outcome.progress.sev_log)
