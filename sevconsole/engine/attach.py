"""A client of a runner: attach over its UNIX socket, read checks, Progress and the Outcome,
send cancel. A client that goes away never stops the migration (that is the runner's point)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sevconsole.engine import journal
from sevconsole.engine.checks import Check
from sevconsole.engine.progress import Progress
from sevconsole.engine.run import Outcome
from sevconsole.engine.runner import MAX_LINE, RunnerError, check_from_wire, socket_path
from sevconsole.engine.wire import WireError, progress_from_wire


@dataclass(frozen=True)
class Checks:
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Snapshot:
    progress: Progress


@dataclass(frozen=True)
class Ended:
    outcome: Outcome


@dataclass(frozen=True)
class RunnerGone:
    """The socket closed with no outcome: the runner died (recover finishes its migration)."""

    sentence: str


Message = Checks | Snapshot | Ended | RunnerGone


@dataclass
class RunnerClient:
    migration_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    hello: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def connect(cls, migration_id: str, timeout: float = 10.0) -> RunnerClient:
        journal.folder(migration_id)  # a bad id is a sentence, not a path
        path = socket_path(migration_id)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=MAX_LINE), timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise RunnerError(f"migration {migration_id} has no runner to attach to ({exc.strerror or exc}); "
                              "see `sevconsole migrations`") from None
        client = cls(migration_id, reader, writer)
        first = await client._read()
        if not isinstance(first, dict) or first.get("type") != "hello":
            writer.close()
            raise RunnerError(f"migration {migration_id}: the runner did not say hello")
        client.hello = first
        return client

    @property
    def checks(self) -> tuple[Check, ...]:
        return tuple(check_from_wire(c) for c in self.hello.get("checks") or ())

    async def _read(self) -> Any:
        try:
            line = await self.reader.readline()
        except (ValueError, ConnectionError):
            return None
        if not line:
            return None
        try:
            return json.loads(line)
        except ValueError:
            return {}

    async def messages(self) -> AsyncIterator[Message]:
        """Checks, snapshots, then one Ended (or RunnerGone) and the end of the iteration."""
        if self.hello.get("checks"):
            yield Checks(self.checks)
        while True:
            message = await self._read()
            if message is None:
                yield RunnerGone(f"the runner of migration {self.migration_id} stopped before the end; "
                                 "`sevconsole recover` brings the guest to one runnable copy")
                return
            kind = message.get("type") if isinstance(message, dict) else None
            try:
                if kind == "progress":
                    yield Snapshot(progress_from_wire(message["progress"]))
                elif kind == "checks":
                    yield Checks(tuple(check_from_wire(c) for c in message["checks"]))
                elif kind == "outcome":
                    yield Ended(Outcome.from_wire(message["outcome"]))
                    return
            except (WireError, KeyError, ValueError, TypeError):
                continue  # one bad message is skipped; the runner is ours, but a socket is a socket

    async def cancel(self, reason: str = "cancelled by the operator") -> None:
        with contextlib.suppress(OSError):
            self.writer.write((json.dumps({"op": "cancel", "reason": reason}) + "\n").encode())
            await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
