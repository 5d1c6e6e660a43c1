"""Base model evaluation: CORE (the DCLM in-context suite), validation bits per byte, a few samples.

    python -m stages.base_eval --run-dir DIR [--max-per-task N] [--bundle DIR] [--tasks copa|boolq]
    torchrun --nproc_per_node=8 -m stages.base_eval --run-dir DIR

The bundle is `base_eval.bundle_dir`, or <base>/eval_bundle, downloaded there when missing (see
nanochat/core_eval.py for the layout; ../shared/data/core_icl is one). Events: per CORE task an `eval`
with metric "acc" and one with "centered", then task "CORE" metric "core" (with `partial` and
`missing` when the bundle lacks tasks), task "val" metric "bpb", and `sample` events.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from nanochat import core_eval
from nanochat.checkpoint import PHASES, ckpt_dir, latest_step, load_model
from nanochat.common import get_base_dir, print0
from nanochat.config import ConfigError
from nanochat.stage import StageContext, stage_main



def add_args(p):
    p.add_argument("-i", "--source", default="base", choices=PHASES, help="which checkpoint phase to evaluate")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--max-per-task", type=int, default=None, help="CORE examples per task (-1 = all; default: config)")
    p.add_argument("--bundle", default=None, help="CORE eval bundle directory (default: base_eval.bundle_dir)")
    p.add_argument("--tasks", default=None, help="'|'-separated CORE task labels (default: all 22)")


def resolve_bundle(ctx: StageContext) -> Path | None:
    """The bundle directory; the default location is filled by a download (rank 0, others wait).

    None when there is none to be had and `base_eval.require_core` is false (offline profiles: demo)."""
    given = ctx.args.bundle or ctx.cfg["base_eval"]["bundle_dir"]
    if given:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise ConfigError(f"CORE eval bundle directory {path} does not exist; set base_eval.bundle_dir "
                              "to a directory with core.yaml, eval_meta_data.csv and the task jsonl files")
        return path
    path = get_base_dir() / "eval_bundle"
    error = None
    if ctx.dist.master and not path.is_dir():
        print0(f"downloading the CORE eval bundle to {path}")
        try:
            core_eval.download_bundle(path)
        except OSError as e:
            error = str(e)
    ctx.barrier()
    if not path.is_dir():
        msg = (f"no CORE eval bundle at {path} ({error or 'download failed'}); "
               "set base_eval.bundle_dir to a local copy (e.g. ../shared/data/core_icl)")
        if ctx.cfg["base_eval"]["require_core"]:
            raise ConfigError(msg)
        print0(f"CORE skipped: {msg}")
        ctx.events.emit("log", message=f"CORE skipped: {msg}")
        return None
    return path


def val_bpb(ctx: StageContext, model, tokenizer) -> float | None:
    from nanochat.config import check_data_dir
    from nanochat.dataloader import PackingLoader
    from nanochat.dataset import data_files
    from nanochat.loss_eval import evaluate_bpb
    try:
        files = data_files(check_data_dir(ctx.cfg), "val")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print0(f"val bpb skipped: {e}")
        ctx.events.emit("log", message=f"val bpb skipped: {e}")
        return None
    B, T = ctx.cfg["base_train"]["device_batch_size"], model.config.sequence_len
    steps = max(1, ctx.cfg["base_eval"]["bpb_tokens"] // (B * T * ctx.dist.world_size))
    loader = PackingLoader(tokenizer, files, B, T, ctx.dist.rank, ctx.dist.world_size, ctx.dist.device)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=ctx.dist.device)
    return evaluate_bpb(model, loader, steps, token_bytes)


def main(ctx: StageContext) -> dict:
    from nanochat.training import SAMPLE_PROMPTS, sample_greedy
    args, ev, device = ctx.args, ctx.events, ctx.dist.device
    phase = args.source
    if latest_step(ckpt_dir(ctx.run_dir, phase)) is None:
        raise ConfigError(f"no {phase} checkpoint in {ckpt_dir(ctx.run_dir, phase)}; train it first")
    model, tokenizer, meta = load_model(ctx.run_dir, phase, step=args.step, device=device)
    step = meta.get("step")
    max_per_task = args.max_per_task if args.max_per_task is not None else ctx.cfg["base_eval"]["max_per_task"]
    tasks = [t for t in args.tasks.split("|") if t] if args.tasks else None
    bundle = resolve_bundle(ctx)

    def on_task(label, r):
        print0(f"{label:<34} acc {r['acc']:.4f}  centred {r['centered']:+.4f}  (n={r['n']}, {r['seconds']:.1f}s)")
        common = dict(step=step, phase=phase, n=r["n"], shots=r["shots"], random_baseline=r["random_baseline"])
        ev.eval(task=label, metric="acc", value=r["acc"], centered=r["centered"], **common)
        ev.eval(task=label, metric="centered", value=r["centered"], **common)

    t0 = time.time()
    res = {"core": None, "partial": None, "missing": None, "tasks": {}}
    if bundle is not None:
        try:
            res = core_eval.evaluate_core(model, tokenizer, bundle, device, max_per_task, tasks, on_task,
                                          stop=ctx.should_stop)
        except core_eval.BundleError as e:
            raise ConfigError(str(e)) from None
        print0(core_eval.format_table(res))
        print0(f"CORE: {res['core']:.4f} over {len(res['tasks'])} tasks in {time.time() - t0:.1f}s "
               f"(max {max_per_task} per task; baselines from {res['baselines_file']})")
        ev.eval(task="CORE", metric="core", value=res["core"], step=step, phase=phase, partial=res["partial"],
                missing=res["missing"], n=len(res["tasks"]), baselines_file=res["baselines_file"])
    core_s = time.time() - t0

    bpb = None if ctx.stop_requested else val_bpb(ctx, model, tokenizer)
    if bpb is not None:
        print0(f"val bpb: {bpb:.4f}")
        ev.eval(task="val", metric="bpb", value=bpb, step=step, phase=phase)

    if ctx.dist.master and not ctx.stop_requested:
        for prompt in SAMPLE_PROMPTS:
            text = sample_greedy(model, tokenizer, prompt, 16, device)
            print0(f"{prompt!r} -> {text!r}")
            ev.sample(prompt=prompt, text=text, step=step, phase=phase)
    return {"core": res["core"], "partial": res["partial"], "missing": res["missing"], "val_bpb": bpb,
            "core_tasks": {k: v["centered"] for k, v in res["tasks"].items()}, "max_per_task": max_per_task,
            "core_seconds": round(core_s, 2), "checkpoint_step": step, "phase": phase}


if __name__ == "__main__":
    stage_main("base_eval", main, add_args)
