"""Engine: KV-cached decoding matches full forward passes; sampling, seeds, tools, context, streaming."""
import pytest
import torch
import torch.nn as nn

from nanochat.cpu_kernels import DecodeStep, last_logits
from nanochat.engine import Engine, sample_next
from nanochat.gpt import GPT, GPTConfig, KVCache
from nanochat.sandbox import isolation

SPECIAL_NAMES = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """A tiny tokenizer with the contract's methods: one token per UTF-8 byte, specials after 255."""

    def __init__(self):
        self.special = self.special_tokens = {name: 256 + i for i, name in enumerate(SPECIAL_NAMES)}
        self.vocab = [bytes([i]) for i in range(256)]

    def get_vocab_size(self):
        return 256 + len(self.special)

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def encode_special(self, name):
        return self.special[name]

    def encode(self, text, prepend=None, append=None):
        ids = list(text.encode("utf-8"))
        return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def render_for_completion(self, conv):
        s = self.special
        ids = [s["<|bos|>"]]
        for m in conv["messages"]:
            role = "user" if m["role"] in ("user", "system") else "assistant"
            ids += [s[f"<|{role}_start|>"]] + self.encode(m["content"]) + [s[f"<|{role}_end|>"]]
        return ids + [s["<|assistant_start|>"]]


def tiny_gpt(seq_len=64, vocab=265, seed=0, n_kv_head=2):
    """A random model whose blocks all matter (the default init makes blocks identities), with a sliding
    window layer (window seq_len // 2) so decoding past the window exercises the cache's window path."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=3, n_head=4, n_kv_head=n_kv_head,
                          n_embd=64, window_pattern="SL"), compute_dtype=torch.float32)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "wte" in name or "value_embeds" in name else 0.15)
        model.smear_lambda.fill_(0.5)  # 0 at init would leave the smear's previous-token path untested
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_gpt()


def test_cached_logits_match_uncached(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 50))
    with torch.inference_mode():
        full = model(ids)
        cache = KVCache(2, 2, 50, 16, 3)
        parts = [model(ids[:, :20], kv_cache=cache)]
        parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(20, 50)]  # past the window of 32
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("static,n_kv_head", [(False, 2), (False, 4), (True, 2)])
def test_fast_decode_step_matches_the_model(static, n_kv_head):
    """The hand-written one-token step computes what GPT.forward computes (value embeddings, a sliding-window
    layer whose window of 32 is crossed, with grouped-query attention or without, which take different
    attention code), eagerly and in its static-shape form (the one captured in a CUDA graph on CUDA: full
    cache under a mask, position as a tensor)."""
    model = tiny_gpt(n_kv_head=n_kv_head)
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (3, 60))
    step = DecodeStep(model, static=static)
    with torch.inference_mode():
        full = model(ids)
        cache = KVCache(3, n_kv_head, 60, 16, 3)
        got = [last_logits(model, ids[:, :10], cache)]
        assert got[0].shape == (3, 265)
        step.start(10, 60)
        got += [step(ids[:, t:t + 1], cache) for t in range(10, 60)]
    torch.testing.assert_close(torch.stack(got, dim=1), full[:, 9:], atol=1e-4, rtol=1e-4)
    # batch 1 takes another lm_head layout; and a weight update (as in RL) must reach the decoder
    with torch.inference_mode():
        cache = KVCache(1, n_kv_head, 12, 16, 3)
        last_logits(model, ids[:1, :10], cache)
        emb9 = cache.last_emb  # the smear's previous token: rewinding the cache to 10 rewinds it too
        torch.testing.assert_close(step.start(10, 12)(ids[:1, 10:11], cache), full[:1, 10], atol=1e-4, rtol=1e-4)
        model.lm_head.weight.mul_(2)
        cache.pos, cache.last_emb = 10, emb9
        new = step.start(10, 12)(ids[:1, 10:11], cache)
        cache.pos = 10
        ref = model(ids[:1, :11])[:, -1]
        model.lm_head.weight.div_(2)
    torch.testing.assert_close(new, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_kv_head,min_shared", [(2, 1), (4, 1), (4, 64)])
def test_fast_decode_step_reads_a_shared_prompt_once(n_kv_head, min_shared):
    """Rows sampled from one prefilled prompt share its keys/values; the step reads them from row 0 (with and
    without grouped-query attention, through the window of the sliding layer) and still computes per row what
    GPT.forward computes. A write below the shared part (a rewound cache) ends the sharing."""
    model = tiny_gpt(n_kv_head=n_kv_head)
    torch.manual_seed(3)
    prompt, new = torch.randint(0, 256, (1, 40)), torch.randint(0, 256, (3, 20))
    step = DecodeStep(model)
    step.min_shared = min_shared
    with torch.inference_mode():
        full = model(torch.cat([prompt.expand(3, -1), new], 1))
        single = KVCache(1, n_kv_head, 40, 16, 3)
        first = last_logits(model, prompt, single)
        cache = KVCache(3, n_kv_head, 60, 16, 3)
        cache.prefill(single)
        assert cache.shared == 40
        step.start(40, 60)
        got = [first.expand(3, -1)] + [step(new[:, t:t + 1], cache) for t in range(19)]
        torch.testing.assert_close(torch.stack(got, 1), full[:, 39:59], atol=1e-4, rtol=1e-4)
        cache.pos, cache.last_emb = 30, None  # rewind into the prompt: rows now differ from position 30 on
        step(new[:, :1], cache)
        assert cache.shared == 30


def test_engine_decodes_alike_through_every_path(model, tok):
    """Greedy generations agree whichever one-token step the engine uses (the CPU runs two of the three)."""
    prompt = tok.encode("The quick brown fox")
    engine = Engine(model, tok)
    assert engine.decode == "fast"
    fast, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    engine.decode = "forward"
    plain, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    assert fast == plain


def test_greedy_equals_repeated_full_forward(model, tok):
    prompt = tok.encode("The quick brown fox")
    n = 40  # 19 + 40 positions: crosses the 32-token sliding window
    engine = Engine(model, tok)
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=n, temperature=0.0)
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
            if nxt in (tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()):
                break
            ids.append(nxt)
    assert len(ids) > len(prompt) + 10, "the reference stopped too early to be a useful comparison"
    assert results[0] == ids and results[1] == ids
    assert masks[0] == [0] * len(prompt) + [1] * (len(ids) - len(prompt))


def test_independent_first_tokens_and_seeds(model, tok):
    engine = Engine(model, tok)
    prompt = tok.encode("hello")
    first = next(engine.generate(prompt, num_samples=16, temperature=1.0, seed=0))[0]
    assert len(set(first)) > 1, "all 16 samples share their first token: rows are not sampled independently"
    a, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=1.0, top_k=50, seed=7)
    b, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=1.0, top_k=50, seed=7)
    c, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=12, temperature=1.0, top_k=50, seed=8)
    assert a == b
    assert a != c


def test_sample_next_top_k_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 1.0]]).repeat(2000, 1)
    rng = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, rng, 1.0, top_k=2).tolist()) == {1, 2}
    assert set(sample_next(logits, rng, 1.0, top_p=0.3).tolist()) == {1}  # p(1) ~ 0.5 already reaches 0.3
    assert set(sample_next(logits, rng, 1.0, top_p=0.9).tolist()) == {1, 2}
    assert sample_next(logits[:1], rng, 0.0).tolist() == [1]
    assert len(set(sample_next(logits, rng, 1.0).tolist())) >= 4


def test_sample_next_caps_raw_logits_after_choosing():
    """softcap=c on raw outputs draws what the capped logits draw (same generator state), for every mode:
    greedy, top-k (capped after the choice), top-p and the full distribution (capped up front)."""
    # up to ~40: the cap (15) reshapes the distribution, yet no two values saturate to one float (a tie that
    # the capped argmax would break by index and the raw argmax would not)
    raw = torch.randn(64, 300) * 12
    capped = 15 * torch.tanh(raw / 15)
    for kw in (dict(temperature=0.0), dict(top_k=20), dict(top_k=20, top_p=0.8), dict(top_p=0.8), {}):
        kw = {"temperature": 0.7, **kw}
        a = sample_next(capped, torch.Generator().manual_seed(3), **kw)
        b = sample_next(raw, torch.Generator().manual_seed(3), softcap=15.0, **kw)
        assert torch.equal(a, b), kw
    assert not torch.equal(sample_next(raw, torch.Generator().manual_seed(3), 0.7),
                           sample_next(capped, torch.Generator().manual_seed(3), 0.7))


class BigramModel(nn.Module):
    """A model that always predicts a scripted successor of the last token (a bigram table), with the
    cache interface of GPT: enough to script a tool call through the real engine."""

    def __init__(self, successors: dict[int, int], vocab: int, seq_len: int = 64):
        super().__init__()
        self.config = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        table = torch.full((vocab, vocab), -10.0)
        for a, b in successors.items():
            table[a, b] = 10.0
        self.register_buffer("table", table)
        self.seen = []  # every token fed to the model

    def get_device(self):
        return self.table.device

    def forward(self, idx, kv_cache=None):
        self.seen.append(idx.clone())
        kv_cache.advance(idx.size(1))
        return self.table[idx]


def script(tok, pairs):
    return {(a if isinstance(a, int) else tok.encode(a)[0]): (b if isinstance(b, int) else tok.encode(b)[0])
            for a, b in pairs}


def test_tool_call_is_executed_injected_and_masked(tok):
    s = tok.special
    # <|assistant_start|> <|python_start|> 6 * 7 <|python_end|> [forced: <|output_start|> 42 <|output_end|>] ! <|assistant_end|>
    succ = script(tok, [(s["<|assistant_start|>"], s["<|python_start|>"]), (s["<|python_start|>"], "6"), ("6", "*"),
                        ("*", "7"), ("7", s["<|python_end|>"]), (s["<|output_end|>"], "!"),
                        ("!", s["<|assistant_end|>"]), (s["<|python_end|>"], "x")])
    model = BigramModel(succ, tok.get_vocab_size())
    engine = Engine(model, tok)
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "what is 6*7?"}]})
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=0.0)
    expected = ([s["<|python_start|>"]] + tok.encode("6*7") + [s["<|python_end|>"], s["<|output_start|>"]]
                + tok.encode("42") + [s["<|output_end|>"]] + tok.encode("!"))
    assert results[0][len(prompt):] == expected
    assert masks[0][len(prompt):] == [1, 1, 1, 1, 1, 0, 0, 0, 0, 1]
    assert results[1] == results[0]
    # the forced tokens were fed back to the model (its cache holds them)
    fed = torch.cat([x[0] for x in model.seen]).tolist()
    assert fed == prompt + expected

    events = list(engine.stream_chat({"messages": [{"role": "user", "content": "what is 6*7?"}]}, temperature=0.0))
    assert events == [{"type": "tool_call", "code": "6*7"},
                      {"type": "tool_result", "output": "42", "status": "ok", "isolation": isolation()},
                      {"type": "text", "text": "!"},
                      {"type": "done", "reason": "stop", "tokens": 10}]


def test_tool_errors_are_reported_not_raised(tok):
    s = tok.special
    succ = script(tok, [(s["<|assistant_start|>"], s["<|python_start|>"]), (s["<|python_start|>"], "1"),
                        ("1", "/"), ("/", "0"), ("0", s["<|python_end|>"]), (s["<|output_end|>"], s["<|assistant_end|>"])])
    engine = Engine(BigramModel(succ, tok.get_vocab_size()), tok)
    events = list(engine.stream_chat({"messages": [{"role": "user", "content": "1/0"}]}, temperature=0.0))
    assert events[1] == {"type": "tool_result", "output": "ZeroDivisionError: division by zero", "status": "error",
                         "isolation": isolation()}
    assert events[-1]["reason"] == "stop"


def test_unfinished_tool_call_is_shown_not_dropped(tok):
    s = tok.special
    # the model opens a tool call and ends the reply without closing it
    succ = script(tok, [(s["<|assistant_start|>"], "A"), ("A", s["<|python_start|>"]), (s["<|python_start|>"], "2"),
                        ("2", "+"), ("+", "3"), ("3", s["<|assistant_end|>"])])
    engine = Engine(BigramModel(succ, tok.get_vocab_size()), tok)
    events = list(engine.stream_chat({"messages": [{"role": "user", "content": "2+3"}]}, temperature=0.0))
    assert events == [{"type": "text", "text": "A"},
                      {"type": "tool_call", "code": "2+3"},
                      {"type": "tool_result", "output": "the reply ended before <|python_end|>: not run",
                       "status": "unfinished", "isolation": isolation()},
                      {"type": "done", "reason": "stop", "tokens": 5}]


def test_stops_at_max_tokens_and_context(model, tok):
    engine = Engine(model, tok)
    prompt = tok.encode("x" * 50)
    results, _ = engine.generate_batch(prompt, max_tokens=5, temperature=0.0)
    assert len(results[0]) <= 55
    events = list(engine.stream_chat({"messages": [{"role": "user", "content": "hi"}]}, max_tokens=7, temperature=0.0))
    assert events[-1]["type"] == "done" and events[-1]["reason"] in ("max_tokens", "stop")
    # the prompt plus the generation never exceed the 64-token context
    steps = list(engine.generate(prompt, max_tokens=100, temperature=0.0))
    assert len(steps) <= 64 - 50
    with pytest.raises(ValueError, match="context window"):
        next(engine.generate(tok.encode("y" * 64)))


def test_context_overflow_drops_oldest_turns_with_a_notice(model, tok):
    engine = Engine(model, tok)
    old = [{"role": "user", "content": "a" * 20}, {"role": "assistant", "content": "b" * 20}]
    conv = {"messages": [{"role": "system", "content": "sys"}] + old + [{"role": "user", "content": "newest?"}]}
    ids, notice = engine.fit_conversation(conv, reserve=16)
    assert "dropped the 2 oldest messages" in notice
    assert ids == tok.render_for_completion({"messages": [conv["messages"][0], conv["messages"][-1]]})
    events = list(engine.stream_chat(conv, max_tokens=16, temperature=0.0))
    assert events[0]["type"] == "notice" and "too long" in events[0]["text"]
    assert events[-1]["type"] == "done"
    # a single message longer than the context keeps its end, still with a notice
    ids, notice = engine.fit_conversation({"messages": [{"role": "user", "content": "z" * 200}]}, reserve=16)
    assert len(ids) == 48 and ids[0] == tok.get_bos_token_id() and ids[-1] == tok.special["<|assistant_start|>"]
    assert "kept only the last" in notice
    _, notice = engine.fit_conversation({"messages": [{"role": "user", "content": "short"}]}, reserve=16)
    assert notice is None


def test_multibyte_characters_stream_whole(tok):
    s = tok.special
    text = "héllo → 世界 🙂"
    seq = [s["<|assistant_start|>"]] + tok.encode(text) + [s["<|assistant_end|>"]]
    # bytes repeat, so a bigram table can't script this: script by position instead
    model = PositionScript(seq, tok.get_vocab_size())
    engine = Engine(model, tok)
    events = list(engine.stream_chat({"messages": [{"role": "user", "content": "hi"}]}, temperature=0.0))
    texts = [e["text"] for e in events if e["type"] == "text"]
    assert "".join(texts) == text
    assert all("\ufffd" not in t for t in texts)
    assert len(texts) == len(text), "each character should arrive as soon as its last byte does"


def test_multibyte_streaming_with_the_real_tokenizer(tiny_tokenizer_dir):
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny_tokenizer_dir)
    text = "naïve café → 世界 🙂 done"
    seq = [tok.encode_special("<|assistant_start|>")] + tok.encode(text) + [tok.encode_special("<|assistant_end|>")]
    assert len(seq) - 2 > len(text.split()), "expected some characters split over several tokens"
    engine = Engine(PositionScript(seq, tok.get_vocab_size()), tok)
    events = list(engine.stream_chat({"messages": [{"role": "user", "content": "hi"}]}, temperature=0.0))
    texts = [e["text"] for e in events if e["type"] == "text"]
    assert "".join(texts) == text and all("\ufffd" not in t for t in texts)
    assert events[-1] == {"type": "done", "reason": "stop", "tokens": len(seq) - 2}


class PositionScript(BigramModel):
    """Predicts seq[k+1] after the k-th token of `seq` has been seen at the end of the input so far."""

    def __init__(self, seq, vocab):
        super().__init__({}, vocab)
        self.seq, self.i = seq, 0

    def forward(self, idx, kv_cache=None):
        kv_cache.advance(idx.size(1))
        out = torch.full((idx.size(0), idx.size(1), self.table.size(0)), -10.0)
        self.i = self.i + 1 if idx.size(1) == 1 else 1
        out[:, -1, self.seq[min(self.i, len(self.seq) - 1)]] = 10.0
        return out


def test_bad_arguments_are_rejected(model, tok):
    engine = Engine(model, tok)
    for kwargs, match in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
                          ({"num_samples": 0}, "num_samples"), ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(ValueError, match=match):
            engine.generate_batch([1, 2, 3], **kwargs)
    with pytest.raises(ValueError, match="tokens"):
        engine.generate_batch([])
    with pytest.raises(ValueError, match="tokens"):
        engine.generate_batch([99999])


def test_engine_sees_weights_updated_behind_autograds_back(tok):
    """Optimizers may write through `.data`, which leaves `_version` alone: a long-lived Engine (RL,
    SFT quick evals) must still generate with the current weights."""
    model = tiny_gpt(seed=1)
    engine = Engine(model, tok)
    prompt = tok.encode("hello there")
    engine.generate_batch(prompt, num_samples=1, max_tokens=4, temperature=0.0)  # caches per-model state
    with torch.no_grad():
        model.lm_head.weight.data.copy_(torch.randn_like(model.lm_head.weight) * 5)
    got, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=8, temperature=0.0)
    want, _ = Engine(model, tok).generate_batch(prompt, num_samples=1, max_tokens=8, temperature=0.0)
    assert got == want
