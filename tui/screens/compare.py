"""Compare: overlay the loss curves of two or more runs against step, tokens or wall time."""
from __future__ import annotations

from pathlib import Path

from textual import on, work
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, SelectionList

from ..runmodel import RunModel, load_run
from ..widgets.plot import Plot

X_AXES = ("step", "tokens", "time")


class RunLoaded(Message):
    def __init__(self, run_dir: Path, model: RunModel):
        super().__init__()
        self.run_dir, self.model = run_dir, model


class CompareScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="compare.back"),
        Binding("x", "x_axis", "X axis", id="compare.x_axis"),
        Binding("o", "toggle_log", "Log scale", id="compare.log_scale"),
        Binding("w", "smoothing", "Smoothing", id="compare.smoothing"),
    ]

    def __init__(self, runs: list[Path] | None = None):
        super().__init__()
        self.preselect = [Path(r) for r in runs] if runs else None
        self.x_axis = "step"
        self.models: dict[Path, RunModel] = {}
        self._smooth = 0

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield SelectionList(id="compare-runs")
            yield Plot(id="compare-plot")
        yield Footer()

    def on_mount(self):
        self.title = "nanochat · compare"
        runs = self.app.supervisor.list_runs()
        sl = self.query_one(SelectionList)
        sl.border_title = "runs (space selects)"
        pre = self.preselect if self.preselect is not None else runs[:2]
        for r in runs:
            sl.add_option((Text(r.name), str(r), r in pre))
        self.query_one(Plot).empty_text = "select two or more runs with training steps"
        self._update()

    @on(SelectionList.SelectedChanged)
    def _update(self, *_):
        for r in self.query_one(SelectionList).selected:
            rd = Path(r)
            if rd not in self.models:
                self.models[rd] = None  # loading
                self._load(rd)
        self._draw()

    @work(thread=True, group="load", exit_on_error=False)
    def _load(self, run_dir: Path):
        self.post_message(RunLoaded(run_dir, load_run(run_dir)))

    def on_run_loaded(self, msg: RunLoaded):
        self.models[msg.run_dir] = msg.model
        self._draw()

    def _draw(self):
        series = []
        for r in self.query_one(SelectionList).selected:
            m = self.models.get(Path(r))
            if m is None:
                continue
            for stage in m.loss:
                s = m.loss_vs(stage, self.x_axis)
                label = Path(r).name if len(m.loss) == 1 else f"{Path(r).name}:{stage}"
                series.append((label, s.xs, s.ys))
        plot = self.query_one(Plot)
        plot.border_title = f"train loss vs {self.x_axis}" + (" (s)" if self.x_axis == "time" else "")
        plot.set_series(series)

    def action_x_axis(self):
        self.x_axis = X_AXES[(X_AXES.index(self.x_axis) + 1) % len(X_AXES)]
        self._draw()

    def action_toggle_log(self):
        plot = self.query_one(Plot)
        plot.set_options(log_y=not plot.log_y)

    def action_smoothing(self):
        from .dashboard import SMOOTHING
        self._smooth = (self._smooth + 1) % len(SMOOTHING)
        self.query_one(Plot).set_options(smoothing=SMOOTHING[self._smooth])
