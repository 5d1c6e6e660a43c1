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


def test_resume_with_another_world_size_is_refused_in_one_line(tmp_path, monkeypatch):
    from nanochat.config import ConfigError
    save_checkpoint(tmp_path, 4, _state(4), {"opt": 0}, {"loader_state": [{"i": 0}, {"i": 1}]})
    meta = tmp_path / "step_000004" / "meta.json"  # as if two ranks had written it
    meta.write_text(meta.read_text().replace('"world_size": 1', '"world_size": 2'))
    with pytest.raises(ConfigError, match=r"with 1 process\(es\): it was written by 2; resume with run.nproc_per_node") as e:
        load_checkpoint(tmp_path, load_optim=True)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("WORLD_SIZE", "4")  # under torchrun the default is the launcher's world size
    with pytest.raises(ConfigError, match="with 4 process"):
        load_checkpoint(tmp_path, load_optim=True)
    assert load_checkpoint(tmp_path)[2]["step"] == 4  # the weights alone (a new phase starting from it) load fine


def _watch(directory, steps, stop, seen):
    """A reader that checks, as often as it can, that the wanted steps are listed and the latest is complete
    (what a resume loads; an older one may be pruned between our listing and our look)."""
    while not stop.is_set():
        listed = list_steps(directory)
        last = directory / f"step_{max(listed, default=0):06d}"
        seen.append(set(steps) <= set(listed) and (last / "model.pt").is_file() and (last / "meta.json").is_file())


@pytest.mark.parametrize("keep_last", [None, 2])
def test_resave_and_pruning_never_leave_a_moment_without_the_checkpoint(tmp_path, keep_last):
    import threading
    save_checkpoint(tmp_path, 3, _state(0), None, {})
    stop, seen = threading.Event(), []
    watch = threading.Thread(target=_watch, args=(tmp_path, [3] if keep_last is None else [], stop, seen))
    watch.start()
    try:
        for i in range(1, 40):
            if keep_last is None:
                save_checkpoint(tmp_path, 3, _state(i), None, {})  # the same step again
            else:
                save_checkpoint(tmp_path, 3 + i, _state(i), None, {}, keep_last=keep_last)
                last = list_steps(tmp_path)
                assert last == [1 + i, 2 + i, 3 + i][-len(last):] and len(last) == min(2, i + 1)
    finally:
        stop.set()
        watch.join()
    assert all(seen) and len(seen) > 50
    assert load_checkpoint(tmp_path)[0]["w"][0, 0].item() == 39.0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left aside
