"""Scaling: everything a training run derives from `depth`, and the plan of a run before it starts.

`depth` is the one dial. From it (and aspect_ratio, head_dim):
- width = depth * aspect_ratio rounded up to a multiple of head_dim; heads = width // head_dim exactly.
- scaling parameters S = transformer matrices + lm_head (token embeddings, value embeddings and the
  per-layer scalars are left out: with them the fits of loss against compute are not clean).
- horizon D = target_param_data_ratio * S tokens (10.5 is compute-optimal for this model family).
- batch B = 2^19 * (D / D_ref)^0.383 tokens, rounded to a power of two, where D_ref is the horizon of
  d12 at the same ratio (the depth the hyperparameters were tuned at; B grows as D^0.383, "Power Lines").
- every learning rate * sqrt(B / 2^19), weight decay * sqrt(B / 2^19) * (D_ref / D): the configured
  values are the ones tuned at d12 with a 2^19 batch.
These are the rules of karpathy/nanochat as of July 2026 (scripts/base_train.py there).

Parameters are counted by building the GPT on the meta device (no memory, milliseconds), so the counts
are always the model's own. `plan(cfg)` puts it all together for `nanochat plan` and the TUI.
"""
from __future__ import annotations

import math
from functools import lru_cache

B_REF = 2 ** 19           # tokens per step at the reference depth
REF_DEPTH = 12
BATCH_EXPONENT = 0.383    # B_opt grows as D^0.383
ASSUMED_MFU = 0.40        # no GPU MFU has been measured by this project yet; labelled "assumed" wherever shown
PLAN_MARGIN = 1.10        # shards needed = 10% over the horizon: packing leaves some tokens unused


def model_dims(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> dict:
    """Width rounded up to whole heads of exactly head_dim channels: every depth >= 1 gives a valid model."""
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise ValueError(f"depth={depth}, aspect_ratio={aspect_ratio}, head_dim={head_dim} must all be >= 1")
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return {"n_layer": depth, "n_embd": n_embd, "n_head": n_head, "n_kv_head": n_head}


def model_config(bt: dict, vocab_size: int, depth: int | None = None) -> dict:
    """The GPTConfig dict of a resolved [base_train] section (at another depth when given)."""
    return dict(sequence_len=bt["max_seq_len"], vocab_size=vocab_size, window_pattern=bt["window_pattern"],
                **model_dims(depth or bt["depth"], bt["aspect_ratio"], bt["head_dim"]))


@lru_cache(maxsize=256)
def _count(items: tuple) -> tuple[dict, float]:
    import torch
    from nanochat.gpt import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig(**dict(items)))
    return model.num_params_by_group(), model.estimate_flops()


def count_params(model_cfg: dict) -> tuple[dict, float]:
    """(parameters by group, training FLOPs per token) of the GPT this config builds."""
    groups, flops = _count(tuple(sorted(model_cfg.items())))
    return dict(groups), flops


def scaling_params(groups: dict) -> int:
    return groups["matrices"] + groups["lm_head"]


def power_of_two(x: float) -> int:
    return 2 ** max(0, round(math.log2(x)))


def seq_len_for(depth: int) -> int:
    """Context for small models: 128 tokens per layer as a power of two, 2048 from d16 up."""
    return min(2048, 2 ** math.ceil(math.log2(128 * depth)))


def cadence(every: int, num_iterations: int, at_most: int) -> int:
    """-1: about three times a run, at most every `at_most` steps; 0: only at the end."""
    if every == 0:
        return num_iterations
    if every < 0:
        return max(1, min(at_most, num_iterations // 3))
    return every


def derive_base_train(bt: dict, vocab_size: int, world_size: int) -> dict:
    """A resolved copy of [base_train]: every -1 filled, learning rates and weight decay scaled.

    Raises ValueError (load_config makes it a ConfigError) when the batch cannot be split over the GPUs.
    """
    bt = dict(bt)
    if bt["max_seq_len"] < 0:
        bt["max_seq_len"] = seq_len_for(bt["depth"])
    T, ratio = bt["max_seq_len"], bt["target_param_data_ratio"]
    groups, flops = count_params(model_config(bt, vocab_size))
    S = scaling_params(groups)
    S_ref = scaling_params(count_params(model_config(bt, vocab_size, depth=REF_DEPTH))[0])
    target, d_ref = ratio * S, ratio * S_ref
    B = bt["total_batch_size"]
    if B < 0:
        B = max(T, power_of_two(B_REF * (target / d_ref) ** BATCH_EXPONENT))
    # device_batch_size is a memory ceiling: a batch smaller than one row per GPU at that size lowers it
    rows = B // (T * world_size)
    if rows < 1:
        raise ValueError(f"base_train.total_batch_size = {B} is less than one {T}-token row per GPU "
                         f"({world_size} GPUs); raise it or lower base_train.max_seq_len")
    bt["device_batch_size"] = min(bt["device_batch_size"], rows)
    per_step = bt["device_batch_size"] * T * world_size
    if B % per_step:
        raise ValueError(f"base_train.total_batch_size = {B} is not a multiple of device_batch_size x max_seq_len "
                         f"x GPUs = {per_step}; change base_train.device_batch_size or total_batch_size")
    if bt["num_iterations"] < 0:
        bt["num_iterations"] = max(1, round(target / B))
    N = bt["num_iterations"]
    if bt["hparam_scaling"]:
        lr_scale = math.sqrt(B / B_REF)
        for k in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr"):
            bt[k] *= lr_scale
        # D is the model's horizon (ratio x S), also when num_iterations cuts the run short: scaled by the steps
        # actually run, a 300-step d4 run got a weight decay of 23 (the reference's 0.24)
        bt["weight_decay"] *= lr_scale * d_ref / target
    bt["total_batch_size"] = B
    bt["eval_every"] = cadence(bt["eval_every"], N, 250)
    bt["save_every"] = cadence(bt["save_every"], N, 1000)
    bt["sample_every"] = cadence(bt["sample_every"], N, 2000)
    if bt["eval_tokens"] < 0:  # about 8 steps' worth, at most 10 M tokens
        bt["eval_tokens"] = min(10 * 2 ** 20, 8 * B)
    return bt


def derive(sections: dict) -> dict:
    """The resolved config: [base_train] derived from depth, and the later stages' -1 keys that follow it."""
    out = {s: dict(kv) for s, kv in sections.items()}
    run = out["run"]
    bt = out["base_train"] = derive_base_train(out["base_train"], out["tokenizer"]["vocab_size"],
                                               run["nproc_per_node"] * run["nnodes"])
    mid = out["mid_train"]
    for k in ("max_seq_len", "device_batch_size", "eval_tokens"):  # (its batch: the base checkpoint's, at run time)
        if mid[k] < 0:
            mid[k] = bt[k]
    if out["base_eval"]["bpb_tokens"] < 0:
        out["base_eval"]["bpb_tokens"] = bt["eval_tokens"]
    return out


# ------------------------------------------------------------------------------------------- the plan

def gpu_facts(gpu_type: str) -> tuple[float | None, float | None]:
    """(dense bf16 peak FLOP/s, typical USD per GPU-hour) of a GPU name, from nanochat/system.py's table."""
    from nanochat.system import gpu_spec
    spec = gpu_spec(gpu_type)
    return (spec[1], spec[2]) if spec else (None, None)


def tokens_per_shard(source: str) -> float | None:
    from nanochat.dataset import CHARS_PER_TOKEN, SOURCES
    return SOURCES[source].chars_per_shard / CHARS_PER_TOKEN if source in SOURCES else None


def plan(cfg) -> dict:
    """What a run of this resolved config will do: per training stage and in total. Plain data (JSON-able)."""
    run, bt, data = cfg["run"], cfg["base_train"], cfg["data"]
    gpus = run["nproc_per_node"] * run["nnodes"]
    mc = model_config(bt, cfg["tokenizer"]["vocab_size"])
    groups, flops_per_token = count_params(mc)
    B, N, T = bt["total_batch_size"], bt["num_iterations"], bt["max_seq_len"]
    tokens = N * B
    base = dict(model=mc, params=groups, scaling_params=scaling_params(groups), tokens=tokens,
                ratio=tokens / scaling_params(groups), total_batch_size=B, num_iterations=N,
                device_batch_size=bt["device_batch_size"], grad_accum=B // (bt["device_batch_size"] * T * gpus),
                flops_per_token=flops_per_token, total_flops=flops_per_token * tokens,
                matrix_lr=bt["matrix_lr"], embedding_lr=bt["embedding_lr"], weight_decay=bt["weight_decay"])
    stages = {"base_train": base}
    mid = cfg["mid_train"]
    if any(s.split(":")[0] == "mid_train" for s in run["stages"]):
        per = mid["device_batch_size"] * mid["max_seq_len"] * gpus
        batch = mid["total_batch_size"] if mid["total_batch_size"] > 0 else B
        stages["mid_train"] = dict(total_batch_size=batch, grad_accum=max(1, round(batch / per)),
                                   num_iterations=mid["num_iterations"] if mid["num_iterations"] > 0 else "one epoch")

    per_shard = tokens_per_shard(data["source"])
    shards = dict(source=data["source"], configured=data["num_shards"] if per_shard else None,
                  tokens_per_shard=per_shard, needed=None, covers=True)
    if per_shard:
        from nanochat.dataset import CHARS_PER_TOKEN, SOURCES
        shards["needed"] = math.ceil(PLAN_MARGIN * tokens / per_shard)
        shards["covers"] = data["num_shards"] >= shards["needed"]
        shards["assumption"] = (f"{SOURCES[data['source']].chars_per_shard / 1e6:.0f} M characters per shard, "
                                f"{CHARS_PER_TOKEN} characters per token, {PLAN_MARGIN - 1:.0%} margin; "
                                f"plus the validation shard")

    peak, price = gpu_facts(run["gpu_type"]) if run["device"] in ("auto", "cuda") else (None, None)
    if run["gpu_hourly_usd"] >= 0:
        price = run["gpu_hourly_usd"]
    hours = base["total_flops"] / (peak * gpus * ASSUMED_MFU) / 3600 if peak else None
    compute = dict(gpu_type=run["gpu_type"] if peak else run["device"], gpus=gpus, peak_flops=peak,
                   mfu=ASSUMED_MFU if peak else None, mfu_source="assumed" if peak else None,
                   base_train_hours=hours, usd_per_gpu_hour=price,
                   base_train_usd=hours * gpus * price if hours is not None and price is not None else None)
    return dict(profile=cfg.profile, stages=stages, data=shards, compute=compute)


def refusal(p: dict) -> str | None:
    """Why a run of this plan must not start (one line), or None: the configured data cannot cover the horizon."""
    d = p["data"]
    if not d["covers"]:
        return (f"data.num_shards = {d['configured']} ({d['source']}) cannot cover the "
                         f"{p['stages']['base_train']['tokens'] / 1e9:.2f} B-token horizon; "
                f"set data.num_shards = {d['needed']} or more")
    return None


def format_plan(p: dict) -> str:
    """The plan as a short human-readable table (plain text, no markup)."""
    b, d, c = p["stages"]["base_train"], p["data"], p["compute"]
    m, g = b["model"], b["params"]
    lines = [f"plan: profile {p['profile']}",
             f"model      d{m['n_layer']}: width {m['n_embd']}, {m['n_head']} heads of {m['n_embd'] // m['n_head']}, "
             f"context {m['sequence_len']}, vocab {m['vocab_size']:,}",
             f"params     total {g['total']:,} = matrices {g['matrices']:,} + lm_head {g['lm_head']:,} + "
             f"wte {g['wte']:,} + value_embeds {g['value_embeds']:,} + scalars {g['scalars']:,}",
             f"scaling    {b['scaling_params']:,} (matrices + lm_head); tokens {b['tokens']:,} = "
             f"{b['ratio']:.2f} x scaling params",
             f"base_train batch {b['total_batch_size']:,} tokens, {b['num_iterations']:,} steps, "
             f"{b['device_batch_size']} rows/GPU x {b['grad_accum']} accumulation; "
             f"matrix_lr {b['matrix_lr']:.4g}, weight_decay {b['weight_decay']:.4g}",
             f"compute    {b['flops_per_token']:.3e} FLOPs/token, {b['total_flops']:.3e} FLOPs in total"]
    if "mid_train" in p["stages"]:
        mt = p["stages"]["mid_train"]
        steps = f"{mt['num_iterations']:,} steps" if isinstance(mt["num_iterations"], int) else mt["num_iterations"]
        lines.append(f"mid_train  batch {mt['total_batch_size']:,} tokens x {mt['grad_accum']} accumulation, {steps}")
    if d["needed"] is not None:
        lines.append(f"data       {d['source']}: {d['needed']} shards needed, {d['configured']} configured "
                     f"({'covers' if d['covers'] else 'DOES NOT cover'} the horizon; {d['assumption']})")
    else:
        lines.append(f"data       {d['source']}: the configured directory (not counted)")
    if c["base_train_hours"] is not None:
        cost = f", ${c['base_train_usd']:,.0f}" if c["base_train_usd"] is not None else ", cost unknown"
        lines.append(f"time       base_train ~{c['base_train_hours']:.2f} h on {c['gpus']}x {c['gpu_type']} "
                     f"at {c['mfu']:.0%} MFU ({c['mfu_source']}){cost}")
    else:
        lines.append(f"time       no estimate on {c['gpu_type']} (no peak FLOP/s known)")
    return "\n".join(lines)
