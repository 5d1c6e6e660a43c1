"""Small shared utilities: paths, devices, distributed init, atomic writes, logging to rank 0."""
from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


def get_base_dir() -> Path:
    """Where nanochat keeps data, tokenizers and runs: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat").expanduser()
    base.mkdir(parents=True, exist_ok=True)
    return base


def runs_dir() -> Path:
    d = get_base_dir() / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def print0(*args, **kwargs):
    """print on global rank 0 only (torchrun sets RANK)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# terminal control: CSI (colours, cursor moves, clear screen), OSC (title, hyperlinks, clipboard), other
# escapes, then any lone C0/C1 control but newline and tab (bell, backspace, carriage return, a split ESC)
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]"
                      r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def strip_controls(text: str) -> str:
    """`text` (model output, a log line) without what a terminal would act on instead of showing."""
    return _CONTROL.sub("", text)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, (bytes, bytearray)) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename durable (POSIX needs the directory entry itself synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- torch-dependent helpers
# torch is imported lazily so that light consumers (the TUI's run list, the report) start fast.

def autodetect_device_type() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_compute_dtype(device_type: str):
    """bf16 on CUDA SM80+ (Ampere, Hopper), fp32 elsewhere; $NANOCHAT_DTYPE (bfloat16|float16|float32) overrides."""
    import torch
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        allowed = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        if override not in allowed:
            raise ValueError(f"NANOCHAT_DTYPE={override!r} is not allowed; use one of {', '.join(allowed)}")
        return allowed[override]
    if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class DistInfo:
    ddp: bool          # launched by torchrun with a process group
    rank: int          # global rank
    local_rank: int
    world_size: int
    device: "torch.device"  # noqa: F821

    @property
    def master(self) -> bool:
        return self.rank == 0


def is_ddp_env() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def compute_init(device_type: str | None = None, seed: int = 42) -> DistInfo:
    """Set seeds and precision, and join the torchrun process group if launched by torchrun.

    gloo on CPU (so multi-process runs work on a laptop), nccl on CUDA.
    """
    import torch
    import torch.distributed as dist

    device_type = device_type if device_type and device_type != "auto" else autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if is_ddp_env():
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device = torch.device(device_type)
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
        return DistInfo(True, rank, local_rank, world, device)
    return DistInfo(False, 0, 0, 1, torch.device(device_type))


def compute_cleanup() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def die(msg: str, code: int = 2):
    """One clear line on stderr, then exit: for bad user input, never a traceback."""
    print(f"nanochat: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)
