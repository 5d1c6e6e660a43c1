"""Fakes for the TUI tests and bench: a run-directory writer (config.toml, state.json in the supervisor's
format, events at a controlled rate, logs, checkpoint dirs), a fake pynvml module, a fake supervisor,
a fake chat backend and fixed host stats.

    python -m tests.fake_run RUN_DIR --rate 50 --seconds 10     # append step events at 50/s (bench)
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from nanochat.common import atomic_write
from nanochat.events import EVENTS_FILE

T0 = 1_735_725_600.0  # 2025-01-01 10:00 UTC: fixed timestamps keep snapshots deterministic
STAGES = ["data", "tok_train", "tok_eval", "base_train", "base_eval", "mid_train", "chat_eval_mid", "chat_sft"]


def loss_at(step: int) -> float:
    """A plausible, deterministic training curve."""
    return 2.2 + 8.0 * math.exp(-step / 120) + 0.05 * math.sin(step * 0.7)


class FakeRun:
    """A run directory written the way the supervisor and the stages write it."""

    def __init__(self, root: Path, run_id: str = "20250101-100000-demo", stages=STAGES, profile: str = "demo",
                 nproc: int = 8, gpu_hourly_usd: float = 2.5, t0: float = T0):
        self.dir = Path(root) / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0, self.t = t0, t0
        self.files = {}
        atomic_write(self.dir / "config.toml",
                     f'[meta]\nprofile = "{profile}"\n\n[run]\nnproc_per_node = {nproc}\nnnodes = 1\n'
                     f'gpu_hourly_usd = {gpu_hourly_usd}\nstages = {json.dumps(list(stages))}\n\n'
                     '[base_train]\ndepth = 4\n')
        self.state = {"version": 1, "run_id": run_id, "created": t0, "profile": profile, "driver": None,
                      "stop_requested": False, "system": None,
                      "stages": [{"name": s, "status": "pending", "exit_code": None, "error": None, "traceback": [],
                                  "started": None, "ended": None, "pid": None, "create_time": None} for s in stages]}
        self.save_state()

    # -- state.json
    def save_state(self):
        ss = [s["status"] for s in self.state["stages"]]
        self.state["status"] = next((w for w in ("running", "failed", "stopped") if w in ss), None) or \
            ("succeeded" if all(s in ("succeeded", "skipped") for s in ss) else
             "pending" if all(s == "pending" for s in ss) else "incomplete")
        atomic_write(self.dir / "state.json", json.dumps(self.state, indent=1))

    def set_stage(self, name: str, status: str, **fields):
        s = next(s for s in self.state["stages"] if s["name"] == name)
        s["status"] = status
        s.update(fields)
        self.save_state()

    # -- events
    def emit(self, stage: str, kind: str, ts: float | None = None, **fields):
        f = self.files.get(stage)
        if f is None:
            (self.dir / stage).mkdir(exist_ok=True)
            f = self.files[stage] = open(self.dir / stage / EVENTS_FILE, "a", encoding="utf-8", buffering=1)
        ev = {"v": 1, "ts": round(self.t if ts is None else ts, 3), "stage": stage, "kind": kind, **fields}
        f.write(json.dumps(ev) + "\n")
        f.flush()
        return ev

    def start_stage(self, stage: str):
        self.set_stage(stage, "running", started=self.t, pid=12345)
        self.emit(stage, "start", pid=12345, host="fakehost", world_size=8, device="cuda")

    def end_stage(self, stage: str, status: str = "ok", **summary):
        self.emit(stage, "end", status=status, elapsed_s=1.0, **summary)
        self.set_stage(stage, "succeeded" if status == "ok" else "stopped", ended=self.t, exit_code=0)

    def steps(self, stage: str, start: int, n: int, total: int, dt: float = 1.0, loss=loss_at, val_every: int = 0):
        for step in range(start, start + n):
            self.t += dt
            self.emit(stage, "step", step=step, total_steps=total, loss=loss(step), lrm=1.0, dt=dt,
                      tok_per_sec=524288 / dt, mfu=0.41, tokens=(step + 1) * 524288, eta_s=(total - step - 1) * dt)
            if val_every and step % val_every == 0:
                self.emit(stage, "eval", task="val", metric="bpb", value=round(loss(step) / 3.1, 4), step=step, phase="base")

    def fail_stage(self, stage: str, message: str = "CUDA out of memory", exit_code: int = 1):
        tb = ("Traceback (most recent call last):\n  File \"stages/base_train.py\", line 210, in main\n"
              "    loss.backward()\ntorch.OutOfMemoryError: " + message)
        self.emit(stage, "error", exc_type="OutOfMemoryError", message=message, traceback=tb)
        self.set_stage(stage, "failed", ended=self.t, exit_code=exit_code, error=f"OutOfMemoryError: {message}",
                       traceback=tb.splitlines())

    def log(self, stage: str, lines: list[str], stream: str = "stdout"):
        with open(self.dir / stage / f"{stream}.log", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def checkpoint_dir(self, phase: str, step: int):
        d = self.dir / "checkpoints" / phase / f"step_{step:06d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.pt").write_bytes(b"")
        (d / "meta.json").write_text(json.dumps({"step": step}))

    def close(self):
        for f in self.files.values():
            f.close()
        self.files.clear()


def demo_run(root: Path, run_id: str = "20250101-100000-demo", steps: int = 300, fail: bool = False) -> FakeRun:
    """A run mid-way through base_train: earlier stages done, evals and samples written."""
    r = FakeRun(root, run_id)
    for st in ("data", "tok_train", "tok_eval"):
        r.start_stage(st)
        r.t += 30
        if st == "tok_eval":
            for kind, ratio in (("train", 4.8), ("val", 4.7)):  # as stages/tok_eval.py: one per kind of text
                r.emit(st, "eval", task="compression", metric="bytes_per_token", value=ratio, step=None, text=kind)
        r.end_stage(st)
    r.start_stage("base_train")
    r.steps("base_train", 0, steps, total=1000, dt=1.0, val_every=50)
    r.emit("base_train", "sample", prompt="The capital of France is", text=" Paris, and it is", step=steps - 1)
    r.emit("base_train", "checkpoint", step=steps - 1, path=str(r.dir / "checkpoints/base/step_000299"))
    r.log("base_train", [f"step {i:05d}/01000 | loss {loss_at(i):.4f} | INFO ok" for i in range(steps)])
    r.log("base_train", ["WARNING: grad norm is large", "INFO: nothing to see"], stream="stderr")
    if fail:
        r.t += 5
        r.fail_stage("base_train")
        r.log("base_train", ["Traceback (most recent call last):", "torch.OutOfMemoryError: CUDA out of memory"],
              stream="stderr")
    return r


# ----------------------------------------------------------------------------- fake pynvml

class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeNvml:
    """Enough of pynvml for tui.services.NvmlProvider: settable per-GPU values."""

    def __init__(self, n: int = 2, util: float = 97.0, temp: float = 71.0, throttle: int = 0, name: str = "NVIDIA H100 80GB HBM3",
                 fail_init: bool = False):
        self.n, self.util, self.temp, self.throttle, self.name, self.fail_init = n, util, temp, throttle, name, fail_init
        self.calls = 0

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.name

    def nvmlDeviceGetUtilizationRates(self, h):
        self.calls += 1
        return _Obj(gpu=self.util, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h):
        return _Obj(used=61 * 2**30, total=80 * 2**30, free=19 * 2**30)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self.temp + h

    def nvmlDeviceGetPowerUsage(self, h):
        return 612_000

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980 if kind == 1 else 2619

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self.throttle


# ----------------------------------------------------------------------------- fake supervisor / chat / host

def fake_supervisor(base_dir: Path):
    """The TUI's Supervisor adapter with the process-launching operations recorded instead of run."""
    from tui.services import Supervisor

    class FakeSupervisor(Supervisor):
        def __init__(self):
            super().__init__(base_dir)
            self.calls = []

        def is_live(self, run_dir):
            return self.read_state(run_dir)["status"] == "running"

        def reattach(self, run_dir):
            return False  # fake runs have no processes to reattach to

        def _set_all(self, run_dir, frm, to):
            st = json.loads((Path(run_dir) / "state.json").read_text())
            for s in st["stages"]:
                if s["status"] in frm:
                    s["status"] = to
            ss = [s["status"] for s in st["stages"]]
            st["status"] = next((w for w in ("running", "failed", "stopped") if w in ss), "incomplete")
            atomic_write(Path(run_dir) / "state.json", json.dumps(st))

        def create_run(self, profile, overrides):
            self.calls.append(("create", profile, list(overrides)))
            return FakeRun(self.runs_root, f"20250102-090000-{profile}").dir

        def start_run(self, run_dir, from_stage=None):
            self.calls.append(("start", Path(run_dir).name))
            return 4242

        def stop_run(self, run_dir):
            self.calls.append(("stop", Path(run_dir).name))
            self._set_all(run_dir, ("running",), "stopped")

        def resume_run(self, run_dir):
            self.calls.append(("resume", Path(run_dir).name))
            self._set_all(run_dir, ("stopped", "failed"), "running")

        def retry_stage(self, run_dir, stage):
            self.calls.append(("retry", Path(run_dir).name, stage))

        def skip_stage(self, run_dir, stage):
            self.calls.append(("skip", Path(run_dir).name, stage))

    return FakeSupervisor()


class FakeChatBackend:
    """Streams a canned reply token by token, with one calculator tool call; `delay` per token."""

    def __init__(self, delay: float = 0.0, n_tokens: int = 12):
        self.delay, self.n_tokens = delay, n_tokens
        self.loaded = None
        self.seen = []

    def load(self, run_dir, phase, step):
        self.loaded = (Path(run_dir).name, phase, step)

    def stream(self, conversation, temperature, top_k, max_tokens=512):
        self.seen.append((json.loads(json.dumps(conversation)), temperature, top_k))
        last = conversation["messages"][-1]["content"]
        words = ["**Sure**", ":", " you", " said", f" *{last}*", "."] + [f" w{i}" for i in range(self.n_tokens)]
        for w in words[:3]:
            time.sleep(self.delay)
            yield {"type": "text", "text": w}
        yield {"type": "tool_call", "code": "print(6*7)"}
        yield {"type": "tool_result", "output": "42", "status": "ok"}
        for w in words[3:]:
            time.sleep(self.delay)
            yield {"type": "text", "text": w}
        yield {"type": "done", "reason": "stop", "tokens": len(words)}


def fixed_host():
    from tui.services import HostSample
    return HostSample(cpu=23.0, ram_used=48 * 2**30, ram_total=256 * 2**30, disk_used=1.2 * 2**40, disk_total=3.5 * 2**40)


# ----------------------------------------------------------------------------- CLI: events at a rate

def append_at_rate(run_dir: Path, stage: str, rate: float, seconds: float, start_step: int = 0) -> int:
    """Append step events to run_dir/stage at `rate` per second (real timestamps). Returns how many."""
    run_dir = Path(run_dir)
    (run_dir / stage).mkdir(parents=True, exist_ok=True)
    n_total = int(rate * seconds)
    t_start = time.perf_counter()
    with open(run_dir / stage / EVENTS_FILE, "a", encoding="utf-8", buffering=1) as f:
        for i in range(n_total):
            target = t_start + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            step = start_step + i
            f.write(json.dumps({"v": 1, "ts": round(time.time(), 3), "stage": stage, "kind": "step", "step": step,
                                "total_steps": start_step + n_total, "loss": loss_at(step), "dt": 1 / rate,
                                "tok_per_sec": 1e5, "mfu": 0.4, "tokens": step * 1000, "eta_s": 1.0}) + "\n")
    return n_total


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.fake_run")
    ap.add_argument("run_dir")
    ap.add_argument("--stage", default="base_train")
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--start-step", type=int, default=0)
    a = ap.parse_args(argv)
    print(append_at_rate(Path(a.run_dir), a.stage, a.rate, a.seconds, a.start_step), flush=True)


if __name__ == "__main__":
    main()
