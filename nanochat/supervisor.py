"""The run supervisor: runs a profile's stages as detached processes and keeps `state.json` honest.

A run is a directory (docs/architecture.md): `config.toml`, `state.json`, and per stage its
events, stdout and stderr. One *driver* process per run (`python -m nanochat.supervisor drive DIR`,
spawned in its own session, stdin closed, output to `supervisor.log`) launches the stages in order,
each in its own session too, so closing the TUI, a hang-up or an ssh drop never stops training, and
killing the driver never kills a stage. Clients (CLI, TUI) read `state.json` and the events, and act
through the functions below; they never need the driver to be alive to stop a stage.

Stage states: pending -> running -> succeeded | failed | stopped; pending | failed | stopped -> skipped.
A process is ours only if both its pid and its start time match what we recorded, so a pid reused
by an unrelated process after a reboot or a crash is never signalled or waited for.

Locks: `supervisor.lock` (flock) is held by the driver for its whole life, so two drivers never
drive one run. `.state.lock` (flock) is held for a moment around each read-modify-write of
`state.json`, which is always replaced atomically, so readers need no lock at all.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import psutil

from nanochat.common import atomic_write, runs_dir
from nanochat.events import EVENTS_FILE, EventReader
from nanochat.stage import STOPPED_EXIT_CODE

STATUSES = ("pending", "running", "succeeded", "failed", "stopped", "skipped")
STATE_FILE, CONFIG_FILE, LOCK_FILE, STATE_LOCK, DRIVER_LOG = \
    "state.json", "config.toml", "supervisor.lock", ".state.lock", "supervisor.log"
STATE_VERSION = 1
POLL_S = 0.2            # how often the driver looks at its stage; stages take minutes, this is cheap
TRACEBACK_LINES = 20    # last lines of a traceback (or of stderr) kept in state.json
KILL_GRACE_S = 5.0      # after SIGKILL, how long we wait for the kernel to reap the group
REPO_ROOT = Path(__file__).resolve().parent.parent


class SupervisorError(Exception):
    """A user-facing problem (unknown stage, run already driven, ...), one line."""


# ----------------------------------------------------------------------------------------- stage plan

# Stages that do their work in one process: launching them under torchrun would only idle the other ranks.
SINGLE_PROCESS_STAGES = {"data", "tok_train", "tok_eval"}


def parse_stage_entry(entry) -> dict:
    """One `run.stages` entry -> {name, module, args, torchrun}.

    "base_train"                -> stages.base_train, events in base_train/
    "chat_eval:sft"             -> stages.chat_eval -i sft, events in chat_eval_sft/
    {name=, module=, args=[], torchrun=true}   -> any module (tests point this at tests.fake_stage)
    """
    if isinstance(entry, str):
        module, _, phase = entry.partition(":")
        if phase:
            name = f"{module}_{phase}"
            entry = {"name": name, "module": f"stages.{module}", "args": ["-i", phase, "--stage-name", name]}
        else:
            entry = {"name": module}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise SupervisorError(f"stage entry {entry!r} must be a name like 'base_train', 'chat_eval:sft', "
                              "or a table with a 'name'")
    unknown = set(entry) - {"name", "module", "args", "torchrun"}
    if unknown:
        raise SupervisorError(f"stage entry {entry['name']!r} has unknown keys {sorted(unknown)}; "
                              "allowed: name, module, args, torchrun")
    name = entry["name"]
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or name == "supervisor":
        raise SupervisorError(f"stage name {name!r} must be letters, digits, '_', '.', '-' (it names a directory) "
                              "and not 'supervisor'")
    args = entry.get("args", [])
    if not isinstance(args, (list, tuple)) or not all(isinstance(a, (str, int, float)) for a in args):
        raise SupervisorError(f"stage {name!r}: args must be a list of strings, got {args!r}")
    return {"name": name, "module": str(entry.get("module") or f"stages.{name}"),
            "args": [str(a) for a in args],
            "torchrun": bool(entry.get("torchrun", name not in SINGLE_PROCESS_STAGES))}


def parse_stages(entries) -> list[dict]:
    specs = [parse_stage_entry(e) for e in entries]
    names = [s["name"] for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SupervisorError(f"stage names must be unique; repeated: {', '.join(dup)}")
    if not specs:
        raise SupervisorError("the run has no stages (run.stages is empty)")
    return specs


def stage_command(stage: dict, run_dir: Path, run_cfg: dict) -> list[str]:
    """torchrun when the run uses more than one process, else plain python (same module, same args)."""
    nproc, nnodes = int(run_cfg.get("nproc_per_node", 1)), int(run_cfg.get("nnodes", 1))
    tail = ["-m", stage["module"], "--run-dir", str(run_dir), *stage["args"]]
    if stage["resume"]:
        tail.append("--resume")
    if nproc * nnodes > 1 and stage["torchrun"]:
        # `python -m torch.distributed.run` is torchrun, without depending on PATH
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
        if nnodes > 1:
            launcher += ["--rdzv-backend=c10d", f"--rdzv-endpoint={run_cfg.get('rdzv_endpoint', '')}"]
        else:
            launcher += ["--standalone"]  # single node: a private rendezvous, no port to collide on
        return launcher + tail
    return [sys.executable, *tail]


# ----------------------------------------------------------------------------------------- state file

def _new_stage_state(spec: dict) -> dict:
    return {**spec, "status": "pending", "resume": False, "pid": None, "create_time": None, "cmd": None,
            "exit_code": None, "error": None, "traceback": [], "started": None, "ended": None, "attempts": 0,
            "events_offset": 0, "reattached": False}


def read_state(run_dir) -> dict:
    path = Path(run_dir) / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SupervisorError(f"{run_dir} is not a run directory (no {STATE_FILE})") from None


def run_status(st: dict) -> str:
    """The run's one-word status, derived from its stages."""
    ss = [s["status"] for s in st["stages"]]
    for word in ("running", "failed", "stopped"):
        if word in ss:
            return word
    if all(s in ("succeeded", "skipped") for s in ss):
        return "succeeded"
    return "running" if _driver_alive(st) else ("pending" if all(s == "pending" for s in ss) else "incomplete")


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def state_txn(run_dir):
    """Read-modify-write of state.json under the state lock; written (atomically) only if the body succeeds."""
    run_dir = Path(run_dir)
    with _flock(run_dir / STATE_LOCK):
        st = read_state(run_dir)
        yield st
        st["status"] = run_status(st)
        st["updated"] = round(time.time(), 3)
        atomic_write(run_dir / STATE_FILE, json.dumps(st, indent=1))


def _find_stage(st: dict, name: str) -> dict:
    for s in st["stages"]:
        if s["name"] == name:
            return s
    raise SupervisorError(f"run {st['run_id']} has no stage {name!r}; stages: {', '.join(s['name'] for s in st['stages'])}")


# ----------------------------------------------------------------------------------------- processes

def proc_alive(pid, create_time) -> bool:
    """Is `pid` still the process we started (same start time), and not a zombie?"""
    if not pid or create_time is None:
        return False
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def group_members(stage: dict) -> list[int]:
    """Live processes of a stage's process group (its session: the stage, torchrun workers, loaders).

    The group id is the stage's pid. Linux never hands out a pid that is still some group's id, so if
    the leader is gone, whatever is left in that group is ours; if a process with that pid exists but
    started at another time, the pid was reused and the group is not ours (ours must be empty).
    """
    pgid, ctime = stage.get("pid"), stage.get("create_time")
    if not pgid:
        return []
    leader_ct = _create_time(pgid)
    if leader_ct is not None and (ctime is None or abs(leader_ct - ctime) >= 0.05):
        return []
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return out


def _signal_group(stage: dict, sig: int) -> bool:
    if not group_members(stage):
        return False
    try:
        os.killpg(stage["pid"], sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def terminate_group(stage: dict, timeout: float) -> None:
    """SIGTERM the stage's group (it checkpoints), SIGKILL whatever is left after `timeout`."""
    if not _signal_group(stage, signal.SIGTERM):
        return
    deadline = time.time() + timeout
    while group_members(stage) and time.time() < deadline:
        time.sleep(0.05)
    if _signal_group(stage, signal.SIGKILL):
        deadline = time.time() + KILL_GRACE_S
        while group_members(stage) and time.time() < deadline:
            time.sleep(0.05)


def _driver_alive(st: dict) -> bool:
    d = st.get("driver")
    return bool(d) and proc_alive(d.get("pid"), d.get("create_time"))


_spawned: list[subprocess.Popen] = []  # drivers we started: reaped here so they never linger as zombies


def _reap() -> None:
    _spawned[:] = [p for p in _spawned if p.poll() is None]


def _spawn_driver(run_dir: Path, st: dict) -> int:
    """Start the detached driver and record it (caller holds the state lock)."""
    _reap()
    with open(run_dir / DRIVER_LOG, "ab") as log:
        p = subprocess.Popen([sys.executable, "-m", "nanochat.supervisor", "drive", str(run_dir)],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                             cwd=_stage_cwd(run_dir), env=_child_env())
    _spawned.append(p)
    st["driver"] = {"pid": p.pid, "create_time": _create_time(p.pid), "started": round(time.time(), 3),
                    "host": socket.gethostname()}
    st["stop_requested"] = False
    return p.pid


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra or {}))
    # stages are modules of this checkout (`stages.X`); make them importable from anywhere
    if (REPO_ROOT / "stages").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _stage_cwd(run_dir: Path) -> Path:
    return REPO_ROOT if (REPO_ROOT / "stages").is_dir() else run_dir


# ----------------------------------------------------------------------------------------- public API

@dataclass
class RunSummary:
    run_id: str
    path: Path
    status: str          # run_status(): pending, running, succeeded, failed, stopped, incomplete
    live: bool           # the driver or a stage process is alive
    profile: str
    created: float
    current_stage: str | None   # the running stage, else the first one not done


def run_config(run_dir) -> dict:
    """The run's resolved config.toml as plain dicts ({} if absent)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def init_run(run_dir, stages=None, profile: str | None = None) -> Path:
    """Write the initial state.json of a run whose config.toml (if any) is already in place.

    `stages` (entries as in `run.stages`) overrides the config's stage list; tests use it to point
    stages at `tests.fake_stage`.
    """
    run_dir = Path(run_dir).resolve()
    if (run_dir / STATE_FILE).exists():
        raise SupervisorError(f"{run_dir} already has a {STATE_FILE}")
    cfg = run_config(run_dir)
    specs = parse_stages(stages if stages is not None else cfg.get("run", {}).get("stages", []))
    st = {"version": STATE_VERSION, "run_id": run_dir.name, "created": round(time.time(), 3),
          "profile": profile or cfg.get("meta", {}).get("profile", "custom"), "driver": None,
          "stop_requested": False, "system": None, "stages": [_new_stage_state(s) for s in specs]}
    st["status"] = run_status(st)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / STATE_FILE, json.dumps(st, indent=1))
    return run_dir


def create_run(profile: str | None = None, overrides=(), *, stages=None, run_id: str | None = None,
               root=None) -> Path:
    """A new run directory `<root>/<YYYYmmdd-HHMMSS-profile>` with config.toml and state.json."""
    from nanochat.config import load_config
    cfg = load_config(profile, overrides)   # ConfigError: the caller shows its one line
    if stages is not None:
        parse_stages(stages)                # validate before creating anything
    root = Path(root) if root else runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    base = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.profile}"
    for i in range(1, 1000):
        run_dir = root / (base if i == 1 else f"{base}-{i}")
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            if run_id:
                raise SupervisorError(f"run {run_id!r} already exists in {root}") from None
    cfg.save(run_dir / CONFIG_FILE)
    return init_run(run_dir, stages=stages, profile=cfg.profile)


def start_run(run_dir, from_stage: str | None = None) -> int:
    """Spawn the detached driver; with `from_stage`, earlier unfinished stages are skipped and that
    stage and all later ones run afresh. Returns the driver's pid."""
    run_dir = Path(run_dir).resolve()
    with state_txn(run_dir) as st:
        _refuse_if_driven(st)
        if from_stage is not None:
            idx = st["stages"].index(_find_stage(st, from_stage))
            for i, s in enumerate(st["stages"]):
                if proc_alive(s["pid"], s["create_time"]) and s["status"] == "running":
                    raise SupervisorError(f"stage {s['name']} is still running; stop the run first")
                if i < idx and s["status"] not in ("succeeded", "skipped"):
                    s["status"] = "skipped"
                elif i >= idx:
                    s.update(status="pending", resume=False)
        return _spawn_driver(run_dir, st)


def resume_run(run_dir) -> int:
    """Failed and stopped stages go back to pending and restart from their latest checkpoint
    (`--resume`); a stage still running without a driver is reattached. Returns the driver's pid."""
    run_dir = Path(run_dir).resolve()
    with state_txn(run_dir) as st:
        _refuse_if_driven(st)
        for s in st["stages"]:
            if s["status"] in ("failed", "stopped"):
                s.update(status="pending", resume=True)
        return _spawn_driver(run_dir, st)


def retry_stage(run_dir, stage: str) -> int | None:
    """Run a finished stage again from scratch (its old logs move to <stage>/attempt-N/).
    Starts the driver when none is running; returns its pid (None if one was already running)."""
    run_dir = Path(run_dir).resolve()
    with state_txn(run_dir) as st:
        s = _find_stage(st, stage)
        if s["status"] == "running":
            raise SupervisorError(f"stage {stage} is running; stop the run before retrying it")
        s.update(status="pending", resume=False)
        return None if _driver_alive(st) else _spawn_driver(run_dir, st)


def skip_stage(run_dir, stage: str) -> None:
    """Mark a pending, failed or stopped stage as skipped (a running driver moves on past it;
    otherwise `resume_run` continues with the next stage)."""
    with state_txn(run_dir) as st:
        s = _find_stage(st, stage)
        if s["status"] in ("running", "succeeded"):
            raise SupervisorError(f"stage {stage} is {s['status']}; only pending, failed or stopped stages can be skipped")
        s["status"] = "skipped"


def stop_run(run_dir, timeout: float = 30.0) -> None:
    """Stop the run: no new stage starts, the running stage gets SIGTERM (it checkpoints) and SIGKILL
    after `timeout`; returns when no process of the run is left."""
    run_dir = Path(run_dir).resolve()
    with state_txn(run_dir) as st:
        st["stop_requested"] = True
        running = [dict(s) for s in st["stages"] if s["status"] == "running"]
        driver = dict(st["driver"]) if st.get("driver") else None
    for s in running:
        terminate_group(s, timeout)
    # the driver notices within POLL_S, records the outcome and exits; if it is wedged, end it
    if driver:
        deadline = time.time() + max(5.0, 10 * POLL_S)
        while proc_alive(driver["pid"], driver["create_time"]) and time.time() < deadline:
            time.sleep(0.05)
            _reap()
        if proc_alive(driver["pid"], driver["create_time"]):
            os.kill(driver["pid"], signal.SIGKILL)
            time.sleep(0.1)
            _reap()
    # a stage whose driver was gone (or was just killed) is finalized here
    with state_txn(run_dir) as st:
        if not _driver_alive(st):
            st["driver"] = None
            for s in st["stages"]:
                if s["status"] == "running" and not proc_alive(s["pid"], s["create_time"]):
                    _finish_stage(run_dir, s, None, stop_requested=True)


def is_live(run_dir) -> bool:
    """Whether anything of the run is alive: its driver or a running stage's process."""
    try:
        st = read_state(run_dir)
    except SupervisorError:
        return False
    return _driver_alive(st) or any(s["status"] == "running" and proc_alive(s["pid"], s["create_time"])
                                    for s in st["stages"])


def list_runs(root=None) -> list[RunSummary]:
    """All runs under `<base>/runs` (or `root`), oldest first."""
    root = Path(root) if root else runs_dir()
    out = []
    for d in sorted(p for p in root.iterdir() if (p / STATE_FILE).is_file()) if root.is_dir() else []:
        try:
            st = read_state(d)
        except (SupervisorError, json.JSONDecodeError, OSError):
            continue
        current = next((s["name"] for s in st["stages"] if s["status"] == "running"), None) or \
            next((s["name"] for s in st["stages"] if s["status"] not in ("succeeded", "skipped")), None)
        out.append(RunSummary(st["run_id"], d, run_status(st), is_live(d), st.get("profile", "?"),
                              st.get("created", 0.0), current))
    return out


def reattach_orphans(root=None) -> list[Path]:
    """Start a driver for every run whose driver died while a stage was marked running (the stage
    may still be training: the new driver waits for it; if it is gone, records how it ended)."""
    started = []
    for r in list_runs(root):
        st = read_state(r.path)
        if not _driver_alive(st) and any(s["status"] == "running" for s in st["stages"]):
            try:
                with state_txn(r.path) as st:
                    _refuse_if_driven(st)
                    _spawn_driver(r.path, st)
                started.append(r.path)
            except SupervisorError:
                pass  # another client got there first
    return started


def resolve_run(ref: str | None, root=None) -> Path:
    """A run by path, id, unique id prefix, or 'latest'/None for the newest."""
    root = Path(root) if root else runs_dir()
    if ref and (Path(ref) / STATE_FILE).is_file():
        return Path(ref).resolve()
    runs = sorted(p.name for p in root.iterdir() if (p / STATE_FILE).is_file()) if root.is_dir() else []
    if not runs:
        raise SupervisorError(f"no runs in {root}; start one with: nanochat run --profile demo")
    if ref in (None, "", "latest", "last"):
        return root / runs[-1]
    if ref in runs:
        return root / ref
    matches = [r for r in runs if r.startswith(ref)]
    if len(matches) == 1:
        return root / matches[0]
    what = "is ambiguous" if matches else "matches no run"
    raise SupervisorError(f"run {ref!r} {what}; runs: {', '.join((matches or runs)[-8:])}")


def _refuse_if_driven(st: dict) -> None:
    if _driver_alive(st):
        raise SupervisorError(f"run {st['run_id']} is already being driven by supervisor pid {st['driver']['pid']}; "
                              "use `nanochat stop` first or `nanochat status` to watch it")


# ----------------------------------------------------------------------------------------- the driver

def _log(msg: str) -> None:
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}", flush=True)


def _events_since(run_dir: Path, stage: dict) -> list[dict]:
    r = EventReader(run_dir / stage["name"] / EVENTS_FILE)
    r.offset = stage.get("events_offset") or 0
    return r.poll()


def _tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return []
    return [ln for ln in lines if ln.strip()][-n:]


def describe_exit(rc: int | None) -> str:
    if rc is None:
        return "exit status unknown (the process was not our child)"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name} (exit code {rc})"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _finish_stage(run_dir: Path, s: dict, rc: int | None, stop_requested: bool) -> None:
    """Decide how the stage ended from its exit code and the events of this attempt."""
    evs = _events_since(run_dir, s)
    end = next((e for e in reversed(evs) if e.get("kind") == "end"), None)
    err = next((e for e in reversed(evs) if e.get("kind") == "error"), None)
    if end is not None and end.get("status") == "stopped" and (stop_requested or rc in (None, 0, STOPPED_EXIT_CODE)):
        status = "stopped"  # (a stage torchrun stopped because another worker died is a failure)
    elif end is not None and err is None and rc in (0, None):
        status = "succeeded"
    elif rc == 0 and err is None:
        status = "stopped" if stop_requested else "succeeded"  # a module that writes no events
    elif stop_requested and err is None:
        status = "stopped"                                     # ended by our SIGTERM/SIGKILL
    else:
        status = "failed"
    s.update(status=status, exit_code=rc, ended=round(time.time(), 3))
    if status == "failed":
        if err is not None:
            s["error"] = f"{err.get('exc_type', 'Error')}: {err.get('message', '')}"
            s["traceback"] = str(err.get("traceback", "")).rstrip().splitlines()[-TRACEBACK_LINES:]
        else:
            s["error"] = describe_exit(rc) if rc is not None else \
                "the stage process ended without an end or error event"
            s["traceback"] = _tail_lines(run_dir / s["name"] / "stderr.log", TRACEBACK_LINES)
        if err is not None and rc not in (None, 1):
            s["error"] += f" ({describe_exit(rc)})"


def _archive_attempt(sdir: Path) -> None:
    """A fresh (not resumed) attempt starts with empty logs; the old ones move to attempt-N/."""
    files = [sdir / f for f in (EVENTS_FILE, "stdout.log", "stderr.log") if (sdir / f).exists()]
    if not files:
        return
    n = 1
    while (sdir / f"attempt-{n}").exists():
        n += 1
    (sdir / f"attempt-{n}").mkdir()
    for f in files:
        f.rename(sdir / f"attempt-{n}" / f.name)


def _launch(run_dir: Path, s: dict) -> subprocess.Popen:
    run_cfg = run_config(run_dir).get("run", {})
    cmd = stage_command(s, run_dir, run_cfg)
    sdir = run_dir / s["name"]
    sdir.mkdir(parents=True, exist_ok=True)
    if not s["resume"]:
        _archive_attempt(sdir)
    ev = sdir / EVENTS_FILE
    offset = ev.stat().st_size if ev.exists() else 0
    with open(sdir / "stdout.log", "ab") as out, open(sdir / "stderr.log", "ab") as err:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                             cwd=_stage_cwd(run_dir), env=_child_env({"NANOCHAT_STAGE": s["name"]}))
    s.update(status="running", pid=p.pid, create_time=_create_time(p.pid) or time.time(), cmd=cmd,
             started=round(time.time(), 3), ended=None, exit_code=None, error=None, traceback=[],
             attempts=s["attempts"] + 1, events_offset=offset, reattached=False)
    _log(f"stage {s['name']} started (pid {p.pid}): {' '.join(cmd)}")
    return p


def drive(run_dir) -> int:
    """The driver loop: one stage at a time, until all are done, one fails, or a stop is requested."""
    run_dir = Path(run_dir).resolve()
    read_state(run_dir)  # a clear error for a wrong directory
    lock_fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        holder = (run_dir / LOCK_FILE).read_text().strip() or "?"
        print(f"nanochat: error: run {run_dir.name} is already driven by supervisor pid {holder}; "
              "two supervisors never drive the same run", file=sys.stderr, flush=True)
        return 3
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())

    term = {"at": None}  # SIGTERM/SIGINT to the driver = stop the run (the stage checkpoints)
    signal.signal(signal.SIGTERM, lambda *_: term.update(at=term["at"] or time.time()))
    signal.signal(signal.SIGINT, lambda *_: term.update(at=term["at"] or time.time()))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    me = {"pid": os.getpid(), "create_time": _create_time(os.getpid()), "started": round(time.time(), 3),
          "host": socket.gethostname()}
    with state_txn(run_dir) as st:
        st["driver"] = me
        if not st.get("system"):
            from nanochat.report import system_info
            st["system"] = system_info()
    _log(f"driver {os.getpid()} attached to run {run_dir.name}")

    while True:
        popen = None
        with state_txn(run_dir) as st:
            nxt = next((s for s in st["stages"] if s["status"] not in ("succeeded", "skipped")), None)
            if nxt is None or nxt["status"] in ("failed", "stopped") or \
                    (nxt["status"] == "pending" and (st["stop_requested"] or term["at"])):
                st["driver"] = None
                _write_report(run_dir, {**st, "status": run_status(st)})  # before the driver counts as gone
                os.close(lock_fd)  # released before the state lock, so a client may start a new driver at once
                _log(f"driver exits: run {run_status(st)}")
                return 0
            if nxt["status"] == "pending":
                popen = _launch(run_dir, nxt)
            elif proc_alive(nxt["pid"], nxt["create_time"]):
                nxt["reattached"] = True
                _log(f"reattached to stage {nxt['name']} (pid {nxt['pid']})")
            stage = dict(nxt)
        rc = _wait(stage, popen, term)
        with state_txn(run_dir) as st:
            s = _find_stage(st, stage["name"])
            if term["at"]:
                st["stop_requested"] = True
            _finish_stage(run_dir, s, rc, st["stop_requested"])
            _log(f"stage {s['name']} {s['status']}: {describe_exit(rc)}" + (f" - {s['error']}" if s["error"] else ""))


def _write_report(run_dir: Path, st: dict):
    """The run's report card, as the seed's speedrun ends with it; a report bug must not fail the driver."""
    try:
        from nanochat.report import write_report
        write_report(run_dir, state=st)
    except Exception as e:
        _log(f"report.md not written: {type(e).__name__}: {e}")


def _wait(stage: dict, popen: subprocess.Popen | None, term: dict) -> int | None:
    """Until the stage's process ends: its exit code if it is our child, else None (reattached)."""
    signalled = None
    while True:
        if popen is not None:
            rc = popen.poll()
            if rc is not None:
                # the leader is gone; take any stragglers of its group (e.g. a worker it left) with it
                if group_members(stage):
                    terminate_group(stage, 5.0)
                return rc
        elif not proc_alive(stage["pid"], stage["create_time"]):
            return None
        if term["at"] and signalled is None:
            _signal_group(stage, signal.SIGTERM)
            signalled = time.time()
        elif signalled and time.time() - signalled > 30.0:
            _signal_group(stage, signal.SIGKILL)
            signalled = float("inf")
        time.sleep(POLL_S)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanochat.supervisor",
                                description="the run driver (normally spawned by `nanochat run`)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("drive", help="drive a run in the foreground of this process").add_argument("run_dir")
    args = p.parse_args(argv)
    try:
        return drive(args.run_dir)
    except SupervisorError as e:
        print(f"nanochat: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
