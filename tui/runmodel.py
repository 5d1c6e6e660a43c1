"""What the TUI knows about one run, rebuilt purely from its directory (config.toml, state.json, events).

No Textual here: a `RunModel` is fed batches of events (`ingest`) and answers questions about them, so the
dashboard can be reopened at any time and rebuild every panel from the files on disk.
"""
from __future__ import annotations

import gc
import json
import math
import threading
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from nanochat import supervisor
from nanochat.events import MAX_LINE_BYTES, EventReader, check_event, parse_line, stage_event_files

def fnum(x) -> float:
    """Event floats: NaN/inf arrive as strings ("nan"); anything unparsable is NaN."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- state.json

@dataclass
class StageState:
    name: str
    status: str = "pending"
    exit_code: int | None = None
    traceback: str = ""
    error: str = ""            # one line, e.g. "ValueError: boom (exit code 1)"
    started: float | None = None
    ended: float | None = None


def read_state(run_dir: Path) -> dict:
    """A run's state.json as the screens use it (`state_view`), read by nanochat.supervisor; a directory
    without a readable state has status "unknown" and no stages."""
    try:
        return state_view(supervisor.read_state(run_dir))
    except supervisor.SupervisorError:
        return {"status": "unknown", "profile": "", "created": None, "stages": [], "raw": {}}


def state_view(raw: dict) -> dict:
    """{"status", "profile", "created", "stages": [StageState], "raw"} of the supervisor's state, with the
    status word supervisor.run_status gives (the one `nanochat status` prints)."""
    stages = [StageState(name=s["name"], status=s["status"], exit_code=s.get("exit_code"),
                         traceback="\n".join(map(str, s.get("traceback") or [])), error=str(s.get("error") or ""),
                         started=s.get("started"), ended=s.get("ended")) for s in raw["stages"]]
    return {"status": supervisor.run_status(raw), "profile": raw.get("profile", ""), "created": raw.get("created"),
            "stages": stages, "raw": raw}


def read_config(run_dir: Path) -> dict:
    try:
        return tomllib.loads((Path(run_dir) / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


# ----------------------------------------------------------------------------- series

class Series:
    """An append-only (x, y) curve. Keeps the full history; plots downsample it to their width."""

    __slots__ = ("name", "xs", "ys")

    def __init__(self, name: str):
        self.name = name
        self.xs: list[float] = []
        self.ys: list[float] = []

    def add(self, x: float, y: float):
        self.xs.append(x)
        self.ys.append(y)

    def __len__(self):
        return len(self.xs)


@dataclass
class StageInfo:
    name: str
    started: float | None = None
    ended: float | None = None
    end_status: str | None = None
    error: dict | None = None
    last_ts: float | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tok_per_sec: float | None = None
    mfu: float | None = None
    tokens: int | None = None
    eta_s: float | None = None
    lrm: float | None = None
    dt: float | None = None
    events: int = 0


@dataclass
class RunModel:
    """Everything the dashboard shows, derived from events. `ingest` is cheap: O(events)."""
    run_dir: Path
    stages: dict[str, StageInfo] = field(default_factory=dict)
    loss: dict[str, Series] = field(default_factory=dict)          # per training stage
    val_bpb: dict[str, Series] = field(default_factory=dict)
    evals: dict[tuple[str, str, str], tuple[float, int | None]] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    config_events: dict[str, dict] = field(default_factory=dict)
    n_events: int = 0
    last_event_ts: float | None = None
    last_seq: dict[str, int] = field(default_factory=dict)  # per stage: last step seen (order check)
    out_of_order: int = 0
    malformed: int = 0     # events skipped because a field had the wrong type (events.check_event)

    def stage(self, name: str) -> StageInfo:
        st = self.stages.get(name)
        if st is None:
            st = self.stages[name] = StageInfo(name)
        return st

    def ingest(self, events: list[dict], checked: bool = False) -> list[dict]:
        """Apply a batch; returns the step events whose loss is not finite or spikes (for alerts).
        Events that fail events.check_event are skipped and counted in `malformed`; `checked` says the
        batch comes from an EventReader (RunReader), which already checked every one."""
        if len(events) >= BIG_BATCH:
            with gc_paused():
                return self._ingest(events, checked)
        return self._ingest(events, checked)

    def _ingest(self, events: list[dict], checked: bool) -> list[dict]:
        anomalies = []
        for ev in events:
            if not checked and check_event(ev) is not None:
                self.malformed += 1
                continue
            self.n_events += 1
            name = ev.get("stage") or "?"
            st = self.stage(name)
            st.events += 1
            ts = ev.get("ts")
            if isinstance(ts, (int, float)):
                st.last_ts = ts
                self.last_event_ts = ts if self.last_event_ts is None else max(self.last_event_ts, ts)
            kind = ev.get("kind")
            if kind == "step":  # the hot path: 100k of these when a big run is opened
                step = ev.get("step") or 0
                if step <= self.last_seq.get(name, -1):
                    self.out_of_order += 1
                self.last_seq[name] = step
                st.step, st.total_steps = step, ev.get("total_steps")
                loss = ev.get("loss")
                if type(loss) is not float:
                    loss = fnum(loss)
                st.loss = loss
                st.tok_per_sec, st.mfu, st.tokens = ev.get("tok_per_sec"), ev.get("mfu"), ev.get("tokens")
                st.eta_s, st.lrm, st.dt = ev.get("eta_s"), ev.get("lrm"), ev.get("dt")
                s = self.loss.get(name)
                if s is None:
                    s = self.loss[name] = Series(name)
                    self._ema[name] = loss
                ema = self._ema[name]
                if loss != loss or loss in (math.inf, -math.inf):
                    anomalies.append(ev)
                else:
                    # cheap gate first: the robust spike test only runs for a loss well above its EMA
                    if loss > 1.5 * ema and len(s) >= 20 and _is_spike(s.ys, loss):
                        anomalies.append(ev)
                    self._ema[name] = loss if ema != ema else 0.9 * ema + 0.1 * loss
                s.xs.append(step)
                s.ys.append(loss)
                # x axes other than step, kept alongside for Compare
                self._aux(name).append((ev.get("tokens"), ts))
                if "val_bpb" in ev:
                    self._bpb(name).add(step, fnum(ev["val_bpb"]))
            elif kind == "eval":
                task, metric = str(ev.get("task", "?")), str(ev.get("metric", "?"))
                if isinstance(ev.get("text"), str) and ev["text"]:  # tok_eval: one row per kind of text
                    task = f"{task} ({ev['text']})"
                value = fnum(ev.get("value"))
                if metric in ("bpb", "val_bpb") and "train" not in task:
                    self._bpb(name).add(ev.get("step") or st.step or 0, value)
                self.evals[(name, task, metric)] = (value, ev.get("step"))
            elif kind == "sample":
                self.samples.append({"stage": name, "step": ev.get("step"), "prompt": ev.get("prompt", ""),
                                     "text": ev.get("text", "")})
            elif kind == "checkpoint":
                self.checkpoints.append({"stage": name, "step": ev.get("step"), "path": ev.get("path")})
            elif kind == "start":
                st.started, st.ended, st.end_status, st.error = ts, None, None, None
            elif kind == "end":
                st.ended, st.end_status = ts, ev.get("status", "ok")
            elif kind == "error":
                st.error = ev
                st.ended, st.end_status = ts, "error"
            elif kind == "config":
                self.config_events[name] = ev.get("config") or {}
        return anomalies

    # Parallel arrays of (tokens, ts) per stage, aligned with loss[stage], for the Compare x axes.
    _aux_store: dict = field(default_factory=dict, repr=False)
    _ema: dict = field(default_factory=dict, repr=False)  # per stage: EMA of the loss (spike gate)

    def _aux(self, name):
        return self._aux_store.setdefault(name, [])

    def _bpb(self, name):
        s = self.val_bpb.get(name)
        if s is None:
            s = self.val_bpb[name] = Series(name)
        return s

    def loss_vs(self, stage: str, x_axis: str) -> Series:
        """The loss curve of a stage against step, tokens or wall time (seconds since the stage began)."""
        src = self.loss.get(stage)
        out = Series(stage)
        if src is None:
            return out
        if x_axis == "step":
            out.xs, out.ys = src.xs, src.ys
            return out
        aux = self._aux(stage)
        t0 = next((ts for _, ts in aux if isinstance(ts, (int, float))), 0.0)
        for (tokens, ts), y in zip(aux, src.ys):
            x = tokens if x_axis == "tokens" else (ts - t0 if isinstance(ts, (int, float)) else None)
            if isinstance(x, (int, float)):
                out.add(float(x), y)
        return out

    def main_train_stage(self) -> str | None:
        """The stage whose curves the dashboard shows: the running one, else the last with steps."""
        running = [n for n, s in self.stages.items() if s.started and not s.ended and n in self.loss]
        if running:
            return running[-1]
        with_steps = [n for n in self.stages if n in self.loss]
        return with_steps[-1] if with_steps else None


def _is_spike(history: list[float], loss: float, window: int = 50) -> bool:
    """A loss far above its recent range: > 1.5x the recent median and > median + 6 robust sigmas."""
    recent = [y for y in history[-window:] if math.isfinite(y)]
    if len(recent) < 10:
        return False
    srt = sorted(recent)
    med = srt[len(srt) // 2]
    mad = sorted(abs(y - med) for y in recent)[len(recent) // 2] or 1e-6
    return loss > 1.5 * med and loss > med + 6 * 1.4826 * mad


# ----------------------------------------------------------------------------- reading a run dir

BIG_BATCH = 10_000  # events: from here on, parsing and ingesting run with the cyclic GC paused
_gc_pause = {"holders": 0, "was_enabled": False}
_gc_lock = threading.Lock()


@contextmanager
def gc_paused():
    """The cyclic garbage collector off for a bulk read: parsing a 100k-event run keeps ~100k dicts alive at
    once, and the collections that sets off (each one walks every live object) were ~0.8 s of a 2.3 s open.
    Reference counting still frees everything (events make no cycles). Nests, and works across threads."""
    with _gc_lock:
        if _gc_pause["holders"] == 0:
            _gc_pause["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_pause["holders"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pause["holders"] -= 1
            if _gc_pause["holders"] == 0 and _gc_pause["was_enabled"]:
                gc.enable()


class RunReader:
    """Tails every events.jsonl of a run (new stages appear as they start). Thread-safe `poll`."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.readers: dict[str, EventReader] = {}
        self._lock = threading.Lock()

    def poll(self) -> list[dict]:
        with self._lock:
            for stage, path in stage_event_files(self.run_dir):  # a new stage may have started
                if stage not in self.readers:
                    self.readers[stage] = EventReader(path)
            out = []
            for r in self.readers.values():
                out.extend((r.offset == 0 and _bulk_read(r)) or r.poll())
            # events of different stages interleave by time; within a stage, file order is kept (stable sort)
            if len(self.readers) > 1:
                out.sort(key=lambda e: e.get("ts") or 0.0)
            return out

    @property
    def malformed(self) -> int:
        return sum(r.malformed for r in self.readers.values())


def _bulk_read(reader: EventReader) -> list[dict] | None:
    """First read of a big events file as one JSON array (about twice as fast as line by line, which is
    what makes a 100k-event run open quickly). None when the file is small or any line is malformed:
    the reader's own line-by-line poll then handles it, counting malformed lines."""
    try:
        if reader.path.stat().st_size < (1 << 20):
            return None
        data = reader.path.read_bytes()
    except OSError:
        return None
    end = data.rfind(b"\n")
    body = data[:end].strip()
    if end < 0 or not body:
        return None
    try:
        with gc_paused():
            evs = json.loads(b"[" + body.replace(b"\n", b",") + b"]")
            if not all(check_event(e) is None for e in evs):
                return None
    except ValueError:
        return None  # a malformed or blank line somewhere: let EventReader skip and count it
    reader.offset = end + 1
    return evs


def load_run(run_dir: Path) -> RunModel:
    """A model of the run from everything on disk now (used by Compare and the bench)."""
    m = RunModel(Path(run_dir))
    m.ingest(RunReader(run_dir).poll(), checked=True)
    return m


def run_cost(state: dict, config: dict, model: RunModel | None, now: float, rate_per_gpu_hour: float) -> tuple[float, float]:
    """(wall seconds so far, cost in $) = hourly rate x GPUs x wall time of the stages that ran."""
    gpus = 0 if run_gpus(state, config) == [] else gpu_count(config)  # a CPU run costs nothing
    spans = []
    stages = {s.name: s for s in state.get("stages", [])}
    names = set(stages) | set(model.stages if model else ())
    for n in names:
        info = model.stages.get(n) if model else None
        ss = stages.get(n)
        # the process lifetime from state.json first (it includes start-up before the first event: GPUs are
        # held then too), the events' span for a stage state.json does not time
        start = (ss.started if ss else None) or (info.started if info and info.started else None)
        end = (ss.ended if ss else None) or (info.ended if info and info.ended else None)
        if start is None:
            continue
        if end is None:
            running = ss is None or ss.status == "running"
            end = now if running else (info.last_ts if info and info.last_ts else start)
        spans.append((start, end))
    from nanochat.system import run_cost as cost_of_spans  # the one cost function (report.md uses it too)
    return cost_of_spans(spans, gpus, rate_per_gpu_hour)


def hourly_rate(config: dict, gpu_name: str | None, fallback: float) -> float:
    """Per-GPU price: run.gpu_hourly_usd when set (>= 0), else the typical price of the GPU type, else fallback."""
    override = (config.get("run") or {}).get("gpu_hourly_usd", -1)
    if isinstance(override, (int, float)) and override >= 0:
        return float(override)
    if gpu_name:
        from nanochat.system import gpu_hourly_rate
        rate = gpu_hourly_rate(gpu_name)
        if rate is not None:
            return rate
    return fallback


def run_gpus(state: dict, config: dict) -> list[dict] | None:
    """The GPUs of the run's machine from state.json's system snapshot ([] for a CPU run); None if unknown."""
    if (config.get("run") or {}).get("device") == "cpu":
        return []
    system = (state.get("raw") or {}).get("system")
    return system["gpus"] if isinstance(system, dict) and isinstance(system.get("gpus"), list) else None


def run_gpu_name(state: dict, config: dict, viewer_gpu: str | None) -> str | None:
    """The run's GPU type (its own snapshot first: the TUI may watch from another machine), else the viewer's."""
    gpus = run_gpus(state, config)
    return (gpus[0].get("name") if gpus and isinstance(gpus[0], dict) else None) or viewer_gpu


def gpu_count(config: dict) -> int:
    """GPUs a run uses: nproc_per_node x nnodes from its config (1 when the config does not say)."""
    def find(d, key):
        if isinstance(d, dict):
            if key in d and isinstance(d[key], int):
                return d[key]
            for v in d.values():
                r = find(v, key)
                if r is not None:
                    return r
        return None
    return max(1, (find(config, "nproc_per_node") or 1) * (find(config, "nnodes") or 1))


# ----------------------------------------------------------------------------- run list summaries

def _first_last_events(path: Path, tail_bytes: int = 65536) -> tuple[dict | None, dict | None, dict | None]:
    """The first event, the last event and the last step event of a file, reading only its two ends."""
    first = last = last_step = None
    try:
        with open(path, "rb") as f:
            line = f.readline(MAX_LINE_BYTES + 1)
            if line.endswith(b"\n"):
                first = parse_line(line)
            size = f.seek(0, 2)
            f.seek(max(0, size - tail_bytes))
            lines = f.read().split(b"\n")
    except OSError:
        return first, last, last_step
    for ln in reversed(lines[:-1]):  # the piece after the last newline is torn or empty
        ev = parse_line(ln)
        if ev is None:
            continue
        last = last or ev
        if ev.get("kind") == "step":
            last_step = ev
            break
    return first, last, last_step


@dataclass
class RunSummary:
    run_dir: Path
    status: str
    stage: str
    progress: str
    started: float | None
    wall: float
    cost: float
    profile: str


def quick_summary(run_dir: Path, state: dict, now: float, fallback_rate: float, gpu_name: str | None = None) -> RunSummary:
    """One row of the run list without reading whole event files: state.json plus both ends of each."""
    model = RunModel(Path(run_dir))
    last_step = {}
    for stage, path in stage_event_files(run_dir):
        first, last, step_ev = _first_last_events(path)
        if first is None:
            continue
        st = model.stage(stage)
        st.started = first.get("ts")
        if last:
            st.last_ts = last.get("ts")
            if last.get("kind") in ("end", "error"):
                st.ended = last.get("ts")
        if step_ev:
            last_step[stage] = (step_ev.get("step"), step_ev.get("total_steps"))
    stages = state.get("stages", [])
    cur = next((s for s in stages if s.status in ("running", "failed", "stopped")), None)
    if cur is None and stages:
        done = [s for s in stages if s.status in ("succeeded", "skipped")]
        cur = done[-1] if done else stages[0]
    n_done = sum(s.status in ("succeeded", "skipped") for s in stages)
    progress = f"{n_done}/{len(stages)} stages" if stages else "-"
    if cur is not None and cur.name in last_step and cur.status == "running":
        step, total = last_step[cur.name]
        if total:
            progress += f", {100 * (step or 0) / total:.0f}%"
    started = min((s.started for s in model.stages.values() if s.started), default=None) or state.get("created")
    config = read_config(run_dir)
    rate = hourly_rate(config, run_gpu_name(state, config, gpu_name), fallback_rate)
    wall, cost = run_cost(state, config, model, now, rate)
    return RunSummary(Path(run_dir), state.get("status", "?"), cur.name if cur else "-", progress, started, wall, cost,
                      state.get("profile") or "")
