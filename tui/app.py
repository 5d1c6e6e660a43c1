"""nanochat-tui: watch and steer training runs, chat with checkpoints, export reports.

The app is only a client of the run directories: quitting never stops a run, and reopening rebuilds every
panel from the events on disk. Background work (event tailing, NVML, psutil, the engine) runs in worker
threads that post messages; the UI thread only applies them.
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen

from .alerts import Alert
from .services import Services, Supervisor, TuiConfigError, load_tui_config

FORBIDDEN_KEYS = ("ctrl+b", "ctrl+s", "ctrl+j", "ctrl+h")  # tmux prefix, XOFF, newline, backspace


class GpuUpdate(Message):
    def __init__(self, gpus: list, error: str):
        super().__init__()
        self.gpus, self.error = gpus, error


class HostUpdate(Message):
    def __init__(self, host):
        super().__init__()
        self.host = host


class NanochatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "nanochat"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (140, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]
    BINDINGS = [
        Binding("f1,question_mark", "help", "Help", id="app.help"),
        Binding("m", "menu", "Menu", id="app.menu"),
        Binding("exclamation_mark", "alerts", "Alerts", id="app.alerts"),
        Binding("f2", "next_theme", "Theme", id="app.theme", show=False),
        Binding("f6", "serve", "Serve", id="app.serve", show=False),
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
    ]

    def __init__(self, services: Services | None = None, tui_config: dict | None = None,
                 open_run: Path | None = None, open_screen: str = "dashboard"):
        super().__init__()
        self.services = services or Services()
        self.cfg = tui_config if tui_config is not None else load_tui_config()
        self.open_run, self.open_screen = open_run, open_screen
        self.alert_log: list[Alert] = []
        self.gpus: list = []
        self.gpu_error = "GPU stats: starting"
        self.host = None
        self._stop = threading.Event()
        self.set_keymap(self.cfg.get("keys", {}))
        if self.cfg.get("theme"):
            self.theme = self.cfg["theme"]

    # ----------------------------------------------------------------- lifecycle
    def on_mount(self):
        from .screens.runs import RunsScreen
        self.push_screen(RunsScreen())
        if self.open_run is not None:
            self.open_run_screen(Path(self.open_run), self.open_screen)
        self.run_worker(self._poll_gpus, thread=True, exit_on_error=False, name="gpu", group="pollers")
        self.run_worker(self._poll_host, thread=True, exit_on_error=False, name="host", group="pollers")

    def on_unmount(self):
        self._stop.set()

    def _poll_gpus(self):
        """NVML off the UI thread, every gpu_poll_s (>= 0.5 s)."""
        provider = self.services.gpu()
        while not self._stop.is_set():
            gpus = provider.sample() if provider.available else []
            self.post_message(GpuUpdate(gpus, getattr(provider, "error", "")))
            if not provider.available:
                return  # nothing will change: say so once
            self._stop.wait(self.cfg["gpu_poll_s"])

    def _poll_host(self):
        while not self._stop.is_set():
            try:
                h = self.services.host()
            except Exception:
                h = None
            self.post_message(HostUpdate(h))
            self._stop.wait(self.cfg["host_poll_s"])

    def on_gpu_update(self, msg: GpuUpdate):
        self.gpus, self.gpu_error = msg.gpus, msg.error
        for screen in self.screen_stack:
            if hasattr(screen, "on_gpus"):
                screen.on_gpus(msg.gpus, msg.error)

    def on_host_update(self, msg: HostUpdate):
        self.host = msg.host
        for screen in self.screen_stack:
            if hasattr(screen, "on_host"):
                screen.on_host(msg.host)

    # ----------------------------------------------------------------- navigation
    @property
    def supervisor(self) -> Supervisor:
        return self.services.supervisor

    def open_run_screen(self, run_dir: Path, which: str = "dashboard", **kw):
        from .screens.chat import ChatScreen
        from .screens.dashboard import DashboardScreen
        from .screens.logs import LogsScreen
        from .screens.report import ReportScreen
        cls = {"dashboard": DashboardScreen, "logs": LogsScreen, "chat": ChatScreen, "report": ReportScreen}[which]
        self.push_screen(cls(Path(run_dir), **kw))

    def current_run(self) -> Path | None:
        """The run the user is looking at: the open screen's, else the highlighted row of the run list."""
        for screen in reversed(self.screen_stack):
            rd = getattr(screen, "run_dir", None) or (screen.selected_run() if hasattr(screen, "selected_run") else None)
            if rd is not None:
                return Path(rd)
        return None

    def raise_alerts(self, alerts: list[Alert]):
        for a in alerts:
            self.alert_log.append(a)
            hint = "  (l: open log)" if a.key.startswith("failed:") else ""
            body = a.message + (f"\n{a.detail.splitlines()[-1]}" if a.detail else "") + hint
            self.notify(body, title=a.title, severity="error" if a.severity == "error" else "warning",
                        timeout=10 if a.severity == "error" else 6)

    # ----------------------------------------------------------------- actions
    def action_help(self):
        from .screens.help import HelpScreen
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_alerts(self):
        from .screens.help import AlertsScreen
        if not isinstance(self.screen, AlertsScreen):
            self.push_screen(AlertsScreen())

    def action_menu(self):
        from .screens.help import MenuScreen
        if isinstance(self.screen, MenuScreen):
            return
        commands = list(self.all_commands(self.screen))
        self.push_screen(MenuScreen(commands))

    def action_next_theme(self):
        names = sorted(self.available_themes)
        self.theme = names[(names.index(self.theme) + 1) % len(names)] if self.theme in names else names[0]
        self.notify(f"theme: {self.theme}", timeout=2)

    def action_compare(self):
        from .screens.compare import CompareScreen
        self.push_screen(CompareScreen())

    def action_serve(self):
        from .screens.serve import ServeScreen
        rd = self.current_run()
        if rd is None:
            self.notify("select a run first", severity="warning")
            return
        self.push_screen(ServeScreen(rd))

    def action_report(self):
        rd = self.current_run()
        if rd is None:
            self.notify("select a run first", severity="warning")
            return
        self.open_run_screen(rd, "report")

    def action_export_report(self):
        rd = self.current_run()
        if rd is None:
            self.notify("select a run first", severity="warning")
            return
        from .screens.report import export_report_flow
        export_report_flow(self, rd)

    # ----------------------------------------------------------------- command palette: every action
    def all_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        seen = set()
        for key, active in screen.active_bindings.items():
            b = active.binding
            if not b.description or b.action in seen or b.action in ("quit", "menu", "command_palette"):
                continue
            seen.add(b.action)
            node = active.node
            yield SystemCommand(b.description, f"{key}  ·  {b.id or b.action}",
                                lambda node=node, action=b.action: self.call_later(self.run_action, action, node))
        extra = [("Compare runs", "overlay the loss curves of several runs", self.action_compare),
                 ("Serve", "web chat + OpenAI API for a checkpoint of the current run (nanochat serve)", self.action_serve),
                 ("Report preview", "show report.md of the current run", self.action_report),
                 ("Export report", "write report.md and copy it where you choose", self.action_export_report),
                 ("Alerts", "all alerts raised in this session", self.action_alerts),
                 ("Help", "keys, binding ids and where to remap them", self.action_help)]
        for title, help_, cb in extra:
            if title not in seen:
                yield SystemCommand(title, help_, cb)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from self.all_commands(screen)
        yield from super().get_system_commands(screen)


def all_binding_ids() -> dict[str, tuple[str, str, str]]:
    """{binding id: (where, default keys, description)} over the app and every screen."""
    from .screens import all_screen_classes
    out = {}
    for cls in [NanochatApp, *all_screen_classes()]:
        for b in cls.BINDINGS:
            if isinstance(b, Binding) and b.id:
                out[b.id] = (cls.__name__, b.key, b.description)
    return out


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="nanochat-tui", description="Watch and steer nanochat runs from the terminal.")
    ap.add_argument("run", nargs="?", help="a run to open: a run directory, or an id, id prefix or `latest` under $NANOCHAT_BASE_DIR/runs")
    ap.add_argument("--screen", default="dashboard", choices=("dashboard", "logs", "chat", "report"),
                    help="which screen to open the run on")
    args = ap.parse_args(argv)
    try:
        cfg = load_tui_config()
    except TuiConfigError as e:
        print(f"nanochat-tui: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    unknown = set(cfg["keys"]) - set(all_binding_ids())
    if unknown:
        print(f"nanochat-tui: error: unknown binding id(s) in [tui.keys]: {', '.join(sorted(unknown))}; "
              f"see the help screen (F1) or docs/tui.md for the ids", file=sys.stderr)
        raise SystemExit(2)
    run = None
    if args.run:
        try:
            run = Supervisor().resolve(args.run)
        except Exception as e:  # SupervisorError: one line naming the runs there are
            print(f"nanochat-tui: error: {e}", file=sys.stderr)
            raise SystemExit(2)
    NanochatApp(tui_config=cfg, open_run=run, open_screen=args.screen).run()


if __name__ == "__main__":
    main()
