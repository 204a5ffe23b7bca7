"""The disk images a QEMU command line names, and whether a path lies in given folders.

Pure and standard library only: the allow-list (engine/argv_policy.py), preflight and the shared
storage look-up (hosts/storage.py) read disk paths the same way.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Sequence

# no ',', ':', '=', spaces or control characters: a path QEMU reads one way only
DISK_PATH = re.compile(r"^/[A-Za-z0-9._/+@-]{1,1023}$")


def option_keys(value: str, implied: str | None) -> dict[str, str]:
    """key=value pairs of a QEMU option string (',,' is a comma; a bare first word is the implied
    key's value), or a JSON object's top-level string values."""
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except (ValueError, RecursionError):
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
    out: dict[str, str] = {}
    parts, current, i = [], "", 0
    while i < len(value):
        if value[i] == "," and value[i + 1:i + 2] == ",":
            current += ","
            i += 2
            continue
        if value[i] == ",":
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    for index, part in enumerate(parts):
        key, eq, val = part.partition("=")
        if eq:
            out.setdefault(key, val)
        elif index == 0 and implied is not None:
            out.setdefault(implied, part)
    return out


def disk_paths(argv: Sequence[str]) -> tuple[str, ...]:
    """The image files `-drive file=` and `-blockdev filename=` name, in order, once each."""
    found: list[str] = []
    for i, arg in enumerate(argv[:-1]):
        opt = arg[1:] if arg.startswith("--") else arg
        if opt == "-drive":
            path = option_keys(argv[i + 1], None).get("file")
        elif opt == "-blockdev":
            path = option_keys(argv[i + 1], "driver").get("filename")
        else:
            continue
        if path and path.startswith("/") and path not in found:
            found.append(path)
    return tuple(found)


def folders(storage: Sequence[str]) -> tuple[str, ...]:
    """The usable folders of a shared storage list: absolute, normalised, not / itself."""
    out = []
    for folder in storage:
        folder = str(folder).rstrip("/")
        if folder and DISK_PATH.match(folder) and posixpath.normpath(folder) == folder:
            out.append(folder)
    return tuple(out)


def under_storage(path: str, storage: Sequence[str]) -> bool:
    """An absolute, normalised path (no '..', no '//') inside one of the folders."""
    if not DISK_PATH.match(path) or posixpath.normpath(path) != path:
        return False
    return any(path.startswith(folder + "/") for folder in folders(storage))
