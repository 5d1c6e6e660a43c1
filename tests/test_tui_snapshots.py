"""SVG snapshots of the main screens at 80x24 and 160x48 (fixed clock, fake NVML and host stats, fixed
timestamps: nothing in them depends on when or where they run).

Update after an intended change: `pytest tests/test_tui_snapshots.py --snapshot-update`.
Export the README screenshots: `NANOCHAT_SCREENSHOTS=1 pytest tests/test_tui_snapshots.py` writes
docs/screenshots/<screen>.svg (160x48).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fake_run import FakeChatBackend, demo_run
from test_tui import make_app, until

SCREENS = ["runs", "dashboard", "logs", "compare", "chat", "report", "help"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
REPORT_MD = """# nanochat report: 20250101-100000-demo

| metric | BASE | MID | SFT |
|---|---|---|---|
| CORE | 0.2219 | - | - |
| ARC-Easy | - | 0.3561 | 0.3876 |
| GSM8K | - | 0.0250 | 0.0455 |

- Total wall time: 3h51m
- Cost: ~$92.40 (8 x H100 at $3.00/h)
"""


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.delenv("TZ")
    time.tzset()


def build(tmp_path: Path, screen: str):
    runs = tmp_path / "runs"
    r = demo_run(runs, "20250101-100000-demo", steps=300)
    r.checkpoint_dir("base", 299)
    other = demo_run(runs, "20241231-080000-demo", steps=200)
    other.set_stage("base_train", "stopped", ended=other.t)

    def report(rd):
        (rd / "report.md").write_text(REPORT_MD)
        return rd / "report.md"
    app = make_app(tmp_path, report=report, chat=lambda: FakeChatBackend())

    async def run_before(pilot):
        await until(pilot, lambda: app.screen.query("#runs-table") and app.screen.query_one("#runs-table").row_count == 2)
        if screen == "runs":
            return
        if screen == "compare":
            await pilot.press("v")
            await until(pilot, lambda: len(app.screen.query_one("#compare-plot").series) == 2)
            return
        if screen == "help":
            await pilot.press("f1")
            await until(pilot, lambda: type(app.screen).__name__ == "HelpScreen")
            await pilot.pause(0.3)  # let the modal lay out its tables before the snapshot
            return
        app.open_run_screen(r.dir, screen)
        await pilot.pause(0.1)
        scr = app.screen
        if screen == "dashboard":
            await until(pilot, lambda: scr.loaded.is_set() and app.gpus)
            scr.refresh_panels()
        elif screen == "logs":
            await until(pilot, lambda: scr.log_file is not None and len(scr.log_file) > 0)
            scr.query_one("#logs-file").value = str(r.dir / "base_train" / "stdout.log")
            await until(pilot, lambda: scr.query_one("#logview").n_rows == 300)
            await pilot.press("slash", *"step 00150", "enter")
            await until(pilot, lambda: scr.query_one("#logview").current == 150)
        elif screen == "chat":
            await until(pilot, lambda: scr.backend is not None)
            await pilot.press(*"What is 6*7?", "enter")
            await until(pilot, lambda: len(scr.conv["messages"]) == 2 and not scr.generating)
            scr.query_one("#chat-input").cursor_blink = False  # a blinking cursor makes the snapshot flaky
        elif screen == "report":
            await until(pilot, lambda: "CORE" in scr.query_one("#report-md").document.source)
        await pilot.pause(0.3)
    return app, run_before


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
@pytest.mark.parametrize("screen", SCREENS)
def test_snapshot(snap_compare, tmp_path, screen, size):
    app, run_before = build(tmp_path, screen)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.skipif(not os.environ.get("NANOCHAT_SCREENSHOTS"), reason="set NANOCHAT_SCREENSHOTS=1 to export")
@pytest.mark.parametrize("screen", SCREENS)
def test_export_screenshots(tmp_path, screen):
    from textual._doc import take_svg_screenshot
    app, run_before = build(tmp_path, screen)
    DOCS.mkdir(parents=True, exist_ok=True)
    svg = take_svg_screenshot(app=app, terminal_size=(160, 48), run_before=run_before)
    (DOCS / f"{screen}.svg").write_text(svg)
