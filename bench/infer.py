"""Inference speed: time to first token (TTFT) and decode tokens/s of the Engine at batch 1 and 8.

    python bench/infer.py                                   # random-init depth 4 (width 256), vocab 32768
    python bench/infer.py --depth 12 --prompt 256 --new 256 # on a GPU
    python bench/infer.py --ckpt RUN_DIR --stage sft        # a trained checkpoint (latest step)

TTFT is the time from the call until the first sampled token is in hand (prefill of the prompt at batch
1, cache replicated to the batch, one sampling step). Decode tok/s counts every row's tokens over the
remaining steps. Each figure is the median of --repeats runs after one warm-up run. A random-init model
never stops early (its stand-in tokenizer puts the stop tokens outside the vocabulary), so every run
decodes exactly --new steps. The last output line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanochat.common import autodetect_device_type  # noqa: E402
from nanochat.engine import SPECIALS, Engine  # noqa: E402
from nanochat.scaling import model_dims  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402


class StandInTokenizer:
    """Enough tokenizer for a random model: specials get ids past the vocabulary, so they are never sampled."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def get_vocab_size(self):
        return self.vocab_size

    def encode_special(self, name):
        return self.vocab_size + list(SPECIALS).index(name)

    def decode(self, ids):
        return ""

    def encode(self, text):
        return []


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(engine, prompt, batch, new_tokens, temperature, top_k):
    device = engine.device
    sync(device)
    t0 = time.perf_counter()
    steps = 0
    t_first = None
    for _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=temperature, top_k=top_k):
        steps += 1
        if steps == 1:
            sync(device)
            t_first = time.perf_counter()
    sync(device)
    t_end = time.perf_counter()
    return t_first - t0, (steps - 1) * batch / (t_end - t_first), steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="run directory or checkpoint phase directory (default: a random-init model)")
    p.add_argument("--stage", default="sft", help="checkpoint phase with --ckpt: base, mid, sft, rl")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=128, help="tokens to decode per run")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--model-forward", action="store_true",
                   help="decode through GPT.forward instead of the engine's one-token fast path (for comparison)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or autodetect_device_type())
    if args.ckpt:
        from nanochat.checkpoint import load_model
        model, tokenizer, _ = load_model(args.ckpt, args.stage, device=device)
        what = f"checkpoint {args.ckpt} ({args.stage})"
    else:
        config = GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab, **model_dims(args.depth, head_dim=args.head_dim))
        model = GPT(config).to(device)
        model.init_weights()
        model.eval()
        tokenizer = StandInTokenizer(args.vocab)
        what = f"random-init depth {args.depth}"
    cfg = model.config
    engine = Engine(model, tokenizer)
    engine.fast_decode = engine.fast_decode and not args.model_forward
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows, result = [], {"model": what, "device": str(device), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
                        "vocab_size": cfg.vocab_size, "prompt_tokens": args.prompt, "new_tokens": args.new,
                        "threads": torch.get_num_threads(), "fast_decode": engine.fast_decode, "dtype": str(engine.cache_dtype).replace("torch.", "")}
    for batch in [int(b) for b in args.batches.split(",")]:
        run_once(engine, prompt, batch, min(args.new, 16), args.temperature, args.top_k)  # warm-up
        runs = [run_once(engine, prompt, batch, args.new, args.temperature, args.top_k) for _ in range(args.repeats)]
        ttft = statistics.median(r[0] for r in runs)
        tps = statistics.median(r[1] for r in runs)
        rows.append((batch, ttft * 1000, tps, runs[0][2]))
        result[f"ttft_ms_b{batch}"] = round(ttft * 1000, 2)
        result[f"decode_tok_s_b{batch}"] = round(tps, 1)
    print(f"{what} on {device}: n_layer={cfg.n_layer} n_embd={cfg.n_embd} vocab={cfg.vocab_size} "
          f"prompt={args.prompt} tokens, {args.new} new, threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'TTFT ms':>9} {'decode tok/s':>13} {'steps':>6}")
    for batch, ttft_ms, tps, steps in rows:
        print(f"{batch:>5} {ttft_ms:>9.1f} {tps:>13.1f} {steps:>6}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
