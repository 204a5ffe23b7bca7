"""The console asks for a protected identity's passphrase in a modal, from an SSH worker thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from sevconsole.hosts import passphrases
from sevconsole.hosts.report import Capabilities
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.screens.passphrase import PassphraseScreen
from tests.tui.scripted import ScriptedBackend, sample_reports


async def test_a_worker_thread_gets_the_passphrase_typed_in_the_modal(rome_caps: Capabilities,
                                                                     naples_caps: Capabilities) -> None:
    app = SevConsoleApp(ScriptedBackend(sample_reports(rome_caps, other_caps=naples_caps)))
    got: list[str | None] = []
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            asker = passphrases._asker  # the console registered its own
            assert asker is not None
            worker = threading.Thread(target=lambda: got.append(asker(Path("/home/ops/.ssh/id_ed25519"))))
            worker.start()
            while not isinstance(app.screen, PassphraseScreen):
                await pilot.pause(0.01)
            await pilot.press(*"s3cret", "enter")
            await asyncio.to_thread(worker.join, 10)
    finally:
        passphrases.set_asker(None)
    assert got == ["s3cret"]
