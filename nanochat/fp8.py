"""fp8 training (`base_train.fp8 = true`): the big matmuls of the blocks and lm_head run in float8 on
GPUs with fp8 tensor cores (compute capability 8.9+: H100/H200, L4/L40S, B200), everything else in bf16.

torchao's float8 training does the work: each eligible nn.Linear becomes a Float8Linear that scales
its input, weight and output gradient to e4m3/e5m2 per tensor ("tensorwise", the fastest recipe) and
calls torch._scaled_mm. Float8Linear is an nn.Linear subclass with the same parameters, so state
dicts (checkpoints, the optimizers' param groups) are unchanged. Evaluation runs in bf16: `bf16_linears`
swaps plain nn.Linear modules back in around it, sharing the same weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

FP8_MIN_CAPABILITY = (8, 9)
FP8_MIN_DIM = 128  # smaller matmuls lose more to the scaling casts than fp8 saves


def fp8_unavailable(device: torch.device) -> str | None:
    """Why fp8 training cannot run on `device` (one line), or None when it can."""
    if device.type != "cuda":
        return f"base_train.fp8 needs a CUDA GPU with fp8 tensor cores (H100-class), this run is on {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        return (f"base_train.fp8 needs compute capability 8.9+ (H100/H200, L4/L40S); "
                f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: set base_train.fp8=false")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        return f"base_train.fp8 needs torchao (pip install torchao): {e}"
    return None


def fp8_eligible(module: nn.Module, fqn: str = "") -> bool:
    """Linears whose both dims are multiples of 16 (the fp8 GEMM's requirement) and at least FP8_MIN_DIM."""
    return (isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and min(module.in_features, module.out_features) >= FP8_MIN_DIM)


def convert_to_fp8(model: nn.Module) -> int:
    """Swap every eligible nn.Linear of `model` for torchao's Float8Linear, in place; returns how many.
    Runs before torch.compile. Works on any device (the fp8 matmuls themselves need the GPU)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                               module_filter_fn=fp8_eligible)
    return sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")


@contextmanager
def bf16_linears(model: nn.Module):
    """Within the block, every Float8Linear of `model` is a plain nn.Linear on the same weight."""
    swapped = []
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ != "Float8Linear":
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        plain.weight = mod.weight
        if mod.bias is not None:
            plain.bias = mod.bias
        setattr(parent, attr, plain)
        swapped.append((parent, attr, mod))
    try:
        yield
    finally:
        for parent, attr, mod in swapped:
            setattr(parent, attr, mod)
