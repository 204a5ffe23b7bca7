"""Fixtures of the reliability campaign: labs reached over real SSH and QMP, driven by the engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .rig import Rig

GUEST_MIB = 16  # small guests: many migrations per test, each still thousands of SEV packets


@pytest.fixture(autouse=True)
def user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The console's data and config (audit log, known_hosts) under the test's own folder."""
    monkeypatch.setenv("SEVCONSOLE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SEVCONSOLE_CONFIG_DIR", str(tmp_path / "config"))
    return tmp_path


@pytest.fixture(scope="module")
def rig3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """lab-1..lab-3 with 16 MiB guests, shared by a module's tests (they leave `web` runnable)."""
    rig = Rig.start(tmp_path_factory.mktemp("rig3"), hosts=3, mem_mib=GUEST_MIB)
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture
def rig2(tmp_path: Path) -> Iterator[Rig]:
    """A fresh two-host lab, for faults that kill a host."""
    rig = Rig.start(tmp_path, hosts=2, mem_mib=GUEST_MIB)
    try:
        yield rig
    finally:
        rig.close()
