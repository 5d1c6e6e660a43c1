"""Pilot tests of every TUI screen and flow, driven by tests/fake_run.py (run dirs and events written at a
controlled rate), a fake pynvml, a fake supervisor and a fake chat backend."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from fake_run import T0, FakeChatBackend, FakeNvml, FakeRun, demo_run, fake_supervisor, fixed_host

from tui.app import NanochatApp
from tui.services import DEFAULT_TUI_CONFIG, NvmlProvider, Services

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make_app(base: Path, *, nvml=None, chat=None, report=None, keys=None, clock=None, **kw) -> NanochatApp:
    sv = Services(supervisor=fake_supervisor(base), gpu=lambda: NvmlProvider(nvml or FakeNvml()), host=fixed_host,
                  chat=chat or FakeChatBackend, clock=clock or (lambda: T0 + 400))
    if report:
        sv.report = report
    cfg = dict(DEFAULT_TUI_CONFIG, keys=keys or {}, events_poll_s=0.05, gpu_poll_s=0.5)
    app = NanochatApp(services=sv, tui_config=cfg, **kw)
    app.notes, app.note_timeout = [], 3  # toasts leave quickly, unless a test reads them
    orig = app.notify

    def notify(message, *, title="", severity="information", timeout=None, **k):
        app.notes.append((severity, title, str(message)))
        return orig(message, title=title, severity=severity, timeout=timeout or app.note_timeout, **k)
    app.notify = notify
    return app


async def until(pilot, cond, timeout=8.0, what="condition"):
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def text_of(widget) -> str:
    """What a Static shows, as plain text (rich renderables are rendered)."""
    import io

    from rich.console import Console
    c = Console(width=300, file=io.StringIO(), record=True)
    c.print(widget.content)
    return c.export_text()


def screen_name(app):
    return type(app.screen).__name__


# ----------------------------------------------------------------------------- runs

async def test_runs_list_ops_and_quit_leaves_runs_alone(tmp_path):
    demo_run(tmp_path / "runs", "20250101-100000-demo")
    demo_run(tmp_path / "runs", "20250101-090000-demo", fail=True)
    app = make_app(tmp_path)
    async with app.run_test(size=(120, 30)) as pilot:
        table = app.screen.query_one("#runs-table")
        await until(pilot, lambda: table.row_count == 2, what="two runs listed")
        assert app.screen.selected_run().name == "20250101-100000-demo"  # newest first
        await pilot.press("s")
        sup = app.supervisor
        await until(pilot, lambda: ("stop", "20250101-100000-demo") in sup.calls)
        await until(pilot, lambda: "stopped" in str(table.get_row_at(0)[1]), what="status refresh")
        await pilot.press("r")
        await until(pilot, lambda: ("resume", "20250101-100000-demo") in sup.calls)
        await pilot.press("down", "t")  # retry the failed stage of the second run
        await until(pilot, lambda: ("retry", "20250101-090000-demo", "base_train") in sup.calls)
        # the running run cannot be deleted: make sure the cursor is on the failed one
        await until(pilot, lambda: app.screen.selected_run().name == "20250101-090000-demo", what="failed run selected")
        await pilot.press("d")
        assert screen_name(app) == "ConfirmScreen"
        await pilot.pause()  # let the modal mount before its key arrives (under load it may not have yet)
        await pilot.press("y")
        await until(pilot, lambda: screen_name(app) != "ConfirmScreen", what="confirmation closed")
        await until(pilot, lambda: table.row_count == 1, what="deleted run gone")
        assert not (tmp_path / "runs" / "20250101-090000-demo").exists()
        await pilot.press("enter")
        await until(pilot, lambda: screen_name(app) == "DashboardScreen")
    # quitting the app signalled nothing: only the ops the user asked for were called
    assert [c[0] for c in sup.calls] == ["stop", "resume", "retry"]


async def test_new_run_previews_config_and_launches(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(100, 32)) as pilot:
        await until(pilot, lambda: app.screen.query_one("#runs-empty").display, what="empty list hint")
        await pilot.press("n")
        assert screen_name(app) == "NewRunScreen"
        scr = app.screen
        scr.query_one("#overrides").value = "base_train.dept=3"
        await pilot.pause(0.1)
        prev = text_of(scr.query_one("#preview"))
        assert "depth" in prev and scr.query_one("#preview").has_class("error")  # nearest key named
        scr.query_one("#overrides").value = ""
        scr.query_one("#depth").value = "6"
        scr.query_one("#gpus").value = "2"
        await pilot.pause(0.1)
        prev = text_of(scr.query_one("#preview"))
        assert "depth=6" in prev and "nproc_per_node=2" in prev
        assert "[base_train] depth=6" in prev and "[run] " in prev  # section names are text, not markup
        assert "plan: profile demo" in prev and "model      d6: width 384" in prev  # `nanochat plan`'s text
        await pilot.press("ctrl+l")
        await until(pilot, lambda: screen_name(app) == "DashboardScreen", what="dashboard of the new run")
        calls = app.supervisor.calls
        assert calls[0] == ("create", "demo", ["base_train.depth=6", "run.nproc_per_node=2"])
        assert calls[1] == ("start", app.screen.run_dir.name)


# ----------------------------------------------------------------------------- dashboard

async def test_dashboard_ingests_live_events_in_order(tmp_path):
    r = demo_run(tmp_path / "runs", steps=100)
    app = make_app(tmp_path, open_run=r.dir)
    async with app.run_test(size=(160, 48)) as pilot:
        scr = app.screen
        await until(pilot, lambda: scr.model.n_events > 100, what="history loaded")
        # a writer appends 300 steps at ~300 events/s while the dashboard tails
        writer = threading.Thread(target=lambda: r.steps("base_train", 100, 300, total=1000, dt=0.0033))
        writer.start()
        while writer.is_alive():
            await pilot.pause(0.05)
            time.sleep(0.003)
        await until(pilot, lambda: scr.model.stages["base_train"].step == 399, what="all steps ingested")
        s = scr.model.loss["base_train"]
        assert s.xs == list(range(400)) and scr.model.out_of_order == 0
        stats = text_of(scr.query_one("#stats"))
        assert "399/1000" in stats and "41.0%" in stats and "$" in stats
        pipe = scr.query_one("#pipeline")
        assert pipe.option_count == 8 and "base_train" in str(pipe.get_option_at_index(3).prompt)
        gpu = text_of(scr.query_one("#gpu-side"))
        assert "97%" in gpu and "612/700W" in gpu
        assert "23%" in text_of(scr.query_one("#host-side"))
        plot = scr.query_one("#loss-plot")
        await pilot.press("o", "w")
        assert plot.log_y and plot.smoothing == 0.6 and "log" in plot.border_subtitle
        await pilot.press("3")
        assert scr.query_one("#evals-table").row_count == 3  # val bpb + tokenizer compression (train, val)
        await pilot.press("4")
        assert "Paris" in text_of(scr.query_one("#samples-text"))


async def test_reopen_rebuilds_every_panel_from_disk(tmp_path):
    r = demo_run(tmp_path / "runs", steps=250)
    snapshots = []
    for _ in range(2):
        app = make_app(tmp_path, open_run=r.dir)
        async with app.run_test(size=(120, 40)) as pilot:
            scr = app.screen
            await until(pilot, lambda: scr.loaded.is_set())
            snapshots.append((scr.model.n_events, list(scr.model.loss["base_train"].ys),
                              sorted(scr.model.evals), text_of(scr.query_one("#stats"))))
        r.steps("base_train", 250, 5, total=1000)  # the run went on while the TUI was closed
    assert snapshots[1][0] == snapshots[0][0] + 5 and snapshots[1][1][:250] == snapshots[0][1]
    assert snapshots[1][2] == snapshots[0][2]


async def test_log_key_opens_the_stage_that_matters(tmp_path):
    """Nothing failed and no stage picked: `l` opens the running stage, not the first one of the pipeline;
    of two empty logs, stdout."""
    r = demo_run(tmp_path / "runs")
    for name in ("stderr.log", "stdout.log"):
        (r.dir / "data" / name).write_text("")
    app = make_app(tmp_path, open_run=r.dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.screen.loaded.is_set())
        await pilot.press("l")
        await until(pilot, lambda: screen_name(app) == "LogsScreen")
        assert "/base_train/" in app.screen.query_one("#logs-file").value
        await pilot.press("escape")
        await until(pilot, lambda: screen_name(app) == "DashboardScreen")
        app.open_run_screen(r.dir, "logs", stage="data")
        await until(pilot, lambda: screen_name(app) == "LogsScreen" and app.screen.is_mounted)
        await pilot.pause()
        assert app.screen.query_one("#logs-file").value.endswith("data/stdout.log")


async def test_failed_stage_alerts_and_log_key(tmp_path):
    r = demo_run(tmp_path / "runs", fail=True)
    app = make_app(tmp_path, open_run=r.dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: any(t == "stage base_train failed" for _, t, _ in app.notes), what="failure alert")
        sev, _, body = next(n for n in app.notes if n[1] == "stage base_train failed")
        assert sev == "error" and "out of memory" in body and "l: open log" in body
        await pilot.press("5")
        await until(pilot, lambda: app.screen.query_one("#alerts-table").row_count == 1)
        await pilot.press("l")
        await until(pilot, lambda: screen_name(app) == "LogsScreen")
        assert app.screen.query_one("#logs-file").value.endswith("base_train/stderr.log")
        await until(pilot, lambda: app.screen.log_file is not None and len(app.screen.log_file) == 4)
        await pilot.press("escape", "exclamation_mark")
        assert screen_name(app) == "AlertsScreen"
        assert "OutOfMemoryError" in text_of(app.screen.query_one("#alert-detail"))


async def test_nan_loss_and_throttle_and_no_gpu(tmp_path):
    r = demo_run(tmp_path / "runs", steps=60)
    app = make_app(tmp_path, open_run=r.dir, nvml=FakeNvml(throttle=0x40))
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: app.screen.loaded.is_set())
        r.steps("base_train", 60, 1, total=1000, loss=lambda s: float("nan"))
        await until(pilot, lambda: any("loss is nan" in t for _, t, _ in app.notes), what="NaN alert")
        await until(pilot, lambda: any(t == "GPU 0 throttled" for _, t, _ in app.notes), what="throttle alert")
    app = make_app(tmp_path, open_run=r.dir, nvml=FakeNvml(fail_init=True))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: "NVML unavailable" in text_of(app.screen.query_one("#gpu-main")))
        assert app.screen.model.n_events > 60  # everything else still works


# ----------------------------------------------------------------------------- logs

async def test_logs_tail_search_filter_level(tmp_path):
    r = demo_run(tmp_path / "runs", steps=400)
    app = make_app(tmp_path)
    app.open_run, app.open_screen = r.dir, "logs"
    async with app.run_test(size=(100, 30)) as pilot:
        scr = app.screen
        scr.query_one("#logs-file").value = str(r.dir / "base_train" / "stdout.log")
        view = scr.query_one("#logview")
        await until(pilot, lambda: view.n_rows == 400)
        await pilot.press("slash", *"step 00123", "enter")
        await until(pilot, lambda: view.current == 123, what="search hit")
        await pilot.press("slash", *"loss 2.", "enter")
        first = None
        await until(pilot, lambda: view.current not in (None, 123), what="second search")
        first = view.current
        await pilot.press("n")
        await until(pilot, lambda: view.current != first)
        second = view.current
        assert second > first
        await pilot.press("N")
        await until(pilot, lambda: view.current == first, what="previous match")
        await pilot.press("f", *r"step 001\d\d", "x", "enter")  # typed 'x' is text, not the regex toggle
        await until(pilot, lambda: view.rows is not None)
        assert view.rows == []
        scr.filter_text = r"step 001\d\d"
        await pilot.press("x")  # regex on: the filter re-runs and now matches steps 100-199
        await until(pilot, lambda: view.rows is not None and len(view.rows) == 100, what="regex filter")
        r.log("base_train", ["step 00150/01000 | loss 9.9 | again"])  # tailing while filtered
        await until(pilot, lambda: len(view.rows) == 101, what="filtered tail")
        await pilot.press("f")
        scr.query_one("#logs-input").value = ""
        await pilot.press("enter", "v", "v")  # level >= warning
        await until(pilot, lambda: view.rows == [])
        scr.query_one("#logs-file").value = str(r.dir / "base_train" / "stderr.log")
        await until(pilot, lambda: view.rows == [0], what="warning line only")


# ----------------------------------------------------------------------------- compare

async def test_compare_overlays_runs_on_three_axes(tmp_path):
    a = demo_run(tmp_path / "runs", "20250101-100000-demo", steps=120)
    b = FakeRun(tmp_path / "runs", "20250101-110000-demo")
    b.start_stage("base_train")
    b.steps("base_train", 0, 80, total=80, dt=2.0, loss=lambda s: 5 - s / 40)
    app = make_app(tmp_path)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.press("v")
        scr = app.screen
        assert screen_name(app) == "CompareScreen"
        plot = scr.query_one("#compare-plot")
        await until(pilot, lambda: len(plot.series) == 2, what="two curves")
        assert {s[0] for s in plot.series} == {a.dir.name, b.dir.name}
        await pilot.press("x")
        assert "tokens" in plot.border_title and plot.series[0][1][0] == 524288.0
        await pilot.press("x")
        lens = sorted(len(s[1]) for s in plot.series)
        assert "time" in plot.border_title and lens == [80, 120]
        assert max(max(s[1]) for s in plot.series) == pytest.approx(158.0)  # b: 80 steps of 2 s


# ----------------------------------------------------------------------------- chat

def chat_run(tmp_path):
    r = demo_run(tmp_path / "runs", steps=10)
    r.checkpoint_dir("base", 9)
    r.checkpoint_dir("sft", 40)
    return r


async def test_chat_stream_tools_regenerate_edit_save_load_export(tmp_path):
    r = chat_run(tmp_path)
    backend = FakeChatBackend()
    app = make_app(tmp_path, chat=lambda: backend)
    app.open_run, app.open_screen = r.dir, "chat"
    async with app.run_test(size=(100, 36)) as pilot:
        scr = app.screen
        await until(pilot, lambda: scr.backend is not None, what="checkpoint loaded")
        assert backend.loaded == (r.dir.name, "sft", 40)  # latest phase first
        await pilot.press(*"hello", "enter")
        await until(pilot, lambda: not scr.generating and len(scr.conv["messages"]) == 2)
        reply = scr.conv["messages"][1]["content"]
        assert [p["type"] for p in reply] == ["text", "python", "python_output", "text"]
        assert reply[2]["text"] == "42" and "*hello*" in reply[3]["text"]
        tool = scr.query_one(".tool")
        assert "print(6*7)" in tool.title.plain and "ok" in tool.title.plain
        assert backend.seen[0][1:] == (0.6, 50)
        # regenerate: same conversation sent again, one assistant reply kept
        scr.query_one("#temperature").value = "0.9"
        scr.query_one("#topk").value = ""
        await pilot.press("ctrl+r")
        await until(pilot, lambda: len(backend.seen) == 2 and not scr.generating)
        assert backend.seen[1] == (backend.seen[0][0], 0.9, None) and len(scr.conv["messages"]) == 2
        # a second turn, then edit the first message and resend from there
        await pilot.press(*"again", "enter")
        await until(pilot, lambda: len(scr.conv["messages"]) == 4 and not scr.generating)
        await pilot.press("ctrl+t", "ctrl+t")
        assert scr.query_one("#chat-input").value == "hello"
        scr.query_one("#chat-input").value = "hi there"
        await pilot.press("enter")
        await until(pilot, lambda: len(scr.conv["messages"]) == 2 and not scr.generating)
        assert scr.conv["messages"][0]["content"] == "hi there"
        assert len(scr.query_one("#chat-log").children) == 2
        # save, export, clear, load
        await pilot.press("ctrl+y")
        md = next((r.dir / "chats").glob("*.md")).read_text()
        assert "## user\n\nhi there" in md and "```python\nprint(6*7)\n```" in md
        saved = json.loads(next((r.dir / "chats").glob("*.json")).read_text())
        assert saved == scr.conv
        await pilot.press("ctrl+n")
        assert scr.conv["messages"] == [] and not scr.query_one("#chat-log").children
        await pilot.press("ctrl+l")
        assert screen_name(app) == "PickScreen"
        await pilot.press("enter")
        await until(pilot, lambda: len(scr.conv["messages"]) == 2)
        assert scr.conv == saved and len(scr.query(".tool")) == 1


async def test_chat_text_arrives_in_batches_and_every_token_counts(tmp_path, monkeypatch):
    """A fast model's tokens reach the screen a batch per ChatScreen.FLUSH_S, not a message each (each one is a
    Markdown update and a relayout), and none is lost: the reply is the whole text, every token counted."""
    from tui.screens import chat as chat_screen
    r = chat_run(tmp_path)
    backend = FakeChatBackend(delay=0.0, n_tokens=300)
    app = make_app(tmp_path, chat=lambda: backend)
    app.open_run, app.open_screen = r.dir, "chat"
    texts = []
    real = chat_screen.ChatScreen.on_stream_item

    async def counting(self, msg):
        if msg.item.get("type") == "text":
            texts.append(msg.item)
        await real(self, msg)
    monkeypatch.setattr(chat_screen.ChatScreen, "on_stream_item", counting)
    async with app.run_test(size=(80, 24)) as pilot:
        scr = app.screen
        await until(pilot, lambda: scr.backend is not None)
        await pilot.press(*"hi", "enter")
        await until(pilot, lambda: len(scr.conv["messages"]) == 2, what="reply done")
        reply = "".join(p["text"] for p in scr.conv["messages"][-1]["content"] if p["type"] == "text")
    assert reply == "**Sure**: you said *hi*." + "".join(f" w{i}" for i in range(300))
    assert scr.tokens_rendered == 306 == sum(t["tokens"] for t in texts)
    assert len(texts) < 60


async def test_chat_follows_the_reply_until_the_user_scrolls_up(tmp_path):
    """A long reply keeps the log at its end as it grows; once the user scrolls up to read, it stays where
    they put it; the next message follows again."""
    r = chat_run(tmp_path)
    backend = FakeChatBackend(delay=0.005, n_tokens=600)
    app = make_app(tmp_path, chat=lambda: backend)
    app.open_run, app.open_screen = r.dir, "chat"
    async with app.run_test(size=(80, 24)) as pilot:
        scr = app.screen
        log = scr.query_one("#chat-log")
        await until(pilot, lambda: scr.backend is not None)
        await pilot.press(*"hi", "enter")
        await until(pilot, lambda: not scr.generating and len(scr.conv["messages"]) == 2, what="reply done")
        await pilot.pause(0.2)
        assert log.max_scroll_y > 10 and log.scroll_y == log.max_scroll_y
        await pilot.press(*"more", "enter")
        await until(pilot, lambda: scr.tokens_rendered > 700, what="second reply streaming")
        log.scroll_home(animate=False)  # the user scrolls up to read
        await until(pilot, lambda: not scr.generating and len(scr.conv["messages"]) == 4, what="second reply done")
        await pilot.pause(0.2)
        assert log.scroll_y == 0 < log.max_scroll_y
        await pilot.press(*"again", "enter")
        await until(pilot, lambda: not scr.generating and len(scr.conv["messages"]) == 6, what="third reply done")
        await pilot.pause(0.2)
        assert log.scroll_y == log.max_scroll_y


async def test_chat_stop_and_bad_settings(tmp_path):
    """Stop lands while the reply streams. (It once missed under load: a message per token queued the key
    press behind hundreds of unrendered tokens; text now reaches the screen in batches, ChatScreen.FLUSH_S.)"""
    r = chat_run(tmp_path)
    backend = FakeChatBackend(delay=0.02, n_tokens=400)
    app = make_app(tmp_path, chat=lambda: backend)
    app.open_run, app.open_screen = r.dir, "chat"
    async with app.run_test(size=(80, 24)) as pilot:
        scr = app.screen
        await until(pilot, lambda: scr.backend is not None)
        scr.query_one("#temperature").value = "7"
        await pilot.press(*"hi", "enter")
        assert any("temperature 7.0 is out of range; use 0 to 2" in m for _, _, m in app.notes)
        scr.query_one("#temperature").value = "0.5"
        await pilot.press("enter")
        await until(pilot, lambda: scr.tokens_rendered > 10, what="streaming started")
        # typing while it streams is not blocked
        await pilot.press(*"next")
        assert scr.query_one("#chat-input").value == "next"
        await pilot.press("ctrl+g")
        await until(pilot, lambda: not scr.generating, what="stopped")
        text = scr.conv["messages"][-1]["content"][-1]["text"]
        assert " w399" not in text and "stopped" in text_of(scr.query_one("#chat-status"))


# ----------------------------------------------------------------------------- report, help, palette, keys

async def test_report_preview_and_export_from_palette(tmp_path, monkeypatch):
    from nanochat.report import write_report
    r = demo_run(tmp_path / "runs", steps=50)
    monkeypatch.chdir(tmp_path)
    app = make_app(tmp_path, report=write_report)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.screen.query_one("#runs-table").row_count == 1)
        await pilot.press("enter")
        await until(pilot, lambda: screen_name(app) == "DashboardScreen")
        await pilot.press("p")
        await until(pilot, lambda: (r.dir / "report.md").exists(), what="report written")
        md = app.screen.query_one("#report-md").document
        await until(pilot, lambda: "base_train" in md.source, what="preview shows the report")
        await pilot.press("escape", "ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"Export report")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: screen_name(app) == "ExportScreen", what="export dialog")
        out = tmp_path / "exported.md"
        app.screen.query_one("#export-path").value = str(out)
        await pilot.press("enter")
        await until(pilot, lambda: out.exists(), what="exported file")
        assert out.read_text() == (r.dir / "report.md").read_text()


async def test_menu_help_and_remapped_keys(tmp_path):
    r = demo_run(tmp_path / "runs", steps=20)
    app = make_app(tmp_path, open_run=r.dir, keys={"dashboard.logs": "L", "app.menu": "f10"})
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.screen.loaded.is_set())
        await pilot.press("l")
        assert screen_name(app) == "DashboardScreen"  # 'l' no longer opens logs
        await pilot.press("L")
        await until(pilot, lambda: screen_name(app) == "LogsScreen")
        await pilot.press("escape", "f10")
        assert screen_name(app) == "MenuScreen"
        titles = [c.title for c in app.screen.commands]
        assert {"Logs", "Log scale", "Chat", "Report", "Stop", "Export report", "Compare runs"} <= set(titles)
        await pilot.press(*["down"] * titles.index("Chat"), "enter")
        await until(pilot, lambda: screen_name(app) == "ChatScreen")
        await pilot.press("escape", "f1")
        assert screen_name(app) == "HelpScreen"
        table = app.screen.query_one("#help-table")
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert any(str(row[3]) == "dashboard.logs" and str(row[1]) == "L" for row in rows)
        assert any(str(row[3]) == "chat.stop" and str(row[1]) == "ctrl+g" for row in rows)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_every_screen_fits(tmp_path, size):
    r = chat_run(tmp_path)
    app = make_app(tmp_path, report=lambda rd: (rd / "report.md").write_text("# report\n") or rd / "report.md")
    async with app.run_test(size=size) as pilot:
        for which in ("dashboard", "logs", "chat", "report"):
            app.open_run_screen(r.dir, which)
            await pilot.pause(0.2)
            scr = app.screen
            footer = scr.query_one("Footer")
            assert footer.region.bottom == size[1] and footer.region.width == size[0]
            for w in scr.query("Plot, LogView, #chat-log, #chat-input, #report-md"):
                assert w.region.height >= 1 and w.region.right <= size[0], f"{which}: {w} has no room"
            app.pop_screen()
        await asyncio.sleep(0)


# ----------------------------------------------------------------------------- untrusted text

HOSTILE = "[/] [@click=app.quit]quit[/] [bold red]x\x1b[2J\x1b]0;pwned\x07 ok"  # markup, an action, escapes
SHOWN = "[/] [@click=app.quit]quit[/] [bold red]x ok"                        # what the screen must say


def plain_of(renderable) -> str:
    import io

    from rich.console import Console
    c = Console(width=400, file=io.StringIO(), record=True)
    c.print(renderable)
    return c.export_text()


async def test_run_text_is_never_markup_nor_terminal_control(tmp_path):
    """Events, alerts, samples and logs carrying markup, an action link, escape sequences, NaN and invalid
    UTF-8: nothing crashes, nothing is run, the text is shown as written (minus the control sequences)."""
    r = demo_run(tmp_path / "runs", steps=20)
    r.emit("base_train", "eval", task=HOSTILE, metric="[/]", value=float("nan"), step=5, phase="base")
    r.emit("base_train", "sample", prompt=HOSTILE, text=" " + HOSTILE, step=19)
    r.steps("base_train", 20, 1, total=1000, loss=lambda step: float("nan"))
    with open(r.dir / "base_train" / "events.jsonl", "ab") as f:
        f.write(b'{"v": 1, "ts": 1735725700.0, "stage": "base_train", "kind": "log", "text": "\xff\xfe"}\n')
    r.fail_stage("base_train", message=HOSTILE)
    r.log("base_train", [HOSTILE, "plain line"], stream="stderr")
    app = make_app(tmp_path, open_run=r.dir)
    app.note_timeout = 60  # the toast is read below: under load a 3 s one expired first
    async with app.run_test(size=(140, 40)) as pilot:
        scr = app.screen
        await until(pilot, lambda: scr.loaded.is_set() and any(t == "stage base_train failed" for _, t, _ in app.notes),
                    what="failure alert")
        shown = [n for n in app._notifications if n.title == "stage base_train failed"]  # what the toast shows
        assert shown and not shown[0].markup and SHOWN in shown[0].message and "\x1b" not in shown[0].message
        scr.notify(f"stop failed: {HOSTILE}")  # a screen's notify (Widget.notify asks for markup by default)
        await pilot.pause()
        shown = [n for n in app._notifications if n.message.startswith("stop failed")]
        assert shown and not shown[0].markup and shown[0].message == f"stop failed: {SHOWN}"
        cells = [plain_of(c).strip() for row in range(scr.query_one("#evals-table").row_count)
                 for c in scr.query_one("#evals-table").get_row_at(row)]
        assert SHOWN in cells and "[/]" in cells and "nan" in cells
        assert SHOWN in text_of(scr.query_one("#samples-text"))
        await pilot.press("5")
        table = scr.query_one("#alerts-table")
        await until(pilot, lambda: table.row_count >= 2, what="NaN and failure alerts")
        assert any(SHOWN in plain_of(c) for row in range(table.row_count) for c in table.get_row_at(row))
        await pilot.press("exclamation_mark", "down")  # the NaN alert, then the failure with its traceback
        assert screen_name(app) == "AlertsScreen" and SHOWN in text_of(app.screen.query_one("#alert-detail"))
        await pilot.press("escape", "l")
        await until(pilot, lambda: screen_name(app) == "LogsScreen")
        view = app.screen.query_one("#logview")
        await until(pilot, lambda: view.n_rows >= 2, what="stderr.log read")
        await pilot.press("f")
        app.screen.query_one("#logs-input").value = "[/]"  # a filter the user types is not markup either
        await pilot.press("enter")
        await pilot.pause(0.2)
        shown = [view.render_line(y).text for y in range(view.size.height)]
        assert any(SHOWN in line for line in shown) and not any("\x1b" in line for line in shown)
        assert "filter '[/]'" in text_of(app.screen.query_one("#logs-flags"))
        assert app.is_running


class HostileChat(FakeChatBackend):
    def stream(self, conversation, temperature, top_k, max_tokens=512):
        yield {"type": "text", "text": HOSTILE}
        yield {"type": "tool_call", "code": HOSTILE}
        yield {"type": "tool_result", "output": HOSTILE, "status": "ok", "isolation": "reduced"}
        yield {"type": "notice", "text": HOSTILE}
        yield {"type": "done", "reason": "max_tokens", "tokens": 4}


async def test_chat_shows_model_and_tool_text_literally(tmp_path):
    r = chat_run(tmp_path)
    app = make_app(tmp_path, chat=HostileChat)
    app.open_run, app.open_screen = r.dir, "chat"
    async with app.run_test(size=(120, 36)) as pilot:
        scr = app.screen
        await until(pilot, lambda: scr.backend is not None)
        scr.query_one("#chat-input").value = HOSTILE
        await pilot.press("enter")
        await until(pilot, lambda: len(scr.conv["messages"]) == 2 and not scr.generating)
        assert scr.conv["messages"][1]["content"][0]["text"] == HOSTILE  # kept as the model wrote it
        log = scr.query_one("#chat-log")
        statics = [w for w in log.query("Static") if not w.children]
        texts = [str(w.render()) for w in statics]
        assert texts[0] == SHOWN  # the user's message
        assert any(t == SHOWN for t in texts[1:])  # tool code
        assert any(t == f"→ {SHOWN}" for t in texts) and any(t == "[max tokens]" for t in texts)
        assert SHOWN in scr.query_one(".tool").title.plain
        assert scr.query_one(".tool").title.plain.endswith("→ ok, reduced isolation")  # a weaker sandbox is shown
        assert not any("\x1b" in t for t in texts)
        assert app.is_running
