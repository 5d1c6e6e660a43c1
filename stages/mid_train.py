"""Midtraining: the base model keeps pretraining, now on conversations, to learn the chat format.

    python -m stages.mid_train --run-dir DIR [--set mid_train.mixture='smoltalk|identity*2'] [--resume]
    torchrun --nproc_per_node=8 -m stages.mid_train --run-dir DIR

Conversations from the task mixture (`mid_train.mixture`, see nanochat/tasks/mixture.py) are rendered
to tokens, special tokens included, and packed into rows like pretraining text: every row starts with
BOS, whole conversations are fitted best-first, and every token is a target. This is where the model
first sees <|user_start|>, <|assistant_start|>, multiple-choice answers and calculator calls; SFT then
only has to polish. Starts from the latest base checkpoint, writes checkpoints/mid.

This file also holds what the three chat stages share: loading the previous phase, optimizers at a
fraction of the base learning rates, resume and checkpointing (chat_sft and chat_rl import them).
"""
from __future__ import annotations

import math
import time

import torch

from nanochat.checkpoint import ckpt_dir, latest_step, load_checkpoint, save_checkpoint
from nanochat.common import print0
from nanochat.config import ConfigError
from nanochat.stage import StageContext, stage_main
from stages.base_train import build_model, load_tokenizer, muon_momentum

# which stage writes each checkpoint phase, for "train it first" messages
PHASE_STAGE = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl"}


# ----------------------------------------------------------------------------- shared by the chat stages

def load_mixtures(ctx: StageContext, key: str, val_examples: int):
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


def start_model(ctx: StageContext, phase: str, sources: tuple[str, ...], lr_frac: float):
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
    model_state, optim_state, meta = load_checkpoint(ckpt_dir(ctx.run_dir, src), device=dist.device,
                                                     rank=dist.rank, load_optim=resumed)
    model = build_model(meta["model_config"], dist.device)
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


def set_lr(optimizers, lrm: float, step: int | None = None):
    """Scale every group's initial_lr by lrm; with a step, also warm Muon's momentum like pretraining."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if step is not None and "momentum" in group and getattr(opt, "is_muon", False):
                group["momentum"] = muon_momentum(step)


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


def save_phase(ctx: StageContext, phase: str, step: int, model, optimizers, model_config: dict, **meta):
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


# ----------------------------------------------------------------------------- packing conversations

class ConversationPacker:
    """next(packer) -> (x, y) of shape (B, T): rendered conversations packed BOS-aligned, best fit.

    Rank r reads examples r, r + world_size, ... of the mixture. Rows are filled from a small buffer of
    rendered conversations: the longest that still fits goes in; when none fits, the shortest is cropped
    to the space left. The state (next index, epoch, indices waiting in the buffer) is a few integers, and
    rendering is deterministic, so a resumed packer continues with exactly the same batches.
    """

    def __init__(self, tokenizer, data, B: int, T: int, rank: int = 0, world_size: int = 1, device="cpu",
                 state: dict | None = None, buffer_size: int = 32):
        if len(data) <= rank:
            raise ValueError(f"the mixture has {len(data)} conversations: too few for rank {rank} of {world_size}")
        self.tokenizer, self.data, self.B, self.T = tokenizer, data, B, T
        self.rank, self.world_size, self.device, self.buffer_size = rank, world_size, torch.device(device), buffer_size
        self.cursor, self.epoch, self.buffer = rank, 1, []  # buffer: [(index, ids)]
        if state:
            self.cursor, self.epoch = state["cursor"], state["epoch"]
            self.buffer = [(i, self.render(i)) for i in state["buffer"]]

    def render(self, i: int) -> list[int]:
        ids, _ = self.tokenizer.render_conversation(self.data[i], max_tokens=self.T + 1)
        return ids

    def _take(self, space: int) -> list[int]:
        while len(self.buffer) < self.buffer_size:
            if self.cursor >= len(self.data):
                self.cursor, self.epoch = self.rank, self.epoch + 1
            self.buffer.append((self.cursor, self.render(self.cursor)))
            self.cursor += self.world_size
        fits = [k for k, (_, ids) in enumerate(self.buffer) if len(ids) <= space]
        k = max(fits, key=lambda k: len(self.buffer[k][1])) if fits else \
            min(range(len(self.buffer)), key=lambda k: len(self.buffer[k][1]))
        return self.buffer.pop(k)[1][:space]

    def __iter__(self):
        return self

    def __next__(self):
        rows = []
        for _ in range(self.B):
            row = []
            while len(row) < self.T + 1:
                row += self._take(self.T + 1 - len(row))
            rows.append(row)
        rows = torch.tensor(rows, dtype=torch.long)
        return rows[:, :-1].contiguous().to(self.device), rows[:, 1:].contiguous().to(self.device)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "buffer": [i for i, _ in self.buffer]}


def epoch_tokens(tokenizer, data, T: int, sample: int = 512) -> float:
    """Tokens in one pass over `data`, estimated from evenly spaced examples (same on every rank)."""
    idx = sorted({round(k * (len(data) - 1) / max(1, sample - 1)) for k in range(min(sample, len(data)))})
    lens = [len(tokenizer.render_conversation(data[i], max_tokens=T + 1)[0]) for i in idx]
    return sum(lens) / len(lens) * len(data)


# ----------------------------------------------------------------------------- the stage

def main(ctx: StageContext) -> dict:
    from nanochat.loss_eval import evaluate_bpb

    cfg, dist, ev = ctx.cfg["mid_train"], ctx.dist, ctx.events
    check_positive("mid_train", cfg, "device_batch_size", "max_seq_len")
    device = dist.device
    tokenizer = load_tokenizer(ctx.run_dir)
    train, val = load_mixtures(ctx, "mid_train.mixture", cfg["val_examples"])

    model, optimizers, meta, resumed, src = start_model(ctx, "mid", ("base",), cfg["lr_frac"])
    model_config = meta["model_config"]
    B, T = cfg["device_batch_size"], cfg["max_seq_len"]
    if T > model_config["sequence_len"]:
        raise ConfigError(f"mid_train.max_seq_len = {T} is longer than the model's context "
                          f"({model_config['sequence_len']}); use at most that")
    tokens_per_fwdbwd = B * T * dist.world_size
    total_batch = cfg["total_batch_size"] if cfg["total_batch_size"] > 0 else \
        meta.get("total_batch_size", tokens_per_fwdbwd)  # -1: the base model's batch
    grad_accum = max(1, round(total_batch / tokens_per_fwdbwd))
    total_batch = grad_accum * tokens_per_fwdbwd
    num_iterations = cfg["num_iterations"] if cfg["num_iterations"] > 0 else \
        max(1, math.ceil(epoch_tokens(tokenizer, train, T) / total_batch))  # -1: about one epoch
    eval_every = cfg["eval_every"] if cfg["eval_every"] > 0 else num_iterations
    save_every = cfg["save_every"] if cfg["save_every"] > 0 else num_iterations
    print0(f"mixture {len(train):,} conversations | batch {total_batch:,} tokens ({grad_accum} accumulation steps) "
           f"| {num_iterations:,} steps")
    ev.emit("log", message="derived", mixture_size=len(train), val_size=len(val) if val else 0,
            total_batch_size=total_batch, grad_accum_steps=grad_accum, num_iterations=num_iterations, source=src)

    start_step = meta["step"] if resumed else 0
    loader_state = meta["loader_state"][dist.rank] if resumed else None
    train_loader = ConversationPacker(tokenizer, train, B, T, dist.rank, dist.world_size, device, state=loader_state)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=device)
    min_val_bpb = meta.get("min_val_bpb", float("inf")) if resumed else float("inf")
    train_time = meta.get("train_time_s", 0.0) if resumed else 0.0

    def val_bpb() -> float | None:
        if val is None:
            return None
        model.eval()
        loader = ConversationPacker(tokenizer, val, B, T, dist.rank, dist.world_size, device)
        steps = max(1, cfg["eval_tokens"] // tokens_per_fwdbwd)
        bpb = evaluate_bpb(model, loader, steps, token_bytes)
        model.train()
        return bpb

    # ---- training loop: constant LR, then a linear decay over the last 20% of the steps
    smooth_loss, last_val_bpb, train_loss = 0.0, None, None
    step = start_step
    model.train()
    while True:
        last = step == num_iterations
        if last or (step > start_step and step % eval_every == 0):
            last_val_bpb = val_bpb()
            if last_val_bpb is not None:
                min_val_bpb = min(min_val_bpb, last_val_bpb)
                print0(f"step {step:05d} | val bpb {last_val_bpb:.4f}")
                ev.eval(task="val", metric="bpb", value=last_val_bpb, step=step, phase="mid")
        stop = ctx.should_stop()
        if step > start_step and (last or stop or step % save_every == 0):
            save_phase(ctx, "mid", step, model, optimizers, model_config, min_val_bpb=min_val_bpb,
                       train_time_s=train_time, total_batch_size=total_batch, source=src,
                       loader_state=gather(dist, train_loader.state_dict()))
        if last or stop:
            break

        t0 = time.time()
        lrm = min(1.0, (num_iterations - step) / (0.2 * num_iterations))
        set_lr(optimizers, lrm, step)
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            x, y = next(train_loader)
            loss = model(x, y)
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        train_loss = (loss_sum / grad_accum).item()
        dt = time.time() - t0
        step += 1
        train_time += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step - start_step))
        eta = (num_iterations - step) * dt
        print0(f"step {step:05d}/{num_iterations:05d} | loss {debiased:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | "
               f"epoch {train_loader.epoch}")
        ev.step(step=step, total_steps=num_iterations, loss=train_loss, smooth_loss=debiased, lrm=lrm, dt=dt,
                tok_per_sec=total_batch / dt, tokens=step * total_batch, eta_s=eta, epoch=train_loader.epoch)

    return dict(steps_done=step, num_iterations=num_iterations, final_loss=train_loss, final_val_bpb=last_val_bpb,
                min_val_bpb=min_val_bpb if math.isfinite(min_val_bpb) else None, tokens=step * total_batch,
                total_batch_size=total_batch, train_time_s=train_time, mixture_size=len(train), source=src)


if __name__ == "__main__":
    stage_main("mid_train", main)
