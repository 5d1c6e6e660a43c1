"""Models for the serving tests: a real GPT whose weights make it follow a script, and a checkpoint of it.

`scripted_gpt(successors)`: every block is the identity (zero output projections), so the logits depend
only on the current token; each scripted token gets its own orthogonal embedding direction and lm_head
points that direction at its successor. Greedy decoding then follows `successors` exactly, through the
real forward passes, KV cache and batching code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig


def scripted_gpt(successors: dict[int, int], vocab: int, seq_len: int = 128, n_embd: int = 64,
                 n_layer: int = 2) -> GPT:
    if len(set(successors) | set(successors.values())) > n_embd:
        raise ValueError("the script needs more distinct tokens than the model has channels")
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=n_layer, n_head=2, n_kv_head=1, n_embd=n_embd,
                    window_pattern="SL")
    model = GPT(cfg, compute_dtype=torch.float32)
    model.init_weights()
    with torch.no_grad():
        model.wte.weight.normal_(0, 0.01)
        model.lm_head.weight.zero_()
        for block in model.blocks:  # random attention/MLP inputs, zero outputs: the blocks are identities
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        for d, t in enumerate(sorted(set(successors))):
            model.wte.weight[t].zero_()
            model.wte.weight[t, d] = 1.0
            model.lm_head.weight[successors[t], d] = 1.0  # logit 8 (= the normed embedding's size) vs 0
    return model.eval()


def chain(*tokens: int) -> dict[int, int]:
    """{a: b, b: c, ...} for the sequence a, b, c, ... (a token may not need two different successors)."""
    out = {}
    for a, b in zip(tokens, tokens[1:]):
        if out.setdefault(a, b) != b:
            raise ValueError(f"token {a} would need two successors; pick a script without repeats")
    return out


def calculator_script(tok, code: str = "6*7", answer: str = "Yes 42") -> dict[int, int]:
    """After <|assistant_start|>: a python call of `code`, then (after the forced output) `answer`."""
    sp = tok.encode_special
    return chain(sp("<|assistant_start|>"), sp("<|python_start|>"), *tok.encode(code), sp("<|python_end|>"),
                 sp("<|output_start|>"), sp("<|output_end|>"), *tok.encode(answer), sp("<|assistant_end|>"))


def save_run(run_dir: Path, model: GPT, tokenizer_dir: Path, phase: str = "sft", step: int = 1) -> Path:
    """A run directory holding `model` as a checkpoint of `phase`, with the tokenizer it was made for."""
    import shutil
    run_dir = Path(run_dir)
    if not (run_dir / "tokenizer").exists():
        shutil.copytree(tokenizer_dir, run_dir / "tokenizer")
    meta = {"model_config": model.config.to_dict(), "tokenizer_dir": str(run_dir / "tokenizer")}
    save_checkpoint(run_dir / "checkpoints" / phase, step, model.state_dict(), None, meta)
    (run_dir / "config.toml").write_text('[meta]\nprofile = "test"\n')
    return run_dir



def start_server(run_dir: Path, *args: str, base_dir: Path | None = None, timeout: float = 120):
    """`nanochat serve --run RUN_DIR --port 0 ...` in a subprocess -> (process, url) once it listens."""
    import os
    import subprocess
    import sys
    import time
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if base_dir is not None:
        env["NANOCHAT_BASE_DIR"] = str(base_dir)
    import tempfile
    log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)  # a pipe could fill up
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.cli", "serve", "--run", str(run_dir), "--port", "0",
                             "--device", "cpu", *args], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log_path = log.name
    deadline = time.time() + timeout
    for line in proc.stdout:  # "  chat page  http://127.0.0.1:PORT/"
        if "chat page" in line:
            url = line.split()[-1].rstrip("/")
            break
        if time.time() > deadline:
            break
    else:
        proc.kill()
        raise AssertionError(f"the server did not start:\n{Path(log.name).read_text()[-3000:]}")
    import urllib.request
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server at {url} never answered /health:\n{Path(log.name).read_text()[-3000:]}")


def stop_server(proc, timeout: float = 30) -> str:
    """SIGTERM, wait; -> its stderr (the request log)."""
    import subprocess
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    return Path(proc.log_path).read_text()
