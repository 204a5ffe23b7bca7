"""Run the real console on a real lab and save SVG screenshots of its screens into screenshots/.

    python -m screenshots.make [--size 120x36] [--out DIR]

Starts a 4-host lab (lab-4 with a realistic PSP), drives the app headless by keys, and saves:
overview (the start screen), hosts (the hosts list), host (certificate chain), preflight, refused
(NOSEND), live migration mid-way, result, replay (the result's replay, scrubbed back to the middle
of pre-copy), guide (the PDH exchange step) and guide-not-converging (the realistic-PSP demo, when
the prediction turns). The migration is capped at 8 MB/s so a mid-way frame exists.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from sevconsole.lab.control import Lab  # a script: the lab is another machine here
from sevconsole.lab.layout import default_layout
from sevconsole.tui.app import SevConsoleApp
from sevconsole.tui.live_backend import LiveBackend, open_backend
from sevconsole.tui.screens.guide import GuideScreen
from sevconsole.tui.screens.hosts import HostsScreen
from sevconsole.tui.screens.live import LiveScreen
from sevconsole.tui.screens.migrate import MigrateScreen
from sevconsole.tui.screens.overview import OverviewScreen
from sevconsole.tui.screens.result import ResultScreen
from sevconsole.tui.widgets.replay_view import ReplayView

MIDWAY_BPS = 8_000_000


class SlowBackend(LiveBackend):
    """The live backend with a bandwidth cap, so the screenshot catches the run half way."""

    def migration(self, *args, **kw):  # type: ignore[no-untyped-def,override]
        kw["bandwidth_bps"] = MIDWAY_BPS
        return super().migration(*args, **kw)


async def until(pilot, condition, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the console did not reach the expected state in time")
        await pilot.pause(0.05)


async def shoot(lab_dir: Path, out: Path, size: tuple[int, int]) -> list[Path]:
    live = open_backend(inventory=None, lab_dir=lab_dir)
    backend = SlowBackend(list(live.specs.values()), known_hosts=live.options.known_hosts,
                          lab_root=live.options.lab_root, lab=True, fleet=live.fleet)
    live.close()
    saved: list[Path] = []
    app = SevConsoleApp(backend, screenshot_dir=out)

    def save(name: str) -> None:
        saved.append(Path(app.save_screenshot(f"{name}.svg", str(out))))

    try:
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: len(app.reports) == len(backend.host_names()))
            overview = app.screen
            await until(pilot, lambda: isinstance(overview, OverviewScreen) and overview.history_loaded)
            await app.workers.wait_for_complete()
            await pilot.pause()
            app.clear_notifications()
            await pilot.pause()
            save("overview")
            await pilot.press("H")
            await until(pilot, lambda: type(app.screen) is HostsScreen)
            await pilot.pause()
            save("hosts")
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is overview)
            await pilot.press("enter")
            await pilot.pause()
            save("host")
            await pilot.press("down", "m")  # vault: NOSEND
            await until(pilot, lambda: isinstance(app.screen, MigrateScreen) and len(app.screen.results) == 3)
            await pilot.pause()
            save("refused")
            await pilot.press("escape", "up", "m")  # web
            await until(pilot, lambda: isinstance(app.screen, MigrateScreen) and len(app.screen.results) == 3)
            await pilot.pause()
            save("preflight")
            await pilot.press("enter", "y")
            await until(pilot, lambda: isinstance(app.screen, LiveScreen))
            live_screen = app.screen

            def midway() -> bool:
                views = live_screen.query("MigrationView")  # composed once the runner answers
                p = views.first().latest if views else None
                return p is not None and p.bytes_total > 0 and p.bytes_transferred > 0.45 * p.bytes_total

            await until(pilot, midway)
            await pilot.pause()
            save("live")
            await until(pilot, lambda: isinstance(app.screen, ResultScreen) and bool(app.screen.query("#result")))
            await pilot.pause()
            app.clear_notifications()
            await pilot.pause()
            save("result")
            result_screen = app.screen
            await until(pilot, lambda: result_screen.tape is not None)
            await pilot.press("r")
            view = result_screen.query_one(ReplayView)
            tape = result_screen.tape
            precopy = [i for i, f in enumerate(tape.frames) if f.phase.value == "pre-copy"]
            view.show(precopy[len(precopy) // 2] if precopy else len(tape) // 2)
            await pilot.pause()
            save("replay")
            await pilot.press("enter")
            await pilot.press("ctrl+g")
            await until(pilot, lambda: isinstance(app.screen, GuideScreen))
            guide = app.screen
            await pilot.press("space")  # step 2: the PDH exchange and the preflight
            await until(pilot, lambda: not guide.busy)
            await pilot.pause()
            save("guide")
            # on to the last demo: a realistic PSP that cannot keep up with the guest. The guide
            # would cancel the moment the prediction turns; here it waits for the picture first.
            guide.steps = tuple(replace(s, cancel_if_not_converging=False) for s in guide.steps)
            while guide.index < len(guide.steps) - 2:
                await until(pilot, lambda: not guide.busy, timeout=300)
                await pilot.press("space")
                await pilot.pause()

            def predicted() -> bool:
                views = guide.query("MigrationView")
                p = views.first().latest if views else None
                return p is not None and p.converging is False

            await until(pilot, predicted, timeout=300)
            await pilot.pause()
            save("guide-not-converging")
            await pilot.press("c")  # cancel, as the operator would
            await until(pilot, lambda: not guide.busy, timeout=120)
    finally:
        backend.close()
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="120x36", help="terminal size COLSxROWS (default 120x36)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    cols, rows = (int(x) for x in args.size.split("x"))
    hosts = default_layout(4)
    layout = (*hosts[:3], replace(hosts[3], realistic_psp=True))
    with tempfile.TemporaryDirectory(prefix="sevconsole-shots-") as tmp:
        import os

        os.environ["SEVCONSOLE_DATA_DIR"] = str(Path(tmp) / "data")  # audit log and known_hosts stay here
        os.environ["SEVCONSOLE_CONFIG_DIR"] = str(Path(tmp) / "config")
        os.environ["SEVCONSOLE_STATE_DIR"] = str(Path(tmp) / "state")  # the runners' journals and snapshots
        os.environ["SEVCONSOLE_RUNTIME_DIR"] = str(Path(tmp) / "run")  # runner sockets (a short path)
        with Lab.start(Path(tmp) / "lab", len(layout), layout=layout) as lab:
            saved = asyncio.run(shoot(Path(lab.paths.root), args.out, (cols, rows)))
    for path in saved:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
