"""Training throughput: steady-state tokens/s, model FLOP/s and MFU of a full training step.

    python bench/train.py --depth 4 --seq 512 --batch-tokens 4096 --vocab 32768 --head-dim 64
    python bench/train.py --depth 12 --compile          # on a GPU: always use --compile there

A step is forward + backward + both optimizers' step on random tokens (the same work base_train does per
micro-batch). Model FLOP/s = GPT.estimate_flops() x tokens/s. MFU is against the bf16 dense peak of
the GPU (table in nanochat.common); on a CPU, where no honest peak is known, it is the ratio to a plain
2048x2048 fp32 matmul measured in the same run, which also makes numbers comparable across machines.
The last line of output is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# idle OpenMP threads sleep instead of spinning: on a CPU shared with other processes, spinning threads
# steal the cores the busy ones need (1.3-1.5x faster steps here under load). Must precede import torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from nanochat.common import autodetect_device_type, default_compute_dtype  # noqa: E402
from nanochat.system import peak_flops  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.scaling import model_dims  # noqa: E402

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device, n=2048, dtype=torch.float32, seconds=1.0) -> float:
    """FLOP/s of a plain n x n matmul (the yardstick the model is compared against)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=out)
        iters += 1
        if device.type == "cuda" and iters % 50:
            continue
        sync(device)
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512, help="sequence length")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step (batch = this / seq)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--window-pattern", default="SSSL")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    ap.add_argument("--dtype", default=None, help="compute dtype: bfloat16 | float16 | float32 (default: per device)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (use it on GPU)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.batch_tokens % args.seq:
        ap.error(f"--batch-tokens {args.batch_tokens} must be a multiple of --seq {args.seq}")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(autodetect_device_type() if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if args.dtype and args.dtype not in dtypes:
        ap.error(f"--dtype {args.dtype!r}: allowed are {', '.join(dtypes)}")
    dtype = dtypes[args.dtype] if args.dtype else default_compute_dtype(device.type)

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=args.seq, vocab_size=args.vocab, window_pattern=args.window_pattern,
                       **model_dims(args.depth, args.aspect_ratio, args.head_dim))
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers()
    flops_per_token = model.estimate_flops()
    step_model = torch.compile(model, dynamic=False) if args.compile else model

    B, T = args.batch_tokens // args.seq, args.seq
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, args.vocab, (B, T + 1), generator=gen).to(device)
               for _ in range(args.warmup + args.steps)]  # fresh tokens every step, as in training

    def train_step(i):
        batch = batches[i]
        loss = step_model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    mm_before = matmul_flops(device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        train_step(i).item()
    sync(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = train_step(args.warmup + i).item()
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]  # median: robust to a neighbour's burst on a shared machine
    tok_s = args.batch_tokens / step_s
    model_flops = flops_per_token * tok_s

    # the yardstick is measured before and after the steps; the larger (the conservative ratio) is used
    mm_flops = max(mm_before, matmul_flops(device))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = peak_flops(device)  # bf16 dense peak by GPU name (nanochat.system); None on CPU
    mfu = model_flops / peak if peak else None
    groups = model.num_params_by_group()
    result = {
        "device": device_name, "dtype": str(dtype).removeprefix("torch."), "compile": args.compile,
        "depth": args.depth, "n_embd": config.n_embd, "n_head": config.n_head, "seq": T, "batch_tokens": args.batch_tokens,
        "vocab": args.vocab, "params": groups["total"], "flops_per_token": flops_per_token,
        "step_s": step_s, "tok_per_s": tok_s, "model_flops_per_s": model_flops,
        "matmul_2048_fp32_flops_per_s": mm_flops, "ratio_to_matmul": model_flops / mm_flops,
        "peak_flops": peak, "mfu": mfu, "final_loss": loss, "warmup_s": warmup_s,
        "load_avg_1m": os.getloadavg()[0],
    }
    rows = [
        ("device", device_name), ("dtype / compile", f"{result['dtype']} / {args.compile}"),
        ("model", f"d{args.depth}, n_embd {config.n_embd}, {config.n_head} heads, {groups['total'] / 1e6:.1f}M params"),
        ("batch", f"{B} x {T} = {args.batch_tokens} tokens"),
        ("step time (median)", f"{step_s * 1e3:.1f} ms  (warmup {warmup_s:.1f} s)"),
        ("tokens/s", f"{tok_s:,.0f}"),
        ("model FLOPs/token", f"{flops_per_token / 1e6:.1f} M"),
        ("model FLOP/s", f"{model_flops / 1e9:.1f} G"),
        ("2048^2 fp32 matmul FLOP/s", f"{mm_flops / 1e9:.1f} G"),
        ("model / matmul", f"{model_flops / mm_flops:.3f}"),
        ("MFU (bf16 peak)", f"{mfu:.1%}" if mfu is not None else "n/a (no peak for this device; see model / matmul)"),
        ("load average (1 min)", f"{result['load_avg_1m']:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
