"""Training throughput: steady-state tokens/s, model FLOP/s and MFU of a full training step, as base_train runs it.

    python bench/train.py                                      # d4 / head 64 / seq 512 / 4,096-token batches / 32k vocab
    python bench/train.py --reference ../ref/nanochat          # and karpathy/nanochat on the same batches, in turn
    python bench/train.py --device cuda --depth 12 --compile   # on a GPU: always use --compile there

A step is forward + backward + every optimizer's step + zero_grad on real tokenised text, packed into rows the
way base_train's loader packs them: the shared enwiki (--data, found next to the checkout) or else the demo
corpus, with a tokenizer trained on it. Model FLOP/s = GPT.estimate_flops() x tokens/s. MFU is against the bf16
dense peak of the GPU (nanochat.common); on a CPU, where no honest peak is known, the figure to compare across
machines is the ratio to a plain 2048x2048 fp32 matmul measured in the same run.

--reference DIR runs the same steps on the reference (DIR's own model and optimizer, compiled as its
scripts/base_train.py does, in DIR's own Python; see bench/side_by_side.py), one step of ours, one of theirs,
so both see the same load; the table gains its column and the ratio. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# idle OpenMP threads sleep instead of spinning: on a CPU shared with other processes, spinning threads
# steal the cores the busy ones need (1.3-1.5x faster steps here under load). Must precede import torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.side_by_side import Reference, matmul_flops, sync, train_step  # noqa: E402
from nanochat.common import autodetect_device_type, default_compute_dtype  # noqa: E402
from nanochat.system import peak_flops  # noqa: E402
from nanochat.scaling import model_dims  # noqa: E402
from nanochat.gpt import build_model  # noqa: E402

ENWIKI = [REPO / "shared" / "data" / "pretrain_enwiki", REPO.parent / "shared" / "data" / "pretrain_enwiki"]


def real_batches(data: str | None, n: int, B: int, T: int, vocab: int, workdir: Path) -> tuple[list, str]:
    """n (x, y) batches of real text as base_train's PackingLoader packs it, with a tokenizer of `vocab` tokens
    trained on the same files. -> (batches, what was read)."""
    from nanochat.dataloader import PackingLoader
    from nanochat.dataset import iter_documents, list_data_files
    from nanochat.tokenizer import Tokenizer
    found = [Path(data)] if data else [p for p in ENWIKI if p.is_dir()]
    if found:
        files, what = list_data_files(found[0]), str(found[0])
    else:
        from nanochat.demo_corpus import make_demo_corpus
        files, what = make_demo_corpus(workdir / "demo"), "the demo corpus"
    train = files[:-1] if len(files) > 1 else files
    tok = Tokenizer.train_from_iterator((t for t, _ in iter_documents(train)), vocab, doc_cap=10_000,
                                        max_chars=20_000_000)
    loader = PackingLoader(tok, train, B, T)
    return [next(loader) for _ in range(n)], f"{what} ({tok.get_vocab_size():,}-token BPE)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512, help="sequence length")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step (batch = this / seq)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--window-pattern", default="L", help="as base_train's default (nanochat.toml)")
    ap.add_argument("--data", default=None, help="data directory (default: the shared enwiki if present, else the demo corpus)")
    ap.add_argument("--random-ids", action="store_true", help="uniform random token ids instead of real text")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    ap.add_argument("--dtype", default=None, help="compute dtype: bfloat16 | float16 | float32 (default: per device)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (use it on GPU)")
    ap.add_argument("--reference", default=None, metavar="DIR", help="a karpathy/nanochat checkout to run side by side")
    ap.add_argument("--reference-eager", action="store_true", help="do not compile the reference (its base_train does)")
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

    B, T, n = args.batch_tokens // args.seq, args.seq, args.warmup + args.steps
    workdir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if args.random_ids:
        gen = torch.Generator().manual_seed(1)
        rows = [torch.randint(0, args.vocab, (B, T + 1), generator=gen) for _ in range(n)]
        batches, data = [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows], "uniform random ids"
    else:
        batches, data = real_batches(args.data, n, B, T, args.vocab, workdir)

    torch.manual_seed(0)
    model_config = dict(sequence_len=T, vocab_size=args.vocab, window_pattern=args.window_pattern,
                        **model_dims(args.depth, args.aspect_ratio, args.head_dim))
    model = build_model(model_config, device)
    model.compute_dtype = dtype
    optimizers = model.setup_optimizers()
    flops_per_token = model.estimate_flops()
    step_model = torch.compile(model, dynamic=False) if args.compile else model
    ref = None
    if args.reference:
        torch.save(batches, workdir / "batches.pt")
        ref = Reference(args.reference, {"kind": "train", "device": str(device), "threads": torch.get_num_threads(),
                                         "model": model_config, "batches": str(workdir / "batches.pt"),
                                         "compile": not args.reference_eager})

    def ours(i):
        x, y = (t.to(device) for t in batches[i])
        return train_step(step_model, optimizers, x, y)

    mm_before = matmul_flops(device)
    times, ref_times, losses = [], [], []
    for i in range(n):  # one step of ours, one of the reference's: the same load for both
        dt, loss = ours(i)
        losses.append(loss)
        if i >= args.warmup:
            times.append(dt)
        if ref:
            r = ref.call({"op": "step", "i": i})
            if i >= args.warmup:
                ref_times.append(r["step_s"])
    if ref:
        ref.close()
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731  robust to a neighbour's burst on a shared machine
    step_s = median(times)
    tok_s = args.batch_tokens / step_s
    model_flops = flops_per_token * tok_s

    # the yardstick is measured before and after the steps; the larger (the conservative ratio) is used
    mm_flops = max(mm_before, matmul_flops(device))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = peak_flops(device)  # bf16 dense peak by GPU name (nanochat.system); None on CPU
    mfu = model_flops / peak if peak else None
    groups = model.num_params_by_group()
    result = {
        "device": device_name, "dtype": str(dtype).removeprefix("torch."), "compile": args.compile, "data": data,
        "depth": args.depth, "n_embd": model_config["n_embd"], "n_head": model_config["n_head"], "seq": T,
        "batch_tokens": args.batch_tokens, "vocab": args.vocab, "window_pattern": args.window_pattern,
        "params": groups["total"], "flops_per_token": flops_per_token,
        "step_s": step_s, "tok_per_s": tok_s, "model_flops_per_s": model_flops,
        "matmul_2048_fp32_flops_per_s": mm_flops, "ratio_to_matmul": model_flops / mm_flops,
        "peak_flops": peak, "mfu": mfu, "final_loss": losses[-1], "step_times_s": times,
        "load_avg_1m": os.getloadavg()[0],
    }
    if ref:
        ref_step = median(ref_times)
        result.update(reference=str(args.reference), reference_compile=not args.reference_eager,
                      reference_step_s=ref_step, reference_tok_per_s=args.batch_tokens / ref_step,
                      reference_step_times_s=ref_times, speedup=ref_step / step_s)
    rows = [
        ("device", device_name), ("dtype / compile", f"{result['dtype']} / {args.compile}"),
        ("data", data),
        ("model", f"d{args.depth}, n_embd {model_config['n_embd']}, {model_config['n_head']} heads, "
                  f"window {args.window_pattern}, {groups['total'] / 1e6:.1f}M params"),
        ("batch", f"{B} x {T} = {args.batch_tokens} tokens, {args.warmup} warm-up + {args.steps} timed steps"),
        ("step time (median)", f"{step_s * 1e3:.1f} ms"),
        ("tokens/s", f"{tok_s:,.0f}"),
        ("model FLOPs/token", f"{flops_per_token / 1e6:.1f} M"),
        ("model FLOP/s", f"{model_flops / 1e9:.1f} G"),
        ("2048^2 fp32 matmul FLOP/s", f"{mm_flops / 1e9:.1f} G"),
        ("model / matmul", f"{model_flops / mm_flops:.3f}"),
        ("MFU (bf16 peak)", f"{mfu:.1%}" if mfu is not None else "n/a (no peak for this device; see model / matmul)"),
    ]
    if ref:
        rows += [("reference step time (median)", f"{ref_step * 1e3:.1f} ms"
                  f"  ({'compiled' if not args.reference_eager else 'eager'}, same batches, in turn)"),
                 ("reference tokens/s", f"{args.batch_tokens / ref_step:,.0f}"),
                 ("ours / reference", f"{result['speedup']:.2f}x")]
    rows.append(("load average (1 min)", f"{result['load_avg_1m']:.2f}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
