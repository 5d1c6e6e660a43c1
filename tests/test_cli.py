"""The headless `nanochat` command line, in-process, on runs of fake stages."""
from __future__ import annotations

import sys
import time
import types

import pytest

from nanochat import supervisor as sv
from nanochat.cli import main

pytestmark = pytest.mark.timeout(120)


def fake(name, *args):
    return {"name": name, "module": "tests.fake_stage", "args": [str(a) for a in args]}


@pytest.fixture
def new_run(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    made = []

    def make(*stages):
        d = sv.create_run("demo", stages=list(stages))
        made.append(d)
        return d
    yield make
    for d in made:
        if sv.is_live(d):
            sv.stop_run(d, timeout=1.0)


def error_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanochat: error: ") and "\n" not in err  # one clear line, no traceback
    return err


def test_bad_input_gets_one_line(new_run, capsys):
    assert "unknown profile 'nope'" in error_of(capsys, ["run", "--profile", "nope"])
    assert "did you mean 'base_train.depth'" in error_of(capsys, ["run", "--set", "base_train.depht=3"])
    err = error_of(capsys, ["run", "--profile", "demo", "--from", "nope"])
    assert "--from 'nope' is not a stage of this run; stages: " in err and "base_train" in err
    assert "no runs in" in error_of(capsys, ["status", "nope"])
    d = new_run(fake("a"))
    assert "has no stage 'zz'; stages: a" in error_of(capsys, ["retry", d.name, "zz"])
    assert "has no stage 'zz'; stages: a, supervisor" in error_of(capsys, ["logs", d.name, "zz"])
    assert "matches no run" in error_of(capsys, ["report", "zzz"])
    assert list((d.parent).iterdir()) == [d]  # no run was created by the failed `run`s


def test_wait_status_logs_report(new_run, capsys):
    d = new_run(fake("a", "--steps", 3), fake("b", "--steps", 2, "--eval", "MMLU:acc:0.25:sft"))
    assert main(["resume", d.name, "--wait"]) == 0  # a run never started: resume starts it
    out = capsys.readouterr().out
    assert "a: succeeded" in out and "b: succeeded" in out

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert d.name in out and "succeeded" in out
    assert main(["status", d.name[:8]]) == 0
    out = capsys.readouterr().out
    assert "3/3" in out and "2/2" in out and "2.5000" in out  # step, loss of the last step event

    assert main(["logs", d.name, "a"]) == 0
    out = capsys.readouterr().out
    assert "step 3/3 loss 2.5000" in out and "==> a/stderr.log <==" in out
    assert main(["logs", d.name, "supervisor", "-n", "1"]) == 0
    assert "driver exits: run succeeded" in capsys.readouterr().out

    assert main(["report", d.name]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(d / "report.md") and "| MMLU | - | - | 0.2500 | - |" in (d / "report.md").read_text()


def test_wait_exits_nonzero_on_failure_then_skip_continues(new_run, capsys):
    d = new_run(fake("a", "--steps", 1), fake("b", "--crash-at", 1), fake("c", "--steps", 1))
    assert main(["resume", d.name, "--wait"]) == 1
    out = capsys.readouterr().out
    assert "b: failed - RuntimeError: fake crash at step 1" in out and "raise RuntimeError" in out
    assert f"nanochat logs {d.name} b" in out
    assert main(["skip", d.name, "b"]) == 0
    assert f"continue with: nanochat resume {d.name}" in capsys.readouterr().out
    assert main(["resume", d.name, "--wait"]) == 0
    assert [s["status"] for s in sv.read_state(d)["stages"]] == ["succeeded", "skipped", "succeeded"]


def test_stop_and_follow_logs(new_run, capsys):
    d = new_run(fake("a", "--steps", 400, "--sleep", 0.05))
    assert main(["resume", d.name]) == 0
    deadline = time.time() + 20
    while sv.read_state(d)["stages"][0]["status"] != "running" and time.time() < deadline:
        time.sleep(0.05)
    assert main(["stop", d.name, "--timeout", "5"]) == 0
    assert f"continue with: nanochat resume {d.name}" in capsys.readouterr().out
    assert sv.read_state(d)["stages"][0]["status"] == "stopped"
    assert main(["stop", d.name]) == 0
    assert "is not running (stopped)" in capsys.readouterr().out

    d2 = new_run(fake("a", "--steps", 8, "--sleep", 0.05))
    main(["resume", d2.name])
    while sv.read_state(d2)["stages"][0]["status"] != "running" and time.time() < deadline + 20:
        time.sleep(0.05)
    assert main(["logs", d2.name, "--follow"]) == 0  # returns once the stage is over
    out = capsys.readouterr().out
    assert "step 8/8" in out


def test_chat_dispatches_lazily(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "nanochat.chat_cli", types.SimpleNamespace(main=lambda argv: calls.append(argv)))
    assert main(["chat", "--prompt", "hi", "--run", "x"]) == 0
    assert calls == [["--prompt", "hi", "--run", "x"]]
