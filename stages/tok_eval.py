"""Evaluate the run's tokenizer: compression (UTF-8 bytes per token, higher is better) on several kinds of text.

    python -m stages.tok_eval --run-dir DIR

Kinds: `train` and `val` (samples of the corpus' training and held-out files) and a few short built-in
texts (English prose, Python code, math, other scripts) that show where the vocabulary is weak. One
`eval` event per kind: task "compression", metric "bytes_per_token", `text` = the kind, plus `bytes`
and `tokens`. Every sample is checked to decode back to itself.
"""
from __future__ import annotations

from nanochat.config import ConfigError
from nanochat.stage import StageContext, stage_main

SAMPLE_CHARS = 1_000_000  # of train / val text per evaluation

BUILTIN = {
    "prose": (
        "When the river froze that winter, the ferry stopped running and the village on the far bank had to "
        "make do with what it had stored. People shared firewood, the baker kept one oven lit for everyone, "
        "and the children skated to school across the ice. By March the thaw came quickly; within a week the "
        "ferryman was back at work, complaining about the price of rope as if nothing had happened."),
    "code": (
        "def moving_average(values: list[float], window: int = 3) -> list[float]:\n"
        "    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    out, total = [], sum(values[:window])\n"
        "    for i in range(window, len(values) + 1):\n"
        "        out.append(total / window)\n"
        "        if i < len(values):\n"
        "            total += values[i] - values[i - window]\n"
        "    return out\n"),
    "math": (
        "Let $f(x) = x^3 - 6x^2 + 11x - 6$. Then $f(1) = f(2) = f(3) = 0$, so $f(x) = (x-1)(x-2)(x-3)$. "
        "The derivative is $f'(x) = 3x^2 - 12x + 11$, which vanishes at $x = 2 \\pm \\frac{1}{\\sqrt{3}}$. "
        "Hence 12 * 7 = 84, 84 / 4 = 21, and 2^10 = 1024 while 0.125 + 0.375 = 0.5."),
    "multilingual": (
        "Der Zug nach Hamburg hat heute zwanzig Minuten Verspätung. "
        "Il fait beau aujourd'hui, allons nous promener au bord de la mer. "
        "Сегодня мы идём в библиотеку, чтобы вернуть книги. "
        "今日は雨が降っているので、家で本を読みます。"
        "我们明天早上八点在车站见面。"
        "오늘 저녁에 친구와 함께 영화를 볼 거예요. "
        "Η θάλασσα ήταν ήρεμη όλο το πρωί. 🙂🚆📚"),
}


def corpus_sample(files, max_chars: int) -> str:
    from nanochat.dataset import iter_documents
    parts, n = [], 0
    for text, _ in iter_documents(files):
        parts.append(text[: max_chars - n])
        n += len(parts[-1])
        if n >= max_chars:
            break
    return "\n\n".join(parts)


def main(ctx: StageContext) -> dict:
    from nanochat.config import check_data_dir
    from nanochat.dataset import list_data_files, split_files
    from nanochat.tokenizer import Tokenizer

    if not ctx.dist.master:
        return {}
    tok_dir = ctx.run_dir / "tokenizer"
    try:
        tok = Tokenizer.load(tok_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{e} (python -m stages.tok_train --run-dir {ctx.run_dir})") from None
    texts = dict(BUILTIN)
    try:
        files = list_data_files(check_data_dir(ctx.cfg))
        texts["train"] = corpus_sample(split_files(files, "train"), SAMPLE_CHARS)
        texts["val"] = corpus_sample(split_files(files, "val"), SAMPLE_CHARS)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        ctx.events.emit("log", message=f"corpus samples skipped: {e}")
    summary = {"vocab_size": tok.get_vocab_size()}
    for kind, text in texts.items():
        ids = tok.encode(text)
        if tok.decode(ids) != text:
            raise RuntimeError(f"the tokenizer does not round-trip the {kind!r} text")
        nbytes = len(text.encode("utf-8"))
        ratio = nbytes / max(1, len(ids))
        ctx.events.eval(task="compression", metric="bytes_per_token", value=round(ratio, 4), phase=None, text=kind,
                        bytes=nbytes, tokens=len(ids))
        summary[f"bytes_per_token_{kind}"] = round(ratio, 4)
        print(f"[tok_eval] {kind:>12}: {nbytes:>9,} bytes {len(ids):>8,} tokens {ratio:6.2f} bytes/token", flush=True)
    return summary


if __name__ == "__main__":
    stage_main("tok_eval", main)
