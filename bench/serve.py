"""Serving throughput: aggregate tokens/s of `nanochat serve` with 1 and 8 concurrent clients against
serving the same 8 requests one at a time, and each client's time to first token (TTFT).

    python bench/serve.py                        # random-init depth 4 (width 256), vocab 32768, as bench/infer.py
    python bench/serve.py --depth 2 --clients 16 --new 128

The server is a real `nanochat.serve` app (batching Scheduler, uvicorn, SSE) in a child process; the
clients are threads here that stream /v1/chat/completions over HTTP. A request's tokens are its
`usage.completion_tokens`; aggregate tokens/s = all tokens / wall time from the first request sent to
the last reply finished. TTFT = request sent -> first content chunk received. The random model never
stops early (the stand-in tokenizer's stop tokens are outside its vocabulary), so every reply is
exactly --new tokens. For reference, the table also has the Engine's single-prompt path in-process
(no HTTP), serving the requests one at a time. The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanochat.engine import SPECIALS, Engine  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402

class BenchTokenizer:
    """A stand-in for a random model: text is bytes, every other id decodes to one letter (so replies
    stream as text), and the special tokens sit past the vocabulary, where nothing samples them."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
        self.special = {name: vocab_size + i for i, name in enumerate(SPECIALS)}

    def get_vocab_size(self):
        return self.vocab_size

    def encode_special(self, name):
        return self.special[name]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids if i < self.vocab_size)

    def render_for_completion(self, conv):
        """Just the bytes of the messages: a random model needs no chat markup, and a prompt must stay
        inside the vocabulary."""
        return [b for m in conv["messages"] for b in self.encode(str(m["content"]))]


def bench_model(a) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=a.seq_len, vocab_size=a.vocab, n_layer=a.depth, n_head=a.depth, n_kv_head=a.depth,
                    n_embd=a.depth * 64)  # heads of 64 channels
    model = GPT(cfg)
    model.init_weights()
    return model.eval()


def serve_child(a):
    """The server process: the bench model behind the real app."""
    import socket
    import uvicorn
    from nanochat.batching import Scheduler
    from nanochat.serve import Server, create_app
    model = bench_model(a)
    server = Server([Scheduler(model, BenchTokenizer(a.vocab), max_batch=a.max_batch)], "bench")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", access_log=False)).run(sockets=[sock])


def request(url, prompt, new_tokens) -> dict:
    """One streamed chat completion -> {ttft, elapsed, tokens}."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": new_tokens,
                       "temperature": 1.0, "top_k": 50, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, tokens = None, 0
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ttft is None and any(c["delta"].get("content") for c in ev["choices"]):
            ttft = time.perf_counter() - t0
        if ev.get("usage") and not ev["choices"]:
            tokens = ev["usage"]["completion_tokens"]
    conn.close()
    return {"ttft": ttft, "elapsed": time.perf_counter() - t0, "tokens": tokens}


def prompts(n):
    return [f"request {i}: tell me something about the number {i * 7}, please." for i in range(n)]


def serial(url, n, new_tokens):
    t0 = time.perf_counter()
    rs = [request(url, p, new_tokens) for p in prompts(n)]
    return rs, time.perf_counter() - t0


def concurrent(url, n, new_tokens):
    rs = [None] * n

    def one(i, p):
        rs[i] = request(url, p, new_tokens)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts(n))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rs, time.perf_counter() - t0


def engine_serial(a, n):
    """The Engine's single-prompt path, in-process, one request after another (no HTTP)."""
    tok = BenchTokenizer(a.vocab)
    engine = Engine(bench_model(a), tok)
    t0 = time.perf_counter()
    tokens = 0
    for p in prompts(n):
        ids = tok.render_for_completion({"messages": [{"role": "user", "content": p}]})
        for _ in engine.generate(ids, max_tokens=a.new, temperature=1.0, top_k=50, seed=0):
            tokens += 1
    return tokens, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--new", type=int, default=64, help="tokens per reply (default 64)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_child:
        return serve_child(a)
    child = subprocess.Popen([sys.executable, __file__, "--serve-child", *sys.argv[1:]], stdout=subprocess.PIPE,
                             text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        url = child.stdout.readline().strip()
        request(url, "warm up", 8)
        one, t_one = serial(url, 1, a.new)
        ser, t_ser = serial(url, a.clients, a.new)
        con, t_con = concurrent(url, a.clients, a.new)
    finally:
        child.terminate()
        child.wait(timeout=30)
    eng_tokens, t_eng = engine_serial(a, a.clients)
    rows = [
        ("1 client", one, t_one),
        (f"{a.clients} requests, one at a time", ser, t_ser),
        (f"{a.clients} concurrent clients", con, t_con),
    ]
    print(f"model: random-init depth {a.depth} (width {a.depth * 64}), vocab {a.vocab}, {a.new} tokens per reply; "
          f"torch threads {torch.get_num_threads()}; load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(f"{'serving':<34} {'tokens':>7} {'wall s':>8} {'agg tok/s':>10} {'TTFT mean':>10} {'TTFT max':>9}")
    out = {"depth": a.depth, "vocab": a.vocab, "new_tokens": a.new, "clients": a.clients,
           "loadavg_1m": round(os.getloadavg()[0], 2)}
    for name, rs, wall in rows:
        tokens = sum(r["tokens"] for r in rs)
        ttfts = [r["ttft"] for r in rs]
        print(f"{name:<34} {tokens:>7} {wall:>8.2f} {tokens / wall:>10.1f} {sum(ttfts) / len(ttfts):>10.3f} "
              f"{max(ttfts):>9.3f}")
        key = name.split()[0] + ("_serial" if "one at a time" in name else "_concurrent" if "concurrent" in name else "")
        out[key] = {"tokens": tokens, "wall_s": round(wall, 3), "tok_per_s": round(tokens / wall, 1),
                    "ttft_max_s": round(max(ttfts), 3)}
    print(f"{'engine, in-process, one at a time':<34} {eng_tokens:>7} {t_eng:>8.2f} {eng_tokens / t_eng:>10.1f}")
    out["engine_serial_tok_per_s"] = round(eng_tokens / t_eng, 1)
    ser_rate = out[f"{a.clients}_serial"]["tok_per_s"]
    con = out[f"{a.clients}_concurrent"]
    out["concurrent_over_serial"] = round(con["tok_per_s"] / ser_rate, 2)
    out["goal_met"] = out["concurrent_over_serial"] >= 3 and con["ttft_max_s"] < 1.0
    print(f"{a.clients} concurrent / one at a time: {out['concurrent_over_serial']:.2f}x aggregate tokens/s "
          f"(goal >= 3x with every TTFT < 1 s: {'met' if out['goal_met'] else 'NOT met'})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
