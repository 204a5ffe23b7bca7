"""ProgressFolder and the convergence arithmetic, on hand-made QMP answers."""

from __future__ import annotations

import numpy as np

from sevconsole.engine.estimate import convergence, estimated_page_map
from sevconsole.engine.fold import UNSEEN_STATUS, ProgressFolder
from sevconsole.engine.plan import MigrationPlan
from sevconsole.hosts.report import HostReport, VmInfo
from sevconsole.sev.pagestate import PageState, encode_states


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _folder(sev: bool = True) -> tuple[ProgressFolder, Clock]:
    vm = VmInfo(name="web", pid=1, qmp_path="/q", sev_enabled=sev, policy=0x33 if sev else None)
    plan = MigrationPlan(vm=vm, source=HostReport("a", "127.0.0.1", 22, True),
                         target=HostReport("b", "127.0.0.1", 22, True), downtime_limit_ms=300)
    clock = Clock()
    return ProgressFolder(plan, clock), clock


def _fw(log: list[tuple[str, int, float]], counts: dict[str, int], state: int = 4) -> dict:
    return {"platform-state": 2, "guest-state": state, "handle": 1, "counts": counts, "last-status": 0,
            "log": [{"command": c, "status": s, "time": t} for c, s, t in log]}


def test_sev_log_folds_runs_and_recovers_scrolled_commands() -> None:
    f, _ = _folder()
    f.fold_firmware("source", "a", _fw([("LAUNCH_FINISH", 0, 1.0)], {"LAUNCH_FINISH": 1}), baseline=True)
    assert f.current.sev_log == ()
    # SEND_START and the first data packets scrolled out of the 64-line window before this read
    log = [("SEND_UPDATE_DATA", 0, 2.0 + i / 100) for i in range(64)]
    f.fold_firmware("source", "a", _fw(log, {"LAUNCH_FINISH": 1, "SEND_START": 1, "SEND_UPDATE_DATA": 100}))
    entries = [(e.command, e.status, e.count) for e in f.current.sev_log]
    assert entries == [("SEND_START", UNSEEN_STATUS, 1), ("SEND_UPDATE_DATA", 0, 100)]
    # the target's lines interleave; the source's run keeps folding
    f.fold_firmware("target", "b", _fw([("RECEIVE_START", 0, 2.5)], {"RECEIVE_START": 1}), baseline=False)
    more = [("SEND_UPDATE_DATA", 0, 3.0), ("SEND_FINISH", 0, 3.1)]
    f.fold_firmware("source", "a", _fw(more, {"LAUNCH_FINISH": 1, "SEND_START": 1, "SEND_UPDATE_DATA": 101,
                                              "SEND_FINISH": 1}, state=6))
    entries = [(e.host, e.command, e.count) for e in f.current.sev_log]
    assert entries == [("a", "SEND_START", 1), ("a", "SEND_UPDATE_DATA", 101), ("b", "RECEIVE_START", 1),
                       ("a", "SEND_FINISH", 1)]
    assert f.current.source_fw is not None and f.current.source_fw.guest_state == 6


def test_migrate_counters_fold_monotone_with_rate_and_estimated_map() -> None:
    f, clock = _folder(sev=False)
    total = 1000 * 4096
    f.fold_migrate({"status": "active", "ram": {"total": total, "transferred": 0, "remaining": total,
                                                "page-size": 4096, "dirty-sync-count": 1}})
    clock.t += 1.0
    f.fold_migrate({"status": "active", "ram": {"total": total, "transferred": 400 * 4096,
                                                "remaining": 600 * 4096, "normal": 400, "page-size": 4096,
                                                "dirty-sync-count": 1}})
    p = f.snapshot()
    assert p.rate_bps == 400 * 4096 and p.pages_per_s == 400 and p.pages_transferred == 400
    assert p.eta_s is not None and abs(p.eta_s - 1.5) < 1e-9
    assert not p.page_map_exact and p.page_states is not None
    counts = np.bincount(p.page_states, minlength=6)
    assert counts[PageState.SHARED_SENT] == 400 and counts[PageState.SHARED_UNSENT] == 600
    assert not p.page_states.flags.writeable
    # a cancelled QEMU reporting fewer bytes never makes the count go back
    clock.t += 1.0
    f.fold_migrate({"status": "cancelled", "ram": {"total": total, "transferred": 0, "remaining": 0}})
    assert f.current.bytes_transferred == 400 * 4096


def test_exact_page_map_replaces_the_estimate() -> None:
    f, _ = _folder()
    states = np.array([0, 1, 2, 3, 4, 5] * 10, dtype=np.uint8)
    f.fold_page_state({"page-size": 4096, "count": 60, "encoding": "zlib-u8-base64",
                       "data": encode_states(states)})
    f.fold_migrate({"status": "active", "ram": {"total": 60 * 4096, "transferred": 4096, "remaining": 0}})
    p = f.snapshot()
    assert p.page_map_exact and np.array_equal(p.page_states, states)


def test_convergence_prediction() -> None:
    # the link drains 100 MB/s, the guest dirties 150 MB/s: it never converges
    c = convergence(remaining_bytes=500_000_000, rate_bps=100e6, dirty_bps=150e6, downtime_limit_ms=300,
                    passes=3)
    assert c.converging is False and c.eta_s is None and c.expected_downtime_ms == 5000
    # 100 MB/s against 50 MB/s dirtied: 470 MB over the 30 MB downtime budget, at 50 MB/s net
    c = convergence(remaining_bytes=500_000_000, rate_bps=100e6, dirty_bps=50e6, downtime_limit_ms=300,
                    passes=3)
    assert c.converging is True and c.eta_s is not None and abs(c.eta_s - (9.4 + 0.3)) < 1e-9
    assert convergence(remaining_bytes=1, rate_bps=0, dirty_bps=0, downtime_limit_ms=300).converging is None
    # the realistic PSP: 401 pages/s sent against 397 dirtied is a tie, not a 6-minute ETA
    tie = convergence(remaining_bytes=1200 * 4096, rate_bps=401 * 4096, dirty_bps=397 * 4096,
                      downtime_limit_ms=300, passes=3)
    assert tie.converging is False and tie.eta_s is None and tie.expected_downtime_ms is not None
    assert tie.expected_downtime_ms > 2900


def test_estimated_page_map_marks_dirty_after_the_first_pass() -> None:
    states = estimated_page_map(10, 3, passes=2, private=True)
    assert states.tolist() == [PageState.PRIVATE_SENT] * 7 + [PageState.PRIVATE_DIRTY] * 3
