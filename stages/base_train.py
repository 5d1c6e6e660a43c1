"""Pretraining: the base model on the corpus, with `depth` as the one dial.

    python -m stages.base_train --run-dir DIR [--set base_train.depth=12] [--resume]
    torchrun --nproc_per_node=8 -m stages.base_train --run-dir DIR

The global batch is fixed in tokens; gradient accumulation makes up whatever the processes don't
fit in one forward/backward, so 1 process and N processes follow the same trajectory.
SIGTERM/SIGINT: finish the step, checkpoint, exit (resume with --resume).
"""
from __future__ import annotations

import math
import time

import torch

from nanochat.checkpoint import ckpt_dir, latest_step, load_checkpoint, save_checkpoint
from nanochat.common import print0
from nanochat.config import ConfigError, check_data_dir
from nanochat.gpt import build_model
from nanochat.scaling import model_config as derived_model_config
from nanochat.stage import StageContext, stage_main
from nanochat.system import peak_flops
from nanochat.training import (SAMPLE_PROMPTS, check_train_dtype, gather, load_tokenizer, muon_momentum,
                               sample_greedy, set_lr, weight_decay_frac)


def lr_multiplier(step: int, num_iterations: int, warmup: int, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup over `warmup` steps, constant, then linear warmdown over the last warmdown_ratio of
    the run to final_lr_frac."""
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / max(1, warmdown)
    return progress + (1 - progress) * final_lr_frac


def main(ctx: StageContext) -> dict:
    from nanochat.dataloader import PackingLoader
    from nanochat.dataset import list_data_files
    from nanochat.loss_eval import evaluate_bpb

    cfg, dist, ev = ctx.cfg["base_train"], ctx.dist, ctx.events
    device = dist.device
    tokenizer = load_tokenizer(ctx.run_dir)
    files = list_data_files(check_data_dir(ctx.cfg))
    if len(files) < 2:
        raise ConfigError(f"need at least 2 data files (train + validation), found {len(files)} in "
                          f"{files[0].parent if files else 'the data dir'}")
    train_files, val_files = files[:-1], files[-1:]

    # ---- model: everything derived from depth (nanochat/scaling.py filled the config; `nanochat plan` shows it)
    T, B = cfg["max_seq_len"], cfg["device_batch_size"]
    model_config = derived_model_config(cfg, tokenizer.get_vocab_size())
    model = build_model(model_config, device)
    check_train_dtype(model, device)
    num_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.estimate_flops()

    tokens_per_fwdbwd = B * T * dist.world_size
    total_batch, num_iterations = cfg["total_batch_size"], cfg["num_iterations"]
    if total_batch % tokens_per_fwdbwd:
        raise ConfigError(f"base_train.total_batch_size = {total_batch:,} is not a multiple of {tokens_per_fwdbwd:,} "
                          f"tokens per forward/backward on {dist.world_size} processes; set run.nproc_per_node "
                          f"to the processes this stage runs on, or change base_train.device_batch_size")
    grad_accum = total_batch // tokens_per_fwdbwd
    eval_every, save_every = cfg["eval_every"], cfg["save_every"]
    print0(f"params {num_params:,} | {flops_per_token:.3e} FLOPs/token | batch {total_batch:,} tokens "
           f"({grad_accum} accumulation steps) | {num_iterations:,} steps | {num_iterations * total_batch:,} tokens")
    ev.emit("log", message="derived", num_params=num_params, flops_per_token=flops_per_token,
            total_batch_size=total_batch, grad_accum_steps=grad_accum, num_iterations=num_iterations,
            model_config=model_config, params_by_group=model.num_params_by_group())

    optimizers = model.setup_optimizers(unembedding_lr=cfg["unembedding_lr"], embedding_lr=cfg["embedding_lr"],
                                        matrix_lr=cfg["matrix_lr"], scalar_lr=cfg["scalar_lr"],
                                        weight_decay=cfg["weight_decay"])

    # ---- resume
    ckdir = ckpt_dir(ctx.run_dir, "base")
    start_step, loader_state, min_val_bpb, elapsed_before = 0, None, float("inf"), 0.0
    if ctx.resume and latest_step(ckdir) is not None:
        model_state, optim_state, meta = load_checkpoint(ckdir, device=device, rank=dist.rank, load_optim=True)
        if meta["model_config"] != model_config:
            raise ConfigError(f"the checkpoint in {ckdir} was trained with a different model config "
                              f"({meta['model_config']}); resume with the same settings")
        model.load_state_dict(model_state)
        for opt, state in zip(optimizers, optim_state["optimizers"]):
            opt.load_state_dict(state)
        start_step = meta["step"]
        loader_state = meta["loader_state"][dist.rank]
        min_val_bpb = meta.get("min_val_bpb", float("inf"))
        elapsed_before = meta.get("train_time_s", 0.0)
        print0(f"resumed from step {start_step}")
        ev.emit("log", message=f"resumed from step {start_step}", step=start_step)

    fp8 = cfg["fp8"]
    if fp8:  # before compile; the optimizers hold the same Parameter objects either way
        from nanochat.fp8 import bf16_linears, convert_to_fp8, fp8_unavailable
        why = fp8_unavailable(device)
        if why:
            raise ConfigError(why)
        print0(f"fp8 training: {convert_to_fp8(model)} linear layers in float8 (tensorwise scaling)")
    train_loader = PackingLoader(tokenizer, train_files, B, T, dist.rank, dist.world_size, device, state=loader_state)
    step_model = model
    if device.type == "cuda" and cfg["compile"]:
        step_model = torch.compile(model, dynamic=False)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=device)
    peak = peak_flops(device)

    def val_bpb() -> float:
        model.eval()
        loader = PackingLoader(tokenizer, val_files, B, T, dist.rank, dist.world_size, device)
        steps = max(1, cfg["eval_tokens"] // tokens_per_fwdbwd)
        if fp8:  # evaluate in bf16, like every other run
            with bf16_linears(model):
                bpb = evaluate_bpb(model, loader, steps, token_bytes)
        else:
            bpb = evaluate_bpb(model, loader, steps, token_bytes)
        model.train()
        return bpb

    def save(step: int):
        meta = dict(model_config=model_config, loader_state=gather(dist, train_loader.state_dict()),
                    min_val_bpb=min_val_bpb, train_time_s=train_time, num_params=num_params,
                    tokenizer_dir=str(ctx.run_dir / "tokenizer"), total_batch_size=total_batch)
        path = save_checkpoint(ckdir, step, model.state_dict(),
                               {"optimizers": [o.state_dict() for o in optimizers]}, meta,
                               rank=dist.rank, world_size=dist.world_size, keep_last=3)
        ev.checkpoint(step=step, path=str(path))

    # ---- training loop
    train_time, smooth_loss, last_val_bpb = elapsed_before, 0.0, None
    timed_steps = 0  # steps in train_time this attempt (MFU of the whole stage)
    step = start_step
    model.train()
    while True:
        last = step == num_iterations
        if last or (step > start_step and step % eval_every == 0):
            last_val_bpb = val_bpb()
            min_val_bpb = min(min_val_bpb, last_val_bpb)
            print0(f"step {step:05d} | val bpb {last_val_bpb:.4f}")
            ev.eval(task="val", metric="bpb", value=last_val_bpb, step=step, phase="base")
        if dist.master and cfg["sample_every"] > 0 and step > start_step and (step % cfg["sample_every"] == 0 or last):
            model.eval()
            for prompt in SAMPLE_PROMPTS:
                ev.sample(prompt=prompt, text=sample_greedy(model, tokenizer, prompt, 16, device), step=step)
            model.train()
        stop = ctx.should_stop()
        if step > start_step and (last or stop or step % save_every == 0):
            save(step)
        if last or stop:
            break

        # one optimizer step: grad_accum forward/backward passes
        t0 = time.time()
        lrm = lr_multiplier(step, num_iterations, cfg["warmup_steps"], cfg["warmdown_ratio"], cfg["final_lr_frac"])
        set_lr(optimizers, lrm, momentum=muon_momentum(step, num_iterations, cfg["warmdown_ratio"]),
               wd_frac=weight_decay_frac(step, num_iterations))
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            x, y = next(train_loader)
            loss = step_model(x, y)  # the model applies its compute dtype (bf16 on CUDA) itself
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        train_loss = (loss_sum / grad_accum).item()  # the sync point: also makes dt honest on CUDA
        dt = time.time() - t0
        step += 1

        if step - start_step > 1:  # the first step pays for compilation and warmup
            train_time += dt
            timed_steps += 1
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step - start_step))
        tok_per_sec = total_batch / dt
        flops_per_sec = flops_per_token * tok_per_sec
        mfu = flops_per_sec / (peak * dist.world_size) if peak else None
        eta = (num_iterations - step) * dt
        if not math.isfinite(train_loss):
            print0(f"step {step:05d} | loss is {train_loss}: training diverged")
        print0(f"step {step:05d}/{num_iterations:05d} | loss {debiased:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | "
               f"tok/s {tok_per_sec:,.0f} | " + (f"mfu {mfu * 100:.1f}% | " if mfu else "") + f"eta {eta / 60:.1f}m")
        ev.step(step=step, total_steps=num_iterations, loss=train_loss, smooth_loss=debiased, lrm=lrm, dt=dt,
                tok_per_sec=tok_per_sec, flops_per_sec=flops_per_sec, mfu=mfu, tokens=step * total_batch, eta_s=eta)

    tokens = step * total_batch
    return dict(num_params=num_params, flops_per_token=flops_per_token, tokens=tokens,
                total_flops=flops_per_token * tokens, num_iterations=num_iterations, steps_done=step,
                total_batch_size=total_batch, min_val_bpb=min_val_bpb, final_val_bpb=last_val_bpb,
                train_time_s=train_time, depth=cfg["depth"], model_config=model_config,
                mfu=(flops_per_token * timed_steps * total_batch / (train_time - elapsed_before)
                     / (peak * dist.world_size)) if peak and timed_steps else None)


if __name__ == "__main__":
    stage_main("base_train", main)
