"""Where pretraining text comes from: ClimbMix or FineWeb-Edu shards downloaded from HuggingFace, or a local directory.

Two halves:

1. `download_shards` fetches the shuffled parquet shards of a source in `SOURCES`
   (`python -m nanochat.dataset --source climbmix -n 8`): parallel, retried with backoff, written to
   `<name>.partial` and renamed into place only when complete, resumed with an HTTP Range request after a crash.
2. `list_data_files` / `iter_documents` read a directory of `.parquet` (a `text` column), `.txt`
   (documents separated by blank lines), `.jsonl` (`{"text": ...}`) or WikiExtractor `<doc>` files,
   and hand each rank its share of the documents with a resumable position.

A document's position is `[file_index, doc_index]`: doc_index is the row of a parquet file, or the
n-th document a text/jsonl/wiki file yields. Documents go to ranks by `doc_index % world_size`, so every
document of every file belongs to exactly one rank, whatever the file's row-group layout.
"""
from __future__ import annotations

import argparse
import html
import http.client
import json
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from nanochat.common import fsync_dir, get_base_dir

# ----------------------------------------------------------------------------- downloadable shards


@dataclass(frozen=True)
class Source:
    base_url: str
    max_shard: int          # shards 0..max_shard exist; the last one is held out as the validation split
    dir_name: str           # default directory under $NANOCHAT_BASE_DIR
    chars_per_shard: float  # both were repackaged into shards of ~250 M characters of text


# Both are stored as parquet shards with a `text` column (karpathy's repackaging, the same loader reads
# both). ClimbMix (NVIDIA's curated web/code/math mix) gives a better CORE per FLOP than FineWeb-Edu,
# per karpathy/nanochat's log of 2026-03-04, and is the profiles' default.
SOURCES = {
    "climbmix": Source("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542,
                       "base_data_climbmix", 250e6),
    "fineweb": Source("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822,
                      "base_data", 250e6),
}
# Characters per token of a 32,768-token BPE, for planning before a tokenizer exists: this project
# measured 4.36 bytes/token on English Wikipedia (docs/tokenizer.md); web text is assumed to compress alike.
CHARS_PER_TOKEN = 4.36
DOWNLOAD_HINT = "python -m nanochat.dataset --source climbmix -n 8"  # what error messages tell users to run


def default_data_dir(source: str = "climbmix") -> Path:
    return get_base_dir() / SOURCES[source].dir_name


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def shard_indices(n: int, source: str = "climbmix") -> list[int]:
    """The first n training shards plus the validation shard (n = -1: all of them)."""
    last = SOURCES[source].max_shard
    if n == -1 or n >= last:
        return list(range(last + 1))
    if n < 0:
        raise ValueError(f"-n {n} is not allowed: use 1..{last} training shards, or -1 for all")
    return list(range(n)) + [last]


class _Incomplete(Exception):
    """The body ended before the advertised length: the partial file is kept for a Range resume."""


def _looks_complete(path: Path, name: str) -> bool:
    """Parquet files start and end with the magic b'PAR1'; other files: any non-empty file counts."""
    size = path.stat().st_size
    if not name.endswith(".parquet"):
        return size > 0
    if size < 8:
        return False
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-4, os.SEEK_END)
        return head == b"PAR1" and f.read(4) == b"PAR1"


def _fetch_once(url: str, part: Path, timeout: float, on_bytes: Callable[[int], None]) -> None:
    """One HTTP attempt: continue `part` from its current size if the server honours Range."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "nanochat"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after our bytes: either we have it all already ...
            if e.headers.get("Content-Range", "") == f"bytes */{have}":
                return
            part.unlink()  # ... or our partial is not a prefix of what is there now: start over
        raise
    with resp:
        if resp.status == 206:  # a continuation: it must start exactly where our partial file ends
            crange = resp.headers.get("Content-Range", "")
            if not (have and crange.startswith(f"bytes {have}-")):
                part.unlink(missing_ok=True)
                raise _Incomplete(f"server answered Range bytes={have}- with {crange or 'no Content-Range'!r}")
            total = crange.rpartition("/")[2]
            mode, expected = "ab", int(total) if total.isdigit() else -1
        else:  # 200: a fresh start, or the server ignored Range, so the body is the whole file
            mode, have = "wb", 0
            expected = int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length") else -1
        with open(part, mode) as f:
            while chunk := resp.read1(1 << 20):  # read1: whatever has arrived, so progress is live
                f.write(chunk)
                have += len(chunk)
                on_bytes(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if expected >= 0 and have != expected:
        raise _Incomplete(f"got {have} of {expected} bytes")


def download_file(url: str, dest: Path, *, attempts: int = 5, backoff: float = 1.0, timeout: float = 60.0,
                  on_bytes: Callable[[int], None] = lambda n: None) -> Path:
    """Download url to dest atomically: `<dest>.partial` is filled (and resumed), checked, then renamed.

    Retries with exponential backoff and jitter (backoff * 2**k * U(0.5, 1.5) seconds). A file
    already at `dest` is taken as done, so re-running after a crash only fetches what is missing.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".partial")
    last: BaseException | None = None
    for attempt in range(max(1, attempts)):
        try:
            _fetch_once(url, part, timeout, on_bytes)
            if not _looks_complete(part, dest.name):
                part.unlink()  # a complete-looking length with a broken body: only a restart can help
                raise _Incomplete("file failed its integrity check (no parquet footer)")
            os.replace(part, dest)
            fsync_dir(dest.parent)
            return dest
        except (OSError, http.client.HTTPException, _Incomplete) as e:  # URLError/HTTPError/resets/timeouts are OSErrors
            last = e
            if isinstance(e, urllib.error.HTTPError) and e.code == 404:
                break  # retrying will not make a missing shard appear
            if attempt + 1 < attempts:
                time.sleep(backoff * 2 ** attempt * random.uniform(0.5, 1.5))
    raise RuntimeError(f"could not download {url} after {attempt + 1} attempts: {type(last).__name__}: {last}")


def download_shards(indices: Iterable[int], data_dir: str | os.PathLike | None = None, *,
                    source: str = "climbmix", base_url: str | None = None, workers: int = 8, attempts: int = 5,
                    backoff: float = 1.0, timeout: float = 60.0, progress: bool = True) -> list[Path]:
    """Fetch the given shards of `source` into data_dir in parallel; returns their paths.

    base_url (else $NANOCHAT_DATA_URL, else the source's HuggingFace location) lets tests and mirrors
    stand in for the hub. Raises RuntimeError naming every shard that still failed after all retries.
    """
    data_dir = Path(data_dir) if data_dir else default_data_dir(source)
    data_dir.mkdir(parents=True, exist_ok=True)
    base_url = (base_url or os.environ.get("NANOCHAT_DATA_URL") or SOURCES[source].base_url).rstrip("/")
    indices = list(indices)
    todo = [i for i in indices if not (data_dir / shard_name(i)).exists()]

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[mb]:.0f} MB"),
                  TimeElapsedColumn(), disable=not progress, transient=False) as bar:
        task = bar.add_task("download", total=len(indices), completed=len(indices) - len(todo), mb=0.0)
        got, stop = [0], threading.Event()

        def on_bytes(n):
            if stop.is_set():  # Ctrl-C: leave the .partial file for next time, now
                raise KeyboardInterrupt
            got[0] += n
            bar.update(task, mb=got[0] / 1e6)

        def one(i):
            path = download_file(f"{base_url}/{shard_name(i)}", data_dir / shard_name(i), attempts=attempts,
                                 backoff=backoff, timeout=timeout, on_bytes=on_bytes)
            bar.advance(task)
            return path

        failures = []
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {i: pool.submit(one, i) for i in todo}
            try:
                for i, fut in futures.items():
                    if fut.exception() is not None:
                        failures.append(f"{shard_name(i)} ({fut.exception()})")
            except KeyboardInterrupt:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(todo)} shards failed: " + "; ".join(failures))
    return [data_dir / shard_name(i) for i in indices]


# ----------------------------------------------------------------------------- local corpora

WIKI_DOC = re.compile(r'<doc id="[^"]*" url="[^"]*" title="[^"]*">\n(.*?)\n</doc>', re.S)
WIKI_MIN_CHARS = 300  # shorter WikiExtractor docs are redirect-like stubs
TEXT_SUFFIXES = (".parquet", ".txt", ".jsonl")


def file_format(path: Path) -> str | None:
    """'parquet' | 'txt' | 'jsonl' | 'wiki' (WikiExtractor output, found by content) | None (not data)."""
    if path.name.startswith(".") or path.name.endswith((".partial", ".tmp")):
        return None
    if path.suffix in TEXT_SUFFIXES:
        return path.suffix[1:]
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return None
    return "wiki" if head.startswith(b"<doc ") else None


def list_data_files(data_dir: str | os.PathLike) -> list[Path]:
    """All data files under data_dir (recursively), sorted by relative path; the last is the val split.

    A missing directory is an error; an existing one without data files gives [] (callers count).
    """
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist; fill it with `{DOWNLOAD_HINT} --dir {data_dir}` "
                                f"or point it at a directory of .parquet/.txt/.jsonl files")
    return sorted((p for p in data_dir.rglob("*") if p.is_file() and file_format(p)),
                  key=lambda p: p.relative_to(data_dir).as_posix())


def split_files(files: list[Path], split: str) -> list[Path]:
    """train = every file but the last, val = the last file."""
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r} is not allowed; use 'train' or 'val'")
    if len(files) < 2:
        raise ValueError(f"need at least 2 data files (the last is held out for validation), found {len(files)}"
                         + (f": {files[0]}" if files else f"; fill the data directory with `{DOWNLOAD_HINT}`"))
    return files[:-1] if split == "train" else files[-1:]


def data_files(data_dir: str | os.PathLike, split: str) -> list[Path]:
    return split_files(list_data_files(data_dir), split)


def _text_docs(path: Path, fmt: str) -> Iterator[str]:
    """Documents of a text-like file in order. Bad UTF-8 becomes U+FFFD; bad jsonl lines are skipped."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                text = obj.get("text") if isinstance(obj, dict) else None
                if isinstance(text, str) and text.strip():
                    yield text
        return
    content = path.read_bytes().decode("utf-8", errors="replace")
    if fmt == "wiki":
        for m in WIKI_DOC.finditer(content):
            if len(m.group(1)) >= WIKI_MIN_CHARS:
                yield html.unescape(m.group(1)).strip()
    else:  # txt: one document per block of lines separated by blank lines
        for block in re.split(r"\n[ \t\r]*\n", content.replace("\r\n", "\n")):
            if block.strip():
                yield block.strip("\n")


def _parquet_docs(path: Path, keep: Callable[[int], bool], first: int) -> Iterator[tuple[int, str]]:
    """(row, text) for rows >= first that keep() accepts, one row group in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    row0 = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        rows = [r for r in range(max(row0, first), row0 + n) if keep(r)]
        if rows:
            col = pf.read_row_group(rg, columns=["text"]).column("text").take([r - row0 for r in rows])
            # as bytes, decoded here: writers do not always enforce UTF-8, and bad bytes must not crash a run
            for r, v in zip(rows, col.cast(pa.large_binary()).to_pylist()):
                v = v.decode("utf-8", errors="replace") if v is not None else ""
                if v.strip():
                    yield r, v
        row0 += n


def _file_docs(path: Path, keep: Callable[[int], bool], first: int = 0) -> Iterator[tuple[int, str]]:
    fmt = file_format(path)
    if fmt == "parquet":
        yield from _parquet_docs(path, keep, first)
    else:
        for i, text in enumerate(_text_docs(path, fmt)):
            if i >= first and keep(i):
                yield i, text


def iter_documents(files: list[Path], rank: int = 0, world_size: int = 1, start=None) -> Iterator[tuple[str, list[int]]]:
    """Yield (text, [file_index, doc_index]) for this rank's documents, in file order, one pass.

    start: a position yielded earlier; iteration resumes with the document after it.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not allowed with world_size {world_size}")
    f0, d0 = (0, 0) if start is None else (int(start[0]), int(start[1]) + 1)
    for fi in range(f0, len(files)):
        for di, text in _file_docs(Path(files[fi]), lambda i: i % world_size == rank, d0 if fi == f0 else 0):
            yield text, [fi, di]


def read_documents(files: list[Path], positions: list) -> list[str]:
    """The texts at the given positions (any order, any files): how a resumed loader refills its buffer."""
    wanted: dict[int, set[int]] = {}
    for fi, di in positions:
        wanted.setdefault(int(fi), set()).add(int(di))
    found = {}
    for fi, docs in wanted.items():
        left = len(docs)
        for di, text in _file_docs(Path(files[fi]), docs.__contains__, min(docs)):
            found[(fi, di)] = text
            left -= 1
            if not left:
                break
    missing = [p for p in positions if (int(p[0]), int(p[1])) not in found]
    if missing:
        raise ValueError(f"{len(missing)} document positions no longer exist in the data files (first: {missing[0]}); "
                         f"did the data directory change since the checkpoint?")
    return [found[(int(fi), int(di))] for fi, di in positions]


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanochat.dataset",
                                 description="Download pretraining shards (~250 M characters each, the last one is the val split).")
    ap.add_argument("--source", choices=list(SOURCES), default="climbmix", help="which corpus (default climbmix)")
    ap.add_argument("-n", "--num-shards", type=int, default=8,
                    help="training shards to fetch (plus the val shard); -1 = all of the source's")
    ap.add_argument("--dir", type=Path, default=None, help="target directory (default <base>/base_data_climbmix "
                                                           "for climbmix, <base>/base_data for fineweb)")
    ap.add_argument("-w", "--workers", type=int, default=8, help="parallel downloads")
    ap.add_argument("--url", default=None, help="base URL (default $NANOCHAT_DATA_URL or HuggingFace)")
    args = ap.parse_args(argv)
    try:
        indices = shard_indices(args.num_shards, args.source)
        paths = download_shards(indices, args.dir, source=args.source, base_url=args.url, workers=args.workers)
    except (ValueError, RuntimeError) as e:
        print(f"nanochat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nanochat: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"{len(paths)} shards ready in {paths[0].parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
