"""Random access to huge, growing log files without loading them: a sparse line index built by scanning
in chunks (numpy finds the newlines), then seek + read of just the lines on screen.

Memory: one int64 per STRIDE lines (a 10 GB log of 100M lines needs ~3 MB of index). Cost is linear in
the bytes read however long a line is; a line on screen is cut at LINE_CAP bytes (the rest is skipped,
not kept).
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import numpy as np

STRIDE = 256          # index every 256th line start
CHUNK = 8 << 20       # scan 8 MiB at a time
LINE_CAP = 64 << 10   # bytes of one line that `raw_lines` returns; a longer line ends with CUT_MARK
CUT_MARK = " [line cut]".encode()

LEVELS = ("all", "info", "warning", "error")
_LEVEL_RE = re.compile(rb"\b(DEBUG|INFO|WARN(?:ING)?|ERROR|CRITICAL|FATAL|Traceback)\b")
_RANK = {b"DEBUG": 0, b"INFO": 1, b"WARN": 2, b"WARNING": 2, b"ERROR": 3, b"CRITICAL": 3, b"FATAL": 3, b"Traceback": 3}


def line_level(line: bytes) -> int:
    """0 debug, 1 info (also lines with no level word), 2 warning, 3 error."""
    m = _LEVEL_RE.search(line[:200])
    return _RANK[m.group(1)] if m else 1


class LogFile:
    """Line-addressable view of a file that may grow (tailing). All methods are thread-safe."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._marks = [0]          # byte offset of line k*STRIDE
        self._nl = 0               # complete lines indexed so far
        self._scanned = 0          # bytes scanned
        self._partial = False      # file does not end with a newline (a last, unterminated line)

    # -- index
    def refresh(self, budget: int | None = None) -> bool:
        """Index newly appended bytes (at most `budget` bytes). Returns True if the file grew."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return False
        with self._lock:
            if size < self._scanned:  # truncated or rotated: start over
                self._marks, self._nl, self._scanned = [0], 0, 0
            if size == self._scanned:
                return False
            end = size if budget is None else min(size, self._scanned + budget)
            with open(self.path, "rb") as f:
                f.seek(self._scanned)
                pos = self._scanned
                while pos < end:
                    buf = f.read(min(CHUNK, end - pos))
                    if not buf:
                        break
                    nls = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) == 10)
                    if len(nls):
                        # line number (1-based count) each newline completes; a mark goes after every STRIDE-th
                        counts = np.arange(self._nl + 1, self._nl + 1 + len(nls))
                        hit = nls[counts % STRIDE == 0]
                        self._marks.extend((pos + hit + 1).tolist())
                        self._nl += len(nls)
                    pos += len(buf)
                self._scanned = pos
                self._partial = not buf.endswith(b"\n") if pos else False
            return True

    @property
    def size(self) -> int:
        return self._scanned

    def __len__(self) -> int:
        """Lines known so far, counting an unterminated last line."""
        return self._nl + (1 if self._partial else 0)

    # -- reading
    def lines(self, start: int, count: int) -> list[str]:
        """Lines [start, start+count) as text (undecodable bytes replaced)."""
        return [b.decode("utf-8", "replace") for b in self.raw_lines(start, count)]

    def raw_lines(self, start: int, count: int) -> list[bytes]:
        with self._lock:
            n = self._nl + (1 if self._partial else 0)
            start = max(0, min(start, n))
            count = max(0, min(count, n - start))
            if not count:
                return []
            mark = start // STRIDE
            off = self._marks[mark]
            skip = start - mark * STRIDE
            out: list[bytes] = []
            with open(self.path, "rb") as f:
                f.seek(off)
                for ln in _split_lines(f, self._scanned - off, 1 << 16, cap=LINE_CAP):
                    if skip:
                        skip -= 1
                        continue
                    out.append(ln.rstrip(b"\r"))
                    if len(out) == count:
                        break
            return out

    def line_offset(self, line: int) -> int:
        """Byte offset where `line` starts (reads at most STRIDE lines)."""
        with self._lock:
            mark = min(line // STRIDE, len(self._marks) - 1)
            off, k = self._marks[mark], mark * STRIDE
        if k == line:
            return off
        with open(self.path, "rb") as f:
            f.seek(off)
            while k < line:
                ln = f.readline()
                if not ln:
                    break
                off += len(ln)
                k += 1
        return off

    # -- search and filter (scan in chunks: never the whole file in memory)
    def iter_lines_from(self, start: int, stop: int | None = None):
        """(line number, bytes) from `start` onwards, streaming."""
        off = self.line_offset(start)
        with open(self.path, "rb") as f:
            f.seek(off)
            for k, ln in enumerate(_split_lines(f, self._scanned - off, CHUNK), start):
                if stop is not None and k >= stop:
                    return
                yield k, ln

    def find(self, pattern: re.Pattern, start: int, backwards: bool = False, cancel=None) -> int | None:
        """Line number of the next (or previous) line matching `pattern` (a bytes regex), wrapping around."""
        n = len(self)
        if not n:
            return None
        if not backwards:
            for rng in ((start + 1, None), (0, start + 1)):
                for k, ln in self.iter_lines_from(*rng):
                    if cancel is not None and cancel():
                        return None
                    if pattern.search(ln):
                        return k
            return None
        # backwards: scan windows of lines before `start`, last match in each window wins
        windows = [(max(0, s), min(e, n)) for s, e in _back_windows(start, n)]
        for s, e in windows:
            last = None
            for k, ln in self.iter_lines_from(s, e):
                if pattern.search(ln):
                    last = k
            if cancel is not None and cancel():
                return None
            if last is not None:
                return last
        return None

    def filter(self, pattern: re.Pattern | None, min_level: int = 0, start: int = 0, cancel=None) -> list[int]:
        """Numbers of the lines matching `pattern` and at or above `min_level`, from line `start`."""
        out = []
        for k, ln in self.iter_lines_from(start):
            if cancel is not None and (k & 0xFFFF) == 0 and cancel():
                break
            if pattern is not None and not pattern.search(ln):
                continue
            if min_level and line_level(ln) < min_level:
                continue
            out.append(k)
        return out


def _split_lines(f, limit: int, block: int, cap: int | None = None):
    """The lines in the next `limit` bytes of `f` (read `block` at a time), without their newline; with
    `cap`, each cut to `cap` bytes plus CUT_MARK. Pieces of a long line are joined once: linear time."""
    pieces, have, cut = [], 0, False
    while limit > 0:
        buf = f.read(min(block, limit))
        if not buf:
            break
        limit -= len(buf)
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            piece = buf[start:] if nl < 0 else buf[start:nl]
            if cap is not None and have + len(piece) > cap:
                piece, cut = piece[:max(0, cap - have)], True
            if piece:
                pieces.append(piece)
                have += len(piece)
            if nl < 0:
                break
            yield b"".join(pieces) + (CUT_MARK if cut else b"")
            pieces, have, cut = [], 0, False
            start = nl + 1
    if pieces or cut:
        yield b"".join(pieces) + (CUT_MARK if cut else b"")


def _back_windows(start: int, n: int, size: int = 4096):
    e = start
    while e > 0:
        yield max(0, e - size), e
        e -= size
    e = n
    while e > start:
        yield max(start, e - size), e
        e -= size


def compile_query(text: str, regex: bool, ignore_case: bool = True) -> re.Pattern:
    """A bytes pattern from the search box; raises ValueError naming the problem on a bad regex."""
    flags = re.IGNORECASE if ignore_case else 0
    try:
        return re.compile(text.encode() if regex else re.escape(text.encode()), flags)
    except re.error as e:
        raise ValueError(f"bad regex {text!r}: {e}") from None
