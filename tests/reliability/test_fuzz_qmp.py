"""Property-based fuzzing of a lab VM's QMP server over its real UNIX socket: whatever a client
sends, in whatever pieces, each answer is one JSON object with `return` or `error` (QEMU's
shapes), the connection stays up (a sentinel command after the junk is answered), every answer
comes within a time bound, and the host process's memory does not grow."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevconsole.lab import Lab

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ANSWER_S = 5.0
SENTINEL = b'{"execute": "query-status", "id": "sentinel-7"}'
# Commands a fuzzer may call: the VM must stay as it is (no quit, stop, migrate, workload knobs).
SAFE = ("query-status", "query-name", "query-commands", "query-version", "query-sev",
        "query-sev-capabilities", "query-migrate", "query-migrate-parameters", "migrate-set-parameters",
        "migrate-set-sev-info", "migrate-sev-set-info", "x-query-sev-page-state", "x-query-sev-firmware",
        "x-query-guest-digest", "migrate-incoming", "qmp_capabilities", "no-such-command", "")

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
arg_names = st.sampled_from(["uri", "pdh", "plat-cert", "amd-cert", "sev-pdh", "downtime-limit",
                             "max-bandwidth", "enable", "fault", "x", ""])


@st.composite
def qmp_message(draw: st.DrawFn) -> bytes:
    """Mostly well-formed QMP requests with wrong parts; some plain junk bytes."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        # junk that leaves the JSON scanner at top level (no quote or bracket left open: an open
        # string would rightly swallow the sentinel too, on QEMU as well; QEMU's strings may also
        # be single-quoted)
        junk = draw(st.binary(min_size=1, max_size=300)).translate(None, b'"\'{}[]\\')
        return junk or b"x"
    if kind == 1:
        return json.dumps(draw(json_value)).encode()
    msg: dict = {}
    if draw(st.booleans()):
        msg[draw(st.sampled_from(["execute", "exec-oob"]))] = draw(st.one_of(st.sampled_from(SAFE), json_value))
    if draw(st.booleans()):
        msg["arguments"] = draw(st.one_of(st.dictionaries(arg_names, json_value, max_size=4), json_value))
    if draw(st.booleans()):
        msg["id"] = draw(json_value)
    if draw(st.integers(0, 5)) == 0:
        msg[draw(st.text(max_size=8))] = draw(json_value)
    return json.dumps(msg).encode()


@pytest.fixture(scope="module")
def lab1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Lab.start(tmp_path_factory.mktemp("fuzzqmp"), hosts=1, mem_mib=4) as lab:
        yield lab


class Conn:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(ANSWER_S)
        self.sock.connect(path)
        self.buf = b""
        greeting = self.line()
        assert "QMP" in greeting

    def line(self) -> dict:
        deadline = time.monotonic() + ANSWER_S
        while b"\r\n" not in self.buf:
            assert time.monotonic() < deadline, f"no answer within {ANSWER_S} s"
            data = self.sock.recv(65536)
            assert data, f"the server closed the connection (pending {self.buf[:200]!r})"
            self.buf += data
        raw, self.buf = self.buf.split(b"\r\n", 1)
        # Strict JSON (no NaN/Infinity): what any QMP client must be able to read.
        return json.loads(raw, parse_constant=_refuse_constant)

    def close(self) -> None:
        self.sock.close()


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"the server sent non-JSON constant {name}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(messages=st.lists(qmp_message(), min_size=1, max_size=4), negotiate=st.booleans(),
       cuts=st.lists(st.integers(1, 64), max_size=6))
def test_qmp_server_answers_junk_and_keeps_serving(lab1: Lab, messages: list[bytes], negotiate: bool,
                                                   cuts: list[int]) -> None:
    conn = Conn(lab1.qmp_path("lab-1", "web"))
    try:
        if negotiate:
            conn.sock.sendall(b'{"execute": "qmp_capabilities"}')
            assert conn.line() == {"return": {}}
        # one stream of junk then the sentinel, written in arbitrary pieces
        data = b" ".join(messages) + b" " + SENTINEL
        pos = 0
        for n in cuts:
            conn.sock.sendall(data[pos:pos + n])
            pos += n
        conn.sock.sendall(data[pos:])
        negotiated = negotiate
        while True:
            answer = conn.line()
            assert isinstance(answer, dict), answer
            if answer == {"return": {}} and not negotiated:
                negotiated = True  # the junk itself held a well-formed qmp_capabilities
            assert ("return" in answer) != ("error" in answer) or "event" in answer, answer
            if "error" in answer:
                assert set(answer["error"]) == {"class", "desc"} and answer["error"]["desc"], answer
            if answer.get("id") == "sentinel-7":
                # unnegotiated: the sentinel is refused, but answered, with its id
                assert ("return" in answer) == negotiated or answer.get("error", {}).get("class") == "CommandNotFound"
                break
    finally:
        conn.close()


def test_server_memory_and_other_clients_after_fuzzing(lab1: Lab) -> None:
    """Runs after the property: the host still serves a new client and its memory is bounded."""
    pid = lab1.host("lab-1").pid
    before = rss_kib(pid)
    conn = Conn(lab1.qmp_path("lab-1", "web"))
    try:
        big = b'{"execute": "query-status", "arguments": {"x": "' + b"A" * (900 << 10) + b'"}}'
        for _ in range(20):  # near the 1 MiB message limit, 20 times: nothing may pile up
            conn.sock.sendall(big)
            assert "error" in conn.line()
        conn.sock.sendall(b"[" * (2 << 20))  # over the limit: refused, nothing kept (QEMU's nesting limit)
        assert conn.line()["error"]["desc"] == "JSON nesting depth limit exceeded"
    finally:
        conn.close()
    fresh = Conn(lab1.qmp_path("lab-1", "web"))  # the host serves the next client as before
    try:
        fresh.sock.sendall(b'{"execute": "qmp_capabilities"} ' + SENTINEL)
        assert fresh.line() == {"return": {}}
        assert fresh.line()["return"]["status"] == "running"
    finally:
        fresh.close()
    assert rss_kib(pid) - before < 64 << 10, (before, rss_kib(pid))


def test_deeply_nested_json_is_refused_not_dropped(lab1: Lab) -> None:
    conn = Conn(lab1.qmp_path("lab-1", "web"))
    try:
        conn.sock.sendall(b"[" * 5_000 + b"]" * 5_000 + b" " + SENTINEL)
        assert conn.line()["error"]["desc"] == "JSON nesting depth limit exceeded"
        # as QEMU: each stray bracket left after the refusal is answered too, then the sentinel
        while (answer := conn.line()).get("id") != "sentinel-7":
            assert "error" in answer, answer
    finally:
        conn.close()


def test_answers_are_strict_json_even_for_odd_ids(lab1: Lab) -> None:
    conn = Conn(lab1.qmp_path("lab-1", "web"))
    try:
        conn.sock.sendall(b'{"execute": "qmp_capabilities", "id": 1e400} {"execute": "x", "id": NaN}')
        assert "out of range" in conn.line()["error"]["desc"]  # QEMU would echo `inf`: not JSON
        assert conn.line()["error"]["desc"] == "JSON parse error, stray 'N'"  # QEMU's lexer
        assert conn.line()["error"]["desc"] == "JSON parse error, expecting value"  # the stray '}'
        conn.sock.sendall(b'{"execute": "qmp_capabilities", "id": 1}')
        assert conn.line() == {"return": {}, "id": 1}  # the connection stays up
    finally:
        conn.close()
