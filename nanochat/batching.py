"""Continuous batching: many chats decoded together on one model, each row at its own position.

    scheduler = Scheduler(model, tokenizer, max_batch=16)
    row = scheduler.submit(prompt_ids, emit=print, max_tokens=64, temperature=0.7, seed=1)
    ...  # emit gets, from the scheduler's thread, the same events as Engine.stream_chat:
         # text / tool_call / tool_result, then done (reason stop|length|cancelled, tokens) or error
    scheduler.cancel(row); scheduler.close()

How it runs: one thread owns the model and a KV cache of `max_batch` slots. A new row is prefilled on
its own (batch 1, the model's ordinary KV-cache forward) and its keys/values copied into a free slot;
from then on it takes part in every decode step until it stops, when its slot is given to the next
row. Active rows always occupy slots 0..n-1 (a leaving row's slot gets the last row's cache), so a
step reads contiguous cache rows. Each row has its own length, sampling settings, seeded generator,
max_tokens and tool state; `decode_rows` is the one-token forward with per-row positions.

A row that wrote a calculator call waits for it (the sandbox runs in a thread pool) without holding
the batch back: until the result is there it rides along with a placeholder token that is never kept
(its cache column is rewritten by the next real token), then the result is forced in token by token.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from nanochat.cpu_kernels import last_logits, soft_cap
from nanochat.engine import MAX_TOOL_OUTPUT_CHARS, Engine, sample_next
from nanochat.gpt import QK_SCALE, VE_GATE_CHANNELS, VE_GATE_SCALE, KVCache, apply_rotary, norm
from nanochat.sandbox import calculator
from nanochat.tokenizer import StreamDecoder


# ----------------------------------------------------------------------------- the batched forward

def decode_rows(model, cache: KVCache, ids: torch.Tensor, pos: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """GPT.forward for one new token per row when every row sits at its own position.

    ids, pos: (B,) long; row b of `cache` (slots 0..B-1) holds that row's keys/values at [0, pos[b]).
    prev: (B,) long, each row's token at pos[b] - 1 (the smear mixes in its embedding; pos[b] >= 1).
    Writes each row's new keys/values at column pos[b] and returns logits (B, V) in fp32. The cache's
    own `pos` is not used. Same math as nanochat.gpt (tests/test_serve_batching.py checks they agree)."""
    B = ids.size(0)
    cfg = model.config
    cos, sin = model.cos[0, pos][:, None], model.sin[0, pos][:, None]  # (B, 1, 1, D/2): T=1, per row
    keys = torch.arange(int(pos.max()) + 1, device=ids.device)
    seen = keys[None, :] <= pos[:, None]  # (B, Tk): a row sees its own past, not the rest of the slot
    rows = torch.arange(B, device=ids.device)
    dtype = model.resolve_compute_dtype(ids.device)
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        x = model.smear(norm(model.wte(ids))[:, None], norm(model.wte(prev))[:, None])  # (B, 1, C)
        x0 = x
        for i, block in enumerate(model.blocks):
            attn = block.attn
            x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
            h = norm(x)
            q = attn.c_q(h).view(B, 1, attn.n_head, attn.head_dim)
            k = attn.c_k(h).view(B, 1, attn.n_kv_head, attn.head_dim)
            v = attn.c_v(h).view(B, 1, attn.n_kv_head, attn.head_dim)
            if attn.ve_gate is not None:
                gate = VE_GATE_SCALE * torch.sigmoid(attn.ve_gate(h[..., :VE_GATE_CHANNELS]))
                v = v + gate.unsqueeze(-1) * model.value_embeds[str(i)](ids)[:, None].view_as(v)
            q, k = apply_rotary(norm(q) * QK_SCALE, cos, sin), apply_rotary(norm(k) * QK_SCALE, cos, sin)
            cache.k[i, rows, :, pos] = k[:, 0].to(cache.k.dtype)
            cache.v[i, rows, :, pos] = v[:, 0].to(cache.v.dtype)
            mask = seen
            window = model.windows[i]
            if window is not None:
                mask = mask & (keys[None, :] > pos[:, None] - window)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k[i, :B, :, :keys.numel()],
                                               cache.v[i, :B, :, :keys.numel()], attn_mask=mask[:, None, None],
                                               enable_gqa=attn.n_head != attn.n_kv_head)  # (B, H, 1, D)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, 1, -1))
            x = x + block.mlp(norm(x))
            if i == model.backout_layer:
                x_mid = x
        logits = model.lm_head(norm(x - model.backout_lambda * x_mid)[:, 0]).float()
    return soft_cap(logits, cfg.softcap)


# ----------------------------------------------------------------------------- one row

class Row:
    """One sample being generated: its settings, where it is, and what it still has to say."""

    def __init__(self, ids, emit, max_tokens, temperature, top_k, top_p, seed, device):
        self.ids, self.emit = list(ids), emit
        self.max_tokens, self.temperature, self.top_k, self.top_p = max_tokens, temperature, top_k, top_p
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(seed)
        self.length = 0          # positions in the cache
        self.logits = None       # (V,) for the next token, from the last forward
        self.out = []            # generated ids (forced tool output included, as in Engine)
        self.forced = deque()    # tool output to feed before sampling again
        self.code = None         # token ids while inside <|python_start|> ... <|python_end|>
        self.tool = None         # Future of a running calculator call
        self.next = None         # a token already chosen for the next step (the first one, at admission)
        self.last = None         # the token at position length - 1 (the smear's previous token)
        self.decoder = None
        self.cancelled = False
        self.submitted = time.time()
        self.first_token_at = None


class Scheduler:
    """Owns one model copy; decodes every submitted row in shared batched steps on its own thread."""

    def __init__(self, model, tokenizer, max_batch: int = 16, tool_timeout: float = 3.0, name: str = "worker"):
        self.model, self.tokenizer, self.max_batch, self.tool_timeout = model, tokenizer, max_batch, tool_timeout
        self.engine = Engine(model, tokenizer)  # prefill, special ids, conversation fitting
        self.device, self.context = self.engine.device, self.engine.context
        cfg = model.config
        self.cache = KVCache(max_batch, cfg.n_kv_head, cfg.sequence_len, cfg.head_dim, cfg.n_layer,
                             device=self.device, dtype=self.engine.cache_dtype)
        self.placeholder = self.engine.bos
        self.rows: list[Row] = []        # active, in slot order
        self.inbox: deque[Row] = deque()
        self.wake = threading.Condition()
        self.tools = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{name}-tool")
        self.stats = {"rows": 0, "tokens": 0, "steps": 0, "row_steps": 0, "errors": 0}
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ API (any thread)

    def submit(self, ids, emit, max_tokens: int = 256, temperature: float = 0.6, top_k: int | None = 50,
               top_p: float | None = None, seed: int = 0) -> Row:
        self.engine._check(ids, 1, max_tokens, temperature, top_k, top_p)
        row = Row(ids, emit, max_tokens, temperature, top_k, top_p, seed, self.device)
        with self.wake:
            self.inbox.append(row)
            self.wake.notify()
        return row

    def cancel(self, row: Row):
        row.cancelled = True  # the loop drops it before its next step

    def load(self) -> int:
        return len(self.rows) + len(self.inbox)

    def close(self):
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=10)
        self.tools.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the loop (its own thread)

    def _loop(self):
        while True:
            with self.wake:
                while not self.closed and not self.inbox and not self.rows:
                    self.wake.wait()
                if self.closed:
                    break
                joining = []
                while self.inbox and len(self.rows) + len(joining) < self.max_batch:
                    joining.append(self.inbox.popleft())
            try:
                for row in joining:
                    self._admit(row)
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its rows, never the worker
                self.stats["errors"] += 1
                for row in self.rows:
                    self._finish(row, error=f"{type(e).__name__}: {e}")
                self.rows = []
            if self.rows and all(r.tool is not None and not r.tool.done() for r in self.rows):
                time.sleep(0.002)  # everyone waits on the calculator: don't spin
        for row in self.rows + list(self.inbox):
            self._finish(row, error="the server is shutting down")

    @torch.inference_mode()
    def _admit(self, row: Row):
        if row.cancelled:
            return self._finish(row, reason="cancelled")
        try:
            small = self.engine._cache(1, len(row.ids))
            logits = last_logits(self.model, torch.tensor([row.ids], dtype=torch.long, device=self.device), small)
        except Exception as e:  # noqa: BLE001
            self.stats["errors"] += 1
            return self._finish(row, error=f"{type(e).__name__}: {e}")
        slot, n = len(self.rows), len(row.ids)
        self.cache.k[:, slot, :, :n].copy_(small.k[:, 0, :, :n])
        self.cache.v[:, slot, :, :n].copy_(small.v[:, 0, :, :n])
        row.length, row.logits, row.decoder = n, logits[0], StreamDecoder(self.tokenizer)
        row.last = row.ids[-1]
        self.rows.append(row)
        self.stats["rows"] += 1
        # sample the first token now, so it streams before the other rows joining with this one are prefilled
        row.next = self._next_token(row)

    @torch.inference_mode()
    def _step(self):
        feed = {}  # row -> its input token; None while it waits on its tool (a placeholder rides along)
        for row in list(self.rows):
            token, row.next = (row.next, None) if row.next is not None else (self._next_token(row), None)
            if row in self.rows:
                feed[row] = token
        if not self.rows:
            return
        ids = torch.tensor([self.placeholder if feed[r] is None else feed[r] for r in self.rows],
                           dtype=torch.long, device=self.device)
        pos = torch.tensor([r.length for r in self.rows], dtype=torch.long, device=self.device)
        prev = torch.tensor([r.last for r in self.rows], dtype=torch.long, device=self.device)
        logits = decode_rows(self.model, self.cache, ids, pos, prev)
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(self.rows)
        for i, row in enumerate(self.rows):
            if feed[row] is not None:
                row.length += 1
                row.last = feed[row]
                row.logits = logits[i]

    def _next_token(self, row: Row) -> int | None:
        """The row's input for this step, or None while its tool runs; finishes rows that are done."""
        if row.cancelled:
            return self._drop(row, reason="cancelled")
        if row.tool is not None:
            if not row.tool.done():
                return None
            output, status = row.tool.result()
            row.tool = None
            row.emit({"type": "tool_result", "output": output, "status": status})
            row.forced.extend([self.engine.output_start, *self.tokenizer.encode(output), self.engine.output_end])
        if row.forced:
            t, sampled = row.forced.popleft(), False
        else:
            t, sampled = int(sample_next(row.logits[None], row.rng, row.temperature, row.top_k, row.top_p)), True
        if row.first_token_at is None:
            row.first_token_at = time.time()
        e = self.engine
        if t == e.assistant_end or t == e.bos:
            return self._drop(row, reason="stop")
        row.out.append(t)
        self.stats["tokens"] += 1
        if t == e.python_start:
            self._flush(row)
            row.code = []
        elif t == e.python_end and row.code is not None:
            code = self.tokenizer.decode(row.code)
            row.code = None
            row.emit({"type": "tool_call", "code": code})
            row.tool = self.tools.submit(self._calculate, code)
        elif row.code is not None:
            row.code.append(t)
        elif sampled and t not in e.specials:
            text = row.decoder.push(t)
            if text:
                row.emit({"type": "text", "text": text})
        if len(row.out) >= row.max_tokens or row.length + 1 >= self.context:
            return self._drop(row, reason="length")
        return t

    def _calculate(self, code: str) -> tuple[str, str]:
        output, status = calculator(code, timeout=self.tool_timeout)
        if len(output) > MAX_TOOL_OUTPUT_CHARS:
            output = output[:MAX_TOOL_OUTPUT_CHARS] + "…"
        return output, status

    def _flush(self, row: Row):
        text = row.decoder.flush() if hasattr(row.decoder, "flush") else ""
        if text:
            row.emit({"type": "text", "text": text})

    def _drop(self, row: Row, reason: str):
        """Finish an active row and give its slot away: the last row's cache moves into it."""
        slot = self.rows.index(row)
        last = len(self.rows) - 1
        if slot != last:
            n = self.rows[last].length
            self.cache.k[:, slot, :, :n].copy_(self.cache.k[:, last, :, :n])
            self.cache.v[:, slot, :, :n].copy_(self.cache.v[:, last, :, :n])
            self.rows[slot] = self.rows[last]
        self.rows.pop()
        self._finish(row, reason=reason)
        return None

    def _finish(self, row: Row, reason: str = "stop", error: str | None = None):
        try:
            if error is not None:
                row.emit({"type": "error", "message": error})
                return
            if row.decoder is not None:
                self._flush(row)
            if row.code is not None:  # ended inside a tool call: show it, say it was not run
                row.emit({"type": "tool_call", "code": self.tokenizer.decode(row.code)})
                row.emit({"type": "tool_result", "output": "the reply ended before <|python_end|>: not run",
                          "status": "unfinished"})
            row.emit({"type": "done", "reason": reason, "tokens": len(row.out), "prompt_tokens": len(row.ids),
                      "ids": row.out})
        except Exception:  # noqa: BLE001 - a broken listener must not take the worker down
            pass
