"""Bits per byte: the tokenizer-independent loss.

Cross-entropy per token depends on the vocabulary; dividing the summed loss (in bits) by the number
of UTF-8 bytes the target tokens stand for does not, so runs with different tokenizers compare.
Special tokens (0 bytes) and ignored targets (< 0) are excluded from both sums, as in karpathy/nanochat's
nanochat/loss_eval.py.
"""
from __future__ import annotations

import math
from itertools import islice

import torch
import torch.distributed as dist


@torch.no_grad()
def bits_per_byte(model, batches, steps: int, token_bytes: torch.Tensor) -> dict:
    """At most `steps` batches of `batches` (x, y); fewer when it runs out (one pass over eval data).
    `token_bytes[id]` is the byte length of token id (0 for specials). Returns {"bpb", "tokens", "steps"},
    tokens and steps summed over ranks, so a caller can say when fewer tokens than asked were scored."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    tokens = done = 0
    for x, y in islice(batches, steps):
        loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.view(-1)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        total_nats += (loss * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
        tokens, done = tokens + y.numel(), done + 1
    counts = torch.tensor([tokens, done], dtype=torch.int64, device=token_bytes.device)
    if dist.is_available() and dist.is_initialized():  # once, however many batches each rank had
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
        dist.all_reduce(counts)
    nbytes, (tokens, done) = total_bytes.item(), counts.tolist()
    bpb = float("inf") if nbytes == 0 else total_nats.item() / (math.log(2) * nbytes)
    return {"bpb": bpb, "tokens": tokens, "steps": done}


def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Just the bits per byte of bits_per_byte (the training stages' periodic validation)."""
    return bits_per_byte(model, batches, steps, token_bytes)["bpb"]
