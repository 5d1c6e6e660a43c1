import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from nanochat.checkpoint import latest_step, list_steps, load_checkpoint, save_checkpoint


def _state(v):
    return {"w": torch.full((4, 4), float(v))}


def test_save_load_latest(tmp_path):
    for s in (5, 10):
        save_checkpoint(tmp_path, s, _state(s), {"opt": s}, {"model_config": {"a": 1}, "loader_state": [{"i": s}]})
    assert list_steps(tmp_path) == [5, 10] and latest_step(tmp_path) == 10
    model, optim, meta = load_checkpoint(tmp_path, load_optim=True)
    assert torch.equal(model["w"], _state(10)["w"]) and optim == {"opt": 10}
    assert meta["step"] == 10 and meta["loader_state"] == [{"i": 10}] and meta["world_size"] == 1
    model, optim, meta = load_checkpoint(tmp_path, step=5)
    assert optim is None and meta["step"] == 5


def test_keep_last_prunes_old(tmp_path):
    for s in range(1, 6):
        save_checkpoint(tmp_path, s, _state(s), None, {}, keep_last=2)
    assert list_steps(tmp_path) == [4, 5]


def test_resave_same_step_replaces(tmp_path):
    save_checkpoint(tmp_path, 3, _state(1), None, {})
    save_checkpoint(tmp_path, 3, _state(2), None, {})
    assert load_checkpoint(tmp_path)[0]["w"][0, 0].item() == 2.0


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 1, _state(1), None, {})
    with pytest.raises(FileNotFoundError, match=r"have: \[1\]"):
        load_checkpoint(tmp_path, step=7)
    with pytest.raises(FileNotFoundError, match="resume with the same number of processes"):
        load_checkpoint(tmp_path, load_optim=True, rank=3)


def _slow_writer(directory):
    # a big state makes the write take long enough to be killed in the middle of it
    save_checkpoint(directory, 2, {"w": torch.randn(4096, 4096)}, {"o": torch.randn(4096, 4096)}, {})


def test_killed_write_leaves_previous_checkpoint_loadable(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), {"opt": 1}, {"model_config": {}})
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_slow_writer, args=(tmp_path,))
    p.start()
    deadline = time.time() + 20
    while not (tmp_path / ".tmp-step_000002").exists() and time.time() < deadline:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert latest_step(tmp_path) == 1
    model, optim, meta = load_checkpoint(tmp_path, load_optim=True)
    assert model["w"][0, 0].item() == 1.0 and meta["step"] == 1
    # the next save cleans up the leftovers and succeeds
    save_checkpoint(tmp_path, 2, _state(2), None, {})
    assert latest_step(tmp_path) == 2 and not (tmp_path / ".tmp-step_000002").exists()
