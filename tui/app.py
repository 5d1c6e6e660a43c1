"""nanochat-tui: watch and steer training runs, chat with checkpoints, export reports.

The app is only a client of the run directories: quitting never stops a run, and reopening rebuilds every
panel from the events on disk. Background work (event tailing, NVML, psutil, the engine) runs in Textual
workers (blocking calls in threads), cancelled with their screen; the UI thread only applies the results.
The GPU and host readings are app reactives that the screens showing them watch.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.reactive import reactive
from textual.screen import Screen

from nanochat.common import strip_controls

from .alerts import Alert
from .bindings import APP_BINDINGS, binding_ids, check_keymap
from .services import Services, Supervisor, TuiConfigError, load_tui_config

MIN_POLL_S = 0.5  # NVML and psutil are never polled faster than this


class NanochatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "nanochat"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (140, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]
    BINDINGS = APP_BINDINGS

    # the machine's readings; screens that show them watch these (a reading equal to the last one fires nothing)
    gpus: reactive[list] = reactive(list, init=False)
    gpu_error: reactive[str] = reactive("GPU stats: starting", init=False)
    host = reactive(None, init=False)

    def __init__(self, services: Services | None = None, tui_config: dict | None = None,
                 open_run: Path | None = None, open_screen: str = "dashboard"):
        super().__init__()
        self.services = services or Services()
        self.cfg = tui_config if tui_config is not None else load_tui_config()
        self.open_run, self.open_screen = open_run, open_screen
        self.alert_log: list[Alert] = []
        self.set_keymap(self.cfg.get("keys", {}))
        if self.cfg.get("theme"):
            self.theme = self.cfg["theme"]

    # ----------------------------------------------------------------- lifecycle
    def on_mount(self):
        from .screens.runs import RunsScreen
        self.push_screen(RunsScreen())
        if self.open_run is not None:
            self.open_run_screen(Path(self.open_run), self.open_screen)
        self.poll_gpus()
        self.poll_host()

    @work(exclusive=True, group="gpu", exit_on_error=False)
    async def poll_gpus(self):
        """NVML in a thread every gpu_poll_s; cancelled with the app."""
        provider = await asyncio.to_thread(self.services.gpu)
        while True:
            self.gpus = await asyncio.to_thread(provider.sample) if provider.available else []
            self.gpu_error = getattr(provider, "error", "")
            if not provider.available:
                return  # nothing will change: said once
            await asyncio.sleep(max(MIN_POLL_S, self.cfg["gpu_poll_s"]))

    @work(exclusive=True, group="host", exit_on_error=False)
    async def poll_host(self):
        while True:
            try:
                self.host = await asyncio.to_thread(self.services.host)
            except Exception:
                self.host = None
            await asyncio.sleep(max(MIN_POLL_S, self.cfg["host_poll_s"]))

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

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = True):
        """Always plain text: notifications carry run names, errors and log lines (and Widget.notify, which
        every screen's self.notify goes through, asks for markup by default)."""
        super().notify(strip_controls(message), title=strip_controls(title), severity=severity, timeout=timeout,
                       markup=False)

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
            self.push_screen(HelpScreen(all_binding_ids()))

    def action_alerts(self):
        from .screens.help import AlertsScreen
        if not isinstance(self.screen, AlertsScreen):
            self.push_screen(AlertsScreen())

    def action_menu(self):
        from .dialogs import MenuScreen
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
        self.ask_export_report(rd)

    def ask_export_report(self, run_dir: Path):
        """Ask where to, then (re)generate report.md and copy it there."""
        from .dialogs import ExportScreen
        default = Path.cwd() / f"{run_dir.name}-report.md"
        self.push_screen(ExportScreen("Export report.md to:", str(default)),
                         lambda dest: dest and self.export_report(run_dir, dest))

    @work(thread=True, group="export", exit_on_error=False)
    def export_report(self, run_dir: Path, dest: str):
        from nanochat.common import atomic_write
        try:
            src = self.services.report(run_dir)
            out = Path(dest).expanduser()
            if out.is_dir():
                out = out / f"{run_dir.name}-report.md"
            atomic_write(out, Path(src).read_text())
        except Exception as e:
            self.call_from_thread(self.notify, f"export failed: {e}", severity="error")
            return
        self.call_from_thread(self.notify, f"report exported to {out}", timeout=6)

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
    """{binding id: (where, default keys, description)} over the app, every screen and dialog."""
    from .dialogs import ConfirmScreen, ExportScreen, MenuScreen, PickScreen
    from .screens import all_screen_classes
    return binding_ids([NanochatApp, *all_screen_classes(), ConfirmScreen, PickScreen, ExportScreen, MenuScreen])


def poll_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v >= MIN_POLL_S:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: use a number of seconds >= {MIN_POLL_S}")
    return v


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="nanochat-tui", description="Watch and steer nanochat runs from the terminal.")
    ap.add_argument("run", nargs="?", help="a run to open: a run directory, or an id, id prefix or `latest` under $NANOCHAT_BASE_DIR/runs")
    ap.add_argument("--screen", default="dashboard", choices=("dashboard", "logs", "chat", "report"),
                    help="which screen to open the run on")
    ap.add_argument("--poll", type=poll_seconds, metavar="SECONDS",
                    help=f"how often GPUs (NVML) and the host (psutil) are read; default tui.toml's gpu_poll_s / "
                         f"host_poll_s (1 s / 2 s), at least {MIN_POLL_S}")
    args = ap.parse_args(argv)
    try:
        cfg = load_tui_config()
    except TuiConfigError as e:
        print(f"nanochat-tui: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.poll is not None:
        cfg["gpu_poll_s"] = cfg["host_poll_s"] = args.poll
    err = check_keymap(cfg["keys"], all_binding_ids())
    if err:
        print(f"nanochat-tui: error: {err}", file=sys.stderr)
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
