"""Adapters between the TUI and the outside world: supervisor, NVML, psutil, engine, report, user config.

Each is a small class with the real implementation as default, so tests inject fakes (a fake pynvml
module, a fake supervisor, a fixed clock) without patching imports.
"""
from __future__ import annotations

import os
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nanochat import config, supervisor
from nanochat.checkpoint import PHASES
from nanochat.common import get_base_dir

from .runmodel import read_state

# ----------------------------------------------------------------------------- user config

DEFAULT_TUI_CONFIG = {
    "theme": "textual-dark",
    "gpu_poll_s": 1.0,         # NVML poll period; never below 0.5 s
    "host_poll_s": 2.0,
    "events_poll_s": 0.5,
    "stall_s": 300.0,          # a running stage with no event for this long raises an alert
    "gpu_idle_s": 60.0,        # GPUs under 5% while a stage runs for this long raises an alert
    "gpu_hourly_usd": 3.0,     # per GPU, for the cost meter when neither run.gpu_hourly_usd nor the GPU type gives one
    "keys": {},
}


def tui_config_paths() -> list[Path]:
    """Where user settings are read from, later ones winning: ~/.config/nanochat/tui.toml, then
    $NANOCHAT_BASE_DIR/tui.toml."""
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    paths = [xdg / "nanochat" / "tui.toml"]
    if os.environ.get("NANOCHAT_BASE_DIR"):
        paths.append(Path(os.environ["NANOCHAT_BASE_DIR"]) / "tui.toml")
    return paths


class TuiConfigError(ValueError):
    pass


def load_tui_config(paths: list[Path] | None = None) -> dict:
    """Merged [tui] settings. Accepts the table as `[tui]`/`[tui.keys]` or at top level."""
    cfg = {**DEFAULT_TUI_CONFIG, "keys": {}}
    for p in paths if paths is not None else tui_config_paths():
        if not p.is_file():
            continue
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise TuiConfigError(f"{p}: not valid TOML ({e})") from None
        data = data.get("tui", data)
        for k, v in data.items():
            if k not in DEFAULT_TUI_CONFIG:
                raise TuiConfigError(f"{p}: unknown setting {k!r}; allowed: {', '.join(DEFAULT_TUI_CONFIG)}")
            if k == "keys":
                if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                    raise TuiConfigError(f"{p}: [tui.keys] maps binding ids to key strings, e.g. dashboard.logs = \"l\"")
                cfg["keys"].update(v)
            else:
                want = type(DEFAULT_TUI_CONFIG[k])
                if want is float and isinstance(v, int):
                    v = float(v)
                if not isinstance(v, want):
                    raise TuiConfigError(f"{p}: {k} must be a {want.__name__}, got {v!r}")
                cfg[k] = v
    cfg["gpu_poll_s"] = max(0.5, cfg["gpu_poll_s"])
    return cfg


# ----------------------------------------------------------------------------- GPUs

@dataclass
class GpuSample:
    index: int
    name: str
    util: float           # %
    mem_used: float       # bytes
    mem_total: float
    temp: float           # C
    power: float          # W
    power_limit: float
    sm_clock: int         # MHz
    mem_clock: int
    throttle: list[str] = field(default_factory=list)


# NVML clock-event reason bits worth telling a user about (names as nvidia-smi prints them)
THROTTLE_BITS = {
    0x0000000000000004: "sw_power_cap",
    0x0000000000000008: "hw_slowdown",
    0x0000000000000020: "sw_thermal",
    0x0000000000000040: "hw_thermal",
    0x0000000000000080: "hw_power_brake",
}


class NvmlProvider:
    """GPU stats through nvidia-ml-py (`pynvml`). `nvml` is injectable for tests (a fake module)."""

    def __init__(self, nvml=None):
        self.error = ""
        self._nvml = nvml
        self._handles = []
        try:
            if self._nvml is None:
                import pynvml as nvml_mod
                self._nvml = nvml_mod
            self._nvml.nvmlInit()
            n = self._nvml.nvmlDeviceGetCount()
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
            if not n:
                self.error = "NVML sees no GPU"
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, driver not loaded, ...
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            self.error = f"no GPU stats: NVML unavailable ({detail})"
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def sample(self) -> list[GpuSample]:
        nv, out = self._nvml, []
        for i, h in enumerate(self._handles):
            def get(fn, *a, default=0):
                try:
                    return getattr(nv, fn)(h, *a)
                except Exception:
                    return default
            name = get("nvmlDeviceGetName", default="GPU")
            name = name.decode() if isinstance(name, bytes) else str(name)
            util = get("nvmlDeviceGetUtilizationRates", default=None)
            mem = get("nvmlDeviceGetMemoryInfo", default=None)
            reasons = get("nvmlDeviceGetCurrentClocksEventReasons", default=None)
            if reasons is None:
                reasons = get("nvmlDeviceGetCurrentClocksThrottleReasons", default=0)
            out.append(GpuSample(
                index=i, name=name, util=float(getattr(util, "gpu", 0) or 0),
                mem_used=float(getattr(mem, "used", 0) or 0), mem_total=float(getattr(mem, "total", 0) or 0),
                temp=float(get("nvmlDeviceGetTemperature", 0)), power=get("nvmlDeviceGetPowerUsage") / 1000.0,
                power_limit=get("nvmlDeviceGetEnforcedPowerLimit") / 1000.0,
                sm_clock=int(get("nvmlDeviceGetClockInfo", 1)), mem_clock=int(get("nvmlDeviceGetClockInfo", 2)),
                throttle=[n for bit, n in THROTTLE_BITS.items() if int(reasons or 0) & bit]))
        return out


# ----------------------------------------------------------------------------- host

@dataclass
class HostSample:
    cpu: float        # % of all cores
    ram_used: float   # bytes
    ram_total: float
    disk_used: float
    disk_total: float


def host_sample(path: Path | None = None) -> HostSample:
    import psutil
    vm = psutil.virtual_memory()
    du = shutil.disk_usage(path or get_base_dir())
    return HostSample(psutil.cpu_percent(interval=None), vm.total - vm.available, vm.total, du.used, du.total)


# ----------------------------------------------------------------------------- supervisor

class Supervisor:
    """The run operations: nanochat.supervisor's functions, the same ones the `nanochat` command calls."""

    def __init__(self, base_dir: Path | None = None):
        self.base_dir = Path(base_dir) if base_dir else None

    @property
    def runs_root(self) -> Path:
        return (self.base_dir or get_base_dir()) / "runs"

    def list_runs(self) -> list[Path]:
        """Run directories, newest first (run ids start with a timestamp)."""
        root = self.runs_root
        if not root.is_dir():
            return []
        runs = [p for p in root.iterdir() if p.is_dir() and ((p / "state.json").exists() or (p / "config.toml").exists())]
        return sorted(runs, key=lambda p: p.name, reverse=True)

    def resolve(self, ref: str) -> Path:
        """A run by directory, id, unique id prefix or `latest`, as the `nanochat` command takes it."""
        if Path(ref).is_dir():
            return Path(ref)
        return Path(supervisor.resolve_run(ref, root=self.runs_root))

    def read_state(self, run_dir: Path) -> dict:
        return read_state(run_dir)

    def reattach(self, run_dir: Path) -> bool:
        """A new driver for a run whose driver died mid-stage, as `nanochat status` does (supervisor.reattach)."""
        return supervisor.reattach(run_dir)

    def is_live(self, run_dir: Path) -> bool:
        return supervisor.is_live(run_dir)

    def create_run(self, profile: str, overrides: list[str]) -> Path:
        return Path(supervisor.create_run(profile, list(overrides)))

    def start_run(self, run_dir: Path, from_stage: str | None = None) -> int:
        return supervisor.start_run(run_dir, from_stage=from_stage)

    def stop_run(self, run_dir: Path):
        return supervisor.stop_run(run_dir)

    def resume_run(self, run_dir: Path):
        return supervisor.resume_run(run_dir)

    def retry_stage(self, run_dir: Path, stage: str):
        return supervisor.retry_stage(run_dir, stage)

    def skip_stage(self, run_dir: Path, stage: str):
        return supervisor.skip_stage(run_dir, stage)

    def delete_run(self, run_dir: Path):
        if self.is_live(run_dir):
            raise RuntimeError(f"{Path(run_dir).name} is running; stop it before deleting it")
        shutil.rmtree(run_dir)


# ----------------------------------------------------------------------------- config preview

def list_profiles() -> list[str]:
    return list(config.PROFILES)


def preview_config(profile: str, overrides: list[str]) -> str:
    """A few lines describing what a launch would run, or raise ValueError with the config's one-line error."""
    try:
        cfg = config.load_config(profile, overrides)
    except config.ConfigError as e:  # one line naming the key and what is allowed
        raise ValueError(str(e)) from None
    data = cfg.to_dict()
    lines = [f"profile: {profile}"]
    for section, vals in data.items():
        if isinstance(vals, dict):
            keep = {k: v for k, v in vals.items() if k in ("depth", "nproc_per_node", "nnodes", "device", "num_iterations",
                                                           "total_batch_size", "device_batch_size", "vocab_size", "stages",
                                                           "target_param_data_ratio", "max_seq_len", "sequence_len")}
            if keep:
                lines.append(f"[{section}] " + ", ".join(f"{k}={v}" for k, v in keep.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- chat + report

def list_checkpoints(run_dir: Path) -> list[tuple[str, int]]:
    """(phase, step) of every checkpoint of a run, latest phase/step first."""
    out = []
    order = {p: i for i, p in enumerate(PHASES)}
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return out
    for phase_dir in root.iterdir():
        for d in phase_dir.glob("step_*"):
            if d.is_dir() and (d / "model.pt").exists():
                try:
                    out.append((phase_dir.name, int(d.name.split("_")[1])))
                except ValueError:
                    pass
    return sorted(out, key=lambda t: (order.get(t[0], 9), t[1]), reverse=True)


class ChatBackend:
    """Loads a checkpoint and streams chat turns through nanochat.engine. Runs in a worker thread."""

    def __init__(self):
        self.engine = None
        self.loaded: tuple | None = None

    def load(self, run_dir: Path, phase: str, step: int | None):
        from nanochat.checkpoint import load_model
        from nanochat.engine import Engine
        model, tokenizer, _meta = load_model(run_dir, phase, step=step, device="cpu" if not _cuda() else None)
        self.engine = Engine(model, tokenizer)
        self.loaded = (str(run_dir), phase, step)

    def stream(self, conversation: dict, temperature: float, top_k: int | None, max_tokens: int = 512):
        if self.engine is None:
            raise RuntimeError("no checkpoint loaded")
        return self.engine.stream_chat(conversation, temperature=temperature, top_k=top_k, max_tokens=max_tokens)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def write_report(run_dir: Path) -> Path:
    from nanochat.report import write_report as wr
    return Path(wr(run_dir))


@dataclass
class Services:
    """Everything the app touches outside itself; tests pass fakes."""
    supervisor: Supervisor = field(default_factory=Supervisor)
    gpu: Callable[[], object] = NvmlProvider            # factory, called once in a worker
    host: Callable[[], HostSample | None] = host_sample
    chat: Callable[[], ChatBackend] = ChatBackend
    report: Callable[[Path], Path] = write_report
    clock: Callable[[], float] = time.time
    live_clock: bool = True                              # False in snapshot tests: no timers that tick clocks
