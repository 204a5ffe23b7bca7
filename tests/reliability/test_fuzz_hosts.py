"""Bad input to the hosts layer never crashes anything: the SSH transport cut at random bytes
while a lab host is probed, the helper's JSON answer fuzzed (every path from its stdout to a
HostReport), and inventory files fuzzed. Only typed errors with sentences come out; discovery
never raises and never reports "failed unexpectedly" (its catch-all for bugs)."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevconsole.hosts.discovery import DiscoveryOptions, discover
from sevconsole.hosts.errors import InventoryError
from sevconsole.hosts.inventory import HostSpec, Inventory, parse_inventory
from sevconsole.hosts.ssh import CommandResult, Endpoint, Timeouts
from sevconsole.lab import Lab

from .proxy import BACK, OUT, Fault, StreamProxy

UNEXPECTED = "failed unexpectedly"
SHORT = Timeouts(connect=3, banner=3, handshake=4, auth=4, channel=4, command=6)


# ------------------------------------------------------------------ SSH cut during a probe


@pytest.fixture(scope="module")
def lab1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Lab.start(tmp_path_factory.mktemp("ssh-cut"), hosts=1, mem_mib=4) as lab:
        yield lab


def probe_through(lab: Lab, tmp: Path, faults: list[Fault]) -> tuple[list, StreamProxy, float]:  # type: ignore[type-arg]
    """Discovers lab-1 through a proxy on its SSH port (its key listed for the proxy's port)."""
    real = lab.host("lab-1").port
    proxy = StreamProxy(("127.0.0.1", real), faults, magic=False)
    line = next(x for x in lab.known_hosts.read_text().splitlines() if x.startswith(f"[127.0.0.1]:{real} "))
    known = tmp / f"known_hosts-{proxy.port}"
    known.write_text(line.replace(f":{real} ", f":{proxy.port} ", 1) + "\n")
    spec = HostSpec("lab-1", "127.0.0.1", proxy.port, "lab", (lab.client_key,), lab=True)
    options = DiscoveryOptions(known_hosts=known, system_known_hosts=(), lab_root=lab.paths.lab_root,
                               amd_roots=tmp, timeouts=SHORT, use_agent=False)
    t0 = time.monotonic()
    try:
        with options.pool() as pool:
            reports = discover([spec], options, pool=pool)
    finally:
        proxy.close()
    return reports, proxy, time.monotonic() - t0


@pytest.mark.slow
def test_ssh_cut_at_random_bytes_during_probe(lab1: Lab, tmp_path: Path) -> None:
    [clean], proxy, _ = probe_through(lab1, tmp_path, [])
    assert clean.reachable and not clean.errors and clean.vms, clean
    total = dict(proxy.forwarded)
    rng = np.random.default_rng(5)
    cuts = [(OUT, int(x)) for x in rng.integers(0, total[OUT], 5)] + \
           [(BACK, int(x)) for x in rng.integers(0, total[BACK], 5)] + [(OUT, 0), (BACK, 0)]
    for direction, at in cuts:
        reports, proxy, took = probe_through(lab1, tmp_path, [Fault("cut", direction=direction, at=at)])
        [r] = reports
        where = f"cut {direction} at byte {at} of {total[direction]}"
        assert took < 30, f"{where}: discovery took {took:.1f} s"
        errors = list(r.errors) + [e for v in r.vms for e in v.errors]
        assert not any(UNEXPECTED in e for e in errors), (where, errors)
        if proxy.fired.is_set() and not r.vms:
            # the probe itself was cut: the report says so, naming the host
            assert r.errors and all("lab-1" in e for e in r.errors), (where, r)


# ------------------------------------------------------------------ the helper's JSON


@dataclass
class FakeConn:
    """Stands in for an SshConnection whose helper printed `stdout` (the bytes under test)."""

    endpoint: Endpoint
    stdout: bytes
    rc: int = 0

    @property
    def name(self) -> str:
        return self.endpoint.name

    def ping(self) -> float:
        return 0.1

    def run(self, command: str, stdin: bytes | None = None, timeout: float | None = None) -> CommandResult:
        return CommandResult(self.rc, self.stdout, b"")


class FakePool:
    def __init__(self, stdout: bytes, rc: int) -> None:
        self.stdout, self.rc = stdout, rc

    def get(self, endpoint: Endpoint) -> FakeConn:
        return FakeConn(endpoint, self.stdout, self.rc)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**66), 2**66), st.floats(allow_nan=False),
                      st.text(max_size=30))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=10)
PROBE_KEYS = ("helper", "hostname", "kernel", "cpu", "kvm_amd", "dev_sev", "platform_status", "pdh",
              "cert_chain", "amd_chain", "errors", "vms", "lab", "python")


@pytest.fixture(scope="module")
def rome_b64(sev_certs: Path) -> dict[str, str]:
    p, a = sev_certs / "platforms" / "rome", sev_certs / "amd" / "rome"
    chain = b"".join((p / f"{n}.cert").read_bytes() for n in ("pek", "oca", "cek"))
    amd = (a / "ask.cert").read_bytes() + (a / "ark.cert").read_bytes()
    return {"pdh": base64.b64encode((p / "pdh.cert").read_bytes()).decode(),
            "cert_chain": base64.b64encode(chain).decode(), "amd_chain": base64.b64encode(amd).decode()}


@st.composite
def probe_answer(draw: st.DrawFn, certs: dict[str, str]) -> bytes:
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return draw(st.binary(max_size=200))
    answer: dict = {"helper": 1, "vms": []}
    for key in draw(st.lists(st.sampled_from(PROBE_KEYS), max_size=8)):
        answer[key] = draw(json_value)
    if kind >= 3:  # real certificates, sometimes with one byte changed
        for key, value in certs.items():
            raw = bytearray(base64.b64decode(value))
            if draw(st.booleans()):
                raw[draw(st.integers(0, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
            answer[key] = base64.b64encode(bytes(raw[:draw(st.sampled_from([len(raw), 100, 2084]))])).decode()
    if kind >= 5:
        answer["vms"] = draw(st.lists(st.one_of(json_value, st.dictionaries(
            st.sampled_from(["pid", "name", "qmp", "argv"]), json_value)), max_size=3))
    text = json.dumps(answer)
    if draw(st.integers(0, 4)) == 0:  # noise before the JSON line, as a chatty login shell prints
        text = draw(st.text(max_size=40)) + "\n" + text
    return text.encode()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_helper_answers_never_crash_discovery(rome_b64: dict[str, str], tmp_path: Path, data: st.DataObject) -> None:
    stdout = data.draw(probe_answer(rome_b64))
    rc = data.draw(st.sampled_from([0, 0, 0, 1, 127]))
    lab = data.draw(st.booleans())
    spec = HostSpec("odd", "192.0.2.7", 22, "op", lab=lab)
    options = DiscoveryOptions(known_hosts=tmp_path / "kh", system_known_hosts=(), amd_roots=tmp_path,
                               query_vms=False, use_agent=False)
    [report] = discover([spec], options, pool=FakePool(stdout, rc))  # type: ignore[arg-type]
    assert report.name == "odd"
    assert not any(UNEXPECTED in e for e in report.errors), (stdout[:300], report.errors)
    for error in report.errors:
        assert error.startswith("odd") or "odd" in error, error
    if report.capabilities is not None:  # whatever came, a chain is either verified or says why not
        cr = report.capabilities.chain_report
        assert cr is not None or report.capabilities.chain_error, report.capabilities


# ------------------------------------------------------------------ inventory files


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON escapes are TOML basic-string escapes (bad surrogates: a TOML error)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


toml_leaf = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=20))
toml_any = st.recursive(toml_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
HOST_KEYS = ("name", "address", "port", "user", "identity", "jump", "qmp_sockets", "labels", "lab", "x")
good_values = {"name": st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
               "address": st.sampled_from(["127.0.0.1", "host.example", "::1", "", "a b"]),
               "port": st.integers(-5, 70000), "user": st.text(max_size=8),
               "identity": st.sampled_from(["~/.ssh/id", "key", ""]), "jump": st.text(max_size=12),
               "lab": st.booleans()}


@st.composite
def inventory_text(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=200))
    lines = []
    for key in draw(st.lists(st.sampled_from(["known_hosts", "lab_root", "hosts", "z"]), max_size=2, unique=True)):
        lines.append(f"{key} = {toml_value(draw(toml_any))}")
    for _ in range(draw(st.integers(0, 4))):
        lines.append("[[host]]")
        for key in draw(st.lists(st.sampled_from(HOST_KEYS), max_size=6, unique=True)):
            strategy = good_values.get(key) if draw(st.booleans()) else None
            lines.append(f"{key} = {toml_value(draw(strategy if strategy is not None else toml_any))}")
    return "\n".join(lines) + "\n"


@settings(max_examples=120, deadline=None)
@given(text=inventory_text())
def test_inventory_parser_gives_an_inventory_or_typed_problems(text: str) -> None:
    path = Path("/nonexistent-dir/inventory.toml")
    try:
        inv = parse_inventory(text, path)
    except InventoryError as exc:
        assert exc.problems, text
        for problem in exc.problems:
            line = str(problem)
            assert line.startswith(str(path)) and len(line) > len(str(path)) + 4, line
        return
    assert isinstance(inv, Inventory)
    names = [h.name for h in inv.hosts]
    assert len(names) == len(set(names)), names
    for h in inv.hosts:
        assert h.name and h.address, h
        assert h.port is None or 1 <= h.port <= 65535, h
