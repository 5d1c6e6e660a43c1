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

import warnings
from collections import deque

import torch
import torch.nn.functional as F

from nanochat.cpu_kernels import CudaGraphStep, DecodeStep, last_logits, soft_cap
from nanochat.gpt import GPT, KVCache
from nanochat.sandbox import calculator, isolation
from nanochat.tokenizer import StreamDecoder

SPECIALS = ("<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
            "<|output_end|>")
MAX_TOOL_OUTPUT_CHARS = 256  # what the model gets to read back from one calculator call


# ----------------------------------------------------------------------------- sampling

def sample_next(logits: torch.Tensor, rng: torch.Generator | None, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """One token per row of `logits` (B, V): greedy at temperature 0, else softmax(logits / T) sampling,
    optionally restricted to the top_k tokens and/or the smallest set whose probability reaches top_p.
    softcap=c: `logits` are the model's raw outputs, still to be capped as c*tanh(z/c); that map is monotone,
    so the argmax and the top-k are taken first and only the chosen values are capped."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    idx = None
    if top_k is not None and top_k < logits.size(-1):
        logits, idx = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    if softcap is not None:
        logits = soft_cap(logits, softcap)
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
        # a plain GPT decodes through the hand-written one-token step (nanochat/cpu_kernels.py): eager in fp32 on
        # the CPU, captured in a CUDA graph on CUDA; `decode = "forward"` falls back to GPT.forward
        self.decode = ("graph" if self.device.type == "cuda" else "fast") if type(model) is GPT else "forward"
        self._fast = DecodeStep(model)

    # ------------------------------------------------------------------ the forward passes

    def _decoder(self, pos: int, end: int, batch: int, cache: KVCache):
        """The one-token step for positions [pos, end): (ids (B, 1), cache -> logits (B, V), softcap), where
        softcap is None for capped logits, else the cap the sampler still has to apply (see sample_next)."""
        if self.decode == "graph":
            try:
                return CudaGraphStep(self.model, self.cache_dtype).start(pos, end, batch, cache), None
            except RuntimeError as e:  # e.g. an op that cannot be captured: decode eagerly from now on
                warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding through GPT.forward")
                self.decode = "forward"
        if self.decode == "fast" and self.cache_dtype == torch.float32:
            return self._fast.start(pos, end).raw, self._fast.softcap
        return (lambda ids, c: self.model(ids, kv_cache=c)[:, -1, :]), None

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
        logits = last_logits(self.model, torch.tensor([tokens], dtype=torch.long, device=self.device), prompt_cache)
        cache = self._cache(num_samples, len(tokens) + budget)
        cache.prefill(prompt_cache)
        del prompt_cache
        logits = logits.expand(num_samples, -1)
        step_fn, step_cap = self._decoder(len(tokens), len(tokens) + budget, num_samples, cache)
        cap = None  # the prefill's logits are capped already
        rows = [_Row() for _ in range(num_samples)]
        for step in range(budget):
            sampled = sample_next(logits, rng, temperature, top_k, top_p, cap)
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
            logits, cap = step_fn(ids.view(num_samples, 1), cache), step_cap

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
        decoder = StreamDecoder(self.tokenizer)
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
                text = decoder.flush()
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
        text = decoder.flush()
        if text:
            yield {"type": "text", "text": text}
        if in_code:  # the reply ended inside a tool call: show what the model wrote, say it was not run
            yield {"type": "tool_call", "code": self.tokenizer.decode(code)}
            yield {"type": "tool_result", "output": "the reply ended before <|python_end|>: not run",
                   "status": "unfinished", "isolation": isolation()}
        yield {"type": "done", "reason": row.reason if row else "stop", "tokens": n}
