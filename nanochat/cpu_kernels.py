"""Fast paths kept out of the model and the engine, so that gpt.py and engine.py read like the math.

- `chunked_softcap_loss`: lm_head + softcap + cross-entropy a chunk of rows at a time, gradients computed in
  the forward pass. GPT.forward uses it on the CPU, where the (tokens x vocab) logits dominate a step.
- `last_logits`: a prefill that sends only the last position through lm_head.
- `DecodeStep`: GPT.forward for one new token per row, written out by hand. Eager on the CPU, where per-op
  overhead is most of a small model's decode step; with `static=True` every shape is fixed (the whole cache
  is read under a mask, the position is a tensor), which is what `CudaGraphStep` captures on CUDA.

Everything here computes what nanochat.gpt computes; tests/test_engine.py and tests/test_gpt.py compare them.
The decode step reuses the model's own modules and weights; the block math it repeats (and must follow when
gpt.py changes) is: the smear, the x0/residual mixing, the value-embedding gate, QK norm and scale then
rotary, the window, the backout, the final norm and the softcap.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def unit(x):
    """x / |x| over the last dim, in 3 small ops (F.rms_norm takes ~10 on the CPU): norm(x) == unit(x) * sqrt(C)
    to ~1e-7, and 0 stays 0 as it does there. The decode step folds the sqrt(C) into what consumes it."""
    eps = (x.size(-1) * torch.finfo(x.dtype).eps) ** 0.5
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(eps)


# ----------------------------------------------------------------------------- the loss

def soft_cap(z: torch.Tensor, c: float) -> torch.Tensor:
    """Logits capped to (-c, c): c*tanh(z/c), computed as c*(2*sigmoid(2z/c) - 1), exact in fp32 and several
    times cheaper than tanh on CPU. Differentiable (the sigmoid's output, which its backward reads, is not
    written in place)."""
    return torch.sigmoid(z * (2 / c)).mul(2 * c).sub_(c)


@torch.compiler.disable  # eager even inside a compiled model: a Python loop over chunks with reused buffers
def chunked_softcap_loss(x, weight, targets, softcap, reduction, chunk_rows):
    """x (B, T, C) hidden states after the final norm, targets (B, T) -> the loss (mean or sum)."""
    return SoftcapCrossEntropy.apply(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1), softcap, reduction,
                                     chunk_rows)


_WORKSPACE: dict = {}  # CPU scratch for SoftcapCrossEntropy, reused across steps (see below)


def _cpu_workspace(numel: int, dtype: torch.dtype, n: int = 2) -> list[torch.Tensor]:
    """n flat CPU buffers of numel elements, kept between calls. Fresh tensors this big are mmap'd by
    malloc and page-faulted in on every step (~1 GB/step of faults at d4/32k vocab, 13% of the step)."""
    key = (numel, dtype, n)
    if key not in _WORKSPACE:
        _WORKSPACE.clear()
        _WORKSPACE[key] = [torch.empty(numel, dtype=dtype) for _ in range(n)]
    return _WORKSPACE[key]


class SoftcapCrossEntropy(torch.autograd.Function):
    """lm_head matmul + tanh softcap + cross-entropy (ignore_index=-1), a chunk of rows at a time.

    At small width the (tokens x vocab) logits dominate a training step. Materialising them all costs
    4 * N * V bytes several times over; here each chunk's logits live in two reused buffers, and since
    the loss is the last op, its gradients w.r.t. the hidden states and the lm_head weight are computed
    right away in the forward pass (backward only scales them by the incoming gradient, in place: run
    backward once, retain_graph is not supported).

    Tricks, all exact: c * tanh(z / c) = c * (2 * sigmoid(2z / c) - 1), because sigmoid is several times
    faster than tanh on CPU (the 2/c scales the small hidden chunk, not the logits). The capped logits lie
    in [-c, c], so exp() needs no max-subtraction pass: softmax uses exp(2c * sigmoid), a constant shift
    of the logits (shifted back by c when the cap is large enough to overflow fp32). Per-row factors
    (1/sum, the mean's 1/n) are applied to the small matmul operands instead of the (V, rows) chunk. Chunks
    are kept transposed, (V, rows), which this CPU's BLAS runs a little faster.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, reduction, chunk_rows):
        N, V = h.size(0), weight.size(0)
        acc = torch.promote_types(h.dtype, torch.float32)  # softmax math in fp32 (fp64 in the tests)
        valid = targets != -1
        denom = valid.sum().clamp(min=1).to(acc) if reduction == "mean" else torch.ones((), dtype=acc, device=h.device)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        scale, c2 = 2.0 / softcap, 2.0 * softcap
        shift = softcap if c2 > 80 else 0.0  # exp(80) * vocab stays far below the fp32 max
        w = weight.to(h.dtype)
        R = min(chunk_rows, N)
        if h.device.type == "cpu" and h.dtype == acc:
            buf_z, buf_e = _cpu_workspace(V * R, acc)
        else:  # CUDA's caching allocator already reuses memory
            buf_z, buf_e = torch.empty(V * R, dtype=acc, device=h.device), torch.empty(V * R, dtype=acc, device=h.device)
        loss = torch.zeros((), device=h.device, dtype=acc)
        dh = torch.empty_like(h) if need_grad else None
        dw = torch.zeros_like(weight, dtype=acc) if need_grad else None
        for s in range(0, N, R):
            hc, tc, vc = h[s:s + R], targets[s:s + R], valid[s:s + R]
            r = hc.size(0)
            z, e = buf_z[:V * r].view(V, r), buf_e[:V * r].view(V, r)
            if h.dtype == acc:
                torch.mm(w, (hc * scale).t(), out=z)
            else:
                z.copy_(torch.mm(w, (hc * scale).t()))
            sig = z.sigmoid_()                                 # logits = c * (2 * sig - 1)
            torch.mul(sig, c2, out=e)
            if shift:
                e.sub_(shift)
            e.exp_()                                           # exp(logits + c - shift)
            sumexp = e.sum(0)
            tgt = tc.clamp(min=0).unsqueeze(0)
            sig_t = sig.gather(0, tgt).squeeze(0)
            loss += ((sumexp.log() + shift - c2 * sig_t) * vc).sum()
            if need_grad:
                # dL/dz' = rowscale * (softmax - onehot) * dlogits/dz', dlogits/dz' = 2c * sig * (1 - sig)
                #        = a * (e - sumexp * onehot) * sig * (1 - sig), a = rowscale * 2c / sumexp
                a = vc.to(acc) * (c2 / denom) / sumexp         # 0 for ignored rows
                e_t = e.gather(0, tgt).squeeze(0)
                e.mul_(sig.addcmul_(sig, sig, value=-1.0))    # e * sig * (1 - sig)
                e.scatter_(0, tgt, ((e_t - sumexp) * sig_t * (1 - sig_t)).unsqueeze(0))
                dz = e if h.dtype == acc else e.to(h.dtype)
                a_col = (a * scale).to(h.dtype).unsqueeze(1)  # z' = scale * h W^T
                dh[s:s + r] = torch.mm(dz.t(), w).mul_(a_col)
                if dz.dtype == acc:
                    dw.addmm_(dz, hc * a_col)
                else:
                    dw += torch.mm(dz, hc * a_col).to(acc)
        ctx.grads = (dh, dw)  # not save_for_backward: backward hands them on without a copy
        ctx.weight_dtype = weight.dtype
        return loss / denom

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("SoftcapCrossEntropy: backward ran twice through the same graph (retain_graph)")
        dh, dw = ctx.grads
        ctx.grads = None
        return dh.mul_(grad_out.to(dh.dtype)), dw.mul_(grad_out).to(ctx.weight_dtype), None, None, None, None


# ----------------------------------------------------------------------------- inference

def last_logits(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """model(ids, kv_cache=cache)[:, -1] (B, V), with only the last position sent through lm_head: the other
    positions' logits (T x V, the biggest tensor of a small model) would be thrown away."""
    head = getattr(model, "lm_head", None)  # models without one (test doubles) run as they are
    hook = head.register_forward_pre_hook(lambda mod, args: (args[0][:, -1:],)) if head is not None else None
    try:
        return model(ids, kv_cache=cache)[:, -1]
    finally:
        if hook is not None:
            hook.remove()


class DecodeStep:
    """step(ids (B, 1), cache) -> logits (B, V) of a plain GPT, advancing the cache by one position.

    Eager (CPU), `raw`: a third of GPT.forward's tensor ops, since at this size each op's fixed cost (3-30 us
    here) is most of a step. T=1 needs no masks or transposes; q|k|v and the value-embedding gate come out of
    one matmul; q and k are normed and rotated as one tensor, with QK_SCALE and attention's 1/sqrt(D) folded
    into the rotary tables; keys/values go straight into the cache; mixing scalars are read once per
    generation; every matrix takes the layout this CPU's BLAS streams fastest for the batch. It returns the
    lm_head outputs before the softcap: the softcap is monotone, so a sampler can take the top-k first and
    cap only those (`sample_next(..., softcap=)`); `__call__` caps all of them, exactly as GPT.forward.
    static=True: nothing depends on the position but tensor values (`self.pos`), so the step can be captured
    in a CUDA graph: keys/values land by index_copy_, attention reads the whole cache under a mask.
    """

    min_shared = 64  # shared prompt positions below which one attention call over every row is cheaper

    def __init__(self, model, static: bool = False):
        self.model, self.static = model, static
        self.softcap = model.config.softcap
        self._head_t = None

    def start(self, pos: int, end: int) -> "DecodeStep":
        """Per-generation constants for decoding positions [pos, end); returns self. Read now, and the matrices
        packed again on first use, since training may change the weights between generations (a write through
        `.data` or a fused optimizer does not bump `_version`, so that cannot tell). The repacking costs ~20 ms
        at d4 (~3% of a 128-token generation), most of it lm_head's transposed copy at batch 1."""
        m = self.model
        cos, sin = m.cos[0, :end, 0], m.sin[0, :end, 0]  # (end, D/2)
        self.C, self.S = torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1)
        a = m.blocks[0].attn
        self.half, self.heads = m.config.head_dim // 2, (a.n_head, a.n_kv_head, a.head_dim)
        # unit() in place of norm() drops a sqrt(D) that comes back here; q heads also carry attention's
        # 1/sqrt(D), so the scores need no scaling
        self.head_scale = torch.tensor([a.qk_scale] * a.n_head + [a.qk_scale * a.head_dim ** 0.5] * a.n_kv_head,
                                       device=cos.device).view(-1, 1)
        self.root_c = m.config.n_embd ** 0.5
        self.lambdas = list(zip(m.resid_lambdas.tolist(), m.x0_lambdas.tolist()))
        self.smear_lambda, self.backout = m.smear_lambda.item(), m.backout_lambda.item()
        if self.static:
            self.pos = torch.full((), pos, dtype=torch.long, device=cos.device)
            self.key_pos = torch.arange(end, device=cos.device)
        self.packs, self.head_fresh = {}, False
        return self

    def _packed(self, B: int) -> list[tuple]:
        """Per generation, per layer: (q|k|v|ve gate stacked, attn c_proj, mlp c_fc, mlp c_proj, value embedding
        or None) laid out for B rows as _head lays out lm_head: transposed copies at 1 row (x @ W^T through
        F.linear is ~3x slower there), as they are at 2-8 rows (W @ x^T). The gate reads the first channels of
        the same input, so its rows are zero-padded to the full width. The matrices that read a normed input
        carry norm()'s sqrt(C) (unit() leaves it out). Read once per generation, so weight updates count."""
        layout = "rows" if B == 1 else "cols"
        if layout not in self.packs:
            lay = (lambda w: w.t().contiguous()) if B == 1 else (lambda w: w.contiguous())
            packs = self.packs[layout] = []
            for i, block in enumerate(self.model.blocks):
                a, mlp = block.attn, block.mlp
                rows = [a.c_q.weight, a.c_k.weight, a.c_v.weight]
                if a.ve_gate is not None:
                    rows.append(F.pad(a.ve_gate.weight, (0, a.c_q.weight.size(1) - a.ve_gate.in_features)))
                ve = self.model.value_embeds[str(i)] if a.ve_gate is not None else None
                packs.append((lay(torch.cat(rows).detach() * self.root_c), lay(a.c_proj.weight.detach()),
                              lay(mlp.c_fc.weight.detach() * self.root_c), lay(mlp.c_proj.weight.detach()), ve))
        return self.packs[layout]

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (B, in) @ a matrix from _packed -> (B, out)."""
        B = x.size(0)
        if B == 1:
            return torch.mm(x, w)
        return torch.mm(w, x.t()).t() if B <= 8 else F.linear(x, w)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head of a few rows: memory-bound (all of V x C is read per step), and which layout streams fastest
        depends on the rows. Measured on the 2-core AMD EPYC (docs/performance.md): x @ W^T from a transposed
        copy is 2x faster than F.linear at 1 row, W @ x^T 1.4-3x faster at 2-8 rows."""
        w = self.model.lm_head.weight
        if self.static or h.size(0) > 8:
            return F.linear(h, w)
        if h.size(0) > 1:
            return torch.mm(w, h.t()).t()
        if not self.head_fresh:  # into the same buffer each time: a fresh 33 MB one costs as much in page faults
            if self._head_t is None or self._head_t.shape != w.t().shape:
                self._head_t = w.detach().t().contiguous()
            else:
                self._head_t.copy_(w.t())
            self.head_fresh = True
        return torch.mm(h, self._head_t)

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        return self._static(ids, cache) if self.static else soft_cap(self.raw(ids, cache), self.softcap)

    def raw(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """The eager step: ids (B, 1) -> the lm_head outputs (B, V) before the softcap."""
        m, B = self.model, ids.size(0)
        H, Hkv, D = self.heads
        packs, pos, tok = self._packed(B), cache.pos, ids[:, 0]
        rot_c, rot_s = self.C[pos] * self.head_scale, self.S[pos] * self.head_scale  # (H + Hkv, D)
        x = unit(m.wte(tok)).mul_(self.root_c)  # (B, C), = norm()
        prev, cache.last_emb = cache.last_emb, x.view(B, 1, -1)
        if prev is not None:  # the smear (GPT.smear) of one token onto the one before it
            gate = torch.sigmoid(F.linear(x[:, :m.smear_gate.in_features], m.smear_gate.weight))
            x = torch.addcmul(x, gate, prev.view(B, -1).to(x.dtype), value=self.smear_lambda)
        x0 = x
        for i, (w_in, w_proj, w_fc, w_out, ve) in enumerate(packs):
            lr, l0 = self.lambdas[i]
            x = torch.add(x if lr == 1.0 else x * lr, x0, alpha=l0)
            out = self._mm(unit(x), w_in)  # (B, q | k | v | ve gate)
            qk = unit(out[:, :(H + Hkv) * D].view(B, H + Hkv, D))
            qk = torch.addcmul(qk * rot_c, qk.roll(self.half, -1), rot_s)
            v = out[:, (H + Hkv) * D:(H + 2 * Hkv) * D].view(B, Hkv, D)
            if ve is not None:
                gate = torch.sigmoid(out[:, (H + 2 * Hkv) * D:]).mul_(m.blocks[i].attn.ve_gate_scale)  # (B, Hkv)
                v = torch.addcmul(v, gate.unsqueeze(-1), ve(tok).view(B, Hkv, D))
            y = self._attend(qk[:, :H], qk[:, H:], v, cache, i, pos, m.windows[i])
            x = x + self._mm(y.reshape(B, -1), w_proj)
            x = x + self._mm(self._mm(unit(x), w_fc).relu_().square_(), w_out)
            if i == m.backout_layer:
                x_mid = x
        cache.advance(1)
        return self._head(unit(torch.add(x, x_mid, alpha=-self.backout)).mul_(self.root_c))

    def _attend(self, q, k, v, cache, i, pos, window):
        """q (B, H, D) already scaled by 1/sqrt(D), k and v (B, Hkv, D) -> (B, Hkv, H / Hkv, D)."""
        cache.write(i, pos, k, v)
        lo = pos + 1 - window if window is not None and pos + 1 > window else 0
        B, H, D = q.shape
        Hkv = k.size(1)
        if B > 1 and cache.shared - lo >= self.min_shared:  # the rows share a prompt: read it once, not B times
            return self._attend_shared(q.view(B, Hkv, H // Hkv, D), cache, i, lo, cache.shared, pos + 1)
        keys, values = cache.k[i, :, :, lo:pos + 1], cache.v[i, :, :, lo:pos + 1]  # (B, Hkv, L, D)
        if H == Hkv:
            return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, scale=1.0)
        # grouped-query: viewing the query heads as (kv head, group) needs no repeated keys, which SDPA makes
        att = torch.matmul(q.view(B, Hkv, -1, D), keys.transpose(-1, -2)).softmax(-1)
        return torch.matmul(att, values)  # (B, Hkv, H / Hkv, D), heads in SDPA's order

    @staticmethod
    def _attend_shared(q, cache, i, lo, shared, end):
        """Attention of q (B, Hkv, G, D) over keys [lo, end) whose part [lo, shared) is the same in every row:
        that part's scores come from row 0's keys for all B x G queries in one matmul per kv head (at batch 8
        the prompt's keys/values are most of the bytes a step reads); one softmax over both parts."""
        B, Hkv, G, D = q.shape
        kp, vp = cache.k[i, 0, :, lo:shared], cache.v[i, 0, :, lo:shared]              # (Hkv, Lp, D)
        ks, vs = cache.k[i, :, :, shared:end], cache.v[i, :, :, shared:end]            # (B, Hkv, Ls, D)
        qh = q.transpose(0, 1).reshape(Hkv, B * G, D)
        scores = torch.cat([torch.matmul(qh, kp.transpose(-1, -2)).view(Hkv, B, G, -1).transpose(0, 1),
                            torch.matmul(q, ks.transpose(-1, -2))], -1).softmax(-1)    # (B, Hkv, G, Lp + Ls)
        ap, as_ = scores.split([shared - lo, end - shared], -1)
        yp = torch.matmul(ap.transpose(0, 1).reshape(Hkv, B * G, -1), vp).view(Hkv, B, G, D).transpose(0, 1)
        return torch.matmul(as_, vs).add_(yp)

    def _static(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """The static-shape step (CUDA graphs): GPT.forward's modules, the position a tensor, the whole cache
        read under a mask."""
        m, B = self.model, ids.size(0)
        pos = self.pos
        C, S = self.C.index_select(0, pos.view(1)), self.S.index_select(0, pos.view(1))
        x = norm(m.wte(ids))  # (B, 1, C)
        prev, cache.last_emb = cache.last_emb, x
        x = m.smear(x, prev)
        x0 = x
        for i, block in enumerate(m.blocks):
            attn, (lr, l0) = block.attn, self.lambdas[i]
            x = torch.add(x * lr, x0, alpha=l0)
            h = norm(x)
            q = attn.c_q(h).view(B, attn.n_head, attn.head_dim)
            k = attn.c_k(h).view(B, attn.n_kv_head, attn.head_dim)
            v = attn.c_v(h).view(B, attn.n_kv_head, attn.head_dim)
            if attn.ve_gate is not None:
                gate = torch.sigmoid(attn.ve_gate(h[..., :attn.ve_gate.in_features])).mul_(attn.ve_gate_scale).view(B, -1, 1)
                v = torch.addcmul(v, gate, m.value_embeds[str(i)](ids).view_as(v))
            q, k = norm(q) * attn.qk_scale, norm(k) * attn.qk_scale
            q = torch.addcmul(q * C, q.roll(self.half, -1), S).unsqueeze(2)  # (B, H, 1, D)
            k = torch.addcmul(k * C, k.roll(self.half, -1), S)
            gqa = q.size(1) != k.size(1)
            cache.k[i].index_copy_(2, pos.view(1), k.unsqueeze(2).to(cache.k.dtype))
            cache.v[i].index_copy_(2, pos.view(1), v.unsqueeze(2).to(cache.v.dtype))
            seen = self.key_pos <= pos
            if m.windows[i] is not None:
                seen &= self.key_pos > pos - m.windows[i]
            n = self.key_pos.numel()
            y = F.scaled_dot_product_attention(q.to(cache.k.dtype), cache.k[i, :, :, :n], cache.v[i, :, :, :n],
                                               attn_mask=seen.view(1, n), enable_gqa=gqa)
            x = x + attn.c_proj(y.view(B, 1, -1))
            x = x + block.mlp(norm(x))
            if i == m.backout_layer:
                x_mid = x
        self.pos += 1
        return soft_cap(F.linear(norm(x - m.backout_lambda * x_mid)[:, 0], m.lm_head.weight), self.softcap)


class CudaGraphStep:
    """A static DecodeStep captured once per generation in a CUDA graph under bf16 autocast: one replay per
    token instead of hundreds of kernel launches. step(ids, cache) like DecodeStep; the cache must not move."""

    def __init__(self, model, dtype=torch.bfloat16):
        self.step, self.dtype, self.graph = DecodeStep(model, static=True), dtype, None

    def start(self, pos: int, end: int, batch: int, cache) -> "CudaGraphStep":
        self.step.start(pos, end)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=cache.k.device)
        self.graph = torch.cuda.CUDAGraph()
        # the warm-up (lazy initialisation must not happen during capture) writes position `pos` of the cache,
        # which the first real step overwrites before anything reads it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        low = self.dtype != torch.float32
        with torch.cuda.stream(side), torch.autocast("cuda", dtype=self.dtype, enabled=low):
            self.step(self.ids, cache)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph), torch.autocast("cuda", dtype=self.dtype, enabled=low):
            self.logits = self.step(self.ids, cache).float()
        self.step.pos.fill_(pos)
        return self

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()  # advances self.step.pos on the device
        cache.advance(1)
        return self.logits
