"""Shared test fixtures: where the real AMD certificates are, and skips for absent system parts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CERTS_DIR = ROOT.parent / "shared" / "fixtures" / "sev-certs"


@pytest.fixture(scope="session")
def sev_certs() -> Path:
    """The folder of real AMD certificates; tests that need it skip where it is absent."""
    if not CERTS_DIR.is_dir():
        pytest.skip(f"real SEV certificates not found at {CERTS_DIR} (../shared/fixtures/sev-certs)")
    return CERTS_DIR


def require_binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{name} is not installed (tests/run.sh installs it with apt-get when run as root)")
    return path
