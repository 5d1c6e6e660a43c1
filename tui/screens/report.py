"""Report: preview a run's report.md, regenerate it from the events, export a copy."""
from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, MarkdownViewer


class ReportScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="report.back"),
        Binding("g", "generate", "Regenerate", id="report.generate"),
        Binding("e", "export", "Export", id="report.export"),
    ]

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)

    def compose(self) -> ComposeResult:
        yield Header()
        yield MarkdownViewer("", show_table_of_contents=False, id="report-md")
        yield Footer()

    def on_mount(self):
        self.title = f"nanochat · report · {self.run_dir.name}"
        if (self.run_dir / "report.md").exists():
            self._show()
        else:
            self.action_generate()

    def _show(self):
        path = self.run_dir / "report.md"
        text = path.read_text() if path.exists() else "*no report yet: press g to generate it*"
        self.query_one(MarkdownViewer).document.update(text)

    def action_generate(self):
        self.query_one(MarkdownViewer).document.update("*generating report.md from the events…*")
        self._generate()

    @work(thread=True, exclusive=True, group="report", exit_on_error=False)
    def _generate(self):
        try:
            self.app.services.report(self.run_dir)
        except Exception as e:
            self.app.call_from_thread(self.notify, f"report failed: {e}", severity="error")
        self.app.call_from_thread(self._show)

    def action_export(self):
        self.app.ask_export_report(self.run_dir)
