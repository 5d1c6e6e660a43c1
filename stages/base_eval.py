"""Base model evaluation: CORE (the DCLM in-context suite), validation bits per byte, a few samples.

    python -m stages.base_eval --run-dir DIR [--max-per-task N] [--bundle DIR] [--tasks copa|boolq]
    torchrun --nproc_per_node=8 -m stages.base_eval --run-dir DIR

The bundle is `base_eval.bundle_dir`, or <base>/eval_bundle, downloaded there when missing (see
nanochat/core_eval.py for the layout; ../shared/data/core_icl is one). Events (all with `phase`): per
CORE task an `eval` with metric "acc" (with `source`, its data file, and `cropped`) and one with
"centered", then task "CORE" metric "core" (with `partial` and the `missing` tasks), tasks "train" and
"val" metric "bpb" (with `tokens`, `tokens_requested`, and `partial` when the split ran out first), and
`sample` events.
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
        ctx.events.emit("log", message=f"CORE skipped: {msg}", skipped=True)
        return None
    return path


def split_bpb(ctx: StageContext, model, tokenizer) -> dict:
    """Bits per byte on the train and the val split, as the reference's base_eval: `bpb_tokens` per split
    from the start of its files, one pass (a split with fewer tokens gives what it has, and says so)."""
    from nanochat.config import check_data_dir
    from nanochat.dataloader import PackingLoader
    from nanochat.dataset import data_files
    from nanochat.loss_eval import bits_per_byte
    B, T, world = ctx.cfg["base_train"]["device_batch_size"], model.config.sequence_len, ctx.dist.world_size
    wanted = ctx.cfg["base_eval"]["bpb_tokens"]
    steps = max(1, wanted // (B * T * world))
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=ctx.dist.device)
    out = {}
    for split in ("train", "val"):
        try:
            files = data_files(check_data_dir(ctx.cfg), split)
            batches = PackingLoader(tokenizer, files, B, T, ctx.dist.rank, world, ctx.dist.device, loop=False)
            r = bits_per_byte(model, batches, steps, token_bytes)
        except (ConfigError, ValueError, FileNotFoundError) as e:
            print0(f"{split} bpb skipped: {e}")
            ctx.events.emit("log", message=f"{split} bpb skipped: {e}", skipped=True)
            continue
        r["tokens_requested"] = steps * B * T * world
        short = r["tokens"] < r["tokens_requested"]
        print0(f"{split} bpb: {r['bpb']:.4f} over {r['tokens']:,} tokens"
               + (f" (fewer than the {r['tokens_requested']:,} asked: the split ran out)" if short else ""))
        out[split] = r
    return out


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
        print0(f"{label:<34} acc {r['acc']:.4f}  centred {r['centered']:+.4f}  (n={r['n']}, {r['seconds']:.1f}s)"
               + (f"  {r['cropped']} cropped to the model's context" if r["cropped"] else ""))
        common = dict(step=step, phase=phase, n=r["n"], shots=r["shots"], random_baseline=r["random_baseline"])
        ev.eval(task=label, metric="acc", value=r["acc"], centered=r["centered"], source=r["source"],
                cropped=r["cropped"], **common)
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
                missing=res["missing"], n=len(res["tasks"]), baselines_file=res["baselines_file"],
                cropped=res["cropped"])
    core_s = time.time() - t0

    bpb = {} if ctx.stop_requested else split_bpb(ctx, model, tokenizer)
    for split, r in bpb.items():
        ev.eval(task=split, metric="bpb", value=r["bpb"], step=step, phase=phase, tokens=r["tokens"],
                tokens_requested=r["tokens_requested"], partial=r["tokens"] < r["tokens_requested"])

    if ctx.dist.master and not ctx.stop_requested:
        for prompt in SAMPLE_PROMPTS:
            text = sample_greedy(model, tokenizer, prompt, 16, device)
            print0(f"{prompt!r} -> {text!r}")
            ev.sample(prompt=prompt, text=text, step=step, phase=phase)
    return {"core": res["core"], "partial": res["partial"], "missing": res["missing"],
            **{f"{split}_bpb": r["bpb"] for split, r in bpb.items()},
            "core_tasks": {k: v["centered"] for k, v in res["tasks"].items()}, "max_per_task": max_per_task,
            "core_seconds": round(core_s, 2), "checkpoint_step": step, "phase": phase}


if __name__ == "__main__":
    stage_main("base_eval", main, add_args)
