"""Help (every key with its binding id, for remapping) and the alert list."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from ..bindings import current_keys
from ..services import tui_config_paths
from ..widgets.panels import plain, severity_text


class HelpScreen(Screen):
    BINDINGS = [Binding("escape,q", "app.pop_screen", "Back", id="help.back")]

    def __init__(self, binding_ids: dict[str, tuple[str, str, str]]):
        super().__init__()
        self.binding_ids = binding_ids  # {id: (where, default keys, description)}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="help-intro")
        yield DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self):
        self.title = "nanochat · help"
        paths = " or ".join(str(p) for p in tui_config_paths())
        self.query_one("#help-intro", Static).update(Text.assemble(
            "Every key below can be remapped in ", (paths, "bold"), " under ", ("[tui.keys]", "bold"),
            ', e.g. dashboard.logs = "L". ctrl+p opens the command palette (all actions); ctrl+q quits '
            "(runs keep going)."))
        t = self.query_one(DataTable)
        for c in ("screen", "key", "action", "binding id"):
            t.add_column(c)
        for bid, (where, key, desc) in sorted(self.binding_ids.items(), key=lambda kv: (kv[1][0], kv[0])):
            t.add_row(*map(Text, (where.replace("Screen", "").replace("NanochatApp", "global"),
                                  current_keys(self.app, bid, key), desc, bid)))


class AlertsScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="alerts.back"),
                Binding("l", "open_log", "Open log", id="alerts.open_log")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="alert-list", cursor_type="row")
        yield Static(id="alert-detail", markup=False)  # messages and tracebacks come from the run
        yield Footer()

    def on_mount(self):
        self.title = "nanochat · alerts"
        t = self.query_one(DataTable)
        for c in ("severity", "alert", "message"):
            t.add_column(c)
        for a in self.app.alert_log:
            t.add_row(severity_text(a.severity), plain(a.title), plain(a.message))
        if not self.app.alert_log:
            self.query_one("#alert-detail", Static).update("No alerts in this session.")

    def on_data_table_row_highlighted(self, e: DataTable.RowHighlighted):
        a = self.app.alert_log[e.cursor_row]
        self.query_one("#alert-detail", Static).update(plain(a.detail or a.message))

    def action_open_log(self):
        t = self.query_one(DataTable)
        if not self.app.alert_log:
            return
        a = self.app.alert_log[t.cursor_row]
        rd = self.app.current_run()
        if rd is not None and a.stage:
            self.app.open_run_screen(rd, "logs", stage=a.stage)
