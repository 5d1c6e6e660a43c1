"""Dashboard of one run: pipeline, loss / val bpb curves, throughput and cost, GPUs and host, evals,
samples, alerts. Rebuilt from the run directory every time it opens (events are the only source)."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static, TabbedContent, TabPane

from ..alerts import AlertBook
from ..runmodel import RunModel, RunReader, hourly_rate, read_config, run_cost, run_gpu_name
from ..widgets.panels import GpuPanel, HostPanel, Pipeline, StatsPanel, plain, severity_text, themed
from ..widgets.plot import Plot, fmt_num
from .runs import RunOps

SMOOTHING = (0.0, 0.6, 0.9, 0.98)


class DashboardScreen(RunOps, Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="dashboard.back"),
        Binding("l", "logs", "Logs", id="dashboard.logs"),
        Binding("o", "toggle_log", "Log scale", id="dashboard.log_scale"),
        Binding("w", "smoothing", "Smoothing", id="dashboard.smoothing"),
        Binding("c", "chat", "Chat", id="dashboard.chat"),
        Binding("p", "report", "Report", id="dashboard.report"),
        Binding("s", "stop", "Stop", id="dashboard.stop"),
        Binding("r", "resume", "Resume", id="dashboard.resume"),
        Binding("t", "retry", "Retry stage", id="dashboard.retry", show=False),
        Binding("k", "skip", "Skip stage", id="dashboard.skip", show=False),
        Binding("1", "tab('overview')", "Overview", id="dashboard.tab_overview", show=False),
        Binding("2", "tab('system')", "System", id="dashboard.tab_system", show=False),
        Binding("3", "tab('evals')", "Evals", id="dashboard.tab_evals", show=False),
        Binding("4", "tab('samples')", "Samples", id="dashboard.tab_samples", show=False),
        Binding("5", "tab('alerts')", "Alerts tab", id="dashboard.tab_alerts", show=False),
    ]

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.model = RunModel(self.run_dir)
        self.state: dict = {"status": "?", "stages": []}
        self.config = read_config(self.run_dir)
        self._smooth_i = 0
        self._dirty = True
        self._bpb_shown = None
        self.loaded = threading.Event()  # set after the first batch (everything on disk) is applied

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="dash-status")
        with TabbedContent(initial="overview"):
            with TabPane("Overview", id="overview"):
                with Horizontal(id="overview-row"):
                    with Vertical(id="side"):
                        yield Pipeline(id="pipeline")
                        yield StatsPanel(id="stats")
                    with Vertical(id="plots"):
                        yield Plot(id="loss-plot")
                        yield Plot(id="bpb-plot")
                    with Vertical(id="hw-side"):
                        yield GpuPanel(id="gpu-side", classes="gpu")
                        yield HostPanel(id="host-side", classes="host")
            with TabPane("System", id="system"):
                yield GpuPanel(id="gpu-main", classes="gpu")
                yield HostPanel(id="host-main", classes="host")
            with TabPane("Evals", id="evals"):
                yield DataTable(id="evals-table", zebra_stripes=True, cursor_type="row")
            with TabPane("Samples", id="samples"):
                yield VerticalScroll(Static(id="samples-text"), id="samples-scroll")
            with TabPane("Alerts", id="alerts"):
                yield DataTable(id="alerts-table", cursor_type="row")
        yield Footer()

    def on_mount(self):
        self.title = f"nanochat · {self.run_dir.name}"
        self.query_one("#loss-plot", Plot).border_title = "train loss"
        self.query_one("#bpb-plot", Plot).border_title = "val bpb"
        self.query_one("#pipeline").border_title = "pipeline"
        self.query_one("#stats").border_title = "progress"
        for p in self.query(GpuPanel):
            p.border_title = "GPUs"
        for p in self.query(HostPanel):
            p.border_title = "host"
        ev = self.query_one("#evals-table", DataTable)
        for c in ("stage", "task", "metric", "value", "step"):
            ev.add_column(c, key=c)
        al = self.query_one("#alerts-table", DataTable)
        for c in ("severity", "alert", "message"):
            al.add_column(c, key=c)
        cfg = self.app.cfg
        self.alerts = AlertBook(stall_s=cfg["stall_s"], gpu_idle_s=cfg["gpu_idle_s"])
        self.watch(self.app, "gpus", self._show_gpus)
        self.watch(self.app, "gpu_error", self._show_gpus)
        self.watch(self.app, "host", self._show_host)
        self._tail()
        self.set_interval(1.0, self._tick)

    # ----------------------------------------------------------------- ingestion
    @work(exclusive=True, group="tail", exit_on_error=False)
    async def _tail(self):
        """Read new events and a changed state.json in a thread every events_poll_s; apply them here.
        Cancelled with the screen."""
        reader = RunReader(self.run_dir)
        state_mtime = None
        reattached_at = 0.0
        while True:
            events, state, state_mtime, reattached_at = await asyncio.to_thread(self._read, reader, state_mtime,
                                                                                        reattached_at)
            if events or state is not None:
                self.apply(events, state)
            self.loaded.set()
            await asyncio.sleep(self.app.cfg["events_poll_s"])

    def _read(self, reader: RunReader, state_mtime, reattached_at: float):
        sup = self.app.supervisor
        if time.monotonic() - reattached_at > 2.0:  # a driver killed mid-stage is replaced, as `nanochat status` does
            reattached_at = time.monotonic()
            sup.reattach(self.run_dir)
        events = reader.poll()
        try:
            m = (self.run_dir / "state.json").stat().st_mtime_ns
        except FileNotFoundError:
            m = -1
        state = sup.read_state(self.run_dir) if m != state_mtime else None
        return events, state, m, reattached_at

    def apply(self, events: list[dict], state: dict | None):
        """New events into the model. The pipeline and plots redraw here on the first batch and when a stage
        changes state, else at most once a second (the tick): a fast run does not redraw per poll."""
        if state is not None:
            self.state = state
        anomalies = self.model.ingest(events, checked=True)  # RunReader has type-checked them
        self.app.raise_alerts(self.alerts.on_anomalies(anomalies))
        if any(e.get("kind") == "eval" for e in events):
            self._fill_evals()
        if any(e.get("kind") == "sample" for e in events):
            self._fill_samples()
        self._dirty = True
        self.refresh_panels(plots=state is not None or not self.loaded.is_set())

    def _tick(self):
        """Once a second: rules that depend on time (stalls, idle GPUs), the running cost, and what the
        events of the last second changed."""
        self.app.raise_alerts(self.alerts.check(self.state, self.model, self.app.gpus, self.app.services.clock()))
        self._fill_alerts()
        self.refresh_panels(plots=self._dirty)

    # ----------------------------------------------------------------- rendering
    def refresh_panels(self, plots: bool = True):
        model, state = self.model, self.state
        if plots:
            self.query_one("#pipeline", Pipeline).show(state["stages"], model)
        stage = model.main_train_stage()
        app = self.app
        gpu = run_gpu_name(state, self.config, app.gpus[0].name if app.gpus else None)
        rate = hourly_rate(self.config, gpu, app.cfg["gpu_hourly_usd"])
        wall, cost = run_cost(state, self.config, model, app.services.clock(), rate)
        self.query_one("#stats", StatsPanel).show(model, stage, wall, cost)
        n_alerts = len(self.alerts.alerts) if hasattr(self, "alerts") else 0
        # the running stage by name: an eval stage (or a training stage before its first step) has no curve
        cur = next((s.name for s in state["stages"] if s.status == "running"), None)
        running = [("  stage ", "dim"), cur] if cur else []
        status = Text.assemble(("run ", "dim"), self.run_dir.name, ("  status ", "dim"), str(state.get("status", "?")),
                               *running, ("  events ", "dim"), str(model.n_events))
        if n_alerts:
            status.append(themed(f"  ⚠ {n_alerts} alert(s) (5)", "bold $warning"))
        if status.plain != getattr(self, "_status_plain", None):
            self._status_plain = status.plain
            self.query_one("#dash-status", Static).update(status, layout=False)  # one row, always
        if plots and self._dirty:
            self._dirty = False
            loss = [(n, s.xs, s.ys) for n, s in model.loss.items()]
            self.query_one("#loss-plot", Plot).set_series([x for x in loss if x[0] == stage] or loss[-1:])
            bpb = [(n, s.xs, s.ys) for n, s in model.val_bpb.items()]
            if [(n, len(xs)) for n, xs, _ in bpb] != self._bpb_shown:  # evals are rare: most batches have none
                self._bpb_shown = [(n, len(xs)) for n, xs, _ in bpb]
                self.query_one("#bpb-plot", Plot).set_series(bpb)

    def _fill_evals(self):
        t = self.query_one("#evals-table", DataTable)
        t.clear()
        for (stage, task, metric), (value, step) in sorted(self.model.evals.items()):
            t.add_row(*map(plain, (stage, task, metric, fmt_num(value), "-" if step is None else step)))

    def _fill_samples(self):
        out = Text()
        for s in self.model.samples[-40:][::-1]:
            out.append(f"{s['stage']} step {s['step']}\n", style="bold dim")
            out.append(themed(str(s["prompt"]), "bold"))
            out.append(plain(s["text"])).append("\n\n")
        self.query_one("#samples-text", Static).update(out)

    def _fill_alerts(self):
        t = self.query_one("#alerts-table", DataTable)
        if t.row_count == len(self.alerts.alerts):
            return
        t.clear()
        for a in self.alerts.alerts:
            t.add_row(severity_text(a.severity), plain(a.title),
                      plain(a.message + (" | " + a.detail.splitlines()[-1] if a.detail else "")))

    def _show_gpus(self):
        for p in self.query(GpuPanel):
            p.show(self.app.gpus, self.app.gpu_error)

    def _show_host(self):
        for p in self.query(HostPanel):
            p.show(self.app.host)

    # ----------------------------------------------------------------- actions
    def _stage(self) -> str | None:
        """The stage actions apply to: the last failed one if any, else the highlighted one."""
        return self.query_one("#pipeline", Pipeline).selected_stage

    def failed_stage(self) -> str | None:
        failed = [s.name for s in self.state["stages"] if s.status == "failed"]
        return failed[-1] if failed else None

    def action_logs(self):
        focused_pipeline = self.focused is self.query_one("#pipeline")
        # the highlighted stage when the user picked one, else the one that matters now: failed, running, last trained
        running = next((s.name for s in self.state["stages"] if s.status == "running"), None)
        stage = (self._stage() if focused_pipeline else None) or self.failed_stage() or running \
            or self.model.main_train_stage() or self._stage()
        self.app.open_run_screen(self.run_dir, "logs", stage=stage)

    def action_toggle_log(self):
        for p in self.query(Plot):
            p.set_options(log_y=not p.log_y)

    def action_smoothing(self):
        self._smooth_i = (self._smooth_i + 1) % len(SMOOTHING)
        self.query_one("#loss-plot", Plot).set_options(smoothing=SMOOTHING[self._smooth_i])

    def action_chat(self):
        self.app.open_run_screen(self.run_dir, "chat")

    def action_report(self):
        self.app.open_run_screen(self.run_dir, "report")

    def action_stop(self):
        self.run_op("stop", self.run_dir)

    def action_resume(self):
        self.run_op("resume", self.run_dir)

    def action_retry(self):
        stage = self.failed_stage() or self._stage()
        if stage:
            self.run_op("retry", self.run_dir, stage)

    def action_skip(self):
        stage = self._stage()
        if stage:
            self.run_op("skip", self.run_dir, stage)

    def action_tab(self, tab: str):
        self.query_one(TabbedContent).active = tab
