"""Report: preview a run's report.md, regenerate it from the events, export a copy."""
from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Header, Input, Label, MarkdownViewer

from nanochat.common import atomic_write


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

    def action_generate(self, then=None):
        self.query_one(MarkdownViewer).document.update("*generating report.md from the events…*")

        def job():
            try:
                self.app.services.report(self.run_dir)
            except Exception as e:
                self.app.call_from_thread(self.notify, f"report failed: {e}", severity="error")
                self.app.call_from_thread(self._show)
                return
            self.app.call_from_thread(self._show)
            if then:
                self.app.call_from_thread(then)
        self.run_worker(job, thread=True, exit_on_error=False, group="report", exclusive=True)

    def action_export(self):
        export_report_flow(self.app, self.run_dir)


def export_report_flow(app, run_dir: Path):
    """Ask where to, (re)generate report.md in a worker, copy it there atomically."""
    default = Path.cwd() / f"{run_dir.name}-report.md"

    def chosen(dest):
        if not dest:
            return

        def job():
            try:
                src = app.services.report(run_dir)
                out = Path(dest).expanduser()
                if out.is_dir():
                    out = out / f"{run_dir.name}-report.md"
                atomic_write(out, Path(src).read_text())
            except Exception as e:
                app.call_from_thread(app.notify, f"export failed: {e}", severity="error")
                return
            app.call_from_thread(app.notify, f"report exported to {out}", timeout=6)
        app.run_worker(job, thread=True, exit_on_error=False, group="export")
    app.push_screen(ExportScreen(str(default)), chosen)


class ExportScreen(ModalScreen):
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="export.cancel")]

    def __init__(self, default: str):
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Export report.md to:")
            yield Input(self.default, id="export-path")
            with Horizontal(classes="buttons"):
                yield Button("Export", id="ok", variant="primary")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    def _submit(self, e):
        self.dismiss(e.value.strip() or None)

    @on(Button.Pressed)
    def _pressed(self, e):
        self.dismiss(self.query_one(Input).value.strip() if e.button.id == "ok" else None)

    def action_cancel(self):
        self.dismiss(None)


