"""The machine a run ran on, and what its GPU time costs.

- `system_info()`: the snapshot the driver stores in state.json when it starts driving a run (host,
  CPUs, RAM, GPUs, driver and CUDA versions, torch, the git commit and the size of the code).
- `GPUS`: per GPU type its dense bf16 peak FLOP/s (for MFU) and a typical on-demand price per GPU-hour.
- `run_cost()`: the one cost function (report.md and the TUI): GPU-hours of the stages that ran x rate.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
CODE_EXTS = {".py", ".rs", ".toml", ".tcss", ".md", ".sh", ".yml", ".yaml", ".txt", ".cfg"}

# name (as in torch.cuda.get_device_name / NVML), dense bf16 peak FLOP/s (no sparsity; vendor data sheets),
# approximate on-demand cloud price per GPU-hour in USD (2025). A name matches as a whole word of the
# device name ("L4" is not "L40", "H200" is not "GH200"); the longest match wins ("H100 PCIe" over "H100").
GPUS = [
    ("B200", 2250e12, 5.50), ("H200", 989e12, 3.80), ("GH200", 989e12, 3.50), ("H100", 989e12, 3.00),
    ("H100 NVL", 835e12, 3.00), ("H100 PCIe", 756e12, 3.00), ("A100", 312e12, 1.80), ("L40S", 362e12, 1.00),
    ("L40", 181e12, 0.90), ("L4", 121e12, 0.60), ("A10G", 125e12, 0.75), ("A10", 125e12, 0.75),
    ("RTX 4090", 165e12, 0.40), ("RTX 3090", 71e12, 0.25), ("V100", 125e12, 0.50), ("T4", 65e12, 0.35),
]
PRICE_SOURCE = "typical 2025 on-demand price, nanochat/system.py GPUS"


def gpu_spec(name: str) -> tuple[str, float, float] | None:
    """(table name, peak bf16 FLOP/s, USD per GPU-hour) of a device name, None when not in the table."""
    hits = [g for g in GPUS if re.search(rf"(?<![A-Za-z0-9]){re.escape(g[0])}(?![A-Za-z0-9])", name, re.I)]
    return max(hits, key=lambda g: len(g[0])) if hits else None


def peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of one accelerator, or None when unknown (CPU, unlisted GPU)."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return None
    spec = gpu_spec(torch.cuda.get_device_name(device))
    return spec[1] if spec else None


def gpu_hourly_rate(gpu_name: str) -> float | None:
    spec = gpu_spec(gpu_name)
    return spec[2] if spec else None


def hourly_rate(config: dict, gpu_name: str | None) -> tuple[float | None, str]:
    """(USD per GPU-hour, where it comes from): run.gpu_hourly_usd when set (>= 0), else the table's."""
    override = (config.get("run") or {}).get("gpu_hourly_usd", -1)
    if isinstance(override, (int, float)) and override >= 0:
        return float(override), "run.gpu_hourly_usd in the run's config"
    spec = gpu_spec(gpu_name) if gpu_name else None
    if spec is None:
        return None, f"no price for {gpu_name or 'an unknown GPU'}; set run.gpu_hourly_usd"
    return spec[2], f"{PRICE_SOURCE} ({spec[0]})"


def run_cost(spans: list[tuple[float, float]], n_gpus: int, rate: float) -> tuple[float, float]:
    """(seconds during which a stage ran, USD): the union of the stages' (start, end) spans, so time
    between stages (nothing held) and overlaps are not paid twice, x n_gpus x rate per GPU-hour."""
    wall, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(spans):
        if cur_e is None or s > cur_e:
            wall += (cur_e - cur_s) if cur_e is not None else 0.0
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    wall = max(0.0, wall + ((cur_e - cur_s) if cur_e is not None else 0.0))
    return wall, wall / 3600.0 * n_gpus * rate


# ------------------------------------------------------------------------------------ the snapshot

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


def list_gpus() -> tuple[list[dict], str | None, str | None]:
    """[{name, memory_bytes}], NVIDIA driver version, CUDA version the driver supports."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                out.append({"name": name.decode() if isinstance(name, bytes) else name,
                            "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)})
            drv = pynvml.nvmlSystemGetDriverVersion()
            cuda = pynvml.nvmlSystemGetCudaDriverVersion()
            return out, drv.decode() if isinstance(drv, bytes) else drv, f"{cuda // 1000}.{cuda % 1000 // 10}"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver, no GPU: all mean "not from NVML"
        pass
    if not Path("/proc/driver/nvidia").exists():
        return [], None, None
    try:  # a driver without a loadable NVML: ask torch (slow import, but only on such machines)
        import torch
        return [{"name": torch.cuda.get_device_name(i), "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                for i in range(torch.cuda.device_count())], None, None
    except Exception:
        return [], None, None


def _pkg_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def system_info() -> dict:
    """Snapshot of the machine and the code, taken by the driver when it starts driving a run."""
    found, driver, cuda_driver = list_gpus()
    return {"captured": round(time.time(), 3), "host": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": _pkg_version("torch"), "torch_cuda": _torch_cuda_build(),
            "cpus": os.cpu_count(), "cpus_physical": psutil.cpu_count(logical=False),
            "ram_bytes": psutil.virtual_memory().total, "gpus": found, "nvidia_driver": driver,
            "cuda_driver": cuda_driver, "git": git_info(), "code": code_size()}
