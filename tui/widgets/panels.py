"""Small read-only panels of the dashboard: stage pipeline, run stats, GPUs, host."""
from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text
from textual.style import Style
from textual.widgets import OptionList, Static

from nanochat.common import strip_controls
from textual.widgets.option_list import Option

from nanochat.report import fmt_duration

from ..runmodel import RunModel, StageState, fnum
from .plot import fmt_num

# styles name theme variables ($error, ...), so they follow the theme like app.tcss does
GLYPH = {"pending": ("·", "dim"), "running": ("▶", "bold $primary"), "succeeded": ("✓", "$success"),
         "failed": ("✗", "bold $error"), "stopped": ("■", "$warning"), "skipped": ("↷", "dim"), "incomplete": ("◌", "$warning")}


def plain(text) -> Text:
    """What a run, a log or a model wrote, to show as is: never markup, no terminal control sequences."""
    return Text(strip_controls(str(text)))


def themed(text: str, style: str) -> Text:
    """`plain(text)` in a style that may name theme variables, resolved for the current theme."""
    return Text(strip_controls(text), style=Style.parse(style).rich_style if style else "")


def status_text(status: str) -> Text:
    glyph, style = GLYPH.get(status, ("?", ""))
    return themed(f"{glyph} {status}", style)


def severity_text(severity: str) -> Text:
    return themed(severity, "bold $error" if severity == "error" else "$warning")


def fmt_bytes(b: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(b) < 1024 or unit == "T":
            return f"{b:.0f}{unit}" if unit == "B" else f"{b:.1f}{unit}"
        b /= 1024
    return str(b)


class Pipeline(OptionList):
    """The run's stages with their states; the highlighted stage is the target of logs/retry/skip."""

    def show(self, stages: list[StageState], model: RunModel | None):
        rows = []
        for s in stages:
            glyph, style = GLYPH.get(s.status, ("?", ""))
            t = themed(f"{glyph} {s.name}", style)
            info = model.stages.get(s.name) if model else None
            if info and info.step is not None and info.total_steps:
                t.append(f" {min(100, 100 * fnum(info.step) / max(1, fnum(info.total_steps))):3.0f}%", style="dim")
            rows.append((s.name, t))
        shown = [(o.id, o.prompt) for o in self.options]
        if [name for name, _ in rows] == [name for name, _ in shown]:
            for i, ((_, t), (_, old)) in enumerate(zip(rows, shown)):  # same stages: only changed lines redraw
                if t != old:
                    self.replace_option_prompt_at_index(i, t)
            return
        keep = self.highlighted
        self.clear_options()
        self.add_options([Option(t, id=name) for name, t in rows])
        if rows:
            self.highlighted = keep if keep is not None and keep < len(rows) else 0

    @property
    def selected_stage(self) -> str | None:
        if self.highlighted is None or not self.option_count:
            return None
        return self.get_option_at_index(self.highlighted).id


class _Cached(Static):
    """A Static that skips re-rendering when what it would show has not changed (keeps idle CPU low)."""
    _key = None

    def changed(self, key) -> bool:
        if key == self._key:
            return False
        self._key = key
        return True


class StatsPanel(_Cached):
    def show(self, model: RunModel | None, stage: str | None, wall: float, cost: float):
        info = model.stages.get(stage) if (model and stage) else None
        rows = [("stage", stage or "-")]
        if info:
            tps, mfu, tokens = fnum(info.tok_per_sec), fnum(info.mfu), fnum(info.tokens)  # None/"nan" -> NaN
            rows += [("step", f"{info.step}/{info.total_steps}" if info.total_steps else str(info.step)),
                     ("loss", fmt_num(fnum(info.loss)) if info.loss is not None else "-"),
                     ("tok/s", fmt_num(tps) if math.isfinite(tps) else "-"),
                     ("MFU", f"{100 * mfu:.1f}%" if math.isfinite(mfu) else "-"),
                     ("tokens", fmt_num(tokens) if math.isfinite(tokens) else "-"),
                     ("ETA", fmt_duration(fnum(info.eta_s)) if not info.ended else "done")]
        rows += [("wall", fmt_duration(wall)), ("cost", f"${cost:,.2f}")]
        n_before = len(self._key or ())
        if not self.changed(tuple(rows)):  # what is shown, not the raw values: a ticking clock redraws rarely
            return
        t = Text(no_wrap=True, overflow="ellipsis")  # a Text, not a rich Table: a tenth of the render cost
        for i, (label, value) in enumerate(rows):
            t.append(f"{label:<6} ", style="dim").append(plain(value)).append("\n" if i < len(rows) - 1 else "")
        self.update(t, layout=len(rows) != n_before)  # same rows: the panel keeps its size


class GpuPanel(_Cached):
    def show(self, gpus: list | None, error: str = ""):
        if not self.changed((repr(gpus), error)):
            return
        if not gpus:
            self.update(themed(error or "no GPU stats yet", "dim"))
            return
        t = Table(box=None, padding=(0, 1), expand=True, show_edge=False)
        for col in ("#", "util", "mem", "temp", "power", "MHz", "throttle"):
            t.add_column(col, no_wrap=True, style="dim" if col == "#" else None)
        for g in gpus:
            util_style = "$success" if g.util >= 50 else "$warning" if g.util >= 5 else "$error"
            t.add_row(str(g.index), themed(f"{g.util:3.0f}%", util_style),
                      f"{g.mem_used / 2**30:.0f}/{g.mem_total / 2**30:.0f}G", f"{g.temp:.0f}C",
                      f"{g.power:.0f}/{g.power_limit:.0f}W", str(g.sm_clock),
                      themed(",".join(g.throttle) or "-", "bold $error" if g.throttle else "dim"))
        self.border_subtitle = plain(gpus[0].name)  # a border title is markup unless given as Text
        self.update(t)


class HostPanel(_Cached):
    def show(self, h):
        if not self.changed(repr(h)):
            return
        if h is None:
            self.update(Text("host stats unavailable", style="dim"))
            return
        self.update(Text.assemble(("CPU ", "dim"), f"{h.cpu:3.0f}%  ", ("RAM ", "dim"),
                                  f"{fmt_bytes(h.ram_used)}/{fmt_bytes(h.ram_total)}  ", ("disk ", "dim"),
                                  f"{fmt_bytes(h.disk_used)}/{fmt_bytes(h.disk_total)}"))
