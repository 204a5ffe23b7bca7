"""Unit tests of the lab's pure parts: stream framing, the synthetic argv, runs and gap filling."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevconsole.lab import stream, uri
from sevconsole.lab.argv import ArgvError, build_argv, parse_argv
from sevconsole.lab.migration import fill_gaps
from sevconsole.lab.stream import Frame, StreamError
from sevconsole.lab.vm import runs_of


def test_private_frame_round_trip_and_refusals() -> None:
    headers, trans = os.urandom(52 * 3), os.urandom(0x5000 * 3)
    payload = b"".join(bytes(p) for p in stream.pack_private(0x5000, headers, trans, 0x5000))
    assert stream.unpack_private(payload) == (0x5000, headers, trans, 0x5000)
    # reference framing inside: be32 hdr_len, hdr, be32 trans_len, trans
    assert payload[12:16] == (52).to_bytes(4, "big") and payload[68:72] == (0x5000).to_bytes(4, "big")
    with pytest.raises(StreamError, match="truncated|holds"):
        stream.unpack_private(payload[:-1])
    bad_len = bytearray(payload)
    bad_len[12:16] = (51).to_bytes(4, "big")
    with pytest.raises(StreamError, match="header length 51"):
        stream.unpack_private(bytes(bad_len))
    odd = bytearray(payload)
    odd[68:72] = (0x5001).to_bytes(4, "big")
    with pytest.raises(StreamError):
        stream.unpack_private(bytes(odd))


def test_sev_start_uses_the_reference_framing() -> None:
    pdh, session = os.urandom(2084), os.urandom(128)
    payload = stream.pack_sev_start(0x18000033, pdh, session)
    assert payload[:8] == bytes.fromhex("18000033") + (2084).to_bytes(4, "big")
    assert stream.unpack_sev_start(payload) == (0x18000033, pdh, session)
    with pytest.raises(StreamError):
        stream.unpack_sev_start(payload[:100])
    with pytest.raises(StreamError):
        stream.unpack_sev_start(payload + b"x")


def test_frames_over_a_socketpair() -> None:
    a, b = socket.socketpair()
    with a, b:
        big = os.urandom(3 << 20)

        def write() -> None:  # a socketpair holds far less than 3 MiB: write while the test reads
            stream.send_frame(a, Frame.SHARED, big)
            stream.send_frame(a, Frame.PASS, b"\x00\x00\x00\x02")
            a.sendall(b"\x7f\x00\x00\x00\x00")

        writer = threading.Thread(target=write)
        writer.start()
        reader = b.makefile("rb", buffering=1 << 20)
        assert stream.recv_frame(reader) == (Frame.SHARED, bytearray(big))
        assert stream.recv_frame(reader) == (Frame.PASS, bytearray(b"\x00\x00\x00\x02"))
        with pytest.raises(StreamError, match="unknown frame type 0x7f"):
            stream.recv_frame(reader)
        writer.join(10)
        a.sendall(b"\x01\x00\x00\x00\x10abc")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(StreamError, match="ended in the middle of a HELLO"):
            stream.recv_frame(reader)


def test_argv_round_trip_and_errors() -> None:
    argv = build_argv("web", 64, True, 0x18000033, "/x/web.qmp")
    cfg = parse_argv(argv)
    assert (cfg.name, cfg.mem_mib, cfg.sev, cfg.policy, cfg.autostart, cfg.cbitpos) == ("web", 64, True, 0x18000033, True, 51)
    assert parse_argv(["q", "-name", "guest=db,debug-threads=on", "-m", "size=1G,slots=2", "-S"]).mem_mib == 1024
    assert parse_argv(["q", "-name", "p", "-m", "512M"]) .sev is False
    for bad, why in ((["q", "-m", "64"], "-name"), (["q", "-name"], "no value"), (["q", "-name", "x", "-m", "0"], "at least 1"),
                     (["q", "-name", "x", "-object", "sev-guest,policy=zz"], "numbers"), ("nope", "list")):
        with pytest.raises(ArgvError, match=why):
            parse_argv(bad)


def test_migration_uris_read_as_qemu_reads_them() -> None:
    assert uri.parse("tcp:127.0.0.1:4444", incoming=False) == uri.Address("inet", "127.0.0.1", "4444")
    assert uri.parse("tcp:[::1]:5,ipv6", incoming=False) == uri.Address("inet", "::1", "5")
    assert uri.parse("unix:/run/x.sock", incoming=True) == uri.Address("unix", path="/run/x.sock")
    assert uri.parse("tcp::7", incoming=True) == uri.Address("inet", "", "7")
    refused = {
        "foo:bar": "Parameter 'uri' expects a valid migration protocol",
        "tcp:host": "error parsing address 'host'",
        "tcp:[::1]": "error parsing IPv6 address '[::1]'",
        "unix:": "invalid Unix socket address",
        "fd:x": "File descriptor named 'x' has not been found",
        "vsock:1:2,x": "trailing characters in address '1:2,x'",
        "rdma:x": "RDMA ERROR: bad RDMA migration address 'x'",
        "exec:cat": "the lab does not run exec: migration commands; use tcp: or unix:",
    }
    for text, sentence in refused.items():
        with pytest.raises(uri.UriError, match=re.escape(sentence)) as exc:
            uri.parse(text, incoming=False)
        assert exc.value.recorded is (text != "foo:bar")  # QEMU keeps no error-desc for that one
    with pytest.raises(uri.UriError, match="unknown migration protocol: foo:bar"):
        uri.parse("foo:bar", incoming=True)


def test_incoming_listeners_are_described_as_qemu_lists_them(tmp_path) -> None:
    socks = uri.listen(uri.parse("tcp:127.0.0.1:0", incoming=True))
    socks += uri.listen(uri.parse(f"unix:{tmp_path / 'in.sock'}", incoming=True))
    try:
        with contextlib.suppress(uri.ConnectError):  # a machine without ::1 simply has one less
            socks += uri.listen(uri.parse("tcp:[::1]:0", incoming=True))
        described = uri.describe_listeners(socks)
        assert described[-1] == {"port": str(socks[0].getsockname()[1]), "ipv4": True, "host": "127.0.0.1",
                                 "type": "inet"}  # the first opened is listed last, as QEMU prepends
        assert {"path": str(tmp_path / "in.sock"), "type": "unix"} in described
        assert all(d.get("ipv6") is True and d["host"] == "::1" for d in described[:-2])
        with pytest.raises(uri.ConnectError, match="Failed to find an available port: Address already in use"):
            uri.listen(uri.parse(f"tcp:127.0.0.1:{socks[0].getsockname()[1]}", incoming=True))
        with pytest.raises(uri.ConnectError, match="Failed to bind socket to .*: Address already in use"):
            uri.listen(uri.parse(f"unix:{tmp_path / 'in.sock'}", incoming=True))  # never removed, unlike QEMU
    finally:
        for sock in socks:
            sock.close()


@given(st.sets(st.integers(0, 499), max_size=200), st.integers(0, 20))
def test_runs_cover_exactly_and_gaps_only_add(pages: set[int], gap: int) -> None:
    sel = np.array(sorted(pages), dtype=np.int64)
    shared = np.zeros(500, dtype=bool)
    shared[100:120] = True
    filled = fill_gaps(sel, gap)
    assert set(filled.tolist()) >= pages
    extra = set(filled.tolist()) - pages
    assert all(min((abs(e - p) for p in pages), default=0) <= gap for e in extra)
    runs = list(runs_of(filled, shared, 7))
    covered = [p for r in runs for p in range(r.first, r.first + r.count)]
    assert covered == filled.tolist()
    assert all(r.count <= 7 and all(shared[r.first:r.first + r.count] == r.shared) for r in runs)


@given(st.floats(0, 5000), st.lists(st.floats(0, 0.05), min_size=1, max_size=300))
def test_pacer_holds_the_rate_whatever_the_ticks(rate: float, ticks: list[float]) -> None:
    from sevconsole.lab.vm import Pacer

    pacer, now, total = Pacer(rate, 100.0), 100.0, 0
    for dt in ticks:
        now += dt
        total += pacer.due(now)
    exact = rate * (now - 100.0)
    assert exact - 1.0 - 1e-9 * exact <= total <= exact + 1e-9 * exact  # never ahead, at most a page behind
    pacer.idle(now + 10.0)  # ten seconds paused: nothing owed for them
    assert pacer.due(now + 10.0) == 0
