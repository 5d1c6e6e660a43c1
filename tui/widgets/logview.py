"""A virtual log viewer: renders only the visible lines, fetched by seek from a `LogFile`."""
from __future__ import annotations

import re
from collections import OrderedDict

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from nanochat.common import strip_controls

from ..logfile import LogFile, line_level

BLOCK = 128
LEVEL_NAMES = ("debug", "info", "warning", "error")  # line_level 0..3, styled in app.tcss as logview--<name>


class LogView(ScrollView, can_focus=True):
    DEFAULT_CSS = "LogView { height: 1fr; }"
    COMPONENT_CLASSES = {*(f"logview--{name}" for name in LEVEL_NAMES), "logview--match", "logview--current"}

    def __init__(self, **kw):
        super().__init__(**kw)
        self.logfile: LogFile | None = None
        self.rows: list[int] | None = None     # filtered line numbers, or None for every line
        self.pattern: re.Pattern | None = None  # highlighted search (bytes regex)
        self.current: int | None = None         # line of the current match
        self.follow = True
        self._cache: OrderedDict[int, list[str]] = OrderedDict()
        self._width = 0
        self._text_pattern: re.Pattern | None = None

    def set_pattern(self, pattern: re.Pattern | None):
        """Highlight matches of a bytes regex (the same one the search runs on the file)."""
        self.pattern = pattern
        self._text_pattern = None if pattern is None else \
            re.compile(pattern.pattern.decode("utf-8", "replace"), pattern.flags & ~re.ASCII)
        self.refresh()

    def set_log(self, log: LogFile | None):
        self.logfile, self.rows, self.current = log, None, None
        self._cache.clear()
        self._width = 0
        self.sync()

    def set_rows(self, rows: list[int] | None):
        self.rows = rows
        self.sync()

    @property
    def n_rows(self) -> int:
        if self.logfile is None:
            return 0
        return len(self.rows) if self.rows is not None else len(self.logfile)

    def sync(self):
        """The file grew (or the filter changed): resize, drop the stale tail block, follow if asked."""
        n = self.n_rows
        if self.logfile is not None and self._cache:
            self._cache.pop(max(self._cache), None)  # the last block may have been partial
        self.virtual_size = Size(max(self._width, self.size.width), n)
        if self.follow:
            self.scroll_to(y=max(0, n - self.size.height), animate=False)
        self.refresh()

    def _line(self, k: int) -> str:
        b = k // BLOCK
        blk = self._cache.get(b)
        if blk is None:
            blk = self.logfile.lines(b * BLOCK, BLOCK)
            self._cache[b] = blk
            if len(self._cache) > 64:
                self._cache.popitem(last=False)
            w = max((len(x) for x in blk), default=0)
            if w > self._width:
                self._width = w
                self.virtual_size = Size(max(w, self.size.width), self.n_rows)
        else:
            self._cache.move_to_end(b)
        i = k - b * BLOCK
        return blk[i] if i < len(blk) else ""

    def goto(self, line: int):
        """Scroll so file line `line` is visible (middle of the screen) and mark it current."""
        self.current = line
        self.follow = False
        row = line if self.rows is None else _bisect(self.rows, line)
        self.scroll_to(y=max(0, row - self.size.height // 2), animate=False)
        self.refresh()

    def top_line(self) -> int:
        """File line number at the top of the view."""
        y = int(self.scroll_offset.y)
        if self.rows is not None:
            return self.rows[y] if y < len(self.rows) else (self.rows[-1] if self.rows else 0)
        return y

    def render_line(self, y: int) -> Strip:
        row = int(self.scroll_offset.y) + y
        width = self.size.width
        if self.logfile is None or row >= self.n_rows:
            return Strip.blank(width, self.rich_style)
        k = self.rows[row] if self.rows is not None else row
        text = strip_controls(self._line(k)).expandtabs(4)  # a log's colour codes are shown as text, not sent
        style = self.get_component_rich_style
        base = style(f"logview--{LEVEL_NAMES[line_level(text.encode('utf-8', 'replace'))]}", partial=True) if text else Style()
        if k == self.current:
            base = base + style("logview--current", partial=True)
        match = style("logview--match", partial=True)
        segs = []
        pos = 0
        if self._text_pattern is not None:
            for m in self._text_pattern.finditer(text):
                if m.start() == m.end():
                    continue
                segs.append(Segment(text[pos:m.start()], base))
                segs.append(Segment(m.group(), base + match))
                pos = m.end()
        segs.append(Segment(text[pos:], base))
        x = int(self.scroll_offset.x)
        strip = Strip(segs).crop(x, x + width)
        return strip.extend_cell_length(width, self.rich_style)

    def on_resize(self):
        self.sync()


def _bisect(rows: list[int], line: int) -> int:
    import bisect
    return min(bisect.bisect_left(rows, line), max(0, len(rows) - 1))
