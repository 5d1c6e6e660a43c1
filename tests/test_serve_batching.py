"""Continuous batching: the per-row forward matches the model, batched rows decode what they decode alone."""
import queue
import threading

import pytest
import torch

from nanochat.batching import Scheduler, decode_rows
from nanochat.engine import Engine
from nanochat.gpt import KVCache
from serve_toys import calculator_script, scripted_gpt
from test_engine import ByteTokenizer, tiny_gpt


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def test_decode_rows_matches_full_forward_at_per_row_positions():
    """Rows of different lengths (one past the sliding window of 32) in one step; the slot columns a row
    has not written hold another row's leftovers, which it must not see."""
    model = tiny_gpt()
    torch.manual_seed(1)
    seqs = [torch.randint(0, 256, (n,)) for n in (5, 40, 17)]
    cfg = model.config
    cache = KVCache(3, cfg.n_kv_head, cfg.sequence_len, cfg.head_dim, cfg.n_layer)
    cache.k.normal_()  # leftovers of earlier rows
    cache.v.normal_()
    with torch.no_grad():
        for b, s in enumerate(seqs):  # prefill all but the last token of each row into its slot
            small = KVCache(1, cfg.n_kv_head, len(s), cfg.head_dim, cfg.n_layer)
            model(s[None, :-1], kv_cache=small)
            cache.k[:, b, :, :len(s) - 1] = small.k[:, 0, :, :len(s) - 1]
            cache.v[:, b, :, :len(s) - 1] = small.v[:, 0, :, :len(s) - 1]
        got = decode_rows(model, cache, torch.stack([s[-1] for s in seqs]),
                          torch.tensor([len(s) - 1 for s in seqs]), torch.stack([s[-2] for s in seqs]))
        for b, s in enumerate(seqs):
            want = model(s[None])[0, -1]
            torch.testing.assert_close(got[b], want, atol=2e-4, rtol=1e-4)


def collect(scheduler, ids, **kw):
    events = queue.Queue()
    scheduler.submit(ids, events.put, **kw)
    out = []
    while True:
        ev = events.get(timeout=60)
        out.append(ev)
        if ev["type"] in ("done", "error"):
            return out


def text_of(events):
    return "".join(e["text"] for e in events if e["type"] == "text")


def test_concurrent_rows_decode_what_they_decode_alone(tok):
    """Greedy rows of different prompt lengths joining a running batch at different moments produce
    exactly what Engine produces for each alone, and each stops at its own max_tokens."""
    model = tiny_gpt()
    engine = Engine(model, tok)
    prompts = [tok.encode("hi"), tok.encode("a longer prompt, here"), tok.encode("xyz" * 5), tok.encode("q")]
    budgets = [20, 7, 30, 12]
    want = []
    for p, n in zip(prompts, budgets):
        ids, _ = engine.generate_batch(p, max_tokens=n, temperature=0.0)
        want.append(ids[0][len(p):])
    sched = Scheduler(model, tok, max_batch=3)  # fewer slots than rows: the last one waits for a slot
    try:
        results = [None] * len(prompts)

        def client(i):
            results[i] = collect(sched, prompts[i], max_tokens=budgets[i], temperature=0.0)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i, events in enumerate(results):
            done = events[-1]
            assert done["type"] == "done", events
            assert done["ids"] == want[i]
            assert done["reason"] == ("length" if done["tokens"] == budgets[i] else "stop")
        assert sched.stats["row_steps"] > sched.stats["steps"], "rows never shared a step"
    finally:
        sched.close()


def test_seeds_and_sampling_settings_are_per_row(tok):
    model = tiny_gpt()
    sched = Scheduler(model, tok, max_batch=4)
    try:
        p = tok.encode("hello")
        runs = {}
        lock = threading.Lock()

        def client(name, **kw):
            ev = collect(sched, p, max_tokens=15, **kw)
            with lock:
                        runs[name] = ev[-1]["ids"]

        specs = {"a": dict(temperature=1.0, seed=1), "b": dict(temperature=1.0, seed=1),
                 "c": dict(temperature=1.0, seed=2), "g": dict(temperature=0.0, seed=3)}
        threads = [threading.Thread(target=client, args=(n,), kwargs=kw) for n, kw in specs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
        ids, _ = Engine(model, tok).generate_batch(p, max_tokens=15, temperature=0.0)
        assert runs["g"] == ids[0][len(p):]
    finally:
        sched.close()


def test_tool_calls_run_per_row_and_other_rows_keep_going(tok):
    """One row calls the calculator (it waits for the sandbox off the decode thread); a plain row decodes
    alongside it. The tool row shows the call, its output, then the answer that reads the output."""
    sp = tok.encode_special
    script = calculator_script(tok)
    model = scripted_gpt(script, vocab=tok.get_vocab_size())
    sched = Scheduler(model, tok, max_batch=4)
    try:
        prompt = [sp("<|bos|>"), sp("<|user_start|>"), *tok.encode("q"), sp("<|user_end|>"), sp("<|assistant_start|>")]
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("plain", collect(sched, tok.encode("zz"), max_tokens=40,
                                                                                temperature=0.0)))
        t.start()
        events = collect(sched, prompt, max_tokens=40, temperature=0.0)
        t.join(timeout=60)
        kinds = [e["type"] for e in events]
        assert kinds[:2] == ["tool_call", "tool_result"], events
        assert events[0]["code"] == "6*7" and events[1] == {"type": "tool_result", "output": "42", "status": "ok"}
        assert text_of(events) == "Yes 42" and events[-1]["reason"] == "stop"
        assert out["plain"][-1]["type"] == "done" and out["plain"][-1]["tokens"] > 0
    finally:
        sched.close()


def test_cancel_frees_the_slot_and_a_bad_row_is_refused(tok):
    model = tiny_gpt()
    sched = Scheduler(model, tok, max_batch=1)
    try:
        events = queue.Queue()
        row = sched.submit(tok.encode("abc"), events.put, max_tokens=10_000 // 200, temperature=1.0, seed=0)
        first = events.get(timeout=30)
        assert first["type"] in ("text", "done")
        sched.cancel(row)
        while (ev := events.get(timeout=30))["type"] not in ("done", "error"):
            pass
        assert ev["type"] == "done" and ev["reason"] in ("cancelled", "stop", "length")
        with pytest.raises(ValueError, match="context window"):
            sched.submit(list(range(70)), events.put)  # the model's context is 64 tokens
        assert collect(sched, tok.encode("x"), max_tokens=3, temperature=0.0)[-1]["type"] == "done"
    finally:
        sched.close()


def test_a_failing_step_ends_its_rows_with_an_error_and_the_worker_goes_on(tok, monkeypatch):
    import nanochat.batching as batching
    real, calls = batching.decode_rows, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device error")
        return real(*a, **k)
    monkeypatch.setattr(batching, "decode_rows", flaky)
    sched = Scheduler(tiny_gpt(), tok, max_batch=2)
    try:
        failed = collect(sched, tok.encode("abc"), max_tokens=10, temperature=0.0)
        assert failed[-1] == {"type": "error", "message": "RuntimeError: simulated device error"}
        ok = collect(sched, tok.encode("abc"), max_tokens=5, temperature=0.0)
        assert ok[-1]["type"] == "done" and ok[-1]["tokens"] == 5
        assert sched.thread.is_alive() and sched.stats["errors"] == 1 and not sched.rows
    finally:
        sched.close()
