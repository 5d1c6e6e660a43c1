"""Fault injection with real processes: the driver, a torchrun rank, the TUI and the terminal are killed
at awkward moments, a checkpoint write is cut short, a 2-process stage is stopped. After each, no process
of the run is left (found by walking /proc for the run directory in command lines and environments), the
run resumes to completion, and no event or checkpoint is lost."""
from __future__ import annotations

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

pytestmark = pytest.mark.timeout(240)


def fake(name, *args, **kw):
    return {"name": name, "module": "tests.fake_stage", "args": [str(a) for a in args], **kw}


def wait_for(pred, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stage(run_dir, name="a") -> dict:
    return next(s for s in sv.read_state(run_dir)["stages"] if s["name"] == name)


def events(run_dir, name="a"):
    evs, bad = read_events(Path(run_dir) / name / "events.jsonl")
    return evs, bad


def steps_of(run_dir, name="a") -> list[int]:
    return [e["step"] for e in events(run_dir, name)[0] if e["kind"] == "step"]


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


# ------------------------------------------------------------------------------ the driver

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
    assert st["stages"][0]["status"] == "failed" and st["stages"][0]["exit_code"] not in (0, None)
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
