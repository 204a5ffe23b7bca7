"""The lab's QMP server answers as QEMU 7.2 does, through qemu.qmp and at the byte level."""

from __future__ import annotations

import asyncio
import base64
import json
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import EventListener, ExecuteError, QMPClient

from sevconsole.lab import Lab
from sevconsole.lab.qjson import Streamer
from sevconsole.sev.certs import SevCert, split_platform_chain


async def qmp(lab: Lab, host: str, vm: str) -> QMPClient:
    client = QMPClient("test")
    await client.connect(lab.qmp_path(host, vm))
    return client


class Raw:
    """A raw QMP connection, to send what qemu.qmp never would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()

    def read(self) -> dict:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def test_malformed_messages_get_qemus_answers_and_the_connection_stays(lab3: Lab) -> None:
    raw = Raw(lab3.qmp_path("lab-1", "web"))
    try:
        assert raw.greeting["QMP"]["capabilities"] == ["oob"]
        raw.send(b'{"execute": "query-status"}')
        assert raw.read() == {"error": {"class": "CommandNotFound",
                                        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
        raw.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "a"}')
        assert raw.read() == {"return": {}, "id": "a"}
        cases = [
            (b"garbage\n", {"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'garbage'"}}),
            (b"[1]\n", {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
            (b'{"foo": 1}', {"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}),
            (b'{"id": 1}', {"id": 1, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}),
            (b'{"execute": "nope", "id": 3}',
             {"id": 3, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}),
            (b'{"execute": "query-status", "arguments": {"x": 1}, "id": 4}',
             {"id": 4, "error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}),
            (b'{"execute": "migrate", "id": 5}',
             {"id": 5, "error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"}}),
            (b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": "x"}, "id": 6}',
             {"id": 6, "error": {"class": "GenericError", "desc": "Parameter 'downtime-limit' expects uint64"}}),
            (b'{"execute": "qmp_capabilities", "id": 2}',
             {"id": 2, "error": {"class": "CommandNotFound",
                                 "desc": "Capabilities negotiation is already complete, command ignored"}}),
            (b'{"execute": "query-sev-capabilities", "id": {"x": [1]}', None),  # incomplete: no answer yet
        ]
        for data, want in cases:
            raw.send(data)
            if want is not None:
                assert raw.read() == want
        raw.send(b'}\n')  # completes the object begun above: an answer with that id, not an error
        completed = raw.read()
        assert completed["id"] == {"x": [1]} and "pdh" in completed["return"]
        raw.send(b'{"execute": "query-name", "id": 9}{"execute": "query-status"}\n')
        assert raw.read() == {"return": {"name": "web"}, "id": 9}
        assert raw.read() == {"return": {"status": "running", "singlestep": False, "running": True}}
        raw.send(b'"\xff\xfe"\n')  # two lexical errors: QEMU resynchronises at 0xFE
        assert raw.read()["error"]["desc"] == "JSON parse error, stray '\"\ufffd'"
        assert raw.read()["error"]["desc"] == "JSON parse error, stray '\ufffd'"
        raw.send(b'"a string { with [ brackets" 7 nul\n')  # one token each, as QEMU's lexer sees them
        assert raw.read() == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        assert raw.read() == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        assert raw.read() == {"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'nul'"}}
        raw.send(b'{"execute": "query-name", "id": 10}')
        assert raw.read()["return"] == {"name": "web"}
    finally:
        raw.close()


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
@settings(max_examples=200, deadline=None)
def test_splitter_is_independent_of_chunking(cuts: list[int]) -> None:
    msgs = [{"execute": "a", "arguments": {"s": 'x"}{\\'}}, {"execute": "b", "id": [1, {"y": "]"}]}, {}]
    # QEMU's dialect too: single quotes, a double quote inside them, an escaped apostrophe
    data = b"".join(json.dumps(m).encode() + b" \n" for m in msgs) + b"{'q': 'a\"b\\'c'} nope 01 "
    streamer, out, pos = Streamer(), [], 0
    for cut in cuts * 20:
        out += streamer.feed(data[pos:pos + cut])
        pos += cut
    out += streamer.feed(data[pos:])
    assert [p.value for p in out if p.error is None] == [*msgs, {"q": "a\"b'c"}]
    assert [p.error for p in out if p.error] == ["JSON parse error, invalid keyword 'nope'",
                                                  "JSON parse error, stray '01'"]


async def test_queries_of_an_sev_guest(lab3: Lab) -> None:
    client = await qmp(lab3, "lab-1", "web")
    try:
        assert await client.execute("query-name") == {"name": "web"}
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"query-sev", "migrate-set-parameters", "migrate-set-sev-info", "migrate", "migrate-incoming",
                "migrate_cancel", "query-migrate", "x-query-sev-page-state", "x-query-sev-firmware",
                "x-query-guest-digest", "stop", "cont", "quit"} <= names
        sev = await client.execute("query-sev")
        assert sev == {"enabled": True, "api-major": 1, "api-minor": 55, "build-id": 21, "policy": 0x18000033,
                       "state": "running", "handle": sev["handle"]} and sev["handle"] > 0  # 7.2: no sev-type
        caps = await client.execute("query-sev-capabilities")
        assert caps["cbitpos"] == 51 and caps["reduced-phys-bits"] == 1 and len(base64.b64decode(caps["cpu0-id"])) == 64
        pdh = SevCert.from_bytes(base64.b64decode(caps["pdh"]), "pdh")
        pek, oca, cek = split_platform_chain(base64.b64decode(caps["cert-chain"]))
        assert (pdh.api_major, pdh.api_minor) == (1, 55) and int(pdh.usage) == 0x1003 and int(cek.usage) == 0x1004
        assert await client.execute("query-migrate") == {}
        params = await client.execute("query-migrate-parameters")
        assert params["downtime-limit"] == 300 and params["max-bandwidth"] == 134217728 and params["sev-pdh"] == ""
        await client.execute("migrate-set-parameters", {"downtime-limit": 1000, "sev-pdh": caps["pdh"]})
        params = await client.execute("query-migrate-parameters")
        assert params["downtime-limit"] == 1000 and params["sev-pdh"] == caps["pdh"]
        with pytest.raises(ExecuteError, match="not valid base64"):
            await client.execute("migrate-set-parameters", {"sev-pdh": "***"})
        with pytest.raises(ExecuteError, match=r"range of 0 to \(2000 \* 1000\) ms"):
            await client.execute("migrate-set-parameters", {"downtime-limit": 2000001})
        await client.execute("migrate-set-sev-info", {"pdh": caps["pdh"], "plat-cert": caps["cert-chain"], "amd-cert": ""})
        with pytest.raises(ExecuteError, match="-incoming"):
            await client.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        caps = {c["capability"]: c["state"] for c in await client.execute("query-migrate-capabilities")}
        assert caps["events"] is False and "postcopy-ram" in caps
        # accepted as QEMU accepts it; `migrate` refuses only what the lab cannot do
        await client.execute("migrate-set-capabilities", {"capabilities": [{"capability": "pause-before-switchover", "state": True}]})
        with pytest.raises(ExecuteError, match="does not model the migration capability 'pause-before-switchover'"):
            await client.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        await client.execute("migrate-set-capabilities", {"capabilities": [{"capability": "pause-before-switchover", "state": False}]})
        with pytest.raises(ExecuteError, match="does not accept value 'nope'"):
            await client.execute("migrate-set-capabilities", {"capabilities": [{"capability": "nope", "state": True}]})
        assert await client.execute("query-memory-size-summary") == {"base-memory": 64 << 20, "plugged-memory": 0}
        measure = base64.b64decode((await client.execute("query-sev-launch-measure"))["data"])
        assert len(measure) == 48  # LAUNCH_MEASURE: HMAC-SHA256 || mnonce
        nonce = bytes(range(16))
        report = base64.b64decode((await client.execute("query-sev-attestation-report",
                                                        {"mnonce": base64.b64encode(nonce).decode()}))["data"])
        assert len(report) == 208 and report[:16] == nonce and int.from_bytes(report[0x30:0x34], "little") == 0x18000033
        with pytest.raises(ExecuteError, match=r"SEV: mnonce must be 16 bytes \(got 3\)"):
            await client.execute("query-sev-attestation-report", {"mnonce": "AAAA"})
        fw = await client.execute("x-query-sev-firmware")
        assert fw["guest-state-name"] == "RUNNING" and fw["platform-state"] == 2 and fw["counts"]["LAUNCH_START"] >= 1
        assert {"command", "status", "time"} <= set(fw["log"][-1]) and len(fw["log"]) <= 64
        state = await client.execute("x-query-sev-page-state")
        assert state["count"] == 64 * 256 and state["page-size"] == 4096
        assert len((await client.execute("x-query-guest-digest"))["sha256"]) == 64
    finally:
        await client.disconnect()


async def test_non_sev_guest_answers_like_qemu_72(lab3: Lab) -> None:
    client = await qmp(lab3, "lab-1", "plain")
    try:
        assert await client.execute("query-sev") == {"enabled": False, "api-major": 0, "api-minor": 0,
                                                     "build-id": 0, "policy": 0, "state": "uninit", "handle": 0}
        # the PDH and chain are the host's: any VM of an SEV host answers, as in QEMU
        caps = await client.execute("query-sev-capabilities")
        assert SevCert.from_bytes(base64.b64decode(caps["pdh"]), "pdh").usage == 0x1003
        for command, args, desc in (("query-sev-launch-measure", None, "SEV launch measurement is not available"),
                                    ("query-sev-attestation-report", {"mnonce": "AAAA"}, "SEV is not enabled")):
            with pytest.raises(ExecuteError) as exc:
                await client.execute(command, args)
            assert (exc.value.error.error.class_, exc.value.error.error.desc) == ("GenericError", desc)
    finally:
        await client.disconnect()


async def test_stop_and_cont_send_events_with_timestamps(lab3: Lab) -> None:
    client = await qmp(lab3, "lab-1", "plain")
    listener = EventListener(("STOP", "RESUME"))
    client.register_listener(listener)
    try:
        await client.execute("stop")
        assert (await client.execute("query-status"))["status"] == "paused"
        await client.execute("cont")
        stop = await asyncio.wait_for(listener.get(), 5)
        resume = await asyncio.wait_for(listener.get(), 5)
        assert (stop["event"], resume["event"]) == ("STOP", "RESUME")
        assert set(stop["timestamp"]) == {"seconds", "microseconds"} and "data" not in stop
        assert (await client.execute("query-status"))["status"] == "running"
    finally:
        await client.disconnect()


@given(st.lists(st.binary(max_size=200), max_size=8))
@settings(max_examples=100, deadline=None)
def test_random_bytes_never_take_the_monitor_down(tmp_path_factory: pytest.TempPathFactory, chunks: list[bytes]) -> None:
    """Whatever arrives, every answer is a well-formed QMP line and the monitor keeps serving."""
    from sevconsole.lab.qmp import CommandSpec, QmpServer

    path = str(tmp_path_factory.mktemp("q") / "m.qmp")

    async def answers(data: list[bytes]) -> list[dict]:
        reader, writer = await asyncio.open_unix_connection(path)
        for chunk in data:
            writer.write(chunk)
        writer.write_eof()
        out = []
        while line := await asyncio.wait_for(reader.readline(), 5):
            assert line.endswith(b"\r\n")
            out.append(json.loads(line))
        writer.close()
        return out

    async def scenario() -> None:
        server = QmpServer(path, {"query-name": CommandSpec("query-name", lambda a: {"name": "x"})})
        await server.start()
        try:
            got = await answers([b'{"execute": "qmp_capabilities"}', *chunks])
            assert "QMP" in got[0] and got[1] == {"return": {}}
            assert all(set(m) <= {"return", "error", "id"} and ("return" in m) != ("error" in m) for m in got[1:])
            after = await answers([b'{"execute": "qmp_capabilities"}{"execute": "query-name", "id": 1}'])
            assert after[2] == {"return": {"name": "x"}, "id": 1}
        finally:
            await server.close()

    asyncio.run(scenario())
