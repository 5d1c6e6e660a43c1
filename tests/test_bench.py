"""bench/train.py and bench/infer.py: tables plus a JSON last line, real text by default, and the side-by-side
protocol with a reference checkout (here a toy one the test writes, run in a subprocess like the real one)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"

# A stand-in for a karpathy/nanochat checkout: the names bench/side_by_side.py's worker uses, a model that
# prints to stdout (as the reference's print0 does) and so checks that prints cannot garble the answers.
TOY_GPT = '''
from dataclasses import dataclass
import torch, torch.nn as nn, torch.nn.functional as F

@dataclass
class GPTConfig:
    sequence_len: int = 64
    vocab_size: int = 256
    n_layer: int = 1
    n_head: int = 1
    n_kv_head: int = 1
    n_embd: int = 32
    window_pattern: str = "L"

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        print("toy reference built")  # goes to stdout, like the reference's print0

    def init_weights(self):
        nn.init.normal_(self.emb.weight)
        nn.init.normal_(self.head.weight, std=0.01)

    def get_device(self):
        return self.emb.weight.device

    def setup_optimizer(self):
        print("toy optimizer")
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def forward(self, idx, targets=None):
        logits = self.head(self.emb(idx))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) if targets is not None else logits
'''
TOY_ENGINE = '''
import torch

class Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        ids = torch.tensor([tokens] * num_samples)
        for _ in range(max_tokens):
            nxt = self.model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            yield nxt[:, 0].tolist(), [1] * num_samples
'''


def toy_reference(tmp_path) -> Path:
    ref = tmp_path / "toy_nanochat"
    (ref / "nanochat").mkdir(parents=True)
    (ref / "nanochat" / "__init__.py").write_text("")
    (ref / "nanochat" / "gpt.py").write_text(textwrap.dedent(TOY_GPT))
    (ref / "nanochat" / "engine.py").write_text(textwrap.dedent(TOY_ENGINE))
    return ref


def run(script, *args, env_python=None, timeout=300):
    import os
    env = dict(os.environ, NANOCHAT_REFERENCE_PYTHON=env_python or sys.executable)
    out = subprocess.run([sys.executable, str(BENCH / script), *args, "--threads", "1"], capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, json.loads(out.stdout.strip().splitlines()[-1])


def test_train_bench_on_real_text_against_a_reference(tmp_path, tiny_corpus):
    text, result = run("train.py", "--depth", "1", "--seq", "32", "--batch-tokens", "64", "--vocab", "300",
                       "--head-dim", "32", "--warmup", "1", "--steps", "2", "--data", str(tiny_corpus),
                       "--reference", str(toy_reference(tmp_path)), "--reference-eager")
    assert result["data"].startswith(str(tiny_corpus)) and "BPE" in result["data"]
    assert result["tok_per_s"] > 0 and result["matmul_2048_fp32_flops_per_s"] > 1e9
    assert len(result["step_times_s"]) == 2 and len(result["reference_step_times_s"]) == 2
    assert result["speedup"] == result["reference_step_s"] / result["step_s"]
    assert "ours / reference" in text and "toy reference built" not in text  # its prints went to stderr


def test_train_bench_random_ids_without_reference():
    text, result = run("train.py", "--depth", "1", "--seq", "32", "--batch-tokens", "64", "--vocab", "256",
                       "--head-dim", "32", "--warmup", "1", "--steps", "2", "--random-ids")
    assert result["data"] == "uniform random ids" and "reference_tok_per_s" not in result
    assert "ours / reference" not in text


def test_infer_bench_against_a_reference(tmp_path):
    text, result = run("infer.py", "--depth", "1", "--vocab", "256", "--head-dim", "32", "--seq-len", "64",
                       "--prompt", "8", "--steps", "6", "--repeats", "2", "--reference", str(toy_reference(tmp_path)))
    for b in (1, 8):
        assert result[f"decode_tok_s_b{b}"] > 0 and result[f"reference_decode_tok_s_b{b}"] > 0
        assert len(result[f"reference_decode_tok_s_b{b}_runs"]) == 2
        assert result[f"speedup_b{b}"] == round(result[f"decode_tok_s_b{b}"] / result[f"reference_decode_tok_s_b{b}"], 3)
    assert result["decode"] == "fast" and "ours/ref" in text
