"""The BPE tokenizer: trained by our Rust trainer (rustbpe/, loaded with ctypes), run by tiktoken.

    tok = Tokenizer.train_from_iterator(texts, vocab_size=32768)   # texts: any iterable of str (or bytes)
    tok.save(run_dir / "tokenizer"); tok = Tokenizer.load(run_dir / "tokenizer")
    ids = tok.encode("hello", prepend="<|bos|>"); tok.decode(ids)
    ids, mask = tok.render_conversation({"messages": [...]})

Byte-level BPE in the GPT-4 style: text is first cut into chunks by SPLIT_PATTERN (digits in groups
of at most 2), then merges never cross chunks. Token ids: 0..255 are the bytes, then one id per
merge in the order learnt, then the 9 special tokens. A saved tokenizer is plain JSON (the merges as
id pairs), so loading one never runs code.
"""
from __future__ import annotations

import codecs
import copy
import ctypes
import importlib.machinery
import json
import os
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import tiktoken

from nanochat.common import atomic_write

SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = [
    "<|bos|>",            # starts every document
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",      # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",      # the tool's output, written back into the context
]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
FILE_NAME = "tokenizer.json"
FORMAT = "nanochat-bpe-v1"

# ----------------------------------------------------------------------------- the Rust library

_ProgressFn = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint64)
_STATS = ("docs", "chars", "bytes", "replaced", "capped_docs", "limit_reached", "chunks", "unique_chunks")
_ERRORS = {-1: "bad arguments", -2: "internal error (a Rust panic)", -3: "stopped by the progress callback",
           -4: "this trainer has already trained"}
_lib = None


def _rust() -> ctypes.CDLL:
    """The compiled trainer, nanochat/_rustbpe*.so, built by `pip install -e .` (needs cargo)."""
    global _lib
    if _lib is None:
        here = Path(__file__).resolve().parent
        found = [here / f"_rustbpe{s}" for s in importlib.machinery.EXTENSION_SUFFIXES if (here / f"_rustbpe{s}").exists()]
        if not found:
            raise ImportError(f"the Rust BPE trainer is not built (no {here}/_rustbpe*.so): "
                              "run `pip install -e .` in the repository (it needs cargo)")
        lib = ctypes.CDLL(str(found[0]))
        P, u8p, u32p, u64p = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        for name, res, args in [
            ("rb_trainer_new", P, [ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint64]),
            ("rb_trainer_free", None, [P]),
            ("rb_trainer_feed", ctypes.c_int64, [P, u8p, ctypes.c_size_t, u64p, ctypes.c_size_t]),
            ("rb_trainer_train", ctypes.c_int64, [P, ctypes.c_uint32, _ProgressFn, u32p]),
            ("rb_trainer_stats", ctypes.c_size_t, [P, u64p, ctypes.c_size_t]),
            ("rb_split", ctypes.c_int64, [u8p, ctypes.c_size_t, u64p, ctypes.c_size_t]),
            ("rb_char_class", ctypes.c_uint32, [ctypes.c_uint32]),
            ("rb_unicode_version", ctypes.c_char_p, []),
        ]:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _lib = lib
    return _lib


def split_text(text: str) -> list[str]:
    """The Rust pre-tokeniser's chunks of `text` (the same as regex.findall(SPLIT_PATTERN, text))."""
    data = text.encode("utf-8")
    ends = (ctypes.c_uint64 * max(1, len(data)))()
    n = _rust().rb_split(data, len(data), ends, len(ends))
    if n < 0:
        raise RuntimeError(f"rb_split failed: {_ERRORS.get(n, n)}")
    bounds = [0, *ends[:n]]
    return [data[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:])]


def char_class(cp: int) -> int:
    """How the pre-tokeniser sees a codepoint: 0 other, 1 letter (\\p{L}), 2 number (\\p{N}), 3 space (\\s)."""
    return _rust().rb_char_class(cp)


def unicode_version() -> str:
    """The Unicode version of the pre-tokeniser's character tables."""
    return _rust().rb_unicode_version().decode()


def _to_utf8(doc: str | bytes) -> tuple[bytes, int]:
    """UTF-8 bytes of a document and how many lone surrogates were replaced (bytes pass as they are:
    the Rust side replaces and counts their invalid sequences)."""
    if isinstance(doc, (bytes, bytearray, memoryview)):
        return bytes(doc), 0
    if not isinstance(doc, str):
        raise TypeError(f"tokenizer training texts must be str or bytes, got {type(doc).__name__}")
    try:
        return doc.encode("utf-8"), 0
    except UnicodeEncodeError:  # lone surrogates (e.g. from surrogateescape): U+FFFD, like invalid bytes
        fixed = doc.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed.encode("utf-8"), fixed.count("\ufffd") - doc.count("\ufffd")


def train_merges(texts: Iterable[str | bytes], n_merges: int, progress: Callable | None = None, *,
                 doc_cap: int = 0, max_chars: int = 0, num_threads: int | None = None,
                 buffer_bytes: int | None = None) -> tuple[list[tuple[int, int]], dict]:
    """Learn up to `n_merges` BPE merges from `texts` -> (merges as id pairs, statistics).

    Texts are streamed to Rust in buffers of about `buffer_bytes` (default: 8 MB, or 1 MB per thread
    with more threads), so the corpus never has to fit in memory. Each text is cut to `doc_cap` characters, and reading stops after `max_chars` characters
    (0: no limit). `progress(phase, done, total)` is called with phase "read" (characters so far),
    "count" (distinct chunks) and "merge" (merges so far); if it returns False, training stops with
    InterruptedError. Invalid UTF-8 in bytes texts becomes U+FFFD and is counted in stats["replaced"].
    """
    lib = _rust()
    num_threads = num_threads or len(os.sched_getaffinity(0))
    buffer_bytes = buffer_bytes or max(8 << 20, num_threads << 20)
    trainer = lib.rb_trainer_new(num_threads, max(0, doc_cap or 0), max(0, max_chars or 0))
    error: list[BaseException] = []

    def report(phase, done, total) -> bool:
        if progress is None:
            return True
        try:
            return progress(phase, done, total) is not False
        except BaseException as e:  # an exception must not cross the C boundary: stop, re-raise below
            error.append(e)
            return False

    def stats() -> dict:
        out = (ctypes.c_uint64 * len(_STATS))()
        lib.rb_trainer_stats(trainer, out, len(out))
        return dict(zip(_STATS, out))

    def feed(data: bytes, lens: array) -> bool:
        """Counts one buffer (on the feeder thread: ctypes releases the GIL); True once max_chars is hit."""
        c_lens = (ctypes.c_uint64 * len(lens)).from_buffer(lens)
        rc = lib.rb_trainer_feed(trainer, data, len(data), c_lens, len(lens))
        if rc < 0:
            raise RuntimeError(f"rustbpe feed failed: {_ERRORS.get(rc, rc)}")
        return rc == 1

    try:
        # Rust counts one buffer on a feeder thread while this thread pulls the next one from the iterator
        with ThreadPoolExecutor(1, thread_name_prefix="rustbpe-feed") as feeder:
            replaced, buf, lens, size, pending, limit = 0, [], array("Q"), 0, None, False

            def wait() -> bool:  # for the buffer in flight; -> max_chars reached. stats() is safe between feeds
                nonlocal pending
                if pending is None:
                    return False
                reached, pending = pending.result(), None
                if not report("read", stats()["chars"], max_chars or 0):
                    raise error[0] if error else InterruptedError("tokenizer training was stopped")
                return reached

            def submit() -> bool:
                nonlocal pending
                if wait():
                    return True
                pending = feeder.submit(feed, b"".join(buf), lens)
                return False

            for doc in texts:
                data, bad = _to_utf8(doc)
                replaced += bad
                buf.append(data)
                lens.append(len(data))
                size += len(data)
                if size >= buffer_bytes:
                    limit = submit()
                    if limit:
                        break
                    buf, lens, size = [], array("Q"), 0
            if buf and not limit:
                submit()
            wait()
        st = stats()
        st["replaced"] += replaced
        if st["chars"] == 0:
            raise ValueError("the tokenizer training corpus is empty: the text iterator yielded no characters")
        report("read", st["chars"], max_chars or 0)
        out = (ctypes.c_uint32 * (2 * max(1, n_merges)))()
        cb = _ProgressFn(lambda phase, done, total: 0 if report(("count", "merge")[phase - 1], done, total) else 1)
        n = lib.rb_trainer_train(trainer, n_merges, cb, out)
        if error:
            raise error[0]
        if n == -3:
            raise InterruptedError("tokenizer training was stopped")
        if n < 0:
            raise RuntimeError(f"rustbpe training failed: {_ERRORS.get(n, n)}")
        st = {**stats(), "replaced": st["replaced"], "merges": n}
        return [(out[2 * i], out[2 * i + 1]) for i in range(n)], st
    finally:
        lib.rb_trainer_free(trainer)


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """Merges + special tokens, encoding through a tiktoken Encoding."""

    def __init__(self, merges: list[tuple[int, int]], pattern: str = SPLIT_PATTERN,
                 special_tokens: list[str] = SPECIAL_TOKENS, train_stats: dict | None = None):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.train_stats = train_stats or {}
        vocab = [bytes([i]) for i in range(256)]
        for k, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + k and 0 <= b < 256 + k):
                raise ValueError(f"merge {k} ({a}, {b}) refers to a token that does not exist yet (ids must be < {256 + k})")
            vocab.append(vocab[a] + vocab[b])
        ranks = {tb: i for i, tb in enumerate(vocab)}
        if len(ranks) != len(vocab):  # tiktoken needs one rank per byte string
            raise ValueError("two merges produce the same token bytes; this merge list cannot be encoded with tiktoken")
        self.vocab = vocab
        self.special_tokens = {name: len(vocab) + i for i, name in enumerate(special_tokens)}
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)

    # ------------------------------------------------------------------ training, saving, loading
    @classmethod
    def train_from_iterator(cls, text_iter: Iterable[str | bytes], vocab_size: int, progress: Callable | None = None,
                            *, doc_cap: int = 0, max_chars: int = 0, num_threads: int | None = None) -> "Tokenizer":
        """Train on a stream of texts; `vocab_size` counts the 256 bytes, the merges and the 9 special tokens.

        With too little text the vocabulary can come out smaller (train_stats["merges"] says how many).
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be an integer of at least {MIN_VOCAB_SIZE} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
        merges, stats = train_merges(text_iter, vocab_size - MIN_VOCAB_SIZE, progress,
                                     doc_cap=doc_cap, max_chars=max_chars, num_threads=num_threads)
        return cls(merges, train_stats=stats)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / FILE_NAME
        data = {"format": FORMAT, "pattern": self.pattern, "special_tokens": list(self.special_tokens),
                "train_stats": self.train_stats, "merges": self.merges}
        # one merge per line keeps the file diffable and readable
        body = json.dumps({k: v for k, v in data.items() if k != "merges"}, indent=1)[:-2]
        merges = ",\n".join(f"  [{a}, {b}]" for a, b in self.merges)
        atomic_write(path, f'{body},\n "merges": [\n{merges}\n ]\n}}\n')
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        path = Path(directory) / FILE_NAME
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer at {path}: train one first (stage tok_train)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a nanochat tokenizer (expected \"format\": \"{FORMAT}\")")
        merges = data.get("merges")
        if not isinstance(merges, list) or not all(
                isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m) for m in merges):
            raise ValueError(f"{path}: \"merges\" must be a list of [int, int] pairs")
        specials = data.get("special_tokens", SPECIAL_TOKENS)
        if not isinstance(specials, list) or not all(isinstance(s, str) for s in specials):
            raise ValueError(f"{path}: \"special_tokens\" must be a list of strings")
        return cls(merges, data.get("pattern", SPLIT_PATTERN), specials, data.get("train_stats") or {})

    # ------------------------------------------------------------------ encoding and decoding
    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    def encode_special(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(self.special_tokens)}") from None

    def get_bos_token_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    def _id(self, tok: int | str | None) -> int | None:
        return self.encode_special(tok) if isinstance(tok, str) else tok

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ordinary text only: a special token's spelling inside `text` is encoded as plain text.
        `prepend`/`append` take a special token id or name. A list of texts is encoded in parallel."""
        pre, post = self._id(prepend), self._id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
            return ids
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        if pre is not None or post is not None:
            batch = [([pre] if pre is not None else []) + ids + ([post] if post is not None else []) for ids in batch]
        return batch

    __call__ = encode

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self) -> list[int]:
        """Byte length of every token id, 0 for special tokens (the bits-per-byte denominator)."""
        return [len(b) for b in self.vocab] + [0] * len(self.special_tokens)

    # ------------------------------------------------------------------ chat rendering
    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """-> (ids, mask): mask 1 marks the tokens the model is trained to produce (assistant text,
        its python tool calls and <|assistant_end|>); user text and tool outputs are 0."""
        ids, mask = [self.get_bos_token_id()], [0]

        def add(tokens: int | list[int], m: int):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.special_tokens
        for i, (role, content) in enumerate(_turns(conversation)):
            if role == "user":
                add(sp["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            for part in ([{"type": "text", "text": content}] if isinstance(content, str) else content):
                kind, text = part["type"], part["text"]
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add([sp["<|python_start|>"], *self.encode(text), sp["<|python_end|>"]], 1)
                else:  # python_output: produced by the tool, not the model
                    add([sp["<|output_start|>"], *self.encode(text), sp["<|output_end|>"]], 0)
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt for sampling the next assistant turn: a trailing assistant message (the reference
        answer, e.g. in RL) is dropped, and the ids end with <|assistant_start|>."""
        conversation = copy.deepcopy(conversation)
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages.pop()
        ids, _ = self.render_conversation(conversation, max_tokens=1 << 62)
        return ids + [self.special_tokens["<|assistant_start|>"]]


PART_TYPES = ("text", "python", "python_output")


def _turns(conversation: dict) -> list[tuple[str, str | list]]:
    """Validated (role, content) turns: the system message folded into the first user message,
    then user/assistant strictly alternating, starting with user."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('a conversation must be {"messages": [...]} with at least one message')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise ValueError(f"message {i} must be a dict with role system|user|assistant and content, got {m!r:.80}")
    turns, start, system = [], 0, None
    if messages[0]["role"] == "system":
        system, start = messages[0]["content"], 1
        if not isinstance(system, str):
            raise ValueError("message 0: a system message's content must be a str")
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("message 1: a system message must be followed by a user message")
    for i in range(start, len(messages)):
        role, content = messages[i]["role"], messages[i]["content"]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i} has role {role!r} but {expected!r} was expected: after an optional "
                             "system message, roles must alternate user, assistant, user, ...")
        if role == "user" and not isinstance(content, str):
            raise ValueError(f"message {i}: user content must be a str, got {type(content).__name__}")
        if role == "assistant" and not isinstance(content, str):
            if not isinstance(content, list) or not all(
                    isinstance(p, dict) and p.get("type") in PART_TYPES and isinstance(p.get("text"), str) for p in content):
                raise ValueError(f"message {i}: assistant content must be a str or a list of "
                                 f"{{\"type\": {'|'.join(PART_TYPES)}, \"text\": str}} parts")
        if system is not None and i == start:
            content = system + "\n\n" + content
        turns.append((role, content))
    return turns


class StreamDecoder:
    """Decodes a stream of token ids into text pieces, never splitting a UTF-8 character: bytes of a
    character cut across tokens are held back until it is complete. Bytes that can never form a
    character come out as U+FFFD, as in `decode`. Special tokens come out as their spelling.
    Any tokenizer with `vocab` (the bytes of each ordinary token) and `special_tokens` (name -> id) will do."""

    def __init__(self, tokenizer: Tokenizer):
        self.vocab = tokenizer.vocab
        self.specials = {i: name for name, i in tokenizer.special_tokens.items()}
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        special = self.specials.get(token_id)
        if special is not None:
            return self._utf8.decode(b"", final=True) + special
        return self._utf8.decode(self.vocab[token_id])

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
