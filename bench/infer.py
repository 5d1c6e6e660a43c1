"""Inference speed: time to first token (TTFT) and decode tokens/s of the Engine at batch 1 and 8.

    python bench/infer.py                                   # random-init depth 4 (width 256), vocab 32768
    python bench/infer.py --reference ../ref/nanochat       # and karpathy/nanochat's Engine, in turn
    python bench/infer.py --device cuda --depth 12 --decode graph   # on a GPU: the CUDA-graph decode step
    python bench/infer.py --ckpt RUN_DIR --stage sft        # a trained checkpoint (latest step)

TTFT is the time from the call until the first sampled token is in hand (prefill of the prompt at batch 1,
cache replicated to the batch, one sampling step). Decode tok/s counts every row's tokens over the remaining
steps. Each figure is the median of --repeats runs after one warm-up run. A random-init model never stops
early (the stand-in tokenizer puts the stop tokens outside the vocabulary), so every run decodes exactly
--steps tokens. --reference DIR builds the same random-init model with DIR's own code in DIR's own Python
(bench/side_by_side.py) and runs its Engine on the same prompt, one run of ours, one of theirs, so both see
the same load. The last output line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.side_by_side import StandInTokenizer, Reference, generate, matmul_flops  # noqa: E402
from nanochat.common import autodetect_device_type  # noqa: E402
from nanochat.scaling import model_dims  # noqa: E402
from nanochat.engine import SPECIALS, Engine  # noqa: E402
from nanochat.gpt import build_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="run directory or checkpoint phase directory (default: a random-init model)")
    p.add_argument("--stage", default="sft", help="checkpoint phase with --ckpt: base, mid, sft, rl")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    p.add_argument("--steps", "--new", dest="steps", type=int, default=128, help="tokens to decode per run")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best there is)")
    p.add_argument("--decode", default="auto", choices=["auto", "fast", "graph", "forward"],
                   help="the engine's one-token step: auto = graph on CUDA, fast on CPU; forward = GPT.forward")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (prefill and --decode forward)")
    p.add_argument("--reference", default=None, metavar="DIR", help="a karpathy/nanochat checkout to run side by side")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or autodetect_device_type())
    if args.ckpt:
        from nanochat.checkpoint import load_model
        model, tokenizer, _ = load_model(args.ckpt, args.stage, device=device)
        what = f"checkpoint {args.ckpt} ({args.stage})"
        if args.reference:
            p.error("--reference compares random-init models; leave out --ckpt")
    else:
        torch.manual_seed(0)
        model_config = dict(sequence_len=args.seq_len, vocab_size=args.vocab, window_pattern=args.window_pattern,
                            **model_dims(args.depth, head_dim=args.head_dim))
        model = build_model(model_config, device).eval()
        tokenizer = StandInTokenizer(args.vocab, SPECIALS)
        what = f"random-init depth {args.depth}"
    cfg = model.config
    engine = Engine(model, tokenizer)
    if args.decode != "auto":
        engine.decode = args.decode
    if args.compile:
        engine.model = torch.compile(model, dynamic=True)
    ref = Reference(args.reference, {"kind": "infer", "device": str(device), "threads": torch.get_num_threads(),
                                     "model": model_config, "specials": list(SPECIALS)}) if args.reference else None
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    sides = {"ours": lambda b, n: generate(engine, device, prompt, b, n, args.temperature, args.top_k)}
    if ref:
        sides["reference"] = lambda b, n: ref.call({"op": "generate", "prompt": prompt, "batch": b, "new": n,
                                                    "temperature": args.temperature, "top_k": args.top_k})
    result = {"model": what, "device": str(device), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
              "n_head": cfg.n_head, "vocab_size": cfg.vocab_size, "prompt_tokens": args.prompt,
              "new_tokens": args.steps, "temperature": args.temperature, "top_k": args.top_k,
              "threads": torch.get_num_threads(), "decode": engine.decode, "compile": args.compile,
              "dtype": str(engine.cache_dtype).replace("torch.", ""),
              "matmul_2048_fp32_flops_per_s": matmul_flops(device)}
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for side in sides.values():
            side(batch, min(args.steps, 16))  # warm-up
        runs = {name: [] for name in sides}
        for _ in range(args.repeats):  # ours, theirs, ours, ...: the same load for both
            for name, side in sides.items():
                runs[name].append(side(batch, args.steps))
        for name, rs in runs.items():
            key = "" if name == "ours" else "reference_"
            result[f"{key}ttft_ms_b{batch}"] = round(statistics.median(r["ttft_s"] for r in rs) * 1000, 2)
            result[f"{key}decode_tok_s_b{batch}"] = round(statistics.median(r["decode_tok_s"] for r in rs), 1)
            result[f"{key}decode_tok_s_b{batch}_runs"] = [round(r["decode_tok_s"], 1) for r in rs]
        if ref:
            result[f"speedup_b{batch}"] = round(result[f"decode_tok_s_b{batch}"] / result[f"reference_decode_tok_s_b{batch}"], 3)
        rows.append(batch)
    if ref:
        ref.close()
    result["load_avg_1m"] = os.getloadavg()[0]
    print(f"{what} on {device}: n_layer={cfg.n_layer} n_embd={cfg.n_embd} vocab={cfg.vocab_size} prompt={args.prompt} "
          f"tokens, {args.steps} new, T={args.temperature} top-k={args.top_k}, threads={torch.get_num_threads()}, "
          f"decode={engine.decode}, load {result['load_avg_1m']:.2f}")
    head = f"{'batch':>5} {'TTFT ms':>9} {'decode tok/s':>13}"
    if ref:
        head += f" {'ref TTFT ms':>12} {'ref tok/s':>10} {'ours/ref':>9}"
    print(head)
    for b in rows:
        line = f"{b:>5} {result[f'ttft_ms_b{b}']:>9.1f} {result[f'decode_tok_s_b{b}']:>13.1f}"
        if ref:
            line += (f" {result[f'reference_ttft_ms_b{b}']:>12.1f} {result[f'reference_decode_tok_s_b{b}']:>10.1f}"
                     f" {result[f'speedup_b{b}']:>8.2f}x")
        print(line)
    print(f"2048^2 fp32 matmul: {result['matmul_2048_fp32_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
