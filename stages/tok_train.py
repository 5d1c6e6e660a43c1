"""Train the run's BPE tokenizer on the training split of the corpus; save it to <run_dir>/tokenizer/.

    python -m stages.tok_train --run-dir DIR [--set tokenizer.vocab_size=32768 ...]

Config `[tokenizer]`: `vocab_size` (bytes + merges + 9 special tokens), `max_chars` (characters of
training text read, in corpus order), `doc_cap` (characters kept per document). Progress goes out as
`log` events (phase read/count/merge); the `end` summary has the vocabulary size, what was read and
the time. Training is one process: under torchrun, ranks other than 0 have nothing to do.
"""
from __future__ import annotations

import time

from nanochat.common import print0
from nanochat.config import ConfigError, check_data_dir
from nanochat.stage import StageContext, stage_main


def train_files(ctx: StageContext):
    """The training split (every data file but the last, which is held out for validation)."""
    from nanochat.dataset import data_files
    try:
        return data_files(check_data_dir(ctx.cfg), "train")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def main(ctx: StageContext) -> dict:
    from nanochat.dataset import iter_documents
    from nanochat.tokenizer import Tokenizer

    if not ctx.dist.master:
        return {}
    cfg = ctx.cfg["tokenizer"]
    files = train_files(ctx)
    out_dir = ctx.run_dir / "tokenizer"
    ctx.events.emit("log", message=f"training a {cfg['vocab_size']}-token tokenizer on up to {cfg['max_chars']:,} "
                                   f"characters of {len(files)} files", files=len(files))
    t0, last = time.time(), [0.0]

    def progress(phase: str, done: int, total: int):
        if ctx.stop_requested:
            return False
        now = time.time()
        if phase == "read" or now - last[0] >= 1.0 or done == total:  # merges report every 1%: keep ~1/s
            last[0] = now
            what = {"read": "characters read", "count": "distinct chunks", "merge": "merges"}[phase]
            message = f"{what}: {done:,}" + (f" / {total:,}" if total and phase != "count" else "")
            print0(f"[tok_train] {message} ({now - t0:.1f}s)")
            ctx.events.emit("log", message=message, phase=phase, done=done, total=total, elapsed_s=round(now - t0, 2))
        return True

    replacement_chars = [0]  # invalid UTF-8 in the files arrives here already replaced by nanochat.dataset

    def texts():
        for text, _ in iter_documents(files):
            replacement_chars[0] += text.count("\ufffd")
            yield text
    try:
        tok = Tokenizer.train_from_iterator(texts(), cfg["vocab_size"], progress,
                                            doc_cap=cfg["doc_cap"], max_chars=cfg["max_chars"])
    except InterruptedError:
        return {}  # stop requested: nothing half-trained is saved
    except ValueError as e:  # e.g. an empty corpus
        raise ConfigError(str(e)) from None
    train_time = time.time() - t0
    tok.save(out_dir)
    st = tok.train_stats
    ctx.events.emit("log", message=f"learnt {st['merges']:,} merges in {train_time:.1f}s", phase="done",
                    merges=st["merges"], elapsed_s=round(train_time, 2))
    if replacement_chars[0]:
        ctx.events.emit("log", message=f"{replacement_chars[0]:,} U+FFFD characters in the training text "
                                       "(invalid UTF-8 in the data files, replaced when read)")
    if tok.get_vocab_size() < cfg["vocab_size"]:
        ctx.events.emit("log", message=f"the corpus ran out of pairs: vocabulary is {tok.get_vocab_size()} "
                                       f"instead of {cfg['vocab_size']}")
    lengths = [b for b in tok.token_bytes() if b]
    summary = dict(vocab_size=tok.get_vocab_size(), merges=st["merges"], train_chars=st["chars"],
                   train_docs=st["docs"], train_bytes=st["bytes"], capped_docs=st["capped_docs"],
                   replaced_utf8=st["replaced"], replacement_chars=replacement_chars[0], unique_chunks=st["unique_chunks"], train_time_s=round(train_time, 3),
                   mean_token_bytes=round(sum(lengths) / len(lengths), 3), max_token_bytes=max(lengths),
                   tokenizer_dir=str(out_dir))
    print0(f"[tok_train] saved {out_dir}: {summary}")
    return summary


if __name__ == "__main__":
    stage_main("tok_train", main)
