"""Shared test fixtures: where the real AMD certificates are, and skips for absent system parts."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevconsole.hosts import passphrases

ROOT = Path(__file__).resolve().parents[1]
CERTS_DIR = ROOT / "tests" / "fixtures" / "sev-certs"  # public AMD data, kept in the repository


@pytest.fixture(scope="session")
def sev_certs() -> Path:
    """The folder of real AMD certificates (tests/fixtures/sev-certs, see its README)."""
    if not CERTS_DIR.is_dir():
        pytest.fail(f"the real SEV certificates are missing from {CERTS_DIR}; they are part of the repository")
    return CERTS_DIR


def require_binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{name} is not installed (tests/run.sh installs it with apt-get when run as root)")
    return path


@pytest.fixture(autouse=True)
def isolated_migration_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Journals and runner sockets of a test's migrations in its own folders (subprocesses
    inherit them). The runtime folder is short: UNIX socket paths are limited to 108 bytes."""
    monkeypatch.setenv("SEVCONSOLE_STATE_DIR", str(tmp_path / "state"))
    with tempfile.TemporaryDirectory(prefix="sc-", dir="/tmp") as runtime:
        monkeypatch.setenv("SEVCONSOLE_RUNTIME_DIR", runtime)
        yield


@pytest.fixture(autouse=True)
def forgotten_passphrases() -> Iterator[None]:
    """Who asks for passphrases, and those learnt, are process-wide: the console (tui/app.py)
    and the migrate and evacuate commands set an asker. Each test starts with none of either,
    whichever tests ran before it in this process."""
    passphrases.set_asker(None)
    passphrases._known.clear()
    yield
    passphrases.set_asker(None)
    passphrases._known.clear()


# ------------------------------------------------------------------ tests that time real work
#
# A test marked `alone` asserts a rate or a latency of real processes (the lab's PSP pace, the
# console's answer to a key). Under pytest-xdist (tests/run.sh) it runs while the other worker
# waits between two of its tests: a 64-host lab starting beside it measured the PSP at 145
# pages/s instead of ~400. Two locks shared by the workers: every test holds `room` shared; an
# `alone` test holds it exclusive, and first takes `gate`, which each test passes on its way in,
# so that the other worker cannot keep `room` busy with test after test. Setup and teardown are
# inside (a module's lab starts in its first test's setup).


@contextlib.contextmanager
def _turn(item: pytest.Item) -> Iterator[None]:
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    run_dir = item.config._tmp_path_factory.getbasetemp().parent  # type: ignore[attr-defined]  # the run's, shared by its workers
    alone = item.get_closest_marker("alone") is not None
    with open(run_dir / "alone.gate", "a") as gate, open(run_dir / "alone.room", "a") as room:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    with _turn(item):
        yield
