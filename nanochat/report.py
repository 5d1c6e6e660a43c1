"""report.md: the report card of a run, built only from what the run wrote down.

Inputs: `<run_dir>/<stage>/events.jsonl` (docs/events.md), `state.json` (stage plan, statuses, errors,
and the machine snapshot the driver took: `system_info()`), `config.toml` (price override).
Nothing is re-measured at report time, so a report can be rebuilt anywhere, any time, for a
finished, failed or still running run. Which event fields are read: docs/supervisor.md.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from nanochat.checkpoint import PHASES
from nanochat.common import atomic_write
from nanochat.events import EVENTS_FILE, as_float, read_events

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORT_FILE = "report.md"

# Approximate on-demand cloud price per GPU-hour in USD (2025), matched by substring of the GPU
# name, first match wins (so "H200" before "H100", "A100" before "A10"). `run.gpu_hourly_usd >= 0`
# in the config overrides it. Only used for the report's cost line.
GPU_HOURLY_USD = [("GH200", 3.50), ("H200", 3.80), ("H100", 3.00), ("B200", 5.50), ("A100", 1.80),
                  ("L40S", 1.00), ("A10", 0.75), ("L40", 0.90), ("L4", 0.60), ("RTX 4090", 0.40),
                  ("RTX 3090", 0.25), ("V100", 0.50), ("T4", 0.35)]

SUMMARY_ROWS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE"]
CODE_EXTS = {".py", ".rs", ".toml", ".tcss", ".md", ".sh", ".yml", ".yaml", ".txt", ".cfg"}

# end-event (or base_train's `log derived`) fields shown as labelled facts, in this order
FACTS = [("vocab_size", "Vocabulary size", "int"), ("num_params", "Parameters", "int"),
         ("depth", "Depth", "int"), ("tokens", "Training tokens", "int"),
         ("flops_per_token", "FLOPs per token", "sci"), ("total_flops", "Training FLOPs", "sci"),
         ("total_batch_size", "Batch size (tokens)", "int"), ("num_iterations", "Iterations", "int"),
         ("steps_done", "Steps done", "int"), ("mfu", "MFU", "pct"), ("min_val_bpb", "Min validation bpb", "f4"),
         ("final_val_bpb", "Final validation bpb", "f4"), ("train_time_s", "Training time", "dur")]


# ------------------------------------------------------------------------------------ the machine

def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
        return r.stdout if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_info(repo: Path = REPO_ROOT) -> dict | None:
    commit = _run(["git", "rev-parse", "HEAD"], repo)
    if not commit:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo)
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo)
    return {"commit": commit.strip(), "dirty": bool(dirty and dirty.strip()),
            "branch": branch.strip() if branch else None}


def code_size(repo: Path = REPO_ROOT) -> dict:
    """Files and lines of the checkout's source (tracked files when it is a git checkout)."""
    listed = _run(["git", "ls-files"], repo)
    if listed:
        files = [repo / f for f in listed.splitlines()]
    else:
        files = [p for d in ("nanochat", "stages", "tui", "rustbpe", "tests") for p in (repo / d).rglob("*")]
    by_ext: dict[str, list[int]] = {}
    for f in files:
        if f.suffix not in CODE_EXTS or not f.is_file():
            continue
        try:
            n = f.read_bytes().count(b"\n")
        except OSError:
            continue
        e = by_ext.setdefault(f.suffix.lstrip("."), [0, 0])
        e[0] += 1
        e[1] += n
    return {"files": sum(v[0] for v in by_ext.values()), "lines": sum(v[1] for v in by_ext.values()),
            "by_ext": {k: {"files": v[0], "lines": v[1]} for k, v in sorted(by_ext.items())}}


def _torch_cuda_build() -> str | None:
    """torch's CUDA build version, read from torch/version.py: importing torch costs seconds."""
    spec = importlib.util.find_spec("torch")
    if not spec or not spec.origin:
        return None
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"^cuda(?::[^=]*)?=\s*'([^']*)'", text, re.M)
    return m.group(1) if m else None


def _gpus() -> tuple[list[dict], str | None, str | None]:
    """[{name, memory_bytes}], NVIDIA driver version, CUDA version the driver supports."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                gpus.append({"name": name.decode() if isinstance(name, bytes) else name,
                             "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)})
            drv = pynvml.nvmlSystemGetDriverVersion()
            cuda = pynvml.nvmlSystemGetCudaDriverVersion()
            return gpus, drv.decode() if isinstance(drv, bytes) else drv, f"{cuda // 1000}.{cuda % 1000 // 10}"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver, no GPU: all mean "not from NVML"
        pass
    if not Path("/proc/driver/nvidia").exists():
        return [], None, None
    try:  # a driver without a loadable NVML: ask torch (slow import, but only on such machines)
        import torch
        gpus = [{"name": torch.cuda.get_device_name(i), "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                for i in range(torch.cuda.device_count())]
        return gpus, None, None
    except Exception:
        return [], None, None


def _pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def system_info() -> dict:
    """Snapshot of the machine and the code, taken by the driver when it starts driving a run."""
    gpus, driver, cuda_driver = _gpus()
    return {"captured": round(time.time(), 3), "host": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": _pkg_version("torch"), "torch_cuda": _torch_cuda_build(),
            "cpus": os.cpu_count(), "cpus_physical": psutil.cpu_count(logical=False),
            "ram_bytes": psutil.virtual_memory().total, "gpus": gpus, "nvidia_driver": driver,
            "cuda_driver": cuda_driver, "git": git_info(), "code": code_size()}


def gpu_hourly_rate(gpu_name: str) -> float | None:
    up = gpu_name.upper()
    return next((rate for key, rate in GPU_HOURLY_USD if key in up), None)


# ------------------------------------------------------------------------------------ the events

@dataclass
class StageData:
    """What the report needs from one stage's events."""
    name: str
    events: list = field(default_factory=list)
    malformed: int = 0

    def kind(self, k: str) -> list[dict]:
        return [e for e in self.events if e.get("kind") == k]

    def last(self, k: str) -> dict | None:
        evs = self.kind(k)
        return evs[-1] if evs else None

    @property
    def seconds(self) -> float:
        """Time the stage ran: each `start` opens an attempt that lasts until its last event."""
        total, t0, t1 = 0.0, None, None
        for e in self.events:
            ts = e.get("ts")
            if not isinstance(ts, (int, float)):
                continue
            if e.get("kind") == "start":
                if t0 is not None:
                    total += t1 - t0
                t0 = ts
            elif t0 is None:
                t0 = ts
            t1 = ts
        return total + (t1 - t0 if t0 is not None else 0.0)

    def summary(self) -> dict:
        """The stage's summary: its last `end`, completed by base_train's `log derived` (partial runs)."""
        out = {}
        derived = next((e for e in reversed(self.kind("log")) if e.get("message") == "derived"), None)
        if derived:
            out.update(derived)
        end = self.last("end")
        if end and end["ts"] >= max((e.get("ts", 0) for e in self.kind("start")), default=0):
            out.update(end)
        return out


def phase_of(ev: dict, stage: str) -> str | None:
    """An eval's phase: its `phase` field, else guessed from the stage name (base_eval -> base)."""
    if ev.get("phase") in PHASES:
        return ev["phase"]
    parts = re.split(r"[_\-.]", stage.lower())
    for p in reversed(parts):
        if p in PHASES:
            return p
    return "sft" if "sft" in parts else ("mid" if "mid" in stage else None)


def _norm(task: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(task).lower())


def summary_table(stages: list[StageData]) -> dict[str, dict[str, float]]:
    """{row: {phase: value}} for the summary rows; the last event wins."""
    rows = {_norm(r): r for r in SUMMARY_ROWS}
    out: dict[str, dict[str, float]] = {r: {} for r in SUMMARY_ROWS}
    for sd in stages:
        # per-task CORE scores (in the stage that writes the CORE aggregate) are not the chat evals of
        # the same name (arc_easy vs ARC-Easy); chat evals write `centered` too, so the aggregate decides
        evals = sd.kind("eval")
        core_tasks = {e.get("task") for e in evals if e.get("task") != "CORE"} \
            if any(e.get("task") == "CORE" for e in evals) else set()
        for e in sd.kind("eval"):
            if e.get("task") in core_tasks:
                continue
            row = rows.get(_norm(e.get("task", "")))
            ph = phase_of(e, sd.name)
            if row is None or ph is None:
                continue
            metric = e.get("metric")
            if row == "CORE" and metric != "core":
                continue  # per-task CORE numbers live in the base_eval section
            if row not in ("CORE", "ChatCORE") and metric not in ("acc", None):
                continue
            try:
                out[row][ph] = as_float(e["value"])
            except (KeyError, TypeError, ValueError):
                continue
    return out


# ------------------------------------------------------------------------------------ formatting

def fmt_duration(s: float | None) -> str:
    """4s, 3m05s, 2h07m, 1d03h; '-' for unknown (None, NaN, negative). Shared with the CLI and the TUI."""
    if s is None or not math.isfinite(s) or s < 0:
        return "-"
    s = int(s)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _fmt(v, how: str) -> str:
    try:
        if v is None or v == "":
            return "-"
        if how == "int":
            return f"{int(v):,}"
        x = as_float(v)
        return {"sci": f"{x:.3e}", "pct": f"{100 * x:.2f}%", "f4": f"{x:.4f}", "dur": fmt_duration(x)}.get(how, str(v))
    except (TypeError, ValueError):
        return str(v)


def fmt_value(v) -> str:
    try:
        return f"{as_float(v):.4f}"
    except (TypeError, ValueError):
        return str(v)


def _gib(b) -> str:
    return f"{b / 2**30:.1f} GiB" if isinstance(b, (int, float)) else "?"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


# ------------------------------------------------------------------------------------ the report

def _load(run_dir: Path):
    import json
    import tomllib
    try:
        state = json.loads((run_dir / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        state = {"run_id": run_dir.name, "stages": []}
    try:
        config = tomllib.loads((run_dir / "config.toml").read_text())
    except (FileNotFoundError, ValueError):
        config = {}
    names = [s["name"] for s in state.get("stages", [])]
    names += sorted(p.parent.name for p in run_dir.glob(f"*/{EVENTS_FILE}") if p.parent.name not in names)
    stages = []
    for n in names:
        evs, bad = read_events(run_dir / n / EVENTS_FILE)
        stages.append(StageData(n, evs, bad))
    return state, config, stages


def _header(run_dir: Path, state: dict, config: dict, stages: list[StageData]) -> tuple[list[str], float | None]:
    sysi = state.get("system")
    note = ""
    if not sysi:
        sysi, note = system_info(), " (the run never recorded its machine: this is the machine of the report)"
    tss = [e["ts"] for sd in stages for e in sd.events if isinstance(e.get("ts"), (int, float))]
    wall = (max(tss) - min(tss)) if tss else None
    L = [f"# nanochat report: {state.get('run_id', run_dir.name)}", ""]
    L.append(f"Profile `{state.get('profile', config.get('meta', {}).get('profile', '?'))}` · status "
             f"**{state.get('status', '?')}** · report generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    if tss:
        L.append(f"Run started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(min(tss)))}, last event "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(max(tss)))}")
    L += ["", "## Environment" + note, ""]
    g = sysi.get("git")
    L.append(f"- Git: commit `{g['commit'][:12]}`" + (" (dirty: uncommitted changes)" if g["dirty"] else " (clean)")
             + (f", branch `{g['branch']}`" if g.get("branch") else "") if g else "- Git: not a git checkout")
    L.append(f"- Host: {sysi.get('host', '?')} ({sysi.get('platform', '?')})")
    L.append(f"- CPUs: {sysi.get('cpus', '?')} logical ({sysi.get('cpus_physical') or '?'} physical); "
             f"RAM: {_gib(sysi.get('ram_bytes'))}")
    gpus = sysi.get("gpus") or []
    if gpus:
        names = sorted({g["name"] for g in gpus})
        L.append(f"- GPUs: {len(gpus)} × " + ", ".join(names) + f" ({_gib(gpus[0].get('memory_bytes'))} each)")
    else:
        L.append("- GPUs: none")
    L.append(f"- Software: Python {sysi.get('python', '?')}, torch {sysi.get('torch') or 'not installed'}, "
             f"CUDA (torch build) {sysi.get('torch_cuda') or '-'}, NVIDIA driver {sysi.get('nvidia_driver') or '-'} "
             f"(CUDA {sysi.get('cuda_driver') or '-'})")
    code = sysi.get("code") or {}
    if code:
        per = ", ".join(f"{k}: {v['files']} files / {v['lines']:,} lines" for k, v in code.get("by_ext", {}).items())
        L.append(f"- Code: {code.get('files', 0)} files, {code.get('lines', 0):,} lines ({per})")
    L += _cost(config, sysi, wall)
    return L, wall


def _cost(config: dict, sysi: dict, wall: float | None) -> list[str]:
    run = config.get("run", {})
    gpus = sysi.get("gpus") or []
    nnodes = int(run.get("nnodes", 1) or 1)
    hours = (wall or 0.0) / 3600
    override = run.get("gpu_hourly_usd", -1)
    if not gpus:
        return [f"- Cost: $0.00 (CPU only, no GPU time; wall-clock {fmt_duration(wall)})"]
    n = len(gpus) * nnodes
    if isinstance(override, (int, float)) and override >= 0:
        rate, src = float(override), "run.gpu_hourly_usd"
    else:
        rate, src = gpu_hourly_rate(gpus[0]["name"]), f"typical {gpus[0]['name']} price"
    if rate is None:
        return [f"- Cost: unknown (no price for {gpus[0]['name']}; set run.gpu_hourly_usd)"]
    return [f"- Cost: ${rate * n * hours:,.2f} = {n} GPUs × ${rate:.2f}/GPU-hour ({src}) × {hours:.2f} h wall-clock"]


def _stage_section(sd: StageData, st: dict | None) -> list[str]:
    status = st["status"] if st else ("run" if sd.events else "not run")
    L = [f"## {sd.name}", ""]
    if not sd.events and status in ("pending", "not run", "skipped"):
        return L + [f"_{'skipped' if status == 'skipped' else 'not run'}_", ""]
    attempts = len(sd.kind("start"))
    L.append(f"Status: **{status}** · time {fmt_duration(sd.seconds)}"
             + (f" · {attempts} attempts (resumed)" if attempts > 1 else ""))
    L.append("")
    summ = sd.summary()
    facts = [f"- {label}: {_fmt(summ[k], how)}" for k, label, how in FACTS if k in summ and summ[k] is not None]
    steps = sd.kind("step")
    if steps:
        first, last = steps[0], steps[-1]
        facts.append(f"- Steps: {last.get('step')}/{last.get('total_steps')}, loss {fmt_value(first.get('loss'))}"
                     f" → {fmt_value(last.get('smooth_loss', last.get('loss')))}")
        tps = [as_float(e["tok_per_sec"]) for e in steps if isinstance(e.get("tok_per_sec"), (int, float))]
        if tps:
            facts.append(f"- Throughput: {sum(tps) / len(tps):,.0f} tok/s (mean)")
        rewards = [e["reward"] for e in steps if isinstance(e.get("reward"), (int, float))]
        if rewards:
            facts.append(f"- Reward: {rewards[0]:.4f} → {rewards[-1]:.4f}")
    ck = sd.last("checkpoint")
    if ck:
        facts.append(f"- Last checkpoint: step {ck.get('step')}")
    if sd.malformed:
        facts.append(f"- {sd.malformed} malformed event line(s) skipped")
    L += facts + ([""] if facts else [])
    L += _evals(sd)
    # only the latest attempt's failure matters: a stage that failed, then resumed and succeeded, is fine
    err, start = sd.last("error"), sd.last("start")
    if err and start and err.get("ts", 0) < start.get("ts", 0):
        err = None
    failed = bool(st and st.get("status") == "failed")
    if failed or err:
        msg = (st.get("error") if failed else None) or (f"{err.get('exc_type')}: {err.get('message')}" if err else "")
        tb = (st.get("traceback") if failed else None) or \
            (str(err.get("traceback", "")).splitlines()[-20:] if err else [])
        if msg or tb:
            L += [f"**Error:** {msg}", ""]
            if tb:
                L += ["```", *tb, "```", ""]
    return L


def _evals(sd: StageData) -> list[str]:
    evs = sd.kind("eval")
    if not evs:
        return []
    if sd.name.startswith("base_eval") or any(e.get("metric") == "centered" for e in evs):
        # CORE: one row per task with its accuracy and centered score
        tasks: dict[str, dict] = {}
        for e in evs:
            tasks.setdefault(str(e.get("task")), {})[e.get("metric")] = e.get("value")
        rows = [[t, fmt_value(m.get("acc", "-")), fmt_value(m.get("centered", "-"))]
                for t, m in tasks.items() if "core" not in m and t != "val"]
        out = []
        if rows:
            out += _table(["Task", "Accuracy", "Centered"], rows) + [""]
        rest = [e for e in evs if e.get("metric") not in ("acc", "centered")]
        if rest:
            out += _table(["Eval", "Metric", "Value"],
                          [[e.get("task"), e.get("metric"), fmt_value(e.get("value"))] for e in rest]) + [""]
        return out
    last: dict[tuple, dict] = {}
    for e in evs:  # one row per (task, metric, text), the last value; bpb curves keep their last point
        last[(e.get("task"), e.get("metric"), e.get("text"))] = e
    rows = [[t + (f" ({x})" if x else ""), m, fmt_value(e.get("value")) + (f" @ step {e['step']}" if e.get("step") else "")]
            for (t, m, x), e in last.items()]
    return _table(["Eval", "Metric", "Value"], rows) + [""]


def build_report(run_dir) -> str:
    run_dir = Path(run_dir)
    state, config, stages = _load(run_dir)
    by_name = {s["name"]: s for s in state.get("stages", [])}
    L, wall = _header(run_dir, state, config, stages)
    L += ["", "## Summary", ""]
    table = summary_table(stages)
    L += _table(["Metric", *(p.upper() for p in PHASES)],
                [[row, *(fmt_value(table[row][p]) if p in table[row] else "-" for p in PHASES)] for row in SUMMARY_ROWS])
    L += ["", f"Total wall-clock time: {fmt_duration(wall)}", ""]
    for sd in stages:
        L += _stage_section(sd, by_name.get(sd.name))
    return "\n".join(L).rstrip() + "\n"


def write_report(run_dir) -> Path:
    """Build `<run_dir>/report.md` (atomically) and return its path."""
    path = Path(run_dir) / REPORT_FILE
    atomic_write(path, build_report(run_dir))
    return path


if __name__ == "__main__":
    for d in sys.argv[1:] or ["."]:
        print(write_report(d))
