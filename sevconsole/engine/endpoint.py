"""One end of a migration: its host link, its QMP client, what that QEMU offers, its status.

The run loop (engine/run.py) holds two of these, `src` and `dst`, instead of parallel fields and
role strings. Every QMP call goes through `execute`, which turns any failure into the engine's
LinkError naming the host (an answer with an error keeps its ExecuteError as the cause, so the
caller can tell "QEMU said no" from "the link broke").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from sevconsole.engine.errors import LinkError
from sevconsole.engine.links import HostLink

QMP_TIMEOUT_S = 10.0
LAB_DIGEST = "x-query-guest-digest"


class Endpoint:
    def __init__(self, host: str, link: HostLink, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host  # the inventory name, for sentences
        self.link = link
        self.client: QMPClient | None = None
        self.commands: set[str] = set()
        self.qmp_path: str | None = None
        self._clock = clock

    @property
    def connected(self) -> bool:
        return self.client is not None

    def offers(self, command: str) -> bool:
        return command in self.commands

    async def open(self, path: str) -> None:
        """Connect to the QEMU behind `path` and learn its commands."""
        self.qmp_path = path
        self.client = await self.link.open_qmp(path)
        answer = await self.execute("query-commands")
        self.commands = {str(c.get("name")) for c in answer}

    async def reopen(self) -> bool:
        """A fresh QMP link after the old one broke; False when the QEMU cannot be reached."""
        if self.qmp_path is None:
            return False
        await self.drop()
        try:
            self.client = await self.link.open_qmp(self.qmp_path)
        except LinkError:
            self.client = None
            raise
        return True

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        if self.client is None:
            raise LinkError(self.host, f"no QMP link for {command}")
        try:
            return await asyncio.wait_for(self.client.execute(command, args), timeout=QMP_TIMEOUT_S)
        except ExecuteError as exc:
            raise LinkError(self.host, f"{command}: {exc}") from exc
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            raise LinkError(self.host, f"{command}: QMP link failed ({type(exc).__name__}: {exc})") from exc

    async def status(self) -> str | None:
        """QEMU's run state, or None when it cannot be asked."""
        try:
            return str((await self.execute("query-status")).get("status"))
        except LinkError:
            return None

    async def wait_status(self, want: tuple[str, ...], timeout: float) -> str | None:
        deadline = self._clock() + timeout
        status = await self.status()
        while status not in want and status is not None and self._clock() < deadline:
            await asyncio.sleep(0.05)
            status = await self.status()
        return status

    async def digest(self) -> str | None:
        """The guest's memory digest (lab only); None when this QEMU offers none."""
        if not self.offers(LAB_DIGEST):
            return None
        return str((await self.execute(LAB_DIGEST))["sha256"])

    async def quit(self, timeout: float = 2.0) -> None:
        """Ask QEMU to quit and drop the link; a QEMU that does not answer is stopped by pid."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.execute("quit"), timeout=timeout)
        await self.drop()

    async def drop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()
