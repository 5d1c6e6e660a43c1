"""End to end in a real terminal: nanochat-tui under tmux drives a real demo run.

Start the TUI, launch the demo profile from the new-run form (keys only), kill the TUI while base_train
trains, check the run goes on without it (state.json, psutil, `nanochat status`), reopen the TUI and
watch the steps advance, wait for the run to finish, chat with the SFT checkpoint, export the report.
tmux is the screen: `send-keys` types, `capture-pane -p` reads what a user would see.

The form's free overrides shrink every stage (a few steps, a few eval problems) so the whole real
pipeline runs in about two minutes on two CPU cores; base_train keeps enough steps to still be training
when the TUI is reopened.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE_STEPS = 20
OVERRIDES = " ".join([
    f"base_train.num_iterations={BASE_STEPS}", "base_train.eval_tokens=4096", "base_train.sample_every=0",
    "base_eval.bpb_tokens=4096",
    "mid_train.num_iterations=3", "mid_train.eval_tokens=4096",
    "chat_sft.num_iterations=3", "chat_sft.eval_every=-1", "chat_sft.eval_examples=4", "chat_sft.eval_max_tokens=8",
    "chat_rl.num_iterations=2", "chat_rl.eval_every=-1", "chat_rl.eval_examples=4", "chat_rl.eval_samples=2",
    "chat_rl.examples_per_step=2", "chat_rl.num_samples=2", "chat_rl.max_new_tokens=16",
    "chat_eval.tasks=SpellingBee", "chat_eval.max_problems=4", "chat_eval.max_new_tokens=16",
])

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480),
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


def tui_command() -> list[str]:
    exe = Path(sys.executable).with_name("nanochat-tui")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tui.app"]


class Term:
    """One tmux server of our own (its own socket): sessions are terminals running nanochat-tui."""

    def __init__(self, tmp: Path, env: dict):
        # a socket of our own, on a short path (pytest's tmp paths can pass the 108-byte limit of a socket)
        self.sock = os.path.join(tempfile.gettempdir(), f"nanochat-e2e-{os.getpid()}.sock")
        self.env, self.cwd = env, tmp
        self.session = None

    def tmux(self, *args, check=True) -> str:
        p = subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True, timeout=20)
        if check and p.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    def open(self, name: str, *args: str):
        env = [f"{k}={v}" for k, v in self.env.items()]
        self.session = name
        # env -i: nothing of the test's environment leaks in (pytest's COLUMNS/LINES would fix Textual's size)
        self.tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "48", "-c", str(self.cwd),
                  "env", "-i", *env, *tui_command(), *args)
        self.tmux("set-option", "-s", "escape-time", "0")  # an Escape is an Escape, never alt+next key

    def pid(self) -> int:
        return int(self.tmux("display-message", "-p", "-t", self.session, "#{pane_pid}").strip())

    def keys(self, *keys: str, literal: bool = False):
        self.tmux("send-keys", "-t", self.session, *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def wait_for(self, pattern: str, timeout: float, what: str) -> re.Match:
        """Poll the screen until the regex matches; on timeout fail showing the last screen."""
        t0, screen = time.monotonic(), ""
        while time.monotonic() - t0 < timeout:
            screen = self.screen()
            m = re.search(pattern, screen)
            if m:
                return m
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} ({pattern!r}); screen:\n{screen}")

    def wait_focus(self, marker: str, timeout: float, what: str):
        """Wait until the focused input is the one on the row showing `marker`. Textual keeps the (hidden)
        terminal cursor on the focused input: keys sent before a focus change lands go to the old widget."""
        def row():
            lines = self.screen().splitlines()
            y = int(self.tmux("display-message", "-p", "-t", self.session, "#{cursor_y}").strip())
            return y < len(lines) and marker in lines[y]
        try:
            wait_until(row, timeout, f"focus on {what}")
        except AssertionError as e:
            raise AssertionError(f"{e}; screen:\n{self.screen()}") from None

    def close(self):
        self.tmux("kill-server", check=False)
        Path(self.sock).unlink(missing_ok=True)


def wait_until(cond, timeout: float, what: str, every: float = 0.25):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def base_steps(run_dir: Path) -> int:
    """Step events base_train wrote so far (read straight from the file, not through the TUI)."""
    try:
        return sum('"kind":"step"' in ln for ln in (run_dir / "base_train" / "events.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_tui_drives_a_real_demo_run_in_tmux(tmp_path):
    import psutil

    from nanochat import supervisor as sv

    base = tmp_path / "base"
    env = {"NANOCHAT_BASE_DIR": str(base), "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path),
           "TERM": "xterm-256color", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")}
    term = Term(tmp_path, env)
    run_dir = None
    try:
        # -- start the TUI; launch the demo profile from the new-run form with keys only
        term.open("tui1")
        term.wait_for(r"No runs yet", 60, "the empty run list")
        term.keys("n")
        term.wait_for(r"profile: demo", 20, "the new-run form with its config preview")
        term.keys("Tab", "Tab", "Tab")  # profile (demo) -> depth -> GPUs -> overrides
        term.wait_focus("overrides: section.key=value", 20, "the overrides field")
        term.keys(OVERRIDES, literal=True)
        term.wait_for(rf"num_iterations={BASE_STEPS}", 20, "the overrides in the config preview")
        term.keys("C-l")
        term.wait_for(r"status running", 60, "the dashboard of the launched run")
        runs = list((base / "runs").iterdir())
        assert len(runs) == 1
        run_dir = runs[0]
        cfg = (run_dir / "config.toml").read_text()
        assert f"num_iterations = {BASE_STEPS}" in cfg and 'tasks = "SpellingBee"' in cfg

        # -- base_train steps appear live; then kill the TUI (SIGKILL, as a lost ssh session or a crash would)
        m = term.wait_for(rf"step\s+(\d+)/{BASE_STEPS}", 150, "base_train steps on the dashboard")
        seen_before = int(m.group(1))
        tui = psutil.Process(term.pid())
        assert "nanochat-tui" in " ".join(tui.cmdline()) or "tui.app" in " ".join(tui.cmdline())
        tui.send_signal(signal.SIGKILL)
        tui.wait(10)
        term.tmux("kill-session", "-t", "tui1", check=False)

        # -- the run goes on without any TUI
        state = json.loads((run_dir / "state.json").read_text())
        assert state["status"] == "running"
        drv = psutil.Process(state["driver"]["pid"])
        assert drv.is_running() and abs(drv.create_time() - state["driver"]["create_time"]) < 1.0
        assert sv.is_live(run_dir)
        steps_at_kill = base_steps(run_dir)

        def base_train_status():
            return next(s["status"] for s in json.loads((run_dir / "state.json").read_text())["stages"]
                        if s["name"] == "base_train")
        wait_until(lambda: base_steps(run_dir) > steps_at_kill or base_train_status() == "succeeded", 90,
                   "base_train to go on after the TUI was killed")
        out = subprocess.run([sys.executable, "-m", "nanochat.cli", "status", run_dir.name], capture_output=True,
                             text=True, env={**os.environ, **env, "COLUMNS": "200"}, timeout=60, cwd=REPO)
        assert out.returncode == 0 and "running" in out.stdout and "base_train" in out.stdout, out.stdout + out.stderr

        # -- reopen: the run list shows it live; the dashboard rebuilds from disk and keeps advancing
        term.open("tui2")
        term.wait_for(rf"{run_dir.name}.*running", 60, "the live run in the run list")
        term.keys("Enter")
        term.wait_for(r"status running", 30, "the reopened dashboard")
        m = term.wait_for(rf"step\s+(\d+)/{BASE_STEPS}|✓ base_train", 30, "base_train progress after reopening")
        if m.group(1):  # still training: the steps seen are later than before the kill, and they keep coming
            assert int(m.group(1)) >= seen_before
            first = int(m.group(1))

            def later():
                s = term.screen()
                m = re.search(rf"step\s+(\d+)/{BASE_STEPS}", s)
                return "✓ base_train" in s or (m is not None and int(m.group(1)) > first)
            wait_until(later, 90, f"a base_train step after {first} on the reopened dashboard")
        screen = term.screen()
        assert "✓ data" in screen and "✓ tok_train" in screen  # the pipeline, rebuilt from state.json

        # -- the run finishes while we watch
        term.wait_for(r"status succeeded", 300, "the run to succeed")
        screen = term.screen()
        assert "✓ chat_eval_sft" in screen and "▶" not in screen
        assert json.loads((run_dir / "state.json").read_text())["status"] == "succeeded"

        # -- chat with the result (the latest checkpoint: sft)
        term.keys("c")
        # the most trained phase is picked: RL when the profile runs it (the demo does), else SFT
        term.wait_for(r"ready: (rl|sft) step \d+", 90, "the latest chat checkpoint loaded in the chat screen")
        term.wait_focus("message (enter sends)", 20, "the message field")
        prompt = "What is 2 plus 3?"
        term.keys(prompt, literal=True)
        term.keys("Enter")
        m = term.wait_for(r"ready · (\d+) tokens", 120, "the reply to finish")
        assert int(m.group(1)) >= 1
        assert prompt in term.screen()
        term.keys("C-y")  # export the conversation as Markdown
        md = wait_until(lambda: next((run_dir / "chats").glob("*.md"), None) if (run_dir / "chats").is_dir() else None,
                        20, "the exported conversation")
        text = md.read_text()
        assert f"## user\n\n{prompt}" in text and "## assistant" in text
        words = re.findall(r"[A-Za-z]{4,}", text.split("## assistant", 1)[1])
        if words:  # what the model wrote is on the screen too (a word of it: Markdown restyles the rest)
            assert words[0] in term.screen().split(prompt, 1)[1]

        # -- report: preview from the dashboard, export with the default path (the TUI's cwd)
        term.keys("Escape")
        term.wait_for(r"status succeeded", 20, "back on the dashboard")
        term.keys("p")
        term.wait_for(rf"nanochat report: {run_dir.name}", 60, "the report preview")
        term.keys("e")
        term.wait_for(r"Export report\.md to", 20, "the export dialog")
        exported = tmp_path / f"{run_dir.name}-report.md"

        def export():  # Enter again while the dialog is up: a first Enter can beat the dialog's focus
            if not exported.exists() and "Export report.md to" in term.screen():
                term.keys("Enter")
            return exported.exists()
        wait_until(export, 60, "the exported report", every=1.0)
        report = exported.read_text()
        assert report.startswith(f"# nanochat report: {run_dir.name}") and "## base_train" in report
        assert "**succeeded**" in report
        term.wait_for(r"report exported to", 20, "the export notification")

        # -- quitting leaves nothing behind
        term.keys("C-q")
        wait_until(lambda: not term.tmux("list-sessions", check=False).strip(), 20, "the TUI to quit")
        assert not sv.is_live(run_dir)
    finally:
        term.close()
        if run_dir is not None and sv.is_live(run_dir):
            sv.stop_run(run_dir, timeout=5.0)
