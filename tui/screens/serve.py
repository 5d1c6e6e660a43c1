"""Serve: start and stop `nanochat serve` for one of the run's checkpoints; shows its URL and request counts.

The server is its own process (it keeps serving when the TUI quits, like a run keeps training). What the
screen shows comes from the files the server writes: <run_dir>/serve/server.json while it listens, and
the request events in <run_dir>/serve/events.jsonl (docs/events.md).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Select, Static

from nanochat.checkpoint import PHASES
from nanochat.events import EVENTS_FILE, EventReader


def server_info(run_dir: Path) -> dict | None:
    """server.json of a server that is still alive, else None."""
    try:
        info = json.loads((run_dir / "serve" / "server.json").read_text())
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RequestCounts:
    """Requests of the latest server start, read incrementally from serve/events.jsonl."""

    def __init__(self, run_dir: Path):
        self.reader = EventReader(run_dir / "serve" / EVENTS_FILE)
        self.ok = self.rejected = self.failed = self.tokens = 0
        self.last_error = ""

    def update(self) -> "RequestCounts":
        for e in self.reader.poll():
            if e["kind"] == "start":
                self.ok = self.rejected = self.failed = self.tokens = 0
                self.last_error = ""
            elif e["kind"] == "log" and e.get("message") == "request":
                status = e.get("status", 0)
                if status == 200:
                    self.ok += 1
                    self.tokens += e.get("completion_tokens") or 0
                elif status < 500:
                    self.rejected += 1
                else:
                    self.failed += 1
            elif e["kind"] == "error":
                self.last_error = e.get("message", "")
        return self


class ServeScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", id="serve.back"),
        Binding("s", "start", "Start server", id="serve.start"),
        Binding("x", "stop", "Stop server", id="serve.stop"),
    ]

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.counts = RequestCounts(self.run_dir)
        self.proc: subprocess.Popen | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        have = [p for p in reversed(PHASES) if any((self.run_dir / "checkpoints" / p).glob("step_*"))]  # most trained first
        with Vertical(id="serve-form"):
            yield Static(f"run {self.run_dir.name}", id="serve-run")
            yield Select([(f"{p} checkpoint", p) for p in have], value=have[0] if have else Select.BLANK,
                         prompt="no checkpoints yet", id="serve-stage")
            yield Input("8000", placeholder="port", id="serve-port", restrict=r"[0-9]*", max_length=5)
            yield Static("", id="serve-status")
        yield Footer()

    def on_mount(self):
        self.title = "nanochat · serve"
        self.refresh_status()
        self.set_interval(1.0, self.refresh_status)

    def refresh_status(self):
        info, c = server_info(self.run_dir), self.counts.update()
        if info:
            text = (f"serving {info['model']}\n  chat page  {info['url']}/\n  API        {info['url']}/v1\n"
                    f"  requests   {c.ok} served · {c.rejected} rejected · {c.failed} failed · {c.tokens:,} tokens"
                    f"\n  (x stops it)")
        elif self.proc is not None and self.proc.poll() is None:
            text = "starting (loading the checkpoint)..."
        else:
            text = "not serving (s starts a server for the chosen checkpoint)"
            if self.proc is not None and self.proc.returncode not in (0, -signal.SIGTERM, None):
                text += f"\n  the last server exited with {self.proc.returncode}: see {self.run_dir}/serve/stderr.log"
        if c.last_error:
            text += f"\n  last error: {c.last_error}"
        self.query_one("#serve-status", Static).update(text)

    def action_start(self):
        if server_info(self.run_dir) or (self.proc is not None and self.proc.poll() is None):
            self.notify("a server for this run is already running", severity="warning")
            return
        stage = self.query_one("#serve-stage", Select).value
        port = self.query_one("#serve-port", Input).value or "8000"
        if stage is Select.BLANK:
            self.notify("this run has no checkpoints to serve yet", severity="warning")
            return
        if not 0 <= int(port) <= 65535:
            self.notify(f"port {port} must be in 0..65535", severity="error")
            return
        logs = self.run_dir / "serve"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "stdout.log", "ab") as out, open(logs / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "nanochat.cli", "serve", "--run", str(self.run_dir),
                                          "--stage", stage, "--port", port], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.notify(f"starting a server for the {stage} checkpoint on port {port}")
        self.refresh_status()

    def action_stop(self):
        info = server_info(self.run_dir)
        if info is None:
            self.notify("no server is running for this run", severity="warning")
            return
        os.kill(int(info["pid"]), signal.SIGTERM)  # finishes the requests in flight, then exits
        self.notify("stopping the server")
