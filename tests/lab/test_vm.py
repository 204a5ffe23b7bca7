"""A lab VM in-process with the real firmware model: memory at rest, shared ranges, the workload, digests."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevconsole.lab.layout import DB_POLICY, VmSpec, default_shared_ranges
from sevconsole.lab.psp import FirmwareError, Psp
from sevconsole.lab.vm import LabVm
from sevconsole.sev.certs import generate_lab_root
from sevconsole.sev.firmware import SevFirmware


@pytest.fixture(scope="module")
def psp() -> Psp:
    root = generate_lab_root()
    fw = SevFirmware(ask_key=root.ask_key, ask=root.ask, ark=root.ark, api=(1, 55))
    p = Psp("test-host", fw)
    p.call(p.fw.init)
    return p


def make_vm(psp: Psp, **kw) -> LabVm:
    spec = VmSpec(name="g", sev=True, policy=DB_POLICY, mem_mib=1, seed=7, **kw)
    vm = LabVm(name="g", pid=1, spec=spec, psp=psp, qmp_path="/nonexistent", argv=[])
    return vm


def test_private_pages_are_ciphertext_at_rest_shared_pages_are_not(psp: Psp) -> None:
    vm = make_vm(psp)
    image = np.frombuffer(np.random.default_rng(7).bytes(vm.mem_bytes), dtype=np.uint8)
    vm.launch(asid=1)
    try:
        shared = [p for first, n in default_shared_ranges(vm.pages) for p in range(first, first + n)]
        assert shared and vm.shared.sum() == len(shared)
        private = next(p for p in range(vm.pages) if not vm.shared[p])
        gpa = private * 4096
        # The hypervisor sees ciphertext; the guest reads its image back through the firmware.
        assert not np.array_equal(vm.memory[gpa:gpa + 4096], image[gpa:gpa + 4096])
        assert psp.call(psp.fw.guest_read, vm.handle, gpa, 4096) == image[gpa:gpa + 4096].tobytes()
        s = shared[0] * 4096
        assert np.array_equal(vm.memory[s:s + 4096], image[s:s + 4096])
        # The same plaintext written at two addresses is stored differently (address tweak).
        page = bytes(range(256)) * 16
        vm.write_page(private, page)
        vm.write_page(private + 1, page)
        assert not np.array_equal(vm.memory[gpa:gpa + 4096], vm.memory[gpa + 4096:gpa + 8192])
        assert vm.dirty[private] and vm.dirty[private + 1]
        assert vm.digest() != make_digest_of(image)  # two pages changed
    finally:
        vm.close()
    with pytest.raises(FirmwareError, match="test-host: GUEST_STATUS failed"):
        psp.call(psp.fw.guest_status, 99)


def make_digest_of(image: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(image.tobytes()).hexdigest()


def test_digest_is_over_the_plaintext(psp: Psp) -> None:
    vm = make_vm(psp)
    image = np.frombuffer(np.random.default_rng(7).bytes(vm.mem_bytes), dtype=np.uint8)
    vm.launch(asid=2)
    try:
        assert vm.digest() == make_digest_of(image)
    finally:
        vm.close()


def test_workload_dirties_the_running_guest(psp: Psp) -> None:
    vm = make_vm(psp, dirty_rate=2000.0)
    vm.launch(asid=3)
    try:
        done = threading.Event()

        def wait_for(n: int) -> bool:
            for _ in range(500):  # up to 10 s, checking every 20 ms
                if vm.workload.written >= n:
                    return True
                done.wait(0.02)
            return False

        assert wait_for(50)
        assert vm.dirty.any()
        vm.set_status("paused")
        assert not vm.running and not vm.workload._running.is_set()
        vm.set_status("running")
        assert wait_for(vm.workload.written + 20)
    finally:
        vm.close()


@given(st.binary(max_size=3000), st.sampled_from([b"", b"hello", b"sev"]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_stream_fails_with_a_sentence_not_a_crash(psp: Psp, tail: bytes, prefix_kind: bytes) -> None:
    """The target's parser meets garbage after a valid start: only the lab's typed errors come out."""
    import json
    import socket
    import struct

    from sevconsole.lab import stream
    from sevconsole.lab.migration import IncomingMigration, MigrationError
    from sevconsole.lab.stream import Frame, StreamError

    vm = LabVm(name="g", pid=9, spec=VmSpec(name="g", sev=True, policy=DB_POLICY, mem_mib=1, shared=()),
               psp=psp, qmp_path="/nonexistent", argv=[], incoming=True)
    mig = IncomingMigration(vm, "tcp:127.0.0.1:0", lambda e, d: None, lambda v: None)
    mig.close()
    hello = json.dumps({"vm": "g", "mem": vm.mem_bytes, "page-size": 4096, "sev": True, "shared": []}).encode()
    data = stream.MAGIC
    if prefix_kind:
        data += stream.frame_header(Frame.HELLO, len(hello)) + hello
    if prefix_kind == b"sev":
        data += bytes([Frame.PRIVATE]) + struct.pack(">I", len(tail))  # a PRIVATE frame before SEV_START
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data + tail)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises((StreamError, MigrationError, FirmwareError)) as exc:
            mig._receive(b)
        assert str(exc.value)
    vm.close()
