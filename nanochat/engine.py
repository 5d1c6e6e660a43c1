"""Inference: KV-cached sampling, the calculator tool, and a streaming chat API a UI can render.

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, temperature=0.8):   # one step
        ...
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=64)
    for ev in engine.stream_chat({"messages": [{"role": "user", "content": "hi"}]}):
        ev -> {"type": "text", "text"} | {"type": "tool_call", "code"} | {"type": "tool_result", "output", "status", "isolation"}
              | {"type": "notice", "text"} | {"type": "done", "reason", "tokens"}

How a generation runs: the prompt is prefilled once at batch 1, its KV cache copied into every row of
a batch-`num_samples` cache, and then all rows decode one token per step, each sampling independently
(their first tokens too) from one seeded generator. A row stops at <|assistant_end|> or <|bos|>; all
stop at `max_tokens` or when the context window is full.

Tool use: what a row writes between <|python_start|> and <|python_end|> is evaluated by the sandboxed
calculator, and <|output_start|> result <|output_end|> is forced into that row (mask 0: the model did
not choose these tokens, so RL and SFT must not train on them).
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, QK_SCALE, VE_GATE_CHANNELS, VE_GATE_SCALE, KVCache, norm
from nanochat.sandbox import calculator, isolation

SPECIALS = ("<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
            "<|output_end|>")
MAX_TOOL_OUTPUT_CHARS = 256  # what the model gets to read back from one calculator call


# ----------------------------------------------------------------------------- sampling

def sample_next(logits: torch.Tensor, rng: torch.Generator | None, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """One token per row of `logits` (B, V): greedy at temperature 0, else softmax(logits / T) sampling,
    optionally restricted to the top_k tokens and/or the smallest set whose probability reaches top_p."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    idx = None
    if top_k is not None and top_k < logits.size(-1):
        logits, idx = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    logits = logits / temperature
    if top_p is not None and top_p < 1.0:
        if idx is None:
            logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        logits = logits.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf"))
    # inverse-CDF sampling: one uniform per row. torch.multinomial draws one exponential per vocabulary
    # entry instead, which at a 32k vocabulary costs more than the whole decode step of a small model.
    cdf = F.softmax(logits, dim=-1).cumsum_(dim=-1)
    u = torch.rand(cdf.size(0), 1, generator=rng, device=cdf.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1).squeeze(-1)
    return choice if idx is None else idx.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------- text streaming

class _PendingDecoder:
    """UTF-8-safe incremental decoding for tokenizers without a StreamDecoder: hold tokens back while
    their text ends in an incomplete character (decode shows it as U+FFFD)."""

    def __init__(self, tokenizer):
        self.tok, self.pending = tokenizer, []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tok.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:  # a UTF-8 character spans at most 4 bytes
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tok.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def stream_decoder(tokenizer):
    try:
        from nanochat.tokenizer import StreamDecoder, Tokenizer
        if isinstance(tokenizer, Tokenizer):
            return StreamDecoder(tokenizer)
    except ImportError:
        pass
    return _PendingDecoder(tokenizer)


# ----------------------------------------------------------------------------- the engine

class _Row:
    """Decoding state of one sample: tokens to force, the tool call being written, why it stopped."""
    __slots__ = ("forced", "code", "done", "reason", "tool_calls")

    def __init__(self):
        self.forced = deque()
        self.code = None         # list of token ids while inside <|python_start|> ... <|python_end|>
        self.done = False
        self.reason = None       # "stop" | "max_tokens" | "context"
        self.tool_calls = []     # dicts: code, output, status


class Engine:
    def __init__(self, model, tokenizer, tool_timeout: float = 3.0):
        self.model, self.tokenizer, self.tool_timeout = model, tokenizer, tool_timeout
        self.device = model.get_device()
        cfg = model.config
        self.context = cfg.sequence_len
        self.cache_shape = (cfg.n_kv_head, cfg.head_dim, cfg.n_layer)
        self.cache_dtype = model.resolve_compute_dtype(self.device) if hasattr(model, "resolve_compute_dtype") \
            else torch.float32
        ids = {name: tokenizer.encode_special(name) for name in SPECIALS}
        self.bos, self.assistant_end = ids["<|bos|>"], ids["<|assistant_end|>"]
        self.python_start, self.python_end = ids["<|python_start|>"], ids["<|python_end|>"]
        self.output_start, self.output_end = ids["<|output_start|>"], ids["<|output_end|>"]
        self.specials = set(ids.values())
        self.vocab_size = tokenizer.get_vocab_size()
        # the hand-written one-token step is fp32 eager code: used for a plain GPT computing in fp32 (CPU)
        self.fast_decode = type(model) is GPT and self.cache_dtype == torch.float32
        self._head_t = None  # (lm_head weight transposed,), refreshed per generation

    # ------------------------------------------------------------------ the forward passes

    def _prefill(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (1, V) of the last prompt position. Only that position goes through lm_head: the other
        positions' logits (T x V, the biggest tensor of a small model) would be thrown away."""
        head = getattr(self.model, "lm_head", None)
        hook = head.register_forward_pre_hook(lambda mod, args: (args[0][:, -1:],)) if head is not None else None
        try:
            return self.model(ids, kv_cache=cache)[:, -1, :]
        finally:
            if hook is not None:
                hook.remove()

    def _decode_setup(self, start: int, end: int):
        """Per-generation constants of _decode_step: the mixing scalars (read now, since training may
        change them between generations) and rotary factors for positions [start, end)."""
        m = self.model
        d = m.config.head_dim // 2
        cos, sin = m.cos[0, start:end, 0], m.sin[0, start:end, 0]  # (n, d)
        self._rot = (torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1), start)
        self._lambdas = list(zip(m.resid_lambdas.tolist(), m.x0_lambdas.tolist()))
        self._half = d
        # refreshed every generation: optimizers update weights in ways that do not always bump
        # `_version` (e.g. through `.data`), and one copy per generation is cheap next to its decode steps
        w = m.lm_head.weight.detach()
        if self._head_t is None or self._head_t[0].shape != w.t().shape:
            self._head_t = (w.t().contiguous(),)
        else:
            self._head_t[0].copy_(w.t())

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head for a few rows. The (V, C) @ (C, B) product is memory-bound (the whole V x C matrix is
        read per step), and which layout the BLAS streams fastest depends on B: measured on the 2-core
        AMD EPYC (docs/performance.md), x @ W^T from a transposed copy is 2x faster at B=1, and W @ x^T
        1.4-3x faster at B=2..8."""
        if h.size(0) == 1:
            return torch.mm(h, self._head_t[0])
        if h.size(0) <= 8:
            return torch.mm(self.model.lm_head.weight, h.t()).t().contiguous()
        return self.model.lm_head(h)

    def _decode_step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """GPT.forward for one new token per row, ids (B, 1) -> logits (B, V), in about half the tensor ops:
        T=1 needs no masks or transposes, rotary is x*C + roll(x)*S, and the keys/values are written
        straight into the cache. Same math as nanochat.gpt; tests/test_engine.py checks they agree."""
        m, pos, B = self.model, cache.pos, ids.size(0)
        C, S, start = self._rot
        C, S = C[pos - start], S[pos - start]
        half = self._half
        x = norm(m.wte(ids))  # (B, 1, C)
        prev, cache.last_emb = cache.last_emb, x
        x = m.smear(x, prev)
        x0 = x
        for i, block in enumerate(m.blocks):
            attn, (lr, l0) = block.attn, self._lambdas[i]
            x = torch.add(x * lr, x0, alpha=l0)
            h = norm(x)
            q = attn.c_q(h).view(B, attn.n_head, attn.head_dim)
            k = attn.c_k(h).view(B, attn.n_kv_head, attn.head_dim)
            v = attn.c_v(h).view(B, attn.n_kv_head, attn.head_dim)
            if attn.ve_gate is not None:
                gate = torch.sigmoid(attn.ve_gate(h[..., :VE_GATE_CHANNELS])).mul_(VE_GATE_SCALE).view(B, attn.n_kv_head, 1)
                v = torch.addcmul(v, gate, m.value_embeds[str(i)](ids).view_as(v))
            q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
            q = torch.addcmul(q * C, q.roll(half, -1), S)
            k = torch.addcmul(k * C, k.roll(half, -1), S)
            cache.k[i, :, :, pos].copy_(k)
            cache.v[i, :, :, pos].copy_(v)
            window = m.windows[i]
            lo = pos + 1 - window if window is not None and pos + 1 > window else 0
            y = F.scaled_dot_product_attention(q.unsqueeze(2), cache.k[i, :, :, lo:pos + 1],
                                               cache.v[i, :, :, lo:pos + 1],
                                               enable_gqa=attn.n_head != attn.n_kv_head)  # (B, H, 1, D)
            x = x + attn.c_proj(y.view(B, 1, -1))
            x = x + block.mlp.c_proj(F.relu(block.mlp.c_fc(norm(x))).square_())
            if i == m.backout_layer:
                x_mid = x
        cache.advance(1)
        cap = m.config.softcap
        return self._head(norm(x - m.backout_lambda * x_mid)[:, 0]).div_(cap).tanh_().mul_(cap)

    def _cache(self, batch_size: int, max_len: int) -> KVCache:
        kv_heads, head_dim, layers = self.cache_shape
        return KVCache(batch_size, kv_heads, max_len, head_dim, layers, device=self.device, dtype=self.cache_dtype)

    def _check(self, tokens, num_samples, max_tokens, temperature, top_k, top_p):
        if not tokens or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in tokens):
            raise ValueError(f"tokens must be a non-empty list of ints in [0, {self.vocab_size})")
        if len(tokens) >= self.context:
            raise ValueError(f"the prompt has {len(tokens)} tokens, the context window is {self.context}: "
                             "no room to generate")
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")
        if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"max_tokens={max_tokens!r} must be None or an integer >= 1")
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
        if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"top_k={top_k!r} must be None or an integer >= 1")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} must be None or in (0, 1]")

    def _tool(self, row: _Row):
        """The row just wrote <|python_end|>: run its code, queue the result to be forced in."""
        code = self.tokenizer.decode(row.code)
        row.code = None
        output, status = calculator(code, timeout=self.tool_timeout)
        if len(output) > MAX_TOOL_OUTPUT_CHARS:
            output = output[:MAX_TOOL_OUTPUT_CHARS] + "…"
        row.tool_calls.append({"code": code, "output": output, "status": status, "isolation": isolation()})
        row.forced.extend([self.output_start, *self.tokenizer.encode(output), self.output_end])

    @torch.inference_mode()
    def _run(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yields (token_column, mask_column, rows) once per step; rows are the _Row states."""
        self._check(tokens, num_samples, max_tokens, temperature, top_k, top_p)
        budget = self.context - len(tokens)
        reason_at_end = "context"
        if max_tokens is not None and max_tokens <= budget:
            budget, reason_at_end = max_tokens, "max_tokens"
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed)

        prompt_cache = self._cache(1, len(tokens))
        logits = self._prefill(torch.tensor([tokens], dtype=torch.long, device=self.device), prompt_cache)
        cache = self._cache(num_samples, len(tokens) + budget)
        cache.prefill(prompt_cache)
        del prompt_cache
        logits = logits.expand(num_samples, -1)
        step_fn = (lambda x, c: self.model(x, kv_cache=c)[:, -1, :]) if not self.fast_decode else self._decode_step
        if self.fast_decode:
            self._decode_setup(len(tokens), len(tokens) + budget)
        rows = [_Row() for _ in range(num_samples)]
        for step in range(budget):
            sampled = sample_next(logits, rng, temperature, top_k, top_p)
            column = sampled.tolist()  # the one device sync per step
            masks = [1] * num_samples
            for i, row in enumerate(rows):
                if row.done:
                    continue
                if row.forced:
                    column[i], masks[i] = row.forced.popleft(), 0
                    sampled = None  # the input differs from what was sampled
                t = column[i]
                if t == self.assistant_end or t == self.bos:
                    row.done, row.reason = True, "stop"
                elif t == self.python_start:
                    row.code = []
                elif t == self.python_end and row.code is not None:
                    self._tool(row)
                elif row.code is not None:
                    row.code.append(t)
            last = step == budget - 1
            if last:
                for row in rows:
                    if not row.done:
                        row.done, row.reason = True, reason_at_end
            yield column, masks, rows
            if last or all(row.done for row in rows):
                return
            ids = sampled if sampled is not None else torch.tensor(column, dtype=torch.long, device=self.device)
            logits = step_fn(ids.view(num_samples, 1), cache)

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yields (token_column, mask_column): one token per row per step. After a row has stopped, its
        entries are meaningless (the other rows may still be running); generate_batch trims them."""
        for column, masks, _ in self._run(tokens, num_samples, max_tokens, temperature, top_k, top_p, seed):
            yield column, masks

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """-> (results, masks): per row the prompt followed by the generated tokens (the stop token left
        out); masks are 0 over the prompt and the forced tool output, 1 where the model sampled."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        stopped = [False] * num_samples
        for column, mask_column, rows in self._run(tokens, num_samples, **kwargs):
            for i, row in enumerate(rows):
                if stopped[i]:
                    continue
                if row.done and row.reason == "stop":
                    stopped[i] = True  # this step's token is the stop token
                    continue
                results[i].append(column[i])
                masks[i].append(mask_column[i])
                stopped[i] = row.done
        return results, masks

    # ------------------------------------------------------------------ chat

    def fit_conversation(self, conversation: dict, reserve: int) -> tuple[list[int], str | None]:
        """Render for completion, dropping the oldest user/assistant turns until `reserve` tokens of the
        context remain free. Returns (ids, notice or None): truncation is never silent."""
        messages = list(conversation["messages"])
        limit = self.context - reserve
        dropped = 0
        while True:
            ids = self.tokenizer.render_for_completion({"messages": messages})
            if len(ids) <= limit:
                break
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if len(messages) - first > 2:  # always keep the last user message
                del messages[first:first + 2]
                dropped += 2
                continue
            kept = limit - 1
            ids = [self.bos] + ids[-kept:]  # the end still holds <|assistant_start|>
            return ids, (f"the conversation is too long for the {self.context}-token context: "
                         f"dropped {dropped} older messages and kept only the last {kept} tokens of the rest")
        if dropped:
            return ids, (f"the conversation is too long for the {self.context}-token context: "
                         f"dropped the {dropped} oldest messages")
        return ids, None

    def stream_chat(self, conversation: dict, max_tokens: int | None = None, temperature: float = 0.6,
                    top_k: int | None = 50, top_p: float | None = None, seed: int | None = None):
        """The assistant's next reply as events (see the module docstring). `seed=None` picks a fresh one."""
        reserve = min(max_tokens or 256, self.context // 4)
        ids, notice = self.fit_conversation(conversation, reserve)
        if notice:
            yield {"type": "notice", "text": notice}
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        decoder = stream_decoder(self.tokenizer)
        n, row, in_code, code = 0, None, False, []
        for column, masks, rows in self._run(ids, 1, max_tokens, temperature, top_k, top_p, seed):
            t, row = column[0], rows[0]
            if row.done and row.reason == "stop":
                break
            n += 1
            if in_code and t != self.python_end:
                code.append(t)
            if t == self.python_start:
                in_code, code = True, []
                text = decoder.flush() if hasattr(decoder, "flush") else ""
                if text:
                    yield {"type": "text", "text": text}
            elif t == self.python_end and in_code:
                in_code = False
                call = row.tool_calls[-1]
                yield {"type": "tool_call", "code": call["code"]}
                yield {"type": "tool_result", "output": call["output"], "status": call["status"],
                       "isolation": call["isolation"]}
            elif not in_code and masks[0] == 1 and t not in self.specials:
                text = decoder.push(t)
                if text:
                    yield {"type": "text", "text": text}
        text = decoder.flush() if hasattr(decoder, "flush") else ""
        if text:
            yield {"type": "text", "text": text}
        if in_code:  # the reply ended inside a tool call: show what the model wrote, say it was not run
            yield {"type": "tool_call", "code": self.tokenizer.decode(code)}
            yield {"type": "tool_result", "output": "the reply ended before <|python_end|>: not run",
                   "status": "unfinished", "isolation": isolation()}
        yield {"type": "done", "reason": row.reason if row else "stop", "tokens": n}
