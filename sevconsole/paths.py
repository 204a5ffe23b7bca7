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


def state_dir() -> Path:
    """Migration journals, cordons, the embedded lab. SEVCONSOLE_STATE_DIR overrides (tests)."""
    return Path(os.environ.get("SEVCONSOLE_STATE_DIR") or platformdirs.user_state_dir(APP))


def migrations_dir() -> Path:
    """One folder per migration: its job, journal, runner log and lock."""
    return state_dir() / "migrations"


def runtime_dir() -> Path:
    """Runner sockets, in a folder of mode 0700. SEVCONSOLE_RUNTIME_DIR overrides (tests).

    Falls back to a per-user folder in /tmp when the platform's runtime folder cannot be made
    (root without XDG_RUNTIME_DIR) or is too long for a UNIX socket path."""
    override = os.environ.get("SEVCONSOLE_RUNTIME_DIR")
    candidates = [Path(override)] if override else []
    if not override:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg:
            candidates.append(Path(xdg) / APP)
        candidates.append(Path(f"/tmp/{APP}-{os.getuid()}"))
    for path in candidates:
        if len(str(path)) > 80:  # room for "/m-<id>.sock" within sun_path's 108 bytes
            continue
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = path.stat()
            if st.st_uid != os.getuid():
                continue  # someone else's folder: never put our sockets there
            if st.st_mode & 0o077:
                path.chmod(0o700)
            return path
        except OSError:
            continue
    raise OSError("no runtime folder for runner sockets: set SEVCONSOLE_RUNTIME_DIR to a short, "
                  "private folder")
