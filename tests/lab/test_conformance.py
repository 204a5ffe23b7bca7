"""The lab's generic QMP equals QEMU 7.2's: one script against a real QEMU (TCG) and a lab VM.

Every generic command the lab serves, its argument and range errors, the JSON layer (QEMU's
dialect and its error recovery), the negotiation, OOB refusals, URIs refused at once and
connections that fail later, the events a command sends before its answer, one client per
monitor and `quit`. What differs on purpose is listed in docs/internals.md; the script leaves
out only that. The migration itself (events, run state, query-migrate) is in
test_conformance_migration.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from sevconsole.lab import Lab

from .qmp_diff import Raw, Step, both, diff, event, normal, qemu

pytestmark = [pytest.mark.needs_qemu, pytest.mark.slow]

NESTED = b'{"execute":"query-name","id":%s}'
JSON_CASES = [
    b"{'execute':'query-name','id':'a\\'b\"c'}",  # QEMU's single-quoted strings
    b'{"execute":"query-name","id":"\\u0041\\u00e9\\ud83d\\ude00\\/"}',
    b'{"execute":"query-name","id":"\\x41"}',
    b'{"execute":"query-name","id":"\\q"}',
    b'{"execute":"query-name","id":"\\ud800"}',
    b'{"execute":"query-name","id":"\\u00"}',
    b'{"execute":"query-name","id":"\\uffff"}',
    b'{"execute":"query-name","id":"\\u0000"}',
    b'{"execute":"query-name","id":"\xc3\xa9\x7f"}',
    b'{"execute":"query-name","id":"\xc0\x80"}',
    b'{"execute":"query-name","id":"\xef\xbf\xbf"}',
    b'{"execute":"query-name","id":"\xed\xa0\x80"}',
    b'{"execute":"query-name","id":"\xc3"}',
    b'{"execute":"query-name","id":"a\x01b"}',
    b'{"execute":"query-name","id":"a\xffb"}',
    b'{"execute":"query-name","id":"tab\there"}',
    b'{"execute":"query-name","id":"\\\x01"}',
    b'{"execute":"query-name","execute":"query-status"}',
    b'{"execute":"query-name",}',
    b'{"execute" "query-name"}',
    b'{"execute":"query-name" "id":1}',
    b'{1:2}',
    b'{"execute":"query-name","id":[1,2,]}',
    b'{"execute":"query-name","id":[1 2]}',
    b'{"execute":"query-name","id":{"a":1,"a":2}}',
    b'{"execute":"query-name","id":18446744073709551615}',
    b'{"execute":"query-name","id":18446744073709551616}',
    b'{"execute":"query-name","id":-9223372036854775809}',
    b'{"execute":"query-name","id":1.5e3}',
    b'{"execute":"query-name","id":0.1}',
    b'{"execute":"query-name","id":-0}',
    b'{"execute":"query-name","id":01}',
    b'{"execute":"query-name","id":0x10}',
    b'{"execute":"query-name","id":0e5}',
    b'{"execute":"query-name","id":5.}',
    b'{"execute":"query-name","id":5e+}',
    b'{"execute":"query-name","id":-x}',
    b'{"execute":"query-name","id":+1}',
    b'{"execute":"query-name","id":.5}',
    b'{"execute":"query-name","id":NaN}',
    b'{"execute":"query-name","id":tru}',
    b'{"execute":"query-name","id":truE}',
    b'{"execute":"query-name","id":true}',
    b'{"execute":"query-name","id":%d}',
    b'{"execute":"query-name",\x00"id":1}',
    b'{"execute":"query-name"}}',
    b'{"execute":"query-name"} @',
    b'{]', b'}', b']', b'[1]', b'{}', b'""', b"''", b'1 2', b'"a string { with [ brackets" 7 nul',
    b'"\xff\xfe"', b'\x04', b'\x1b', b'\xc3\xa9',
    NESTED % (b'[' * 1023 + b']' * 1023), NESTED % (b'[' * 1024 + b']' * 1024),
    NESTED % (b'[' * 1025 + b']' * 1025),
]
DISPATCH_CASES = [
    {"execute": 1}, {"execute": "query-name", "arguments": []}, {"execute": "query-name", "arguments": None},
    {"execute": "query-name", "foo": 1}, {"id": 7}, {"arguments": {}, "id": 8},
    {"execute": "query-name", "control": {}}, {"exec-oob": "query-status"}, {"exec-oob": "query-status", "id": 1},
    {"exec-oob": "no-such-command"}, {"exec-oob": 1}, {"execute": "query-status", "exec-oob": "query-status"},
    {"exec-oob": "query-status", "execute": "query-status", "id": 2}, {"execute": "no-such-command", "id": "x"},
    {"execute": "qmp_capabilities"}, {"execute": "qmp_capabilities", "arguments": {"enable": "x"}},
    {"execute": "query-status", "arguments": {"x": 1}}, {"execute": "query-status", "arguments": {}},
]
QUERIES = ["query-status", "query-name", "query-version", "query-memory-size-summary", "query-migrate",
           "query-migrate-capabilities", "query-migrate-parameters", "query-sev", "query-sev-launch-measure",
           "query-dirty-rate"]
ARG_CASES = [
    ("query-sev-attestation-report", {}), ("query-sev-attestation-report", {"mnonce": 1}),
    ("query-sev-attestation-report", {"mnonce": "AAAA"}), ("migrate", {}), ("migrate", {"uri": 1}),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "blk": "y"}), ("migrate", {"uri": "tcp:1:1", "x": 1, "inc": 1}),
    ("migrate", {"uri": "tcp:127.0.0.1:1", "resume": True}), ("migrate-incoming", {"uri": 1}),
    ("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}), ("migrate-incoming", {}), ("migrate_cancel", {}),
    ("migrate-set-capabilities", {}), ("migrate-set-capabilities", {"capabilities": {}}),
    ("migrate-set-capabilities", {"capabilities": [1]}),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events"}]}),
    ("migrate-set-capabilities", {"capabilities": [{"state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [{"capability": 1, "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "nope", "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": 1}]}),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True, "x": 1}]}),
    ("migrate-set-capabilities", {"capabilities": []}),
    ("calc-dirty-rate", {}), ("calc-dirty-rate", {"calc-time": "x"}), ("calc-dirty-rate", {"calc-time": -1}),
    ("calc-dirty-rate", {"calc-time": 0}), ("calc-dirty-rate", {"calc-time": 61}),
    ("calc-dirty-rate", {"calc-time": 18446744073709551615}), ("calc-dirty-rate", {"calc-time": 1, "mode": "x"}),
    # not the modes dirty-ring and dirty-bitmap: QEMU 7.2 under TCG dies of them (SIGSEGV)
    ("calc-dirty-rate", {"calc-time": 1, "sample-pages": 10}),
]
# QEMU's migrate_params_check and the visitor's types, over every parameter.
PARAM_VALUES: list[object] = ["x", -1, 1.5, 18446744073709551616, None, True, 0, 255, 256, 4294967296, [], {}]
PARAM_EXTRA = [
    {"announce-initial": 100001}, {"announce-max": 100000}, {"announce-rounds": 1001}, {"announce-step": 10000},
    {"compress-level": 10}, {"compress-level": 9}, {"throttle-trigger-threshold": 101},
    {"cpu-throttle-initial": 100}, {"downtime-limit": 2000000}, {"downtime-limit": 2000001},
    {"xbzrle-cache-size": 4096}, {"xbzrle-cache-size": 4095}, {"xbzrle-cache-size": 12288},
    {"max-cpu-throttle": 10}, {"max-cpu-throttle": 10, "cpu-throttle-initial": 5},
    {"cpu-throttle-initial": 20, "max-cpu-throttle": 99}, {"multifd-compression": "zlib"},
    {"multifd-compression": "none"}, {"tls-creds": None, "tls-hostname": "h"}, {"tls-hostname": ""},
    {"zzz": 1, "downtime-limit": "x"}, {"zzz": 1}, {"downtime-limit": -1, "compress-level": 10}, {},
    {"block-bitmap-mapping": [{"node-name": "n"}]},
    {"block-bitmap-mapping": [{"node-name": "n", "alias": "a", "bitmaps": [{"name": "b", "alias": "c",
                                                                            "transform": {"persistent": 1}}]}]},
    {"block-bitmap-mapping": [{"node-name": "n", "alias": "a", "bitmaps": []},
                              {"node-name": "n", "alias": "b", "bitmaps": []}]},
    {"block-bitmap-mapping": [{"node-name": "n", "alias": "a", "bitmaps": []},
                              {"node-name": "m", "alias": "a", "bitmaps": []}]},
    {"block-bitmap-mapping": [{"node-name": "n", "alias": "a" * 256, "bitmaps": []}]},
    {"block-bitmap-mapping": [{"node-name": "n", "alias": "a", "bitmaps": [{"name": "b", "alias": "c"},
                                                                            {"name": "b", "alias": "d"}]}]},
    {"block-bitmap-mapping": [{"node-name": "n", "alias": "a", "bitmaps": [{"name": "b", "alias": "c"}]}]},
]
CAPABILITY_COMBOS = [
    ("postcopy-ram", "compress"), ("postcopy-ram", "x-ignore-shared"), ("postcopy-preempt",),
    ("postcopy-preempt", "postcopy-ram"), ("postcopy-preempt", "postcopy-ram", "compress"),
    ("multifd", "compress"), ("zero-copy-send",), ("zero-copy-send", "multifd"),
    ("zero-copy-send", "multifd", "xbzrle"), ("xbzrle", "compress"), ("late-block-activate", "return-path"),
    *[("background-snapshot", other) for other in (
        "postcopy-ram", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "return-path", "multifd",
        "pause-before-switchover", "auto-converge", "release-ram", "rdma-pin-all", "compress", "xbzrle",
        "x-colo", "validate-uuid", "zero-copy-send", "events", "block")],
]
SYNC_URIS = ["foo:bar", "tcp:nohostport", "tcp:[::1]", "tcp:", "tcp:127.0.0.1:", "tcp::", "unix:", "fd:foo", "fd:",
             "vsock:x", "vsock:1:2,x", "rdma:x", "", "TCP:127.0.0.1:1"]
ASYNC_URIS = ["tcp:127.0.0.1:1", "tcp:[::1]:1", "unix:/nonexistent/x", "tcp:256.1.1.1:5", "tcp::1234", "tcp:127.0.0.1:abc",
              "tcp:localhost:99999", "vsock:1:2x", "vsock:a:2"]


def caps(*names: str, state: bool = True) -> dict:
    return {"execute": "migrate-set-capabilities",
            "arguments": {"capabilities": [{"capability": n, "state": state} for n in names]}}


def command(name: str, args: dict | None = None) -> dict:
    return {"execute": name} if args is None else {"execute": name, "arguments": args}


@pytest.fixture(scope="module")
def monitors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """One real QEMU and one lab VM (plain, 16 MiB), both named `plain`."""
    folder = tmp_path_factory.mktemp("conformance")
    with qemu(folder, "plain") as qemu_path, Lab.start(folder / "lab", hosts=1, mem_mib=16) as lab:
        yield qemu_path, lab.qmp_path("lab-1", "plain")


@pytest.fixture(scope="module")
def script(monitors: tuple[str, str]) -> dict[str, list[Step]]:
    """The whole script, run once on each side; the tests below compare it group by group."""
    q, lab = Raw(monitors[0]), Raw(monitors[1])
    out: dict[str, list[Step]] = {"greeting": [Step("greeting", [q.greeting], [lab.greeting])]}

    def run(group: str, label: str, data: bytes | dict) -> None:
        out.setdefault(group, []).append(both(q, lab, label, data))

    for data in (command("query-status"), command("qmp_capabilities", {"enable": ["foo"]}),
                 command("qmp_capabilities", {"enable": "oob"}), {"exec-oob": "qmp_capabilities"},
                 {"execute": "qmp_capabilities", "control": {}}, {"id": 1}, command("nope"),
                 b"{'execute': 'qmp_capabilities', 'arguments': {'enable': ['oob']}, 'id': 'neg'}"):
        run("negotiation", f"{data!r}", data)
    for raw in JSON_CASES:
        run("json", f"{raw[:80]!r}", raw)
    for msg in DISPATCH_CASES:
        run("dispatch", json.dumps(msg), msg)
    for name in QUERIES:
        run("queries", name, command(name))
    for name, args in ARG_CASES:
        run("arguments", f"{name} {json.dumps(args)}", command(name, args))
    defaults = q.request(command("query-migrate-parameters"))[0]["return"]
    for key in (*defaults, "block-bitmap-mapping"):
        for value in PARAM_VALUES:
            run("parameters", f"{key}={json.dumps(value)}", command("migrate-set-parameters", {key: value}))
            run("parameters", f"{key} restored", command("migrate-set-parameters", {key: defaults.get(key, [])}))
    for args in PARAM_EXTRA:
        run("parameters", json.dumps(args), command("migrate-set-parameters", args))
    run("parameters", "query after", command("query-migrate-parameters"))
    names = [c["capability"] for c in q.request(command("query-migrate-capabilities"))[0]["return"]]
    for name in names:
        run("capabilities", name, caps(name))
        run("capabilities", f"{name} off", caps(*names, state=False))
    for combo in CAPABILITY_COMBOS:
        run("capabilities", "+".join(combo), caps(*combo))
        run("capabilities", "all off", caps(*names, state=False))
    run("capabilities", "events twice", caps("events", "events"))
    run("capabilities", "query after", command("query-migrate-capabilities"))
    for name in ("stop", "stop", "query-status", "cont", "cont", "query-status"):
        run("run state", name, command(name))  # STOP/RESUME before the answer, once each
    run("uris", "events on", caps("events"))
    for uri in SYNC_URIS:
        run("uris", f"migrate {uri!r}", command("migrate", {"uri": uri}))
        run("uris", f"query-migrate after {uri!r}", command("query-migrate"))
    for uri in ASYNC_URIS:  # refused later: setup before the answer, then failed
        data = command("migrate", {"uri": uri})
        q.send(data)
        lab.send(data)
        step = Step(f"migrate {uri!r}", q.until(event("MIGRATION", "failed")), lab.until(event("MIGRATION", "failed")))
        out.setdefault("uris", []).append(step)
        run("uris", f"query-migrate after {uri!r}", command("query-migrate"))
    # (not the moment after: QEMU's thread says "measuring" a little later, a race of its own)
    run("dirty rate", "calc-dirty-rate 1 s", command("calc-dirty-rate", {"calc-time": 1}))
    out["dirty rate"].append(Step("measured", _measured(q), _measured(lab)))
    run("uris", "block capability", caps("block"))
    run("uris", "blk with the block capability", command("migrate", {"uri": "tcp:127.0.0.1:1", "blk": True}))
    run("uris", "block capability off", caps("block", state=False))
    q.close()
    lab.close()
    return out


def _measured(client: Raw) -> list:
    """query-dirty-rate once the measurement ended (polled: it takes the asked second)."""
    deadline = time.monotonic() + 10
    while True:
        answer = client.request(command("query-dirty-rate"))
        if answer[0]["return"]["status"] == "measured" or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


@pytest.mark.parametrize("group", ["greeting", "negotiation", "json", "dispatch", "queries", "arguments",
                                   "parameters", "capabilities", "run state", "dirty rate", "uris"])
def test_the_lab_answers_as_qemu(script: dict[str, list[Step]], group: str) -> None:
    steps = script[group]
    assert steps, group
    problems = diff(steps)
    assert not problems, f"{len(problems)} of {len(steps)} steps differ:\n" + "\n".join(problems[:20])


def test_the_script_checks_something(script: dict[str, list[Step]]) -> None:
    """A guard against a script that compares empty transcripts: QEMU answered every step."""
    for group, steps in script.items():
        assert all(step.qemu for step in steps), group
    assert normal(script["run state"][0].qemu)[0] == {"event": "STOP", "timestamp": "*"}  # before the answer


def test_one_client_at_a_time(monitors: tuple[str, str]) -> None:
    """A second client gets no greeting while the first holds the monitor, then gets it."""
    for path in monitors:
        first = Raw(path)
        second = Raw(path, greet=False)
        second.sock.settimeout(0.5)  # the absence of a greeting can only be shown by waiting
        with pytest.raises(TimeoutError):
            second.sock.recv(1)
        second.sock.settimeout(20)
        first.close()
        assert normal(second.read())["QMP"]["capabilities"] == ["oob"], path
        second.close()


def test_quit_answers_after_shutdown_then_closes(monitors: tuple[str, str]) -> None:
    ends = []
    for path in monitors:
        client = Raw(path)
        client.request(command("qmp_capabilities"))
        client.send(command("quit"))
        ends.append(normal(client.until(lambda m: m == "<EOF>")))
        client.close()
    assert ends[0] == ends[1] == [{"timestamp": "*", "event": "SHUTDOWN",
                                   "data": {"guest": False, "reason": "host-qmp-quit"}}, {"return": {}}, "<EOF>"]
