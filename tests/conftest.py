"""Shared fixtures: a tiny run directory (demo corpus + trained tokenizer) that stage tests reuse."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NANOCHAT_SHARED_DATA") or REPO.parent / "shared" / "data")  # a worktree elsewhere sets it

# Stages started by tests must not pick up a user's cache or runs.
TINY_MODEL = ["base_train.depth=1", "base_train.aspect_ratio=64", "base_train.head_dim=64",
              "base_train.max_seq_len=64", "base_train.device_batch_size=4", "base_train.total_batch_size=512",
              "base_train.eval_tokens=1024", "base_train.sample_every=0", "base_train.warmdown_ratio=0.2",
              "base_train.embedding_lr=0.1", "base_train.matrix_lr=0.03", "base_train.unembedding_lr=0.01"]


def needs_shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is only in the development checkout)")
    return path


def stage_env(base_dir: Path) -> dict:
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_stage(module: str, run_dir: Path, *args: str, base_dir: Path, nproc: int = 1, check=True, timeout=600,
              **popen) -> subprocess.CompletedProcess:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module]
    else:
        cmd = [sys.executable, "-m", module]
    cmd += ["--run-dir", str(run_dir), *args]
    p = subprocess.run(cmd, env=stage_env(base_dir), capture_output=True, text=True, timeout=timeout, **popen)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-5000:]}")
    return p


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A small demo corpus (parquet shards, the last one validation)."""
    from nanochat.demo_corpus import make_demo_corpus
    d = tmp_path_factory.mktemp("demo_data")
    make_demo_corpus(d, n_docs=1500, seed=0, docs_per_shard=500)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_corpus) -> Path:
    """A 512-token BPE tokenizer trained on the tiny corpus."""
    from nanochat.dataset import iter_documents, list_data_files
    from nanochat.tokenizer import Tokenizer
    d = tmp_path_factory.mktemp("tokenizer")
    texts = (text for text, _ in iter_documents(list_data_files(tiny_corpus)))
    Tokenizer.train_from_iterator(texts, vocab_size=512).save(d)
    return d


@pytest.fixture
def tiny_run(tmp_path, tiny_corpus, tiny_tokenizer_dir):
    """A fresh run directory with config.toml (demo profile, tiny model) and the tokenizer in place.

    Returns (run_dir, base_dir); stages run with NANOCHAT_BASE_DIR=base_dir.
    """
    import shutil
    from nanochat.config import load_config
    run_dir, base_dir = tmp_path / "run", tmp_path / "base"
    base_dir.mkdir()
    shutil.copytree(tiny_tokenizer_dir, run_dir / "tokenizer")
    cfg = load_config("demo", [f"data.dir={tiny_corpus}", *TINY_MODEL])
    cfg.save(run_dir / "config.toml")
    return run_dir, base_dir


@pytest.fixture(scope="session", autouse=True)
def sandbox_or_reduced():
    """Where bubblewrap cannot run, tests that merely use the calculator or HumanEval run them with reduced
    isolation, and say so; the boundary itself is tested (or skipped, with the reason) in
    tests/test_sandbox_attacks.py, and the refusal in tests/test_sandbox.py."""
    from nanochat import sandbox
    if sandbox.isolation() == "unavailable":
        import warnings
        warnings.warn(f"sandbox: {sandbox._probe()}; these tests run model code with reduced isolation")
        sandbox.configure(allow_reduced_isolation=True)
    yield
