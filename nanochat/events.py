"""Structured events: the one contract between stages and everything that watches them.

Every stage appends JSON Lines to `<run_dir>/<stage>/events.jsonl`, one object per line, flushed per
line, written by global rank 0 only. The supervisor, the TUI and the report read only these files,
through `EventReader`, which hands out only objects that pass `check_event` (the field types of
docs/events.md): whatever else is in a file (a torn line, a wrong type, invalid UTF-8, a 16 MiB line)
is skipped and counted, never raised. Bump SCHEMA_VERSION on incompatible changes.
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
MAX_LINE_BYTES = 4 << 20  # no event is this big (tracebacks are cut at 8 kB): longer lines are skipped unparsed

# Field types readers can rely on (docs/events.md). A field may be absent or null unless REQUIRED names it.
INT, NUM, STR, TABLE = "int", "number", "str", "table"
COMMON_FIELDS = {"v": INT, "stage": STR}  # and ts: a finite number
FIELDS = {
    "start": {"pid": INT, "world_size": INT},
    "config": {"config": TABLE},
    "step": {"step": INT, "total_steps": INT, "loss": NUM, "smooth_loss": NUM, "lrm": NUM, "dt": NUM,
             "tok_per_sec": NUM, "flops_per_sec": NUM, "mfu": NUM, "tokens": NUM, "eta_s": NUM, "val_bpb": NUM,
             "reward": NUM},
    "eval": {"task": STR, "metric": STR, "value": NUM, "step": INT, "phase": STR, "text": STR},
    "sample": {"prompt": STR, "text": STR, "step": INT},
    "checkpoint": {"step": INT, "path": STR},
    "end": {"status": STR, "elapsed_s": NUM},
    "error": {"exc_type": STR, "message": STR, "traceback": STR},
    "log": {"message": STR},
}
REQUIRED = {"step": ("step",), "eval": ("task", "metric", "value"), "checkpoint": ("step",)}
NONFINITE = ("nan", "inf", "-inf")


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
    """Inverse of the NaN/inf encoding, for readers (a checked NUM field is a number or one of NONFINITE)."""
    return float(x)


_TYPES = {INT: (int,), NUM: (int, float), STR: (str,), TABLE: (dict,)}  # exact types: a bool is no number
_SCHEMA = {kind: {k: _TYPES[t] for k, t in {**COMMON_FIELDS, **f}.items()} for kind, f in FIELDS.items()}
_COMMON = {k: _TYPES[t] for k, t in COMMON_FIELDS.items()}


def check_event(ev: Any) -> str | None:
    """None when `ev` is an event readers can use as is, else what is wrong with it (one line).
    Unknown kinds and extra fields pass (newer writers); known fields must have their type."""
    if type(ev) is not dict or type(ev.get("kind")) is not str:
        return "not an object with a string 'kind'"
    kind = ev["kind"]
    ts = ev.get("ts")
    if ts is not None and not (type(ts) in (int, float) and math.isfinite(ts)):
        return f"ts = {str(ts)[:40]!r} is not a finite time"
    for k in REQUIRED.get(kind, ()):
        if ev.get(k) is None:
            return f"{kind} event without {k!r}"
    schema = _SCHEMA.get(kind, _COMMON)
    for k, x in ev.items():
        types = schema.get(k)
        if types is not None and type(x) not in types and x is not None:
            if types is _TYPES[NUM] and type(x) is str and x in NONFINITE:
                continue
            return f"{k} = {str(x)[:40]!r} is not of type {_field_type(kind, k)}"
    return None


def _field_type(kind: str, key: str) -> str:
    return {**COMMON_FIELDS, **FIELDS.get(kind, {})}[key]


class EventWriter:
    """Appends events for one stage. Disabled (a no-op) on non-zero ranks and without a run directory.

    >>> ev = EventWriter(run_dir, "base_train", rank=dist.rank)
    >>> ev.step(step=10, total_steps=100, loss=3.2, lrm=1.0, dt=0.5, tok_per_sec=1e5, mfu=0.4,
    ...         tokens=1_000_000, eta_s=45.0)
    """

    def __init__(self, run_dir: str | os.PathLike | None, stage: str, rank: int = 0):
        self.stage = stage
        self.rank = rank
        self.enabled = run_dir is not None and rank == 0
        self.path = None
        self._f = None
        self._t0 = time.time()
        if self.enabled:
            d = Path(run_dir) / stage
            d.mkdir(parents=True, exist_ok=True)
            self.path = d / EVENTS_FILE
            # line-buffered append: each event reaches the OS as one write, so readers never see half
            # a line except at the very end while it is being written (text no encoder takes, such as a
            # lone surrogate, is replaced rather than raised)
            self._f = open(self.path, "a", encoding="utf-8", errors="replace", buffering=1)
            if _ends_torn(self.path):
                self._f.write("\n")  # a previous writer died mid-line: our first event starts a line of its own

    def emit(self, kind: str, **fields: Any) -> dict | None:
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}; allowed: {', '.join(KINDS)}")
        if not self.enabled:
            return None
        ev = {"v": SCHEMA_VERSION, "ts": round(time.time(), 3), "stage": self.stage, "kind": kind}
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
        return self.emit("end", status=status, elapsed_s=round(time.time() - self._t0, 3), **fields)

    def error(self, exc: BaseException, **fields):
        return self.emit("error", exc_type=type(exc).__name__, message=str(exc),
                         traceback="".join(tb.format_exception(type(exc), exc, exc.__traceback__))[-8000:], **fields)

    def close(self):
        if self._f:
            self._f.close()
            self._f = None


def _ends_torn(path: Path) -> bool:
    """Does the file end inside a line (its writer died mid-write)?"""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) != b"\n"


class EventReader:
    """Incrementally reads one events.jsonl: call `poll()` repeatedly to get only new events.

    Tolerates a torn last line (an event being written, or a crash mid-write): it is not consumed
    until its newline arrives. Complete lines that are not a valid event (`check_event`) are skipped
    and counted in `malformed`; a line over MAX_LINE_BYTES is skipped without being parsed. Each poll
    reads only the bytes appended since the last one (none when the size has not changed).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0
        self.malformed = 0
        self._ino = None
        self._size = None
        self._skipping = False  # inside an over-long torn line: drop up to its newline

    def poll(self, max_bytes: int | None = None) -> list[dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if self._ino is not None and (st.st_ino != self._ino or st.st_size < self.offset):
            self.offset, self._skipping = 0, False  # file replaced or truncated: start over
        elif st.st_size == self._size:
            return []        # nothing new (a long torn tail is not read again and again)
        self._ino, self._size = st.st_ino, st.st_size
        if st.st_size <= self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(max_bytes) if max_bytes else f.read()
        end = chunk.rfind(b"\n")
        lines = chunk[: end + 1].split(b"\n")[:-1]
        if self._skipping and end >= 0:
            lines, self._skipping = lines[1:], False  # the end of the over-long line we gave up on
        consumed = end + 1
        if self._skipping or (len(chunk) - consumed > MAX_LINE_BYTES and not max_bytes):
            # a torn line already too long to be an event: give it up now rather than rereading it
            self.malformed += not self._skipping
            consumed, self._skipping = len(chunk), True
        self.offset += consumed
        out = []
        for line in lines:
            ev = parse_line(line)
            if ev is None:
                self.malformed += line.strip() != b""
            else:
                out.append(ev)
        return out


def parse_line(line: bytes) -> dict | None:
    """One events.jsonl line as a checked event, or None (blank, over-long, not JSON, or failing check_event)."""
    if not line.strip() or len(line) > MAX_LINE_BYTES:
        return None
    try:
        ev = json.loads(line)
    except (ValueError, RecursionError):  # invalid JSON or UTF-8, or absurd nesting
        return None
    return ev if check_event(ev) is None else None


def read_events(path: str | os.PathLike) -> tuple[list[dict], int]:
    """All complete events of one file, and the count of malformed lines skipped."""
    r = EventReader(path)
    evs = r.poll()
    return evs, r.malformed


def stage_event_files(run_dir: str | os.PathLike) -> Iterator[tuple[str, Path]]:
    """(stage, path) for every stage of a run that has written events."""
    for p in sorted(Path(run_dir).glob(f"*/{EVENTS_FILE}")):
        yield p.parent.name, p
