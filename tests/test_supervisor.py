"""The run supervisor, driven end to end with fake stages (tests/fake_stage.py) in real detached processes."""
from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nanochat import supervisor as sv
from nanochat.checkpoint import latest_step, list_steps, load_checkpoint
from nanochat.events import read_events

pytestmark = pytest.mark.timeout(120)


def fake(name, *args, **kw):
    return {"name": name, "module": "tests.fake_stage", "args": [str(a) for a in args], **kw}


def wait_for(pred, timeout=20.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stage(run_dir, name="a") -> dict:
    return next(s for s in sv.read_state(run_dir)["stages"] if s["name"] == name)


def steps_of(run_dir, name="a") -> list[int]:
    evs, _ = read_events(Path(run_dir) / name / "events.jsonl")
    return [e["step"] for e in evs if e["kind"] == "step"]


def wait_done(run_dir, timeout=30.0):
    wait_for(lambda: not sv.is_live(run_dir), timeout, "the run to finish")
    return sv.read_state(run_dir)


def run_procs(run_dir) -> list[int]:
    """Every process (but this one) whose command line or environment names the run directory."""
    needle, out = str(run_dir).encode(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
            if (needle in cmd or needle in env) and psutil.Process(int(name)).status() != psutil.STATUS_ZOMBIE:
                out.append(int(name))
        except (OSError, psutil.NoSuchProcess):
            pass
    return out


def stage_leaders(run_dir) -> list[int]:
    """Processes running a stage module of this run, not counting torchrun's workers (children of one)."""
    pids = [p for p in run_procs(run_dir) if b"tests.fake_stage" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return [p for p in pids if psutil.Process(p).ppid() not in pids and not _torchrun_child(p)]


def _torchrun_child(pid) -> bool:
    try:
        return b"torch.distributed.run" in Path(f"/proc/{psutil.Process(pid).ppid()}/cmdline").read_bytes()
    except (OSError, psutil.NoSuchProcess):
        return False


def finished(run_dir, timeout=90.0) -> dict:
    wait_for(lambda: not sv.is_live(run_dir) and not run_procs(run_dir), timeout, "the run to end with no process left")
    return sv.read_state(run_dir)


def assert_complete(run_dir, name, steps):
    """The stage succeeded; its last attempt's steps continue from where the previous one checkpointed
    (every step up to `steps` is there), and every line of its events is a valid event."""
    st = sv.read_state(run_dir)
    assert st["status"] == "succeeded", st["stages"]
    evs, bad = events(run_dir, name)
    assert set(steps_of(run_dir, name)) == set(range(1, steps + 1))
    assert evs[-1]["kind"] == "end" and evs[-1]["status"] == "ok"
    assert [e["kind"] for e in evs].count("start") == stage(run_dir, name)["attempts"]
    return bad


def events(run_dir, name="a"):
    return read_events(Path(run_dir) / name / "events.jsonl")


def gone(pid) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    made = []

    def make(*stages, overrides=()):
        d = sv.create_run("demo", list(overrides), stages=list(stages), root=tmp_path / "runs")
        made.append(d)
        return d
    yield make
    for d in made:  # never leave a process behind, even when a test fails
        if sv.is_live(d):
            sv.stop_run(d, timeout=1.0)
        for pid in run_procs(d):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ plan and command line

def test_stage_entries_and_commands(tmp_path):
    specs = sv.parse_stages(["tok_train", "chat_eval:sft", {"name": "x", "module": "tests.fake_stage", "args": ["-n", 3]}])
    assert [s["name"] for s in specs] == ["tok_train", "chat_eval_sft", "x"]
    assert specs[0]["module"] == "stages.tok_train" and specs[0]["args"] == []
    assert specs[1]["module"] == "stages.chat_eval" and specs[1]["args"] == ["-i", "sft", "--stage-name", "chat_eval_sft"]
    assert specs[2]["args"] == ["-n", "3"]
    for bad, msg in [(["a", "a"], "unique"), ([{"name": "../x"}], "directory"), ([{"name": "a", "modul": "m"}], "modul"),
                     ([], "no stages"), ([42], "must be a name"), ([{"name": "a", "args": "x"}], "list of strings")]:
        with pytest.raises(sv.SupervisorError, match=msg):
            sv.parse_stages(bad)

    s = {**specs[0], "resume": False}
    single = sv.stage_command(s, tmp_path, {"nproc_per_node": 1, "nnodes": 1})
    assert single == [sys.executable, "-m", "stages.tok_train", "--run-dir", str(tmp_path)]
    # the tokenizer works in one process: no torchrun for it even in a multi-GPU run
    assert not specs[0]["torchrun"] and specs[1]["torchrun"] and specs[2]["torchrun"]
    assert sv.stage_command(s, tmp_path, {"nproc_per_node": 4, "nnodes": 1})[:3] == [sys.executable, "-m", "stages.tok_train"]
    s = {**sv.parse_stage_entry("base_train"), "resume": False}
    multi = sv.stage_command({**s, "resume": True}, tmp_path, {"nproc_per_node": 4, "nnodes": 1})
    assert multi[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=1"]
    assert multi[-4:] == ["stages.base_train", "--run-dir", str(tmp_path), "--resume"]
    nodes = sv.stage_command(s, tmp_path, {"nproc_per_node": 8, "nnodes": 2, "rdzv_endpoint": "10.0.0.1:29500"})
    assert "--rdzv-backend=c10d" in nodes and "--rdzv-endpoint=10.0.0.1:29500" in nodes and "--nnodes=2" in nodes
    assert sv.stage_command({**s, "torchrun": False}, tmp_path, {"nproc_per_node": 8})[:2] == [sys.executable, "-m"]


# ------------------------------------------------------------------------------ the state machine

def test_run_succeeds_in_order(runs):
    d = runs(fake("a", "--steps", 3), fake("b", "--steps", 2))
    st = sv.read_state(d)
    assert st["status"] == "pending" and [s["status"] for s in st["stages"]] == ["pending", "pending"]
    assert (d / "config.toml").is_file()
    pid = sv.start_run(d)
    assert sv.is_live(d) and sv.read_state(d)["driver"]["pid"] == pid
    st = wait_done(d)
    assert st["status"] == "succeeded" and st["driver"] is None
    a, b = st["stages"]
    assert a["status"] == b["status"] == "succeeded" and a["exit_code"] == b["exit_code"] == 0
    assert a["ended"] <= b["started"]  # in order, one at a time
    assert a["cmd"][1:3] == ["-m", "tests.fake_stage"] and a["attempts"] == 1
    assert steps_of(d, "a") == [1, 2, 3] and steps_of(d, "b") == [1, 2]
    assert "step 3/3" in (d / "a" / "stdout.log").read_text()
    assert "starting" in (d / "a" / "stderr.log").read_text()
    assert st["system"]["cpus"] >= 1  # the driver's machine snapshot, for the report
    assert gone(a["pid"])
    wait_for(lambda: gone(pid), 5, "the driver to exit")  # it clears its record just before exiting
    runs_list = sv.list_runs(d.parent)
    assert [(r.run_id, r.status, r.live) for r in runs_list] == [(d.name, "succeeded", False)]
    assert sv.resolve_run(d.name[:10], d.parent) == d and sv.resolve_run("latest", d.parent) == d
    with pytest.raises(sv.SupervisorError, match="matches no run"):
        sv.resolve_run("nope", d.parent)


def test_crash_fails_with_traceback_and_halts(runs):
    d = runs(fake("a", "--steps", 1), fake("b", "--steps", 4, "--crash-at", 2), fake("c"))
    sv.start_run(d)
    st = wait_done(d)
    a, b, c = st["stages"]
    assert (a["status"], b["status"], c["status"]) == ("succeeded", "failed", "pending")
    assert st["status"] == "failed"
    assert b["exit_code"] == 1 and b["error"] == "RuntimeError: fake crash at step 2"
    assert any("raise RuntimeError" in ln for ln in b["traceback"]) and len(b["traceback"]) <= sv.TRACEBACK_LINES
    assert not (d / "c").exists()  # nothing after a failure starts


def test_sigkilled_worker_fails_with_exit_code_and_stderr_tail(runs):
    d = runs(fake("a", "--steps", 200, "--sleep", 0.05), fake("b", "--steps", 5, "--die-at", 2))
    sv.start_run(d)
    wait_for(lambda: len(steps_of(d, "a")) >= 2, what="a's first steps")
    os.kill(stage(d, "a")["pid"], signal.SIGKILL)
    st = wait_done(d)
    a = st["stages"][0]
    assert a["status"] == "failed" and a["exit_code"] == -signal.SIGKILL
    assert "SIGKILL" in a["error"] and any("starting" in ln for ln in a["traceback"])  # tail of stderr
    # a hard exit with no event: its exit code and what it printed last
    sv.skip_stage(d, "a")
    sv.resume_run(d)
    b = wait_done(d)["stages"][1]
    assert b["status"] == "failed" and b["exit_code"] == 7 and b["error"] == "exit code 7"
    assert b["traceback"][-1] == "dying hard at step 2"


def test_stop_leaves_no_process_and_resume_continues_from_checkpoint(runs):
    d = runs(fake("a", "--steps", 40, "--sleep", 0.05, "--child"), fake("b", "--steps", 2))
    driver = sv.start_run(d)
    wait_for(lambda: len(steps_of(d, "a")) >= 3, what="a's steps")
    evs, _ = read_events(d / "a" / "events.jsonl")
    helper = next(e["helper_pid"] for e in evs if e.get("message") == "helper")
    a_pid = stage(d, "a")["pid"]
    sv.stop_run(d, timeout=10)
    st = sv.read_state(d)
    a = st["stages"][0]
    assert a["status"] == "stopped" and a["exit_code"] == 143 and st["status"] == "stopped"
    assert st["stages"][1]["status"] == "pending" and st["driver"] is None
    for pid in (a_pid, helper, driver):
        assert gone(pid), f"process {pid} of the run is still alive"
    assert not sv.stage_procs(a) and not sv.is_live(d)
    evs, _ = read_events(d / "a" / "events.jsonl")
    ck = [e for e in evs if e["kind"] == "checkpoint"][-1]
    assert evs[-1]["kind"] == "end" and evs[-1]["status"] == "stopped"
    stopped_at = ck["step"]
    assert stopped_at < 40

    sv.resume_run(d)
    st = wait_done(d)
    assert [s["status"] for s in st["stages"]] == ["succeeded", "succeeded"]
    a = st["stages"][0]
    assert a["attempts"] == 2 and a["cmd"][-1] == "--resume"
    evs, _ = read_events(d / "a" / "events.jsonl")
    starts = [i for i, e in enumerate(evs) if e["kind"] == "start"]
    assert len(starts) == 2 and evs[starts[1]]["resume"] is True
    after = [e["step"] for e in evs[starts[1]:] if e["kind"] == "step"]
    assert after[0] == stopped_at + 1 and after[-1] == 40  # continued, not restarted
    assert any(e.get("message") == f"resumed from step {stopped_at}" for e in evs)


def test_stop_escalates_to_sigkill(runs):
    d = runs(fake("a", "--steps", 400, "--sleep", 0.05, "--ignore-term"))
    sv.start_run(d)
    wait_for(lambda: len(steps_of(d, "a")) >= 1, what="a's first step")
    pid = stage(d, "a")["pid"]
    t0 = time.time()
    sv.stop_run(d, timeout=0.5)
    assert time.time() - t0 < 8
    a = stage(d, "a")
    assert a["status"] == "stopped" and a["exit_code"] == -signal.SIGKILL and gone(pid)


def test_driver_killed_stage_keeps_running_and_new_driver_reattaches(runs):
    d = runs(fake("a", "--steps", 30, "--sleep", 0.1), fake("b", "--steps", 2))
    driver = sv.start_run(d)
    wait_for(lambda: len(steps_of(d, "a")) >= 2, what="a's steps")
    os.kill(driver, signal.SIGKILL)
    wait_for(lambda: gone(driver), what="the driver to die")
    a = stage(d, "a")
    n = len(steps_of(d, "a"))
    time.sleep(0.5)
    assert sv.proc_alive(a["pid"], a["create_time"]), "the stage died with its driver"
    assert len(steps_of(d, "a")) > n  # still training
    assert sv.is_live(d) and sv.read_state(d)["status"] == "running"
    with pytest.raises(sv.SupervisorError, match="is running"):
        sv.skip_stage(d, "a")

    assert sv.reattach_orphans(d.parent) == [d]
    new = sv.read_state(d)["driver"]["pid"]
    assert new != driver
    wait_for(lambda: stage(d, "a").get("reattached"), what="the new driver to reattach")
    st = wait_done(d)
    a, b = st["stages"]
    assert a["status"] == "succeeded" and a["pid"] == sv.read_state(d)["stages"][0]["pid"]
    assert a["exit_code"] is None and a["attempts"] == 1  # not our child: outcome read from its end event
    assert b["status"] == "succeeded" and steps_of(d, "a")[-1] == 30


def test_stale_pid_of_unrelated_process_is_not_live(runs):
    d = runs(fake("a", "--steps", 1))
    # an unrelated process leading its own group: the most dangerous pid to mistake for a stage's
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        with sv.state_txn(d) as st:
            st["stages"][0].update(status="running", pid=other.pid,
                                   create_time=psutil.Process(other.pid).create_time() - 1000.0)
            st["driver"] = {"pid": other.pid, "create_time": 12345.0}
        a = stage(d, "a")
        assert not sv.proc_alive(a["pid"], a["create_time"]) and not sv.stage_procs(a)
        assert not sv.is_live(d)
        sv.stop_run(d, timeout=0.5)  # must not signal it
        assert other.poll() is None and stage(d, "a")["status"] == "stopped"

        with sv.state_txn(d) as st:
            st["stages"][0]["status"] = "running"
        sv.start_run(d)  # the driver must not wait for it either: it finds the stage dead
        st = wait_done(d, timeout=10)
        a = st["stages"][0]
        assert a["status"] == "failed" and "without an end or error event" in a["error"]
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_two_drivers_never_drive_one_run(runs):
    d = runs(fake("a", "--steps", 100, "--sleep", 0.05))
    driver = sv.start_run(d)
    wait_for(lambda: stage(d, "a")["status"] == "running", what="a to start")
    with pytest.raises(sv.SupervisorError, match=f"already being driven by supervisor pid {driver}"):
        sv.start_run(d)
    with pytest.raises(sv.SupervisorError, match="already being driven"):
        sv.resume_run(d)
    r = subprocess.run([sys.executable, "-m", "nanochat.supervisor", "drive", str(d)], capture_output=True,
                       text=True, env=sv._child_env(), timeout=30)
    assert r.returncode == 3 and f"already driven by supervisor pid {driver}" in r.stderr
    assert sv.read_state(d)["driver"]["pid"] == driver  # the refused one changed nothing
    sv.stop_run(d, timeout=5)


def test_malformed_and_torn_event_lines_are_tolerated(runs):
    d = runs(fake("a", "--steps", 3, "--garbage", "--eval", "val:bpb:1.25:base"))
    sv.start_run(d)
    st = wait_done(d)
    assert st["stages"][0]["status"] == "succeeded"
    evs, bad = read_events(d / "a" / "events.jsonl")
    assert bad == 9 and [e["step"] for e in evs if e["kind"] == "step"] == [1, 2, 3]
    with open(d / "a" / "events.jsonl", "a") as f:
        f.write('{"v":1,"kind":"step","step":4,"total_st')  # a torn last line: a crash mid-write
    evs2, bad2 = read_events(d / "a" / "events.jsonl")
    assert evs2 == evs and bad2 == bad


def test_retry_skip_and_start_from_a_stage(runs):
    d = runs(fake("a", "--steps", 2), fake("b", "--steps", 3, "--crash-at", 2, "--crash-once"), fake("c", "--steps", 1))
    sv.start_run(d)
    assert wait_done(d)["stages"][1]["status"] == "failed"
    with pytest.raises(sv.SupervisorError, match="only pending, failed or stopped"):
        sv.skip_stage(d, "a")
    with pytest.raises(sv.SupervisorError, match="has no stage 'nope'; stages: a, b, c"):
        sv.retry_stage(d, "nope")
    sv.retry_stage(d, "b")  # from scratch: the failed attempt's logs move aside
    st = wait_done(d)
    assert [s["status"] for s in st["stages"]] == ["succeeded"] * 3
    assert (d / "b" / "attempt-1" / "events.jsonl").exists()
    evs, _ = read_events(d / "b" / "events.jsonl")
    assert [e["kind"] for e in evs].count("start") == 1 and not any(e["kind"] == "error" for e in evs)

    sv.start_run(d, from_stage="b")  # b and c again, a untouched
    a_ended = st["stages"][0]["ended"]
    st = wait_done(d)
    assert st["stages"][0]["ended"] == a_ended and st["stages"][1]["attempts"] == 3 and st["stages"][2]["attempts"] == 2

    d2 = runs(fake("a"), fake("b", "--steps", 1))
    sv.skip_stage(d2, "a")
    sv.start_run(d2)
    st = wait_done(d2)
    assert [s["status"] for s in st["stages"]] == ["skipped", "succeeded"] and st["status"] == "succeeded"
    assert not (d2 / "a").exists()


@pytest.mark.slow
def test_real_base_train_stage_stop_and_resume(tiny_run, monkeypatch):
    """One real stage under the supervisor: stopped mid-training, it checkpoints; resumed, it continues."""
    from nanochat.checkpoint import ckpt_dir, latest_step
    from nanochat.report import build_report
    run_dir, base = tiny_run
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sets = ["base_train.num_iterations=300", "base_train.save_every=1000", "base_train.eval_every=0"]
    sv.init_run(run_dir, stages=[{"name": "base_train", "args": [a for s in sets for a in ("--set", s)]}])
    sv.start_run(run_dir)
    try:
        wait_for(lambda: len(steps_of(run_dir, "base_train")) >= 3, 120, "base_train's first steps")
    finally:
        sv.stop_run(run_dir, timeout=60)
    s = stage(run_dir, "base_train")
    assert s["status"] == "stopped" and s["exit_code"] == 143, s
    evs, _ = read_events(run_dir / "base_train" / "events.jsonl")
    ck = [e for e in evs if e["kind"] == "checkpoint"]
    assert len(ck) == 1 and latest_step(ckpt_dir(run_dir, "base")) == ck[0]["step"] < 300
    assert evs[-1]["kind"] == "end" and evs[-1]["status"] == "stopped"

    with sv.state_txn(run_dir) as st:  # finish quickly once resumed
        st["stages"][0]["args"] = ["--set", "base_train.num_iterations=%d" % (ck[0]["step"] + 5), *st["stages"][0]["args"][2:]]
    sv.resume_run(run_dir)
    st = wait_done(run_dir, 120)
    assert st["stages"][0]["status"] == "succeeded", st["stages"][0]
    evs, _ = read_events(run_dir / "base_train" / "events.jsonl")
    resumed = [e for e in evs if e.get("message", "").startswith("resumed from step")]
    assert resumed and resumed[0]["step"] == ck[0]["step"]
    later = [e["step"] for e in evs if e["kind"] == "step" and e["ts"] > resumed[0]["ts"]]
    assert later == list(range(ck[0]["step"] + 1, ck[0]["step"] + 6))
    end = evs[-1]
    assert end["kind"] == "end" and end["status"] == "ok"
    assert f"Parameters: {end['num_params']:,}" in build_report(run_dir)


def test_sigterm_to_the_driver_stops_the_run(runs):
    d = runs(fake("a", "--steps", 400, "--sleep", 0.05), fake("b"))
    driver = sv.start_run(d)
    wait_for(lambda: len(steps_of(d, "a")) >= 1, what="a's first step")
    pid = stage(d, "a")["pid"]
    os.kill(driver, signal.SIGTERM)
    wait_for(lambda: gone(driver) and gone(pid), 15, "driver and stage to end")
    st = sv.read_state(d)
    assert [s["status"] for s in st["stages"]] == ["stopped", "pending"] and st["stop_requested"]
    assert st["stages"][0]["exit_code"] == 143 and st["driver"] is None


# ------------------------------------------------------------------------------ fault injection
# Real processes killed at awkward moments. After each, no process of the run is left (found by walking /proc
# for the run directory in command lines and environments), the run resumes to completion, and no event or
# checkpoint is lost.

def test_driver_killed_before_or_after_starting_a_stage_never_duplicates_it(runs):
    """The launch intent is recorded before the process starts. Killed between the two, a driver leaves
    a stage marked running with no pid: the next driver adopts its process if it exists (found by its
    launch token) and starts it once if it does not."""
    d = runs(fake("a", "--steps", 20, "--sleep", 0.05), fake("b", "--steps", 2))
    # killed after recording the intent, before starting: nothing ran, so resume starts it, once
    with sv.state_txn(d) as st:
        sv._record_launch(d, st["stages"][0])
    assert stage(d)["status"] == "running" and stage(d)["pid"] is None and not sv.is_live(d)
    sv.resume_run(d)
    wait_for(lambda: stage(d)["pid"] is not None, what="the stage to start")
    assert len(stage_leaders(d)) == 1
    finished(d)
    assert_complete(d, "a", 20)
    assert stage(d)["attempts"] == 1 and stage(d, "b")["status"] == "succeeded"

    # killed after starting, before recording the pid: the stage runs unknown to state.json; resume adopts it
    d = runs(fake("a", "--steps", 30, "--sleep", 0.1), fake("b", "--steps", 2))
    with sv.state_txn(d) as st:
        sv._record_launch(d, st["stages"][0])
    s = stage(d)
    orphan = sv._start(d, s)  # started by a "driver" that dies at once
    wait_for(lambda: len(steps_of(d)) >= 2, what="the orphan's steps")
    assert sv.is_live(d) and [p.pid for p in sv.stage_procs(s)] == [orphan.pid]
    sv.resume_run(d)
    wait_for(lambda: stage(d)["reattached"], what="the new driver to adopt the stage")
    assert stage(d)["pid"] == orphan.pid and stage_leaders(d) == [orphan.pid]
    orphan.wait(timeout=60)
    st = finished(d)
    assert [x["status"] for x in st["stages"]] == ["succeeded", "succeeded"]
    assert_complete(d, "a", 30)
    assert steps_of(d) == list(range(1, 31))  # one process did every step: no second copy ran


def test_driver_sigkill_mid_stage_then_resume_reattaches_without_duplicate(runs):
    d = runs(fake("a", "--steps", 40, "--sleep", 0.05, "--child"), fake("b", "--steps", 2))
    driver = sv.start_run(d)
    wait_for(lambda: len(steps_of(d)) >= 3, what="a's steps")
    os.kill(driver, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(driver) or psutil.Process(driver).status() == psutil.STATUS_ZOMBIE)
    assert sv.run_status(sv.read_state(d)) == "running" and sv.is_live(d)
    sv.resume_run(d)  # the same as `nanochat resume` after a crash: must not start a second copy
    wait_for(lambda: stage(d)["reattached"], what="the reattach")
    assert len(stage_leaders(d)) == 1
    st = finished(d)
    assert [x["status"] for x in st["stages"]] == ["succeeded", "succeeded"]
    assert_complete(d, "a", 40)
    assert steps_of(d) == list(range(1, 41))


# ------------------------------------------------------------------------------ torchrun

@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchrun_rank_sigkill_stop_and_resume_leave_no_process_and_lose_nothing(runs):
    """2 processes through torchrun with real checkpoints: SIGKILL of rank 1 fails the stage and leaves no
    process; resume continues from the latest checkpoint; a stop of the 2-process stage reaches both
    workers (in sessions of their own) and torchrun; resuming with 1 process is refused in one line;
    with 2 again it completes."""
    d = runs(fake("a", "--steps", 400, "--sleep", 0.05, "--ckpt-every", 5), overrides=["run.nproc_per_node=2"])
    sv.start_run(d)
    wait_for(lambda: len(list_steps(d / "checkpoints" / "a")) >= 1 and len(steps_of(d)) >= 8, 120, "a checkpoint")
    a = stage(d)
    workers = [p for p in sv.stage_procs(a) if "RANK" in p.environ()]
    assert len(workers) == 2 and all(os.getsid(p.pid) != os.getsid(a["pid"]) for p in workers)  # own sessions
    next(p for p in workers if p.environ().get("RANK") == "1").kill()
    st = finished(d, 120)
    a = st["stages"][0]
    assert a["status"] == "failed" and a["exit_code"] not in (0, None), a
    assert any("-9" in ln or "SIGKILL" in ln for ln in a["traceback"]), a["traceback"]
    ck = latest_step(d / "checkpoints" / "a")
    assert ck and load_checkpoint(d / "checkpoints" / "a", rank=1, load_optim=True, world_size=2)[1] == {"rank": 1}

    sv.resume_run(d)
    wait_for(lambda: stage(d)["status"] == "running" and steps_of(d)[-1] > ck + 3, 120, "the resumed steps")
    evs, _ = events(d)
    assert any(e.get("message") == f"resumed from step {ck}" for e in evs)
    assert len(sv.stage_procs(stage(d))) >= 3  # torchrun and its two workers
    sv.stop_run(d, timeout=20)
    st = sv.read_state(d)
    assert st["stages"][0]["status"] == "stopped" and not run_procs(d) and not sv.stage_procs(st["stages"][0])

    cfg = d / "config.toml"  # the same run on one process: refused, nothing loaded wrongly
    cfg.write_text(cfg.read_text().replace("nproc_per_node = 2", "nproc_per_node = 1"))
    sv.resume_run(d)
    st = finished(d, 120)
    err = st["stages"][0]["error"]
    assert st["stages"][0]["status"] == "failed" and "it was written by 2" in err and "\n" not in err, err

    cfg.write_text(cfg.read_text().replace("nproc_per_node = 1", "nproc_per_node = 2"))
    with sv.state_txn(d) as st:  # finish quickly once resumed
        s = st["stages"][0]
        s["args"][s["args"].index("400")] = str(latest_step(d / "checkpoints" / "a") + 6)
    sv.resume_run(d)
    st = finished(d, 180)
    total = int(st["stages"][0]["args"][1])
    assert_complete(d, "a", total)


# ------------------------------------------------------------------------------ checkpoints

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stage_sigkilled_during_a_checkpoint_write_resumes_from_the_previous_one(runs):
    d = runs(fake("a", "--steps", 12, "--sleep", 0.02, "--ckpt-every", 3, "--ckpt-mb", 300))
    sv.start_run(d)
    cdir = d / "checkpoints" / "a"
    wait_for(lambda: latest_step(cdir) == 3, 120, "the first checkpoint")
    wait_for(lambda: (cdir / ".tmp-step_000006").exists(), 120, "the second checkpoint's write")
    os.kill(stage(d)["pid"], signal.SIGKILL)  # in the middle of writing 300 MB
    st = finished(d)
    assert st["stages"][0]["status"] == "failed" and "SIGKILL" in st["stages"][0]["error"]
    assert list_steps(cdir) == [3]
    _, _, meta = load_checkpoint(cdir, load_optim=True)  # complete and loadable
    assert meta["step"] == 3
    ck_events = [e["step"] for e in events(d)[0] if e["kind"] == "checkpoint"]
    assert ck_events == [3]  # the event comes only once the checkpoint is complete

    sv.resume_run(d)
    st = finished(d, 120)
    assert_complete(d, "a", 12)
    evs, _ = events(d)
    assert any(e.get("message") == "resumed from step 3" for e in evs)
    assert [e["step"] for e in evs if e["kind"] == "checkpoint"] == [3, 6, 9, 12]
    assert list_steps(cdir) == [9, 12] and not [p for p in cdir.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ the terminal and the TUI

def test_sighup_of_the_terminal_does_not_stop_the_run(runs):
    """`nanochat run` started from a terminal that hangs up (ssh drop, closed window): the session
    leader gets SIGHUP and dies; the driver and the stage, in sessions of their own, go on."""
    d = runs(fake("a", "--steps", 30, "--sleep", 0.05), fake("b", "--steps", 2))
    pid, master = pty.fork()
    if pid == 0:  # the "shell" in the terminal: starts the run, then waits like a foreground command
        try:
            sv.start_run(d)
            time.sleep(120)
        finally:
            os._exit(0)
    try:
        wait_for(lambda: len(steps_of(d)) >= 3, what="a's steps")
        os.close(master)         # the terminal goes away ...
        os.killpg(pid, signal.SIGHUP)  # ... and its session gets the hang-up
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGHUP
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    n = len(steps_of(d))
    wait_for(lambda: len(steps_of(d)) > n, what="training to go on after the hang-up")
    st = finished(d)
    assert [x["status"] for x in st["stages"]] == ["succeeded", "succeeded"] and st["stages"][0]["attempts"] == 1
    assert_complete(d, "a", 30)


TUI = """
import sys
from pathlib import Path
from tui.app import NanochatApp
NanochatApp(open_run=Path(sys.argv[1])).run(headless=True, size=(120, 40))
"""


@pytest.mark.slow
def test_tui_reattaches_a_run_whose_driver_died_and_its_sigkill_harms_nothing(runs):
    """The real TUI (headless, its own process) watching a run: the driver is SIGKILLed, the TUI starts a
    new one (supervisor.reattach, as `nanochat status` does) and the next stage runs; then the TUI itself
    is SIGKILLed mid-stage and the run finishes without it."""
    d = runs(fake("a", "--steps", 40, "--sleep", 0.05), fake("b", "--steps", 150, "--sleep", 0.05))
    driver = sv.start_run(d)
    wait_for(lambda: len(steps_of(d)) >= 3, what="a's steps")
    tui = subprocess.Popen([sys.executable, "-c", TUI, str(d)], env=sv._child_env(), cwd=sv.REPO_ROOT,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        os.kill(driver, signal.SIGKILL)
        wait_for(lambda: (sv.read_state(d).get("driver") or {}).get("pid") not in (None, driver), 60,
                 "the TUI to start a new driver")
        new = sv.read_state(d)["driver"]
        assert psutil.Process(new["pid"]).ppid() == tui.pid  # it was the TUI, not anyone else
        wait_for(lambda: len(steps_of(d, "b")) >= 3, 60, "the next stage to start")
        assert tui.poll() is None, tui.stderr.read().decode()
        tui.kill()
        tui.wait()
        n = len(steps_of(d, "b"))
        wait_for(lambda: len(steps_of(d, "b")) > n + 5, what="b to go on without the TUI")
    finally:
        if tui.poll() is None:
            tui.kill()
            tui.wait()
    st = finished(d, 120)
    assert [x["status"] for x in st["stages"]] == ["succeeded", "succeeded"]
    assert_complete(d, "a", 40) == 0 and assert_complete(d, "b", 150) == 0


@pytest.mark.slow
def test_workers_orphaned_by_a_killed_driver_and_torchrun_are_still_stopped(runs):
    """The worst case for a stop: driver and torchrun both SIGKILLed, the two workers (each in a session
    of its own) orphaned to init and still training. `stop` finds them by their launch token."""
    d = runs(fake("a", "--steps", 60, "--sleep", 0.05), overrides=["run.nproc_per_node=2"])
    driver = sv.start_run(d)
    wait_for(lambda: len(steps_of(d)) >= 2, 120, "the workers' first steps")
    a = stage(d)
    workers = [p for p in sv.stage_procs(a) if "RANK" in p.environ()]
    assert len(workers) == 2
    os.kill(driver, signal.SIGKILL)
    wait_for(lambda: gone(driver), what="the driver to die")
    os.kill(a["pid"], signal.SIGKILL)  # torchrun
    wait_for(lambda: gone(a["pid"]), what="torchrun to die")
    n = len(steps_of(d))
    wait_for(lambda: len(steps_of(d)) > n, what="the orphaned workers to go on")
    assert all(p.is_running() for p in workers) and sv.is_live(d)
    sv.stop_run(d, timeout=10)
    st = sv.read_state(d)
    assert st["stages"][0]["status"] == "stopped" and not run_procs(d), run_procs(d)
    evs, _ = events(d)
    assert evs[-1]["kind"] == "end" and evs[-1]["status"] == "stopped"  # rank 0 checkpointed on the way out
    sv.resume_run(d)
    finished(d, 120)
    assert_complete(d, "a", 60)
