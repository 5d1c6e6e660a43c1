"""Structured events: the one contract between stages and everything that watches them.

Every stage appends JSON Lines to `<run_dir>/<stage>/events.jsonl`, one object per line, flushed per
line, written by global rank 0 only (pass `rank=` for per-rank data). The supervisor, the TUI and the
report read only these files. Schema: docs/events.md. Bump SCHEMA_VERSION on incompatible changes.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import traceback as tb
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1
KINDS = ("start", "config", "step", "eval", "sample", "checkpoint", "end", "error", "log")
EVENTS_FILE = "events.jsonl"


def _jsonable(x: Any) -> Any:
    """JSON has no NaN/inf: encode them as strings so a NaN loss survives the trip (the TUI alerts on it)."""
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return _jsonable(x.item())
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def as_float(x: Any) -> float:
    """Inverse of the NaN/inf encoding, for readers."""
    if isinstance(x, str):
        return float(x)  # "nan", "inf", "-inf"
    return float(x)


class EventWriter:
    """Appends events for one stage. Disabled (a no-op) on non-zero ranks unless `per_rank=True`.

    >>> ev = EventWriter(run_dir, "base_train", rank=dist.rank)
    >>> ev.step(step=10, total_steps=100, loss=3.2, lrm=1.0, dt=0.5, tok_per_sec=1e5, mfu=0.4,
    ...         tokens=1_000_000, eta_s=45.0)
    """

    def __init__(self, run_dir: str | os.PathLike | None, stage: str, rank: int = 0, per_rank: bool = False):
        self.stage = stage
        self.rank = rank
        self.enabled = run_dir is not None and (rank == 0 or per_rank)
        self.path = None
        self._f = None
        if self.enabled:
            d = Path(run_dir) / stage
            d.mkdir(parents=True, exist_ok=True)
            name = EVENTS_FILE if not per_rank or rank == 0 else f"events.rank{rank}.jsonl"
            self.path = d / name
            # line-buffered append: each event reaches the OS as one write, so readers never see half
            # a line except at the very end while it is being written
            self._f = open(self.path, "a", encoding="utf-8", buffering=1)
            self._t0 = time.time()

    def emit(self, kind: str, **fields: Any) -> dict | None:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}; allowed: {', '.join(KINDS)}")
        if not self.enabled:
            return None
        ev = {"v": SCHEMA_VERSION, "ts": round(time.time(), 3), "stage": self.stage, "kind": kind}
        if self.rank:
            ev["rank"] = self.rank
        ev.update(_jsonable(fields))
        self._f.write(json.dumps(ev, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._f.flush()
        return ev

    # typed helpers: the field names here are the schema (docs/events.md)
    def start(self, **fields):
        return self.emit("start", pid=os.getpid(), host=socket.gethostname(), **fields)

    def config(self, config: dict, **fields):
        return self.emit("config", config=config, **fields)

    def step(self, *, step: int, total_steps: int, loss: float, **fields):
        return self.emit("step", step=step, total_steps=total_steps, loss=loss, **fields)

    def eval(self, *, task: str, metric: str, value: float, phase: str | None, step: int | None = None, **fields):
        """`phase` (required): the checkpoint phase evaluated (base, mid, sft, rl), None for no model (tokenizer)."""
        return self.emit("eval", task=task, metric=metric, value=value, phase=phase, step=step, **fields)

    def sample(self, *, prompt: str, text: str, step: int | None = None, **fields):
        return self.emit("sample", prompt=prompt, text=text, step=step, **fields)

    def checkpoint(self, *, step: int, path: str, **fields):
        return self.emit("checkpoint", step=step, path=str(path), **fields)

    def end(self, *, status: str = "ok", **fields):
        return self.emit("end", status=status, elapsed_s=round(time.time() - self._t0, 3) if self.enabled else None, **fields)

    def error(self, exc: BaseException, **fields):
        return self.emit("error", exc_type=type(exc).__name__, message=str(exc),
                         traceback="".join(tb.format_exception(type(exc), exc, exc.__traceback__))[-8000:], **fields)

    def close(self):
        if self._f:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, et, e, etb):
        if e is not None and not isinstance(e, (SystemExit, KeyboardInterrupt)):
            self.error(e)
        self.close()
        return False


class EventReader:
    """Incrementally reads one events.jsonl: call `poll()` repeatedly to get only new events.

    Tolerates a torn last line (an event being written, or a crash mid-write): it is not consumed
    until its newline arrives. Malformed complete lines are skipped and counted in `malformed`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0
        self.malformed = 0
        self._ino = None

    def poll(self, max_bytes: int | None = None) -> list[dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if self._ino is not None and (st.st_ino != self._ino or st.st_size < self.offset):
            self.offset = 0  # file replaced or truncated: start over
        self._ino = st.st_ino
        if st.st_size <= self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(max_bytes) if max_bytes else f.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        out = []
        for line in chunk[: end + 1].splitlines():
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.malformed += 1
                continue
            if not isinstance(ev, dict) or "kind" not in ev:
                self.malformed += 1
                continue
            out.append(ev)
        return out


def read_events(path: str | os.PathLike) -> tuple[list[dict], int]:
    """All complete events of one file, and the count of malformed lines skipped."""
    r = EventReader(path)
    evs = r.poll()
    return evs, r.malformed


def stage_event_files(run_dir: str | os.PathLike) -> Iterator[tuple[str, Path]]:
    """(stage, path) for every stage of a run that has written events."""
    for p in sorted(Path(run_dir).glob(f"*/{EVENTS_FILE}")):
        yield p.parent.name, p
