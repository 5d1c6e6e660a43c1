"""What the training stages share: the tokenizer and model of a run, learning-rate and momentum
settings, the chat stages' start from the previous phase, their checkpoints, small collectives, and the
greedy samples that base_train and base_eval print.

Each stage in stages/ keeps its own loop (they differ on purpose); only what would otherwise be
written twice lives here.
"""
from __future__ import annotations

import math

import torch

from nanochat.checkpoint import PHASE_STAGE, ckpt_dir, latest_step, load_checkpoint, save_checkpoint
from nanochat.common import print0
from nanochat.config import ConfigError
from nanochat.gpt import build_model

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]


def load_tokenizer(run_dir):
    from nanochat.tokenizer import Tokenizer
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        raise ConfigError(f"no tokenizer in {tok_dir}; train one first: python -m stages.tok_train --run-dir {run_dir}")
    return Tokenizer.load(tok_dir)


def muon_momentum(step: int, num_iterations: int | None = None, warmdown_ratio: float = 0.0) -> float:
    """Muon momentum warms from 0.85 to 0.97 over the first 400 steps; after that, during the LR warmdown
    (the last warmdown_ratio of num_iterations) it eases back to 0.90, so that late, small steps average
    over fewer stale gradients. Without a horizon (the chat stages) only the warm-up applies."""
    if step < 400:
        return 0.85 + 0.12 * step / 400
    if num_iterations is None or warmdown_ratio <= 0:
        return 0.97
    warmdown = round(warmdown_ratio * num_iterations)
    start = num_iterations - warmdown
    if step < start:
        return 0.97
    return 0.97 - 0.07 * min(1.0, (step - start) / max(1, warmdown))


def weight_decay_frac(step: int, num_iterations: int) -> float:
    """Muon's weight decay follows a half cosine from its full value at step 0 to 0 at the last step."""
    return 0.5 * (1 + math.cos(math.pi * min(step, num_iterations) / max(1, num_iterations)))


def check_train_dtype(model, device):
    """fp16 trains only with loss scaling (a GradScaler), which these stages do not do: refuse it."""
    if model.resolve_compute_dtype(device) == torch.float16:
        raise ConfigError("fp16 training is refused: it needs a GradScaler, which nanochat does not use; "
                          "set NANOCHAT_DTYPE=bfloat16 (CUDA SM80+) or float32")


def load_mixtures(ctx, key: str, val_examples: int):
    """(train, val) mixtures of the spec at config `key` ('section.name'); val is None when no source has
    a validation split. Data problems become a one-line ConfigError naming the key."""
    from nanochat.tasks.mixture import build_mixture
    spec, seed = ctx.cfg.get(key), ctx.cfg["run"]["seed"]
    try:
        train = build_mixture(spec, split="train", seed=seed)
        val = build_mixture(spec, split="val", seed=seed, max_examples=val_examples)
    except (OSError, ValueError, ImportError, AttributeError) as e:
        raise ConfigError(f"{key} = {spec!r}: {e}") from None
    if train is None:
        raise ConfigError(f"{key} = {spec!r} has no training examples")
    return train, val


def start_model(ctx, phase: str, sources: tuple[str, ...], lr_frac: float):
    """The model and optimizers for a chat stage.

    With --resume and a checkpoint of `phase`: that checkpoint, optimizer shards included. Otherwise the
    latest checkpoint of the first of `sources` that has one, fresh optimizers. The model config always
    comes from the checkpoint's meta. Returns (model, optimizers, meta, resumed, source_phase).
    """
    dist = ctx.dist
    own = ckpt_dir(ctx.run_dir, phase)
    resumed = ctx.resume and latest_step(own) is not None
    src = phase if resumed else next((p for p in sources if latest_step(ckpt_dir(ctx.run_dir, p)) is not None), None)
    if src is None:
        raise ConfigError(f"no {' or '.join(sources)} checkpoint in {ckpt_dir(ctx.run_dir, sources[0]).parent}; "
                          f"train it first: python -m stages.{PHASE_STAGE[sources[0]]} --run-dir {ctx.run_dir}")
    model_state, optim_state, meta = load_checkpoint(ckpt_dir(ctx.run_dir, src), device=dist.device, rank=dist.rank,
                                                     load_optim=resumed, world_size=dist.world_size)
    model = build_model(meta["model_config"], dist.device)
    check_train_dtype(model, dist.device)
    model.load_state_dict(model_state)
    del model_state
    bt = ctx.cfg["base_train"]  # the chat stages fine-tune at a fraction of pretraining's learning rates
    optimizers = model.setup_optimizers(unembedding_lr=bt["unembedding_lr"] * lr_frac,
                                        embedding_lr=bt["embedding_lr"] * lr_frac,
                                        matrix_lr=bt["matrix_lr"] * lr_frac, scalar_lr=bt["scalar_lr"] * lr_frac,
                                        weight_decay=0.0)
    if resumed:
        for opt, state in zip(optimizers, optim_state["optimizers"]):
            opt.load_state_dict(state)
        print0(f"resumed {phase} from step {meta['step']}")
        ctx.events.emit("log", message=f"resumed from step {meta['step']}", step=meta["step"])
    else:
        print0(f"starting from the {src} checkpoint (step {meta['step']})")
        ctx.events.emit("log", message=f"starting from {src} step {meta['step']}", source=src, source_step=meta["step"])
    return model, optimizers, meta, resumed, src


def set_lr(optimizers, lrm: float, step: int | None = None, *, momentum: float | None = None,
           wd_frac: float | None = None):
    """Scale every group's initial_lr by lrm. On Muon: set the momentum (given, or warmed like pretraining
    when only a step is given) and scale its initial_weight_decay by wd_frac when one is given."""
    if momentum is None and step is not None:
        momentum = muon_momentum(step)
    for opt in optimizers:
        muon = getattr(opt, "is_muon", False)
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if muon and momentum is not None:
                group["momentum"] = momentum
            if muon and wd_frac is not None:
                group["weight_decay"] = group["initial_weight_decay"] * wd_frac


def gather(dist, obj) -> list:
    """One JSON-able object per rank, on every rank (the per-rank loader states of a checkpoint)."""
    if not dist.ddp:
        return [obj]
    import torch.distributed as tdist
    out = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def all_sum(dist, *values: float) -> list[float]:
    """Sum numbers over ranks (a no-op on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    if dist.ddp:
        import torch.distributed as tdist
        tdist.all_reduce(t)
    return t.tolist()


def save_phase(ctx, phase: str, step: int, model, optimizers, model_config: dict, **meta):
    """A checkpoint of this phase (collective: every rank calls it) and its event."""
    meta = dict(model_config=model_config, tokenizer_dir=str(ctx.run_dir / "tokenizer"), **meta)
    path = save_checkpoint(ckpt_dir(ctx.run_dir, phase), step, model.state_dict(),
                           {"optimizers": [o.state_dict() for o in optimizers]}, meta,
                           rank=ctx.dist.rank, world_size=ctx.dist.world_size, keep_last=2)
    ctx.events.checkpoint(step=step, path=str(path))


def check_positive(section: str, cfg: dict, *keys: str):
    for k in keys:
        if cfg[k] < 1:
            raise ConfigError(f"{section}.{k} = {cfg[k]} must be at least 1")


@torch.no_grad()
def sample_greedy(model, tokenizer, prompt: str, max_tokens: int, device) -> str:
    """A few greedy tokens without a KV cache: cheap enough for a handful of prompts during training."""
    ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
    out = []
    for _ in range(max_tokens):
        x = torch.tensor([ids[-model.config.sequence_len:]], device=device)
        nxt = int(model(x)[0, -1].argmax())
        if nxt == tokenizer.get_bos_token_id():
            break
        ids.append(nxt)
        out.append(nxt)
    return tokenizer.decode(out)
