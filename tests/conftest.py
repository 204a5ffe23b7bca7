"""Shared test fixtures: where the real AMD certificates are, and skips for absent system parts."""

from __future__ import annotations

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
