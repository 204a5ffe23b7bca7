"""Where the console keeps its own files (user config and data directories)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "sevconsole"


def config_dir() -> Path:
    """Theme, key map and the default inventory. SEVCONSOLE_CONFIG_DIR overrides (tests)."""
    return Path(os.environ.get("SEVCONSOLE_CONFIG_DIR") or platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    """AMD roots imported by the operator, the console's known_hosts, the audit log."""
    return Path(os.environ.get("SEVCONSOLE_DATA_DIR") or platformdirs.user_data_dir(APP))


def default_inventory() -> Path:
    return config_dir() / "inventory.toml"


def known_hosts_file() -> Path:
    return data_dir() / "known_hosts"


def amd_roots_dir() -> Path:
    return data_dir() / "amd"


def audit_log_file() -> Path:
    return data_dir() / "audit.jsonl"
