"""The backend over real hosts (inventory or a lab's state folder): hosts/ for discovery and
links, engine/ for preflight and the run. Discovery lands in hosts/ separately; until then
opening a live backend says so plainly."""

from __future__ import annotations

from pathlib import Path


class BackendError(Exception):
    """The console cannot reach its hosts; the sentence says what to do."""


def open_backend(*, inventory: Path | None, lab_dir: Path | None):  # type: ignore[no-untyped-def]
    raise BackendError("live hosts are not wired into the console yet; use `sevconsole discover`")
