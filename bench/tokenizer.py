"""Tokenizer training benchmark: our Rust trainer vs PyPI `rustbpe` vs HuggingFace `tokenizers`.

    python bench/tokenizer.py                                  # ../shared/data/pretrain_enwiki, vocab 32768, 2 threads
    python bench/tokenizer.py --data DIR --vocab-size 65536 --threads 8 --repeats 3

The corpus is the training split of DIR read by nanochat.dataset (for WikiExtractor files: <doc> bodies
of at least 300 characters, HTML unescaped), each document cut to --doc-cap characters, up to --max-chars.
Every trainer gets the same list of strings, the same split pattern and the same number of threads, in
its own subprocess, so that its peak memory (ru_maxrss) is its own; a "load only" subprocess gives the
memory the corpus itself takes. Time is the training call alone, best of --repeats (the CPU may be
shared). Merges are "identical" when both trainers give the same bytes for every token id and encode a
sample to the same ids. Encode throughput: our tokenizer (tiktoken) over the whole corpus, batched.
The last line of output is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pretrain_enwiki"
TRAINERS = ("load", "ours", "rustbpe", "hf")
SAMPLE = "It's 2024: naïve café owners said \"we'll see\" — 12345 times! 中文字符 😀👍🏽\n\n  x = f(y) + 3.14"


def load_corpus(data: Path, doc_cap: int, max_chars: int) -> list[str]:
    from nanochat.dataset import iter_documents, list_data_files, split_files
    files = list_data_files(data)
    docs, n = [], 0
    for text, _ in iter_documents(split_files(files, "train") if len(files) > 1 else files):
        docs.append(text[: min(doc_cap, max_chars - n)])
        n += len(docs[-1])
        if n >= max_chars:
            break
    return docs


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak() -> float | None:
    """Resets the kernel's peak-RSS mark (Linux: clear_refs 5) and returns the current RSS in MB, so that
    VmHWM afterwards is the peak of what follows; None where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mb("VmRSS")
    except OSError:
        return None


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def write_corpus(docs: list[str], path: Path) -> None:
    """Length-prefixed UTF-8, so that a worker holds only the strings, never a second copy of the file."""
    with open(path, "wb") as f:
        for d in docs:
            b = d.encode("utf-8")
            f.write(len(b).to_bytes(8, "little") + b)


def read_corpus(path: Path) -> list[str]:
    docs = []
    with open(path, "rb") as f:
        while n := f.read(8):
            docs.append(f.read(int.from_bytes(n, "little")).decode("utf-8"))
    return docs


def worker(name: str, corpus: Path, vocab_size: int, threads: int, out: Path) -> None:
    """Runs in a subprocess: one training of one trainer; writes its figures and vocabulary to `out`."""
    from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer, train_merges
    docs = read_corpus(corpus)
    before = reset_peak()
    t0 = time.perf_counter()
    if name == "ours":
        merges, _ = train_merges(docs, vocab_size - 256, num_threads=threads)
        seconds = time.perf_counter() - t0
        tok = Tokenizer(merges)
        vocab, sample = tok.vocab, tok.encode(SAMPLE)
    elif name == "rustbpe":
        import rustbpe
        ref = rustbpe.Tokenizer()
        ref.train_from_iterator(iter(docs), vocab_size, pattern=SPLIT_PATTERN)
        seconds = time.perf_counter() - t0
        vocab = [bytes(b) for b, _ in sorted(ref.get_mergeable_ranks(), key=lambda kv: kv[1])]
        sample = ref.encode(SAMPLE)
    elif name == "hf":
        from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
        hf = HFTokenizer(models.BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(docs, trainer)
        seconds = time.perf_counter() - t0
        vocab, sample = [], []
    else:  # load only: the corpus' own share of the peak memory
        seconds, vocab, sample = 0.0, [], []
    growth = _status_mb("VmHWM") - before if before is not None else None
    result = dict(seconds=seconds, peak_mb=peak_mb(), growth_mb=growth, vocab=[v.hex() for v in vocab], sample=sample)
    out.write_text(json.dumps(result))


def run_worker(name: str, corpus: Path, args, tmp: Path) -> dict:
    out = tmp / f"{name}.json"
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="true")
    subprocess.run([sys.executable, __file__, "--worker", name, "--corpus", str(corpus), "--vocab-size",
                    str(args.vocab_size), "--threads", str(args.threads), "--out", str(out)], env=env, check=True)
    return json.loads(out.read_text())


def encode_throughput(docs: list[str], vocab_hex: list[str], threads: int) -> dict:
    """Our tokenizer's batched tiktoken encoding over the whole corpus (results discarded batch by batch)."""
    from nanochat.tokenizer import Tokenizer
    vocab = [bytes.fromhex(h) for h in vocab_hex]
    index = {b: i for i, b in enumerate(vocab)}
    merges = []  # recover the merge pairs from the token bytes: the first split whose halves came earlier
    for i, b in enumerate(vocab[256:], start=256):
        merges.append(next((index[b[:k]], index[b[k:]]) for k in range(1, len(b))
                           if index.get(b[:k], i) < i and index.get(b[k:], i) < i))
    tok = Tokenizer(merges)
    assert tok.vocab == vocab
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    t0, ntok = time.perf_counter(), 0
    for i in range(0, len(docs), 1024):
        ntok += sum(map(len, tok.encode(docs[i:i + 1024], num_threads=threads)))
    seconds = time.perf_counter() - t0
    return {"encode_s": seconds, "encode_mb_per_s": nbytes / 1e6 / seconds, "encode_tokens": ntok,
            "bytes_per_token": nbytes / ntok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus directory (read by nanochat.dataset)")
    ap.add_argument("--vocab-size", type=int, default=32768, help="256 bytes + merges (no special tokens here)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--doc-cap", type=int, default=5000, help="characters kept per document")
    ap.add_argument("--max-chars", type=int, default=50_000_000)
    ap.add_argument("--repeats", type=int, default=3, help="trainings per trainer; the best time counts")
    ap.add_argument("--skip", default="", help="comma-separated trainers to leave out: rustbpe,hf")
    ap.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.corpus, args.vocab_size, args.threads, args.out)
    if not args.data.is_dir():
        sys.exit(f"bench/tokenizer.py: error: corpus directory {args.data} does not exist; pass --data DIR")
    if args.vocab_size < 257:
        sys.exit("bench/tokenizer.py: error: --vocab-size must be at least 257")

    docs = load_corpus(args.data, args.doc_cap, args.max_chars)
    nchars = sum(map(len, docs))
    print(f"corpus: {len(docs):,} documents, {nchars:,} characters from {args.data} "
          f"(doc cap {args.doc_cap:,}); vocab {args.vocab_size:,}, {args.threads} threads, best of {args.repeats}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.bin"
        write_corpus(docs, corpus)
        for name in TRAINERS:
            if name in skip:
                continue
            runs = [run_worker(name, corpus, args, tmp) for _ in range(1 if name == "load" else args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            best["peak_mb"] = max(r["peak_mb"] for r in runs)
            best["growth_mb"] = None if None in [r["growth_mb"] for r in runs] else max(r["growth_mb"] for r in runs)
            best["all_seconds"] = [round(r["seconds"], 3) for r in runs]
            results[name] = best
            if name != "load":
                print(f"  {name:>8}: {', '.join(f'{s:.2f}s' for s in best['all_seconds'])}", flush=True)

    ours = results["ours"]
    base_mb = results["load"]["peak_mb"]
    identical = None
    if "rustbpe" in results:
        identical = ours["vocab"] == results["rustbpe"]["vocab"] and ours["sample"] == results["rustbpe"]["sample"]
    enc = encode_throughput(docs, ours["vocab"], args.threads)

    print(f"\n{'trainer':<22}{'train s':>9}{'peak MB':>9}{'training +MB':>14}{'time / ours':>13}")
    labels = {"ours": "ours (nanochat)", "rustbpe": "rustbpe 0.1.0 (PyPI)", "hf": "HF tokenizers"}
    for name in ("ours", "rustbpe", "hf"):
        if name in results:
            r = results[name]
            growth = "n/a" if r["growth_mb"] is None else f"{r['growth_mb']:.0f}"
            print(f"{labels[name]:<22}{r['seconds']:>9.2f}{r['peak_mb']:>9.0f}{growth:>14}{r['seconds'] / ours['seconds']:>12.2f}x")
    print(f"(peak MB: ru_maxrss of the trainer's process, which first loads the corpus: {base_mb:.0f} MB alone; "
          "training +MB: peak RSS growth during the training call)")
    if identical is not None:
        print(f"merges identical to rustbpe: {identical}")
    print(f"encode (tiktoken, {args.threads} threads): {enc['encode_mb_per_s']:.1f} MB/s, "
          f"{enc['encode_tokens']:,} tokens, {enc['bytes_per_token']:.2f} bytes/token")

    summary = {"corpus_docs": len(docs), "corpus_chars": nchars, "vocab_size": args.vocab_size,
               "threads": args.threads, "repeats": args.repeats, "load_peak_mb": round(base_mb, 1)}
    for name in ("ours", "rustbpe", "hf"):
        if name in results:
            summary[f"{name}_s"] = round(results[name]["seconds"], 3)
            summary[f"{name}_peak_mb"] = round(results[name]["peak_mb"], 1)
            g = results[name]["growth_mb"]
            summary[f"{name}_train_growth_mb"] = None if g is None else round(g, 1)
            if name != "ours":
                summary[f"speedup_vs_{name}"] = round(results[name]["seconds"] / ours["seconds"], 2)
    summary["merges_identical"] = identical
    summary.update({k: round(v, 3) if isinstance(v, float) else v for k, v in enc.items()})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
