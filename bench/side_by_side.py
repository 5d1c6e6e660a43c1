"""What bench/train.py and bench/infer.py share: the timed units of work, the matmul yardstick, and a worker
that runs the same units on the reference (a karpathy/nanochat checkout with its own Python) in lock step.

    ref = Reference("/path/to/nanochat", {"kind": "infer", ...})   # starts the worker in the reference's venv
    ref.call({"op": "generate", ...}) -> {"ttft_s": ..., "decode_tok_s": ...}

The worker is this file run by the reference's Python (`python side_by_side.py DIR CONFIG_JSON`): it puts DIR
first on sys.path and imports the reference's own model, optimizer and engine; nothing of ours. It answers one
JSON line per command on stdin, and idles (blocked on the read) while our side runs, so the two sides take
turns on the same machine and see the same load. Only the standard library and torch are imported at the top,
for both Pythons.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device, n=2048, dtype=torch.float32, seconds=1.0) -> float:
    """FLOP/s of a plain n x n matmul (the yardstick the model is compared against)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=out)
        iters += 1
        if torch.device(device).type == "cuda" and iters % 50:
            continue
        sync(device)
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def train_step(model, optimizers, x, y) -> tuple[float, float]:
    """One training step as the stages run it (forward, backward, every optimizer, zero_grad) -> (seconds, loss)."""
    sync(x.device)
    t0 = time.perf_counter()
    loss = model(x, y)
    loss.backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    loss = loss.item()
    sync(x.device)
    return time.perf_counter() - t0, loss


def generate(engine, device, prompt, batch, new_tokens, temperature, top_k) -> dict:
    """Time one engine.generate: TTFT (prefill at batch 1, cache copied to the batch, first sample) and decode
    tokens/s over the remaining steps, every row counted."""
    sync(device)
    t0 = time.perf_counter()
    steps, t_first = 0, None
    for _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=temperature, top_k=top_k):
        steps += 1
        if steps == 1:
            sync(device)
            t_first = time.perf_counter()
    sync(device)
    t_end = time.perf_counter()
    return {"ttft_s": t_first - t0, "decode_tok_s": (steps - 1) * batch / (t_end - t_first), "steps": steps}


# ----------------------------------------------------------------------------- our side: the worker's handle

def reference_python(ref_dir: Path) -> Path:
    """The reference checkout's own Python: $NANOCHAT_REFERENCE_PYTHON, else a venv in or next to it."""
    if os.environ.get("NANOCHAT_REFERENCE_PYTHON"):
        return Path(os.environ["NANOCHAT_REFERENCE_PYTHON"])
    for venv in (ref_dir / ".venv", ref_dir / "venv", ref_dir.parent / "venv", ref_dir.parent / ".venv"):
        if (venv / "bin" / "python").exists():
            return venv / "bin" / "python"
    raise SystemExit(f"no Python environment found for the reference at {ref_dir} (looked for .venv/ and venv/ in "
                     f"and next to it); set NANOCHAT_REFERENCE_PYTHON to its python")


class Reference:
    """The reference's side of a benchmark, in its own process and environment."""

    def __init__(self, ref_dir: str | os.PathLike, config: dict):
        ref_dir = Path(ref_dir).expanduser().resolve()
        if not (ref_dir / "nanochat" / "gpt.py").exists():
            raise SystemExit(f"--reference {ref_dir}: not a nanochat checkout (no nanochat/gpt.py in it)")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of ours on its path
        # OpenMP's settings (OMP_WAIT_POLICY, read when torch loads) come with os.environ: both sides run alike
        self.proc = subprocess.Popen([str(reference_python(ref_dir)), str(Path(__file__).resolve()), str(ref_dir),
                                      json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=ref_dir)
        self.info = self._read()  # the worker's first line: what it built

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the reference worker exited (status {self.proc.wait()}); its error is above")
        return json.loads(line)

    def call(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- the reference's side

class StandInTokenizer:
    """Enough tokenizer for a random model: specials get ids past the vocabulary, so they are never sampled."""

    def __init__(self, vocab_size, specials):
        self.vocab_size, self.specials = vocab_size, list(specials)

    def get_vocab_size(self):
        return self.vocab_size

    def encode_special(self, name):
        return self.vocab_size + (self.specials.index(name) if name in self.specials else len(self.specials))

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")

    def decode(self, ids):
        return ""

    def encode(self, text, *args, **kwargs):
        return []


def _worker(ref_dir: str, config: dict):
    answer, sys.stdout = sys.stdout, sys.stderr  # the reference's own prints must not mix with the answers
    sys.path.insert(0, ref_dir)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    from nanochat.gpt import GPT, GPTConfig  # the reference's, from ref_dir
    device = torch.device(config.get("device", "cpu"))
    cfg = GPTConfig(**config["model"])
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    if config["kind"] == "train":
        optimizers = [model.setup_optimizer()]
        # as the reference's scripts/base_train.py runs it: compiled, always
        step_model = torch.compile(model, dynamic=False) if config.get("compile", True) else model
        batches = torch.load(config["batches"])
    else:
        from nanochat.engine import Engine
        model.eval()
        engine = Engine(model, StandInTokenizer(cfg.vocab_size, config["specials"]))
    print(json.dumps({"built": config["kind"], "params": sum(p.numel() for p in model.parameters()),
                      "threads": torch.get_num_threads()}), file=answer, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "step":
            x, y = (t.to(device) for t in batches[cmd["i"]])
            dt, loss = train_step(step_model, optimizers, x, y)
            out = {"step_s": dt, "loss": loss}
        else:
            out = generate(engine, device, cmd["prompt"], cmd["batch"], cmd["new"], cmd["temperature"], cmd["top_k"])
        print(json.dumps(out), file=answer, flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]))
