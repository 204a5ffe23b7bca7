"""Property-based fuzzing of the lab's migration stream reader over real TCP: a real SEV stream
(recorded through the fault proxy) is truncated, bit-flipped, given wrong frame lengths or
foreign frames, and sent to a fresh incoming VM. Whatever arrives, the target answers with reply
frames only (an ERROR frame carrying a sentence, or READY/DONE when the change was harmless, e.g.
in a page the guest shares in clear), within a time bound; the host keeps serving and its memory
stays bounded."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevconsole.lab.stream import Frame

from .proxy import replay
from .rig import Rig, helper, qmp_once, run_with_fault

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPLIES = {int(Frame.READY), int(Frame.DONE), int(Frame.ERROR)}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rig, bytes, list[tuple[int, int, int]]]]:
    """A 4 MiB SEV guest's stream lab-1 -> lab-2, and its frames (kind, offset, length)."""
    rig = Rig.start(tmp_path_factory.mktemp("fuzzstream"), hosts=2, mem_mib=4)
    try:
        att, target = asyncio.run(run_with_fault(rig, "web", "lab-1", "lab-2", [], kind="record", record=True))
        assert att.outcome is not None and att.outcome.result == "done", att.to_json()
        assert target.proxy is not None
        yield rig, bytes(target.proxy.recorded["out"]), list(target.proxy.trackers["out"].frames)
    finally:
        rig.close()


@st.composite
def mutation(draw: st.DrawFn, data: bytes, frames: list[tuple[int, int, int]]) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["truncate", "flip", "length", "insert", "reorder"]))
    buf = bytearray(data)
    if kind == "truncate":
        return kind, bytes(buf[:draw(st.integers(0, len(buf) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 3))):
            # the first frames (HELLO, SEV_START, the first pages) hold most of the structure
            at = draw(st.one_of(st.integers(0, min(len(buf), 8192) - 1), st.integers(0, len(buf) - 1)))
            buf[at] ^= 1 << draw(st.integers(0, 7))
        return kind, bytes(buf)
    _, start, _ = frames[draw(st.integers(0, len(frames) - 1))]
    if kind == "length":
        struct.pack_into(">I", buf, start + 1, draw(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 64))))
        return kind, bytes(buf)
    if kind == "insert":
        payload = draw(st.binary(max_size=64))
        frame = struct.pack(">BI", draw(st.integers(0, 255)), len(payload)) + payload
        return kind, bytes(buf[:start] + frame + buf[start:])
    # reorder: a frame moved in front of the one before it
    i = draw(st.integers(1, len(frames) - 1))
    (_, a, alen), (_, b, blen) = frames[i - 1], frames[i]
    return kind, bytes(buf[:a] + buf[b:b + 5 + blen] + buf[a:a + 5 + alen] + buf[b + 5 + blen:])


def replies(answer: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(answer):
        assert pos + 5 <= len(answer), f"a torn reply frame: {answer[pos:pos + 20]!r}"
        kind, length = struct.unpack_from(">BI", answer, pos)
        assert kind in REPLIES, f"reply frame type 0x{kind:02x}"
        out.append((kind, answer[pos + 5:pos + 5 + length]))
        pos += 5 + length
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_stream_reader_refuses_mutations_with_sentences(recorded) -> None:  # type: ignore[no-untyped-def]
    rig, data, frames = recorded
    argv = next(v["argv"] for v in helper(rig.lab, "lab-2", "probe")["vms"] if v["name"] == "web")
    rss0 = rss_kib(rig.lab.host("lab-2").pid)
    seen: dict[str, int] = {}

    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(m=mutation(data, frames))
    def prop(m: tuple[str, bytes]) -> None:
        kind, stream = m
        incoming = helper(rig.lab, "lab-2", "launch-incoming", {"argv": argv})
        asyncio.run(qmp_once(incoming["qmp"], "migrate-incoming", {"uri": "tcp:127.0.0.1:0"}))
        info = asyncio.run(qmp_once(incoming["qmp"], "query-migrate"))
        port = int(info["socket-address"][0]["port"])
        t0 = time.monotonic()
        answer = replay(("127.0.0.1", port), stream, timeout=20)
        assert time.monotonic() - t0 < 15
        got = replies(answer)
        assert got, f"{kind}: the target closed without a word"
        errors = [p for k, p in got if k == Frame.ERROR]
        if errors:
            text = errors[0].decode("utf-8")
            assert len(text) > 10, text
            seen[kind + ":refused"] = seen.get(kind + ":refused", 0) + 1
        else:
            assert [k for k, _ in got] == [Frame.READY, Frame.DONE], got
            seen[kind + ":accepted"] = seen.get(kind + ":accepted", 0) + 1
        helper(rig.lab, "lab-2", f"stop {incoming['pid']}")  # gone already when refused

    prop()
    # the host still serves: SSH, its own guest's monitor, and memory did not pile up
    probe = helper(rig.lab, "lab-2", "probe")
    web = [v for v in probe["vms"] if v["name"] == "web"]
    assert len(web) == 1, web  # the migrated guest only; every fuzzed incoming VM is gone
    status = asyncio.run(qmp_once(web[0]["qmp"], "query-status"))
    assert status["status"] in ("running", "paused")
    assert rss_kib(rig.lab.host("lab-2").pid) - rss0 < 128 << 10
    assert any(k.endswith(":refused") for k in seen), seen
    print("\nstream mutations:", seen)
