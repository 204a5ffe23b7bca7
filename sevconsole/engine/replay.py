"""A finished migration's Progress snapshots, read back for replay.

The runner writes one lossless snapshot line per ~0.1 s to `snapshots.jsonl.gz` beside the
journal (engine/wire.py's form inside `{"type": "progress", "progress": ...}`). A `Tape` holds
them in order with the few scalars a scrubber needs, and decodes a frame (its page map
included) only when asked, a few kept. Reading is bounded: a line over `MAX_LINE`, more than
`MAX_TOTAL` bytes in all, or a file cut short (a runner still writing, or killed) keep what was
read and say so in `problems`; past `MEMORY_BUDGET` every other frame is dropped (the first, the
last and each phase change are kept), so a long migration of a large guest still fits.

The console's scrubber and `sevconsole migrations show` read it; nothing here writes.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sevconsole.engine.progress import Phase, Progress
from sevconsole.engine.wire import WireError, progress_from_wire, progress_to_wire

SNAPSHOTS = "snapshots.jsonl.gz"
MAX_LINE = 64 << 20  # one snapshot of the largest page map wire.MAX_PAGES allows, compressed
MAX_TOTAL = 4 << 30  # decompressed bytes read from one file at most
MEMORY_BUDGET = 256 << 20  # raw snapshot bytes kept; beyond it the tape is thinned
MAX_FRAMES = 50_000
CACHED = 6  # decoded frames kept (a scrubber goes back and forth around one point)


class ReplayError(Exception):
    """No replay can be made; the sentence says why."""


@dataclass(frozen=True)
class Frame:
    """What the scrubber shows without decoding the snapshot."""

    elapsed_s: float
    phase: Phase
    pass_number: int
    bytes_transferred: int
    bytes_total: int
    rate_bps: float


class Tape:
    """The frames of one migration, oldest first. `progress(i)` decodes frame i (cached)."""

    def __init__(self, frames: Sequence[Frame], loader: Any, *, problems: Sequence[str] = (),
                 migration_id: str | None = None, thinned: int = 0) -> None:
        if not frames:
            raise ReplayError("no snapshot to replay")
        self.frames = tuple(frames)
        self._load = loader  # index -> Progress
        self.problems = tuple(problems)
        self.migration_id = migration_id
        self.thinned = thinned  # frames dropped to stay within the memory budget
        self._cache: OrderedDict[int, Progress] = OrderedDict()
        times, top = [], 0.0
        for f in self.frames:  # elapsed never runs backwards on the scrubber
            top = max(top, f.elapsed_s)
            times.append(top)
        self.times = tuple(times)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def duration_s(self) -> float:
        return self.times[-1] - self.times[0]

    @property
    def start_s(self) -> float:
        return self.times[0]

    def progress(self, index: int) -> Progress:
        index = max(0, min(len(self.frames) - 1, index))
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        p: Progress = self._load(index)
        self._cache[index] = p
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)
        return p

    def index_at(self, t: float) -> int:
        """The last frame at or before `t` seconds (elapsed time of the migration)."""
        from bisect import bisect_right

        return max(0, bisect_right(self.times, t) - 1)

    def phases(self) -> list[tuple[Phase, float, float]]:
        """(phase, from, to) spans in elapsed seconds, in order."""
        spans: list[tuple[Phase, float, float]] = []
        for f, t in zip(self.frames, self.times, strict=True):
            if spans and spans[-1][0] == f.phase:
                spans[-1] = (f.phase, spans[-1][1], t)
            else:
                if spans:
                    spans[-1] = (spans[-1][0], spans[-1][1], t)
                spans.append((f.phase, t, t))
        return spans

    # -- building
    @classmethod
    def from_progress(cls, snapshots: Iterable[Progress], migration_id: str | None = None) -> Tape:
        """A tape of snapshots in memory (a console that saw them, tests)."""
        items = list(snapshots)
        return cls([_frame(p) for p in items], items.__getitem__, migration_id=migration_id)

    @classmethod
    def read(cls, path: Path, migration_id: str | None = None) -> Tape:
        """The snapshots of `path` (a snapshots.jsonl.gz). Raises ReplayError with a sentence."""
        from sevconsole.boundedio import BoundedReadError, open_regular

        try:
            raw = open_regular(path, "snapshot file")
        except BoundedReadError as exc:
            if exc.missing:
                raise ReplayError(f"no snapshots were recorded for this migration ({path} is missing)") from None
            raise ReplayError(str(exc)) from None
        kept: list[tuple[Frame, dict[str, Any], int]] = []
        problems: list[str] = []
        thinned = 0
        kept_bytes = 0
        total = 0
        number = 0
        with raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            try:
                while True:
                    line = gz.readline(MAX_LINE + 1)
                    if not line:
                        break
                    number += 1
                    total += len(line)
                    if len(line) > MAX_LINE:
                        problems.append(f"line {number} is longer than {MAX_LINE >> 20} MiB: stopped there")
                        break
                    if total > MAX_TOTAL:
                        problems.append(f"more than {MAX_TOTAL >> 30} GiB of snapshots: stopped at line {number}")
                        break
                    try:
                        message = json.loads(line)
                        data = message["progress"] if message.get("type") == "progress" else None
                        if data is None:
                            continue
                        frame = _frame_of_wire(data)
                    except (ValueError, KeyError, TypeError, AttributeError, WireError) as exc:
                        problems.append(f"line {number} does not parse ({type(exc).__name__}); skipped")
                        continue
                    kept.append((frame, data, len(line)))
                    kept_bytes += len(line)
                    if kept_bytes > MEMORY_BUDGET or len(kept) > MAX_FRAMES:
                        kept, dropped = _thin(kept)
                        thinned += dropped
                        kept_bytes = sum(n for _, _, n in kept)
            except (EOFError, OSError, zlib.error) as exc:
                # a gzip stream without its end: the runner is still writing, or was killed
                problems.append(f"the snapshot file ends early after {number} lines ({type(exc).__name__})")
        if not kept:
            raise ReplayError(f"{path} holds no snapshot" + (f" ({problems[0]})" if problems else ""))
        datas = [d for _, d, _ in kept]
        return cls([f for f, _, _ in kept], lambda i: progress_from_wire(datas[i]), problems=problems,
                   migration_id=migration_id, thinned=thinned)

    @classmethod
    def for_migration(cls, migration_id: str, *, wait_s: float = 3.0) -> Tape:
        """The tape of a migration in the journal. A runner that just posted its outcome still
        closes the file: wait for it to leave (at most `wait_s`) before reading."""
        from sevconsole.engine import journal

        try:
            where = journal.folder(migration_id)
        except (ValueError, journal.JournalError) as exc:
            raise ReplayError(str(exc)) from None
        if not where.is_dir():
            raise ReplayError(f"no migration {migration_id} (see `sevconsole migrations`)")
        deadline = time.monotonic() + wait_s
        while journal.runner_alive(where) and time.monotonic() < deadline:
            time.sleep(0.05)  # bounded: the runner lingers LINGER_S for its clients, then exits
        return cls.read(where / SNAPSHOTS, migration_id)

    # -- summary
    def summary(self) -> dict[str, Any]:
        """A JSON-safe account of the whole migration (`migrations show --json`)."""
        first, last = self.progress(0), self.progress(len(self) - 1)
        rates = [f.rate_bps for f in self.frames if f.rate_bps > 0]
        history = [r for r in last.rate_history if r > 0]
        commands: dict[str, dict[str, int]] = {}
        for entry in last.sev_log:
            host = commands.setdefault(entry.host, {})
            host[entry.command] = host.get(entry.command, 0) + entry.count
        out: dict[str, Any] = {
            "id": self.migration_id, "vm": last.vm, "source": last.source, "target": last.target,
            "frames": len(self), "thinned": self.thinned, "duration_s": round(self.duration_s, 3),
            "start_s": round(self.start_s, 3), "final_phase": last.phase.value,
            "phases": [{"phase": p.value, "from_s": round(a, 3), "to_s": round(b, 3)} for p, a, b in self.phases()],
            "passes": max(f.pass_number for f in self.frames),
            "bytes_transferred": last.bytes_transferred, "bytes_total": last.bytes_total,
            "peak_rate_bps": max([*rates, *history], default=0.0),
            "mean_rate_bps": (last.bytes_transferred / self.duration_s) if self.duration_s > 0 else None,
            "downtime_limit_ms": last.downtime_limit_ms, "expected_downtime_ms": last.expected_downtime_ms,
            "page_map_exact": last.page_map_exact, "sev_commands": commands,
            "events": list(last.events), "errors": list(last.errors), "problems": list(self.problems),
            "started_at": first.started_at,
        }
        pages = last.to_json().get("pages")
        if pages is not None:
            out["pages"] = pages
        return out


def _frame(p: Progress) -> Frame:
    return Frame(float(p.elapsed_s), p.phase, int(p.pass_number), int(p.bytes_transferred), int(p.bytes_total),
                 float(p.rate_bps))


def _frame_of_wire(data: dict[str, Any]) -> Frame:
    return Frame(float(data.get("elapsed_s") or 0.0), Phase(data["phase"]), int(data.get("pass_number") or 0),
                 int(data.get("bytes_transferred") or 0), int(data.get("bytes_total") or 0),
                 float(data.get("rate_bps") or 0.0))


def _thin(kept: list[tuple[Frame, dict[str, Any], int]]) -> tuple[list[tuple[Frame, dict[str, Any], int]], int]:
    """Every other frame, keeping the first, the last and each phase's first frame."""
    out = []
    for i, item in enumerate(kept):
        phase_change = i > 0 and item[0].phase != kept[i - 1][0].phase
        if i % 2 == 0 or i == len(kept) - 1 or phase_change:
            out.append(item)
    return out, len(kept) - len(out)


def to_lines(snapshots: Iterable[Progress]) -> bytes:
    """The file's uncompressed lines for these snapshots (tests write tapes with it)."""
    return b"".join((json.dumps({"type": "progress", "progress": progress_to_wire(p)},
                                separators=(",", ":")) + "\n").encode() for p in snapshots)
