"""bench/gpu.py on a machine without CUDA: one line, exit 0 (the GPU checks themselves need the GPU)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run bench/gpu.py itself")
def test_gpu_bench_exits_cleanly_without_cuda():
    out = subprocess.run([sys.executable, "bench/gpu.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == ["bench/gpu.py: no CUDA GPU on this machine; nothing to check"]
