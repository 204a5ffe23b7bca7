"""End-to-end SEV migration between two lab hosts: real processes, real TCP, real crypto, QMP via qemu.qmp."""

from __future__ import annotations

import base64
import os
import signal

import numpy as np
import pytest
from qemu.qmp import ExecuteError

from sevconsole.lab import Lab
from sevconsole.sev.certs import split_platform_chain
from sevconsole.sev.pagestate import PageState, decode_states
from sevconsole.sev.policy import GuestPolicy

from .conftest import helper
from .migration_helpers import migrate, prepare, wait_disconnected, wait_status

PAGES = 64 * 1024 * 1024 // 4096


async def page_states(client) -> np.ndarray:
    ans = await client.execute("x-query-sev-page-state")
    assert ans["page-size"] == 4096 and ans["encoding"] == "zlib-u8-base64"
    return decode_states(ans["data"], ans["count"])


async def firmware(client) -> dict:
    return await client.execute("x-query-sev-firmware")


@pytest.mark.slow
async def test_sev_guest_with_dirtying_workload_migrates(lab2: Lab) -> None:
    # A 50 ms downtime limit: the dirtied pages take at least one more pass before stop-and-copy.
    pair = await prepare(lab2, "web", params={"downtime-limit": 50})
    try:
        src, tgt = pair.src, pair.tgt
        # The guest dirties 1500 pages/s while it runs; the source records its digest while stopped.
        await src.execute("x-lab-set", {"dirty-rate": 1500, "digest-on-send": True})
        shared_before = int(np.isin(await page_states(src), (PageState.SHARED_UNSENT,)).sum())
        status, events = await migrate(pair)
        info = await src.execute("query-migrate")
        assert status == "completed", info

        # The guest is the same guest: its plaintext digest matches, taken while it could not change.
        assert (await tgt.execute("query-status"))["status"] == "paused"
        assert await src.execute("x-query-guest-digest") == await tgt.execute("x-query-guest-digest")

        # Exactly one runnable copy: the source SENT (QEMU postmigrate), the target RUNNING.
        fs, ft = await firmware(src), await firmware(tgt)
        assert fs["guest-state-name"] == "SENT" and ft["guest-state-name"] == "RUNNING"
        assert (await src.execute("query-status"))["status"] == "postmigrate"
        assert (await tgt.execute("query-sev"))["state"] == "running"
        assert fs["counts"]["SEND_FINISH"] == 1 and ft["counts"]["RECEIVE_FINISH"] == 1
        # Every packet sent was received, and pages were sent again after being dirtied.
        assert fs["counts"]["SEND_UPDATE_DATA"] == ft["counts"]["RECEIVE_UPDATE_DATA"]

        # query-migrate's counters add up, as QEMU's do.
        ram = info["ram"]
        assert ram["total"] == PAGES * 4096 and ram["remaining"] == 0 and ram["page-size"] == 4096
        assert ram["transferred"] == ram["precopy-bytes"] + ram["downtime-bytes"] + ram["postcopy-bytes"]
        assert ram["normal-bytes"] == ram["normal"] * ram["page-size"]
        assert ram["normal"] > PAGES  # dirtied pages went twice
        assert ram["transferred"] > ram["normal-bytes"]  # plus SEV headers and framing
        assert ram["dirty-sync-count"] >= 2 and ram["downtime-bytes"] > 0
        assert 0 <= info["setup-time"] <= info["total-time"] and 0 <= info["downtime"] <= info["total-time"]
        # SEV packets carry private pages only (counted per packet of up to 5 pages, as the firmware
        # counts commands); shared ones go in clear.
        assert -(-(PAGES - shared_before) // 5) <= fs["counts"]["SEND_UPDATE_DATA"] <= ram["normal"] - shared_before

        # Events, as QEMU sends them: setup, active, passes, STOP, completed.
        kinds = [(e["event"], e.get("data", {}).get("status")) for e in events]
        assert kinds[0] == ("MIGRATION", "setup") and ("MIGRATION", "active") in kinds
        assert ("STOP", None) in kinds and kinds[-1] == ("MIGRATION", "completed")
        passes = [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"]
        assert passes == list(range(1, ram["dirty-sync-count"] + 1)) and len(passes) >= 2
        assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in events)

        # The target holds every page, shared ones in clear where the guest shares them.
        states = await page_states(tgt)
        assert set(np.unique(states).tolist()) <= {PageState.PRIVATE_SENT, PageState.SHARED_SENT}
        assert int((states == PageState.SHARED_SENT).sum()) == shared_before > 0

        # The target runs on when told to, and the SENT source refuses to run again.
        await tgt.execute("cont")
        assert (await tgt.execute("query-status"))["status"] == "running"
        with pytest.raises(ExecuteError, match="SENT"):
            await src.execute("cont")
    finally:
        await pair.close()


@pytest.mark.slow
async def test_tampered_packet_fails_on_target_and_source_runs_on(lab2: Lab) -> None:
    pair = await prepare(lab2, "web")
    try:
        await pair.src.execute("x-lab-inject-fault", {"fault": "tamper-packet", "after-pages": 2000})
        status, _ = await migrate(pair)
        assert status == "failed"
        info = await pair.src.execute("query-migrate")
        assert "BAD_MEASUREMENT" in info["error-desc"]
        tgt_status, _ = await wait_status(pair.tgt_events, ("failed",))
        assert tgt_status == "failed"
        # The source cancelled and runs on; the target's copy is gone.
        await assert_source_runs(pair.src)
        await wait_disconnected(pair.tgt)
        assert helper(lab2, "lab-2", "stop " + str(pair.incoming["pid"])) == {"stopped": False, "reason": "no such process"}
    finally:
        await pair.close()


async def assert_source_runs(src) -> None:
    assert (await src.execute("query-status"))["status"] == "running"
    assert (await src.execute("query-sev"))["state"] == "running"
    fw = await firmware(src)
    assert fw["guest-state-name"] == "RUNNING"
    assert fw["counts"].get("SEND_CANCEL") == 1 and "SEND_FINISH" not in fw["counts"]


async def test_nosend_guest_is_refused_before_a_page_leaves(lab2: Lab) -> None:
    pair = await prepare(lab2, "vault")
    try:
        status, _ = await migrate(pair)
        assert status == "failed"
        info = await pair.src.execute("query-migrate")
        assert "POLICY_FAILURE" in info["error-desc"] and "NOSEND" in info["error-desc"]
        assert set(info) == {"status", "error-desc"}  # QEMU keeps no figures of a failed attempt
        fw = await firmware(pair.src)
        assert "SEND_UPDATE_DATA" not in fw["counts"] and fw["guest-state-name"] == "RUNNING"
        await wait_disconnected(pair.tgt)
        assert "RECEIVE_UPDATE_DATA" not in (await probe_counts(lab2, "lab-2"))
    finally:
        await pair.close()


async def probe_counts(lab: Lab, host: str) -> dict:
    from .migration_helpers import connect

    vm = helper(lab, host, "probe")["vms"][0]
    client = await connect(vm["qmp"])
    try:
        return (await firmware(client))["counts"]
    finally:
        await client.disconnect()


@pytest.mark.slow
async def test_link_cut_mid_stream_source_runs_target_gone(lab2: Lab) -> None:
    pair = await prepare(lab2, "web")
    try:
        await pair.src.execute("x-lab-inject-fault", {"fault": "cut-link", "after-pages": 4000})
        status, _ = await migrate(pair)
        assert status == "failed"
        assert "link" in (await pair.src.execute("query-migrate"))["error-desc"]
        await assert_source_runs(pair.src)
        await wait_disconnected(pair.tgt)
    finally:
        await pair.close()


@pytest.mark.slow
async def test_target_host_killed_mid_migration_source_runs_on(lab2: Lab) -> None:
    # 8 MiB/s: the 64 MiB guest takes seconds, so the kill lands mid-stream.
    pair = await prepare(lab2, "web", params={"max-bandwidth": 8 << 20})
    try:
        await pair.src.execute("migrate", {"uri": f"tcp:127.0.0.1:{pair.port}"})
        await wait_status(pair.src_events, ("active",))
        await wait_transferred(pair.src, 4 << 20)
        os.kill(lab2.host("lab-2").pid, signal.SIGKILL)
        status, _ = await wait_status(pair.src_events)
        assert status == "failed"
        await assert_source_runs(pair.src)
        # The source can migrate again later: SEND_CANCEL left it RUNNING, not stuck.
        assert (await firmware(pair.src))["guest-state"] == 3
    finally:
        await pair.close()


async def wait_transferred(client, nbytes: int, timeout: float = 30.0) -> None:
    import asyncio

    async def _wait() -> None:
        while (await client.execute("query-migrate")).get("ram", {}).get("transferred", 0) < nbytes:
            await asyncio.sleep(0.02)  # polling a counter QEMU only reports on request
    await asyncio.wait_for(_wait(), timeout)


@pytest.mark.slow
async def test_cancel_returns_the_guest_to_running(lab2: Lab) -> None:
    pair = await prepare(lab2, "web", params={"max-bandwidth": 8 << 20})
    try:
        await pair.src.execute("migrate", {"uri": f"tcp:127.0.0.1:{pair.port}"})
        await wait_transferred(pair.src, 2 << 20)
        await pair.src.execute("migrate_cancel")
        status, events = await wait_status(pair.src_events)
        assert status == "cancelled"
        assert ("MIGRATION", "cancelling") in [(e["event"], e.get("data", {}).get("status")) for e in events]
        await assert_source_runs(pair.src)
        await wait_disconnected(pair.tgt)
    finally:
        await pair.close()


@pytest.mark.slow
async def test_web_is_refused_by_lab3(tmp_path) -> None:
    with Lab.start(tmp_path / "lab", hosts=3) as lab:
        pair = await prepare(lab, "web", dst_host="lab-3")
        try:
            status, _ = await migrate(pair)
            assert status == "failed"
            desc = (await pair.src.execute("query-migrate"))["error-desc"]
            # The firmware stops at its first rule (DOMAIN); the second reason is in the target's
            # chain for a preflight to show: lab-3's PEK is API 0.17, below web's minimum 0.24.
            assert desc.startswith("lab-1: SEND_START failed with POLICY_FAILURE") and "DOMAIN" in desc
            pek, _, _ = split_platform_chain(base64.b64decode(helper(lab, "lab-3", "probe")["cert_chain"]))
            web = GuestPolicy.from_u32((await pair.src.execute("query-sev"))["policy"])
            assert (pek.api_major, pek.api_minor) == (0, 17) < (web.api_major, web.api_minor) == (0, 24)
            fw = await firmware(pair.src)
            assert fw["guest-state-name"] == "RUNNING" and "SEND_UPDATE_DATA" not in fw["counts"]
        finally:
            await pair.close()


async def test_plain_guest_migrates_in_clear(lab2: Lab) -> None:
    # Without the `events` capability QEMU sends no MIGRATION events: watch by polling instead.
    pair = await prepare(lab2, "plain", events=False)
    try:
        await pair.src.execute("migrate", {"uri": f"tcp:127.0.0.1:{pair.port}"})
        await wait_query_status(pair.src, "completed")
        assert await pair.src.execute("x-query-guest-digest") == await pair.tgt.execute("x-query-guest-digest")
        assert (await pair.tgt.execute("query-sev"))["enabled"] is False  # QEMU 7.2 without SEV
        # Events before the answer that said "completed" are already here: STOP, but no MIGRATION.
        seen = []
        while not pair.src_events.empty():
            seen.append((await pair.src_events.get())["event"])
        assert "STOP" in seen and "MIGRATION" not in seen and "MIGRATION_PASS" not in seen
    finally:
        await pair.close()


async def wait_query_status(client, want: str, timeout: float = 60.0) -> None:
    import asyncio

    async def _wait() -> None:
        while (await client.execute("query-migrate")).get("status") != want:
            await asyncio.sleep(0.02)  # no events asked for: poll, as a console does without them
    await asyncio.wait_for(_wait(), timeout)


@pytest.mark.slow
async def test_source_host_killed_mid_migration_target_discards(lab2: Lab) -> None:
    """The target never runs a half-received guest: no RECEIVE_FINISH without the source's FINISHED."""
    pair = await prepare(lab2, "web", params={"max-bandwidth": 8 << 20})
    try:
        await pair.src.execute("migrate", {"uri": f"tcp:127.0.0.1:{pair.port}"})
        await wait_transferred(pair.src, 4 << 20)
        os.kill(lab2.host("lab-1").pid, signal.SIGKILL)
        status, _ = await wait_status(pair.tgt_events, ("failed", "completed"))
        assert status == "failed"
        await wait_disconnected(pair.tgt)
        assert "RECEIVE_FINISH" not in await probe_counts(lab2, "lab-2")
        assert [v["name"] for v in helper(lab2, "lab-2", "probe")["vms"]] == ["db"]
    finally:
        await pair.close()


async def test_quit_closes_the_monitor_after_its_answer(lab2: Lab) -> None:
    from qemu.qmp import EventListener

    from .migration_helpers import connect

    client = await connect(lab2.qmp_path("lab-2", "db"))
    events = EventListener(("SHUTDOWN",))
    client.register_listener(events)
    try:
        assert await client.execute("quit") == {}
        ev = await events.get()
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await wait_disconnected(client)
    finally:
        await pair_close(client)
    assert helper(lab2, "lab-2", "probe")["vms"] == []
    assert not os.path.exists(lab2.qmp_path("lab-2", "db"))


async def pair_close(client) -> None:
    import contextlib

    with contextlib.suppress(Exception):
        await client.disconnect()


@pytest.mark.slow
async def test_max_bandwidth_is_respected(lab2: Lab) -> None:
    limit = 32 << 20  # bytes/s: the 64 MiB guest cannot go in less than two seconds
    pair = await prepare(lab2, "web", params={"max-bandwidth": limit})
    try:
        status, _ = await migrate(pair)
        info = await pair.src.execute("query-migrate")
        assert status == "completed"
        assert info["total-time"] >= info["ram"]["transferred"] / limit * 1000 * 0.95
    finally:
        await pair.close()
