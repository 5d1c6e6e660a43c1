"""A line plot drawn with braille dots (2x4 pixels per cell). Keeps no copy of the data: each render
downsamples the full series to the plot width (min and max per pixel column, so spikes stay visible)."""
from __future__ import annotations

import math

import numpy as np
from rich.style import Style
from rich.text import Text
from textual.widget import Widget

N_COLORS = 8  # series colours: the component classes plot--series-0..7, styled from the theme in app.tcss
_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row][col] within a cell


def fmt_num(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1e9:
        return f"{v / 1e9:.3g}G"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    return f"{v:.4g}"


class _Smoothed:
    """Incremental EMA of a growing series (only new points are processed on each render)."""

    def __init__(self, alpha: float):
        self.alpha, self.n, self.ys, self.last = alpha, 0, [], None

    def update(self, ys: list[float]) -> list[float]:
        a, last, out = self.alpha, self.last, self.ys
        for y in ys[self.n:]:
            if math.isfinite(y):
                last = y if last is None else a * last + (1 - a) * y
            out.append(last if last is not None else y)
        self.n, self.last = len(ys), last
        return out


class Plot(Widget):
    """`set_series([(label, xs, ys)])`, then toggles: `log_y`, `smoothing` (EMA weight 0..0.99)."""

    DEFAULT_CSS = "Plot { height: 1fr; min-height: 6; }"
    COMPONENT_CLASSES = {f"plot--series-{i}" for i in range(N_COLORS)}

    def __init__(self, *, id: str | None = None, classes: str | None = None, y_label: str = ""):
        super().__init__(id=id, classes=classes)
        self.series: list[tuple[str, list, list]] = []
        self.log_y = False
        self.smoothing = 0.0
        self.y_label = y_label
        self._smooth: dict[tuple, _Smoothed] = {}
        self.empty_text = "waiting for data"

    def set_series(self, series):
        self.series = list(series)
        self._update_legend()
        self.refresh()

    def set_options(self, log_y: bool | None = None, smoothing: float | None = None):
        if log_y is not None:
            self.log_y = log_y
        if smoothing is not None and smoothing != self.smoothing:
            self.smoothing = smoothing
            self._smooth.clear()
        self._update_legend()
        self.refresh()

    def _update_legend(self):
        flags = []
        if self.log_y:
            flags.append("log")
        if self.smoothing:
            flags.append(f"ema {self.smoothing:.2f}")
        # with the latest value: a curve of one or two points (an eval at the end of a stage) is hard to read
        legend = Text()  # labels are run and stage names: plain text, never markup
        for i, (label, _, ys) in enumerate(self.series):
            legend.append("━", style=self._color(i))
            legend.append(f" {label}" + (f" {fmt_num(ys[-1])}" if len(ys) else "") + "  ")
        legend.append(" ".join(flags))
        legend.rstrip()
        self.border_subtitle = legend

    def _color(self, i: int) -> Style:
        try:
            return self.get_component_rich_style(f"plot--series-{i % N_COLORS}", partial=True)
        except KeyError:  # not mounted (drawn in a test): no stylesheet, no colour
            return Style()

    def _ys(self, i: int, label: str, ys: list) -> list:
        if not self.smoothing:
            return ys
        key = (i, label, id(ys))
        sm = self._smooth.get(key)
        if sm is None or sm.n > len(ys):
            sm = self._smooth[key] = _Smoothed(self.smoothing)
        return sm.update(ys)

    @staticmethod
    def _span(cells, owner, i, c, a, b):
        """Set the dots of pixel column c from row a to row b (inclusive)."""
        for r in range(a, b + 1):
            cy, cx = r >> 2, c >> 1
            cells[cy, cx] |= _BITS[r & 3][c & 1]
            owner[cy, cx] = i

    def render(self):
        return self.draw(self.content_size.width, self.content_size.height)

    def draw(self, w: int, h: int) -> Text:
        """The plot as text of w x h cells."""
        gutter = 8
        pw, ph = w - gutter, h - 1  # plot cells; one row for the x axis
        data = []
        for i, (label, xs, ys) in enumerate(self.series):
            if not len(xs):
                continue
            x = np.asarray(xs, dtype=np.float64)
            y = np.asarray(self._ys(i, label, ys), dtype=np.float64)[: len(x)]
            x = x[: len(y)]
            if self.log_y:
                with np.errstate(all="ignore"):
                    y = np.where(y > 0, np.log10(y), np.nan)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                data.append((i, x[ok], y[ok]))
        if pw < 4 or ph < 2 or not data:
            return Text(self.empty_text if h else "", style="dim")
        xmin = min(d[1].min() for d in data)
        xmax = max(d[1].max() for d in data)
        ymin = min(d[2].min() for d in data)
        ymax = max(d[2].max() for d in data)
        if ymax - ymin < 1e-12:
            ymin, ymax = ymin - 0.5, ymax + 0.5
        if xmax - xmin < 1e-12:
            xmax = xmin + 1
        PW, PH = pw * 2, ph * 4
        cells = np.zeros((ph, pw), dtype=np.int32)
        owner = np.full((ph, pw), -1, dtype=np.int32)
        for i, x, y in data:
            col = ((x - xmin) / (xmax - xmin) * (PW - 1)).round().astype(np.int64)
            row = ((ymax - y) / (ymax - ymin) * (PH - 1)).round().astype(np.int64)
            order = np.argsort(col, kind="stable")
            col, row = col[order], row[order]
            ucol, start = np.unique(col, return_index=True)
            lo = np.minimum.reduceat(row, start)
            hi = np.maximum.reduceat(row, start)
            first = row[start]
            last = row[np.r_[start[1:] - 1, len(row) - 1]]
            pc = pr = None
            for c, a, b, f, e in zip(ucol.tolist(), lo.tolist(), hi.tolist(), first.tolist(), last.tolist()):
                if pc is not None:
                    # sparse data: interpolate through the empty columns so points join into a line
                    for cc in range(pc + 1, c):
                        r = pr + (f - pr) * (cc - pc) / (c - pc)
                        self._span(cells, owner, i, cc, min(pr, round(r)), max(pr, round(r)))
                        pr = round(r)
                    a, b = min(a, pr), max(b, pr)
                self._span(cells, owner, i, c, a, b)
                if len(x) < 4:  # a lone point (one eval) would be a single dot: draw a 2x2 marker
                    c2, a2 = (c + 1 if c + 1 < PW else c - 1), max(0, min(a, PH - 2))
                    self._span(cells, owner, i, c, a2, max(b, a2 + 1))
                    self._span(cells, owner, i, c2, a2, max(b, a2 + 1))
                pc, pr = c, e
        text = Text(no_wrap=True, overflow="crop")
        colors = [self._color(i) for i in range(len(self.series))]
        lab = [fmt_num(10 ** v if self.log_y else v) for v in (ymax, (ymax + ymin) / 2, ymin)]
        label_rows = {0: lab[0], ph // 2: lab[1], ph - 1: lab[2]}
        for r in range(ph):
            text.append(f"{label_rows.get(r, ''):>{gutter - 1}}┤" if r in label_rows else " " * (gutter - 1) + "│", style="dim")
            run_style, run = None, []
            for c in range(pw):
                v = cells[r, c]
                ch = chr(0x2800 + int(v)) if v else " "
                st = colors[owner[r, c]] if v else None
                if st != run_style and run:
                    text.append("".join(run), style=run_style)
                    run = []
                run_style = st
                run.append(ch)
            if run:
                text.append("".join(run), style=run_style)
            text.append("\n")
        left, right = fmt_num(xmin), fmt_num(xmax)
        axis = " " * (gutter - 1) + "└" + left + " " * max(1, pw - len(left) - len(right) - 1) + right
        text.append(axis[:w], style="dim")
        return text
