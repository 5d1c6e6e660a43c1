"""Alert rules: pure functions over a run's state, events and GPU samples. The app shows new alerts as
notifications and keeps all of them in a list; each alert has a key so it fires once."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .runmodel import RunModel, fnum


@dataclass
class Alert:
    key: str          # dedupe key: an alert with the same key is raised once
    severity: str     # "error" | "warning"
    title: str
    message: str
    stage: str | None = None
    ts: float = 0.0
    detail: str = ""  # e.g. the traceback tail


def tail_lines(text: str, n: int = 12) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


class AlertBook:
    def __init__(self, stall_s: float = 300.0, gpu_idle_s: float = 60.0):
        self.stall_s, self.gpu_idle_s = stall_s, gpu_idle_s
        self.alerts: list[Alert] = []
        self._keys: set[str] = set()
        self._gpu_busy_ts: float | None = None

    def _raise(self, alert: Alert, out: list[Alert]):
        if alert.key not in self._keys:
            self._keys.add(alert.key)
            self.alerts.append(alert)
            out.append(alert)

    def on_anomalies(self, anomalies: list[dict]) -> list[Alert]:
        """Step events that RunModel.ingest flagged: non-finite or spiking loss."""
        out = []
        for ev in anomalies:
            stage, step, loss = ev.get("stage"), ev.get("step"), fnum(ev.get("loss"))
            if not math.isfinite(loss):
                self._raise(Alert(f"nan:{stage}", "error", f"{stage}: loss is {loss}",
                                  f"step {step}: the loss is not finite; training is diverging", stage, ev.get("ts", 0)), out)
            else:  # one spike alert per 100 steps per stage
                self._raise(Alert(f"spike:{stage}:{int(step or 0) // 100}", "warning", f"{stage}: loss spike",
                                  f"step {step}: loss jumped to {loss:.4g}", stage, ev.get("ts", 0)), out)
        return out

    def check(self, state: dict, model: RunModel | None, gpus: list | None, now: float) -> list[Alert]:
        """Rules over the current state: failed stages, stalls, idle GPUs, throttling."""
        out = []
        running = []
        for s in state.get("stages", []):
            info = model.stages.get(s.name) if model else None
            if s.status == "failed" or (info and info.error and s.status != "running"):
                tb = s.traceback or (info.error.get("traceback", "") if info and info.error else "")
                msg = s.error or (f"{info.error.get('exc_type')}: {info.error.get('message')}" if info and info.error
                                  else f"exit code {s.exit_code}")
                self._raise(Alert(f"failed:{s.name}:{info.started if info else ''}", "error", f"stage {s.name} failed",
                                  str(msg), s.name, now, tail_lines(tb)), out)
            if s.status == "running":
                running.append(s.name)
                last = (info.last_ts if info else None) or s.started
                if last is not None and now - last > self.stall_s:
                    self._raise(Alert(f"stall:{s.name}:{int(last)}", "warning", f"stage {s.name} stalled",
                                      f"no event for {int(now - last)} s", s.name, now), out)
        if gpus:
            busy = any(g.util >= 5 for g in gpus)
            if not running or busy or self._gpu_busy_ts is None:
                self._gpu_busy_ts = now
            elif now - self._gpu_busy_ts > self.gpu_idle_s:
                self._raise(Alert(f"idle:{running[0]}:{int(self._gpu_busy_ts)}", "warning", "GPUs idle",
                                  f"{running[0]} is running but every GPU is under 5% for {int(now - self._gpu_busy_ts)} s",
                                  running[0], now), out)
            for g in gpus:
                for reason in g.throttle:
                    self._raise(Alert(f"throttle:{g.index}:{reason}", "warning", f"GPU {g.index} throttled",
                                      f"{reason} (temp {g.temp:.0f} C, power {g.power:.0f}/{g.power_limit:.0f} W)",
                                      None, now), out)
        return out
