"""`nanochat`: the headless command line. Everything the TUI does to a run, for scripts, CI and ssh.

    nanochat run [--profile P] [--set section.key=value]... [--from STAGE] [--wait]
    nanochat plan [--profile P] [--set section.key=value]... [--json]
    nanochat status [RUN]            nanochat stop RUN          nanochat resume RUN [--wait]
    nanochat retry RUN STAGE         nanochat skip RUN STAGE    nanochat logs RUN [STAGE] [--follow]
    nanochat report RUN              nanochat chat ...                nanochat serve ...

RUN is a run id (or a unique prefix of one, or a path, or `latest`). Runs live in <base>/runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nanochat import supervisor as sv
from nanochat.common import die
from nanochat.events import EVENTS_FILE, EventReader, as_float

STATUS_STYLE = {"pending": "dim", "running": "bold cyan", "succeeded": "green", "failed": "bold red",
                "stopped": "yellow", "skipped": "dim", "incomplete": "yellow"}


# ------------------------------------------------------------------------------------ progress

class StageProgress:
    """The latest numbers of one stage, read incrementally from its events."""

    def __init__(self, run_dir: Path, stage: str):
        self.reader = EventReader(run_dir / stage / EVENTS_FILE)
        self.step: dict | None = None
        self.end: dict | None = None

    def update(self) -> "StageProgress":
        for e in self.reader.poll():
            if e["kind"] == "step":
                self.step = e
            elif e["kind"] == "start":
                self.end = None
            elif e["kind"] in ("end", "error"):
                self.end = e
        return self

    def fraction(self) -> float | None:
        s = self.step
        if s and isinstance(s.get("total_steps"), (int, float)) and s["total_steps"] > 0:
            return min(1.0, s["step"] / s["total_steps"])
        return None

    def eta(self, running: bool) -> float | None:
        s = self.step
        if not running or not s or not isinstance(s.get("eta_s"), (int, float)):
            return None
        return max(0.0, s["eta_s"] - (time.time() - s.get("ts", time.time())))


def _num(v, fmt: str) -> str:
    try:
        return format(as_float(v), fmt)
    except (TypeError, ValueError):
        return "-"


def stage_table(run_dir: Path, st: dict, progress: dict[str, StageProgress]):
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from nanochat.report import fmt_duration

    t = Table(title=f"run {st['run_id']} · profile {st.get('profile', '?')} · "
                    f"[{STATUS_STYLE.get(st['status'], '')}]{st['status']}[/]", title_justify="left")
    for col in ("stage", "status", "progress", "step", "loss", "tok/s", "ETA", "time", "note"):
        t.add_column(col, no_wrap=col != "note", justify="right" if col in ("loss", "tok/s", "ETA", "time") else "left")
    for s in st["stages"]:
        p = progress.setdefault(s["name"], StageProgress(run_dir, s["name"])).update()
        running = s["status"] == "running"
        frac = p.fraction()
        bar = ProgressBar(total=1.0, completed=frac or 0.0, width=16) if frac is not None else "-"
        step = p.step or {}
        started, ended = s.get("started"), s.get("ended")
        took = ((ended or time.time()) - started) if started else None
        note = s.get("error") or ""
        if s.get("reattached") and running:
            note = "reattached"
        if s["status"] == "stopped" and not note:
            note = "resume with: nanochat resume " + st["run_id"]
        t.add_row(s["name"], f"[{STATUS_STYLE[s['status']]}]{s['status']}[/]", bar,
                  f"{step.get('step')}/{step.get('total_steps')}" if step else "-",
                  _num(step.get("smooth_loss", step.get("loss")), ".4f"), _num(step.get("tok_per_sec"), ",.0f"),
                  fmt_duration(p.eta(running)) if running else "-", fmt_duration(took) if took else "-", note)
    return t


def runs_table(runs):
    from rich.table import Table
    t = Table(title="runs (nanochat status RUN for one)", title_justify="left")
    for col in ("run", "profile", "status", "stage", "created"):
        t.add_column(col)
    for r in runs:
        t.add_row(r.run_id, r.profile, f"[{STATUS_STYLE.get(r.status, '')}]{r.status}[/]" + (" ●" if r.live else ""),
                  r.current_stage or "-", time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)))
    return t


def follow(run_dir: Path, console) -> int:
    """Show the run until nothing of it is alive; 0 if it succeeded, 1 otherwise."""
    from rich.live import Live
    progress: dict[str, StageProgress] = {}
    try:
        if console.is_terminal:
            with Live(stage_table(run_dir, sv.read_state(run_dir), progress), console=console,
                      refresh_per_second=4) as live:
                while sv.is_live(run_dir):
                    time.sleep(0.5)
                    live.update(stage_table(run_dir, sv.read_state(run_dir), progress))
                live.update(stage_table(run_dir, sv.read_state(run_dir), progress))
        else:  # logs of scripts and CI: one line per change of a stage's status, and the final table
            seen: dict[str, str] = {}
            while True:
                live_now = sv.is_live(run_dir)
                for s in sv.read_state(run_dir)["stages"]:
                    if seen.get(s["name"]) != s["status"]:
                        seen[s["name"]] = s["status"]
                        console.print(f"{time.strftime('%H:%M:%S')} {s['name']}: {s['status']}"
                                      + (f" - {s['error']}" if s.get("error") else ""))
                if not live_now:
                    break
                time.sleep(0.5)
            console.print(stage_table(run_dir, sv.read_state(run_dir), progress))
    except KeyboardInterrupt:
        console.print(f"stopped watching; the run goes on. Stop it with: nanochat stop {run_dir.name}")
        return 130
    st = sv.read_state(run_dir)
    for s in st["stages"]:
        if s["status"] == "failed":
            console.print(f"[bold red]stage {s['name']} failed[/]: {s.get('error')}")
            for line in s.get("traceback") or []:
                console.print(line, markup=False, highlight=False)
            console.print(f"logs: nanochat logs {st['run_id']} {s['name']}")
    return 0 if st["status"] == "succeeded" else 1


# ------------------------------------------------------------------------------------ commands

def _console():
    from rich.console import Console
    return Console()


def cmd_plan(a) -> int:
    import json
    from nanochat.config import load_config
    from nanochat.scaling import check_plan, format_plan, plan
    p = plan(load_config(a.profile, a.overrides))
    print(json.dumps(p, indent=2) if a.json else format_plan(p))
    check_plan(p)  # the plan is shown either way; exit 2 with the one-line reason when a run would be refused
    return 0


def cmd_run(a) -> int:
    from nanochat.config import load_config
    from nanochat.scaling import check_plan, plan
    cfg = load_config(a.profile, a.overrides)
    check_plan(plan(cfg))  # refuse a run whose data cannot cover its horizon, before anything starts
    names = [s["name"] for s in sv.parse_stages(cfg["run"]["stages"])]
    if a.from_stage and a.from_stage not in names:
        die(f"--from {a.from_stage!r} is not a stage of this run; stages: {', '.join(names)}")
    run_dir = sv.create_run(a.profile, a.overrides)
    pid = sv.start_run(run_dir, from_stage=a.from_stage)
    print(f"run {run_dir.name} started (supervisor pid {pid}): {run_dir}")
    if not a.wait:
        print(f"watch: nanochat status {run_dir.name}   stop: nanochat stop {run_dir.name}")
        return 0
    return follow(run_dir, _console())


def cmd_status(a) -> int:
    console = _console()
    for d in sv.reattach_orphans():
        console.print(f"[yellow]run {d.name} had lost its supervisor; a new one reattached to it[/]")
    if a.run is None:
        runs = sv.list_runs()
        if not runs:
            console.print("no runs yet; start one with: nanochat run --profile demo")
            return 0
        console.print(runs_table(runs))
        return 0
    run_dir = sv.resolve_run(a.run)
    console.print(stage_table(run_dir, sv.read_state(run_dir), {}))
    return 0


def cmd_stop(a) -> int:
    run_dir = sv.resolve_run(a.run)
    if not sv.is_live(run_dir):
        print(f"run {run_dir.name} is not running ({sv.read_state(run_dir)['status']})")
        return 0
    print(f"stopping run {run_dir.name} (the running stage checkpoints; SIGKILL after {a.timeout:g}s)...")
    sv.stop_run(run_dir, timeout=a.timeout)
    print(f"stopped; continue with: nanochat resume {run_dir.name}")
    return 0


def cmd_resume(a) -> int:
    run_dir = sv.resolve_run(a.run)
    pid = sv.resume_run(run_dir)
    print(f"run {run_dir.name} resumed (supervisor pid {pid})")
    return follow(run_dir, _console()) if a.wait else 0


def cmd_retry(a) -> int:
    run_dir = sv.resolve_run(a.run)
    pid = sv.retry_stage(run_dir, a.stage)
    print(f"stage {a.stage} will run again from scratch" + (f" (supervisor pid {pid})" if pid else ""))
    return follow(run_dir, _console()) if a.wait else 0


def cmd_skip(a) -> int:
    run_dir = sv.resolve_run(a.run)
    sv.skip_stage(run_dir, a.stage)
    print(f"stage {a.stage} skipped" + ("" if sv.is_live(run_dir) else f"; continue with: nanochat resume {run_dir.name}"))
    return 0


def _log_files(run_dir: Path, stage: str) -> list[Path]:
    if stage == "supervisor":
        return [run_dir / sv.DRIVER_LOG]
    return [run_dir / stage / "stdout.log", run_dir / stage / "stderr.log"]


def cmd_logs(a) -> int:
    run_dir = sv.resolve_run(a.run)
    st = sv.read_state(run_dir)
    names = [s["name"] for s in st["stages"]]
    stage = a.stage
    if stage is None:  # the running stage, else the last one that ran
        ran = [s for s in st["stages"] if s["status"] == "running"] or [s for s in st["stages"] if s.get("started")]
        stage = ran[-1]["name"] if ran else "supervisor"
    elif stage not in names and stage != "supervisor":
        die(f"run {run_dir.name} has no stage {stage!r}; stages: {', '.join(names)}, supervisor")
    files = _log_files(run_dir, stage)
    offsets = {}
    for f in files:
        text = f.read_text(errors="replace") if f.exists() else ""
        lines = text.splitlines()[-a.lines:] if a.lines else text.splitlines()
        if len(files) > 1:
            print(f"==> {f.relative_to(run_dir)} <==")
        print("\n".join(lines))
        offsets[f] = len(text.encode())
    if not a.follow:
        return 0
    try:
        while True:
            for f in files:
                if f.exists() and f.stat().st_size > offsets[f]:
                    with open(f, "rb") as fh:
                        fh.seek(offsets[f])
                        chunk = fh.read()
                    offsets[f] += len(chunk)
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
            s = next((s for s in sv.read_state(run_dir)["stages"] if s["name"] == stage), None)
            if not sv.is_live(run_dir) and (s is None or s["status"] != "running"):
                return 0
            time.sleep(0.3)
    except KeyboardInterrupt:
        return 130


def cmd_report(a) -> int:
    from nanochat.report import write_report
    path = write_report(sv.resolve_run(a.run))
    if a.print:
        print(path.read_text())
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanochat", description="train your own ChatGPT-like model, from the terminal")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="start a new run in the background")
    r.add_argument("--profile", default=None, help="a profile of nanochat.toml: demo, cpu, speedrun, d26, d32, ... (default: its [defaults])")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    r.add_argument("--from", dest="from_stage", default=None, metavar="STAGE", help="skip the stages before STAGE")
    r.add_argument("--wait", action="store_true", help="follow in the foreground; exit 1 if a stage fails")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("plan", help="what a run would do: model, tokens, batch, steps, data, time and cost")
    s.add_argument("--profile", default=None, help="as for run")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    s.add_argument("--json", action="store_true", help="machine-readable, for scripts")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("status", help="the runs, or one run's stages")
    s.add_argument("run", nargs="?", default=None)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("stop", help="stop a run (the stage checkpoints first)")
    s.add_argument("run")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds before SIGKILL (default 30)")
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("resume", help="continue a stopped or failed run from its checkpoints")
    s.add_argument("run")
    s.add_argument("--wait", action="store_true")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("retry", help="run one stage again from scratch")
    s.add_argument("run")
    s.add_argument("stage")
    s.add_argument("--wait", action="store_true")
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser("skip", help="skip a pending, failed or stopped stage")
    s.add_argument("run")
    s.add_argument("stage")
    s.set_defaults(func=cmd_skip)

    s = sub.add_parser("logs", help="a stage's stdout and stderr (or the supervisor's log)")
    s.add_argument("run")
    s.add_argument("stage", nargs="?", default=None)
    s.add_argument("-f", "--follow", action="store_true", help="keep printing while the stage runs")
    s.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines of each file")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("report", help="write report.md for a run")
    s.add_argument("run")
    s.add_argument("--print", action="store_true", help="also print it")
    s.set_defaults(func=cmd_report)

    sub.add_parser("chat", help="talk to a trained model (nanochat chat --help)", add_help=False)
    sub.add_parser("serve", help="web chat + OpenAI-compatible API (nanochat serve --help)", add_help=False)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "chat":  # its own parser, in its own module; imported only when used
        from nanochat.chat_cli import main as chat_main
        return chat_main(argv[1:]) or 0
    if argv and argv[0] == "serve":
        from nanochat.serve import main as serve_main
        return serve_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    from nanochat.config import ConfigError
    try:
        return args.func(args) or 0
    except (sv.SupervisorError, ConfigError) as e:
        die(str(e))


if __name__ == "__main__":
    sys.exit(main())
