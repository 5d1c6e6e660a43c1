"""BOS-aligned best-fit packing: turns a stream of documents into (x, y) batches with no padding.

Every row of T+1 tokens is built from whole documents, each starting with BOS, so the model always
sees a document from its beginning. To fill the space left in a row the loader takes, from a buffer
of tokenised documents, the largest one that still fits (best fit); only when none fits does it crop
one (the shortest, to waste least) to the exact space left, and drops the rest of that document
(a single token of space left gets a lone BOS, which is what any document cropped to it would be).

A document longer than a whole row ("long") never fits, so it waits in a queue of its own, first in,
first out (only its first T+1 tokens are stored), and fills an empty row by itself, cropped. An empty row
takes the oldest long document when the long ones are at least half of the buffer; otherwise long ones
go only when no short document is left. That keeps at least half the buffer for best fit, and long
documents leave at the rate they arrive, none waiting forever. (Two other policies were measured and
dropped: cropping long documents on entry made them fill empty rows exactly and always go first, so
rows held one article's opening instead of ~2.3 whole documents; ranking them by full length with the
short ones, as karpathy/nanochat does, starved them, so on a corpus the buffer holds whole the stream
served all the short documents first and the long ones last.)

Resuming: `state_dict()` stores the position of the last document read from the corpus (`cursor`)
and the positions of the documents still waiting in the buffer (short ones by length, then long ones
oldest first). A loader built with that state re-reads and re-tokenises those documents (tokenisation is
deterministic) and continues reading after the cursor, so its next batch is exactly the batch the
original loader would have produced. The state is a few thousand integers, small enough for a
checkpoint's meta.json.
"""
from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import deque
from pathlib import Path

import numpy as np
import torch

from nanochat.dataset import iter_documents, read_documents

STATE_VERSION = 1


def files_fingerprint(files) -> str:
    """Names of the data files, hashed: a resumed loader must read the same files in the same order."""
    return hashlib.sha1("\n".join(Path(f).name for f in files).encode()).hexdigest()[:16]


class PackingLoader:
    """next(loader) -> (x, y), both (B, T) int64 on `device`; y is x shifted by one token.

    rank/world_size pick this process's share of the documents (see dataset.iter_documents).
    loop=True starts another epoch when the files run out; loop=False (evaluation) stops instead,
    dropping the last, incomplete batch.
    """

    def __init__(self, tokenizer, files, B: int, T: int, rank: int = 0, world_size: int = 1, device="cpu",
                 state: dict | None = None, buffer_size: int = 1000, tokenizer_batch_size: int = 128,
                 num_threads: int = 4, loop: bool = True):
        if B < 1 or T < 1:
            raise ValueError(f"batch size B={B} and sequence length T={T} must both be at least 1")
        self.tokenizer, self.files = tokenizer, [Path(f) for f in files]
        if not self.files:
            raise ValueError("no data files given to the loader")
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.device = torch.device(device)
        self.bos = tokenizer.get_bos_token_id()
        self.buffer_size, self.tokenizer_batch_size, self.num_threads, self.loop = (
            buffer_size, tokenizer_batch_size, num_threads, loop)
        self.epoch, self.cursor = 1, None  # cursor: position of the last document read from the corpus
        self._lens: list[int] = []         # short documents (at most T+1 tokens), sorted by token count ...
        self._docs: list[tuple[np.ndarray, list[int]]] = []  # ... as (tokens, position) pairs
        self._long: deque[tuple[np.ndarray, list[int]]] = deque()  # longer ones, oldest first, first T+1 tokens
        self.tokens_read = self.tokens_cropped = 0  # statistics: how much of what was read got cut away
        if state is not None:
            self._load_state(state)
        self._restart_documents()

    # -- reading and tokenising
    def _restart_documents(self):
        self._docs_iter = iter_documents(self.files, self.rank, self.world_size, start=self.cursor)
        self._any_this_epoch = self.cursor is not None

    def _add(self, texts, positions):
        for toks, pos in zip(self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.num_threads), positions):
            self.tokens_read += len(toks)
            self.tokens_cropped += max(0, len(toks) - self.T - 1)
            doc = (np.asarray(toks[: self.T + 1], dtype=np.int64), pos)  # ~4x smaller than a list of ints
            if len(toks) > self.T + 1:
                self._long.append(doc)
                continue
            i = bisect_right(self._lens, len(toks))  # after equal lengths: the order stays deterministic
            self._lens.insert(i, len(toks))
            self._docs.insert(i, doc)

    def _refill(self) -> bool:
        """Read and tokenise one batch of documents; False when the corpus is used up (loop=False)."""
        texts, positions = [], []
        while len(texts) < self.tokenizer_batch_size:
            try:
                text, pos = next(self._docs_iter)
            except StopIteration:
                if not self._any_this_epoch:
                    raise ValueError(f"rank {self.rank} of {self.world_size} gets no documents from "
                                     f"{len(self.files)} file(s) starting {self.files[0]}") from None
                if not self.loop:
                    break
                self.epoch, self.cursor = self.epoch + 1, None
                self._restart_documents()
                continue
            self._any_this_epoch = True
            texts.append(text)
            positions.append(pos)
            self.cursor = pos
        if texts:
            self._add(texts, positions)
        return bool(texts)

    def _take(self, space: int):
        """What fills `space` next: the oldest long document for an empty row when long ones are half the
        buffer, else the largest short one that fits, else the shortest one there is, cropped to it."""
        while len(self._lens) + len(self._long) < self.buffer_size and self._refill():
            pass
        if not self._lens and not self._long:
            raise StopIteration
        i = bisect_right(self._lens, space) - 1
        if self._long and space == self.T + 1 and len(self._long) >= len(self._lens):
            toks = self._long.popleft()[0]
        elif i < 0 and space == 1:  # any document cropped to one token is just its BOS: spend none on it
            return [self.bos]
        elif i < 0 and not self._lens:  # nothing short is left: the oldest long one is the shortest there is
            toks = self._long.popleft()[0]
        else:
            i = max(i, 0)
            self._lens.pop(i)
            toks, _ = self._docs.pop(i)
        self.tokens_cropped += max(0, len(toks) - space)  # a long one's tokens past T+1 were counted when read
        return toks[:space]

    # -- batches
    def __iter__(self):
        return self

    def __next__(self):
        row_len = self.T + 1
        rows = np.empty((self.B, row_len), dtype=np.int64)
        for r in range(self.B):
            filled = 0
            while filled < row_len:
                toks = self._take(row_len - filled)
                rows[r, filled:filled + len(toks)] = toks
                filled += len(toks)
        # numpy makes the shifted copies: torch's .contiguous() on an int64 slice is ~1000x slower on CPU
        x, y = torch.from_numpy(np.ascontiguousarray(rows[:, :-1])), torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    # -- resuming
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor,
                "buffer": [pos for _, pos in [*self._docs, *self._long]], "rank": self.rank, "world_size": self.world_size,
                "files": files_fingerprint(self.files)}

    def _load_state(self, state: dict):
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not supported (expected {STATE_VERSION})")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"loader state is for rank {state['rank']} of {state['world_size']}, "
                             f"not rank {self.rank} of {self.world_size}; resume with the same number of processes")
        if state["files"] != files_fingerprint(self.files):
            raise ValueError("the data files differ from those the loader state was saved with; "
                             "resume with the same data directory")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        buffer = state["buffer"]
        for i in range(0, len(buffer), self.tokenizer_batch_size):  # stored order in, same sorted order out
            chunk = buffer[i:i + self.tokenizer_batch_size]
            self._add(read_documents(self.files, chunk), chunk)


class ConversationPacker:
    """next(packer) -> (x, y) of shape (B, T): rendered conversations packed BOS-aligned, best fit, never cropped.

    Rank r reads examples r, r + world_size, ... of the mixture. Rows are filled from a small buffer of
    rendered conversations: the longest that still fits goes in; when none fits, the rest of the row is
    padded with BOS tokens whose targets are -1 (ignored by the loss), and the conversations wait for the
    next row. Only a conversation longer than a whole row is cropped (rendering stops at T + 1 tokens).
    The state (next index, epoch, indices waiting in the buffer) is a few integers, and rendering is
    deterministic, so a resumed packer continues with exactly the same batches.
    """

    def __init__(self, tokenizer, data, B: int, T: int, rank: int = 0, world_size: int = 1, device="cpu",
                 state: dict | None = None, buffer_size: int = 32):
        if len(data) <= rank:
            raise ValueError(f"the mixture has {len(data)} conversations: too few for rank {rank} of {world_size}")
        self.tokenizer, self.data, self.B, self.T = tokenizer, data, B, T
        self.rank, self.world_size, self.device, self.buffer_size = rank, world_size, torch.device(device), buffer_size
        self.bos = tokenizer.get_bos_token_id()
        self.cursor, self.epoch, self.buffer = rank, 1, []  # buffer: [(index, ids)]
        if state:
            self.cursor, self.epoch = state["cursor"], state["epoch"]
            self.buffer = [(i, self.render(i)) for i in state["buffer"]]

    def render(self, i: int) -> list[int]:
        ids, _ = self.tokenizer.render_conversation(self.data[i], max_tokens=self.T + 1)
        return ids

    def _take(self, space: int) -> list[int] | None:
        """The longest buffered conversation of at most `space` tokens, or None when none fits."""
        while len(self.buffer) < self.buffer_size:
            if self.cursor >= len(self.data):
                self.cursor, self.epoch = self.rank, self.epoch + 1
            self.buffer.append((self.cursor, self.render(self.cursor)))
            self.cursor += self.world_size
        fits = [k for k, (_, ids) in enumerate(self.buffer) if len(ids) <= space]
        return self.buffer.pop(max(fits, key=lambda k: len(self.buffer[k][1])))[1] if fits else None

    def __iter__(self):
        return self

    def __next__(self):
        rows, real = [], []  # real: how many leading tokens of the row are conversation (the rest is padding)
        for _ in range(self.B):
            row = []
            while len(row) < self.T + 1 and (ids := self._take(self.T + 1 - len(row))) is not None:
                row += ids  # an empty row always takes one: rendering caps a conversation at T + 1 tokens
            real.append(len(row))
            rows.append(row + [self.bos] * (self.T + 1 - len(row)))
        rows = torch.tensor(rows, dtype=torch.long)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].clone()
        pad = torch.arange(1, self.T + 1)[None, :] >= torch.tensor(real)[:, None]  # target position is padding
        y[pad] = -1
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "buffer": [i for i, _ in self.buffer]}
