"""Logs: stdout/stderr of any stage and rank, tailing live; search (next/previous) and filter
(substring or regex, level). Files are read by seek, so multi-GB logs open instantly."""
from __future__ import annotations

import asyncio
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Select, Static
from textual.worker import get_current_worker

from ..logfile import LEVELS, LogFile, compile_query
from ..widgets.logview import LogView


def list_logs(run_dir: Path) -> list[Path]:
    """Every *.log of the run: <stage>/stdout.log, stderr.log and any per-rank logs, plus the driver's."""
    return sorted(p for p in Path(run_dir).rglob("*.log") if p.is_file() and "checkpoints" not in p.parts)


class FilterDone(Message):
    def __init__(self, rows):
        super().__init__()
        self.rows = rows


class SearchDone(Message):
    def __init__(self, line, query):
        super().__init__()
        self.line, self.query = line, query


class LogsScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back", id="logs.back"),
        Binding("slash", "search", "Search", id="logs.search"),
        Binding("n", "next", "Next", id="logs.next"),
        Binding("N", "prev", "Prev", id="logs.prev"),
        Binding("f", "filter", "Filter", id="logs.filter"),
        Binding("x", "toggle_regex", "Regex", id="logs.regex"),
        Binding("v", "level", "Level", id="logs.level"),
        Binding("e", "follow", "Follow", id="logs.follow"),
        Binding("g", "top", "Top", id="logs.top", show=False),
        Binding("G", "bottom", "Bottom", id="logs.bottom", show=False),
    ]

    def __init__(self, run_dir: Path, stage: str | None = None, file: Path | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.stage, self.file = stage, file
        self.regex = False
        self.level = 0
        self.filter_text = ""
        self.search_text = ""
        self._mode = "search"
        self.log_file: LogFile | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="logs-bar"):
            yield Select([], id="logs-file", prompt="log file")
            yield Static("", id="logs-flags")
        yield LogView(id="logview")
        yield Input(placeholder="search", id="logs-input", classes="hidden")
        yield Footer()

    def on_mount(self):
        self.title = f"nanochat · logs · {self.run_dir.name}"
        self._populate_files()
        self._watch()
        self.query_one(LogView).focus()
        self._flags()

    def _populate_files(self):
        files = list_logs(self.run_dir)
        sel = self.query_one("#logs-file", Select)
        sel.set_options([(Text(str(p.relative_to(self.run_dir))), str(p)) for p in files])
        target = self.file
        if target is None and self.stage:
            # the stage's stderr first when it has content (tracebacks land there), else stdout
            cands = [p for p in files if p.parent.name == self.stage]
            cands.sort(key=lambda p: (p.name != "stderr.log" or p.stat().st_size == 0, p.name != "stdout.log", p.name))
            target = cands[0] if cands else None
        if target is None and files:
            target = files[0]
        if target is not None and target in files:
            sel.value = str(target)
        elif not files:
            self.query_one(LogView).set_log(None)
            self.notify("this run has no log files yet", severity="warning")

    @on(Select.Changed, "#logs-file")
    def _file_changed(self, e: Select.Changed):
        if e.value is Select.BLANK or e.value is None:
            return
        self.log_file = LogFile(e.value)
        self.log_file.refresh(budget=64 << 20)  # index the first 64 MiB now, the rest in the watcher
        view = self.query_one(LogView)
        view.set_log(self.log_file)
        view.follow = True
        self._apply_filter()

    @work(exclusive=True, group="logwatch", exit_on_error=False)
    async def _watch(self):
        """Index appended bytes (tail) in a thread; big files are indexed in 256 MiB steps. Cancelled with
        the screen."""
        while True:
            log = self.log_file
            if log is not None and await asyncio.to_thread(log.refresh, budget=256 << 20):
                self._grew()
                continue
            await asyncio.sleep(0.5)

    def _grew(self):
        view = self.query_one(LogView)
        if self.filter_text or self.level:
            self._filter_tail()
        else:
            view.sync()
        self._flags()

    # ----------------------------------------------------------------- search / filter
    def _flags(self):
        view = self.query_one(LogView)
        n = len(self.log_file) if self.log_file else 0
        parts = [f"{n:,} lines", f"level≥{LEVELS[self.level]}", "regex" if self.regex else "substring",
                 "following" if view.follow else "paused"]
        if self.filter_text:
            parts.append(f"filter '{self.filter_text}' ({view.n_rows:,})")
        if self.search_text:
            parts.append(f"search '{self.search_text}'")
        self.query_one("#logs-flags", Static).update(Text("  ·  ".join(parts)))  # the user's regex is not markup

    def _open_input(self, mode: str):
        self._mode = mode
        inp = self.query_one("#logs-input", Input)
        inp.placeholder = ("filter (empty clears)" if mode == "filter" else "search") + (" · regex" if self.regex else "")
        inp.value = self.filter_text if mode == "filter" else self.search_text
        inp.remove_class("hidden")
        inp.focus()

    def action_search(self):
        self._open_input("search")

    def action_filter(self):
        self._open_input("filter")

    def action_back(self):
        inp = self.query_one("#logs-input", Input)
        if not inp.has_class("hidden"):
            inp.add_class("hidden")
            self.query_one(LogView).focus()
        else:
            self.app.pop_screen()

    @on(Input.Submitted, "#logs-input")
    def _submitted(self, e: Input.Submitted):
        e.input.add_class("hidden")
        self.query_one(LogView).focus()
        if self._mode == "filter":
            self.filter_text = e.value
            self._apply_filter()
        else:
            self.search_text = e.value
            self.action_next()
        self._flags()

    def _pattern(self, text: str):
        try:
            return compile_query(text, self.regex)
        except ValueError as err:
            self.notify(str(err), severity="error")
            return None

    def action_toggle_regex(self):
        self.regex = not self.regex
        self._apply_filter()
        self._flags()

    def action_level(self):
        self.level = (self.level + 1) % len(LEVELS)
        self._apply_filter()
        self._flags()

    def _apply_filter(self):
        """Recompute the visible rows in a worker (a multi-GB filter must not freeze the UI)."""
        view = self.query_one(LogView)
        if self.log_file is None:
            return
        if not self.filter_text and not self.level:
            view.set_rows(None)
            self._flags()
            return
        pat = self._pattern(self.filter_text) if self.filter_text else None
        if self.filter_text and pat is None:
            return
        self._filter(self.log_file, pat, self.level)

    @work(thread=True, exclusive=True, group="filter", exit_on_error=False)
    def _filter(self, log: LogFile, pat, level: int):
        """A newer filter cancels this one (exclusive): the scan stops at its next chunk."""
        worker = get_current_worker()
        rows = log.filter(pat, level, cancel=lambda: worker.is_cancelled)
        if not worker.is_cancelled:
            self.post_message(FilterDone(rows))

    def _filter_tail(self):
        """Filter only the lines appended since the last filter pass and extend the rows."""
        view = self.query_one(LogView)
        if view.rows is None or self.log_file is None:
            return
        pat = self._pattern(self.filter_text) if self.filter_text else None
        start = (view.rows[-1] + 1) if view.rows else getattr(self, "_filtered_upto", 0)
        new = self.log_file.filter(pat, self.level, start=start) if start < len(self.log_file) else []
        self._filtered_upto = len(self.log_file)
        if new:
            view.rows.extend(new)
        view.sync()

    def on_filter_done(self, msg: FilterDone):
        self._filtered_upto = len(self.log_file) if self.log_file else 0
        view = self.query_one(LogView)
        view.set_pattern(self._pattern(self.filter_text) if self.filter_text else view.pattern)
        view.set_rows(msg.rows)
        self._flags()

    def _find(self, backwards: bool):
        if not self.search_text or self.log_file is None:
            self.notify("nothing to search: press / first", severity="warning")
            return
        pat = self._pattern(self.search_text)
        if pat is None:
            return
        view = self.query_one(LogView)
        view.set_pattern(pat)
        start = view.current if view.current is not None else view.top_line() - (0 if backwards else 1)
        rows = set(view.rows) if view.rows is not None else None
        self._search(self.log_file, pat, start, backwards, rows, self.search_text)

    @work(thread=True, exclusive=True, group="search", exit_on_error=False)
    def _search(self, log: LogFile, pat, start: int, backwards: bool, rows: set | None, query: str):
        k, seen = start, set()
        while True:  # when filtered, skip matches on hidden lines
            k = log.find(pat, k, backwards=backwards)
            if k is None or rows is None or k in rows:
                break
            if k in seen:  # wrapped around: only hidden lines match
                k = None
                break
            seen.add(k)
        self.post_message(SearchDone(k, query))

    def on_search_done(self, msg: SearchDone):
        if msg.line is None:
            self.notify(f"no match for {msg.query!r}", severity="warning")
            return
        self.query_one(LogView).goto(msg.line)
        self._flags()

    def action_next(self):
        self._find(False)

    def action_prev(self):
        self._find(True)

    def action_follow(self):
        view = self.query_one(LogView)
        view.follow = not view.follow
        if view.follow:
            view.current = None
            view.sync()
        self._flags()

    def action_top(self):
        view = self.query_one(LogView)
        view.follow = False
        view.scroll_home(animate=False)
        self._flags()

    def action_bottom(self):
        view = self.query_one(LogView)
        view.follow = True
        view.sync()
        self._flags()
