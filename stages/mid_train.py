"""Midtraining: the base model keeps pretraining, now on conversations, to learn the chat format.

    python -m stages.mid_train --run-dir DIR [--set mid_train.mixture='smoltalk|identity*2'] [--resume]
    torchrun --nproc_per_node=8 -m stages.mid_train --run-dir DIR

Conversations from the task mixture (`mid_train.mixture`, see nanochat/tasks/mixture.py) are rendered
to tokens, special tokens included, and packed into rows like pretraining text: every row starts with
BOS, whole conversations are fitted best-first, and every token is a target. This is where the model
first sees <|user_start|>, <|assistant_start|>, multiple-choice answers and calculator calls; SFT then
only has to polish. Starts from the latest base checkpoint, writes checkpoints/mid.
"""
from __future__ import annotations

import math
import time

import torch

from nanochat.common import print0
from nanochat.config import ConfigError
from nanochat.dataloader import ConversationPacker
from nanochat.stage import StageContext, stage_main
from nanochat.training import check_positive, gather, load_mixtures, load_tokenizer, save_phase, set_lr, start_model


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
