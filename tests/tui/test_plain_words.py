"""A plain guest and a host without SEV are described in plain words: no `?` fields, no firmware
steps (SENT, SEND_CANCEL) that do not happen, no digest line a real QEMU can never fill."""

from __future__ import annotations

from sevconsole.engine.run import Outcome
from sevconsole.hosts.report import HostReport, SevSupport
from sevconsole.tui.screens.host import capability_lines
from sevconsole.tui.screens.hosts import row_cells
from sevconsole.tui.screens.result import result_lines


def _text(lines: list) -> str:  # type: ignore[type-arg]
    return "\n".join(str(getattr(line, "plain", line)) for line in lines)


def test_a_plain_result_says_qemu_states_and_no_digest() -> None:
    done = Outcome("done", "web now runs on hv-b; the source copy is stopped and its QEMU quit", runnable=("hv-b",),
                   source_status="postmigrate", target_status="running")
    text = _text(result_lines(done, None))
    assert "source QEMU postmigrate, target QEMU running" in text
    assert "?" not in text and "guest digest" not in text and "SENT" not in text
    cancelled = Outcome("cancelled", "cancelled by the operator; web runs on hv-a", runnable=("hv-a",),
                        source_status="running")
    assert "source QEMU running, target QEMU gone" in _text(result_lines(cancelled, None))


def test_an_sev_result_keeps_the_firmware_states() -> None:
    done = Outcome("done", "m", runnable=("b",), source_status="postmigrate", target_status="running",
                   source_guest_state=6, target_guest_state=3)
    assert "source guest SENT (QEMU postmigrate), target guest RUNNING (QEMU running)" in _text(result_lines(done, None))


def test_a_host_without_sev_says_so_once() -> None:
    host = HostReport(name="hv-b", address="10.0.0.2", port=22, reachable=True, hostname="hv-b", kernel="6.1",
                      sev=SevSupport(kernel_sev=None, kernel_sev_es=None, dev_sev=False))
    text = _text(capability_lines(host))
    assert "no SEV on this host (kvm_amd sev not loaded, no /dev/sev): plain guests only" in text
    assert "?" not in text and "platform" not in text
    assert "?" not in " ".join(str(c) for c in row_cells(host))
