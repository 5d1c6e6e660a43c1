"""Reinforcement learning: the SFT model practises GSM8K and is rewarded for right answers.

    python -m stages.chat_rl --run-dir DIR [--set chat_rl.task=gsm8k] [--resume]
    torchrun --nproc_per_node=8 -m stages.chat_rl --run-dir DIR

On-policy policy gradient, a simplified GRPO: each step takes `examples_per_step` questions (split
across ranks), samples `num_samples` answers to each with the Engine (calculator tool included), and
scores every answer with the task's reward (GSM8K: 1 if the final number is right). An answer's
advantage is its reward minus the mean reward of its question's samples, so only the differences
between attempts at the same question teach anything. The loss is -advantage * log p(token), summed
over the tokens the model sampled (not the prompt, not forced tool output) and divided by the number of
such tokens in the step. Always on-policy with one update per batch, so no ratio clipping and no KL.

Every `eval_every` steps: pass@k on `eval_examples` held-out problems with `eval_samples` samples each.
Starts from sft (falling back to mid, then base), writes rl.
"""
from __future__ import annotations

import time

import torch

from nanochat.common import print0
from nanochat.config import ConfigError
from nanochat.stage import StageContext, stage_main
from nanochat.training import all_sum, check_positive, load_mixtures, load_tokenizer, save_phase, set_lr, start_model


def completions(engine, tokenizer, conversation, num_samples: int, max_tokens: int, temperature: float,
                top_k: int | None, seed: int) -> list[str]:
    """Sampled (or greedy, temperature 0) replies to the conversation's last user turn."""
    prompt = tokenizer.render_for_completion(conversation)
    budget = min(max_tokens, engine.context - len(prompt))
    if budget < 1:
        return [""] * num_samples
    seqs, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=budget, temperature=temperature,
                                    top_k=top_k, seed=seed)
    return [tokenizer.decode(s[len(prompt):]) for s in seqs]


def judge_of(data, i: int):
    return data.task_of(i) if hasattr(data, "task_of") else data


def rollouts(engine, tokenizer, data, i: int, cfg: dict, seed: int):
    """num_samples answers to question i -> (sequences, masks, rewards); sequences hold prompt + answer."""
    conv = data[i]
    prompt = tokenizer.render_for_completion(conv)
    budget = min(cfg["max_new_tokens"], engine.context - len(prompt))
    if budget < 1:
        return [], [], []
    seqs, masks = [], []
    for c in range(0, cfg["num_samples"], cfg["device_batch_size"]):  # generate in device-sized batches
        s, m = engine.generate_batch(prompt, num_samples=min(cfg["device_batch_size"], cfg["num_samples"] - c),
                                     max_tokens=budget, temperature=cfg["temperature"],
                                     top_k=cfg["top_k"] if cfg["top_k"] > 0 else None, seed=seed + c)
        seqs += s
        masks += m
    judge = judge_of(data, i)
    rewards = [float(judge.reward(conv, tokenizer.decode(s[len(prompt):]))) for s in seqs]
    return seqs, masks, rewards


def pg_batch(seqs, masks, advantages, device):
    """Rows of (input, target, advantage): targets -1 except where the model sampled the token."""
    width = max(len(s) for s in seqs) - 1
    x = torch.zeros((len(seqs), width), dtype=torch.long)
    y = torch.full((len(seqs), width), -1, dtype=torch.long)
    for r, (s, m) in enumerate(zip(seqs, masks)):
        s, m = torch.tensor(s), torch.tensor(m)
        x[r, :len(s) - 1] = s[:-1]
        y[r, :len(s) - 1] = torch.where(m[1:] == 1, s[1:], -1)
    return x.to(device), y.to(device), torch.tensor(advantages, dtype=torch.float32, device=device)


@torch.no_grad()
def pass_at_k(engine, tokenizer, data, n: int, k: int, cfg: dict, seed: int, dist) -> list[float]:
    """[pass@1, ..., pass@k] on the first n problems (split across ranks): the fraction of problems
    with at least one right answer among the first j samples."""
    hits = [0] * k
    n = min(n, len(data))
    for i in range(dist.rank, n, dist.world_size):
        conv = data[i]
        replies = completions(engine, tokenizer, conv, k, cfg["max_new_tokens"], cfg["temperature"],
                              cfg["top_k"] if cfg["top_k"] > 0 else None, seed=seed + i)
        judge = judge_of(data, i)
        right = [bool(judge.evaluate(conv, r)) for r in replies]
        for j in range(k):
            hits[j] += any(right[:j + 1])
    return [h / max(n, 1) for h in all_sum(dist, *hits)]


def main(ctx: StageContext) -> dict:
    from nanochat.engine import Engine

    cfg, dist, ev = ctx.cfg["chat_rl"], ctx.dist, ctx.events
    check_positive("chat_rl", cfg, "device_batch_size", "examples_per_step", "num_samples", "max_new_tokens",
                   "eval_samples", "num_epochs")
    if cfg["examples_per_step"] % dist.world_size:
        raise ConfigError(f"chat_rl.examples_per_step = {cfg['examples_per_step']} must be a multiple of the "
                          f"number of processes ({dist.world_size})")
    device = dist.device
    tokenizer = load_tokenizer(ctx.run_dir)
    seed = ctx.cfg["run"]["seed"]
    train, val = load_mixtures(ctx, "chat_rl.task", cfg["eval_examples"])

    model, optimizers, meta, resumed, src = start_model(ctx, "rl", ("sft", "mid", "base"), cfg["lr_frac"])
    model_config = meta["model_config"]
    E = cfg["examples_per_step"]
    num_iterations = cfg["num_iterations"] if cfg["num_iterations"] > 0 else max(1, cfg["num_epochs"] * len(train) // E)
    eval_every = cfg["eval_every"] if cfg["eval_every"] > 0 else num_iterations
    save_every = cfg["save_every"] if cfg["save_every"] > 0 else num_iterations
    print0(f"{len(train):,} questions | {E} questions x {cfg['num_samples']} samples per step | "
           f"{num_iterations:,} steps | from {src}")
    ev.emit("log", message="derived", num_questions=len(train), num_iterations=num_iterations, source=src)
    start_step = meta["step"] if resumed else 0
    train_time = meta.get("train_time_s", 0.0) if resumed else 0.0
    tokens_seen = meta.get("tokens", 0) if resumed else 0  # sampled tokens trained on so far
    k = cfg["eval_samples"]

    def evaluate(step: int) -> dict:
        if val is None:
            return {}
        model.eval()
        engine = Engine(model, tokenizer)  # fresh: an Engine may keep copies of weights training has changed
        passes = pass_at_k(engine, tokenizer, val, cfg["eval_examples"], k, cfg, seed=seed + 7919, dist=dist)
        model.train()
        out = {}
        for j in sorted({1, k}):
            out[f"pass@{j}"] = passes[j - 1]
            ev.eval(task=cfg["task"], metric=f"pass@{j}", value=passes[j - 1], step=step, phase="rl",
                    n=min(cfg["eval_examples"], len(val)))
        print0(f"step {step:05d} | " + " | ".join(f"{m} {v:.4f}" for m, v in out.items()))
        return out

    results, first_results, rewards_log, loss = {}, None, [], None
    step = start_step
    model.train()
    while True:
        last = step == num_iterations
        if last or step % eval_every == 0 and (step > start_step or not resumed):
            results = evaluate(step)
            first_results = first_results or results
        stop = ctx.should_stop()
        if step > start_step and (last or stop or step % save_every == 0):
            save_phase(ctx, "rl", step, model, optimizers, model_config, train_time_s=train_time, source=src,
                       tokens=tokens_seen,
                       **{f"eval_{m}": v for m, v in results.items()})
        if last or stop:
            break

        t0 = time.time()
        # ---- rollouts: this rank's questions, several samples each (the step number fixes them all)
        model.eval()
        engine = Engine(model, tokenizer)
        seqs, masks, advantages, rewards = [], [], [], []
        for j in range(dist.rank, E, dist.world_size):
            i = (step * E + j) % len(train)
            s, m, r = rollouts(engine, tokenizer, train, i, cfg, seed=(seed * 1_000_003 + step * E + j) * 1024)
            if not r:
                continue
            mean = sum(r) / len(r)
            seqs += s
            masks += m
            rewards += r
            advantages += [x - mean for x in r]
        model.train()
        gen_time = time.time() - t0

        # ---- policy gradient: rows with zero advantage carry no signal and are skipped
        rows = [n for n, a in enumerate(advantages) if a != 0.0]
        local_tokens = sum(sum(masks[n][1:]) for n in rows)
        global_tokens, reward_sum, reward_count = all_sum(dist, local_tokens, sum(rewards), len(rewards))
        scale = dist.world_size / max(global_tokens, 1)
        lrm = 1.0 - step / num_iterations
        set_lr(optimizers, lrm)
        pg_sum = torch.zeros((), device=device)
        B = cfg["device_batch_size"]
        for b in range(0, len(rows), B):
            chunk = rows[b:b + B]
            x, y, adv = pg_batch([seqs[n] for n in chunk], [masks[n] for n in chunk],
                                 [advantages[n] for n in chunk], device)
            logp = -model(x, y, loss_reduction="none")  # (rows, T); 0 where the target is -1
            objective = (logp * adv[:, None]).sum()
            (-objective * scale).backward()
            pg_sum += objective.detach()
        if not rows:  # nothing to learn here: zero gradients keep this rank's optimizer step in line
            (sum(p.sum() for p in model.parameters()) * 0.0).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        (pg_total,) = all_sum(dist, pg_sum.item())
        loss = -pg_total / max(global_tokens, 1)
        mean_reward = reward_sum / max(reward_count, 1)
        rewards_log.append(mean_reward)
        dt = time.time() - t0
        step += 1
        train_time += dt
        tokens_seen += int(global_tokens)
        print0(f"step {step:05d}/{num_iterations:05d} | reward {mean_reward:.4f} | loss {loss:+.5f} | lrm {lrm:.2f} | "
               f"tokens {int(global_tokens)} | dt {dt * 1000:.0f}ms (generation {gen_time * 1000:.0f}ms)")
        ev.step(step=step, total_steps=num_iterations, loss=loss, reward=mean_reward, lrm=lrm, dt=dt,
                gen_s=gen_time, tokens=tokens_seen, eta_s=(num_iterations - step) * dt)

    head = rewards_log[:max(1, len(rewards_log) // 4)]
    tail = rewards_log[-max(1, len(rewards_log) // 4):]
    return dict(steps_done=step, num_iterations=num_iterations, final_loss=loss, train_time_s=train_time, tokens=tokens_seen,
                source=src, num_questions=len(train),
                reward_first=sum(head) / len(head) if rewards_log else None,
                reward_last=sum(tail) / len(tail) if rewards_log else None,
                evals=results, evals_before=first_results or {})


if __name__ == "__main__":
    stage_main("chat_rl", main)
