"""report.md: the report card of a run, built only from what the run wrote down.

Inputs: `<run_dir>/<stage>/events.jsonl` (docs/events.md), `state.json` (stage plan, statuses, errors,
and the machine snapshot the driver took: nanochat.system.system_info), `config.toml` (price override).
Nothing is re-measured at report time, so a report can be rebuilt anywhere, any time, for a
finished, failed or still running run. The driver writes it when a run ends (succeeded, failed or
stopped); `nanochat report` and the TUI's export call the same `write_report`.

The summary table has the seed's rows (CORE, ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval,
SpellingBee, ChatCORE) and one column per checkpoint phase, read from each eval event's `phase`.
Every aggregate (CORE, ChatCORE) and every bpb says whether it is complete or partial, and what is missing.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.checkpoint import PHASES
from nanochat.common import atomic_write
from nanochat.events import EVENTS_FILE, as_float, read_events
from nanochat.system import hourly_rate, run_cost, system_info

REPORT_FILE = "report.md"
SUMMARY_ROWS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
AGGREGATES = {"CORE": "core", "ChatCORE": "chatcore"}  # row -> the metric its aggregate event carries

# end-event (or base_train's `log derived`) fields shown as labelled facts, in this order
FACTS = [("vocab_size", "Vocabulary size", "int"), ("num_params", "Parameters", "int"),
         ("depth", "Depth", "int"), ("tokens", "Training tokens", "int"),
         ("flops_per_token", "FLOPs per token", "sci"), ("total_flops", "Training FLOPs", "sci"),
         ("total_batch_size", "Batch size (tokens)", "int"), ("num_iterations", "Iterations", "int"),
         ("steps_done", "Steps done", "int"), ("mfu", "MFU", "pct"), ("min_val_bpb", "Min validation bpb", "f4"),
         ("final_val_bpb", "Final validation bpb", "f4"), ("train_time_s", "Training time", "dur")]


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
    def spans(self) -> list[tuple[float, float]]:
        """(first, last) event time of each attempt: each `start` opens one."""
        out = []
        for e in self.events:
            ts = e.get("ts")
            if not isinstance(ts, (int, float)):
                continue
            if e.get("kind") == "start" or not out:
                out.append((ts, ts))
            else:
                out[-1] = (out[-1][0], ts)
        return out

    @property
    def seconds(self) -> float:
        return sum(b - a for a, b in self.spans)

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


def summary_table(stages: list[StageData]) -> dict[str, dict[str, dict]]:
    """{row: {phase: the eval event}}: the accuracy of a chat task, the aggregate event of CORE/ChatCORE;
    the last event wins. The phase is the event's own (an event without one is not a phase's score)."""
    out: dict[str, dict[str, dict]] = {r: {} for r in SUMMARY_ROWS}
    for sd in stages:
        for e in sd.kind("eval"):
            row, ph = e.get("task"), e.get("phase")
            if row in out and ph in PHASES and e.get("metric") == AGGREGATES.get(row, "acc"):
                out[row][ph] = e
    return out


def completeness(e: dict) -> str:
    """'complete', or 'partial: ...' naming what is missing, of an aggregate (or bpb) event."""
    if e.get("metric") == "bpb":
        if not e.get("partial"):
            return f"complete ({_fmt(e.get('tokens'), 'int')} tokens)"
        return f"partial: {_fmt(e.get('tokens'), 'int')} of the {_fmt(e.get('tokens_requested'), 'int')} tokens asked " \
               "(the split ran out)"
    missing, n = e.get("missing") or [], e.get("n")
    of = f"{n} of {n + len(missing)} tasks" if isinstance(n, int) else "? tasks"
    return f"partial: {of}, missing {', '.join(missing) or '?'}" if e.get("partial") else f"complete ({of})"


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

def _load(run_dir: Path, state: dict | None = None):
    import json
    import tomllib
    try:
        state = state or json.loads((run_dir / "state.json").read_text())
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
    L += _cost(config, sysi, [span for sd in stages for span in sd.spans])
    return L, wall


def _cost(config: dict, sysi: dict, spans: list[tuple[float, float]]) -> list[str]:
    """GPU-hours of the stages that ran (the union of their attempts) x the rate, and where the rate is from."""
    run = config.get("run", {})
    gpus = sysi.get("gpus") or []
    if not gpus or run.get("device") == "cpu":
        return [f"- Cost: $0.00 (CPU only, no GPU time; stages ran {fmt_duration(run_cost(spans, 0, 0.0)[0])})"]
    n = int(run.get("nproc_per_node", len(gpus)) or len(gpus)) * int(run.get("nnodes", 1) or 1)
    rate, source = hourly_rate(config, gpus[0]["name"])
    if rate is None:
        return [f"- Cost: unknown ({source})"]
    seconds, usd = run_cost(spans, n, rate)
    return [f"- Cost: ${usd:,.2f} = {n * seconds / 3600:.2f} GPU-hours ({n} GPUs × {seconds / 3600:.2f} h of stages "
            f"running) × ${rate:.2f}/GPU-hour ({source})"]


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
    facts += [f"- Skipped: {e.get('message')}" for e in sd.kind("log") if e.get("skipped")]
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


def _note(e: dict) -> str:
    """What to know about one eval value: partial or complete (aggregates, bpb), its data, cropping."""
    notes = []
    if e.get("metric") in AGGREGATES.values() or e.get("metric") == "bpb" and "tokens" in e:
        notes.append(completeness(e))
    if e.get("source"):
        notes.append(str(e["source"]))
    if e.get("cropped"):
        notes.append(f"{e['cropped']} example(s) cropped to the model's context")
    if e.get("isolation") == "reduced":
        notes.append("model code ran with REDUCED sandbox isolation (sandbox.allow_reduced_isolation)")
    return "; ".join(notes)


def _evals(sd: StageData) -> list[str]:
    evs = sd.kind("eval")
    if not evs:
        return []
    out = []
    if any(e.get("metric") == "centered" for e in evs):
        # per-task accuracy with its centred score, its data source and any cropping, one row per task
        tasks: dict[str, dict] = {}
        for e in evs:
            if e.get("metric") in ("acc", "centered"):
                tasks.setdefault(str(e.get("task")), {})[e["metric"]] = e
        rows = [[t, fmt_value(m["acc"]["value"]) if "acc" in m else "-",
                 fmt_value(m["centered"]["value"]) if "centered" in m else "-", _note(m.get("acc", {}))]
                for t, m in tasks.items()]
        out += _table(["Task", "Accuracy", "Centered", "Notes"], rows) + [""]
        evs = [e for e in evs if e.get("metric") not in ("acc", "centered")]
    last: dict[tuple, dict] = {}
    for e in evs:  # one row per (task, metric, text), the last value; bpb curves keep their last point
        last[(e.get("task"), e.get("metric"), e.get("text"))] = e
    rows = [[t + (f" ({x})" if x else ""), m, fmt_value(e.get("value")) + (f" @ step {e['step']}" if e.get("step") else ""),
             _note(e)] for (t, m, x), e in last.items()]
    return out + (_table(["Eval", "Metric", "Value", "Notes"], rows) + [""] if rows else [])


def summary_section(stages: list[StageData]) -> list[str]:
    """The seed's table (rows x phases), then one line per aggregate saying complete or partial."""
    table = summary_table(stages)

    def cell(e: dict | None) -> str:
        return "-" if e is None else fmt_value(e["value"]) + (" (partial)" if e.get("partial") else "")
    L = _table(["Metric", *(p.upper() for p in PHASES)],
               [[row, *(cell(table[row].get(p)) for p in PHASES)] for row in SUMMARY_ROWS])
    flags = [f"- {row} {p.upper()}: {completeness(table[row][p])}" for row in AGGREGATES for p in PHASES
             if p in table[row]]
    return L + (["", *flags] if flags else [])


def build_report(run_dir, state: dict | None = None) -> str:
    """The markdown of report.md; `state` is the run's state.json unless given (the driver's, as it exits)."""
    run_dir = Path(run_dir)
    state, config, stages = _load(run_dir, state)
    by_name = {s["name"]: s for s in state.get("stages", [])}
    L, wall = _header(run_dir, state, config, stages)
    L += ["", "## Summary", ""] + summary_section(stages)
    L += ["", f"Total wall-clock time: {fmt_duration(wall)}", ""]
    for sd in stages:
        L += _stage_section(sd, by_name.get(sd.name))
    return "\n".join(L).rstrip() + "\n"


def write_report(run_dir, state: dict | None = None) -> Path:
    """Build `<run_dir>/report.md` (atomically) and return its path: the driver, `nanochat report` and the
    TUI's export all call this."""
    path = Path(run_dir) / REPORT_FILE
    atomic_write(path, build_report(run_dir, state))
    return path


if __name__ == "__main__":
    for d in sys.argv[1:] or ["."]:
        print(write_report(d))
