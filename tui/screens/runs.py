"""Runs: every run under the base dir, live or past; start, open, stop, resume, retry, delete."""
from __future__ import annotations

import shlex
from datetime import datetime
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Select, Static

from nanochat.report import fmt_duration

from ..dialogs import ConfirmScreen
from ..runmodel import RunSummary, quick_summary
from ..services import list_profiles, preview_config
from ..widgets.panels import plain, status_text

# config keys the launch form's depth / GPU fields set (the rest go through free-form overrides)
DEPTH_KEY = "base_train.depth"
GPUS_KEY = "run.nproc_per_node"


def plan_preview(profile: str, overrides: list[str]) -> str:
    """`nanochat plan`'s text for the form; ValueError with the one-line reason when a run would be refused."""
    from nanochat.config import check_plan, load_config
    from nanochat.scaling import format_plan
    return format_plan(check_plan(load_config(profile, overrides)))  # ConfigError is a ValueError


class RunsLoaded(Message):
    def __init__(self, rows: list[RunSummary]):
        super().__init__()
        self.rows = rows


def fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


class RunOps:
    """Supervisor operations for a screen, in a worker (stop waits for the stage to checkpoint), reported
    as notifications."""

    def run_op(self, op: str, run_dir: Path, stage: str | None = None):
        label = f"{op} {stage}" if stage else op
        self.notify(f"{label}: {run_dir.name} …", timeout=2)
        self._run_op(op, label, run_dir, stage)

    @work(thread=True, group="ops", exit_on_error=False)
    def _run_op(self, op: str, label: str, run_dir: Path, stage: str | None):
        sup = self.app.supervisor
        fn = {"stop": lambda: sup.stop_run(run_dir), "resume": lambda: sup.resume_run(run_dir),
              "retry": lambda: sup.retry_stage(run_dir, stage), "skip": lambda: sup.skip_stage(run_dir, stage),
              "delete": lambda: sup.delete_run(run_dir)}[op]
        try:
            fn()
        except Exception as e:
            self.app.call_from_thread(self.notify, f"{label} failed: {e}", severity="error")
            return
        self.app.call_from_thread(self.notify, f"{label}: {run_dir.name}", timeout=3)
        self.app.call_from_thread(self.after_op)

    def after_op(self):
        """Called on the UI thread once an operation succeeded (the dashboard sees it in state.json)."""


class RunsScreen(RunOps, Screen):
    BINDINGS = [
        Binding("enter", "open", "Open", id="runs.open"),
        Binding("n", "new", "New run", id="runs.new"),
        Binding("s", "stop", "Stop", id="runs.stop"),
        Binding("r", "resume", "Resume", id="runs.resume"),
        Binding("t", "retry", "Retry stage", id="runs.retry"),
        Binding("d,delete", "delete", "Delete", id="runs.delete"),
        Binding("c", "chat", "Chat", id="runs.chat"),
        Binding("v", "compare", "Compare", id="runs.compare"),
        Binding("f5", "refresh", "Refresh", id="runs.refresh", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static("", id="runs-empty")
        yield DataTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self):
        self.title = "nanochat · runs"
        t = self.query_one(DataTable)
        for col, w in (("run", 24), ("status", 11), ("stage", 14), ("progress", 18), ("started", 16), ("wall", 8), ("cost", 9)):
            t.add_column(col, key=col, width=w)
        self._rows: dict[str, RunSummary] = {}
        self.action_refresh()
        self._auto_refresh = self.set_interval(2.0, self.action_refresh)

    def after_op(self):
        self.action_refresh()

    def on_screen_suspend(self):
        self._auto_refresh.pause()  # hidden under another screen: no work, not even a timer tick

    def on_screen_resume(self):
        self._auto_refresh.resume()
        self.action_refresh()

    def action_refresh(self):
        self._load()

    @work(thread=True, exclusive=True, group="runs")
    def _load(self):
        app = self.app
        sup, now = app.supervisor, app.services.clock()
        gpu = app.gpus[0].name if app.gpus else None
        rows = []
        for rd in sup.list_runs():
            try:
                sup.reattach(rd)  # a run whose driver died mid-stage gets a new one, as `nanochat status` does
                rows.append(quick_summary(rd, sup.read_state(rd), now, app.cfg["gpu_hourly_usd"], gpu))
            except (OSError, ValueError):
                continue  # deleted while we read it (here or from another terminal): it is gone, skip it
        self.post_message(RunsLoaded(rows))

    def on_runs_loaded(self, msg: RunsLoaded):
        t = self.query_one(DataTable)
        keep = self.selected_run()
        new = {str(r.run_dir): r for r in msg.rows}
        for key in list(self._rows):
            if key not in new:
                t.remove_row(key)
        for key, r in new.items():
            # as Text: a run or stage name is never markup
            cells = (plain(r.run_dir.name), status_text(r.status), plain(r.stage), plain(r.progress),
                     plain(fmt_time(r.started)), plain(fmt_duration(r.wall)), plain(f"${r.cost:,.2f}"))
            if key in self._rows:
                for col, val in zip(("run", "status", "stage", "progress", "started", "wall", "cost"), cells):
                    t.update_cell(key, col, val)
            else:
                t.add_row(*cells, key=key)
        self._rows = new
        empty = self.query_one("#runs-empty", Static)
        empty.display = not new
        empty.update(plain(f"No runs yet under {self.app.supervisor.runs_root}. Press n to start one."))
        if keep is not None and str(keep) in new:
            t.move_cursor(row=t.get_row_index(str(keep)))

    def selected_run(self) -> Path | None:
        t = self.query_one(DataTable)
        if not t.row_count or t.cursor_row is None:
            return None
        try:
            key = t.coordinate_to_cell_key((t.cursor_row, 0)).row_key.value
        except Exception:
            return None
        return Path(key) if key else None

    def _need_run(self) -> Path | None:
        rd = self.selected_run()
        if rd is None:
            self.notify("no run selected", severity="warning")
        return rd

    @on(DataTable.RowSelected)
    def _row_selected(self, event):
        self.action_open()

    def action_open(self):
        rd = self._need_run()
        if rd:
            self.app.open_run_screen(rd)

    def action_chat(self):
        rd = self._need_run()
        if rd:
            self.app.open_run_screen(rd, "chat")

    def action_compare(self):
        self.app.action_compare()

    def action_new(self):
        def launched(run_dir):
            if run_dir:
                self.action_refresh()
                self.app.open_run_screen(run_dir)
        self.app.push_screen(NewRunScreen(), launched)

    def action_stop(self):
        rd = self._need_run()
        if rd:
            self.run_op("stop", rd)

    def action_resume(self):
        rd = self._need_run()
        if rd:
            self.run_op("resume", rd)

    def action_retry(self):
        rd = self._need_run()
        if rd:
            st = self.app.supervisor.read_state(rd)
            failed = [s.name for s in st["stages"] if s.status in ("failed", "stopped")]
            if not failed:
                self.notify("no failed or stopped stage to retry", severity="warning")
                return
            self.run_op("retry", rd, failed[0])

    def action_delete(self):
        rd = self._need_run()
        if rd is None:
            return

        def confirmed(yes):
            if yes:
                self.run_op("delete", rd)
        self.app.push_screen(ConfirmScreen(f"Delete run {rd.name} and all its files?"), confirmed)


class NewRunScreen(ModalScreen):
    """Pick a profile and overrides; the resolved config is previewed before launch."""
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="newrun.cancel"),
                Binding("ctrl+l", "launch", "Launch", id="newrun.launch")]

    def compose(self) -> ComposeResult:
        profiles = list_profiles()
        with Vertical(classes="dialog", id="newrun"):
            yield Label("[b]New run[/b]")
            yield Select([(p, p) for p in profiles], value=profiles[0], allow_blank=False, id="profile")
            with Horizontal(classes="row"):
                yield Input(placeholder="depth (profile default)", id="depth", type="integer")
                yield Input(placeholder="GPUs (profile default)", id="gpus", type="integer")
            yield Input(placeholder="overrides: section.key=value ...", id="overrides")
            with VerticalScroll(id="preview-box"):  # scrolls (tab to it) when the terminal is short
                yield Static("", id="preview")
            with Horizontal(classes="buttons"):
                yield Button("Launch (ctrl+l)", id="launch", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self):
        self._update_preview()

    def overrides(self) -> list[str]:
        out = []
        depth, gpus = self.query_one("#depth", Input).value.strip(), self.query_one("#gpus", Input).value.strip()
        if depth:
            out.append(f"{DEPTH_KEY}={depth}")
        if gpus:
            out.append(f"{GPUS_KEY}={gpus}")
        try:
            out += shlex.split(self.query_one("#overrides", Input).value)
        except ValueError as e:
            raise ValueError(f"overrides: {e}") from None
        for o in out:
            if "=" not in o:
                raise ValueError(f"override {o!r} is not section.key=value")
        return out

    @on(Input.Changed)
    @on(Select.Changed)
    def _update_preview(self, *_):
        prev = self.query_one("#preview", Static)
        try:
            profile, overrides = self.query_one("#profile", Select).value, self.overrides()
            text = preview_config(profile, overrides) + "\n\n" + plan_preview(profile, overrides)
            prev.update(Text(text))  # plain text: "[base_train] ..." is not markup
            prev.set_class(False, "error")
            self._ok = True
        except ValueError as e:
            prev.update(Text(f"✗ {e}"))
            prev.set_class(True, "error")
            self._ok = False

    def action_cancel(self):
        self.dismiss(None)

    @on(Button.Pressed)
    def _pressed(self, e):
        if e.button.id == "launch":
            self.action_launch()
        else:
            self.dismiss(None)

    def action_launch(self):
        self._update_preview()
        if not self._ok:
            self.notify("fix the config error first", severity="error")
            return
        profile, overrides = self.query_one("#profile", Select).value, self.overrides()
        self._launch(profile, overrides)

    @work(thread=True, exclusive=True, group="launch")
    def _launch(self, profile: str, overrides: list[str]):
        sup = self.app.supervisor
        try:
            run_dir = sup.create_run(profile, overrides)
            sup.start_run(run_dir)
        except Exception as e:
            self.app.call_from_thread(self.notify, f"launch failed: {e}", severity="error")
            return
        self.app.call_from_thread(self.dismiss, run_dir)

