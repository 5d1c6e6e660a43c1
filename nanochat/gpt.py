"""The GPT model.

A decoder-only transformer, read top to bottom:
- token embedding -> RMS norm (no learnable params anywhere in the norms) -> n_layer blocks -> norm -> lm_head
- rotary position embeddings, QK RMS-norm, grouped-query attention (n_kv_head <= n_head), no biases
- ReLU^2 MLP, untied input/output embeddings, logits soft-capped with softcap * tanh(logits / softcap)
- per-layer scalars: each block sees resid_lambda[i] * x + x0_lambda[i] * x0 (x0 = the normed embedding);
  at init resid_lambda falls from 1.15 (first layer) to 1.05 (last) and x0_lambda from 0.20 to 0.05
- value embeddings: every other layer (always including the last) has its own embedding table whose row
  for the current token is added to V, scaled per kv-head by a learned gate 3*sigmoid(W_g x[:12])
- smear: each position adds the previous token's normed embedding, scaled by a learned gate
  smear_lambda * sigmoid(W_s x[:24]) (0 at init): bigram information for free
- backout: before the final norm, backout_lambda (0.2 at init) times the residual stream after the
  middle layer is subtracted, removing low-level features the lm_head does not need
- queries and keys are RMS-normed then scaled by 1.2 (sharper attention than plain QK-norm); rotary base 100k
- sliding-window attention: window_pattern like "SSSL" is tiled over the layers; S attends to the last
  quarter of the context (rounded up to a multiple of 128), L to everything; the last layer is always L

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
from nanochat.cpu_kernels import chunked_softcap_loss, soft_cap

VE_GATE_CHANNELS = 12  # the value-embedding gate looks at the first 12 channels of the block input
VE_GATE_SCALE = 3.0    # gate = 3 * sigmoid(.): (0, 3), so a layer can lean on its value embedding
QK_SCALE = 1.2         # after QK RMS-norm: logits up to 1.44x sharper than unit-norm q, k allow
ROTARY_BASE = 100_000
SMEAR_CHANNELS = 24    # the smear gate looks at the first 24 channels of the current token's embedding


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

    def window_sizes(self) -> list[int | None]:
        """Per-layer attention window in tokens (None = full context). The last layer is always full.
        Short windows are a quarter of the context, rounded up to a multiple of 128 (a tile of the flash
        kernels) from a 512-token context up; tiny test contexts keep the exact quarter."""
        pattern = self.window_pattern.upper()
        short = -(-self.sequence_len // 4)
        if self.sequence_len >= 512:
            short = -(-short // 128) * 128
        wins = [short if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layer)]
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


def attention(q, k, v, window: int | None, impl: str = "auto"):
    """q: (B, H, Tq, D), k/v: (B, Hkv, Tk, D), Tk >= Tq; the queries are the last Tq of the Tk positions.

    impl "auto": full-context layers go to SDPA (flash on CUDA, the CPU flash kernel for the causal case);
    sliding windows go to FlexAttention on CUDA (block-sparse: blocks outside the window are skipped,
    where SDPA with a dense mask falls back to a kernel that computes them all) and to masked SDPA on the
    CPU. "sdpa" / "flex" force one path (the tests compare them on CPU, where flex runs eagerly)."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if window is not None and Tk <= window:
        window = None  # the window cannot bind: nothing is further back than it
    if impl not in ("auto", "sdpa", "flex"):
        raise ValueError(f"attention impl={impl!r}; allowed: auto, sdpa, flex")
    if impl == "flex" or (impl == "auto" and window is not None and q.is_cuda and Tq > 1):
        return flex_attention(q, k, v, window)
    if window is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if window is None and Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # one new token sees every key given
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_sliding_mask(Tq, Tk, window, q.device),
                                          enable_gqa=gqa)


@lru_cache(maxsize=32)
def _block_mask(Tq: int, Tk: int, window: int | None, device: str):
    """FlexAttention's block-sparse form of _sliding_mask (built once per shape: it costs a pass over
    the blocks). Under torch.compile the cache lookup stays in Python; the mask is a constant input."""
    from torch.nn.attention.flex_attention import create_block_mask
    offset = Tk - Tq

    def causal_window(b, h, qi, ki):
        keep = ki <= qi + offset
        return keep & (ki > qi + offset - window) if window is not None else keep
    return create_block_mask(causal_window, B=None, H=None, Q_LEN=Tq, KV_LEN=Tk, device=device)


_FLEX = {}  # device type -> flex_attention (compiled on CUDA: eager flex materialises every score)


def flex_attention(q, k, v, window: int | None):
    """Causal (optionally windowed) attention through torch's FlexAttention, same layout as attention()."""
    if q.device.type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention as flex
        _FLEX[q.device.type] = torch.compile(flex, dynamic=False) if q.is_cuda else flex
    mask = _block_mask(q.size(2), k.size(2), window, str(q.device))
    return _FLEX[q.device.type](q, k, v, block_mask=mask, enable_gqa=q.size(1) != k.size(1))


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Pre-allocated keys/values for all layers: k, v of shape (n_layer, B, n_kv_head, max_seq_len, head_dim).

    `pos` is the number of positions already written. GPT.forward writes each layer's new keys/values in
    place at [pos, pos + T) and advances `pos` once after the last layer, so decoding allocates nothing per
    layer. Sliding-window layers read only their window from the cache. Positions [0, `shared`) hold the
    same keys/values in every row (a prompt prefilled once, then sampled from several times), so a reader may
    take them from row 0 alone; any write below `shared` lowers it.
    """

    def __init__(self, batch_size, num_kv_heads, max_seq_len, head_dim, num_layers, device=None, dtype=torch.float32):
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_seq_len, self.pos, self.shared = batch_size, max_seq_len, 0, 0
        self.last_emb = None  # (B, 1, C) normed embedding of the last token written (for the smear)

    def reset(self):
        self.pos, self.shared, self.last_emb = 0, 0, None

    def get_pos(self) -> int:
        return self.pos

    def insert(self, layer: int, k, v):
        """k, v: (B, Hkv, T, D) for positions [pos, pos + T). Returns this layer's keys/values [0, pos + T)."""
        T = k.size(2)
        end = self.pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KVCache is full: {end} positions needed, max_seq_len is {self.max_seq_len}")
        self.shared = min(self.shared, self.pos)
        self.k[layer, :, :, self.pos:end].copy_(k)
        self.v[layer, :, :, self.pos:end].copy_(v)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write(self, layer: int, pos: int, k, v):
        """k, v: (B, Hkv, D) for the one position `pos` (the decode step's write; `advance` moves pos)."""
        self.shared = min(self.shared, pos)
        self.k[layer, :, :, pos].copy_(k)
        self.v[layer, :, :, pos].copy_(v)

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
        self.pos = self.shared = n
        self.last_emb = None if other.last_emb is None else other.last_emb.expand(self.batch_size, -1, -1).clone()


# ----------------------------------------------------------------------------- the model

class CausalSelfAttention(nn.Module):
    qk_scale, ve_gate_scale = QK_SCALE, VE_GATE_SCALE  # read by nanochat/cpu_kernels.py's decode step

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
            gate = VE_GATE_SCALE * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view_as(v)
        q, k = apply_rotary(norm(q) * QK_SCALE, cos, sin), apply_rotary(norm(k) * QK_SCALE, cos, sin)
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
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.backout_layer = config.n_layer // 2
        # rotary tables cover 10x the training context so inference can run longer; not saved in checkpoints
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.chunked_loss = None  # None: on for CPU (saves time and memory), off on CUDA (compile fuses it)
        self.loss_chunk_rows = max(64, (1 << 24) // config.vocab_size // 64 * 64)  # ~64 MB fp32 chunks

    def _rotary_tables(self, T, base=ROTARY_BASE, device=None):
        d = self.config.head_dim
        inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        angles = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (also after building on the meta device and calling to_empty())."""
        C, L = self.config.n_embd, self.config.n_layer
        bound = math.sqrt(3.0) * C ** -0.5  # uniform with std 1/sqrt(C): no outliers, same std as normal
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:  # small positive: gates start a little above 3 * sigmoid(0)
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        depth = torch.arange(L, dtype=torch.float32, device=self.resid_lambdas.device) / max(L - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth)  # early layers keep more of the residual stream,
        self.x0_lambdas.copy_(0.20 - 0.15 * depth)     # and mix in more of the embedding
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
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
        return [self.resid_lambdas, self.x0_lambdas] + self._smear_params()

    def _smear_params(self):
        return [self.smear_gate.weight, self.smear_lambda, self.backout_lambda]

    def setup_optimizers(self, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5,
                         weight_decay=0.0):
        """[AdamW, Muon]. AdamW: lm_head, token and value embeddings (LRs scaled by (n_embd/768)^-0.5, as
        they were tuned at width 768) and the per-layer scalars, each group with its own betas and a small
        constant weight decay. Embeddings see each row rarely, so their second moment averages longer
        (beta2 0.995); value embeddings take half the embedding LR. resid_lambdas get 1% of scalar_lr: the
        model is nearly invariant to the residual stream's scale, so their gradients are tiny and Adam
        would turn them into full-size noisy steps; x0_lambdas average their momentum longer (beta1 0.96).
        Muon: every matrix inside the blocks, with cautious `weight_decay` (scheduled by the caller).
        Every group stores `initial_lr` and `initial_weight_decay`; the training loop scales those."""
        from nanochat.optim import AdamW, Muon
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale, betas=(0.8, 0.96), weight_decay=0.01,
                 name="lm_head"),
            dict(params=[self.wte.weight], lr=embedding_lr * scale, betas=(0.8, 0.995), weight_decay=0.001,
                 name="wte"),
            dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale * 0.5, betas=(0.8, 0.995),
                 weight_decay=0.01, name="value_embeds"),
            dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01, betas=(0.8, 0.95), weight_decay=0.05,
                 name="resid_lambdas"),
            dict(params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0, name="x0_lambdas"),
            dict(params=self._smear_params(), lr=0.2, betas=(0.8, 0.95), weight_decay=0.0, name="smear_backout"),
        ]
        adam_groups = [g for g in adam_groups if g["params"]]
        adamw = AdamW(adam_groups, eps=1e-10)
        muon = Muon(self._matrix_params(), lr=matrix_lr, momentum=0.95, beta2=0.9, weight_decay=weight_decay)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
                group["initial_weight_decay"] = group["weight_decay"]
        n_opt = sum(len(g["params"]) for o in optimizers for g in o.param_groups)
        assert n_opt == len(list(self.parameters())), "every parameter must be in exactly one optimizer"
        return optimizers

    # ------------------------------------------------------------------ forward

    def smear(self, x, prev=None):
        """x (B, T, C) normed embeddings; prev (B, 1, C): the one before x[:, 0] (None: x starts the text)."""
        shifted = x[:, :-1] if prev is None else torch.cat([prev.to(x.dtype), x[:, :-1]], 1)
        if shifted.size(1) == 0:
            return x
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, -shifted.size(1):, :SMEAR_CHANNELS]))
        head = x[:, :x.size(1) - shifted.size(1)]  # the first token of a text has nothing to smear in
        return torch.cat([head, x[:, -shifted.size(1):] + gate * shifted], 1)

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
            prev = kv_cache.last_emb if kv_cache is not None else None
            if kv_cache is not None:
                kv_cache.last_emb = x[:, -1:]
            x = self.smear(x, prev)
            x0 = x
            for i, block in enumerate(self.blocks):
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                ve = self.value_embeds[str(i)](idx) if block.attn.ve_gate is not None else None
                x = block(x, ve, cos, sin, self.windows[i], kv_cache)
                if i == self.backout_layer:
                    x_mid = x
            x = norm(x - self.backout_lambda * x_mid)
            if kv_cache is not None:
                kv_cache.advance(T)
            softcap = self.config.softcap
            if targets is not None:
                chunked = self.chunked_loss if self.chunked_loss is not None else device.type == "cpu"
                if chunked and loss_reduction != "none":  # the CPU loss kernel (nanochat/cpu_kernels.py)
                    return chunked_softcap_loss(x, self.lm_head.weight, targets, softcap, loss_reduction, self.loss_chunk_rows)
                logits = soft_cap(self.lm_head(x).float(), softcap)
                loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1), ignore_index=-1,
                                       reduction=loss_reduction)
                return loss.view(B, T) if loss_reduction == "none" else loss
            return soft_cap(self.lm_head(x).float(), softcap)


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
