"""Checkpoints: one directory per step, written under a temporary name and renamed into place.

    <run_dir>/checkpoints/<phase>/step_000123/
        model.pt            model state dict (rank 0)
        optim_rank{r}.pt    optimizer state of rank r (each rank owns its shard)
        meta.json           model_config, step, loader_state per rank, stage metrics

Because the rename is the last act, a crash mid-write leaves the previous checkpoint as the latest
complete one. Re-saving a step swaps the new directory with the old one in one rename (renameat2
RENAME_EXCHANGE), and pruning renames a step out of the listing before deleting it, so at every moment
each listed step_N is complete. Optimizer shards and loader positions are per rank: resuming them
with another number of processes is refused (`load_checkpoint(load_optim=True)`). Multi-node runs need
a shared filesystem for the checkpoint directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from nanochat.common import fsync_dir
from nanochat.config import ConfigError

STEP_RE = re.compile(r"^step_(\d{6,})$")

# the checkpoint phases in pipeline order (checkpoints/<phase>/), and the stage that writes each one
PHASES = ("base", "mid", "sft", "rl")
PHASE_STAGE = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl"}


def ckpt_dir(run_dir: str | os.PathLike, phase: str) -> Path:
    return Path(run_dir) / "checkpoints" / phase


def _barrier(world_size: int):
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        return libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0
    except (OSError, AttributeError):
        return False


def _discard(directory: Path, name: str) -> None:
    """Take a step out of the listing with one rename, then delete it."""
    gone = directory / f".old-{name}"
    shutil.rmtree(gone, ignore_errors=True)
    try:
        os.rename(directory / name, gone)
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def _save_file(obj, path: Path):
    import torch
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(directory, step: int, model_state: dict, optim_state: dict | None, meta: dict,
                    rank: int = 0, world_size: int = 1, keep_last: int | None = None) -> Path:
    """Collective under DDP: every rank calls it (each writes its optimizer shard)."""
    directory = Path(directory)
    final = directory / f"step_{step:06d}"
    tmp = directory / f".tmp-step_{step:06d}"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for left in [tmp, *directory.glob(".old-step_*")]:  # leftovers of a write or a pruning that was killed
            shutil.rmtree(left, ignore_errors=True)
        tmp.mkdir()
    _barrier(world_size)
    if optim_state is not None:
        _save_file(optim_state, tmp / f"optim_rank{rank}.pt")
    _barrier(world_size)
    if rank == 0:
        _save_file(model_state, tmp / "model.pt")
        meta = {**meta, "step": step, "world_size": world_size}
        with open(tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists() and _exchange(tmp, final):  # re-saving a step: the new one takes its place at once
            shutil.rmtree(tmp, ignore_errors=True)        # (now the old one)
        else:
            if final.exists():  # no atomic exchange here: the old one goes, then the new one comes
                _discard(directory, final.name)
            os.rename(tmp, final)
        fsync_dir(directory)
        if keep_last:
            for s in list_steps(directory)[:-keep_last]:
                _discard(directory, f"step_{s:06d}")
    _barrier(world_size)
    return final


def list_steps(directory) -> list[int]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir())


def latest_step(directory) -> int | None:
    steps = list_steps(directory)
    return steps[-1] if steps else None


def load_checkpoint(directory, step: int | None = None, device="cpu", rank: int = 0, load_optim: bool = False,
                    world_size: int | None = None):
    """-> (model_state, optim_state or None, meta). With `load_optim` (a resume), the checkpoint must have
    been written by `world_size` processes (default: $WORLD_SIZE as torchrun sets it, else 1)."""
    import torch
    directory = Path(directory)
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    d = directory / f"step_{step:06d}"
    if not d.is_dir():
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory} (have: {list_steps(directory)})")
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    if load_optim:
        world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        saved = meta.get("world_size", 1)
        if saved != world_size:
            # each rank's optimizer shard and data position are its own: another split would misload silently
            raise ConfigError(f"cannot resume {d} with {world_size} process(es): it was written by {saved}; "
                              f"resume with run.nproc_per_node x run.nnodes = {saved}, or start the stage afresh")
    model_state = torch.load(d / "model.pt", map_location=device, weights_only=True)
    # checkpoints of a torch.compile'd model carry this prefix; strip it so plain models load them
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    optim_state = None
    if load_optim:
        f = d / f"optim_rank{rank}.pt"
        if not f.exists():
            raise FileNotFoundError(f"{f} missing: the checkpoint was written by {meta.get('world_size')} "
                                    "processes; resume with the same number of processes")
        optim_state = torch.load(f, map_location=device, weights_only=True)
    return model_state, optim_state, meta


def load_model(run_dir, phase: str, step: int | None = None, device=None):
    """-> (model in eval mode, tokenizer, meta). `run_dir` may also be a checkpoint phase directory."""
    import torch
    from nanochat.gpt import build_model
    from nanochat.tokenizer import Tokenizer
    from nanochat.common import autodetect_device_type

    run_dir = Path(run_dir)
    directory = run_dir if latest_step(run_dir) is not None else ckpt_dir(run_dir, phase)
    device = torch.device(device or autodetect_device_type())
    model_state, _, meta = load_checkpoint(directory, step, device=device)
    model = build_model(meta["model_config"], device)  # initialised: buffers such as rotary tables are not saved
    model.load_state_dict(model_state, strict=True, assign=True)
    model.eval()
    # the run's tokenizer is <run_dir>/tokenizer, found from the checkpoint's own location so that a
    # moved or copied run still loads; the path recorded at save time is the fallback
    tok_dir = directory.resolve().parents[1] / "tokenizer"
    if not tok_dir.is_dir() and meta.get("tokenizer_dir"):
        tok_dir = Path(meta["tokenizer_dir"])
    tokenizer = Tokenizer.load(tok_dir)
    return model, tokenizer, meta
