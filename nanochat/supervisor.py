"""The run supervisor: runs a profile's stages as detached processes and keeps `state.json` honest.

A run is a directory (docs/architecture.md): `config.toml`, `state.json`, and per stage its
events, stdout and stderr. One *driver* process per run (`python -m nanochat.supervisor drive DIR`,
spawned in its own session, stdin closed, output to `supervisor.log`) launches the stages in order,
each in its own session too, so closing the TUI, a hang-up or an ssh drop never stops training, and
killing the driver never kills a stage. Clients (CLI, TUI) read `state.json` and the events, and act
through the functions below; they never need the driver to be alive to stop a stage.

Stage states: pending -> running -> succeeded | failed | stopped; pending | failed | stopped -> skipped.
A process is ours only if its host, the kernel's boot id, its pid and its start time (within
START_TOLERANCE_S) match what we recorded, so a pid reused by an unrelated process after a reboot or a
crash is never signalled or waited for.

A stage is a tree of processes, not one: torchrun starts every worker in a session of its own, and a
worker whose torchrun died is reparented. So each launch gets a token in its environment
(NANOCHAT_STAGE_TOKEN, inherited by every descendant), the driver is a child subreaper (orphans of the
stage become its children) and records the tree's pids with their start times in state.json. The
stage's processes are the union of the recorded ones, those carrying the token, and their descendants;
stops signal all of them. The launch is recorded (status running, token, no pid yet) before the
process is started, so a driver killed at any moment leaves a state from which the next driver either
adopts the stage's processes (found by token) or, if none ever ran, launches it once.

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
import uuid
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
KILL_GRACE_S = 5.0      # after SIGKILL, how long we wait for the kernel to reap the tree
# torchrun, sent SIGTERM, forwards it to its workers and SIGKILLs them after 30 s; our SIGKILL comes
# only after that window, so a stage that checkpoints in time is never cut off mid-write
TORCHRUN_SHUTDOWN_S = 30.0
STOP_TIMEOUT_S = TORCHRUN_SHUTDOWN_S + 10.0
START_TOLERANCE_S = 1.0  # start times differ by rounding and by small clock steps; pids are not reused that fast
TRACK_S = 1.0            # how often the driver records its stage's process tree
TOKEN_ENV = "NANOCHAT_STAGE_TOKEN"
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
        st = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SupervisorError(f"{run_dir} is not a run directory (no {STATE_FILE})") from None
    except (OSError, ValueError) as e:  # written atomically, so only a foreign hand gets here
        raise SupervisorError(f"{path} is unreadable ({type(e).__name__}: {e}); restore it or delete the run") from None
    if not isinstance(st, dict) or not isinstance(st.get("stages"), list) or \
            not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in st["stages"]):
        raise SupervisorError(f"{path} is not a nanochat run state (no list of named stages)")
    return st


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

def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


BOOT_ID, HOST = _boot_id(), socket.gethostname()


def proc_alive(pid, create_time, boot_id: str | None = None, host: str | None = None) -> bool:
    """Is `pid` still the process we recorded (same host, same boot, same start time), and not a zombie?
    A process recorded on another host or before a reboot is never alive here (we cannot signal it)."""
    if not pid or create_time is None or (boot_id and boot_id != BOOT_ID) or (host and host != HOST):
        return False
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < START_TOLERANCE_S and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _alive(rec: dict | None) -> bool:
    """proc_alive of a record with pid, create_time and (when recorded) boot_id and host."""
    return bool(rec) and proc_alive(rec.get("pid"), rec.get("create_time"), rec.get("boot_id"), rec.get("host"))


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _token_pids(token: str) -> list[int]:
    """Processes whose environment carries this launch token (every descendant inherits it)."""
    needle, out = f"{TOKEN_ENV}={token}\0".encode(), []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read():
                        out.append(int(name))
            except OSError:
                pass  # gone, or not ours to read
    return out


def stage_procs(stage: dict, adopted: bool = False) -> list[psutil.Process]:
    """Every live process of a stage: its leader, the recorded tree, the processes carrying its launch
    token, and all their descendants (with `adopted`, also the orphans the calling driver adopted as
    subreaper). Never this process, never a zombie, never a process from another host or boot."""
    if stage.get("host") not in (None, HOST) or stage.get("boot_id") not in (None, "", BOOT_ID):
        return []
    roots = [stage["pid"]] if _alive(stage) else []
    roots += [pid for pid, ct in stage.get("procs") or [] if proc_alive(pid, ct)]
    if stage.get("token"):
        roots += _token_pids(stage["token"])
    found: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            p = psutil.Process(pid)
            found.setdefault(pid, p)
            for c in p.children(recursive=True):
                found.setdefault(c.pid, c)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    if adopted:
        for c in psutil.Process().children(recursive=True):
            found.setdefault(c.pid, c)
    out = []
    for pid, p in sorted(found.items()):
        try:
            if pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def stage_alive(stage: dict) -> bool:
    return bool(stage_procs(stage))


def signal_stage(stage: dict, sig: int, skip=()) -> list[int]:
    """Send `sig` to every process of the stage (but those in `skip`); the pids signalled."""
    sent = []
    for p in stage_procs(stage, adopted=_driving):
        if p.pid in skip:
            continue
        try:
            p.send_signal(sig)  # psutil checks the start time first: a reused pid is never signalled
            sent.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sent


def terminate_stage(stage: dict, timeout: float) -> None:
    """SIGTERM the stage's whole tree (it checkpoints; torchrun forwards it to its workers), SIGTERM any
    process that appears meanwhile, SIGKILL whatever is left after `timeout`."""
    termed = set(signal_stage(stage, signal.SIGTERM))
    if not termed:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        termed.update(signal_stage(stage, signal.SIGTERM, skip=termed))
        if not stage_procs(stage, adopted=_driving):
            return
        time.sleep(0.1)
    if signal_stage(stage, signal.SIGKILL):
        deadline = time.time() + KILL_GRACE_S
        while stage_procs(stage, adopted=_driving) and time.time() < deadline:
            _reap_adopted(None)
            time.sleep(0.05)


_driving = False  # True in the driver process: it is the subreaper of its stage's orphans


def _become_subreaper() -> None:
    """Orphans of our stage (a worker whose torchrun died) become our children instead of init's."""
    global _driving
    _driving = True
    try:
        import ctypes
        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the launch token still finds them


def _reap_adopted(popen: subprocess.Popen | None) -> None:
    """Collect exited adopted orphans (never the stage leader: Popen needs its exit status)."""
    try:
        kids = psutil.Process().children()
    except psutil.Error:
        return
    for c in kids:
        if popen is None or c.pid != popen.pid:
            try:
                os.waitpid(c.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _driver_alive(st: dict) -> bool:
    return _alive(st.get("driver"))


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
    st["driver"] = {"pid": p.pid, "create_time": _create_time(p.pid) or time.time(), "boot_id": BOOT_ID,
                    "host": HOST, "started": round(time.time(), 3)}
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
                if s["status"] == "running" and stage_alive(s):
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


def stop_run(run_dir, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop the run: no new stage starts, every process of the running stage gets SIGTERM (it
    checkpoints) and SIGKILL after `timeout`; returns when no process of the run is left."""
    run_dir = Path(run_dir).resolve()
    with state_txn(run_dir) as st:
        st["stop_requested"] = True
        running = [dict(s) for s in st["stages"] if s["status"] == "running"]
        driver = dict(st["driver"]) if st.get("driver") else None
    for s in running:
        terminate_stage(s, timeout)
    # the driver notices within POLL_S, records the outcome and exits; if it is wedged, end it
    if driver:
        deadline = time.time() + max(5.0, 10 * POLL_S)
        while _alive(driver) and time.time() < deadline:
            time.sleep(0.05)
            _reap()
        if _alive(driver):
            os.kill(driver["pid"], signal.SIGKILL)
            time.sleep(0.1)
            _reap()
    # a stage whose driver was gone (or was just killed) is finalized here; one it was launching as we
    # asked for the stop (recorded after we looked) is stopped now
    with state_txn(run_dir) as st:
        if not _driver_alive(st):
            st["driver"] = None
            for s in st["stages"]:
                if s["status"] == "running":
                    terminate_stage(s, min(timeout, 5.0))
                    _finish_stage(run_dir, s, None, stop_requested=True)


def is_live(run_dir) -> bool:
    """Whether anything of the run is alive: its driver or a process of a running stage."""
    try:
        st = read_state(run_dir)
    except SupervisorError:
        return False
    return _driver_alive(st) or any(s["status"] == "running" and stage_alive(s) for s in st["stages"])


def list_runs(root=None) -> list[RunSummary]:
    """All runs under `<base>/runs` (or `root`), oldest first."""
    root = Path(root) if root else runs_dir()
    out = []
    for d in sorted(p for p in root.iterdir() if (p / STATE_FILE).is_file()) if root.is_dir() else []:
        try:
            st = read_state(d)
        except SupervisorError:
            continue
        current = next((s["name"] for s in st["stages"] if s["status"] == "running"), None) or \
            next((s["name"] for s in st["stages"] if s["status"] not in ("succeeded", "skipped")), None)
        out.append(RunSummary(st["run_id"], d, run_status(st), is_live(d), st.get("profile", "?"),
                              st.get("created", 0.0), current))
    return out


def reattach(run_dir) -> bool:
    """Start a driver for a run whose driver died while a stage was marked running (the stage may still
    be training: the new driver waits for it; if it is gone, records how it ended). The CLI's `status`
    and the TUI call this, so an orphaned run is picked up by whichever looks at it first.
    Returns whether a driver was started."""
    try:
        st = read_state(run_dir)
        if _driver_alive(st) or not any(s["status"] == "running" for s in st["stages"]):
            return False
        with state_txn(run_dir) as st:
            _refuse_if_driven(st)
            _spawn_driver(Path(run_dir).resolve(), st)
        return True
    except SupervisorError:
        return False  # another client got there first, or the run is gone


def reattach_orphans(root=None) -> list[Path]:
    """`reattach` for every run under `root`; the runs that got a new driver."""
    return [r.path for r in list_runs(root) if reattach(r.path)]


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


def _record_launch(run_dir: Path, s: dict) -> None:
    """The launch intent, written before the process exists (caller holds the state lock): status
    running, a fresh token, no pid. A driver killed before or after the start leaves a stage the next
    driver adopts (its processes carry the token) or, if nothing ran, launches once."""
    cmd = stage_command(s, run_dir, run_config(run_dir).get("run", {}))
    sdir = run_dir / s["name"]
    sdir.mkdir(parents=True, exist_ok=True)
    if not s["resume"]:
        _archive_attempt(sdir)
    ev = sdir / EVENTS_FILE
    s.update(status="running", pid=None, create_time=None, boot_id=BOOT_ID, host=HOST, token=uuid.uuid4().hex,
             procs=[], cmd=cmd, started=round(time.time(), 3), ended=None, exit_code=None, error=None,
             traceback=[], attempts=s["attempts"] + 1, events_offset=ev.stat().st_size if ev.exists() else 0,
             reattached=False)


def _start(run_dir: Path, s: dict) -> subprocess.Popen:
    sdir = run_dir / s["name"]
    env = _child_env({"NANOCHAT_STAGE": s["name"], "NANOCHAT_RUN_DIR": str(run_dir), TOKEN_ENV: s["token"]})
    with open(sdir / "stdout.log", "ab") as out, open(sdir / "stderr.log", "ab") as err:
        p = subprocess.Popen(s["cmd"], stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                             cwd=_stage_cwd(run_dir), env=env)
    _log(f"stage {s['name']} started (pid {p.pid}): {' '.join(s['cmd'])}")
    return p


def _adopt(run_dir: Path, s: dict) -> str:
    """A stage marked running when this driver starts: 'wait' for its live processes (adopting the
    leader if its pid was never recorded), 'launch' it if it never started, else 'finish' it."""
    procs = stage_procs(s)
    if procs:
        if not _alive(s):  # its pid was never recorded, or the leader is gone and workers linger
            pids = {p.pid for p in procs}
            leader = next((p for p in procs if p.ppid() not in pids), procs[0])
            s.update(pid=leader.pid, create_time=leader.create_time())
        s["reattached"] = True
        _log(f"reattached to stage {s['name']} (pid {s['pid']}, {len(procs)} processes)")
        return "wait"
    if s.get("pid") is None and not _events_since(run_dir, s):
        s["status"] = "pending"  # recorded, never started (the driver died in between): start it now
        s["attempts"] -= 1
        return "launch"
    return "finish"


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
    _become_subreaper()

    term = {"at": None}  # SIGTERM/SIGINT to the driver = stop the run (the stage checkpoints)
    signal.signal(signal.SIGTERM, lambda *_: term.update(at=term["at"] or time.time()))
    signal.signal(signal.SIGINT, lambda *_: term.update(at=term["at"] or time.time()))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    me = {"pid": os.getpid(), "create_time": _create_time(os.getpid()), "boot_id": BOOT_ID, "host": HOST,
          "started": round(time.time(), 3)}
    with state_txn(run_dir) as st:
        st["driver"] = me
        if not st.get("system"):
            from nanochat.system import system_info
            st["system"] = system_info()
    _log(f"driver {os.getpid()} attached to run {run_dir.name}")

    while True:
        popen, rc = None, None
        with state_txn(run_dir) as st:
            nxt = next((s for s in st["stages"] if s["status"] not in ("succeeded", "skipped")), None)
            if nxt is None or nxt["status"] in ("failed", "stopped") or \
                    (nxt["status"] == "pending" and (st["stop_requested"] or term["at"])):
                st["driver"] = None
                _write_report(run_dir, {**st, "status": run_status(st)})  # before the driver counts as gone
                os.close(lock_fd)  # released before the state lock, so a client may start a new driver at once
                _log(f"driver exits: run {run_status(st)}")
                return 0
            todo = "launch" if nxt["status"] == "pending" else _adopt(run_dir, nxt)
            if todo == "launch" and not (st["stop_requested"] or term["at"]):
                _record_launch(run_dir, nxt)
            stage = dict(nxt)
        if todo == "launch" and stage["status"] == "running":
            popen = _start(run_dir, stage)
            with state_txn(run_dir) as st:
                s = _find_stage(st, stage["name"])
                s.update(pid=popen.pid, create_time=_create_time(popen.pid) or time.time())
                stage = dict(s)
                if st["stop_requested"]:
                    term["at"] = term["at"] or time.time()  # a stop asked while we were starting it
        if todo != "finish":
            if stage["status"] != "running":
                continue
            rc = _wait(run_dir, stage, popen, term)
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


def _wait(run_dir: Path, stage: dict, popen: subprocess.Popen | None, term: dict) -> int | None:
    """Until the stage's leader ends: its exit code if it is our child, else None (reattached). Then
    its stragglers (a worker its torchrun left) are ended too. Meanwhile the tree is recorded."""
    signalled, tracked, recorded = None, 0.0, set(p for p, _ in stage.get("procs") or [])
    while True:
        rc = popen.poll() if popen is not None else None
        if (popen is not None and rc is not None) or (popen is None and not _alive(stage)):
            break
        if term["at"] and signalled is None:
            signal_stage(stage, signal.SIGTERM)
            signalled = time.time()
        elif signalled and time.time() - signalled > STOP_TIMEOUT_S:
            signal_stage(stage, signal.SIGKILL)
            signalled = float("inf")
        if time.time() - tracked > TRACK_S:
            tracked = time.time()
            _reap_adopted(popen)
            procs = [(p.pid, p.create_time()) for p in stage_procs(stage, adopted=True)]
            if {p for p, _ in procs} - recorded:
                recorded |= {p for p, _ in procs}
                with state_txn(run_dir) as st:
                    _find_stage(st, stage["name"])["procs"] = stage["procs"] = procs
        time.sleep(POLL_S)
    if stage_procs(stage, adopted=True):
        terminate_stage(stage, 5.0)
    _reap_adopted(popen)
    return rc


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
