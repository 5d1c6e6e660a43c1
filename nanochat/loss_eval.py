"""Bits per byte: the tokenizer-independent validation loss.

Cross-entropy per token depends on the vocabulary; dividing the summed loss (in bits) by the number
of UTF-8 bytes the target tokens stand for does not, so runs with different tokenizers compare.
Special tokens (0 bytes) are excluded from both sums.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """`batches` yields (x, y); `token_bytes[id]` is the byte length of token id (0 for specials)."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    for _ in range(steps):
        x, y = next(batches)
        loss = model(x, y, loss_reduction="none").view(-1).double()
        y = y.view(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        total_nats += (loss * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
