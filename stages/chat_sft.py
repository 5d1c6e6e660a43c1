"""Supervised fine-tuning: one conversation per row, loss only on what the assistant should write.

    python -m stages.chat_sft --run-dir DIR [--set chat_sft.mixture='smoltalk:10000|identity'] [--resume]
    torchrun --nproc_per_node=8 -m stages.chat_sft --run-dir DIR

Unlike midtraining, rows are not packed: each row is one conversation, padded, so the model trains on
conversations exactly as it will see them at chat time (starting at BOS, nothing before or after).
Targets are -1 (ignored) everywhere the rendering mask is 0 — system, user and tool-output tokens and
padding — so only the assistant's tokens (text and calculator calls) are supervised. Each supervised
token weighs the same: the loss is summed over the step and divided by the step's supervised tokens.

Every `eval_every` steps: the loss on held-out conversations, and quick chat evals (`eval_tasks`,
accuracy on `eval_examples` problems each). Starts from mid (or base when there is no mid), writes sft.
"""
from __future__ import annotations

import math
import time

import torch

from nanochat.common import print0
from nanochat.config import ConfigError
from nanochat.stage import StageContext, stage_main
from nanochat.training import all_sum, check_positive, gather, load_mixtures, load_tokenizer, save_phase, set_lr, start_model


def collate(tokenizer, conversations, T: int, device):
    """(x, y) for a list of conversations, one per row, right-padded; y = -1 where not supervised."""
    rows = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in conversations]
    width = max(len(ids) for ids, _ in rows) - 1
    pad = tokenizer.get_bos_token_id()  # any id works: padded positions are never targets
    x = torch.full((len(rows), width), pad, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        ids, mask = torch.tensor(ids), torch.tensor(mask)
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = torch.where(mask[1:] == 1, ids[1:], -1)
    return x.to(device), y.to(device)


class RowLoader:
    """Rank r takes examples r, r + world_size, ... of the (already shuffled) mixture, B at a time,
    cycling epochs. The state is the next index, so a resumed loader gives the same batches."""

    def __init__(self, tokenizer, data, B: int, T: int, rank: int, world_size: int, device, state=None):
        if len(data) <= rank:
            raise ValueError(f"the mixture has {len(data)} conversations: too few for rank {rank} of {world_size}")
        self.tokenizer, self.data, self.B, self.T, self.device = tokenizer, data, B, T, device
        self.rank, self.world_size = rank, world_size
        self.cursor, self.epoch = (state["cursor"], state["epoch"]) if state else (rank, 1)

    def __next__(self):
        convs = []
        for _ in range(self.B):
            if self.cursor >= len(self.data):
                self.cursor, self.epoch = self.rank, self.epoch + 1
            convs.append(self.data[self.cursor])
            self.cursor += self.world_size
        return collate(self.tokenizer, convs, self.T, self.device)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch}


@torch.no_grad()
def val_loss(model, tokenizer, data, B: int, T: int, dist) -> float:
    """Mean loss per supervised token over `data` (split across ranks)."""
    loss_sum = count = 0.0
    for i in range(dist.rank * B, len(data), B * dist.world_size):
        x, y = collate(tokenizer, [data[j] for j in range(i, min(i + B, len(data)))], T, dist.device)
        loss_sum += model(x, y, loss_reduction="sum").item()
        count += (y >= 0).sum().item()
    loss_sum, count = all_sum(dist, loss_sum, count)
    return loss_sum / max(count, 1)


# ----------------------------------------------------------------------------- quick chat evals
# (scored by nanochat/chat_eval.py, as the chat_eval stage does)

def eval_task_list(spec: str, what: str) -> list[tuple[str, object]]:
    """[(name, task)] for a '|'-separated spec of sources: their validation/test split, or their examples
    as they are for sources without one (identity, customjson). A source that is missing is reported
    and left out: a quick eval must not end a training run."""
    from nanochat.tasks.mixture import build_task, parse_spec
    if not spec.strip():
        return []
    try:
        entries = parse_spec(spec)
    except ValueError as e:
        raise ConfigError(f"{what} = {spec!r}: {e}") from None
    tasks = []
    for name, arg, _ in entries:
        try:
            task = build_task(name, arg, split="val") or build_task(name, arg, split="train")
        except (OSError, ValueError) as e:
            print0(f"quick eval {name} skipped: {e}")
            continue
        if task is not None and len(task):
            tasks.append((name + (f":{arg}" if arg and name != "customjson" else ""), task))
    return tasks


# ----------------------------------------------------------------------------- the stage

def main(ctx: StageContext) -> dict:
    from nanochat.chat_eval import evaluate_chat_task
    from nanochat.engine import Engine

    cfg, dist, ev = ctx.cfg["chat_sft"], ctx.dist, ctx.events
    check_positive("chat_sft", cfg, "device_batch_size", "examples_per_step", "num_epochs")
    device = dist.device
    tokenizer = load_tokenizer(ctx.run_dir)
    train, val = load_mixtures(ctx, "chat_sft.mixture", cfg["eval_examples"])
    eval_tasks = eval_task_list(cfg["eval_tasks"], "chat_sft.eval_tasks")

    model, optimizers, meta, resumed, src = start_model(ctx, "sft", ("mid", "base"), cfg["lr_frac"])
    model_config = meta["model_config"]
    B, T = cfg["device_batch_size"], model_config["sequence_len"]
    grad_accum = max(1, round(cfg["examples_per_step"] / (B * dist.world_size)))
    examples_per_step = grad_accum * B * dist.world_size
    num_iterations = cfg["num_iterations"] if cfg["num_iterations"] > 0 else \
        max(1, cfg["num_epochs"] * len(train) // examples_per_step)
    eval_every = cfg["eval_every"] if cfg["eval_every"] > 0 else num_iterations
    save_every = cfg["save_every"] if cfg["save_every"] > 0 else num_iterations
    print0(f"mixture {len(train):,} conversations | {examples_per_step} per step ({grad_accum} accumulation steps) "
           f"| {num_iterations:,} steps | from {src}")
    ev.emit("log", message="derived", mixture_size=len(train), val_size=len(val) if val else 0,
            examples_per_step=examples_per_step, grad_accum_steps=grad_accum, num_iterations=num_iterations,
            source=src, eval_tasks=[name for name, _ in eval_tasks])

    start_step = meta["step"] if resumed else 0
    loader = RowLoader(tokenizer, train, B, T, dist.rank, dist.world_size, device,
                       state=meta["loader_state"][dist.rank] if resumed else None)
    train_time = meta.get("train_time_s", 0.0) if resumed else 0.0
    tokens_seen = meta.get("tokens", 0) if resumed else 0  # supervised tokens trained on so far

    def evaluate(step: int) -> dict:
        model.eval()
        # a fresh Engine each time: an Engine may keep copies of weights, which training has changed since
        engine = Engine(model, tokenizer)
        results = {}
        if val is not None:
            results["val_loss"] = val_loss(model, tokenizer, val, B, T, dist)
            ev.eval(task="val", metric="loss", value=results["val_loss"], step=step, phase="sft")
        for name, task in eval_tasks:  # greedy replies, or the best letter for multiple choice
            outcomes = evaluate_chat_task(task, model, tokenizer, engine, device, cfg["eval_examples"],
                                          max_new_tokens=cfg["eval_max_tokens"], temperature=0.0, top_k=None)
            results[name] = sum(outcomes) / max(1, len(outcomes))
            ev.eval(task=name, metric="acc", value=results[name], step=step, phase="sft", n=len(outcomes))
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in results.items()))
        model.train()
        return results

    # ---- training loop: the learning rate decays linearly to zero
    results, train_loss, first_results = {}, None, None
    step = start_step
    model.train()
    while True:
        last = step == num_iterations
        if last or step % eval_every == 0 and (step > start_step or not resumed):
            results = evaluate(step)  # also before the first step: the "before" of this stage
            first_results = first_results or results
        stop = ctx.should_stop()
        if step > start_step and (last or stop or step % save_every == 0):
            save_phase(ctx, "sft", step, model, optimizers, model_config, train_time_s=train_time, source=src,
                       tokens=tokens_seen,
                       examples_per_step=examples_per_step, loader_state=gather(dist, loader.state_dict()),
                       **{f"eval_{k}": v for k, v in results.items()})
        if last or stop:
            break

        t0 = time.time()
        lrm = 1.0 - step / num_iterations
        set_lr(optimizers, lrm)
        batches = [next(loader) for _ in range(grad_accum)]
        # token-level normalisation over the whole step, across ranks (the optimizers average gradients
        # over ranks, hence the world_size)
        local_tokens = sum(int((y >= 0).sum()) for _, y in batches)
        (global_tokens,) = all_sum(dist, local_tokens)
        scale = dist.world_size / max(global_tokens, 1)
        loss_sum = 0.0
        for x, y in batches:
            loss = model(x, y, loss_reduction="sum")
            (loss * scale).backward()
            loss_sum += loss.item()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        (loss_sum,) = all_sum(dist, loss_sum)
        train_loss = loss_sum / max(global_tokens, 1)
        dt = time.time() - t0
        step += 1
        train_time += dt
        tokens_seen += int(global_tokens)
        if not math.isfinite(train_loss):
            print0(f"step {step:05d} | loss is {train_loss}: training diverged")
        print0(f"step {step:05d}/{num_iterations:05d} | loss {train_loss:.4f} | lrm {lrm:.2f} | "
               f"tokens {int(global_tokens)} | dt {dt * 1000:.0f}ms")
        ev.step(step=step, total_steps=num_iterations, loss=train_loss, lrm=lrm, dt=dt,
                tok_per_sec=global_tokens / dt, tokens=tokens_seen, eta_s=(num_iterations - step) * dt,
                epoch=loader.epoch)

    return dict(steps_done=step, num_iterations=num_iterations, final_loss=train_loss, tokens=tokens_seen,
                final_val_loss=results.get("val_loss"), train_time_s=train_time, mixture_size=len(train),
                source=src, evals={k: v for k, v in results.items() if k != "val_loss"},
                evals_before={k: v for k, v in (first_results or {}).items() if k != "val_loss"})


if __name__ == "__main__":
    stage_main("chat_sft", main)
