"""Full garbage collections wait for a pause in the keys (tui/collector.py)."""

from __future__ import annotations

import gc

from sevconsole.tui import collector
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.collector import IdleCollector
from tests.tui.scripted import ScriptedBackend, sample_reports


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def full_collections() -> int:
    return gc.get_stats()[2]["collections"]


def test_full_collections_wait_for_a_pause_and_never_longer_than_a_minute() -> None:
    clock = Clock()
    c = IdleCollector(clock=clock)
    before = gc.get_threshold()
    c.start()
    try:
        assert gc.get_threshold()[2] == collector.AUTOMATIC_FULL_AFTER
        assert gc.get_threshold()[:2] == before[:2]
        # an operator typing every 0.2 s: no full collection before FORCE_S
        while clock.t < 1000.0 + collector.FORCE_S - 0.5:
            clock.t += 0.2
            c.input()
            assert not c.tick()
        clock.t += 1.0
        runs = full_collections()
        assert c.tick() and full_collections() == runs + 1  # a real one
        # then a pause: the next one comes once EVERY_S has passed and the keys are quiet
        clock.t += collector.EVERY_S - 1
        assert not c.tick()
        clock.t += 1
        c.input()
        assert not c.tick()  # a key just now
        clock.t += collector.IDLE_S
        assert c.tick() and c.full_runs == 2
    finally:
        c.stop()
    assert gc.get_threshold() == before


async def test_the_console_takes_over_full_collections_and_gives_them_back() -> None:
    before = gc.get_threshold()
    app = SevConsoleApp(ScriptedBackend(sample_reports()))
    async with app.run_test(size=(80, 24)) as pilot:
        assert gc.get_threshold()[2] == collector.AUTOMATIC_FULL_AFTER
        seen = app.collector.last_input
        await pilot.press("down")
        assert app.collector.last_input > seen  # a key counts as the operator being here
    assert gc.get_threshold() == before
