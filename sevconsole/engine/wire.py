"""Progress snapshots and outcomes as JSON, whole, for the runner's socket and the replay file.

`Progress.to_json()` is the short form `migrate --json` prints; this is the lossless one: the
page map travels zlib-compressed (sev.pagestate's encoding), the firmware views and SEV log as
lists. Anything read back is checked: a bad field raises WireError, never a crash later.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from sevconsole.engine.progress import FirmwareView, Phase, Progress, SevLogEntry
from sevconsole.sev.pagestate import decode_states, encode_states

MAX_PAGES = 1 << 26  # 256 GiB of 4 KiB pages


class WireError(ValueError):
    pass


_SCALARS = ("vm", "source", "target", "pass_number", "started_at", "elapsed_s", "page_size",
            "total_pages", "page_map_exact", "bytes_transferred", "bytes_remaining", "bytes_total",
            "pages_transferred", "rate_bps", "pages_per_s", "dirty_pages_per_s", "downtime_limit_ms",
            "expected_downtime_ms", "converging", "eta_s")


def progress_to_wire(p: Progress) -> dict[str, Any]:
    data: dict[str, Any] = {name: getattr(p, name) for name in _SCALARS}
    data["phase"] = p.phase.value
    data["rate_history"] = list(p.rate_history)
    data["events"] = list(p.events)
    data["errors"] = list(p.errors)
    data["extra"] = {k: v for k, v in p.extra.items() if isinstance(v, str | int | float | bool | None)}
    data["sev_log"] = [[e.host, e.command, e.status, e.count, e.time] for e in p.sev_log]
    for key in ("source_fw", "target_fw"):
        fw = getattr(p, key)
        data[key] = None if fw is None else asdict(fw)
    if p.page_states is not None:
        data["pages"] = {"count": int(p.page_states.size), "data": encode_states(p.page_states)}
    return data


def progress_from_wire(data: Any) -> Progress:
    if not isinstance(data, dict):
        raise WireError("a progress snapshot is not a JSON object")
    try:
        values: dict[str, Any] = {name: data[name] for name in _SCALARS if name in data}
        for name in ("vm", "source", "target"):
            values[name] = str(values.get(name, ""))
        values["phase"] = Phase(data["phase"])
        values["rate_history"] = tuple(float(x) for x in data.get("rate_history", ()))
        values["events"] = tuple(str(x) for x in data.get("events", ()))
        values["errors"] = tuple(str(x) for x in data.get("errors", ()))
        values["extra"] = dict(data.get("extra") or {})
        values["sev_log"] = tuple(SevLogEntry(str(h), str(c), int(s), int(n), float(t))
                                  for h, c, s, n, t in data.get("sev_log", ()))
        for key in ("source_fw", "target_fw"):
            fw = data.get(key)
            if fw is not None:
                allowed = {f.name for f in fields(FirmwareView)}
                fw = FirmwareView(**{k: v for k, v in fw.items() if k in allowed})
                fw = FirmwareView(host=str(fw.host), platform_state=fw.platform_state,
                                  guest_state=fw.guest_state, handle=fw.handle,
                                  counts={str(k): int(v) for k, v in dict(fw.counts).items()},
                                  last_status=fw.last_status)
            values[key] = fw
        pages = data.get("pages")
        if pages is not None:
            count = int(pages["count"])
            if not 0 <= count <= MAX_PAGES:
                raise WireError(f"a page map of {count} pages")
            states = decode_states(str(pages["data"]), count)
            states.flags.writeable = False
            values["page_states"] = states
        return Progress(**values)
    except WireError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise WireError(f"a progress snapshot that does not parse ({type(exc).__name__}: {exc})") from None
