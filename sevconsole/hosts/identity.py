"""One machine, two names: which inventory hosts are the same machine.

A host is known by its SSH host key (discovery records its fingerprint) and, where the helper can
read it, its /etc/machine-id. Two names with the same host key, or the same machine id, are one
machine: listed once (the later name is an alias, with a note), never each other's migration
target. Cloned images may share a machine id; their running kernels (boot ids) still differ, and
then the ids say nothing.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

_ID = re.compile(r"^[0-9a-f-]{16,64}$")


def _id(report: Any, key: str) -> str | None:
    value = report.extra.get(key) if isinstance(getattr(report, "extra", None), dict) else None
    return value if isinstance(value, str) and _ID.match(value) else None


def _fingerprint(report: Any) -> str | None:
    value = report.extra.get("host_key_fingerprint") if isinstance(getattr(report, "extra", None), dict) else None
    return value if isinstance(value, str) and value.startswith("SHA256:") else None


def same_machine(a: Any, b: Any) -> str | None:
    """Why HostReports `a` and `b` are one machine ("the same SSH host key SHA256:..."), or None."""
    if a.name == b.name:
        return None
    key_a, key_b = _fingerprint(a), _fingerprint(b)
    if key_a is not None and key_a == key_b:
        return f"the same SSH host key {key_a}"
    mid_a, mid_b = _id(a, "machine_id"), _id(b, "machine_id")
    if mid_a is not None and mid_a == mid_b:
        boot_a, boot_b = _id(a, "boot_id"), _id(b, "boot_id")
        if boot_a is not None and boot_b is not None and boot_a != boot_b:
            return None  # a cloned image: two kernels running, two machines
        return f"the same machine id {mid_a}"
    return None


def mark_aliases(reports: list[Any]) -> list[Any]:
    """Each report that is the same machine as an earlier one gets extra["same_machine_as"] (that
    name) and extra["same_machine_note"] (a sentence for the operator)."""
    out: list[Any] = []
    for report in reports:
        first = next(((r, why) for r in out if "same_machine_as" not in r.extra
                      for why in [same_machine(r, report)] if why), None)
        if first is None:
            out.append(report)
            continue
        other, why = first
        note = (f"{report.name} and {other.name} are one machine ({why}): it is listed once, as "
                f"{other.name}, and neither is offered as the other's migration target")
        out.append(replace(report, extra={**report.extra, "same_machine_as": other.name,
                                          "same_machine_note": note}))
    return out


def alias_of(report: Any) -> str | None:
    value = report.extra.get("same_machine_as") if isinstance(getattr(report, "extra", None), dict) else None
    return value if isinstance(value, str) else None
