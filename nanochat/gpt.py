"""The GPT model.

A decoder-only transformer, read top to bottom:
- token embedding -> RMS norm (no learnable params anywhere in the norms) -> n_layer blocks -> norm -> lm_head
- rotary position embeddings, QK RMS-norm, grouped-query attention (n_kv_head <= n_head), no biases
- ReLU^2 MLP, untied input/output embeddings, logits soft-capped with softcap * tanh(logits / softcap)
- per-layer scalars: each block sees resid_lambda[i] * x + x0_lambda[i] * x0 (x0 = the normed embedding)
- value embeddings: every other layer (always including the last) has its own embedding table whose row
  for the current token is added to V, scaled per kv-head by a learned gate 2*sigmoid(W_g x[:32]) (1 at init)
- sliding-window attention: window_pattern like "SSSL" is tiled over the layers; S attends to the last
  sequence_len // 2 positions, L to everything; the last layer is always L

Parameters are fp32 masters; forward() runs its matmuls in the compute dtype (bf16 on CUDA SM80+, fp32 on
CPU, `compute_dtype=` or $NANOCHAT_DTYPE override it) and always returns fp32 logits / loss.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import default_compute_dtype
from nanochat.cpu_kernels import chunked_softcap_loss

VE_GATE_CHANNELS = 32  # the value-embedding gate looks at the first 32 channels of the block input


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    softcap: float = 15.0

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"GPTConfig: {msg}")
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.n_embd % self.n_head:
            bad(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            bad(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim % 2:
            bad(f"head_dim={self.head_dim} must be even (rotary embeddings rotate pairs)")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            bad(f"window_pattern={self.window_pattern!r} must be a non-empty string of S (sliding) and L (full)")
        if self.softcap <= 0:
            bad(f"softcap={self.softcap} must be > 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128, **kw) -> "GPTConfig":
        """depth is the one dial: width = depth * aspect_ratio, heads of head_dim channels (at least one)."""
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        n_embd = depth * aspect_ratio
        n_head = max(1, n_embd // head_dim)
        while n_embd % n_head:  # keep heads an exact split of the width
            n_head -= 1
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                   n_kv_head=n_head, n_embd=n_embd, **kw)

    def window_sizes(self) -> list[int | None]:
        """Per-layer attention window in tokens (None = full context). The last layer is always full."""
        pattern = self.window_pattern.upper()
        wins = [self.sequence_len // 2 if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layer)]
        wins[-1] = None
        return [w if w and w < self.sequence_len else None for w in wins]

    def to_dict(self) -> dict:
        return asdict(self)


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Every other layer, counted back from the last (which always has one)."""
    return (n_layer - 1 - layer_idx) % 2 == 0


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); cos/sin: (1, T, 1, D/2). Rotates channel pairs (i, i + D/2)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


# ----------------------------------------------------------------------------- attention

def _sliding_mask(Tq: int, Tk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Bool (Tq, Tk) mask, True = attend. Query i sits at position Tk - Tq + i, key j at position j:
    causal, and within the last `window` positions (itself included) when window is not None.
    Built per call from aranges (microseconds; traceable by torch.compile, no cache to go stale)."""
    q = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    k = torch.arange(Tk, device=device)[None, :]
    m = k <= q
    if window is not None:
        m &= k > q - window
    return m


def attention(q, k, v, window: int | None):
    """q: (B, H, Tq, D), k/v: (B, Hkv, Tk, D), Tk >= Tq; the queries are the last Tq of the Tk positions.
    SDPA picks the kernel: flash (CUDA) / the CPU flash kernel for the causal case, a masked kernel for
    sliding windows and for chunks decoded on top of a cache."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if window is not None and Tk <= window:
        window = None  # the window cannot bind: nothing is further back than it
    if window is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if window is None and Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # one new token sees every key given
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_sliding_mask(Tq, Tk, window, q.device),
                                          enable_gqa=gqa)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Pre-allocated keys/values for all layers: k, v of shape (n_layer, B, n_kv_head, max_seq_len, head_dim).

    `pos` is the number of positions already written. GPT.forward writes each layer's new keys/values in
    place at [pos, pos + T) and advances `pos` once after the last layer, so decoding allocates nothing per
    layer. Sliding-window layers read only their window from the cache.
    """

    def __init__(self, batch_size, num_kv_heads, max_seq_len, head_dim, num_layers, device=None, dtype=torch.float32):
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_seq_len, self.pos = batch_size, max_seq_len, 0

    def reset(self):
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def insert(self, layer: int, k, v):
        """k, v: (B, Hkv, T, D) for positions [pos, pos + T). Returns this layer's keys/values [0, pos + T)."""
        T = k.size(2)
        end = self.pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KVCache is full: {end} positions needed, max_seq_len is {self.max_seq_len}")
        self.k[layer, :, :, self.pos:end].copy_(k)
        self.v[layer, :, :, self.pos:end].copy_(v)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int):
        self.pos += T

    def prefill(self, other: "KVCache"):
        """Copy a batch-1 cache (a prompt prefilled once) into every row of this cache."""
        if other.batch_size != 1:
            raise ValueError(f"prefill needs a batch-1 source cache, got batch_size={other.batch_size}")
        if other.k.shape[0] != self.k.shape[0] or other.k.shape[2:5:2] != self.k.shape[2:5:2]:
            raise ValueError("prefill: source cache has a different number of layers, kv heads or head_dim")
        if other.pos > self.max_seq_len:
            raise ValueError(f"prefill: source holds {other.pos} positions, this cache only {self.max_seq_len}")
        n = other.pos
        self.k[:, :, :, :n].copy_(other.k[:, :, :, :n])  # broadcasts the single row over the batch
        self.v[:, :, :, :n].copy_(other.v[:, :, :, :n])
        self.pos = n


# ----------------------------------------------------------------------------- the model

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C, kv = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(C, C, bias=False)
        self.c_k = nn.Linear(C, kv, bias=False)
        self.c_v = nn.Linear(C, kv, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.n_kv_head, bias=False) \
            if has_value_embedding(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, window, kv_cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view_as(v)
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            pos = kv_cache.pos
            k, v = kv_cache.insert(self.layer_idx, k, v)
            if window is not None and pos >= window:
                # read only the part of the cache the earliest of these queries can still see
                k, v = k[:, :, pos - window + 1:], v[:, :, pos - window + 1:]
        y = attention(q, k, v, window)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype  # None: default_compute_dtype(device) at forward time
        self.windows = config.window_sizes()
        kv_dim = config.n_kv_head * config.head_dim
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # rotary tables cover 10x the training context so inference can run longer; not saved in checkpoints
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.chunked_loss = None  # None: on for CPU (saves time and memory), off on CUDA (compile fuses it)
        self.loss_chunk_rows = max(64, (1 << 24) // config.vocab_size // 64 * 64)  # ~64 MB fp32 chunks

    def _rotary_tables(self, T, base=10000.0, device=None):
        d = self.config.head_dim
        inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        angles = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (also after building on the meta device and calling to_empty())."""
        C = self.config.n_embd
        bound = math.sqrt(3.0) * C ** -0.5  # uniform with std 1/sqrt(C)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.0)
        cos, sin = self._rotary_tables(self.rotary_len, device=self.wte.weight.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self) -> torch.device:
        return self.wte.weight.device

    def resolve_compute_dtype(self, device: torch.device) -> torch.dtype:
        return self.compute_dtype or _default_dtype(device.type)

    # ------------------------------------------------------------------ counting

    def num_params_by_group(self) -> dict[str, int]:
        n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        groups = {
            "wte": n([self.wte.weight]),
            "value_embeds": n(self.value_embeds.parameters()),
            "lm_head": n([self.lm_head.weight]),
            "matrices": n(self._matrix_params()),
            "scalars": n(self._scalar_params()),
        }
        groups["total"] = n(self.parameters())
        assert groups["total"] == sum(v for k, v in groups.items() if k != "total"), "a parameter has no group"
        return groups

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per non-embedding parameter (forward 2 + backward 4; lm_head and the
        block matrices count, embedding lookups do not) plus attention scores and values, 12 * H * D * w per
        layer, where w = the keys a query may see (the window for S layers, sequence_len for L layers)."""
        g = self.num_params_by_group()
        dense = g["total"] - g["wte"] - g["value_embeds"]
        H, D, T = self.config.n_head, self.config.head_dim, self.config.sequence_len
        attn = sum(12 * H * D * (w or T) for w in self.windows)
        return 6 * dense + attn

    # ------------------------------------------------------------------ optimizers

    def _matrix_params(self):
        return [p for b in self.blocks for p in b.parameters()]  # all 2-D, the value-embedding gates included

    def _scalar_params(self):
        return [self.resid_lambdas, self.x0_lambdas]

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                         weight_decay=0.0, adam_betas=(0.8, 0.95)):
        """[AdamW, Muon]. AdamW: lm_head, token and value embeddings (LRs scaled by (n_embd/768)^-0.5, as
        they were tuned at width 768) and the per-layer scalars. Muon: every matrix inside the blocks, with
        weight decay. resid_lambdas get 1% of scalar_lr: the model is nearly invariant to the residual
        stream's scale, so their gradients are tiny and Adam would turn them into full-size noisy steps.
        Every group stores `initial_lr` so the training loop schedules lr = initial_lr * multiplier."""
        from nanochat.optim import AdamW, Muon
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale, name="lm_head"),
            dict(params=[self.wte.weight], lr=embedding_lr * scale, name="wte"),
            dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale, name="value_embeds"),
            dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01, name="resid_lambdas"),
            dict(params=[self.x0_lambdas], lr=scalar_lr, name="x0_lambdas"),
        ]
        adam_groups = [g for g in adam_groups if g["params"]]
        adamw = AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=0.0)
        muon = Muon(self._matrix_params(), lr=matrix_lr, momentum=0.95, weight_decay=weight_decay)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        n_opt = sum(len(g["params"]) for o in optimizers for g in o.param_groups)
        assert n_opt == len(list(self.parameters())), "every parameter must be in exactly one optimizer"
        return optimizers

    # ------------------------------------------------------------------ forward

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, loss_reduction="mean"):
        B, T = idx.shape
        device = idx.device
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > self.rotary_len:
            raise ValueError(f"sequence of {pos + T} positions exceeds the rotary table ({self.rotary_len})")
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction={loss_reduction!r}; allowed: mean, sum, none")
        cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        dtype = self.resolve_compute_dtype(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            x = norm(self.wte(idx))
            x0 = x
            for i, block in enumerate(self.blocks):
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                ve = self.value_embeds[str(i)](idx) if block.attn.ve_gate is not None else None
                x = block(x, ve, cos, sin, self.windows[i], kv_cache)
            x = norm(x)
            if kv_cache is not None:
                kv_cache.advance(T)
            softcap = self.config.softcap
            if targets is not None:
                chunked = self.chunked_loss if self.chunked_loss is not None else device.type == "cpu"
                if chunked and loss_reduction != "none":  # the CPU loss kernel (nanochat/cpu_kernels.py)
                    return chunked_softcap_loss(x, self.lm_head.weight, targets, softcap, loss_reduction, self.loss_chunk_rows)
                logits = self.lm_head(x).float()
                logits = softcap * torch.tanh(logits / softcap)
                loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=-1,
                                       reduction=loss_reduction)
                return loss.view(B, T) if loss_reduction == "none" else loss
            logits = self.lm_head(x).float()
            return softcap * torch.tanh(logits / softcap)


def build_model(model_config: dict, device) -> "GPT":
    """A freshly initialised GPT of `model_config` (a GPTConfig dict) on `device`, built on meta first so that
    no weights are allocated twice."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_config))
    model.to_empty(device=device)
    model.init_weights()
    return model


@lru_cache(maxsize=8)
def _default_dtype(device_type: str) -> torch.dtype:
    return default_compute_dtype(device_type)
